"""POST /v1/chat/completions: chat template -> tokens -> one engine task per choice (``n``)
-> message(s) or SSE."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse

from moeflow.domain.errors import InvalidRequestError, MoeflowError
from moeflow.domain.messages import FinishReason, SamplingParams, TokenChunk
from moeflow.gateway.choices import choice_samplings, open_choices
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.generation import GenerationService, until_disconnected
from moeflow.gateway.logprobs import chat_logprobs
from moeflow.gateway.middleware import request_record
from moeflow.gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatFinishReason,
    ChatLogprobs,
    ToolCall,
    Usage,
    make_usage,
    now_unix,
    sse_responses,
)
from moeflow.gateway.registry import ServedModel
from moeflow.gateway.streaming import (
    Collected,
    collect_choice,
    event_stream,
    merge,
    sse_stream,
)
from moeflow.gateway.structured import response_format_grammar
from moeflow.gateway.tool_stream import ToolCallStream
from moeflow.gateway.tools import ToolPlan, parse_calls, plan_tools, template_messages

router = APIRouter()


def prepare_chat(body: ChatCompletionRequest, model: ServedModel, service: GenerationService
                 ) -> tuple[list[int], SamplingParams, ToolPlan | None]:
    """The prompt's token ids, the sampling and the tool plan of a chat request (shared with
    /v1/responses)."""
    plan = plan_tools(body)
    messages, tools = template_messages(body.messages, plan, model.tokenizer)
    prompt_ids = model.tokenizer.encode_chat(messages, tools=tools)
    sampling = service.sampling_params(
        body,
        num_prompt_tokens=len(prompt_ids),
        model=model,
        max_tokens=body.max_completion_tokens or body.max_tokens,
    )
    grammar = plan.grammar if plan is not None and plan.grammar else (
        response_format_grammar(body.response_format))
    if grammar is not None:
        sampling = sampling.model_copy(update={"grammar": grammar})
    return prompt_ids, sampling, plan


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
    prompt_ids, sampling, plan = prepare_chat(body, model, service)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = now_unix()
    choices = choice_samplings(sampling, body.n)
    tokenizer = model.tokenizer

    async def start() -> list[AsyncGenerator[TokenChunk, None]]:
        try:
            return await open_choices(service, model, "chat", request_id, prompt_ids, choices,
                                      request.is_disconnected)
        except MoeflowError as exc:
            record.failed(exc)  # a stream woken from zero reports it only as an SSE event
            raise

    # a stream at zero instances starts now and sends keep-alives while the model wakes
    ticket = service.wake.hold(model.name) if body.stream and service.wake else None
    opened = await start() if ticket is None else None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk_of(choices: list[ChatChunkChoice], usage: Usage | None = None) -> (
                ChatCompletionChunk):
            return ChatCompletionChunk(id=request_id, created=created, model=model.public_name,
                                       choices=choices, usage=usage)

        tool_streams: dict[int, ToolCallStream] = {}

        def event(index: int, chunk: TokenChunk) -> ChatCompletionChunk | None:
            if plan is not None:
                # content goes out as it comes, calls as they are written (tool_stream);
                # text that may still turn into a call is held back
                calls_stream = tool_streams.setdefault(index, ToolCallStream(plan))
                content, deltas = calls_stream.feed(chunk.text)
                if chunk.finish_reason is not None:
                    content += calls_stream.finish()
                if not (content or deltas or chunk.logprobs) and chunk.finish_reason is None:
                    return None
                finish: ChatFinishReason | None = chunk.finish_reason
                if finish == "stop" and calls_stream.num_calls:
                    finish = "tool_calls"
                return chunk_of([ChatChunkChoice(
                    index=index,
                    delta=ChatDelta(content=content or None, tool_calls=deltas or None),
                    logprobs=chat_logprobs(tokenizer, chunk.logprobs) if chunk.logprobs
                    else None,
                    finish_reason=finish)])
            if not chunk.text and chunk.finish_reason is None and not chunk.logprobs:
                return None
            delta = ChatDelta(content=chunk.text) if chunk.text else ChatDelta()
            logprobs = chat_logprobs(tokenizer, chunk.logprobs) if chunk.logprobs else None
            return chunk_of([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                             finish_reason=chunk.finish_reason)])

        def usage_event(usage: Usage) -> ChatCompletionChunk:
            return chunk_of([], usage)

        firsts = [chunk_of([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant",
                                                                     content=""))])
                  for i in range(body.n)]

        def render(streams: list[AsyncGenerator[TokenChunk, None]]) -> AsyncIterator[str]:
            return sse_stream(
                merge(streams),
                make_event=event,
                make_usage_event=usage_event if include_usage else None,
                first_events=list(firsts),
                # without include_usage OpenAI leaves "usage" out; with it, null until the end
                exclude=None if include_usage else {"usage"},
                on_error=record.failed,
            )

        if ticket is not None and service.wake is not None:
            return event_stream(service.wake.sse_after_wake(
                ticket, service.settings.keep_alive_interval_s, start, render
            ))
        assert opened is not None
        return event_stream(render(opened))

    assert opened is not None
    streams = opened

    async def gather_all() -> list[Collected]:
        return list(await asyncio.gather(*(collect_choice(s) for s in streams)))

    results = await until_disconnected(request.is_disconnected, gather_all())
    first = results[0].last
    return ChatCompletion(
        id=request_id,
        created=created,
        model=model.public_name,
        choices=[
            _choice(i, r, plan, chat_logprobs(tokenizer, r.logprobs)
                    if sampling.logprobs is not None else None)
            for i, r in enumerate(results)
        ],
        # the prompt is counted once, however many choices share it
        usage=make_usage(first.num_prompt_tokens,
                         sum(r.last.num_output_tokens for r in results),
                         first.num_cached_tokens),
    )


def _finish(reason: FinishReason | None, calls: list[ToolCall]) -> ChatFinishReason | None:
    return "tool_calls" if calls and reason == "stop" else reason


def _choice(index: int, r: Collected, plan: ToolPlan | None,
            logprobs: ChatLogprobs | None) -> ChatChoice:
    if plan is None:
        return ChatChoice(index=index, message=AssistantMessage(content=r.text),
                          logprobs=logprobs, finish_reason=r.last.finish_reason)
    content, calls = parse_calls(r.text, plan)
    return ChatChoice(index=index,
                      message=AssistantMessage(content=content, tool_calls=calls or None),
                      logprobs=logprobs, finish_reason=_finish(r.last.finish_reason, calls))
