"""Tool calling on chat completions: tools into the prompt, calls out of the output.

- The tools go to the model's chat template (``tools``, as transformers passes them). A
  template that does not read ``tools`` gets them in a system message instead, in the Hermes
  form that tool-tuned models of the ``<tool_call>`` family learned.
- ``tool_choice`` "none": no tools in the prompt, plain text out. "auto" (the default with
  tools): the model decides; calls are parsed from its native ``<tool_call>{json}</tool_call>``
  output, the rest is the message's content. "required" or a named function: the output is
  constrained by a grammar to a call (an array of calls with ``parallel_tool_calls``) whose
  arguments validate against the function's ``parameters`` schema, so a valid call always
  comes out (unless ``max_tokens`` cuts it: then finish_reason is "length" and no call is
  returned).
- Assistant messages with ``tool_calls`` and ``tool`` messages go to the template as
  transformers expects them (arguments as objects).
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moeflow.domain.errors import InvalidRequestError
from moeflow.gateway.protocol import ChatCompletionRequest, ChatMessage, ToolCall, ToolCallFunction
from moeflow.gateway.structured import schema_grammar
from moeflow.text.tokenizer import TextTokenizer

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]
    """OpenAI function tools, as the template receives them."""
    choice: str
    """"auto", "required" or the name of the function that must be called."""
    parallel: bool
    grammar: str | None
    """The constraint for "required" and named choices; None for "auto"."""

    @property
    def is_constrained(self) -> bool:
        return self.grammar is not None


def plan_tools(body: ChatCompletionRequest) -> ToolPlan | None:
    """What the request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` ask for; None
    when no tool may be called. A 400 names the offending parameter."""
    tools = body.tools or []
    choice_raw = body.tool_choice
    if not tools:
        if choice_raw not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError("each tool must be {\"type\": \"function\", \"function\": "
                                      "{\"name\": ...}}", param=f"tools.{i}")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise InvalidRequestError("parameters must be a JSON schema object",
                                      param=f"tools.{i}.function.parameters")
        functions[fn["name"]] = params
    if choice_raw is None or choice_raw == "auto":
        choice = "auto"
    elif choice_raw == "none":
        return None
    elif choice_raw == "required":
        choice = "required"
    elif isinstance(choice_raw, dict):
        fn = choice_raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in functions:
            raise InvalidRequestError("tool_choice names no function in tools",
                                      param="tool_choice")
        choice = str(name)
    else:
        raise InvalidRequestError("tool_choice must be none, auto, required or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                                  param="tool_choice")
    grammar = None
    if choice != "auto":
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise InvalidRequestError("a forced tool call and a JSON response_format cannot "
                                      "both constrain the output", param="response_format")
        names = list(functions) if choice == "required" else [choice]
        grammar = schema_grammar(_calls_schema({n: functions[n] for n in names},
                                               parallel=body.parallel_tool_calls),
                                 param="tools")
    return ToolPlan([{"type": "function", "function": t["function"]} for t in tools], choice,
                    body.parallel_tool_calls, grammar)


def _calls_schema(functions: Mapping[str, dict[str, Any]], *, parallel: bool) -> dict[str, Any]:
    one = [{"type": "object",
            "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}
           for name, params in functions.items()]
    call: dict[str, Any] = one[0] if len(one) == 1 else {"anyOf": one}
    if parallel:
        return {"type": "array", "items": call, "minItems": 1}
    return call


def template_messages(messages: list[ChatMessage], plan: ToolPlan | None,
                      tokenizer: TextTokenizer) -> tuple[list[dict[str, Any]],
                                                         list[dict[str, Any]] | None]:
    """The messages and tools to render: calls with object arguments, and the tools in a
    system message when the template cannot render them itself."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            calls: list[dict[str, Any]] = []
            texts: list[str] = []
            for call in m.tool_calls:
                fn = call.get("function") or {}
                args: Any = fn.get("arguments", "{}")
                if isinstance(args, str):
                    with contextlib.suppress(json.JSONDecodeError):  # else the text as it came
                        args = json.loads(args)
                calls.append({"type": "function", "id": call.get("id"),
                              "function": {"name": fn.get("name"), "arguments": args}})
                texts.append("<tool_call>\n" + json.dumps({"name": fn.get("name"),
                                                           "arguments": args})
                             + "\n</tool_call>")
            item["tool_calls"] = calls
            if not tokenizer.template_renders_tools:
                item["content"] = item["content"] + "".join(texts)
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    if plan is None:
        return out, None
    if tokenizer.template_renders_tools:
        return out, plan.tools
    described = "\n".join(json.dumps(t) for t in plan.tools)
    system = ("You may call one or more functions to assist with the user query. The "
              f"functions are:\n<tools>\n{described}\n</tools>\nFor each call, return a JSON "
              "object with the function name and arguments within <tool_call></tool_call> "
              "tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json>}\n"
              "</tool_call>")
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out, None


def parse_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[ToolCall]]:
    """The message content and the calls in a finished output."""
    if plan.is_constrained:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return text, []  # cut by max_tokens
        items = parsed if isinstance(parsed, list) else [parsed]
        return None, [_call(item) for item in items if isinstance(item, dict)]
    calls: list[ToolCall] = []
    for found in _CALL.finditer(text):
        try:
            item = json.loads(found.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            calls.append(_call(item))
    if not calls:
        return text, []
    if not plan.parallel:
        calls = calls[:1]
    content = _CALL.sub("", text).strip()
    return content or None, calls


def _call(item: dict[str, Any]) -> ToolCall:
    args = item.get("arguments", {})
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=ToolCallFunction(
        name=str(item.get("name")),
        arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
