"""kaki serve over real HTTP: uvicorn on a free loopback port with a tiny Persimmon model, driven by
curl (the seed README's command), the official `openai` client and httpx. Answers are compared
with the same model run alone through `kaki.LLM.generate` (itself checked against transformers)."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
import time

import httpx
import pytest
import torch

import kaki
from kaki.chat_format import ADEPT
from kaki.serve.app import create_app
from kaki.serve.engine import Engine, EngineConfig

from helpers import copy_tokenizer, make_hf_model, prefer_text_pieces

MODEL = "tiny-persimmon"
CONTEXT = 4096
# The seed README's command, as printed there; only the address is filled in.
SEED_CURL = ("""curl '<address of server>/api' -X 'PUT' -H 'Content-Type: application/json; charset=UTF-8' -d """
             """'{"prompts": ["human: Hello, how are you?\\n\\nadept:"], "tokens_to_generate": 128, "top_p": 0.9, """
             """"random_seed": 1234, "logprobs": false}'""")
MAX_LONG = 4000  # tokens of a request that holds a row for seconds
WORDS = "the a of and to in is was he for it with as his on be at by had are but from or".split()


class Server:
    """uvicorn serving `app` from a thread, on a loopback port picked by the OS."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second intra-op thread, and on a busy 2-core machine
    OpenMP's hand-offs cost milliseconds per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_dir, spm_proto):
    model = make_hf_model("persimmon", seed=3, max_position_embeddings=CONTEXT)
    prefer_text_pieces(model, spm_proto)  # greedy output decodes to words
    path = tmp_path_factory.mktemp("serve-http")
    model.save_pretrained(path)
    copy_tokenizer(spm_dir, path)
    return path


@pytest.fixture(scope="module")
def ref(model_dir):
    """The same model in this process, run alone."""
    return kaki.load(model_dir, dtype="float32", device="cpu")


def start(model_dir, api_key=None, **config):
    llm = kaki.load(model_dir, dtype="float32", device="cpu")
    engine = Engine(llm, EngineConfig(**config), model_name=MODEL)
    return Server(create_app(engine, api_key=api_key))


@pytest.fixture(scope="module")
def url(model_dir):
    s = start(model_dir, max_batch_size=32)
    yield s.url
    s.stop()


@pytest.fixture(scope="module")
def small_url(model_dir):
    """One row and a queue of one: the queue and disconnects are visible."""
    s = start(model_dir, max_batch_size=1, max_queue=1)
    yield s.url
    s.stop()


def metrics(url) -> dict:
    """{(name, labels): value} of every sample, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def steps_with_at_least_8(m: dict) -> float:
    return m[("kaki_decode_batch_size_count", ())] - m[("kaki_decode_batch_size_bucket", (("le", "7.0"),))]


def sse_events(lines) -> list:
    """The JSON events of an SSE body (an iterator of lines), and 'DONE' for the last one."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append("DONE" if data == "[DONE]" else json.loads(data))
    return events


# ----------------------------------------------------------------------------- Adept's /api


def test_seed_readme_curl_command(url, ref):
    cmd = SEED_CURL.replace("<address of server>", url)
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert sorted(body) == ["generations", "human_readable_tokens", "logprobs", "text"]
    prompt = "human: Hello, how are you?\n\nadept:"
    alone = ref.generate(prompt, add_bos=False, max_new_tokens=128, temperature=1.0, top_p=0.9, seed=1234)[0]
    tok = ref.tokenizer
    # As the original shows them: the generation without the space after `adept:` (sentencepiece
    # drops it when a generation is decoded alone); `text` keeps it, between prompt and reply.
    assert body["generations"] == [tok.decode(alone.token_ids).removeprefix(" ")]
    assert body["text"] == [tok.decode(tok.encode(prompt, add_bos=False) + alone.token_ids)]
    assert body["text"][0].startswith(prompt)
    # One string per sampled token, except a first token that is only that space and the
    # end-of-text token, which show nothing: no "" at either end.
    pieces = [ref.tokenizer.id_to_piece(t) for t in alone.token_ids]
    if alone.token_ids and alone.token_ids[-1] in ref.tokenizer.eos_ids:
        pieces.pop()
    if pieces and pieces[0] == "\u2581":
        pieces.pop(0)
    shown_tokens = body["human_readable_tokens"][0]
    assert len(shown_tokens) == len(pieces) and shown_tokens[0] != "" and shown_tokens[-1] != ""
    assert not shown_tokens[0].startswith(" ")
    for shown, piece in zip(shown_tokens, pieces):
        if piece.startswith("<0x"):
            assert shown == piece  # byte-fallback pieces literally, as the original
        else:
            assert shown.strip() == piece.replace("\u2581", " ").strip()
    assert body["logprobs"] is None


def test_adept_logprobs_scoring_several_prompts_and_no_log(url, ref):
    prompts = ["the man of the world", "a"]
    r = httpx.put(url + "/api", json={"prompts": prompts, "tokens_to_generate": 5, "logprobs": True,
                                      "random_seed": 7, "top_k": 20, "no_log": True})
    assert r.status_code == 200, r.text  # the original answered no_log=true with a 500
    body = r.json()
    for i, p in enumerate(prompts):
        alone = ref.generate(p, add_bos=False, max_new_tokens=5, temperature=1.0, top_k=20, seed=7,
                             logprobs=True, prompt_logprobs=True)[0]
        assert body["generations"][i] == ref.tokenizer.decode(alone.token_ids).removeprefix(" ")
        # One entry per token after the first: prompt tokens, then generated ones.
        want = alone.prompt_logprobs[1:] + alone.logprobs
        assert body["logprobs"][i] == pytest.approx(want, abs=1e-4)
    # Scoring only: tokens_to_generate 0 returns the prompt's logprobs and no generations.
    r = httpx.put(url + "/api", json={"prompts": "the man of the world", "tokens_to_generate": 0, "logprobs": True})
    body = r.json()
    alone = ref.generate("the man of the world", add_bos=False, max_new_tokens=0, prompt_logprobs=True)[0]
    assert body["generations"] == [] and body["human_readable_tokens"] == []
    assert body["text"] == ["the man of the world"]
    assert body["logprobs"][0] == pytest.approx(alone.prompt_logprobs[1:], abs=1e-4)


# ----------------------------------------------------------------------------- OpenAI API


def test_openai_client_completions(url, ref):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = "the man of the world was"
    alone = ref.generate(prompt, max_new_tokens=12, temperature=0.0, logprobs=True, top_logprobs=2)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    c = r.choices[0]
    assert c.text == alone.text and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(alone.prompt_token_ids) and r.usage.completion_tokens == 12
    assert c.logprobs.token_logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    assert "".join(c.logprobs.tokens) == c.text
    assert [len(t) for t in c.logprobs.top_logprobs] == [2] * 12

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == alone.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    # Several prompts x n, seeded: choice j of a prompt samples with seed + j.
    r = client.completions.create(model=MODEL, prompt=["the", "a man"], max_tokens=6, n=2, seed=11,
                                  temperature=0.9, stop=[" of"])
    assert len(r.choices) == 4
    for k, c in enumerate(r.choices):
        p, j = ["the", "a man"][k // 2], k % 2
        alone = ref.generate(p, max_new_tokens=6, temperature=0.9, seed=11 + j, stop=[" of"])[0]
        assert (c.index, c.text, c.finish_reason) == (k, alone.text, alone.finish_reason)


def test_openai_client_chat(url, ref):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Hello, how are you?"},
                {"role": "assistant", "content": "fine"},
                {"role": "user", "content": "and the man?"}]
    # No chat_template and model_type persimmon: `auto` renders Adept's format.
    prompt = ADEPT.render(messages)
    assert prompt.endswith("\n\nhuman: and the man?\n\nadept:")
    alone = ref.generate(prompt, max_new_tokens=16, temperature=0.0, stop=ADEPT.stop, logprobs=True)[0]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                       logprobs=True, top_logprobs=3)
    c = r.choices[0]
    # The reply itself: without the space the chat format puts after `adept:`.
    assert c.message.role == "assistant" and c.message.content == alone.text.removeprefix(" ")
    assert c.finish_reason == alone.finish_reason
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode(prompt))
    assert [t.logprob for t in c.logprobs.content] == pytest.approx(alone.logprobs, abs=1e-4)
    assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == alone.text.removeprefix(" ")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_sse_wire_format_ends_with_done(url):
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True, "n": 2}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = sse_events(raw.splitlines())
    assert events[-1] == "DONE"
    finished = [c["index"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert sorted(finished) == [0, 1]


# ----------------------------------------------------------------------------- batching


def test_32_concurrent_clients_batched_and_correct(url, ref):
    """Mixed routes, lengths and sampling settings at once: every answer equals the same request
    run alone, and the server decoded 8 or more sequences in one step (so it batched)."""
    rng = random.Random(5)
    jobs = []
    for i in range(32):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        n = rng.randint(16, 48)
        kind = i % 4
        if kind == 0:  # greedy completion
            jobs.append(("POST", "/v1/completions", {"prompt": words, "max_tokens": n, "temperature": 0},
                         dict(prompt=words, max_new_tokens=n, temperature=0.0)))
        elif kind == 1:  # seeded top-p sampling with a stop string
            jobs.append(("POST", "/v1/completions", {"prompt": words, "max_tokens": n, "temperature": 0.8,
                                                     "top_p": 0.9, "seed": i, "stop": " the"},
                         dict(prompt=words, max_new_tokens=n, temperature=0.8, top_p=0.9, seed=i, stop=[" the"])))
        elif kind == 2:  # greedy chat
            msgs = [{"role": "user", "content": words}]
            jobs.append(("POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": n, "temperature": 0},
                         dict(prompt=ADEPT.render(msgs), max_new_tokens=n, temperature=0.0, stop=ADEPT.stop)))
        else:  # Adept's /api, seeded top-k
            jobs.append(("PUT", "/api", {"prompts": [words], "tokens_to_generate": n, "top_k": 20,
                                         "random_seed": i},
                         dict(prompt=words, max_new_tokens=n, temperature=1.0, top_k=20, seed=i, add_bos=False)))
    before = steps_with_at_least_8(metrics(url))
    barrier = threading.Barrier(len(jobs))
    answers = [None] * len(jobs)

    def client(i):
        method, path, body, _ = jobs[i]
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait()
            r = c.request(method, path, json=body)
        assert r.status_code == 200, r.text
        answers[i] = r.json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(a is not None for a in answers)
    for (_, path, _, kw), a in zip(jobs, answers):
        alone = ref.generate(kw.pop("prompt"), **kw)[0]
        if path == "/api":
            assert a["generations"] == [ref.tokenizer.decode(alone.token_ids).removeprefix(" ")]
        elif path == "/v1/completions":
            assert (a["choices"][0]["text"], a["choices"][0]["finish_reason"]) == (alone.text, alone.finish_reason)
            assert a["usage"]["completion_tokens"] == len(alone.token_ids)
        else:
            assert a["choices"][0]["message"]["content"] == alone.text.removeprefix(" ")
    assert steps_with_at_least_8(metrics(url)) > before


def test_short_request_finishes_while_long_one_runs(url):
    long_body = {"prompt": "the", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", "/v1/completions", json=long_body) as long:
        lines = long.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        short = httpx.post(url + "/v1/completions", json={"prompt": "a man", "max_tokens": 8, "temperature": 0},
                           timeout=30)
        assert short.status_code == 200 and short.json()["choices"][0]["finish_reason"] == "length"
        # The server says so too: the long one is still running, the short one has left.
        assert httpx.get(url + "/health").json()["running"] == 1
        # The long one is still going: its next event is another token, not the end.
        nxt = next(line for line in lines if line.startswith("data: "))
        assert json.loads(nxt[6:])["choices"][0]["finish_reason"] is None


# ----------------------------------------------------------------------------- limits


def _wait_for(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


class RowHolder:
    """A long streamed request that has had its first token: it holds the only row until
    `leave()` closes the connection mid-stream."""

    def __init__(self, url):
        self.client = httpx.Client(base_url=url, timeout=30)
        self.cm = self.client.stream("POST", "/v1/completions", json={
            "prompt": "the", "max_tokens": MAX_LONG, "temperature": 0, "ignore_eos": True, "stream": True})
        # Keep the line iterator referenced: dropping it closes the connection.
        self.lines = self.cm.__enter__().iter_lines()
        first = next(line for line in self.lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None

    def leave(self):
        self.cm.__exit__(None, None, None)
        self.client.close()


def test_client_disconnect_frees_its_slot(small_url):
    before = metrics(small_url)
    holder = RowHolder(small_url)
    assert httpx.get(small_url + "/health").json()["running"] == 1
    holder.leave()  # the client goes away mid-stream
    # The row is free again: the next request is admitted and answered...
    r = httpx.post(small_url + "/v1/completions", json={"prompt": "a", "max_tokens": 5}, timeout=30)
    assert r.status_code == 200
    after = metrics(small_url)
    # ...long before the abandoned one could have used up its 4000 tokens.
    generated = after[("kaki_generation_tokens_total", ())] - before.get(("kaki_generation_tokens_total", ()), 0)
    assert generated < 1000
    aborts = ("kaki_sequences_finished_total", (("reason", "abort"),))
    assert after[aborts] - before.get(aborts, 0) == 1
    # The same for a client that gives up waiting for a whole (non-streamed) answer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_url + "/v1/completions", timeout=0.5, json={
            "prompt": "the", "max_tokens": MAX_LONG, "temperature": 0, "ignore_eos": True})
    r = httpx.post(small_url + "/v1/completions", json={"prompt": "a", "max_tokens": 5}, timeout=30)
    assert r.status_code == 200
    final = metrics(small_url)
    assert final[aborts] - after[aborts] == 1
    assert final[("kaki_generation_tokens_total", ())] - after[("kaki_generation_tokens_total", ())] < MAX_LONG


def test_full_queue_gets_503_with_retry_after(small_url):
    holder = RowHolder(small_url)
    queued = {}
    t = threading.Thread(target=lambda: queued.update(r=httpx.post(
        small_url + "/v1/completions", json={"prompt": "a", "max_tokens": 3}, timeout=60)))
    t.start()
    _wait_for(lambda: httpx.get(small_url + "/health").json()["waiting"] == 1)
    r = httpx.post(small_url + "/v1/completions", json={"prompt": "a", "max_tokens": 3})
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert "--max-queue" in r.json()["error"]["message"]
    r = httpx.put(small_url + "/api", json={"prompts": ["a"], "tokens_to_generate": 3})
    assert r.status_code == 503
    holder.leave()
    t.join(30)
    assert queued["r"].status_code == 200


INVALID = [
    # Adept's PUT /api: each of the original's checks, now a 400 naming the field.
    ("PUT", "/api", {"tokens_to_generate": 5}, "prompts"),
    ("PUT", "/api", {"prompts": ["a"], "max_len": 5}, "max_len"),
    ("PUT", "/api", {"prompts": ["a"], "sentences": ["a"]}, "sentences"),
    ("PUT", "/api", {"prompts": ["a"] * 129}, "prompts"),
    ("PUT", "/api", {"prompts": [1]}, "prompts"),
    ("PUT", "/api", {"prompts": [""]}, "prompts"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": "5"}, "tokens_to_generate"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate"),
    ("PUT", "/api", {"prompts": ["a"], "logprobs": "yes"}, "logprobs"),
    ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 0}, "logprobs"),
    ("PUT", "/api", {"prompts": ["a"], "temperature": 0}, "temperature"),
    ("PUT", "/api", {"prompts": ["a"], "temperature": 101}, "temperature"),
    ("PUT", "/api", {"prompts": ["a"], "top_k": 1.5}, "top_k"),
    ("PUT", "/api", {"prompts": ["a"], "top_k": 1001}, "top_k"),
    ("PUT", "/api", {"prompts": ["a"], "top_p": "0.9"}, "top_p"),
    ("PUT", "/api", {"prompts": ["a"], "top_p": 1.5}, "top_p"),
    ("PUT", "/api", {"prompts": ["a"], "top_p": 0.5, "top_k": 5}, "top_p"),
    ("PUT", "/api", {"prompts": ["a"], "add_BOS": 1}, "add_BOS"),
    ("PUT", "/api", {"prompts": ["a"], "random_seed": "1"}, "random_seed"),
    ("PUT", "/api", {"prompts": ["a"], "random_seed": -5}, "random_seed"),
    ("PUT", "/api", {"prompts": ["a"], "no_log": "no"}, "no_log"),
    ("PUT", "/api", {"prompts": ["the " * 5000]}, "prompts"),
    # /v1/completions
    ("POST", "/v1/completions", {"max_tokens": 5}, "prompt"),
    ("POST", "/v1/completions", {"prompt": 5}, "prompt"),
    ("POST", "/v1/completions", {"prompt": []}, "prompt"),
    ("POST", "/v1/completions", {"prompt": [1, 100000]}, "prompt"),
    ("POST", "/v1/completions", {"prompt": "the " * 5000}, "prompt"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 5000}, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "temperature": -1}, "temperature"),
    ("POST", "/v1/completions", {"prompt": "a", "temperature": 2.5}, "temperature"),
    ("POST", "/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("POST", "/v1/completions", {"prompt": "a", "n": 0}, "n"),
    ("POST", "/v1/completions", {"prompt": "a", "n": 17}, "n"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": 5}, "stop"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ("POST", "/v1/completions", {"prompt": "a", "seed": -1}, "seed"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("POST", "/v1/completions", {"prompt": "a", "presence_penalty": 1}, "presence_penalty"),
    ("POST", "/v1/completions", {"prompt": "a", "best_of": 3}, "best_of"),
    ("POST", "/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    # /v1/chat/completions
    ("POST", "/v1/chat/completions", {"max_tokens": 5}, "messages"),
    ("POST", "/v1/chat/completions", {"messages": []}, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "the " * 5000}]}, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": -2},
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True,
                                      "top_logprobs": 21}, "top_logprobs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
     "top_logprobs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": [{}]}, "tools"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "response_format": {"type": "json_object"}}, "response_format"),
]


def test_every_invalid_field_is_a_400_naming_it(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        for method, path, body, field in INVALID:
            r = c.request(method, path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            err = r.json()["error"]
            assert err["param"] == field and field in err["message"], (path, body, err)
        r = c.put("/api", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "body"
        r = c.post("/v1/completions", json={"prompt": "a", "model": "gpt-4"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# ----------------------------------------------------------------------------- ops


def test_health_and_metrics(url):
    assert httpx.get(url + "/health").json()["status"] == "ok"
    r = httpx.get(url + "/healthz")
    assert r.status_code == 200 and r.json() == {"success": True}
    httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 3})
    m = metrics(url)
    assert m[("kaki_requests_total", (("route", "/v1/completions"), ("status", "200")))] >= 1
    assert m[("kaki_time_to_first_token_seconds_count", ())] >= 1
    assert m[("kaki_time_per_output_token_seconds_count", ())] >= 2
    assert m[("kaki_generation_tokens_total", ())] >= 3
    assert ("kaki_queue_depth", ()) in m and ("kaki_running_sequences", ()) in m


def test_api_key_guards_all_but_health(model_dir):
    from openai import AuthenticationError, OpenAI

    s = start(model_dir, api_key="s3cret", max_batch_size=2)
    try:
        for path in ("/health", "/healthz"):
            assert httpx.get(s.url + path).status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("PUT", "/api")):
            r = httpx.request(method, s.url + path, json={"prompts": ["a"]})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = httpx.request(method, s.url + path, json={"prompts": ["a"], "tokens_to_generate": 2},
                              headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200
        ok = OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="a", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        s.stop()
