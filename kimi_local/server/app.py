"""The FastAPI application: ``create_app(settings)``.

Routes come from ``openai_routes`` and ``anthropic_routes``; this module adds what wraps them all:
API-key checks, the request-body size limit, error bodies shaped per API for failures outside the routes
(404, 405), ``/health`` and ``/metrics``.  Inside the routes, ``errors.ErrorHandlingRoute`` answers whatever
a handler raises, so an internal error becomes a logged 500 with an error body and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from typing import Any, Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimi_local.server import anthropic_routes, openai_routes
from kimi_local.server.errors import APIError, ErrorHandlingRoute, error_body, error_response, is_anthropic_path
from kimi_local.server.runtime import ServerState
from kimi_local.server.settings import ServerSettings

log = logging.getLogger("kimi_local.server")


def _key_matches(given: Optional[str], key: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def _bearer(request: Request) -> Optional[str]:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def openai_auth(request: Request) -> None:
    key = request.app.state.kimi.settings.api_key
    if key and not _key_matches(_bearer(request), key):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def anthropic_auth(request: Request) -> None:
    """Claude Code sends ``x-api-key`` (ANTHROPIC_API_KEY) or a bearer token (ANTHROPIC_AUTH_TOKEN)."""
    key = request.app.state.kimi.settings.api_key
    if key and not (_key_matches(request.headers.get("x-api-key"), key) or _key_matches(_bearer(request), key)):
        raise APIError(401, "invalid or missing API key: send 'x-api-key: <key>'")


class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413 before any handler runs (checks Content-Length,
    and counts chunked bodies too)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await self._reject(send, 400, "invalid Content-Length header", path)
            if declared > self.limit:
                return await self._reject(send, 413, self._message(declared), path)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await self._reject(send, 413, self._message(size, at_least=True), path)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        return (f"request body is {'over ' if at_least else ''}{size} bytes; the limit is {self.limit} bytes "
                f"(--max-body-mb)")

    @staticmethod
    async def _reject(send: Callable, status: int, message: str, path: str) -> None:
        await JSONResponse(error_body(status, message, is_anthropic_path(path)), status_code=status)(
            {"type": "http"}, None, send)


def create_app(settings: Optional[ServerSettings] = None, *, engine: Any = None,
               model_dir: Optional[str] = None) -> FastAPI:
    """Build the app.  With ``engine`` it serves at once; otherwise ``/health`` answers 503 until
    ``app.state.kimi.set_engine(...)`` (see ``main.run``, which loads in a background thread)."""
    settings = settings or ServerSettings()
    state = ServerState(settings)
    if engine is not None:
        state.set_engine(engine, model_dir)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        state.shutdown()

    app = FastAPI(title="kimi-local", description="OpenAI- and Anthropic-compatible API for Kimi-K2",
                  version=_version(), lifespan=lifespan)
    app.state.kimi = state
    app.router.route_class = ErrorHandlingRoute

    oa = APIRouter(route_class=ErrorHandlingRoute, dependencies=[Depends(openai_auth)])
    oa.include_router(openai_routes.router)
    an = APIRouter(route_class=ErrorHandlingRoute, dependencies=[Depends(anthropic_auth)])
    an.include_router(anthropic_routes.router)
    app.include_router(oa)
    app.include_router(an)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is not None:
            return JSONResponse({"status": "ok"})
        if state.load_error:
            return JSONResponse({"status": "error", "error": {"code": 503, "type": "unavailable_error",
                                                              "message": f"model failed to load: {state.load_error}"}},
                                status_code=503)
        progress = round(state.load_fraction, 4)
        return JSONResponse({"status": "loading", "progress": progress,
                             "loaded_bytes": state.load_done, "total_bytes": state.load_total,
                             "error": {"code": 503, "type": "unavailable_error",
                                       "message": f"Loading model ({100 * progress:.0f}%)"}},
                            status_code=503, headers={"Retry-After": "2"})

    @app.get("/metrics", dependencies=[Depends(openai_auth)])
    async def metrics() -> PlainTextResponse:
        engine = state.engine
        stats = None
        if engine is not None and hasattr(engine, "stats"):
            try:
                stats = engine.stats()
            except Exception:  # metrics must never fail because of an engine detail
                log.debug("engine.stats() failed", exc_info=True)
        text = state.metrics.render(processing=state.scheduler.running, deferred=state.scheduler.waiting,
                                    n_ctx=engine.ctx_len if engine is not None else 0,
                                    loaded=engine is not None, engine_stats=stats)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail), is_anthropic_path(request.url.path)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request.url.path)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _version() -> str:
    try:
        from kimi_local import __version__
        return str(__version__)
    except ImportError:
        return "0"
