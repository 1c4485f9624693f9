"""How the operator hands a claimed warm Pod its instance: ``POST /v1/claim`` on the Pod IP
(the worker's side is ``moeflow.coldstart.warm_pool``).

Through the ``WarmClaimClient`` protocol, so tests can put a double in its place; both the
HTTP client (against a real warm worker) and the double pass the same contract
(tests/integration/coldstart/test_warm_claim.py). The message is the one the local pool
sends: ``{"settings": EngineSettings fields, "weights": null}``, without
``claimed_monotonic`` (the operator's clock is another machine's).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import httpx

logger = logging.getLogger(__name__)
CLAIM_PATH = "/v1/claim"


class WarmClaimClient(Protocol):
    def claim(self, host: str, port: int, message: Mapping[str, Any]) -> str | None:
        """Send one claim; None when the worker took it (it is loading the model now), else
        why not (a refusal, an error or no answer in time). Never raises."""


class HttpWarmClaims:
    """``WarmClaimClient`` over HTTP; safe to share between threads (httpx.Client is)."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self._http = httpx.Client(timeout=timeout_s)

    def claim(self, host: str, port: int, message: Mapping[str, Any]) -> str | None:
        try:
            response = self._http.post(f"http://{host}:{port}{CLAIM_PATH}", json=dict(message))
        except httpx.HTTPError as exc:
            return f"no answer from {host}:{port}: {exc!r}"
        if response.status_code == 202:
            return None
        try:
            error = response.json().get("error") or response.text
        except (ValueError, AttributeError):
            error = response.text
        return f"{response.status_code}: {error}"

    def close(self) -> None:
        self._http.close()
