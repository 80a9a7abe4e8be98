"""The linear-layer products for inference on CPUs: F.linear and the small-M alternatives.

`F.linear` is right almost everywhere; two cases are not:
- 1-8 rows (decode steps of a batch, speculative verification) times a large weight: the best way
  to multiply differs by CPU (on an AVX2-only Zen 2 a 4096x16384 fp32 layer took 57 ms at 4-8
  rows with F.linear but 25 ms as `(W @ x.T).T`; on the AVX-512 machine of BENCHMARKS.md F.linear
  was already good at 8 rows). So each kaki `Linear` carries a `small_m` plan, one product per row
  count, that kaki.small_m chooses by timing PRODUCTS on this CPU; without a plan it is F.linear.
- bf16 on a CPU without native bf16 (no AVX512-BF16/AMX, e.g. Zen 2): bf16 GEMMs run at ~16
  GFLOP/s against fp32's ~144, so prompts (many rows) are computed in fp32 from upcast weights.
Training (grad enabled) and CUDA always take plain `F.linear`. KAKI_PLAIN_LINEAR=1 turns both off.

Every product here computes each output element as one dot product of a weight row and an input
row, so they agree with F.linear up to the order of the float additions.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from kaki import native

SMALL_M_MAX_ROWS = 8  # row counts up to this follow a layer's small-M plan; more is a prompt: F.linear
UPCAST_MIN_ROWS = 16


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX); without them bf16 GEMMs run several times slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


@functools.lru_cache(maxsize=1)
def _slow_bf16() -> bool:
    return not cpu_has_fast_bf16()


@functools.lru_cache(maxsize=None)
def note_slow_bf16(auto: torch.dtype) -> None:
    """Said once per process (lru_cache) when bfloat16 is asked for on a CPU without native bf16;
    `auto` is what --dtype auto would have picked."""
    pick = str(auto).removeprefix("torch.")
    logger.info("note: this CPU has no native bf16 (no AVX512-BF16 or AMX): bfloat16 matmuls run several "
                "times slower than float32 here (kaki computes prompts in float32 from upcast weights); "
                f"--dtype auto would pick {pick}" + (" (float32 does not fit in memory)" if pick != "float32" else ""))


def _enabled() -> bool:
    return os.environ.get("KAKI_PLAIN_LINEAR", "") in ("", "0")


# ----------------------------------------------------------------------------- this thread's cores


@functools.lru_cache(maxsize=1)
def _thread_knobs():
    """(omp_get_max_threads, omp_set_num_threads, MKL's set_num_threads_local) of torch's own
    libraries, or None where they cannot be found. Both setters act on the calling thread only:
    OpenMP's thread count is a per-thread setting (torch.set_num_threads also writes a process-wide
    default that threads started later copy, which is what one_thread_here must not touch). MKL's
    C entry is MKL_Set_Num_Threads_Local; the lower-case name is its Fortran one (takes a pointer)."""
    try:
        lib = ctypes.CDLL(str(next((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*"))))
        get, set_, mkl = lib.omp_get_max_threads, lib.omp_set_num_threads, lib.MKL_Set_Num_Threads_Local
    except (OSError, StopIteration, AttributeError):
        return None
    get.restype, set_.restype, mkl.restype = ctypes.c_int, None, ctypes.c_int
    set_.argtypes = mkl.argtypes = [ctypes.c_int]
    return get, set_, mkl


@contextlib.contextmanager
def one_thread_here():
    """Run torch's ops in this thread on one core (its OpenMP team and MKL), without changing
    the thread count of any other thread or of threads started meanwhile. Where torch's libraries
    do not expose the per-thread setters, nothing changes."""
    knobs = _thread_knobs()
    if knobs is None:
        yield
        return
    get, set_, mkl = knobs
    torch.get_num_threads()  # torch sets a thread's count on its first op: let that happen before ours
    before = get()
    set_(1)
    mkl_before = mkl(1)
    try:
        yield
    finally:
        mkl(mkl_before)  # 0: this thread had no MKL setting of its own and follows OpenMP's again
        set_(before)


# ----------------------------------------------------------------------------- small-M products


def mm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(W @ x.T).T: the same product as a GEMM whose long side is the weight's rows, which MKL
    blocks and threads like a prompt's GEMM rather than like a batch of GEMVs."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    y = torch.addmm(bias[:, None], weight, x2.T) if bias is not None else torch.mm(weight, x2.T)  # (N, M)
    return y.T.contiguous().view(*x.shape[:-1], weight.shape[0])


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    # The helpers compute on one core each: an OpenMP team of their own would compete with the
    # other parts for the same cores.
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kaki-gemv", initializer=_helper_on_one_core)


def _helper_on_one_core() -> None:
    knobs = _thread_knobs()
    if knobs is not None:
        torch.get_num_threads()
        knobs[1](1)
        knobs[2](1)


def split_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """The weight's rows split into `parts` blocks, one F.linear each, concurrently: this thread
    takes the first (on one core), helper threads the rest. MKL runs a GEMV on one core, so at one
    row this streams the weight on `parts` cores (1.7-1.8x for one large layer, BENCHMARKS.md)."""
    if parts < 2:
        return F.linear(x, weight, bias)
    n = weight.shape[0]
    bounds = [n * i // parts for i in range(parts + 1)]
    chunks = [(weight[a:b], bias[a:b] if bias is not None else None) for a, b in zip(bounds, bounds[1:])]
    futures = [_pool(parts - 1).submit(F.linear, x, w, b) for w, b in chunks[1:]]
    with one_thread_here():
        first = F.linear(x, *chunks[0])
    return torch.cat([first] + [f.result() for f in futures], dim=-1)


def native_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """kaki's own small-M product (kaki.native.f32_rows: the weight streamed once for all the
    rows, on `parts` OpenMP threads of its own, also inside one-core steps); F.linear for other
    dtypes."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    return native.f32_rows(x, weight, bias, threads=parts)


def products(parts: int) -> dict[str, Callable]:
    """The small-M candidates by name, `split` over `parts` threads (kaki.small_m.PATHS), and
    `native` where kaki's native library builds on this machine (kaki.native)."""
    out = {"linear": F.linear, "mm": mm_rows, "split": functools.partial(split_rows, parts=parts)}
    if native.variant() is not None:
        out["native"] = functools.partial(native_rows, parts=parts)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           plan: tuple[Callable, ...] | None = None) -> torch.Tensor:
    """x @ weight.T + bias; `plan[rows]` is the product for `rows` rows (see kaki.small_m)."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or not _enabled():
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if plan is not None and rows < len(plan):
        return plan[rows](x, weight, bias)
    if weight.dtype == torch.bfloat16 and rows >= UPCAST_MIN_ROWS and _slow_bf16():
        b = bias.float() if bias is not None else None
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear with kaki's kernel choice; same parameters and state-dict names."""

    small_m: tuple[Callable, ...] | None = None  # set per model by kaki.small_m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.small_m)
