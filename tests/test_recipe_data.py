"""recipes/prepare_data.py on the committed reST subset (data/smoke), and the committed evaluation
set (data/eval): formats, the context block, the held-out split, and hand-written questions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kaki.chat_format import ADEPT, split_context

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "data" / "smoke"
EVAL = ROOT / "data" / "eval"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flat(s: str) -> str:
    return " ".join(s.split())


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "prepare_data.py"), "--src", str(SMOKE),
                        "--out", str(out), "--eval-out", str(out / "eval")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["source_files"] == len(list(SMOKE.rglob("*.rst.txt")))
    return out


def test_pretraining_text_is_readable(out):
    recs = read(out / "pretrain.jsonl")
    assert len(recs) >= 10 and all(set(r) == {"text"} and r["text"].strip() for r in recs)
    text = "\n".join(r["text"] for r in recs)
    # reST markup is gone, the content is there.
    assert ":func:`" not in text and ".. function::" not in text and "``" not in text
    assert "hmac.new(key, msg=None, digestmod='')" in text
    assert "Return a new hmac object." in text


def test_chat_records_render_and_half_carry_context(out):
    recs = read(out / "chat.jsonl")
    assert len(recs) >= 100
    with_ctx = 0
    for r in recs:
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant" and len(roles) % 2 == 0
        text, spans = ADEPT.render_with_spans(r["messages"])
        assert [text[a:b] for a, b in spans] == [" " + m["content"] for m in r["messages"][1::2]]
        passages, question = split_context(r["messages"][0]["content"])
        if passages:
            with_ctx += 1
            assert 1 <= len(passages) <= 3 and question and "Context:" not in question
            # The answer is drawn from one of the passages (the gold one).
            answer = flat(r["messages"][1]["content"])
            assert any(answer[:60] in flat(p["text"]) for p in passages), answer
    assert 0.4 <= with_ctx / len(recs) <= 0.6


def test_held_out_passages_never_reach_training_files(out):
    passages = read(out / "passages.jsonl")
    held = [p for p in passages if p["held_out"]]
    kept = "\n".join(flat(p["text"]) for p in passages if not p["held_out"])
    assert len(held) >= 5
    training = "\n".join(flat(r["text"]) for r in read(out / "pretrain.jsonl"))
    training += "\n".join(flat(m["content"]) for r in read(out / "chat.jsonl") for m in r["messages"])
    for p in held:
        body = flat(p["text"].split("\n", 1)[-1])
        for sentence in re.split(r"(?<=[.!?])\s+", body):
            # A sentence may be in training only where the docs say it again elsewhere
            # (mimetypes.suffix_map and MimeTypes.suffix_map share their text).
            if len(sentence) >= 40 and sentence in training:
                assert sentence in kept, (p["id"], sentence)
    # And their names never come up as chat questions.
    questions = "\n".join(r["messages"][0]["content"] for r in read(out / "chat.jsonl"))
    for p in held:
        name = p["title"].split(" (")[0]
        if "." in name:
            assert f"{name}()" not in questions and f"What is {name}?" not in questions, name


def test_held_out_choice_matches_the_committed_eval_set(out):
    """The split is a hash of names: a subset of the sources holds out exactly the committed
    passages of those files, with the same text."""
    smoke_held = {p["id"]: p for p in read(out / "eval" / "passages.jsonl")}
    sources = {p["source"] for p in read(out / "passages.jsonl")}
    committed = {p["id"]: p for p in read(EVAL / "passages.jsonl") if p["source"] in sources}
    assert smoke_held.keys() == committed.keys()
    assert all(smoke_held[i]["text"] == committed[i]["text"] for i in committed)


def test_eval_set_questions_are_paraphrases_with_their_answers_in_the_passage():
    passages = {p["id"]: p for p in read(EVAL / "passages.jsonl")}
    questions = read(EVAL / "questions.jsonl")
    assert len(questions) >= 50
    assert len({q["passage_id"] for q in questions}) == len(questions)
    for q in questions:
        assert set(q) == {"question", "answer", "key_phrase", "passage_id"}
        text = passages[q["passage_id"]]["text"]
        assert q["key_phrase"].lower() in text.lower(), q
        assert q["key_phrase"].lower() in q["answer"].lower(), q
        # Paraphrased: no run of six words copied from the passage.
        words = re.findall(r"[\w.']+", q["question"].lower())
        body = " ".join(re.findall(r"[\w.']+", text.lower()))
        copied = [" ".join(words[i:i + 6]) for i in range(len(words) - 5)
                  if " ".join(words[i:i + 6]) in body]
        assert not copied, (q["question"], copied)


def test_eval_set_is_small_and_licensed():
    assert sum(f.stat().st_size for f in EVAL.iterdir()) < 1_000_000
    assert sum(f.stat().st_size for f in SMOKE.rglob("*") if f.is_file()) < 200_000
    for d in (EVAL, SMOKE):
        notice = (d / "NOTICE").read_text()
        assert "Python Software Foundation" in notice and "PSF License" in notice


def test_missing_sources_are_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "prepare_data.py"), "--src", str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "apt-get install -y python3.11-doc" in r.stderr


def test_grounding_drills_answer_from_a_passage_in_the_prompt(out):
    recs = read(out / "ground.jsonl")
    drills = [r for r in recs if "messages" in r]
    copies = [r for r in recs if "text" in r]
    assert drills and copies and len(drills) + len(copies) == len(recs)
    held = {p["text"][:80] for p in read(out / "eval" / "passages.jsonl")}
    quotes = 0
    for r in drills:
        user, reply = r["messages"][0]["content"], r["messages"][1]["content"]
        passages, question = split_context(user)
        assert 1 <= len(passages) <= 3
        # The reply is copied out of one of the passages (whitespace aside) ...
        gold = [i for i, p in enumerate(passages, 1) if flat(reply)[:60] in flat(p["text"])]
        assert gold, (question, reply)
        # ... and "passage [n]" questions name the passage it comes from.
        m = re.search(r"passage \[(\d)\]", question)
        if m:
            quotes += 1
            assert int(m.group(1)) in gold
        assert not any(p["text"][:80] in held for p in passages)
    assert 0.2 < quotes / len(drills) < 0.6
    for r in copies:  # a stretch of the docs, a blank line, then the same stretch again
        t = r["text"]
        n = (len(t) - 2) // 2
        assert n > 50 and t[:n] == t[n + 2:] and t[n:n + 2] == "\n\n"


def test_lookup_drills_ask_for_a_name_and_answer_with_it(out):
    """"Which function returns ...?" answered with the entry's name (copied from its passage's
    title line) and then its description; most carry the passage, some none, never a held-out one."""
    recs = read(out / "lookup.jsonl")
    assert len(recs) >= 50
    held = {p["text"][:80] for p in read(out / "eval" / "passages.jsonl")}
    held_names = {p["title"].split(" (")[0] for p in read(out / "eval" / "passages.jsonl")}
    with_ctx = 0
    for r in recs:
        user, reply = r["messages"][0]["content"], r["messages"][1]["content"]
        passages, question = split_context(user)
        assert question.endswith(("?", ".")) and "Context:" not in question
        name, _, description = reply.partition(": ")
        assert name and description and name.removesuffix("()") not in held_names
        assert name.removesuffix("()") not in question  # asked from the description to the name
        if passages:
            with_ctx += 1
            # The name is in the gold passage's title, the description in its text.
            gold = [p for p in passages if p["title"].startswith(name.removesuffix("()") + " (")]
            assert len(gold) == 1 and flat(description)[:60] in flat(gold[0]["text"]), reply
            assert not any(p["text"][:80] in held for p in passages)
    assert 0.75 <= with_ctx / len(recs) <= 0.95


@pytest.mark.parametrize("verb, expected", [("Return", "returns"), ("Returns", "returns"), ("Process", "processes"),
                                            ("Apply", "applies"), ("Destroy", "destroys"), ("Fetch", "fetches"),
                                            ("Go", "goes")])
def test_lookup_questions_conjugate_the_docs_imperative(verb, expected):
    sys.path.insert(0, str(ROOT / "recipes"))
    import prepare_data
    assert prepare_data.third_person(verb) == expected


def test_every_passage_links_to_its_page_and_anchor_on_docs_python_org(out):
    sys.path.insert(0, str(ROOT / "recipes"))
    from doc_urls import doc_url
    base = "https://docs.python.org/3.11/"
    assert doc_url("library/stdtypes:str.join", "library/stdtypes") == base + "library/stdtypes.html#str.join"
    assert doc_url("faq/programming#what-is-self", "faq/programming") == base + "faq/programming.html#what-is-self"
    assert doc_url("glossary:term:text file", "glossary") == base + "glossary.html#term-text-file"
    assert doc_url("c-api/dict:PyDict_New", "c-api/dict") == base + "c-api/dict.html#c.PyDict_New"
    assert doc_url("library/timeit:-n N, --number=N", "library/timeit") == base + "library/timeit.html"
    assert doc_url("library/stdtypes:len~1", "library/stdtypes") == base + "library/stdtypes.html"
    import gzip
    with gzip.open(ROOT / "data" / "pydocs" / "passages.jsonl.gz", "rt", encoding="utf-8") as f:
        shipped = [json.loads(line) for line in f]
    assert all(r["url"] == doc_url(r["id"], r["source"]) for r in shipped)  # the committed corpus links too
    assert all(r["url"] == doc_url(r["id"], r["source"]) for r in read(out / "passages.jsonl"))
