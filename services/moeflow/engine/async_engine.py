"""Runs an ``LLMEngine`` on its own thread and serves it to asyncio callers.

The compute thread owns the engine; callers only enqueue commands (add, abort, ...) and receive
items on per-request asyncio queues. A caller that stops iterating (client disconnect,
cancellation) aborts its request, which frees its KV blocks on the next loop turn.

Failure containment (docs/operations.md, "Engine instances"):

- A step that raises (``StepFailed``) fails only the requests in that step: each gets the
  step's error (``internal_error``, or ``experts_unavailable`` for a missing expert), their
  blocks are already free, and the loop goes on. A request that fails on its own (non-finite
  logits, its output) gets its error the same way.
- A command that raises for one request (adding it, attaching its KV) fails that request.
- ``max_consecutive_step_failures`` internal step failures in a row, or any exception outside
  a step, end the loop for good: every open request gets ``backend_unavailable``, the engine
  reports ``is_loop_alive`` False (liveness fails) and its server exits non-zero
  (``moeflow.coldstart.launch``).
- Draining (``drain``): new requests are refused with ``backend_unavailable``, those in flight
  finish; ``num_in_flight`` tells when none is left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import torch

from moeflow.domain.errors import BackendUnavailableError, MoeflowError
from moeflow.domain.messages import GenerateRequest, TokenChunk
from moeflow.engine.kernels import native
from moeflow.engine.kv_transfer import KVLanding, LayerwiseKVSender
from moeflow.engine.llm_engine import STEP_FAILED_MESSAGE, LLMEngine, StepFailed

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5
_BLOCKED_WAIT_S = 0.005
MAX_CONSECUTIVE_STEP_FAILURES = 5
"""Internal step failures in a row after which the engine counts as broken."""

LOOP_NOT_RUNNING = "the engine loop is not running"
DRAINING = "this instance is draining: it takes no new requests"
LOOP_DIED = "the engine instance failed; the request can be retried"
SHUTTING_DOWN = "the engine instance is shutting down"


@dataclass(frozen=True)
class KVPullReady:
    """Decode role: blocks are reserved for this request; land its KV there and ``attach_kv``."""

    request_id: str
    landing: KVLanding | None = None


@dataclass(frozen=True)
class KVExport:
    """Prefill role: the prompt's KV [layers, 2, tokens, K, Hd], handed over by the engine
    thread right before the request's last ``TokenChunk`` (the engine is not thread-safe, so
    callers never read it from the engine themselves)."""

    request_id: str
    kv: torch.Tensor


Item = TokenChunk | KVPullReady | KVExport


class EngineLoopDead(RuntimeError):
    """The loop gave up (too many failed steps in a row)."""


@dataclass
class _Add:
    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue[Item | BaseException]
    exports_kv: bool | LayerwiseKVSender = False


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AttachKV:
    request_id: str
    kv: torch.Tensor | None
    first_token_id: int
    num_cached_tokens: int
    kv_bytes: int
    kv_transfer_ms: float


@dataclass
class _Fail:
    request_id: str
    error: MoeflowError


@dataclass
class _FailAll:
    error: MoeflowError


_Command = _Add | _Abort | _AttachKV | _Fail | _FailAll


def _put_all(batch: list[tuple[_Add, Item]]) -> None:
    """On the event loop: put each item into its stream's outbox, in order."""
    for add, item in batch:
        add.outbox.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *,
                 max_consecutive_step_failures: int = MAX_CONSECUTIVE_STEP_FAILURES) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._outboxes: dict[str, _Add] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._is_stopping = False
        self._is_draining = False
        self._is_closed = False
        # Taken around "is the loop alive? then enqueue" and around the loop's death, so no
        # request can be enqueued after the dead loop emptied its inbox (it would hang).
        self._admit_lock = threading.Lock()
        self._max_consecutive_step_failures = max_consecutive_step_failures
        self._consecutive_step_failures = 0
        self.fatal_error: BaseException | None = None
        """Why the loop died (None while it runs, or after a clean stop)."""
        self.num_in_flight = 0
        """Open ``generate`` calls (event-loop thread only)."""
        self.num_step_failures_total = 0
        self.num_failed_requests_total = 0
        """Requests ended by a failed step or on their own (not client errors)."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._is_stopping = True
        self._inbox.put(None)
        if self._thread.ident is not None:
            self._thread.join(timeout=timeout_s)

    # -- state -----------------------------------------------------------------------------
    @property
    def is_started(self) -> bool:
        return self._thread.ident is not None

    @property
    def is_loop_alive(self) -> bool:
        """The loop thread runs and has not given up (liveness)."""
        return self._thread.is_alive() and self.fatal_error is None and not self._is_closed

    @property
    def is_healthy(self) -> bool:
        """Kept for callers of the old name: ``is_loop_alive``."""
        return self.is_loop_alive

    @property
    def is_draining(self) -> bool:
        return self._is_draining

    def drain(self) -> None:
        """Stop admitting new requests; those in flight finish. Safe from a signal handler."""
        self._is_draining = True

    def check_accepting(self) -> None:
        """Raise ``BackendUnavailableError`` unless a new request can be admitted now."""
        if not self.is_loop_alive:
            raise BackendUnavailableError(LOOP_NOT_RUNNING)
        if self._is_draining:
            raise BackendUnavailableError(DRAINING)

    # -- commands (any thread) -------------------------------------------------------------
    def attach_kv(
        self, request_id: str, kv: torch.Tensor | None, first_token_id: int, *,
        num_cached_tokens: int, kv_bytes: int, kv_transfer_ms: float,
    ) -> None:
        self._inbox.put(
            _AttachKV(request_id, kv, first_token_id, num_cached_tokens, kv_bytes, kv_transfer_ms)
        )

    def fail(self, request_id: str, error: MoeflowError) -> None:
        """End a request with ``error`` (delivered to its stream) and free its blocks."""
        self._inbox.put(_Fail(request_id, error))

    def fail_all(self, error: MoeflowError) -> None:
        """End every request in the engine with ``error`` (a drain that ran out of time)."""
        self._inbox.put(_FailAll(error))

    async def generate(
        self, request: GenerateRequest, *, exports_kv: bool | LayerwiseKVSender = False
    ) -> AsyncGenerator[Item, None]:
        """Admit now (raising the client's error), then yield items until a chunk finishes.

        Raises ``BackendUnavailableError`` when the loop is dead or the engine drains, the
        client's error for a request it cannot take, and the request's error if it fails
        later (a failed step: ``internal_error``; the loop died: ``backend_unavailable``)."""
        self.check_accepting()
        self.engine.check_admission(request)
        outbox: asyncio.Queue[Item | BaseException] = asyncio.Queue()
        with self._admit_lock:
            if not self.is_loop_alive:
                raise BackendUnavailableError(LOOP_NOT_RUNNING)
            self._inbox.put(_Add(request, asyncio.get_running_loop(), outbox, exports_kv))
        self.num_in_flight += 1
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
            self.num_in_flight -= 1
            if not is_done:
                self._inbox.put(_Abort(request.request_id))

    # -- compute thread --------------------------------------------------------------------
    def _deliver(self, add: _Add, item: Item | BaseException) -> None:
        try:
            add.loop.call_soon_threadsafe(add.outbox.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self._inbox.put(_Abort(add.request.request_id))

    def _fail_request(self, request_id: str, error: MoeflowError) -> None:
        """Abort (frees its blocks) and deliver ``error`` to the request's stream."""
        add = self._outboxes.pop(request_id, None)
        self.engine.abort(request_id)
        if add is not None:
            self.num_failed_requests_total += 1
            self._deliver(add, error)

    def _handle(self, command: _Command) -> None:
        if isinstance(command, _Abort):
            self._outboxes.pop(command.request_id, None)
            self.engine.abort(command.request_id)
        elif isinstance(command, _Fail):
            add = self._outboxes.pop(command.request_id, None)
            self.engine.abort(command.request_id)
            if add is not None:
                self._deliver(add, command.error)
        elif isinstance(command, _FailAll):
            for request_id in list(self._outboxes):
                self._fail_request(request_id, command.error)
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
            except Exception:  # one request's KV must not take the loop down
                logger.exception("attaching the KV of request %s failed", command.request_id)
                self._fail_request(command.request_id, MoeflowError(STEP_FAILED_MESSAGE))
                return
            if chunk is not None:
                self._dispatch([chunk])
        else:
            try:
                self.engine.add_request(command.request, exports_kv=command.exports_kv)
            except MoeflowError as exc:
                self._deliver(command, exc)
                return
            except Exception:  # one request that cannot be added must not take the loop down
                logger.exception("adding request %s failed", command.request.request_id)
                self.engine.abort(command.request.request_id)
                self.num_failed_requests_total += 1
                self._deliver(command, MoeflowError(STEP_FAILED_MESSAGE))
                return
            self._outboxes[command.request.request_id] = command

    def _dispatch(self, chunks: list[TokenChunk]) -> None:
        """Hand a step's chunks to their streams: one wake-up per event loop per step, not
        one per chunk (each wake-up is a write to the loop's self-pipe and a round of its
        ready queue, taken from the cores the next step computes on)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Add, Item]]] = {}
        for chunk in chunks:
            kv = None
            if chunk.finish_reason is not None:  # prefill role: the KV leaves with its request
                kv = self.engine.exported_kv.pop(chunk.request_id, None)
            add = self._outboxes.get(chunk.request_id)
            if add is None:
                continue
            batch = batches.setdefault(add.loop, [])
            if kv is not None:
                batch.append((add, KVExport(chunk.request_id, kv)))
            batch.append((add, chunk))
            if chunk.finish_reason is not None:
                del self._outboxes[chunk.request_id]
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for add, _ in batch:
                    self._inbox.put(_Abort(add.request.request_id))

    def _step(self) -> None:
        try:
            chunks = self.engine.step()
        except StepFailed as failure:  # the step's requests fail; serving goes on
            self.num_step_failures_total += 1
            logger.warning("step failed for %d requests: %s",
                           len(failure.request_ids), failure.error.message)
            for request_id in failure.request_ids:
                self._fail_request(request_id, failure.error)
            if failure.is_internal:
                self._consecutive_step_failures += 1
                if self._consecutive_step_failures >= self._max_consecutive_step_failures:
                    raise EngineLoopDead(
                        f"{self._consecutive_step_failures} steps in a row failed"
                    ) from failure
        else:
            if not self.engine.last_step_was_idle:
                self._consecutive_step_failures = 0
            self._dispatch(chunks)
        for request_id, error in self.engine.failed_requests:
            self._fail_request(request_id, error)
        self.engine.failed_requests.clear()
        for request_id in self.engine.pending_kv_pulls:
            add = self._outboxes.get(request_id)
            if add is not None:
                self._deliver(add, KVPullReady(request_id,
                                               self.engine.kv_landings.get(request_id)))
        self.engine.pending_kv_pulls.clear()

    def _pin_threads(self) -> None:
        """``bind_threads``: pin this (the computing) thread's parallel team, one per CPU."""
        settings = self.engine.settings
        if not settings.bind_threads:
            return
        kernels = native.library()
        cpus = sorted(os.sched_getaffinity(0))[: torch.get_num_threads()]
        if kernels is None:
            logger.warning("bind_threads needs the C kernels, which are off: threads not pinned")
            return
        try:
            kernels.bind_threads(cpus)
        except OSError as exc:
            logger.warning("%s: threads not pinned", exc)
            return
        logger.info("compute threads pinned to CPUs %s", cpus)

    def _run(self) -> None:
        try:
            self._pin_threads()
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
                self._step()
        except BaseException as exc:  # a crashed loop must fail requests, not hang them
            logger.critical("engine loop died: %r; the instance is no longer alive", exc,
                            exc_info=exc)
            self._close_out(BackendUnavailableError(LOOP_DIED), fatal=exc)
            return
        self._close_out(BackendUnavailableError(SHUTTING_DOWN), fatal=None)

    def _close_out(self, error: MoeflowError, *, fatal: BaseException | None) -> None:
        """The loop ends: fail every open request, and any still queued, with ``error``."""
        with self._admit_lock:
            self.fatal_error = fatal
            self._is_closed = True  # nothing is admitted afterwards
            while True:
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, _Add):
                    self._deliver(command, error)
            for add in self._outboxes.values():
                self._deliver(add, error)
            self._outboxes.clear()
