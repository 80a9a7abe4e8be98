"""The serving engine without HTTP: sequences that join and leave a running batch get the tokens
they get alone (`kaki.LLM.generate`, itself checked against transformers), the row cache's
joins, leaves (a row moved into the hole) and prefix-cache loads keep every row's keys intact,
and the limits (queue, KV-cache budget, max_seq_len) give clear errors."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import kaki
from kaki.errors import KakiError, ParamError
from kaki.sampling import SamplingParams
from kaki.engine.kv import RowCache, kv_cache_bytes
from kaki.serve.engine import Engine, EngineConfig, QueueFull, SeqRequest

from helpers import copy_tokenizer, make_hf_model, prefer_text_pieces

WORDS = "the a of and to in is was he for it with as his on be at by had are but".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine
    OpenMP's hand-offs cost milliseconds per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llm(tmp_path_factory, spm_dir, spm_proto):
    model = make_hf_model("persimmon", seed=3, max_position_embeddings=512)
    prefer_text_pieces(model, spm_proto)
    path = tmp_path_factory.mktemp("serve-engine")
    model.save_pretrained(path)
    copy_tokenizer(spm_dir, path)
    return kaki.load(path, dtype="float32", device="cpu")


def collect(handle):
    tokens, text, reason = [], "", None
    for _, out in handle:
        if out.token_id is not None:
            tokens.append(out.token_id)
        text += out.text
        reason = out.finish_reason or reason
    return tokens, text, reason


def test_staggered_sequences_match_running_alone(llm, monkeypatch):
    """60 sequences arriving at random times into 5 rows of a 64-slot cache: greedy, seeded
    sampling and stop strings give exactly what each gives alone, and the test sees the cache
    move running rows (a sequence left from the middle) and the prefix cache serve prompts."""
    moves = {"rows": 0}
    move = RowCache.move

    def counting_move(self, src, dst):
        moves["rows"] += 1
        return move(self, src, dst)

    monkeypatch.setattr(RowCache, "move", counting_move)
    engine = Engine(llm, EngineConfig(max_batch_size=5, max_seq_len=64, max_prefill_tokens=48))
    engine.start()
    rng = random.Random(1)
    reqs = []
    shared = llm.encode_prompt(" ".join(WORDS))[:20]  # every sixth prompt starts with it: prefix-cache loads
    for i in range(60):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 18)))
        ids = shared + llm.encode_prompt(words, add_bos=False)[:10] if i % 6 == 5 else llm.encode_prompt(words)
        sp = SamplingParams(max_new_tokens=rng.randint(1, 60), temperature=0.0 if i % 2 == 0 else 0.9,
                            top_p=0.8 if i % 3 == 0 else 1.0, seed=i, stop=[" the"] if i % 5 == 0 else [],
                            ignore_eos=i % 7 == 0)
        sp.max_new_tokens = engine.fit(len(ids), sp.max_new_tokens, cap=True)
        reqs.append(SeqRequest(ids, sp))
    got = [None] * len(reqs)
    delays = [rng.random() * 0.4 for _ in reqs]

    def client(i):
        time.sleep(delays[i])
        got[i] = collect(engine.submit([reqs[i]]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.shutdown()
    for r, (tokens, text, reason) in zip(reqs, got):
        ref = llm.generate([r.prompt_ids], params=r.params)[0]
        assert (tokens, text, reason) == (ref.token_ids, ref.text, ref.finish_reason)
    assert moves["rows"] > 0
    assert engine.metrics.max_batch._value.get() == 5
    assert engine.stats()["prefix_hit_tokens"] >= 16


def test_prompt_logprobs_and_scoring_only(llm):
    """tokens_to_generate=0 (Adept's scoring mode) still prefills and returns the prompt's
    logprobs, equal to the ones kaki's own loop computes; generated logprobs match too."""
    engine = Engine(llm, EngineConfig(max_batch_size=4, max_seq_len=128))
    engine.start()
    prompts = [llm.encode_prompt("the man of the world"), llm.encode_prompt("a")]
    params = [SamplingParams(max_new_tokens=0, prompt_logprobs=True),
              SamplingParams(max_new_tokens=6, prompt_logprobs=True, logprobs=True, top_logprobs=3)]
    handle = engine.submit([SeqRequest(p, sp) for p, sp in zip(prompts, params)])
    outs = {0: [], 1: []}
    for i, out in handle:
        outs[i].append(out)
    engine.shutdown()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        ref = llm.generate([p], params=sp)[0]
        assert handle.prompt_logprobs[i] == pytest.approx(ref.prompt_logprobs, abs=1e-5)
        got = [o.token_id for o in outs[i] if o.token_id is not None]
        assert got == ref.token_ids
    assert [o.logprob for o in outs[1]] == pytest.approx(ref.logprobs, abs=1e-5)
    tops = [lp for o in outs[1] for _, lp in o.top]
    assert tops == pytest.approx([lp for t in ref.top_logprobs for _, lp in t], abs=1e-5)
    assert outs[0][-1].finish_reason == "length"


def test_abort_frees_the_row_for_the_next_sequence(llm):
    engine = Engine(llm, EngineConfig(max_batch_size=1, max_seq_len=512, max_queue=4))
    engine.start()
    ids = llm.encode_prompt("the")
    long = engine.submit([SeqRequest(ids, SamplingParams(max_new_tokens=500, ignore_eos=True))])
    waiting = engine.submit([SeqRequest(ids, SamplingParams(max_new_tokens=3))])
    it = iter(long)
    next(it)  # the long one holds the only row
    assert engine.stats()["waiting"] == 1
    long.abort()
    reasons = [out.finish_reason for _, out in it]
    assert reasons[-1] == "abort" and len(reasons) < 499
    tokens, _, reason = collect(waiting)
    assert len(tokens) == 3 and reason == "length"
    assert engine.metrics.finished.labels("abort")._value.get() == 1
    engine.shutdown()


def test_queue_bound(llm):
    """A free row plus max_queue waiting sequences are taken; one more is refused, and a request
    that could never fit is a 400-style ParamError."""
    engine = Engine(llm, EngineConfig(max_batch_size=1, max_queue=2, max_seq_len=64))
    # Not started: nothing leaves the queue.
    one = SeqRequest(llm.encode_prompt("the"), SamplingParams(max_new_tokens=2))
    engine.submit([one] * 3)
    with pytest.raises(QueueFull, match="--max-queue"):
        engine.submit([one])
    assert engine.metrics.rejected._value.get() == 1
    with pytest.raises(ParamError, match="at most 3 at once") as e:
        engine.submit([one] * 4, field="prompts")
    assert e.value.field == "prompts"
    engine.start()
    engine.shutdown()


def test_limits_give_clear_errors(llm):
    with pytest.raises(KakiError, match=r"--max-seq-len to [\d,]+ or --max-batch-size to \d+"):
        Engine(llm, EngineConfig(max_batch_size=10**9, max_seq_len=512))
    with pytest.raises(KakiError, match="longer than the model's context"):
        Engine(llm, EngineConfig(max_seq_len=1024))
    with pytest.raises(KakiError, match="--prefix-cache-mb must be >= 0, got -1"):
        Engine(llm, EngineConfig(prefix_cache_mb=-1))
    with pytest.raises(KakiError, match=r"needs .* GiB .* \(or --prefix-cache-mb\)"):
        Engine(llm, EngineConfig(max_batch_size=1, max_seq_len=16, prefix_cache_mb=2**40))
    engine = Engine(llm, EngineConfig(max_batch_size=2, max_seq_len=32))
    with pytest.raises(ParamError, match="at most 32 tokens") as e:
        engine.fit(40, 1)
    assert e.value.field == "prompt"
    with pytest.raises(ParamError) as e:
        engine.fit(20, 20, field="max_tokens")
    assert e.value.field == "max_tokens" and "room for 12" in str(e.value)
    assert engine.fit(20, 20, cap=True) == 12
    assert engine.fit(20, None) == 12


def test_kv_budget_counts_what_is_allocated(llm):
    cfg = llm.config
    want = kv_cache_bytes(cfg, 3, 40, torch.float32)
    c = RowCache(cfg, 3, 40, torch.float32, "cpu")
    got = c.k.numel() * 4 + c.v.numel() * 4
    assert want == got
    engine = Engine(llm, EngineConfig(max_batch_size=3, max_seq_len=40))
    engine.start()  # the server's cache is allocated whole at start-up
    assert engine.scheduler.cache.k.numel() * 4 * 2 == want
    engine.shutdown()


def test_a_burst_is_prefilled_within_the_token_budget_per_step(llm, monkeypatch):
    """Six 10-token prompts with a 20-token prefill budget: two per step, with decode steps of
    the admitted ones in between, and everyone still gets the answer it gets alone."""
    engine = Engine(llm, EngineConfig(max_batch_size=8, max_seq_len=64, max_prefill_tokens=20))
    calls = []
    sched = engine.scheduler
    prefill, decode = sched._prefill, sched._decode
    monkeypatch.setattr(sched, "_prefill", lambda seqs, full: (calls.append(len(seqs)), prefill(seqs, full))[1])
    monkeypatch.setattr(sched, "_decode", lambda: (calls.append("decode"), decode())[1])
    ids = [llm.encode_prompt(" ".join(WORDS[i:i + 10]))[:10] for i in range(6)]
    reqs = [SeqRequest(p, SamplingParams(max_new_tokens=4)) for p in ids]
    handles = [engine.submit([r]) for r in reqs]  # all queued before the worker starts
    engine.start()
    got = [collect(h)[0] for h in handles]
    engine.shutdown()
    assert calls[:6] == [2, "decode", 2, "decode", 2, "decode"]
    for r, tokens in zip(reqs, got):
        assert tokens == llm.generate([r.prompt_ids], params=r.params)[0].token_ids


def engine_failing_at(llm, monkeypatch, n: int, error: Exception) -> Engine:
    """An engine whose n-th delivery of an output raises `error` (outside the scheduler's own
    isolation), once."""
    engine = Engine(llm, EngineConfig(max_batch_size=2, max_seq_len=64))
    deliver, calls = engine._deliver, []

    def broken(event, now):
        calls.append(event)
        if len(calls) == n:
            raise error
        deliver(event, now)

    monkeypatch.setattr(engine, "_deliver", broken)
    return engine


def test_a_bug_in_the_loop_fails_what_is_in_flight_and_the_engine_goes_on(llm, monkeypatch):
    """An exception outside the scheduler's own isolation (here: delivering an output) ends the
    sequences in flight with "error"; the engine starts over with a fresh scheduler and the next
    request gets the answer it gets alone."""
    engine = engine_failing_at(llm, monkeypatch, 3, RuntimeError("a bug"))
    engine.start()
    ids = llm.encode_prompt("the man of the world")
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    first = engine.submit([SeqRequest(ids, sp), SeqRequest(ids, sp)])
    outs = [out for _, out in first]
    assert [o.error for o in outs if o.finish_reason] == ["RuntimeError: a bug"] * 2
    assert engine.error == "RuntimeError: a bug" and engine.running
    tokens, _, reason = collect(engine.submit([SeqRequest(ids, sp)]))
    engine.shutdown()
    assert (tokens, reason) == (llm.generate([ids], params=sp)[0].token_ids, "length")


def test_a_lost_rank_fails_what_is_in_flight_without_a_traceback(llm, monkeypatch):
    """RankLost (a tensor-parallel rank is gone; the mirror has already said why in one line and
    stops the server) is not a bug of the loop: the sequences in flight end with its message, and
    the log gets no "engine step failed" traceback."""
    from loguru import logger

    from kaki.errors import RankLost

    engine = engine_failing_at(llm, monkeypatch, 2, RankLost("tensor-parallel rank 0 lost another rank"))
    logged: list[str] = []
    sink = logger.add(logged.append, level="DEBUG", format="{message}")
    try:
        engine.start()
        ids = llm.encode_prompt("the man of the world")
        outs = [out for _, out in engine.submit([SeqRequest(ids, SamplingParams(max_new_tokens=8, ignore_eos=True))])]
        engine.shutdown()
    finally:
        logger.remove(sink)
    assert [o.error for o in outs if o.finish_reason] == ["tensor-parallel rank 0 lost another rank"]
    assert engine.error == "tensor-parallel rank 0 lost another rank"
    assert not any("Traceback" in m or "engine step failed" in m for m in logged), logged
