"""Precomputed passage vectors (kaki.retrieval.vectors, `kaki index build --vectors`): an index
built from a vector file equals one that embedded its passages (up to float16), passages the file
lacks are embedded, another embedder's file is ignored with a note, damaged files are refused, and
the shipped data/pydocs/vectors.npz covers every shipped passage with the default embedder."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kaki.errors import KakiError
from kaki.retrieval import Chunking, Retriever, build_index
from kaki.retrieval import vectors as vec_mod
from kaki.retrieval.embed import default_embedder_dir, fingerprint
from kaki.retrieval.store import Store
from test_retrieval_index import tiny_embedder, write_docs  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "pydocs" / "vectors.npz"


def stored_vectors(index) -> dict[str, np.ndarray]:
    store = Store.open(index)
    try:
        rows = store.conn.execute("SELECT title, text, vector FROM passages").fetchall()
    finally:
        store.close()
    return {vec_mod.passage_text(t, x): np.frombuffer(v, dtype=np.float32) for t, x, v in rows}


def export(index, out) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "embed_passages.py"), "--index", str(index),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_index_from_vector_file_matches_embedding_and_embeds_only_what_is_missing(tmp_path, tiny_embedder):  # noqa: F811
    root = write_docs(tmp_path / "docs")
    first = build_index([root], tmp_path / "a.kaki-index", embedder=str(tiny_embedder), progress=False)
    assert first.embedded == first.passages > 5 and first.reused == 0
    export(tmp_path / "a.kaki-index", tmp_path / "v.npz")

    (root / "notes.txt").write_text("Plain notes about forks.\n\nForks hold cake.")  # one passage (2 sentences) the file lacks
    second = build_index([root], tmp_path / "b.kaki-index", embedder=str(tiny_embedder), progress=False,
                         vectors=tmp_path / "v.npz")
    assert second.embedded == 1 and second.reused == second.passages - 1
    assert "taken from the precomputed vector file" in second.summary()
    fresh = build_index([root], tmp_path / "c.kaki-index", embedder=str(tiny_embedder), progress=False)
    got, want = stored_vectors(tmp_path / "b.kaki-index"), stored_vectors(tmp_path / "c.kaki-index")
    assert got.keys() == want.keys()
    for text in want:
        np.testing.assert_allclose(got[text], want[text], atol=2e-3)  # float16 storage
    with Retriever.open(tmp_path / "b.kaki-index", embedder=str(tiny_embedder)) as r, \
            Retriever.open(tmp_path / "c.kaki-index", embedder=str(tiny_embedder)) as s:
        for q in ("descaling a kettle with vinegar", "forks", "saucers catch drips"):
            assert [p.ref or p.title for p in r.search(q, k=3, mode="dense")] == \
                [p.ref or p.title for p in s.search(q, k=3, mode="dense")]
    assert fresh.embedded == fresh.passages


def test_vectors_of_another_embedder_are_ignored_with_a_note(tmp_path, tiny_embedder):  # noqa: F811
    root = write_docs(tmp_path / "docs")
    build_index([root], tmp_path / "a.kaki-index", embedder=str(tiny_embedder), progress=False)
    export(tmp_path / "a.kaki-index", tmp_path / "v.npz")
    z = dict(np.load(tmp_path / "v.npz"))
    header = json.loads(z["header"].tobytes())
    header["embedder"]["fingerprint"] = "0" * 32
    z["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(tmp_path / "other.npz", **z)
    report = build_index([root], tmp_path / "b.kaki-index", embedder=str(tiny_embedder), progress=False,
                         vectors=tmp_path / "other.npz")
    assert report.reused == 0 and report.embedded == report.passages
    assert any("another embedder" in n for n in report.notes)


@pytest.mark.parametrize("damage", ["not-npz", "pickle", "bad-shape", "nan", "missing"])
def test_damaged_vector_files_are_refused_before_any_work(tmp_path, tiny_embedder, damage):  # noqa: F811
    root = write_docs(tmp_path / "docs")
    build_index([root], tmp_path / "a.kaki-index", embedder=str(tiny_embedder), progress=False)
    export(tmp_path / "a.kaki-index", tmp_path / "v.npz")
    bad = tmp_path / "bad.npz"
    z = dict(np.load(tmp_path / "v.npz"))
    if damage == "not-npz":
        bad.write_bytes(b"hello")
    elif damage == "pickle":
        np.savez(bad, header=z["header"], keys=z["keys"], vectors=np.array([object()], dtype=object))
    elif damage == "bad-shape":
        np.savez(bad, header=z["header"], keys=z["keys"], vectors=z["vectors"][:, :3])
    elif damage == "nan":
        v = z["vectors"].copy()
        v[0, 0] = np.nan
        np.savez(bad, header=z["header"], keys=z["keys"], vectors=v)
    with pytest.raises(KakiError, match="bad.npz"):
        build_index([root], tmp_path / "b.kaki-index", embedder=str(tiny_embedder), progress=False, vectors=bad)
    assert not (tmp_path / "b.kaki-index").exists()


def test_shipped_vectors_cover_every_shipped_passage_with_the_default_embedder(tmp_path):
    """The staleness check for data/pydocs/vectors.npz: made by the default embedder as installed
    (same fingerprint), one vector for the exact text of every passage `make index` builds."""
    shipped = vec_mod.VectorFile.load(SHIPPED)
    src = default_embedder_dir()
    assert src is not None, "the default embedder package is part of the test extra"
    assert shipped.spec.fingerprint == fingerprint(src), \
        "data/pydocs/vectors.npz is stale: rebuild it with recipes/embed_passages.py (see its docstring)"
    jsonl = tmp_path / "pydocs-passages.jsonl"
    with gzip.open(ROOT / "data" / "pydocs" / "passages.jsonl.gz", "rb") as f:
        jsonl.write_bytes(f.read())
    build_index([jsonl], tmp_path / "bm25.kaki-index", chunking=Chunking(mode="none"), embedder="none",
                progress=False)  # what `make index` chunks, without the embedding
    store = Store.open(tmp_path / "bm25.kaki-index")
    try:
        rows = store.conn.execute("SELECT ref, title, text FROM passages ORDER BY id").fetchall()
    finally:
        store.close()
    texts = [vec_mod.passage_text(title, text) for _, title, text in rows]
    missing = [ref for (ref, _, _), t in zip(rows, texts) if shipped.get(t) is None]
    assert len(rows) > 14_000 and not missing, \
        f"{len(missing)} passages have no shipped vector (first: {missing[:3]}); rebuild the file"
    assert shipped.corpus_sha256 == vec_mod.corpus_hash(texts)


def test_search_mode_is_stored_with_the_index_and_used_by_default(tmp_path, tiny_embedder):  # noqa: F811
    root = write_docs(tmp_path / "docs")
    index = tmp_path / "i.kaki-index"
    build_index([root], index, embedder=str(tiny_embedder), progress=False, search_mode="dense")
    with Retriever.open(index, embedder=str(tiny_embedder)) as r:
        assert r.default_mode == "dense" and r.info()["default_mode"] == "dense"
        assert all(set(p.scores) == {"dense"} for p in r.search("kettle vinegar", k=3))
        assert all("bm25" in p.scores for p in r.search("kettle vinegar", k=3, mode="hybrid"))
    build_index([root], index, progress=False)  # an update keeps the stored mode
    with Retriever.open(index) as r:
        assert r.default_mode == "dense"
    build_index([root], index, progress=False, search_mode="auto")
    with Retriever.open(index) as r:
        assert r.default_mode == "hybrid"
    with pytest.raises(KakiError, match="needs dense vectors"):
        build_index([root], tmp_path / "b.kaki-index", embedder="none", progress=False, search_mode="dense")
    with pytest.raises(KakiError, match="unknown search mode"):
        build_index([root], tmp_path / "b.kaki-index", embedder="none", progress=False, search_mode="fast")


def test_forged_search_mode_is_refused_on_open(tmp_path):
    import sqlite3
    root = write_docs(tmp_path / "docs")
    index = tmp_path / "i.kaki-index"
    build_index([root], index, embedder="none", progress=False)
    for forged in ("dense", "'; DROP TABLE meta"):
        with sqlite3.connect(index) as conn:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('search_mode', ?)", (forged,))
        with pytest.raises(KakiError, match="search_mode"):
            Retriever.open(index)
