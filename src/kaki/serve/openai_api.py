"""OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

Prompts are encoded with the tokenizer's own BOS rule (`add_bos_token`); chat messages are
rendered with the server's chat format (`--chat-format`, see kaki.chat_format), whose stop strings
are added to the request's. With `n` > 1 and a `seed`, choice j samples with seed + j, so the
choices differ and each is reproducible (seeds wrap at 2**64). Tokenizing and rendering the chat
template run in worker threads, so a huge prompt never stalls the event loop (other requests,
/health). `stream: true` answers with server-sent events ending in
`data: [DONE]`; a client that disconnects aborts its sequences.

With `--moderation` (kaki.serve.screen): a blocked prompt or message (any role) gets choices with
finish_reason "content_filter" and no text, and the model does not run for it; a blocked reply is
emptied the same way. Every choice says what decided it in `moderation`; streamed replies arrive
only once they have been checked.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kaki.errors import KakiError, ParamError
from kaki.sampling import SamplingParams
from kaki.serve import schemas as S
from kaki.serve.client import EngineClient, Output, SeqRequest
from kaki.serve.results import SSE_DONE, SeqResult, collect, sse
from kaki.serve.screen import CONTENT_FILTER, Screen

router = APIRouter(prefix="/v1")
# Reply tokens kept free when a --retrieval request gives no max_tokens (passages fill the rest).
RETRIEVAL_REPLY_TOKENS = 256


class ModelNotFound(KakiError):
    pass


def _check_model(engine: EngineClient, name: str | None) -> None:
    if name and name != engine.model_name:
        shown = name if len(name) <= 200 else name[:200] + "..."  # a 16 MB name is not echoed back
        raise ModelNotFound(f"The model `{shown}` does not exist; this server serves `{engine.model_name}` "
                            "(see GET /v1/models)")


def _sampling(body, engine: EngineClient, max_new: int, seed: int | None, **extra) -> SamplingParams:
    """Request fields over the model's generation_config.json defaults over OpenAI's defaults."""
    defaults = engine.defaults
    pick = lambda value, key, default: value if value is not None else defaults.get(key, default)  # noqa: E731
    top_k = pick(body.top_k, "top_k", 0)
    return SamplingParams(
        max_new_tokens=max_new, temperature=pick(body.temperature, "temperature", 1.0),
        top_p=pick(body.top_p, "top_p", 1.0), top_k=max(top_k, 0),
        repetition_penalty=pick(body.repetition_penalty, "repetition_penalty", 1.0),
        seed=seed, stop=list(body.stop or []) + extra.pop("stop", []),
        # A set: the engine tests every new token against it.
        stop_token_ids=frozenset(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
        speculate=None if body.speculate else "off", **extra)


def _seed(body, j: int) -> int | None:
    # Wrapped, so seed 2**64-1 with n > 1 stays inside torch.Generator's range.
    return None if body.seed is None else (body.seed + j) % (S.MAX_SEED + 1)


def _ids(engine: EngineClient, prompt, add_bos=None) -> list[int]:
    return engine.encode(prompt, add_bos=add_bos)


def _usage(prompt_lens: list[int], completion: int) -> S.Usage:
    p = sum(prompt_lens)
    return S.Usage(prompt_tokens=p, completion_tokens=completion, total_tokens=p + completion)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------- completions

@router.post("/completions", response_model=S.CompletionResponse)
async def completions(body: S.CompletionRequest, request: Request):
    engine: EngineClient = request.app.state.engine
    _check_model(engine, body.model)
    prompts = body.prompts()

    def tokenize():
        ids = [_ids(engine, p) for p in prompts]
        return ids, [p if isinstance(p, str) else engine.tokenizer.decode(i) for p, i in zip(prompts, ids)]
    prompt_ids, texts = await asyncio.to_thread(tokenize)
    screen = Screen(request.app)
    reqs, choice_of, refused, echo = [], [], [], []
    for k, ids in enumerate(prompt_ids):
        max_new = engine.fit(len(ids), body.max_tokens, field="max_tokens")
        decided = await screen.check_input([texts[k]])
        for j in range(body.n):
            i = k * body.n + j
            screen.decided[i] = decided
            echo.append(texts[k] if body.echo and not (decided and decided.blocked) else "")
            if decided and decided.blocked:
                refused.append(i)
                continue
            choice_of.append(i)
            reqs.append(SeqRequest(ids, _sampling(body, engine, max_new, _seed(body, j),
                                                  logprobs=body.logprobs is not None,
                                                  top_logprobs=body.logprobs or 0)))
    handle = engine.submit(reqs, asyncio.get_running_loop()) if reqs else None
    rid, created = _new_id("cmpl"), int(time.time())
    lens = [len(ids) for ids in prompt_ids]
    if body.stream:
        outputs = screen.outputs(handle, choice_of, refused)
        return _stream(handle, _completion_chunks(outputs, screen, rid, created, engine.model_name, body, echo,
                                                  lens))
    results = await collect(handle, len(reqs), request.receive) if handle else []
    by_choice = {i: SeqResult(finish_reason=CONTENT_FILTER) for i in refused}
    for i, r in zip(choice_of, results):
        await screen.check_result(i, r)
        by_choice[i] = r
    choices = []
    for i in range(len(echo)):
        r, lp = by_choice[i], None
        if body.logprobs is not None and r.finish_reason != CONTENT_FILTER:
            lp = _completion_logprobs(r.token_texts, r.logprobs, r.tops if body.logprobs else None, len(echo[i]))
        choices.append(S.CompletionChoice(index=i, text=echo[i] + r.text, logprobs=lp, finish_reason=r.finish_reason,
                                          moderation=screen.decided.get(i)))
    return S.CompletionResponse(id=rid, created=created, model=engine.model_name, choices=choices,
                                usage=_usage(lens, sum(len(r.token_ids) for r in results)))


def _completion_logprobs(texts, logprobs, tops, offset: int) -> S.CompletionLogprobs:
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return S.CompletionLogprobs(tokens=list(texts), token_logprobs=list(logprobs),
                                top_logprobs=[dict(t) for t in tops] if tops is not None else None,
                                text_offset=offsets)


async def _completion_chunks(outputs, screen, rid, created, model, body, echo, lens):
    offsets = [len(e) for e in echo]
    if any(echo):
        yield sse(S.CompletionResponse(id=rid, created=created, model=model, choices=[
            S.CompletionChoice(index=i, text=e) for i, e in enumerate(echo) if e]))
    generated = 0
    async for i, out in outputs:
        if out.finish_reason in ("abort", "error"):
            yield _error_event(out)
            continue
        generated += out.token_id is not None
        lp = None
        if body.logprobs is not None and out.logprob is not None:
            lp = _completion_logprobs([out.token_text or ""], [out.logprob],
                                      [out.top or []] if body.logprobs else None, offsets[i])
            offsets[i] += len(out.token_text or "")
        if out.text or lp is not None or out.finish_reason is not None:
            yield sse(S.CompletionResponse(id=rid, created=created, model=model, choices=[
                S.CompletionChoice(index=i, text=out.text, logprobs=lp, finish_reason=out.finish_reason,
                                   moderation=screen.decided.get(i) if out.finish_reason else None)]))
    if body.stream_options and body.stream_options.include_usage:
        yield sse(S.CompletionResponse(id=rid, created=created, model=model, choices=[],
                                       usage=_usage(lens, generated)))


# ----------------------------------------------------------------------------- chat

@router.post("/chat/completions", response_model=S.ChatCompletionResponse)
async def chat_completions(body: S.ChatCompletionRequest, request: Request):
    engine: EngineClient = request.app.state.engine
    _check_model(engine, body.model)
    fmt = request.app.state.chat_format
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    screen = Screen(request.app)
    # Every message, whatever its role: the whole history (system and assistant turns included)
    # is the client's to send, so any of it could carry what a user message may not (the
    # moderator remembers verdicts, so a conversation's earlier turns cost nothing again).
    decided = await screen.check_input(m["content"] for m in messages)
    blocked = decided is not None and decided.blocked
    sources = None
    if request.app.state.retriever is not None and body.retrieval and not blocked:
        # In a worker thread: the search (SQLite, the query embedder) must not block the event loop.
        messages, sources = await asyncio.to_thread(_ground, request.app, engine, fmt, messages, body.max_new)
    ids = await asyncio.to_thread(_render, engine, fmt, messages)
    max_new = engine.fit(len(ids), body.max_new, field="max_completion_tokens"
                         if body.max_completion_tokens is not None else "max_tokens", prompt_field="messages")
    top = body.top_logprobs or 0
    reqs = [SeqRequest(ids, _sampling(body, engine, max_new, _seed(body, j), stop=list(fmt.stop),
                                      logprobs=body.logprobs, top_logprobs=top))
            for j in range(body.n)]
    screen.decided.update({j: decided for j in range(body.n)})
    handle = None if blocked else engine.submit(reqs, asyncio.get_running_loop())
    rid, created = _new_id("chatcmpl"), int(time.time())
    if body.stream:
        outputs = screen.outputs(handle, refused=range(body.n) if blocked else ())
        return _stream(handle, _chat_chunks(outputs, screen, rid, created, engine.model_name, body, len(ids),
                                            sources, fmt.reply_lead))
    if blocked:
        results = [SeqResult(finish_reason=CONTENT_FILTER) for _ in reqs]
    else:
        results = await collect(handle, len(reqs), request.receive)
    for i, r in enumerate(results):
        await screen.check_result(i, r)
    choices = [S.ChatChoice(index=i, message=S.AssistantMessage(content=r.text.removeprefix(fmt.reply_lead)),
                            finish_reason=r.finish_reason,
                            logprobs=_chat_logprobs(r.token_texts, r.logprobs, r.tops)
                            if body.logprobs and r.finish_reason != CONTENT_FILTER else None,
                            moderation=screen.decided.get(i))
               for i, r in enumerate(results)]
    return S.ChatCompletionResponse(id=rid, created=created, model=engine.model_name, choices=choices,
                                    usage=_usage([len(ids)], sum(len(r.token_ids) for r in results)),
                                    sources=sources)


def _render(engine: EngineClient, fmt, messages: list[dict]) -> list[int]:
    """The prompt's token ids (run in a worker thread: templates and tokenizing take time)."""
    try:
        text = fmt.render(messages, add_generation_prompt=True)
    except KakiError as e:
        raise ParamError("messages", str(e)) from None
    return _ids(engine, text, add_bos=fmt.add_bos)


def _ground(app, engine: EngineClient, fmt, messages: list[dict], max_new: int | None) -> tuple[list[dict], list[dict]]:
    """The messages with retrieved passages in the last user turn, and those passages: as many
    as fit beside the reply (`max_tokens`, else RETRIEVAL_REPLY_TOKENS kept for it)."""
    # Here, not at the top: kaki.retrieval imports numpy (the retrieval extra), and a server
    # started without --retrieval runs with the serve extra alone.
    from kaki.retrieval import ground
    tok = engine.tokenizer
    reserve = max_new if max_new is not None else min(RETRIEVAL_REPLY_TOKENS, engine.max_seq_len // 2)
    try:
        g = ground(app.state.retriever, messages, fmt=fmt, count_tokens=lambda s: len(tok.encode(s, add_bos=False)),
                   max_prompt_tokens=engine.max_seq_len - reserve, k=app.state.retrieval_k)
    except KakiError as e:
        raise ParamError("messages", str(e)) from None
    return g.messages, [p.to_json() for p in g.passages]


def _top(text: str, lp: float) -> S.TopLogprob:
    return S.TopLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))


def _chat_logprobs(texts, logprobs, tops) -> S.ChatLogprobs:
    return S.ChatLogprobs(content=[
        S.TokenLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8")), top_logprobs=[_top(*a) for a in top])
        for t, lp, top in zip(texts, logprobs, tops)])


async def _chat_chunks(outputs, screen, rid, created, model, body, n_prompt, sources=None, lead=""):
    """SSE chunks of a chat completion; each choice's content without the format's `lead` (the
    space after `adept:`), as the whole-response form gives it."""
    def chunk(i, delta, finish=None, logprobs=None, sources=None):
        return sse(S.ChatCompletionChunk(id=rid, created=created, model=model, sources=sources, choices=[
            S.ChatChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=logprobs,
                              moderation=screen.decided.get(i) if finish else None)]))

    for i in range(body.n):
        yield chunk(i, S.Delta(role="assistant", content=""), sources=sources)
    generated = 0
    leading = {i: lead for i in range(body.n)}  # what is still to strip from each choice's start
    async for i, out in outputs:
        if out.finish_reason in ("abort", "error"):
            yield _error_event(out)
            continue
        generated += out.token_id is not None
        lp = None
        if body.logprobs and out.logprob is not None:
            lp = _chat_logprobs([out.token_text or ""], [out.logprob], [out.top or []])
        text = out.text
        if leading[i] and text:
            text, leading[i] = text.removeprefix(leading[i]), ""
        if text or lp is not None:
            yield chunk(i, S.Delta(content=text), logprobs=lp)
        if out.finish_reason is not None:
            yield chunk(i, S.Delta(), finish=out.finish_reason)
    if body.stream_options and body.stream_options.include_usage:
        yield sse(S.ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                        usage=_usage([n_prompt], generated)))


# ----------------------------------------------------------------------------- shared

def _error_event(out: Output) -> str:
    return sse(S.error_body(out.error or "generation was stopped", kind="server_error"))


def _stream(handle, events) -> StreamingResponse:
    """SSE over the engine's outputs; the stream always ends with [DONE]. When the client goes
    away, Starlette cancels this generator and `finally` aborts the sequences."""

    async def body():
        try:
            async for event in events:
                yield event
            yield SSE_DONE
        finally:
            if handle is not None:  # None: moderation refused the request before the model ran
                handle.abort()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/models", response_model=S.ModelList)
async def models(request: Request) -> S.ModelList:
    engine: EngineClient = request.app.state.engine
    return S.ModelList(data=[S.ModelCard(id=engine.model_name, created=request.app.state.started,
                                         max_model_len=engine.max_seq_len)])
