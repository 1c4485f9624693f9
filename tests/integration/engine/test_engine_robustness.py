"""One request cannot take an engine instance down, and its health says what is true.

A real engine (tiny llama, float32) behind its real app, over real HTTP (uvicorn on a thread of
this process, so a fault can be injected into one step with monkeypatch). The process-level
behaviour (exit codes, SIGTERM) is in test_engine_process.py.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import moeflow.engine.model_runner as model_runner_module
from moeflow.domain.messages import SamplingParams
from moeflow.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES
from moeflow.engine.scheduler import StepPlan
from moeflow.web.internal_auth import INTERNAL_TOKEN_HEADER
from tests.integration.engine.engine_kit import (
    Outcome,
    Served,
    agenerate,
    body,
    generate,
    serve,
    wait_until,
)
from tests.reference import make_engine

PROMPT_A = (1, 17, 33, 250, 99, 7)
PROMPT_B = (1, 400, 12, 5)
PROMPT_C = (3, 3, 80, 160, 320, 2, 9, 44)

HOSTILE: list[dict[str, Any]] = [
    {"temperature": 1e-45},
    {"temperature": 1e-38},
    {"temperature": 5e-324},
    {"top_p": 1e-300},
    {"temperature": 2.0, "top_k": 1},
    {"top_k": 10**12},
    {"temperature": 2.0, "top_p": 1e-300},
    {"temperature": 1e-38, "top_p": 1e-300, "seed": 3},
    {"temperature": 2.0, "top_k": 10**12, "seed": 2**64 - 1},
]


def greedy(request_id: str, prompt: tuple[int, ...], max_tokens: int) -> dict[str, Any]:
    return body(request_id, prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def get(served: Served, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{served.url}{path}", timeout=10, **kwargs)


def all_blocks_free(served: Served) -> bool:
    bm = served.engine.block_manager
    return not served.engine.has_work and bm.num_free_blocks == bm.num_blocks


def run_concurrently(served: Served, requests: list[dict[str, Any]]) -> list[Outcome]:
    async def main() -> list[Outcome]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(await asyncio.gather(
                *(agenerate(client, served.url, r) for r in requests)))

    return asyncio.run(main())


@pytest.fixture
def llama(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]


def test_hostile_sampling_values_are_answered_and_greedy_streams_stay_exact(llama: Path) -> None:
    with serve(make_engine(llama, max_model_len=256)) as served:
        alone = {p: generate(served.url, greedy(f"alone-{i}", p, 48)).token_ids
                 for i, p in enumerate((PROMPT_A, PROMPT_C))}
        greedy_b = generate(served.url, greedy("greedy-b", PROMPT_B, 8)).token_ids
        requests = [greedy("a", PROMPT_A, 48), greedy("c", PROMPT_C, 48)] + [
            body(f"hostile-{i}", PROMPT_B, max_tokens=8, ignore_eos=True, **params)
            for i, params in enumerate(HOSTILE)
        ]
        a, c, *hostile = run_concurrently(served, requests)

        assert (a.token_ids, a.finish_reason) == (alone[PROMPT_A], "length")
        assert (c.token_ids, c.finish_reason) == (alone[PROMPT_C], "length")
        for params, outcome in zip(HOSTILE, hostile, strict=True):
            assert outcome.error_code is None, (params, outcome)
            assert outcome.finish_reason == "length" and len(outcome.token_ids) == 8, params
            assert all(0 <= t < 512 for t in outcome.token_ids)
            sampling = SamplingParams(**params)
            if sampling.is_greedy or sampling.temperature < 1e-5 or sampling.top_p < 1e-3:
                assert outcome.token_ids == greedy_b, params  # documented: treated as greedy
        assert get(served, "/health/live").status_code == 200
        assert get(served, "/health/ready").json()["status"] == "ok"
        wait_until(lambda: all_blocks_free(served), what="blocks freed")


def test_a_step_that_fails_once_loses_no_request_and_the_engine_goes_on(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(llama, max_model_len=256, max_num_seqs=2)
    execute = engine.runner.execute
    failed_steps: list[set[str]] = []

    def forward_that_breaks_once(plan: StepPlan) -> dict[str, int]:
        ids = {item.seq.request_id for item in plan.scheduled}
        if "poison" in ids and not failed_steps:
            failed_steps.append(ids)
            raise RuntimeError("injected fault at 10.1.2.3:6379 in the model forward")
        return execute(plan)

    monkeypatch.setattr(engine.runner, "execute", forward_that_breaks_once)
    with serve(engine) as served:
        expected = {p: generate(served.url, greedy(f"ref-{i}", p, 32)).token_ids
                    for i, p in enumerate((PROMPT_A, PROMPT_B, PROMPT_C))}
        started = threading.Event()

        async def main() -> list[Outcome]:
            async with httpx.AsyncClient(timeout=120) as client:
                first = asyncio.create_task(
                    agenerate(client, served.url, greedy("a", PROMPT_A, 32), first_chunk=started))
                while not started.is_set():
                    await asyncio.sleep(0.001)
                rest = await asyncio.gather(
                    agenerate(client, served.url, greedy("poison", PROMPT_B, 32)),
                    agenerate(client, served.url, greedy("c", PROMPT_C, 32)))
                return [await first, *rest]

        a, poison, c = asyncio.run(main())

        assert len(failed_steps) == 1 and "poison" in failed_steps[0]
        assert len(failed_steps[0]) > 1, "the fault must hit a step of several requests"
        # the step's requests ran again one at a time (the fault was transient, so none is the
        # culprit): every request finishes, token for token
        by_id = {"a": (a, PROMPT_A), "poison": (poison, PROMPT_B), "c": (c, PROMPT_C)}
        for request_id, (outcome, prompt) in by_id.items():
            assert outcome.error_code is None, (request_id, outcome)
            assert outcome.token_ids == expected[prompt], request_id
        # the engine goes on: a new request, health, blocks, counters
        assert generate(served.url, greedy("after", PROMPT_B, 32)).token_ids == expected[PROMPT_B]
        assert get(served, "/health/live").status_code == 200
        assert get(served, "/health/ready").status_code == 200
        wait_until(lambda: all_blocks_free(served), what="blocks freed")
        metrics = get(served, "/metrics").text
        assert 'moeflow_engine_step_isolations_total{engine="colocated-0",role="colocated"} 1.0' \
            in metrics


def test_non_finite_logits_fail_only_that_request(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model yields NaN for one request's row (it should never): that request fails,
    the request decoding in the same steps goes on unchanged."""
    sample = model_runner_module.sample
    marker_seed = 4242

    def sample_with_a_broken_row(logits: torch.Tensor, params: Any, generators: Any) -> list[int]:
        logits = logits.clone()
        for row, p in enumerate(params):
            if p.seed == marker_seed:
                logits[row, 7] = float("nan")
        return sample(logits, params, generators)

    monkeypatch.setattr(model_runner_module, "sample", sample_with_a_broken_row)
    with serve(make_engine(llama, max_model_len=256)) as served:
        expected = generate(served.url, greedy("ref", PROMPT_A, 40)).token_ids
        a, broken = run_concurrently(served, [
            greedy("a", PROMPT_A, 40),
            body("broken", PROMPT_B, max_tokens=40, ignore_eos=True, seed=marker_seed),
        ])
        assert a.token_ids == expected and a.error_code is None
        assert broken.error_code == "internal_error"
        assert served.async_engine.num_failed_requests_total == 1
        assert get(served, "/health/ready").status_code == 200
        wait_until(lambda: all_blocks_free(served), what="blocks freed")


def test_steps_failing_again_and_again_end_the_loop_and_liveness(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(llama, max_model_len=256)

    def broken_forward(plan: StepPlan) -> dict[str, int]:
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(engine.runner, "execute", broken_forward)
    with serve(engine) as served:
        for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
            outcome = generate(served.url, greedy(f"r{i}", PROMPT_A, 4))
            assert outcome.error_code == "internal_error", (i, outcome)
        wait_until(lambda: not served.async_engine.is_loop_alive, what="the loop to give up")
        live = get(served, "/health/live")
        assert (live.status_code, live.json()) == (503, {"status": "unhealthy", "loop": "dead"})
        for path in ("/health/ready", "/health"):
            ready = get(served, path)
            assert ready.status_code == 503
            assert ready.json()["status"] == "unhealthy" and ready.json()["loop"] == "dead"
        refused = generate(served.url, greedy("late", PROMPT_A, 4))
        assert (refused.status, refused.error_code) == (503, "backend_unavailable")
        assert get(served, "/v1/stats").json()["is_loop_alive"] is False
        assert "moeflow_engine_loop_alive" in get(served, "/metrics").text


def test_an_error_outside_a_step_kills_the_loop_and_fails_open_streams(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(llama, max_model_len=256)
    schedule = engine.scheduler.schedule

    def schedule_that_breaks() -> StepPlan:
        if any(seq.request_id == "kill" for seq in engine.scheduler.waiting):
            raise RuntimeError("corrupted scheduler state")
        return schedule()

    monkeypatch.setattr(engine.scheduler, "schedule", schedule_that_breaks)
    with serve(engine) as served:
        started = threading.Event()

        async def main() -> Outcome:
            async with httpx.AsyncClient(timeout=120) as client:
                stream = asyncio.create_task(agenerate(
                    client, served.url, greedy("long", PROMPT_A, 240), first_chunk=started))
                while not started.is_set():
                    await asyncio.sleep(0.001)
                await agenerate(client, served.url, greedy("kill", PROMPT_B, 4))
                return await stream

        long = asyncio.run(main())
        assert long.error_code == "backend_unavailable"  # retryable elsewhere
        assert long.finish_reason is None
        assert get(served, "/health/live").status_code == 503
        assert served.async_engine.fatal_error is not None


def test_drain_finishes_requests_in_flight_and_refuses_new_ones(llama: Path) -> None:
    with serve(make_engine(llama, max_model_len=2048)) as served:
        expected = generate(served.url, greedy("ref", PROMPT_A, 1500)).token_ids
        started = threading.Event()
        seen: dict[str, Any] = {}

        async def main() -> Outcome:
            async with httpx.AsyncClient(timeout=120) as client:
                stream = asyncio.create_task(agenerate(
                    client, served.url, greedy("in-flight", PROMPT_A, 1500), first_chunk=started))
                while not started.is_set():
                    await asyncio.sleep(0.001)
                drained = await client.post(f"{served.url}/v1/drain")
                seen["drain"] = (drained.status_code, drained.json())
                seen["new"] = await agenerate(client, served.url, greedy("new", PROMPT_B, 4))
                seen["ready"] = await client.get(f"{served.url}/health/ready")
                seen["live"] = await client.get(f"{served.url}/health/live")
                seen["stats"] = (await client.get(f"{served.url}/v1/stats")).json()
                seen["still_running"] = not stream.done()
                return await stream

        in_flight = asyncio.run(main())
        assert seen["still_running"], "the drain must have happened while the stream ran"
        assert seen["drain"] == (200, {"status": "draining", "num_in_flight": 1})
        new = seen["new"]
        assert (new.status, new.error_code) == (503, "backend_unavailable")
        assert "draining" in new.error_message
        assert seen["ready"].status_code == 503
        assert seen["ready"].json() == {"status": "draining", "loop": "running",
                                        "transport": "none", "role": "colocated"}
        assert seen["live"].status_code == 200
        assert seen["stats"]["is_draining"] is True and seen["stats"]["is_loop_alive"] is True
        assert (in_flight.token_ids, in_flight.finish_reason) == (expected, "length")


def test_internal_token_guards_everything_but_health_and_metrics(llama: Path) -> None:
    token = "internal-0123456789abcdef"
    with serve(make_engine(llama, max_model_len=256, internal_token=token)) as served:
        request = greedy("r", PROMPT_A, 4)
        for headers in ({}, {INTERNAL_TOKEN_HEADER: "wrong"}, {INTERNAL_TOKEN_HEADER: ""}):
            refused = httpx.post(f"{served.url}/v1/generate", json=request, headers=headers)
            assert refused.status_code == 401
            error = refused.json()["error"]
            assert error["code"] == "invalid_internal_token"
            assert token not in refused.text
        for path in ("/v1/stats", "/v1/model_info", "/v1/coldstart"):
            assert get(served, path).status_code == 401, path
        assert httpx.post(f"{served.url}/v1/drain").status_code == 401
        ok = generate(served.url, request, headers={INTERNAL_TOKEN_HEADER: token})
        assert ok.status == 200 and ok.finish_reason == "length"
        for path in ("/health", "/health/live", "/health/ready", "/metrics"):
            assert get(served, path).status_code == 200, path
        assert get(served, "/v1/stats", headers={INTERNAL_TOKEN_HEADER: token}).status_code == 200
        assert not served.async_engine.is_draining  # the refused drain did nothing


def test_prefill_decode_hand_over_kv_on_the_engine_thread_with_the_token(llama: Path) -> None:
    """Decode pulls the KV from prefill (/v1/prefill, sent with the internal token) over an
    in-process XCCL transport; the tokens equal colocated serving's, nothing leaks."""
    token = "pd-token-0123456789"
    common: dict[str, Any] = {"max_model_len": 256, "transport": "memory",
                              "group": "pd-robustness", "internal_token": token}
    prefill = make_engine(llama, role="prefill", **common)
    decode = make_engine(llama, role="decode", **common)
    with serve(make_engine(llama, max_model_len=256)) as colocated:
        expected = {p: generate(colocated.url, greedy(f"ref{i}", p, 24)).token_ids
                    for i, p in enumerate((PROMPT_A, PROMPT_B, PROMPT_C))}
    headers = {INTERNAL_TOKEN_HEADER: token}
    with serve(prefill) as p_served, serve(decode) as d_served:
        source = {"prefill_url": p_served.url, "prefill_rank": "prefill-0"}
        requests = [{**greedy(f"pd{i}", p, 24), "kv_source": source}
                    for i, p in enumerate((PROMPT_A, PROMPT_B, PROMPT_C))]

        async def main() -> list[Outcome]:
            async with httpx.AsyncClient(timeout=120) as client:
                return list(await asyncio.gather(
                    *(agenerate(client, d_served.url, r, headers=headers) for r in requests)))

        outcomes = asyncio.run(main())
        for outcome, prompt in zip(outcomes, (PROMPT_A, PROMPT_B, PROMPT_C), strict=True):
            assert outcome.error_code is None, outcome
            assert outcome.token_ids == expected[prompt]
        assert prefill.exported_kv == {}
        wait_until(lambda: all_blocks_free(p_served) and all_blocks_free(d_served),
                   what="blocks freed on both sides")
        for served in (p_served, d_served):
            assert get(served, "/health/ready").json()["transport"] == "ok"


def test_readiness_follows_the_redis_transport(llama: Path, tmp_path: Path) -> None:
    from moeflow.xccl.redis_server import start_local_redis

    redis = start_local_redis(tmp_path / "redis")
    try:
        engine = make_engine(llama, max_model_len=256, role="prefill", transport="redis",
                             group="ready-redis", redis_url=redis.url)
        with serve(engine) as served:
            ready = get(served, "/health/ready")
            assert (ready.status_code, ready.json()["transport"]) == (200, "ok")
            redis.stop()
            ready = get(served, "/health/ready")
            assert ready.status_code == 503
            assert ready.json() == {"status": "unhealthy", "loop": "running",
                                    "transport": "unreachable", "role": "prefill"}
            assert get(served, "/health/live").status_code == 200  # alive: do not restart it
            stats = get(served, "/v1/stats").json()
            assert stats["is_transport_ok"] is False and stats["is_loop_alive"] is True
    finally:
        redis.stop()
