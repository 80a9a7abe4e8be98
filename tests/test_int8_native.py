"""kaki's own int8 CPU kernel (kaki/quant/int8_kernel.c through kaki.quant.native): its integer
arithmetic is exact, so its output must equal a float64 reference that rounds the activations the
same way; odd shapes exercise every tail (rows, weight rows, inputs not a multiple of 64); where it
cannot be built, int8 layers fall back to fbgemm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kaki.quant import int8, native

VNNI = "avx512_vnni" in native._cpu_flags().split()
needs_vnni = pytest.mark.skipif(not VNNI, reason="needs a CPU with AVX512-VNNI")


def reference(x, q, scale, bias):
    """The kernel's arithmetic in float64: each row of x to 16-bit codes (float32 ops, rounding
    to nearest even, as the C code), then the exact integer product."""
    amax = x.abs().amax(dim=1)
    step = torch.where(amax > 0, amax / 32767.0, torch.ones_like(amax))  # float32, as in C
    codes = torch.round(x * (1.0 / step)[:, None])
    y = (codes.double() @ q.double().T) * step.double()[:, None] * scale.double()
    return y + bias.double() if bias is not None else y


SHAPES = [(1, 7, 5), (1, 200, 300), (1, 4096, 256), (2, 37, 64), (3, 130, 200), (5, 64, 129), (8, 300, 1000),
          (9, 67, 70), (40, 130, 260), (4, 100, 4096)]


@needs_vnni
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_equals_its_integer_arithmetic(M, N, K, with_bias):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[0, 0] = 0.0  # zeros and a row's extreme value both on the grid's exact points
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g) if with_bias else None
    y = native.int8_linear(x, q, scale, native.row_sums(q), bias)
    want = reference(x, q, scale, bias)
    assert y.shape == (M, N) and y.dtype == torch.float32
    # Only the float32 output rounding (and the bias add in float32) separates them.
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@needs_vnni
def test_all_zero_rows_and_threads_do_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g)
    x[2] = 0.0
    q = torch.randint(-127, 128, (1000, 300), generator=g, dtype=torch.int8)
    scale, rs = torch.rand(1000, generator=g) + 0.1, native.row_sums(q)
    one, two = (native.int8_linear(x, q, scale, rs, None, threads=t) for t in (1, 2))
    assert torch.equal(one, two)  # every output is one thread's, whatever the split
    assert torch.equal(one[2], torch.zeros(1000))


@needs_vnni
def test_layer_uses_it_by_default_and_matches_the_float_product():
    """An int8 layer on this CPU runs the native kernel, within 16-bit rounding of the float
    product of its dequantized weight (fbgemm's 8-bit activations are ~100x further)."""
    int8.cpu_kernel.cache_clear()
    layer = int8.Int8Linear(512, 384, bias=True)
    g = torch.Generator().manual_seed(2)
    layer.bias = torch.nn.Parameter(torch.randn(384, generator=g), requires_grad=False)
    layer.set_float(torch.randn(384, 512, generator=g) * 0.05, torch.device("cpu"))
    assert layer.kernel == "native" and "kernel=native" in repr(layer)
    x = torch.randn(3, 7, 512, generator=g)
    want = torch.nn.functional.linear(x, layer.dequantized(), layer.bias)
    err = float((layer(x) - want).norm() / want.norm())
    eight = torch.ops.quantized.linear_dynamic(x.reshape(-1, 512), int8._prepack(
        layer.int8_weight(), layer.weight_scale, "fbgemm"), int8.reduce_range()).reshape(3, 7, 384) + layer.bias
    assert err < 5e-5 and float((eight - want).norm() / want.norm()) > 30 * err


def test_falls_back_to_fbgemm_without_a_compiler_or_vnni(monkeypatch, tmp_path):
    monkeypatch.setenv("KAKI_CACHE_DIR", str(tmp_path))
    try:
        monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
        native.library.cache_clear()
        int8.cpu_kernel.cache_clear()
        if VNNI:
            assert native.library() is None and not list(Path(tmp_path).rglob("*.so*"))
        assert int8.cpu_kernel() == ("fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines
                                     else "weight-only")
        monkeypatch.delenv("CC")
        monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : fpu avx2 fma")
        native.library.cache_clear()
        assert native.library() is None
        monkeypatch.setenv("KAKI_INT8_KERNEL", "native")
        int8.cpu_kernel.cache_clear()
        with pytest.raises(ValueError, match="cannot be built"):
            int8.cpu_kernel()
    finally:
        native.library.cache_clear()
        int8.cpu_kernel.cache_clear()


@needs_vnni
def test_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("KAKI_CACHE_DIR", str(tmp_path))
    try:
        native.library.cache_clear()
        assert native.library() is not None
        built = list((tmp_path / "native").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused
    finally:
        native.library.cache_clear()
