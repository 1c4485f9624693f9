"""Where a run's progress goes: a progress bar (a terminal), log lines (a Pod's log), and the
status of the run's FineTune (`status.progress`, through the API server).

How the operator learns progress (docs/finetuning.md, "Progress"): the trainer patches its own
FineTune's `status.progress` with a merge patch on the status subresource, from a background
thread, at most every `interval_s` and at start, at each checkpoint and at the end. The
operator owns every other status field (phase, conditions, attempt), so the two writers never
touch the same keys and need no locking. A failed patch is logged and dropped: progress is
best effort, training goes on; the next report carries the newer numbers anyway.
"""

from __future__ import annotations

import datetime
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

logger = logging.getLogger(__name__)

Event = Literal["start", "step", "checkpoint", "end"]


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: float
    """Epochs done, fractional."""
    loss: float | None = None
    """Of the last step (mean over its trained tokens)."""
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    """Input tokens (padding excluded) per second since this process started training."""
    eta_seconds: float | None = None
    checkpoint_step: int | None = None
    """Step of the newest checkpoint, the point a restart resumes from."""
    resumed_from_step: int | None = None
    trained_tokens: int = 0
    """Tokens that carried loss so far (the whole run, resumed parts included)."""

    def wire(self) -> dict[str, Any]:
        """The FineTune's `status.progress` (CRD field names; unknowns left out)."""
        fields: dict[str, Any] = {
            "step": self.step, "totalSteps": self.total_steps,
            "epoch": round(self.epoch, 4), "loss": _round(self.loss, 6),
            "learningRate": self.learning_rate,
            "tokensPerSecond": _round(self.tokens_per_second, 1),
            "etaSeconds": None if self.eta_seconds is None else int(round(self.eta_seconds)),
            "checkpointStep": self.checkpoint_step, "resumedFromStep": self.resumed_from_step,
            "trainedTokens": self.trained_tokens,
            "updatedAt": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return {k: v for k, v in fields.items() if v is not None}

    def line(self) -> str:
        parts = [f"step {self.step}/{self.total_steps}", f"epoch {self.epoch:.2f}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:.2e}")
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.0f} tok/s")
        if self.eta_seconds is not None:
            parts.append(f"eta {self.eta_seconds:.0f}s")
        return ", ".join(parts)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class ProgressSink(Protocol):
    def report(self, event: Event, progress: Progress) -> None: ...

    def close(self) -> None: ...


class Sinks:
    """Several sinks as one."""

    def __init__(self, sinks: Sequence[ProgressSink]) -> None:
        self.sinks = list(sinks)

    def report(self, event: Event, progress: Progress) -> None:
        for sink in self.sinks:
            sink.report(event, progress)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class BarSink:
    """A tqdm progress bar (interactive runs)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def report(self, event: Event, progress: Progress) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]

        if self._bar is None:
            self._bar = tqdm(total=progress.total_steps, initial=progress.step, unit="step",
                             desc="finetune", dynamic_ncols=True, file=sys.stderr)
            if progress.resumed_from_step:  # stderr: stdout carries only the adapter's path
                self._bar.write(f"resumed from the checkpoint at step {progress.step}",
                                file=sys.stderr)
        if event == "step":
            self._bar.update(progress.step - self._bar.n)
            postfix = {"loss": f"{progress.loss:.4f}" if progress.loss is not None else "-"}
            if progress.tokens_per_second is not None:
                postfix["tok/s"] = f"{progress.tokens_per_second:.0f}"
            self._bar.set_postfix(postfix, refresh=False)
        elif event == "checkpoint":
            self._bar.write(f"checkpoint at step {progress.step}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class LogSink:
    """One log line every `interval_s` seconds, and at start, checkpoints and the end (Pod logs,
    where a bar's carriage returns would be noise)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")

    def report(self, event: Event, progress: Progress) -> None:
        now = time.monotonic()
        if event == "step" and now - self._last < self.interval_s:
            return
        self._last = now
        logger.info("%s: %s", event, progress.line())

    def close(self) -> None:
        pass


class StatusWriter(Protocol):
    def __call__(self, status: dict[str, Any]) -> None: ...


class FineTuneStatusSink:
    """Patches `status.progress` of one FineTune from a background thread (latest value
    wins; start, checkpoint and end reports are never skipped by the interval)."""

    def __init__(self, write: StatusWriter, interval_s: float = 5.0,
                 flush_timeout_s: float = 10.0) -> None:
        self._write = write
        self.interval_s = interval_s
        self.flush_timeout_s = flush_timeout_s
        self._pending: Progress | None = None
        self._urgent = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="finetune-status", daemon=True)
        self._thread.start()

    def report(self, event: Event, progress: Progress) -> None:
        with self._cond:
            self._pending = progress
            self._urgent = self._urgent or event != "step"
            self._cond.notify()

    def _run(self) -> None:
        last = -float("inf")
        while True:
            with self._cond:
                while True:
                    if self._pending is not None and (
                            self._urgent or self._closed
                            or time.monotonic() - last >= self.interval_s):
                        break
                    if self._closed:
                        return
                    wait = None if self._pending is None else max(
                        0.0, self.interval_s - (time.monotonic() - last))
                    self._cond.wait(wait)
                progress, self._pending, self._urgent = self._pending, None, False
            last = time.monotonic()
            try:
                self._write({"progress": progress.wire()})
            except Exception as e:  # the API server may hiccup; training must not stop
                logger.warning("could not report progress to the FineTune: %s", e)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(self.flush_timeout_s)


def kube_status_writer(target: str, kubeconfig: str | None = None) -> StatusWriter:
    """A writer of `status` for the FineTune `target` ("<namespace>/<name>"): in-cluster
    service account in a Pod, else the kubeconfig."""
    from moeflow.domain import naming
    from moeflow.domain.finetune_spec import KIND, PLURAL
    from moeflow.kube.api import Kind, KubeApi

    namespace, sep, name = target.partition("/")
    if not sep or not namespace or not name:
        raise ValueError(f"--report-to-finetune {target!r}: expected <namespace>/<name>")
    api = KubeApi.from_config(kubeconfig)
    kind = Kind(naming.API_VERSION, PLURAL, KIND)

    def write(status: dict[str, Any]) -> None:
        if api.patch_status(kind, namespace, name, status) is None:
            raise LookupError(f"FineTune {target} not found")

    return write
