"""Adept's routes, `PUT /api` and `GET /healthz`, as adept-inference's server answers them.

Same request fields, defaults and response keys. On purpose, and documented in docs/serve.md:
validation errors are HTTP 400 with a JSON body naming the field (the original answered most with
200 and a bare string); several prompts per request work and run batched; `no_log` works (no log
line at all, instead of a 500); concurrent requests are safe; the end-of-text token is not
spelled out in `text`/`generations`; `human_readable_tokens` are the tokens actually sampled (the
original re-encoded the generated text, which can split it differently).

With `--moderation`, each prompt and each generation is screened (kaki.serve.screen). A blocked
prompt is not run; a blocked prompt or generation gets the moderator's refusal as its generation
(after a space, as a reply would start), no `human_readable_tokens` and no `logprobs`, and the
response gains `moderation`: per prompt, the check that decided it.
"""

from __future__ import annotations

import asyncio
import re
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from loguru import logger

from kaki.errors import ParamError
from kaki.sampling import SamplingParams
from kaki.serve.client import SeqRequest, token_text
from kaki.serve.results import collect
from kaki.serve.schemas import AdeptRequest, AdeptResponse
from kaki.serve.screen import CONTENT_FILTER, Screen

router = APIRouter()
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# exclude_unset: `moderation` appears only when the server moderates; the original's keys stay as they were.
@router.put("/api", response_model=AdeptResponse, response_model_exclude_unset=True)
async def generate(body: AdeptRequest, request: Request) -> AdeptResponse:
    engine = request.app.state.engine
    tok = engine.tokenizer
    started = time.perf_counter()
    if body.add_BOS and tok.bos_id is None:
        raise ParamError("add_BOS", "add_BOS is true but this model's tokenizer has no BOS token")
    # In a worker thread: a long prompt must not stall the event loop.
    prompt_ids = await asyncio.to_thread(lambda: [tok.encode(p, add_bos=body.add_BOS) for p in body.prompts])
    screen = Screen(request.app, log=not body.no_log)
    reqs, run = [], []
    for k, ids in enumerate(prompt_ids):
        if not ids:
            raise ParamError("prompts", "Empty prompts require add_BOS=true")
        # As the original: a prompt that leaves less room than asked generates what fits.
        max_new = engine.fit(len(ids), body.tokens_to_generate, field="tokens_to_generate", cap=True,
                            prompt_field="prompts")
        params = SamplingParams(
            max_new_tokens=max_new, temperature=body.temperature, top_k=body.top_k,
            top_p=body.top_p if body.top_p > 0 else 1.0,  # Adept's 0 means off; kaki's off is 1
            seed=None if body.random_seed == -1 else body.random_seed,
            logprobs=body.logprobs, prompt_logprobs=body.logprobs, speculate=None if body.speculate else "off")
        screen.decided[k] = decided = await screen.check_input([body.prompts[k]])
        if decided is None or not decided.blocked:
            run.append(k)
            reqs.append(SeqRequest(ids, params))
    handle = engine.submit(reqs, asyncio.get_running_loop(), field="prompts") if reqs else None
    results = dict(zip(run, await collect(handle, len(reqs), request.receive))) if handle else {}

    scoring = body.tokens_to_generate == 0
    text, generations, readable, logprobs = [], [], [], []
    for i, ids in enumerate(prompt_ids):
        r = results.get(i)
        if r is not None and not scoring:
            await screen.check_result(i, r)
        if r is None or r.finish_reason == CONTENT_FILTER:
            prompt = tok.decode(ids)
            refusal = ("" if not prompt or prompt[-1].isspace() else " ") + screen.moderator.refusal
            text.append(prompt + ("" if scoring else refusal))
            if not scoring:
                generations.append(refusal.removeprefix(" "))
                readable.append([])
            if body.logprobs:
                logprobs.append([])
            continue
        text.append(tok.decode(ids + r.token_ids))
        if not scoring:
            # The original decoded a generation on its own, and sentencepiece drops the space
            # that starts it (the one after `adept:`); `text` keeps it, between prompt and reply.
            generations.append(tok.decode(r.token_ids).removeprefix(" "))
            readable.append(_readable_tokens(tok, ids, r.token_ids))
        if body.logprobs:
            # Entry j is the logprob of token j+1 given the ones before it: prompt, then reply.
            prompt_lp = handle.prompt_logprobs[run.index(i)] or [None]
            logprobs.append([float(x) for x in prompt_lp[1:]] + r.logprobs)
    if not body.no_log:
        logger.info(f"PUT /api from {request.client.host if request.client else '?'}: {len(reqs)} prompt(s), "
                    f"{sum(len(r.token_ids) for r in results.values())} tokens in {time.perf_counter() - started:.2f}s")
    extra = {"moderation": [screen.decided[i] for i in range(len(prompt_ids))]} if screen.moderator else {}
    return AdeptResponse(text=text, generations=generations, human_readable_tokens=readable,
                         logprobs=logprobs if body.logprobs else None, **extra)


def _readable_tokens(tok, prompt_ids: list[int], ids: list[int]) -> list[str]:
    """Each generated token as text; the first one without its leading space (the original
    dropped the first piece's `▁`). Byte-fallback pieces show as themselves, `<0x0A>`, as in the
    original, and so does any token that is only part of a character."""
    out = []
    ctx = prompt_ids[-3:]
    for t in ids:
        piece = tok.id_to_piece(t)
        text = piece if _BYTE_PIECE.fullmatch(piece) else token_text(tok, ctx, t)
        out.append(piece if "\ufffd" in text else text)
        ctx = (ctx + [t])[-3:]
    if out and out[0].startswith(" "):
        out[0] = out[0][1:]
    # A first token that was only that space, and the end-of-text token (not spelled out in
    # `generations` either), show nothing: they are left out rather than listed as "".
    while out and out[0] == "":
        out.pop(0)
    while out and out[-1] == "":
        out.pop()
    return out


@router.get("/healthz")
async def healthz(request: Request):
    ok = request.app.state.engine.running
    return JSONResponse({"success": ok}, status_code=200 if ok else 503)
