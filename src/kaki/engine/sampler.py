"""One sampler path for every sequence: each row of logits becomes a token, its logprobs, or an
error of that row alone.

The arithmetic is kaki.sampling's pure functions; what this adds is the batch around them (plain
greedy rows share one argmax), the logprobs asked for, and the rule that a row whose sampling
fails (a poisoned request: NaN logits, a bad distribution) fails only its own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kaki import sampling
from kaki.sampling import SamplingParams


@dataclass
class Pick:
    token: int
    logprob: float | None = None  # log-softmax of the raw logits (before penalty or temperature)
    top: list[tuple[int, float]] | None = None  # most likely alternatives (id, logprob)


class Row(Protocol):
    """What the sampler needs of one sequence: its parameters, its own generator and (for the
    repetition penalty) the ids it has seen."""

    params: SamplingParams
    generator: torch.Generator

    def seen_ids(self) -> torch.Tensor:
        """Prompt and generated ids so far (N,), on the logits' device."""


def pick_tokens(logits: torch.Tensor, rows: list[Row]) -> list[Pick | Exception]:
    """One token per row of fp32 logits (B, V); a row's entry is its exception when it failed."""
    out: list[Pick | Exception | None] = [None] * len(rows)
    # Plain greedy rows: one argmax for all (the same index sample_token's argmax gives).
    greedy = [b for b, r in enumerate(rows) if r.params.greedy and r.params.repetition_penalty == 1.0]
    if greedy:
        for b, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
            out[b] = Pick(t)
    for b, r in enumerate(rows):
        try:
            if out[b] is None:
                seen = r.seen_ids() if r.params.repetition_penalty != 1.0 else None
                out[b] = Pick(sampling.sample_token(logits[b], r.params, r.generator, seen))
            if r.params.logprobs or r.params.top_logprobs:
                add_logprobs(out[b], logits[b], r.params.top_logprobs)
        except Exception as e:  # this row's request, not the batch: the others go on
            # Without its traceback: the frames it holds (this one's `rows` and `out` among them)
            # would keep every sequence of the batch alive until a full garbage collection.
            out[b] = e.with_traceback(None)
    return out


def add_logprobs(pick: Pick, logits: torch.Tensor, top: int) -> None:
    """Fill `pick`'s logprob (and `top` alternatives) from its row of raw fp32 logits (V,)."""
    lp = torch.log_softmax(logits, dim=-1)
    pick.logprob = float(lp[pick.token])
    if top:
        vals, idx = torch.topk(lp, top)
        pick.top = list(zip(idx.tolist(), vals.tolist()))


def prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> list[list[float | None]]:
    """Each prompt token's logprob given the ones before it, from a prefill's logits (B, S, V) over
    left-padded ids (B, S) (row b's prompt is its last lengths[b] columns); None for the first."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    chosen = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, S - 1)
    return [[None] + (chosen[b, -(n - 1):].tolist() if n > 1 else []) for b, n in enumerate(lengths)]
