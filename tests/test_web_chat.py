"""The chat page at `/` of `kaki serve`, in a real Chromium (Debian's /usr/bin/chromium, driven by
Playwright) against real servers on the bundled model: replies stream into the DOM, stop aborts the
request on the server, conversations survive a reload, seeds reproduce, model text never becomes
HTML, the API key, sources, refusals and errors are shown, and the page works 375 px wide. Every
request the browser makes is recorded: none may leave the server's origin.

Where a test needs exact model output (Markdown, hostile HTML, a 503), the browser's request is
answered by the test (Playwright's page.route) instead of the model; everything else is the model."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

import kaki
from kaki.retrieval import build_index
from kaki.retrieval.chunking import Chunking
from kaki.serve.app import create_app
from kaki.serve.engine import Engine, EngineConfig

from moderation_model import FLAGGED, mod_dir, one_thread  # noqa: F401 (fixtures)
from test_serve_http import Server, metrics

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "kaki-tiny"
NAME = "kaki-tiny"
CHROMIUM = "/usr/bin/chromium"
KEY = "page-test-key"
QUESTION = "What does len() return?"
XSS = "<img src=x onerror=alert(1)> <script>alert(2)</script>"

pytestmark = pytest.mark.slow


def start(*, api_key=None, retriever=None, moderator=None) -> Server:
    llm = kaki.load(MODEL, dtype="float32", device="cpu")
    engine = Engine(llm, EngineConfig(max_batch_size=4), model_name=NAME)
    return Server(create_app(engine, api_key=api_key, retriever=retriever, retrieval_k=1, moderator=moderator))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """The bundled model's own corpus, cut to the built-in functions page: BM25, built in a second."""
    import gzip

    src = tmp_path_factory.mktemp("web-index")
    with gzip.open(ROOT / "data" / "pydocs" / "passages.jsonl.gz", "rt", encoding="utf-8") as f:
        records = [line for line in f if '"source": "library/functions"' in line]
    (src / "functions.jsonl").write_text("".join(records), encoding="utf-8")
    out = src / "functions.kaki-index"
    build_index([src / "functions.jsonl"], out, chunking=Chunking("none"), embedder="none", progress=False)
    return out


@pytest.fixture(scope="module")
def url(index):
    """The server most tests share: the bundled model grounded in `index`, as `make serve` runs."""
    from kaki.retrieval import Retriever

    s = start(retriever=Retriever.open(index))
    yield s.url
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the browser tests drive Debian's Chromium. Run `make test` "
                    "(as root it installs it with apt-get), or `sudo apt-get install chromium`", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]' (or run `make test`)", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


class Tab:
    """A browser context and its page, recording every request and every dialog."""

    def __init__(self, browser, url, **context):
        from playwright.sync_api import expect

        expect.set_options(timeout=20_000)  # a contended 2-core machine
        self.origin = url
        self.context = browser.new_context(**{"viewport": {"width": 1000, "height": 800}, **context})
        self.requests, self.dialogs, self.bodies = [], [], []
        self.context.on("request", self._record)
        self.page = self.context.new_page()
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def _record(self, r):
        self.requests.append(r.url)
        if r.url.endswith("/v1/chat/completions"):
            self.bodies.append(r.post_data_json)

    def open(self):
        self.page.goto(self.origin + "/")
        return self.page

    def close(self):
        self.context.close()
        # The page must not reach anywhere but its own server (no CDN, fonts, telemetry).
        outside = [u for u in self.requests if not (u.startswith(self.origin + "/") or u.startswith("data:"))]
        assert not outside, outside
        assert self.requests, "no request was recorded"
        assert not self.dialogs, self.dialogs


@pytest.fixture()
def tab(browser, url):
    t = Tab(browser, url)
    yield t
    t.close()


def expect(x):
    from playwright.sync_api import expect as e
    return e(x)


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_reply(page, status="done"):
    """The last reply once it has `status` (streaming, done, stopped, error, refused)."""
    reply = page.locator("#messages .msg.assistant").last
    expect(reply).to_have_class(re.compile(rf"\b{status}\b"))
    return reply


def stored(page) -> dict:
    return page.evaluate("JSON.parse(localStorage.getItem('kaki.chats.v1'))")


def current_messages(page) -> list[dict]:
    s = stored(page)
    return next(c for c in s["chats"] if c["id"] == s["current"])["messages"]


def long_replies(page, max_tokens=600):
    """Replies that run until max_tokens: the model often ends in a dozen tokens, too fast to
    watch grow or to stop by hand. The request still goes to the server, with ignore_eos added."""
    def handle(route):
        body = json.loads(route.request.post_data)
        body.update(ignore_eos=True, max_tokens=max_tokens)
        route.continue_(post_data=json.dumps(body))
    page.route("**/v1/chat/completions", handle)


def fake_stream(page, *chunks, status=200, body=None, headers=None):
    """Answer the page's next chat request with these SSE chunks (or `body`), not the model."""
    def chunk(c):
        return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": NAME, **c}
    text = body if body is not None else "".join(f"data: {json.dumps(chunk(c))}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=status, body=text, headers=headers or {"Content-Type": "text/event-stream"}), times=1)


def delta(content=None, finish=None, **choice):
    d = {"content": content} if content is not None else {}
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish, **choice}]}


def aborted(url) -> float:
    return metrics(url).get(("kaki_sequences_finished_total", (("reason", "abort"),)), 0.0)


# ----------------------------------------------------------------------------- the server side

def test_page_files_are_open_and_docs_are_not_dead_links(url):
    """/ and its files answer without a key; /info has the model's facts; FastAPI's /docs and /redoc
    (which would load Swagger UI from a CDN) are gone, and the page links to neither."""
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for path in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        if not path.startswith("data:"):
            assert httpx.get(f"{url}/{path}").status_code == 200, path
    assert "/docs" not in page.text and "/redoc" not in page.text
    for dead in ("/docs", "/redoc", "/web/../page.py", "/web/index.html"):
        assert httpx.get(url + dead).status_code == 404, dead
    assert httpx.get(url + "/openapi.json").status_code == 200
    info = httpx.get(url + "/info").json()
    gen = json.loads((MODEL / "generation_config.json").read_text())
    assert info["model"] == NAME and info["context_length"] == 1024 and info["retrieval"]["enabled"]
    assert info["defaults"]["temperature"] == gen["temperature"] and info["defaults"]["top_p"] == gen["top_p"]


def test_page_never_parses_text_as_html():
    """The rule the page's safety rests on, checked where it is written."""
    js = (ROOT / "src" / "kaki" / "serve" / "web" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink


# ----------------------------------------------------------------------------- the page

def test_page_shows_model_context_and_defaults(tab):
    page = tab.open()
    expect(page.locator("#model")).to_have_text(NAME)
    expect(page.locator("#context")).to_contain_text("1,024")
    expect(page.locator("#features")).to_contain_text("retrieval")
    page.click("#toggle-settings")
    expect(page.locator("#set-temperature")).to_have_attribute("placeholder", "0.5")
    expect(page.locator("#set-top_p")).to_have_attribute("placeholder", "0.9")
    expect(page.locator("#set-seed")).to_have_attribute("placeholder", "random")
    expect(page.locator("#set-max_tokens")).to_have_attribute("placeholder", "160")


def test_reply_streams_in_and_shows_speed(tab):
    page = tab.open()
    long_replies(page, max_tokens=200)
    # Every change to the reply being written, with its time: the DOM, not the network.
    page.evaluate("""() => { window.growth = [];
        new MutationObserver(() => {
            const c = document.querySelector('#messages .msg.assistant.streaming .content');
            if (c) window.growth.push([performance.now(), c.textContent.length]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    send(page, QUESTION)
    reply = last_reply(page)
    growth = page.evaluate("window.growth")
    lengths = [n for _, n in growth]
    distinct = sorted(set(lengths))
    assert len(distinct) >= 4 and lengths == sorted(lengths), lengths
    assert growth[-1][0] - next(t for t, n in growth if n > 0) > 50, "the reply arrived all at once"
    # The finished reply is what the server sent: 200 tokens, counted by the server.
    expect(page.locator("#speed")).to_contain_text(re.compile(r"200 tokens, [\d.]+ tok/s"))
    expect(reply.locator(".meta")).to_contain_text("200 tokens")
    assert tab.bodies[0]["stream"] is True and tab.bodies[0]["messages"][-1] == {"role": "user", "content": QUESTION}


def test_stop_button_and_escape_abort_the_request_on_the_server(tab, url):
    page = tab.open()
    long_replies(page)
    before = aborted(url)
    send(page, QUESTION)
    reply = last_reply(page, "streaming")
    expect(reply.locator(".content")).to_contain_text(re.compile(r"\S{3}.*\S{3}"))
    page.click("#stop")
    reply = last_reply(page, "stopped")
    expect(reply.locator(".note")).to_have_text("Stopped.")
    deadline = time.time() + 15
    while aborted(url) < before + 1:
        assert time.time() < deadline, "the server never saw the request end"
        time.sleep(0.05)
    text = current_messages(page)[-1]["content"]
    assert 0 < len(text)
    # Regenerate, then Esc: a second abort; the slot is free again afterwards.
    page.click("#messages .regenerate")
    last_reply(page, "streaming")
    expect(page.locator("#messages .msg.assistant .content").last).not_to_be_empty()
    page.keyboard.press("Escape")
    last_reply(page, "stopped")
    while aborted(url) < before + 2:
        assert time.time() < deadline, "the second request never ended on the server"
        time.sleep(0.05)
    while httpx.get(url + "/health").json()["running"]:
        assert time.time() < deadline, "the aborted sequence still holds its slot"
        time.sleep(0.05)
    assert len(tab.bodies) == 2 and tab.bodies[0]["messages"] == tab.bodies[1]["messages"]


def test_conversation_survives_a_reload(tab):
    page = tab.open()
    send(page, QUESTION)
    reply = last_reply(page).locator(".content").inner_text()
    # Settings left empty are the server's: only the model's suggested reply length is sent.
    assert {k: v for k, v in tab.bodies[0].items() if k != "messages"} == {
        "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 160}
    page.reload()
    expect(page.locator("#messages .msg.user .content")).to_have_text([QUESTION])
    expect(page.locator("#messages .msg.assistant .content")).to_have_text([reply])


def test_same_seed_gives_the_same_reply(tab, url):
    page = tab.open()
    page.click("#toggle-settings")
    page.fill("#set-temperature", "1.2")
    page.fill("#set-seed", "1234")
    page.fill("#set-max_tokens", "40")
    replies = []
    for _ in range(2):
        send(page, QUESTION)
        last_reply(page)
        replies.append(current_messages(page)[-1]["content"])
        page.click("#new-chat")
    assert replies[0] == replies[1] and replies[0].strip()
    for body in tab.bodies:
        assert body["temperature"] == 1.2 and body["seed"] == 1234 and body["max_tokens"] == 40
    # The server, asked directly with the same body, gives the page's reply.
    body = {k: v for k, v in tab.bodies[0].items() if k != "stream_options"}
    direct = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
    assert direct.json()["choices"][0]["message"]["content"] == replies[0], direct.text


def test_regenerate_edit_and_new_chat(tab):
    page = tab.open()
    send(page, QUESTION)
    last_reply(page)
    page.click("#messages .regenerate")
    last_reply(page)
    expect(page.locator("#messages .msg")).to_have_count(2)
    assert tab.bodies[1]["messages"] == tab.bodies[0]["messages"]  # the old reply is not sent back

    page.click("#messages .msg.user .edit")
    page.fill("#messages .edit-box", "What is a tuple?")
    page.press("#messages .edit-box", "Enter")
    last_reply(page)
    expect(page.locator("#messages .msg.user .content")).to_have_text(["What is a tuple?"])
    expect(page.locator("#messages .msg")).to_have_count(2)
    assert tab.bodies[2]["messages"][-1] == {"role": "user", "content": "What is a tuple?"}
    assert all("len()" not in m["content"] for m in tab.bodies[2]["messages"])

    page.click("#new-chat")
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#chat-list .chat")).to_have_count(2)
    page.click("#chat-list .chat:not(.current) .open")
    expect(page.locator("#messages .msg.user .content")).to_have_text(["What is a tuple?"])


def test_markdown_and_hostile_html_render_as_text(tab):
    page = tab.open()
    send(page, XSS)  # the real model first: the user's own message is text too
    last_reply(page)
    reply = "**b** and *i* and `x<y`\n\n```python\nprint('<b>hi</b>')\n```\n\n" + XSS
    source = {"title": "<img src=x onerror=alert(3)>", "path": "library/functions.rst", "line": 7,
              "url": "javascript:alert(4)", "text": "<script>alert(5)</script>"}
    fake_stream(page, {**delta(""), "sources": [source]}, delta(reply[:9]), delta(reply[9:]), delta(finish="stop"))
    send(page, "format this")
    msg = last_reply(page)
    expect(msg.locator("strong")).to_have_text("b")
    expect(msg.locator("em")).to_have_text("i")
    expect(msg.locator("p > code")).to_have_text("x<y")
    expect(msg.locator("pre")).to_have_text("print('<b>hi</b>')")
    expect(msg.locator(".content")).to_contain_text(XSS)
    expect(msg.locator(".source .title")).to_have_text(source["title"])
    expect(msg.locator(".source a")).to_have_count(0)  # a javascript: url is not a link
    msg.locator(".source-title").click()
    expect(msg.locator(".passage")).to_have_text(source["text"])
    for tag in ("img", "script", "b"):
        assert page.locator(f"#messages {tag}").count() == 0, tag
    expect(page.locator("#messages .msg.user .content").first).to_have_text(XSS)
    page.wait_for_timeout(200)  # an onerror handler would have fired by now


def test_sources_from_retrieval(tab, index):
    page = tab.open()
    send(page, QUESTION)
    msg = last_reply(page)
    source = msg.locator(".sources .source")
    expect(source).to_have_count(1)  # retrieval_k=1
    sent = current_messages(page)[-1]["sources"][0]
    expect(source.locator(".title")).to_have_text(sent["title"])
    expect(source.locator(".passage")).to_be_hidden()
    source.locator(".source-title").click()
    expect(source.locator(".passage")).to_have_text(sent["text"])
    assert "len" in sent["title"].lower()


def test_server_errors_are_shown_with_the_servers_text(tab):
    page = tab.open()
    page.click("#toggle-settings")
    page.fill("#set-temperature", "5")  # the server's limit is 2
    send(page, QUESTION)
    last_reply(page, "error")
    expect(page.locator("#banner")).to_contain_text("(400)")
    expect(page.locator("#banner")).to_contain_text("temperature")
    page.fill("#set-temperature", "")
    busy = {"error": {"message": "3 sequences are already waiting", "type": "server_overloaded",
                      "param": None, "code": None}}
    fake_stream(page, status=503, body=json.dumps(busy), headers={"Content-Type": "application/json",
                                                                   "Retry-After": "2"})
    page.click("#messages .regenerate")
    last_reply(page, "error")
    expect(page.locator("#banner")).to_contain_text("busy or shutting down (503): 3 sequences are already waiting")
    fake_stream(page, delta("half a rep"), {"error": {"message": "the server is shutting down"}})
    page.click("#messages .regenerate")
    last_reply(page, "error")
    expect(page.locator("#banner")).to_contain_text("the server is shutting down")


def test_api_key_is_asked_once_and_checked(browser):
    s = start(api_key=KEY)
    try:
        for path in ("/", "/web/app.js", "/web/style.css"):  # the page's files hold no data
            assert httpx.get(s.url + path).status_code == 200, path
        assert httpx.get(s.url + "/info").status_code == 401
        assert httpx.get(s.url + "/info", headers={"Authorization": f"Bearer {KEY}"}).json()["model"] == NAME
        t = Tab(browser, s.url)
        page = t.open()
        expect(page.locator("#key-form")).to_be_visible()
        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        expect(page.locator("#key-error")).to_contain_text("wrong API key")
        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#model")).to_have_text(NAME)
        send(page, QUESTION)
        last_reply(page)
        page.reload()  # the tab keeps the key
        expect(page.locator("#model")).to_have_text(NAME)
        expect(page.locator("#key-form")).to_be_hidden()
        # A key that stops working mid-session: the reply fails and the page asks again.
        page.evaluate("sessionStorage.setItem('kaki.apiKey', 'revoked')")
        page.click("#messages .regenerate")
        last_reply(page, "error")
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#banner")).to_contain_text("(401)")
        t.close()
        assert all(b is not None for b in t.bodies)
    finally:
        s.stop()


def test_moderation_refusal_is_shown_as_such(browser, mod_dir):
    from kaki.moderation import load_moderator

    s = start(moderator=load_moderator(mod_dir, dtype="float32", device="cpu"))
    try:
        t = Tab(browser, s.url)
        page = t.open()
        expect(page.locator("#features")).to_contain_text("moderation")
        send(page, FLAGGED)
        msg = last_reply(page, "refused")
        expect(msg.locator(".refusal")).to_contain_text("Refused by the server's moderation")
        expect(msg.locator(".refusal")).to_contain_text("needs intervention")
        # The refused exchange is not sent again: the next question is answered.
        send(page, QUESTION)
        last_reply(page)
        assert [m["content"] for m in t.bodies[-1]["messages"]] == [QUESTION]
        t.close()
    finally:
        s.stop()


def test_page_says_when_the_server_is_gone(browser):
    s = start()
    stopped = False
    try:
        t = Tab(browser, s.url)
        page = t.open()
        expect(page.locator("#model")).to_have_text(NAME)
        s.stop()
        stopped = True
        send(page, QUESTION)
        last_reply(page, "error")
        expect(page.locator("#banner")).to_contain_text("Cannot reach the kaki server")
        t.close()
    finally:
        if not stopped:
            s.stop()


def test_phone_width(browser, url):
    t = Tab(browser, url, viewport={"width": 375, "height": 700}, is_mobile=True, has_touch=True)
    page = t.open()
    expect(page.locator("#model")).to_have_text(NAME)
    send(page, QUESTION)
    last_reply(page)
    page.click("#toggle-settings")
    page.click("#toggle-chats")
    expect(page.locator("#chat-list .chat")).to_have_count(1)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    for sel in ("#input", "#send", "#new-chat", "#toggle-settings", "#set-seed", "#messages .regenerate",
                "#chat-list .open"):
        box = page.locator(sel).first.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, (sel, box)
    t.close()
