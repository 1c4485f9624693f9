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
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from moeflow.domain.errors import InvalidRequestError, MoeflowError
from moeflow.domain.messages import TokenChunk
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.generation import until_disconnected
from moeflow.gateway.middleware import request_record
from moeflow.gateway.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    ResponsesRequest,
    ToolCall,
    now_unix,
)
from moeflow.gateway.routes.chat import prepare_chat
from moeflow.gateway.streaming import collect_choice, event_stream
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


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call: ToolCall) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}",
            "call_id": call.id, "name": call.function.name,
            "arguments": call.function.arguments, "status": "completed"}


def _usage(last: TokenChunk) -> dict[str, Any]:
    return {"input_tokens": last.num_prompt_tokens,
            "input_tokens_details": {"cached_tokens": last.num_cached_tokens},
            "output_tokens": last.num_output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": last.num_prompt_tokens + last.num_output_tokens}


@router.post("/v1/responses", responses=ERROR_RESPONSES)
async def create_response(body: ResponsesRequest, request: Request,
                          service: ServiceDep) -> Any:
    model = service.registry.get(body.model)
    record = request_record(request.scope)
    record.model = model.name
    chat = as_chat(body)
    prompt_ids, sampling, plan = prepare_chat(chat, model, service)
    response_id = f"resp_{uuid.uuid4().hex}"
    message_id = f"msg_{uuid.uuid4().hex}"
    created = now_unix()

    def response(status: str, output: list[dict[str, Any]],
                 last: TokenChunk | None) -> dict[str, Any]:
        incomplete = last is not None and last.finish_reason == "length"
        return {
            "id": response_id, "object": "response", "created_at": created,
            "status": "incomplete" if incomplete and status == "completed" else status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": model.name, "output": output,
            "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": None,
            "temperature": body.temperature, "top_p": body.top_p,
            "tool_choice": body.tool_choice or ("auto" if body.tools else "none"),
            "tools": body.tools or [], "text": body.text or {"format": {"type": "text"}},
            "metadata": body.metadata or {}, "store": False,
            "usage": _usage(last) if last is not None else None,
        }

    def outputs(text: str, plan: ToolPlan | None) -> list[dict[str, Any]]:
        content: str | None = text
        calls: list[ToolCall] = []
        if plan is not None:
            content, calls = parse_calls(text, plan)
        items = [_message_item(message_id, content, "completed")] if content else []
        return items + [_call_item(c) for c in calls]

    stream = await service.open(model, "responses", response_id, prompt_ids, sampling,
                                request.is_disconnected)
    if not body.stream:
        result = await until_disconnected(request.is_disconnected, collect_choice(stream))
        return JSONResponse(response("completed", outputs(result.text, plan), result.last))

    async def events() -> AsyncIterator[str]:
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            data = json.dumps({"type": kind, "sequence_number": seq, **fields})
            seq += 1
            return f"event: {kind}\ndata: {data}\n\n"

        yield event("response.created", response=response("in_progress", [], None))
        yield event("response.in_progress", response=response("in_progress", [], None))
        parts: list[str] = []
        last: TokenChunk | None = None
        started = False
        try:
            async for chunk in stream:
                last = chunk
                parts.append(chunk.text)
                if plan is not None or not chunk.text:
                    continue  # with tools, the output is sorted into items at the end
                if not started:
                    started = True
                    yield event("response.output_item.added", output_index=0,
                                item={**_message_item(message_id, "", "in_progress"),
                                      "content": []})
                    yield event("response.content_part.added", item_id=message_id,
                                output_index=0, content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []})
                yield event("response.output_text.delta", item_id=message_id, output_index=0,
                            content_index=0, delta=chunk.text)
        except MoeflowError as exc:
            record.failed(exc)
            yield event("error", code=exc.code, message=exc.message, param=None)
            return
        text = "".join(parts)
        items = outputs(text, plan)
        for index, item in enumerate(items):
            if item["type"] == "message":
                if not started:
                    yield event("response.output_item.added", output_index=index,
                                item={**item, "status": "in_progress", "content": []})
                    yield event("response.content_part.added", item_id=message_id,
                                output_index=index, content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []})
                    yield event("response.output_text.delta", item_id=message_id,
                                output_index=index, content_index=0,
                                delta=item["content"][0]["text"])
                yield event("response.output_text.done", item_id=message_id,
                            output_index=index, content_index=0,
                            text=item["content"][0]["text"])
                yield event("response.content_part.done", item_id=message_id,
                            output_index=index, content_index=0, part=item["content"][0])
            else:
                yield event("response.output_item.added", output_index=index,
                            item={**item, "status": "in_progress"})
                yield event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, arguments=item["arguments"])
            yield event("response.output_item.done", output_index=index, item=item)
        final = response("completed", items, last)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield event(kind, response=final)

    return event_stream(events())
