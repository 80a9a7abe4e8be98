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

Updates run in one transaction (SQLite's journal makes them atomic); a new index is written
beside its destination and renamed into place.
"""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path

from kaki.errors import KakiError

APPLICATION_ID = 0x6B616B69  # b"kaki"
FORMAT_NAME = "kaki-index"
FORMAT_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"

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
            if store.meta().get("format") != FORMAT_NAME:
                raise KakiError(f"{path} has no kaki index metadata; rebuild it with `kaki index build ... --rebuild`")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise corrupted(path, e)
        return store

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ meta

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def set_meta(self, **values: str) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values.items())

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

    def all_vectors(self) -> tuple[list[int], list[bytes]]:
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
