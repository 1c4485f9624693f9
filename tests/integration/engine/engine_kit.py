"""Serve a real engine app over real HTTP (uvicorn on a thread of the test process), and talk
to it as the gateway does: ``POST /v1/generate`` with a ``GenerateRequest``, NDJSON back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from moeflow.engine.async_engine import AsyncEngine
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.server import build_engine_app
from tests.platform_process import free_port


@dataclass
class Served:
    engine: LLMEngine
    app: FastAPI
    url: str

    @property
    def async_engine(self) -> AsyncEngine:
        engine: AsyncEngine = self.app.state.async_engine
        return engine


@contextmanager
def serve(engine: LLMEngine, timeout_s: float = 30.0) -> Iterator[Served]:
    """The engine's app under uvicorn on a free port, until the block ends."""
    app = build_engine_app(engine)
    with serve_app(app, timeout_s) as url:
        yield Served(engine, app, url)


@contextmanager
def serve_app(app: FastAPI, timeout_s: float = 30.0) -> Iterator[str]:
    """Any app under uvicorn on a free port (its lifespan runs); yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the engine app did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Outcome:
    """What one generate call produced: tokens, the finish reason, or an error."""

    status: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None


def body(request_id: str, prompt: tuple[int, ...], **sampling: Any) -> dict[str, Any]:
    return {"request_id": request_id, "prompt_token_ids": list(prompt), "sampling": sampling}


def parse(status: int, lines: list[bytes]) -> Outcome:
    outcome = Outcome(status)
    for line in lines:
        if not line.strip():
            continue
        message = json.loads(line)
        if status != 200:  # the OpenAI envelope
            outcome.error_code = message["error"]["code"]
            outcome.error_message = message["error"]["message"]
        elif "code" in message:  # ErrorChunk
            outcome.error_code = message["code"]
            outcome.error_message = message["message"]
        else:
            outcome.token_ids.extend(message["token_ids"])
            outcome.finish_reason = message["finish_reason"] or outcome.finish_reason
    return outcome


async def agenerate(client: httpx.AsyncClient, url: str, request: dict[str, Any],
                    headers: dict[str, str] | None = None,
                    first_chunk: threading.Event | None = None) -> Outcome:
    """One generate call; ``first_chunk`` is set once the first line arrived."""
    lines: list[bytes] = []
    async with client.stream("POST", f"{url}/v1/generate", json=request,
                             headers=headers or {}) as response:
        async for line in response.aiter_lines():
            lines.append(line.encode())
            if first_chunk is not None:
                first_chunk.set()
    return parse(response.status_code, lines)


def generate(url: str, request: dict[str, Any], headers: dict[str, str] | None = None,
             timeout_s: float = 60.0) -> Outcome:
    with httpx.stream("POST", f"{url}/v1/generate", json=request, headers=headers or {},
                      timeout=timeout_s) as response:
        lines = [line.encode() for line in response.iter_lines()]
    return parse(response.status_code, lines)


def wait_until(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
