"""The supervisor over real child processes: restart what dies, give up on what cannot start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moeflow.processes import stop_process, stop_processes
from moeflow.runtime.settings import SupervisionSettings
from moeflow.runtime.supervisor import StartFailed, Supervisor, give_up_reason, restart_delay_s

FAST = SupervisionSettings(restart_backoff_initial_s=0.05, restart_backoff_max_s=0.2,
                           max_start_failures=3, poll_interval_s=0.02, stop_grace_s=2.0)


@dataclass
class CommandUnit:
    """A supervised child running ``argv``; ready once it has run ``settle_s`` (a start whose
    process exits before that fails, as an engine that exits while loading does)."""

    argv: list[str]
    settle_s: float = 0.05
    name: str = "unit"
    role: str = "colocated"
    starts: int = 0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        self.starts += 1
        process = subprocess.Popen(self.argv)
        self.processes.append(process)
        time.sleep(self.settle_s)
        if process.poll() is not None:
            raise StartFailed(f"exited with code {process.returncode} while starting")

    def is_alive(self) -> bool:
        return bool(self.processes) and self.processes[-1].poll() is None

    def exit_code(self) -> int | None:
        return self.processes[-1].poll() if self.processes else None

    def stop(self, grace_s: float) -> None:
        stop_processes(self.processes, grace_s)


@pytest.fixture
def cleanup() -> Iterator[list[Supervisor]]:
    started: list[Supervisor] = []
    yield started
    for supervisor in started:
        supervisor.stop()


def _wait(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    settings = SupervisionSettings()
    assert [restart_delay_s(n, settings) for n in range(1, 8)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert restart_delay_s(10_000, settings) == 10.0


def test_a_killed_process_is_restarted_and_counted(cleanup: list[Supervisor]) -> None:
    unit = CommandUnit(["sleep", "60"])
    restarts: list[str] = []
    supervisor = Supervisor([unit], FAST, on_restart=restarts.append)
    cleanup.append(supervisor)
    supervisor.start()
    assert supervisor.wait_ready()
    first = unit.processes[0]
    os.kill(first.pid, signal.SIGKILL)
    _wait(lambda: len(unit.processes) == 2 and unit.is_alive())
    assert first.wait() == -signal.SIGKILL
    assert restarts == ["colocated"]
    assert supervisor.failure is None


def test_consecutive_failed_starts_give_up_with_one_line(cleanup: list[Supervisor]) -> None:
    unit = CommandUnit(["sh", "-c", "exit 3"], name="engine m-colocated-0")
    reasons: list[str] = []
    given_up = threading.Event()

    def give_up(reason: str) -> None:
        reasons.append(reason)
        given_up.set()

    supervisor = Supervisor([unit], FAST, on_give_up=give_up)
    cleanup.append(supervisor)
    started = time.monotonic()
    supervisor.start()
    assert not supervisor.wait_ready()
    assert given_up.wait(5)
    assert time.monotonic() - started < 5
    assert unit.starts == 3  # max_start_failures
    assert reasons == [supervisor.failure] == [give_up_reason(
        "engine m-colocated-0", 3, "exited with code 3 while starting")]
    assert "\n" not in reasons[0] and "giving up" in reasons[0]


def test_a_start_that_succeeds_again_resets_the_failure_count(
    cleanup: list[Supervisor], tmp_path: Path,
) -> None:
    # fails twice (the marker file is missing), then runs: two failures < three allowed
    marker = f"{tmp_path}/ok"
    script = f"n=$(cat {marker}.n 2>/dev/null || echo 0); echo $((n+1)) > {marker}.n; " \
             f"[ $n -ge 2 ] && exec sleep 60; exit 1"
    unit = CommandUnit(["sh", "-c", script])
    restarts: list[str] = []
    supervisor = Supervisor([unit], FAST, on_restart=restarts.append)
    cleanup.append(supervisor)
    supervisor.start()
    assert supervisor.wait_ready()
    assert unit.starts == 3 and restarts == ["colocated", "colocated"]
    assert supervisor.failure is None


def test_stop_ends_every_unit_and_restarts_nothing(cleanup: list[Supervisor]) -> None:
    units = [CommandUnit(["sleep", "60"]) for _ in range(3)]
    supervisor = Supervisor(units, FAST)
    supervisor.start()
    assert supervisor.wait_ready()
    supervisor.stop()
    time.sleep(0.2)
    assert all(len(u.processes) == 1 and not u.is_alive() for u in units)


def test_stop_process_kills_what_ignores_sigterm() -> None:
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print(flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"\n"  # it ignores
    started = time.monotonic()
    assert stop_process(stubborn, grace_s=0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - started < 5
    assert stop_process(stubborn, grace_s=0.3) == -signal.SIGKILL  # idempotent


def test_a_process_that_dies_and_cannot_come_back_gives_up_while_serving(
    cleanup: list[Supervisor], tmp_path: Path,
) -> None:
    # the first start runs; every later one fails, as when the model folder went away
    count = tmp_path / "starts"
    script = f"n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}; " \
             f"[ $n -eq 0 ] && exec sleep 60; exit 2"
    unit = CommandUnit(["sh", "-c", script], name="engine m-decode-0", role="decode")
    restarts: list[str] = []
    reasons: list[str] = []
    supervisor = Supervisor([unit], FAST, on_restart=restarts.append, on_give_up=reasons.append)
    cleanup.append(supervisor)
    supervisor.start()
    assert supervisor.wait_ready()
    os.kill(unit.processes[0].pid, signal.SIGKILL)
    _wait(lambda: bool(reasons))
    assert reasons == [give_up_reason("engine m-decode-0", 3, "exited with code 2 while starting")]
    assert restarts == ["decode"] * 3 and unit.starts == 4
