"""Decisions the reconcilers make, posted as Kubernetes Events through kopf.

Reconcilers run in worker threads and return `Decision`s instead of posting; the async
handler posts them on the object they concern, so every create, patch, delete and refusal
leaves an Event (`kubectl describe` / `kubectl get events`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import kopf


@dataclass(frozen=True)
class Decision:
    reason: str
    message: str
    type: Literal["Normal", "Warning"] = "Normal"
    # The object the Event is about; None: the object being handled.
    about: Mapping[str, Any] | None = None


def as_body(obj: Mapping[str, Any]) -> kopf.Body:
    """A kopf Body view of a plain dict, for kopf.adopt/info/warn."""
    return obj if isinstance(obj, kopf.Body) else kopf.Body(cast(kopf.RawBody, dict(obj)))


def post(body: Mapping[str, Any], decisions: Iterable[Decision]) -> None:
    for decision in decisions:
        target = as_body(decision.about if decision.about is not None else body)
        if decision.type == "Warning":
            kopf.warn(target, reason=decision.reason, message=decision.message)
        else:
            kopf.info(target, reason=decision.reason, message=decision.message)


def applied(kind: str, name: str, outcome: str) -> Decision:
    return Decision(reason=outcome.capitalize(), message=f"{kind} {name} {outcome}")
