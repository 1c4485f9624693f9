"""Batch fan-out logic with a fake CompletionClient: ordering, limits, failures, progress."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from moeflow.controller.batch import (
    ItemResult,
    Progress,
    extract_text,
    parse_prompts,
    results_jsonl,
    run_batch,
)
from moeflow.domain.spec import CompletionApi


class FakeClient:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.in_flight = self.max_in_flight = 0
        self.urls: list[str] = []

    async def post_json(self, url: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        self.urls.append(url)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if "boom" in str(body.get("prompt")):
                raise ConnectionError("connection reset")
            return {"choices": [{"text": f"<{body['prompt']}>"}], "usage": {"total_tokens": 1}}
        finally:
            self.in_flight -= 1


def items(n: int, extra: str = "") -> Any:
    jsonl = "".join(json.dumps({"prompt": f"p{i}", "id": f"i{i}"}) + "\n" for i in range(n))
    return parse_prompts(
        jsonl + extra, api=CompletionApi.COMPLETIONS, model="m", max_tokens=8, temperature=0.0
    )


def test_parse_prompts_bodies_and_invalid_lines() -> None:
    work, invalid = parse_prompts(
        '"a"\n\n{"prompt": "b", "seed": 1}\n[1]\n{oops\n',
        api=CompletionApi.COMPLETIONS,
        model="m",
        max_tokens=4,
        temperature=0.5,
    )
    assert [w.body for w in work] == [
        {"model": "m", "max_tokens": 4, "temperature": 0.5, "prompt": "a"},
        {"model": "m", "max_tokens": 4, "temperature": 0.5, "prompt": "b", "seed": 1},
    ]
    assert [(r.index, r.ok) for r in invalid] == [(2, False), (3, False)]
    assert "expected a string or an object with 'prompt'" in str(invalid[0].error)
    chat, _ = parse_prompts(
        '"hi"', api=CompletionApi.CHAT_COMPLETIONS, model="m", max_tokens=4, temperature=0
    )
    assert chat[0].body["messages"] == [{"role": "user", "content": "hi"}]


async def test_run_batch_orders_results_and_limits_parallelism() -> None:
    work, invalid = items(10, extra='{"prompt": "boom"}\nnot json\n')
    client = FakeClient(delay_s=0.01)
    reports: list[Progress] = []

    async def on_progress(p: Progress) -> None:
        reports.append(p)

    results = await run_batch(
        work,
        client,
        "http://gw/",
        api=CompletionApi.COMPLETIONS,
        parallelism=3,
        already_failed=invalid,
        on_progress=on_progress,
        progress_interval_s=0.02,
    )
    assert [r.index for r in results] == list(range(12))
    assert client.max_in_flight == 3
    assert set(client.urls) == {"http://gw/v1/completions"}
    assert results[0] == ItemResult(0, "i0", True, text="<p0>", usage={"total_tokens": 1})
    assert results[10].error == "ConnectionError: connection reset"
    assert reports[-1] == Progress(total=12, succeeded=10, failed=2)
    assert reports[-1].summary == "12/12"
    assert len(reports) >= 2  # periodic reports before the final one


async def test_empty_batch_reports_once() -> None:
    reports: list[Progress] = []

    async def on_progress(p: Progress) -> None:
        reports.append(p)

    assert (
        await run_batch(
            [],
            FakeClient(),
            "http://gw",
            api=CompletionApi.COMPLETIONS,
            parallelism=4,
            on_progress=on_progress,
        )
        == []
    )
    assert reports == [Progress(0, 0, 0)]


def test_extract_text_and_results_jsonl() -> None:
    chat = {"choices": [{"message": {"role": "assistant", "content": "yo"}}]}
    assert extract_text(CompletionApi.CHAT_COMPLETIONS, chat) == "yo"
    with pytest.raises(ValueError, match="not an OpenAI completions response"):
        extract_text(CompletionApi.COMPLETIONS, chat)
    lines = results_jsonl([ItemResult(1, None, False, error="e"), ItemResult(0, "a", True, "t")])
    assert [json.loads(line) for line in lines.splitlines()] == [
        {"index": 0, "id": "a", "ok": True, "text": "t"},
        {"index": 1, "id": None, "ok": False, "error": "e"},
    ]
