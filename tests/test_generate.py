"""The generation loop against transformers: greedy tokens, logprobs, sampling filters, seeds,
stop strings, and the errors a bad request gets."""

from __future__ import annotations

import copy

import pytest
import torch

import kaki
from kaki.errors import ParamError
from kaki.sampling import SamplingParams, sample_token, top_k_filter, top_p_filter

from helpers import PAD, generate_positions, left_pad, random_prompts

FAMILIES = ["persimmon", "gpt_neox", "llama"]
NEW_TOKENS = 40
MIN_COMPARED = 24  # greedy steps compared before the first near-tie, at least
TIE = 1e-4


@pytest.fixture(scope="module")
def llms(family_dirs):
    return {f: kaki.load(path, dtype="float32", device="cpu") for f, (_, path) in family_dirs.items()}


@pytest.fixture(scope="module")
def text_llm(text_model_dir):
    """Greedy output that decodes to words, for text-level tests."""
    return kaki.load(text_model_dir[1], dtype="float32", device="cpu")


def hf_greedy(hf, prompts, n, **kw):
    """transformers' generate, greedy, never stopping early: (new tokens (B, n), scores (B, n, V))."""
    ids, mask = left_pad(prompts)
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=0, do_sample=False,
                      output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=PAD, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def comparable_steps(scores: torch.Tensor) -> int:
    """Steps before the first one whose top two scores are within TIE: past a near-tie, fp32
    rounding may legitimately pick the other token and the sequences diverge."""
    top2 = scores.topk(2, -1).values
    close = ((top2[..., 0] - top2[..., 1]) < TIE).nonzero()
    return int(close[0, 0]) if len(close) else scores.shape[0]


def hf_log_probs(hf, sequences: list[list[int]]) -> torch.Tensor:
    """log_softmax of transformers' logits over full sequences, left-padded, generate's positions:
    (B, S, V) aligned to the right end."""
    ids, mask = left_pad(sequences)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=generate_positions(mask)).logits
    return torch.log_softmax(logits.float(), -1)


# ----------------------------------------------------------------------------- greedy parity


@pytest.mark.parametrize("lengths", [[11], [5, 17, 1, 9]], ids=["batch1", "mixed-batch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(family_dirs, llms, family, lengths):
    hf, _ = family_dirs[family]
    prompts = random_prompts(lengths, seed=21)
    ref, scores = hf_greedy(hf, prompts, NEW_TOKENS)
    out = llms[family].generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for row, c in enumerate(out):
        n = comparable_steps(scores[row])
        assert n >= MIN_COMPARED, f"row {row}: near-tie after {n} steps; the test model is too flat"
        assert c.token_ids[:n] == ref[row, :n].tolist(), f"row {row}"
        assert len(c.token_ids) == NEW_TOKENS and c.finish_reason == "length"
        assert c.prompt_token_ids == prompts[row]


def test_greedy_with_repetition_penalty_equals_transformers(family_dirs, llms):
    hf, _ = family_dirs["persimmon"]
    prompts = random_prompts([13], seed=22)
    ref, scores = hf_greedy(hf, prompts, NEW_TOKENS, repetition_penalty=1.5)
    plain, _ = hf_greedy(hf, prompts, NEW_TOKENS)
    assert not torch.equal(ref, plain)  # the penalty changes this output, so the test can fail
    out = llms["persimmon"].generate(prompts, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5, ignore_eos=True)
    n = comparable_steps(scores[0])
    assert n >= MIN_COMPARED
    assert out[0].token_ids[:n] == ref[0, :n].tolist()


def test_stream_yields_the_generated_text(text_llm):
    llm = text_llm
    prompt = "The man said"
    full = llm.generate(prompt, max_new_tokens=30, ignore_eos=True)[0]
    pieces = list(llm.stream(prompt, max_new_tokens=30, ignore_eos=True))
    assert "".join(pieces) == full.text == llm.tokenizer.decode(full.token_ids)
    assert len(pieces) > 1


# ----------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_equal_transformers_log_softmax(family_dirs, llms, family):
    hf, _ = family_dirs[family]
    prompts = random_prompts([6, 10, 3], seed=23)
    out = llms[family].generate(prompts, max_new_tokens=12, temperature=0.7, seed=5, logprobs=True,
                                top_logprobs=3, prompt_logprobs=True, ignore_eos=True)
    full = [p + c.token_ids for p, c in zip(prompts, out)]
    lp = hf_log_probs(hf, full)
    S = lp.shape[1]
    for row, (p, c) in enumerate(zip(prompts, out)):
        seq = full[row]
        start = S - len(seq)  # left padding
        # logprob of token t given tokens < t sits at position t-1
        want = [lp[row, start + t - 1, seq[t]].item() for t in range(len(p), len(seq))]
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want), atol=1e-4, rtol=0)
        for step, top in enumerate(c.top_logprobs):
            ref_vals, ref_ids = lp[row, start + len(p) + step - 1].topk(3)
            assert [i for i, _ in top] == ref_ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in top]), ref_vals, atol=1e-4, rtol=0)
        want_prompt = [lp[row, start + t - 1, seq[t]].item() for t in range(1, len(p))]
        assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(p)
        torch.testing.assert_close(torch.tensor(c.prompt_logprobs[1:]), torch.tensor(want_prompt),
                                   atol=1e-4, rtol=0)


def test_logprobs_off_by_default(llms):
    c = llms["llama"].generate([[5, 6, 7]], max_new_tokens=3)[0]
    assert c.logprobs is None and c.top_logprobs is None and c.prompt_logprobs is None


# ----------------------------------------------------------------------------- sampling filters


@pytest.mark.parametrize("k", [1, 2, 7, 50])
def test_top_k_mask_equals_transformers(k):
    from transformers.generation import TopKLogitsWarper

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(k))
    ref = TopKLogitsWarper(top_k=k)(None, logits.clone())
    got = torch.stack([top_k_filter(row, k) for row in logits])
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert (~torch.isinf(got)).sum(-1).tolist() == [k] * 4


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_mask_equals_transformers(p):
    from transformers.generation import TopPLogitsWarper

    logits = 3 * torch.randn(4, 100, generator=torch.Generator().manual_seed(int(p * 100)))
    ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
    got = torch.stack([top_p_filter(row, p) for row in logits])
    assert torch.equal(torch.isinf(got), torch.isinf(ref))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda p: (~torch.isinf(top_p_filter(logits, p))).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.4) == [0]
    assert kept(0.7) == [0, 1]
    assert kept(0.9) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]


def test_sampling_never_picks_outside_top_k_or_top_p():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    top3 = set(logits.topk(3).indices.tolist())
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[:int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    g = torch.Generator().manual_seed(1)
    by_k = [sample_token(logits, SamplingParams(temperature=3.0, top_k=3), g) for _ in range(300)]
    by_p = [sample_token(logits, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(300)]
    assert set(by_k) == top3  # all of the top 3, and nothing else
    assert set(by_p) <= nucleus and len(set(by_p)) > 1


def test_generated_tokens_stay_in_top_k_of_transformers_logits(family_dirs, llms):
    hf, _ = family_dirs["gpt_neox"]
    prompts = random_prompts([8, 4], seed=24)
    out = llms["gpt_neox"].generate(prompts, max_new_tokens=30, temperature=5.0, top_k=3, seed=9, ignore_eos=True)
    full = [p + c.token_ids for p, c in zip(prompts, out)]
    lp = hf_log_probs(hf, full)
    S, not_argmax = lp.shape[1], 0
    for row, (p, c) in enumerate(zip(prompts, out)):
        start = S - len(full[row])
        for t, tok in enumerate(c.token_ids):
            dist = lp[row, start + len(p) + t - 1]
            assert tok in dist.topk(3).indices.tolist()
            not_argmax += tok != int(dist.argmax())
    assert not_argmax > 5  # it really sampled, so a missing top-k mask would have shown


# ----------------------------------------------------------------------------- seeds


def test_same_seed_same_output_whatever_else_is_in_the_batch(llms):
    llm = llms["persimmon"]
    a, b, c = random_prompts([7, 12, 3], seed=25)
    kw = dict(max_new_tokens=24, temperature=1.5, ignore_eos=True)
    alone = llm.generate([a], seed=1234, **kw)[0].token_ids
    again = llm.generate([a], seed=1234, **kw)[0].token_ids
    sp = [SamplingParams(seed=77, **kw), SamplingParams(seed=1234, **kw), SamplingParams(seed=5, **kw)]
    *_, (_, batch) = llm.run([b, a, c], sp, stream=False)
    other_seed = llm.generate([a], seed=4321, **kw)[0].token_ids
    assert alone == again
    assert batch[1].token_ids == alone
    assert other_seed != alone  # the seed matters, so equality above is not an accident
    assert batch[0].token_ids != batch[2].token_ids


def test_unseeded_sampling_varies(llms):
    llm = llms["persimmon"]
    kw = dict(max_new_tokens=16, temperature=1.5, ignore_eos=True)
    outs = {tuple(llm.generate([[5, 6, 7]], **kw)[0].token_ids) for _ in range(3)}
    assert len(outs) > 1


# ----------------------------------------------------------------------------- stopping


def _boundary_stop(llm, token_ids: list[int], text: str) -> str:
    """A 4-character stop string that spans the boundary between two generated tokens."""
    for j in range(len(token_ids) // 3, len(token_ids) - 2):
        head = llm.tokenizer.decode(token_ids[:j])
        if "\ufffd" in head or not text.startswith(head) or len(head) < 3:
            continue
        stop = text[len(head) - 2:len(head) + 2]
        if len(stop) == 4 and stop.strip() == stop and text.find(stop) == len(head) - 2:
            return stop
    raise AssertionError(f"no clean token boundary in {text!r}")


def test_stop_string_across_tokens_ends_generation_and_is_not_returned(text_llm):
    llm = text_llm
    prompt = "The man said"
    base = llm.generate(prompt, max_new_tokens=40, ignore_eos=True)[0]
    stop = _boundary_stop(llm, base.token_ids, base.text)
    expected = base.text[:base.text.find(stop)]
    out = llm.generate(prompt, max_new_tokens=40, ignore_eos=True, stop=[stop])[0]
    assert out.text == expected and out.finish_reason == "stop"
    assert len(out.token_ids) < len(base.token_ids)
    streamed = "".join(llm.stream(prompt, max_new_tokens=40, ignore_eos=True, stop=[stop]))
    assert streamed == expected and stop not in streamed


def test_stop_token_ids_and_eos(llms):
    llm = llms["llama"]
    prompt = [[9, 10, 11]]
    base = llm.generate(prompt, max_new_tokens=20, ignore_eos=True)[0].token_ids
    target = base[6]
    first = base.index(target)
    out = llm.generate(prompt, max_new_tokens=20, ignore_eos=True, stop_token_ids=[target])[0]
    assert out.token_ids == base[:first + 1] and out.finish_reason == "stop"
    # the model's EOS (config eos_token_id) stops generation unless ignore_eos
    tokenizer = copy.copy(llm.tokenizer)  # the module's shared LLM keeps its own
    tokenizer.eos_ids = [target]
    llm_eos = kaki.LLM(llm.model, tokenizer, llm.path)
    out = llm_eos.generate(prompt, max_new_tokens=20)[0]
    assert out.token_ids == base[:first + 1] and out.finish_reason == "stop"


def test_max_new_tokens_and_zero(llms):
    llm = llms["gpt_neox"]
    assert len(llm.generate([[5, 6]], max_new_tokens=7, ignore_eos=True)[0].token_ids) == 7
    c = llm.generate([[5, 6]], max_new_tokens=0)[0]
    assert c.token_ids == [] and c.finish_reason == "length"


# ----------------------------------------------------------------------------- bad requests


def test_prompt_longer_than_context(llms):
    llm = llms["persimmon"]
    ctx = llm.context_length
    with pytest.raises(ParamError, match=rf"prompt: is {ctx + 5:,} tokens but the model's context is {ctx:,}"):
        llm.generate([list(range(3, 3 + ctx + 5))], max_new_tokens=1)
    text = "the man " * ctx
    with pytest.raises(ParamError, match="shorten it"):
        llm.generate(text, max_new_tokens=1)


def test_generation_is_capped_at_the_context(llms):
    llm = llms["persimmon"]
    ctx = llm.context_length
    out = llm.generate([[5] * (ctx - 3)], max_new_tokens=50, ignore_eos=True)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_top_p_outside_0_1(llms, bad):
    with pytest.raises(ParamError, match=r"top_p: must be in \(0, 1\]"):
        llms["llama"].generate("hi", top_p=bad)


@pytest.mark.parametrize("field,value,message", [
    ("max_new_tokens", -1, "max_new_tokens: must be a whole number >= 0"),
    ("max_new_tokens", 2.5, "max_new_tokens: must be a whole number >= 0"),
    ("temperature", -1.0, "temperature: must be >= 0"),
    ("top_k", -3, "top_k: must be a whole number >= 0"),
    ("repetition_penalty", 0.0, "repetition_penalty: must be > 0"),
    ("seed", -1, "seed: must be a whole number >= 0"),
    ("top_logprobs", 99, "top_logprobs: must be a whole number from 0 to 20"),
    ("temprature", 1.0, "temprature: is not a sampling parameter"),
])
def test_bad_sampling_parameters_are_named(llms, field, value, message):
    with pytest.raises(ParamError, match=message) as e:
        llms["llama"].generate("hi", **{field: value})
    assert e.value.field == field


def test_token_ids_outside_vocabulary(llms):
    llm = llms["llama"]
    with pytest.raises(ParamError, match=r"token ids must be integers in \[0, 320\)"):
        llm.generate([[5, 999]], max_new_tokens=1)


# ----------------------------------------------------------------------------- rows that leave early


def test_rows_finishing_at_different_steps_leave_the_others_unchanged(family_dirs, llms):
    """Rows that stop early leave the batch (the cache shrinks); the rest go on exactly as in
    transformers' batch, where every row runs to the end."""
    hf, _ = family_dirs["persimmon"]
    prompts = random_prompts([6, 14, 2, 9], seed=26)
    ref, scores = hf_greedy(hf, prompts, NEW_TOKENS)
    stop_at = int(ref[3, 4])  # row 3 stops at its 5th token (or earlier, if that id came before)
    params = [SamplingParams(max_new_tokens=3, ignore_eos=True),
              SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
              SamplingParams(max_new_tokens=17, ignore_eos=True),
              SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, stop_token_ids=[stop_at])]
    *_, (_, out) = llms["persimmon"].run(prompts, params, stream=False)
    expect_len = [3, NEW_TOKENS, 17, ref[3].tolist().index(stop_at) + 1]
    for row, c in enumerate(out):
        n = min(comparable_steps(scores[row]), expect_len[row])
        assert n >= min(MIN_COMPARED, expect_len[row])
        assert len(c.token_ids) == expect_len[row], row
        assert c.token_ids[:n] == ref[row, :n].tolist(), row
    assert [c.finish_reason for c in out] == ["length", "length", "length", "stop"]


def test_prompt_logprobs_alone_score_a_text(family_dirs, llms):
    """max_new_tokens=0 with prompt_logprobs: scoring, nothing generated."""
    hf, _ = family_dirs["llama"]
    prompts = random_prompts([8, 5], seed=27)
    out = llms["llama"].generate(prompts, max_new_tokens=0, prompt_logprobs=True)
    lp = hf_log_probs(hf, prompts)
    S = lp.shape[1]
    for row, (p, c) in enumerate(zip(prompts, out)):
        assert c.token_ids == [] and c.finish_reason == "length"
        start = S - len(p)
        want = [lp[row, start + t - 1, p[t]].item() for t in range(1, len(p))]
        assert c.prompt_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(c.prompt_logprobs[1:]), torch.tensor(want), atol=1e-4, rtol=0)
