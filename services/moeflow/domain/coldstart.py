"""The cold-start record of one engine instance: when each of the five steps ended.

Steps (monotonic clock, seconds; the first is the operator's, the other four are here):
  pre-load     process start -> ready to load (imports, torch set-up)
  weight load  config, tokenizer and weights in memory
  post-load    KV-cache allocation, warm-up, HTTP server up -> ready
  first token  ready -> first token of the first routed request sent

"Process start" is when the instance was asked for, as seen by this process: the launcher's
`time.monotonic()` passed in ``MOEFLOW_LAUNCH_MONOTONIC`` (the monotonic clock is system-wide on
Linux), else the kernel's start time of this process (/proc/self/stat, 10 ms ticks). A warm-pool
worker or a forked child starts its clock at the claim instead: that is when the instance was
asked for, and the steps it skipped then read about zero.

No torch here: the gateway and the operator may read these records too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

LAUNCH_ENV_VAR = "MOEFLOW_LAUNCH_MONOTONIC"

StartPath = Literal["cold", "warm_pool", "fork"]
WeightsSource = Literal["checkpoint", "store", "fork", "xccl"]

STEPS = ("preload", "weight_load", "post_load", "first_token")
"""Histogram names: ``moeflow_coldstart_<step>_seconds``."""

# Engine-reported step -> field of Task status.coldStart (deploy/crds/moeflow.dev_tasks.yaml).
TASK_STATUS_FIELDS = {
    "preload": "enginePreloadSeconds",
    "weight_load": "weightLoadSeconds",
    "post_load": "postLoadSeconds",
    "first_token": "firstRoutedRequestSeconds",
}


def process_start_monotonic(env: Mapping[str, str] | None = None) -> float:
    """This process's start on the `time.monotonic()` clock (see the module docstring)."""
    launched = (env or {}).get(LAUNCH_ENV_VAR, "")
    if launched:
        return float(launched)
    with open("/proc/self/stat", encoding="ascii") as f:
        stat = f.read()
    # Field 22 (starttime, clock ticks after boot); fields after the ")" of comm start at 3.
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - max(0.0, age_s)


@dataclass
class ColdStartRecord:
    """Marks on the monotonic clock; a step's seconds exist once both of its ends do."""

    started_s: float
    path: StartPath = "cold"
    weights_source: WeightsSource = "checkpoint"
    load_started_s: float | None = None
    load_done_s: float | None = None
    ready_s: float | None = None
    first_token_s: float | None = None

    @classmethod
    def from_process(cls, env: Mapping[str, str] | None = None) -> ColdStartRecord:
        return cls(started_s=process_start_monotonic(env))

    def mark_load_started(self) -> None:
        if self.load_started_s is None:
            self.load_started_s = time.monotonic()

    def mark_load_done(self, at_s: float | None = None) -> None:
        self.load_done_s = time.monotonic() if at_s is None else at_s

    def mark_ready(self) -> None:
        if self.ready_s is None:
            self.ready_s = time.monotonic()

    def mark_first_token(self) -> bool:
        """True the first time (the caller then observes the histogram)."""
        if self.first_token_s is not None or self.ready_s is None:
            return False
        self.first_token_s = time.monotonic()
        return True

    def seconds(self) -> dict[str, float]:
        """step -> seconds, for the steps that have ended (never negative)."""
        marks = [self.started_s, self.load_started_s, self.load_done_s, self.ready_s,
                 self.first_token_s]
        out: dict[str, float] = {}
        for step, begin, end in zip(STEPS, marks[:-1], marks[1:], strict=True):
            if begin is not None and end is not None:
                out[step] = max(0.0, end - begin)
        return out

    @property
    def to_ready_s(self) -> float | None:
        return None if self.ready_s is None else max(0.0, self.ready_s - self.started_s)

    def as_dict(self) -> dict[str, Any]:
        """The JSON of ``GET /v1/coldstart``."""
        seconds = self.seconds()
        return {
            "path": self.path,
            "weights_source": self.weights_source,
            "is_ready": self.ready_s is not None,
            **{f"{step}_seconds": seconds.get(step) for step in STEPS},
            "to_ready_seconds": self.to_ready_s,
            # what the operator copies into Task status.coldStart, under the CRD's names
            "task_status": {TASK_STATUS_FIELDS[k]: v for k, v in seconds.items()},
        }

