"""The linear-layer kernel choice for inference, measured on the CPUs kaki runs on.

`F.linear` is right almost everywhere; two cases are not:
- fp32 at 1-4 rows (batch-1 decode): MKL's GEMV runs on one core only, so splitting the weight's
  rows across threads and running the halves concurrently is 1.7x faster for one large layer
  alone. In a whole decode step it is not reliably so: on a busy 2-core VM it was +13%, on an idle
  one -1% and -15% against plain `F.linear` (the helper thread competes with torch's OpenMP worker
  between layers; benchmarks/decode.py, BENCHMARKS.md), so it is opt-in: KAKI_SPLIT_GEMV=1. Each
  output element is still one dot product over the same inputs, so results do not change.
- bf16 on a CPU without native bf16 (no AVX512-BF16/AMX, e.g. Zen 2): bf16 GEMMs run at ~16
  GFLOP/s against fp32's ~144, so prompts (many rows) are computed in fp32 from upcast weights.
Training (grad enabled) and CUDA always take plain `F.linear`.
"""

from __future__ import annotations

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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.device.type != "cpu" or torch.is_grad_enabled() or not _enabled():
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if weight.dtype == torch.float32:
        threads = torch.get_num_threads()
        if rows <= SPLIT_MAX_ROWS and threads > 1 and weight.numel() >= SPLIT_MIN_NUMEL and _split_enabled():
            return _split_rows(x, weight, bias, threads)
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
