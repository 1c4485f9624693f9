"""POST /v1/chat/completions: chat template -> tokens -> one engine task -> message or SSE."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from moeflow.domain.errors import InvalidRequestError
from moeflow.domain.messages import TokenChunk
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.generation import until_disconnected
from moeflow.gateway.protocol import ChatCompletionRequest, Usage, make_usage, now_unix
from moeflow.gateway.streaming import collect, sse_stream

router = APIRouter()


def _check_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise InvalidRequestError("tools are not supported yet", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise InvalidRequestError(
            "only response_format type 'text' is supported", param="response_format"
        )


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> JSONResponse | StreamingResponse:
    model = service.registry.get(body.model)
    _check_unsupported(body)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = model.tokenizer.encode(model.tokenizer.render_chat(messages))
    sampling = service.sampling_params(
        body,
        num_prompt_tokens=len(prompt_ids),
        model=model,
        max_tokens=body.max_completion_tokens or body.max_tokens,
    )
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = now_unix()

    async def start() -> AsyncIterator[TokenChunk]:
        return await service.open(model, "chat", request_id, prompt_ids, sampling,
                                  request.is_disconnected)

    # a stream at zero instances starts now and sends keep-alives while the model wakes
    ticket = service.wake.hold(model.name) if body.stream and service.wake else None
    chunks = await start() if ticket is None else None
    base: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model.name,
    }

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def event(chunk: TokenChunk) -> dict[str, Any] | None:
            if not chunk.text and chunk.finish_reason is None:
                return None
            choice = {
                "index": 0,
                "delta": {"content": chunk.text} if chunk.text else {},
                "logprobs": None,
                "finish_reason": chunk.finish_reason,
            }
            return {**base, "choices": [choice], **({"usage": None} if include_usage else {})}

        def usage_event(usage: Usage) -> dict[str, Any]:
            return {**base, "choices": [], "usage": usage.model_dump()}

        first = {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
            ],
        }
        def render(chunks: AsyncIterator[TokenChunk]) -> AsyncIterator[str]:
            return sse_stream(
                chunks,
                make_event=event,
                make_usage_event=usage_event if include_usage else None,
                first_events=[first],
            )

        if ticket is not None and service.wake is not None:
            events = service.wake.sse_after_wake(
                ticket, service.settings.keep_alive_interval_s, start, render
            )
            return StreamingResponse(events, media_type="text/event-stream")
        assert chunks is not None
        return StreamingResponse(render(chunks), media_type="text/event-stream")

    assert chunks is not None
    text, last = await until_disconnected(request.is_disconnected, collect(chunks))
    usage = make_usage(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens)
    return JSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": last.finish_reason,
                }
            ],
            "usage": usage.model_dump(),
        }
    )
