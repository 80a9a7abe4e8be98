"""What each rank of a tensor-parallel model holds, as data: a rule per tensor name, and sources
that read only this rank's slice of each tensor from the checkpoint.

Tensor names are kaki's (kaki.checkpoint renames every family's onto them):
- column-parallel (rows split): the q/k/v projections, Persimmon's and NeoX's fused
  query_key_value (head-major rows, so a block of rows is a block of whole heads, reference
  adept-inference.md §2.6), the MLP's up and gate projections; weight, bias and quantization scales;
- row-parallel (columns split): the attention output and MLP down projections; their bias is
  added by rank 0 only, an int8 layer's per-output-channel scale is whole on every rank, an int4
  layer's group scales split with the columns they scale;
- vocabulary-parallel (rows split in vocabulary blocks): the embedding and the lm_head;
- everything else (norms, q/k layernorms) is replicated.
"""

from __future__ import annotations

import math
import re

import torch

from kaki.checkpoint import TensorSource
from kaki.config import ModelConfig
from kaki.errors import CheckpointError, KakiError
from kaki.tp.group import TensorParallel

_PARTS = r"(weight|bias|weight_scale|weight_zero)"
COLUMN = re.compile(r"\.(self_attn\.(query_key_value|q_proj|k_proj|v_proj)|mlp\.(dense_h_to_4h|gate_proj))\."
                    + _PARTS + "$")
ROW = re.compile(r"\.(self_attn\.dense|mlp\.dense_4h_to_h)\." + _PARTS + "$")
VOCAB = re.compile(r"^(model\.embed_tokens|lm_head)\." + _PARTS + "$")

# Module names (kaki's) of the column- and row-parallel layers, for adapters (kaki.tp.lora).
COLUMN_MODULE = re.compile(COLUMN.pattern.replace(r"\." + _PARTS + "$", "$"))
ROW_MODULE = re.compile(ROW.pattern.replace(r"\." + _PARTS + "$", "$"))


def adapter_slice(model, module: str, part: str, t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a LoRA matrix of layer `module`: B's rows of a column-parallel layer,
    A's columns of a row-parallel one (whose partial B A x sums over the ranks with the layer's
    own all-reduce); the other matrix is whole. Unchanged without tensor parallelism."""
    tp = getattr(model, "tp", None)
    if tp is None:
        return t
    if part == "lora_B" and COLUMN_MODULE.search(module):
        lo, hi = tp.span(t.shape[0])
        return t[lo:hi]
    if part == "lora_A" and ROW_MODULE.search(module):
        lo, hi = tp.span(t.shape[1])
        return t[:, lo:hi]
    return t


def local_config(cfg: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The config of the model one rank computes: its share of the heads, KV heads and MLP units
    (the hidden size and vocabulary stay whole: activations and logits are the full model's).
    An error names what does not divide by the tensor-parallel size."""
    return cfg.replace(
        num_attention_heads=tp.part(cfg.num_attention_heads, "num_attention_heads"),
        num_key_value_heads=tp.part(cfg.num_key_value_heads, "num_key_value_heads (grouped-query KV heads)"),
        intermediate_size=tp.part(cfg.intermediate_size, "intermediate_size (MLP units)"))


def placement(key: str, ndim: int) -> tuple[str, int | None]:
    """How `key` is split: ("split", dim), ("vocab", 0), ("first", None) (rank 0 only) or
    ("whole", None)."""
    if VOCAB.search(key):
        return "vocab", 0
    if COLUMN.search(key):
        return "split", 0
    if ROW.search(key):
        if key.endswith(".bias"):
            return "first", None
        if key.endswith((".weight_scale", ".weight_zero")) and ndim < 2:
            return "whole", None  # int8: one scale per output channel, the whole row's
        return "split", 1
    return "whole", None


def shard_sources(sources: dict[str, TensorSource], cfg: ModelConfig,
                  tp: TensorParallel) -> dict[str, TensorSource]:
    """This rank's sources: each a view that reads only the rank's slice when loaded."""
    out = {}
    for key, src in sources.items():
        how, dim = placement(key, len(src.shape))
        if how == "first":
            if tp.first:
                out[key] = src
            continue
        if how == "whole":
            out[key] = src
            continue
        n = src.shape[dim]
        lo, hi = tp.vocab_span(cfg.vocab_size) if how == "vocab" else tp.span(n)
        if how == "split" and n % tp.world:
            # Heads and MLP units were checked (local_config); what is left is an int4 layer's
            # column groups, whose scales cannot be cut inside a group.
            raise CheckpointError(f"{key} has {n} along dim {dim}, which does not split over {tp.world} ranks "
                                  "(int4 groups: each rank needs whole groups); load the unquantized checkpoint "
                                  "with quantize= instead, which quantizes each rank's slice")
        out[key] = slice_source(src, dim, lo, hi)
    return out


def slice_source(src: TensorSource, dim: int, lo: int, hi: int) -> TensorSource:
    """A source for src[lo:hi] along `dim` that reads no more of the file than it must: rows
    through the source's row reader (safetensors reads just those bytes), columns block by block."""
    if isinstance(src, PartedSource) and src.dim == dim:
        return src.narrow(lo, hi)
    shape = list(src.shape)
    shape[dim] = hi - lo
    if dim == 0:
        def rows(a: int, b: int) -> torch.Tensor:
            return src.rows(lo + a, lo + b).contiguous()
    elif src.load_slice is not None:
        def rows(a: int, b: int) -> torch.Tensor:
            return src.load_slice((slice(a, b), *[slice(None)] * (dim - 1), slice(lo, hi))).contiguous()
    else:
        def rows(a: int, b: int) -> torch.Tensor:
            return src.rows(a, b).narrow(dim, lo, hi - lo).contiguous()

    # A column slice of a file that cannot slice reads whole source rows: in blocks of at most
    # ROW_BLOCK_BYTES of them.
    src_row_bytes = max(1, math.prod(src.shape[1:]) * (src.dtype.itemsize if src.dtype else 4))
    step = shape[0] if dim == 0 or src.load_slice is not None else max(1, ROW_BLOCK_BYTES // src_row_bytes)

    def load() -> torch.Tensor:
        if step >= shape[0]:
            return rows(0, shape[0])
        blocks = [rows(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]
        return torch.cat(blocks)

    return TensorSource(tuple(shape), src.dtype, load, src.origin, rows, name=src.name)


ROW_BLOCK_BYTES = 64 << 20


# ----------------------------------------------------------------------------- rank files

def rank_slices(sources: dict[str, TensorSource], cfg: ModelConfig, size: int) -> list[dict[str, TensorSource]]:
    """Each of `size` ranks' tensors as Megatron stores them in its mp_rank_XX file: kaki's split,
    with the row-parallel biases on every rank and the vocabulary in equal blocks (Megatron pads
    it to a multiple of 128 x the tensor-parallel size)."""
    if size == 1:
        return [sources]
    if cfg.vocab_size % size:
        raise KakiError(f"the vocabulary ({cfg.vocab_size} rows) does not divide by --tensor-parallel {size}, as "
                        "Megatron's split needs; pick a size that divides it")
    out = []
    for rank in range(size):
        tp = TensorParallel(rank, size)
        local_config(cfg, tp)  # says what does not divide
        mine = {}
        for key, src in sources.items():
            how, dim = placement(key, len(src.shape))
            if how in ("split", "vocab"):
                mine[key] = slice_source(src, dim, *tp.span(src.shape[dim]))
            else:
                mine[key] = src
        out.append(mine)
    return out



class PartedSource(TensorSource):
    """One tensor stored as consecutive parts along `dim` (a Megatron release's mp_rank_XX files):
    reading a range reads only the parts it overlaps, so a rank of the same tensor-parallel size
    reads only its own file."""

    def __init__(self, parts: list[TensorSource], dim: int, name: str | None):
        self.parts, self.dim = parts, dim
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + p.shape[dim])
        shape = list(parts[0].shape)
        shape[dim] = self.starts[-1]
        super().__init__(tuple(shape), parts[0].dtype, self._load, parts[0].origin, self._rows, name=name)

    def _load(self) -> torch.Tensor:
        return torch.cat([p.load() for p in self.parts], dim=self.dim)

    def _rows(self, a: int, b: int) -> torch.Tensor:
        if self.dim != 0:
            return torch.cat([p.rows(a, b) for p in self.parts], dim=self.dim)
        return torch.cat([p.rows(max(a, s) - s, min(b, s + p.shape[0]) - s)
                          for p, s in zip(self.parts, self.starts) if s < b and s + p.shape[0] > a])

    def narrow(self, lo: int, hi: int) -> TensorSource:
        pieces = []
        for p, s in zip(self.parts, self.starts):
            a, b = max(lo, s), min(hi, s + p.shape[self.dim])
            if a < b:
                pieces.append(p if (a, b) == (s, s + p.shape[self.dim]) else slice_source(p, self.dim, a - s, b - s))
        return pieces[0] if len(pieces) == 1 else PartedSource(pieces, self.dim, self.name)


def join_ranks(ranks: list[dict[str, TensorSource]], where: str) -> dict[str, TensorSource]:
    """The whole model's sources from each tensor-parallel rank's (Megatron's split, which is
    kaki's: `placement`); replicated tensors, row-parallel biases among them, are read from rank 0."""
    names = list(ranks[0])
    for i, r in enumerate(ranks[1:], 1):
        if set(r) != set(names):
            odd = sorted(set(r) ^ set(names))
            raise CheckpointError(f"{where}: mp_rank_{i:02d} holds other tensors than mp_rank_00 "
                                  f"({', '.join(odd[:4])}); the release's rank folders do not belong together")
    out = {}
    for key in names:
        parts = [r[key] for r in ranks]
        how, dim = placement(key, len(parts[0].shape))
        if how in ("whole", "first"):
            out[key] = parts[0]
            continue
        other = [tuple(s for j, s in enumerate(p.shape) if j != dim) for p in parts]
        if len(set(other)) > 1 or len({p.dtype for p in parts}) > 1:
            shapes = ", ".join(str(list(p.shape)) for p in parts)
            raise CheckpointError(f"{where}: the ranks' parts of {key} do not fit together ({shapes}); "
                                  "the release is damaged: extract it again")
        out[key] = PartedSource(parts, dim, key)
    return out
