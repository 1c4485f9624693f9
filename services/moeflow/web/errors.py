"""The one place where errors become HTTP responses (the OpenAI error envelope), for the gateway
and every engine instance alike.

Domain errors (``moeflow.domain.errors``) carry their status and code; request-validation
errors become 400 with the offending ``param``; unknown routes 404; anything unexpected 500
with no internals in the body (the traceback goes to the log).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeflow.domain.errors import MoeflowError, OverloadedError

logger = logging.getLogger(__name__)


def error_body(
    message: str, error_type: str, code: str | None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: MoeflowError) -> JSONResponse:
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if isinstance(exc, OverloadedError) or retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s or 1)
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.code, exc.param),
        status_code=exc.status_code,
        headers=headers,
    )


def sse_error(exc: MoeflowError) -> str:
    """The same envelope as an SSE event, for failures after a stream has started."""
    return f"data: {json.dumps(error_body(exc.message, exc.error_type, exc.code, exc.param))}\n\n"


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return JSONResponse(
        error_body(message, "invalid_request_error", "invalid_request", param), status_code=400
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MoeflowError)
    async def _domain(_: Request, exc: MoeflowError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", code),
            status_code=exc.status_code,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("internal server error", "internal_error", "internal_error"),
            status_code=500,
        )
