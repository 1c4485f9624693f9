"""Runs an ``LLMEngine`` on its own thread and serves it to asyncio callers.

The compute thread owns the engine; callers only enqueue commands (add, abort) and receive
``TokenChunk`` objects on per-request asyncio queues. A caller that stops iterating (client
disconnect, cancellation) aborts its request, which frees its KV blocks on the next loop turn.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from moeflow.common.errors import BackendUnavailableError, MoeflowError
from moeflow.common.messages import GenerateRequest, TokenChunk
from moeflow.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


@dataclass
class _Add:
    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue[TokenChunk | BaseException]


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._outboxes: dict[str, _Add] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._is_stopping = False
        self.fatal_error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._is_stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=timeout_s)

    @property
    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self.fatal_error is None

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        """Admit now (raising the client's error), then yield chunks until one finishes."""
        if not self.is_healthy:
            raise BackendUnavailableError("the engine loop is not running")
        self.engine.check_admission(request)
        outbox: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
        self._inbox.put(_Add(request, asyncio.get_running_loop(), outbox))
        is_done = False
        try:
            while True:
                item = await outbox.get()
                if isinstance(item, BaseException):
                    is_done = True
                    raise item
                if item.finish_reason is not None:
                    is_done = True
                yield item
                if is_done:
                    return
        finally:
            if not is_done:
                self._inbox.put(_Abort(request.request_id))

    # -- compute thread --------------------------------------------------------------------
    def _deliver(self, add: _Add, item: TokenChunk | BaseException) -> None:
        try:
            add.loop.call_soon_threadsafe(add.outbox.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self._inbox.put(_Abort(add.request.request_id))

    def _handle(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self._outboxes.pop(command.request_id, None)
            self.engine.abort(command.request_id)
            return
        try:
            self.engine.add_request(command.request)
        except MoeflowError as exc:
            self._deliver(command, exc)
            return
        self._outboxes[command.request.request_id] = command

    def _run(self) -> None:
        try:
            while not self._is_stopping:
                command: _Add | _Abort | None = None
                try:
                    if self.engine.has_work:
                        command = self._inbox.get_nowait()
                    else:
                        command = self._inbox.get(timeout=_IDLE_WAIT_S)
                except queue.Empty:
                    pass
                while command is not None:
                    self._handle(command)
                    try:
                        command = self._inbox.get_nowait()
                    except queue.Empty:
                        command = None
                for chunk in self.engine.step():
                    add = self._outboxes.get(chunk.request_id)
                    if add is None:
                        continue
                    self._deliver(add, chunk)
                    if chunk.finish_reason is not None:
                        del self._outboxes[chunk.request_id]
        except BaseException as exc:  # a crashed loop must fail requests, not hang them
            logger.exception("engine loop crashed")
            self.fatal_error = exc
            for add in self._outboxes.values():
                self._deliver(add, BackendUnavailableError("the engine loop crashed"))
            self._outboxes.clear()
