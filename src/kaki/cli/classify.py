"""`kaki classify`: labels and scores from a sequence or token classifier."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  kaki classify --model runs/sentiment "what a lovely day" "this is awful"
  kaki classify --model runs/sentiment --top 1 --json < reviews.txt
  kaki classify --model runs/ner "Ada Lovelace lived in London"
scores: softmax probabilities (single-label), per-label sigmoid probabilities (multi-label) or the
raw value (regression), as config.json's problem_type says; token classifiers print each token's
best label and its probability.
train one: kaki train --task sequence-classification --model DIR --data labelled.jsonl --out OUT
"""


def register(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a sequence or token classifier",
                       description="Classify TEXT(s) with a transformers *ForSequenceClassification or "
                                   "*ForTokenClassification directory (e.g. one `kaki train --task ...` wrote).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", nargs="*", metavar="TEXT", help="text to classify; '-' or none reads stdin, "
                                                           "one text per line")
    p.add_argument("--model", "-m", required=True, help="classifier directory (or a hub id in the local HF cache)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype in memory (auto: fastest that fits on this device)")
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    p.add_argument("--top", type=int, default=None, metavar="K",
                   help="print only the K best labels per text (sequence classifiers)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.set_defaults(func=run)


def read_texts(args) -> list[str]:
    from kaki.errors import KakiError

    texts: list[str] = []
    for t in args.texts or ["-"]:
        texts += [line.rstrip("\n") for line in sys.stdin if line.strip()] if t == "-" else [t]
    empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if not texts or empty:
        raise KakiError(f"text {empty[0]} is empty; pass non-empty TEXT arguments or lines on stdin"
                        if empty else "no text to classify; pass TEXT arguments or lines on stdin")
    return texts


def run(args) -> int:
    from kaki.classify import load_classifier
    from kaki.errors import KakiError
    from kaki.heads import TOKEN

    if args.top is not None and args.top < 1:
        raise KakiError(f"--top must be >= 1, got {args.top}")
    texts = read_texts(args)
    clf = load_classifier(args.model, dtype=args.dtype, device=args.device)
    if clf.task == TOKEN:
        for text, preds in zip(texts, clf.classify_tokens(texts)):
            if args.json:
                print(json.dumps({"text": text, "tokens": [
                    {"token": p.text, "start": p.start, "end": p.end, "label": p.label, "score": p.score}
                    for p in preds]}, ensure_ascii=False))
                continue
            if len(texts) > 1:
                print(text)
            for p in preds:
                print(f"{'  ' if len(texts) > 1 else ''}{json.dumps(p.text, ensure_ascii=False)}\t{p.label}\t{p.score:.4f}")
        return 0
    for text, result in zip(texts, clf.classify(texts)):
        result = result[:args.top] if args.top else result
        if args.json:
            print(json.dumps({"text": text, "labels": [{"label": n, "score": s} for n, s in result]},
                             ensure_ascii=False))
            continue
        if len(texts) > 1:
            print(text)
        for name, score in result:
            print(f"{'  ' if len(texts) > 1 else ''}{name}\t{score:.4f}")
    return 0
