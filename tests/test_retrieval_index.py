"""kaki index on real files: readers, chunking, incremental rebuilds, the file format's checks,
faiss kinds against exact search, and grounding a conversation within a token budget.

Dense parts use a tiny random BERT (transformers' own BertModel, the default embedder's real
tokenizer) so these tests stay fast; the default embedder is exercised in test_retrieval.py."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time

import numpy as np
import pytest
import torch

from kaki.chat_format import ADEPT, normalize_passage, parse_context, split_context
from kaki.errors import KakiError
from kaki.retrieval import Chunking, Retriever, build_index, ground
from kaki.retrieval import dense as dense_mod
from kaki.retrieval.chunking import chunk_spans, sentence_spans
from kaki.retrieval.documents import find_files, read_documents
from kaki.retrieval.embed import Embedder, default_embedder_dir
from kaki.retrieval.search import fts_query, rrf

DOCS = {
    "guide.md": "# Kettle guide\n\nIntro line about kettles.\n\n## Descaling\n\nFill the kettle with vinegar. "
                "Boil it twice. Rinse e.g. with cold water. Dry it.\n\n```\nboil --twice\n```\n\n"
                "See [the manual](http://x.example/manual) for **details**.\n",
    "api.rst": "The teapot module\n=================\n\n.. module:: teapot\n\nIntro to the :mod:`teapot` module.\n\n"
               ".. function:: brew(leaves, minutes=3)\n\n   Brew ``leaves`` for *minutes*.\n\n   .. versionadded:: 3.2\n\n"
               ".. index:: single: secret words\n\nBack in the section after the entry.\n",
    "page.html": "<html><head><title>Cups page</title><style>p{color:red}</style></head><body>"
                 "<h1>Cups</h1><p>Cups hold tea &amp; coffee.</p><script>var hidden = 1;</script>"
                 "<h2>Saucers</h2><p>Saucers catch drips.</p></body></html>",
    "notes.txt": "Plain notes about spoons.\n\nSpoons stir sugar into tea.",
    "records.jsonl": json.dumps({"id": "r1", "title": "Sugar", "text": "Sugar sweetens tea.", "url": "http://s.example"})
                     + "\n\n" + json.dumps({"text": "Milk whitens tea."}) + "\n",
}


def write_docs(root):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (root / name).write_text(text)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.md").write_text("# Hidden\n\nnever indexed")
    (root / "image.png").write_bytes(b"\x89PNG not text")
    return root


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    """A random 1-layer BERT with the default embedder's tokenizer: a real transformers encoder."""
    from transformers import BertConfig, BertModel
    src = default_embedder_dir()
    assert src is not None, "the default embedder package is part of the test extra"
    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, d / name)
    return d


# ----------------------------------------------------------------------------- readers and chunking

def test_readers_extract_titles_sections_and_lines(tmp_path):
    root = write_docs(tmp_path)
    files = find_files([root])
    assert [f.name for f in files] == ["api.rst", "guide.md", "notes.txt", "page.html", "records.jsonl"]

    md = read_documents(root / "guide.md")[0]
    assert md.title == "Kettle guide"
    desc = next(s for s in md.sections if s.title == "Descaling")
    assert "boil --twice" in desc.text and "```" not in desc.text
    assert "See the manual for details." in desc.text  # link target and emphasis markup removed
    assert desc.lines == [(0, 7), (82, 10), (96, 13)]  # the lines of "Fill...", "boil..." and "See..."

    rst = read_documents(root / "api.rst")[0]
    assert rst.title == "The teapot module"
    entry = next(s for s in rst.sections if s.title == "brew(leaves, minutes=3)")
    assert entry.text.startswith("Brew leaves for *minutes*.") and "New in version 3.2." in entry.text
    assert not any("secret words" in s.text for s in rst.sections)  # index directive dropped
    back = rst.sections[-1]
    assert back.title == "The teapot module" and back.text == "Back in the section after the entry."
    assert "teapot module" in rst.sections[0].text and ":mod:" not in rst.sections[0].text

    html = read_documents(root / "page.html")[0]
    assert html.title == "Cups page"
    assert [(s.title, s.text) for s in html.sections] == [("Cups", "Cups hold tea & coffee."),
                                                          ("Saucers", "Saucers catch drips.")]

    recs = read_documents(root / "records.jsonl")
    assert [(d.ref, d.title, d.url, d.sections[0].line_at(0)) for d in recs] == [
        ("r1", "Sugar", "http://s.example", 1), ("3", "records #3", "", 3)]


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(KakiError, match=r"bad.jsonl:2: .*string `text`"):
        read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(KakiError, match="does not exist"):
        find_files([tmp_path / "missing"])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "only.png").write_bytes(b"x")
    with pytest.raises(KakiError, match="no files to index"):
        build_index([tmp_path / "sub"], tmp_path / "x.kaki-index", embedder="none")
    assert not (tmp_path / "x.kaki-index").exists()  # nothing half-written is left behind


def test_sentence_and_token_chunking():
    text = ("Dr. Smith wrote it, e.g. in 2020. It works well! Does it? Yes, it does.\n\n"
            "New paragraph without an end")
    sents = [text[a:b] for a, b in sentence_spans(text)]
    assert sents == ["Dr. Smith wrote it, e.g. in 2020.", "It works well!", "Does it?", "Yes, it does.",
                     "New paragraph without an end"]
    three = [text[a:b] for a, b in chunk_spans(text, Chunking("sentences", 3))]
    assert three == ["Dr. Smith wrote it, e.g. in 2020. It works well! Does it?",
                     "Yes, it does.\n\nNew paragraph without an end"]
    overlapping = [text[a:b] for a, b in chunk_spans(text, Chunking("sentences", 2, 1))]
    assert overlapping[:2] == ["Dr. Smith wrote it, e.g. in 2020. It works well!", "It works well! Does it?"]
    seven = "one two three four five six seven"
    words = [seven[a:b] for a, b in chunk_spans(seven, Chunking("tokens", 3, 1))]
    assert words == ["one two three", "three four five", "five six seven"]
    assert chunk_spans(text, Chunking("none")) == [(0, len(text))]
    with pytest.raises(KakiError, match="overlap"):
        Chunking("sentences", 3, 3)


def test_fts_query_quotes_user_text_and_rrf():
    assert fts_query('What is "NEAR(a b)" OR x*?') == '"near" OR "b" OR "x"'
    assert fts_query("what is the") == '"what" OR "is" OR "the"'  # only stopwords: keep them
    fused = rrf([[1, 2, 3], [3, 1, 4]])
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


# ----------------------------------------------------------------------------- building and updating

def test_bm25_only_index_and_query_syntax_in_questions(tmp_path):
    root = write_docs(tmp_path / "docs")
    report = build_index([root], tmp_path / "i.kaki-index", embedder="none", progress=False)
    assert report.files == 5 and report.dense is None
    with Retriever.open(tmp_path / "i.kaki-index") as r:
        assert r.default_mode == "bm25"
        hits = r.search("how do I descale a kettle with vinegar?", k=2)
        assert hits[0].title == "Kettle guide: Descaling" and hits[0].source.endswith("guide.md:7")
        assert r.search('brew AND ("leaves" OR minutes*)', k=1)[0].title.endswith("brew(leaves, minutes=3)")
        assert r.search("sugar", k=1)[0].source == "http://s.example"
        assert r.search("zzzz unknownword", k=3) == []
        with pytest.raises(KakiError, match="no dense vectors"):
            r.search("kettle", mode="dense")


def _snapshot(path):
    con = sqlite3.connect(path)
    rows = con.execute("SELECT p.id, f.path, p.text, p.vector FROM passages p JOIN files f ON f.id = p.file_id").fetchall()
    con.close()
    return {r[0]: r[1:] for r in rows}


def test_incremental_rebuild_touches_only_the_edited_file(tmp_path, tiny_embedder):
    root = write_docs(tmp_path / "docs")
    index = tmp_path / "docs.kaki-index"
    first = build_index([root], index, embedder=str(tiny_embedder), progress=False)
    assert first.embedded == first.passages > 0 and len(first.added) == 5
    before = _snapshot(index)

    again = build_index([root], index, progress=False)  # same roots, nothing changed: nothing embedded
    assert (again.unchanged, again.embedded, again.passages_added) == (5, 0, 0)
    assert _snapshot(index) == before

    time.sleep(0.01)
    (root / "notes.txt").write_text("Plain notes about forks.\n\nForks hold cake. Forks have tines.")
    os.utime(root / "notes.txt", ns=(time.time_ns(), time.time_ns()))
    (root / "page.html").unlink()
    upd = build_index([root], index, progress=False)
    after = _snapshot(index)
    notes, page = str(root / "notes.txt"), str(root / "page.html")
    assert [os.path.basename(p) for p in upd.changed] == ["notes.txt"] and upd.removed == [page]
    # Every passage of another file keeps its row, text and vector; the edited file's are new.
    kept = {i: v for i, v in before.items() if v[0] not in (notes, page)}
    assert {i: after[i] for i in kept} == kept
    new = {i: v for i, v in after.items() if i not in before}
    assert {v[0] for v in new.values()} == {notes} and upd.embedded == len(new) == upd.passages_added
    assert not any(v[0] == page for v in after.values())
    with Retriever.open(index) as r:
        assert r.info()["dense"]["vectors"] == len(after)
        hit = r.search("forks tines cake", k=1, mode="bm25")[0]
        assert hit.path == notes
        ids = {p.id for p in r.search("forks", k=len(after), mode="dense")}
        assert ids == set(after)  # the rebuilt faiss index holds exactly the live passages


def test_touched_but_identical_file_is_not_rechunked(tmp_path):
    root = write_docs(tmp_path / "docs")
    index = tmp_path / "i.kaki-index"
    build_index([root], index, embedder="none", progress=False)
    before = _snapshot(index)
    os.utime(root / "guide.md", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    rep = build_index([root], index, progress=False)
    assert rep.changed == [] and rep.unchanged == 5 and _snapshot(index) == before


def test_changing_chunking_rechunks_everything(tmp_path):
    root = write_docs(tmp_path / "docs")
    index = tmp_path / "i.kaki-index"
    a = build_index([root], index, embedder="none", progress=False)
    b = build_index([root], index, chunking=Chunking("none"), progress=False)
    assert len(b.changed) == 5 and b.passages < a.passages and "chunking changed" in b.notes[0]


# ----------------------------------------------------------------------------- refusing bad files

def test_foreign_corrupted_and_future_files_are_refused(tmp_path, tiny_embedder):
    root = write_docs(tmp_path / "docs")
    index = tmp_path / "good.kaki-index"
    build_index([root], index, embedder=str(tiny_embedder), progress=False)

    junk = tmp_path / "junk.kaki-index"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(KakiError, match="not a kaki index \\(not an SQLite file\\)"):
        Retriever.open(junk)

    foreign = tmp_path / "other.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    with pytest.raises(KakiError, match="an SQLite database but not a kaki index"):
        Retriever.open(foreign)

    future = tmp_path / "future.kaki-index"
    shutil.copy(index, future)
    con = sqlite3.connect(future)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(KakiError, match="format version 99, and this kaki reads version 1; upgrade kaki"):
        Retriever.open(future)

    truncated = tmp_path / "truncated.kaki-index"
    data = index.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(KakiError, match="is damaged .*--rebuild"):
        r = Retriever.open(truncated)
        r.search("kettle", k=3, mode="hybrid")

    flipped = tmp_path / "flipped.kaki-index"
    shutil.copy(index, flipped)
    con = sqlite3.connect(flipped)
    blob = bytearray(con.execute("SELECT data FROM dense").fetchone()[0])
    blob[len(blob) // 2] ^= 0xFF
    con.execute("UPDATE dense SET data = ?", (bytes(blob),))  # the stored CRC is left as it was
    con.commit()
    con.close()
    with pytest.raises(KakiError, match="damaged .*checksum"):
        Retriever.open(flipped).search("kettle", mode="dense")


def test_embedder_identity_is_enforced(tmp_path, tiny_embedder):
    root = write_docs(tmp_path / "docs")
    index = tmp_path / "i.kaki-index"
    build_index([root], index, embedder="none", progress=False)
    with pytest.raises(KakiError, match="built without an embedder"):
        build_index([root], index, embedder=str(tiny_embedder), progress=False)
    build_index([root], index, embedder=str(tiny_embedder), rebuild=True, progress=False)
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_embedder, other)
    from safetensors.torch import load_file, save_file
    w = load_file(other / "model.safetensors")
    w = {k: v + 0.01 for k, v in w.items()}
    save_file(w, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KakiError, match="embedder mismatch"):
        Retriever.open(index, embedder=str(other))
    with pytest.raises(KakiError, match="embedder mismatch"):
        build_index([root], index, embedder=str(other), progress=False)
    Retriever.open(index, embedder=str(tiny_embedder)).close()  # the same model is accepted


def test_embedder_pools_over_real_tokens_only(tiny_embedder):
    """A text's vector does not depend on the batch it is padded in, and equals a mean over
    transformers' own hidden states of that text alone."""
    from transformers import AutoModel, AutoTokenizer
    emb = Embedder(tiny_embedder)
    texts = ["short", "a much longer text with many more words in it than the first one"]
    batch = emb.embed(texts)
    alone = np.stack([emb.embed([t])[0] for t in texts])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    tok, model = AutoTokenizer.from_pretrained(tiny_embedder), AutoModel.from_pretrained(tiny_embedder)
    with torch.no_grad():
        h = model(**tok(texts[0], return_tensors="pt")).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(batch[0], (h / h.norm()).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- faiss kinds

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_dense_kinds_agree_with_exact_search(kind):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 64))
    x = centers[rng.integers(0, 50, 4000)] + 0.3 * rng.normal(size=(4000, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(4000, dtype=np.int64) * 7 + 3  # ids are passage ids, not positions
    q = x[rng.choice(4000, 50, replace=False)] + 0.05 * rng.normal(size=(50, 64)).astype(np.float32)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    index = dense_mod.deserialize(dense_mod.serialize(dense_mod.build(x, ids, kind)), kind)
    got = dense_mod.search(index, q, 10)
    recall = np.mean([len({i for i, _ in g} & set(ids[e])) / 10 for g, e in zip(got, exact)])
    assert recall == 1.0 if kind == "flat" else recall >= 0.9, recall
    assert dense_mod.choose(dense_mod.EXACT_MAX) == "flat" and dense_mod.choose(dense_mod.EXACT_MAX + 1) == "hnsw"
    assert dense_mod.choose(dense_mod.HNSW_MAX + 1) == "ivf"


# ----------------------------------------------------------------------------- grounding

def test_ground_inserts_what_fits_in_the_last_user_turn(tmp_path):
    root = write_docs(tmp_path / "docs")
    build_index([root], tmp_path / "i.kaki-index", embedder="none", progress=False)
    words = lambda s: len(s.split())  # noqa: E731  a stand-in tokenizer: one token per word
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how do I descale the kettle with vinegar?"}]
    with Retriever.open(tmp_path / "i.kaki-index") as r:
        g = ground(r, msgs, fmt=ADEPT, count_tokens=words, max_prompt_tokens=1000, k=3)
        assert g.retrieved == len(g.passages) >= 1 and g.passages[0].title == "Kettle guide: Descaling"
        assert g.messages[:2] == msgs[:2]  # earlier turns untouched
        passages, question = split_context(g.messages[2]["content"])
        assert question == msgs[2]["content"]
        assert passages == [normalize_passage(p.as_context()) for p in g.passages]
        prompt = ADEPT.render(g.messages)
        assert words(prompt) <= 1000 and parse_context(prompt) == passages

        base = words(ADEPT.render(msgs))
        tight = ground(r, msgs, fmt=ADEPT, count_tokens=words, max_prompt_tokens=base + 20, k=3)
        assert words(ADEPT.render(tight.messages)) <= base + 20 and len(tight.passages) < len(g.passages)
        none = ground(r, msgs, fmt=ADEPT, count_tokens=words, max_prompt_tokens=base, k=3)
        assert none.passages == [] and none.messages == msgs


def test_markdown_front_matter_and_rst_code_block_languages_are_markup(tmp_path):
    """A Markdown file's YAML front matter is metadata (its title: names the document), not a
    passage; `.. code-block:: python` keeps the code and drops the language name."""
    md = tmp_path / "page.md"
    md.write_text("---\ntitle: \"Kettle care\"\nlayout: post\ntags: [tea]\n---\n\nDescale the kettle monthly.\n")
    (doc,) = read_documents(md)
    text = "\n".join(s.text for s in doc.sections)
    assert doc.title == "Kettle care"
    assert "layout" not in text and "tags" not in text and "Descale the kettle monthly." in text
    line = next(s for s in doc.sections if "Descale" in s.text)
    assert line.line_at(line.text.index("Descale")) == 7
    rule = tmp_path / "rule.md"  # a leading --- with no closing line is a thematic break, kept
    rule.write_text("---\nJust text after a rule.\n")
    assert "Just text after a rule." in "\n".join(s.text for s in read_documents(rule)[0].sections)

    rst = tmp_path / "api.rst"
    rst.write_text("Pots\n====\n\nUse it like this:\n\n.. code-block:: python\n   :linenos:\n\n   pot.brew(3)\n\n"
                   ".. literalinclude:: ../secret/path.py\n\nThe end.\n")
    (doc,) = read_documents(rst)
    text = "\n".join(s.text for s in doc.sections)
    assert "pot.brew(3)" in text and "The end." in text
    assert "python" not in text and "linenos" not in text and "secret" not in text


def test_a_question_naming_an_api_entry_gets_that_entry_first(tmp_path):
    """`What does str.join do?`: the passage titled str.join comes first whatever the ranking says
    (an embedding puts ast.JoinedStr nearer); same-named entries keep the ranking's order; LIKE's
    wildcards in a name are literal; "e.g." is not a name."""
    recs = [
        {"id": "a", "title": "str.join (library/stdtypes)", "text": "Return a string which is the concatenation."},
        {"id": "b", "title": "Joining (howto)", "text": "str join join join: str and join, join str join."},
        {"id": "c", "title": "len (c-api/buffer)", "text": "The buffer length field."},
        {"id": "d", "title": "len (library/functions)", "text": "Return the length of an object: len counts items."},
        {"id": "e", "title": "Types: aXb.c(x)", "text": "Not the a_b.c entry."},
        {"id": "f", "title": "Types: a_b.c(x)", "text": "The a_b.c entry."},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    index = tmp_path / "i.kaki-index"
    build_index([tmp_path / "d.jsonl"], index, chunking=Chunking("none"), embedder="none", progress=False)
    with Retriever.open(index) as r:
        assert r.search("str join join", k=1)[0].ref == "b"  # the ranking alone prefers b
        hits = r.search("What does str.join do? join join", k=2)
        assert [h.ref for h in hits] == ["a", "b"] and hits[0].scores["name"] == 1.0
        assert [h.ref for h in r.search("how many items does len() count", k=2)] == ["d", "c"]
        assert [h.ref for h in r.search("the a_b.c entry", k=1)] == ["f"]
        assert r.named("e.g. sorting, i.e. order", 3) == []
