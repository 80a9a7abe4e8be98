"""int4 weights: asymmetric, one bf16 scale and zero per group of inputs, and their linear layer.

The convention is tinygemm's (gpt-fast, torchao), so both PyTorch int4 kernels take it as is:
q in [0, 15], w = (q - 8) * scale + zero, with zero = min + 8 * scale. Scale and zero are rounded
to bf16 *before* q is computed, so q is the best code for the values the kernels actually use.

Kernels, measured (docs/quantization.md):
- CPU: `aten._weight_int4pack_mm_for_cpu` on bf16 activations. On AVX512 it streams the packed
  weight at ~2x the speed of the int8 kernel for 1-4 rows; its cost grows with the rows (it
  unpacks the weight again for every 4 rows), so prompts are slower than with int8. Dequantizing
  to bf16 for a plain GEMM instead only pays from ~200 rows on (the unpacking alone costs as much
  as the kernel at ~150 rows), so the kernel runs at every size.
- CUDA: `aten._weight_int4pack_mm` (tinygemm) on bf16 activations, as gpt-fast.
- Anything else: dequantize per call (correct, slow).
The CPU kernel keeps the weight in a blocked layout that depends on the CPU's vector width, so it
is never saved: checkpoints hold the plain layout, and `cpu_unpack` inverts the blocking exactly
(checked once per process against the real packing; if a PyTorch ever changes it, the plain
copy is kept next to the packed one instead).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

SCALE_DTYPE = torch.bfloat16


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], scale bf16 [N, K/group], zero bf16 [N, K/group]); row-wise, so
    row blocks quantize to the same bytes as the whole matrix."""
    N, K = w.shape
    if K % group:
        raise ValueError(f"in_features {K} is not a multiple of the int4 group size {group}")
    g = w.reshape(N, K // group, group)
    lo, hi = g.amin(-1).float(), g.amax(-1).float()
    # A constant group would get scale 0; any positive scale reproduces it through the zero.
    scale = ((hi - lo) / 15).clamp_(min=1e-8).to(SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)
    # One float32 temporary, updated in place; w itself is never written (it may be mmapped).
    q = torch.sub(g, zero.float()[..., None]).div_(scale.float()[..., None]).add_(8).round_().clamp_(0, 15)
    return pack(q.reshape(N, K).to(torch.uint8)), scale, zero


def pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] bytes, even input index in the high nibble (the input
    `_convert_weight_to_int4pack` takes on CUDA)."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(p.shape[0], -1)


def dequantize(p: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_values(unpack(p), scale, zero, dtype)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] values 0..15 -> weights; the arithmetic in `dtype`, as the kernels do it in bf16."""
    N, G = scale.shape
    q = q.reshape(N, G, -1).to(dtype)
    return ((q - 8) * scale.to(dtype)[..., None] + zero.to(dtype)[..., None]).reshape(N, -1)


# ----------------------------------------------------------------------------- the CPU layout

def _cpu_block_n() -> tuple[int, bool]:
    """(rows per block, whether full blocks use the split-lane layout) of PyTorch's CPU packing:
    64 rows on AVX512, 32 on AVX2 (byte j of each input column holds rows j and j + block/2);
    other builds pair neighbouring rows in blocks of 32."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        return 64, True
    if cap == "AVX2":
        return 32, True
    return 32, False


def cpu_pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 (uint8) -> the CPU kernel's blocked uint8 [N, K/2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def cpu_unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of cpu_pack: the [N, K] values 0..15 (uint8)."""
    return cpu_unpack_t(packed, N, K, torch.empty(K, N, dtype=torch.uint8)).t().contiguous()


def cpu_unpack_t(packed: torch.Tensor, N: int, K: int, out: torch.Tensor) -> torch.Tensor:
    """cpu_unpack's values transposed, written into `out` ([K, N], any dtype, e.g. a float buffer
    a training backward dequantizes in place). Each block of the layout holds its rows input by
    input, which is already W^T's order: writing [K, N] takes no transposing copy, where [N, K]
    would (one pass per nibble, each writing runs of block/2 neighbouring values)."""
    block, split = _cpu_block_n()
    flat = packed.reshape(-1)
    full = N // block * block
    if full:
        b = flat[: full * K // 2].view(full // block, K, block // 2)  # (blocks, K, block/2) bytes
        dst = out[:, :full].unflatten(1, (full // block, block)).transpose(0, 1)  # (blocks, K, block)
        if split:  # byte j: rows j | rows j + block/2
            dst[..., :block // 2].copy_(b & 15)
            dst[..., block // 2:].copy_(b >> 4)
        else:  # byte j: rows 2j, 2j + 1
            pairs = dst.unflatten(-1, (block // 2, 2))
            pairs[..., 0].copy_(b & 15)
            pairs[..., 1].copy_(b >> 4)
    tail = N - full
    if tail:  # 16, 32 or 48 rows, always neighbour pairs
        t = flat[full * K // 2:].view(K, tail // 2)
        pairs = out[:, full:].unflatten(1, (tail // 2, 2))
        pairs[..., 0].copy_(t & 15)
        pairs[..., 1].copy_(t >> 4)
    return out


@functools.lru_cache(maxsize=1)
def cpu_layout_known() -> bool:
    """cpu_unpack inverts this PyTorch's packing, and 64-row blocks pack independently."""
    g = torch.Generator().manual_seed(0)
    for n in (112, 48):  # a full block plus a tail; a tail alone
        q = torch.randint(0, 16, (n, 64), generator=g, dtype=torch.uint8)
        whole = cpu_pack(q)
        if not torch.equal(cpu_unpack(whole, n, 64), q):
            return False
        if n > 64 and not torch.equal(torch.cat([cpu_pack(q[:64]).view(-1), cpu_pack(q[64:]).view(-1)]),
                                      whole.view(-1)):
            return False
    return True


def cpu_kernel_ok(N: int, K: int, group: int) -> bool:
    return N % 16 == 0 and K % group == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The kernels' [K/group, N, 2] interleaved scale/zero table."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


class Int4Linear(nn.Module):
    """A drop-in for nn.Linear with group-wise int4 weights. State dict: `weight` (uint8
    [N, K/2], plain layout), `weight_scale` and `weight_zero` (bf16 [N, K/group]), `bias`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group: int = 64,
                 device=None, dtype=None):
        super().__init__()
        if in_features % group:
            raise ValueError(f"in_features {in_features} is not a multiple of the int4 group size {group}")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        G = in_features // group
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, G, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("weight_zero", torch.empty(out_features, G, dtype=SCALE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None
        self.kernel = "none"
        self._packed = None
        self._sz = None

    def set_float(self, w: torch.Tensor, device: torch.device, keep_plain: bool = False) -> None:
        self.set_quantized(*quantize(w.to(device), self.group), keep_plain=keep_plain)

    def set_quantized(self, p: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      keep_plain: bool = False) -> None:
        """Take (plain uint8 [N, K/2], scale, zero) as they are; `keep_plain` skips packing."""
        self.start(p.device, keep_plain)
        self.add_rows(p, scale, zero)
        self.finish()

    def start(self, device: torch.device, keep_plain: bool = False) -> None:
        """Pick the kernel for `device`; rows follow in order through add_rows (in blocks whose
        sizes are multiples of 64 but for the last: the CPU packing's row blocks)."""
        N, K, G = self.out_features, self.in_features, self.in_features // self.group
        self.weight_scale = torch.empty(N, G, dtype=SCALE_DTYPE, device=device)
        self.weight_zero = torch.empty(N, G, dtype=SCALE_DTYPE, device=device)
        self._packed, self._sz, self._filled = None, None, 0
        if keep_plain:
            self.kernel = "dequantize"
        elif device.type == "cuda" and K % 128 == 0 and N % 8 == 0:
            self.kernel = "tinygemm"
        elif device.type == "cpu" and cpu_kernel_ok(N, K, self.group):
            self.kernel = "int4pack-cpu"
        else:
            self.kernel = "dequantize"
        if self.kernel == "int4pack-cpu":
            # Packed block by block as rows arrive; the plain copy is kept only if this PyTorch's
            # packing is one cpu_unpack cannot invert (then saving needs it).
            self._packed = torch.empty(N, K // 2, dtype=torch.uint8)
            known = cpu_layout_known()
            self.weight = torch.empty(0 if known else N, K // 2, dtype=torch.uint8)
        else:
            self.weight = torch.empty(N, K // 2, dtype=torch.uint8, device=device)

    def add_rows(self, p: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        N, K = self.out_features, self.in_features
        a, b = self._filled, self._filled + p.shape[0]
        if p.dtype != torch.uint8 or p.shape[1:] != (K // 2,) or b > N:
            raise ValueError(f"int4 weight must be uint8 {[N, K // 2]}; rows {a}..{b} of {p.dtype} "
                             f"{list(p.shape)} do not fit")
        if self.kernel == "int4pack-cpu" and a % 64:
            raise ValueError(f"int4 rows must arrive in blocks of a multiple of 64 rows (block at row {a})")
        self.weight_scale[a:b], self.weight_zero[a:b] = scale, zero
        self._filled = b
        if self.weight.shape[0] == N:
            self.weight[a:b] = p
        if self.kernel == "int4pack-cpu":
            # Whole blocks of rows pack independently into consecutive bytes (see cpu_unpack).
            self._packed.view(-1)[a * K // 2: b * K // 2] = cpu_pack(unpack(p)).view(-1)

    def finish(self) -> None:
        if self._filled != self.out_features:
            raise ValueError(f"int4 layer got {self._filled} of its {self.out_features} rows")
        if self.kernel in ("tinygemm", "int4pack-cpu"):
            self._sz = _scales_and_zeros(self.weight_scale, self.weight_zero)
        if self.kernel == "tinygemm":
            self._packed = torch.ops.aten._convert_weight_to_int4pack(self.weight, 8)  # inner k tiles

    def values(self) -> torch.Tensor:
        """The [N, K] codes 0..15, from whichever copy the layer keeps."""
        if self.weight.shape[0] != self.out_features:
            return cpu_unpack(self._packed, self.out_features, self.in_features)
        return unpack(self.weight)

    def values_t(self, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
        """Rows a..b's codes 0..15 transposed into `out` ([K, b - a], any dtype), from whichever
        copy the layer keeps; `a` a multiple of 64 (whole blocks of the CPU packing). Training's
        backward (kaki.quant.train) dequantizes a block of rows at a time this way."""
        if self.weight.shape[0] == self.out_features:
            return out.copy_(unpack(self.weight[a:b]).t())
        K = self.in_features
        return cpu_unpack_t(self._packed.view(-1)[a * K // 2:b * K // 2], b - a, K, out)

    def plain_weight(self) -> torch.Tensor:
        return self.weight if self.weight.shape[0] == self.out_features else pack(self.values())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.plain_weight()
        destination[prefix + "weight_scale"] = self.weight_scale
        destination[prefix + "weight_zero"] = self.weight_zero
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_values(self.values(), self.weight_scale, self.weight_zero, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "int4pack-cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(SCALE_DTYPE).contiguous(), self._packed,
                                                           self.group, self._sz)
        elif self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(SCALE_DTYPE).contiguous(), self._packed,
                                                   self.group, self._sz)
        else:
            # Shapes and devices no kernel takes: a dequantized copy per call (correct, slow).
            y = F.linear(x2, self.dequantized(x.dtype))
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group={self.group}, kernel={self.kernel}")
