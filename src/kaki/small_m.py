"""Small-M products: how a model multiplies 1-8 rows (a batch's decode step, speculative drafts
being verified) by its large weights, chosen once per model by timing the candidates on this CPU.

Why measure: the best way differs by CPU. On an AVX2-only Zen 2 a 4096x16384 fp32 layer took
12.8 ms at 1 row with F.linear but 58 ms at 4 rows, where (W @ x.T).T took 14.3 and 24.9 ms; on
the AVX-512 machine of BENCHMARKS.md F.linear was already good at 8 rows, and splitting a GEMV's
rows over both cores was 1.7x at one row.

Candidates (PATHS; the products are kaki.kernels.products):
- "linear": F.linear.
- "mm": (W @ x.T).T, a GEMM whose long side is the weight's rows.
- "split": the weight's rows split over torch's threads, concurrently (MKL's GEMV uses one core).
- "native": kaki's own C product (kaki.native.f32_rows, fp32 only, where the native library
  builds): the weight streamed once for all the rows, on its own threads. MKL packs the weight
  for a GEMM of 2+ rows, so there 2 rows cost twice 1 (8192x2048 on the AVX-512 machine: 2.9 ms at
  1 row, 5.9 at 2 split, 6.1 at 4), which is what verifying speculative drafts and batched decode run.
One-core steps: at 1-4 rows, where fp32 weights of 16 MB or more are most of a model's timed
bytes (and there are 2+ threads), the whole forward pass runs this thread's torch ops on one core
(kernels.one_thread_here), and every candidate is timed that way: between layers torch's own
OpenMP worker would otherwise spin on a core the split needs (a decode step went from 6.1 to 4.0
tok/s with it spinning, BENCHMARKS.md), and timing single layers does not show that. Row counts
where timing chose split for most of the bytes run on one core too. That setting is per thread
and per forward: other threads, and other models in the process, keep theirs.

When: at a model's first inference forward on a CPU (CausalLM.forward calls `step`), for each
distinct weight shape of its kaki Linear layers of at least TUNE_MIN_NUMEL elements, at 1, 2, 4
and 8 rows: each candidate once to warm up, then ROUNDS rounds that call every candidate once in
turn (the order rotated each round), and the median per candidate. A candidate replaces the
baseline only when it is MIN_GAIN faster: F.linear, or in one-core steps (below) split for fp32
weights of 16 MB or more, which another path must beat by SPLIT_KEEP_GAIN (`baseline`: its gain
is in whole steps, which timing one layer does not see).
Weights over TIME_MAX_BYTES are timed on their first rows (it is the cost per row that differs).
No shape is started after TUNE_BUDGET_S of a model's timing (largest bytes first); shapes left
run F.linear and are timed at a later load. Rows 3 take 4's choice, 5-7 take 8's; a row count
above 8 is a prompt, and runs F.linear.

Cache: $KAKI_CACHE_DIR (default ~/.cache/kaki)/small_m.json, one entry per CPU model, torch
dispatch level and version, dtype, thread count, weight shape and one-core buckets, rewritten
atomically. It holds
only names from PATHS: anything else in it is ignored. KAKI_SMALL_M_RETUNE=1 times every shape
again and overwrites its entries; KAKI_SMALL_M=linear|mm|split|native uses one path for every layer,
whatever its size, without timing (auto, the default, times).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from kaki import cpu, kernels
from kaki.errors import KakiError
from kaki.files import write_file_atomically
from kaki.paths import cache_root

PATHS = ("linear", "mm", "split", "native")
CHOICES = ("auto", *PATHS)
BUCKETS = (1, 2, 4, 8)
TUNE_MIN_NUMEL = 1 << 20  # 4 MB in fp32: under it a product is microseconds and any path will do
TIME_MAX_BYTES = 64 << 20
TUNE_BUDGET_S = 4.0
ROUNDS = 3
MIN_GAIN = 1.05  # ties and noise keep the baseline
SPLIT_BASELINE_ROWS = 4  # the rows and sizes split was measured to pay at in whole decode steps
SPLIT_BASELINE_NUMEL = 1 << 22
# What a path must gain on split, in one-core steps, timed alone: split's own gain is in the whole
# step (6.1 against 4.0 tok/s, ~1.5x), which a layer timed alone does not show; on two loaded
# cores such timings picked one-core F.linear and batch-1 decode fell from 7.9 to 3.5 tok/s.
SPLIT_KEEP_GAIN = 1.5
CACHE_NAME = "small_m.json"
CACHE_VERSION = 5  # 2: choices made against `baseline`; 3: one-core buckets in the key; 4: SPLIT_KEEP_GAIN;
# 5: the native candidate
MAX_CACHE_BYTES = 1 << 20


def forced() -> str | None:
    """KAKI_SMALL_M's path, or None for auto (timed)."""
    value = os.environ.get("KAKI_SMALL_M", "") or "auto"
    if value not in CHOICES:
        raise KakiError(f"KAKI_SMALL_M must be one of {', '.join(CHOICES)}, not {value!r}")
    return None if value == "auto" else value


def retune() -> bool:
    return os.environ.get("KAKI_SMALL_M_RETUNE", "") not in ("", "0")


def bucket(rows: int) -> int:
    return next(b for b in BUCKETS if b >= rows)


# ----------------------------------------------------------------------------- timing


def measure(calls: dict[str, Callable[[], object]], clock: Callable[[], float] = time.perf_counter,
            rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds per call of each of `calls`: one warm-up call each, then `rounds` rounds
    that call each once, in an order rotated every round (so none always follows the same one)."""
    names = list(calls)
    for f in calls.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = clock()
            calls[n]()
            times[n].append(clock() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def baseline(weight: torch.Tensor, rows: int, parts: int) -> str:
    """The path a product keeps, in a one-core bucket, unless another is faster by MIN_GAIN (by
    SPLIT_KEEP_GAIN for split): split
    for a large fp32 weight with 2+ threads, else F.linear. Split's gain is in whole decode steps:
    timed alone it can look no faster than F.linear, while the ~1B benchmark model's batch-1
    decode ran at 6.1 tok/s with it against 4.3 without (BENCHMARKS.md; a 4-layer slice of it on
    two loaded cores 5.5-6.8 against 2.6, 2026-12-03). So timing one layer replaces it only when
    it is clearly slower."""
    large = weight.dtype == torch.float32 and weight.numel() >= SPLIT_BASELINE_NUMEL
    return "split" if rows <= SPLIT_BASELINE_ROWS and parts > 1 and large else "linear"


def one_core_buckets(shapes: dict[tuple, int], threads: int, force: str | None = None) -> frozenset[int]:
    """The row buckets whose forward passes run this thread on one core (module docstring), for
    a model with `shapes` {(N, K, dtype): layer count}: those split is the baseline for, where
    large fp32 weights are most of the model's timed bytes (or all of them with KAKI_SMALL_M=split;
    none with another forced path). Decided by the model, before any timing, so that every
    candidate is timed as it will run."""
    if threads < 2 or force not in (None, "split"):
        return frozenset()
    small = [b for b in BUCKETS if b <= SPLIT_BASELINE_ROWS]
    if force == "split":
        return frozenset(small)
    size = {s: s[0] * s[1] * n for s, n in shapes.items()}
    large = sum(v for s, v in size.items() if s[2] == torch.float32 and s[0] * s[1] >= SPLIT_BASELINE_NUMEL)
    return frozenset(small) if 2 * large > sum(size.values()) else frozenset()


def choose(weight: torch.Tensor, bias: torch.Tensor | None, parts: int,
           clock: Callable[[], float] = time.perf_counter, candidates: dict[str, Callable] | None = None,
           one_core: frozenset[int] = frozenset()) -> dict:
    """Time `candidates` (default: kernels.products(parts), split only with 2+ threads) for
    `weight` at each of BUCKETS rows, those in `one_core` with this thread on one core (as such
    steps run). Returns {"paths": {"1": name, ...}, "ms": {"1": {name: ms}}}."""
    if candidates is None:
        candidates = {n: f for n, f in kernels.products(parts).items()
                      if (n != "split" or parts > 1) and (n != "native" or weight.dtype == torch.float32)}
    K = weight.shape[1]
    n = max(1, min(weight.shape[0], TIME_MAX_BYTES // (K * weight.element_size())))
    w, b = weight[:n], bias[:n] if bias is not None else None
    g = torch.Generator().manual_seed(0)
    paths, ms = {}, {}
    with torch.inference_mode():
        for m in BUCKETS:
            x = torch.randn(m, K, generator=g).to(weight.dtype)
            with kernels.one_thread_here() if m in one_core else contextlib.nullcontext():
                med = measure({name: functools.partial(f, x, w, b) for name, f in candidates.items()}, clock)
            best = min(med, key=lambda name: (med[name], list(candidates).index(name)))
            keep = baseline(weight, m, parts) if m in one_core else "linear"
            keep = keep if keep in med else "linear"
            if keep in med and med[keep] <= (SPLIT_KEEP_GAIN if keep == "split" else MIN_GAIN) * med[best]:
                best = keep
            paths[str(m)], ms[str(m)] = best, {name: round(t * 1e3, 3) for name, t in med.items()}
    return {"paths": paths, "ms": ms}


# ----------------------------------------------------------------------------- cache


def cache_file() -> Path:
    return cache_root() / CACHE_NAME


def cache_key(shape: tuple[int, int], dtype: torch.dtype, threads: int, one_core: frozenset[int] = frozenset()) -> str:
    return " | ".join([cpu.model_name(), cpu.capability(), f"torch {torch.__version__}",
                       str(dtype).removeprefix("torch."), f"{threads} threads", f"{shape[0]}x{shape[1]}",
                       "one-core rows " + (",".join(map(str, sorted(one_core))) or "none")])


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("paths"), dict)
            and set(entry["paths"]) == {str(b) for b in BUCKETS} and all(p in PATHS for p in entry["paths"].values()))


def read_cache() -> dict[str, dict]:
    """The cache's valid entries; a missing, oversized or unreadable file is an empty cache."""
    path = cache_file()
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            raise ValueError(f"over {MAX_CACHE_BYTES} bytes")
        raw = json.loads(path.read_text())
        entries = raw["entries"] if raw.get("version") == CACHE_VERSION else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        logger.debug("ignoring {} ({}): small-M products are timed again", path, str(e)[:200])
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and _valid(v)} if isinstance(entries, dict) else {}


def write_cache(new: dict[str, dict]) -> None:
    """Add `new` entries to the cache file, written whole to a temporary file and renamed over
    it, so a concurrent reader sees the old file or the new one. Failing to write only logs."""
    path = cache_file()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        entries = {**read_cache(), **new}
        write_file_atomically(path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1,
                                               sort_keys=True), fsync=False)
    except OSError as e:
        logger.warning("could not write {} ({}): small-M products will be timed again next time", path, e)


# ----------------------------------------------------------------------------- per model


@dataclass
class Plan:
    key: tuple  # (threads, forced): a plan holds while these do
    paths: dict = field(default_factory=dict)  # (N, K, dtype) -> {bucket: path}
    one_thread_rows: frozenset = frozenset()
    source: str = ""

    def describe(self) -> str:
        if not self.paths:
            return "F.linear (no layer large enough to time)"
        return "; ".join(f"{n}x{k} {str(dt).removeprefix('torch.')}: " + ", ".join(f"{b} {p}" for b, p in ps.items())
                         for (n, k, dt), ps in self.paths.items())


_LOCK = threading.Lock()


def _layers(model: nn.Module) -> list[kernels.Linear]:
    return [m for m in model.modules() if isinstance(m, kernels.Linear)]


def groups(layers: list[nn.Module], min_numel: int = TUNE_MIN_NUMEL) -> dict[tuple, list]:
    """`layers` of at least `min_numel` weights by (N, K, dtype), most weight bytes first."""
    out: dict[tuple, list] = {}
    for m in layers:
        if m.weight.numel() >= min_numel:
            out.setdefault((*m.weight.shape, m.weight.dtype), []).append(m)
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0].weight.numel() * len(kv[1])))


def _build(model: nn.Module, threads: int, force: str | None, clock: Callable[[], float]) -> Plan:
    layers = _layers(model)
    plan = Plan((threads, force))
    for m in layers:
        m.small_m = None
    if not layers or layers[0].weight.device.type != "cpu":
        return plan
    products = kernels.products(threads)
    one_core = one_core_buckets({s: len(ms) for s, ms in groups(layers).items()}, threads, force)
    if force == "native" and "native" not in products:
        raise KakiError("KAKI_SMALL_M=native needs kaki's native library, which is not available here "
                        "(`kaki info` says why); use linear, mm or split")
    if force is not None:
        shapes = groups(layers, 0)
        chosen = {s: {b: force for b in BUCKETS} for s in shapes}
        plan.source = "KAKI_SMALL_M"
    else:
        shapes = groups(layers)
        chosen, new, cached = {}, {}, read_cache() if not retune() else {}
        start, left = clock(), 0
        for (n, k, dtype), members in shapes.items():
            key = cache_key((n, k), dtype, threads, one_core)
            if key in cached:
                entry = cached[key]
            elif clock() - start < TUNE_BUDGET_S:  # no shape is started after the budget
                entry = new[key] = choose(members[0].weight, members[0].bias, threads, clock, one_core=one_core)
            else:
                left += 1
                continue
            chosen[(n, k, dtype)] = {int(b): p for b, p in entry["paths"].items()}
        if new:
            write_cache(new)
        plan.source = ((f"timed in {clock() - start:.1f} s" if new else "cached") + f", {cache_file()}"
                       + (f"; {left} shape(s) left to time at a later load, F.linear until then" if left else ""))
    for s, per_bucket in chosen.items():
        # A path this process cannot run (a cached native choice with KAKI_NO_NATIVE set) is F.linear.
        row_plan = (F.linear, *(products.get(per_bucket[bucket(r)], F.linear)
                                for r in range(1, kernels.SMALL_M_MAX_ROWS + 1)))
        for m in shapes[s]:
            m.small_m = row_plan
    plan.paths = chosen
    # Also one core at row counts where split was chosen for most of the bytes: its helpers then
    # have the other cores (a 4-layer slice of the ~1B benchmark model on two loaded cores, batch 8:
    # 16-23 tok/s against 7.9 without).
    size = {s: s[0] * s[1] * len(shapes[s]) for s in chosen}
    by_split = {b for b in BUCKETS if threads > 1 and
                2 * sum(size[s] for s, pb in chosen.items() if pb[b] == "split") > sum(size.values())}
    plan.one_thread_rows = frozenset(r for r in range(1, kernels.SMALL_M_MAX_ROWS + 1)
                                     if bucket(r) in one_core | by_split)
    return plan


def prepare(model: nn.Module, clock: Callable[[], float] = time.perf_counter) -> Plan:
    """The model's small-M plan for this thread count and KAKI_SMALL_M, made (timed or read from
    the cache) and set on its layers the first time, and again when either changes."""
    key = (torch.get_num_threads(), forced())
    plan = getattr(model, "_kaki_small_m", None)
    if plan is not None and plan.key == key:
        return plan
    with _LOCK:
        plan = getattr(model, "_kaki_small_m", None)
        if plan is None or plan.key != key:
            plan = _build(model, *key, clock)
            model._kaki_small_m = plan
            if plan.paths:
                logger.debug("small-M products ({} threads, {}): {}", key[0], plan.source, plan.describe())
    return plan


def step(model: nn.Module, rows: int):
    """Around one inference forward of `model` over `rows` token positions: its plan made, and
    this thread on one core where split carries the step (module docstring). Training: nothing."""
    if torch.is_grad_enabled():
        return contextlib.nullcontext()
    plan = prepare(model)
    return kernels.one_thread_here() if rows in plan.one_thread_rows else contextlib.nullcontext()
