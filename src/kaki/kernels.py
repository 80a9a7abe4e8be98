"""The linear-layer kernel choice for inference, measured on the CPUs kaki runs on.

`F.linear` is right almost everywhere; two cases are not:
- fp32 at 1-4 rows (batch-1 decode): MKL's GEMV runs on one core only, so the large weights' rows
  are split across threads and the halves run concurrently (1.7x for one large layer alone). That
  pays in a whole decode step only when torch's own OpenMP worker is not spinning on the other
  core between layers: so for such steps `decode_threads` runs torch on one thread and gives the
  cores to the split instead (decode 6.1 tok/s against 4.3 for plain `F.linear` on 2 threads and
  4.1 for transformers, BENCHMARKS.md); splitting with torch on two threads was slower than not
  splitting in three of four readings (KAKI_SPLIT_GEMV=1 still forces it everywhere, to measure).
  Each output element is still one dot product over the same inputs, so results do not change.
- bf16 on a CPU without native bf16 (no AVX512-BF16/AMX, e.g. Zen 2): bf16 GEMMs run at ~16
  GFLOP/s against fp32's ~144, so prompts (many rows) are computed in fp32 from upcast weights.
Training (grad enabled) and CUDA always take plain `F.linear`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_MAX_ROWS = 4  # beyond this MKL's GEMM uses every core by itself
SPLIT_MIN_NUMEL = 1 << 22  # under ~16 MB the thread hand-off costs more than it saves
UPCAST_MIN_ROWS = 16


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kaki-gemv")


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX); without them bf16 GEMMs run several times slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


@functools.lru_cache(maxsize=1)
def _slow_bf16() -> bool:
    return not cpu_has_fast_bf16()


def _enabled() -> bool:
    return os.environ.get("KAKI_PLAIN_LINEAR", "") in ("", "0")


def _split_enabled() -> bool:
    return os.environ.get("KAKI_SPLIT_GEMV", "") not in ("", "0")


# Threads for split GEMVs while decode_threads() holds torch at one; 0 outside.
_gemv_parts = 0


@contextlib.contextmanager
def decode_threads(model: nn.Module, rows: int):
    """Around one forward pass of `model` over `rows` token positions: where that is a decode
    step (1-4 rows) of a model with large float32 `Linear`s on a CPU with torch on several threads,
    torch runs on one thread and the large GEMVs are split over the others (module docstring).
    Anything else runs as it is."""
    global _gemv_parts
    threads = torch.get_num_threads()
    if (rows > SPLIT_MAX_ROWS or threads < 2 or _gemv_parts or torch.is_grad_enabled() or not _enabled()
            or not _has_large_fp32_linears(model)):
        yield
        return
    torch.set_num_threads(1)
    _gemv_parts = threads
    try:
        yield
    finally:
        _gemv_parts = 0
        torch.set_num_threads(threads)


def _has_large_fp32_linears(model: nn.Module) -> bool:
    """Cached per model and lm_head dtype (kaki builds models in their final dtype and device)."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    key = (weight.dtype, weight.device.type) if isinstance(weight, torch.Tensor) else None
    cached = getattr(model, "_kaki_split_gemv", None)
    if cached is None or cached[0] != key:
        modules = list(model.modules())
        # Quantized layers (a `kernel` attribute) run their own multi-threaded kernels on torch's
        # threads: a model with any keeps them.
        ok = key is not None and key[1] == "cpu" and not any(hasattr(m, "kernel") for m in modules) and any(
            type(m) is Linear and m.weight.dtype == torch.float32 and m.weight.numel() >= SPLIT_MIN_NUMEL
            for m in modules)
        cached = (key, ok)
        model._kaki_split_gemv = cached
    return cached[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.device.type != "cpu" or torch.is_grad_enabled() or not _enabled():
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if weight.dtype == torch.float32:
        parts = _gemv_parts or (torch.get_num_threads() if _split_enabled() else 0)
        if rows <= SPLIT_MAX_ROWS and parts > 1 and weight.numel() >= SPLIT_MIN_NUMEL:
            return _split_rows(x, weight, bias, parts)
    elif weight.dtype == torch.bfloat16 and rows >= UPCAST_MIN_ROWS and _slow_bf16():
        b = bias.float() if bias is not None else None
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return F.linear(x, weight, bias)


def _split_rows(x, weight, bias, parts: int) -> torch.Tensor:
    n = weight.shape[0]
    bounds = [n * i // parts for i in range(parts + 1)]
    chunks = [(weight[a:b], bias[a:b] if bias is not None else None) for a, b in zip(bounds, bounds[1:])]
    futures = [_pool(parts - 1).submit(F.linear, x, w, b) for w, b in chunks[1:]]
    first = F.linear(x, *chunks[0])
    return torch.cat([first] + [f.result() for f in futures], dim=-1)


class Linear(nn.Linear):
    """nn.Linear with kaki's kernel choice; same parameters and state-dict names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
