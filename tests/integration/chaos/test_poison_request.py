"""A request whose steps always crash the engine (a poison request) fails by itself: the engine
runs the requests of a failed step one at a time to find the culprit, so the others finish
exactly, and the gateway tries the poison on at most two instances."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.scheduler import StepPlan
from moeflow.gateway.app import build_app
from moeflow.gateway.settings import GatewaySettings
from moeflow.text.tokenizer import TextTokenizer
from tests.integration.engine.engine_kit import serve, serve_app
from tests.platform_process import free_port
from tests.reference import make_engine

POISON = "poison pill"


@contextmanager
def gateway(urls: list[str]) -> Iterator[str]:
    settings = GatewaySettings(port=free_port(), engine_urls=tuple(urls),
                               stats_poll_interval_s=0.2)
    with serve_app(build_app(settings)) as url:
        yield f"{url}/v1"


def poisoned(engine: LLMEngine, marker: tuple[int, ...], hits: list[str]) -> None:
    """Make every step that holds a prompt containing ``marker`` raise, as a bug would."""
    execute = engine.runner.execute

    def execute_or_crash(plan: StepPlan) -> Any:
        for item in plan.scheduled:
            ids = item.seq.prompt_token_ids
            if any(tuple(ids[i : i + len(marker)]) == marker for i in range(len(ids))):
                hits.append(item.seq.request_id)
                raise RuntimeError("injected bug")
        return execute(plan)

    engine.runner.execute = execute_or_crash  # type: ignore[method-assign]


async def run(base_url: str, prompts: list[str]) -> list[str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)

    async def one(prompt: str) -> str:
        try:
            r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                                temperature=0, extra_body={"ignore_eos": True})
        except openai.APIStatusError as exc:
            return f"error {exc.status_code}"
        return r.choices[0].text

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await client.close()


@pytest.mark.parametrize("num_innocent", [6])
async def test_a_poison_request_fails_alone(tiny_dirs: dict[str, Path],
                                            num_innocent: int) -> None:
    model_dir = tiny_dirs["llama"]
    marker = tuple(TextTokenizer.from_dir(model_dir).encode(POISON))
    innocent = [f"innocent story number {i} goes" for i in range(num_innocent)]
    hits: list[str] = []
    with ExitStack() as stack:
        engines = [make_engine(model_dir, served_model_name="tiny") for _ in range(2)]
        urls = [stack.enter_context(serve(e)).url for e in engines]
        base_url = stack.enter_context(gateway(urls))
        reference = await run(base_url, innocent)
        assert not any(r.startswith("error") for r in reference)
        for engine in engines:
            poisoned(engine, marker, hits)
        outcomes = await run(base_url, [f"{POISON} {POISON}", *innocent])
        assert outcomes[0] == "error 500", outcomes[0]
        assert outcomes[1:] == reference
        attempts = {h.split(":")[0] for h in hits}, set(hits)
        assert len(attempts[0]) == 1, hits  # every failing step held the poison
        assert len(attempts[1]) == 2, hits  # one attempt on each instance, then refused
        assert sum(e.scheduler.num_quarantines_total for e in engines) >= 1
        after = await run(base_url, innocent)  # both instances still serve
        assert after == reference
