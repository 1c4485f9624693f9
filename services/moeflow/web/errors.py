"""The one place where errors become HTTP responses (the OpenAI error envelope), for the gateway
and every engine instance alike.

Domain errors (``moeflow.domain.errors``) carry their status and code; request-validation
errors become 400 with the offending ``param`` (a body that is not JSON at all: 400 with
``param`` null); unknown routes 404; anything unexpected 500 with no internals in the body (the
traceback goes to the log).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeflow.domain.errors import MoeflowError, OverloadedError

logger = logging.getLogger(__name__)

PARAM_CONTEXT_KEY = "param"
"""A validator that knows the offending parameter better than pydantic's location (a model-level
check over the whole body) puts it in its error's context under this key."""

# Pydantic names the member of a union that failed ("str", "list[int]", "function-after[...]")
# in an error's location; a client knows its parameters by field names and indexes only.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "null"})


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    """Every error body: ``{"error": {"message", "type", "param", "code"}}`` (as OpenAI's)."""

    error: ErrorDetail


def error_body(
    message: str, error_type: str, code: str | None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    """An ``ErrorEnvelope`` as a plain dict (for pure-ASGI senders that write JSON themselves)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# Internal addresses that a server-side message may carry: URLs, IPv4 with or without a port,
# host:port. Client-facing 5xx messages pass through ``scrub_internal`` as a last line of
# defence (the messages are meant to be safe already; a peer's exception text may not be).
_INTERNAL_ADDRESS = re.compile(
    r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+"
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"
    r"|\b[a-zA-Z0-9][a-zA-Z0-9.-]*:\d{2,5}\b"
    r"|/dev/shm/\S+"
)


def scrub_internal(message: str) -> str:
    """``message`` with internal addresses (URLs, IPs, host:port, shared-memory paths)
    replaced by ``<internal>``."""
    return _INTERNAL_ADDRESS.sub("<internal>", message)


def _client_message(exc: MoeflowError) -> str:
    return scrub_internal(exc.message) if exc.status_code >= 500 else exc.message


def error_response(exc: MoeflowError) -> JSONResponse:
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if isinstance(exc, OverloadedError) or retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s or 1)
    return JSONResponse(
        error_body(_client_message(exc), exc.error_type, exc.code, exc.param),
        status_code=exc.status_code,
        headers=headers,
    )


def sse_error(exc: MoeflowError) -> str:
    """The same envelope as an SSE event, for failures after a stream has started."""
    body = error_body(_client_message(exc), exc.error_type, exc.code, exc.param)
    return f"data: {json.dumps(body)}\n\n"


def _param_of(loc: Sequence[Any]) -> str | None:
    parts = [
        str(p) for p in loc
        if p != "body" and not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))
    ]
    return ".".join(parts) or None


def validation_error_body(errors: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str | None]]:
    """The envelope for pydantic/FastAPI validation errors: the first problem, its parameter as
    a dotted path (``messages.0.content``), and how many more there were."""
    first = errors[0] if errors else {}
    context = first.get("ctx") or {}
    if first.get("type") == "json_invalid":
        # FastAPI's location is the character offset into the body, not a parameter
        position = first.get("loc", ("body", None))[-1]
        reason = context.get("error")
        message = "the request body is not valid JSON"
        if reason:
            message += f": {reason}"
            if isinstance(position, int):  # json's reasons read "Expecting value", "... at"
                message += f"{'' if reason.endswith(' at') else ' at'} character {position}"
        return error_body(message, "invalid_request_error", "invalid_request", None)
    param = context.get(PARAM_CONTEXT_KEY) or _param_of(first.get("loc", ()))
    message = str(first.get("msg", "invalid request"))
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return error_body(message, "invalid_request_error", "invalid_request", param)


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
               413: "request_too_large"}
# FastAPI's answer to a body it could not decode (not UTF-8, nested too deep for the parser)
_UNREADABLE_BODY = "There was an error parsing the body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MoeflowError)
    async def _domain(_: Request, exc: MoeflowError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(exc.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400 and message == _UNREADABLE_BODY:
            message = "the request body could not be read as JSON text (UTF-8)"
        return JSONResponse(
            error_body(message, "invalid_request_error", code),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("internal server error", "internal_error", "internal_error"),
            status_code=500,
        )
