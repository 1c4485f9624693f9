"""OpenAI-compatible request and response bodies (chat completions, completions, models).

Requests: unknown fields are accepted and ignored, as OpenAI's own server does for forward
compatibility, but every field we know is validated, and parameters we do not implement are
refused with a clear 400 rather than silently ignored. Two checks run once over the whole parsed
body before any field is validated (``_RequestBody``):

- every string, wherever it sits (message content and parts, prompts, ``stop``, ``user``, names,
  tool definitions, unknown fields, object keys), must be valid Unicode: JSON can spell a lone
  UTF-16 surrogate (``"\\ud800"``), which no tokenizer and no UTF-8 encoder accepts, so such a
  body is a 400 naming the parameter instead of a failure deep inside;
- ``null`` for an optional field means its default, as OpenAI's schema allows (``n``,
  ``stream``, ``echo``, ``stream_options.include_usage``, ...).

Responses are typed too (``ChatCompletion``, ``ChatCompletionChunk``, ``Completion``,
``CompletionChunk``, ``ModelList``, ``Model``, ``Usage``, ``ErrorEnvelope``): the routes build
them, and ``/openapi.json`` documents them. Fields OpenAI sends as ``null`` (``logprobs``, a
running chunk's ``finish_reason``) are sent as ``null``; fields OpenAI leaves out when unset (a
delta's ``role`` or ``content``) are left out.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from moeflow.domain.errors import InvalidRequestError
from moeflow.domain.messages import FinishReason
from moeflow.web.errors import PARAM_CONTEXT_KEY, ErrorEnvelope

__all__ = [
    "ERROR_RESPONSES",
    "AssistantMessage",
    "ChatChoice",
    "ChatFinishReason",
    "ChatLogprobs",
    "DeltaToolCall",
    "DeltaToolCallFunction",
    "ToolCall",
    "ToolCallFunction",
    "ChatTokenLogprob",
    "ChatTopLogprob",
    "CompletionLogprobs",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionRequest",
    "ErrorEnvelope",
    "Model",
    "ModelList",
    "PromptTokensDetails",
    "StreamOptions",
    "TextPart",
    "Usage",
    "find_lone_surrogate",
    "make_usage",
    "now_unix",
    "inline_defs",
    "sse_responses",
]

_SURROGATE = re.compile("[\ud800-\udfff]")


# -- the edge checks ------------------------------------------------------------------------------


def find_lone_surrogate(body: Any) -> tuple[str | None, str] | None:
    """The first string in ``body`` (a parsed JSON document, walked in document order) that is
    not valid Unicode, as ``(param, what)``: ``param`` is its dotted path (``messages.0.content``;
    for an object key, the path of the object; None at the top level), ``what`` says which code
    unit and where. None when every string is valid.

    Iterative, so a deeply nested document cannot exhaust the interpreter's stack.
    """
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), body)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found is not None:
                return _dotted(path), f"U+{ord(found.group()):04X} at character {found.start()}"
        elif isinstance(item, dict):
            children: list[tuple[tuple[str | int, ...], Any]] = []
            for key, value in item.items():
                if isinstance(key, str) and (found := _SURROGATE.search(key)) is not None:
                    return _dotted(path), f"U+{ord(found.group()):04X} in an object key"
                if isinstance(value, str | dict | list):
                    children.append(((*path, key), value))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(
                ((*path, i), value) for i, value in reversed(list(enumerate(item)))
                if isinstance(value, str | dict | list)
            )
    return None


def _dotted(path: tuple[str | int, ...]) -> str | None:
    return ".".join(str(p) for p in path) or None


@functools.cache
def _null_means_default(model: type[BaseModel]) -> frozenset[str]:
    """Optional fields with a non-None default: ``null`` for them means "use the default"."""
    return frozenset(
        name for name, info in model.model_fields.items()
        if not info.is_required() and info.default is not None
    )


class _Lenient(BaseModel):
    """``null`` for an optional field means its default (OpenAI marks them ``nullable``)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            defaults = _null_means_default(cls)
            if any(data.get(name, 0) is None for name in defaults):
                return {k: v for k, v in data.items() if not (v is None and k in defaults)}
        return data


class _RequestBody(_Lenient):
    """A whole request body: checked for invalid Unicode once, before any field."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = find_lone_surrogate(data)
        if found is not None:
            param, what = found
            raise PydanticCustomError(
                "lone_surrogate",
                "text must be valid Unicode; this string holds a lone UTF-16 surrogate ({what})",
                {"what": what, PARAM_CONTEXT_KEY: param},
            )
        return data


# -- requests -------------------------------------------------------------------------------------


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_RequestBody):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=16)
    """Choices: n engine requests with the same prompt (admitted together, so the prefix cache
    computes the prompt once when they land on one instance)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    ignore_eos: bool = False
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0)
    logprobs: bool | int | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` of the first parameter set to something we do not implement."""
        return None

    def num_logprobs(self) -> int | None:
        """How many alternatives per sampled token the client wants, None for no logprobs."""
        raise NotImplementedError


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant message's calls (``{"id", "type": "function", "function": {"name",
    "arguments"}}``), rendered through the chat template."""
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise PydanticCustomError(
                        "unsupported_content_part",
                        "only text content parts are supported, not '{kind}'",
                        {"kind": kind[:40]},
                    )
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def num_logprobs(self) -> int | None:
        if self.logprobs is None or self.logprobs is False:
            if self.top_logprobs:
                raise _param_error("top_logprobs", "top_logprobs needs logprobs: true")
            return None
        return self.top_logprobs or 0

    def unsupported(self) -> tuple[str, str] | None:
        if self.functions:
            return "functions", "functions (deprecated by OpenAI) are not supported; use tools"
        return super().unsupported()


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=0)

    def num_logprobs(self) -> int | None:
        if self.logprobs is None or isinstance(self.logprobs, bool):
            # a boolean is the chat form; completions take a count (true means 0 alternatives)
            return 0 if self.logprobs else None
        if not 0 <= self.logprobs <= 20:
            raise _param_error("logprobs", "logprobs must lie in [0, 20]")
        return self.logprobs

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of > 1:
            return "best_of", "only best_of=1 is supported"
        return super().unsupported()


def _param_error(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


# -- responses ------------------------------------------------------------------------------------


def _is_none(value: object) -> bool:
    return value is None


_OMITTED_WHEN_NONE: Any = Field(None, exclude_if=_is_none)


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def make_usage(num_prompt: int, num_output: int, num_cached: int) -> Usage:
    return Usage(
        prompt_tokens=num_prompt,
        completion_tokens=num_output,
        total_tokens=num_prompt + num_output,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached),
    )


def now_unix() -> int:
    return int(time.time())


ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"]


class ToolCallFunction(BaseModel):
    name: str
    arguments: str
    """The arguments as a JSON text, as OpenAI sends them."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class DeltaToolCallFunction(BaseModel):
    name: Annotated[str | None, _OMITTED_WHEN_NONE] = None
    arguments: Annotated[str | None, _OMITTED_WHEN_NONE] = None
    """A fragment of the arguments' JSON text; the fragments of one call concatenate to it."""


class DeltaToolCall(BaseModel):
    """A streamed call: the first entry of an ``index`` has its id, type and name, the
    following ones only fragments of its arguments."""

    index: int
    id: Annotated[str | None, _OMITTED_WHEN_NONE] = None
    type: Annotated[Literal["function"] | None, _OMITTED_WHEN_NONE] = None
    function: Annotated[DeltaToolCallFunction | None, _OMITTED_WHEN_NONE] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    """Required (nullable) in OpenAI's schema; the model never refuses by itself here."""
    tool_calls: Annotated[list[ToolCall] | None, _OMITTED_WHEN_NONE] = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions form: parallel lists, one entry per token (``echo`` puts the
    prompt's tokens first; its first token's logprob and alternatives are null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """What a chunk adds to the message; empty (``{}``) on the chunk that only finishes it."""

    role: Annotated[Literal["assistant"] | None, _OMITTED_WHEN_NONE] = None
    content: Annotated[str | None, _OMITTED_WHEN_NONE] = None
    tool_calls: Annotated[list[DeltaToolCall] | None, _OMITTED_WHEN_NONE] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion. ``usage`` is sent only when the client asked
    for it (``stream_options.include_usage``): ``null`` on every chunk but the last, which has no
    choices and the request's usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One SSE event of a streamed completion; ``usage`` as in ``ChatCompletionChunk``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeflow"
    max_model_len: int | None = None
    parent: str | None = None
    """A LoRA adapter's base model (None for a base model)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# -- OpenAPI documentation of what the routes answer ----------------------------------------------

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    # "4XX" also keeps FastAPI from documenting a 422 this API never sends
    "4XX": {"model": ErrorEnvelope, "description": "Refused (400 invalid, 401 no or wrong key, "
            "404 unknown model or route, 413 body too large, 429 overloaded)"},
    "5XX": {"model": ErrorEnvelope, "description": "No instance could serve the request"},
}


def inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` substituted in place (response models are not recursive), so
    it can stand alone inside an OpenAPI document."""
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def sse_responses(json_model: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, Any]:
    """``responses=`` for a route that answers ``json_model`` as JSON, or, with ``stream``, an
    SSE stream of ``chunk`` events ended by ``data: [DONE]``."""
    return {
        200: {
            "description": f"A {json_model.__name__}; with \"stream\": true, server-sent events "
                           f"whose data are {chunk.__name__} objects, then [DONE]",
            "content": {"text/event-stream": {"schema": inline_defs(chunk.model_json_schema())}},
        },
        **ERROR_RESPONSES,
    }



# -- /tokenize and /detokenize (vLLM's shapes) ------------------------------------------------


class TokenizeRequest(_RequestBody):
    """Either ``prompt`` (raw text, as /v1/completions encodes it) or ``messages`` (through
    the chat template, as /v1/chat/completions encodes them)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    """Accepted for vLLM compatibility; a raw prompt gets no BOS here, exactly as
    /v1/completions encodes it (True is refused)."""


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_RequestBody):
    model: str
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# -- /v1/responses (stateless) --------------------------------------------------------------------


class ResponsesRequest(_RequestBody):
    """OpenAI's Responses API, stateless: each request carries its whole conversation.
    ``store`` and ``metadata`` are accepted and nothing is stored; ``previous_response_id``
    (which needs stored responses) is refused."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
