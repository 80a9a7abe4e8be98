"""Searching an index: BM25 (SQLite FTS5), dense (faiss) and hybrid (reciprocal rank fusion).

    from kaki.retrieval import Retriever
    with Retriever.open("docs.kaki-index") as r:
        for p in r.search("how do I read a file line by line?", k=5):
            print(p.score, p.source, p.title)

A `Retriever` is safe to share between threads (the server's workers): queries take a lock.
The embedder is loaded on the first dense query (or `warm()`), from the index's own record of it.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from kaki.errors import KakiError
from kaki.retrieval import dense as dense_mod
from kaki.retrieval.chunking import Chunking
from kaki.retrieval.embed import Embedder, EmbedderSpec, load_for_spec
from kaki.retrieval.store import Store, corrupted

MODES = ("bm25", "dense", "hybrid")
# Reciprocal rank fusion (Cormack et al. 2009): score = sum over rankings of 1 / (RRF_K + rank);
# 60 is the constant from the paper, which damps the weight of the very first ranks.
RRF_K = 60
# Each ranking contributes this many candidates (at least) to the fusion.
FUSION_DEPTH = 50
# A match in a passage's title (file and section names) counts this much more than in its text.
TITLE_WEIGHT = 2.0
# Query words that carry no topic: leaving them out keeps BM25 from rewarding passages for
# "what" and "the", and keeps FTS5 from scoring every row that contains one.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just let me more most my myself no nor
not of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves
""".split())
_WORD = re.compile(r"\w+", re.UNICODE)
# An API name in a question: dotted (`os.path.join`, parts of 2+ characters, so not "e.g") or called (`len()`).
NAME = re.compile(r"(?<![\w.])([A-Za-z_]\w+(?:\.[A-Za-z_]\w+)+|[A-Za-z_]\w*(?=\(\)))")
NAMED_SCORE = 1.0
MAX_NAMED = 64  # entries one name may have (overloads, the same name in several modules)


@dataclass
class Passage:
    """One search hit. `scores` holds each ranking's own score (bm25, dense, hybrid) when it had one.
    `path` is the file as stored (absolute, on the machine that built the index) and `root` the
    PATH it was indexed under; only `relative_path` leaves this process (`to_json`)."""

    id: int
    title: str
    text: str
    path: str
    line: int
    ref: str
    url: str
    score: float
    rank: int
    scores: dict[str, float] = field(default_factory=dict)
    root: str = ""

    @property
    def source(self) -> str:
        """Where the passage comes from, for a local reader: a JSONL record's url or `file#id`,
        else `file:line` (the file relative to the current directory when it is under it)."""
        if self.url:
            return self.url
        shown = _shown_path(self.path)
        return f"{shown}#{self.ref}" if self.ref else f"{shown}:{self.line}"

    @property
    def relative_path(self) -> str:
        return relative_path(self.path, self.root)

    def as_context(self) -> dict:
        """The passage as kaki.chat_format's context block takes it."""
        return {"title": self.title, "text": self.text}

    def to_json(self) -> dict:
        """The passage as clients see it (the server's `sources[]`, chat's /sources, `kaki index query
        --json`): `title`, `url` (when the record has one), `path` relative to the indexed root,
        `line`, `text`, plus its rank and scores; never a path of the machine it runs on."""
        return {"id": self.id, "rank": self.rank, "score": round(self.score, 6), "title": self.title,
                **({"url": self.url} if self.url else {}), "path": self.relative_path, "line": self.line,
                "text": self.text, **({"ref": self.ref} if self.ref else {}),
                "scores": {k: round(v, 6) for k, v in self.scores.items()}}


def relative_path(path: str, root: str) -> str:
    """`path` relative to `root` (a folder's file keeps its folders; a file indexed by itself is its
    name). Anything else, a path outside the root or one that climbs out with `..` (an index from
    elsewhere), is shown by its file name alone."""
    p, r = PurePosixPath(path), PurePosixPath(root)
    rel = p.name if p == r or not root else (p.relative_to(r).as_posix() if r in p.parents else p.name)
    return p.name if rel.startswith("/") or ".." in PurePosixPath(rel).parts else rel


def root_of(path: str, roots: list[str]) -> str:
    """The deepest of the index's roots that holds `path` ('' when none does)."""
    p = PurePosixPath(path)
    held = [r for r in roots if PurePosixPath(r) == p or PurePosixPath(r) in p.parents]
    return max(held, key=lambda r: len(PurePosixPath(r).parts), default="")


def _shown_path(path: str) -> str:
    p = Path(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return path


def fts_query(text: str) -> str:
    """An FTS5 MATCH expression for free text: its content words, each quoted (so FTS5 syntax in
    the question is never interpreted), joined with OR; '' when nothing is left."""
    words = [w.lower() for w in _WORD.findall(text)]
    kept = [w for w in words if w not in STOPWORDS] or words
    seen = dict.fromkeys(kept)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in seen)


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of id rankings (best first): (id, fused score), best first."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, pid in enumerate(ranking, 1):
            fused[pid] = fused.get(pid, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))


class Retriever:
    """An open index. `mode` None = the index's stored search mode; if it has none, hybrid when
    the index has vectors, else bm25."""

    def __init__(self, store: Store, embedder: str | None = None, mode: str | None = None):
        self.store = store
        self.path = store.path
        meta = store.meta()
        self.meta = meta
        self.chunking = Chunking.from_json(meta["chunking"]) if "chunking" in meta else Chunking()
        emb = meta.get("embedder", "none")
        self.embedder_spec = None if emb == "none" else EmbedderSpec.from_json(emb)
        self._embedder_override = embedder
        self._embedder: Embedder | None = None
        self._dense = None
        self._dense_kind: str | None = None
        self._lock = threading.RLock()
        stored = meta.get("search_mode", "auto")  # chosen at build time by measurement (--search-mode)
        self.default_mode = self._check_mode(mode) if mode else (
            stored if stored != "auto" else "hybrid" if self.has_dense else "bm25")
        if embedder is not None and embedder != "none":
            self.warm()  # an explicit --embedder is checked against the index at once

    @classmethod
    def open(cls, path: str | Path, *, embedder: str | None = None, mode: str | None = None) -> "Retriever":
        """Open and validate an index (format, version, embedder when given)."""
        return cls(Store.open(path), embedder=embedder, mode=mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.store.close()

    @property
    def has_dense(self) -> bool:
        return self.embedder_spec is not None

    def _check_mode(self, mode: str) -> str:
        if mode not in MODES:
            raise KakiError(f"unknown retrieval mode {mode!r}; use one of {', '.join(MODES)}")
        if mode != "bm25" and not self.has_dense:
            raise KakiError(f"{self.path} has no dense vectors (built with --embedder none), so --mode {mode} "
                            "cannot be used; use --mode bm25, or rebuild with an embedder")
        return mode

    # ------------------------------------------------------------------ loading

    def warm(self) -> None:
        """Load the embedder and the dense index now (otherwise: on the first dense query)."""
        if self.has_dense:
            self._ensure_dense()

    def _ensure_dense(self) -> None:
        with self._lock:
            if self._embedder is None:
                self._embedder = load_for_spec(self.embedder_spec, self._embedder_override)
            if self._dense is None:
                try:
                    got = self.store.get_dense()
                except sqlite3.DatabaseError as e:  # a damaged page
                    raise corrupted(self.path, e)
                if got is None:
                    raise KakiError(f"{self.path} records an embedder but holds no dense index; rebuild it "
                                    "with `kaki index build ... --rebuild`")
                kind, count, data = got
                try:
                    self._dense = dense_mod.deserialize(data, kind)
                except RuntimeError as e:
                    raise corrupted(self.path, e)
                self._dense_kind = kind

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """(len(queries), dim) query vectors, batched; rows go to `search(query_vector=...)`."""
        self._ensure_dense()
        return self._embedder.embed(queries)

    # ------------------------------------------------------------------ searching

    def search(self, query: str, k: int = 5, mode: str | None = None, *,
               query_vector: np.ndarray | None = None) -> list[Passage]:
        """The k best passages for `query`, best first. `query_vector` (1, dim) skips the
        embedder (benchmarks time it separately)."""
        mode = self._check_mode(mode) if mode else self.default_mode
        if k < 1:
            raise KakiError(f"k must be at least 1, got {k}")
        depth = max(FUSION_DEPTH, 2 * k) if mode == "hybrid" else k
        with self._lock:
            try:
                lexical = self.bm25(query, depth) if mode in ("bm25", "hybrid") else []
                semantic = self.dense(query, depth, query_vector) if mode in ("dense", "hybrid") else []
                if mode == "bm25":
                    ranked = lexical
                elif mode == "dense":
                    ranked = semantic
                else:
                    ranked = rrf([[i for i, _ in lexical], [i for i, _ in semantic]])
                named = self.named(query, k, [i for i, _ in ranked])
                ranked = [(i, NAMED_SCORE) for i in named] + [(i, sc) for i, sc in ranked if i not in named]
                ranked = ranked[:k]
                rows = self.store.passages([i for i, _ in ranked])
            except sqlite3.DatabaseError as e:  # a damaged page
                raise corrupted(self.path, e)
        by_mode = {"bm25": dict(lexical), "dense": dict(semantic), "name": {i: NAMED_SCORE for i in named}}
        roots = json.loads(self.meta.get("roots", "[]"))  # validated when the index was opened
        out = []
        for rank, (pid, score) in enumerate(ranked, 1):
            if pid not in rows:
                raise corrupted(self.path, ValueError(f"the dense index refers to passage {pid}, which is missing"))
            path, _ordinal, ref, url, line, title, text = rows[pid]
            scores = {m: s[pid] for m, s in by_mode.items() if pid in s}
            if mode == "hybrid":
                scores["hybrid"] = score
            out.append(Passage(id=pid, title=title, text=text, path=path, line=line, ref=ref, url=url,
                               score=score, rank=rank, scores=scores, root=root_of(path, roots)))
        return out

    def named(self, query: str, k: int, ranking: list[int] = ()) -> list[int]:
        """Passages titled by an API name the question spells out (`str.join`, `len()`): a
        question that names the function it asks about wants that entry first, and an embedding of
        "What does str.join do?" lands nearer ast.JoinedStr than str.join. Names in the question's
        order; entries sharing a name (`len` in the C API and in the builtins) in `ranking`'s order."""
        place = {pid: n for n, pid in enumerate(ranking)}
        out: list[int] = []
        for name in dict.fromkeys(NAME.findall(query)):
            found = self.store.titled(name, MAX_NAMED)
            out += sorted((i for i in found if i not in out), key=lambda i: (place.get(i, len(place)), i))
        return out[:k]

    def bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        match = fts_query(query)
        return self.store.bm25(match, k, TITLE_WEIGHT) if match else []

    def dense(self, query: str, k: int, query_vector: np.ndarray | None = None) -> list[tuple[int, float]]:
        self._ensure_dense()
        q = self._embedder.embed([query]) if query_vector is None else query_vector
        return dense_mod.search(self._dense, q.reshape(1, -1), k)[0]

    # ------------------------------------------------------------------ information

    def info(self) -> dict:
        s = self.store
        dense = s.conn.execute("SELECT kind, count, length(data) FROM dense WHERE id = 1").fetchone()
        spec = self.embedder_spec
        return {
            "path": str(self.path), "format": self.meta.get("format"), "format_version": int(
                s.conn.execute("PRAGMA user_version").fetchone()[0]),
            "files": s.count("files"), "passages": s.count("passages"),
            "chunking": self.chunking.describe(),
            "embedder": None if spec is None else {"name": spec.name, "source": spec.source, "dim": spec.dim,
                                                   "fingerprint": spec.fingerprint},
            "dense": None if dense is None else {"kind": dense[0], "vectors": dense[1], "bytes": dense[2],
                                                 "description": dense_mod.describe(dense[0], dense[1])},
            "default_mode": self.default_mode, "roots": json.loads(self.meta.get("roots", "[]")),
            "built_with": self.meta.get("kaki_version"), "updated": self.meta.get("updated"),
            "bytes": Path(self.path).stat().st_size,
        }
