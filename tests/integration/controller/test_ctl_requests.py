"""Batch `Request`s with the real operator against a real HTTP server that speaks the OpenAI
completions shape (the gateway's stand-in)."""

from __future__ import annotations

import json
from typing import Any

import yaml
from cluster_kit import EXAMPLES, Cluster, wait_for
from fake_gateway import FakeGateway

REQUESTS = "moeflow.dev/v1alpha1/requests"


def request_example() -> tuple[dict[str, Any], dict[str, Any]]:
    config_map, request = yaml.safe_load_all((EXAMPLES / "request-batch.yaml").read_text())
    return config_map, request


def phase(cluster: Cluster, name: str) -> str | None:
    return ((cluster.get(REQUESTS, name) or {}).get("status") or {}).get("phase")


async def test_batch_request_fans_out_and_writes_results(
        cluster: Cluster, operator: object) -> None:
    config_map, request = request_example()
    name = request["metadata"]["name"]
    config_map["data"]["prompts.jsonl"] += '{"prompt": "please FAIL"}\nnot json\n'
    async with FakeGateway() as gateway:
        request["spec"]["endpoint"] = gateway.url
        await cluster.apply(config_map)
        await cluster.apply(request)
        await wait_for(lambda: phase(cluster, name) == "Succeeded", what="Succeeded")

        assert sorted(body["prompt"] for _, body in gateway.received) == [
            "One, two, three,", "The capital of France is", "Write a haiku about Kubernetes:",
            "please FAIL"]
        bodies = {body["prompt"]: body for _, body in gateway.received}
        assert bodies["One, two, three,"]["max_tokens"] == 8  # per-line override
        assert bodies["The capital of France is"] == {
            "model": "smollm2-135m-instruct", "max_tokens": 32, "temperature": 0,
            "prompt": "The capital of France is"}

    obj = cluster.get(REQUESTS, name)
    assert obj is not None
    status = obj["status"]
    assert (status["total"], status["succeeded"], status["failed"]) == (5, 3, 2)
    assert status["progress"] == "5/5"
    assert status["outputConfigMap"] == f"{name}-results"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Degraded"]["status"] == "True"
    assert conditions["Degraded"]["message"] == "2 of 5 prompts failed"

    results_cm = cluster.get("v1/configmaps", f"{name}-results")
    assert results_cm is not None
    assert results_cm["metadata"]["ownerReferences"][0]["name"] == name
    results = [json.loads(line) for line in results_cm["data"]["results.jsonl"].splitlines()]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert results[0] == {"index": 0, "id": "capital", "ok": True,
                          "text": "echo: The capital of France is",
                          "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                    "total_tokens": 5}}
    assert results[3]["ok"] is False and "HTTP 500" in results[3]["error"]
    assert results[4]["ok"] is False and "bad JSON" in results[4]["error"]

    assert await wait_for(lambda: cluster.events("Completed", involved=name), what="event")
    assert cluster.events("Started", involved=name)
    # kopf's finalizer guards the running batch only; it is gone once the Request is final.
    await wait_for(lambda: not cluster.get(REQUESTS, name)["metadata"].get(  # type: ignore[index]
        "finalizers"), what="finalizer removed")
    cluster.validate_everything()


async def test_request_waits_for_its_model_and_fails_on_missing_input(
        cluster: Cluster, operator: object) -> None:
    _, request = request_example()
    await cluster.apply(request)  # no endpoint, and the Model does not exist
    await wait_for(lambda: phase(cluster, "smollm2-batch") == "Pending", what="Pending")
    status = cluster.get(REQUESTS, "smollm2-batch")["status"]  # type: ignore[index]
    assert status["message"] == "waiting for Model smollm2-135m-instruct to exist"

    missing = {**request, "metadata": {"name": "no-input"},
               "spec": {**request["spec"], "endpoint": "http://127.0.0.1:9"}}
    await cluster.apply(missing)
    await wait_for(lambda: phase(cluster, "no-input") == "Failed", what="Failed")
    degraded = cluster.condition(REQUESTS, "no-input", "Degraded")
    assert degraded is not None and degraded["reason"] == "InputNotFound"
    assert "fix:" in degraded["message"]
    assert cluster.events("InputNotFound", involved="no-input")
    cluster.validate_everything()

