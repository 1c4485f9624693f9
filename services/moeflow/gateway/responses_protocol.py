"""The typed answers of ``POST /v1/responses``: the response object and its stream events.

They are the subset of OpenAI's Responses schema this stateless, text-and-function-call server
produces; the route builds them, so FastAPI checks every answer against them and the OpenAPI
description lists them (the JSON answer as the 200 body, the events as the
``text/event-stream`` body, one of them per SSE ``data:``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from moeflow.gateway.protocol import ERROR_RESPONSES, inline_defs

ResponseStatus = Literal["completed", "failed", "in_progress", "incomplete"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)
    """Required in OpenAI's schema; token logprobs are not offered on /v1/responses."""


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    """The arguments as a JSON text."""
    status: ItemStatus


OutputItem = Annotated[MessageItem | FunctionCallItem, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class Response(BaseModel):
    """A response object (``store`` is always false: nothing is kept)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    text: dict[str, Any]
    metadata: dict[str, str]
    store: Literal[False] = False
    usage: ResponseUsage | None = None


class ResponseEvent(BaseModel):
    sequence_number: int


class ResponseCreatedEvent(ResponseEvent):
    type: Literal["response.created"] = "response.created"
    response: Response


class ResponseInProgressEvent(ResponseEvent):
    type: Literal["response.in_progress"] = "response.in_progress"
    response: Response


class ResponseCompletedEvent(ResponseEvent):
    type: Literal["response.completed"] = "response.completed"
    response: Response


class ResponseIncompleteEvent(ResponseEvent):
    type: Literal["response.incomplete"] = "response.incomplete"
    response: Response


class OutputItemAddedEvent(ResponseEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    output_index: int
    item: OutputItem


class OutputItemDoneEvent(ResponseEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    output_index: int
    item: OutputItem


class ContentPartAddedEvent(ResponseEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ContentPartDoneEvent(ResponseEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputTextDeltaEvent(ResponseEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class OutputTextDoneEvent(ResponseEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class FunctionCallArgumentsDeltaEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta")
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.done"] = (
        "response.function_call_arguments.done")
    item_id: str
    output_index: int
    arguments: str


class ErrorEvent(ResponseEvent):
    """A failure after the stream started (the status line already said 200)."""

    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None = None


ResponseStreamEvent = Annotated[
    ResponseCreatedEvent | ResponseInProgressEvent | ResponseCompletedEvent
    | ResponseIncompleteEvent | OutputItemAddedEvent | OutputItemDoneEvent
    | ContentPartAddedEvent | ContentPartDoneEvent | OutputTextDeltaEvent | OutputTextDoneEvent
    | FunctionCallArgumentsDeltaEvent | FunctionCallArgumentsDoneEvent | ErrorEvent,
    Field(discriminator="type"),
]


class ResponseStreamEventModel(BaseModel):
    """One SSE ``data:`` of a streamed response (its ``event:`` line repeats ``type``)."""

    event: ResponseStreamEvent


def responses_openapi() -> dict[int | str, Any]:
    """``responses=`` for ``POST /v1/responses``: a Response, or with ``stream`` the events."""
    schema = ResponseStreamEventModel.model_json_schema()
    event_schema = {**schema["properties"]["event"], "$defs": schema.get("$defs", {})}
    return {
        200: {
            "description": "A Response; with \"stream\": true, server-sent events (an "
                           "`event:` line naming the type, a `data:` line with the event)",
            "content": {"text/event-stream": {"schema": inline_defs(event_schema)}},
        },
        **ERROR_RESPONSES,
    }
