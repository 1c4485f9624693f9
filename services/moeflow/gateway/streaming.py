"""Server-sent events shared by the chat and completions endpoints.

Each event is one typed chunk (``protocol.ChatCompletionChunk`` or ``CompletionChunk``) as
``data: <json>`` followed by a blank line; the stream ends with ``data: [DONE]``. The framing is
written here rather than by FastAPI's generator-based SSE: a route answers either one JSON body
or a stream, decided by the request, and refuses before the stream starts with a proper status;
FastAPI's ``EventSourceResponse`` is still the response class (``text/event-stream``). JSON is
ASCII-escaped, so no line separator a naive client splits on (U+2028, U+0085) can reach it raw.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import EventSourceResponse
from pydantic import BaseModel

from moeflow.domain.errors import BackendUnavailableError, MoeflowError
from moeflow.domain.messages import TokenChunk, TokenLogprob
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
    chunks: AsyncIterator[tuple[int, TokenChunk]],
    *,
    make_event: Callable[[int, TokenChunk], BaseModel | None],
    make_usage_event: Callable[[Usage], BaseModel] | None,
    first_events: list[BaseModel] | None = None,
    exclude: set[str] | None = None,
    on_error: Callable[[MoeflowError], Any] | None = None,
) -> AsyncIterator[str]:
    """Frame the chunks of one or more choices (``(index, chunk)``, as ``merge`` gives them)
    as SSE; end with a usage event (when asked) and ``data: [DONE]``. Usage counts the prompt
    once and the output of every choice.

    A failure after the stream started becomes an error event in the OpenAI envelope (the
    status line already said 200); ``on_error`` learns of it, for the request's metrics.
    """
    for first in first_events or []:
        yield sse_event(first, exclude=exclude)
    lasts: dict[int, TokenChunk] = {}
    try:
        async for index, chunk in chunks:
            lasts[index] = chunk
            event = make_event(index, chunk)
            if event is not None:
                yield sse_event(event, exclude=exclude)
    except MoeflowError as exc:
        if on_error is not None:
            on_error(exc)
        yield sse_error(exc)
        yield SSE_DONE
        return
    if not lasts:
        empty = BackendUnavailableError("the engine returned no output")
        if on_error is not None:
            on_error(empty)
        yield sse_error(empty)
    elif make_usage_event is not None:
        first = lasts[min(lasts)]
        usage = make_usage(first.num_prompt_tokens,
                           sum(c.num_output_tokens for c in lasts.values()),
                           first.num_cached_tokens)
        yield sse_event(make_usage_event(usage))
    yield SSE_DONE


async def merge(
    streams: Sequence[AsyncIterator[TokenChunk]],
) -> AsyncIterator[tuple[int, TokenChunk]]:
    """Interleave several chunk streams as they produce, tagging each chunk with its index."""
    queue: asyncio.Queue[tuple[int, TokenChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TokenChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, None))
        except BaseException as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(streams)
        while num_open:
            index, item = await queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


@dataclass
class Collected:
    """A non-streaming choice: its whole text, final chunk and logprobs."""

    text: str
    last: TokenChunk
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


async def collect_choice(chunks: AsyncIterator[TokenChunk]) -> Collected:
    """Concatenate a non-streaming choice's text and logprobs."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    last: TokenChunk | None = None
    async for chunk in chunks:
        parts.append(chunk.text)
        logprobs.extend(chunk.logprobs)
        prompt_logprobs = prompt_logprobs or chunk.prompt_logprobs
        last = chunk
    if last is None:
        raise BackendUnavailableError("the engine returned no output")
    return Collected("".join(parts), last, logprobs, prompt_logprobs)


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
