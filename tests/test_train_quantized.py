"""LoRA over a frozen bfloat16, int8 or int4 base (kaki train --lora --dtype / --quantize): the loss
falls, adapter gradients match those over the dequantized float base, nothing weight-sized is kept
for backward, merged == unmerged, a killed run resumes bit-exactly, DDP equals one process, and the
memory table (--dry-run) matches the tensors and the peak RSS of a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAMILIES, corpus, hf_model_dir

from kaki.cli import main
from kaki.config import read_config
from kaki.errors import KakiError
from kaki.loading import load_model
from kaki.quant import as_spec
from kaki.quant.train import QUANTIZED
from kaki.train.loop import Trainer, chunked_loss_sum, prepare_frozen_base
from kaki.lora import apply_lora, lora_modules
from kaki.train.memory import held_bytes, optimizer_bytes
from kaki.train.options import TrainOptions

BASES = {"int8": ["--quantize", "int8"], "int4": ["--quantize", "int4:32"], "bf16": ["--dtype", "bfloat16"]}
COMMON = ["--seq-len", "32", "--batch-size", "4", "--no-progress", "--lr", "1e-2", "--lora", "--lora-r", "4"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, spm_dir):
    root = tmp_path_factory.mktemp("qlora")
    data = root / "d.jsonl"
    lines = corpus(160, seed=7)
    data.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 4])}) + "\n" for i in range(0, 160, 4)))
    bases = {f: hf_model_dir(f, root / f, spm_dir)[1] for f in FAMILIES}
    return root, bases, data


def evals(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_over_a_frozen_base_lowers_the_loss(root, tmp_path, family, base):
    _, bases, data = root
    out = tmp_path / "run"
    assert main(["train", "--model", str(bases[family]), "--data", str(data), "--out", str(out), "--max-steps", "8",
                 "--eval-every", "1", "--save-every", "0", *COMMON, *BASES[base]]) == 0
    ev = evals(out)
    assert len(ev) == 8 and ev[-1] < ev[0] - 0.05, ev
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and Path(cfg["base_model_name_or_path"]) == bases[family].resolve()


# ----------------------------------------------------------------------------- gradients


def lora_model(path: Path, spec, dtype=torch.float32, seed: int = 0):
    model = load_model(path, read_config(path), dtype, torch.device("cpu"), quantize=spec)
    apply_lora(model, r=4, alpha=8.0, targets=["all-linear"], dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.1)  # B = 0 at init would leave A without a gradient
    prepare_frozen_base(model)
    return model.train()


def dequantized_twin(path: Path, quantized):
    """The float model whose linear weights are the quantized model's dequantized weights, with
    the same adapters."""
    model = load_model(path, read_config(path), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for name, mod in quantized.named_modules():
            if isinstance(mod, QUANTIZED):
                target = model.get_submodule(name.removesuffix(".base_layer"))
                target.weight = torch.nn.Parameter(mod.dequantized(torch.float32), requires_grad=False)
    apply_lora(model, r=4, alpha=8.0, targets=["all-linear"], dtype=torch.float32)
    q = lora_modules(quantized)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.lora_A.copy_(q[name].lora_A)
            m.lora_B.copy_(q[name].lora_B)
    return model.train()


def batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 8), generator=g)  # 3 x 7 tokens: no weight has a dimension 21
    return ids[:, :-1], ids[:, 1:]


# Relative error (norm of the difference / norm) of each adapter gradient against the dequantized
# float base, at most and in the median: the int8 kernel rounds activations to 16 bits per row
# (measured: at most 3e-4), the int4 kernel to bf16, 8 bits of mantissa (measured: at most 3.1%,
# median at most 1.8%, over these random models' four families).
GRAD_RTOL = {"int8": (1e-3, 5e-4), "int4:32": (5e-2, 2.5e-2)}


@pytest.mark.parametrize("fmt", list(GRAD_RTOL))
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_gradients_equal_those_of_the_dequantized_base(root, family, fmt):
    _, bases, _ = root
    q = lora_model(bases[family], as_spec(fmt))
    f = dequantized_twin(bases[family], q)
    inputs, targets = batch(q.config.vocab_size)
    for m in (q, f):
        chunked_loss_sum(m, inputs, targets).backward()
    fg = {n: p.grad for n, p in f.named_parameters() if p.requires_grad}
    errs = {}
    for name, p in q.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name  # no frozen parameter gets a gradient
            continue
        ref = fg[name.replace(".base_layer", "")]
        errs[name] = float((p.grad - ref).norm() / ref.norm())
    worst, median = GRAD_RTOL[fmt]
    assert len(errs) == len(fg) and max(errs.values()) < worst, errs
    assert sorted(errs.values())[len(errs) // 2] < median, errs
    for mod in q.modules():
        if isinstance(mod, QUANTIZED):
            assert all(b.grad is None for b in mod.buffers())


def test_bf16_base_gradients_equal_the_float_base(root):
    _, bases, _ = root
    b = lora_model(bases["llama"], None, dtype=torch.bfloat16)
    f = lora_model(bases["llama"], None, dtype=torch.float32)
    with torch.no_grad():  # the float twin holds the bf16-rounded weights
        for (n, p), (_, pf) in zip(b.named_parameters(), f.named_parameters()):
            pf.copy_(p.float())
    inputs, targets = batch(b.config.vocab_size)
    for m in (b, f):
        chunked_loss_sum(m, inputs, targets).backward()
    for (n, p), (_, pf) in zip(b.named_parameters(), f.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, pf.grad, rtol=1e-4, atol=1e-6, msg=n)
        else:
            assert p.grad is None, n


def weight_shapes(model) -> set[tuple[int, ...]]:
    shapes = set()
    for m in model.modules():
        if hasattr(m, "in_features") and not hasattr(m, "lora_A"):
            shapes |= {(m.out_features, m.in_features), (m.in_features, m.out_features)}
    return shapes


def saved_shapes(model) -> list[tuple[int, ...]]:
    inputs, targets = batch(model.config.vocab_size)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_loss_sum(model, inputs, targets)
    loss.backward()
    return saved


# Without activation checkpointing, so the hooks see what every layer saves (a checkpointed
# layer's recomputation saves under checkpoint's own hooks; it runs the same layers).
@pytest.mark.parametrize("base", ["int8", "int4:32", "bf16"])
def test_nothing_weight_sized_is_saved_for_backward(root, base):
    _, bases, _ = root
    if base == "bf16":
        model = lora_model(bases["persimmon"], None, dtype=torch.bfloat16)
    else:
        model = lora_model(bases["persimmon"], as_spec(base))
    shapes = weight_shapes(model)
    saved = saved_shapes(model)
    assert saved and not [s for s in saved if s in shapes], sorted(set(saved) & shapes)
    # The check can fail: a float32 base run by autograd keeps its weights for backward.
    plain = lora_model(bases["persimmon"], None)
    assert set(saved_shapes(plain)) & weight_shapes(plain)


# ----------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def trained(root):
    """A LoRA run over an int8 base (llama), with --merge."""
    r, bases, data = root
    out = r / "int8-run"
    assert main(["train", "--model", str(bases["llama"]), "--data", str(data), "--out", str(out), "--max-steps", "4",
                 "--eval-every", "0", "--save-every", "0", "--merge", "--save-dtype", "float32", *COMMON,
                 *BASES["int8"]]) == 0
    return out, bases["llama"]


def test_merge_lora_merges_into_the_float_weights(trained, tmp_path, capsys):
    import kaki
    from kaki.lora import apply_adapter

    out, base = trained
    merged = tmp_path / "merged"
    assert main(["merge-lora", str(out), "--out", str(merged), "--dtype", "float32"]) == 0
    assert "float weights" in capsys.readouterr().out
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    m = kaki.load(merged, dtype="float32", device="cpu")
    unmerged = apply_adapter(kaki.load(base, dtype="float32", device="cpu"), out)
    with torch.no_grad():
        torch.testing.assert_close(m.model(ids), unmerged.model(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m.model(ids), kaki.load(base, dtype="float32", device="cpu").model(ids), atol=1e-4)
    # --merge at the end of training wrote the same weights
    a, b = load_file(merged / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # bfloat16 by default
    assert main(["merge-lora", str(out), "--out", str(tmp_path / "bf16")]) == 0
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


def test_adapter_on_a_quantized_model_and_merge_against_it(trained, tmp_path, capsys):
    """--adapter applies to a quantized model; merging into a base stored quantized says so, and
    gives the logits of that quantized model with the adapter unmerged."""
    import kaki
    from kaki.lora import apply_adapter

    out, base = trained
    qdir = tmp_path / "q"
    kaki.load(base, dtype="float32", device="cpu", quantize="int8").save(qdir)
    assert main(["merge-lora", str(out), "--model", str(qdir), "--out", str(tmp_path / "m"), "--dtype", "float32"]) == 0
    assert "only a quantized base" in capsys.readouterr().out
    merged = kaki.load(tmp_path / "m", dtype="float32", device="cpu")
    assert "quantization_config" not in merged.model.config.extra
    q = apply_adapter(kaki.load(qdir, dtype="float32", device="cpu"), out)
    plain_q = kaki.load(qdir, dtype="float32", device="cpu")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        # The int8 kernel rounds activations to 16 bits; the merged float model does not.
        torch.testing.assert_close(q.model(ids), merged.model(ids), rtol=1e-3, atol=1e-3)
        assert not torch.allclose(q.model(ids), plain_q.model(ids), atol=1e-3)
    assert main(["generate", "--model", str(base), "--quantize", "int8", "--adapter", str(out), "--dtype", "float32",
                 "-n", "4", "-t", "0", "--json", "the man"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"]


# ----------------------------------------------------------------------------- runs


def test_accumulation_and_checkpointing_give_the_same_adapter(root, tmp_path):
    _, bases, data = root
    outs = {}
    for name, extra in {"plain": [], "accum": ["--batch-size", "2", "--grad-accum", "2"],
                        "ckpt": ["--activation-checkpointing"]}.items():
        outs[name] = tmp_path / name
        assert main(["train", "--model", str(bases["persimmon"]), "--data", str(data), "--out", str(outs[name]),
                     "--max-steps", "3", "--eval-every", "0", "--save-every", "0", *COMMON, *BASES["int4"],
                     *extra]) == 0
    a = load_file(outs["plain"] / "adapter_model.safetensors")
    for name in ("accum", "ckpt"):
        b = load_file(outs[name] / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=f"{name} {k}")


def test_a_killed_quantized_run_resumes_bit_exactly(root, tmp_path):
    from test_train_resume import KILLER

    _, bases, data = root
    argv = ["train", "--model", str(bases["gpt_neox"]), "--data", str(data), "--max-steps", "6",
            "--save-every", "2", "--eval-every", "0", *COMMON, *BASES["int8"]]
    whole = tmp_path / "whole"
    assert main([*argv, "--out", str(whole)]) == 0
    part = tmp_path / "part"
    p = subprocess.run([sys.executable, "-c", KILLER, "step", "3", *argv, "--out", str(part)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert main([*argv, "--out", str(part), "--resume"]) == 0
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_over_a_quantized_base_equals_one_process(root, tmp_path):
    from test_train_dist import torchrun

    _, bases, data = root
    argv = ["train", "--model", str(bases["persimmon"]), "--data", str(data), "--max-steps", "3",
            "--eval-every", "0", "--save-every", "0", "--seq-len", "32", "--no-progress", "--lr", "1e-2",
            "--lora", "--lora-r", "4", "--adam-eps", "1e-4", *BASES["int8"]]
    assert main([*argv, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    torchrun([*argv, "--batch-size", "2", "--out", str(tmp_path / "two")])
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_fsdp_and_full_fine_tuning_refuse_a_quantized_base(root, tmp_path, capsys):
    _, bases, data = root
    base = ["train", "--model", str(bases["llama"]), "--data", str(data), "--out", str(tmp_path / "x")]
    assert main([*base, "--lora", "--quantize", "int8", "--fsdp"]) == 2
    assert "--fsdp cannot shard a quantized base" in capsys.readouterr().err
    assert main([*base, "--quantize", "int4"]) == 2
    assert "add --lora" in capsys.readouterr().err
    with pytest.raises(KakiError, match="--quantize takes"):
        Trainer(TrainOptions(model=str(bases["llama"]), data=str(data), out=str(tmp_path / "y"), lora=True,
                             quantize="int4:x", progress=False))


# ----------------------------------------------------------------------------- memory table


@pytest.mark.parametrize("base", ["float32", "bf16", "int8", "int4"])
def test_dry_run_weights_and_optimizer_equal_the_measured_tensors(root, tmp_path, base, capsys):
    _, bases, data = root
    quant = {"float32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"},
             "int4": {"quantize": "int4:32"}}[base]
    o = TrainOptions(model=str(bases["gpt_neox"]), data=str(data), out=str(tmp_path / "run"), lora=True, lora_r=4,
                     seq_len=32, batch_size=2, max_steps=1, eval_every=0, save_every=0, progress=False, **quant)
    t = Trainer(o)
    t.run()
    base_b, trained_b = held_bytes(t.model)
    assert (base_b, trained_b) == (t.plan.base_bytes, t.plan.trained_bytes)
    state = sum(v.numel() * v.element_size() for s in t.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    assert state == t.plan.optimizer_bytes == optimizer_bytes(t.model, "adamw")
    assert t.plan.grad_bytes == sum(p.numel() * 4 for _, p in t.named)
    # --dry-run prints the same table without loading a weight
    flags = ["--dtype", "bfloat16"] if base == "bf16" else (["--quantize", quant["quantize"]] if "quantize" in quant else [])
    assert main(["train", "--model", str(bases["gpt_neox"]), "--lora", "--lora-r", "4", "--seq-len", "32",
                 "--batch-size", "2", "--dry-run", *flags]) == 0
    table = capsys.readouterr().out
    assert f"{t.plan.params_total:,} total, {t.plan.params_trained:,} trained" in table


RSS_RUN = r"""
import json, sys
import torch
from torch.utils.checkpoint import checkpoint
from kaki.train import loop
from kaki.train.memory import rss_bytes
from kaki.train.options import TrainOptions
t = loop.Trainer(TrainOptions(**json.loads(sys.argv[1])))
# The framework's own first-use costs (non-reentrant checkpointing loads ~85 MB of code and state
# once per process) belong to the baseline, not to the run's tensors.
lin = torch.nn.Linear(4, 4)
checkpoint(lin, torch.randn(2, 4, requires_grad=True), use_reentrant=False).sum().backward()
base = rss_bytes()
t.run()
print(json.dumps({"grew": rss_bytes(peak=True) - base, "total": t.plan.total}))
"""


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, spm_dir):
    """A 224 MB (fp32) Llama: 59.7 M parameters, a 32k vocabulary."""
    root = tmp_path_factory.mktemp("rss")
    path = hf_model_dir("llama", root / "m", spm_dir, hidden_size=512, intermediate_size=1408,
                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                        max_position_embeddings=512)[1]
    data = root / "d.jsonl"
    lines = corpus(400, seed=3)
    data.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 8])}) + "\n" for i in range(0, 400, 8)))
    return path, data


@pytest.mark.parametrize("quant", [{"quantize": "int8"}, {"quantize": "int4"}, {}])
def test_dry_run_total_is_within_25_percent_of_peak_rss(small_model, tmp_path, quant):
    """Sequence 256, batch 1, activation checkpointing, LoRA r=16 on all linear layers: the table's
    total against the run's peak RSS minus the RSS before the model loads."""
    path, data = small_model
    o = dict(model=str(path), data=str(data), out=str(tmp_path / "run"), lora=True, lora_r=16, seq_len=256,
             batch_size=1, activation_checkpointing=True, max_steps=2, eval_every=0, save_every=0, progress=False,
             **quant)
    # One thread: the peak RSS does not depend on it (measured within 1% of two threads), and on a
    # shared 2-core machine two threads' OpenMP barriers made these runs 3-10x slower (5 s vs 20-48 s).
    p = subprocess.run([sys.executable, "-c", RSS_RUN, json.dumps(o)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert abs(r["total"] - r["grew"]) <= 0.25 * r["grew"], r


def test_a_run_that_cannot_fit_stops_before_the_first_step(root, tmp_path, capsys):
    _, bases, data = root
    out = tmp_path / "run"
    rc = main(["train", "--model", str(bases["llama"]), "--data", str(data), "--out", str(out), "--max-steps", "2",
               "--memory-budget", "0.0001", *COMMON])
    err = capsys.readouterr().err
    assert rc == 2
    error = [line for line in err.splitlines() if line.startswith("kaki train: error:")]
    assert len(error) == 1 and "make it fit" in error[0]
    assert "memory: LoRA r=4" in err and "does NOT fit" in err and "activations (estimate)" in err
    # Nothing was loaded or trained: no "model ..." line after the table, and (issue #19) no run
    # directory left behind.
    assert "parameters, " not in err.split("does NOT fit")[-1]
    assert not out.exists()


def test_resume_refuses_another_base_format(root, tmp_path, capsys):
    _, bases, data = root
    argv = ["train", "--model", str(bases["llama"]), "--data", str(data), "--out", str(tmp_path / "r"),
            "--max-steps", "4", "--stop-at-step", "2", "--save-every", "2", "--eval-every", "0", *COMMON]
    assert main([*argv, *BASES["int8"]]) == 0
    assert main([*argv, "--resume"]) == 2
    assert "--quantize int8 (now None)" in capsys.readouterr().err


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("n", [48, 176, 320])
@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
def test_block_wise_input_gradient_equals_the_dequantized_product(monkeypatch, fmt, n, device):
    """FrozenLinear's backward, grad @ W over blocks of W's rows (int4 on CPU: dequantized from the
    kernel's blocked layout, transposed, into one reused buffer), equals grad @ the dequantized
    weight, with blocks small enough that a layer has several and a partial last one. On CUDA the
    layers hold their plain codes, as the trainer loads them there, and the forward runs the
    same blocks."""
    from kaki.quant import int4, int8
    from kaki.quant.train import base_output, input_grad

    monkeypatch.setattr("kaki.quant.train.BLOCK_ELEMS", 64 * 128)  # 64 rows of 128 inputs a block
    dev = torch.device(device)
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, 128, generator=g)
    if fmt == "bf16":
        layer = torch.nn.Linear(128, n, bias=False, dtype=torch.bfloat16, device=dev).requires_grad_(False)
        layer.weight.copy_(w)
        ref_w = layer.weight.float()
    else:
        layer = int4.Int4Linear(128, n, bias=False, group=32) if fmt == "int4" else int8.Int8Linear(128, n, bias=False)
        layer.set_float(w, dev, keep_plain=dev.type == "cuda")
        ref_w = layer.dequantized(torch.float32)
    if fmt == "int4" and dev.type == "cpu":  # only the blocked copy is kept; the reference is from plain codes
        assert layer.kernel == "int4pack-cpu" and layer.weight.numel() == 0
        ref_w = int4.dequantize(*int4.quantize(w, 32))
    grad, x = torch.randn(2, 5, n, generator=g).to(dev), torch.randn(2, 5, 128, generator=g).to(dev)
    torch.testing.assert_close(input_grad(layer, grad, torch.float32), grad @ ref_w.to(dev), rtol=1e-5, atol=1e-5)
    if fmt == "int4" and dev.type == "cpu":  # the kernel rounds activations: check the block path
        layer.kernel = "dequantize"
    if fmt == "bf16" or layer.kernel == "dequantize":
        torch.testing.assert_close(base_output(layer, x), x @ ref_w.t().to(dev), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("base", list(BASES))
def test_lora_over_a_frozen_base_on_cuda(root, tmp_path, base):
    """The CUDA path end to end (plain codes, block-dequantized GEMMs, bf16 autocast): the loss falls."""
    _, bases, data = root
    out = tmp_path / "run"
    assert main(["train", "--model", str(bases["llama"]), "--data", str(data), "--out", str(out), "--max-steps", "8",
                 "--eval-every", "1", "--save-every", "0", "--device", "cuda", *COMMON, *BASES[base]]) == 0
    ev = evals(out)
    assert len(ev) == 8 and ev[-1] < ev[0] - 0.05, ev
