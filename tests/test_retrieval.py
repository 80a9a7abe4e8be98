"""Retrieval quality on the demo model's evaluation set, with the default embedder, and
`kaki index` as a user runs it.

data/eval/passages.jsonl holds Python documentation passages held out from the demo model's
training; data/eval/questions.jsonl holds hand-written paraphrased questions, each naming the
passage that answers it. The index is built exactly as `make index` builds it (one passage per
record)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kaki.retrieval import Chunking, Retriever, build_index
from kaki.retrieval.embed import DEFAULT_NAME, default_embedder_dir

REPO = Path(__file__).resolve().parents[1]
PASSAGES = REPO / "data" / "eval" / "passages.jsonl"
QUESTIONS = REPO / "data" / "eval" / "questions.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "KAKI_MODEL": ""}


def run_kaki(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaki", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    qs = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    ids = {json.loads(line)["id"] for line in PASSAGES.read_text().splitlines() if line.strip()}
    assert len(qs) >= 50 and all(q["passage_id"] in ids for q in qs)
    return qs


@pytest.fixture(scope="module")
def eval_index(tmp_path_factory):
    out = tmp_path_factory.mktemp("pydocs") / "pydocs.kaki-index"
    report = build_index([PASSAGES], out, chunking=Chunking("none"), progress=False)
    return out, report


def recall_at(r: Retriever, questions: list[dict], mode: str, k: int = 5) -> float:
    # The questions are embedded once, in one batch (what search() would do one by one).
    vectors = r.embed_queries([q["question"] for q in questions]) if mode != "bm25" else [None] * len(questions)
    return sum(q["passage_id"] in [p.ref for p in r.search(q["question"], k=k, mode=mode, query_vector=v)]
               for q, v in zip(questions, vectors)) / len(questions)


def test_recall_at_5_on_the_evaluation_questions(eval_index, questions):
    index, report = eval_index
    n = sum(1 for line in PASSAGES.read_text().splitlines() if line.strip())
    assert report.passages == report.embedded == n and "exact inner product" in report.dense
    with Retriever.open(index) as r:
        got = {mode: recall_at(r, questions, mode) for mode in ("bm25", "dense", "hybrid")}
        # A question's vector in a padded batch is its vector alone (what search() computes).
        batch = r.embed_queries([q["question"] for q in questions[:8]])
        alone = np.concatenate([r.embed_queries([q["question"]]) for q in questions[:8]])
        np.testing.assert_allclose(batch, alone, atol=1e-5)
    print(f"recall@5 over {len(questions)} questions, {n} passages: {got}")
    assert got["bm25"] >= 0.7, got
    assert got["hybrid"] >= 0.8, got
    assert got["hybrid"] >= got["dense"], got


def test_kaki_index_query_and_info(eval_index, questions):
    index, _ = eval_index
    q = questions[0]
    r = run_kaki("index", "query", index, q["question"], "-k", "5", "--json")
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert q["passage_id"] in [h["ref"] for h in hits]
    # The indexed root is the file itself, so its path is its name: no path of this machine.
    assert all(h["path"] == PASSAGES.name and h["ref"] and set(h["scores"]) >= {"hybrid"} for h in hits)
    with Retriever.open(index) as ret:  # the CLI prints what the API returns
        assert [h["id"] for h in hits] == [p.id for p in ret.search(q["question"], k=5)]

    text = run_kaki("index", "query", index, q["question"], "-k", "2", "--mode", "bm25")
    assert text.returncode == 0 and text.stdout.startswith("[1] ") and "(bm25 " in text.stdout

    info = run_kaki("index", "info", index, "--json")
    assert info.returncode == 0, info.stderr
    got = json.loads(info.stdout)
    assert got["format"] == "kaki-index" and got["format_version"] == 1
    assert got["passages"] == eval_index[1].passages and got["files"] == 1
    assert got["embedder"]["name"] == DEFAULT_NAME and got["embedder"]["dim"] == 384
    assert got["dense"]["kind"] == "flat" and got["default_mode"] == "hybrid"


def test_another_embedder_is_refused(eval_index, tmp_path):
    """A query embedder other than the index's (here a random BERT with the same tokenizer and
    dimension) would rank by meaningless similarities: refused, in one line."""
    from transformers import BertConfig, BertModel
    src, other = default_embedder_dir(), tmp_path / "other-embedder"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, other / name)
    r = run_kaki("index", "query", eval_index[0], "what is a lambda?", "--embedder", other)
    one_line_error(r, "embedder mismatch", DEFAULT_NAME, "other-embedder", "--rebuild")


def test_cli_build_update_and_errors(tmp_path, capsys):
    from kaki.cli import main
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Alpha\n\nAlpha particles are helium nuclei. They are stopped by paper.\n")
    (docs / "b.txt").write_text("Beta rays are electrons.")
    index = tmp_path / "docs.kaki-index"
    r = run_kaki("index", "build", docs, "--out", index, "--embedder", "none")  # the installed entry point
    assert r.returncode == 0, r.stderr
    assert "2 files, 2 passages (2 added" in r.stdout and "dense: none (BM25 only)" in r.stdout

    def kaki(*args) -> tuple[int, str, str]:  # the same CLI in this process: main() as `kaki` runs it
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    def one_line(args, *needles):
        code, out, err = kaki(*args)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
        assert all(n in err for n in needles), err

    (docs / "b.txt").unlink()
    one_line(("index", "build", "--out", index), "give the files or folders", str(docs))  # stored PATHs not followed
    code, out, _ = kaki("index", "build", docs, "--out", index)
    assert code == 0 and "1 files, 1 passages (0 added, 0 changed, 1 removed" in out, out
    code, out, _ = kaki("index", "query", index, "what stops alpha particles?")
    assert code == 0 and "[1] Alpha" in out and "a.md:3" in out

    one_line(("index", "query", index, "x", "--mode", "dense"), "no dense vectors", "--mode bm25")
    one_line(("index", "query", tmp_path / "nope.kaki-index", "x"), "does not exist", "kaki index build")
    one_line(("index", "info", docs / "a.md"), "not a kaki index")
    one_line(("index", "build", tmp_path / "missing", "--out", index), "missing does not exist")
    one_line(("index", "build", docs, "--out", tmp_path / "n.kaki-index", "--chunk-sentences", "2", "--overlap", "2",
              "--embedder", "none"), "--overlap must be between 0 and")
