"""The index file: one SQLite database holding files, passages, an FTS5 BM25 index and the dense index.

Layout (format version 1):
- `PRAGMA application_id` = APPLICATION_ID ("kaki") marks the file as a kaki index and
  `PRAGMA user_version` = FORMAT_VERSION; both are checked before anything else is read, so
  another SQLite database, a newer format or a file that is not SQLite at all is refused clearly.
- `meta(key, value)`: format, embedder identity (JSON, or "none"), chunking (JSON), the indexed
  roots, the dense index's kind, kaki's version.
- `files(id, path, size, mtime_ns, sha256)`: what was indexed, for incremental rebuilds.
- `passages(id, file_id, ordinal, ref, url, line, title, text, vector)`: `ref` is a JSONL
  record's id, `line` the source line (or record number), `vector` the float32 embedding (kept
  so the dense index can be rebuilt without re-embedding unchanged passages).
- `passages_fts`: FTS5 over (title, text) with the Porter stemmer, external content = passages,
  kept in sync by triggers.
- `dense(kind, count, crc32, data)`: the serialized faiss index (ids = passage ids), with a CRC
  so a damaged blob is refused rather than deserialized.

An index may come from someone else, so `Store.open` trusts nothing in it: the schema must be
exactly the one `SCHEMA` creates (no views, no extra triggers, tables or columns, which could make
a plain SELECT recurse forever or write elsewhere), and every meta value and the dense row are
type- and range-checked before anything uses them. Failures are KakiErrors naming the file.

Updates run in one transaction (SQLite's journal makes them atomic); a new index is written
beside its destination and renamed into place.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from functools import lru_cache
from pathlib import Path

from kaki.errors import KakiError
from kaki.retrieval.chunking import Chunking
from kaki.retrieval.dense import KINDS as DENSE_KINDS
from kaki.retrieval.embed import EmbedderSpec

APPLICATION_ID = 0x6B616B69  # b"kaki"
FORMAT_NAME = "kaki-index"
FORMAT_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"

# A meta value longer than this is not one kaki wrote (the longest, `roots`, lists the PATHs given).
MAX_META_CHARS = 1 << 20
MAX_META_ROWS = 64
# The index's own default search mode; "auto" = hybrid with vectors, else bm25.
SEARCH_MODES = ("auto", "bm25", "dense", "hybrid")
DENSE_STORED_KINDS = tuple(k for k in DENSE_KINDS if k != "auto")

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER NOT NULL,
                   mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE passages(id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id),
                      ordinal INTEGER NOT NULL, ref TEXT NOT NULL, url TEXT NOT NULL, line INTEGER NOT NULL,
                      title TEXT NOT NULL, text TEXT NOT NULL, vector BLOB);
CREATE INDEX passages_file ON passages(file_id);
CREATE VIRTUAL TABLE passages_fts USING fts5(title, text, content='passages', content_rowid='id',
                                             tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER passages_ai AFTER INSERT ON passages BEGIN
  INSERT INTO passages_fts(rowid, title, text) VALUES (new.id, new.title, new.text);
END;
CREATE TRIGGER passages_ad AFTER DELETE ON passages BEGIN
  INSERT INTO passages_fts(passages_fts, rowid, title, text) VALUES ('delete', old.id, old.title, old.text);
END;
CREATE TABLE dense(id INTEGER PRIMARY KEY CHECK (id = 1), kind TEXT NOT NULL, count INTEGER NOT NULL,
                   crc32 INTEGER NOT NULL, data BLOB NOT NULL);
"""


def corrupted(path: Path, e: Exception) -> KakiError:
    return KakiError(f"{path} is damaged ({e}); rebuild it with `kaki index build ... --out {path} --rebuild`")


def foreign(path: Path, what: str) -> KakiError:
    return KakiError(f"{path} is not an index kaki wrote ({what}); rebuild it from your documents with "
                     f"`kaki index build DOCS... --out {path} --rebuild`")


@lru_cache(maxsize=1)
def expected_schema() -> frozenset[tuple]:
    """sqlite_master of a fresh index, made by this SQLite (FTS5's shadow tables are its own)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(SCHEMA)
        return frozenset(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        conn.close()


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse any schema but kaki's own: a view or trigger runs SQL the file's author chose on every read."""
    got = set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    want = expected_schema()
    if got != want:
        # Name a view or trigger first: those are what make a plain read run someone's SQL.
        rank = {"view": 0, "trigger": 1}
        odd = sorted(got - want, key=lambda r: (rank.get(r[0], 2), str(r))) or sorted(want - got, key=str)
        kind, name = odd[0][0], odd[0][1]
        what = f"an unexpected {kind} {name!r}" if got - want else f"its {kind} {name!r} is missing"
        raise foreign(path, f"its schema is not kaki's: {what}")


def _json(path: Path, key: str, text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise foreign(path, f"meta {key!r} is not valid JSON: {type(e).__name__}")


def validate_meta(rows: list[tuple], path: Path) -> dict[str, str]:
    """The meta table as a dict, every value checked the way its reader will use it."""
    if len(rows) > MAX_META_ROWS:
        raise foreign(path, f"its meta table has over {MAX_META_ROWS} rows")
    meta: dict[str, str] = {}
    for key, value in rows:
        if not isinstance(key, str) or not isinstance(value, str) or len(value) > MAX_META_CHARS:
            raise foreign(path, f"meta {str(key)[:40]!r} is not a text value of at most {MAX_META_CHARS:,} characters")
        meta[key] = value
    if meta.get("format") != FORMAT_NAME:
        raise KakiError(f"{path} has no kaki index metadata; rebuild it with `kaki index build ... --rebuild`")
    try:
        if meta.get("embedder", "none") != "none":
            EmbedderSpec.from_json(meta["embedder"])
        if "chunking" in meta:
            Chunking.from_json(meta["chunking"])
    except KakiError as e:
        raise foreign(path, f"bad meta: {e}")
    roots = _json(path, "roots", meta.get("roots", "[]"))
    if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
        raise foreign(path, "meta 'roots' is not a list of paths")
    mode = meta.get("search_mode", "auto")
    if mode not in SEARCH_MODES or (mode in ("dense", "hybrid") and meta.get("embedder", "none") == "none"):
        raise foreign(path, f"meta 'search_mode' is {mode[:40]!r}, not one of {', '.join(SEARCH_MODES)} "
                            "(dense and hybrid need an embedder)")
    if meta.get("dense_kind", "auto") not in DENSE_KINDS:
        raise foreign(path, f"meta 'dense_kind' is {meta['dense_kind'][:40]!r}, not one of {', '.join(DENSE_KINDS)}")
    return meta


def check_dense_row(conn: sqlite3.Connection, path: Path) -> None:
    row = conn.execute("SELECT kind, typeof(count), count, typeof(crc32), typeof(data) FROM dense "
                       "WHERE id = 1").fetchone()
    if row is None:
        return
    kind, count_type, count, crc_type, data_type = row
    if kind not in DENSE_STORED_KINDS or count_type != "integer" or count < 0 or crc_type != "integer" \
            or data_type != "blob":
        raise foreign(path, f"its dense index row is not kaki's (kind {str(kind)[:40]!r}, count {count_type}, "
                            f"data {data_type})")
    if conn.execute("SELECT count(*) FROM dense").fetchone()[0] != 1:
        raise foreign(path, "its dense table has more than one row")


def check_header(path: Path) -> None:
    """Refuse anything that is not an SQLite file before SQLite sees it."""
    if not path.exists():
        raise KakiError(f"{path} does not exist; build it with `kaki index build DOCS... --out {path}`")
    if path.is_dir():
        raise KakiError(f"{path} is a folder, not a kaki index file")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        raise KakiError(f"{path} is not a kaki index (not an SQLite file); build one with "
                        f"`kaki index build DOCS... --out {path}`")


class Store:
    """An open index database. `Store.open` validates; `Store.create` makes a new, empty one."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self._meta: dict[str, str] = {}

    @classmethod
    def create(cls, path: Path) -> "Store":
        conn = sqlite3.connect(str(path), isolation_level=None)
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        store = cls(conn, path)
        store.set_meta(format=FORMAT_NAME)
        return store

    @classmethod
    def open(cls, path: str | Path, write: bool = False) -> "Store":
        path = Path(path)
        check_header(path)
        uri = f"{path.resolve().as_uri()}?mode={'rw' if write else 'ro'}"
        try:
            # check_same_thread=False: the server queries from its worker threads (Retriever locks).
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise corrupted(path, e)
        if app_id != APPLICATION_ID:
            conn.close()
            raise KakiError(f"{path} is an SQLite database but not a kaki index; build one with "
                            f"`kaki index build DOCS... --out INDEX`")
        if version != FORMAT_VERSION:
            conn.close()
            newer = version > FORMAT_VERSION
            raise KakiError(f"{path} is a kaki index of format version {version}, and this kaki reads version "
                            f"{FORMAT_VERSION}; " + ("upgrade kaki to read it, or " if newer else "")
                            + f"rebuild it with `kaki index build ... --out {path} --rebuild`")
        store = cls(conn, path)
        try:
            check_schema(conn, path)
            store._meta = validate_meta(conn.execute("SELECT key, value FROM meta LIMIT ?",
                                                     (MAX_META_ROWS + 1,)).fetchall(), path)
            check_dense_row(conn, path)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise corrupted(path, e)
        except KakiError:
            conn.close()
            raise
        return store

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ meta

    def meta(self) -> dict[str, str]:
        """The meta values as `open` validated them (or as this process set them)."""
        return dict(self._meta)

    def set_meta(self, **values: str) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values.items())
        self._meta.update(values)

    # ------------------------------------------------------------------ files and passages

    def files(self) -> dict[str, tuple[int, int, int, str]]:
        """path -> (id, size, mtime_ns, sha256)."""
        return {p: (i, s, m, h) for i, p, s, m, h in
                self.conn.execute("SELECT id, path, size, mtime_ns, sha256 FROM files")}

    def put_file(self, path: str, size: int, mtime_ns: int, sha256: str) -> int:
        row = self.conn.execute("SELECT id FROM files WHERE path = ?", (path,)).fetchone()
        if row:
            self.conn.execute("UPDATE files SET size = ?, mtime_ns = ?, sha256 = ? WHERE id = ?",
                              (size, mtime_ns, sha256, row[0]))
            return row[0]
        return self.conn.execute("INSERT INTO files(path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)",
                                 (path, size, mtime_ns, sha256)).lastrowid

    def delete_passages(self, file_id: int) -> int:
        return self.conn.execute("DELETE FROM passages WHERE file_id = ?", (file_id,)).rowcount

    def delete_file(self, file_id: int) -> int:
        n = self.delete_passages(file_id)
        self.conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return n

    def add_passages(self, rows: list[tuple]) -> None:
        """rows: (file_id, ordinal, ref, url, line, title, text)."""
        self.conn.executemany("INSERT INTO passages(file_id, ordinal, ref, url, line, title, text) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def count(self, table: str = "passages") -> int:
        return self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def passages(self, ids: list[int]) -> dict[int, tuple]:
        """id -> (path, ordinal, ref, url, line, title, text)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(
            f"SELECT p.id, f.path, p.ordinal, p.ref, p.url, p.line, p.title, p.text FROM passages p "
            f"JOIN files f ON f.id = p.file_id WHERE p.id IN ({marks})", ids)
        return {r[0]: r[1:] for r in rows}

    def titled(self, name: str, limit: int) -> list[int]:
        """Passages whose title is `name`'s entry: the title itself, or it after a `Doc: ` prefix,
        followed by nothing, a signature `(` or a ` (where)` suffix."""
        esc = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.conn.execute(
            "SELECT id FROM passages WHERE title = ? OR title LIKE ? ESCAPE '\\' OR title LIKE ? ESCAPE '\\' "
            "OR title LIKE ? ESCAPE '\\' OR title LIKE ? ESCAPE '\\' ORDER BY id LIMIT ?",
            (name, esc + "(%", esc + " (%", "%: " + esc + "(%", "%: " + esc + " (%", limit))
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ BM25

    def bm25(self, match: str, limit: int, title_weight: float) -> list[tuple[int, float]]:
        """(passage id, BM25 score, higher is better) for an FTS5 MATCH expression."""
        # FTS5's bm25() is negative (more negative = better); negate it for a conventional score.
        rows = self.conn.execute(
            "SELECT rowid, -bm25(passages_fts, ?, 1.0) AS s FROM passages_fts WHERE passages_fts MATCH ? "
            "ORDER BY bm25(passages_fts, ?, 1.0) LIMIT ?", (title_weight, match, title_weight, limit))
        return list(rows)

    # ------------------------------------------------------------------ dense vectors

    def vectors_missing(self) -> list[tuple[int, str, str]]:
        return list(self.conn.execute("SELECT id, title, text FROM passages WHERE vector IS NULL ORDER BY id"))

    def set_vectors(self, ids: list[int], vectors) -> None:
        self.conn.executemany("UPDATE passages SET vector = ? WHERE id = ?",
                              ((v.tobytes(), i) for i, v in zip(ids, vectors)))

    def all_vectors(self, dim: int) -> tuple[list[int], list[bytes]]:
        """Every stored vector, each checked to be `dim` float32s (a stray one would misalign all)."""
        bad = self.conn.execute("SELECT id FROM passages WHERE vector IS NOT NULL AND "
                                "(typeof(vector) != 'blob' OR length(vector) != ?) LIMIT 1", (4 * dim,)).fetchone()
        if bad:
            raise corrupted(self.path, ValueError(f"passage {bad[0]}'s vector is not {dim} float32s"))
        rows = self.conn.execute("SELECT id, vector FROM passages WHERE vector IS NOT NULL ORDER BY id").fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def put_dense(self, kind: str, count: int, data: bytes) -> None:
        self.conn.execute("INSERT OR REPLACE INTO dense(id, kind, count, crc32, data) VALUES (1, ?, ?, ?, ?)",
                          (kind, count, zlib.crc32(data), data))

    def drop_dense(self) -> None:
        self.conn.execute("DELETE FROM dense")

    def get_dense(self) -> tuple[str, int, bytes] | None:
        row = self.conn.execute("SELECT kind, count, crc32, data FROM dense WHERE id = 1").fetchone()
        if row is None:
            return None
        kind, count, crc, data = row
        if zlib.crc32(data) != crc:
            raise corrupted(self.path, ValueError("the dense index's checksum does not match"))
        return kind, count, data
