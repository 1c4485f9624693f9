"""Keep serving on a cluster, as the pure builders lay it out: engine probes on the engine's
health paths, a grace period longer than the drain, the Model's internal token on every
process that calls engines, and a NetworkPolicy whose selectors pick exactly the Pods the
builders label. Every object passes the Kubernetes 1.37 schemas (strict)."""

from __future__ import annotations

import base64
from typing import Any

import kubernetes_validate
import pytest

from moeflow.controller.build_engine import build_pod, build_task
from moeflow.controller.build_gateway import build_model_children
from moeflow.controller.build_security import (
    build_engines_network_policy,
    build_internal_token_secret,
    existing_secret_problem,
)
from moeflow.controller.build_warm_pool import build_warm_pod, claim_patch
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.plan import plan_model
from moeflow.domain.roles import Role
from moeflow.domain.spec import JobSpec, TaskSpec, WarmPoolSpec, parse_model_spec, parse_spec

SETTINGS = OperatorSettings()
MODES = ["colocated", "pd-disaggregated", "attention-expert-disaggregated"]
Obj = dict[str, Any]


def validate(obj: Obj) -> None:
    kubernetes_validate.validate(obj, "1.37.0", strict=True)


def children(mode: str, settings: OperatorSettings = SETTINGS) -> list[Obj]:
    spec = parse_model_spec({"source": {"uri": "store://smol"}, "mode": mode,
                             "transport": {"redisUrl": "redis://r:6379/0"}})
    return build_model_children(plan_model("m", spec, namespace="ns"), "ns", settings)


def engine_pods(mode: str, settings: OperatorSettings = SETTINGS) -> list[Obj]:
    """One Pod per role of the mode, built as the Job -> Task -> Pod chain builds it."""
    pods = []
    for job in (c for c in children(mode, settings) if c["kind"] == "RoleGroup"):
        job_spec = parse_spec(JobSpec, job["spec"])
        task = build_task(job["metadata"]["name"], "ns", job_spec, 0)
        pods.append(build_pod(task["metadata"]["name"], "ns",
                              parse_spec(TaskSpec, task["spec"]), settings))
    return pods


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env") or []}


def token_ref(container: Obj) -> Obj:
    return dict(env_of(container)[naming.INTERNAL_TOKEN_ENV]["valueFrom"]["secretKeyRef"])


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """matchLabels semantics (the builders use no matchExpressions)."""
    assert set(selector) <= {"matchLabels"}, selector
    return dict(selector.get("matchLabels") or {}).items() <= labels.items()


@pytest.mark.parametrize("mode", MODES)
def test_every_engine_role_probes_live_and_ready_on_its_port(mode: str) -> None:
    pods = engine_pods(mode)
    jobs = [c for c in children(mode) if c["kind"] == "RoleGroup"]
    assert {p["metadata"]["labels"][naming.LABEL_ROLE] for p in pods} == {
        j["spec"]["role"] for j in jobs}
    assert len(pods) == len(jobs) >= (1 if mode == "colocated" else 2)
    for pod in pods:
        validate(pod)
        (container,) = pod["spec"]["containers"]
        (port,) = container["ports"]
        probes = {name: container[name]["httpGet"] for name in
                  ("startupProbe", "readinessProbe", "livenessProbe")}
        assert probes == {"startupProbe": {"path": "/health/live", "port": port["name"]},
                          "readinessProbe": {"path": "/health/ready", "port": port["name"]},
                          "livenessProbe": {"path": "/health/live", "port": port["name"]}}
        # Weight loading is covered by the startup probe, not cut by liveness.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= (
            SETTINGS.startup_timeout_s)
        assert container["command"][container["command"].index("--port") + 1] == str(
            port["containerPort"])


@pytest.mark.parametrize("drain_s", [1, 30, 300])
def test_the_grace_period_outlasts_the_drain_the_engine_is_told(drain_s: int) -> None:
    settings = OperatorSettings(engine_drain_timeout_s=drain_s)
    pools = [build_warm_pod("p", "ns", 0, parse_spec(WarmPoolSpec, {"size": 1}), settings)]
    for pod in [*engine_pods("pd-disaggregated", settings), *pools]:
        validate(pod)
        (container,) = pod["spec"]["containers"]
        told = env_of(container)["MOEFLOW_ENGINE_DRAIN_TIMEOUT_S"]["value"]
        assert told == str(drain_s)
        assert pod["spec"]["terminationGracePeriodSeconds"] > int(told)
    # A longer drain changes the Pod's hash: running Pods are replaced to get it.
    assert (engine_pods("colocated", OperatorSettings(engine_drain_timeout_s=60))[0][
        "metadata"]["annotations"] != engine_pods("colocated")[0]["metadata"]["annotations"])


@pytest.mark.parametrize("mode", MODES)
def test_every_process_that_calls_engines_reads_the_models_token(mode: str) -> None:
    objs = children(mode)
    expected = {"name": "m-internal-token", "key": naming.INTERNAL_TOKEN_KEY}
    consumers = [*(p["spec"]["containers"][0] for p in engine_pods(mode)),
                 one(objs, "Deployment", "m-gateway")["spec"]["template"]["spec"][
                     "containers"][0]]
    if mode == "attention-expert-disaggregated":
        consumers.append(one(objs, "Deployment", "m-balancer")["spec"]["template"]["spec"][
            "containers"][0])
    for container in consumers:
        assert token_ref(container) == expected, container["name"]
        assert "optional" not in token_ref(container)  # never start without it
    # The Secret is not among the applied children: it is created once, elsewhere.
    assert not [o for o in objs if o["kind"] == "Secret"]


def test_the_token_secret_is_immutable_and_holds_the_token_under_its_key() -> None:
    secret = build_internal_token_secret("m", "ns", "s3cret-token")
    validate(secret)
    assert secret["metadata"]["name"] == naming.internal_token_secret_name("m")
    assert secret["immutable"] is True
    assert base64.b64decode(secret["data"][naming.INTERNAL_TOKEN_KEY]) == b"s3cret-token"
    assert secret["metadata"]["labels"][naming.LABEL_MODEL] == "m"


def test_an_existing_secret_is_kept_unless_someone_else_owns_it_or_it_lacks_the_key() -> None:
    ours = build_internal_token_secret("m", "ns", "t")
    ours["metadata"]["ownerReferences"] = [{"kind": "Model", "name": "m", "uid": "u1",
                                            "controller": True}]
    assert existing_secret_problem(ours, "u1") is None
    theirs = {**ours, "metadata": {**ours["metadata"], "ownerReferences": [
        {"kind": "Model", "name": "other", "uid": "u2", "controller": True}]}}
    problem = existing_secret_problem(theirs, "u1")
    assert problem is not None and "Model other" in problem
    handmade = {"metadata": {"name": "m-internal-token"}, "data": {"token": "eA=="}}
    assert existing_secret_problem(handmade, "u1") is None  # shared on purpose: used as is
    keyless = {"metadata": {"name": "m-internal-token"}, "data": {"other": "eA=="}}
    problem = existing_secret_problem(keyless, "u1")
    assert problem is not None and "'token'" in problem


@pytest.mark.parametrize("mode", MODES)
def test_the_engines_policy_admits_exactly_their_gateway_engines_balancer_and_operator(
        mode: str) -> None:
    settings = OperatorSettings(namespace="moeflow")
    objs = children(mode, settings)
    policy = one(objs, "NetworkPolicy", "m-engines")
    validate(policy)
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    pods = engine_pods(mode, settings)
    other_model = engine_pods(mode, settings)[0]
    other_model["metadata"]["labels"] = {**other_model["metadata"]["labels"],
                                         naming.LABEL_MODEL: "other"}
    for pod in pods:
        assert selects(spec["podSelector"], pod["metadata"]["labels"])
    assert not selects(spec["podSelector"], other_model["metadata"]["labels"])

    # Peers in the policy's namespace, by labels; the operator by namespace and labels.
    def admitted(labels: dict[str, str], namespace: str = "ns") -> set[str]:
        """The ports `labels` may reach ("*": all)."""
        ports: set[str] = set()
        for rule in spec["ingress"]:
            for peer in rule["from"]:
                ns_selector = peer.get("namespaceSelector")
                in_namespace = (namespace == "ns" if ns_selector is None else selects(
                    ns_selector, {"kubernetes.io/metadata.name": namespace}))
                if in_namespace and selects(peer["podSelector"], labels):
                    ports |= {str(p["port"]) for p in rule.get("ports") or [{"port": "*"}]}
        return ports

    engine_port = {"http"}
    assert {p["name"] for p in pods[0]["spec"]["containers"][0]["ports"]} == engine_port
    for pod in pods:
        assert admitted(pod["metadata"]["labels"]) == {"*"}
    gateway = one(objs, "Deployment", "m-gateway")["spec"]["template"]["metadata"]["labels"]
    assert admitted(gateway) == engine_port
    operator = {**naming.operator_selector(), naming.LABEL_NAME: "moeflow"}
    assert admitted(operator, "moeflow") == engine_port
    assert admitted(operator, "ns") == set()  # the operator's labels elsewhere: no
    if mode == "attention-expert-disaggregated":
        balancer = one(objs, "Deployment", "m-balancer")["spec"]["template"]["metadata"][
            "labels"]
        assert admitted(balancer) == engine_port
    # Nothing else: another Model's gateway and engines, an unlabelled Pod, a warm worker.
    assert admitted(naming.model_labels("other", naming.COMPONENT_GATEWAY)) == set()
    assert admitted(other_model["metadata"]["labels"]) == set()
    assert admitted({}) == set()
    assert admitted(naming.warm_pool_labels("p")) == set()


def test_a_claimed_warm_pod_is_under_the_models_policy() -> None:
    policy = build_engines_network_policy("m", "ns", SETTINGS)
    warm = build_warm_pod("p", "ns", 0, parse_spec(WarmPoolSpec, {"size": 1}), SETTINGS)
    assert not selects(policy["spec"]["podSelector"], warm["metadata"]["labels"])
    warm["metadata"]["resourceVersion"] = "7"
    task = parse_spec(TaskSpec, {
        "model": "m", "roleGroup": "m-colocated", "role": Role.COLOCATED.value, "rank": 0,
        "template": {"image": SETTINGS.image, "source": {"uri": "store://tiny"},
                     "modelPath": "/models/tiny", "port": SETTINGS.engine_port}})
    patch = claim_patch(warm, {"apiVersion": naming.API_VERSION, "kind": "EngineInstance",
                               "metadata": {"name": "m-colocated-0", "uid": "u"}},
                        task, "hash", "2026-01-01T00:00:00Z")
    claimed = {**warm["metadata"]["labels"], **patch["metadata"]["labels"]}
    assert selects(policy["spec"]["podSelector"], claimed)


def test_out_of_cluster_the_operator_is_admitted_from_any_namespace() -> None:
    policy = build_engines_network_policy("m", "ns", OperatorSettings())
    validate(policy)
    (operator,) = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]
                   if "namespaceSelector" in peer]
    assert operator == {"namespaceSelector": {},
                        "podSelector": {"matchLabels": naming.operator_selector()}}


def test_gateway_probes_its_own_live_and_ready_paths() -> None:
    deployment = one(children("colocated"), "Deployment", "m-gateway")
    validate(deployment)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}


def test_the_gateway_serves_the_paths_its_probes_ask_for() -> None:
    from moeflow.gateway.routes import health

    paths = {getattr(route, "path", None) for route in health.router.routes}
    assert {"/health/live", "/health/ready"} <= paths


async def test_the_engine_paths_probes_ask_for_say_what_the_probes_expect() -> None:
    """A draining engine stays live (liveness must not kill a drain) and leaves readiness;
    a dead loop fails both (liveness restarts it)."""
    import httpx
    from fastapi import FastAPI

    from moeflow.engine.health import add_health_routes

    async def transport() -> Any:
        return "none"

    async def answers(*, alive: bool, draining: bool) -> tuple[int, int]:
        app = FastAPI()
        add_health_routes(app, is_loop_alive=lambda: alive, is_draining=lambda: draining,
                          transport_state=transport)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://engine") as client:
            live = (await client.get("/health/live")).status_code
            ready = (await client.get("/health/ready")).status_code
        return live, ready

    assert await answers(alive=True, draining=False) == (200, 200)
    assert await answers(alive=True, draining=True) == (200, 503)
    assert await answers(alive=False, draining=False) == (503, 503)
