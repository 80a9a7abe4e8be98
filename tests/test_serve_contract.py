"""The HTTP contract with no model: `create_app` over a fake engine that satisfies
kaki.serve.client.EngineClient, served by uvicorn on a loopback port and driven with httpx.

The fake gives deterministic token ids (a fixed run of words, started at an offset the seed picks)
and can hold its sequences (the queue fills) or fail them, so every answer the routes build (whole
and streamed replies, n > 1, stop strings, logprobs, PUT /api's keys, the error shapes, 400, 500
and 503) is checked here without loading weights. test_serve_http.py checks the same routes
against a real tiny model."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from kaki.chat_format import get_format
from kaki.engine import TextSequence
from kaki.engine.scheduler import Event, check_prompt_fits
from kaki.errors import ParamError
from kaki.serve.app import create_app
from kaki.serve.client import EngineClient, EngineStopped, Handle, Output, QueueFull, SeqRequest, token_text
from kaki.serve.metrics import Metrics
from kaki.tokenizer import Tokenizer

from test_serve_http import Server

MODEL = "fake-model"
CHAT = "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}
WORDS = "the cat sat on a mat and the dog ran to the door of the house"
DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5}


class FakeEngine:
    """An EngineClient with no model. A sequence's reply is the token ids of WORDS, from an offset
    its seed picks (0 without a seed), until max_new_tokens, a stop id or a stop string (through
    kaki.engine.TextSequence, the id->text adapter the real engine uses). Token k's logprob is
    -(k + 1) / 8 and its alternatives are tokens of "xyzq", each 1 less likely.

    `hold`: submitted sequences stay unfinished until `release()` (so the queue fills);
    `fail`: sequences end with this error after their first token."""

    model_name = MODEL
    max_seq_len = 64
    context_length = 128

    def __init__(self, tokenizer: Tokenizer, max_queue: int = 4):
        self.tokenizer = tokenizer
        self.metrics = Metrics()
        self.error: str | None = None
        self.max_queue = max_queue
        self.reply = tokenizer.encode(WORDS, add_bos=False)
        # Alternatives for top logprobs: tokens that are not in the reply, so no two share a text.
        self.others = [t for t in tokenizer.encode("xyzq", add_bos=False) if t not in self.reply]
        self.hold = False
        self.fail: str | None = None
        self.submitted: list[SeqRequest] = []
        self.aborted = 0
        self._held: list[tuple[Handle, list[SeqRequest]]] = []
        self._unfinished = 0
        self._state = "new"
        self._lock = threading.Lock()

    # What the app reads
    @property
    def running(self) -> bool:
        return self._state == "running"

    def start(self) -> None:
        self._state = "running"

    def shutdown(self, timeout: float = 10.0) -> None:
        self._state = "stopped"
        for handle, requests in self._take_held():
            for i in range(len(requests)):
                handle.put(i, Output(finish_reason="error", error="the server is shutting down"))

    @property
    def defaults(self) -> dict:
        return dict(DEFAULTS)

    def chat_format(self, name: str = "auto"):
        return get_format(name, model_type="persimmon")

    def encode(self, prompt, add_bos=None) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=add_bos)
        if not all(isinstance(t, int) and 0 <= t < self.tokenizer.vocab_size for t in prompt):
            raise ParamError("prompt", f"token ids must be integers in [0, {self.tokenizer.vocab_size})")
        return list(prompt)

    def fit(self, n_prompt, max_new, *, field="max_tokens", cap=False, prompt_field="prompt") -> int:
        return check_prompt_fits(n_prompt, max_new, self.max_seq_len, cap=cap, field=field,
                                 prompt_field=prompt_field, limit_text=f"this fake takes {self.max_seq_len}")

    def stats(self) -> dict:
        with self._lock:
            waiting = sum(len(r) for _, r in self._held)
        return {"running": 0, "waiting": waiting, "max_batch_size": 1, "max_seq_len": self.max_seq_len}

    # The work
    def submit(self, requests, loop=None, field="n") -> Handle:
        if len(requests) > self.max_queue:
            raise ParamError(field, f"makes {len(requests)} sequences; this fake holds {self.max_queue}")
        if self._state == "stopped":
            raise EngineStopped("the fake is shutting down")
        with self._lock:
            if self._unfinished + len(requests) > self.max_queue:
                self.metrics.rejected.inc(len(requests))
                raise QueueFull(f"{self._unfinished} sequences are already waiting; retry shortly")
            self._unfinished += len(requests)
        self.submitted += requests
        handle = Handle(self, len(requests), loop)
        if self.hold:
            with self._lock:
                self._held.append((handle, list(requests)))
        else:
            self._run(handle, requests)
        return handle

    def abort(self, handle: Handle) -> None:
        with self._lock:
            mine = [h for h in self._held if h[0] is handle]
            self._held = [h for h in self._held if h[0] is not handle]
        for _, requests in mine:
            self.aborted += len(requests)
            for i in range(len(requests)):
                self._finish(handle, i, Output(finish_reason="abort"))

    def release(self) -> None:
        for handle, requests in self._take_held():
            self._run(handle, requests)

    def waiting(self) -> int:
        return self.stats()["waiting"]

    def _take_held(self):
        with self._lock:
            held, self._held = self._held, []
        return held

    def _finish(self, handle: Handle, i: int, out: Output) -> None:
        with self._lock:
            self._unfinished -= 1
        handle.put(i, out)

    def _run(self, handle: Handle, requests: list[SeqRequest]) -> None:
        for i, r in enumerate(requests):
            p = r.params
            if p.prompt_logprobs:
                handle.prompt_logprobs[i] = [None] + [-1.0] * (len(r.prompt_ids) - 1)
            text = TextSequence(self.tokenizer, r.prompt_ids, p.stop)
            start = (p.seed or 0) % len(self.reply)
            for k in range(p.max_new_tokens):
                token = self.reply[(start + k) % len(self.reply)]
                last = k == p.max_new_tokens - 1 or token in p.stop_token_ids or self.fail is not None
                reason = None if not last else ("error" if self.fail else "stop" if token in p.stop_token_ids
                                                 else "length")
                event = Event(0, token, finish_reason=reason, error=self.fail if reason == "error" else None)
                out = Output(token_id=token, text=text.push(event), error=event.error)
                if p.logprobs:
                    ctx = (r.prompt_ids + text.token_ids[:-1])[-3:]
                    out.logprob, out.token_text = -(k + 1) / 8, token_text(self.tokenizer, ctx, token)
                    alts = ([token] + self.others)[:p.top_logprobs]
                    out.top = [(token_text(self.tokenizer, ctx, t), out.logprob - j) for j, t in enumerate(alts)]
                if text.finished:
                    out.finish_reason = text.finish_reason
                    self._finish(handle, i, out)
                    break
                handle.put(i, out)


def test_the_fake_is_an_engine_client(tok):
    # Every name of the Protocol, so the fake cannot drift from what the routes may use.
    names = {n for n in vars(EngineClient) if not n.startswith("_")} | set(EngineClient.__annotations__)
    fake = FakeEngine(tok)
    assert not [n for n in names if not hasattr(fake, n)]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tok(spm_dir) -> Tokenizer:
    return Tokenizer.from_dir(spm_dir)


@pytest.fixture(scope="module")
def served(tok):
    engine = FakeEngine(tok)
    s = Server(create_app(engine))
    with httpx.Client(base_url=s.url, timeout=30) as client:
        yield engine, client
    s.stop()


@pytest.fixture
def fake(served):
    engine, client = served
    engine.hold, engine.fail = False, None
    engine.submitted.clear()
    return engine, client


def assert_error(r: httpx.Response, status: int, param="any", says: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["message"], err
    if param != "any":
        assert err["param"] == param, err
    assert says in err["message"], err
    return err


def events(r: httpx.Response) -> list:
    """The SSE events of a streamed answer, [DONE] checked and dropped."""
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text[:300]
    data = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e.strip()]
    assert data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def reply_text(tok, prompt_ids, ids) -> str:
    """What the fake's reply ids read as after the prompt."""
    return tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)):]


# ----------------------------------------------------------------------------- /v1/completions

def test_completion_whole(fake, tok):
    engine, c = fake
    r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    prompt = tok.encode("the cat")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert choice["text"] == reply_text(tok, prompt, engine.reply[:4])
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 4, "total_tokens": len(prompt) + 4}
    # What the route asked of the engine: its fields over the model's defaults.
    (req,) = engine.submitted
    assert req.prompt_ids == prompt
    assert (req.params.max_new_tokens, req.params.temperature, req.params.top_p) == (4, 0, DEFAULTS["top_p"])


def test_completion_defaults_and_token_id_prompts(fake, tok):
    engine, c = fake
    ids = tok.encode("a dog", add_bos=False)
    r = c.post("/v1/completions", json={"prompt": ids})
    assert r.status_code == 200, r.text
    (req,) = engine.submitted
    assert req.prompt_ids == ids and req.params.temperature == DEFAULTS["temperature"]
    # No max_tokens: OpenAI's default for completions.
    assert req.params.max_new_tokens == 16 and r.json()["usage"]["completion_tokens"] == 16


def test_completion_n_and_seed(fake, tok):
    engine, c = fake
    r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 3, "n": 3, "seed": 2})
    choices = r.json()["choices"]
    assert [ch["index"] for ch in choices] == [0, 1, 2]
    assert [q.params.seed for q in engine.submitted] == [2, 3, 4]  # choice j samples with seed + j
    prompt = tok.encode("the cat")
    assert [ch["text"] for ch in choices] == [reply_text(tok, prompt, engine.reply[s:s + 3]) for s in (2, 3, 4)]
    assert len({ch["text"] for ch in choices}) == 3
    assert r.json()["usage"]["completion_tokens"] == 9


def test_completion_stop_string_and_stop_ids(fake, tok):
    engine, c = fake
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 30, "temperature": 0, "stop": [" mat"]})
    (choice,) = r.json()["choices"]
    whole = reply_text(tok, tok.encode("x"), engine.reply[:30])
    assert " mat" in whole and choice["text"] == whole[:whole.index(" mat")] and choice["finish_reason"] == "stop"
    assert engine.submitted[0].params.stop == [" mat"]
    stop_id = engine.reply[2]
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 10, "temperature": 0, "stop_token_ids": [stop_id]})
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "stop" and choice["text"] == reply_text(tok, tok.encode("x"), engine.reply[:2])
    assert r.json()["usage"]["completion_tokens"] == 3  # the stop id counts, and is not shown


def test_completion_logprobs_shape(fake, tok):
    engine, c = fake
    r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3, "temperature": 0, "logprobs": 2,
                                        "echo": True})
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["token_logprobs"] == [-0.125, -0.25, -0.375]
    assert "".join(lp["tokens"]) == choice["text"][len("the"):]
    assert [len(t) for t in lp["top_logprobs"]] == [2, 2, 2]
    assert all(t[tok_] == v for t, tok_, v in zip(lp["top_logprobs"], lp["tokens"], lp["token_logprobs"]))
    # Offsets count from the start of the echoed prompt.
    assert lp["text_offset"][0] == len("the")
    assert lp["text_offset"] == [len("the") + len("".join(lp["tokens"][:k])) for k in range(3)]


def test_completion_stream(fake, tok):
    engine, c = fake
    whole = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 5, "n": 2, "seed": 1}).json()
    r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 5, "n": 2, "seed": 1, "stream": True,
                                        "stream_options": {"include_usage": True}})
    chunks = events(r)
    texts, finish = {0: "", 1: ""}, {}
    for ch in chunks[:-1]:
        assert ch["object"] == "text_completion" and ch["model"] == MODEL
        for choice in ch["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    assert [texts[i] for i in (0, 1)] == [ch["text"] for ch in whole["choices"]]
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


# ----------------------------------------------------------------------------- /v1/chat/completions

def chat_body(**extra) -> dict:
    return {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], **extra}


def test_chat_whole_renders_the_format_and_strips_the_lead(fake, tok):
    engine, c = fake
    r = c.post(CHAT, json=chat_body(max_tokens=4, temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    (req,) = engine.submitted
    fmt = get_format("adept")
    assert tok.decode(req.prompt_ids) == fmt.render([{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert set(fmt.stop) <= set(req.params.stop)  # the format's stop strings reach the engine
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    # The reply without the space Adept's format puts after "adept:".
    assert choice["message"]["content"] == reply_text(tok, req.prompt_ids, engine.reply[:4]).removeprefix(" ")
    assert body["usage"]["prompt_tokens"] == len(req.prompt_ids) and body["usage"]["completion_tokens"] == 4


def test_chat_stream_n2_equals_whole(fake):
    engine, c = fake
    whole = c.post(CHAT, json=chat_body(max_tokens=5, n=2, seed=4)).json()
    chunks = events(c.post(CHAT, json=chat_body(max_tokens=5, n=2, seed=4, stream=True,
                                                stream_options={"include_usage": True})))
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    content, roles, finish = {0: "", 1: ""}, {}, {}
    for ch in chunks[:-1]:
        (choice,) = ch["choices"]
        i, delta = choice["index"], choice["delta"]
        if "role" in delta and delta["role"]:
            roles[i] = delta["role"]
        content[i] += delta.get("content") or ""
        if choice["finish_reason"]:
            finish[i] = choice["finish_reason"]
    assert roles == {0: "assistant", 1: "assistant"} and finish == {0: "length", 1: "length"}
    assert [content[i] for i in (0, 1)] == [ch["message"]["content"] for ch in whole["choices"]]
    assert content[0] != content[1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_chat_logprobs_shape(fake):
    engine, c = fake
    r = c.post(CHAT, json=chat_body(max_tokens=3, temperature=0, logprobs=True, top_logprobs=2))
    (choice,) = r.json()["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == 3
    for entry, lp in zip(content, (-0.125, -0.25, -0.375)):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] == lp and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["token"] == entry["token"]
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
    # Streamed, the same entries, one chunk at a time.
    chunks = events(c.post(CHAT, json=chat_body(max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                                stream=True)))
    streamed = [e for ch in chunks for e in ((ch["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert streamed == content


# ----------------------------------------------------------------------------- PUT /api

def test_adept_api_fields_and_keys(fake, tok):
    engine, c = fake
    r = c.put("/api", json={"prompts": ["human: hi\n\nadept:", "the cat"], "tokens_to_generate": 4,
                            "temperature": 0.5, "top_p": 0.9, "random_seed": 3, "logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "generations", "human_readable_tokens", "logprobs"}
    assert len(engine.submitted) == 2
    for k, (prompt, req) in enumerate(zip(["human: hi\n\nadept:", "the cat"], engine.submitted)):
        p = req.params
        assert req.prompt_ids == tok.encode(prompt, add_bos=False)  # add_BOS defaults to false
        assert (p.temperature, p.top_p, p.seed, p.max_new_tokens) == (0.5, 0.9, 3, 4)
        ids = engine.reply[3:7]
        assert body["text"][k] == tok.decode(req.prompt_ids + ids)
        assert body["generations"][k] == tok.decode(ids).removeprefix(" ")
        assert "".join(body["human_readable_tokens"][k]) == body["generations"][k]
        # Entry j: token j+1 given those before it, prompt then reply.
        assert body["logprobs"][k] == [-1.0] * (len(req.prompt_ids) - 1) + [-0.125, -0.25, -0.375, -0.5]
    r = c.put("/api", json={"prompts": ["the cat"], "tokens_to_generate": 2})
    assert set(r.json()) == {"text", "generations", "human_readable_tokens", "logprobs"}
    assert r.json()["logprobs"] is None


def test_adept_api_errors_name_the_field(fake):
    _, c = fake
    assert_error(c.put("/api", json={"prompts": ["a"], "temperature": -1}), 400, "temperature")
    assert_error(c.put("/api", json={"prompts": ["a"], "top_p": 0.5, "top_k": 3}), 400, "top_p")
    assert_error(c.put("/api", json={"prompts": [""]}), 400, "prompts")


# ----------------------------------------------------------------------------- the rest

def test_models_health_info_metrics(fake):
    engine, c = fake
    models = c.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == engine.max_seq_len

    health = c.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", **engine.stats()}
    assert c.get("/healthz").json() == {"success": True}

    info = c.get("/info").json()
    assert (info["model"], info["context_length"], info["model_context_length"]) == (MODEL, 64, 128)
    assert info["chat_format"] == "adept" and info["moderation"] is False
    assert info["retrieval"]["enabled"] is False
    assert info["defaults"]["temperature"] == DEFAULTS["temperature"] and info["defaults"]["top_p"] == DEFAULTS["top_p"]
    assert info["defaults"]["max_tokens"] == DEFAULTS["max_new_tokens"]

    c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
    m = c.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert 'kaki_requests_total{route="/v1/completions",status="200"}' in m.text, m.text[:2000]
    for name in ("kaki_prefix_cache_hit_tokens_total", "kaki_prefix_cache_evictions_total", "kaki_prefix_cache_bytes",
                 "kaki_queue_depth", "kaki_sequences_rejected_total"):
        assert name in m.text


def test_400_shapes(fake):
    engine, c = fake
    assert_error(c.post("/v1/completions", json={"prompt": "a", "temperature": -1}), 400, "temperature")
    assert_error(c.post("/v1/completions", json={"prompt": "a " * 100}), 400, "prompt", "tokens")
    assert_error(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 500}), 400, "max_tokens")
    assert_error(c.post("/v1/completions", json={"prompt": [10**9]}), 400, "prompt")
    assert_error(c.post(CHAT, json=chat_body(n=9)), 400, "n")  # more than the fake can ever hold
    assert_error(c.post(CHAT, json={"messages": []}), 400, "messages")
    assert_error(c.post(CHAT, content=b"{not json", headers={"Content-Type": "application/json"}), 400, "body")
    err = assert_error(c.post(CHAT, json=chat_body(model="gpt-9")), 404, "model")
    assert err["code"] == "model_not_found"
    assert assert_error(c.get("/nope"), 404)["code"] == "not_found"
    assert assert_error(c.get("/v1/completions"), 405)["code"] == "method_not_allowed"
    assert not engine.submitted  # none of them reached the engine


def test_engine_failure_is_a_500_or_an_error_event(fake):
    engine, c = fake
    engine.fail = "the fake's forward pass broke"
    err = assert_error(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}), 500, None,
                       "the fake's forward pass broke")
    assert err["type"] == "server_error"
    assert_error(c.put("/api", json={"prompts": ["a"], "tokens_to_generate": 3}), 500, None, "broke")
    # Streamed: the tokens before the failure, an error event, and the stream still ends with [DONE].
    chunks = events(c.post(CHAT, json=chat_body(max_tokens=3, stream=True)))
    assert chunks[-1] == {"error": {"message": "the fake's forward pass broke", "type": "server_error",
                                    "param": None, "code": None}}
    engine.fail = None
    assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200


def _background(c: httpx.Client, method: str, path: str, body: dict) -> tuple[threading.Thread, list]:
    answers: list = []
    t = threading.Thread(target=lambda: answers.append(c.request(method, path, json=body)), daemon=True)
    t.start()
    return t, answers


def _until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.01)


def rejected(c: httpx.Client) -> float:
    (line,) = [x for x in c.get("/metrics").text.splitlines() if x.startswith("kaki_sequences_rejected_total ")]
    return float(line.split()[1])


def test_full_queue_is_a_503_and_the_waiting_finish(fake, served):
    engine, c = fake
    engine.hold = True
    rejected_before = rejected(c)
    with httpx.Client(base_url=str(c.base_url), timeout=30) as other:
        waiting = [_background(other, "POST", CHAT, chat_body(max_tokens=2, n=2)),
                   _background(other, "PUT", "/api", {"prompts": ["a", "b"], "tokens_to_generate": 2})]
        _until(lambda: engine.waiting() == engine.max_queue, "the held requests did not reach the engine")
        assert c.get("/health").json()["waiting"] == engine.max_queue
        for method, path, body in (("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1}),
                                   ("POST", CHAT, chat_body(max_tokens=1)),
                                   ("PUT", "/api", {"prompts": ["a"], "tokens_to_generate": 1})):
            r = c.request(method, path, json=body)
            err = assert_error(r, 503, None, "retry")
            assert err["type"] == "server_overloaded" and r.headers["retry-after"] == "1"
        assert rejected(c) - rejected_before == 3  # one sequence per refused request
        engine.hold = False
        engine.release()
        for t, answers in waiting:
            t.join(10)
            assert answers and answers[0].status_code == 200, answers
    assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_a_client_that_leaves_aborts_its_sequences(fake):
    engine, c = fake
    engine.hold = True
    aborted = engine.aborted

    async def leave():
        async with httpx.AsyncClient(base_url=str(c.base_url), timeout=30) as ac:
            task = asyncio.ensure_future(ac.post(CHAT, json=chat_body(max_tokens=2, n=2)))
            await asyncio.to_thread(_until, lambda: engine.waiting() == 2, "the request did not arrive")
            task.cancel()  # the connection closes with the request unanswered
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(leave())
    _until(lambda: engine.aborted == aborted + 2, "the route did not abort its sequences")
    assert engine.waiting() == 0
    engine.hold = False
