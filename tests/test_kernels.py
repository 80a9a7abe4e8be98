"""kaki.kernels: the inference linear layer's kernel choice gives F.linear's results on every path,
and a decode step's one-core setting stays in its own thread."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from kaki import kernels

BIG_NUMEL = 1 << 22  # 16 MB in fp32: a layer as large as the split paid for in BENCHMARKS.md


def _big(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(BIG_NUMEL // 256, 256, generator=g).to(dtype)
    b = torch.randn(w.shape[0], generator=g).to(dtype)
    return w, b


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KAKI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KAKI_SMALL_M", raising=False)
    monkeypatch.delenv("KAKI_SMALL_M_RETUNE", raising=False)


@pytest.mark.parametrize("rows", [1, 3])
def test_split_gemv_is_opt_in_and_equal_to_f_linear(rows, two_threads, monkeypatch):
    """Without a plan a layer is F.linear to the bit; a plan that says split splits, and equals it."""
    w, b = _big()
    x = torch.randn(1, rows, 256)
    calls = []
    real = kernels.split_rows
    monkeypatch.setattr(kernels, "split_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = (F.linear, *[kernels.products(2)["split"]] * kernels.SMALL_M_MAX_ROWS)
    with torch.no_grad():
        plain = kernels.linear(x, w, b)
        assert not calls  # no plan (a layer kaki.small_m has not planned): plain F.linear
        split = kernels.linear(x, w, b, plan)
        assert calls
    torch.testing.assert_close(split, F.linear(x, w, b), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(plain, F.linear(x, w, b), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_mm_product_equals_f_linear(rows):
    w, b = _big()
    x = torch.randn(rows, 1, 256)
    with torch.no_grad():
        for bias in (b, None):
            y = kernels.mm_rows(x, w, bias)
            assert y.shape == (rows, 1, w.shape[0]) and y.is_contiguous()
            torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-4)  # another summation order


def test_bf16_prompts_upcast_where_bf16_is_slow(monkeypatch):
    w, b = _big(torch.bfloat16)
    x = torch.randn(kernels.UPCAST_MIN_ROWS, 256).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "_slow_bf16", lambda: True)
    with torch.no_grad():
        y = kernels.linear(x, w, b)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(y.float(), ref.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_one_thread_here_changes_only_this_thread(two_threads):
    """torch.set_num_threads would also change the count that threads started later copy (a
    second model's worker, a server's thread pool): one_thread_here must not."""
    if kernels._thread_knobs() is None:
        pytest.skip("this torch build does not expose OpenMP's per-thread setter")
    ready, go, seen = threading.Event(), threading.Event(), {}

    def other():
        torch.ones(8).sum()  # a thread that has run torch before
        ready.set()
        go.wait(10)
        seen["existing"] = torch.get_num_threads()

    t = threading.Thread(target=other)
    t.start()
    ready.wait(10)
    with kernels.one_thread_here():
        seen["here"] = torch.get_num_threads()
        go.set()
        t.join(10)
        new = threading.Thread(target=lambda: seen.update(new=torch.get_num_threads()))
        new.start()
        new.join(10)
    seen["after"] = torch.get_num_threads()
    assert seen == {"here": 1, "existing": 2, "new": 2, "after": 2}


def test_decode_steps_give_torch_one_thread_and_the_split_the_rest(tmp_path, spm_dir, two_threads, monkeypatch):
    """A model with a large fp32 layer (here a 16384 x 256 lm_head) whose plan splits: its
    one-token steps run this thread's torch on one core and split the large GEMVs over two; its
    prompt runs as usual; the thread count is restored after each forward and no other thread's
    changes; logits equal transformers'."""
    import kaki
    from kaki.engine import RowCache

    from helpers import hf_model_dir

    if kernels._thread_knobs() is None:
        pytest.skip("this torch build does not expose OpenMP's per-thread setter")
    monkeypatch.setenv("KAKI_SMALL_M", "split")
    hf, path = hf_model_dir("persimmon", tmp_path / "m", spm_dir, vocab_size=16384, hidden_size=256,
                            intermediate_size=512, num_hidden_layers=1)
    model = kaki.load(path, dtype="float32", device="cpu").model
    assert model.lm_head.weight.numel() >= BIG_NUMEL
    splits, seen = [], []
    real = kernels.split_rows
    monkeypatch.setattr(kernels, "split_rows", lambda *a, **k: splits.append(a[1].shape) or real(*a, **k))

    def hook(*_):
        new = threading.Thread(target=lambda: seen.append(("new thread", torch.get_num_threads())))
        new.start()
        new.join(10)
        seen.append((torch.get_num_threads(), len(splits)))

    model.model.layers[0].register_forward_hook(hook)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 4, 8, 2, 6]])
    cache = RowCache(model.config, 1, 12, model.dtype, model.device)
    cache.use(0, 1)
    with torch.inference_mode():
        prefill = model(ids, torch.arange(10)[None], cache)
        prompt_splits = len(splits)
        step = model(torch.tensor([[11]]), torch.tensor([[10]]), cache, last_only=True)
        assert torch.get_num_threads() == 2
        ref = hf(torch.cat([ids, torch.tensor([[11]])], dim=1)).logits
    assert prompt_splits == 0  # ten rows: a prompt, plain F.linear
    assert seen[0] == ("new thread", 2) and seen[1] == (2, 0)
    assert seen[2] == ("new thread", 2) and seen[3][0] == 1  # this thread only
    assert (16384, 256) in splits  # the lm_head split
    torch.testing.assert_close(prefill, ref[:, :10], atol=1e-4, rtol=0)
    torch.testing.assert_close(step[:, -1], ref[:, 10], atol=1e-4, rtol=0)


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
