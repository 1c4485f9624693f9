"""Client-facing 5xx messages never carry internal addresses, whatever a peer's error said."""

from __future__ import annotations

import json

import pytest

from moeflow.domain.errors import BackendUnavailableError, InvalidRequestError
from moeflow.web.errors import error_response, scrub_internal, sse_error

LEAKY = [
    "redis liveness check failed: Error 111 connecting to 127.0.0.1:36499. Connection refused.",
    "engine instance http://10.0.0.3:8001 failed",
    "moeflow-redis.moeflow.svc.cluster.local:6379 is down",
    "cannot create segment /dev/shm/moeflow-kv-17 (no space)",
    "redis://:secret@redis:6379/0 unreachable",
]


@pytest.mark.parametrize("message", LEAKY)
def test_addresses_are_scrubbed_from_5xx_bodies_and_sse_errors(message: str) -> None:
    exc = BackendUnavailableError(message)
    body = json.loads(error_response(exc).body)["error"]["message"]
    event = json.loads(sse_error(exc).removeprefix("data: "))["error"]["message"]
    for text in (body, event):
        assert "<internal>" in text
        for leak in ("127.0.0.1", "10.0.0.3", "svc.cluster.local", "/dev/shm", "secret", ":6379"):
            assert leak not in text, text


def test_ordinary_messages_and_client_errors_are_untouched() -> None:
    plain = "the request was tried 4 times on instances of 'tiny' (ratio 3.5: 2)"
    assert scrub_internal(plain) == plain
    client = InvalidRequestError("stop: http://example.com/x is not a stop sequence")
    assert "http://example.com/x" in json.loads(error_response(client).body)["error"]["message"]
