"""Dense vectors in faiss: exact inner product by default, approximate past a size threshold.

Vectors are L2-normalized by the default embedder, so inner product is cosine similarity. The
kind is chosen from the number of vectors (`choose`) unless asked for:

- `flat`: exact search (IndexFlatIP), up to EXACT_MAX vectors. One query scans every vector:
  ~0.5 ms per 10k 384-dim vectors on this 2-core machine, so ~5 ms at 100k.
- `hnsw`: HNSW graph (M=32), up to HNSW_MAX: sub-millisecond queries, recall@10 near 1 with
  efSearch=64, at the price of a slower build (the graph is rebuilt from the stored vectors
  whenever passages change).
- `ivf`: inverted lists over k-means cells (nlist ~ 4*sqrt(n), nprobe 16) past HNSW_MAX, where
  HNSW's build time and memory grow too large.

Faiss ids are the passages' SQLite ids, so a hit maps straight back to its row.
"""

from __future__ import annotations

import math

import numpy as np

from kaki.errors import KakiError

KINDS = ("auto", "flat", "hnsw", "ivf")
EXACT_MAX = 100_000
HNSW_MAX = 2_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
IVF_NPROBE = 16


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise KakiError(f"dense retrieval needs faiss ({e}); install it with `pip install faiss-cpu` "
                        "(part of kaki's `retrieval` extra)")
    return faiss


def choose(n: int, kind: str = "auto") -> str:
    if kind not in KINDS:
        raise KakiError(f"unknown dense index kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n <= EXACT_MAX else "hnsw" if n <= HNSW_MAX else "ivf"


def describe(kind: str, n: int) -> str:
    return {"flat": f"exact inner product (faiss IndexFlatIP), {n:,} vectors",
            "hnsw": f"approximate: HNSW M={HNSW_M} efSearch={HNSW_EF_SEARCH} (faiss), {n:,} vectors",
            "ivf": f"approximate: IVF nlist={_nlist(n)} nprobe={IVF_NPROBE} (faiss), {n:,} vectors"}[kind]


def _nlist(n: int) -> int:
    return max(1, min(n // 39, int(4 * math.sqrt(n))))  # faiss wants >= 39 training points per cell


def build(vectors: np.ndarray, ids: np.ndarray, kind: str):
    """A faiss index over `vectors` (n, d) float32 with ids (n,) int64."""
    faiss = _faiss()
    n, d = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner.hnsw.efSearch = HNSW_EF_SEARCH
        index = faiss.IndexIDMap2(inner)
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, _nlist(n), faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = vectors[rng.choice(n, size=min(n, 256 * _nlist(n)), replace=False)]
        index.train(sample)
        index.nprobe = IVF_NPROBE
    else:
        raise KakiError(f"unknown dense index kind {kind!r}")
    if n:
        index.add_with_ids(vectors, ids)
    return index


def serialize(index) -> bytes:
    return _faiss().serialize_index(index).tobytes()


def _shape_of(index) -> str | None:
    """The kind `build` makes that `index` is, or None."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSWFlat):
            return "hnsw"
        if isinstance(inner, faiss.IndexFlat):
            return "flat"
    elif isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    return None


def deserialize(data: bytes, kind: str):
    faiss = _faiss()
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except MemoryError:  # a size field in the blob asks for more than the machine has
        raise KakiError("the dense index asks for more memory than this machine has, so it is damaged or "
                        "not kaki's; rebuild the index with `kaki index build ... --rebuild`") from None
    # The blob may not be what its row says (an index file from elsewhere): check before use.
    shape = _shape_of(index)
    if shape != kind or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise KakiError(f"the dense index is recorded as {kind!r} but holds {shape or type(index).__name__}; "
                        "rebuild the index with `kaki index build ... --rebuild`")
    # Search-time knobs are set here, not trusted from the file, so a kaki upgrade can change them.
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        index.nprobe = IVF_NPROBE
    return index


def search(index, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per query: (passage id, inner product) best first; ids of -1 (fewer hits than k) dropped."""
    faiss = _faiss()
    if queries.shape[1] != index.d:
        raise KakiError(f"the dense index holds {index.d}-dim vectors but the query embedder makes "
                        f"{queries.shape[1]}-dim ones; rebuild the index with `kaki index build ... --rebuild`")
    # faiss parallelizes over queries: for one query, extra OpenMP threads only add their wake-ups
    # (measured: ~12 ms per HNSW query on this busy 2-core machine, against ~0.1 ms on one thread).
    before = faiss.omp_get_max_threads()
    if len(queries) == 1:
        faiss.omp_set_num_threads(1)
    try:
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    finally:
        faiss.omp_set_num_threads(before)
    return [[(int(i), float(s)) for i, s in zip(row_ids, row_s) if i >= 0] for row_ids, row_s in zip(ids, scores)]
