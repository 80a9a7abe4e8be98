"""The serving engine: kaki.engine's `Scheduler` behind one worker thread, with async handles.

The scheduler does the work (continuous batching, the KV cache, the prefix cache, sampling, the
prompt-fits rule); this module only carries requests to its thread and events back:

- `submit(requests) -> Handle` (from any thread) puts the sequences in an inbox, after the queue
  bound (`QueueFull`) and the limits have been checked; the worker adds them to the scheduler;
- the worker loops `Scheduler.step()` while there is work; each event becomes an `Output` (text
  through `kaki.engine.TextSequence`, the text of logprob tokens) for its handle's queue;
- `abort(handle)` ends a handle's sequences at the next step (its client went away).

A forward pass that fails ends only the sequences it carried, and a sampling fault only its own
row (the scheduler's rules); the server goes on. Nothing of a finished request stays here: the
worker drops a sequence's record with its last output, and a Handle holds no sequence.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import torch
from loguru import logger

from kaki.device import available_memory
from kaki.chat_format import format_for_llm
from kaki.engine import PrefixCache, Scheduler, Sequence, TextSequence
from kaki.engine.kv import kv_cache_bytes
from kaki.engine.scheduler import Event
from kaki.errors import KakiError, ParamError, RankLost
from kaki.serve.client import EngineStopped, Handle, Output, QueueFull, SeqRequest, token_text
from kaki.serve.metrics import SPEC_COUNTERS, Metrics

__all__ = ["Engine", "EngineConfig", "EngineStopped", "Handle", "Output", "QueueFull", "SeqRequest",
           "check_kv_budget", "token_text"]

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE = 256
# Padded prompt tokens prefilled per step: several newcomers share one forward pass, but a burst
# of prompts is spread over steps so the running sequences are not stalled for long.
DEFAULT_MAX_PREFILL_TOKENS = 2048
# Keys and values kept for prompt prefixes across requests (a shared system prompt, a growing
# conversation, n > 1): allocated at start-up next to the KV cache. 0 turns prefix caching off.
DEFAULT_PREFIX_CACHE_MB = 1024
# Keep this fraction of free memory out of the KV-cache budget (activations, logits, allocator).
MEMORY_HEADROOM = 0.1


@dataclass
class EngineConfig:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # sequences decoded together
    max_seq_len: int | None = None  # prompt + generated tokens per sequence; None: the model's context
    max_queue: int = DEFAULT_MAX_QUEUE  # sequences waiting for a row before QueueFull
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS  # padded prompt tokens prefilled per step
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB  # prefix cache budget; 0: off


@dataclass(eq=False)
class _Live:
    """The worker's record of one running or waiting sequence (dropped with its last output)."""

    handle: Handle
    index: int  # within its handle
    seq: Sequence
    text: TextSequence
    submitted: float
    last_emit: float = 0.0


class Engine:
    def __init__(self, llm, config: EngineConfig | None = None, metrics: Metrics | None = None,
                 model_name: str | None = None):
        self.llm = llm
        self.model = llm.model
        self.tokenizer = llm.tokenizer
        self.config = cfg = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.model_name = model_name or "kaki"
        self.context_length = context = llm.context_length
        self.max_seq_len = cfg.max_seq_len or context
        if self.max_seq_len > context:
            raise KakiError(f"--max-seq-len {self.max_seq_len:,} is longer than the model's context "
                            f"({context:,} tokens); use at most {context:,}")
        for flag, value, least in (("--max-batch-size", cfg.max_batch_size, 1), ("--max-queue", cfg.max_queue, 0),
                                   ("--prefix-cache-mb", cfg.prefix_cache_mb, 0)):
            if not value >= least:
                raise KakiError(f"{flag} must be >= {least}, got {value}")
        check_kv_budget(self.model.config, cfg.max_batch_size, self.max_seq_len, self.model.dtype,
                        self.model.device, int(cfg.prefix_cache_mb * 2**20))
        self.scheduler = self._new_scheduler()
        self._cv = threading.Condition()
        # Guarded by _cv: submitted but not yet handed to the scheduler, handles to abort, and
        # sequences not finished (the queue bound), the scheduler's stats as of the last step.
        self._inbox: list[tuple[Handle, list[SeqRequest], float]] = []
        self._aborts: list[Handle] = []
        self._unfinished = 0
        self._stats = self.scheduler.stats()
        # The worker's own: records of unfinished sequences by scheduler id.
        self._live: dict[int, _Live] = {}
        self._counted = dict.fromkeys(("prompt_tokens", "prefix_hit_tokens", "prefix_evictions", *SPEC_COUNTERS), 0)
        self._state = "new"  # new -> running -> stopped
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # the last step failure, for /health

    def _new_scheduler(self) -> Scheduler:
        cfg, model = self.config, self.model
        prefix_bytes = int(cfg.prefix_cache_mb * 2**20)
        prefix = PrefixCache(model.config, model.dtype, model.device, prefix_bytes) if prefix_bytes else None
        return Scheduler(
            model, self.llm.eos_ids, max_rows=cfg.max_batch_size, max_len=self.max_seq_len, prefix_cache=prefix,
            max_prefill_tokens=cfg.max_prefill_tokens, speculative=self.llm.speculate, draft=self.llm.draft,
            limit_text=f"this server takes at most {self.max_seq_len:,} tokens per sequence (prompt + reply; "
                       "`kaki serve --max-seq-len`)")

    # ------------------------------------------------------------------------------ client side

    @property
    def defaults(self) -> dict:
        return self.llm.generation_defaults

    def encode(self, prompt: str | list[int], add_bos: bool | None = None) -> list[int]:
        return self.llm.encode_prompt(prompt, add_bos=add_bos)

    def chat_format(self, name: str = "auto"):
        return format_for_llm(self.llm, name)

    def fit(self, n_prompt: int, max_new: int | None, *, field: str = "max_tokens", cap: bool = False,
            prompt_field: str = "prompt") -> int:
        """The number of new tokens a prompt of `n_prompt` tokens may have: `max_new` (None: as many
        as fit), or a ParamError naming the prompt or `field` when they do not fit (`cap`: shorten
        instead, as Adept's server does). The rule is the scheduler's (kaki.engine)."""
        return self.scheduler.fit(n_prompt, max_new, cap=cap, field=field, prompt_field=prompt_field)

    def submit(self, requests: list[SeqRequest], loop: asyncio.AbstractEventLoop | None = None,
               field: str = "n") -> Handle:
        """Queue sequences (all or none). With `loop`, the Handle is iterated with `async for`
        on that loop; without, with a plain `for`. `field` is what a request with more sequences
        than the server can ever hold is told to change."""
        for r in requests:
            if not r.prompt_ids or len(r.prompt_ids) + r.params.max_new_tokens > self.max_seq_len:
                raise ParamError("prompt", "does not fit in max_seq_len (call Engine.fit first)")
        limit = self.config.max_queue + self.config.max_batch_size
        if len(requests) > limit:
            raise ParamError(field, f"makes {len(requests)} sequences (prompts x n) but this server holds at "
                             f"most {limit} at once (--max-batch-size + --max-queue); send fewer per request")
        handle = Handle(self, len(requests), loop)
        with self._cv:
            if self._state == "stopped":
                raise EngineStopped("the server is shutting down; retry on another replica or later")
            # Free rows take newcomers at the next step; beyond them, max_queue may wait.
            if self._unfinished + len(requests) > limit:
                self.metrics.rejected.inc(len(requests))
                waiting = self._stats["waiting"] + sum(len(reqs) for _, reqs, _ in self._inbox)
                raise QueueFull(f"{waiting} sequences are already waiting (the limit is {self.config.max_queue}, "
                                "`kaki serve --max-queue`); retry shortly")
            self._unfinished += len(requests)
            self._inbox.append((handle, list(requests), time.perf_counter()))
            self.metrics.queue_depth.set(self._stats["waiting"] + sum(len(reqs) for _, reqs, _ in self._inbox))
            self._cv.notify()
        return handle

    def abort(self, handle: Handle) -> None:
        """Stop all of `handle`'s sequences (its client has gone); they finish with "abort"."""
        with self._cv:
            self._aborts.append(handle)
            self._cv.notify()

    def start(self) -> None:
        with self._cv:
            if self._state != "new":
                return
            self._state = "running"
        # The whole KV cache now: its size was checked against free memory, and serving never
        # reallocates it.
        self.scheduler.allocate()
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
            s = dict(self._stats)
            s["waiting"] += sum(len(requests) for _, requests, _ in self._inbox)
        s.pop("max_rows", None)
        return {**s, "max_batch_size": self.config.max_batch_size, "max_seq_len": self.max_seq_len}

    # ------------------------------------------------------------------------------ worker

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while self._state == "running" and not (self._inbox or self._aborts or self.scheduler.has_work):
                    self._cv.wait()
                if self._state == "stopped":
                    return
            # A step of its own frame: nothing of the requests it handled stays referenced here
            # while the worker waits for the next ones.
            self._step()

    def _step(self) -> None:
        sched = self.scheduler
        with self._cv:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        try:
            for handle, requests, submitted in inbox:
                for i, r in enumerate(requests):
                    seq_id = sched.add_request(r.prompt_ids, r.params)
                    self._live[seq_id] = _Live(handle, i, sched.sequence(seq_id),
                                               TextSequence(self.tokenizer, r.prompt_ids, r.params.stop), submitted)
            if aborts:
                gone = set(map(id, aborts))
                for seq_id in [k for k, live in self._live.items() if id(live.handle) in gone]:
                    sched.abort(seq_id)
            decoding = len(sched.running)
            events = sched.step()
            if decoding:
                self.metrics.batch_size.observe(decoding)
                self.metrics.observe_max_batch(decoding)
            # Before any output of this step goes out, so a client that sees one sees the
            # step's stats too.
            self._note_stats()
            now = time.perf_counter()
            for event in events:
                self._deliver(event, now)
        except RankLost as e:
            # A tensor-parallel rank is gone: the mirror has logged why in one line and is stopping
            # the server; what is in flight fails with that reason, with no traceback (not a bug).
            self.error = str(e)
            self._reset(self.error)
        except Exception as e:  # a bug in this loop: fail what is in flight, keep serving
            logger.exception("engine step failed")
            self.error = f"{type(e).__name__}: {e}"
            sched = None
            self._reset(self.error)
        if self.scheduler.error is not None:
            self.error = self.scheduler.error
        self._note_stats()  # stop strings may have ended sequences

    def _deliver(self, event: Event, now: float) -> None:
        live = self._live.get(event.seq)
        if live is None:
            return  # the scheduler's report of an end the text already made
        out = Output(token_id=event.token, text=live.text.push(event), error=event.error)
        if live.seq.prompt_logprobs is not None and live.handle.prompt_logprobs[live.index] is None:
            live.handle.prompt_logprobs[live.index] = live.seq.prompt_logprobs
        if event.token is not None:
            if event.logprob is not None:
                ctx = (live.seq.prompt[-3:] + live.text.token_ids[:-1])[-3:]
                out.logprob = event.logprob
                out.token_text = token_text(self.tokenizer, ctx, event.token)
                if event.top is not None:
                    out.top = [(token_text(self.tokenizer, ctx, t), lp) for t, lp in event.top]
            self.metrics.generation_tokens.inc()
            if len(live.text.token_ids) == 1:
                self.metrics.ttft.observe(now - live.submitted)
            else:
                self.metrics.itl.observe(now - live.last_emit)
            live.last_emit = now
        if live.text.finished:
            if event.finish_reason is None:  # a stop string: end it in the scheduler too
                self.scheduler.abort(event.seq, "stop")
            out.finish_reason = live.text.finish_reason
            self._retire(event.seq, out.finish_reason, now)
        live.handle.put(live.index, out)

    def _retire(self, seq_id: int, reason: str, now: float) -> None:
        live = self._live.pop(seq_id)
        self.metrics.finished.labels(reason).inc()
        self.metrics.e2e.observe(now - live.submitted)
        with self._cv:
            self._unfinished -= 1

    def _note_stats(self) -> None:
        stats = self.scheduler.stats()
        with self._cv:
            self._stats = stats
            waiting = stats["waiting"] + sum(len(reqs) for _, reqs, _ in self._inbox)
        self.metrics.running.set(stats["running"])
        self.metrics.queue_depth.set(waiting)
        for key, counter in (("prompt_tokens", self.metrics.prompt_tokens),
                             ("prefix_hit_tokens", self.metrics.prefix_hit_tokens),
                             ("prefix_evictions", self.metrics.prefix_evictions),
                             *((key, getattr(self.metrics, key)) for key in SPEC_COUNTERS)):
            if key in stats and stats[key] > self._counted[key]:
                counter.inc(stats[key] - self._counted[key])
                self._counted[key] = stats[key]
        self.metrics.note_speculation()
        if "prefix_bytes" in stats:
            self.metrics.prefix_bytes.set(stats["prefix_bytes"])

    def _reset(self, why: str) -> None:
        """After a bug (the scheduler's state is not to be trusted): every unfinished sequence
        ends with "error" and a fresh scheduler (caches included) serves what comes next."""
        for seq_id in list(self._live):
            self._fail(seq_id, why)
        self.scheduler = None  # the old caches go first
        self.scheduler = self._new_scheduler()  # its cache grows within the limits checked at start
        self._counted = dict.fromkeys(self._counted, 0)

    def _fail(self, seq_id: int, why: str) -> None:
        live = self._live.get(seq_id)
        if live is not None:
            self._retire(seq_id, "error", time.perf_counter())
            live.handle.put(live.index, Output(finish_reason="error", error=why))

    def _fail_all(self, why: str) -> None:
        """After the worker has stopped: everything submitted and unfinished ends with "error"."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
        for seq_id in list(self._live):
            self._fail(seq_id, why)
        for handle, requests, _ in inbox:
            for i in range(len(requests)):
                with self._cv:
                    self._unfinished -= 1
                handle.put(i, Output(finish_reason="error", error=why))


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def check_kv_budget(cfg, rows: int, max_len: int, dtype: torch.dtype, device: torch.device,
                    prefix_bytes: int = 0) -> int:
    """The bytes the KV cache and the prefix cache take, or a KakiError saying which limits fit."""
    need = kv_cache_bytes(cfg, rows, max_len, dtype) + prefix_bytes
    budget = int(free_memory(torch.device(device)) * (1 - MEMORY_HEADROOM))
    if need > budget:
        room = max(0, budget - prefix_bytes)
        fit_len = max(0, room // kv_cache_bytes(cfg, rows, 0, dtype) - 1)
        fit_rows = room // kv_cache_bytes(cfg, 1, max_len, dtype)
        raise KakiError(
            f"the KV cache for --max-batch-size {rows} x --max-seq-len {max_len:,} (and a --prefix-cache-mb of "
            f"{prefix_bytes / 2**20:,.0f}) needs {_gib(need)} but only {_gib(budget)} of memory is free on {device} "
            f"(after {MEMORY_HEADROOM:.0%} headroom); lower --max-seq-len to {fit_len:,} or --max-batch-size to "
            f"{fit_rows} (or --prefix-cache-mb)")
    return need


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
