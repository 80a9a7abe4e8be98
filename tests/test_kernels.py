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


def test_decode_steps_give_torch_one_thread_and_the_split_the_rest(tmp_path, spm_dir, two_threads):
    """A model with a large fp32 layer (here a 16384 x 256 lm_head): its one-token steps run torch
    on one thread and split the large GEMVs over two; its prompt runs as usual; the threads are
    restored after each forward; logits equal transformers'."""
    import kaki
    from kaki.model import KVCache

    from helpers import hf_model_dir

    hf, path = hf_model_dir("persimmon", tmp_path / "m", spm_dir, vocab_size=16384, hidden_size=256,
                            intermediate_size=512, num_hidden_layers=1)
    model = kaki.load(path, dtype="float32", device="cpu").model
    assert model.lm_head.weight.numel() >= kernels.SPLIT_MIN_NUMEL
    seen = []
    model.model.layers[0].register_forward_hook(lambda *_: seen.append((torch.get_num_threads(), kernels._gemv_parts)))
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    cache = KVCache(model.config, 1, 8, model.dtype, model.device)
    with torch.inference_mode():
        prefill = model(ids, torch.arange(6)[None], cache)
        step = model(torch.tensor([[11]]), torch.tensor([[6]]), cache, last_only=True)
        assert torch.get_num_threads() == 2 and kernels._gemv_parts == 0
        ref = hf(torch.cat([ids, torch.tensor([[11]])], dim=1)).logits
    assert seen == [(2, 0), (1, 2)]
    torch.testing.assert_close(prefill, ref[:, :6], atol=1e-4, rtol=0)
    torch.testing.assert_close(step[:, -1], ref[:, 6], atol=1e-4, rtol=0)


def test_quantized_and_small_models_keep_torch_threads(tmp_path, spm_dir, two_threads):
    import kaki

    from helpers import hf_model_dir

    _, path = hf_model_dir("persimmon", tmp_path / "m", spm_dir, vocab_size=16384, hidden_size=256,
                           intermediate_size=512, num_hidden_layers=1)
    _, small = hf_model_dir("persimmon", tmp_path / "s", spm_dir)
    for model in (kaki.load(path, dtype="float32", device="cpu", quantize="int8").model,
                  kaki.load(small, dtype="float32", device="cpu").model):
        seen = []
        model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        with torch.inference_mode():
            model(torch.tensor([[1]]), torch.tensor([[0]]))
        assert seen == [2]
