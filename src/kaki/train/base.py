"""What a run's options mean before anything loads: the frozen base's storage format, the
sequence length and the micro-batch. The trainer and the memory table (`kaki train --dry-run`,
kaki.train.memory) both need them, so they live here rather than in either."""

from __future__ import annotations

import torch

from kaki.checkpoint import DTYPES
from kaki.errors import KakiError
from kaki.quant import as_spec
from kaki.train.options import TrainOptions

# --batch-size when neither given nor limited by the data (fit_to_data).
DEFAULT_BATCH = 8


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


def fit_to_data(o: TrainOptions, cfg, tokens: list[int], world: int = 1) -> tuple[int, int, str | None]:
    """(seq_len, batch_size, note): --seq-len and --batch-size, each chosen from the data when not
    given, so a small data set does not run 8 x 1024-token sequences a step when it holds one: a
    sequence no longer than the smallest file's tokens (less the one that is only a target), a
    micro-batch no larger than one epoch's sequences allow. `tokens`: training tokens per --data
    file. `note` says what the data decided, for the log (None when the defaults stood)."""
    default_seq = seq_len_for(o, cfg)
    seq = default_seq
    if o.seq_len is None and 1 < min(tokens) <= seq:
        seq = min(tokens) - 1
    batch = o.batch_size
    if batch is None:
        windows = sum((t - 1) // seq for t in tokens if t > 1)
        batch = max(1, min(DEFAULT_BATCH, windows // (o.grad_accum * world)))
    picked = []
    if seq != default_seq:
        picked.append(f"--seq-len {seq}")
    if o.batch_size is None and batch != DEFAULT_BATCH:
        picked.append(f"--batch-size {batch}")
    if not picked:
        return seq, batch, None
    windows = sum((t - 1) // seq for t in tokens if t > 1)
    return seq, batch, (f"{' and '.join(picked)} chosen from the data ({sum(tokens):,} training tokens, "
                        f"{windows} sequence(s) of {seq} per epoch); pass them to override")
