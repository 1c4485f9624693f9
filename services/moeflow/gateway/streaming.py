"""Server-sent events framing shared by the chat and completions endpoints."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from moeflow.domain.errors import BackendUnavailableError, MoeflowError
from moeflow.domain.messages import TokenChunk
from moeflow.gateway.protocol import Usage, make_usage
from moeflow.web.errors import sse_error

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def sse_stream(
    chunks: AsyncIterator[TokenChunk],
    *,
    make_event: Callable[[TokenChunk], dict[str, Any] | None],
    make_usage_event: Callable[[Usage], dict[str, Any]] | None,
    first_events: list[dict[str, Any]] | None = None,
) -> AsyncIterator[str]:
    """Frame chunks as SSE; end with a usage event (when asked) and ``data: [DONE]``."""
    for first in first_events or []:
        yield sse(first)
    last: TokenChunk | None = None
    try:
        async for chunk in chunks:
            last = chunk
            event = make_event(chunk)
            if event is not None:
                yield sse(event)
    except MoeflowError as exc:
        yield sse_error(exc)
        yield SSE_DONE
        return
    if last is None:
        yield sse_error(BackendUnavailableError("the engine returned no output"))
    elif make_usage_event is not None:
        usage = make_usage(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens)
        yield sse(make_usage_event(usage))
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
