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


def asked(records: list[dict]) -> list[str]:
    """The questions of chat records, without the context block."""
    return [m["content"].rpartition("Question: ")[2] for r in records for m in r["messages"] if m["role"] == "user"]


def test_no_evaluation_question_is_in_the_user_style_training_data(tmp_path):
    """kaki-tiny's last stage trains on user-style paraphrases (recipes/user_drills.py) of the
    passages' questions: run as the recipe runs it (on the committed reST subset, over a BM25 index
    of its passages), none of them asks an evaluation question, even with its framing ("python ...",
    "how do i ...", "... in python") added or dropped."""
    sys.path.insert(0, str(ROOT / "recipes"))
    from paraphrase import core

    from kaki.retrieval import Chunking, build_index

    data = tmp_path / "data"
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "prepare_data.py"), "--src",
                        str(ROOT / "data" / "smoke"), "--out", str(data)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    build_index([data / "passages.jsonl"], tmp_path / "index", chunking=Chunking(mode="none"), embedder="none")
    evals = [ROOT / "data" / "eval" / "user-questions.jsonl", ROOT / "data" / "eval" / "questions.jsonl"]
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "user_drills.py"), "--src", str(ROOT / "data" / "smoke"),
                        "--index", str(tmp_path / "index"), "--out", str(data / "user.jsonl"),
                        "--exclude", *map(str, evals)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trained = asked(read(data / "user.jsonl"))
    assert len(trained) >= 50
    assert all(q == q.lower() for q in trained)  # typed the way people type, not the docs' way
    evaluated = {core(q["question"]) for f in evals for q in read(f)}
    assert not evaluated & {core(q) for q in trained}
    assert not {norm(q["question"]) for f in evals for q in read(f)} & {norm(q) for q in trained}
    # The exclusion is what keeps them out: a question asked by an evaluation set (here one the
    # generator does produce, reframed) disappears from the training data in every framing.
    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"question": f"How do I {core(trained[0])}?"}) + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "user_drills.py"), "--src", str(ROOT / "data" / "smoke"),
                        "--index", str(tmp_path / "index"), "--out", str(data / "probed.jsonl"),
                        "--exclude", str(probe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    left = {core(q) for q in asked(read(data / "probed.jsonl"))}
    assert core(trained[0]) not in left and len(left) >= len({core(q) for q in trained}) - 1


def test_paraphrases_are_what_people_type():
    """A doc sentence becomes the request a user types, and framing is stripped for the overlap
    check (`core`)."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import rst
    from paraphrase import core, user_answer, verb_phrase

    def entry(first: str, title: str = "math.sqrt") -> "rst.Passage":
        return rst.Passage(id=f"library/x:{title}", kind="function", title=title, source="library/x",
                           text=first, first_paragraph=first, module=title.rpartition(".")[0])

    assert verb_phrase(entry("Return the square root of x.")) == "get the square root of x"
    assert verb_phrase(entry("Return True if path refers to an existing path, otherwise False.")) == \
        "check if path refers to an existing path"
    assert verb_phrase(entry("Reverses the elements of the deque in-place.")) == "reverse the elements of the deque in-place"
    assert verb_phrase(entry("The number of seconds since the epoch.")) is None  # not an imperative
    assert user_answer(entry("Return the square root of x.")).startswith("math.sqrt(): Return the square root")
    assert core("How do I remove duplicates from a list?") == core("python remove duplicates from a list") \
        == core("remove duplicates from a list in python") == "remove duplicates from a list"
