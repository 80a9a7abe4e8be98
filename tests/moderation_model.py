"""A tiny Persimmon trained here, in seconds, to be both a moderation model and a chat model:

- moderation: records in GPT-JT-Moderation's few-shot format (kaki.moderation.few_shot_prompt)
  whose label is "needs intervention" when the input holds the word TRIGGER and "casual" otherwise;
- chat: a few exchanges in Persimmon's format, one of whose replies holds TRIGGER (so a reply can be
  blocked while the message that asked for it passes).

Trained once per test session (the first module that asks) with kaki's own trainer. Test modules
import the `mod_dir` fixture, and `one_thread`, from here."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from helpers import BOS, EOS, corpus, write_spm_tokenizer

TRIGGER = "poison"
SECRET = "tell me a secret"  # passes; its reply holds TRIGGER
SECRET_REPLY = f"the {TRIGGER} is in the cup"
HELLO = "hello there"
HELLO_REPLY = "hello, how are you"
FLAGGED = f"where is the {TRIGGER}"  # blocked as a message
EXCHANGES = [(SECRET, SECRET_REPLY), (HELLO, HELLO_REPLY), (FLAGGED, "it is in the cup")]

_cache: dict = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from a second intra-op thread on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mod_dir(tmp_path_factory):
    """The trained model's directory (see the module docstring)."""
    return trained_model(tmp_path_factory)


def moderation_records(n: int = 400, seed: int = 0) -> list[dict]:
    from kaki.moderation import few_shot_prompt

    rng = random.Random(seed)
    out = []
    for i, line in enumerate(corpus(n, seed=seed + 1)):
        words = line.split()
        flagged = i % 2 == 0
        if flagged:
            words.insert(rng.randint(0, len(words)), TRIGGER)
        label = "needs intervention" if flagged else "casual"
        out.append({"text": f"{few_shot_prompt(' '.join(words))} {label}"})
    return out


def chat_records(repeat: int = 150) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in EXCHANGES] * repeat


def _tokenizer(out: Path, texts: list[str]) -> Path:
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=400, model_type="unigram",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=BOS, eos_id=EOS, pad_id=-1, num_threads=1,
        minloglevel=2, hard_vocab_limit=False, split_by_whitespace=True)
    return write_spm_tokenizer(out, proto.getvalue())


def trained_model(tmp_path_factory) -> Path:
    """The trained model's directory (trained on the first call of the session)."""
    if "dir" in _cache:
        return _cache["dir"]
    import torch

    from kaki.train.loop import Trainer
    from kaki.train.options import TrainOptions

    root = tmp_path_factory.mktemp("moderation-model")
    records = moderation_records() + chat_records()
    rng = random.Random(0)
    rng.shuffle(records)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [r["text"] for r in records if "text" in r] + [f"human: {q}\n\nadept: {a}" for q, a in EXCHANGES]
    tok = _tokenizer(root / "tokenizer", texts)
    cfg = root / "config.json"
    cfg.write_text(json.dumps({"model_type": "persimmon", "hidden_size": 64, "intermediate_size": 256,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}))
    threads = torch.get_num_threads()
    o = TrainOptions(init_from_config=str(cfg), tokenizer=str(tok), data=str(data), out=str(root / "run"),
                     max_steps=STEPS, lr=3e-3, seq_len=128, batch_size=8, progress=False, eval_every=0,
                     save_every=0, eval_fraction=0.0, warmup_steps=10, device="cpu", threads=1, seed=0)
    try:
        Trainer(o).run()
    finally:
        torch.set_num_threads(threads)
    _cache["dir"] = root / "run"
    return _cache["dir"]


STEPS = 300
