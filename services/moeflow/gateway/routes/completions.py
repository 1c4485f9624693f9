"""POST /v1/completions: one engine task per prompt; several prompts give several choices.

A prompt given as text is raw text: special-token text in it (``<|im_start|>``) is encoded as
ordinary characters, never as control tokens; a client that wants control tokens sends token
ids (a list of ints, or a list of such lists).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse

from moeflow.domain.errors import InvalidRequestError, MoeflowError
from moeflow.domain.messages import TokenChunk
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.generation import until_disconnected
from moeflow.gateway.middleware import request_record
from moeflow.gateway.protocol import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    make_usage,
    now_unix,
    sse_responses,
)
from moeflow.gateway.registry import ServedModel
from moeflow.gateway.streaming import SSE_DONE, collect, event_stream, sse_event
from moeflow.web.errors import sse_error

router = APIRouter()


def _prompts(body: CompletionRequest, model: ServedModel, max_prompts: int) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        prompts = [model.tokenizer.encode_prompt(p)]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [model.tokenizer.encode_prompt(x) for x in p]  # type: ignore[arg-type]
    elif p and all(isinstance(x, list) for x in p):
        prompts = [list(x) for x in p]  # type: ignore[arg-type]
    else:
        raise InvalidRequestError("prompt must be a non-empty string or list", param="prompt")
    if len(prompts) > max_prompts:
        raise InvalidRequestError(f"at most {max_prompts} prompts per request", param="prompt")
    if any(not ids for ids in prompts):
        raise InvalidRequestError("prompts must not be empty", param="prompt")
    return prompts


async def _merge(
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


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses=sse_responses(Completion, CompletionChunk),
)
async def create_completion(
    body: CompletionRequest, request: Request, service: ServiceDep
) -> Completion | EventSourceResponse:
    model = service.registry.get(body.model)
    record = request_record(request.scope)
    record.model = model.name
    refused = body.unsupported()
    if refused is not None:
        raise InvalidRequestError(refused[1], param=refused[0])
    prompts = _prompts(body, model, service.settings.max_prompts_per_request)
    samplings = [
        service.sampling_params(
            body, num_prompt_tokens=len(ids), model=model, max_tokens=body.max_tokens or 16
        )
        for ids in prompts
    ]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = now_unix()

    async def start() -> list[AsyncGenerator[TokenChunk, None]]:
        streams: list[AsyncGenerator[TokenChunk, None]] = []
        try:
            for i, (ids, sampling) in enumerate(zip(prompts, samplings, strict=True)):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(await service.open(model, "completions", rid, ids, sampling,
                                                  request.is_disconnected))
        except BaseException as exc:
            if isinstance(exc, MoeflowError):
                record.failed(exc)  # a stream woken from zero reports it only as an SSE event
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    # a stream at zero instances starts now and sends keep-alives while the model wakes
    ticket = service.wake.hold(model.name) if body.stream and service.wake else None
    opened = await start() if ticket is None else None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # without include_usage OpenAI leaves "usage" out; with it, null until the end
        exclude = None if include_usage else {"usage"}

        def chunk_of(choices: list[CompletionChoice]) -> CompletionChunk:
            return CompletionChunk(id=request_id, created=created, model=model.name,
                                   choices=choices)

        async def events(streams: list[AsyncGenerator[TokenChunk, None]]) -> AsyncIterator[str]:
            finals: dict[int, TokenChunk] = {}
            try:
                async for index, chunk in _merge(streams):
                    if chunk.finish_reason is not None:
                        finals[index] = chunk
                    if not chunk.text and chunk.finish_reason is None:
                        continue
                    choice = CompletionChoice(index=index, text=chunk.text,
                                              finish_reason=chunk.finish_reason)
                    yield sse_event(chunk_of([choice]), exclude=exclude)
            except MoeflowError as exc:
                record.failed(exc)
                yield sse_error(exc)
                yield SSE_DONE
                return
            if include_usage:
                usage = make_usage(
                    sum(c.num_prompt_tokens for c in finals.values()),
                    sum(c.num_output_tokens for c in finals.values()),
                    sum(c.num_cached_tokens for c in finals.values()),
                )
                last = CompletionChunk(id=request_id, created=created, model=model.name,
                                       choices=[], usage=usage)
                yield sse_event(last)
            yield SSE_DONE

        if ticket is not None and service.wake is not None:
            return event_stream(service.wake.sse_after_wake(
                ticket, service.settings.keep_alive_interval_s, start, events
            ))
        assert opened is not None
        return event_stream(events(opened))

    async def gather_all() -> list[tuple[str, TokenChunk]]:
        assert opened is not None
        return list(await asyncio.gather(*(collect(s) for s in opened)))

    results = await until_disconnected(request.is_disconnected, gather_all())
    return Completion(
        id=request_id,
        created=created,
        model=model.name,
        choices=[
            CompletionChoice(index=i, text=text, finish_reason=last.finish_reason)
            for i, (text, last) in enumerate(results)
        ],
        usage=make_usage(
            sum(last.num_prompt_tokens for _, last in results),
            sum(last.num_output_tokens for _, last in results),
            sum(last.num_cached_tokens for _, last in results),
        ),
    )
