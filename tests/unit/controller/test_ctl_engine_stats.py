"""The contract of `EngineStatsClient`, which the autoscaler reads engines through: the HTTP
client against a real HTTP server, and the test double that other tests use, pass the same
checks (the engine's stats when it answers well, None otherwise, never an exception)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moeflow.controller.engine_report import EngineStatsClient, HttpEngineStats, fetch_cold_start
from moeflow.domain.messages import EngineStats

STATS = EngineStats(instance_id="m-colocated-0", role="colocated", num_waiting=2,
                    num_running=3, num_free_blocks=5, num_total_blocks=10,
                    num_prefix_hit_tokens=0, num_prompt_tokens_total=40,
                    num_preemptions_total=0)
COLD_START = {"enginePreloadSeconds": 1.5, "weightLoadSeconds": 2.0, "postLoadSeconds": 0.25}
ANSWERS = {"/v1/stats": (200, STATS.model_dump_json().encode()),
           "/v1/coldstart": (200, json.dumps({"task_status": COLD_START}).encode())}
TOKEN = "the-models-internal-token"


class _Engine(BaseHTTPRequestHandler):
    """Like an engine with MOEFLOW_INTERNAL_TOKEN set: /v1/stats only with the token."""

    def do_GET(self) -> None:  # noqa: N802
        status, body = ANSWERS.get(self.path, (404, b"{}"))
        if self.headers.get("x-moeflow-internal-token") != TOKEN:
            status, body = 401, b'{"error": {"code": "invalid_internal_token"}}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        return None


class FakeEngineStats:
    """The double: stats by (host, port); anything unknown does not answer."""

    def __init__(self, answers: dict[tuple[str, int], EngineStats]) -> None:
        self.answers = answers

    def stats(self, host: str, port: int, token: str | None = None) -> EngineStats | None:
        return self.answers.get((host, port)) if token == TOKEN else None


@pytest.fixture(scope="module")
def engine_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["http", "fake"])
def client(request: pytest.FixtureRequest, engine_port: int) -> Iterator[EngineStatsClient]:
    if request.param == "http":
        http = HttpEngineStats(timeout_s=1.0)
        yield http
        http.close()
    else:
        yield FakeEngineStats({("127.0.0.1", engine_port): STATS})


def test_an_answering_engine_gives_its_stats(client: EngineStatsClient,
                                             engine_port: int) -> None:
    assert client.stats("127.0.0.1", engine_port, TOKEN) == STATS


def test_without_the_models_token_an_engine_gives_none(client: EngineStatsClient,
                                                       engine_port: int) -> None:
    assert client.stats("127.0.0.1", engine_port) is None
    assert client.stats("127.0.0.1", engine_port, "another-models-token") is None


def test_an_engine_that_does_not_answer_gives_none(client: EngineStatsClient) -> None:
    with socket_nobody_listens_on() as port:
        assert client.stats("127.0.0.1", port, TOKEN) is None


def test_a_bad_answer_gives_none(engine_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    http = HttpEngineStats(timeout_s=1.0)
    for answer in ((500, b"{}"), (200, b"not json"), (200, json.dumps({"x": 1}).encode())):
        monkeypatch.setitem(ANSWERS, "/v1/stats", answer)
        assert http.stats("127.0.0.1", engine_port, TOKEN) is None, answer
    http.close()


class socket_nobody_listens_on:  # noqa: N801
    """A port that was free a moment ago (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def __exit__(self, *_: object) -> None:
        return None


def test_the_cold_start_report_is_asked_with_the_models_token(engine_port: int) -> None:
    assert fetch_cold_start("127.0.0.1", engine_port, token=TOKEN) == COLD_START
    assert fetch_cold_start("127.0.0.1", engine_port) == {}
