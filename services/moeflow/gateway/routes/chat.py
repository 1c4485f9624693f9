"""POST /v1/chat/completions: chat template -> tokens -> one engine task -> message or SSE."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse

from moeflow.domain.errors import InvalidRequestError, MoeflowError
from moeflow.domain.messages import TokenChunk
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.generation import until_disconnected
from moeflow.gateway.middleware import request_record
from moeflow.gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Usage,
    make_usage,
    now_unix,
    sse_responses,
)
from moeflow.gateway.streaming import collect, event_stream, sse_stream

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=sse_responses(ChatCompletion, ChatCompletionChunk),
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> ChatCompletion | EventSourceResponse:
    model = service.registry.get(body.model)
    record = request_record(request.scope)
    record.model = model.name
    refused = body.unsupported()
    if refused is not None:
        raise InvalidRequestError(refused[1], param=refused[0])
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = model.tokenizer.encode_chat(messages)
    sampling = service.sampling_params(
        body,
        num_prompt_tokens=len(prompt_ids),
        model=model,
        max_tokens=body.max_completion_tokens or body.max_tokens,
    )
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = now_unix()

    async def start() -> AsyncIterator[TokenChunk]:
        try:
            return await service.open(model, "chat", request_id, prompt_ids, sampling,
                                      request.is_disconnected)
        except MoeflowError as exc:
            record.failed(exc)  # a stream woken from zero reports it only as an SSE event
            raise

    # a stream at zero instances starts now and sends keep-alives while the model wakes
    ticket = service.wake.hold(model.name) if body.stream and service.wake else None
    chunks = await start() if ticket is None else None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk_of(choices: list[ChatChunkChoice], usage: Usage | None = None) -> (
                ChatCompletionChunk):
            return ChatCompletionChunk(id=request_id, created=created, model=model.name,
                                       choices=choices, usage=usage)

        def event(chunk: TokenChunk) -> ChatCompletionChunk | None:
            if not chunk.text and chunk.finish_reason is None:
                return None
            delta = ChatDelta(content=chunk.text) if chunk.text else ChatDelta()
            return chunk_of([ChatChunkChoice(delta=delta, finish_reason=chunk.finish_reason)])

        def usage_event(usage: Usage) -> ChatCompletionChunk:
            return chunk_of([], usage)

        first = chunk_of([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])

        def render(chunks: AsyncIterator[TokenChunk]) -> AsyncIterator[str]:
            return sse_stream(
                chunks,
                make_event=event,
                make_usage_event=usage_event if include_usage else None,
                first_events=[first],
                # without include_usage OpenAI leaves "usage" out; with it, null until the end
                exclude=None if include_usage else {"usage"},
                on_error=record.failed,
            )

        if ticket is not None and service.wake is not None:
            return event_stream(service.wake.sse_after_wake(
                ticket, service.settings.keep_alive_interval_s, start, render
            ))
        assert chunks is not None
        return event_stream(render(chunks))

    assert chunks is not None
    text, last = await until_disconnected(request.is_disconnected, collect(chunks))
    return ChatCompletion(
        id=request_id,
        created=created,
        model=model.name,
        choices=[ChatChoice(index=0, message=AssistantMessage(content=text),
                            finish_reason=last.finish_reason)],
        usage=make_usage(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens),
    )
