"""The browser chat page at `/` of `kaki serve`, and `GET /info`, the model facts it shows.

The page is three static files shipped in the package (kaki/serve/web: no build step, no CDN); it
talks to the server only through `/info` and `/v1/chat/completions` (streamed), on its own origin.
Its files are reachable without the API key (they hold no data; the page asks for the key and sends
it on every request it makes); `/info` is protected like every other route.

FastAPI's own /docs and /redoc stay off: their pages load Swagger UI and ReDoc from a CDN, and kaki
ships neither, so they would be dead links on an offline machine. /openapi.json still answers.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

WEB = Path(__file__).parent / "web"
# name -> media type: the only files served, so no path from a request ever reaches the filesystem.
FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
OPEN_PATHS = ("/", *(f"/web/{name}" for name in FILES))  # app.py lets these through without a key
# Defense in depth behind the page's rule of never inserting model text as HTML: no inline script,
# and nothing (scripts, styles, images, fetches) from any origin but this server's.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# The page's files change with kaki's version: revalidate rather than keep a stale copy.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# What /v1/chat/completions uses for a field neither the request nor the model's
# generation_config.json sets (OpenAI's defaults; see openai_api._sampling).
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8",
                        headers={**HEADERS, "Content-Security-Policy": CSP})


@router.get("/web/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    if name not in FILES:
        raise HTTPException(404)  # the app's 404 handler answers in kaki's JSON error shape
    return FileResponse(WEB / name, media_type=FILES[name], headers=HEADERS)


@router.get("/info")
async def info(request: Request) -> dict:
    """The model's name and context, the sampling defaults a chat request gets, and which of
    retrieval and moderation are on."""
    engine = request.app.state.engine  # a kaki.serve.client.EngineClient
    gen = engine.defaults
    state = request.app.state
    return {
        "model": engine.model_name,
        "context_length": engine.max_seq_len,  # prompt + reply tokens per request on this server
        "model_context_length": engine.context_length,
        "chat_format": state.chat_format.name,
        # max_tokens: the model's suggested reply length (generation_config.json max_new_tokens),
        # which the page sends when its field is empty, as `kaki chat` uses it; a request without
        # max_tokens may fill the rest of the context (None: the model suggests nothing).
        "defaults": {**{k: gen.get(k, v) for k, v in OPENAI_DEFAULTS.items()},
                     "max_tokens": gen.get("max_new_tokens"), "seed": None},
        "retrieval": {"enabled": state.retriever is not None, "k": state.retrieval_k},
        "moderation": state.moderator is not None,
    }
