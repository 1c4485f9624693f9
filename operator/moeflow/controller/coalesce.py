"""Single-flight, coalescing execution of status refreshes, keyed by object.

Many events can ask for the same refresh at once (64 EngineInstances of one RoleGroup turning
Ready). Running
them concurrently would race (an older read could be written last) and waste API calls. A
`Coalescer` runs at most one refresh per key at a time and folds every request that arrives
meanwhile into exactly one more run.

Contract of `await run(key, fn)`: returns after a run of fn for `key` that *started after this
call* has finished (so it saw the world as of the call), and raises that run's error.
Single event loop only (kopf's); not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

Refresh = Callable[[], Awaitable[None]]


@dataclass
class _Slot:
    fn: Refresh
    pending: asyncio.Future[None] | None = None
    runner: asyncio.Task[None] | None = None


class Coalescer:
    def __init__(self) -> None:
        self._slots: dict[Hashable, _Slot] = {}

    async def run(self, key: Hashable, fn: Refresh) -> None:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(fn=fn)
        slot.fn = fn  # the latest closure wins; all closures of one key do the same thing
        if slot.pending is None:
            slot.pending = asyncio.get_running_loop().create_future()
        waiter = slot.pending
        if slot.runner is None:
            slot.runner = asyncio.create_task(self._drain(key, slot))
        # Shielded: a cancelled caller must not cancel a run that others also wait for.
        await asyncio.shield(waiter)

    async def _drain(self, key: Hashable, slot: _Slot) -> None:
        try:
            while slot.pending is not None:
                waiter, slot.pending = slot.pending, None
                try:
                    await slot.fn()
                except Exception as e:
                    waiter.set_exception(e)
                    # Retrieved by the awaiting callers; if all were cancelled, mark it seen.
                    waiter.add_done_callback(_consume)
                else:
                    waiter.set_result(None)
        finally:
            del self._slots[key]

    @property
    def num_busy_keys(self) -> int:
        return len(self._slots)


def _consume(future: asyncio.Future[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError, Exception):
        future.exception()
