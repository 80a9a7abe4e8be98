"""`create_app(engine)`: the FastAPI app around an Engine. Thin: routes live in adept_api and
openai_api, bodies in schemas; this module wires them up and maps errors to HTTP.

Errors: a bad field is 400 with `{"error": {"message", "type", "param", "code"}}` naming it; a
full queue or a stopping engine is 503 with Retry-After; a wrong API key 401; an engine failure
500. With an API key, every route but /health and /healthz needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from kaki.errors import KakiError, ParamError
from kaki.serve import adept_api, openai_api
from kaki.serve.engine import Engine, EngineStopped, QueueFull
from kaki.serve.metrics import CONTENT_TYPE_LATEST
from kaki.serve.results import ClientGone, EngineFailure
from kaki.serve.schemas import error_body

OPEN_ROUTES = ("/health", "/healthz")  # reachable without the API key (load balancers)


def create_app(engine: Engine, *, api_key: str | None = None, chat_format: str = "auto",
               retriever=None, retrieval_k: int = 3, moderator=None) -> FastAPI:
    """moderator: a kaki.moderation.Moderator that screens prompts and replies (kaki.serve.screen)."""
    from kaki.chat_format import format_for_llm

    fmt = format_for_llm(engine.llm, chat_format)  # a bad --chat-format fails here, at start-up

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

    @app.get("/health")
    async def health():
        if engine.running:
            return {"status": "ok", **engine.stats()}
        return JSONResponse({"status": "unavailable", "error": engine.error}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _add_error_handlers(app)
    app.add_middleware(_Guard, metrics=engine.metrics, api_key=api_key)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        field, message = _describe(exc.errors())
        return JSONResponse(error_body(message, field), status_code=400)

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
    return field, f"{path}: {e.get('msg', 'is not valid')}"


class _Guard:
    """ASGI middleware: the API key check and the per-route request counter. (Plain ASGI rather
    than BaseHTTPMiddleware, so streamed responses and disconnects pass straight through.)"""

    def __init__(self, app, metrics, api_key: str | None):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if self.expected is not None and scope["path"] not in OPEN_ROUTES:
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(got, self.expected):
                body = error_body("missing or wrong API key: send `Authorization: Bearer KEY` with the key "
                                  "given to `kaki serve --api-key` (or $KAKI_API_KEY)",
                                  kind="authentication_error", code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send_status)
                self._count(scope, status["code"])
                return
        try:
            await self.app(scope, receive, send_status)
        finally:
            self._count(scope, status["code"])

    def _count(self, scope, code: int) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "other"  # unmatched paths share one label
        self.metrics.requests.labels(path, str(code)).inc()
