"""Training through a frozen base: gradients reach a layer's input through its quantized (or
lower-precision float) weight without the weight ever being kept for backward.

A frozen linear layer only needs grad_input = grad_out @ W in backward (no weight gradient). PyTorch's
own F.linear would save W, and for a quantized or bf16 layer run in fp32 that is a dequantized or
cast copy the size of the weight, per layer, alive until backward: for Persimmon-8B 36 layers of
~0.8 GB. `FrozenLinear` saves nothing: its forward runs the layer as inference does (the int8 and
int4 kernels), its backward dequantizes the weight again in blocks of rows and accumulates the
product block by block, so at most one block (`BLOCK_ELEMS` weights) exists at a time. An int4
block is dequantized straight from the CPU kernel's blocked layout into one reused buffer, in W^T's
order (which is that layout's own), so backward costs the float GEMM plus a few passes over a 16 MB
buffer rather than an unpacking, a transposing copy and fresh temporaries per block.

The gradient is that of the quantized layer itself (the linear map with the dequantized weight),
which is what the loss was computed with; the int4 kernels round activations to bf16 in forward,
the backward here is in the gradient's own dtype.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from kaki.quant import int4, int8

# Weights dequantized at a time in backward (and cast at a time in a float layer's forward): 16 MB
# in fp32, small next to any layer of a model worth quantizing, large enough for full-speed GEMMs.
BLOCK_ELEMS = 1 << 22
QUANTIZED = (int8.Int8Linear, int4.Int4Linear)


def _rows_per_block(layer) -> int:
    # A multiple of 64: whole blocks of the int4 CPU packing (see Int4Linear.values_t).
    return max(64, BLOCK_ELEMS // layer.in_features // 64 * 64)


def weight_blocks_t(layer: nn.Module, dtype: torch.dtype):
    """(first row a, W[a:a + n].t() as [K, n] in `dtype`) blocks of a frozen linear layer's
    [N, K] weight. Transposed because that is the int4 CPU layout's own order (Int4Linear.values_t),
    so its blocks dequantize in place with no transposing copy; the GEMMs take either orientation
    at the same speed. An int4 block is only valid until the next one (they share one buffer)."""
    rows = _rows_per_block(layer)
    N = layer.out_features
    if isinstance(layer, int8.Int8Linear):
        for a, q in layer.int8_rows(rows):
            yield a, int8.dequantize(q, layer.weight_scale[a:a + len(q)], dtype).t()
    elif isinstance(layer, int4.Int4Linear):
        K, group = layer.in_features, layer.group
        buf = torch.empty(K, min(rows, N), dtype=dtype, device=layer.weight_scale.device)
        for a in range(0, N, rows):
            b = min(a + rows, N)
            wt = layer.values_t(a, b, buf[:, :b - a])
            # int4.dequantize_values' arithmetic, (q - 8) * scale + zero in `dtype`, in place on
            # the [K/group, group, n] view (scale and zero are per row and group of inputs; made
            # contiguous [K/group, n] so the broadcast runs along memory, ~8x faster than strided).
            scale = layer.weight_scale[a:b].t().contiguous().to(dtype)[:, None]
            zero = layer.weight_zero[a:b].t().contiguous().to(dtype)[:, None]
            wt.unflatten(0, (K // group, group)).sub_(8).mul_(scale).add_(zero)
            yield a, wt
    else:
        w = layer.weight
        for a in range(0, N, rows):
            yield a, w[a:a + rows].to(dtype).t()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# Quantized layers whose own forward makes a whole dequantized copy of the weight per call.
WHOLE_COPY_KERNELS = ("dequantize", "weight-only")


def base_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen layer's output: a quantized layer's own kernel where it has one; otherwise (a
    float weight stored in another dtype than the compute's, or a quantized layer without a
    kernel) the weight is cast or dequantized one block of rows at a time (one fp32 copy of
    Persimmon-8B's bf16 lm_head would be 4.3 GB)."""
    if isinstance(layer, QUANTIZED) and layer.kernel not in WHOLE_COPY_KERNELS:
        return type(layer).forward(layer, x)
    dtype = _compute_dtype(x)
    if not isinstance(layer, QUANTIZED) and layer.weight.dtype == dtype:
        return F.linear(x.to(dtype), layer.weight, layer.bias)
    y = x.new_empty(*x.shape[:-1], layer.out_features, dtype=dtype)
    xd = x.to(dtype)
    for a, wt in weight_blocks_t(layer, dtype):
        y[..., a:a + wt.shape[1]] = xd @ wt
    return y + layer.bias.to(dtype) if layer.bias is not None else y


def input_grad(layer: nn.Module, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad @ W, accumulated over blocks of W's rows, in the gradient's dtype; returned in `dtype`
    (the input's)."""
    g = grad.reshape(-1, layer.out_features)
    gx = g.new_zeros(g.shape[0], layer.in_features)
    for a, wt in weight_blocks_t(layer, g.dtype):
        gx.addmm_(g[:, a:a + wt.shape[1]], wt.t())
    return gx.reshape(*grad.shape[:-1], layer.in_features).to(dtype)


class FrozenLinear(torch.autograd.Function):
    """y = layer(x) with d(loss)/dx = grad_y @ W and no gradient for the layer; saves no tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        return base_output(layer, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return input_grad(ctx.layer, grad, ctx.dtype), None


def frozen_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return FrozenLinear.apply(x, layer)
    with torch.no_grad():
        return base_output(layer, x)


def needs_frozen_path(layer: nn.Module) -> bool:
    """Quantized layers (their kernels have no autograd) and float layers whose frozen weight is not
    float32 (autograd would save a cast copy of it)."""
    if isinstance(layer, QUANTIZED):
        return True
    return isinstance(layer, nn.Linear) and not layer.weight.requires_grad and layer.weight.dtype != torch.float32


def route_frozen_layers(model: nn.Module, skip=()) -> list[str]:
    """Send every frozen base layer that needs it (needs_frozen_path) through FrozenLinear, by an
    instance `forward` (the model file stays as it is); `skip` names modules that do it themselves
    (LoRA layers). Returns the names."""
    names = []
    for name, mod in model.named_modules():
        if name in skip or not needs_frozen_path(mod):
            continue
        mod.forward = types.MethodType(frozen_forward, mod)
        names.append(name)
    return names
