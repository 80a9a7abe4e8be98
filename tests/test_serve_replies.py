"""What clients see of a reply, on the bundled model (whose replies start with the space the chat
format puts after `adept:`): /v1/chat/completions and PUT /api show the reply without it, whole
and streamed, as OpenAI clients and the original server show replies; /v1/completions keeps the
raw completion (prompt + text is the full text); `human_readable_tokens` has no "" at its ends."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

import kaki
from kaki.chat_format import ADEPT
from test_serve_hardening import MODEL, start
from test_serve_http import one_thread  # noqa: F401 (autouse fixture)

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "kaki-tiny"
QUESTION = "What does len() return?"


@pytest.fixture(scope="module")
def served():
    s = start(BUNDLED)
    yield s, kaki.load(BUNDLED, dtype="float32", device="cpu")
    s.stop()


def test_chat_reply_has_no_leading_space_whole_or_streamed(served):
    s, ref = served
    messages = [{"role": "user", "content": QUESTION}]
    alone = ref.generate(ADEPT.render(messages), max_new_tokens=24, temperature=0.0, repetition_penalty=1.0,
                         stop=ADEPT.stop)[0]
    assert alone.text.startswith(" ") and not alone.text.startswith("  ")  # what the model writes
    body = {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0, "repetition_penalty": 1.0}
    r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == alone.text[1:]
    with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == alone.text[1:]

    prompt = ADEPT.render(messages)
    r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 24,
                                                    "temperature": 0, "repetition_penalty": 1.0,
                                                    "stop": ADEPT.stop}, timeout=60)
    assert r.json()["choices"][0]["text"] == alone.text  # a raw completion: prompt + text, as generated


def test_adept_generation_and_readable_tokens_start_with_the_reply(served):
    s, ref = served
    prompt = f"human: {QUESTION}\n\nadept:"
    r = httpx.put(s.url + "/api", json={"prompts": [prompt], "tokens_to_generate": 16, "top_k": 1}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    (gen,), (tokens,), (text,) = body["generations"], body["human_readable_tokens"], body["text"]
    assert gen and not gen.startswith(" ") and text == prompt + " " + gen
    assert tokens and tokens[0] and tokens[-1] and not tokens[0].startswith(" ")
    assert "".join(tokens) == gen
