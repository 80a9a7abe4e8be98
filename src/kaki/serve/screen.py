"""`kaki serve --moderation`: one request's screening of its prompts and replies.

Checks run in a worker thread (a moderation model's forward pass must not block the event loop);
each verdict is counted in /metrics (`kaki_moderation_checks_total{where, label}`,
`kaki_moderation_blocked_total{where}`) and logged, unless the request asked for no log. What
decided each choice is kept in `decided[i]`, for the response's `moderation` field: the route sets
it to the input's verdict, and a checked reply's verdict replaces it.

Streamed replies are held back: a sequence's outputs are released only once it has ended and its
whole text has passed, so no blocked text ever reaches the client. A blocked sequence's outputs come
through emptied (its tokens still count in `usage`) and its last one ends it with finish_reason
"content_filter".
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import AsyncIterator, Iterable

from loguru import logger

from kaki.serve.client import Output
from kaki.serve.results import SeqResult
from kaki.serve.schemas import Moderation

CONTENT_FILTER = "content_filter"


class Screen:
    def __init__(self, app, log: bool = True):
        self.moderator = app.state.moderator  # kaki.moderation.Moderator or None
        self.metrics = app.state.engine.metrics
        self.log = log
        self.decided: dict[int, Moderation] = {}

    async def check(self, text: str, where: str):
        """The Verdict on `text` (None without --moderation), counted and logged."""
        if self.moderator is None:
            return None
        verdict = await asyncio.to_thread(self.moderator.check, text)
        self.metrics.moderation_checks.labels(where, verdict.label).inc()
        if verdict.blocked:
            self.metrics.moderation_blocked.labels(where).inc()
        if self.log:
            logger.info(f"moderation {where}: {verdict.label} {verdict.score:.3f} "
                        f"{'blocked' if verdict.blocked else 'passed'}")
        return verdict

    async def check_input(self, texts: Iterable[str]) -> Moderation | None:
        """Screen the texts in order up to the first blocked one; returns what decides: that one,
        else the last text's verdict (None without --moderation or without texts)."""
        decided = None
        for text in texts:
            if not text.strip():
                continue  # nothing to judge (and a classifier has no tokens to read)
            verdict = await self.check(text, "input")
            if verdict is not None:
                decided = Moderation(where="input", **verdict.to_json())
                if verdict.blocked:
                    break
        return decided

    async def check_result(self, i: int, r: SeqResult) -> None:
        """Screen choice i's whole reply; a blocked one is emptied in place (its tokens still count)."""
        if self.moderator is None or r.finish_reason in ("abort", "error") or not r.text.strip():
            return
        verdict = await self.check(r.text, "output")
        self.decided[i] = Moderation(where="output", **verdict.to_json())
        if verdict.blocked:
            r.text, r.logprobs, r.token_texts, r.tops = "", [], [], []
            r.finish_reason = CONTENT_FILTER

    async def outputs(self, handle, choice_of: list[int] | None = None,
                      refused: Iterable[int] = ()) -> AsyncIterator[tuple[int, Output]]:
        """(choice index, Output) for a streamed answer: the `refused` choices end at once, then the
        engine's sequences (sequence e is choice `choice_of[e]`), each held until it is checked."""
        for i in refused:
            yield i, Output(finish_reason=CONTENT_FILTER)
        if handle is None:
            return
        held: dict[int, list[Output]] = {}
        async for e, out in handle:
            i = choice_of[e] if choice_of else e
            if self.moderator is None:
                yield i, out
                continue
            if out.finish_reason in ("abort", "error"):
                held.pop(i, None)  # never checked, so never shown
                yield i, out
                continue
            held.setdefault(i, []).append(out)
            if out.finish_reason is None:
                continue
            outs = held.pop(i)
            r = SeqResult()
            for o in outs:
                r.add(o)
            await self.check_result(i, r)
            if r.finish_reason == CONTENT_FILTER:
                outs = [replace(o, text="", logprob=None, token_text=None, top=None, finish_reason=None)
                        for o in outs]
                outs[-1].finish_reason = CONTENT_FILTER
            for o in outs:
                yield i, o
