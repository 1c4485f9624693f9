"""Health of an instance, as probes and the gateway see it (engine and expert instances alike).

- ``GET /health/live``: 200 ``{"status": "ok"}`` while the process and its serving thread(s)
  run; 503 once they died (the process is about to exit; a supervisor restarts it).
- ``GET /health/ready``: 200 only when the instance can take work: alive, model loaded, its
  XCCL transport usable (Redis: a round trip to the server succeeds), not draining. Else 503
  with ``{"status": "unhealthy"|"draining", "loop": "running"|"dead",
  "transport": "ok"|"unreachable"|"none"}``.
- ``GET /health``: the same as ``/health/ready`` (what the gateway and older probes call).

``readiness`` is the pure decision; ``probe_transport`` does the one piece of I/O.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from moeflow.xccl import Transport

logger = logging.getLogger(__name__)

TransportState = Literal["ok", "unreachable", "none"]
LoopState = Literal["running", "dead"]
TRANSPORT_PROBE_TIMEOUT_S = 2.0


def readiness(*, is_loop_alive: bool, transport: TransportState,
              is_draining: bool) -> tuple[int, dict[str, str]]:
    """HTTP status and body of a readiness answer."""
    loop: LoopState = "running" if is_loop_alive else "dead"
    if not is_loop_alive or transport == "unreachable":
        status = "unhealthy"
    elif is_draining:
        status = "draining"
    else:
        status = "ok"
    return (200 if status == "ok" else 503), {"status": status, "loop": loop,
                                              "transport": transport}


def liveness(*, is_loop_alive: bool) -> tuple[int, dict[str, str]]:
    if is_loop_alive:
        return 200, {"status": "ok"}
    return 503, {"status": "unhealthy", "loop": "dead"}


def _transport_usable(transport: Transport) -> bool:
    if getattr(transport, "is_closed", False):
        return False
    is_alive = getattr(transport, "is_alive", None)  # Redis: one round trip to the server
    if callable(is_alive):
        return bool(is_alive(transport.rank))  # our own heartbeat key: we are visible to peers
    return True  # shm and memory endpoints are local: usable while open


async def probe_transport(transport: Transport | None,
                          timeout_s: float = TRANSPORT_PROBE_TIMEOUT_S) -> TransportState:
    """"none" without a transport; "ok" when it is usable; "unreachable" when the check fails,
    raises or takes longer than ``timeout_s`` (run on a worker thread: it may block)."""
    if transport is None:
        return "none"
    try:
        ok = await asyncio.wait_for(asyncio.to_thread(_transport_usable, transport), timeout_s)
    except Exception as exc:  # any failure of the check means: do not send work here
        logger.warning("XCCL transport check failed: %r", exc)
        return "unreachable"
    return "ok" if ok else "unreachable"


def add_health_routes(
    app: FastAPI,
    *,
    is_loop_alive: Callable[[], bool],
    is_draining: Callable[[], bool],
    transport_state: Callable[[], Awaitable[TransportState]],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """``/health/live``, ``/health/ready`` and ``/health`` (= ready); ``extra`` is merged into
    the readiness body (e.g. the role)."""

    @app.get("/health/live")
    async def live() -> JSONResponse:
        status, body = liveness(is_loop_alive=is_loop_alive())
        return JSONResponse(body, status_code=status)

    async def ready() -> JSONResponse:
        status, body = readiness(is_loop_alive=is_loop_alive(),
                                 transport=await transport_state(),
                                 is_draining=is_draining())
        return JSONResponse({**body, **(extra or {})}, status_code=status)

    app.add_api_route("/health/ready", ready, methods=["GET"])
    app.add_api_route("/health", ready, methods=["GET"])
