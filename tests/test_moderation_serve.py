"""`kaki serve --moderation` over real HTTP (uvicorn on a loopback port), driven by the official
`openai` client and httpx. The served model and the moderation model are the tiny model trained in
tests/moderation_model.py: it answers SECRET with a reply holding TRIGGER, and flags TRIGGER."""

from __future__ import annotations

import httpx
import pytest

from moderation_model import FLAGGED, HELLO, HELLO_REPLY, SECRET, mod_dir, one_thread  # noqa: F401 (fixtures)
from test_serve_http import Server, metrics

import kaki
from kaki.moderation import REFUSAL, load_moderator
from kaki.serve.app import create_app
from kaki.serve.engine import Engine, EngineConfig

MODEL = "tiny-moderated"
STOP = ["\n\nhuman:"]


@pytest.fixture(scope="module")
def url(mod_dir):
    llm = kaki.load(mod_dir, dtype="float32", device="cpu")
    moderator = load_moderator(mod_dir, dtype="float32", device="cpu")
    s = Server(create_app(Engine(llm, EngineConfig(max_batch_size=8), model_name=MODEL), moderator=moderator))
    yield s.url
    s.stop()


@pytest.fixture()
def logs():
    from loguru import logger

    lines: list[str] = []
    handle = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="INFO", format="{message}")
    yield lines
    logger.remove(handle)


def client(url):
    from openai import OpenAI
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def counts(url) -> dict:
    m = metrics(url)
    return {key: v for key, v in m.items() if key[0].startswith("kaki_moderation_") and key[0].endswith("_total")}


def delta(after: dict, before: dict) -> dict:
    out = {}
    for key in after:
        d = after[key] - before.get(key, 0)
        if d:
            out[(key[0], dict(key[1]).get("where"), dict(key[1]).get("label"))] = d
    return out


def chat(url, content, stream=False, **kw):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                               stream=stream, **kw)


def test_openai_chat_blocks_messages_and_replies(url, logs):
    before = counts(url)
    r = chat(url, HELLO)
    c = r.choices[0]
    assert (c.message.content.strip(), c.finish_reason) == (HELLO_REPLY, "stop")
    assert c.model_extra["moderation"] == {"where": "output", "label": "casual", "score": pytest.approx(1, abs=0.3),
                                           "blocked": False}

    r = chat(url, FLAGGED)  # blocked before the model runs
    c = r.choices[0]
    assert (c.message.content, c.finish_reason) == ("", "content_filter")
    assert c.model_extra["moderation"]["where"] == "input" and c.model_extra["moderation"]["blocked"]
    assert c.model_extra["moderation"]["label"] == "needs intervention"
    assert r.usage.completion_tokens == 0

    r = chat(url, SECRET)  # the message passes, the reply holds the trigger
    c = r.choices[0]
    assert (c.message.content, c.finish_reason) == ("", "content_filter") and c.logprobs is None
    assert c.model_extra["moderation"]["where"] == "output" and c.model_extra["moderation"]["blocked"]
    assert r.usage.completion_tokens > 0  # it was generated, then withheld

    # A flagged message earlier in the history blocks too (the client sends the history).
    r = chat(url, [{"role": "user", "content": FLAGGED}, {"role": "assistant", "content": "it is"},
                   {"role": "user", "content": HELLO}])
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].model_extra["moderation"]["where"] == "input"

    assert delta(counts(url), before) == {
        ("kaki_moderation_checks_total", "input", "casual"): 2,
        ("kaki_moderation_checks_total", "input", "needs intervention"): 2,
        ("kaki_moderation_checks_total", "output", "casual"): 1,
        ("kaki_moderation_checks_total", "output", "needs intervention"): 1,
        ("kaki_moderation_blocked_total", "input", None): 2,
        ("kaki_moderation_blocked_total", "output", None): 1,
    }
    assert any(line.startswith("moderation input: needs intervention 0.") and line.endswith("blocked")
               for line in logs)
    assert any(line.startswith("moderation output: casual ") and line.endswith("passed") for line in logs)

    # ...and so does one in a system or assistant turn: the client writes those as well.
    for role in ("system", "assistant"):
        r = chat(url, [{"role": role, "content": FLAGGED}, {"role": "user", "content": HELLO}])
        assert r.choices[0].finish_reason == "content_filter", role
        assert r.choices[0].model_extra["moderation"]["where"] == "input"


def test_openai_chat_stream_holds_the_reply_until_checked(url):
    plain = chat(url, HELLO).choices[0].message.content
    chunks = list(chat(url, HELLO, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == plain
    assert plain.strip() == HELLO_REPLY
    last = [ch for ch in chunks if ch.choices][-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["moderation"]["label"] == "casual"

    chunks = list(chat(url, SECRET, stream=True, stream_options={"include_usage": True}))
    choices = [ch.choices[0] for ch in chunks if ch.choices]
    assert "".join(c.delta.content or "" for c in choices) == ""  # not one piece of the blocked reply
    assert choices[-1].finish_reason == "content_filter"
    assert choices[-1].model_extra["moderation"]["where"] == "output"
    assert chunks[-1].usage.completion_tokens > 0

    chunks = list(chat(url, FLAGGED, stream=True))
    choices = [ch.choices[0] for ch in chunks if ch.choices]
    assert [c.finish_reason for c in choices] == [None, "content_filter"]
    assert choices[-1].model_extra["moderation"]["where"] == "input"


def test_openai_completions_block_per_prompt(url, mod_dir):
    ref = kaki.load(mod_dir, dtype="float32", device="cpu")
    ok = f"human: {HELLO}\n\nadept:"
    want = ref.generate(ok, max_new_tokens=16, stop=STOP)[0].text
    r = client(url).completions.create(model=MODEL, prompt=[FLAGGED, ok], max_tokens=16, temperature=0,
                                       stop=STOP, n=2, echo=True)
    assert [(c.index, c.finish_reason) for c in r.choices] == [(0, "content_filter"), (1, "content_filter"),
                                                              (2, "stop"), (3, "stop")]
    assert [c.text for c in r.choices] == ["", "", ok + want, ok + want]
    assert r.choices[0].model_extra["moderation"]["where"] == "input"
    assert r.choices[2].model_extra["moderation"] == {"where": "output", "label": "casual",
                                                      "score": pytest.approx(1, abs=0.3), "blocked": False}

    chunks = list(client(url).completions.create(model=MODEL, prompt=[FLAGGED, ok], max_tokens=16, temperature=0,
                                                 stop=STOP, stream=True))
    text = {0: "", 1: ""}
    finish = {}
    for ch in chunks:
        for c in ch.choices:
            text[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = (c.finish_reason, c.model_extra["moderation"]["where"])
    assert text == {0: "", 1: want}
    assert finish == {0: ("content_filter", "input"), 1: ("stop", "output")}


def test_adept_api_gets_the_refusal_and_a_moderation_field(url, mod_dir, logs):
    ref = kaki.load(mod_dir, dtype="float32", device="cpu")
    ok, secret = f"human: {HELLO}\n\nadept:", f"human: {SECRET}\n\nadept:"
    r = httpx.put(url + "/api", json={"prompts": [FLAGGED, ok, secret], "tokens_to_generate": 16, "top_k": 1,
                                      "logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(body) == ["generations", "human_readable_tokens", "logprobs", "moderation", "text"]
    mod = body["moderation"]
    assert [(m["where"], m["blocked"]) for m in mod] == [("input", True), ("output", False), ("output", True)]
    assert mod[0]["label"] == mod[2]["label"] == "needs intervention" and mod[1]["label"] == "casual"
    alone = ref.generate(ok, add_bos=False, max_new_tokens=16, temperature=0, prompt_logprobs=True,
                         logprobs=True)[0]
    assert body["generations"] == [REFUSAL, ref.tokenizer.decode(alone.token_ids).removeprefix(" "), REFUSAL]
    assert body["text"][0] == FLAGGED + " " + REFUSAL and body["text"][2] == secret + " " + REFUSAL
    assert body["human_readable_tokens"][0] == body["human_readable_tokens"][2] == []
    assert body["logprobs"][0] == body["logprobs"][2] == []
    assert body["logprobs"][1] == pytest.approx(alone.prompt_logprobs[1:] + alone.logprobs, abs=1e-4)
    n_logged = len([line for line in logs if line.startswith("moderation ")])
    assert n_logged == 5  # three prompts, two replies
    # no_log: the verdicts are not logged either.
    r = httpx.put(url + "/api", json={"prompts": [FLAGGED], "tokens_to_generate": 4, "no_log": True})
    assert r.json()["moderation"][0]["blocked"]
    assert len([line for line in logs if line.startswith("moderation ")]) == n_logged
