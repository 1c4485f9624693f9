"""POST /v1/responses: OpenAI's Responses API over the chat pipeline, stateless.

The request becomes a chat completion request (``instructions`` a system message, ``input``
items messages, function-call items assistant ``tool_calls``, their outputs ``tool``
messages; ``text.format`` the ``response_format``; Responses-form tools the chat form), so
templates, tools, grammars and sampling are exactly the chat endpoint's. The answer is a
``response`` object whose ``output`` holds a ``message`` item (``output_text``) and/or
``function_call`` items; with ``stream`` it is the Responses event sequence
(``response.created`` ... ``response.output_text.delta`` ... ``response.completed``), each
event an SSE ``event:`` line plus its JSON. Nothing is stored: ``previous_response_id`` is a 400.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse

from moeflow.domain.errors import InvalidRequestError, MoeflowError
from moeflow.domain.messages import TokenChunk
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.generation import until_disconnected
from moeflow.gateway.middleware import request_record
from moeflow.gateway.protocol import (
    ChatCompletionRequest,
    DeltaToolCall,
    ResponsesRequest,
    ToolCall,
    now_unix,
)
from moeflow.gateway.responses_protocol import (
    ContentPartAddedEvent,
    ContentPartDoneEvent,
    ErrorEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    MessageItem,
    OutputItemAddedEvent,
    OutputItemDoneEvent,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseStatus,
    ResponseUsage,
    responses_openapi,
)
from moeflow.gateway.routes.chat import prepare_chat
from moeflow.gateway.streaming import collect_choice, event_stream
from moeflow.gateway.tool_stream import ToolCallStream
from moeflow.gateway.tools import ToolPlan, parse_calls

router = APIRouter()


def as_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request that ``body`` means."""
    if body.previous_response_id is not None:
        raise InvalidRequestError(
            "previous_response_id is not supported: this server stores no responses; send "
            "the whole conversation in input", param="previous_response_id")
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) \
        else body.input
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") not in (
                            "input_text", "output_text", "text"):
                        raise InvalidRequestError("only text content parts are supported",
                                                  param=f"input.{i}.content")
                    texts.append(str(part.get("text", "")))
                content = "".join(texts)
            messages.append({"role": item.get("role", "user"), "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get(
                    "tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise InvalidRequestError(f"input items of type {str(kind)[:40]!r} are not supported",
                                      param=f"input.{i}.type")
    tools = None
    if body.tools:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise InvalidRequestError("only function tools are supported (no built-in "
                                          "tools such as web search)", param=f"tools.{i}.type")
            tools.append({"type": "function", "function": {
                k: tool[k] for k in ("name", "description", "parameters") if k in tool}})
    choice: Any = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    fmt = (body.text or {}).get("format")
    response_format = None
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            response_format = {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
        else:
            response_format = fmt
    return ChatCompletionRequest.model_validate({
        "model": body.model, "messages": messages, "max_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "tools": tools,
        "tool_choice": choice, "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": response_format, "user": body.user})


def _message_item(item_id: str, text: str, status: ItemStatus) -> MessageItem:
    return MessageItem(id=item_id, status=status, content=[OutputText(text=text)])


def _call_item(call_id: str, name: str, arguments: str, status: ItemStatus) -> FunctionCallItem:
    return FunctionCallItem(id=f"fc_{call_id.removeprefix('call_')}", call_id=call_id, name=name,
                            arguments=arguments, status=status)


def _usage(last: TokenChunk) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=last.num_prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=last.num_cached_tokens),
        output_tokens=last.num_output_tokens,
        total_tokens=last.num_prompt_tokens + last.num_output_tokens)


@router.post("/v1/responses", response_model=Response, responses=responses_openapi())
async def create_response(body: ResponsesRequest, request: Request,
                          service: ServiceDep) -> Response | EventSourceResponse:
    model = service.registry.get(body.model)
    record = request_record(request.scope)
    record.model = model.name
    chat = as_chat(body)
    prompt_ids, sampling, plan = prepare_chat(chat, model, service)
    response_id = f"resp_{uuid.uuid4().hex}"
    message_id = f"msg_{uuid.uuid4().hex}"
    created = now_unix()

    def response(status: ResponseStatus, output: list[MessageItem | FunctionCallItem],
                 last: TokenChunk | None) -> Response:
        incomplete = last is not None and last.finish_reason == "length"
        return Response(
            id=response_id, created_at=created,
            status="incomplete" if incomplete and status == "completed" else status,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete
            else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            model=model.public_name, output=output, parallel_tool_calls=body.parallel_tool_calls,
            temperature=body.temperature, top_p=body.top_p,
            tool_choice=body.tool_choice or ("auto" if body.tools else "none"),
            tools=body.tools or [], text=body.text or {"format": {"type": "text"}},
            metadata=body.metadata or {}, usage=_usage(last) if last is not None else None)

    stream = await service.open(model, "responses", response_id, prompt_ids, sampling,
                                request.is_disconnected)
    if not body.stream:
        result = await until_disconnected(request.is_disconnected, collect_choice(stream))
        content: str | None = result.text
        calls: list[ToolCall] = []
        if plan is not None:
            content, calls = parse_calls(result.text, plan)
        items: list[MessageItem | FunctionCallItem] = (
            [_message_item(message_id, content, "completed")] if content else [])
        items += [_call_item(c.id, c.function.name, c.function.arguments, "completed")
                  for c in calls]
        return response("completed", items, result.last)
    return event_stream(_events(stream, plan, message_id, response, record.failed))


def _events(stream: AsyncIterator[TokenChunk], plan: ToolPlan | None, message_id: str,
            response: Callable[[ResponseStatus, list[MessageItem | FunctionCallItem],
                                TokenChunk | None], Response],
            on_error: Callable[[MoeflowError], Any]) -> AsyncIterator[str]:
    """The Responses event sequence: text deltas as the text comes, a function call's item
    as soon as its name is written and its arguments in fragments (``tool_stream``), then
    each item's done events and the final response."""
    seq = 0

    def frame(event: ResponseEvent) -> str:
        nonlocal seq
        seq += 1
        kind = getattr(event, "type", "")  # every event class sets its type
        return f"event: {kind}\ndata: {event.model_dump_json()}\n\n"

    def n() -> int:
        return seq

    async def run() -> AsyncIterator[str]:
        yield frame(ResponseCreatedEvent(sequence_number=n(),
                                         response=response("in_progress", [], None)))
        yield frame(ResponseInProgressEvent(sequence_number=n(),
                                            response=response("in_progress", [], None)))
        tools = ToolCallStream(plan) if plan is not None else None
        text: list[str] = []
        message_index: int | None = None
        calls: dict[int, FunctionCallItem] = {}  # delta index -> item
        order: list[FunctionCallItem | None] = []  # None: the message
        last: TokenChunk | None = None

        def content_events(piece: str) -> list[ResponseEvent]:
            nonlocal message_index
            if not piece:
                return []
            out: list[ResponseEvent] = []
            if message_index is None:
                message_index = len(order)
                order.append(None)
                out += [OutputItemAddedEvent(
                            sequence_number=0, output_index=message_index,
                            item=MessageItem(id=message_id, status="in_progress", content=[])),
                        ContentPartAddedEvent(sequence_number=0, item_id=message_id,
                                              output_index=message_index, content_index=0,
                                              part=OutputText(text=""))]
            text.append(piece)
            out.append(OutputTextDeltaEvent(sequence_number=0, item_id=message_id,
                                            output_index=message_index, content_index=0,
                                            delta=piece))
            return out

        def call_events(deltas: list[DeltaToolCall]) -> list[ResponseEvent]:
            out: list[ResponseEvent] = []
            for d in deltas:
                fn = d.function
                if d.id is not None and fn is not None and fn.name is not None:
                    item = _call_item(d.id, fn.name, "", "in_progress")
                    calls[d.index] = item
                    out.append(OutputItemAddedEvent(sequence_number=0, output_index=len(order),
                                                    item=item))
                    order.append(item)
                elif fn is not None and fn.arguments:
                    item = calls[d.index]
                    item.arguments += fn.arguments
                    out.append(FunctionCallArgumentsDeltaEvent(
                        sequence_number=0, item_id=item.id, output_index=order.index(item),
                        delta=fn.arguments))
            return out

        try:
            async for chunk in stream:
                last = chunk
                if tools is None:
                    events = content_events(chunk.text)
                else:
                    piece, deltas = tools.feed(chunk.text)
                    if chunk.finish_reason is not None:
                        piece += tools.finish()
                    events = content_events(piece) + call_events(deltas)
                for event in events:
                    event.sequence_number = n()
                    yield frame(event)
        except MoeflowError as exc:
            on_error(exc)
            yield frame(ErrorEvent(sequence_number=n(), code=exc.code, message=exc.message))
            return
        items: list[MessageItem | FunctionCallItem] = []
        for index, entry in enumerate(order):
            if entry is None:
                message = _message_item(message_id, "".join(text), "completed")
                part = message.content[0]
                yield frame(OutputTextDoneEvent(sequence_number=n(), item_id=message_id,
                                                output_index=index, content_index=0,
                                                text=part.text))
                yield frame(ContentPartDoneEvent(sequence_number=n(), item_id=message_id,
                                                 output_index=index, content_index=0,
                                                 part=part))
                items.append(message)
            else:
                entry.status = "completed"
                yield frame(FunctionCallArgumentsDoneEvent(
                    sequence_number=n(), item_id=entry.id, output_index=index,
                    arguments=entry.arguments))
                items.append(entry)
            yield frame(OutputItemDoneEvent(sequence_number=n(), output_index=index,
                                            item=items[-1]))
        final = response("completed", items, last)
        if final.status == "completed":
            yield frame(ResponseCompletedEvent(sequence_number=n(), response=final))
        else:
            yield frame(ResponseIncompleteEvent(sequence_number=n(), response=final))

    return run()
