"""The serving engine: one model, many clients, continuous batching. No HTTP in here.

One worker thread owns the model and the KV cache (`SlotCache`) and loops:
1. drop aborted sequences (a client went away) and hand their rows back;
2. admit waiting sequences into free rows: prefill them (several at once, left-padded) straight
   into the cache and sample their first token;
3. run one decode step over every running sequence and sample each one's next token;
4. finished sequences leave at once; the rest go on at the next step.

Each sequence samples with its own `torch.Generator` and its own positions, so a seeded or greedy
request gets the tokens it would get alone (up to floating-point noise from the batch shape).
Text comes out of `kaki.tokenizer.TextStream` (incremental detokenization and stop strings).

Clients talk to it through `submit(requests) -> Handle` (an async iterator of per-token `Output`s,
or a blocking one when no event loop is given) and `abort(handle)`. The waiting queue is bounded
(`QueueFull`), and the cache's size is checked against free memory before it is allocated.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kaki.errors import KakiError, ParamError
from kaki.sampling import SamplingParams, sample_token
from kaki.serve.cache import SlotCache, kv_cache_bytes
from kaki.serve.metrics import Metrics
from kaki.tokenizer import TextStream

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE = 256
# Padded prompt tokens prefilled per step: several newcomers share one forward pass, but a burst
# of prompts is spread over steps so the running sequences are not stalled for long.
DEFAULT_MAX_PREFILL_TOKENS = 2048
# Keep this fraction of free memory out of the KV-cache budget (activations, logits, allocator).
MEMORY_HEADROOM = 0.1


class QueueFull(KakiError):
    """More sequences waiting than `max_queue`: the caller should retry later."""

    retry_after = 1  # seconds


class EngineStopped(KakiError):
    """The engine is shutting down and takes no new work."""


@dataclass
class EngineConfig:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # sequences decoded together
    max_seq_len: int | None = None  # prompt + generated tokens per sequence; None: the model's context
    max_queue: int = DEFAULT_MAX_QUEUE  # sequences waiting for a row before QueueFull
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS  # padded prompt tokens prefilled per step


@dataclass
class SeqRequest:
    """One sequence to generate: prompt ids and its sampling parameters (whose max_new_tokens
    already fits in max_seq_len; see Engine.fit)."""

    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Output:
    """One step of one sequence: a new token (absent on an abort or error), the text it releases
    ('' while TextStream holds back), and on the last item the finish reason."""

    token_id: int | None = None
    text: str = ""
    logprob: float | None = None  # log-softmax of the raw logits (before temperature/top-k/top-p)
    token_text: str | None = None  # the token on its own, when logprobs were asked for
    top: list[tuple[str, float]] | None = None  # (token text, logprob) of the most likely tokens
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None


class Handle:
    """The consumer's side of one submit(): iterate it for (sequence index, Output) until every
    sequence has finished. `prompt_logprobs[i]` is filled before sequence i's first output."""

    def __init__(self, engine: "Engine", n: int, loop: asyncio.AbstractEventLoop | None):
        self.engine = engine
        self.seqs: list[_Seq] = []
        self.prompt_logprobs: list[list[float | None] | None] = [None] * n
        self.loop = loop
        self._q: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._open = n

    def _put(self, item) -> None:  # called from the worker thread
        if self.loop is None:
            self._q.put(item)
            return
        try:
            self.loop.call_soon_threadsafe(self._q.put_nowait, item)
        except RuntimeError:
            pass  # the event loop has closed: nobody is listening any more

    @property
    def finished(self) -> bool:
        return self._open == 0

    def abort(self) -> None:
        if self._open:
            self.engine.abort(self)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Output]:
        if self._open == 0:
            raise StopAsyncIteration
        i, out = await self._q.get()
        if out.finish_reason is not None:
            self._open -= 1
        return i, out

    def __iter__(self):
        while self._open:
            i, out = self._q.get()
            if out.finish_reason is not None:
                self._open -= 1
            yield i, out


@dataclass
class _Seq:
    handle: Handle
    index: int  # within its handle
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stream: TextStream
    submitted: float
    tokens: list[int] = field(default_factory=list)
    last_emit: float = 0.0
    finish_reason: str | None = None
    seen: torch.Tensor | None = None  # prompt + generated ids, for the repetition penalty

    @property
    def wants_logprobs(self) -> bool:
        return self.params.logprobs or self.params.top_logprobs > 0

    @property
    def position(self) -> int:
        """Rotary position of the last sampled token (the one the next step feeds)."""
        return len(self.prompt_ids) + len(self.tokens) - 1


class Engine:
    def __init__(self, llm, config: EngineConfig | None = None, metrics: Metrics | None = None,
                 model_name: str | None = None):
        self.llm = llm
        self.model = llm.model
        self.tokenizer = llm.tokenizer
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.model_name = model_name or "kaki"
        cfg = self.model.config
        context = llm.context_length
        self.max_seq_len = self.config.max_seq_len or context
        if self.max_seq_len > context:
            raise KakiError(f"--max-seq-len {self.max_seq_len:,} is longer than the model's context "
                            f"({context:,} tokens); use at most {context:,}")
        if self.config.max_batch_size < 1 or self.config.max_queue < 0:
            raise KakiError("--max-batch-size must be >= 1 and --max-queue >= 0")
        check_kv_budget(cfg, self.config.max_batch_size, self.max_seq_len, self.model.dtype, self.model.device)
        self.cache = SlotCache(cfg, self.config.max_batch_size, self.max_seq_len, self.model.dtype,
                               self.model.device)
        self.eos = set(llm.eos_ids)
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._aborted: set[Handle] = set()  # handles whose sequences are to be dropped
        self._active: list[_Seq] = []  # _active[i] occupies cache row i
        self._occupied = 0  # rows in use or being filled, as of the worker's last look
        self._state = "new"  # new -> running -> stopped
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # the last step failure, for /health

    # ------------------------------------------------------------------------------ client side

    def fit(self, n_prompt: int, max_new: int | None, *, field: str = "max_tokens", cap: bool = False,
            prompt_field: str = "prompt") -> int:
        """The number of new tokens a prompt of `n_prompt` tokens may have: `max_new` (None: as many
        as fit), or a ParamError naming the prompt or `field` when they do not fit (`cap`: shorten
        instead, as Adept's server does)."""
        limit = self.max_seq_len
        if n_prompt == 0:
            raise ParamError(prompt_field, "is empty (no tokens); give some text or enable the BOS token")
        if n_prompt > limit or (n_prompt == limit and max_new != 0):
            raise ParamError(prompt_field, f"is {n_prompt:,} tokens but this server takes at most {limit:,} "
                             "tokens per sequence (prompt + reply; `kaki serve --max-seq-len`); shorten it")
        room = limit - n_prompt
        if max_new is None:
            return room
        if max_new > room and not cap:
            raise ParamError(field, f"asks for {max_new:,} tokens but the prompt's {n_prompt:,} tokens leave "
                             f"room for {room:,} (the limit is {limit:,} per sequence); lower {field}")
        return min(max_new, room)

    def submit(self, requests: list[SeqRequest], loop: asyncio.AbstractEventLoop | None = None,
               field: str = "n") -> Handle:
        """Queue sequences (all or none). With `loop`, the Handle is iterated with `async for`
        on that loop; without, with a plain `for`. `field` is what a request with more sequences
        than the server can ever hold is told to change."""
        handle = Handle(self, len(requests), loop)
        now = time.perf_counter()
        for i, r in enumerate(requests):
            if len(r.prompt_ids) + r.params.max_new_tokens > self.max_seq_len or not r.prompt_ids:
                raise ParamError("prompt", "does not fit in max_seq_len (call Engine.fit first)")
            gen = r.params.make_generator(self.model.device)
            handle.seqs.append(_Seq(handle, i, list(r.prompt_ids), r.params, gen,
                                    TextStream(self.tokenizer, r.prompt_ids, r.params.stop), now))
        limit = self.config.max_queue + self.config.max_batch_size
        if len(requests) > limit:
            raise ParamError(field, f"makes {len(requests)} sequences (prompts x n) but this server holds at "
                             f"most {limit} at once (--max-batch-size + --max-queue); send fewer per request")
        with self._cv:
            if self._state == "stopped":
                raise EngineStopped("the server is shutting down; retry on another replica or later")
            # Free rows take newcomers at the next step; beyond them, max_queue may wait.
            free_rows = self.config.max_batch_size - self._occupied
            if len(self._waiting) + len(requests) > self.config.max_queue + free_rows:
                self.metrics.rejected.inc(len(requests))
                raise QueueFull(f"{len(self._waiting)} sequences are already waiting (the limit is "
                                f"{self.config.max_queue}, `kaki serve --max-queue`); retry shortly")
            self._waiting.extend(handle.seqs)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify()
        return handle

    def abort(self, handle: Handle) -> None:
        """Stop all of `handle`'s sequences (its client has gone); they finish with "abort"."""
        with self._cv:
            self._aborted.add(handle)
            self._cv.notify()

    def start(self) -> None:
        with self._cv:
            if self._state != "new":
                return
            self._state = "running"
        self._thread = threading.Thread(target=self._run, name="kaki-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker; sequences still queued or running get a clean "error" finish."""
        with self._cv:
            if self._state == "stopped":
                return
            self._state = "stopped"
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._fail_all("the server is shutting down")

    @property
    def running(self) -> bool:
        return self._state == "running" and self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        with self._cv:
            return {"running": len(self._active), "waiting": len(self._waiting),
                    "max_batch_size": self.config.max_batch_size, "max_seq_len": self.max_seq_len}

    # ------------------------------------------------------------------------------ worker

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while self._state == "running" and not (self._waiting or self._active or self._aborted):
                    self._cv.wait()
                if self._state == "stopped":
                    return
                aborted, self._aborted = self._aborted, set()
                if aborted:
                    kept = deque(s for s in self._waiting if s.handle not in aborted)
                    for s in self._waiting:
                        if s.handle in aborted:
                            self._finish(s, "abort")
                    self._waiting = kept
                drop = [r for r, s in enumerate(self._active) if s.handle in aborted]
                newcomers = self._take_newcomers(self.cache.free_rows + len(drop))
                self._occupied = len(self._active) - len(drop) + len(newcomers)
                self.metrics.queue_depth.set(len(self._waiting))
            try:
                for r in drop:
                    self._finish(self._active[r], "abort")
                self._leave(drop)
                if newcomers:
                    self._admit(newcomers)
                    newcomers = []
                if self._active:
                    self._decode_step()
            except Exception as e:  # a bug or out-of-memory: fail these requests, keep serving
                from loguru import logger
                logger.exception("engine step failed")
                self.error = f"{type(e).__name__}: {e}"
                for s in newcomers + self._active:
                    if s.finish_reason is None:
                        self._finish(s, "error", error=self.error)
                self._active = []
                self.cache.rows = 0
                self.cache.length = 0
            self.metrics.running.set(len(self._active))

    def _take_newcomers(self, free: int) -> list[_Seq]:
        """Waiting sequences for this step, first come first served: as many as there are free
        rows and as fit in one prefill of max_prefill_tokens (padded) tokens, at least one. The
        rest wait for the next step, so a burst of prompts never stalls the running sequences
        for more than one such prefill."""
        out: list[_Seq] = []
        longest = 0
        while self._waiting and len(out) < free:
            n = len(self._waiting[0].prompt_ids)
            if out and (len(out) + 1) * max(longest, n) > self.config.max_prefill_tokens:
                break
            out.append(self._waiting.popleft())
            longest = max(longest, n)
        return out

    def _admit(self, seqs: list[_Seq]) -> None:
        """Prefill newcomers and sample their first token: one forward pass, or two when some
        want prompt logprobs (those need logits at every position; the rest only the last)."""
        for full in (False, True):
            group = [s for s in seqs if s.params.prompt_logprobs == full]
            if group:
                self._prefill(group, full)

    def _prefill(self, seqs: list[_Seq], full: bool) -> None:
        dev = self.model.device
        S = max(len(s.prompt_ids) for s in seqs)
        ids = torch.zeros(len(seqs), S, dtype=torch.long)
        valid = torch.zeros(len(seqs), S, dtype=torch.bool)
        for b, s in enumerate(seqs):  # left-padded: every prompt ends at the last column
            ids[b, S - len(s.prompt_ids):] = torch.tensor(s.prompt_ids, dtype=torch.long)
            valid[b, S - len(s.prompt_ids):] = True
        ids, valid = ids.to(dev), valid.to(dev)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # each row counts from its first token
        if self.cache.length >= self.cache.capacity:
            self.cache.compact()
        view = self.cache.reserve(len(seqs), S)
        self._active.extend(seqs)
        logits = self.model(ids, positions, view, None if bool(valid.all()) else valid, last_only=not full)
        self.cache.note_prefill(view)
        self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in seqs))
        if full:
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            chosen = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, S-1)
            for b, s in enumerate(seqs):
                n = len(s.prompt_ids)
                s.handle.prompt_logprobs[s.index] = [None] + (chosen[b, S - n:].tolist() if n > 1 else [])
        first_row = len(self._active) - len(seqs)
        self._sample(seqs, logits[:, -1].float(), first_row)

    def _decode_step(self) -> None:
        dev = self.model.device
        seqs = self._active
        if self.cache.length >= self.cache.capacity:
            self.cache.compact()
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)
        positions = torch.tensor([[s.position] for s in seqs], device=dev)
        self.metrics.batch_size.observe(len(seqs))
        self.metrics.observe_max_batch(len(seqs))
        logits = self.model(ids, positions, self.cache, last_only=True)
        self._sample(list(seqs), logits[:, -1].float(), 0)

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor, first_row: int) -> None:
        """Pick each sequence's next token from its row of fp32 logits (B, V); emit; let the
        finished ones leave."""
        n = len(seqs)
        picked: list[int | None] = [None] * n
        # Plain greedy rows: one argmax for all of them (same index as sample_token's argmax).
        greedy = [b for b, s in enumerate(seqs) if s.params.greedy and s.params.repetition_penalty == 1.0
                  and s.params.max_new_tokens > 0]
        if greedy:
            for b, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                picked[b] = t
        for b, s in enumerate(seqs):
            if picked[b] is None and s.params.max_new_tokens > 0:
                seen = None
                if s.params.repetition_penalty != 1.0:
                    if s.seen is None:
                        s.seen = torch.tensor(s.prompt_ids, dtype=torch.long, device=logits.device)
                    seen = s.seen
                picked[b] = sample_token(logits[b], s.params, s.generator, seen)
        want = [b for b, s in enumerate(seqs) if s.wants_logprobs and picked[b] is not None]
        lps = torch.log_softmax(logits[want], dim=-1) if want else None
        leaving = []
        now = time.perf_counter()
        for b, s in enumerate(seqs):
            tok = picked[b]
            if tok is None:  # max_new_tokens == 0: the prompt was only scored
                self._finish(s, "length")
                leaving.append(first_row + b)
                continue
            out = Output(token_id=tok)
            if lps is not None and b in want:
                row = lps[want.index(b)]
                out.logprob = float(row[tok])
                ctx = (s.prompt_ids[-3:] + s.tokens)[-3:]
                out.token_text = token_text(self.tokenizer, ctx, tok)
                if s.params.top_logprobs:
                    vals, idx = torch.topk(row, s.params.top_logprobs)
                    out.top = [(token_text(self.tokenizer, ctx, i), v)
                               for i, v in zip(idx.tolist(), vals.tolist())]
            s.tokens.append(tok)
            if s.seen is not None:
                s.seen = torch.cat([s.seen, torch.tensor([tok], device=s.seen.device)])
            reason = None
            if (tok in self.eos and not s.params.ignore_eos) or tok in s.params.stop_token_ids:
                reason = "stop"
            else:
                out.text = s.stream.push(tok)
                if s.stream.stopped:
                    reason = "stop"
                elif len(s.tokens) >= s.params.max_new_tokens:
                    reason = "length"
            if reason is not None:
                out.text += s.stream.finish()
            self.metrics.generation_tokens.inc()
            if len(s.tokens) == 1:
                self.metrics.ttft.observe(now - s.submitted)
            else:
                self.metrics.itl.observe(now - s.last_emit)
            s.last_emit = now
            self._emit(s, out, reason)
            if reason is not None:
                leaving.append(first_row + b)
        self._leave(leaving)

    def _leave(self, rows: list[int]) -> None:
        # Highest row first: the row that moves into a freed one is never one still to leave.
        for r in sorted(rows, reverse=True):
            moved = self.cache.remove(r)
            if moved is not None:
                self._active[r] = self._active[moved]
            self._active.pop()

    def _emit(self, s: _Seq, out: Output, reason: str | None) -> None:
        if reason is not None:
            out.finish_reason = reason
            s.finish_reason = reason
            self.metrics.finished.labels(reason).inc()
            self.metrics.e2e.observe(time.perf_counter() - s.submitted)
        s.handle._put((s.index, out))

    def _finish(self, s: _Seq, reason: str, error: str | None = None) -> None:
        if s.finish_reason is None:
            self._emit(s, Output(finish_reason=reason, error=error), reason)

    def _fail_all(self, why: str) -> None:
        with self._cv:
            seqs = list(self._waiting) + list(self._active)
            self._waiting.clear()
            self._active = []
        for s in seqs:
            self._finish(s, "error", error=why)


def token_text(tokenizer, context: list[int], token: int) -> str:
    """The text `token` adds after `context` (its leading space included, which decoding it
    alone would drop under sentencepiece's rules)."""
    before = tokenizer.decode(context, skip_special_tokens=False)
    after = tokenizer.decode(context + [token], skip_special_tokens=False)
    if after.startswith(before):
        return after[len(before):]
    return tokenizer.decode([token], skip_special_tokens=False)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from kaki.llm import available_memory
    return available_memory()


def check_kv_budget(cfg, rows: int, max_len: int, dtype: torch.dtype, device: torch.device) -> int:
    """The KV cache's size in bytes, or a KakiError saying which limits would fit."""
    need = kv_cache_bytes(cfg, rows, max_len, dtype)
    budget = int(free_memory(torch.device(device)) * (1 - MEMORY_HEADROOM))
    if need > budget:
        fit_len = budget // kv_cache_bytes(cfg, rows, 1, dtype)
        fit_rows = budget // kv_cache_bytes(cfg, 1, max_len, dtype)
        raise KakiError(
            f"the KV cache for --max-batch-size {rows} x --max-seq-len {max_len:,} needs {_gib(need)} but "
            f"only {_gib(budget)} of memory is free on {device} (after {MEMORY_HEADROOM:.0%} headroom); lower "
            f"--max-seq-len to {fit_len:,} or --max-batch-size to {fit_rows}")
    return need


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"

