"""Index files from someone else: each malicious index is refused quickly with a KakiError (the
CLI: one line, exit 2), before any SQL of the file's choosing runs and before any model is loaded.

Dense parts use a tiny random BERT with the default embedder's tokenizer (test_retrieval_index's
fixture), so these tests stay fast."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from kaki.cli import main
from kaki.errors import KakiError
from kaki.retrieval import Retriever, build_index
from kaki.retrieval import dense as dense_mod
from test_retrieval_index import tiny_embedder, write_docs  # noqa: F401 (a fixture)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "KAKI_MODEL": ""}


@pytest.fixture(scope="module")
def good_index(tmp_path_factory, tiny_embedder):  # noqa: F811
    d = tmp_path_factory.mktemp("good")
    root = write_docs(d / "docs")
    index = d / "good.kaki-index"
    build_index([root], index, embedder=str(tiny_embedder), progress=False)
    return root, index


def tampered(src, dst, *statements, params=()):
    """A copy of `src` with SQL applied, as an attacker's sqlite3 shell would."""
    shutil.copy(src, dst)
    con = sqlite3.connect(dst)
    for sql in statements:
        con.execute(sql, params) if params and "?" in sql else con.execute(sql)
    con.commit()
    con.close()
    return dst


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_recursive_view_in_place_of_meta_is_refused_fast(good_index, tmp_path):
    _, index = good_index
    bad = tampered(index, tmp_path / "view.kaki-index", "ALTER TABLE meta RENAME TO meta_old",
                   "CREATE VIEW meta(key, value) AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
                   "SELECT 'k' || n, 'v' FROM r")
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kaki", "index", "query", str(bad), "kettle"], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert time.monotonic() - t < 60
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an index kaki wrote" in lines[0] and "view 'meta'" in lines[0], lines


@pytest.mark.parametrize("sql", [
    "CREATE TRIGGER t AFTER UPDATE ON files BEGIN DELETE FROM passages; END",
    "CREATE TABLE extra(x)",
    "CREATE VIEW v AS SELECT 1",
    "ALTER TABLE passages ADD COLUMN extra TEXT",
    "DROP TRIGGER passages_ad",
])
def test_schema_must_be_exactly_kakis(good_index, tmp_path, sql):
    _, index = good_index
    bad = tampered(index, tmp_path / "s.kaki-index", sql)
    with pytest.raises(KakiError, match="not an index kaki wrote .*schema is not kaki's"):
        Retriever.open(bad)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("key,value,needle", [
    ("embedder", "{not json", "embedder record is not valid JSON"),
    ("embedder", "[1, 2]", "exactly"),
    ("embedder", DEEP, "not valid JSON"),
    ("chunking", '{"mode": "sentences", "size": "3", "overlap": 0}', "chunk size must be an integer"),
    ("chunking", '{"mode": ["x"], "size": 3, "overlap": 0}', "mode must be a string"),
    ("chunking", DEEP, "chunking is not valid JSON"),
    ("chunking", '{"mode": "tokens", "size": 3, "overlap": 0, "evil": 1}', "mode, size and overlap"),
    ("roots", '{"a": 1}', "not a list of paths"),
    ("roots", DEEP, "'roots' is not valid JSON"),
    ("dense_kind", "bogus", "dense_kind"),
])
def test_bad_meta_values_are_refused(good_index, tmp_path, key, value, needle):
    root, index = good_index
    bad = tampered(index, tmp_path / "m.kaki-index", "UPDATE meta SET value = ? WHERE key = ?", params=(value, key))
    with pytest.raises(KakiError, match=needle):
        Retriever.open(bad)
    with pytest.raises(KakiError, match=needle):
        build_index([root], bad, progress=False)


@pytest.mark.parametrize("field,value,needle", [
    ("dim", "32", "dim must be an integer"), ("dim", 0, "dim must be an integer"),
    ("pooling", "max", "pooling must be mean or cls"), ("normalize", "yes", "normalize must be true or false"),
    ("source", "relative/dir", "source must be"), ("fingerprint", "zz", "fingerprint must be 32 hex"),
    ("max_length", True, "max_length must be an integer"),
])
def test_bad_embedder_fields_are_refused(good_index, tmp_path, field, value, needle):
    _, index = good_index
    con = sqlite3.connect(index)
    spec = json.loads(con.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()[0])
    con.close()
    spec[field] = value
    bad = tampered(index, tmp_path / "e.kaki-index", "UPDATE meta SET value = ? WHERE key = 'embedder'",
                   params=(json.dumps(spec),))
    with pytest.raises(KakiError, match=needle):
        Retriever.open(bad)


def test_dense_kind_that_is_not_the_blob_is_refused(good_index, tmp_path):
    _, index = good_index
    bad = tampered(index, tmp_path / "k.kaki-index", "UPDATE dense SET kind = 'hnsw'")
    with pytest.raises(KakiError, match="recorded as 'hnsw' but holds flat"):
        Retriever.open(bad).search("kettle", mode="dense")
    bad = tampered(index, tmp_path / "k2.kaki-index", "UPDATE dense SET kind = 'zz'")
    with pytest.raises(KakiError, match="dense index row is not kaki's"):
        Retriever.open(bad)


def test_dense_blob_of_another_dimension_is_refused(good_index, tmp_path):
    _, index = good_index
    vectors = np.random.default_rng(0).random((5, 8), dtype=np.float32)
    blob = dense_mod.serialize(dense_mod.build(vectors, np.arange(1, 6), "flat"))
    bad = tampered(index, tmp_path / "d.kaki-index", "UPDATE dense SET data = ?, crc32 = ?, count = 5",
                   params=(blob, zlib.crc32(blob)))
    with pytest.raises(KakiError, match="8-dim vectors but the query embedder makes 32-dim"):
        Retriever.open(bad).search("kettle", mode="dense")


def test_passage_vector_of_another_dimension_is_refused_on_update(good_index, tmp_path):
    root, index = good_index
    bad = tampered(index, tmp_path / "v.kaki-index", "UPDATE passages SET vector = zeroblob(12) WHERE id = 2")
    with pytest.raises(KakiError, match="passage 2's vector is not 32 float32s"):
        build_index([root], bad, dense_kind="hnsw", progress=False)  # a new kind: the faiss index is rebuilt


def test_embedder_source_elsewhere_is_not_loaded(good_index, tmp_path, tiny_embedder, monkeypatch):  # noqa: F811
    """The index names another model directory: its fingerprint is compared before transformers
    is asked to load anything from it."""
    _, index = good_index
    other = tmp_path / "elsewhere"
    shutil.copytree(tiny_embedder, other)
    (other / "model.safetensors").write_bytes(b"not the model the index was built with")
    con = sqlite3.connect(index)
    spec = json.loads(con.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()[0])
    con.close()
    spec["source"] = str(other)
    bad = tampered(index, tmp_path / "src.kaki-index", "UPDATE meta SET value = ? WHERE key = 'embedder'",
                   params=(json.dumps(spec),))
    import transformers
    loads = []

    def probe(*a, **k):
        loads.append(a)
        raise AssertionError("a model was loaded from the directory the index names")
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", probe)
    with pytest.raises(KakiError, match=f"embedder mismatch: .* embedder at {other} has fingerprint"):
        Retriever.open(bad).search("kettle", mode="dense")
    assert loads == []


def test_update_without_paths_never_follows_stored_roots(good_index, tmp_path, capsys):
    """A foreign index naming a local folder: `kaki index build --out X` (no PATH) must not read it."""
    _, index = good_index
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "keys.txt").write_text("the launch code is 0000")
    bad = tampered(index, tmp_path / "r.kaki-index", "UPDATE meta SET value = ? WHERE key = 'roots'",
                   params=(json.dumps([str(secret)]),))
    code, out, err = cli(capsys, "index", "build", "--out", bad, "--quiet")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
    assert "give the files or folders to index" in err and "does not follow paths stored" in err
    assert str(secret) in err  # shown so the user can pass it on purpose
    con = sqlite3.connect(bad)
    assert con.execute("SELECT count(*) FROM files WHERE path LIKE ?", (f"{secret}%",)).fetchone()[0] == 0
    con.close()
