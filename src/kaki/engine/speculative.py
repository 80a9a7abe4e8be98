"""Speculative decoding: several tokens per target pass, from prompt lookup (n-gram drafts) here or
a draft model (kaki.engine.draft).

Batch-1 decoding on a CPU reads every weight once per token; checking K drafted tokens in the
same pass costs little more, so each accepted draft is a token for (nearly) free. Grounded
replies copy spans of their prompt, so the n-gram drafter needs no second model: it finds the
latest earlier occurrence of the sequence's last n tokens (n from `max_n` down to `min_n`) in its
prompt and output, and proposes the tokens that followed it.

The scheduler runs the target once over [last token, d_1 .. d_k] per row and hands each row's
logits (k + 1, V) to `verify`:
- greedy rows keep the drafts that equal the argmax, then the argmax after the last of them:
  token for token what plain greedy decoding gives;
- sampling rows use speculative sampling: d_j is kept with probability min(1, p(d_j) / q(d_j)),
  p the distribution plain sampling draws from (repetition penalty, temperature, top-k, top-p:
  `kaki.sampling.target_probs`) and q the drafter's (a point mass for n-gram drafts, so
  min(1, p(d_j))); else the token comes from max(p - q, 0) renormalised (for a point mass: p with
  d_j removed). The output has plain sampling's distribution; the random draws come from the
  sequence's own generator, so a seeded request gives the same tokens whatever else runs (though
  not the tokens it gives without speculation: the draws differ).

Rejected positions are dropped from the KV cache by the scheduler (`RowCache.trim`), and from the
draft model's cache with it. A sequence whose drafts keep missing drafts fewer tokens, and after
repeated misses pauses (`AdaptiveK`: a verify pass over k + 1 tokens costs more than a plain one
on a large model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kaki import sampling
from kaki.engine.sampler import Pick, Row, add_logprobs

MAX_N, MIN_N = 3, 1  # n-gram lengths matched, longest first
PAUSE_AFTER = 3  # drafts in a row with nothing accepted before the drafter pauses
MAX_PAUSE = 32  # steps; the pause doubles on each further miss up to this


class AdaptiveK:
    """How many tokens one sequence drafts per step, adapted to how its drafts fare: all kept,
    more next time (up to k_max); some rejected, fewer; nothing kept PAUSE_AFTER times in a row,
    no drafting for a while (doubling up to MAX_PAUSE steps)."""

    def __init__(self, k: int):
        self.k_max = self.k = k
        self._misses = 0
        self._pause = 0  # steps left without drafting
        self._backoff = 1

    def next_k(self, room: int) -> int:
        """Tokens to draft this step: min(k, room), or 0 while pausing."""
        if self._pause > 0:
            self._pause -= 1
            return 0
        return max(0, min(self.k, room))

    def feedback(self, drafted: int, accepted: int) -> None:
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 2)
        else:
            self.k = max(1, self.k - 1)
        if accepted:
            self._misses, self._backoff = 0, 1
            return
        self._misses += 1
        if self._misses >= PAUSE_AFTER:
            self._pause, self._backoff = self._backoff, min(MAX_PAUSE, 2 * self._backoff)
            self._misses = 0


class NgramDrafter(AdaptiveK):
    """One sequence's prompt-lookup drafter: its ids so far and an index from each n-gram to
    where the tokens after its latest occurrence start."""

    def __init__(self, prompt: list[int], k: int, max_n: int = MAX_N, min_n: int = MIN_N):
        super().__init__(k)
        self.ids = list(prompt)
        self.n_prompt = len(prompt)
        self.max_n, self.min_n = max_n, min_n
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 1  # continuation starts [1, _indexed) are in the index

    def propose(self, tokens: list[int], room: int) -> list[int]:
        """Up to min(k, room) tokens to follow prompt + `tokens` (the sequence's generated ids so
        far), or [] when nothing earlier matches its end (or the drafter is pausing)."""
        self.ids += tokens[len(self.ids) - self.n_prompt:]
        k = self.next_k(room)
        if k <= 0:
            return []
        ids, n_ids = self.ids, len(self.ids)
        # Index every n-gram that has at least one token after it (not the current suffix itself).
        for p in range(self._indexed, n_ids):
            for n in range(self.min_n, min(self.max_n, p) + 1):
                self._index[tuple(ids[p - n:p])] = p
        self._indexed = max(self._indexed, n_ids)
        for n in range(min(self.max_n, n_ids), self.min_n - 1, -1):
            p = self._index.get(tuple(ids[n_ids - n:]))
            if p is not None:
                return ids[p:p + k]
        return []


@dataclass
class Verdict:
    picks: list[Pick]  # the tokens to emit, in order: the kept drafts, then the target's own
    accepted: int  # drafts kept


def verify(logits: torch.Tensor, row: Row, draft: list[int], q: torch.Tensor | None = None) -> Verdict:
    """Accept a prefix of `draft` against the target's fp32 logits (k + 1, V) at the positions of
    [last token, d_1 .. d_k] (row j scores the token after j drafts), and pick the token after it.
    q: the distributions (k, V) the drafts were sampled from (a draft model's, processed as p is),
    or None for a deterministic drafter (q a point mass at each draft)."""
    params, g = row.params, row.generator
    penalty = params.repetition_penalty != 1.0
    seen = row.seen_ids() if penalty else None
    drafted = torch.tensor(draft, dtype=torch.long, device=logits.device)
    picks: list[Pick] = []
    if params.greedy and not penalty:
        # One argmax for every position: the tokens plain greedy decoding picks.
        best = logits.argmax(-1).tolist()
        for j, d in enumerate(draft):
            if best[j] != d:
                break
            picks.append(Pick(d))
        picks.append(Pick(best[len(picks)]))
    else:
        for j in range(len(draft) + 1):
            lg = logits[j]
            if penalty:
                lg = sampling.apply_repetition_penalty(lg, torch.cat([seen, drafted[:j]]), params.repetition_penalty)
            if j == len(draft):  # every draft kept: the target's next token, as plain decoding picks it
                picks.append(Pick(sampling.sample_token(lg, params, g)))
                break
            d = draft[j]
            if params.greedy:
                t = int(torch.argmax(lg))
                picks.append(Pick(t))
                if t != d:
                    break
                continue
            p = sampling.target_probs(lg, params)
            qj = None if q is None else q[j].to(p.dtype)
            # u * q(d) < p(d) with u uniform in [0, 1): kept with probability min(1, p(d) / q(d)).
            qd = 1.0 if qj is None else float(qj[d])
            if float(torch.rand((), generator=g, device=g.device, dtype=p.dtype)) * qd < float(p[d]):
                picks.append(Pick(d))
                continue
            if qj is None:
                residual = p.clone()
                residual[d] = 0  # max(p - q, 0): q is a point mass at d
            else:
                residual = (p - qj).clamp(min=0)
            total = float(residual.sum())
            t = int(torch.multinomial(residual / total, 1, generator=g)) if total > 0 else d
            picks.append(Pick(t))
            break
    if params.logprobs or params.top_logprobs:
        for j, pick in enumerate(picks):
            add_logprobs(pick, logits[j], params.top_logprobs)
    return Verdict(picks, len(picks) - 1)  # every pick but the last is a kept draft


@dataclass
class SpecCounters:
    """What speculation did, for stats: drafted and kept tokens, and the decode steps (one row
    in one target pass) and tokens they gave."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0

    def as_stats(self) -> dict:
        return {"spec_draft_tokens": self.draft_tokens, "spec_accepted_tokens": self.accepted_tokens,
                "decode_steps": self.decode_steps, "decode_tokens": self.decode_tokens}


def summary(stats: dict) -> str:
    """One line from SpecCounters' stats (kaki generate --verbose, chat's /stats): tokens per target
    pass per sequence, and the drafts' fate."""
    steps, tokens = stats["decode_steps"], stats["decode_tokens"]
    line = f"{tokens} tokens decoded in {steps} steps (a sequence in a target pass): " \
           f"{tokens / max(steps, 1):.2f} tokens per target pass"
    drafted, kept = stats["spec_draft_tokens"], stats["spec_accepted_tokens"]
    if drafted:
        line += f"; speculative: {kept} of {drafted} drafted tokens accepted ({kept / drafted:.0%})"
    return line
