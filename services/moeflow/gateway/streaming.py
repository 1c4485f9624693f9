"""Server-sent events shared by the chat and completions endpoints.

Each event is one typed chunk (``protocol.ChatCompletionChunk`` or ``CompletionChunk``) as
``data: <json>`` followed by a blank line; the stream ends with ``data: [DONE]``. The framing is
written here rather than by FastAPI's generator-based SSE: a route answers either one JSON body
or a stream, decided by the request, and refuses before the stream starts with a proper status;
FastAPI's ``EventSourceResponse`` is still the response class (``text/event-stream``). JSON is
ASCII-escaped, so no line separator a naive client splits on (U+2028, U+0085) can reach it raw.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from fastapi.sse import EventSourceResponse
from pydantic import BaseModel

from moeflow.domain.errors import BackendUnavailableError, MoeflowError
from moeflow.domain.messages import TokenChunk
from moeflow.gateway.protocol import Usage, make_usage
from moeflow.web.errors import sse_error

SSE_DONE = "data: [DONE]\n\n"
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: BaseModel, *, exclude: set[str] | None = None) -> str:
    """One event whose data is ``payload`` as compact JSON, without the fields in ``exclude``."""
    data = payload.model_dump_json(exclude=exclude)
    if not data.isascii():  # escape as json.dumps does, so U+2028 or U+0085 never travel raw
        data = json.dumps(json.loads(data), separators=(",", ":"))
    return f"data: {data}\n\n"


def event_stream(events: AsyncIterable[str]) -> EventSourceResponse:
    """The response for a stream of ready-framed events (no proxy buffering, no caching)."""
    return EventSourceResponse(events, headers=_HEADERS)


async def sse_stream(
    chunks: AsyncIterator[TokenChunk],
    *,
    make_event: Callable[[TokenChunk], BaseModel | None],
    make_usage_event: Callable[[Usage], BaseModel] | None,
    first_events: list[BaseModel] | None = None,
    exclude: set[str] | None = None,
    on_error: Callable[[MoeflowError], Any] | None = None,
) -> AsyncIterator[str]:
    """Frame chunks as SSE; end with a usage event (when asked) and ``data: [DONE]``.

    A failure after the stream started becomes an error event in the OpenAI envelope (the
    status line already said 200); ``on_error`` learns of it, for the request's metrics.
    """
    for first in first_events or []:
        yield sse_event(first, exclude=exclude)
    last: TokenChunk | None = None
    try:
        async for chunk in chunks:
            last = chunk
            event = make_event(chunk)
            if event is not None:
                yield sse_event(event, exclude=exclude)
    except MoeflowError as exc:
        if on_error is not None:
            on_error(exc)
        yield sse_error(exc)
        yield SSE_DONE
        return
    if last is None:
        empty = BackendUnavailableError("the engine returned no output")
        if on_error is not None:
            on_error(empty)
        yield sse_error(empty)
    elif make_usage_event is not None:
        usage = make_usage(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens)
        yield sse_event(make_usage_event(usage))
    yield SSE_DONE


async def collect(chunks: AsyncIterator[TokenChunk]) -> tuple[str, TokenChunk]:
    """Concatenate a non-streaming request's text; return it with the final chunk."""
    parts: list[str] = []
    last: TokenChunk | None = None
    async for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    if last is None:
        raise BackendUnavailableError("the engine returned no output")
    return "".join(parts), last
