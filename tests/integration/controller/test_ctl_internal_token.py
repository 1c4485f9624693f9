"""The internal token on the emulated cluster with the real operator: a Model gets its Secret
once, reconciles (a spec change, an operator restart) keep the same token, every engine Pod,
the gateway and the balancer read it from there; a Secret made by hand is used as it is, one
owned by something else is a name conflict."""

from __future__ import annotations

import base64
from typing import Any

import kmock
from cluster_kit import Cluster, OperatorRunner, load_example, wait_for

from moeflow.domain import naming
from moeflow.kube import api as kube

SECRETS = "v1/secrets"
AE = "model-attention-expert-disaggregated.yaml"


def token_refs(cluster: Cluster, model: str) -> dict[str, dict[str, Any]]:
    """Container name (Pod or Deployment) -> its MOEFLOW_INTERNAL_TOKEN secretKeyRef."""
    refs: dict[str, dict[str, Any]] = {}
    pods = [(p["metadata"]["name"], p["spec"])
            for p in cluster.objects("v1/pods", {naming.LABEL_MODEL: model})]
    pods += [(d["metadata"]["name"], d["spec"]["template"]["spec"])
             for d in cluster.objects("apps/v1/deployments", {naming.LABEL_MODEL: model})]
    for owner, spec in pods:
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container.get("env") or []}
        refs[owner] = env[naming.INTERNAL_TOKEN_ENV]["valueFrom"]["secretKeyRef"]
    return refs


def secret_writes(cluster: Cluster) -> list[str]:
    """Methods of every write to a Secret so far."""
    wanted = kmock.resource(SECRETS)
    return [r.method for r in cluster.emulator.request_log()
            if r.resource == wanted and r.method in ("POST", "PATCH", "PUT", "DELETE")]


async def test_a_model_gets_its_token_once_and_every_caller_of_engines_reads_it(
        cluster: Cluster, operator: OperatorRunner) -> None:
    model = load_example(AE)
    name = model["metadata"]["name"]
    secret_name = naming.internal_token_secret_name(name)
    await cluster.apply(model)
    await wait_for(lambda: len(token_refs(cluster, name)) == 1 + 2 + 2,
                   what="3 engine Pods, the gateway and the balancer")
    secret = cluster.get(SECRETS, secret_name)
    assert secret is not None
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("Model", name, True)
    token = base64.b64decode(secret["data"][naming.INTERNAL_TOKEN_KEY])
    assert len(token) >= 32 and secret["immutable"] is True
    assert set(map(str, token_refs(cluster, name).values())) == {
        str({"name": secret_name, "key": naming.INTERNAL_TOKEN_KEY})}
    assert secret_writes(cluster) == ["POST"]

    # A reconcile (scale the experts): the Secret is asked for, never rewritten.
    await cluster.patch(kube.MODEL, name, {"spec": {"roles": {"expert": {"replicas": 3}}}})
    await wait_for(lambda: len(token_refs(cluster, name)) == 1 + 3 + 2, what="4th engine")
    await wait_for(lambda: (m := cluster.get("moeflow.dev/v1alpha1/models", name))
                   and m["status"].get("observedGeneration") == 2, what="generation 2")
    # An operator restart resumes every Model: the same again.
    await operator.stop()
    await operator.start()
    await wait_for(lambda: len([r for r in cluster.emulator.request_log()
                                if r.method == "POST" and r.resource == kmock.resource(
                                    SECRETS)]) >= 3, what="two more create attempts")
    after = cluster.get(SECRETS, secret_name)
    assert after is not None
    assert after["data"] == secret["data"]
    assert after["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
    writes = secret_writes(cluster)  # creations only, all but the first refused with 409
    assert set(writes) == {"POST"} and len(writes) >= 3
    assert cluster.names(SECRETS) == [secret_name]
    cluster.validate_everything()

    # Deleting the Model: the Secret goes with it (the cluster's garbage collector).
    await cluster.delete(kube.MODEL, name)
    await wait_for(lambda: cluster.get("moeflow.dev/v1alpha1/models", name) is None,
                   what="Model gone")
    await cluster.emulator.collect_garbage()
    assert cluster.names(SECRETS) == []


async def test_a_handmade_secret_is_used_as_is_and_a_foreign_one_is_a_conflict(
        cluster: Cluster, operator: OperatorRunner) -> None:
    model = load_example("model-colocated.yaml")
    name = model["metadata"]["name"]
    shared = base64.b64encode(b"one token for several models").decode()
    await cluster.apply({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": naming.internal_token_secret_name(name)},
                         "data": {naming.INTERNAL_TOKEN_KEY: shared}})
    await cluster.apply(model)
    await wait_for(lambda: len(token_refs(cluster, name)) == 2, what="engine Pod and gateway")
    secret = cluster.get(SECRETS, naming.internal_token_secret_name(name))
    assert secret is not None and secret["data"] == {naming.INTERNAL_TOKEN_KEY: shared}
    assert "ownerReferences" not in secret["metadata"]  # not the Model's: it stays after it

    other = {**model, "metadata": {**model["metadata"], "name": "other"}}
    await cluster.apply({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": "other-internal-token", "ownerReferences": [
                             {"apiVersion": "v1", "kind": "ConfigMap", "name": "x",
                              "uid": "not-the-model", "controller": True}]},
                         "data": {naming.INTERNAL_TOKEN_KEY: shared}})
    await cluster.apply(other)
    event = await wait_for(lambda: cluster.events("NameConflict", involved="other"),
                           what="NameConflict event")
    assert "other-internal-token" in event[0]["message"]
    assert not cluster.objects("v1/pods", {naming.LABEL_MODEL: "other"})
