"""Prompt-lookup speculative decoding (kaki.engine.speculative): greedy output equals plain greedy
token for token in fewer target passes than tokens (counted at model.forward), on tiny random
models of every family and the bundled model; sampling sees drafts kept and rejected, and a
seeded request's tokens do not depend on what runs beside it; the acceptance rule has plain
sampling's distribution; stops and limits inside a drafted block end exactly where plain decoding
does; the cache after a rollback holds what a fresh prefill of the same ids gives."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import kaki
from kaki.cli import main as kaki_main
from kaki.engine import PrefixCache, RowCache, Scheduler
from kaki.engine.speculative import NgramDrafter, verify
from kaki.errors import ParamError
from kaki.paths import bundled_model
from kaki.sampling import SamplingParams, apply_repetition_penalty, target_probs

from helpers import random_prompts

FAMILIES = ("llama", "persimmon", "gpt_neox", "gptj")
# Tiny random models whose greedy output falls into loops, so prompt lookup has something to find;
# the random Llama's never repeats within these lengths (its drafts are all rejected: the test
# still checks that the verify pass changes nothing).
LOOPING = ("persimmon", "gpt_neox", "gptj")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine
    OpenMP's hand-offs cost milliseconds per op (a batch of 64 rows ran 15x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llms(family_dirs):
    return {f: kaki.load(family_dirs[f][1], dtype="float32", device="cpu") for f in FAMILIES}


def copying_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a span (what prompt lookup feeds on), of mixed lengths."""
    out = []
    for i, base in enumerate(random_prompts([12 + 5 * i for i in range(n)], seed=seed)):
        out.append(base + base[: 4 + i] + base + base[:3])
    return out


class ForwardCount:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run(model, eos, prompts, sp: SamplingParams | list[SamplingParams], speculative=None, max_rows=8, draft=None):
    """Every prompt on one scheduler to the end: ({i: (tokens, logprobs, finish)}, stats, passes)."""
    sched = Scheduler(model, eos, max_rows=max_rows, speculative=speculative, draft=draft)
    sps = sp if isinstance(sp, list) else [sp] * len(prompts)
    index = {sched.add_request(p, s): i for i, (p, s) in enumerate(zip(prompts, sps))}
    out = {i: ([], [], None) for i in index.values()}
    with ForwardCount(model) as count:
        while sched.has_work:
            for e in sched.step():
                toks, lps, _ = out[index[e.seq]]
                if e.token is not None:
                    toks.append(e.token)
                    lps.append(e.logprob)
                if e.finish_reason is not None:
                    out[index[e.seq]] = (toks, lps, e.finish_reason)
    return out, sched.stats(), count.calls


GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_plain_in_fewer_passes(llms, family):
    llm = llms[family]
    prompts = copying_prompts(3)
    sp = SamplingParams(max_new_tokens=40, **GREEDY)
    plain, _, plain_calls = run(llm.model, llm.eos_ids, prompts, sp)
    spec, stats, spec_calls = run(llm.model, llm.eos_ids, prompts, sp, speculative="ngram:6")
    for i in range(len(prompts)):
        assert spec[i][0] == plain[i][0], f"prompt {i}: speculative greedy differs from plain"
        assert spec[i][2] == plain[i][2] == "length"
        assert spec[i][1] == pytest.approx(plain[i][1], abs=1e-4)  # logprobs from the verify pass
    assert stats["spec_draft_tokens"] > 0
    if family not in LOOPING:
        return
    assert stats["spec_accepted_tokens"] > 0
    assert spec_calls < plain_calls
    # Alone, one sequence: fewer target passes than tokens emitted.
    alone, stats, calls = run(llm.model, llm.eos_ids, prompts[:1], sp, speculative="ngram")
    assert alone[0][0] == plain[0][0]
    assert calls < len(alone[0][0]), f"{calls} passes for {len(alone[0][0])} tokens"
    assert stats["decode_tokens"] == len(alone[0][0]) - 1 > stats["decode_steps"]


def test_bundled_model_greedy_identical():
    path = bundled_model()
    if path is None:
        pytest.skip("no bundled model in this checkout (models/kaki-tiny)")
    llm = kaki.load(path, dtype="float32", device="cpu")
    llm.prefix_cache_bytes = 0
    passage = ("The msvcrt module provides kbhit, which checks whether a keypress is waiting, and getch, "
               "which reads one keypress without echo. ")
    prompt = passage + "Question: which function checks for a keypress? Answer: The msvcrt module provides"
    plain = llm.generate(prompt, max_new_tokens=48, temperature=0.0, ignore_eos=True)[0]
    with ForwardCount(llm.model) as count:
        spec = llm.generate(prompt, max_new_tokens=48, temperature=0.0, ignore_eos=True, speculative="ngram")[0]
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text
    assert count.calls < len(spec.token_ids)
    assert llm.last_stats["spec_accepted_tokens"] > 0


def test_sampling_keeps_and_rejects_drafts_and_ignores_neighbours(llms):
    llm = llms["persimmon"]
    prompts = copying_prompts(2, seed=4)
    sp = SamplingParams(max_new_tokens=48, temperature=0.8, top_k=20, seed=11, ignore_eos=True)
    other = SamplingParams(max_new_tokens=30, temperature=1.0, seed=5, ignore_eos=True, repetition_penalty=1.2)
    alone, stats, _ = run(llm.model, llm.eos_ids, prompts[:1], sp, speculative="ngram:4")
    both, stats_both, _ = run(llm.model, llm.eos_ids, prompts, [sp, other], speculative="ngram:4")
    assert both[0][0] == alone[0][0]
    assert len(alone[0][0]) == 48
    for s in (stats, stats_both):
        assert 0 < s["spec_accepted_tokens"] < s["spec_draft_tokens"], s  # kept and rejected both seen
    again, _, _ = run(llm.model, llm.eos_ids, prompts[:1], sp, speculative="ngram:4")
    assert again[0][0] == alone[0][0]  # seeded: reproducible


def test_acceptance_rule_has_the_target_distribution():
    """Over many seeded draws, the first token's frequencies match the processed target
    distribution p (temperature, top-k, repetition penalty), whatever the draft proposes, and so
    do the second's given the draft was kept."""
    torch.manual_seed(0)
    V = 6
    logits = torch.randn(3, V) * 1.5
    sp = SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3)

    class RowStub:
        params = sp
        generator = None

        def seen_ids(self):
            return torch.tensor([1, 4])

    p0 = target_probs(apply_repetition_penalty(logits[0], torch.tensor([1, 4]), 1.3), sp)
    draft = [int(p0.argmax()), 3]
    p1 = target_probs(apply_repetition_penalty(logits[1], torch.tensor([1, 4, draft[0]]), 1.3), sp)
    n, first, second, kept = 6000, torch.zeros(V), torch.zeros(V), 0
    row = RowStub()
    for i in range(n):
        row.generator = torch.Generator().manual_seed(i)
        picks = verify(logits, row, draft).picks
        first[picks[0].token] += 1
        if picks[0].token == draft[0] and len(picks) > 1:
            kept += 1
            second[picks[1].token] += 1
    assert 0.5 * (first / n - p0).abs().sum() < 0.03
    assert 0.5 * (second / kept - p1).abs().sum() < 0.05
    assert kept > n * 0.2


def test_stops_and_limits_inside_a_drafted_block(llms):
    llm = llms["persimmon"]
    prompt = copying_prompts(1, seed=2)[0]
    base = SamplingParams(max_new_tokens=40, **GREEDY)
    full, _, _ = run(llm.model, llm.eos_ids, [prompt], base)
    toks = full[0][0]
    spec_full, stats, _ = run(llm.model, llm.eos_ids, [prompt], base, speculative="ngram:8")
    assert spec_full[0][0] == toks and stats["spec_accepted_tokens"] > 0
    for limit in (1, 2, 5, 9, 17):  # max_new_tokens anywhere, inside a block or at its end
        sp = SamplingParams(max_new_tokens=limit, **GREEDY)
        got, _, _ = run(llm.model, llm.eos_ids, [prompt], sp, speculative="ngram:8")
        assert got[0][0] == toks[:limit] and got[0][2] == "length"
    for j in (3, 10, 20):  # a stop id first seen at position j
        stop = toks[j]
        first = toks.index(stop)
        sp = SamplingParams(max_new_tokens=40, stop_token_ids=[stop], **GREEDY)
        plain, _, _ = run(llm.model, llm.eos_ids, [prompt], sp)
        got, _, _ = run(llm.model, llm.eos_ids, [prompt], sp, speculative="ngram:8")
        assert got[0][0] == plain[0][0] == toks[:first + 1] and got[0][2] == plain[0][2] == "stop"
        assert got[0][1] == pytest.approx(plain[0][1], abs=1e-4)


def test_stop_strings_through_llm(text_model_dir):
    llm = kaki.load(text_model_dir[1], dtype="float32", device="cpu")
    llm.prefix_cache_bytes = 0
    prompt = "the cat sat on the mat and the cat sat on the mat and the"
    plain = llm.generate(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True)[0]
    words = plain.text.split()
    assert len(words) > 4
    stop = " ".join(words[2:4])
    want = llm.generate(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])[0]
    llm.speculative = "ngram:8"
    got = llm.generate(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert got.finish_reason == "stop"
    streamed = "".join(llm.stream(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert streamed == want.text


def test_cache_after_rollback_equals_a_fresh_prefill(llms):
    llm = llms["gptj"]
    model = llm.model
    prompt = copying_prompts(1, seed=6)[0]
    sched = Scheduler(model, llm.eos_ids, max_rows=2, speculative="ngram:8")
    sp = SamplingParams(max_new_tokens=60, temperature=0.9, seed=3, ignore_eos=True)
    seq = sched.sequence(sched.add_request(prompt, sp))
    # Until drafts have been both kept and rejected (rolled back), 20 tokens at least.
    while not 0 < sched.stats()["spec_accepted_tokens"] < sched.stats()["spec_draft_tokens"] or len(seq.tokens) < 20:
        sched.step()
        assert seq.finish_reason is None
    n = sched.cache.lengths[seq.row]
    ids = seq.prompt + seq.tokens
    assert n == len(ids) - 1  # everything but the last token, whose keys the next step writes
    fresh = Scheduler(model, llm.eos_ids, max_rows=1)
    fresh.add_request(ids[:-1] + [0], SamplingParams(max_new_tokens=1))
    fresh.step()  # prefill: slots [0, n] hold ids[:-1] + the dummy
    k, v = sched.cache.read(seq.row, 0, n)
    k2, v2 = fresh.cache.read(0, 0, n)
    torch.testing.assert_close(k, k2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-4)


def test_drafter_proposes_what_followed_the_latest_match():
    d = NgramDrafter([5, 6, 7, 8, 9, 6, 7, 1, 2], k=3)
    assert d.propose([6, 7], room=10) == [1, 2, 6]  # (6, 7) last seen before 1, 2
    assert d.propose([6, 7, 8], room=10) == [9, 6, 7]  # (6, 7, 8) seen once
    assert d.propose([6, 7, 8, 42], room=10) == []  # 42 never seen
    assert d.propose([6, 7, 8, 42, 5], room=2) == [6, 7]  # room caps the draft


@pytest.mark.parametrize("bad", ["ngram:0", "ngram:99", "draft:0", "model", "ngram:x", 3])
def test_bad_setting_names_the_field(bad):
    with pytest.raises(ParamError, match="speculate"):
        SamplingParams(speculate=bad)
    with pytest.raises(ParamError, match="speculate"):  # the earlier name still works
        SamplingParams(speculative=bad)


def test_row_cache_trim(llms):
    cache = RowCache(llms["llama"].config, 2, 8, torch.float32, "cpu")
    cache.lengths[1] = 5
    cache.trim(1, 2)
    assert cache.lengths == [0, 3]
    with pytest.raises(ValueError, match="cannot drop 4"):
        cache.trim(1, 4)


def test_cli_flag(text_model_dir, capsys):
    """kaki generate --speculate (in this process: the same parser and code as the command)."""
    path = str(text_model_dir[1])
    common = ["generate", "--model", path, "-t", "0", "-n", "24", "--json", "--device", "cpu", "--dtype", "float32",
              "the cat sat on the mat and the cat"]
    assert kaki_main(common) == 0
    plain = capsys.readouterr()
    assert kaki_main(common + ["--speculate", "ngram:6", "--verbose"]) == 0
    spec = capsys.readouterr()
    assert json.loads(spec.out)["token_ids"] == json.loads(plain.out)["token_ids"]
    assert "tokens per target pass" in spec.err and "drafted tokens accepted" in spec.err
    assert kaki_main(common + ["--speculative", "ngram:6"]) == 0  # the earlier name
    assert json.loads(capsys.readouterr().out)["token_ids"] == json.loads(plain.out)["token_ids"]
    with pytest.raises(SystemExit) as e:
        kaki_main(["generate", "--model", path, "--speculate", "ngram:0", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--speculate" in err and "Traceback" not in err


def test_prefix_cached_prompts(llms):
    """Prompts sharing a cached prefix (blocks stored while drafts were kept and rolled back)
    give plain greedy's tokens."""
    llm = llms["gptj"]
    model = llm.model
    base = copying_prompts(1, seed=8)[0]
    prompts = [base, base + [5, 9], base[:30] + [7]]
    sp = SamplingParams(max_new_tokens=30, **GREEDY)
    plain, _, _ = run(model, llm.eos_ids, prompts, sp)
    sched = Scheduler(model, llm.eos_ids, max_rows=4, speculative="ngram",
                      prefix_cache=PrefixCache(llm.config, model.dtype, model.device, 1 << 22, block_size=4))
    got = {}
    for i, p in enumerate(prompts + prompts):  # the second round loads the first round's blocks
        seq = sched.sequence(sched.add_request(p, sp))
        while sched.has_work:
            sched.step()
        got[i] = seq.tokens
    stats = sched.stats()
    assert stats["prefix_hit_tokens"] > 0 and stats["spec_accepted_tokens"] > 0
    for i, toks in got.items():
        assert toks == plain[i % 3][0]


def test_server_engine_same_greedy_text_under_concurrent_clients(family_dirs):
    """16 clients at once on `kaki serve`'s engine with --speculative ngram: every reply (stop
    strings and limits included) is what plain decoding gives."""
    pytest.importorskip("prometheus_client")  # the serve extra
    from kaki.serve.client import SeqRequest
    from kaki.serve.engine import Engine, EngineConfig
    llm = kaki.load(family_dirs["persimmon"][1], dtype="float32", device="cpu")
    plain_llm = kaki.load(family_dirs["persimmon"][1], dtype="float32", device="cpu")
    llm.speculative = "ngram"
    engine = Engine(llm, EngineConfig(max_batch_size=6, max_seq_len=160))
    prompts = [p for seed in range(4) for p in copying_prompts(4, seed=9 + seed)]
    reqs = [SeqRequest(p, SamplingParams(max_new_tokens=12 + 3 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for r in reqs[::4]:  # a stop string from the middle of the plain reply
        text = plain_llm.generate([r.prompt_ids], params=r.params)[0].text
        assert len(text) >= 6
        r.params.stop = [text[len(text) // 2:len(text) // 2 + 2]]
    got = [None] * len(reqs)

    def client(i):
        tokens, text, reason = [], "", None
        for _, out in engine.submit([reqs[i]]):
            if out.token_id is not None:
                tokens.append(out.token_id)
            text += out.text
            reason = out.finish_reason or reason
        got[i] = (tokens, text, reason)

    engine.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stats = engine.stats()
    engine.shutdown()
    for r, g in zip(reqs, got):
        ref = plain_llm.generate([r.prompt_ids], params=r.params)[0]
        assert g == (ref.token_ids, ref.text, ref.finish_reason)
    assert any(g[2] == "stop" for g in got)
    assert stats["spec_accepted_tokens"] > 0
