"""kaki.moderation: few-shot label scoring against the LLM's own prompt logprobs, the blocking
policy, and a tiny model trained here (tests/moderation_model.py) that really flags a word."""

from __future__ import annotations

import math

import pytest
import torch

from moderation_model import (FLAGGED, HELLO, HELLO_REPLY, SECRET, SECRET_REPLY, TRIGGER, mod_dir,  # noqa: F401
                              one_thread)

import kaki
from kaki.classify import is_classifier_dir
from kaki.cli import main
from kaki.errors import KakiError
from kaki.moderation import (FEW_SHOT_LABELS, FewShotScorer, Moderator, few_shot_prompt, label_logprobs,
                             load_moderator, pieces)


def test_prompt_is_gpt_jt_moderations_format():
    assert few_shot_prompt("How do I\n\nInput: x\nOutput: casual  now") == (
        "Possible labels:\n1. casual\n2. needs caution\n3. needs intervention\n4. possibly needs caution\n"
        "5. probably needs caution\n\nInput: I want to call in sick\nOutput: casual\n\n"
        "Input: How do I Input: x Output: casual now\nOutput:")


@pytest.mark.parametrize("family", ["persimmon", "llama"])
def test_label_scores_equal_the_llms_prompt_logprobs(family, family_dirs):
    """Each label's score is log P(label tokens | prompt): the sum of the prompt logprobs kaki's
    generation loop reports for those tokens when it scores prompt + " " + label whole."""
    llm = kaki.load(family_dirs[family][1], dtype="float32", device="cpu")
    prompt = few_shot_prompt("the man of the world was here")
    got = label_logprobs(llm, prompt, FEW_SHOT_LABELS)
    n_prompt = len(llm.tokenizer.encode(prompt))
    for label, score in zip(FEW_SHOT_LABELS, got):
        full = prompt + " " + label
        c = llm.generate(full, max_new_tokens=0, prompt_logprobs=True)[0]
        assert c.prompt_token_ids[:n_prompt] == llm.tokenizer.encode(prompt)  # the label starts a new token
        want = math.fsum(c.prompt_logprobs[n_prompt:])
        assert score == pytest.approx(want, abs=1e-4), label
    # The scorer turns them into probabilities over the five labels.
    probs = FewShotScorer(llm)("the man of the world was here")[0]
    want = torch.tensor(got, dtype=torch.float64).softmax(-1).tolist()
    assert list(probs) == list(FEW_SHOT_LABELS)
    assert list(probs.values()) == pytest.approx(want, abs=1e-9)
    assert sum(probs.values()) == pytest.approx(1.0) and len(set(got)) == 5


def fixed(probs: dict[str, float]):
    return lambda text: [dict(probs)]


def test_policy_default_threshold_and_errors():
    probs = {"casual": 0.4, "needs caution": 0.3, "needs intervention": 0.25, "possibly needs caution": 0.05,
             "probably needs caution": 0.0}
    m = Moderator(fixed(probs), FEW_SHOT_LABELS)
    v = m.check("x")
    assert (v.label, v.blocked) == ("casual", False) and v.score == pytest.approx(0.4)
    # With a threshold the blocking labels' mass decides: 0.3 + 0.25 = 0.55.
    v = Moderator(fixed(probs), FEW_SHOT_LABELS, threshold=0.5).check("x")
    assert (v.label, v.blocked, v.score) == ("needs caution", True, pytest.approx(0.3))
    assert not Moderator(fixed(probs), FEW_SHOT_LABELS, threshold=0.6).check("x").blocked
    # --moderation-block takes labels in any case, with _ or - for spaces.
    v = Moderator(fixed(probs), FEW_SHOT_LABELS, block="Casual").check("x")
    assert (v.label, v.blocked) == ("casual", True)
    with pytest.raises(KakiError, match="'harmful' is not one of the moderation model's labels"):
        Moderator(fixed(probs), FEW_SHOT_LABELS, block="harmful")
    with pytest.raises(KakiError, match=r"must be in \(0, 1\]"):
        Moderator(fixed(probs), FEW_SHOT_LABELS, threshold=1.5)


def test_policy_for_classifier_labels():
    # A harmless-looking label exists: every other label blocks by default.
    m = Moderator(fixed({"SAFE": 0.2, "toxic": 0.7, "spam": 0.1}), ("SAFE", "toxic", "spam"))
    assert m.block == {"toxic", "spam"} and m.check("x").blocked
    # None does: the user must say which block.
    with pytest.raises(KakiError, match="pass --moderation-block"):
        Moderator(fixed({"LABEL_0": 0.5, "LABEL_1": 0.5}), ("LABEL_0", "LABEL_1"))
    # Multi-label (independent sigmoids): any blocking label at 0.5 (or the threshold) blocks.
    labels = ("toxic", "insult", "threat")
    m = Moderator(fixed({"toxic": 0.3, "insult": 0.6, "threat": 0.9}), labels, block="toxic,insult",
                  multi_label=True)
    v = m.check("x")
    assert (v.label, v.blocked) == ("insult", True)
    m = Moderator(fixed({"toxic": 0.3, "insult": 0.6, "threat": 0.9}), labels, block="toxic,insult",
                  multi_label=True, threshold=0.7)
    assert (m.check("x").label, m.check("x").blocked) == ("threat", False)


def test_trained_model_flags_its_trigger(mod_dir):
    m = load_moderator(mod_dir, dtype="float32", device="cpu")
    assert not is_classifier_dir(mod_dir) and m.labels == FEW_SHOT_LABELS
    for text in (FLAGGED, SECRET_REPLY, f"How do I {TRIGGER} a cat?", f"the man of the world {TRIGGER} was here"):
        v = m.check(text)
        assert v.blocked and v.label == "needs intervention" and v.score > 0.7, (text, v)
    for text in (HELLO, HELLO_REPLY, SECRET, "the man of the world was here"):
        v = m.check(text)
        assert not v.blocked and v.label == "casual" and v.score > 0.7, (text, v)
    assert sum(v.scores.values()) == pytest.approx(1.0)
    # Only the chosen labels block: with "needs caution" alone, the trigger passes.
    assert not load_moderator(mod_dir, block="needs caution", dtype="float32", device="cpu").check(FLAGGED).blocked


def test_text_longer_than_the_context_is_checked_in_pieces(mod_dir):
    m = load_moderator(mod_dir, dtype="float32", device="cpu")
    scorer = m.scorer
    benign = " ".join(["the man of the world was here"] * 60)
    assert len(scorer.llm.tokenizer.encode(benign)) > scorer.llm.context_length
    assert len(pieces(scorer.llm.tokenizer, benign, scorer.max_text_tokens)) > 1
    assert not m.check(benign).blocked
    # The trigger in the last piece only still blocks.
    v = m.check(benign + f" {TRIGGER} here")
    assert v.blocked and v.label == "needs intervention"


def test_moderation_flags_without_moderation_are_an_error(capsys):
    assert main(["chat", "--model", "nowhere", "--moderation-block", "casual"]) == 2
    assert "--moderation-block needs --moderation DIR" in capsys.readouterr().err


def test_bad_block_label_fails_before_the_chat_model_loads(mod_dir, capsys):
    assert main(["serve", "--model", "/nonexistent", "--moderation", str(mod_dir), "--moderation-block",
                 "evil", "--dtype", "float32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'evil' is not one of the moderation model's labels (casual, needs caution" in err
