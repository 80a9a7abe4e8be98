"""kaki serve against hostile or careless clients, over real HTTP (uvicorn on a loopback port, a
tiny random Persimmon): list caps and the body limit (issue #17 item 2), tokenizing off the event
loop (3), one error shape with the connection kept (4), retrieval sources without server paths (5)
and a seeded fuzz of every route. Only HTTP is driven, so the tests hold whatever engine runs
behind the routes."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

import kaki
from kaki.retrieval import build_index
from kaki.serve.app import create_app
from kaki.serve.engine import Engine, EngineConfig
from kaki.serve.schemas import (MAX_CONTENT_PARTS, MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_PROMPTS, MAX_STOP_CHARS,
                                MAX_STOP_TOKEN_IDS)

# model_dir: a tiny Persimmon whose greedy output is words; one_thread (autouse): one intra-op thread.
from test_serve_http import Server, model_dir, one_thread  # noqa: F401

MODEL = "tiny-persimmon"
CHAT = "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}


def start(model_dir, retriever=None, **app_args) -> Server:
    llm = kaki.load(model_dir, dtype="float32", device="cpu")
    engine = Engine(llm, EngineConfig(max_batch_size=4, max_queue=32), model_name=MODEL)
    app = create_app(engine, retriever=retriever, **app_args)
    s = Server(app)
    s.app = app
    return s


@pytest.fixture(scope="module")
def server(model_dir):
    s = start(model_dir, max_body_mb=32)
    yield s
    s.stop()


def assert_error(r, status: int, param: str | None = "any", says: str = "") -> dict:
    """`r` is the documented error object: {"error": {"message", "type", "param", "code"}}."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"], err
    if param != "any":
        assert err["param"] == param, err
    assert says in err["message"], err
    return err


def chat_body(content="hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


# ----------------------------------------------------------------------------- item 2: caps, body limit

CAPPED = [
    ("POST", "/v1/completions", {"prompt": "a", "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))},
     "stop_token_ids"),
    ("POST", "/v1/completions", {"prompt": "a", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}},
     "logit_bias"),
    ("POST", "/v1/completions", {"prompt": ["a"] * (MAX_PROMPTS + 1), "max_tokens": 1}, "prompt"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": ["x" * (MAX_STOP_CHARS + 1)]}, "stop"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1), "max_tokens": 1},
     "messages"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] *
                                  (MAX_CONTENT_PARTS + 1)}], "max_tokens": 1}, "messages"),
    ("POST", CHAT, {**chat_body(), "stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
]


def test_every_list_field_is_capped(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for method, path, body, field in CAPPED:
            r = c.request(method, path, json=body)
            assert_error(r, 400, field, says="at most")
        # At the caps, requests run.
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 0,
                                           "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))})
        assert r.status_code == 200, r.text


def test_body_over_the_limit_is_413_before_it_is_read(model_dir):
    s = start(model_dir, max_body_mb=1)
    try:
        big = json.dumps({"prompt": "a", "max_tokens": 1, "unused": "x" * (2 << 20)}).encode()
        r = httpx.post(s.url + "/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert_error(r, 413, "body", says="--max-body-mb")
        # Chunked (no Content-Length): refused once the count passes the limit.
        chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
        r = httpx.put(s.url + "/api", content=chunks, headers={"Content-Type": "application/json"})
        assert_error(r, 413, "body")
        # A declared 200 MB body: the answer comes at once, without waiting for (or reading) the body.
        host, port = urlparse(s.url).hostname, urlparse(s.url).port
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 209715200\r\n\r\n" + b"{" + b" " * 1000)
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 413"), head
        # Under the limit, a body of the same shape is fine.
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1, "unused": "x" * 1000})
        assert r.status_code == 200, r.text
    finally:
        s.stop()


# ----------------------------------------------------------------------------- item 3: the event loop

def test_tokenizing_runs_off_the_event_loop_and_health_stays_quick(server):
    tok = server.app.state.engine.tokenizer
    encode, calls = tok.encode, []
    began, ended = threading.Event(), threading.Event()

    def recording(text, *args, **kwargs):
        big = len(text) > 1_000_000
        if big:
            began.set()
        calls.append(threading.get_ident())
        try:
            return encode(text, *args, **kwargs)
        finally:
            if big:
                ended.set()
    tok.encode = recording
    try:
        huge = "the quick brown fox jumps over the lazy dog " * 250_000  # 11 MB: seconds to tokenize
        for method, path, body, field in (("POST", "/v1/completions", {"prompt": huge}, "prompt"),
                                          ("POST", CHAT, chat_body(huge), "messages"),
                                          ("PUT", "/api", {"prompts": [huge]}, "prompts")):
            began.clear(), ended.clear()
            got = {}
            t = threading.Thread(target=lambda: got.update(r=httpx.request(method, server.url + path, json=body,
                                                                            timeout=120)))
            t.start()
            assert began.wait(60), path
            t0 = time.perf_counter()
            r = httpx.get(server.url + "/health", timeout=30)
            health_s = time.perf_counter() - t0
            # /health answered while the prompt was still being tokenized, not after it.
            assert r.status_code == 200 and not ended.is_set(), (path, health_s)
            print(f"{path}: /health in {health_s * 1000:.0f} ms while an 11 MB prompt was tokenized")
            t.join(120)
            assert_error(got["r"], 400, field, says="tokens")  # far over the context, after tokenizing
    finally:
        tok.encode = encode
    loop_thread = server.thread.ident
    assert calls and loop_thread not in calls


# ----------------------------------------------------------------------------- item 4: one error shape

def _raw(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
         content_type: str | None = "application/json") -> httpx.Response:
    """One request on a kept-alive connection; the answer as an httpx.Response (for assert_error),
    after checking the server did not close the connection."""
    headers = {"Content-Type": content_type} if content_type else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    assert not resp.will_close, (method, path, resp.status, data[:200])  # the connection is kept
    return httpx.Response(resp.status, headers=dict(resp.getheaders()), content=data)


BAD = [
    # (method, path, body bytes, content type, status, param)
    ("POST", "/v1/completions", json.dumps({"prompt": "a", "seed": 2**64}).encode(), "application/json", 400, "seed"),
    ("POST", CHAT, json.dumps(chat_body(seed=2**70)).encode(), "application/json", 400, "seed"),
    ("POST", "/v1/completions", json.dumps({"prompt": "a", "seed": -3}).encode(), "application/json", 400, "seed"),
    ("PUT", "/api", json.dumps({"prompts": ["a"], "random_seed": 2**64}).encode(), "application/json", 400,
     "random_seed"),
    ("PUT", "/api", json.dumps({"prompts": ["a"], "random_seed": -7}).encode(), "application/json", 400,
     "random_seed"),
    ("POST", "/v1/completions", b'{"prompt": "a \\udfff b"}', "application/json", 400, "prompt"),
    ("POST", "/v1/completions", b'{"prompt": ["ok", "\\ud800"]}', "application/json", 400, "prompt"),
    ("POST", CHAT, b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', "application/json", 400, "messages"),
    ("POST", CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "application/json", 400, "messages"),
    ("PUT", "/api", b'{"prompts": ["\\udfff"]}', "application/json", 400, "prompts"),
    ("POST", "/v1/completions", b'{"prompt": "a", "model": "\\udfff"}', "application/json", 400, "model"),
    ("POST", "/v1/completions", b'{"prompt": "a", "stop": ["\\udfff"]}', "application/json", 400, "stop"),
    ("POST", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', "application/json", 400, "temperature"),
    ("POST", "/v1/completions", b'{"prompt": "a", "repetition_penalty": Infinity}', "application/json", 400,
     "repetition_penalty"),
    ("POST", "/v1/completions", b'{"prompt": "caf\xe9"}', "application/json", 400, "body"),
    ("PUT", "/api", b'{"prompts": ["\xff\xfe"]}', "application/json", 400, "body"),
    ("POST", CHAT, b'{"messages": [{"role": "user", "content": "\xc3"}]}', None, 400, "body"),
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "body"),
    ("PUT", "/api", b'{"prompts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400, "body"),
    ("POST", CHAT, b"{" * 100_000, "text/plain", 400, "body"),
    ("POST", "/v1/completions", b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", "application/json", 400,
     "body"),
    ("GET", "/no/such/route", None, None, 404, None),
    ("POST", "/v1/nothing", b"{}", "application/json", 404, None),
    ("GET", "/v1/completions", None, None, 405, None),
    ("DELETE", "/api", None, None, 405, None),
    ("POST", "/health", b"{}", "application/json", 405, None),
]


def test_every_error_has_one_shape_and_keeps_the_connection(server):
    conn = http.client.HTTPConnection(urlparse(server.url).hostname, urlparse(server.url).port, timeout=60)
    try:
        for method, path, body, ctype, status, param in BAD:
            r = _raw(conn, method, path, body, ctype)
            assert_error(r, status, param)
        # The same connection still serves a normal request.
        r = _raw(conn, "POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2}).encode())
        assert r.status_code == 200 and len(r.json()["choices"]) == 1
    finally:
        conn.close()
    # The largest seed is accepted, also with n > 1 (choice j's seed wraps past 2**64 - 1).
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, "seed": 2**64 - 1, "n": 2})
    assert r.status_code == 200, r.text
    r = httpx.put(server.url + "/api", json={"prompts": ["a"], "tokens_to_generate": 2, "random_seed": 2**64 - 1})
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- item 5: sources

def test_sources_name_paths_relative_to_the_indexed_root(model_dir, tmp_path):
    from kaki.retrieval import Retriever

    docs = tmp_path / "private-docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "guide" / "kettle.md").write_text("# Kettle\n\nDescale the kettle with citric acid monthly.\n")
    (docs / "faq.jsonl").write_text(json.dumps({"id": "k1", "title": "Kettle FAQ", "url": "https://ex.org/k1",
                                                "text": "A kettle boils water; descale it when it scales."}) + "\n")
    index = tmp_path / "docs.kaki-index"
    build_index([docs], index, embedder="none", progress=False)
    s = start(model_dir, retriever=Retriever.open(index))
    try:
        body = chat_body("How do I descale the kettle?", temperature=0)
        r = httpx.post(s.url + CHAT, json=body, timeout=60)
        with httpx.stream("POST", s.url + CHAT, json={**body, "stream": True}, timeout=60) as st:
            streamed = "".join(st.iter_lines())
    finally:
        s.stop()
    assert r.status_code == 200, r.text
    sources = r.json()["sources"]
    assert {(x["path"], x["line"], x.get("url")) for x in sources} >= {("guide/kettle.md", 3, None),
                                                                       ("faq.jsonl", 1, "https://ex.org/k1")}
    for x in sources:
        assert {"title", "path", "line", "text"} <= set(x) and "source" not in x, x
    # Nothing of the server's filesystem leaves it, whole or streamed.
    for text in (r.text, streamed):
        assert str(tmp_path) not in text and "private-docs" not in text


def test_a_path_outside_its_root_shows_by_name_only():
    """An index from elsewhere whose paths climb out of (or lie outside) its roots."""
    from kaki.retrieval.search import relative_path

    assert relative_path("/srv/docs/../../etc/passwd", "/srv/docs") == "passwd"
    assert relative_path("/home/me/notes.md", "/srv/docs") == "notes.md"
    assert relative_path("/srv/docs/a/b.md", "/srv/docs") == "a/b.md"
    assert relative_path("/srv/one.md", "/srv/one.md") == "one.md"


# ----------------------------------------------------------------------------- fuzz

FUZZ_SEED, FUZZ_REQUESTS = 17, 300
ROUTES = [("POST", "/v1/completions"), ("POST", CHAT), ("PUT", "/api"), ("GET", "/v1/models"), ("GET", "/health"),
          ("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/models"), ("PUT", "/health"), ("GET", "/nope")]
VALID = {
    "/v1/completions": {"prompt": "the cat", "max_tokens": 3},
    CHAT: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    "/api": {"prompts": ["the cat"], "tokens_to_generate": 3},
}
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
          "stream_options", "stop", "seed", "user", "presence_penalty", "logit_bias", "top_k", "repetition_penalty",
          "ignore_eos", "stop_token_ids", "logprobs", "top_logprobs", "echo", "best_of", "suffix", "response_format",
          "tools", "retrieval", "prompts", "tokens_to_generate", "add_BOS", "random_seed", "no_log", "max_len",
          "role", "content", "include_usage", "type", "text"]
INTS = [0, 1, 2, 3, -1, 5, 17, 129, 2**31, 2**63, 2**64, -2**64, 10**30]
# 1e-300, 1e-308 and 5e-324 are #17's poison values: as a temperature, top_p or repetition_penalty
# they overflow fp32 logits (inf/nan probabilities) unless sampling is made safe for them.
FLOATS = [0.0, 0.5, 1.0, 1.5, -0.5, 2.5, 1e-9, 1e300, float("inf"), float("nan"), 1e-300, 1e-308, 5e-324, -1e300]
# Sampling fields set to the poison values above (and huge logit biases) on purpose: left to the
# random field picks, a poison value reaches a sampling field in very few of the requests.
POISON = [(field, value) for field in ("temperature", "top_p", "repetition_penalty")
          for value in (1e-300, 1e-308, 5e-324)] + [
    ("logit_bias", {"5": 1e300}), ("logit_bias", {"5": -1e300}), ("logit_bias", {"1": 1e308, "2": -1e308}),
    ("logit_bias", {"5": float("inf")}), ("logit_bias", {str(2**40): 1e300})]
STRINGS = ["", "a", "the dog", "\udfff", "\ud800x", "human:", "日本語 ✓", "x" * 2000, "\n\n", "<s>", "user", "text",
           "gpt-4", MODEL, "assistant", "system"]


def fuzz_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["none", "bool", "int", "float", "str", "list", "dict"] if depth < 3 else ["int", "str", "bool"])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice(INTS)
    if kind == "float":
        return rng.choice(FLOATS)
    if kind == "str":
        return rng.choice(STRINGS)
    if kind == "list":
        return [fuzz_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(FIELDS): fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def fuzz_body(rng: random.Random, path: str) -> tuple[bytes, str | None]:
    """A body for `path`: a valid one with a few fields set to random values (mostly), random JSON,
    or random bytes; and its content type."""
    roll = rng.random()
    if roll < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), rng.choice(
            ["application/json", None, "text/plain"])
    if roll < 0.25:
        body = fuzz_value(rng)
    else:
        body = dict(VALID.get(path, {}))
        for _ in range(rng.randrange(1, 4)):
            key = rng.choice(FIELDS)
            if rng.random() < 0.15:
                body.pop(key, None)
            else:
                body[key] = fuzz_value(rng)
        if path in VALID and rng.random() < 0.5:
            key, value = rng.choice(POISON)
            # Every route: PUT /api takes temperature and top_p under the same names.
            body[key] = value
    return json.dumps(body).encode(), "application/json"


def check_answer(r: httpx.Response, what) -> int:
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line for line in r.text.split("\n\n") if line.strip()]
            assert events[-1] == "data: [DONE]" and "server_error" not in r.text, (what, r.text[-500:])
        elif r.headers["content-type"].startswith("application/json"):
            r.json()
        return 200
    assert r.status_code in (400, 404, 405, 413), (what, r.status_code, r.text[:300])
    assert_error(r, r.status_code)
    return r.status_code


def test_fuzz_every_route_gets_documented_answers_and_greedy_output_is_unchanged(model_dir):
    # Short sequences so that whatever the fuzz asks for runs in milliseconds.
    llm = kaki.load(model_dir, dtype="float32", device="cpu")
    engine = Engine(llm, EngineConfig(max_batch_size=8, max_seq_len=48, max_queue=256), model_name=MODEL)
    s = Server(create_app(engine, max_body_mb=1))
    greedy = [("/v1/completions", {"prompt": "the cat sat", "max_tokens": 12, "temperature": 0, "logprobs": 2}),
              (CHAT, {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12, "temperature": 0})]
    rng = random.Random(FUZZ_SEED)
    started, statuses = time.perf_counter(), {}
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            before = [c.post(path, json=body).json()["choices"] for path, body in greedy]
            for i in range(FUZZ_REQUESTS):
                method, path = rng.choice(ROUTES)
                content, ctype = fuzz_body(rng, path)
                headers = {"Content-Type": ctype} if ctype else {}
                code = check_answer(c.request(method, path, content=content, headers=headers),
                                    (i, method, path, content[:300]))
                statuses[code] = statuses.get(code, 0) + 1
            after = [c.post(path, json=body).json()["choices"] for path, body in greedy]
            assert c.get("/health").json()["status"] == "ok"
    finally:
        s.stop()
    assert after == before
    # The fuzz reached the routes: many requests ran, many were refused.
    assert statuses.get(200, 0) >= FUZZ_REQUESTS // 10 and statuses.get(400, 0) >= FUZZ_REQUESTS // 10, statuses
    print(f"fuzz: {FUZZ_REQUESTS} requests in {time.perf_counter() - started:.1f}s, by status {sorted(statuses.items())}")
