"""Coalescer: one refresh per key at a time; requests during a run fold into one more run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from moeflow.controller.coalesce import Coalescer


async def test_bursts_fold_into_one_extra_run_and_keys_are_independent() -> None:
    coalescer = Coalescer()
    runs: list[str] = []
    gate = asyncio.Event()

    def refresh(key: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            runs.append(key)
            await gate.wait()

        return run

    first = asyncio.create_task(coalescer.run("a", refresh("a")))
    await asyncio.sleep(0.01)
    burst = [asyncio.create_task(coalescer.run("a", refresh("a"))) for _ in range(10)]
    other = asyncio.create_task(coalescer.run("b", refresh("b")))
    await asyncio.sleep(0.01)
    assert runs == ["a", "b"]  # one run per key in flight
    gate.set()
    await asyncio.gather(first, *burst, other)
    assert runs == ["a", "b", "a"]  # the whole burst cost one more run
    assert coalescer.num_busy_keys == 0


async def test_callers_see_a_run_that_started_after_their_call() -> None:
    coalescer = Coalescer()
    seen: list[int] = []
    world = {"version": 0}

    async def refresh() -> None:
        await asyncio.sleep(0.01)
        seen.append(world["version"])

    first = asyncio.create_task(coalescer.run("k", refresh))
    await asyncio.sleep(0.001)  # the first run is in flight and will read version 0
    world["version"] = 1
    await coalescer.run("k", refresh)
    await first
    assert seen[-1] == 1


async def test_errors_reach_the_callers_and_do_not_wedge_the_key() -> None:
    coalescer = Coalescer()

    async def failing() -> None:
        raise RuntimeError("api down")

    with pytest.raises(RuntimeError, match="api down"):
        await coalescer.run("k", failing)

    async def fine() -> None:
        pass

    await coalescer.run("k", fine)
    assert coalescer.num_busy_keys == 0


async def test_a_cancelled_caller_does_not_cancel_the_shared_run() -> None:
    coalescer = Coalescer()
    done = asyncio.Event()

    async def slow() -> None:
        await asyncio.sleep(0.02)
        done.set()

    caller = asyncio.create_task(coalescer.run("k", slow))
    await asyncio.sleep(0.005)
    caller.cancel()
    await asyncio.wait_for(done.wait(), 1)
