"""The official `openai` client against `moeflow up` (real processes, real HTTP, tiny llama)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest

from moeflow.text.tokenizer import TextTokenizer
from tests.platform_process import Platform
from tests.reference import hf_chat_ids, hf_greedy

MODEL = "tiny"
QUESTION = [{"role": "user", "content": "Tell me about the river and the town."}]


def client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.base_url, api_key="unused", max_retries=0)


def aclient(platform: Platform) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=platform.base_url, api_key="unused", max_retries=0)


def test_models_lists_the_served_model(platform: Platform) -> None:
    models = client(platform).models.list()
    assert [m.id for m in models] == [MODEL]
    assert client(platform).models.retrieve(MODEL).id == MODEL


def test_chat_greedy_equals_transformers_and_counts_usage(
    platform: Platform, tiny_dirs: dict[str, Path]
) -> None:
    model_dir = tiny_dirs["llama"]
    prompt_ids = hf_chat_ids(model_dir, QUESTION)
    expected_ids = hf_greedy(model_dir, prompt_ids, 12)
    expected_text = TextTokenizer.from_dir(model_dir).decode(expected_ids)
    r = client(platform).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, temperature=0  # type: ignore[arg-type]
    )
    assert r.choices[0].message.content == expected_text
    assert r.choices[0].message.role == "assistant"
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(expected_ids)
    assert r.usage.total_tokens == len(prompt_ids) + len(expected_ids)
    assert r.choices[0].finish_reason == ("length" if len(expected_ids) == 12 else "stop")


def test_streaming_chat_equals_non_streaming_and_ends_with_usage(platform: Platform) -> None:
    c = client(platform)
    whole = c.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=20, temperature=0  # type: ignore[arg-type]
    )
    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=20, temperature=0,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    no_usage = list(
        c.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=5, stream=True,  # type: ignore[arg-type]
        )
    )
    assert all(ch.usage is None for ch in no_usage)


def test_raw_sse_stream_ends_with_done(platform: Platform) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{platform.base_url}/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_completions_accept_text_lists_and_token_ids(platform: Platform) -> None:
    c = client(platform)
    one = c.completions.create(model=MODEL, prompt="The cat sat", max_tokens=6, temperature=0)
    assert len(one.choices) == 1 and one.usage is not None
    many = c.completions.create(
        model=MODEL, prompt=["The cat sat", "Once upon a time"], max_tokens=6, temperature=0
    )
    assert [ch.index for ch in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text
    assert many.usage is not None and one.usage is not None
    assert many.usage.prompt_tokens > one.usage.prompt_tokens
    ids = c.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 4
    streamed = list(
        c.completions.create(
            model=MODEL, prompt="The cat sat", max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == one.choices[0].text
    assert streamed[-1].usage == one.usage


def test_stop_string_cuts_the_text_before_it(platform: Platform) -> None:
    c = client(platform)
    full = c.completions.create(model=MODEL, prompt="The cat sat", max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"need a printable stop string, got {text!r}"
    cut = c.completions.create(
        model=MODEL, prompt="The cat sat", max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_seeded_sampling_repeats_and_differs_from_another_seed(platform: Platform) -> None:
    c = client(platform)

    def draw(seed: int) -> str:
        r = c.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=0.95,
            seed=seed,
        )
        return r.choices[0].text

    assert draw(7) == draw(7)
    assert len({draw(7), draw(8), draw(9)}) > 1


def test_errors_use_the_openai_envelope(platform: Platform) -> None:
    c = client(platform)
    with pytest.raises(openai.NotFoundError) as not_found:
        c.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=3)  # type: ignore[arg-type]
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        c.completions.create(model=MODEL, prompt=[7] * 300, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as n:
        c.completions.create(model=MODEL, prompt="x", n=17)
    assert n.value.param == "n"
    raw = httpx.post(f"{platform.base_url}/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIStatusError) as huge:
        c.completions.create(model=MODEL, prompt="word " * 20000, max_tokens=1)
    assert huge.value.status_code == 413


async def test_32_concurrent_streams_complete_with_exact_usage(
    platform: Platform, tiny_dirs: dict[str, Path]
) -> None:
    tokenizer = TextTokenizer.from_dir(tiny_dirs["llama"])
    c = aclient(platform)
    prompts = [f"Story number {i}: the river" + " and the town" * (i % 7) for i in range(32)]

    async def one(i: int) -> tuple[int, int, int]:
        stream = await c.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=10 + i % 5, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        num_chunks = 0
        usage = None
        async for chunk in stream:
            num_chunks += 1
            usage = chunk.usage or usage
        assert usage is not None
        return usage.prompt_tokens, usage.completion_tokens, num_chunks

    results = await asyncio.gather(*(one(i) for i in range(32)))
    for i, (num_prompt, num_completion, num_chunks) in enumerate(results):
        assert num_prompt == len(tokenizer.encode(prompts[i]))
        assert num_completion == 10 + i % 5
        assert num_chunks >= 2
    await c.close()


async def test_client_disconnect_aborts_and_frees_kv_blocks(platform: Platform) -> None:
    body = {"model": MODEL, "prompt": "The river", "max_tokens": 200, "stream": True,
            "ignore_eos": True, "temperature": 0}
    url = f"{platform.base_url}/completions"
    async with httpx.AsyncClient(timeout=30) as http, http.stream("POST", url, json=body) as r:
        lines = r.aiter_lines()
        for _ in range(3):
            await anext(lines)
    # the stream is closed here, long before 200 tokens
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        running = platform.metric("moeflow_running_requests")
        usage = platform.metric("moeflow_kv_cache_usage_ratio")
        if running == 0 and usage == 0:
            break
    assert running == 0 and usage == 0, (running, usage)
    assert (platform.metric("moeflow_requests_total", status="499") or 0) >= 1


def test_metrics_cover_latency_tokens_and_queue(platform: Platform) -> None:
    client(platform).completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    text = httpx.get(f"{platform.root_url}/metrics").text
    for name in (
        "moeflow_requests_total", "moeflow_time_to_first_token_seconds_bucket",
        "moeflow_time_per_output_token_seconds_bucket", "moeflow_inter_token_latency_seconds",
        "moeflow_e2e_request_latency_seconds_bucket", "moeflow_prompt_tokens_total",
        "moeflow_generation_tokens_total", "moeflow_queue_depth", "moeflow_running_requests",
        "moeflow_kv_cache_usage_ratio", "moeflow_gateway_requests_in_flight",
    ):
        assert name in text, name
