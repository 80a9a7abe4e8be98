"""One request must never fail, slow or leak for the others (issue #17 items 1 and 2), over real
HTTP (uvicorn on a loopback port, a tiny random Persimmon) with concurrent victim clients:

- poisoned sampling values (temperature 1e-300 on /v1 and PUT /api, repetition_penalty 1e-308
  with sampling) are numerically safe: the victims finish with the answers they get alone;
- a fault injected into one row's sampling fails only that request (500), the rows beside it in
  the same batch finish normally;
- nothing of a finished request outlives it (weakrefs, with the garbage collector off) and the
  server's memory stays flat over a few hundred requests with long stop lists.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import httpx
import pytest

import kaki
from kaki import sampling
from kaki.chat_format import ADEPT
from kaki.sampling import SamplingParams
from kaki.serve.app import create_app
from kaki.serve.engine import Engine, EngineConfig, SeqRequest
from kaki.serve.schemas import MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS

# model_dir: a tiny Persimmon whose greedy output is words; one_thread (autouse): one intra-op thread.
from test_serve_http import Server, model_dir, one_thread  # noqa: F401

MODEL = "tiny-persimmon"
VICTIM_TOKENS = 300  # long enough to be still running while the poisoned requests come and go
VICTIMS = ["the man of the world was", "a house by the river", "he had a", "it was in the"]


@pytest.fixture(scope="module")
def ref(model_dir):
    return kaki.load(model_dir, dtype="float32", device="cpu")


def start(model_dir, **config) -> Server:
    llm = kaki.load(model_dir, dtype="float32", device="cpu")
    s = Server(create_app(Engine(llm, EngineConfig(**config), model_name=MODEL)))
    return s


@pytest.fixture(scope="module")
def server(model_dir):
    s = start(model_dir, max_batch_size=8, prefix_cache_mb=4)
    yield s
    s.stop()


def victim_body(i: int) -> dict:
    """Greedy and seeded sampling, alternately: sampled rows run sample_token beside the poison."""
    body = {"prompt": VICTIMS[i], "max_tokens": VICTIM_TOKENS, "ignore_eos": True}
    return body | ({"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i})


def victim_alone(ref, i: int) -> str:
    b = victim_body(i)
    return ref.generate(b["prompt"], max_new_tokens=VICTIM_TOKENS, ignore_eos=True, temperature=b["temperature"],
                        top_p=b.get("top_p", 1.0), seed=b.get("seed"))[0].text


def running(url: str) -> int:
    return httpx.get(url + "/health", timeout=30).json()["running"]


def with_victims(url: str, attack) -> tuple[list[httpx.Response], object]:
    """Start the victims, wait until all four are decoding, run `attack()`, check they were still
    decoding after it, and return their responses and what the attack returned."""
    answers: list[httpx.Response | None] = [None] * len(VICTIMS)

    def victim(i):
        answers[i] = httpx.post(url + "/v1/completions", json=victim_body(i), timeout=120)

    threads = [threading.Thread(target=victim, args=(i,)) for i in range(len(VICTIMS))]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while running(url) < len(VICTIMS):
        assert time.time() < deadline, "the victims never ran together"
        time.sleep(0.01)
    result = attack()
    assert running(url) >= len(VICTIMS), "the victims ended before the attack did: it proved nothing"
    for t in threads:
        t.join(120)
    return answers, result


def assert_victims_unharmed(ref, answers) -> None:
    for i, r in enumerate(answers):
        assert r is not None and r.status_code == 200, (i, r and r.text[:300])
        choice = r.json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (victim_alone(ref, i), "length"), i


# ----------------------------------------------------------------------------- item 1: poisoned requests


def test_poisoned_sampling_values_hurt_nobody(server, ref):
    """temperature 1e-300 (/v1 and PUT /api) and repetition_penalty 1e-308 with sampling, sent
    while four clients generate: everyone gets 200 with the answer they get alone (a vanishing
    temperature is greedy decoding)."""
    prompt = "the man of the world"
    chat = [{"role": "user", "content": "where was the house"}]
    poisons = [
        ("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 1e-300, "ignore_eos": True}),
        ("PUT", "/api", {"prompts": [prompt], "tokens_to_generate": 8, "temperature": 1e-300}),
        ("POST", "/v1/chat/completions", {"messages": chat, "max_tokens": 8, "temperature": 0.8, "seed": 3,
                                          "repetition_penalty": 1e-308}),
        ("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 1e-300, "seed": 4,
                                     "repetition_penalty": 1e-308, "ignore_eos": True}),
    ]

    def attack():
        out = [None] * len(poisons)

        def send(k):
            method, path, body = poisons[k]
            out[k] = httpx.request(method, server.url + path, json=body, timeout=60)

        ts = [threading.Thread(target=send, args=(k,)) for k in range(len(poisons))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        return out

    answers, poisoned = with_victims(server.url, attack)
    assert_victims_unharmed(ref, answers)
    assert all(r.status_code == 200 for r in poisoned), [r.text[:300] for r in poisoned]
    greedy = ref.generate(prompt, max_new_tokens=8, temperature=0.0, ignore_eos=True)[0]
    assert poisoned[0].json()["choices"][0]["text"] == greedy.text
    adept_greedy = ref.generate(prompt, max_new_tokens=8, temperature=0.0, add_bos=False)[0]
    assert poisoned[1].json()["generations"] == [ref.tokenizer.decode(adept_greedy.token_ids).removeprefix(" ")]
    alone = ref.generate(ADEPT.render(chat), max_new_tokens=8, temperature=0.8, seed=3, repetition_penalty=1e-308,
                         stop=ADEPT.stop)[0]
    assert poisoned[2].json()["choices"][0]["message"]["content"] == alone.text.removeprefix(" ")
    alone = ref.generate(prompt, max_new_tokens=8, temperature=1e-300, seed=4, repetition_penalty=1e-308,
                         ignore_eos=True)[0]
    assert poisoned[3].json()["choices"][0]["text"] == alone.text


def test_a_fault_in_one_rows_sampling_fails_only_that_request(server, ref, monkeypatch):
    """An exception inside sample_token for one request's row (seed 666): that request gets a
    500 in the documented error shape, the victims decoding in the same batch finish normally."""
    wanted = [victim_alone(ref, i) for i in range(len(VICTIMS))]  # before the fault is in place
    real = sampling.sample_token
    hits = []

    def faulty(logits, sp, generator, seen=None):
        if sp.seed == 666:
            hits.append(1)
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, sp, generator, seen)

    monkeypatch.setattr(sampling, "sample_token", faulty)

    def attack():
        return httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"prompt": "the man", "max_tokens": 8, "temperature": 0.8, "seed": 666})

    answers, poisoned = with_victims(server.url, attack)
    assert hits, "the fault was never hit"
    assert poisoned.status_code == 500, poisoned.text
    assert "probability tensor" in poisoned.json()["error"]["message"]
    for i, r in enumerate(answers):
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == wanted[i], i
    # The server goes on serving.
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "the man", "max_tokens": 4, "temperature": 0})
    assert r.json()["choices"][0]["text"] == ref.generate("the man", max_new_tokens=4, temperature=0.0)[0].text


# ----------------------------------------------------------------------------- item 2: no leak


def test_nothing_of_a_finished_request_outlives_it(model_dir):
    """300 requests with 20,000 stop ids each, the garbage collector off: every handle, request
    and sampling parameters object is freed once its caller lets go (no reference cycle keeps
    them for a full collection), and the engine holds no record of them."""
    llm = kaki.load(model_dir, dtype="float32", device="cpu")
    engine = Engine(llm, EngineConfig(max_batch_size=4, max_queue=512, prefix_cache_mb=4))
    engine.start()
    ids = llm.encode_prompt("the man of the world")
    refs = []
    gc.collect()
    gc.disable()
    try:
        for k in range(30):
            handles = []
            for j in range(10):
                sp = SamplingParams(max_new_tokens=3, temperature=0.8 if j % 2 else 0.0, seed=j,
                                    stop_token_ids=list(range(1000, 21000)), stop=["zzz"])
                req = SeqRequest(ids, sp)
                handles.append(engine.submit([req]))
                refs += [weakref.ref(sp), weakref.ref(req), weakref.ref(handles[-1])]
                del sp, req
            for h in handles:
                assert [out.finish_reason for _, out in h][-1] in ("length", "stop")
            del h, handles
        # The worker may still be returning from the step that delivered the last output.
        deadline = time.time() + 5
        while (alive := sum(r() is not None for r in refs)) and time.time() < deadline:
            time.sleep(0.05)
        assert alive == 0, f"{alive} of {len(refs)} objects of finished requests are still alive"
    finally:
        gc.enable()
        engine.shutdown()
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_memory_stays_flat_over_300_requests_with_long_stop_lists(model_dir):
    """RSS after 300 requests (4 clients at once, full stop lists, distinct prompts) is at most
    RSS after 50 + 100 MB. The prefix cache is 4 MB, so its pool (which legitimately fills to
    its budget) is not what is measured."""
    s = start(model_dir, max_batch_size=4, prefix_cache_mb=4)
    stop_ids = list(range(2000, 2000 + MAX_STOP_TOKEN_IDS))
    stops = [chr(0x4E00 + k) * MAX_STOP_CHARS for k in range(MAX_STOP)]
    sent = [0]
    lock = threading.Lock()

    def client(c, n):
        with httpx.Client(base_url=s.url, timeout=60) as h:
            for _ in range(n):
                with lock:
                    k = sent[0]
                    sent[0] += 1
                body = {"prompt": f"the man {k} of the world {k * 7}", "max_tokens": 6, "temperature": 0.8,
                        "seed": k, "stop_token_ids": stop_ids, "stop": stops, "logprobs": 2}
                r = h.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text[:300]

    def run(n):
        ts = [threading.Thread(target=client, args=(c, n // 4)) for c in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(300)

    try:
        run(52)
        after_50 = rss_bytes()
        run(248)
        after_300 = rss_bytes()
    finally:
        s.stop()
    assert sent[0] >= 300
    print(f"RSS after 50 requests {after_50 / 2**20:.0f} MB, after 300 {after_300 / 2**20:.0f} MB")
    assert after_300 <= after_50 + 100 * 2**20


# ----------------------------------------------------------------------------- the prefix cache in /metrics


def metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} is not in /metrics")


def test_prefix_cache_hits_and_evictions_show_in_metrics(model_dir, ref):
    """--prefix-cache-mb sized for 8 blocks of 16 tokens: a prompt sent again with more words
    after it loads its blocks (hit tokens in /metrics), a stream of other long prompts evicts
    (evictions in /metrics, bytes within the budget), and every answer is the one given alone.
    0 turns the cache off."""
    block_bytes = 16 * ref.model.config.num_hidden_layers * 2 * ref.model.config.num_key_value_heads \
        * ref.model.config.head_dim * 4
    s = start(model_dir, max_batch_size=4, prefix_cache_mb=8 * block_bytes / 2**20)
    words = "the man of the world was in a house by the river and he had a".split()
    prompts = [" ".join(words[k:] + words[:k]) * 3 for k in range(8)]
    try:
        def ask(prompt):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0},
                           timeout=60)
            assert r.json()["choices"][0]["text"] == ref.generate(prompt, max_new_tokens=5, temperature=0.0)[0].text
        ask(prompts[0])
        assert metric(s.url, "kaki_prefix_cache_hit_tokens_total") == 0
        ask(prompts[0] + " and it was")
        hits = metric(s.url, "kaki_prefix_cache_hit_tokens_total")
        assert hits >= 32 and hits % 16 == 0
        for p in prompts[1:]:
            ask(p)
        assert metric(s.url, "kaki_prefix_cache_evictions_total") > 0
        assert 0 < metric(s.url, "kaki_prefix_cache_bytes") <= 8 * block_bytes
    finally:
        s.stop()
    off = Engine(ref, EngineConfig(max_batch_size=1, prefix_cache_mb=0))
    assert off.scheduler.prefix is None and "prefix_hit_tokens" not in off.stats()
