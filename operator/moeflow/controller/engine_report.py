"""What an engine says about its own cold start (``GET /v1/coldstart``), for Task status.

The operator does not poll engines. It asks once, when a Task's Pod turns Ready and the Task's
``coldStart`` lacks the engine-reported steps; the answer's ``task_status`` already uses the
CRD's field names. Any failure means "not now" (the fields stay absent), never an error.
``firstRoutedRequestSeconds`` is present only if a request was served before that read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import httpx

logger = logging.getLogger(__name__)

ENGINE_FIELDS = ("enginePreloadSeconds", "weightLoadSeconds", "postLoadSeconds",
                 "firstRoutedRequestSeconds")


def needs_report(cold_start: Mapping[str, Any] | None) -> bool:
    return not cold_start or "weightLoadSeconds" not in cold_start


def fetch_cold_start(pod_ip: str, port: int, timeout_s: float = 1.0) -> dict[str, float]:
    """The engine-reported coldStart fields, or {} when the engine cannot tell now."""
    try:
        response = httpx.get(f"http://{pod_ip}:{port}/v1/coldstart", timeout=timeout_s)
        reported = response.json().get("task_status") or {}
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        logger.info("cold-start report of %s:%s unavailable: %s", pod_ip, port, exc)
        return {}
    return {k: float(v) for k, v in reported.items()
            if k in ENGINE_FIELDS and isinstance(v, int | float) and v >= 0}
