"""Moderation by a sequence classifier (kaki.classify): a tiny transformers
LlamaForSequenceClassification trained here, in seconds, to call texts holding TRIGGER "toxic" and
others "safe"; then `kaki chat` and `kaki serve` screen with it."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import PAD, copy_tokenizer, corpus, hf_config, save_hf
from moderation_model import FLAGGED, HELLO, HELLO_REPLY, SECRET, TRIGGER, mod_dir, one_thread  # noqa: F401
from test_chat import chat
from test_moderation_serve import counts, delta
from test_serve_http import Server

import kaki
from kaki.moderation import REFUSAL, load_moderator, pieces
from kaki.serve.app import create_app
from kaki.serve.engine import Engine, EngineConfig
from kaki.tokenizer import Tokenizer


def padded(batch):
    x = torch.full((len(batch), max(len(ids) for ids, _ in batch)), PAD)
    for b, (ids, _) in enumerate(batch):
        x[b, :len(ids)] = torch.tensor(ids)  # right padding: the head reads the last non-pad token
    return x, torch.tensor([y for _, y in batch])


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory, spm_dir):
    import transformers as T

    torch.manual_seed(0)
    cfg = hf_config("llama", num_labels=2, id2label={0: "safe", 1: "toxic"}, label2id={"safe": 0, "toxic": 1},
                    pad_token_id=PAD, initializer_range=0.02)
    model = T.LlamaForSequenceClassification(cfg).train()
    tok = Tokenizer.from_dir(spm_dir)
    rng = random.Random(0)
    data = []
    for i, line in enumerate(corpus(400, seed=3)):
        words = line.split()
        if i % 2:
            words.insert(rng.randint(0, len(words)), TRIGGER)
        data.append((tok.encode(" ".join(words)), i % 2))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(250):
        x, y = padded(rng.sample(data, 16))
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = padded(data)
    with torch.no_grad():
        accuracy = (model.eval()(input_ids=x).logits.argmax(-1) == y).float().mean().item()
    assert accuracy > 0.95, accuracy
    path = save_hf(model, tmp_path_factory.mktemp("moderation-classifier"))
    copy_tokenizer(spm_dir, path)
    return path


def test_classifier_labels_decide(clf_dir):
    m = load_moderator(clf_dir, dtype="float32", device="cpu")
    assert m.labels == ("safe", "toxic") and m.block == {"toxic"}  # "safe" reads as harmless
    for text in (FLAGGED, f"the man of the world {TRIGGER} was here"):
        v = m.check(text)
        assert (v.label, v.blocked) == ("toxic", True) and v.score > 0.9, (text, v)
    for text in (HELLO, SECRET, "the man of the world was here"):
        v = m.check(text)
        assert (v.label, v.blocked) == ("safe", False), (text, v)
    # A text longer than the classifier's context is read in pieces, so a flagged sentence past the
    # context (which the classifier alone would cut off) still blocks.
    tok, n = m.scorer.classifier.tokenizer, m.scorer.max_text_tokens
    benign = "the man of the world was here"
    k = n // len(tok.encode(" " + benign, add_bos=False))
    head = " ".join([benign] * k)
    head += " a" * (n - len(tok.encode(head, add_bos=False)))  # exactly one piece's worth of tokens
    assert len(tok.encode(head, add_bos=False)) == n > m.scorer.classifier.max_length - 3
    assert pieces(tok, f"{head} {FLAGGED}", n) == [head, FLAGGED]
    assert not m.check(head).blocked
    assert m.check(f"{head} {FLAGGED}").blocked


def test_chat_with_a_classifier_moderator(clf_dir, mod_dir):
    r = chat(mod_dir, [FLAGGED, HELLO, "/quit"], "--moderation", clf_dir, "-t", "0", "-n", "16")
    assert r.stdout.splitlines() == [REFUSAL, HELLO_REPLY]
    assert "[your message was blocked by moderation (toxic, " in r.stderr


def test_serve_with_a_classifier_moderator(clf_dir, mod_dir):
    from openai import OpenAI

    llm = kaki.load(mod_dir, dtype="float32", device="cpu")
    s = Server(create_app(Engine(llm, EngineConfig(max_batch_size=4), model_name="m"),
                          moderator=load_moderator(clf_dir, dtype="float32", device="cpu")))
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        before = counts(s.url)
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": FLAGGED}], max_tokens=8)
        assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == ""
        assert r.choices[0].model_extra["moderation"]["label"] == "toxic"
        assert delta(counts(s.url), before) == {("kaki_moderation_checks_total", "input", "toxic"): 1,
                                                ("kaki_moderation_blocked_total", "input", None): 1}
    finally:
        s.stop()
