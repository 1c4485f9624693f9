"""Scale from zero: hold requests for a model that has no ready instance while one starts.

A model keeps its listing (and its ``ModelInfo``, hence its tokenizer) after its last instance
goes away (``ModelRegistry.sync``), so a request for it is validated and tokenized as usual and
then waits here, in a bounded per-model queue, while a ``ScaleUpRequester`` is asked for an
instance. One background task per waking model re-asks the requester and probes discovery and
instance stats until an instance is ready, then releases every waiter at once.

Limits (``GatewaySettings``): at most ``max_waiting_for_scale_up`` requests wait per model (past
it, 429 with Retry-After) and each waits at most ``scale_up_timeout_s`` (then 503). A streaming
client gets an SSE comment (``: keep-alive``) at once and every ``keep_alive_interval_s`` while
it waits; its deadline error is an SSE error event, since its 200 has already been sent. A waiter
whose client disconnects leaves the queue (its task is cancelled, ``release`` runs).

Without a requester (static instances, or a cluster whose operator does not scale from zero
yet) nothing waits: the request fails at once with 503, as before scale to zero existed. A model
the gateway has never seen is not listed: its tokenizer is unknown until an instance reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from moeflow.domain.errors import BackendUnavailableError, MoeflowError, OverloadedError
from moeflow.web.errors import sse_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_KEEP_ALIVE = ": keep-alive\n\n"
_SSE_DONE = "data: [DONE]\n\n"


class ScaleUpRequester(Protocol):
    """Something that can start instances of a model (local runtime: the scaler; on a cluster,
    later: a patch of the Model's replicas)."""

    def request_scale_up(self, model: str, num_waiting: int) -> None:
        """Ask for at least one ready instance of ``model``; return at once. Called again about
        every second while requests wait, so it must be idempotent."""


@dataclass
class _Wake:
    """One model's wake-up: its waiters and the event that releases them."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    num_waiting: int = 0
    task: asyncio.Task[None] | None = None


class WakeTicket:
    """One request's place in a model's queue; ``release`` (idempotent) gives it back."""

    def __init__(self, queue: WakeQueue, model: str, wake: _Wake, deadline: float) -> None:
        self._queue = queue
        self.model = model
        self._wake = wake
        self._deadline = deadline
        self._is_held = True

    async def wait(self, timeout_s: float | None = None) -> bool:
        """True once an instance is ready, False after ``timeout_s`` (still waiting);
        ``BackendUnavailableError`` once the deadline has passed."""
        remaining = self._deadline - time.monotonic()
        step = remaining if timeout_s is None else min(timeout_s, remaining)
        if step > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.ready.wait(), step)
        if self._wake.ready.is_set():
            return True
        if time.monotonic() >= self._deadline:
            raise BackendUnavailableError(
                f"the model {self.model!r} is scaling up from zero and no instance became ready "
                f"within {self._queue.timeout_s:g} s; retry later"
            )
        return False

    def release(self) -> None:
        if self._is_held:
            self._is_held = False
            self._queue._leave(self.model, self._wake)


class WakeQueue:
    def __init__(
        self,
        *,
        requester: ScaleUpRequester | None,
        is_ready: Callable[[str], bool],
        probe: Callable[[], Awaitable[None]],
        max_waiting: int,
        timeout_s: float,
        retry_after_s: int,
        on_count: Callable[[str, int], None] = lambda _model, _count: None,
        probe_interval_s: float = 0.2,
        rerequest_interval_s: float = 1.0,
    ) -> None:
        self._requester = requester
        self._is_ready = is_ready
        self._probe = probe
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._on_count = on_count
        self._probe_interval_s = probe_interval_s
        self._rerequest_interval_s = rerequest_interval_s
        self._wakes: dict[str, _Wake] = {}

    @property
    def can_wake(self) -> bool:
        return self._requester is not None

    def num_waiting(self, model: str) -> int:
        wake = self._wakes.get(model)
        return wake.num_waiting if wake else 0

    def hold(self, model: str) -> WakeTicket | None:
        """None when ``model`` can be served now (or nothing can wake it); else a ticket.
        A full queue raises ``OverloadedError`` (429)."""
        if self._requester is None or self._is_ready(model):
            return None
        wake = self._wakes.setdefault(model, _Wake())
        if wake.num_waiting >= self.max_waiting:
            raise OverloadedError(
                f"{wake.num_waiting} requests already wait for {model!r} to scale up from zero, "
                "the limit",
                retry_after_s=self._retry_after_s,
            )
        wake.num_waiting += 1
        self._on_count(model, wake.num_waiting)
        if wake.task is None or wake.task.done():
            wake.task = asyncio.create_task(self._run(model, wake))
        return WakeTicket(self, model, wake, time.monotonic() + self.timeout_s)

    async def wait_until_ready(
        self, model: str, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        """Return once ``model`` has a ready instance (at once if it has one). Raises 429/503;
        a client that goes away stops the wait."""
        ticket = self.hold(model)
        if ticket is None:
            return
        try:
            while not await ticket.wait(0.25):
                if is_disconnected is not None and await is_disconnected():
                    raise asyncio.CancelledError("client disconnected")
        finally:
            ticket.release()

    async def sse_after_wake(
        self,
        ticket: WakeTicket,
        keep_alive_interval_s: float,
        start: Callable[[], Awaitable[T]],
        render: Callable[[T], AsyncIterator[str]],
    ) -> AsyncIterator[str]:
        """A stream's events once its model is awake: keep-alive comments while it waits, then
        ``render(await start())``; waiting and start-up errors end the stream as an SSE error."""
        try:
            try:
                yield SSE_KEEP_ALIVE
                while not await ticket.wait(keep_alive_interval_s):
                    yield SSE_KEEP_ALIVE
            finally:
                ticket.release()
            started = await start()
        except MoeflowError as exc:
            yield sse_error(exc)
            yield _SSE_DONE
            return
        async for event in render(started):
            yield event

    def close(self) -> None:
        for wake in self._wakes.values():
            if wake.task is not None:
                wake.task.cancel()

    def _leave(self, model: str, wake: _Wake) -> None:
        wake.num_waiting -= 1
        if self._wakes.get(model) is wake:
            self._on_count(model, wake.num_waiting)

    async def _run(self, model: str, wake: _Wake) -> None:
        """Ask for an instance and probe until one is ready or nobody waits any more."""
        assert self._requester is not None
        asked_at = -float("inf")
        started = time.monotonic()
        try:
            while wake.num_waiting > 0:
                if time.monotonic() - asked_at >= self._rerequest_interval_s:
                    self._requester.request_scale_up(model, wake.num_waiting)
                    asked_at = time.monotonic()
                try:
                    await self._probe()
                except Exception:
                    logger.exception("probing instances of %s failed", model)
                if self._is_ready(model):
                    logger.info("%s is ready after %.1f s; releasing %d waiting request(s)",
                                model, time.monotonic() - started, wake.num_waiting)
                    wake.ready.set()
                    return
                await asyncio.sleep(self._probe_interval_s)
        finally:
            if self._wakes.get(model) is wake:
                del self._wakes[model]
                self._on_count(model, 0)
