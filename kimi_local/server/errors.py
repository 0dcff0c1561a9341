"""Error responses shaped like the API being spoken.

OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}``; Anthropic routes (``/v1/messages``)
answer ``{"type": "error", "error": {"type", "message"}}``.  Every failure a request can cause goes through
:func:`error_response`, so no route ever answers with a bare 500 or a traceback.
"""

from __future__ import annotations

import logging
from typing import Optional

from typing import Callable

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimi_local.errors import UserError

log = logging.getLogger("kimi_local.server")

# status -> (OpenAI error type, Anthropic error type)
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
}


class APIError(Exception):
    """An error with an HTTP status, raised anywhere in a request and turned into the API's error body."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(status: int, message: str, anthropic: bool, *, param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    oa_type, an_type = _TYPES.get(status, _TYPES[500] if status >= 500 else _TYPES[400])
    if anthropic:
        return {"type": "error", "error": {"type": an_type, "message": message}}
    return {"error": {"message": message, "type": oa_type, "param": param, "code": code or status}}


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    parts, first_param = [], None
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        first_param = first_param or where
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first_param


def error_response(exc: BaseException, path: str) -> JSONResponse:
    """Turn any exception raised while serving ``path`` into the right status and error body."""
    anthropic = is_anthropic_path(path)
    headers: dict[str, str] = {}
    param = code = None
    if isinstance(exc, StarletteHTTPException) and isinstance(exc.__cause__, APIError):
        exc = exc.__cause__  # e.g. raised while FastAPI read the body
    if isinstance(exc, APIError):
        status, message, param, code, headers = exc.status, exc.message, exc.param, exc.code, exc.headers
    elif isinstance(exc, RequestValidationError):
        status = 400
        message, param = _validation_message(exc)
    elif isinstance(exc, StarletteHTTPException):
        status, message, headers = exc.status_code, str(exc.detail), dict(exc.headers or {})
    elif isinstance(exc, UserError):
        status, message = 400, str(exc)
    else:
        log.exception("internal error while serving %s", path)
        status, message = 500, f"internal server error ({type(exc).__name__}); see the server log"
    return JSONResponse(error_body(status, message, anthropic, param=param, code=code),
                        status_code=status, headers=headers)


class ErrorHandlingRoute(APIRoute):
    """Route class for every API route: any exception from the handler (validation, auth and engine errors
    included) becomes the API's error body, and the request is counted in the metrics."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        route_path = self.path

        async def wrapped(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception as e:
                response = error_response(e, request.url.path)
            state = getattr(request.app.state, "kimi", None)
            if state is not None:
                state.metrics.count_request(route_path, response.status_code)
            return response

        return wrapped
