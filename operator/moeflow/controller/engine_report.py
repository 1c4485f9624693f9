"""What the operator asks engines directly, over HTTP on the Pod IP. Any failure means "not
now" (nothing is reported), never an error.

- Cold start (``GET /v1/coldstart``), for EngineInstance status: asked once, when an
EngineInstance's Pod turns
  Ready and the EngineInstance's ``coldStart`` lacks the engine-reported steps; the answer's
  ``task_status`` already uses the CRD's field names. ``firstRoutedRequestSeconds`` is present
  only if a request was served before that read.
- Load (``GET /v1/stats``), for the autoscaler: asked every autoscale interval of each ready
  engine of an autoscaled role, through the ``EngineStatsClient`` protocol so tests can put a
  double in its place (tests/unit/controller/test_ctl_engine_stats.py is the contract both
  pass).
Both paths need the Model's internal token (``token``, from its Secret
``<model>-internal-token``): engines answer only health and metrics without it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import httpx

from moeflow.domain.messages import EngineStats
from moeflow.web.internal_auth import internal_headers

logger = logging.getLogger(__name__)

ENGINE_FIELDS = ("enginePreloadSeconds", "weightLoadSeconds", "postLoadSeconds",
                 "firstRoutedRequestSeconds")


def needs_report(cold_start: Mapping[str, Any] | None) -> bool:
    return not cold_start or "weightLoadSeconds" not in cold_start


def fetch_cold_start(pod_ip: str, port: int, timeout_s: float = 1.0,
                     token: str | None = None) -> dict[str, float]:
    """The engine-reported coldStart fields, or {} when the engine cannot tell now."""
    try:
        response = httpx.get(f"http://{pod_ip}:{port}/v1/coldstart", timeout=timeout_s,
                             headers=internal_headers(token))
        reported = response.json().get("task_status") or {}
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        logger.info("cold-start report of %s:%s unavailable: %s", pod_ip, port, exc)
        return {}
    return {k: float(v) for k, v in reported.items()
            if k in ENGINE_FIELDS and isinstance(v, int | float) and v >= 0}


class EngineStatsClient(Protocol):
    def stats(self, host: str, port: int, token: str | None = None) -> EngineStats | None:
        """The engine's ``/v1/stats`` now, asked with the internal ``token``; None when it
        does not answer well in time."""


class HttpEngineStats:
    """``EngineStatsClient`` over HTTP; safe to share between threads (httpx.Client is)."""

    def __init__(self, timeout_s: float = 1.0) -> None:
        self._http = httpx.Client(timeout=timeout_s)

    def stats(self, host: str, port: int, token: str | None = None) -> EngineStats | None:
        try:
            response = self._http.get(f"http://{host}:{port}/v1/stats",
                                      headers=internal_headers(token))
            response.raise_for_status()
            return EngineStats.model_validate_json(response.content)
        except (httpx.HTTPError, ValueError) as exc:
            logger.info("stats of %s:%s unavailable: %s", host, port, exc)
            return None

    def close(self) -> None:
        self._http.close()
