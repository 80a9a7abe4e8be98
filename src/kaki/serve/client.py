"""What the HTTP routes need of an engine, and nothing more: `EngineClient`.

The routes submit `SeqRequest`s and read `Output`s from a `Handle`; they never touch tensors or
the model. `kaki.serve.engine.Engine` (kaki.engine's scheduler behind a worker thread) is the real
one; a test can put a fake behind the same interface to check the HTTP contract alone
(tests/test_serve_contract.py). Text comes in through `encode` and goes out through `tokenizer`
(decoding ids, `token_text`), so a route needs no model at all.
"""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass
from typing import Protocol

from kaki.chat_format import ChatFormat, TemplateFormat
from kaki.errors import KakiError
from kaki.sampling import SamplingParams
from kaki.serve.metrics import Metrics
from kaki.tokenizer import Tokenizer


class QueueFull(KakiError):
    """More sequences waiting than the engine's queue holds: the caller should retry later."""

    retry_after = 1  # seconds


class EngineStopped(KakiError):
    """The engine is shutting down and takes no new work."""


@dataclass
class SeqRequest:
    """One sequence to generate: prompt ids and its sampling parameters (whose max_new_tokens
    already fits; see EngineClient.fit)."""

    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Output:
    """One step of one sequence: a new token (absent on an abort or error), the text it releases
    ('' while the text is held back), and on the last item the finish reason."""

    token_id: int | None = None
    text: str = ""
    logprob: float | None = None  # log-softmax of the raw logits (before temperature/top-k/top-p)
    token_text: str | None = None  # the token on its own, when logprobs were asked for
    top: list[tuple[str, float]] | None = None  # (token text, logprob) of the most likely tokens
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None


class Handle:
    """The consumer's side of one submit(): iterate it for (sequence index, Output) until every
    sequence has finished. `prompt_logprobs[i]` is filled before sequence i's first output.

    The engine holds a handle only while one of its sequences runs (a handle holds nothing of the
    engine's sequences), so a finished request is freed as soon as its route lets go of it."""

    def __init__(self, engine: "EngineClient", n: int, loop: asyncio.AbstractEventLoop | None):
        self.engine = engine
        self.n = n
        self.prompt_logprobs: list[list[float | None] | None] = [None] * n
        self.loop = loop
        self._q: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._open = n

    def put(self, index: int, out: Output) -> None:
        """Deliver one output (from any thread)."""
        if self.loop is None:
            self._q.put((index, out))
            return
        try:
            self.loop.call_soon_threadsafe(self._q.put_nowait, (index, out))
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


class EngineClient(Protocol):
    """The engine as the routes and the app see it."""

    model_name: str
    max_seq_len: int  # prompt + reply tokens per sequence on this server
    context_length: int  # the model's own context (max_seq_len is at most this)
    tokenizer: Tokenizer  # for the text of ids (echo, logprob tokens); prompts go through `encode`
    metrics: Metrics
    error: str | None  # the last engine failure, for /health

    @property
    def running(self) -> bool:
        """Taking and serving work (for /health)."""

    def start(self) -> None: ...

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking work; what is unfinished ends with "error"."""

    def submit(self, requests: list[SeqRequest], loop: asyncio.AbstractEventLoop | None = None,
               field: str = "n") -> Handle:
        """Queue sequences (all or none); QueueFull, EngineStopped, or a ParamError naming `field`
        when there are more than the engine can ever hold."""

    def abort(self, handle: Handle) -> None:
        """Stop `handle`'s sequences (its client has gone); they finish with "abort"."""

    def fit(self, n_prompt: int, max_new: int | None, *, field: str = "max_tokens", cap: bool = False,
            prompt_field: str = "prompt") -> int:
        """New tokens a prompt of `n_prompt` tokens may have (None: as many as fit); a ParamError
        naming `prompt_field` or `field` when they do not fit (`cap`: shorten instead)."""

    def stats(self) -> dict:
        """Counters for /health: running and waiting sequences, limits, prefix-cache use."""

    def encode(self, prompt: str | list[int], add_bos: bool | None = None) -> list[int]:
        """Prompt ids of text (or checked ids)."""

    @property
    def defaults(self) -> dict:
        """The model's generation defaults (generation_config.json), under SamplingParams' names."""

    def chat_format(self, name: str = "auto") -> ChatFormat | TemplateFormat:
        """The chat format `name` for this model (`--chat-format`; "auto": the model's own), or a
        KakiError naming the choices."""


def token_text(tokenizer: Tokenizer, context: list[int], token: int) -> str:
    """The text `token` adds after `context` (its leading space included, which decoding it
    alone would drop under sentencepiece's rules)."""
    before = tokenizer.decode(context, skip_special_tokens=False)
    after = tokenizer.decode(context + [token], skip_special_tokens=False)
    if after.startswith(before):
        return after[len(before):]
    return tokenizer.decode([token], skip_special_tokens=False)
