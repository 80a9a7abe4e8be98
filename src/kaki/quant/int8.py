"""int8 weights: symmetric, one scale per output channel, and the linear layer that runs them.

Kernels, measured (docs/quantization.md has the tables):
- CPU: fbgemm's dynamic-activation int8 GEMM (`quantized.linear_prepack` + `linear_dynamic`, what
  `torch.ao.quantization.quantize_dynamic` runs): each call quantizes the activations per tensor
  to uint8 and multiplies int8 x int8 into int32. At 1-8 rows it streams the int8 weight near
  memory bandwidth, ~4x fp32 `F.linear` on both the AVX2 and the AVX512 machines we measured, and
  it stays fast for prompts. oneDNN's version of the same op was 10-20% faster at one row on
  AVX512 but keeps a second, unpacked copy of every weight (2x the memory), and PyTorch's
  weight-only `_weight_int8pack_mm` is as fast at 1-4 rows but 4-10x slower at 8-32, so neither
  is the default (`KAKI_INT8_KERNEL=onednn|weight-only` picks them, for measuring).
- CUDA (and anywhere fbgemm is missing): weight-only, gpt-fast style: `F.linear(x, W.to(x.dtype))
  * scale`; on a GPU the cast fuses into the GEMV under torch.compile and costs little without.
The activations' dynamic quantization adds error of its own (~1% relative per layer against the
weight-only product); on CPUs with VNNI (AVX512-VNNI / AVX-VNNI) fbgemm accumulates without int16
saturation, so activations keep all 8 bits; without VNNI they are reduced to 7 bits
(`reduce_range`), exactly as `quantize_dynamic` does there.
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


@functools.lru_cache(maxsize=1)
def cpu_kernel() -> str:
    """fbgemm where PyTorch has it (x86); weight-only elsewhere. KAKI_INT8_KERNEL overrides."""
    forced = os.environ.get("KAKI_INT8_KERNEL", "")
    if forced:
        if forced not in ("fbgemm", "onednn", "weight-only"):
            raise ValueError(f"KAKI_INT8_KERNEL must be fbgemm, onednn or weight-only, not {forced!r}")
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
        if kernel in ("fbgemm", "onednn"):
            try:
                self._packed = _prepack(self.weight, self.weight_scale, kernel)
            except (RuntimeError, AttributeError):
                return  # this PyTorch cannot pack (no fbgemm, or the op is gone): weight-only
            self.kernel = kernel
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
        if self._packed is not None:
            y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, reduce_range())
            y = y.to(x.dtype)
        else:
            # gpt-fast's weight-only form: the scale applies per output, after the product.
            y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")
