"""Between an engine Handle and an HTTP response: collecting whole answers (aborting when the client
goes away) and writing server-sent events."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from kaki.serve.client import Handle, Output


class EngineFailure(Exception):
    """A sequence ended with an engine error (HTTP 500)."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class SeqResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    tops: list[list[tuple[str, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    def add(self, out: Output) -> None:
        if out.token_id is not None:
            self.token_ids.append(out.token_id)
        self.text += out.text
        if out.logprob is not None:
            self.logprobs.append(out.logprob)
            self.token_texts.append(out.token_text or "")
            self.tops.append(out.top or [])
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.error = out.error


async def collect(handle: Handle, n: int, receive=None) -> list[SeqResult]:
    """Every sequence's whole result. With the ASGI `receive` of the request, a client that
    disconnects first aborts the sequences (their rows are freed at the next step) and ClientGone
    is raised."""
    results = [SeqResult() for _ in range(n)]

    async def consume():
        async for i, out in handle:
            results[i].add(out)

    task = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_wait_disconnect(receive)) if receive is not None else None
    try:
        waits = {task} | ({watch} if watch else set())
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            raise ClientGone()
        task.result()
    except BaseException:
        handle.abort()
        task.cancel()
        raise
    finally:
        if watch is not None:
            watch.cancel()
    failed = [r.error for r in results if r.finish_reason == "error"]
    if failed:
        raise EngineFailure(failed[0])
    return results


async def _wait_disconnect(receive) -> None:
    # The body has been read, so the next ASGI message is the disconnect (uvicorn blocks till then).
    while (await receive())["type"] != "http.disconnect":
        pass


def sse(obj) -> str:
    """One server-sent event carrying a JSON object (a pydantic model or a dict)."""
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
