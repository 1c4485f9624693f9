"""Batch inference for `Request`: prompts (JSONL) fanned out against a Model's OpenAI API.

The fan-out, progress and result bookkeeping are here and free of Kubernetes; the HTTP call
sits behind the `CompletionClient` protocol, so the logic is unit-tested with a fake and
integration-tested against a real HTTP server.

Input, one JSON value per line (blank lines skipped):
- completions: {"prompt": "...", ...} or a bare JSON string (the prompt);
- chat.completions: {"messages": [...], ...} or a bare JSON string (one user message).
Other keys of an object override the request defaults (max_tokens, temperature, stop, seed,
...); "id" is echoed into the result, not sent. Output, one line per input line, in order:
{"index": i, "id": ..., "ok": true, "text": "...", "usage": {...}} or
{"index": i, "id": ..., "ok": false, "error": "..."}.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from moeflow.domain.spec import CompletionApi

API_PATHS = {CompletionApi.COMPLETIONS: "/v1/completions",
             CompletionApi.CHAT_COMPLETIONS: "/v1/chat/completions"}


class CompletionClient(Protocol):
    """POSTs one OpenAI request body and returns the decoded JSON response; raises on any
    transport or HTTP error (the message becomes the item's error)."""

    async def post_json(self, url: str, body: Mapping[str, Any]) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class WorkItem:
    index: int
    id: str | None
    body: dict[str, Any]


@dataclass(frozen=True)
class ItemResult:
    index: int
    id: str | None
    ok: bool
    text: str | None = None
    error: str | None = None
    usage: Mapping[str, Any] | None = None

    def to_json(self) -> str:
        record: dict[str, Any] = {"index": self.index, "id": self.id, "ok": self.ok}
        if self.ok:
            record["text"] = self.text
            if self.usage is not None:
                record["usage"] = dict(self.usage)
        else:
            record["error"] = self.error
        return json.dumps(record, ensure_ascii=False)


@dataclass(frozen=True)
class Progress:
    total: int
    succeeded: int
    failed: int

    @property
    def num_done(self) -> int:
        return self.succeeded + self.failed

    @property
    def summary(self) -> str:
        return f"{self.num_done}/{self.total}"


def parse_prompts(jsonl: str, *, api: CompletionApi, model: str, max_tokens: int,
                  temperature: float) -> tuple[list[WorkItem], list[ItemResult]]:
    """Work items for the valid lines, and already-failed results for the invalid ones."""
    items: list[WorkItem] = []
    invalid: list[ItemResult] = []
    content_key = "prompt" if api is CompletionApi.COMPLETIONS else "messages"
    lines = [line for line in jsonl.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            invalid.append(ItemResult(index, None, False, error=f"line {index + 1}: bad JSON: {e}"))
            continue
        if isinstance(value, str):
            value = {content_key: value if content_key == "prompt"
                     else [{"role": "user", "content": value}]}
        if not isinstance(value, dict) or content_key not in value:
            invalid.append(ItemResult(index, None, False, error=(
                f"line {index + 1}: expected a string or an object with {content_key!r}")))
            continue
        item_id = value.pop("id", None)
        body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, **value}
        items.append(WorkItem(index, None if item_id is None else str(item_id), body))
    return items, invalid


def extract_text(api: CompletionApi, response: Mapping[str, Any]) -> str:
    """The generated text of the first choice; ValueError if the response has another shape."""
    try:
        choice = response["choices"][0]
        text = choice["text"] if api is CompletionApi.COMPLETIONS else choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not an OpenAI {api.value} response: missing {e}") from None
    if not isinstance(text, str):
        raise ValueError(f"not an OpenAI {api.value} response: text is {type(text).__name__}")
    return text


async def _complete(item: WorkItem, client: CompletionClient, url: str,
                    api: CompletionApi) -> ItemResult:
    try:
        response = await client.post_json(url, item.body)
        usage = response.get("usage")
        return ItemResult(item.index, item.id, True, text=extract_text(api, response),
                          usage=usage if isinstance(usage, Mapping) else None)
    except Exception as e:  # any failure of one item is that item's result, not the batch's
        return ItemResult(item.index, item.id, False, error=f"{type(e).__name__}: {e}")


async def run_batch(
    items: Sequence[WorkItem], client: CompletionClient, base_url: str, *,
    api: CompletionApi, parallelism: int,
    already_failed: Sequence[ItemResult] = (),
    on_progress: Callable[[Progress], Awaitable[None]] | None = None,
    progress_interval_s: float = 1.0,
) -> list[ItemResult]:
    """Run every item with at most `parallelism` calls in flight; report progress at most
    every `progress_interval_s` and once at the end. Results are ordered by index."""
    url = base_url.rstrip("/") + API_PATHS[api]
    results: list[ItemResult] = list(already_failed)
    total = len(items) + len(already_failed)
    queue: asyncio.Queue[WorkItem] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    def progress() -> Progress:
        succeeded = sum(r.ok for r in results)
        return Progress(total=total, succeeded=succeeded, failed=len(results) - succeeded)

    async def worker() -> None:
        while not queue.empty():
            results.append(await _complete(queue.get_nowait(), client, url, api))

    async def reporter() -> None:
        assert on_progress is not None
        last_reported = time.monotonic()
        while True:
            await asyncio.sleep(max(0.0, progress_interval_s - (time.monotonic() - last_reported)))
            last_reported = time.monotonic()
            await on_progress(progress())

    report_task = asyncio.create_task(reporter()) if on_progress else None
    try:
        await asyncio.gather(*(worker() for _ in range(min(parallelism, len(items)))))
    finally:
        if report_task is not None:
            report_task.cancel()
            await asyncio.gather(report_task, return_exceptions=True)
    if on_progress is not None:
        await on_progress(progress())
    return sorted(results, key=lambda r: r.index)


def results_jsonl(results: Sequence[ItemResult]) -> str:
    return "".join(r.to_json() + "\n" for r in sorted(results, key=lambda r: r.index))


class HttpCompletionClient:
    """`CompletionClient` over httpx; one connection pool per batch."""

    def __init__(self, timeout_s: float) -> None:
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def post_json(self, url: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        response = await self._client.post(url, json=dict(body))
        if response.status_code >= 400:
            raise RuntimeError(f"HTTP {response.status_code} from {url}: {response.text[:200]}")
        data = response.json()
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object from {url}, got {type(data).__name__}")
        return data

    async def aclose(self) -> None:
        await self._client.aclose()
