"""kaki's one model against transformers' four, loaded through kaki's production loader.

Every case is a tiny random transformers model saved to disk and read back by `kaki.load`; the
reference is the same directory run by transformers with the inputs its `generate` builds:
left-padded batch, attention_mask, positions = cumsum(mask) - 1, then one-token cached steps.
"""

from __future__ import annotations

import pytest
import torch

import kaki
from kaki.engine import RowCache

from helpers import generate_positions, hf_model_dir, left_pad, random_prompts

# The flags in which the families differ, each value at least once.
CASES = [
    ("persimmon", {}),  # rotary 0.5, q/k LayerNorm on: the published configuration
    ("persimmon", {"partial_rotary_factor": 1.0}),
    ("persimmon", {"qk_layernorm": False}),
    ("persimmon", {"qk_layernorm": False, "partial_rotary_factor": 1.0}),
    ("gpt_neox", {"use_parallel_residual": True, "rotary_pct": 0.25}),  # Pythia
    ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 0.25}),
    ("gpt_neox", {"use_parallel_residual": True, "rotary_pct": 1.0}),
    ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 1.0}),
    ("llama", {"num_key_value_heads": 1}),  # multi-query
    ("llama", {"num_key_value_heads": 2}),  # grouped-query
    ("llama", {"num_key_value_heads": 4}),  # multi-head
    ("llama", {"num_key_value_heads": 2, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # Llama 3.1 scaling; original context 64 puts head_dim 16's frequencies in all three bands.
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("llama", {"tie_word_embeddings": True}),  # Llama 3.2 1B/3B
    ("gptj", {}),  # interleaved rotary on 8 of 16 dims, one shared LayerNorm, lm_head bias
    ("gptj", {"rotary_dim": 16}),
    ("gptj", {"n_inner": 160}),
]
IDS = [f"{f}-" + ("-".join(f"{k}={v if not isinstance(v, dict) else v['rope_type']}" for k, v in o.items())
                  or "default") for f, o in CASES]

FP32_TOL = 1e-5
LENGTHS = [9, 4, 1, 7]  # mixed lengths, one single-token prompt: left padding on three rows
DECODE_STEPS = 5


def _hf_steps(hf, ids, mask, steps):
    """transformers' logits for the prefill and `steps` greedy one-token cached steps, driven the
    way its generate drives them. Returns (prefill logits, [step logits], [step tokens])."""
    pos = generate_positions(mask)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    prefill, past = out.logits, out.past_key_values
    last_pos = pos[:, -1:]
    step_logits, step_tokens = [], []
    tok = prefill[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        last_pos = last_pos + 1
        step_tokens.append(tok)
        with torch.no_grad():
            out = hf(input_ids=tok, attention_mask=mask, position_ids=last_pos, cache=past,
                     use_cache=True)
        past = out.past_key_values
        step_logits.append(out.logits[:, -1])
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, step_logits, step_tokens


def _kaki_steps(model, ids, mask, step_tokens):
    """kaki's logits for the same prefill and the same one-token steps (fed transformers' tokens,
    so a near-tie can never make the two walk different paths)."""
    B, S = ids.shape
    pos = generate_positions(mask)
    cache = RowCache(model.config, B, S + len(step_tokens), model.dtype, model.device)
    cache.use(0, B)
    with torch.inference_mode():
        prefill = model(ids, pos, cache, mask.bool())
        last_pos = pos[:, -1:]
        steps = []
        for tok in step_tokens:
            last_pos = last_pos + 1
            steps.append(model(tok, last_pos, cache, last_only=True)[:, -1])
    return prefill, steps


@pytest.mark.parametrize("family,overrides", CASES, ids=IDS)
def test_fp32_prefill_and_cached_decode_match_transformers(tmp_path, spm_dir, family, overrides):
    hf, path = hf_model_dir(family, tmp_path / "m", spm_dir, **overrides)
    llm = kaki.load(path, dtype="float32", device="cpu")
    assert llm.model.dtype == torch.float32
    ids, mask = left_pad(random_prompts(LENGTHS, seed=1))

    ref_prefill, ref_steps, tokens = _hf_steps(hf, ids, mask, DECODE_STEPS)
    got_prefill, got_steps = _kaki_steps(llm.model, ids, mask, tokens)

    real = mask.bool()  # pad positions' logits are never read by anyone
    torch.testing.assert_close(got_prefill[real], ref_prefill[real], atol=FP32_TOL, rtol=0)
    for step, (got, ref) in enumerate(zip(got_steps, ref_steps)):
        torch.testing.assert_close(got, ref, atol=FP32_TOL, rtol=0, msg=lambda m: f"decode step {step}: {m}")


# bf16 keeps 8 significant bits: one rounding of a value x moves it by up to |x| * 2^-8. Two
# implementations that differ only in the order of a few fp32 accumulations before rounding can
# therefore disagree by a few bf16 ulps at the largest activations, and the differences compound
# through the layers. We accept what bf16 itself cannot resolve and nothing more: kaki-bf16 may
# differ from transformers-bf16 by at most 4 ulps of the largest logit, and its error against
# the fp32 truth must be no more than 1.5x (plus one ulp) transformers-bf16's own error.
BF16_ULPS = 4


BF16_CASES = [("persimmon", {}), ("gpt_neox", {}), ("gpt_neox", {"use_parallel_residual": False}),
              ("llama", {"num_key_value_heads": 1}), ("gptj", {})]


@pytest.mark.parametrize("family,overrides", BF16_CASES,
                         ids=[f"{f}-{'-'.join(map(str, o.values())) or 'default'}" for f, o in BF16_CASES])
def test_bf16_matches_transformers_within_bf16_resolution(tmp_path, spm_dir, family, overrides):
    import transformers

    _, path = hf_model_dir(family, tmp_path / "m", spm_dir, **overrides)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = kaki.load(path, dtype="bfloat16", device="cpu")
    assert llm.model.dtype == torch.bfloat16
    ids, mask = left_pad(random_prompts(LENGTHS, seed=2))

    ref16, ref16_steps, tokens = _hf_steps(hf16, ids, mask, DECODE_STEPS)
    truth, truth_steps, _ = _hf_steps_forced(hf32, ids, mask, tokens)
    got, got_steps = _kaki_steps(llm.model, ids, mask, tokens)

    real = mask.bool()
    pairs = [(got[real], ref16[real], truth[real])] + list(zip(got_steps, ref16_steps, truth_steps))
    for got_l, ref_l, truth_l in pairs:
        ulp = ref_l.float().abs().max().item() * 2 ** -8
        assert (got_l.float() - ref_l.float()).abs().max().item() <= BF16_ULPS * ulp
        kaki_err = (got_l.float() - truth_l).abs().max().item()
        hf_err = (ref_l.float() - truth_l).abs().max().item()
        assert kaki_err <= 1.5 * hf_err + ulp, (kaki_err, hf_err)


def _hf_steps_forced(hf, ids, mask, tokens):
    """Like _hf_steps but feeding the given tokens (fp32 truth along the bf16 path)."""
    pos = generate_positions(mask)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    prefill, past, last_pos, steps = out.logits, out.past_key_values, pos[:, -1:], []
    for tok in tokens:
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        last_pos = last_pos + 1
        with torch.no_grad():
            out = hf(input_ids=tok, attention_mask=mask, position_ids=last_pos, cache=past,
                     use_cache=True)
        past = out.past_key_values
        steps.append(out.logits[:, -1])
    return prefill, steps, tokens


@pytest.mark.parametrize("family", ["persimmon", "gpt_neox", "llama", "gptj"])
def test_cached_decoding_equals_full_recomputation(family_dirs, family):
    """Prefill + one-token cached steps give the logits a single uncached forward over the whole
    sequence gives (different GEMM shapes, so equal up to fp32 rounding, not bit for bit)."""
    _, path = family_dirs[family]
    model = kaki.load(path, dtype="float32", device="cpu").model
    ids, mask = left_pad(random_prompts([6, 3, 8], seed=3))
    pos = generate_positions(mask)
    extra = torch.tensor(random_prompts([6, 6, 6], seed=4))  # (B, 6) tokens fed one by one
    B, S = ids.shape
    cache = RowCache(model.config, B, S + extra.shape[1], model.dtype, "cpu")
    cache.use(0, B)
    with torch.inference_mode():
        prefill = model(ids, pos, cache, mask.bool())
        steps = [model(extra[:, i:i + 1], pos[:, -1:] + 1 + i, cache)[:, -1] for i in range(extra.shape[1])]
        full_ids = torch.cat([ids, extra], 1)
        full_valid = torch.cat([mask.bool(), torch.ones_like(extra, dtype=torch.bool)], 1)
        full_pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(extra.shape[1])], 1)
        full = model(full_ids, full_pos, None, full_valid)
    torch.testing.assert_close(prefill[mask.bool()], full[:, :S][mask.bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, S:], atol=1e-5, rtol=0)
    # The comparison is not vacuous: a cache that forgot the prompt would change these logits.
    fresh = RowCache(model.config, B, extra.shape[1], model.dtype, "cpu")
    fresh.use(0, B)
    with torch.inference_mode():
        forgetful = model(extra[:, :1], pos[:, -1:] + 1, fresh)[:, -1]
    assert (forgetful - steps[0]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["persimmon", "gpt_neox", "llama", "gptj"])
def test_cuda_matches_transformers_on_cuda(tmp_path, spm_dir, family, dtype):
    """The same comparison on a GPU, both sides on CUDA. GPU attention kernels reduce in a
    different order than CPU ones, so fp32 is held to 1e-4 rather than 1e-5; bf16 to the ulp
    bound above."""
    import transformers

    torch_dtype = getattr(torch, dtype)
    _, path = hf_model_dir(family, tmp_path / "m", spm_dir)
    # .to("cuda") keeps inv_freq fp32, as from_pretrained(dtype=...) does
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval().to("cuda")
    llm = kaki.load(path, dtype=dtype, device="cuda")
    assert llm.model.device.type == "cuda" and llm.model.dtype == torch_dtype
    ids, mask = (t.cuda() for t in left_pad(random_prompts(LENGTHS, seed=5)))
    ref, ref_steps, tokens = _hf_steps(hf, ids, mask, DECODE_STEPS)
    got, got_steps = _kaki_steps(llm.model, ids, mask, tokens)
    real = mask.bool()
    for got_l, ref_l in [(got[real], ref[real])] + list(zip(got_steps, ref_steps)):
        tol = 1e-4 if dtype == "float32" else BF16_ULPS * ref_l.float().abs().max().item() * 2 ** -8
        assert (got_l.float() - ref_l.float()).abs().max().item() <= tol
    out = llm.generate(random_prompts([5, 9], seed=6), max_new_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
    assert all(len(c.token_ids) == 8 for c in out)
