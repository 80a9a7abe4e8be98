"""int8 weights: symmetric, one scale per output channel, and the linear layer that runs them.

Kernels, measured (docs/quantization.md has the tables):
- CPU: fbgemm's dynamic-activation int8 GEMM (`quantized.linear_prepack` + `linear_dynamic`, what
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
~0.7% relative error per layer, and on the demo model greedy answers then differed from the
float model's on 20% of the eval questions (8% with float activations). So each call quantizes
the activations itself (`_two_row_int8`): row block 1 is x rounded to 8 bits, row block 2 the
rounding residual magnified 128x (into the same range, so one scale and zero point serve both),
and one int8 GEMM over the 2M rows gives y = W x1 + W r. The weight is still streamed once: at
decode (1-8 rows) the second row block is nearly free (memory-bound), for prompts it doubles the
int8 compute. The error drops ~60x, to about what bf16 weights give. Without VNNI (AVX512-VNNI /
AVX-VNNI) fbgemm's int16 intermediate sums can saturate, so activations use 7 bits there, as
`quantize_dynamic`'s `reduce_range` does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127  # symmetric: -128 is never used, so -w and w quantize to opposite values


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


# fbgemm: two-row 15-bit activations (the default); fbgemm-8bit: quantize_dynamic's single row.
KERNELS = ("fbgemm", "fbgemm-8bit", "onednn", "weight-only")


@functools.lru_cache(maxsize=1)
def cpu_kernel() -> str:
    """fbgemm where PyTorch has it (x86); weight-only elsewhere. KAKI_INT8_KERNEL overrides."""
    forced = os.environ.get("KAKI_INT8_KERNEL", "")
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"KAKI_INT8_KERNEL must be one of {', '.join(KERNELS)}, not {forced!r}")
        return forced
    return "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "weight-only"


@functools.lru_cache(maxsize=1)
def reduce_range() -> bool:
    """7-bit activations unless the CPU has VNNI (see the module docstring)."""
    try:
        return not torch.cpu._is_vnni_supported()
    except AttributeError:
        return True


@contextlib.contextmanager
def _engine(name: str):
    old = torch.backends.quantized.engine
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
        with _engine(engine):
            return torch.ops.quantized.linear_prepack(qw, None)


def _two_row_int8(x: torch.Tensor, packed, rowsum: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 -> x @ W.T with ~15-bit activations, through one int8 GEMM of 2M rows."""
    qmax = 127 if reduce_range() else 255
    M, K = x.shape
    lo, hi = torch.aminmax(x)
    lo, hi = min(lo.item(), 0.0), max(hi.item(), 0.0)  # the range holds 0, as fbgemm's own does
    scale = (hi - lo) / qmax or 1.0
    zero = min(max(round(-lo / scale), 0), qmax)
    rows = torch.empty(2 * M, K)
    x1, r = rows[:M], rows[M:]
    torch.div(x, scale, out=x1).round_().clamp_(-zero, qmax - zero).mul_(scale)  # exactly on the grid
    # The residual |x - x1| <= scale/2, magnified by gain (<= qmax, so it spans at most the range)
    # and centred in it; the centre's contribution, center * rowsum(W), is taken off afterwards.
    gain = 128.0 if qmax == 255 else 64.0
    center = (lo + hi) / 2
    torch.sub(x, x1, out=r).mul_(gain).add_(center)
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(rows, scale, zero, packed)
    return torch.add(y[:M], y[M:], alpha=1 / gain).sub_(rowsum, alpha=center / gain)


def _unpack(packed) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw, _ = torch.ops.quantized.linear_unpack(packed)
        return qw.int_repr()


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear with int8 weights. State dict: `weight` (int8 [N, K]),
    `weight_scale` (float32 [N]) and `bias` (model dtype), the layout of a saved checkpoint.

    Built empty (on the meta device when loading), filled by `set_quantized` or `set_float`, then
    the weight lives in the kernel's own form (fbgemm's packed matrix on CPU: no second copy)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None
        self.kernel = "none"
        self._packed = None
        self._rowsum = None

    def set_float(self, w: torch.Tensor, device: torch.device, keep_plain: bool = False) -> None:
        self.set_quantized(*quantize(w.to(device)), keep_plain=keep_plain)

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, keep_plain: bool = False) -> None:
        """Take (int8 [N, K], scale [N]) as they are and pick the kernel for their device;
        `keep_plain` skips packing (for converting: the plain tensors are what gets saved)."""
        if q.shape != (self.out_features, self.in_features) or q.dtype != torch.int8:
            raise ValueError(f"int8 weight must be int8 {[self.out_features, self.in_features]}, "
                             f"got {q.dtype} {list(q.shape)}")
        self.weight_scale = scale.float().contiguous()
        self.weight = q.contiguous()
        self._packed = None
        self.kernel = "weight-only"
        if keep_plain or q.device.type != "cpu":
            return
        kernel = cpu_kernel()
        if kernel != "weight-only":
            try:
                self._packed = _prepack(self.weight, self.weight_scale, kernel.removesuffix("-8bit"))
            except (RuntimeError, AttributeError):
                return  # this PyTorch cannot pack (no fbgemm, or the op is gone): weight-only
            self.kernel = kernel
            # Row sums of W, for the residual rows' centring (see _two_row_int8).
            self._rowsum = q.float().sum(dim=1).mul_(self.weight_scale)
            # The packed matrix is the only copy; the buffer keeps its shape for state_dict.
            self.weight = torch.empty(0, dtype=torch.int8)

    def int8_weight(self) -> torch.Tensor:
        return _unpack(self._packed) if self._packed is not None else self.weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.int8_weight()
        destination[prefix + "weight_scale"] = self.weight_scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.int8_weight(), self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm":
            x2 = x.reshape(-1, self.in_features).float()
            y = _two_row_int8(x2, self._packed, self._rowsum).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        elif self._packed is not None:  # fbgemm-8bit, onednn: the dynamic op as it is (8-bit activations)
            y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, reduce_range()).to(x.dtype)
        else:
            # gpt-fast's weight-only form: the scale applies per output, after the product.
            y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")
