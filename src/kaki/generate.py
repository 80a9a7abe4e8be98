"""The generation loop the chat session still uses until it moves to kaki.engine, the one engine
(issue #18; `LLM.generate`/`stream`, so `kaki generate` and eval, run on it already).

`Generation` prefills a batch of prompts (left-padded into one preallocated KV cache; each row's
positions count from its own first real token, as transformers' generate does) and then decodes
one token per row per step. Iterating it yields the new tokens of each step; a caller that sees a
stop string in the text calls `finish(row)`. Finished rows leave the batch at once.

A caller that keeps a conversation (the chat shell) passes its own `cache` with the ids its
filled slots hold (`cached_ids`): one prompt only, the longest shared token prefix is kept and
only the rest of the prompt is prefilled, and the cache grows as needed. Afterwards the cache
holds `(prompt + tokens)[:cache.length]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kaki.engine.sampler import prompt_logprobs
from kaki.engine.scheduler import check_prompt_fits
from kaki.model import CausalLM, KVCache
from kaki.sampling import SamplingParams, sample_token


@dataclass
class Token:
    row: int
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # most likely alternatives (id, logprob)


@dataclass
class RowState:
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator
    max_new: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[float | None] | None = None
    seen: torch.Tensor | None = None  # ids for the repetition penalty


class Generation:
    def __init__(self, model: CausalLM, prompts: list[list[int]], params: list[SamplingParams],
                 eos_ids: list[int], context: int | None = None, cache: KVCache | None = None,
                 cached_ids: list[int] = ()):
        if len(prompts) != len(params):
            raise ValueError("one SamplingParams per prompt")
        if cache is not None and (len(prompts) != 1 or cache.batch != 1 or params[0].prompt_logprobs):
            raise ValueError("a caller's cache takes one prompt, without prompt_logprobs")
        self.model = model
        self.device = model.device
        self.eos = set(eos_ids)
        context = context or model.config.max_position_embeddings
        self.rows = [RowState(len(p), sp, sp.make_generator(self.device),
                              check_prompt_fits(len(p), sp.max_new_tokens, context))
                     for p, sp in zip(prompts, params)]
        self.prompts = prompts
        self.active = [i for i, r in enumerate(self.rows) if r.max_new > 0]
        for i, r in enumerate(self.rows):
            if r.max_new == 0:
                r.finish_reason = "length"
        self._pending_finish: set[int] = set()
        self.prompt_tokens_processed = 0
        self.context = context
        self.cache = cache
        # Prompt tokens whose keys/values are reused from `cache`; at least one prompt token is
        # always run, since its logits pick the first new token.
        self.reused_tokens = 0
        if cache is not None:
            self.reused_tokens = min(_shared_prefix(prompts[0], cached_ids[:cache.length]), len(prompts[0]) - 1)

    # -------------------------------------------------------------------------------- public

    def finish(self, row: int, reason: str = "stop") -> None:
        """End `row` now (a stop string was seen); it leaves the batch before the next step."""
        if self.rows[row].finish_reason is None:
            self.rows[row].finish_reason = reason
        self._pending_finish.add(row)

    def __iter__(self):
        want_prompt_lp = any(self.rows[i].params.prompt_logprobs for i in range(len(self.rows)))
        if not self.active and not want_prompt_lp:
            return
        logits = self._prefill(want_prompt_lp)
        while self.active:
            steps = self._pick(logits)
            yield steps
            self._drop_finished()
            if not self.active:
                break
            logits = self._decode_step()

    # -------------------------------------------------------------------------------- internals

    @torch.inference_mode()
    def _prefill(self, want_prompt_lp: bool) -> torch.Tensor:
        if self.cache is not None:
            return self._prefill_suffix()
        rows = list(range(len(self.rows))) if want_prompt_lp else self.active
        prompts = [self.prompts[i] for i in rows]
        S = max(len(p) for p in prompts)
        B = len(prompts)
        ids = torch.zeros(B, S, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, S - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[b, S - len(p):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        max_new = max((self.rows[i].max_new for i in rows), default=0)
        self.cache = KVCache(self.model.config, B, S + max_new, self.model.dtype, self.device)
        logits = self.model(ids, positions, self.cache, None if bool(valid.all()) else valid,
                            last_only=not want_prompt_lp)
        self.prompt_tokens_processed += int(valid.sum())
        if want_prompt_lp:
            self._prompt_logprobs(rows, logits, ids, valid)
        self.positions = positions[:, -1]
        # Keep only rows that will generate.
        keep = [b for b, i in enumerate(rows) if i in self.active]
        if len(keep) != B:
            self.cache.select_rows(keep)
            self.positions = self.positions[keep]
            logits = logits[keep]
        return logits[:, -1].float()

    def _prefill_suffix(self) -> torch.Tensor:
        """Prefill only the prompt tokens after the reused prefix, appending to the caller's cache."""
        prompt, n = self.prompts[0], self.reused_tokens
        cache = self.cache
        cache.truncate(n)
        need = len(prompt) + self.rows[0].max_new
        if need > cache.capacity:
            # Doubling (up to the context) keeps a growing conversation from reallocating every turn.
            cache.reserve(min(self.context, max(need, 2 * cache.capacity)))
        ids = torch.tensor([prompt[n:]], dtype=torch.long, device=self.device)  # (1, S)
        positions = torch.arange(n, len(prompt), device=self.device)[None]  # (1, S)
        logits = self.model(ids, positions, cache, last_only=True)
        self.prompt_tokens_processed += len(prompt) - n
        self.positions = positions[:, -1]
        return logits[:, -1].float()

    def _prompt_logprobs(self, rows, logits, ids, valid):
        scores = prompt_logprobs(logits, ids, [self.rows[i].prompt_len for i in rows])
        for i, lp in zip(rows, scores):
            if self.rows[i].params.prompt_logprobs:
                self.rows[i].prompt_logprobs = lp

    def _pick(self, logits: torch.Tensor) -> list[Token]:
        steps = []
        logprobs = None
        if any(self.rows[i].params.logprobs or self.rows[i].params.top_logprobs for i in self.active):
            logprobs = torch.log_softmax(logits, dim=-1)
        for b, i in enumerate(self.active):
            r = self.rows[i]
            seen = None
            if r.params.repetition_penalty != 1.0:
                if r.seen is None:
                    r.seen = torch.tensor(self.prompts[i], dtype=torch.long, device=self.device)
                seen = r.seen
            tok = sample_token(logits[b], r.params, r.generator, seen)
            t = Token(i, tok)
            if logprobs is not None and (r.params.logprobs or r.params.top_logprobs):
                t.logprob = float(logprobs[b, tok])
                if r.params.top_logprobs:
                    vals, idx = torch.topk(logprobs[b], r.params.top_logprobs)
                    t.top = list(zip(idx.tolist(), vals.tolist()))
            r.tokens.append(tok)
            if seen is not None:
                r.seen = torch.cat([r.seen, torch.tensor([tok], device=self.device)])
            if (tok in self.eos and not r.params.ignore_eos) or tok in r.params.stop_token_ids:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.max_new:
                r.finish_reason = "length"
            steps.append(t)
        return steps

    def _drop_finished(self) -> None:
        keep = [b for b, i in enumerate(self.active)
                if self.rows[i].finish_reason is None and i not in self._pending_finish]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[b] for b in keep]
        if self.active:
            self.cache.select_rows(keep)
            self.positions = self.positions[keep]

    @torch.inference_mode()
    def _decode_step(self) -> torch.Tensor:
        ids = torch.tensor([[self.rows[i].tokens[-1]] for i in self.active], device=self.device)
        self.positions = self.positions + 1
        logits = self.model(ids, self.positions[:, None], self.cache, last_only=True)
        return logits[:, -1].float()


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
