"""``response_format`` -> an llguidance grammar for the engine's token mask.

- ``{"type": "text"}`` (or none): unconstrained.
- ``{"type": "json_object"}``: any JSON object.
- ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``: JSON valid
  against ``schema``. The constraint is enforced whether ``strict`` is true or not (OpenAI's
  non-strict mode only asks the model to follow it; enforcing is what clients rely on). A
  schema that uses keywords llguidance does not implement is refused (400) rather than
  loosened.

JSON comes out compact (no whitespace between tokens): a model free to add whitespace can
spend its whole ``max_tokens`` on it.
"""

from __future__ import annotations

import json
from typing import Any

from llguidance import LLMatcher

from moeflow.domain.errors import InvalidRequestError

_COMPACT: Any = {"whitespace_flexible": False}


def schema_grammar(schema: dict[str, Any], *, param: str) -> str:
    """The grammar of JSON valid against ``schema``; a 400 naming ``param`` if unusable."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_COMPACT)
    except ValueError as exc:
        raise InvalidRequestError(f"invalid JSON schema: {exc}", param=param) from exc
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequestError(f"unsupported JSON schema: {messages[0][:500]}", param=param)
    return grammar


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar ``response_format`` asks for, None for plain text."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar({"type": "object"}, param="response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequestError(
                "response_format.json_schema must be an object with a \"schema\" object",
                param="response_format.json_schema")
        return schema_grammar(spec.get("schema") or {"type": "object"},
                              param="response_format.json_schema.schema")
    raise InvalidRequestError(
        f"response_format type {str(kind)[:40]!r} is not one of text, json_object, json_schema",
        param="response_format.type")
