"""Moderation: decide whether a text (a user message, or a model's reply) should be blocked.

`load_moderator(DIR)` takes either
- a sequence classifier (config.json `architectures` ending in `ForSequenceClassification`, run by
  `kaki.classify`): its labels and their probabilities decide; or
- a causal LM prompted few-shot in GPT-JT-Moderation-6B's format (below) with its five labels. Each
  label is scored by the model's log-probability of the label's tokens after "Output:", and the five
  scores are normalised to probabilities with a softmax. Scoring every label, rather than letting the
  model generate one, always lands on a valid label and gives a probability to threshold.

Policy: `block` names the labels that block. For a single-label model the text is blocked when the
most likely label is one of them, or, with a `threshold`, when the blocking labels' probabilities
sum to at least it. For a multi-label classifier (independent sigmoids) any blocking label at or
above the threshold (default 0.5) blocks. Defaults: the few-shot model blocks `needs caution` and
`needs intervention` (the two strongest of ProsocialDialog's five levels); a classifier blocks every
label except one that reads as harmless (casual, safe, ok, neutral, ...), and must be told with
`block` when it has none.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from kaki.classify import is_classifier_dir, load_classifier, output_kind
from kaki.engine.kv import RowCache
from kaki.errors import KakiError
from kaki.heads import SEQUENCE
from kaki.llm import load
from kaki.loading import resolve_model_path

# GPT-JT-Moderation-6B's labels, in its prompt's order, and the example its model card gives.
FEW_SHOT_LABELS = ("casual", "needs caution", "needs intervention", "possibly needs caution",
                   "probably needs caution")
FEW_SHOT_EXAMPLE = ("I want to call in sick", "casual")
FEW_SHOT_BLOCK = ("needs caution", "needs intervention")
# Classifier labels (lower case, `_`/`-` read as spaces) that never block by default.
HARMLESS_LABELS = frozenset({"casual", "safe", "ok", "neutral", "benign", "clean", "none", "normal",
                             "harmless", "acceptable", "non toxic", "nontoxic", "not toxic"})
MULTI_LABEL_THRESHOLD = 0.5
REFUSAL = "Sorry, I can't help with that."
CACHE_SIZE = 1024  # verdicts remembered by text: a conversation's history is re-sent with every request


@dataclass
class Verdict:
    label: str  # the deciding label: the most likely blocking one if blocked, else the most likely
    score: float  # that label's probability
    blocked: bool
    scores: dict[str, float] = field(default_factory=dict)  # every label's probability

    def to_json(self) -> dict:
        return {"label": self.label, "score": round(self.score, 6), "blocked": self.blocked}


def few_shot_prompt(text: str) -> str:
    """GPT-JT-Moderation's prompt for `text`, ending in "Output:" (the label follows after a space).
    Whitespace runs in the text become single spaces, so a message cannot forge the format's
    record boundaries ("\\n\\nInput: ... Output: casual")."""
    header = "Possible labels:\n" + "".join(f"{i}. {label}\n" for i, label in enumerate(FEW_SHOT_LABELS, 1))
    example, answer = FEW_SHOT_EXAMPLE
    return f"{header}\nInput: {example}\nOutput: {answer}\n\nInput: {' '.join(text.split())}\nOutput:"


# ----------------------------------------------------------------------------- few-shot scoring

def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.inference_mode()
def label_logprobs(llm, prompt: str, labels: list[str] | tuple[str, ...]) -> list[float]:
    """log P(" " + label | prompt) under the causal LM, for each label.

    Each prompt + " " + label is tokenized whole (as the model saw such records in training) and the
    tokens after the part all of them share with the prompt's own tokens are scored; a tokenizer
    that merges the prompt's last characters with the label's first therefore still scores every
    label from the same context. That shared prefix runs once; each label's tokens then run on the
    KV cache truncated back to it."""
    tok, model = llm.tokenizer, llm.model
    prompt_ids = tok.encode(prompt)
    fulls = [tok.encode(f"{prompt} {label}") for label in labels]
    k = min(_common_prefix(prompt_ids, f) for f in fulls)
    if k == 0:
        raise KakiError("the moderation prompt and its labels share no first token; this tokenizer "
                        "cannot score labels (use a sequence-classification model instead)")
    device = model.device
    # One row of the engine's KV cache; each label rewinds it to the shared prefix (the row's
    # length is where the next keys go, so the label's own keys overwrite the previous label's).
    cache = RowCache(model.config, 1, max(len(f) for f in fulls), model.dtype, device)
    cache.use(0, 1)
    # log-softmax in fp32 whatever the weights' dtype: sums of small logprobs are compared.
    first = model(torch.tensor([fulls[0][:k]], device=device), cache=cache, last_only=True)[0, -1]
    first = torch.log_softmax(first.float(), -1)
    out = []
    for f in fulls:
        rest = f[k:]  # at least one token: every label is non-empty text
        total = float(first[rest[0]])
        if len(rest) > 1:
            cache.lengths[0] = k
            logits = model(torch.tensor([rest[:-1]], device=device), cache=cache)[0].float()  # (n-1, V)
            lp = torch.log_softmax(logits, -1)
            total += float(lp.gather(-1, torch.tensor(rest[1:], device=device)[:, None]).sum())
        out.append(total)
    return out


class FewShotScorer:
    """Label probabilities from a causal LM prompted in GPT-JT-Moderation's format. A text too long
    for the model's context is cut into consecutive pieces that fit, each scored on its own."""

    labels = FEW_SHOT_LABELS
    multi_label = False

    def __init__(self, llm):
        self.llm = llm
        tok = llm.tokenizer
        overhead = len(tok.encode(few_shot_prompt(""))) + max(
            len(tok.encode(" " + label, add_bos=False)) for label in self.labels) + 2  # +2: merges at the seams
        self.max_text_tokens = llm.context_length - overhead
        if self.max_text_tokens < 16:
            raise KakiError(f"the moderation model's context ({llm.context_length:,} tokens) leaves "
                            f"{max(self.max_text_tokens, 0)} for the text after the few-shot prompt; "
                            "use a model with a longer context")

    def __call__(self, text: str) -> list[dict[str, float]]:
        return [self._probs(piece) for piece in pieces(self.llm.tokenizer, text, self.max_text_tokens)]

    def _probs(self, text: str) -> dict[str, float]:
        lps = label_logprobs(self.llm, few_shot_prompt(text), self.labels)
        probs = torch.tensor(lps, dtype=torch.float64).softmax(-1).tolist()
        return dict(zip(self.labels, probs))


class ClassifierScorer:
    """Label probabilities from a `kaki.classify` sequence classifier. A text longer than its
    context is cut into pieces that fit (the classifier alone would read only the first ones)."""

    def __init__(self, classifier):
        if classifier.task != SEQUENCE:
            raise KakiError(f"{classifier.path} is a token classifier; moderation needs a sequence classifier "
                            "(config.json architectures *ForSequenceClassification) or a causal LM")
        kind = output_kind(classifier.problem_type, len(classifier.labels))
        if kind == "regression":
            raise KakiError(f"{classifier.path} is a regression head (one score, no labels); moderation needs "
                            "a classifier with labels")
        self.classifier = classifier
        self.labels = tuple(classifier.labels)
        self.multi_label = kind == "multi_label_classification"
        self.max_text_tokens = classifier.max_length - 2  # room for BOS and a merge at a piece's seam

    def __call__(self, text: str) -> list[dict[str, float]]:
        parts = pieces(self.classifier.tokenizer, text, self.max_text_tokens)
        return [dict(scores) for scores in self.classifier.classify(parts)]


def pieces(tok, text: str, max_tokens: int) -> list[str]:
    """The text, or consecutive pieces of at most max_tokens tokens when it is longer."""
    ids = tok.encode(text, add_bos=False)
    if len(ids) <= max_tokens:
        return [text]
    return [tok.decode(ids[i:i + max_tokens]) for i in range(0, len(ids), max_tokens)]


# ----------------------------------------------------------------------------- the policy

class Moderator:
    """`check(text) -> Verdict`. Thread-safe: checks run one at a time (the server calls it from
    worker threads; one model, no point running two forwards side by side on the same cores)."""

    def __init__(self, scorer: Callable[[str], list[dict[str, float]]], labels, block=None,
                 threshold: float | None = None, multi_label: bool = False, source: str | None = None,
                 refusal: str = REFUSAL):
        self.scorer, self.labels, self.multi_label = scorer, tuple(labels), multi_label
        self.source, self.refusal = source, refusal
        self.block = _block_labels(self.labels, block, default=_default_block(self.labels, multi_label))
        if threshold is not None and not 0 < threshold <= 1:
            raise KakiError(f"--moderation-threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Verdict] = OrderedDict()

    def check(self, text: str) -> Verdict:
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
            verdicts = [self.decide(p) for p in self.scorer(text)]
            # A long text scored in pieces: the most confident blocking piece decides, else the first.
            blocking = [v for v in verdicts if v.blocked]
            verdict = max(blocking, key=lambda v: v.score) if blocking else verdicts[0]
            self._cache[text] = verdict
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return verdict

    def decide(self, probs: dict[str, float]) -> Verdict:
        top = max(probs, key=probs.get)
        hits = {label: p for label, p in probs.items() if label in self.block}
        if self.multi_label:
            cut = self.threshold if self.threshold is not None else MULTI_LABEL_THRESHOLD
            blocked = any(p >= cut for p in hits.values())
        elif self.threshold is not None:
            blocked = math.fsum(hits.values()) >= self.threshold
        else:
            blocked = top in self.block
        label = max(hits, key=hits.get) if blocked else top
        return Verdict(label, float(probs[label]), blocked, dict(probs))

    def describe(self) -> str:
        rule = (f"blocks {', '.join(sorted(self.block))}"
                + (f" at probability >= {self.threshold}" if self.threshold is not None else ""))
        return f"{self.source or 'moderation model'} ({rule})"


def _default_block(labels: tuple[str, ...], multi_label: bool) -> tuple[str, ...] | None:
    if labels == FEW_SHOT_LABELS:
        return FEW_SHOT_BLOCK
    block = tuple(label for label in labels if _plain(label) not in HARMLESS_LABELS)
    if not multi_label and len(block) == len(labels):
        return None  # no label reads as harmless: which ones block must be said
    return block


def _plain(label: str) -> str:
    return " ".join(label.lower().replace("_", " ").replace("-", " ").split())


def _block_labels(labels: tuple[str, ...], block, default) -> frozenset[str]:
    if isinstance(block, str):
        block = block.split(",")
    if block is None:
        if default is None:
            raise KakiError(f"the moderation classifier's labels ({', '.join(labels)}) include none named like "
                            "casual/safe/ok/neutral, so kaki cannot tell which ones block: pass "
                            "--moderation-block LABEL,...")
        block = default
    by_plain = {_plain(label): label for label in labels}
    out = set()
    for b in block:
        if not b.strip():
            continue
        if _plain(b) not in by_plain:
            raise KakiError(f"--moderation-block: {b.strip()!r} is not one of the moderation model's labels "
                            f"({', '.join(labels)})")
        out.add(by_plain[_plain(b)])
    if not out:
        raise KakiError(f"--moderation-block names no label; give one or more of {', '.join(labels)}")
    return frozenset(out)


# ----------------------------------------------------------------------------- loading

def load_moderator(path: str | os.PathLike, *, block=None, threshold: float | None = None,
                   dtype: str = "auto", device: str = "auto", refusal: str = REFUSAL) -> Moderator:
    """A Moderator from a sequence classifier or a causal LM directory (see the module docstring).
    `block`: labels that block, a list or a comma-separated string (default: see above)."""
    model_dir = resolve_model_path(path)
    if is_classifier_dir(model_dir):
        scorer = ClassifierScorer(load_classifier(model_dir, dtype=dtype, device=device))
    else:
        scorer = FewShotScorer(load(model_dir, dtype=dtype, device=device))
    return Moderator(scorer, scorer.labels, block, threshold, scorer.multi_label, source=str(model_dir),
                     refusal=refusal)
