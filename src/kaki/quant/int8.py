"""int8 weights: symmetric, one scale per output channel, and the linear layer that runs them.

Kernels, measured (docs/quantization.md has the tables):
- x86 CPU with AVX2 (or AVX512-VNNI, or AVX-VNNI): kaki's own (int8_kernel*.c, built on first
  use by kaki.native, in the variant the CPU's flags allow): activations rounded to 16 bits
  per row, integer products in VNNI / vpmaddwd instructions, the result exact in integers; one C
  call per layer, so none of the elementwise torch ops that the fbgemm path below needs around
  its GEMM. On AVX512-VNNI faster than fbgemm at 1-8 rows and as fast for prompts, with ~100x
  less activation error than fbgemm's 8 bits.
- CPU otherwise (or without a C compiler): fbgemm's dynamic-activation int8 GEMM (`quantized.linear_prepack` + `linear_dynamic`, what
  `torch.ao.quantization.quantize_dynamic` runs): each call quantizes the activations per tensor
  to uint8 and multiplies int8 x int8 into int32. At 1-8 rows it streams the int8 weight near
  memory bandwidth, ~4x fp32 `F.linear` on both the AVX2 and the AVX512 machines we measured, and
  it stays fast for prompts. oneDNN's version of the same op was 10-20% faster at one row on
  AVX512 but keeps a second, unpacked copy of every weight (2x the memory), and PyTorch's
  weight-only `_weight_int8pack_mm` is as fast at 1-4 rows but 4-10x slower at 8-32, so neither
  is the default (`KAKI_INT8_KERNEL=fbgemm-8bit|onednn|weight-only` picks the others, for measuring).
- CUDA (and anywhere fbgemm is missing): weight-only, gpt-fast style: `F.linear(x, W.to(x.dtype))
  * scale`; on a GPU the cast fuses into the GEMV under torch.compile and costs little without.
Activations with 15 bits instead of 8: `quantize_dynamic`'s per-tensor 8-bit activations cost
~1% relative error per layer, and on the demo model 6 of 50 greedy answers then differed from the
float model's (1 with float activations; 11 of 50 on a less trained checkpoint). So each call quantizes
the activations itself (`_two_row_int8`): row block 1 is x rounded to 8 bits, row block 2 the
rounding residual magnified 128x (on the same grid, so one scale and zero point serve both),
and one int8 GEMM over the 2M rows gives y = W x1 + W r: the error drops ~60x, and 49 of 50
answers match. The weight is still streamed once, but the GEMM has twice the rows: for prompts
that doubles the int8 arithmetic, at decode it costs less (docs/quantization.md). Without VNNI (AVX512-VNNI /
AVX-VNNI) fbgemm's int16 intermediate sums can saturate, so activations use 7 bits there, as
`quantize_dynamic`'s `reduce_range` does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from kaki.errors import KakiError
from kaki import native

QMAX = 127  # symmetric: -128 is never used, so -w and w quantize to opposite values
# Rows per fbgemm matrix. Packing copies a block twice over (quantized tensor, packed matrix), so
# blocks bound that transient: 67 MB at Persimmon's 4096 inputs, where one 1.07 GB lm_head
# packed whole would need 2-3 GB more at the end of a load. Every layer of Persimmon-8B but the
# lm_head (16 blocks) fits in one.
PACK_ROWS = 16384


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], float32 scale [N]) with w ~ q * scale[:, None]; each row on its own, so a
    matrix quantized in row blocks gives the same bytes as quantized whole."""
    amax = w.abs().amax(dim=1).float()
    # An all-zero row gets scale 1: any scale reproduces it, and 0 would divide by zero.
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    # One float32 temporary, rounded and clamped in place (w itself is never written: it may be
    # a view of a mmapped checkpoint). Dividing bf16 by fp32 computes in fp32.
    q = torch.div(w, scale[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


# native: kaki's own kernel (native.variant() says which build); fbgemm: two-row 15-bit activations; fbgemm-8bit: quantize_dynamic's single row.
KERNELS = ("native", "fbgemm", "fbgemm-8bit", "onednn", "weight-only")


@functools.lru_cache(maxsize=1)
def cpu_kernel() -> str:
    """kaki's own where a variant of it builds (AVX2 or better and a C compiler), else fbgemm where
    PyTorch has it (x86), else weight-only. KAKI_INT8_KERNEL overrides ("native": kaki's, in the
    best variant, or KAKI_INT8_VARIANT's)."""
    forced = os.environ.get("KAKI_INT8_KERNEL", "")
    if forced:
        if forced not in KERNELS:
            raise KakiError(f"KAKI_INT8_KERNEL must be one of {', '.join(KERNELS)}, not {forced!r}")
        if forced == "native" and native.variant() is None:
            raise KakiError("KAKI_INT8_KERNEL=native: kaki's int8 kernel cannot be built here (see the log)")
        return forced
    if native.variant() is not None:
        return "native"
    return "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "weight-only"


@functools.lru_cache(maxsize=1)
def reduce_range() -> bool:
    """7-bit activations unless the CPU has VNNI (see the module docstring)."""
    try:
        return not torch.cpu._is_vnni_supported()
    except AttributeError:
        return True


# `linear_prepack` takes its backend from the process-wide quantized engine. PyTorch's default on
# x86, "x86", packs for fbgemm, as "fbgemm" does (the same packed matrix, the same results), so
# packing for kaki's default fbgemm path reads the engine and never sets it (`_packs_for`). Only
# the onednn kernel (a measuring option, KAKI_INT8_KERNEL=onednn), or a process whose engine was
# set to something else, needs it set for the duration: two models loading in threads of one
# process (e.g. `kaki serve --moderation`) would otherwise interleave set and restore and pack for
# the wrong backend, or leave the other's engine behind. The lock makes each set-pack-restore one
# step among kaki's loaders (code outside kaki that reads the engine meanwhile can still see ours:
# there is no per-thread engine to set instead). The packed result carries its backend, so
# forward passes never need the engine.
_ENGINE_LOCK = threading.RLock()
_SAME_PACKING = {"fbgemm": ("fbgemm", "x86"), "onednn": ("onednn",)}


def _packs_for(name: str) -> bool:
    return torch.backends.quantized.engine in _SAME_PACKING.get(name, (name,))


@contextlib.contextmanager
def _engine(name: str):
    with _ENGINE_LOCK:
        old = torch.backends.quantized.engine
        if old == name:
            yield
            return
        torch.backends.quantized.engine = name
        try:
            yield
        finally:
            torch.backends.quantized.engine = old


def _prepack(q: torch.Tensor, scale: torch.Tensor, engine: str):
    with warnings.catch_warnings():
        # PyTorch marks quantized-tensor constructors deprecated; the packed GEMM they feed is
        # still the fastest int8 path on x86 CPUs. If they go, pack() falls back to weight-only.
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        with _ENGINE_LOCK:  # the check and the packing as one step
            if _packs_for(engine):
                return torch.ops.quantized.linear_prepack(qw, None)
            with _engine(engine):
                return torch.ops.quantized.linear_prepack(qw, None)


@functools.lru_cache(maxsize=1)
def _grid() -> tuple[int, float, int]:
    """(qmax, gain, margin) of the two-row activations: 8-bit rows with a 128x residual, or 7-bit
    rows and 64x without VNNI. The residual is at most gain * scale / 2 = margin steps either side
    of 0, so the zero point stays at least that far from both ends of the grid."""
    qmax = 127 if reduce_range() else 255
    gain = 128.0 if qmax == 255 else 64.0
    return qmax, gain, int(gain) // 2


def _two_row_int8(x: torch.Tensor, packs: list) -> torch.Tensor:
    """x (M, K) float32 -> x @ W.T with ~15-bit activations, through one int8 GEMM of 2M rows
    per packed row block of W: row block 1 is x (rounded to the grid by the GEMM itself), block 2
    the rounding residual magnified `gain` times, on the same grid. At one row the weight is still
    streamed once; what the second row costs is these few elementwise ops, so there are as few as
    possible (each one is microseconds of dispatch against a GEMV of 50-1500)."""
    qmax, gain, margin = _grid()
    M = x.shape[0]
    lo, hi = torch.aminmax(x)
    lo, hi = min(lo.item(), 0.0), max(hi.item(), 0.0)  # the range holds 0, as fbgemm's own does
    # The grid spans [lo, hi] with the zero point in [margin, qmax - margin], so that the residual
    # row fits around 0 (costs nothing for ranges about 0; at most 1/3 bit for one-signed ones).
    scale = max((hi - lo) / qmax, -lo / (qmax - margin), hi / (qmax - margin)) or 1.0
    zero = min(max(round(-lo / scale), margin), qmax - margin)
    # Row block 1 is x itself (the GEMM rounds it to the grid); block 2 is the rounding residual in
    # grid steps, magnified. x never leaves the grid's range, so round() needs no clamp. (Three
    # small ops and a cat: half the time of fake_quantize + sub + mul into a preallocated block.)
    t = torch.mul(x, 1 / scale)
    rows = torch.cat((x, torch.sub(t, torch.round(t)).mul_(gain * scale)))
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    y = op(rows, scale, zero, packs[0]) if len(packs) == 1 else torch.cat([op(rows, scale, zero, p) for p in packs], dim=1)
    return torch.add(y[:M], y[M:], alpha=1 / gain)


def _unpack(packed) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw, _ = torch.ops.quantized.linear_unpack(packed)
        return qw.int_repr()


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear with int8 weights. State dict: `weight` (int8 [N, K]),
    `weight_scale` (float32 [N]) and `bias` (model dtype), the layout of a saved checkpoint.

    Built empty (on the meta device when loading), then filled row block by row block (`start`,
    `add_rows`, `finish`; `set_quantized` does all three): on CPU each block of PACK_ROWS rows
    goes into fbgemm's packed form as soon as it is complete, so neither a whole unpacked matrix
    nor a second copy of it ever exists (Persimmon's lm_head alone is 1.07 GB in int8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None
        self.kernel = "none"
        self._packs: list = []  # fbgemm/oneDNN packed matrices, PACK_ROWS rows each
        self._pack_sizes: list[int] = []
        self._pending: list[torch.Tensor] = []  # rows not packed yet
        self._filled = 0
        self._rowsum: torch.Tensor | None = None  # native kernel: each weight row's sum
        self.variant: str | None = None  # native kernel: which build (kaki.native.VARIANTS)

    def set_float(self, w: torch.Tensor, device: torch.device, keep_plain: bool = False) -> None:
        self.set_quantized(*quantize(w.to(device)), keep_plain=keep_plain)

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, keep_plain: bool = False) -> None:
        """Take (int8 [N, K], scale [N]) as they are; `keep_plain` skips packing (for converting:
        the plain tensors are what gets saved)."""
        self.start(q.device, keep_plain)
        self.add_rows(q, scale)
        self.finish()

    def start(self, device: torch.device, keep_plain: bool = False) -> None:
        """Pick the kernel for `device`; rows follow in order through add_rows."""
        N, K = self.out_features, self.in_features
        self.kernel = "weight-only" if keep_plain or device.type != "cpu" else cpu_kernel()
        if self.kernel == "native" and K > native.MAX_K:
            self.kernel = "fbgemm"
        # Chosen once per layer: a later change of the process's choice leaves built layers alone.
        self.variant = native.variant() if self.kernel == "native" else None
        self.weight_scale = torch.empty(N, dtype=torch.float32, device=device)
        self._packs, self._pack_sizes, self._pending, self._filled = [], [], [], 0
        self._rowsum = None
        if self.kernel in ("weight-only", "native"):
            self.weight = torch.empty(N, K, dtype=torch.int8, device=device)
        else:
            self.weight = torch.empty(0, dtype=torch.int8)  # the packed blocks are the only copy

    def add_rows(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        a, b = self._filled, self._filled + q.shape[0]
        if q.dtype != torch.int8 or q.shape[1:] != (self.in_features,) or b > self.out_features:
            raise ValueError(f"int8 weight must be int8 {[self.out_features, self.in_features]}; rows "
                             f"{a}..{b} of {q.dtype} {list(q.shape)} do not fit")
        self.weight_scale[a:b] = scale
        self._filled = b
        if self.kernel in ("weight-only", "native"):
            self.weight[a:b] = q
            return
        self._pending.append(q)
        while sum(len(p) for p in self._pending) >= PACK_ROWS:
            self._pack(PACK_ROWS)

    def finish(self) -> None:
        if self._filled != self.out_features:
            raise ValueError(f"int8 layer got {self._filled} of its {self.out_features} rows")
        if self.kernel == "native":
            self._rowsum = native.row_sums(self.weight)
        if self._pending:
            self._pack(sum(len(p) for p in self._pending))

    def _pack(self, n: int) -> None:
        block = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        head, rest = block[:n], block[n:]
        self._pending = [rest] if len(rest) else []
        a = sum(self._pack_sizes)
        try:
            self._packs.append(_prepack(head.contiguous(), self.weight_scale[a:a + n], self.kernel.removesuffix("-8bit")))
        except (RuntimeError, AttributeError):
            # This PyTorch cannot pack (no fbgemm, or the op is gone): weight-only from here.
            done = torch.cat([_unpack(p) for p in self._packs] + [block]) if self._packs else block
            self.kernel, self._packs, self._pack_sizes, self._pending = "weight-only", [], [], []
            self.weight = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
            self.weight[:a + len(block)] = done
            return
        self._pack_sizes.append(n)

    def int8_weight(self) -> torch.Tensor:
        if self._packs:
            return torch.cat([_unpack(p) for p in self._packs])
        return self.weight

    def int8_rows(self, rows: int):
        """(first row, int8 [n, K]) blocks of at most `rows` rows from whichever copy the layer
        keeps, so training's backward (kaki.quant.train) never unpacks the whole matrix."""
        if self.weight.shape[0] == self.out_features:
            for a in range(0, self.out_features, rows):
                yield a, self.weight[a:a + rows]
            return
        a = 0
        for p in self._packs:
            q = _unpack(p)
            for i in range(0, len(q), rows):
                yield a + i, q[i:i + rows]
            a += len(q)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.int8_weight()
        destination[prefix + "weight_scale"] = self.weight_scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.int8_weight(), self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if self.kernel == "native":
            # The bias is added inside the kernel (float32; the model's dtype only at the end).
            b = self.bias.float() if self.bias is not None else None
            y = native.int8_linear(x.reshape(-1, self.in_features).float(), self.weight, self.weight_scale,
                                   self._rowsum, b, variant=self.variant)
            return y.reshape(shape).to(x.dtype)
        if self.kernel == "fbgemm":
            y = _two_row_int8(x.reshape(-1, self.in_features).float(), self._packs)
            y = y.reshape(shape).to(x.dtype)
        elif self._packs:  # fbgemm-8bit, onednn: the dynamic op as it is (8-bit activations)
            x2 = x.reshape(-1, self.in_features).float()
            ys = [torch.ops.quantized.linear_dynamic(x2, p, reduce_range()) for p in self._packs]
            y = torch.cat(ys, dim=1).reshape(shape).to(x.dtype)
        else:
            # gpt-fast's weight-only form: the scale applies per output, after the product.
            y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}"
                + (f", variant={self.variant}" if self.variant else ""))
