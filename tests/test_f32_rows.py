"""kaki's float32 small-M product (kaki/quant/rows_f32.h through kaki.native.f32_rows), in every
build of the native library this CPU runs: each output is one dot product of a weight row and an
input row, so it equals F.linear's in float64 up to float32 summation order; shapes that hit every
tail (rows 1-8 and past 8, odd weight rows, inputs not a multiple of the vector width), one and two
threads, with and without a bias, float32 inputs of any leading shape. The small-M tuner offers it
for float32 weights only (tests/test_small_m.py forces it through a whole model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kaki import kernels, native, small_m

from test_int8_native import needs_any, variant_params

SHAPES = [(1, 7, 5), (1, 200, 300), (2, 37, 64), (2, 50, 1001), (3, 130, 200), (4, 100, 4096), (5, 64, 129),
          (8, 300, 1000), (8, 1, 17), (9, 67, 70), (33, 71, 259)]


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    # float32 sums of K products: the error grows like sqrt(K) times the terms' size.
    tol = 4e-6 * (x.abs().double() @ w.abs().double().T).amax().item() + 1e-6
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert (y.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("threads", [1, 2])
def test_f32_rows_equals_f_linear(variant, threads):
    g = torch.Generator().manual_seed(0)
    for M, N, K in SHAPES:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        for b in (torch.randn(N, generator=g), None):
            _check(native.f32_rows(x, w, b, threads=threads, variant=variant), x, w, b)


@needs_any
def test_f32_rows_keeps_leading_dims_and_ignores_strides():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 40, generator=g)
    x = torch.randn(2, 3, 80, generator=g)[..., ::2]  # (2, 3, 40), not contiguous
    y = native.f32_rows(x, w.T.contiguous().T, None, threads=2)  # a transposed-back view is fine too
    assert y.shape == (2, 3, 96)
    _check(y.reshape(6, 96), x.reshape(6, 40), w, None)


@needs_any
def test_f32_rows_refuses_other_dtypes_and_the_kernels_path_falls_back():
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with pytest.raises(ValueError):
        native.f32_rows(x.bfloat16(), w.bfloat16())
    with pytest.raises(ValueError):
        native.f32_rows(x, torch.randn(8, 15))
    # kaki.kernels.native_rows serves a bf16 layer by F.linear (the tuner never offers it there).
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.testing.assert_close(kernels.native_rows(xb, wb, None, parts=2), F.linear(xb, wb))


@needs_any
def test_the_tuner_offers_native_for_float32_weights_only(monkeypatch):
    calls = []

    def fake(name):
        def f(x, w, b):
            calls.append((name, w.dtype))
        return f
    names = list(kernels.products(2))
    assert "native" in names
    monkeypatch.setattr(kernels, "products", lambda parts: {n: fake(n) for n in names})
    for dtype in (torch.float32, torch.bfloat16):
        small_m.choose(torch.zeros(64, 64, dtype=dtype), None, 2)
    assert ("native", torch.float32) in calls and ("native", torch.bfloat16) not in calls
    assert ("linear", torch.bfloat16) in calls
