"""A conversation with a model: turns, rendering, context-window trimming and KV prefix reuse.

Text lives here and token ids go to the engine (`kaki.engine`): the conversation is one long-lived
`Scheduler` whose `PrefixCache` keeps the keys and values of every turn's prompt and reply. Each
turn renders the whole conversation with the chat format and tokenizes it whole (the canonical
prompt: a greedy reply equals `kaki generate` on the same text); the engine reuses the longest
token prefix the new prompt shares with what it has cached, so a turn runs only its new tokens.
The session's prefix cache works in blocks of one token (the exact shared prefix is reused, not
a multiple of the server's 16-token blocks), within one model context of keys and values.

When history + the new message + the reply budget (`max_new_tokens`) exceed the model's
context, the oldest messages leave the window the model sees (the system text stays; `/save`
still has everything). A message that does not fit on its own is refused with the numbers.

Retrieval (`kaki chat --retrieval`) plugs in as `retrieve(question) -> passages`: the passages
go into the answered user turn only, in `kaki.chat_format`'s context block, and are dropped from
the prompt before that question would be.

Moderation (`kaki chat --moderation DIR`, a kaki.moderation.Moderator) screens each message before
the model sees it and each reply once it has ended. A blocked message is answered with the
moderator's refusal and the model never runs; a blocked reply is replaced by the refusal. Either
way the exchange leaves the conversation (a retried reply that is blocked gives the old one back),
so the model never sees blocked text in later turns and `/save` does not keep it.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

from kaki.chat_format import TemplateTooLarge, normalize_messages, with_context
from kaki.engine import PrefixCache, RowCache, Scheduler, TextSequence
from kaki.errors import KakiError, ParamError
from kaki.files import write_file_atomically
from kaki.sampling import SamplingParams


# /load reads at most this much: the longest conversation worth loading is far smaller, and a
# file like /dev/zero would otherwise be read until memory runs out.
MAX_LOAD_BYTES = 16 << 20


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    content: str
    passages: list[dict] = field(default_factory=list)  # retrieved for this question (user turns)


# ----------------------------------------------------------------------------- settings

_TRUE, _FALSE = {"on", "true", "yes", "1"}, {"off", "false", "no", "0"}


@dataclass
class Settings:
    """What `/set` changes, live. `sample` off means greedy whatever the temperature."""

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 128
    seed: int | None = None
    sample: bool = True

    HELP = {
        "temperature": "sampling temperature (> 0 turns sampling on, 0 turns it off)",
        "top_k": "keep the k most likely tokens (0 = off)",
        "top_p": "keep the most likely tokens up to this probability mass (1 = off)",
        "repetition_penalty": "> 1 discourages repeating tokens (1 = off)",
        "max_new_tokens": "longest reply, in tokens",
        "seed": "makes sampling repeatable: a whole number, or none",
        "sample": "on: sample with temperature/top_k/top_p; off: greedy (argmax)",
    }

    @classmethod
    def from_params(cls, sp: SamplingParams) -> "Settings":
        return cls(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                   repetition_penalty=sp.repetition_penalty, max_new_tokens=sp.max_new_tokens,
                   seed=sp.seed, sample=sp.temperature > 0)

    def params(self, stop: list[str]) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature if self.sample else 0.0, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
                              stop=list(stop))

    def items(self) -> list[tuple[str, object]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]

    def set(self, key: str, text: str) -> str:
        """Change one setting from its text form; returns what is now in effect. A bad key or
        value raises KakiError and changes nothing."""
        key = key.replace("-", "_")
        if key not in self.HELP:
            raise KakiError(f"unknown setting {key!r}; settings: {', '.join(self.HELP)}")
        new = Settings(**dict(self.items()))
        if key == "sample":
            word = text.lower()
            if word not in _TRUE | _FALSE:
                raise KakiError(f"sample takes on or off, not {text!r}")
            new.sample = word in _TRUE
            if new.sample and new.temperature == 0:
                new.temperature = 1.0
        elif key == "seed":
            new.seed = None if text.lower() in ("none", "off", "random") else _number(key, text, int)
        elif key in ("top_k", "max_new_tokens"):
            setattr(new, key, _number(key, text, int))
        else:
            setattr(new, key, _number(key, text, float))
            if key == "temperature":
                new.sample = new.temperature > 0
        new.params([])  # SamplingParams validates every value with a message that says why
        for k, v in new.items():
            setattr(self, k, v)
        if key in ("temperature", "sample"):
            return f"sample = {'on' if self.sample else 'off'}, temperature = {self.temperature}"
        return f"{key} = {getattr(self, key)}"


def _number(key: str, text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ParamError(key, f"must be {what}, got {text!r}") from None


# ----------------------------------------------------------------------------- one reply

@dataclass
class ReplyStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose keys/values came from the session's cache
    processed_tokens: int = 0  # prompt tokens the model ran this turn
    new_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0
    # Speculative decoding (kaki chat --speculate/--draft-model): tokens drafted and accepted, and
    # the decode steps (target passes) and the tokens they gave.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0


class Reply:
    """One reply being generated. Iterate it for text pieces (leading whitespace dropped); then
    `text`, `finish_reason` ("stop", "length" or "interrupted": closed early, e.g. Ctrl-C) and
    `stats`. `on_done(reply)` runs once it ends, however it ends; `stop()` ends it early.

    It runs as one sequence of `sched` (the conversation's scheduler, or a fresh one)."""

    def __init__(self, llm, prompt_ids: list[int], params: SamplingParams, on_done: Callable,
                 sched: Scheduler | None = None):
        self.prompt_ids = prompt_ids
        self.sched = sched or Scheduler(llm.model, llm.eos_ids, max_rows=1, max_len=llm.context_length,
                                        speculative=llm.speculate, draft=llm.draft)
        self.seq_id = self.sched.add_request(prompt_ids, params)  # a prompt that cannot fit raises here
        self.seq = self.sched.sequence(self.seq_id)
        self.out = TextSequence(llm.tokenizer, prompt_ids, params.stop)
        self.max_new_tokens = self.seq.max_new
        self.text = ""
        self.finish_reason: str | None = None
        self.stats = ReplyStats(prompt_tokens=len(prompt_ids))
        self._on_done = on_done
        self._pieces: Iterator[str] | None = None
        self.moderation: tuple[str, object] | None = None  # ("output", Verdict) once a moderator checked it

    @property
    def token_ids(self) -> list[int]:
        # The text's ids, not the sequence's: with speculation the sequence may hold drafts past a
        # stop string that ended the text.
        return self.out.token_ids

    def __iter__(self) -> Iterator[str]:
        if self._pieces is None:
            self._pieces = self._generate()
        return self._pieces

    def stop(self) -> None:
        """End the reply now (Ctrl-C), even before its first piece; a no-op once it has ended."""
        if self._pieces is not None:
            self._pieces.close()
        if self.finish_reason is None:
            self.finish_reason = "interrupted"
            self.sched.abort(self.seq_id)
            self._on_done(self)

    def _generate(self) -> Iterator[str]:
        t0 = time.perf_counter()
        sched, out = self.sched, self.out
        prefilled = sched.prefilled_tokens
        spec_before = sched.spec.as_stats()
        try:
            while not out.finished and sched.has_work:
                for event in sched.step():
                    if event.seq != self.seq_id:
                        continue  # the end of an earlier reply, reported late (aborted between steps)
                    if not self.stats.first_token_s:
                        self.stats.first_token_s = time.perf_counter() - t0
                        self.stats.reused_tokens = self.seq.reused_tokens
                    piece = out.push(event)
                    if out.error is not None:
                        raise KakiError(f"generating the reply failed: {out.error}")
                    if out.stopped and event.finish_reason is None:
                        sched.abort(self.seq_id, "stop")  # a stop string ended the text
                    if not self.text:
                        piece = piece.lstrip()  # the space after "adept:" is the format's, not the reply's
                    if piece:
                        self.text += piece
                        yield piece
            self.finish_reason = out.finish_reason or "length"
        finally:
            if self.finish_reason is None:
                self.finish_reason = "interrupted"
                sched.abort(self.seq_id)
            self.stats.total_s = time.perf_counter() - t0
            self.stats.new_tokens = len(self.token_ids)
            self.stats.processed_tokens = sched.prefilled_tokens - prefilled
            for key, value in sched.spec.as_stats().items():
                setattr(self.stats, key, value - spec_before[key])
            self._on_done(self)

    def run(self) -> "Reply":
        """Generate to the end without streaming."""
        for _ in self:
            pass
        return self


class Refusal:
    """What `say` returns for a message moderation blocks: the refusal as an already finished reply
    (same surface as Reply). The model never ran and the conversation is unchanged."""

    finish_reason = "content_filter"
    max_new_tokens = 0
    token_ids: list[int] = []

    def __init__(self, text: str, verdict):
        self.text = text
        self.moderation = ("input", verdict)
        self.stats = ReplyStats()

    def __iter__(self) -> Iterator[str]:
        return iter([self.text])

    def stop(self) -> None:
        pass

    def run(self) -> "Refusal":
        return self


# ----------------------------------------------------------------------------- the conversation

class ChatSession:
    def __init__(self, llm, fmt, system: str | None = None, settings: Settings | None = None,
                 retrieve: Callable[[str], list[dict]] | None = None,
                 notify: Callable[[str], None] | None = None, stop: list[str] = (), moderator=None,
                 cache_tokens: int | None = None):
        """cache_tokens: keys and values the conversation's prefix cache keeps, in tokens (default
        the model's context; 0 turns reuse off, as the LLM's prefix_cache_bytes = 0 does)."""
        self.llm, self.fmt = llm, fmt
        self.cache_tokens = llm.context_length if cache_tokens is None else cache_tokens
        self.stop = list(fmt.stop) + [s for s in stop if s not in fmt.stop]  # --stop adds to the format's
        self.system = system or None
        self.settings = settings or Settings.from_params(llm.sampling())
        self.retrieve = retrieve
        self.moderator = moderator  # kaki.moderation.Moderator or None
        self.last_checks: dict = {}  # {"input"/"output": Verdict} of the last message and reply screened
        self.notify = notify or (lambda message: None)
        self.turns: list[Turn] = []
        self.window = 0  # index of the oldest turn the model still sees
        self.dropped_notice_shown = False
        self.last_prompt: str | None = None  # the exact text of the last conversation prompt
        self.last_reply: Reply | None = None
        self.total_processed = 0  # prompt tokens the model ran, all turns together
        self._sched: Scheduler | None = None  # the conversation's engine, made on the first turn

    @property
    def context_length(self) -> int:
        return self.llm.context_length

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The conversation's cached prefixes (None before the first turn, or when the LLM's
        prefix_cache_bytes turns caching off)."""
        return self._sched.prefix if self._sched is not None else None

    def _engine(self) -> Scheduler:
        """The conversation's scheduler. Its prefix cache holds `cache_tokens` of keys and values
        (by default one model context, the most one conversation prompt can use; on a CPU the
        pool's pages cost memory only once written), in one-token blocks so that any shared prefix
        is reused whole; the least recently used branches (an old retry, an undone turn) go first."""
        if self._sched is None:
            llm, model = self.llm, self.llm.model
            prefix = None
            if llm.prefix_cache_bytes > 0 and self.cache_tokens > 0:
                budget = self.cache_tokens * RowCache.bytes_per_token(model.config, model.dtype)
                prefix = PrefixCache(model.config, model.dtype, model.device, budget, block_size=1)
            self._sched = Scheduler(model, llm.eos_ids, max_rows=1, max_len=llm.context_length,
                                    prefix_cache=prefix, speculative=llm.speculate, draft=llm.draft)
        return self._sched

    @property
    def context_tokens(self) -> int:
        """Tokens of the conversation the model sees now (system text and the window's turns)."""
        return len(self._encode(self._render(self.turns[self.window:], add_generation_prompt=False)))

    # ------------------------------------------------------------------------- turns

    def say(self, text: str) -> Reply | Refusal:
        """Answer a user message (raises KakiError, changing nothing, if it cannot fit)."""
        refusal = self._screen_input(text)
        if refusal is not None:
            return refusal
        turn = Turn("user", text)
        if self.retrieve is not None:
            turn.passages = list(self.retrieve(text))
        return self._answer(self.turns + [turn])

    def retry(self) -> Reply:
        """Generate the last reply again."""
        if not self.turns or self.turns[-1].role != "assistant":
            raise KakiError("there is no reply to retry yet; say something first")
        return self._answer(self.turns[:-1], replaced=self.turns[-1])

    def undo(self) -> list[Turn]:
        """Drop the last exchange (the last user message and what follows it)."""
        users = [i for i, t in enumerate(self.turns) if t.role == "user"]
        if not users:
            return []
        gone = self.turns[users[-1]:]
        self.turns = self.turns[:users[-1]]
        self.window = min(self.window, len(self.turns))
        self.last_prompt = None
        return gone

    def reset(self) -> None:
        """Forget the conversation (the system text and the settings stay; the KV cache too,
        since the next prompt may share the system text with it)."""
        self.turns, self.window, self.last_prompt, self.dropped_notice_shown = [], 0, None, False

    def raw(self, text: str) -> Reply | Refusal:
        """Complete `text` as it is: no chat format, not part of the conversation."""
        refusal = self._screen_input(text)
        if refusal is not None:
            return refusal
        ids = self.llm.tokenizer.encode(text)
        return Reply(self.llm, ids, self.settings.params(self.stop), on_done=self._screen_output)

    # ------------------------------------------------------------------------- save / load

    def messages(self) -> list[dict]:
        """The whole conversation (not only the window) as chat-completions `messages`."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": t.role, "content": t.content} for t in self.turns]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path).expanduser()
        write_file_atomically(path, json.dumps(self.messages(), indent=2, ensure_ascii=False) + "\n")
        return path

    def load(self, path: str | os.PathLike) -> int:
        """Replace the conversation with a saved one: a JSON list of messages, or an object with
        `messages` (a /v1/chat/completions request). A system message there replaces --system.
        The window then starts where a live conversation's would: the oldest turns that do not
        fit the context (with max_new_tokens kept for the reply) are left out."""
        path = Path(path).expanduser()
        raw = read_json_file(path, MAX_LOAD_BYTES)
        if isinstance(raw, dict) and "messages" in raw:
            raw = raw["messages"]
        if not isinstance(raw, list):
            raise KakiError(f"{path} must hold a JSON list of messages (what /save writes)")
        msgs = normalize_messages(raw)
        before = self.system, self.turns, self.window
        if msgs and msgs[0]["role"] == "system":
            self.system = msgs.pop(0)["content"] or None
        turns = [Turn(m["role"], m["content"]) for m in msgs]
        try:
            window = self._window_for(turns)
        except BaseException:
            self.system, self.turns, self.window = before
            raise
        self.reset()
        self.turns, self.window = turns, window
        return len(msgs)

    def _window_for(self, turns: list[Turn]) -> int:
        """The first turn of the window for a whole conversation: the oldest start (0, or a user
        turn) from which the rest fits the context, as `_fit` would leave it. Searched from the
        end, doubling then bisecting, so a long file is rendered a few times, not once per turn."""
        budget = self.context_length - self.settings.max_new_tokens
        starts = [0] + [i for i, t in enumerate(turns) if t.role == "user" and i > 0] + [len(turns)]

        def fits(j: int) -> bool:
            try:
                return len(self._encode(self._render(turns[starts[j]:], add_generation_prompt=False))) <= budget
            except TemplateTooLarge:  # megabytes of text fit no context
                return False

        ok, step = len(starts) - 1, 1  # the empty window always "fits"
        while ok > 0 and fits(max(0, ok - step)):
            ok, step = max(0, ok - step), step * 2
        if ok == 0:
            return 0
        bad = max(0, ok - step)  # fits(bad) is False
        while ok - bad > 1:
            mid = (ok + bad) // 2
            ok, bad = (mid, bad) if fits(mid) else (ok, mid)
        return starts[ok]

    # ------------------------------------------------------------------------- internals

    def _answer(self, turns: list[Turn], replaced: Turn | None = None) -> Reply:
        text, ids, start = self._fit(turns)
        dropped = start > min(self.window, len(turns) - 1)
        reply = Reply(self.llm, ids, self.settings.params(self.stop),
                      on_done=lambda r: self._finish(r, replaced), sched=self._engine())
        # Committed only now: a prompt that cannot run leaves the conversation as it was.
        self.window, self.turns, self.last_prompt, self.last_reply = start, turns, text, reply
        if dropped and not self.dropped_notice_shown:
            self.dropped_notice_shown = True
            self.notify(f"the conversation is longer than the model's {self.context_length:,}-token context "
                        f"(with {self.settings.max_new_tokens} tokens kept for the reply), so the oldest "
                        "messages are left out from now on; the system text stays (/stats counts them)")
        return reply

    def _finish(self, reply: Reply, replaced: Turn | None) -> None:
        self.total_processed += reply.stats.processed_tokens
        if reply.finish_reason == "interrupted":
            # Stopped anywhere, even inside a forward pass or the scheduler's bookkeeping: start
            # the next turn from a clean engine and cache.
            self._sched = None
        content = reply.text.strip()
        blocked = bool(content) and self._screen_output(reply)
        if not blocked and (content or reply.finish_reason != "interrupted"):
            self.turns.append(Turn("assistant", content))
        elif replaced is not None:
            self.turns.append(replaced)  # a retry stopped before any text, or blocked: the old reply stays
        else:
            self.turns.pop()  # stopped before any text, or blocked: as if the message had not been sent

    def _screen_input(self, text: str) -> Refusal | None:
        if self.moderator is None:
            return None
        verdict = self.last_checks["input"] = self.moderator.check(text)
        self.last_checks.pop("output", None)
        return Refusal(self.moderator.refusal, verdict) if verdict.blocked else None

    def _screen_output(self, reply: Reply) -> bool:
        """Check an ended reply (a stopped one too: its text is shown); True if it was blocked, in
        which case its text is now the refusal and its finish_reason "content_filter"."""
        if self.moderator is None or not reply.text.strip():
            return False
        verdict = self.last_checks["output"] = self.moderator.check(reply.text.strip())
        reply.moderation = ("output", verdict)
        if verdict.blocked:
            reply.text, reply.finish_reason = self.moderator.refusal, "content_filter"
        return verdict.blocked

    def _fit(self, turns: list[Turn]) -> tuple[str, list[int], int]:
        """(text, ids, first turn in the window) of the prompt answering `turns[-1]`: the oldest
        turns leave first, then retrieved passages (last first); the question never does."""
        ctx, budget_new = self.context_length, self.settings.max_new_tokens
        budget = ctx - budget_new
        if budget <= 0:
            raise KakiError(f"max_new_tokens {budget_new:,} leaves no room for a prompt in the model's "
                            f"{ctx:,}-token context; /set max_new_tokens {max(1, ctx // 4)}")
        question = turns[-1]
        start = min(self.window, len(turns) - 1)
        while True:
            text = self._render(turns[start:])
            ids = self._encode(text)
            if len(ids) <= budget:
                return text, ids, start
            if start < len(turns) - 1:
                start += 1
                while start < len(turns) - 1 and turns[start].role != "user":
                    start += 1  # a window starts with a user message
            elif question.passages:
                question.passages = question.passages[:-1]
            else:
                what = "with the system text, " if self.system else ""
                raise KakiError(f"this message is {len(ids):,} tokens ({what}in the chat format) but only "
                                f"{budget:,} fit: the model's context is {ctx:,} and {budget_new:,} are kept "
                                "for the reply; shorten it, or /set max_new_tokens lower")

    def _render(self, turns: list[Turn], add_generation_prompt: bool = True) -> str:
        """The prompt text; retrieved passages only in the user turn being answered (the last)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += [{"role": t.role, "content": t.content} for t in turns]
        if add_generation_prompt and turns[-1].passages:
            msgs[-1]["content"] = with_context(turns[-1].content, turns[-1].passages)
        return self.fmt.render(msgs, add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text, add_bos=self.fmt.add_bos)


def read_json_file(path: Path, limit: int):
    """A JSON file of at most `limit` bytes, or a KakiError saying why not. Anything but a regular
    file is refused before it is read (a FIFO or /dev/zero would block or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KakiError(f"{path} does not exist") from None
    except OSError as e:
        raise KakiError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KakiError(f"{path} is not a regular file; /load reads a JSON file, such as one /save wrote")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise KakiError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise KakiError(f"{path} is over {limit / 2**20:g} MB, more than any conversation kaki can load")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise KakiError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except ValueError as e:
        raise KakiError(f"{path} is not a JSON conversation ({e})") from None
    except RecursionError:
        raise KakiError(f"{path} is not a JSON conversation (nested too deeply)") from None
