"""The id-level engine (kaki.engine): prefix caching is exact and really skips the cached prefix
(counted at model.forward), a tiny budget evicts and stays correct, continuous batching gives the
tokens one-at-a-time runs give, one row's sampling fault fails only that row, abort."""

from __future__ import annotations

import pytest
import torch

import kaki
from kaki import sampling
from kaki.engine import PrefixCache, Scheduler
from kaki.errors import KakiError
from kaki.sampling import SamplingParams

from helpers import random_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)
SEEDED = dict(temperature=1.0, top_k=40, ignore_eos=True)


@pytest.fixture(scope="module")
def llms(family_dirs):
    return {f: kaki.load(family_dirs[f][1], dtype="float32", device="cpu") for f in ("llama", "persimmon")}


def prefix_cache(llm, budget: int = 1 << 24) -> PrefixCache:
    return PrefixCache(llm.config, llm.model.dtype, llm.model.device, budget)


def params(kind: dict, max_new: int, seed: int | None = None, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, seed=seed, logprobs=True, **kind, **kw)


def drive(sched: Scheduler, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> dict:
    """Step `sched` to the end; arrivals[k] are added just before step k. Returns {(k, i):
    (tokens, logprobs, finish_reason)} per request, i its place in arrivals[k]."""
    names, out, step = {}, {}, 0
    while sched.has_work or any(k >= step for k in arrivals):
        for i, (prompt, sp) in enumerate(arrivals.get(step, [])):
            names[sched.add_request(prompt, sp)] = (step, i)
        for e in sched.step():
            toks, lps, _ = out.setdefault(names[e.seq], ([], [], None))
            if e.token is not None:
                toks.append(e.token)
                lps.append(e.logprob)
            if e.finish_reason is not None:
                out[names[e.seq]] = (toks, lps, e.finish_reason)
        step += 1
    return out


def alone(llm, prompt: list[int], sp: SamplingParams) -> tuple[list[int], list[float], str]:
    """One request on its own scheduler, no prefix cache: the reference."""
    return drive(Scheduler(llm.model, llm.eos_ids, max_rows=1), {0: [(prompt, sp)]})[(0, 0)]


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        (t1, lp1, r1), (t2, lp2, r2) = got[key], want[key]
        assert t1 == t2 and r1 == r2, key
        torch.testing.assert_close(torch.tensor(lp1), torch.tensor(lp2), atol=1e-5, rtol=0)


class PositionCounter:
    """Token positions that reach model.forward (padding columns not counted)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = args[0]
        valid = args[3] if len(args) > 3 else kwargs.get("valid")
        self.n += int(valid.sum()) if valid is not None else ids.numel()

    def close(self):
        self.handle.remove()


# ----------------------------------------------------------------------------- prefix caching


@pytest.mark.parametrize("kind", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("family", ["llama", "persimmon"])
def test_prefix_cache_on_and_off_give_identical_outputs(llms, family, kind):
    """Requests that share a prefix, arriving while earlier ones still run and after they end:
    the same tokens (and logprobs) with the prefix cache as without it, and as each alone."""
    llm = llms[family]
    system, a, b, c, d = random_prompts([40, 9, 14, 5, 30], seed=31)
    arrivals = {
        0: [(system + a, params(kind, 20, seed=1))],
        3: [(system + b, params(kind, 12, seed=2)), (system + a + c, params(kind, 9, seed=3))],  # while 0 runs
        30: [(system + a, params(kind, 15, seed=4)), (d, params(kind, 6, seed=5))],  # after all ended
    }
    pc = prefix_cache(llm)
    cached = drive(Scheduler(llm.model, llm.eos_ids, max_rows=4, prefix_cache=pc), arrivals)
    plain = drive(Scheduler(llm.model, llm.eos_ids, max_rows=4), arrivals)
    assert_same(cached, plain)
    assert_same(cached, {(k, i): alone(llm, p, sp) for k, reqs in arrivals.items() for i, (p, sp) in enumerate(reqs)})
    # The cache was really used: the four later requests that share the system prompt all hit
    # (its 32 tokens in two blocks at least).
    assert pc.stats.hit_tokens >= 4 * 32
    assert pc.stats.evictions == 0 and pc.blocks > 0


def test_a_shared_prefix_prefills_only_the_suffix(llms):
    """Counted where the tokens reach model.forward: the second request runs only what follows
    the cached blocks; a follow-up that extends the first request's prompt and reply (a chat's
    next turn) reuses the reply's blocks too."""
    llm = llms["llama"]
    prompt, tail, turn = random_prompts([70, 10, 8], seed=32)
    sp = lambda n: params(GREEDY, n)  # noqa: E731
    counter = PositionCounter(llm.model)
    try:
        pc = prefix_cache(llm)
        sched = Scheduler(llm.model, llm.eos_ids, prefix_cache=pc)
        first = drive(sched, {0: [(prompt, sp(30))]})[(0, 0)]
        assert counter.n == 70 + 29  # the prompt, then one position per fed-back token

        counter.n = 0
        second = drive(sched, {0: [(prompt[:64] + tail, sp(5))]})[(0, 0)]
        assert counter.n == 10 + 4  # blocks 0-3 (64 tokens) came from the cache
        assert sched.prefilled_tokens == 70 + 10 and pc.stats.hit_tokens == 64

        counter.n = 0
        history = prompt + first[0]  # 100 tokens, of which 99 were fed: six full blocks
        third = drive(sched, {0: [(history + turn, sp(5))]})[(0, 0)]
        assert counter.n == (108 - 96) + 4
        assert pc.stats.hit_tokens == 64 + 96
    finally:
        counter.close()
    assert_same({0: second, 1: third}, {0: alone(llm, prompt[:64] + tail, sp(5)), 1: alone(llm, history + turn, sp(5))})


def test_tiny_budget_evicts_and_stays_correct(llms):
    llm = llms["llama"]
    pc = prefix_cache(llm, budget=3 * prefix_cache(llm).block_bytes)
    assert pc.max_blocks == 3
    prompts = random_prompts([50, 40, 45, 50], seed=33)
    reqs = [(p, params(SEEDED, 8, seed=i)) for i, p in enumerate(prompts)]
    reqs += [(prompts[0][:33] + [7, 8], params(GREEDY, 8)), (prompts[3], params(GREEDY, 6))]
    sched = Scheduler(llm.model, llm.eos_ids, max_rows=2, prefix_cache=pc)
    got = drive(sched, {3 * i: [r] for i, r in enumerate(reqs)})
    assert pc.stats.evictions > 0 and pc.blocks <= 3
    assert pc.bytes <= pc.budget_bytes
    assert_same(got, {(3 * i, 0): alone(llm, p, sp) for i, (p, sp) in enumerate(reqs)})


def test_prefix_cache_can_be_turned_off(llms):
    llm = kaki.LLM(llms["llama"].model, llms["llama"].tokenizer)
    prompt = random_prompts([40], seed=34)[0]
    on = llm.generate([prompt, prompt], max_new_tokens=4, ignore_eos=True)
    llm.generate([prompt], max_new_tokens=4, ignore_eos=True)
    assert llm.last_stats["prefilled_tokens"] == 40 - 32
    llm.prefix_cache_bytes = 0
    off = llm.generate([prompt], max_new_tokens=4, ignore_eos=True)
    assert llm.prefix_cache is None and llm.last_stats["prefilled_tokens"] == 40
    assert off[0].token_ids == on[0].token_ids == on[1].token_ids


# ----------------------------------------------------------------------------- continuous batching


def test_more_prompts_than_rows_give_the_one_at_a_time_outputs(llms):
    llm = llms["persimmon"]
    prompts = random_prompts([5, 17, 3, 30, 11, 8, 21], seed=35)
    sps = [params(GREEDY if i % 2 else SEEDED, n, seed=i) for i, n in enumerate([12, 3, 20, 7, 15, 1, 9])]
    sched = Scheduler(llm.model, llm.eos_ids, max_rows=3)
    seen_rows, names, got = set(), {}, {}
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        names[sched.add_request(p, sp)] = i
    steps = 0
    while sched.has_work:
        for e in sched.step():
            toks, lps, _ = got.setdefault(names[e.seq], ([], [], None))
            if e.token is not None:
                toks.append(e.token)
                lps.append(e.logprob)
            if e.finish_reason:
                got[names[e.seq]] = (toks, lps, e.finish_reason)
        seen_rows.add(len(sched.running))
        steps += 1
    assert max(seen_rows) == 3 and sched.cache.rows == 3
    assert steps < sum(sp.max_new_tokens for sp in sps)  # rows ran side by side
    assert_same(got, {i: alone(llm, p, sp) for i, (p, sp) in enumerate(zip(prompts, sps))})

    # LLM.generate with fewer rows than prompts: the same completions as all at once.
    mixed = kaki.LLM(llm.model, llm.tokenizer)
    mixed.max_batch_size = 2
    few = mixed.run(prompts, sps, stream=False)
    *_, (_, few) = few
    *_, (_, wide) = llm.run(prompts, sps, stream=False)
    assert [c.token_ids for c in few] == [c.token_ids for c in wide] == [got[i][0] for i in range(len(prompts))]


def test_a_burst_of_prompts_is_prefilled_over_several_steps(llms):
    """max_prefill_tokens: newcomers share a prefill only up to that many (padded) tokens."""
    llm = llms["llama"]
    prompts = random_prompts([10, 10, 10], seed=39)
    sp = params(GREEDY, 6)
    counter = PositionCounter(llm.model)
    try:
        sched = Scheduler(llm.model, llm.eos_ids, max_rows=3, max_prefill_tokens=20)
        names = {sched.add_request(p, sp): i for i, p in enumerate(prompts)}
        first = sched.step()
        assert counter.n == 20 and len(sched.running) == 2 and len(sched.waiting) == 1
        events = first
        while sched.has_work:
            events += sched.step()
    finally:
        counter.close()
    for seq, i in names.items():
        assert [e.token for e in events if e.seq == seq] == alone(llm, prompts[i], sp)[0]


# ----------------------------------------------------------------------------- faults and aborts


def test_a_sampling_fault_fails_only_its_row(llms, monkeypatch):
    llm = llms["llama"]
    real = sampling.sample_token

    def poisoned(logits, sp, generator, seen=None):
        if sp.seed == 13:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, sp, generator, seen)

    monkeypatch.setattr(sampling, "sample_token", poisoned)
    prompts = random_prompts([6, 9, 4], seed=36)
    sps = [params(SEEDED, 10, seed=1), params(SEEDED, 10, seed=13), params(GREEDY, 10)]
    got = drive(Scheduler(llm.model, llm.eos_ids), {0: list(zip(prompts, sps))})
    assert got.pop((0, 1)) == ([], [], "error")
    assert_same(got, {(0, i): alone(llm, prompts[i], sps[i]) for i in (0, 2)})
    with pytest.raises(KakiError, match="prompt 1 failed: RuntimeError: probability tensor"):
        llm.run(prompts, sps, stream=False).__next__()


def test_abort_ends_one_sequence_and_frees_its_row(llms):
    llm = llms["llama"]
    prompts = random_prompts([6, 9, 4], seed=37)
    sp = params(GREEDY, 12)
    sched = Scheduler(llm.model, llm.eos_ids, max_rows=2)
    a, b, c = (sched.add_request(p, sp) for p in prompts)
    events = sched.step() + sched.step()  # a and b run, c waits
    sched.abort(a)  # row 0: b moves into it
    sched.abort(c)  # still waiting
    assert len(sched.running) == 1 and not sched.waiting
    events += sched.step()
    ends = [e for e in events if e.finish_reason]
    assert {(e.seq, e.token, e.finish_reason) for e in ends} == {(a, None, "abort"), (c, None, "abort")}
    sched.abort(a)  # already ended: nothing happens
    while sched.has_work:
        events += sched.step()
    assert [e.token for e in events if e.seq == b] == alone(llm, prompts[1], sp)[0]
    assert [(e.token is None, e.finish_reason) for e in events if e.seq == a] == [(False, None), (False, None),
                                                                                 (True, "abort")]


def test_a_stream_closed_early_gives_its_blocks_back(llms):
    llm = kaki.LLM(llms["llama"].model, llms["llama"].tokenizer)
    prompt = random_prompts([50], seed=38)[0]
    pieces = llm.stream(prompt, max_new_tokens=40, ignore_eos=True)
    next(pieces)
    held = [b for b in llm.prefix_cache._table.values() if b.refs]
    assert held  # the running sequence holds its prompt's blocks
    pieces.close()
    assert not [b for b in llm.prefix_cache._table.values() if b.refs]


def test_a_failed_forward_pass_fails_only_its_sequences(llms, monkeypatch):
    """A forward pass that raises ends the sequences it carried with "error"; a prefill's failure
    leaves the running rows alone (they finish with their normal tokens), a decode step's fails
    the rows it decoded, and the scheduler serves the next requests normally."""
    llm = llms["llama"]
    model = llm.model
    prompts = random_prompts([6, 9, 13, 7], seed=40)
    sp = params(GREEDY, 10)
    real = type(model).forward
    poison = {"len": 13, "decode": False}

    def faulty(self, input_ids, *args, **kwargs):
        if input_ids.shape[1] == poison["len"] or (poison["decode"] and input_ids.shape[1] == 1):
            raise RuntimeError("CUDA out of memory (injected)")
        return real(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", faulty)
    sched = Scheduler(model, llm.eos_ids, max_rows=4)
    a, b = sched.add_request(prompts[0], sp), sched.add_request(prompts[1], sp)
    events = sched.step() + sched.step()  # a and b decode
    c = sched.add_request(prompts[2], sp)  # its prefill (13 columns) fails
    events += sched.step()
    assert [(e.finish_reason, e.error) for e in events if e.seq == c] == [("error", "RuntimeError: CUDA out of memory (injected)")]
    assert sched.error.startswith("RuntimeError") and len(sched.running) == 2
    while sched.has_work:
        events += sched.step()
    for seq, p in ((a, prompts[0]), (b, prompts[1])):
        assert [e.token for e in events if e.seq == seq and e.token is not None] == alone(llm, p, sp)[0]

    poison.update(len=None, decode=True)
    d, e_ = sched.add_request(prompts[0], sp), sched.add_request(prompts[3], sp)
    events = sched.step() + sched.step()  # prefilled, then the decode step fails both
    assert {(e.seq, e.finish_reason) for e in events if e.finish_reason} == {(d, "error"), (e_, "error")}
    assert not sched.running and not sched.has_work
    poison.update(decode=False)
    got = drive(sched, {0: [(prompts[3], sp)]})[(0, 0)]
    assert got[0] == alone(llm, prompts[3], sp)[0]


def test_poisoned_sampling_values_are_safe_and_leave_the_others_alone(llms):
    """Values validation accepts but fp32 cannot carry (temperature 1e-300, repetition_penalty
    1e-308 or 1e300 with sampling) sample without NaN: a vanishing temperature is greedy, and
    the rows beside them give what they give alone."""
    llm = llms["persimmon"]
    prompts = random_prompts([7, 12, 9, 5], seed=41)
    sps = [params(SEEDED, 12, seed=1), params(dict(temperature=1e-300, ignore_eos=True), 12),
           params(dict(temperature=0.7, repetition_penalty=1e-308, ignore_eos=True), 12, seed=2),
           params(dict(temperature=1e-300, repetition_penalty=1e300, top_p=0.5, ignore_eos=True), 12, seed=3)]
    got = drive(Scheduler(llm.model, llm.eos_ids), {0: list(zip(prompts, sps))})
    assert all(r == "length" for _, _, r in got.values())
    assert got[(0, 1)][0] == alone(llm, prompts[1], params(GREEDY, 12))[0]
    assert_same({k: got[(0, k)] for k in (0, 2, 3)}, {k: alone(llm, prompts[k], sps[k]) for k in (0, 2, 3)})


def test_n_copies_of_a_prompt_prefill_it_once(llms):
    """Sequences admitted together that share a prompt (n > 1) or its first blocks run the shared
    blocks once (counted at model.forward), with the outputs each gets alone."""
    llm = llms["llama"]
    prompt, other = random_prompts([50, 10], seed=42)
    reqs = [(prompt, params(SEEDED, 6, seed=s)) for s in range(3)] + [(prompt[:40] + other, params(GREEDY, 6))]
    counter = PositionCounter(llm.model)
    try:
        pc = prefix_cache(llm)
        got = drive(Scheduler(llm.model, llm.eos_ids, max_rows=4, prefix_cache=pc), {0: reqs})
        # The first copy prefills 50; the others load its 3 blocks (48 tokens) and run 2, the
        # fourth loads 2 blocks (32) and runs 18; then 5 decode steps of 4 rows.
        assert counter.n == 50 + 2 + 2 + 18 + 5 * 4
    finally:
        counter.close()
    assert pc.stats.hit_tokens == 48 + 48 + 32
    assert_same(got, {(0, i): alone(llm, p, sp) for i, (p, sp) in enumerate(reqs)})
