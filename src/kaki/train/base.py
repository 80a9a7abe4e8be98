"""What a run's options mean before anything loads: the frozen base's storage format and the
sequence length. The trainer and the memory table (`kaki train --dry-run`, kaki.train.memory)
both need them, so they live here rather than in either."""

from __future__ import annotations

import torch

from kaki.checkpoint import DTYPES
from kaki.errors import KakiError
from kaki.quant import as_spec
from kaki.train.options import TrainOptions


def check_base_options(o: TrainOptions) -> None:
    """--dtype and --quantize describe a frozen base: they need --lora, and FSDP (which shards
    float parameters) cannot shard quantized layers."""
    as_spec(o.quantize)  # a malformed --quantize fails here, before anything starts
    if o.quantize and o.fsdp:
        raise KakiError("--fsdp cannot shard a quantized base (its int8/int4 layers are buffers FSDP "
                        "does not shard); drop --fsdp (DDP: each process holds the quantized base) or "
                        "--quantize")
    if (o.quantize or o.dtype not in ("auto", "float32")) and not o.lora:
        raise KakiError(f"--{'quantize' if o.quantize else 'dtype'} sets the frozen base of a LoRA run; "
                        "full fine-tuning trains every weight, and trained weights stay float32 masters "
                        "(use --precision bf16 for bf16 compute, --optimizer adamw8bit on CUDA); add --lora")
    if o.dtype not in ("auto", "float32") and o.fsdp:
        raise KakiError(f"--fsdp shards float32 weights; --dtype {o.dtype} applies to single-process and "
                        "DDP runs")


def base_format(o: TrainOptions):
    """(storage dtype of the frozen base's float weights, QuantSpec or None)."""
    spec = as_spec(o.quantize)
    if o.dtype != "auto":
        return DTYPES[o.dtype], spec
    return (torch.bfloat16 if spec is not None else torch.float32), spec


def seq_len_for(o: TrainOptions, cfg) -> int:
    seq_len = o.seq_len or min(1024, cfg.max_position_embeddings)
    if seq_len > cfg.max_position_embeddings:
        raise KakiError(f"--seq-len {seq_len} is longer than the model's context ({cfg.max_position_embeddings})")
    return seq_len
