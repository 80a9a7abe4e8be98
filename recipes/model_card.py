"""Measure a trained kaki-tiny and write its model card (README.md) and card.json.

The figures come from the shipped weights on the committed evaluation set (data/eval/), so
tests/test_demo_model.py can recompute them and the card cannot drift from the model.

    python recipes/model_card.py --model models/kaki-tiny --work work/kaki-tiny
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "data" / "eval"
PYDOCS = ROOT / "data" / "pydocs" / "passages.jsonl.gz"
VECTORS = ROOT / "data" / "pydocs" / "vectors.npz"
# Passages per question: 1 is what `make chat` uses for this model (its generation_config.json's
# retrieval_k); 3 is kaki's default (kaki.retrieval.grounding.DEFAULT_K), measured too.
RETRIEVAL_K = 1
RETRIEVAL_K_DEFAULT = 3
# Prompts generated together: one batch per question set (58 and 84 prompts) instead of batches of
# 16, so each set runs one decoding loop. For a 10 M-parameter model on a CPU a decoding step costs
# mostly per-step overhead, so the card's recompute (tests/test_demo_model.py) took 39-47 s instead
# of 52 s on a shared 2-core machine, with the same figures.
EVAL_BATCH = 96


def demo_index(tmp: Path) -> Path:
    """The index `make index` builds for `make chat`: all 14k documentation passages, one per
    record, dense + BM25 from the shipped vectors, searched dense by default (the Makefile)."""
    import gzip

    from kaki.retrieval import Chunking, build_index

    corpus = tmp / "pydocs-passages.jsonl"
    corpus.write_bytes(gzip.decompress(PYDOCS.read_bytes()))
    build_index([corpus], tmp / "index", chunking=Chunking(mode="none"), vectors=VECTORS, search_mode="dense")
    return tmp / "index"


def retrieved_questions(index: Path, questions: list[dict], k: int) -> tuple[list[dict], float]:
    """The questions with the top passages retrieved for them, and how often the gold passage was
    among them."""
    from kaki.retrieval import Retriever

    with Retriever.open(index) as r:
        hits = [r.search(q["question"], k=k) for q in questions]
    out = [{**q, "passages": [h.as_context() for h in hs]} for q, hs in zip(questions, hits)]
    gold = sum(q["passage_id"] in {h.ref for h in hs} for q, hs in zip(questions, hits)) / len(questions)
    return out, gold


def measure(model_dir: Path, limit: int = 0, dtype: str = "float32") -> dict:
    """The card's figures: held-out perplexity, greedy answer accuracy with and without the gold
    passage in the prompt and with retrieval, and usefulness on the user questions (float32,
    greedy: deterministic on one machine)."""
    import tempfile

    import kaki
    from kaki.evaluate import answer_accuracy, attach_passages, perplexity, read_jsonl
    from kaki.retrieval import Retriever
    from kaki.usefulness import usefulness

    llm = kaki.load(model_dir, dtype=dtype, device="cpu")
    passages = read_jsonl(EVAL / "passages.jsonl")
    questions = attach_passages(read_jsonl(EVAL / "questions.jsonl"), EVAL / "passages.jsonl")
    users = read_jsonl(EVAL / "user-questions.jsonl")
    if limit:
        passages, questions, users = passages[:limit], questions[:limit], users[:limit]
    ppl = perplexity(llm, passages)
    with_ctx = answer_accuracy(llm, questions, context=True, batch_size=EVAL_BATCH)
    without = answer_accuracy(llm, questions, context=False, batch_size=EVAL_BATCH)
    retrieval = {}
    with tempfile.TemporaryDirectory() as tmp:
        index = demo_index(Path(tmp))
        for k in (RETRIEVAL_K, RETRIEVAL_K_DEFAULT):
            retrieved, gold_share = retrieved_questions(index, questions, k)
            res = answer_accuracy(llm, retrieved, context=True, batch_size=EVAL_BATCH)
            retrieval[k] = {"contains": round(res.contains, 4), "exact": round(res.exact, 4), "k": k,
                            "mode": "dense", "gold_retrieved": round(gold_share, 4)}
        with Retriever.open(index) as r:
            useful_retrieved = usefulness(llm, users, r, k=RETRIEVAL_K, batch_size=EVAL_BATCH).to_json()
    useful_alone = usefulness(llm, users, None, batch_size=EVAL_BATCH).to_json()
    return {
        "eval_passages": len(passages), "eval_questions": len(questions),
        "eval_loss": round(ppl.loss, 4), "eval_perplexity": round(ppl.perplexity, 2),
        "accuracy_with_passage": {"contains": round(with_ctx.contains, 4), "exact": round(with_ctx.exact, 4)},
        "accuracy_without_passage": {"contains": round(without.contains, 4), "exact": round(without.exact, 4)},
        "accuracy_with_retrieval": retrieval[RETRIEVAL_K],
        "accuracy_with_retrieval_top3": retrieval[RETRIEVAL_K_DEFAULT],
        "user_questions": len(users),
        "useful_with_retrieval": {k: round(v, 4) if isinstance(v, float) else v for k, v in useful_retrieved.items()},
        "useful_without_retrieval": {k: round(v, 4) for k, v in useful_alone.items()},
    }


STAGES = ("pretrain", "chat", "ground", "lookup", "user")


def training_summary(work: Path, previous: dict | None = None) -> dict:
    """Each stage's steps, tokens, time and losses from its metrics.jsonl. A stage whose metrics
    are gone (a build that resumed from an exported model: its earlier stages ran elsewhere) keeps
    the figures of the model's previous card, marked as such."""
    out = {}
    for stage in STAGES:
        path = work / stage / "metrics.jsonl"
        if not path.is_file():
            if previous and stage in previous:
                out[stage] = {**previous[stage], "from_previous_card": True}
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [r for r in rows if "loss" in r and r.get("kind", "train") == "train"]
        evals = [r for r in rows if r.get("eval_loss") is not None]
        last = rows[-1] if rows else {}
        out[stage] = {
            "steps": max((r.get("step", 0) for r in rows), default=0),
            "tokens": max((r.get("tokens", 0) for r in rows), default=0),
            "seconds": round(max((r.get("elapsed", r.get("elapsed_s", 0)) for r in rows), default=0)),
            "final_train_loss": round(train[-1]["loss"], 4) if train else None,
            "final_eval_loss": round(evals[-1]["eval_loss"], 4) if evals else None,
        }
        out[stage]["last_record"] = last
    return out


CARD = """# kaki-tiny

A {params_m:.1f} M-parameter **Persimmon-architecture** model (q/k LayerNorm, partial rotary 0.5,
squared-ReLU MLP, untied embeddings) with its own 8k-piece sentencepiece Unigram tokenizer (byte
fallback), trained from scratch by `recipes/kaki-tiny.sh` with kaki's own commands, as the demo
model that `make chat` and `kaki serve` run with no download. It is a small **Python
documentation assistant**: pretrained on the Python 3.11 documentation sources, then chat-tuned on
question/answer pairs derived from them in Persimmon's chat format (`human: ...\\n\\nadept: ...`),
about half of them with retrieved passages in the prompt (kaki's context block,
`kaki.chat_format`), so it learns to answer from what retrieval puts in front of it.

## Numbers (measured by `recipes/model_card.py` on the held-out set, float32, greedy)

| | |
|---|---|
| parameters | {params:,} ({layers} layers, hidden {hidden}, {heads} heads, context {ctx}) |
| weights | {size_mb:.1f} MB (bfloat16 safetensors) |
| held-out perplexity | {m[eval_perplexity]} (loss {m[eval_loss]}) on {m[eval_passages]} documentation passages never trained on |
| answer contains the key phrase, **with** the gold passage in the prompt | **{with_c:.0%}** ({m[eval_questions]} hand-written paraphrased questions) |
| answer contains the key phrase, **without** it | **{without_c:.0%}** |
| answer contains the key phrase, with the top passage **retrieved** from all 14k documentation passages (dense search, as `make chat` does) | **{ret_c:.0%}** (the top passage was the answering one for {r[gold_retrieved]:.0%} of the questions) |
| ... with the top {r3[k]} retrieved passages (kaki's default `--retrieval-k`) | {r3[contains]:.0%} (the answering one among them for {r3[gold_retrieved]:.0%}) |
| exact answer match (with / without / retrieved) | {with_e:.0%} / {without_e:.0%} / {ret_e:.0%} |

**Everyday questions** (`data/eval/user-questions.jsonl`: {m[user_questions]} questions typed the way
people ask them, such as "how do i reverse a list in python", not derived from the passages), as
`make chat` answers them (`kaki eval --data data/eval/user-questions.jsonl --retrieval
work/index/pydocs.kaki-index --retrieval-k 1`):

| | |
|---|---|
| **useful end to end**: the reply names what answers it, or the source cited under it is a passage that answers it | **{u[end_to_end]:.0%}** |
| the reply alone names what answers it (its key terms) | **{u[reply]:.0%}** ({u0[reply]:.0%} without retrieval) |
| the cited source answers it (hit@1) | {u[citation]:.0%} |

{verdict}

## Training

{training}

Hardware: {hardware}; precision {precision}. Recipe: `recipes/kaki-tiny.sh` (resumable;
`--smoke` runs the whole pipeline for a few steps on the committed subset, and CI does).

## Data and licence

- Text: the reStructuredText sources of the Python 3.11 documentation as Debian's `python3.11-doc`
  package ships them (`/usr/share/doc/python3.11/html/_sources`), © Python Software Foundation,
  PSF License; see `data/eval/NOTICE`. 270 whole documentation entries are held out of both
  training stages; they and the 58 questions form the evaluation set in `data/eval/`.
- Chat data: question/answer pairs generated from the docs' structure (`.. function::`,
  `.. class::`, section titles, howtos) by `recipes/prepare_data.py`; then drills that make it
  answer from the passages in its prompt (quote, single-passage and pick-one-of-three), and
  lookup drills that ask from a description to a name ("Which function returns ...?").
{user_stage}- The weights are released under the same terms as kaki itself.

## What it cannot do

- It knows only what the Python 3.11 docs say, imperfectly: {params_m:.0f} M parameters memorise
  little, so without a passage most specific answers (names, signatures, defaults) are guesses.
- It is not a general chat model: off-topic questions get docs-flavoured nonsense.
- It has no safety tuning and no knowledge after Python 3.11; it cannot run code.
- Its context is {ctx} tokens; long conversations are trimmed by the chat shell.
"""


# The card's line for the last stage, when the build ran it (recipes/kaki-tiny.sh: USER_STEPS).
USER_STAGE = """- Last, user-style paraphrases of those questions ("python get the square root of x", "how do i
  check if ...": `recipes/paraphrase.py`), each with the passage the demo index retrieves for it
  in the prompt, as `make chat` shows it (`recipes/user_drills.py`). No evaluation question is
  among them in any framing ("python ...", "how do i ..."): `--exclude` drops them and
  `tests/test_user_questions.py` checks.
"""


def verdict_text(m: dict) -> str:
    """What the numbers mean, in words: the demo's point is the gap a passage in the prompt makes."""
    without = m["accuracy_without_passage"]["contains"]
    given, retrieved = m["accuracy_with_passage"]["contains"], m["accuracy_with_retrieval"]["contains"]
    r = m["accuracy_with_retrieval"]
    if given - without < 0.15:
        return ("**This build does not show the intended gap**: a passage in the prompt barely changes its "
                "answers, so it has not learnt to answer from context. Treat its replies as noise.")
    text = (f"That gap is the point of the demo: given the passage that answers, the model copies the "
            f"answer out of it ({given:.0%} of answers contain the key phrase against {without:.0%} without "
            f"it); without a passage it is fluent and wrong.")
    r3 = m["accuracy_with_retrieval_top3"]
    lower = r3["contains"] < retrieved
    text += (f" With retrieval (dense search over all 14k passages) and the single top passage in the prompt, "
             f"as `make chat` runs it, {retrieved:.0%} (that passage is the answering one for "
             f"{r['gold_retrieved']:.0%} of the questions). With the top {r3['k']} it "
             + (f"drops to {r3['contains']:.0%}: among several passages it often copies the wrong one."
                if lower else f"is {r3['contains']:.0%}."))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--seconds", type=int, default=0, help="wall time of this recipe run (informational)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N items (smoke runs)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--previous-card", help="card.json of the model this build continued from: the "
                    "figures of stages whose metrics are not in --work")
    args = ap.parse_args()
    model_dir, work = Path(args.model), Path(args.work)

    from kaki.config import read_config
    cfg = read_config(model_dir)
    metrics = measure(model_dir, args.limit)
    previous = json.loads(Path(args.previous_card).read_text())["training"] if args.previous_card else None
    training = training_summary(work, previous)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    lines = []
    for stage, t in training.items():
        lines.append(f"- {stage}: {t['steps']} steps, {t['tokens']:,} tokens, {t['seconds'] / 60:.0f} min; "
                     f"final train loss {t['final_train_loss']}, eval loss {t['final_eval_loss']}"
                     + (" (from the previous build's card: this build's later stages started from its bf16 export)" if t.get("from_previous_card") else ""))
    card = {"model": metrics, "training": {k: {kk: vv for kk, vv in v.items() if kk != "last_record"}
                                           for k, v in training.items()},
            "parameters": cfg.num_parameters(), "eval_dtype": "float32", "limit": args.limit}
    verdict = verdict_text(metrics)
    text = CARD.format(verdict=verdict,
        params=cfg.num_parameters(), params_m=cfg.num_parameters() / 1e6, layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, heads=cfg.num_attention_heads, ctx=cfg.max_position_embeddings,
        size_mb=size / 1e6, m=metrics,
        with_c=metrics["accuracy_with_passage"]["contains"], without_c=metrics["accuracy_without_passage"]["contains"],
        with_e=metrics["accuracy_with_passage"]["exact"], without_e=metrics["accuracy_without_passage"]["exact"],
        r=metrics["accuracy_with_retrieval"], r3=metrics["accuracy_with_retrieval_top3"], ret_c=metrics["accuracy_with_retrieval"]["contains"],
        ret_e=metrics["accuracy_with_retrieval"]["exact"],
        u=metrics["useful_with_retrieval"], u0=metrics["useful_without_retrieval"],
        training="\n".join(lines) or "- (no training metrics found)",
        user_stage=USER_STAGE if "user" in training else "",
        hardware=f"{platform.machine()} CPU, 2 cores", precision=args.precision)
    (model_dir / "README.md").write_text(text)
    (model_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
