"""Domain errors shared by every process.

Each error carries what the wire needs (an HTTP status, an OpenAI error ``type`` and ``code``, an
optional ``param``) so that exactly one place, ``moeflow.web.errors`` for the gateway and
``moeflow.engine.server`` for engine instances, turns them into responses. Nothing here imports
a web framework.
"""

from __future__ import annotations


class MoeflowError(Exception):
    """Base class. ``message`` is safe to show to a client: no internals, no prompt text."""

    status_code: int = 500
    error_type: str = "internal_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(MoeflowError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(MoeflowError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class AuthenticationError(MoeflowError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class OverloadedError(MoeflowError):
    """The bounded queue is full. Clients should retry after ``retry_after_s`` seconds."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLargeError(MoeflowError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class BackendUnavailableError(MoeflowError):
    """No engine instance can take the request, or one failed mid-request."""

    status_code = 503
    error_type = "service_unavailable"
    code = "backend_unavailable"


class ExpertsUnavailableError(BackendUnavailableError):
    """Attention/expert split: a routed expert has no live expert instance right now."""

    code = "experts_unavailable"


class PrefillUnavailableError(BackendUnavailableError):
    """Prefill/decode split: the prefill instance of a request failed or could not be reached
    (the gateway stops routing to it and places the request again)."""

    code = "prefill_unavailable"


ERROR_CLASSES_BY_CODE: dict[str, type[MoeflowError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        ContextLengthExceededError,
        ModelNotFoundError,
        AuthenticationError,
        OverloadedError,
        RequestTooLargeError,
        BackendUnavailableError,
        ExpertsUnavailableError,
        PrefillUnavailableError,
    )
}


def error_from_code(code: str, message: str, param: str | None = None) -> MoeflowError:
    """Rebuild a domain error received from another process (engine -> gateway)."""
    cls = ERROR_CLASSES_BY_CODE.get(code, MoeflowError)
    if cls is OverloadedError:
        return OverloadedError(message)
    return cls(message, param=param)
