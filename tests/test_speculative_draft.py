"""Speculative decoding with a draft model (kaki.engine.draft), and speculation at the front ends
(the server's per-request opt-out and /metrics, chat's replies and /stats, kaki generate's flags).

The draft is a second tiny model with the target's tokenizer: the target's weights plus noise, so
that it agrees with the target often but not always (drafts are both kept and rejected). Greedy
output equals plain greedy token for token in fewer target passes (counted at model.forward);
sampling has plain sampling's distribution (against the exact one, on an 8-token vocabulary); the
draft's cache after a rollback holds what a fresh prefill of the same ids gives."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import torch

import kaki
from kaki.cli import main as kaki_main
from kaki.config import read_config
from kaki.engine import PrefixCache, Scheduler
from kaki.engine.draft import DraftModel
from kaki.errors import KakiError, ParamError
from kaki.loading import load_model
from kaki.paths import bundled_model
from kaki.cli.speculate import MAX_DRAFT_K
from kaki.sampling import MAX_DRAFT, SamplingParams, target_probs

from helpers import copy_tokenizer, make_hf_model, random_prompts
from test_speculative import one_thread, run  # noqa: F401 (one_thread: autouse, one intra-op thread)

GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=True)


def noisy_copy(hf_model, noise: float, seed: int = 1):
    """A model of the same architecture and vocabulary: hf_model's weights plus Gaussian noise."""
    torch.manual_seed(seed)
    copy = type(hf_model)(hf_model.config).eval()
    copy.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(noise * torch.randn_like(p))
    return copy


@pytest.fixture(scope="module")
def pair(family_dirs, spm_dir, tmp_path_factory):
    """(target LLM, draft LLM): a tiny Persimmon and a noisy copy of it, same tokenizer."""
    hf, path = family_dirs["persimmon"]
    draft_dir = tmp_path_factory.mktemp("draft")
    noisy_copy(hf, 0.022).save_pretrained(draft_dir)
    copy_tokenizer(spm_dir, draft_dir)
    return kaki.load(path, dtype="float32", device="cpu"), kaki.load(draft_dir, dtype="float32", device="cpu")


def draft_of(target, draft, k=4) -> DraftModel:
    return DraftModel(draft.model, target.config.vocab_size, k)


def test_greedy_equals_plain_in_fewer_passes(pair):
    target, draft = pair
    prompts = random_prompts([5, 31, 12, 20, 8], seed=3)
    # Different limits: sequences end at different steps and rows move (the draft's rows with them);
    # 3 rows for 5 prompts: newcomers join a running batch.
    sps = [SamplingParams(max_new_tokens=n, **GREEDY) for n in (30, 12, 25, 7, 18)]
    plain, _, plain_calls = run(target.model, target.eos_ids, prompts, sps, max_rows=3)
    spec, stats, spec_calls = run(target.model, target.eos_ids, prompts, sps, speculative="draft:4",
                                  max_rows=3, draft=draft_of(target, draft))
    for i in range(len(prompts)):
        assert spec[i][0] == plain[i][0], f"prompt {i}: greedy with a draft model differs from plain"
        assert spec[i][2] == plain[i][2] == "length"
        assert spec[i][1] == pytest.approx(plain[i][1], abs=1e-4)
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"], stats  # kept and rejected
    assert spec_calls < plain_calls
    alone, stats, calls = run(target.model, target.eos_ids, prompts[:1], sps[0], speculative="draft:4",
                              draft=draft_of(target, draft))
    assert alone[0][0] == plain[0][0]
    assert calls < len(alone[0][0]), f"{calls} target passes for {len(alone[0][0])} tokens"


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gptj"])
def test_greedy_equals_plain_every_family(family, family_dirs, spm_dir, tmp_path):
    hf, path = family_dirs[family]
    noisy_copy(hf, 0.01).save_pretrained(tmp_path)
    copy_tokenizer(spm_dir, tmp_path)
    target = kaki.load(path, dtype="float32", device="cpu")
    draft = kaki.load(tmp_path, dtype="float32", device="cpu")
    prompts = random_prompts([6, 19, 11], seed=13)
    sp = SamplingParams(max_new_tokens=16, **GREEDY)
    plain, _, _ = run(target.model, target.eos_ids, prompts, sp)
    spec, stats, _ = run(target.model, target.eos_ids, prompts, sp, speculative="draft:3",
                         draft=draft_of(target, draft, 3))
    assert [spec[i][0] for i in range(3)] == [plain[i][0] for i in range(3)]
    assert stats["spec_draft_tokens"] > 0


def test_bundled_model_drafting_for_itself():
    """kaki-tiny as its own draft (no smaller model shares its tokenizer): every greedy draft is
    kept, so the replies take far fewer target passes than tokens, and equal plain decoding's."""
    path = bundled_model()
    if path is None:
        pytest.skip("no bundled model in this checkout (models/kaki-tiny)")
    llm = kaki.load(path, dtype="float32", device="cpu")
    llm.prefix_cache_bytes = 0
    prompt = "human: How do I read a file line by line in Python?\n\nadept:"
    plain = llm.generate(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True)[0]
    llm.set_draft(llm, 4)
    spec = llm.generate(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True)[0]
    assert spec.token_ids == plain.token_ids
    stats = llm.last_stats
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    # One sequence: a decode step is one target pass (the draft being the same module, a forward
    # hook would count its passes too).
    assert stats["decode_steps"] * 3 < stats["decode_tokens"]


def test_prefix_cached_prompts(pair):
    """Prompts whose keys the target's prefix cache holds (the draft has none: it prefills them)."""
    target, draft = pair
    m = target.model
    base = random_prompts([24], seed=9)[0]
    prompts = [base, base + [5, 9], base[:13] + [7]]
    sp = SamplingParams(max_new_tokens=20, **GREEDY)
    plain, _, _ = run(m, target.eos_ids, prompts, sp)
    sched = Scheduler(m, target.eos_ids, max_rows=4, speculative="draft", draft=draft_of(target, draft),
                      prefix_cache=PrefixCache(m.config, m.dtype, m.device, 1 << 22, block_size=4))
    for i, p in enumerate(prompts + prompts):  # the second round loads the first round's blocks
        seq = sched.sequence(sched.add_request(p, sp))
        while sched.has_work:
            sched.step()
        assert seq.tokens == plain[i % 3][0]
    stats = sched.stats()
    assert stats["prefix_hit_tokens"] > 0 and stats["spec_accepted_tokens"] > 0


def test_rows_that_do_not_draft_between_and_around_drafting_ones(pair):
    """Per-request settings: rows that opt out (or draft by prompt lookup) sit before, between and
    after the draft model's rows; everyone gets plain greedy's tokens."""
    target, draft = pair
    prompts = random_prompts([7, 15, 10, 22, 5], seed=14)
    settings = ["off", "draft:4", "ngram:3", "draft:2", "off"]
    sps = [SamplingParams(max_new_tokens=14, speculate=x, **GREEDY) for x in settings]
    plain, _, _ = run(target.model, target.eos_ids, prompts, SamplingParams(max_new_tokens=14, **GREEDY))
    spec, stats, _ = run(target.model, target.eos_ids, prompts, sps, draft=draft_of(target, draft))
    assert [spec[i][0] for i in range(5)] == [plain[i][0] for i in range(5)]
    assert stats["spec_draft_tokens"] > 0


def test_stops_and_limits_inside_a_drafted_block(pair):
    target, draft = pair
    prompt = random_prompts([14], seed=5)[0]
    full, _, _ = run(target.model, target.eos_ids, [prompt], SamplingParams(max_new_tokens=30, **GREEDY))
    toks = full[0][0]
    for limit in (1, 2, 5, 11):
        sp = SamplingParams(max_new_tokens=limit, **GREEDY)
        got, _, _ = run(target.model, target.eos_ids, [prompt], sp, speculative="draft:6", draft=draft_of(target, draft, 6))
        assert got[0][0] == toks[:limit] and got[0][2] == "length"
    for j in (2, 9, 17):
        stop = toks[j]
        sp = SamplingParams(max_new_tokens=30, stop_token_ids=[stop], **GREEDY)
        got, _, _ = run(target.model, target.eos_ids, [prompt], sp, speculative="draft:6", draft=draft_of(target, draft, 6))
        assert got[0][0] == toks[:toks.index(stop) + 1] and got[0][2] == "stop"


def test_seeded_sampling_ignores_neighbours(pair):
    """A seeded sampled request drafts and verifies with its own generator: the same tokens alone
    and beside other requests (whose prompts pad the draft's catch-up pass differently)."""
    target, draft = pair
    prompts = random_prompts([9, 40, 17], seed=12)
    sp = SamplingParams(max_new_tokens=30, temperature=0.8, top_k=40, seed=21, ignore_eos=True)
    others = [SamplingParams(max_new_tokens=25, temperature=1.0, seed=5, ignore_eos=True, repetition_penalty=1.2),
              SamplingParams(max_new_tokens=12, **GREEDY)]
    alone, stats, _ = run(target.model, target.eos_ids, prompts[:1], sp, speculative="draft:4",
                          draft=draft_of(target, draft))
    both, _, _ = run(target.model, target.eos_ids, prompts, [sp] + others, speculative="draft:4",
                     draft=draft_of(target, draft))
    assert both[0][0] == alone[0][0] and len(alone[0][0]) == 30
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"], stats


def test_draft_cache_after_rollback_equals_a_fresh_prefill(pair):
    target, draft = pair
    sched = Scheduler(target.model, target.eos_ids, max_rows=2, speculative="draft:5",
                      draft=draft_of(target, draft, 5))
    sp = SamplingParams(max_new_tokens=60, temperature=0.9, seed=4, ignore_eos=True)
    seq = sched.sequence(sched.add_request(random_prompts([11], seed=6)[0], sp))
    while not 0 < sched.stats()["spec_accepted_tokens"] < sched.stats()["spec_draft_tokens"] or len(seq.tokens) < 20:
        sched.step()
        assert seq.finish_reason is None
    ids = seq.prompt + seq.tokens
    held = sched.draft.cache.lengths[seq.row]
    assert len(ids) - 1 - sched.draft.k <= held <= len(ids) - 1  # a prefix of the ids, the last not yet fed
    fresh = Scheduler(draft.model, draft.eos_ids, max_rows=1)
    fresh.add_request(ids[:held] + [0], SamplingParams(max_new_tokens=1))
    fresh.step()
    k, v = sched.draft.cache.read(seq.row, 0, held)
    k2, v2 = fresh.cache.read(0, 0, held)
    torch.testing.assert_close(k, k2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-4)


def tiny_vocab_model(tmp: Path, seed: int):
    hf = make_hf_model("llama", seed=seed, vocab_size=8, num_hidden_layers=1)
    hf.save_pretrained(tmp)
    return load_model(tmp, read_config(tmp), torch.float32, torch.device("cpu"))


def test_sampling_with_a_draft_model_has_the_target_distribution(tmp_path):
    """Over 3,000 seeds, the first two tokens sampled with a draft model (another random model of
    the same 8-token vocabulary) match the exact joint distribution of plain sampling (the expected
    total-variation distance of 3,000 draws from it is about 0.03 here)."""
    target, other = tiny_vocab_model(tmp_path / "t", 0), tiny_vocab_model(tmp_path / "d", 7)
    V, n = 8, 3000
    prompt = [3, 5, 4, 6]
    # Three tokens: after the first (sampled by the prefill) one is drafted for the second.
    sp = dict(max_new_tokens=3, temperature=0.9, top_k=6, ignore_eos=True)
    params = SamplingParams(**sp)
    with torch.inference_mode():
        first = target_probs(target(torch.tensor([prompt]))[0, -1].float(), params)
        nxt = target(torch.tensor([prompt + [t] for t in range(V)]))[:, -1].float()
        exact = first[:, None] * torch.stack([target_probs(row, params) for row in nxt])  # (V, V)

    def joint(**kw):
        sps = [SamplingParams(seed=i, **sp) for i in range(n)]
        out, stats, _ = run(target, [2], [prompt] * n, sps, max_rows=64, **kw)
        counts = torch.zeros(V, V)
        for toks, _, _ in out.values():
            counts[toks[0], toks[1]] += 1
        return counts / n, stats

    spec, stats = joint(speculative="draft:1", draft=DraftModel(other, V, 1))
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"], stats  # kept and rejected
    tv = lambda a: 0.5 * float((a - exact).abs().sum())  # noqa: E731
    assert tv(spec) < 0.06, tv(spec)
    # The rule matters: keeping every draft would give the draft's own distribution.
    with torch.inference_mode():
        q = target_probs(other(torch.tensor([prompt]))[0, -1].float(), params)
    assert 0.5 * float((q - first).abs().sum()) > 0.15


def test_vocabulary_mismatch_is_a_clear_error(pair, spm_dir, tmp_path):
    target, _ = pair
    small = make_hf_model("persimmon", seed=2, vocab_size=300)  # fewer embedding rows than the tokenizer
    small.save_pretrained(tmp_path)
    copy_tokenizer(spm_dir, tmp_path)
    with pytest.raises(KakiError, match="300 rows, fewer than the tokenizer's 320"):
        target.set_draft(kaki.load(tmp_path, dtype="float32", device="cpu"))
    with pytest.raises(ParamError, match="no draft model"):
        target.generate([5, 6, 7], max_new_tokens=2, speculate="draft")


def test_llm_api_and_cli(pair, family_dirs, capsys):
    target, draft = pair
    llm = kaki.load(family_dirs["persimmon"][1], dtype="float32", device="cpu", draft_model=draft, draft_k=3)
    llm.prefix_cache_bytes = 0
    assert llm.speculate == "draft:3"
    prompt = random_prompts([10], seed=8)[0]
    plain = llm.generate(prompt, max_new_tokens=20, temperature=0.0, speculate="off")[0]
    assert llm.last_stats["spec_draft_tokens"] == 0
    spec = llm.generate(prompt, max_new_tokens=20, temperature=0.0)[0]
    assert spec.token_ids == plain.token_ids and llm.last_stats["spec_accepted_tokens"] > 0
    # The earlier names still work.
    old = kaki.load(family_dirs["persimmon"][1], dtype="float32", device="cpu", speculative="ngram:2")
    assert old.speculate == old.speculative == "ngram:2"
    path = str(family_dirs["persimmon"][1])
    common = ["generate", "--model", path, "-t", "0", "-n", "16", "--json", "--device", "cpu", "--dtype", "float32"]
    assert kaki_main(common + ["hello there"]) == 0
    want = json.loads(capsys.readouterr().out)["token_ids"]
    assert kaki_main(common + ["--draft-model", str(draft.path), "--draft-k", "3", "--verbose", "hello there"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["token_ids"] == want
    assert "tokens per target pass" in out.err and "drafted tokens accepted" in out.err
    assert kaki_main(common + ["--draft-k", "3", "x"]) == 2
    assert "--draft-k needs --draft-model" in capsys.readouterr().err
    assert kaki_main(common + ["--draft-model", str(draft.path), "--speculate", "ngram", "x"]) == 2
    assert MAX_DRAFT_K == MAX_DRAFT  # the CLI's copy of the bound (it starts without torch)
    with pytest.raises(SystemExit) as e:
        kaki_main(common + ["--draft-k", "0", "x"])
    assert e.value.code == 2


def test_chat_reply_stops_at_the_stop_string_and_stats_show_speculation(text_model_dir):
    """A stop string inside a drafted block: the reply's ids are the text's, as without speculation.
    The model drafts for itself (every greedy draft is kept), so drafts past the stop string exist."""
    from kaki.chat import ChatSession, Settings
    from kaki.chat.commands import decode_summary
    from kaki.chat_format import get_format
    llm = kaki.load(text_model_dir[1], dtype="float32", device="cpu")
    prompt = "the cat sat on the mat and the cat sat on the mat and the"
    plain = llm.generate(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True)[0].text
    stop = " ".join(plain.split()[2:4])
    replies = {}
    for setting in ("off", "draft:8"):
        if setting == "off":
            llm.speculate = setting
        else:
            llm.set_draft(llm, 8)
        s = ChatSession(llm, get_format("plain"), settings=Settings(temperature=0.0, sample=False, max_new_tokens=40),
                        stop=[stop])
        replies[setting] = s.raw(prompt).run()
    off, on = replies["off"], replies["draft:8"]
    assert on.finish_reason == off.finish_reason == "stop"
    assert on.token_ids == off.token_ids and on.text == off.text
    assert on.stats.new_tokens == len(off.token_ids)
    assert len(on.seq.tokens) > len(on.token_ids)  # the sequence holds kept drafts past the stop string
    assert on.stats.spec_accepted_tokens > 0 and on.stats.decode_steps < on.stats.decode_tokens
    assert "tokens per target pass" in decode_summary(vars(on.stats))


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_server_opt_out_and_metrics(pair):
    """kaki serve with a draft model: 16 concurrent clients (a few opting out) get plain greedy's text; a request with
    `speculate: false` (OpenAI and Adept routes) drafts nothing; /metrics shows acceptance and tokens
    per target pass."""
    from kaki.serve.app import create_app
    from kaki.serve.engine import Engine, EngineConfig
    from test_serve_http import Server
    target, draft = pair
    llm = kaki.load(target.path, dtype="float32", device="cpu", draft_model=draft)
    server = Server(create_app(Engine(llm, EngineConfig(max_batch_size=8, max_seq_len=128)), api_key=None))
    prompts = [random_prompts([6 + i], seed=20 + i)[0] for i in range(16)]
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            def body(i, **kw):
                return {"prompt": prompts[i], "max_tokens": 6 + i, "temperature": 0, "ignore_eos": True, **kw}

            r = c.post("/v1/completions", json=body(0, speculate=False))
            assert r.status_code == 200, r.text
            m = c.get("/metrics").text
            assert metric(m, "kaki_spec_draft_tokens_total") == 0 and metric(m, "kaki_decode_steps_total") > 0
            r = c.put("/api", json={"prompts": ["hello"], "tokens_to_generate": 5, "temperature": 0.5,
                                    "speculate": False})
            assert r.status_code == 200, r.text
            assert metric(c.get("/metrics").text, "kaki_spec_draft_tokens_total") == 0
            bad = c.post("/v1/completions", json=body(0, speculate="no"))
            assert bad.status_code == 400 and "speculate" in bad.text
            got = [None] * len(prompts)

            def client(i):  # every fifth opts out: drafting and plain rows share the batch
                got[i] = c.post("/v1/completions", json=body(i, speculate=i % 5 != 2)).json()["choices"][0]["text"]

            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            m = c.get("/metrics").text
    finally:
        server.stop()
    for i, p in enumerate(prompts):
        assert got[i] == target.generate(p, max_new_tokens=6 + i, temperature=0.0, ignore_eos=True)[0].text
    drafted, kept = metric(m, "kaki_spec_draft_tokens_total"), metric(m, "kaki_spec_accepted_tokens_total")
    assert 0 < kept < drafted
    assert metric(m, "kaki_spec_acceptance_rate") == pytest.approx(kept / drafted)
    assert metric(m, "kaki_tokens_per_target_pass") > 1
