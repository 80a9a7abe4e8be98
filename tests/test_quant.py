"""int8/int4 quantization: error bounds of quantize -> dequantize, per element and per layer of a
real model, the kernels against the dequantized product, the CPU int4 layout, the format spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import kaki
from kaki.errors import KakiError
from kaki import native
from kaki.quant import QuantSpec, as_spec, int4, int8, quantize_model, weight_bytes

from test_int8_native import variant_params

BF16_EPS = 2.0 ** -8  # relative rounding error of bfloat16 (8 significant bits)


def weights(n=96, k=256, seed=0) -> torch.Tensor:
    """Rows of very different scales, an outlier, an all-zero row and a constant row: the cases a
    per-row or per-group scale has to get right."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[:, None]
    w[3, 17] = 40.0
    w[5] = 0.0
    w[7] = 0.125
    return w


# ----------------------------------------------------------------------------- int8

def test_int8_error_is_at_most_half_a_step():
    w = weights()
    q, scale = int8.quantize(w)
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0],)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    err = (int8.dequantize(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())
    # The scale is tight: each nonzero row uses the full range, so no precision is wasted.
    nonzero = w.abs().amax(1) > 0
    assert bool((q.abs().amax(1)[nonzero] == 127).all())
    assert bool((q[5] == 0).all())  # the zero row stays exactly zero


def test_int8_negation_symmetric():
    w = weights(seed=1)
    assert torch.equal(int8.quantize(-w)[0], -int8.quantize(w)[0])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantizing_in_row_blocks_gives_the_same_bytes(fmt):
    """Loading quantizes big matrices block by block; the result must not depend on the blocks."""
    w = weights(n=200, seed=2)
    whole = int8.quantize(w) if fmt == "int8" else int4.quantize(w, 64)
    parts = [int8.quantize(w[a:a + 37]) if fmt == "int8" else int4.quantize(w[a:a + 37], 64)
             for a in range(0, 200, 37)]
    for full, pieces in zip(whole, zip(*parts)):
        assert torch.equal(full, torch.cat(pieces))


# ----------------------------------------------------------------------------- int4

@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step(group):
    w = weights()
    p, scale, zero = int4.quantize(w, group)
    assert p.dtype == torch.uint8 and p.shape == (w.shape[0], w.shape[1] // 2)
    assert scale.dtype == zero.dtype == torch.bfloat16 and scale.shape == (w.shape[0], w.shape[1] // group)
    deq = int4.dequantize(p, scale, zero)
    s = scale.float().repeat_interleave(group, 1)
    z = zero.float().repeat_interleave(group, 1)
    # Half a step, plus the bf16 rounding of the scale and zero the kernels use.
    bound = s / 2 + BF16_EPS * (z.abs() + 8 * s)
    assert bool(((deq - w).abs() <= bound).all())
    # Each group spans its own range: its smallest and largest values land on codes 0 and 15
    # (or within one code of them, after the bf16 rounding).
    codes = int4.unpack(p).reshape(w.shape[0], -1, group)
    spread = w.reshape(w.shape[0], -1, group)
    live = spread.amax(-1) > spread.amin(-1)
    assert bool((codes.amin(-1)[live] <= 1).all()) and bool((codes.amax(-1)[live] >= 14).all())


def test_int4_pack_layout_and_roundtrip():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    p = int4.pack(q)
    assert torch.equal(p[:, 0] >> 4, q[:, 0]) and torch.equal(p[:, 0] & 15, q[:, 1])  # even index high
    assert torch.equal(int4.unpack(p), q)


@pytest.mark.parametrize("n", [16, 48, 64, 112, 176])
def test_int4_cpu_layout_inverse(n):
    """The CPU kernel's blocked layout is never saved; cpu_unpack must invert it exactly, also for
    row counts that end in a partial block."""
    q = torch.randint(0, 16, (n, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert torch.equal(int4.cpu_unpack(int4.cpu_pack(q), n, 96), q)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_int4_cpu_layout_known_on_other_cpus(capability):
    """CI machines may dispatch to AVX2 or scalar kernels, whose blocking differs from AVX512's."""
    code = ("import torch; from kaki.quant import int4; "
            "print(torch.backends.cpu.get_cpu_capability(), int4.cpu_layout_known())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
    cap, known = out.stdout.split()
    assert known == "True", f"cpu_unpack does not invert the {cap} packing"


# ----------------------------------------------------------------------------- layers vs reference

def _layer(fmt, n=96, k=256, bias=True, dtype=torch.float32, keep_plain=False, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mod = int8.Int8Linear(k, n, bias=bias, dtype=dtype) if fmt == "int8" else \
        int4.Int4Linear(k, n, bias=bias, group=64, dtype=dtype)
    if bias:
        mod.bias = torch.nn.Parameter((torch.randn(n, generator=g) * 0.1).to(dtype), requires_grad=False)
    mod.set_float(w, torch.device("cpu"), keep_plain=keep_plain)
    return mod, w


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def int8_kernel(monkeypatch):
    """Select an int8 CPU kernel for the layers built inside the test: a name of int8.KERNELS, or
    "native-VARIANT" for one build of kaki's own."""
    def use(name):
        kernel, _, variant = name.partition("-") if name.startswith("native") else (name, "", "")
        monkeypatch.setenv("KAKI_INT8_KERNEL", kernel)
        monkeypatch.setenv("KAKI_INT8_VARIANT", variant)
        native.cache_clear()
        int8.cpu_kernel.cache_clear()
    yield use
    monkeypatch.delenv("KAKI_INT8_KERNEL", raising=False)
    monkeypatch.delenv("KAKI_INT8_VARIANT", raising=False)
    native.cache_clear()
    int8.cpu_kernel.cache_clear()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(96, 256), (97, 259)])
@pytest.mark.parametrize("kernel", [*variant_params("native-"), "fbgemm"])
def test_int8_kernel_matches_dequantized_product(int8_kernel, kernel, n, k, rows, dtype):
    int8_kernel(kernel)
    mod, _ = _layer("int8", n=n, k=k, dtype=dtype)
    assert mod.kernel == kernel.partition("-")[0] and mod.variant == (kernel.partition("-")[2] or None)
    x = torch.randn(2, rows, k).to(dtype)
    ref = F.linear(x.float(), mod.dequantized(), mod.bias.float())
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, rows, n)
    # Both round the activations: native to 16 bits per row (~1e-5), fbgemm in two rows (8 bits +
    # the magnified residual, ~15 bits: ~1e-4), where quantize_dynamic's single row gives ~1e-2.
    assert _rel(y, ref) < ((1e-4 if mod.kernel == "native" else 1e-3) if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:
        single = torch.ops.quantized.linear_dynamic(x.reshape(-1, k), int8._prepack(
            mod.int8_weight(), mod.weight_scale, "fbgemm"), int8.reduce_range())
        assert _rel(single.reshape(2, rows, n) + mod.bias, ref) > 5 * _rel(y, ref)
    plain, _ = _layer("int8", n=n, k=k, dtype=dtype, keep_plain=True)  # the weight-only path (CUDA's)
    assert plain.kernel == "weight-only"
    assert _rel(plain(x), ref) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_int8_seven_bit_activations_without_vnni(monkeypatch):
    """CPUs without VNNI get 7-bit activation rows (no int16 saturation in fbgemm); the residual
    row keeps the product as precise."""
    monkeypatch.setattr(int8, "reduce_range", lambda: True)
    mod, _ = _layer("int8")
    x = torch.relu(torch.randn(5, 256)) ** 2  # one-signed, heavy-tailed: relu2's output
    assert _rel(mod(x), F.linear(x, mod.dequantized(), mod.bias)) < 1e-3


def test_packing_engine_swaps_do_not_interleave():
    """Packing sets the process-wide quantized engine for its duration; a second loader in
    another thread must neither change it under the first nor leave its own behind."""
    original = torch.backends.quantized.engine
    inside, started, seen = threading.Event(), threading.Event(), []

    def first():
        with int8._engine("onednn"):
            inside.set()
            started.wait(5)
            time.sleep(0.3)  # the second has had time to set its engine, were it not held off
            seen.append(torch.backends.quantized.engine)

    def second():
        inside.wait(5)
        started.set()
        with int8._engine("fbgemm"):
            seen.append(torch.backends.quantized.engine)

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == ["onednn", "fbgemm"] and torch.backends.quantized.engine == original


@pytest.mark.parametrize("rows", [1, 4, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_dequantized_product(rows, dtype):
    mod, _ = _layer("int4", dtype=dtype)
    assert mod.kernel == "int4pack-cpu"
    assert mod.weight.numel() == 0  # the packed matrix is the only copy
    x = torch.randn(2, rows, 256).to(dtype)
    ref = F.linear(x.float(), mod.dequantized(), mod.bias.float())
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, rows, 96)
    assert _rel(y, ref) < 1e-2  # bf16 activations and accumulation in the kernel


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_layer_state_dict_roundtrip(fmt):
    mod, _ = _layer(fmt)
    state = mod.state_dict()
    expect = {"weight", "weight_scale", "bias"} | ({"weight_zero"} if fmt == "int4" else set())
    assert set(state) == expect
    again = int8.Int8Linear(256, 96) if fmt == "int8" else int4.Int4Linear(256, 96, group=64)
    again.bias = mod.bias
    again.set_quantized(*(state[k] for k in ("weight", "weight_scale", "weight_zero") if k in state))
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype
    x = torch.randn(3, 256)
    assert torch.equal(again(x), mod(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_kernels_match_dequantized_product(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.05
    mod = int8.Int8Linear(512, 256, bias=False) if fmt == "int8" else int4.Int4Linear(512, 256, bias=False, group=64)
    mod.set_float(w, torch.device("cuda"))
    assert mod.kernel == ("weight-only" if fmt == "int8" else "tinygemm")
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), mod.dequantized().cuda())
    assert _rel(mod(x), ref) < 1e-2
    cpu_codes = int8.quantize(w) if fmt == "int8" else int4.quantize(w, 64)
    for a, b in zip(cpu_codes, (mod.weight, mod.weight_scale) if fmt == "int8"
                    else (mod.weight, mod.weight_scale, mod.weight_zero)):
        assert torch.equal(a, b.cpu())  # the same codes whichever device quantized them


# ----------------------------------------------------------------------------- a whole model

@pytest.mark.parametrize("family", ["persimmon", "gpt_neox", "llama"])
@pytest.mark.parametrize("spec,max_rel", [("int8", 0.01), ("int4:32", 0.12), ("int4:64", 0.15)])
def test_per_layer_error_bounds(family_dirs, family, spec, max_rel):
    """Every linear layer of a real checkpoint: within half a step per element (the bound above)
    and a small relative error overall; the embedding and norms untouched."""
    _, path = family_dirs[family]
    base = kaki.load(path, dtype="float32").model
    model = kaki.load(path, dtype="float32", quantize=spec).model
    s = as_spec(spec)
    floats = dict(base.named_modules())
    seen = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (int8.Int8Linear, int4.Int4Linear)):
            seen += 1
            w = floats[name].weight
            err = _rel(mod.dequantized(), w)
            assert err < max_rel, f"{name}: relative error {err:.4f}"
            assert (mod.group if s.format == "int4" else None) == s.group_size
    # int4 needs in_features divisible by the group: other layers stay float (none here).
    assert seen == len([m for m in base.modules() if isinstance(m, torch.nn.Linear)
                        and (s.format == "int8" or m.in_features % s.group_size == 0)]) > 0
    for name, p in base.named_parameters():
        if "layernorm" in name or "embed" in name or "norm" in name:
            assert torch.equal(model.get_parameter(name), p)


# ----------------------------------------------------------------------------- spec and sizes

def test_spec_validation():
    assert as_spec("int4") == QuantSpec("int4", 64)
    assert as_spec("int4:128").group_size == 128
    assert as_spec("int8", head=False).head is False
    for bad in ("int5", "int4:100", "int4:x", "fp8"):
        with pytest.raises(KakiError):
            as_spec(bad)
    with pytest.raises(KakiError, match="group size applies to int4"):
        QuantSpec("int8", 64)


@pytest.mark.parametrize("spec", ["int8", "int4", "int4:32"])
def test_weight_bytes_match_saved_files(family_dirs, tmp_path, spec):
    """kaki info's size per format is what a quantized bf16 save actually holds."""
    _, path = family_dirs["llama"]
    llm = kaki.load(path, dtype="bfloat16", quantize=spec)
    out = llm.save(tmp_path / "q")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    cfg = kaki.load(path, dtype="bfloat16").config
    assert weight_bytes(cfg, as_spec(spec), float_bytes=2) == stored
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["format"] == as_spec(spec).format and block["group_size"] == as_spec(spec).group_size


def test_quantize_model_in_memory_equals_quantize_while_loading(family_dirs):
    _, path = family_dirs["persimmon"]
    loaded = kaki.load(path, dtype="float32", quantize="int4").model
    built = quantize_model(kaki.load(path, dtype="float32").model, "int4")
    a, b = loaded.state_dict(), built.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config.extra["quantization_config"] == built.config.extra["quantization_config"]
