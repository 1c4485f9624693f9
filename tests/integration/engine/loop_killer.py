"""``moeflow`` with one fault planted outside any step: the scheduler raises as soon as a request
named ``kill-loop`` waits (as a bug in the engine's own bookkeeping would). Used by
test_engine_process.py as ``python -m tests.integration.engine.loop_killer engine ...``."""

from __future__ import annotations

import sys

from moeflow.cli import main
from moeflow.engine.scheduler import Scheduler, StepPlan

KILL_REQUEST_ID = "kill-loop"
FAULT = "planted fault outside a step"

_schedule = Scheduler.schedule


def _schedule_with_a_fault(self: Scheduler) -> StepPlan:
    if any(seq.request_id == KILL_REQUEST_ID for seq in self.waiting):
        raise RuntimeError(FAULT)
    return _schedule(self)


if __name__ == "__main__":
    Scheduler.schedule = _schedule_with_a_fault  # type: ignore[method-assign]
    sys.exit(main())
