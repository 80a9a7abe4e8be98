"""`create_app(engine)`: the FastAPI app around an engine client (kaki.serve.client.EngineClient:
the real kaki.serve.engine.Engine, or a test's fake). Thin: routes live in adept_api and
openai_api, bodies in schemas; this module wires them up and maps errors to HTTP.

Errors: every answer that is not a 200 has `{"error": {"message", "type", "param", "code"}}`, on
every route: a bad field (or a body that is not UTF-8 JSON) is 400 naming it; a body over
`max_body_mb` 413; an unknown route 404, a wrong method 405; a full queue or a stopping engine 503
with Retry-After; a wrong API key 401; an engine failure, or any bug, 500 (the connection stays
open). With an API key, every route but /health and /healthz needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger
from starlette.exceptions import HTTPException

from kaki.errors import KakiError, ParamError
from kaki.serve import adept_api, openai_api, page
from kaki.serve.client import EngineClient, EngineStopped, QueueFull
from kaki.serve.metrics import CONTENT_TYPE_LATEST
from kaki.serve.results import ClientGone, EngineFailure
from kaki.serve.schemas import error_body, json_error

OPEN_ROUTES = ("/health", "/healthz", *page.OPEN_PATHS)  # no API key needed (load balancers, the chat page's files)
# A request body larger than this is refused (413) before it is read whole: bodies are parsed as
# JSON on the event loop, so size is what bounds the work one request can cost before validation.
DEFAULT_MAX_BODY_MB = 16


def create_app(engine: EngineClient, *, api_key: str | None = None, chat_format: str = "auto",
               retriever=None, retrieval_k: int = 3, moderator=None,
               max_body_mb: float = DEFAULT_MAX_BODY_MB) -> FastAPI:
    """moderator: a kaki.moderation.Moderator that screens prompts and replies (kaki.serve.screen);
    max_body_mb: the largest request body accepted (`kaki serve --max-body-mb`)."""
    fmt = engine.chat_format(chat_format)  # a bad --chat-format fails here, at start-up

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            # uvicorn has already waited for in-flight requests (--graceful-timeout); anything
            # still queued or running now ends with a clean error instead of hanging.
            engine.shutdown()

    app = FastAPI(title="kaki serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.chat_format = fmt
    app.state.retriever, app.state.retrieval_k = retriever, retrieval_k  # kaki.retrieval.Retriever or None
    app.state.moderator = moderator
    app.state.started = int(time.time())
    app.include_router(adept_api.router)
    app.include_router(openai_api.router)
    app.include_router(page.router)

    @app.get("/health")
    async def health():
        if engine.running:
            return {"status": "ok", **engine.stats()}
        return JSONResponse({"status": "unavailable", "error": engine.error}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _add_error_handlers(app)
    app.add_middleware(_Guard, metrics=engine.metrics, api_key=api_key, max_body=int(max_body_mb * 2**20))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        field, message = _describe(exc.errors())
        return JSONResponse(error_body(message, field), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        # Starlette's own answers (no route, wrong method, a body FastAPI could not parse) in the
        # same shape as kaki's, rather than `{"detail": ...}`.
        param = None
        if exc.status_code == 404:
            message, code = f"Invalid URL ({request.method} {request.url.path}); see docs/serve.md", "not_found"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path} (use {allowed or 'another method'})"
            code = "method_not_allowed"
        elif exc.status_code == 400:  # FastAPI read the body but json.loads failed
            message, param, code = json_error(exc.__cause__), "body", None
        else:
            message, code = str(exc.detail), None
        return JSONResponse(error_body(message, param, code=code), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(ParamError)
    async def bad_param(request: Request, exc: ParamError):
        return JSONResponse(error_body(_with_field(exc.field, exc.message), exc.field), status_code=400)

    @app.exception_handler(openai_api.ModelNotFound)
    async def no_model(request: Request, exc: openai_api.ModelNotFound):
        return JSONResponse(error_body(str(exc), "model", code="model_not_found"), status_code=404)

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull):
        return JSONResponse(error_body(str(exc), kind="server_overloaded"), status_code=503,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(EngineStopped)
    async def stopping(request: Request, exc: EngineStopped):
        return JSONResponse(error_body(str(exc), kind="server_unavailable"), status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(KakiError)
    async def user_error(request: Request, exc: KakiError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(EngineFailure)
    async def failed(request: Request, exc: EngineFailure):
        return JSONResponse(error_body(f"generation failed: {exc}", kind="server_error"), status_code=500)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed"


def _with_field(field: str, message: str) -> str:
    return message if message.startswith(field) else f"{field}: {message}"


def _describe(errors) -> tuple[str, str]:
    """(field, message) of the first validation error; a ParamError raised in a validator names
    its field itself."""
    if not errors:
        return "body", "the request body is not valid"
    e = errors[0]
    # A union (`content: str | list[...]`) fails once per member; the member whose type matched
    # says what was really wrong (e.g. a list over its cap), not "Input should be a valid string".
    same = [x for x in errors if x.get("loc", ())[:3] == e.get("loc", ())[:3]]
    e = next((x for x in same if not str(x.get("type", "")).endswith("_type")), e)
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):
        return cause.field, _with_field(cause.field, cause.message)
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # Union members show up as type names in the location ("prompt", "list[str]", 1): drop them.
    loc = [x for x in loc if "[" not in x and x not in ("str", "int", "float", "bool", "function-after")]
    field = loc[0] if loc else "body"
    path = ".".join(loc) if loc else "body"
    if e.get("type") == "json_invalid":
        return "body", "the request body is not valid JSON"
    if e.get("type") == "missing":
        return field, f"{path}: this field is required"
    if e.get("type") == "too_long":
        ctx = e.get("ctx") or {}
        return field, f"{path}: has {ctx.get('actual_length')} items; at most {ctx.get('max_length')} are allowed"
    return field, f"{path}: {e.get('msg', 'is not valid')}"


class _Guard:
    """ASGI middleware: the API key check, the body size limit, the per-route request counter, and
    the last word on errors. (Plain ASGI rather than BaseHTTPMiddleware, so streamed responses and
    disconnects pass straight through.)

    The body is read here, counting bytes, and handed on whole: a declared Content-Length over the
    limit is refused before anything is read, a chunked body as soon as it passes the limit, and
    the 413 closes the connection so the rest is never read. An exception no handler turned into
    an answer becomes a JSON 500 here, so the connection stays open (uvicorn would drop it)."""

    def __init__(self, app, metrics, api_key: str | None, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500, "started": False}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            if self.expected is not None and scope["path"] not in OPEN_ROUTES:
                got = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(got, self.expected):
                    body = error_body("missing or wrong API key: send `Authorization: Bearer KEY` with the key "
                                      "given to `kaki serve` ($KAKI_API_KEY or --api-key-file)",
                                      kind="authentication_error", code="invalid_api_key")
                    return await JSONResponse(body, status_code=401)(scope, receive, send_status)
            body = await self._read_body(scope, receive)
            if body is None:
                mb = self.max_body / 2**20
                error = error_body(f"the request body is over {mb:g} MB, this server's limit "
                                   "(`kaki serve --max-body-mb`)", "body", code="request_too_large")
                return await JSONResponse(error, status_code=413, headers={"Connection": "close"})(
                    scope, receive, send_status)
            await self.app(scope, _replay(body, receive), send_status)
        except Exception:
            if status["started"]:
                raise  # mid-response: nothing better to send; uvicorn closes the connection
            logger.exception(f"{scope.get('method')} {scope.get('path')} failed")
            error = error_body("internal error: the server failed on this request (see its log)",
                               kind="server_error")
            await JSONResponse(error, status_code=500)(scope, receive, send_status)
        finally:
            self._count(scope, status["code"])

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole request body, or None when it is over the limit (declared or counted)."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left; the route sees it again
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _count(self, scope, code: int) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "other"  # unmatched paths share one label
        self.metrics.requests.labels(path, str(code)).inc()


def _replay(body: bytes, receive):
    """An ASGI receive that gives `body` as the request's one message, then passes through (so a
    route still hears the client disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()
    return replayed
