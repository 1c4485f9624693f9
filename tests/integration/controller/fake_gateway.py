"""A tiny real HTTP server that speaks the OpenAI shape of openai_shape.py: the stand-in for a
Model's gateway in the batch-Request tests.

It checks every request body against the request shape (a 400 otherwise), answers
deterministically ("echo: <prompt>"), fails with 500 for prompts containing "FAIL", and
records what it was sent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jsonschema
from aiohttp import web
from openai_shape import SHAPES, check


class FakeGateway:
    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> FakeGateway:
        app = web.Application()
        app.router.add_get("/health", self._health)
        for path in SHAPES:
            app.router.add_post(path, self._complete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        request_shape, _ = SHAPES[request.path]
        try:
            check(request_shape, body)
        except jsonschema.ValidationError as e:
            return web.json_response({"error": {"message": e.message}}, status=400)
        self.received.append((request.path, body))
        text_in = body.get("prompt") if "prompt" in body else body["messages"][-1]["content"]
        if "FAIL" in str(text_in):
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        return web.json_response(respond(request.path, body, f"echo: {text_in}"))


def respond(path: str, body: Mapping[str, Any], text: str) -> dict[str, Any]:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    common = {"id": "cmpl-fake", "created": int(time.time()), "model": body["model"],
              "usage": usage}
    if path == "/v1/completions":
        return {**common, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}
    return {**common, "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}
