"""The test double of `WarmClaimClient` (moeflow.controller.warm_claim): warm workers by
(host, port) that take one claim each, as a real worker does. It passes the same contract as
the HTTP client against a real worker (tests/integration/coldstart/test_warm_claim.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any


class FakeWarmClaims:
    """Idle workers at `addresses`; anything else does not answer. A claim whose settings lack
    `model_path` or name another port is refused (400), a second claim too (409)."""

    def __init__(self, addresses: Iterable[tuple[str, int]] = ()) -> None:
        self.claimed: dict[tuple[str, int], dict[str, Any] | None] = dict.fromkeys(addresses)
        self._lock = threading.Lock()

    def add(self, host: str, port: int) -> None:
        with self._lock:
            self.claimed.setdefault((host, port), None)

    def claim(self, host: str, port: int, message: Mapping[str, Any]) -> str | None:
        with self._lock:
            if (host, port) not in self.claimed:
                return f"no answer from {host}:{port}"
            settings = message.get("settings")
            if not isinstance(settings, Mapping) or "model_path" not in settings:
                return "400: bad claim: settings.model_path: Field required"
            if settings.get("port", 8001) != port:
                return f"400: bad claim: settings.port: {settings.get('port')}, but {port}"
            if self.claimed[(host, port)] is not None:
                return "409: this worker is already claimed"
            self.claimed[(host, port)] = dict(message)
            return None
