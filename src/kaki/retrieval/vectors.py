"""Precomputed passage vectors shipped beside a corpus, so building its index needs no embedding.

Embedding the 14k demo passages takes minutes on a laptop CPU; their vectors, stored once as
float16, make the first `make chat` hybrid with no wait. A vector file is only ever a cache: each
vector is keyed by a hash of the exact text the embedder saw (title + text), and the file records
the embedder's spec, so a vector is used only for the same text embedded by the same model. Any
passage the file lacks (the corpus changed) is embedded as usual; a file made by another embedder
is ignored with a note. The file is a plain .npz read with allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from kaki.errors import KakiError
from kaki.files import write_file_atomically
from kaki.retrieval.embed import EmbedderSpec

FORMAT = "kaki-passage-vectors/1"
KEY_BYTES = 16
# A vector file is read whole; far beyond any corpus kaki ships (14k x 384 float16 is 11 MB).
MAX_FILE_BYTES = 1 << 31


def passage_text(title: str, text: str) -> str:
    """What the embedder is given for a passage (index building embeds exactly this)."""
    return f"{title}\n{text}"


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:KEY_BYTES]


def corpus_hash(texts: list[str]) -> str:
    """One hash over the passages in order: the staleness key's second half (the first is the
    embedder's fingerprint)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(text_key(t))
    return h.hexdigest()


def save(path: str | Path, spec: EmbedderSpec, texts: list[str], vectors: np.ndarray) -> None:
    """Write `vectors` (one row per text) as float16, atomically."""
    if len(texts) != len(vectors):
        raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
    path = Path(path)
    keys = np.frombuffer(b"".join(text_key(t) for t in texts), dtype=np.uint8).reshape(len(texts), KEY_BYTES)
    header = {"format": FORMAT, "embedder": json.loads(spec.to_json()), "count": len(texts),
              "corpus_sha256": corpus_hash(texts)}
    buf = io.BytesIO()
    np.savez(buf, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), keys=keys,
             vectors=np.asarray(vectors, dtype=np.float16))
    write_file_atomically(path, buf.getvalue())


class VectorFile:
    """A loaded vector file: `spec`, `corpus_sha256` and `get(text)` -> float32 vector or None."""

    def __init__(self, path: Path, spec: EmbedderSpec, corpus_sha256: str, keys: np.ndarray, vectors: np.ndarray):
        self.path, self.spec, self.corpus_sha256 = path, spec, corpus_sha256
        self._rows = {k.tobytes(): i for i, k in enumerate(keys)}
        self._vectors = vectors

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, text: str) -> np.ndarray | None:
        i = self._rows.get(text_key(text))
        return None if i is None else self._vectors[i].astype(np.float32)

    @classmethod
    def load(cls, path: str | Path) -> "VectorFile":
        path = Path(path)

        def bad(why: str) -> KakiError:
            return KakiError(f"{path} is not a kaki passage-vector file ({why}); make it with "
                             "recipes/embed_passages.py, or leave --vectors out to embed the passages")
        try:
            size = path.stat().st_size
        except OSError as e:
            raise KakiError(f"cannot read the vector file {path}: {e.strerror or e}") from None
        if not path.is_file() or size > MAX_FILE_BYTES:
            raise bad("not a regular file of at most 2 GB")
        try:
            with np.load(path, allow_pickle=False) as z:
                if set(z.files) != {"header", "keys", "vectors"}:
                    raise bad(f"it holds {sorted(z.files)[:5]}")
                header = json.loads(z["header"].tobytes().decode())
                keys, vectors = z["keys"], z["vectors"]
        except KakiError:
            raise
        except (ValueError, OSError, UnicodeDecodeError, KeyError) as e:
            raise bad(str(e)[:120]) from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise bad("unknown format")
        try:
            spec = EmbedderSpec.from_json(json.dumps(header["embedder"]))
        except (KeyError, TypeError) as e:
            raise bad(f"no embedder spec: {e}") from None
        n = header.get("count")
        if (keys.dtype != np.uint8 or keys.shape != (n, KEY_BYTES) or vectors.dtype != np.float16
                or vectors.shape != (n, spec.dim)):
            raise bad(f"keys {keys.shape}/{keys.dtype}, vectors {vectors.shape}/{vectors.dtype} for "
                      f"{n} passages of dimension {spec.dim}")
        if not np.isfinite(vectors).all():
            raise bad("vectors hold NaN or inf")
        return cls(path, spec, str(header.get("corpus_sha256", "")), keys, vectors)
