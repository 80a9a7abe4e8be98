"""The scheduler: token ids in, per-token events out, one synchronous `step()` at a time.

Sequences wait in arrival order; up to `max_rows` run at once, each in its own row of one
`RowCache`. A step decodes one token for every running sequence, then fills the rows that freed
up with waiting sequences (continuous batching): their prompts are prefilled together, minus
whatever prefix the `PrefixCache` already holds, and their first tokens sampled. Every token,
and every end, comes out as an `Event`; each sequence's last event has its finish reason:
"stop" (an eos or stop id, or the caller's stop string), "length", "abort" or "error" (its own
sampling failed, or the forward pass it was in; the other sequences go on).

No text, no threads, no HTTP: front ends turn events into text (kaki.engine.text) and drive
`step()` from wherever they run.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from loguru import logger

from kaki.engine.kv import RowCache
from kaki.engine.prefix import Block, PrefixCache
from kaki.engine.sampler import Pick, pick_tokens, prompt_logprobs
from kaki.engine.draft import DraftModel
from kaki.engine.speculative import AdaptiveK, NgramDrafter, SpecCounters, verify
from kaki.errors import KakiError, ParamError
from kaki.model import CausalLM
from kaki.sampling import SamplingParams, parse_speculate

DEFAULT_MAX_ROWS = 32


@dataclass
class Event:
    """One step of one sequence: a new token, or (token None) an end without one."""

    seq: int
    token: int | None = None
    logprob: float | None = None  # log-softmax of the raw logits (before penalty or temperature)
    top: list[tuple[int, float]] | None = None  # most likely alternatives (id, logprob)
    finish_reason: str | None = None  # on the sequence's last event
    error: str | None = None


def check_prompt_fits(n_prompt: int, max_new: int | None, limit: int, *, cap: bool = True,
                      field: str = "max_new_tokens", prompt_field: str = "prompt", limit_text: str | None = None) -> int:
    """The prompt-fits rule, for every caller: how many new tokens a prompt of `n_prompt` tokens
    may have within `limit` tokens per sequence (prompt + reply). `max_new` None: as many as fit;
    more than fit: cut to what fits (`cap`) or a ParamError naming `field`. A prompt that does not
    fit at all is a ParamError naming `prompt_field`; `limit_text` says what the limit is
    (default: the model's context)."""
    limit_text = limit_text or f"the model's context is {limit:,}"
    if n_prompt == 0:
        raise ParamError(prompt_field, "is empty (no tokens); give some text or enable the BOS token")
    if n_prompt > limit or (n_prompt == limit and max_new != 0):
        raise ParamError(prompt_field, f"is {n_prompt:,} tokens but {limit_text}; shorten it (or lower "
                         "the prompt's history) to leave room for the reply")
    room = limit - n_prompt
    if max_new is None:
        return room
    if max_new > room and not cap:
        raise ParamError(field, f"asks for {max_new:,} tokens but the prompt's {n_prompt:,} tokens leave room "
                         f"for {room:,} (the limit is {limit:,} per sequence); lower {field}")
    return min(max_new, room)


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    max_new: int
    generator: torch.Generator
    stop_ids: frozenset[int]  # eos (unless ignore_eos) and the stop ids
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: list[float | None] | None = None
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    row: int | None = None  # in the RowCache while running
    blocks: list[Block] = field(default_factory=list)  # prefix-cache blocks held, from the first
    drafter: AdaptiveK | None = None  # with speculative decoding: an NgramDrafter, or K for the draft model
    _seen: torch.Tensor | None = None

    def seen_ids(self) -> torch.Tensor:
        """Prompt and generated ids (the repetition penalty's), on the generator's device."""
        if self._seen is None:
            self._seen = torch.tensor(self.prompt + self.tokens, dtype=torch.long, device=self.generator.device)
        return self._seen

    def ids(self, start: int, end: int) -> list[int]:
        """(prompt + tokens)[start:end]."""
        p = len(self.prompt)
        if end <= p:
            return self.prompt[start:end]
        return self.prompt[start:] + self.tokens[max(0, start - p):end - p]

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if self._seen is not None:
            self._seen = torch.cat([self._seen, self._seen.new_tensor([token])])


class Scheduler:
    def __init__(self, model: CausalLM, eos_ids, *, max_rows: int = DEFAULT_MAX_ROWS, max_len: int | None = None,
                 prefix_cache: PrefixCache | None = None, max_prefill_tokens: int | None = None,
                 limit_text: str | None = None, speculative: str | None = None, draft: DraftModel | None = None):
        """max_len: prompt + new tokens per sequence (default the model's context);
        max_prefill_tokens: padded prompt tokens prefilled in one step (None: every free row's
        newcomer at once), so a burst of prompts does not stall the running sequences;
        limit_text: what a prompt that does not fit is told the limit is (see `fit`);
        speculative: "ngram[:K]", "draft[:K]" or "off"/None, for sequences whose params do not say
        (kaki.engine.speculative); draft: the draft model "draft" drafts with (kaki.engine.draft;
        this scheduler's own: its cache mirrors this one's rows)."""
        self.model = model
        context = model.config.max_position_embeddings
        self.max_len = max_len or context
        self.limit_text = limit_text or (f"the model's context is {context:,}" if self.max_len == context
                                         else f"the limit is {self.max_len:,} tokens per sequence (prompt + reply)")
        if self.max_len > context:
            raise KakiError(f"max_len {self.max_len:,} is longer than the model's context ({context:,} tokens)")
        if max_rows < 1:
            raise KakiError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.eos = frozenset(eos_ids)
        self.prefix = prefix_cache
        self.max_prefill_tokens = max_prefill_tokens
        self.draft = draft.fresh() if draft is not None else None
        self._check_speculate(speculative, "speculative")  # a bad setting fails here, not at the first step
        self.speculative = speculative
        self.spec = SpecCounters()
        self.cache: RowCache | None = None  # allocated (and grown) to what the sequences need
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i] is in row i
        self._ended: list[Event] = []  # ends decided between steps (abort), reported by the next
        self._seqs: dict[int, Sequence] = {}  # not yet finished
        self._next_id = 0
        self.prompt_tokens = 0  # prompt tokens of admitted sequences
        self.prefilled_tokens = 0  # of those, the ones the model ran (the rest came from the prefix cache)
        self.error: str | None = None  # the last forward pass that failed (its sequences ended with "error")
        # Rank 0 of a tensor-parallel model (kaki.engine.mirror): the other ranks build this
        # scheduler too and are sent what it is asked to do, so that every rank runs the same steps.
        self.leader = getattr(model, "leader", None)
        if self.leader is not None:
            self.leader.created(self, eos_ids=sorted(self.eos), max_rows=max_rows, max_len=max_len,
                                prefix_cache=prefix_cache, max_prefill_tokens=max_prefill_tokens,
                                limit_text=limit_text, speculative=speculative, draft=draft is not None)

    # ------------------------------------------------------------------------ callers

    def add_request(self, prompt_ids: list[int], params: SamplingParams, max_new: int | None = None) -> int:
        """Queue a sequence; returns its id. max_new defaults to params.max_new_tokens; either is
        cut to what fits in max_len (a ParamError when the prompt alone does not fit)."""
        self._check_speculate(params.speculate, "speculate")
        prompt = list(prompt_ids)
        max_new = self.fit(len(prompt), params.max_new_tokens if max_new is None else max_new)
        if self.leader is not None:  # queued on every rank, with rank 0's seed when it has none
            params = self.leader.added(self, prompt, params, max_new)
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos)
        seq = Sequence(self._next_id, prompt, params, max_new, params.make_generator(self.model.device), stop)
        self._next_id += 1
        self._seqs[seq.id] = seq
        self.waiting.append(seq)
        return seq.id

    def _check_speculate(self, setting: str | None, field: str) -> None:
        if parse_speculate(setting, field)[0] == "draft" and self.draft is None:
            raise ParamError(field, f"is {setting!r} but no draft model is loaded (kaki.load(..., draft_model=DIR), "
                             "--draft-model DIR); use 'ngram[:K]' or 'off'")

    def fit(self, n_prompt: int, max_new: int | None, *, cap: bool = True, field: str = "max_new_tokens",
            prompt_field: str = "prompt") -> int:
        """`check_prompt_fits` within this scheduler's max_len (thread-safe: it reads no state)."""
        return check_prompt_fits(n_prompt, max_new, self.max_len, cap=cap, field=field, prompt_field=prompt_field,
                                 limit_text=self.limit_text)

    def allocate(self) -> None:
        """The whole KV cache now, max_rows x max_len, as a server wants it (its memory known at
        start-up, never a reallocation while serving); otherwise it grows to what sequences need."""
        if self.leader is not None:
            self.leader.allocated(self)
        self._reserve_cache(self.max_rows, self.max_len)

    def sequence(self, seq_id: int) -> Sequence | None:
        """A sequence not yet finished (keep the object to read it afterwards)."""
        return self._seqs.get(seq_id)

    def abort(self, seq_id: int, reason: str = "abort") -> None:
        """End a sequence now (its client left; "stop": the caller saw a stop string). The next
        step reports it with `reason`; a finished or unknown id is ignored."""
        if self.leader is not None:
            self.leader.aborted(self, seq_id, reason)
        seq = self._seqs.get(seq_id)
        if seq is None:
            return
        if seq.row is None and seq in self.waiting:
            self.waiting.remove(seq)
        self._ended.append(Event(seq.id, finish_reason=reason))
        with torch.inference_mode():  # a row may move, and the cache holds inference tensors
            self._end([seq], [reason])

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._ended)

    def stats(self) -> dict:
        out = {"running": len(self.running), "waiting": len(self.waiting), "max_rows": self.max_rows,
               "prompt_tokens": self.prompt_tokens, "prefilled_tokens": self.prefilled_tokens,
               **self.spec.as_stats()}
        if self.prefix is not None:
            out.update(self.prefix.counters())
        return out

    def step(self) -> list[Event]:
        """One decode step for the running sequences, then newcomers into the free rows."""
        with self.leader.stepping(self) if self.leader is not None else nullcontext(), torch.inference_mode():
            events, self._ended = self._ended, []
            if self.running:
                events += self._decode()
            if self.waiting and len(self.running) < self.max_rows:
                events += self._admit()
        return events

    # ------------------------------------------------------------------------ steps

    def _decode(self) -> list[Event]:
        seqs = list(self.running)
        drafts, qs = self._drafts(seqs)
        events = self._verify(seqs, drafts, qs) if any(drafts) else self._decode_one(seqs)
        self.spec.decode_steps += len(seqs)
        self.spec.decode_tokens += sum(e.token is not None for e in events)
        return events

    def _decode_one(self, seqs: list[Sequence]) -> list[Event]:
        """One token for every sequence."""
        dev = self.model.device
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)  # (B, 1)
        positions = torch.tensor([[len(s.prompt) + len(s.tokens) - 1] for s in seqs], device=dev)
        self.cache.use(0, len(seqs))
        try:
            logits = self.model(ids, positions, self.cache, last_only=True)
        except Exception as e:  # noqa: BLE001 (every row of the pass is lost, the scheduler is not)
            return self._fail(seqs, e)
        self._store_blocks(seqs)
        return self._sample(seqs, logits[:, -1].float())

    def _drafts(self, seqs: list[Sequence]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """The tokens speculated to follow each sequence ([] without speculation or a match), and
        the distributions a draft model sampled them from (None: greedy, or a point mass)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        ks = [0] * len(seqs)  # tokens each sequence asks of the draft model
        for b, s in enumerate(seqs):
            if s.drafter is None:
                kind, k = parse_speculate(s.params.speculate if s.params.speculate is not None else self.speculative)
                if k == 0:
                    continue
                s.drafter = NgramDrafter(s.prompt, k) if kind == "ngram" else AdaptiveK(k)
            # One token comes from the target after the drafts: within max_new, the cache has room.
            room = s.max_new - len(s.tokens) - 1
            if isinstance(s.drafter, NgramDrafter):
                drafts[b] = s.drafter.propose(s.tokens, room)
            else:
                ks[b] = s.drafter.next_k(room)
        if not any(ks):
            return drafts, [None] * len(seqs)
        try:
            model_drafts, qs = self.draft.propose(seqs, ks, self.cache.rows, self.cache.capacity)
        except Exception as e:  # noqa: BLE001 (a failed draft pass costs its drafts, not the sequences)
            logger.opt(exception=e).warning("engine: the draft model's pass failed; decoding without its drafts")
            self.draft = self.draft.fresh()  # its cache may be half written: start it again
            return drafts, [None] * len(seqs)
        for b, k in enumerate(ks):
            if k:
                drafts[b] = model_drafts[b]
        return drafts, qs

    def _verify(self, seqs: list[Sequence], drafts: list[list[int]], qs: list[torch.Tensor | None]) -> list[Event]:
        """One target pass over each row's [last token, drafts] (right-padded), the drafts
        accepted or not (kaki.engine.speculative.verify), and the rejected positions dropped from
        the cache."""
        rows = [[s.tokens[-1]] + d for s, d in zip(seqs, drafts)]
        B, S = len(rows), max(map(len, rows))
        ids = torch.zeros(B, S, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            valid[b, :len(r)] = True
        dev = self.model.device
        ids, valid = ids.to(dev), valid.to(dev)
        self.cache.use(0, B)
        try:
            # Positions come from the cache: slot i holds rotary position i in every row.
            logits = self.model(ids, None, self.cache, None if bool(valid.all()) else valid)  # (B, S, V)
        except Exception as e:  # noqa: BLE001 (every row of the pass is lost, the scheduler is not)
            return self._fail(seqs, e)
        logits = logits.float()
        picks: list[list[Pick] | Exception | None] = []
        for b, (s, d) in enumerate(zip(seqs, drafts)):
            try:
                verdict = verify(logits[b, :len(d) + 1], s, d, qs[b])
            except Exception as e:  # noqa: BLE001 (this row's request alone fails, as in pick_tokens)
                picks.append(e.with_traceback(None))
                continue
            # The cache keeps the last token and the kept drafts; the target's own pick is fed next step.
            self.cache.trim(s.row, len(d) - verdict.accepted)
            if d:
                if not isinstance(s.drafter, NgramDrafter):  # the draft model's cache rolls back with the target's
                    self.draft.rollback(s.row, len(d), verdict.accepted)
                s.drafter.feedback(len(d), verdict.accepted)
                self.spec.draft_tokens += len(d)
                self.spec.accepted_tokens += verdict.accepted
            picks.append(verdict.picks)
        events = self._emit(seqs, picks)
        # Once the kept drafts are in the sequences' ids (the blocks are keyed by them).
        self._store_blocks([s for s in seqs if s.row is not None])
        return events

    def _admit(self) -> list[Event]:
        free = self.max_rows - len(self.running)
        newcomers: list[Sequence] = []
        longest = 0
        while self.waiting and len(newcomers) < free:
            n = len(self.waiting[0].prompt)
            if newcomers and self.max_prefill_tokens is not None \
                    and (len(newcomers) + 1) * max(longest, n) > self.max_prefill_tokens:
                break
            newcomers.append(self.waiting.popleft())
            longest = max(longest, n)
        events = []
        # max_new 0 without prompt logprobs: nothing to run.
        idle = [s for s in newcomers if s.max_new == 0 and not s.params.prompt_logprobs]
        for s in idle:
            events.append(Event(s.id, finish_reason="length"))
        self._end(idle, ["length"] * len(idle))
        newcomers = [s for s in newcomers if s not in idle]
        if newcomers:
            try:
                self._reserve(newcomers)
            except Exception as e:  # noqa: BLE001 (out of memory growing the cache: these fail, the running go on)
                return events + self._fail(newcomers, e)
        # Prompt logprobs need logits at every position (and the whole prompt run); the rest only
        # the last position's. A newcomer whose prompt shares blocks not yet cached with an earlier
        # newcomer's (n > 1, or one system prompt) is prefilled right after it, from the blocks it
        # stored: the shared part runs once.
        plain = [s for s in newcomers if not s.params.prompt_logprobs]
        leaders, followers = self._split_shared(plain)
        for group, full in ((leaders, False), (followers, False),
                            ([s for s in newcomers if s.params.prompt_logprobs], True)):
            if group:
                events += self._prefill(group, full)
        return events

    def _split_shared(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
        """(leaders, followers): a follower's prompt has a full block past what the prefix cache
        holds now in common with a leader's (only with a prefix cache)."""
        if self.prefix is None or len(seqs) < 2:
            return seqs, []
        bs = self.prefix.block_size
        leaders, followers = [], []
        for s in seqs:
            # The first block this prompt would prefill: shared with a leader, it is worth waiting for.
            upto = (len(self.prefix.match(s.prompt[:-1])) + 1) * bs
            if upto <= len(s.prompt) - 1 and any(upto <= len(x.prompt) - 1 and x.prompt[:upto] == s.prompt[:upto]
                                                 for x in leaders):
                followers.append(s)
            else:
                leaders.append(s)
        return leaders, followers

    def _prefill(self, seqs: list[Sequence], full: bool) -> list[Event]:
        lo = len(self.running)
        for b, s in enumerate(seqs):
            s.row = lo + b
            self.running.append(s)
            if self.prefix is not None and not full:
                # At least the last prompt token runs: its logits pick the first new token.
                s.blocks = self.prefix.match(s.prompt[:-1])
                self.prefix.acquire(s.blocks)
                s.reused_tokens = self.prefix.load(s.blocks, self.cache, s.row)
            else:
                self.cache.lengths[s.row] = 0
        suffixes = [s.prompt[s.reused_tokens:] for s in seqs]
        B, S = len(seqs), max(len(x) for x in suffixes)
        ids = torch.zeros(B, S, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        for b, x in enumerate(suffixes):  # left-padded: every prompt ends at the last column
            ids[b, S - len(x):] = torch.tensor(x, dtype=torch.long)
            valid[b, S - len(x):] = True
        dev = self.model.device
        ids, valid = ids.to(dev), valid.to(dev)
        reused = torch.tensor([s.reused_tokens for s in seqs], device=dev)[:, None]
        positions = reused + (valid.long().cumsum(-1) - 1).clamp(min=0)  # each row from its own start
        self.cache.use(lo, lo + B)
        try:
            logits = self.model(ids, positions, self.cache, None if bool(valid.all()) else valid,
                                last_only=not full)
        except Exception as e:  # noqa: BLE001 (these newcomers fail; the running rows were not written)
            return self._fail(seqs, e)
        self.prompt_tokens += sum(len(s.prompt) for s in seqs)
        self.prefilled_tokens += sum(len(x) for x in suffixes)
        if full:
            for s, lp in zip(seqs, prompt_logprobs(logits, ids, [len(s.prompt) for s in seqs])):
                s.prompt_logprobs = lp
        self._store_blocks(seqs)
        return self._sample(seqs, logits[:, -1].float())

    def _fail(self, seqs: list[Sequence], exc: Exception) -> list[Event]:
        """A forward pass (or the memory for it) failed: its sequences end with "error", every
        other sequence goes on (a pass writes only its own rows' slots past their lengths, and
        lengths move only once it has finished)."""
        self.error = f"{type(exc).__name__}: {exc}"
        logger.opt(exception=exc).error("engine: a forward pass over {} sequences failed", len(seqs))
        self._end(seqs, ["error"] * len(seqs))
        return [Event(s.id, finish_reason="error", error=self.error) for s in seqs]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Event]:
        """Each sequence's next token from its row of fp32 logits (B, V); the finished leave."""
        live = [b for b, s in enumerate(seqs) if s.max_new > 0]  # max_new 0: the prompt was only scored
        if len(live) < len(seqs):
            logits = logits[live]
        picks = dict(zip(live, pick_tokens(logits, [seqs[b] for b in live]))) if live else {}
        return self._emit(seqs, [[p] if isinstance(p, Pick) else p for p in map(picks.get, range(len(seqs)))])

    def _emit(self, seqs: list[Sequence], picks: list[list[Pick] | Exception | None]) -> list[Event]:
        """An event per picked token of each sequence (None: it ends with "length" without one);
        a sequence that ends, at a stop id or its token limit, drops the picks after that token."""
        events, ended, reasons = [], [], []
        for s, row in zip(seqs, picks):
            if row is None:
                events.append(Event(s.id, finish_reason="length"))
            elif isinstance(row, Exception):
                events.append(Event(s.id, finish_reason="error", error=f"{type(row).__name__}: {row}"))
            else:
                for pick in row:
                    s.append(pick.token)
                    reason = None
                    if pick.token in s.stop_ids:
                        reason = "stop"
                    elif len(s.tokens) >= s.max_new:
                        reason = "length"
                    events.append(Event(s.id, pick.token, pick.logprob, pick.top, reason))
                    if reason is not None:
                        break
            event = events[-1]
            if event.finish_reason is not None:
                s.error = event.error
                ended.append(s)
                reasons.append(event.finish_reason)
        self._end(ended, reasons)
        return events

    # ------------------------------------------------------------------------ rows and blocks

    def _end(self, seqs: list[Sequence], reasons: list[str]) -> None:
        """Finish `seqs`: their rows go (the last running row moves into each hole, highest
        first, so the row that moves is never one still to go) and their blocks are released."""
        for s, reason in zip(seqs, reasons):
            s.finish_reason = reason
            self._seqs.pop(s.id, None)
            if self.prefix is not None:
                self.prefix.release(s.blocks)
            s.blocks = []
        for s in sorted((s for s in seqs if s.row is not None), key=lambda s: s.row, reverse=True):
            last = len(self.running) - 1
            if s.row != last:
                self.cache.move(last, s.row)
                if self.draft is not None:
                    self.draft.move(last, s.row)
                moved = self.running[last]
                moved.row, self.running[s.row] = s.row, moved
            else:
                self.cache.lengths[last] = 0
            self.running.pop()
            s.row = None

    def _reserve(self, newcomers: list[Sequence]) -> None:
        """Rows and slots for the running sequences and `newcomers` (grown by doubling, within
        max_rows and max_len, so a long-lived scheduler reallocates rarely)."""
        known = self.running + newcomers + list(self.waiting)
        rows = min(self.max_rows, len(known))
        slots = min(self.max_len, max(len(s.prompt) + s.max_new for s in known))
        if self.cache is not None and (rows > self.cache.rows or slots > self.cache.capacity):
            rows, slots = max(rows, 2 * self.cache.rows), max(slots, 2 * self.cache.capacity)
        self._reserve_cache(min(self.max_rows, rows), min(self.max_len, slots))

    def _reserve_cache(self, rows: int, slots: int) -> None:
        model = self.model
        if self.cache is None:
            self.cache = RowCache(model.config, rows, slots, model.dtype, model.device)
        else:
            self.cache.reserve(rows, slots)

    def _store_blocks(self, seqs: list[Sequence]) -> None:
        """Put each sequence's newly completed blocks of keys and values in the prefix cache."""
        if self.prefix is None:
            return
        bs = self.prefix.block_size
        for s in seqs:
            filled = self.cache.lengths[s.row]
            while (len(s.blocks) + 1) * bs <= filled:
                k = len(s.blocks)
                block = self.prefix.store(s.blocks[-1] if s.blocks else None, s.ids(k * bs, (k + 1) * bs),
                                          self.cache, s.row)
                if block is None:
                    break  # the pool is full of blocks in use; try again after the next step
                s.blocks.append(block)
