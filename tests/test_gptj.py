"""GPT-J (GPT-JT-Moderation-6B's family) in kaki's one model, against transformers' GPTJForCausalLM.

Logit parity, cached decoding and saving are in test_model_parity.py and test_loading.py with the
other families; this file covers what is GPT-J's own: the interleaved rotary layout, greedy
generation through kaki's engine, GPT-J's published checkpoint layout (transformers-4 config.json
with `n_inner: null`, a .bin carrying causal-mask buffers), `kaki info`, quantization and LoRA names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import kaki
from kaki.checkpoint import renamer
from kaki.config import read_config
from kaki.loading import load_model
from kaki.model import apply_rotary, rotate_every_two, rotate_half

from helpers import PAD, generate_positions, hf_model_dir, left_pad, random_prompts

NEW_TOKENS = 40
MIN_COMPARED = 24  # greedy steps compared before the first near-tie, at least
TIE = 1e-4


@pytest.fixture(scope="module")
def gptj(tmp_path_factory, spm_dir):
    """(transformers model, its directory, kaki LLM on it)."""
    hf, path = hf_model_dir("gptj", tmp_path_factory.mktemp("gptj"), spm_dir)
    return hf, path, kaki.load(path, dtype="float32", device="cpu")


def logits_at_real_tokens(model, ids, mask):
    with torch.inference_mode():
        return model(ids, generate_positions(mask), None, mask.bool())[mask.bool()]


def hf_logits_at_real_tokens(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=generate_positions(mask)).logits[mask.bool()]


# ----------------------------------------------------------------------------- rotary layout


def test_interleaved_rotary_equals_transformers_gptj_rotary():
    from transformers.models.gptj import modeling_gptj as ref

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)  # (B, S, H, R): transformers' GPT-J layout
    assert torch.equal(rotate_every_two(x), ref.rotate_every_two(x))
    assert not torch.equal(rotate_every_two(x), rotate_half(x))  # the layouts really differ

    angles = torch.randn(2, 5, 4, generator=g)  # (B, S, R/2)
    want = ref.apply_rotary_pos_emb(x, angles.sin(), angles.cos())
    cos = angles.cos().repeat_interleave(2, -1)[:, None]  # (B, 1, S, R), kaki's cos/sin layout
    sin = angles.sin().repeat_interleave(2, -1)[:, None]
    got = apply_rotary(x.transpose(1, 2), cos, sin, 8, rotate_every_two).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_each_gptj_flag_changes_the_logits(gptj):
    """The parity tests cannot pass by accident: turning any one GPT-J flag off breaks them."""
    hf, path, llm = gptj
    ids, mask = left_pad(random_prompts([7, 3], seed=30))
    want = hf_logits_at_real_tokens(hf, ids, mask)
    torch.testing.assert_close(logits_at_real_tokens(llm.model, ids, mask), want, atol=1e-5, rtol=0)
    cfg = llm.config
    for change in ({"rotary_interleaved": False}, {"rotary_dim": 16}):
        other = load_model(path, cfg.replace(**change), torch.float32, torch.device("cpu"))
        assert (logits_at_real_tokens(other, ids, mask) - want).abs().max() > 1e-2, change


# ----------------------------------------------------------------------------- generation


def hf_greedy(hf, prompts, n):
    """transformers' generate, greedy, never stopping early: (new tokens (B, n), scores (B, n, V))."""
    ids, mask = left_pad(prompts)
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=0, do_sample=False,
                      output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=PAD)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def comparable_steps(scores: torch.Tensor) -> int:
    """Steps before the first near-tie, past which fp32 rounding may pick the other token."""
    top2 = scores.topk(2, -1).values
    close = ((top2[..., 0] - top2[..., 1]) < TIE).nonzero()
    return int(close[0, 0]) if len(close) else scores.shape[0]


def test_greedy_tokens_equal_transformers_generate_batched_and_row_by_row(gptj):
    """A left-padded batch gives every row the tokens that row gets alone, and both are
    transformers' tokens."""
    hf, _, llm = gptj
    prompts = random_prompts([5, 17, 1, 9], seed=21)
    ref, scores = hf_greedy(hf, prompts, NEW_TOKENS)
    batched = llm.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for row, prompt in enumerate(prompts):
        n = comparable_steps(scores[row])
        assert n >= MIN_COMPARED, f"row {row}: near-tie after {n} steps; the test model is too flat"
        alone = llm.generate([prompt], max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)[0]
        assert batched[row].token_ids[:n] == ref[row, :n].tolist(), f"row {row} in the batch"
        assert alone.token_ids[:n] == ref[row, :n].tolist(), f"row {row} alone"


def test_left_padded_batch_logits_equal_single_rows(gptj):
    _, _, llm = gptj
    prompts = random_prompts([6, 2, 9], seed=31)
    ids, mask = left_pad(prompts)
    batched = logits_at_real_tokens(llm.model, ids, mask)
    singles = torch.cat([logits_at_real_tokens(llm.model, *left_pad([p])) for p in prompts])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- published layout


def test_published_layout_bin_with_mask_buffers_and_transformers4_config(tmp_path, gptj):
    """GPT-J-6B-era exports: pytorch_model.bin holding attn.bias / attn.masked_bias buffers, and a
    transformers-4 config.json with n_inner null and keys kaki does not model, which a save keeps."""
    hf, src, _ = gptj
    d = tmp_path / "published"
    d.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("model"):
            (d / f.name).write_bytes(f.read_bytes())
    state = dict(hf.state_dict())
    n_pos = hf.config.n_positions
    for i in range(hf.config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool))[None, None]
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    torch.save(state, d / "pytorch_model.bin")
    cfg = json.loads((d / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.update(n_inner=None, transformers_version="4.21.0", rotary=True, scale_attn_weights=True,
               gradient_checkpointing=False)
    (d / "config.json").write_text(json.dumps(cfg))

    c = read_config(d)
    assert (c.intermediate_size, c.rotary_ndims, c.rope_theta) == (4 * 64, 8, 10000.0)
    llm = kaki.load(d, dtype="float32", device="cpu")
    ids, mask = left_pad(random_prompts([7, 3, 5], seed=11))
    want = hf_logits_at_real_tokens(hf, ids, mask)
    torch.testing.assert_close(logits_at_real_tokens(llm.model, ids, mask), want, atol=1e-5, rtol=0)

    out = llm.save(tmp_path / "saved")
    saved = json.loads((out / "config.json").read_text())
    assert saved["rotary"] is True and saved["scale_attn_weights"] is True
    assert saved["n_inner"] == 256 and saved["rotary_dim"] == 8 and saved["architectures"] == ["GPTJForCausalLM"]
    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits_at_real_tokens(reloaded, ids, mask), want, atol=1e-5, rtol=0)


def test_kaki_info(gptj):
    hf, path, _ = gptj
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAKI_MODEL": ""}
    r = subprocess.run([sys.executable, "-m", "kaki", "info", str(path), "--json"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    n = sum(p.numel() for p in hf.parameters())
    assert info["family"] == "gptj" and info["parameters"] == n
    assert info["bytes"]["float32"] == 4 * n
    assert (info["layers"], info["hidden_size"], info["attention_heads"], info["kv_heads"]) == (2, 64, 4, 4)
    assert (info["rotary_dims"], info["context_length"], info["vocab_size"]) == (8, 256, 320)
    text = subprocess.run([sys.executable, "-m", "kaki", "info", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert text.returncode == 0 and "gptj (2 layers" in text.stdout


# ----------------------------------------------------------------------------- quantization, LoRA


@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_quantized_gptj_keeps_head_bias_and_round_trips(tmp_path, gptj, spec):
    from safetensors import safe_open

    from kaki.quant import as_spec, weight_bytes
    from kaki.quant.int4 import Int4Linear
    from kaki.quant.int8 import Int8Linear

    hf, path, llm = gptj
    q = kaki.load(path, dtype="float32", device="cpu", quantize=spec)
    head = q.model.lm_head
    assert isinstance(head, (Int8Linear, Int4Linear))
    assert torch.equal(head.bias, llm.model.lm_head.bias)
    ids, mask = left_pad(random_prompts([7, 3], seed=12))
    want = logits_at_real_tokens(llm.model, ids, mask)
    got = logits_at_real_tokens(q.model, ids, mask)
    assert (got - want).norm() / want.norm() < (0.02 if spec == "int8" else 0.2)
    out = q.save(tmp_path / "q")
    again = kaki.load(out, dtype="float32", device="cpu")
    assert torch.equal(logits_at_real_tokens(again.model, ids, mask), got)
    # kaki info's size for the format is what the save holds (the head's bias stays a float)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert weight_bytes(llm.config, as_spec(spec), float_bytes=4) == stored


def test_lora_targets_take_gptj_names(tmp_path, gptj):
    from kaki.lora import apply_lora, save_adapter

    _, path, _ = gptj
    model = kaki.load(path, dtype="float32", device="cpu").model
    names = apply_lora(model, r=2, alpha=4, targets=["out_proj", "fc_in"])
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.dense", "mlp.dense_h_to_4h")]
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["fc_in", "out_proj"]
    to_ckpt = renamer("gptj", to_checkpoint=True)
    assert to_ckpt("model.layers.1.self_attn.q_proj.weight") == "transformer.h.1.attn.q_proj.weight"
    assert to_ckpt("model.layers.1.input_layernorm.bias") == "transformer.h.1.ln_1.bias"


def test_tied_head_quantized_in_memory_equals_quantized_while_loading(tmp_path, spm_dir):
    """Untying a tied head to quantize it keeps the head's own bias, whichever path unties it."""
    from kaki.quant import quantize_model

    _, path = hf_model_dir("gptj", tmp_path / "tied", spm_dir, tie_word_embeddings=True)
    loaded = kaki.load(path, dtype="float32", device="cpu", quantize="int8").model
    built = quantize_model(kaki.load(path, dtype="float32", device="cpu").model, "int8")
    a, b = loaded.state_dict(), built.state_dict()
    assert "lm_head.bias" in a and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
