"""The scale-from-zero wait: bounded per model, released at once on wake, never hangs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from moeflow.domain.errors import BackendUnavailableError, OverloadedError
from moeflow.gateway.scale_from_zero import SSE_KEEP_ALIVE, WakeQueue


class FakeModels:
    """The requester and the registry: asking for a model makes it ready after a few probes."""

    def __init__(self, probes_to_ready: int | None = 2) -> None:
        self.requests: list[tuple[str, int]] = []
        self.ready: set[str] = set()
        self.probes_to_ready = probes_to_ready
        self.num_probes = 0
        self.counts: list[tuple[str, int]] = []

    def request_scale_up(self, model: str, num_waiting: int) -> None:
        self.requests.append((model, num_waiting))

    async def probe(self) -> None:
        self.num_probes += 1
        if self.requests and self.num_probes == self.probes_to_ready:
            self.ready.add(self.requests[-1][0])

    def queue(self, *, max_waiting: int = 3, timeout_s: float = 5.0,
              with_requester: bool = True) -> WakeQueue:
        return WakeQueue(
            requester=self if with_requester else None,
            is_ready=lambda model: model in self.ready,
            probe=self.probe,
            max_waiting=max_waiting,
            timeout_s=timeout_s,
            retry_after_s=2,
            on_count=lambda model, n: self.counts.append((model, n)),
            probe_interval_s=0.01,
        )


async def test_a_ready_model_or_no_requester_never_waits() -> None:
    models = FakeModels()
    models.ready.add("m")
    assert models.queue().hold("m") is None
    assert models.queue(with_requester=False).hold("other") is None
    assert models.requests == []


async def test_waiters_are_released_together_once_an_instance_is_ready() -> None:
    models = FakeModels()
    queue = models.queue()
    waits = [asyncio.create_task(queue.wait_until_ready("m")) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*waits), 2)
    assert models.requests[0] == ("m", 3)
    assert queue.num_waiting("m") == 0
    assert models.counts[-1] == ("m", 0)


async def test_past_the_bound_is_429_with_retry_after() -> None:
    models = FakeModels(probes_to_ready=None)
    queue = models.queue(max_waiting=2)
    tickets = [queue.hold("m"), queue.hold("m")]
    with pytest.raises(OverloadedError) as info:
        queue.hold("m")
    assert info.value.retry_after_s == 2
    assert "2 requests already wait for 'm'" in info.value.message
    for ticket in tickets:
        assert ticket is not None
        ticket.release()
        ticket.release()  # idempotent
    assert queue.num_waiting("m") == 0
    queue.close()


async def test_past_the_deadline_is_503_with_a_clear_message() -> None:
    queue = FakeModels(probes_to_ready=None).queue(timeout_s=0.1)
    with pytest.raises(BackendUnavailableError, match="scaling up from zero.*within 0.1 s"):
        await asyncio.wait_for(queue.wait_until_ready("m"), 2)
    assert queue.num_waiting("m") == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    queue = FakeModels(probes_to_ready=None).queue()
    waiter = asyncio.create_task(queue.wait_until_ready("m"))
    await asyncio.sleep(0.05)
    assert queue.num_waiting("m") == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.num_waiting("m") == 0


async def test_a_disconnected_client_stops_waiting() -> None:
    queue = FakeModels(probes_to_ready=None).queue()

    async def gone() -> bool:
        return True

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(queue.wait_until_ready("m", gone), 2)
    assert queue.num_waiting("m") == 0


async def _collect(events: AsyncIterator[str]) -> list[str]:
    return [e async for e in events]


async def test_a_stream_gets_a_keep_alive_first_then_its_events() -> None:
    models = FakeModels(probes_to_ready=5)
    queue = models.queue()
    ticket = queue.hold("m")
    assert ticket is not None

    async def start() -> str:
        return "opened"

    async def render(opened: str) -> AsyncIterator[str]:
        yield f"data: {opened}\n\n"

    events = await asyncio.wait_for(
        _collect(queue.sse_after_wake(ticket, 0.01, start, render)), 2)
    assert events[0] == SSE_KEEP_ALIVE
    assert events[-1] == "data: opened\n\n"
    assert set(events[:-1]) == {SSE_KEEP_ALIVE}
    assert queue.num_waiting("m") == 0


async def test_a_stream_past_the_deadline_ends_with_an_sse_error() -> None:
    queue = FakeModels(probes_to_ready=None).queue(timeout_s=0.05)
    ticket = queue.hold("m")
    assert ticket is not None

    async def start() -> str:
        raise AssertionError("never started")

    async def render(_: str) -> AsyncIterator[str]:
        yield ""

    events = await asyncio.wait_for(
        _collect(queue.sse_after_wake(ticket, 0.01, start, render)), 2)
    assert events[0] == SSE_KEEP_ALIVE
    assert events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "backend_unavailable" and "scaling up from zero" in error["message"]
    assert queue.num_waiting("m") == 0
