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

import torch

from moeflow.domain.errors import BackendUnavailableError, MoeflowError
from moeflow.domain.messages import GenerateRequest, TokenChunk
from moeflow.engine.llm_engine import LLMEngine, StepFailed

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5
_BLOCKED_WAIT_S = 0.005


@dataclass(frozen=True)
class KVPullReady:
    """Decode role: blocks are reserved for this request; fetch its KV and ``attach_kv``."""

    request_id: str


Item = TokenChunk | KVPullReady


@dataclass
class _Add:
    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue[Item | BaseException]
    exports_kv: bool = False


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AttachKV:
    request_id: str
    kv: torch.Tensor
    first_token_id: int
    num_cached_tokens: int
    kv_bytes: int
    kv_transfer_ms: float


@dataclass
class _Fail:
    request_id: str
    error: MoeflowError


_Command = _Add | _Abort | _AttachKV | _Fail


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
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

    def attach_kv(
        self, request_id: str, kv: torch.Tensor, first_token_id: int, *,
        num_cached_tokens: int, kv_bytes: int, kv_transfer_ms: float,
    ) -> None:
        self._inbox.put(
            _AttachKV(request_id, kv, first_token_id, num_cached_tokens, kv_bytes, kv_transfer_ms)
        )

    def fail(self, request_id: str, error: MoeflowError) -> None:
        """End a request with ``error`` (delivered to its stream) and free its blocks."""
        self._inbox.put(_Fail(request_id, error))

    async def generate(
        self, request: GenerateRequest, *, exports_kv: bool = False
    ) -> AsyncGenerator[Item, None]:
        """Admit now (raising the client's error), then yield items until a chunk finishes."""
        if not self.is_healthy:
            raise BackendUnavailableError("the engine loop is not running")
        self.engine.check_admission(request)
        outbox: asyncio.Queue[Item | BaseException] = asyncio.Queue()
        self._inbox.put(_Add(request, asyncio.get_running_loop(), outbox, exports_kv))
        is_done = False
        try:
            while True:
                item = await outbox.get()
                if isinstance(item, BaseException):
                    is_done = True
                    raise item
                if isinstance(item, TokenChunk) and item.finish_reason is not None:
                    is_done = True
                yield item
                if is_done:
                    return
        finally:
            if not is_done:
                self._inbox.put(_Abort(request.request_id))

    # -- compute thread --------------------------------------------------------------------
    def _deliver(self, add: _Add, item: Item | BaseException) -> None:
        try:
            add.loop.call_soon_threadsafe(add.outbox.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self._inbox.put(_Abort(add.request.request_id))

    def _handle(self, command: _Command) -> None:
        if isinstance(command, _Abort):
            self._outboxes.pop(command.request_id, None)
            self.engine.abort(command.request_id)
        elif isinstance(command, _Fail):
            add = self._outboxes.pop(command.request_id, None)
            self.engine.abort(command.request_id)
            if add is not None:
                self._deliver(add, command.error)
        elif isinstance(command, _AttachKV):
            try:
                chunk = self.engine.attach_kv(
                    command.request_id, command.kv, command.first_token_id,
                    num_cached_tokens=command.num_cached_tokens, kv_bytes=command.kv_bytes,
                    kv_transfer_ms=command.kv_transfer_ms,
                )
            except ValueError as exc:
                self._handle(_Fail(command.request_id, BackendUnavailableError(str(exc))))
                return
            if chunk is not None:
                self._dispatch([chunk])
        else:
            try:
                self.engine.add_request(command.request, exports_kv=command.exports_kv)
            except MoeflowError as exc:
                self._deliver(command, exc)
                return
            self._outboxes[command.request.request_id] = command

    def _dispatch(self, chunks: list[TokenChunk]) -> None:
        for chunk in chunks:
            add = self._outboxes.get(chunk.request_id)
            if add is None:
                continue
            self._deliver(add, chunk)
            if chunk.finish_reason is not None:
                del self._outboxes[chunk.request_id]

    def _run(self) -> None:
        try:
            while not self._is_stopping:
                command: _Command | None = None
                try:
                    if self.engine.has_work and not self.engine.last_step_was_idle:
                        command = self._inbox.get_nowait()
                    else:  # idle, or blocked on memory: wake on a command, or soon
                        timeout_s = _BLOCKED_WAIT_S if self.engine.has_work else _IDLE_WAIT_S
                        command = self._inbox.get(timeout=timeout_s)
                except queue.Empty:
                    pass
                while command is not None:
                    self._handle(command)
                    try:
                        command = self._inbox.get_nowait()
                    except queue.Empty:
                        command = None
                try:
                    self._dispatch(self.engine.step())
                except StepFailed as failure:  # the step's requests fail; serving goes on
                    logger.warning("step failed for %d requests: %s",
                                   len(failure.request_ids), failure.error.message)
                    for request_id in failure.request_ids:
                        add = self._outboxes.pop(request_id, None)
                        if add is not None:
                            self._deliver(add, failure.error)
                for request_id in self.engine.pending_kv_pulls:
                    add = self._outboxes.get(request_id)
                    if add is not None:
                        self._deliver(add, KVPullReady(request_id))
                self.engine.pending_kv_pulls.clear()
        except BaseException as exc:  # a crashed loop must fail requests, not hang them
            logger.exception("engine loop crashed")
            self.fatal_error = exc
            for add in self._outboxes.values():
                self._deliver(add, BackendUnavailableError("the engine loop crashed"))
            self._outboxes.clear()
