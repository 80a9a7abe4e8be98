"""kaki.kernels: the inference linear layer's kernel choice gives F.linear's results on every path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kaki import kernels


def _big(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(kernels.SPLIT_MIN_NUMEL // 256, 256, generator=g).to(dtype)
    b = torch.randn(w.shape[0], generator=g).to(dtype)
    return w, b


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 3])
def test_split_gemv_is_opt_in_and_equal_to_f_linear(rows, two_threads, monkeypatch):
    w, b = _big()
    x = torch.randn(1, rows, 256)
    calls = []
    real = kernels._split_rows
    monkeypatch.setattr(kernels, "_split_rows", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        monkeypatch.delenv("KAKI_SPLIT_GEMV", raising=False)
        plain = kernels.linear(x, w, b)
        assert not calls  # off by default: measured slower in whole decode steps
        monkeypatch.setenv("KAKI_SPLIT_GEMV", "1")
        split = kernels.linear(x, w, b)
        assert calls
    torch.testing.assert_close(split, F.linear(x, w, b), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(plain, F.linear(x, w, b), rtol=0, atol=0)


def test_bf16_prompts_upcast_where_bf16_is_slow(monkeypatch):
    w, b = _big(torch.bfloat16)
    x = torch.randn(kernels.UPCAST_MIN_ROWS, 256).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "_slow_bf16", lambda: True)
    with torch.no_grad():
        y = kernels.linear(x, w, b)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(y.float(), ref.to(torch.bfloat16).float(), rtol=0, atol=0)
