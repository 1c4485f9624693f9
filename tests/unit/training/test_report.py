"""Progress reports: the FineTune status sink sends start, checkpoints and the end at once,
coalesces steps in between to the latest, survives a failing API, and flushes on close; the
wire form is the CRD's."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from moeflow.training.report import BarSink, FineTuneStatusSink, Progress, kube_status_writer


class Writes:
    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.calls = 0
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def __call__(self, status: dict[str, Any]) -> None:
        with self.lock:
            self.calls += 1
            if self.fail_first:
                self.fail_first -= 1
                raise ConnectionError("API server hiccup")
            self.bodies.append(status)

    def steps(self) -> list[int]:
        with self.lock:
            return [b["progress"]["step"] for b in self.bodies]


def wait_until(probe: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def progress(step: int, **extra: Any) -> Progress:
    return Progress(step=step, total_steps=100, epoch=step / 50, **extra)


def test_urgent_reports_go_at_once_steps_are_coalesced_close_flushes() -> None:
    writes = Writes()
    sink = FineTuneStatusSink(writes, interval_s=3600)
    sink.report("start", progress(0))
    wait_until(lambda: writes.steps() == [0])
    for step in range(1, 10):
        sink.report("step", progress(step, loss=2.0))
    time.sleep(0.05)
    assert writes.steps() == [0]  # within the interval: held back
    sink.report("checkpoint", progress(10, checkpoint_step=10))
    wait_until(lambda: writes.steps() == [0, 10])  # the latest, at once; 1..9 never sent
    sink.report("step", progress(11, loss=1.5))
    sink.close()
    assert writes.steps() == [0, 10, 11]


def test_a_failing_api_loses_reports_not_the_run() -> None:
    writes = Writes(fail_first=1)
    sink = FineTuneStatusSink(writes, interval_s=0.0)
    sink.report("start", progress(0))
    wait_until(lambda: writes.calls == 1)  # refused, logged, dropped
    sink.report("step", progress(1))
    sink.close()
    assert writes.steps() == [1]


def test_wire_form_is_the_crds() -> None:
    wire = progress(12, loss=1.23456789, learning_rate=1e-4, tokens_per_second=812.345,
                    eta_seconds=61.6, checkpoint_step=10, resumed_from_step=10,
                    trained_tokens=999).wire()
    assert {k: v for k, v in wire.items() if k != "updatedAt"} == {
        "step": 12, "totalSteps": 100, "epoch": 0.24, "loss": 1.234568, "learningRate": 1e-4,
        "tokensPerSecond": 812.3, "etaSeconds": 62, "checkpointStep": 10,
        "resumedFromStep": 10, "trainedTokens": 999}
    assert wire["updatedAt"].endswith("Z")
    assert "loss" not in progress(0).wire()  # unknowns are left out, not null


def test_the_bar_follows_steps_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    bar = BarSink()
    bar.report("start", progress(10, resumed_from_step=10))
    bar.report("step", progress(11, loss=1.0, tokens_per_second=50.0))
    bar.report("checkpoint", progress(11))
    bar.close()
    out, err = capsys.readouterr()
    assert "resumed from the checkpoint at step 10" in err and "11/100" in err
    assert "checkpoint at step 11" in err and out == ""


def test_the_target_must_name_a_namespace_and_a_finetune() -> None:
    with pytest.raises(ValueError, match="<namespace>/<name>"):
        kube_status_writer("just-a-name")
