"""`kaki eval`: perplexity and question-answering accuracy of a model on a JSONL file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kaki.chat_format import FORMATS
from kaki.cli.common import add_model_args, load_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity and answer accuracy on a JSONL file",
        description="Perplexity on text/chat records (chat: assistant tokens only) and, for "
                    "question/answer records, greedy answer accuracy (exact and key-phrase "
                    "contains-match) with and without the gold passages in the prompt.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL: {text}, {messages} or {question, answer, "
                                                 "key_phrase?, passages? | passage_id?} records")
    p.add_argument("--passages", default=None,
                   help="passages JSONL (id, title, text) for questions' passage_id "
                        "(default: passages.jsonl next to --data)")
    ctx = p.add_mutually_exclusive_group()
    ctx.add_argument("--with-context", dest="context", action="store_const", const="with",
                     help="questions only with their gold passages in the prompt")
    ctx.add_argument("--no-context", dest="context", action="store_const", const="without",
                     help="questions only without passages")
    p.set_defaults(context="both")
    p.add_argument("--retrieval", metavar="INDEX", default=None,
                   help="also answer each question with the passages `kaki index` retrieves for it "
                        "from INDEX (what `kaki chat --retrieval` does), reported as with_retrieval")
    p.add_argument("--retrieval-k", type=int, default=None,
                   help="passages retrieved per question (default: the model's generation_config.json "
                        "retrieval_k, else 3: what `kaki chat --retrieval` uses)")
    p.add_argument("--retrieval-mode", default=None, choices=("bm25", "dense", "hybrid"),
                   help="ranking (default: hybrid when the index has vectors, else bm25)")
    p.add_argument("--chat-format", default="auto", choices=FORMATS, help="how prompts are rendered")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length limit for questions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=None,
                   help="perplexity window in tokens (default: the model's context)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--show", action="store_true", help="print every question with the model's reply")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.set_defaults(func=run)


def run(args) -> int:
    from kaki.chat_format import format_for_llm
    from kaki.errors import KakiError
    from kaki.evaluate import answer_accuracy, attach_passages, perplexity, read_jsonl
    from kaki.retrieval.grounding import retrieval_k

    records = read_jsonl(args.data)[:args.limit]
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise KakiError("--max-new-tokens and --batch-size must be at least 1")
    users = [r for r in records if "key_terms" in r]
    questions = [r for r in records if "question" in r and "key_terms" not in r]
    texts = [r for r in records if "question" not in r]
    passages = args.passages or Path(args.data).with_name("passages.jsonl")
    modes = {"both": [False, True], "with": [True], "without": [False]}[args.context]
    if args.context == "both" and not any("passages" in q or q.get("passage_id") is not None for q in questions):
        modes = [False]
    if True in modes:
        questions = attach_passages(questions, passages)
    retrieved = None
    if args.retrieval and not questions and not users:
        raise KakiError(f"--retrieval needs question records in {args.data}")
    llm = load_from_args(args)
    if args.retrieval:
        args.retrieval_k = retrieval_k(args.retrieval_k, llm.path)
        if questions:
            retrieved = retrieve_passages(args.retrieval, questions, args.retrieval_k, args.retrieval_mode)
    fmt = format_for_llm(llm, args.chat_format)
    out: dict = {"model": llm.path, "data": str(args.data), "chat_format": fmt.name}
    if texts:
        ppl = perplexity(llm, texts, fmt, batch_size=args.batch_size, max_len=args.max_len)
        out["perplexity"] = {"records": ppl.records, "tokens": ppl.tokens, "loss": ppl.loss,
                             "perplexity": ppl.perplexity}
    if questions:
        out["questions"] = len(questions)
        for context in modes:
            res = answer_accuracy(llm, questions, context, fmt, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size)
            key = "with_context" if context else "without_context"
            out[key] = {"exact": res.exact, "contains": res.contains}
            if args.json and args.show:
                out[key]["items"] = res.items
            if args.show and not args.json:
                for it in res.items:
                    mark = "+" if it["contains"] else "-"
                    print(f"[{key}] {mark} {it['question']}\n    reply: {it['reply']}\n    key: {it['key_phrase']}")
        if retrieved is not None:
            res = answer_accuracy(llm, retrieved.questions, True, fmt, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size)
            out["with_retrieval"] = {"exact": res.exact, "contains": res.contains, "k": args.retrieval_k,
                                     "mode": retrieved.mode, "gold_retrieved": retrieved.gold_share}
            if args.json and args.show:
                out["with_retrieval"]["items"] = res.items
    if users:
        out["user_questions"] = len(users)
        out.update(score_users(llm, users, fmt, args))
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(f"model {out['model']}  data {out['data']}  chat format {out['chat_format']}")
    if "perplexity" in out:
        p = out["perplexity"]
        print(f"perplexity {p['perplexity']:.3f}  (loss {p['loss']:.4f} over {p['tokens']} tokens, "
              f"{p['records']} records)")
    for key in ("without_context", "with_context", "with_retrieval"):
        if key in out:
            r = out[key]
            print(f"answers {key.replace('_', ' ')}: exact {r['exact']:.1%}  contains {r['contains']:.1%}"
                  f"  ({out['questions']} questions)")
    if "with_retrieval" in out and out["with_retrieval"]["gold_retrieved"] is not None:
        r = out["with_retrieval"]
        print(f"retrieval: gold passage among the top {r['k']} ({r['mode']}) for "
              f"{r['gold_retrieved']:.1%} of the questions")
    for key in ("useful_without_retrieval", "useful_with_retrieval"):
        if key in out:
            u = out[key]
            how = (f"with retrieval (top {u['k']}, {u['mode']}): reply {u['reply']:.1%}  citation@1 "
                   f"{u['citation']:.1%}  end to end {u['end_to_end']:.1%}") if "k" in u else \
                f"without retrieval: reply {u['reply']:.1%}"
            print(f"useful answers {how}  ({out['user_questions']} user questions)")
    sys.stdout.flush()
    return 0


def score_users(llm, users: list[dict], fmt, args) -> dict:
    """User questions (kaki.usefulness): the reply alone without retrieval, and with --retrieval
    reply, citation and end to end as `kaki chat --retrieval` shows them."""
    from kaki.retrieval import Retriever
    from kaki.usefulness import usefulness

    out = {}
    runs = [("useful_without_retrieval", None)] if args.context != "with" else []
    if args.retrieval:
        runs.append(("useful_with_retrieval", args.retrieval))
    for key, index in runs:
        if index is None:
            res = usefulness(llm, users, None, fmt=fmt, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        else:
            with Retriever.open(index, mode=args.retrieval_mode) as r:
                res = usefulness(llm, users, r, k=args.retrieval_k, mode=args.retrieval_mode, fmt=fmt,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        out[key] = res.to_json()
        if args.show:
            for it in res.items:
                mark = ("+" if it["reply"] else "-") + ("c" if it["citation"] else " ")
                if not args.json:
                    print(f"[{key}] {mark} {it['question']}\n    reply: {it['reply_text']}\n    cited: {it['cited']}")
            if args.json:
                out[key]["items"] = res.items
    return out


class Retrieved:
    """Questions with their retrieved passages as `passages`, and how often the gold one was among them."""

    def __init__(self, questions: list[dict], mode: str, gold_share: float | None):
        self.questions, self.mode, self.gold_share = questions, mode, gold_share


def retrieve_passages(index: str, questions: list[dict], k: int, mode: str | None) -> Retrieved:
    from kaki.retrieval import Retriever

    out, gold_hits, with_gold = [], 0, 0
    with Retriever.open(index, mode=mode) as r:
        used = mode or r.default_mode
        for q in questions:
            hits = r.search(q["question"], k=k, mode=mode)
            out.append({**q, "passages": [h.as_context() for h in hits]})
            # An index built from passages JSONL keeps each record's id as the hit's ref.
            if q.get("passage_id") is not None:
                with_gold += 1
                gold_hits += q["passage_id"] in {h.ref for h in hits}
    return Retrieved(out, used, gold_hits / with_gold if with_gold else None)
