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
from kaki.tp.group import TensorParallel

_PARTS = r"(weight|bias|weight_scale|weight_zero)"
COLUMN = re.compile(r"\.(self_attn\.(query_key_value|q_proj|k_proj|v_proj)|mlp\.(dense_h_to_4h|gate_proj))\."
                    + _PARTS + "$")
ROW = re.compile(r"\.(self_attn\.dense|mlp\.dense_4h_to_h)\." + _PARTS + "$")
VOCAB = re.compile(r"^(model\.embed_tokens|lm_head)\." + _PARTS + "$")

# Module names (kaki's) of the column- and row-parallel layers, for adapters (kaki.tp.lora).
COLUMN_MODULE = re.compile(COLUMN.pattern.replace(r"\." + _PARTS + "$", "$"))
ROW_MODULE = re.compile(ROW.pattern.replace(r"\." + _PARTS + "$", "$"))


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
            raise ValueError(f"{key} has {n} along dim {dim}, which does not split over {tp.world} ranks")
        out[key] = slice_source(src, dim, lo, hi)
    return out


def slice_source(src: TensorSource, dim: int, lo: int, hi: int) -> TensorSource:
    """A source for src[lo:hi] along `dim` that reads no more of the file than it must: rows
    through the source's row reader (safetensors reads just those bytes), columns block by block."""
    shape = list(src.shape)
    shape[dim] = hi - lo
    if dim == 0:
        def rows(a: int, b: int) -> torch.Tensor:
            return src.rows(lo + a, lo + b).contiguous()
    else:
        def rows(a: int, b: int) -> torch.Tensor:
            return src.rows(a, b).narrow(dim, lo, hi - lo).contiguous()

    # A column slice reads whole source rows: in blocks of at most ROW_BLOCK_BYTES of them.
    src_row_bytes = max(1, math.prod(src.shape[1:]) * (src.dtype.itemsize if src.dtype else 4))
    step = shape[0] if dim == 0 or len(shape) < 2 else max(1, ROW_BLOCK_BYTES // src_row_bytes)

    def load() -> torch.Tensor:
        if step >= shape[0]:
            return rows(0, shape[0])
        blocks = [rows(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]
        return torch.cat(blocks)

    return TensorSource(tuple(shape), src.dtype, load, src.origin, rows, name=src.name)


ROW_BLOCK_BYTES = 64 << 20
