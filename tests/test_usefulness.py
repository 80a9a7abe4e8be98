"""kaki.usefulness: user questions scored by what the user sees (reply key terms, the cited
passage, either), on the bundled model with a small index of real documentation passages."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import kaki
from kaki.chat_format import format_for_llm
from kaki.errors import KakiError
from kaki.evaluate import qa_prompt
from kaki.retrieval import Chunking, Retriever, build_index
from kaki.usefulness import check_user_question, useful, usefulness

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "kaki-tiny"
IDS = ["library/stdtypes:str.join", "library/stdtypes:str.split", "library/os.path:os.path.exists",
       "library/functions:len", "library/functions:sorted", "library/os:os.remove"]


def test_key_terms_need_one_term_of_every_group():
    assert useful("Use str.join(iterable).", [["join"]])
    assert useful("Call SORTED with reverse=True", [["sorted", "sort"], ["reverse=True"]])
    assert not useful("Call sorted()", [["sorted"], ["reverse=True"]])
    assert not useful("", [["x"]])
    for bad in ({"question": "q", "key_terms": []}, {"question": "q", "key_terms": [["a"], []]},
                {"question": "", "key_terms": [["a"]]}, {"question": "q", "key_terms": "join"},
                {"question": "q", "key_terms": [["a"]], "passage_ids": "x"}):
        with pytest.raises(KakiError):
            check_user_question(bad, "f.jsonl:1")


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("useful")
    with gzip.open(ROOT / "data" / "pydocs" / "passages.jsonl.gz", "rt", encoding="utf-8") as f:
        recs = [r for r in map(json.loads, f) if r["id"] in IDS]
    assert len(recs) == len(IDS)
    (tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    build_index([tmp / "p.jsonl"], tmp / "i.kaki-index", chunking=Chunking("none"), embedder="none", progress=False)
    return tmp / "i.kaki-index"


def test_reply_citation_and_end_to_end_on_the_bundled_model(small_index):
    llm = kaki.load(BUNDLED, dtype="float32", device="cpu")
    questions = [
        {"question": "how do i glue a list of strings together with str.join", "passage_ids": [IDS[0]],
         "key_terms": [["concatenation"]]},
        {"question": "python check if a file exists", "passage_ids": [IDS[2]], "key_terms": [["no such phrase"]]},
        {"question": "how many items does len() give", "passage_ids": [IDS[4]], "key_terms": [["length"]]},
    ]
    with Retriever.open(small_index) as r:
        res = usefulness(llm, questions, r, k=1, max_new_tokens=24)
        top = [r.search(q["question"], k=1)[0].ref for q in questions]
    assert [it["cited"] for it in res.items] == [[t] for t in top]
    assert [it["citation"] for it in res.items] == [t in q["passage_ids"] for t, q in zip(top, questions)]
    assert res.items[1]["reply"] is False  # a key term no reply contains
    assert res.items[2]["citation"] is False  # len() cites library/functions:len, not the gold given
    assert res.items[0]["citation"] and res.items[0]["end_to_end"]
    for it in res.items:
        assert it["end_to_end"] == (it["reply"] or it["citation"])
    # The reply scored is the model's greedy reply to the grounded prompt.
    fmt = format_for_llm(llm)
    with Retriever.open(small_index) as r:
        q = {**questions[0], "passages": [h.as_context() for h in r.search(questions[0]["question"], k=1)]}
    want = llm.generate(qa_prompt(llm, fmt, q, True, 24), add_bos=fmt.add_bos, temperature=0.0,
                        repetition_penalty=1.0, max_new_tokens=24, stop=list(fmt.stop))[0].text.strip()
    assert res.items[0]["reply_text"] == want and res.items[0]["reply"] == ("concatenation" in want.lower())
    assert res.to_json()["end_to_end"] == pytest.approx(sum(i["end_to_end"] for i in res.items) / 3)

    alone = usefulness(llm, questions, None, max_new_tokens=24)
    assert alone.to_json().keys() == {"reply"} and all(it["cited"] == [] for it in alone.items)
    assert all(it["end_to_end"] == it["reply"] for it in alone.items)


def test_kaki_eval_scores_user_questions_with_and_without_retrieval(small_index, tmp_path):
    import subprocess
    import sys
    questions = [
        {"question": "how do i glue a list of strings together with str.join", "passage_ids": [IDS[0]],
         "key_terms": [["concatenation"]]},
        {"question": "python check if a file exists", "passage_ids": [IDS[2]], "key_terms": [["exists"]]},
    ]
    data = tmp_path / "user.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    # No --retrieval-k: the bundled model's own retrieval_k (1), as make chat answers.
    r = subprocess.run([sys.executable, "-m", "kaki", "eval", "--data", str(data), "--retrieval", str(small_index),
                        "--max-new-tokens", "24", "--dtype", "float32", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    llm = kaki.load(BUNDLED, dtype="float32", device="cpu")
    with Retriever.open(small_index) as ret:
        want = usefulness(llm, questions, ret, k=1, max_new_tokens=24).to_json()
    assert out["user_questions"] == 2 and out["useful_with_retrieval"] == want and want["k"] == 1
    assert out["useful_without_retrieval"] == usefulness(llm, questions, None, max_new_tokens=24).to_json()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "key_terms": "exists"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "kaki", "eval", "--data", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "bad.jsonl:1" in r.stderr and "key_terms" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_model_directory_sets_its_own_retrieval_k(tmp_path):
    from kaki.retrieval.grounding import DEFAULT_K, model_retrieval_k, retrieval_k
    assert model_retrieval_k(BUNDLED) == 1 and retrieval_k(None, BUNDLED) == 1
    assert retrieval_k(4, BUNDLED) == 4  # the flag wins
    assert model_retrieval_k(tmp_path) == DEFAULT_K == retrieval_k(None, None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    assert model_retrieval_k(tmp_path) == DEFAULT_K
    for bad in (0, -1, "2", True, 1000):
        (tmp_path / "generation_config.json").write_text(json.dumps({"retrieval_k": bad}))
        with pytest.raises(KakiError, match="retrieval_k must be an integer"):
            model_retrieval_k(tmp_path)
    with pytest.raises(KakiError, match="--retrieval-k must be from 1"):
        retrieval_k(0, BUNDLED)
