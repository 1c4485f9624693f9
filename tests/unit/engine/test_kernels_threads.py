"""``bind_threads``: the computing thread's OpenMP team pinned one thread per CPU, and undone."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from moeflow.engine.kernels import native


def _team_affinities() -> list[set[int]]:
    """The CPU sets of this process's threads, as the kernel reports them (every task)."""
    sets = []
    for task in Path("/proc/self/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus: set[int] = set()
                for part in line.split(":", 1)[1].strip().split(","):
                    lo, _, hi = part.partition("-")
                    cpus.update(range(int(lo), int(hi or lo) + 1))
                sets.append(cpus)
    return sets


def test_bind_pins_the_callers_team_one_per_cpu_and_unbind_undoes_it() -> None:
    kernels = native.library()
    assert kernels is not None
    allowed = sorted(os.sched_getaffinity(0))
    cpus = [allowed[0], allowed[-1]] if len(allowed) > 1 else allowed * 2
    seen: dict[str, object] = {}

    def compute_thread() -> None:  # binding is per thread that opens parallel regions
        torch.set_num_threads(2)
        kernels.bind_threads(cpus)
        seen["caller"] = os.sched_getaffinity(0)
        seen["pinned"] = [s for s in _team_affinities() if len(s) == 1]
        torch.ones(1 << 16).sum()  # torch's parallel regions still run on the pinned team
        kernels.unbind_threads(allowed)
        seen["after"] = os.sched_getaffinity(0)

    worker = threading.Thread(target=compute_thread)
    worker.start()
    worker.join()
    assert seen["caller"] == {cpus[0]}
    pinned = seen["pinned"]
    assert isinstance(pinned, list) and {cpus[0]} in pinned and {cpus[1]} in pinned
    assert seen["after"] == set(allowed)
    assert os.sched_getaffinity(0) == set(allowed)  # the test's own thread never was pinned


def test_a_cpu_outside_the_allowed_set_is_a_clear_error() -> None:
    kernels = native.library()
    assert kernels is not None
    outside = max(os.sched_getaffinity(0)) + 1  # a CPU this process may not use
    errors: list[BaseException] = []

    def compute_thread() -> None:
        torch.set_num_threads(1)
        try:
            kernels.bind_threads([outside])
        except OSError as exc:
            errors.append(exc)

    worker = threading.Thread(target=compute_thread)
    worker.start()
    worker.join()
    assert errors and "could not pin" in str(errors[0])
