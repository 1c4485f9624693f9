"""Pure status computation: Pod -> Task, Tasks -> Job, Jobs -> Model; level-based."""

from __future__ import annotations

from typing import Any

from moeflow.controller import status
from moeflow.controller.status import Counts

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def pod(phase: str = "Pending", ready: bool = False, **status_extra: Any) -> dict[str, Any]:
    conditions = [
        {
            "type": "Ready",
            "status": "True" if ready else "False",
            "lastTransitionTime": "2026-01-01T00:00:42Z",
        }
    ]
    return {
        "metadata": {"name": "m-colocated-0", "creationTimestamp": NOW},
        "spec": {"nodeName": "node-1"},
        "status": {"phase": phase, "conditions": conditions, **status_extra},
    }


def task(rank: int, phase: str | None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"t{rank}"}
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {"metadata": meta, "spec": {"rank": rank}, "status": {"phase": phase} if phase else {}}


def test_task_phases_from_the_pod() -> None:
    def phase(p: dict[str, Any] | None) -> str:
        return str(status.task_status(p, endpoint="e", previous={}, now=NOW)["phase"])

    assert phase(None) == "Pending"
    assert phase(pod()) == "Pending"
    assert phase(pod("Running")) == "Starting"
    assert phase(pod("Running", ready=True)) == "Ready"
    assert phase(pod("Failed")) == "Failed"
    crash = pod(
        "Running",
        containerStatuses=[
            {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}}}
        ],
    )
    assert phase(crash) == "Failed"


def test_ready_task_status_has_endpoint_pod_and_cold_start() -> None:
    result = status.task_status(
        pod("Running", ready=True, podIP="10.0.0.1"), endpoint="http://e", previous={}, now=NOW
    )
    assert result["ready"] is True and result["endpoint"] == "http://e"
    assert result["podIP"] == "10.0.0.1" and result["nodeName"] == "node-1"
    assert result["coldStart"] == {"podReadySeconds": 42.0}
    assert result["conditions"][0]["status"] == "True"


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    first = status.task_status(pod("Running"), endpoint="e", previous={}, now=NOW)
    again = status.task_status(pod("Running"), endpoint="e", previous=first, now=LATER)
    assert not status.changed(first, again)
    flipped = status.task_status(
        pod("Running", ready=True), endpoint="e", previous=again, now=LATER
    )
    assert flipped["conditions"][0]["lastTransitionTime"] == LATER


def test_counting_ignores_surplus_ranks_and_deleted_tasks() -> None:
    tasks = [
        task(0, "Ready"),
        task(1, "Failed"),
        task(2, "Ready"),
        task(3, "Ready"),
        task(1, "Ready", deleting=True),
    ]
    assert status.count_tasks(3, tasks) == Counts(desired=3, ready=2, failed=1)


def test_job_status_conditions() -> None:
    result = status.job_status(
        Counts(3, 2, 1), role="decode", generation=2, previous={"observedGeneration": 2}, now=NOW
    )
    assert result["summary"] == "2/3"
    conditions = {c["type"]: c for c in result["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Progressing"]["reason"] == "WaitingForReplicas"
    assert conditions["Degraded"] == {
        **conditions["Degraded"],
        "status": "True",
        "reason": "InstancesFailing",
        "message": "decode: 1 failing",
    }


def test_model_status_ready_only_when_every_role_and_the_gateway_are() -> None:
    roles = {"prefill": Counts(1, 1), "decode": Counts(2, 2)}
    ready = status.model_status(
        roles,
        Counts(1, 1),
        endpoint="http://gw",
        generation=1,
        previous={"observedGeneration": 1},
        now=NOW,
    )
    assert ready["readySummary"] == "prefill 1/1, decode 2/2, gateway 1/1"
    assert [c["status"] for c in ready["conditions"]] == ["True", "False", "False"]
    not_applied = status.model_status(
        roles, Counts(1, 1), endpoint="e", generation=2, previous={"observedGeneration": 1}, now=NOW
    )
    assert not_applied["conditions"][0]["status"] == "False"
    assert not_applied["conditions"][1]["reason"] == "Reconciling"
    no_gateway = status.model_status(
        roles, Counts(1, 0), endpoint="e", generation=1, previous={"observedGeneration": 1}, now=NOW
    )
    assert no_gateway["conditions"][0]["reason"] == "ReplicasNotReady"


def test_model_status_drops_roles_of_a_previous_mode_and_scales_to_zero() -> None:
    previous = {"observedGeneration": 1, "roles": {"prefill": {}, "decode": {}}}
    result = status.model_status(
        {"colocated": Counts(0, 0)},
        Counts(1, 1),
        endpoint="e",
        generation=1,
        previous=previous,
        now=NOW,
    )
    assert result["roles"] == {
        "prefill": None,
        "decode": None,
        "colocated": {"desired": 0, "ready": 0, "failed": 0},
    }
    result = status.model_status(
        {"colocated": Counts(0, 0)},
        Counts(0, 0),
        endpoint="e",
        generation=1,
        previous=previous,
        now=NOW,
    )
    assert result["conditions"][0]["reason"] == "ScaledToZero"


def test_invalid_status_is_degraded_and_not_ready() -> None:
    result = status.invalid_status(
        "spec.x: bad; fix: y", reason="InvalidSpec", previous={}, now=NOW
    )
    assert [(c["type"], c["status"]) for c in result["conditions"]] == [
        ("Ready", "False"),
        ("Progressing", "False"),
        ("Degraded", "True"),
    ]
    assert all(c["message"] == "spec.x: bad; fix: y" for c in result["conditions"])
