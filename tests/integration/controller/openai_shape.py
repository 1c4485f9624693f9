"""The OpenAI completions/chat-completions shape that batch `Request`s rely on.

This is the contract between the operator's batch fan-out and a Model's gateway. The fake
gateway of the integration tests is checked against it (test_ctl_openai_shape.py), and
`check_gateway(base_url, model)` is meant to be pointed at the real gateway later, so that
the fake and the real thing cannot drift apart. Only fields the operator reads or sends are
required; everything else is allowed (OpenAI clients send and receive extra fields).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import jsonschema

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer", "minimum": 0}
                   for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
_SAMPLING = {
    "model": {"type": "string", "minLength": 1},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "seed": {"type": "integer"},
    "stream": {"const": False},
}
_FINISH = {"enum": ["stop", "length", None]}

COMPLETION_REQUEST = {
    "type": "object", "required": ["model", "prompt"],
    "properties": {**_SAMPLING, "prompt": {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
}
COMPLETION_RESPONSE = {
    "type": "object", "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "text_completion"},
        "created": {"type": "integer"}, "model": {"type": "string"},
        "choices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["index", "text", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                           "finish_reason": _FINISH}}},
        "usage": _USAGE,
    },
}
CHAT_REQUEST = {
    "type": "object", "required": ["model", "messages"],
    "properties": {**_SAMPLING, "messages": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "user", "assistant"]},
                       "content": {"type": "string"}}}}},
}
CHAT_RESPONSE = {
    "type": "object", "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"},
        "created": {"type": "integer"}, "model": {"type": "string"},
        "choices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": {"type": "integer"}, "finish_reason": _FINISH,
                "message": {"type": "object", "required": ["role", "content"],
                            "properties": {"role": {"const": "assistant"},
                                           "content": {"type": "string"}}}}}},
        "usage": _USAGE,
    },
}
SHAPES = {
    "/v1/completions": (COMPLETION_REQUEST, COMPLETION_RESPONSE),
    "/v1/chat/completions": (CHAT_REQUEST, CHAT_RESPONSE),
}


def check(schema: Mapping[str, Any], body: Any) -> None:
    """Raise jsonschema.ValidationError if `body` does not have the shape."""
    jsonschema.Draft7Validator(dict(schema)).validate(body)


async def check_gateway(base_url: str, model: str, *, timeout_s: float = 30.0) -> None:
    """Contract test of a live gateway: /health answers, and a minimal completion and chat
    completion have the shape above."""
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as client:
        health = await client.get("/health")
        assert health.status_code == 200, f"GET /health: {health.status_code}"
        requests = {
            "/v1/completions": {"model": model, "prompt": "The capital of France is",
                                "max_tokens": 4, "temperature": 0},
            "/v1/chat/completions": {"model": model, "max_tokens": 4, "temperature": 0,
                                     "messages": [{"role": "user", "content": "Hi"}]},
        }
        for path, body in requests.items():
            request_shape, response_shape = SHAPES[path]
            check(request_shape, body)
            response = await client.post(path, json=body)
            assert response.status_code == 200, f"POST {path}: {response.status_code}"
            check(response_shape, response.json())
