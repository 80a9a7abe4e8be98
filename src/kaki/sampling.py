"""Sampling parameters and the pure functions that turn one row of logits into a token.

Order follows transformers' generate: repetition penalty, then temperature, top-k, top-p.
Temperature 0 means argmax. Every row samples with its own torch.Generator, so a seeded request
gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import random
from dataclasses import InitVar, dataclass, field, fields

import torch

from kaki.errors import ParamError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the sequence
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the decoded text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # logprob of each generated token
    top_logprobs: int = 0  # and of this many most likely alternatives
    prompt_logprobs: bool = False  # logprob of each prompt token given the ones before it
    # Speculative decoding (kaki.engine.speculative): "ngram[:K]" (prompt lookup), "draft[:K]" (the
    # engine's draft model), K drafted tokens at most per step; "off"; or None for the engine's default.
    speculate: str | None = None
    speculative: InitVar[str | None] = None  # the earlier name of `speculate`, still accepted

    def __post_init__(self, speculative: str | None = None) -> None:
        if speculative is not None:
            if self.speculate is not None and self.speculate != speculative:
                raise ParamError("speculate", "is given twice (speculate and its old name speculative); give one")
            self.speculate = speculative
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str):
            raise ParamError(name, why)

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 0:
            bad("max_new_tokens", f"must be a whole number >= 0, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            bad("temperature", f"must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", f"must be a whole number >= 0 (0 turns it off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0 (1 turns it off), got {self.repetition_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            bad("seed", f"must be a whole number >= 0, got {self.seed!r}")
        if not all(isinstance(s, str) for s in self.stop):
            bad("stop", "must be a string or a list of strings")
        if not all(isinstance(i, int) and i >= 0 for i in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of token ids")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            bad("top_logprobs", f"must be a whole number from 0 to 20, got {self.top_logprobs!r}")
        if self.speculate is not None:
            parse_speculate(self.speculate)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        names = {f.name for f in fields(cls)} | {"speculative"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ParamError(unknown[0], f"is not a sampling parameter; known: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return g


MAX_DRAFT = 16  # drafted tokens per step at most: a verify pass over more rarely pays on a CPU
DEFAULT_DRAFT = 4
DRAFTERS = ("ngram", "draft")  # prompt lookup; a draft model (kaki.engine.draft)


def parse_speculate(value: str | None, field: str = "speculate") -> tuple[str, int]:
    """(drafter, K) for a `speculate` setting: ("off", 0) for "off" or None; ("ngram", K) or
    ("draft", K) for "ngram[:K]" or "draft[:K]" (K default DEFAULT_DRAFT); anything else is a
    ParamError naming `field`."""
    if value is None or value == "off":
        return "off", 0
    kind, colon, k = value.partition(":") if isinstance(value, str) else ("", "", "")
    if kind in DRAFTERS and not colon:
        return kind, DEFAULT_DRAFT
    if kind in DRAFTERS and k.isdigit() and 1 <= int(k) <= MAX_DRAFT:
        return kind, int(k)
    raise ParamError(field, f"must be 'off', 'ngram[:K]' or 'draft[:K]' with K from 1 to {MAX_DRAFT}, got {value!r}")


def speculative_k(value: str | None, field: str = "speculate") -> int:
    """Drafted tokens per step at most for a `speculate` setting (0: off)."""
    return parse_speculate(value, field)[1]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: divide positive logits of seen tokens by `penalty`, multiply negatives.

    Safe for any penalty > 0: one that the logits' dtype cannot hold (1e-308 is 0 in fp32, 0 / 0
    is NaN) is applied in float64, and results beyond the dtype's range stay at its largest
    finite value (two infinite logits would make NaN in softmax)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    finfo = torch.finfo(logits.dtype)
    if not finfo.tiny <= penalty <= finfo.max or not finfo.tiny <= 1 / penalty <= finfo.max:
        picked = picked.double()
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked.clamp(-finfo.max, finfo.max).to(logits.dtype))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 seen: torch.Tensor | None = None) -> int:
    """One token from one row of fp32 logits (V,)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(target_probs(logits, params), 1, generator=generator))


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from, given one row of fp32 logits (V,) with the
    repetition penalty already applied: temperature (> 0), top-k and top-p. Speculative decoding
    accepts drafts against this same distribution."""
    # Shifted so the largest logit is 0 before dividing: no temperature > 0 can then overflow to
    # inf (1e-300 would, and inf - inf is NaN in softmax); a vanishing one leaves the argmax alone.
    # The floor keeps -inf out of the division (-inf / inf is NaN), and a temperature the dtype
    # cannot hold (1e-300 is 0 in fp32: 0 / 0) divides in float64.
    finfo = torch.finfo(logits.dtype)
    shifted = (logits - logits.max()).clamp(min=-finfo.max)
    if params.temperature < finfo.tiny:
        shifted = shifted.double()
    logits = shifted / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return torch.softmax(logits, dim=-1)
