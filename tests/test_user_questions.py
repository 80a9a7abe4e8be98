"""The user-question evaluation set (data/eval/user-questions.jsonl): everyday Python questions as
people type them, written by hand (not derived from passages), each naming the bundled corpus's
passages that answer it and the key terms a useful reply contains."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USER = ROOT / "data" / "eval" / "user-questions.jsonl"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def norm(q: str) -> str:
    return " ".join("".join(c for c in q.lower() if c.isalnum() or c.isspace()).split())


def test_at_least_sixty_well_formed_questions():
    qs = read(USER)
    assert len(qs) >= 60
    for q in qs:
        assert set(q) == {"question", "passage_ids", "key_terms"}, q
        assert q["question"].strip() and q["passage_ids"]
        assert q["key_terms"] and all(group and all(isinstance(t, str) and t for t in group)
                                      for group in q["key_terms"]), q
    assert len({norm(q["question"]) for q in qs}) == len(qs), "duplicate questions"


def test_every_gold_passage_is_in_the_bundled_corpus():
    with gzip.open(ROOT / "data" / "pydocs" / "passages.jsonl.gz", "rt") as f:
        ids = {json.loads(line)["id"] for line in f}
    missing = [(q["question"], p) for q in read(USER) for p in q["passage_ids"] if p not in ids]
    assert not missing


def test_no_user_question_is_a_passage_question_or_a_generated_training_question(tmp_path):
    """The set measures questions as users ask them: none may repeat the passage-derived eval set,
    nor a question the data recipe generates for training (checked on the committed reST subset)."""
    user = {norm(q["question"]) for q in read(USER)}
    assert not user & {norm(q["question"]) for q in read(ROOT / "data" / "eval" / "questions.jsonl")}
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "prepare_data.py"), "--src",
                        str(ROOT / "data" / "smoke"), "--out", str(tmp_path), "--eval-out", str(tmp_path / "eval")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    generated = set()
    for rec in read(tmp_path / "chat.jsonl"):
        for m in rec["messages"]:
            if m["role"] == "user":
                last = m["content"].split("\n")[-1]
                generated.add(norm(last.removeprefix("Question:")))
    assert generated and not user & generated
