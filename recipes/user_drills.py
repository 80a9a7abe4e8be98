"""User-style questions grounded the way `make chat` grounds them, for kaki-tiny's last stage.

    python recipes/user_drills.py --src DOCS --index INDEX --out WORK/data/user.jsonl

Each training passage's user-style paraphrases (recipes/paraphrase.py: "how do i get the square
root of x", "python os.path.exists") are searched in INDEX (the demo index: dense, top 1, as `make
chat` searches), and the passage it returns is put in the prompt with kaki.chat_format's context
block, as the chat shell does. The reply is the answering passage's name and first sentences.
Where retrieval found the answering passage the model learns to copy it, name first; where it did
not, the answering passage is put in the prompt alone (two thirds: retrieval as it should have
been) or next to the retrieved one (pick the one that answers). The reply is always copyable from
the prompt: a first version also trained replies naming a passage the prompt did not hold (the
retrieved one alone, the answer recalled), and that taught the model to make names up, the very
fault it had. Held-out passages are skipped, as everywhere in the recipe.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rst  # noqa: E402
from paraphrase import core, paraphrases  # noqa: E402
from prepare_data import answer_for, answer_in_context, as_context, is_held_out, read_sources, write_jsonl  # noqa: E402

from kaki.chat_format import with_context  # noqa: E402

# How a record whose question retrieval missed is grounded (see the module docstring).
MISS_WEIGHTS = {"gold": 2, "pick": 1}
BATCH = 256


def grounded(records: list[dict], tops: list, gold: dict[str, dict], seed: int) -> tuple[list[dict], dict]:
    """Chat records from paraphrase records, the passage retrieved first for each, and the
    answering passages as a prompt shows them (`{"title", "text"}` by passage id)."""
    out, counts = [], {"hit": 0, "gold": 0, "pick": 0}
    for rec, top in zip(records, tops):
        rng = random.Random(f"{seed}:ground-user:{rec['passage_id']}:{rec['question']}")
        if top.ref == rec["passage_id"]:
            kind, ctx = "hit", [top.as_context()]
        else:
            kind = rng.choices(list(MISS_WEIGHTS), weights=list(MISS_WEIGHTS.values()))[0]
            right = gold[rec["passage_id"]]
            ctx = [right] if kind == "gold" else rng.sample([top.as_context(), right], 2)
        counts[kind] += 1
        content = with_context(rec["question"], ctx)
        out.append({"messages": [{"role": "user", "content": content},
                                 {"role": "assistant", "content": rec["answer"]}]})
    random.Random(f"{seed}:user").shuffle(out)
    return out, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, type=Path, help="folder of the docs' reST sources")
    ap.add_argument("--index", required=True, type=Path, help="the demo retrieval index (`make index`)")
    ap.add_argument("--out", required=True, type=Path, help="chat JSONL to write")
    ap.add_argument("--exclude", type=Path, nargs="*", default=[],
                    help="JSONL files of evaluation questions ({question}) never to train on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from kaki.retrieval import Retriever

    passages: list[rst.Passage] = []
    for name, text in read_sources(args.src):
        passages += rst.render_file(text, name)[1]
    train = [p for p in passages if not is_held_out(p)]
    exclude = {core(json.loads(line)["question"]) for f in args.exclude
               for line in f.read_text().splitlines() if line.strip()}
    records = paraphrases(train, lambda p: len(answer_for(p)) >= 25 and answer_in_context(p), args.seed, exclude)
    tops = []
    with Retriever.open(args.index) as r:
        for b in range(0, len(records), BATCH):
            batch = records[b:b + BATCH]
            vectors = r.embed_queries([q["question"] for q in batch]) if r.has_dense else [None] * len(batch)
            tops += [r.search(q["question"], k=1, query_vector=None if v is None else v.reshape(1, -1))[0]
                     for q, v in zip(batch, vectors)]
    gold = {p.id: as_context(p) for p in train}
    out, counts = grounded(records, tops, gold, args.seed)
    write_jsonl(args.out, out)
    print(json.dumps({"user_records": len(out), "passages": len({q["passage_id"] for q in records}), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
