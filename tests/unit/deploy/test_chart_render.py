"""charts/moeflow rendered by Helm's own library: lint, strict Kubernetes 1.37 validation of every
object in every install mode, and agreement with the code the chart runs (the operator's
settings, RBAC needs and labels; the CLI's flags)."""

from __future__ import annotations

import textwrap
from typing import Any

import helm_python as helm
import pytest
import yaml

from moeflow.cli import build_parser, gateway_settings
from moeflow.coldstart.store_cli import build_parser as store_build_parser
from moeflow.controller.build_balancer import build_balancer_rbac
from moeflow.controller.build_engine import build_pod
from moeflow.controller.build_finetune import build_trainer_rbac
from moeflow.controller.build_gateway import (
    build_gateway_deployment,
    build_gateway_rbac,
    build_gateway_service,
)
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.plan import model_path_for, plan_model
from moeflow.domain.roles import Role
from moeflow.domain.spec import TaskSpec, parse_model_spec, parse_spec
from moeflow.kube import api as kube
from tests.unit.deploy.chart_kit import (
    CHART,
    EVERYTHING_ON,
    MODES,
    NAMESPACE,
    ROOT,
    Obj,
    crd_files,
    find,
    kinds,
    pod_specs,
    render,
    render_objects,
    validate,
)

OPERATOR_DEPLOYMENT = ("Deployment", "moeflow-operator")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_lints_clean(mode: str) -> None:
    report = helm.lint(CHART, MODES[mode], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_rendered_object_is_valid_kubernetes_1_37(mode: str) -> None:
    docs = render_objects(MODES[mode])
    assert docs
    for doc in docs:
        validate(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "moeflow"
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"], doc["metadata"]["name"]


def test_a_default_install_is_the_operator_only() -> None:
    assert kinds(render_objects()) == {
        ("ServiceAccount", "moeflow-operator"),
        ("ClusterRole", "moeflow-operator"),
        ("ClusterRole", "moeflow-operator-cluster"),
        ("ClusterRoleBinding", "moeflow-operator"),
        ("ClusterRoleBinding", "moeflow-operator-cluster"),
        OPERATOR_DEPLOYMENT,
        ("NetworkPolicy", "moeflow-operator"),
    }


def test_everything_on_adds_each_optional_piece() -> None:
    added = kinds(render_objects(EVERYTHING_ON)) - kinds(render_objects())
    assert added == {
        ("Deployment", "moeflow-gateway"), ("Service", "moeflow-gateway"),
        ("ServiceAccount", "moeflow-gateway"), ("PodDisruptionBudget", "moeflow-gateway"),
        ("NetworkPolicy", "moeflow-gateway-to-engines"),
        ("DaemonSet", "moeflow-device-plugin"), ("DaemonSet", "moeflow-model-preload"),
        ("PersistentVolumeClaim", "moeflow-models"),
        ("DaemonSet", "moeflow-model-store-agent"), ("ServiceAccount", "moeflow-model-store-agent"),
        ("ClusterRole", "moeflow-model-store-agent"),
        ("ClusterRoleBinding", "moeflow-model-store-agent"),
        ("StatefulSet", "moeflow-redis"), ("Service", "moeflow-redis"),
        ("NetworkPolicy", "moeflow-redis"), ("ServiceMonitor", "moeflow-gateways"),
        ("Secret", "moeflow-redis-auth"), ("NetworkPolicy", "moeflow-gateway"),
        ("NetworkPolicy", "moeflow-device-plugin"), ("NetworkPolicy", "moeflow-model-preload"),
        ("NetworkPolicy", "moeflow-model-store-agent"),
        ("PodMonitor", "moeflow-engines"),
    }


def test_chart_crds_are_deploy_crds_byte_for_byte() -> None:
    chart_crds = sorted((CHART / "crds").glob("*.yaml"))
    assert [p.name for p in chart_crds] == [p.name for p in crd_files()], (
        "charts/moeflow/crds/ must hold exactly deploy/crds/*.yaml; fix: "
        "cp deploy/crds/*.yaml charts/moeflow/crds/")
    for chart_crd, source in zip(chart_crds, crd_files(), strict=True):
        assert chart_crd.read_bytes() == source.read_bytes(), (
            f"{chart_crd.name} drifted from deploy/crds (the source of truth); fix: "
            f"cp deploy/crds/{source.name} charts/moeflow/crds/")
    with helm.Chart.load(CHART) as chart:
        loaded = {c["name"]: c["data"] for c in chart.crds}
    assert loaded == {f"crds/{p.name}": p.read_text() for p in crd_files()}
    for path in chart_crds:
        validate(yaml.safe_load(path.read_text()))


def operator_container(values: dict[str, Any] | None = None) -> Obj:
    deployment = find(render_objects(values), *OPERATOR_DEPLOYMENT)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def literal_env(container: Obj) -> dict[str, str]:
    """The container's env entries that have a value (not those from the downward API)."""
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_operator_env_is_exactly_operator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # the chart's Redis and a tenants Secret: the settings of Models' gateways are rendered too
    container = operator_container({"redis": {"enabled": True},
                                    "gateway": {"tenantsSecret": {"name": "moeflow-tenants"}}})
    # The operator's own namespace comes from the downward API; the rest are literals.
    (namespace,) = [e for e in container["env"] if "valueFrom" in e]
    assert namespace == {"name": "MOEFLOW_OPERATOR_NAMESPACE",
                         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    env = literal_env(container)
    env["MOEFLOW_OPERATOR_NAMESPACE"] = NAMESPACE
    fields = {f"MOEFLOW_OPERATOR_{name.upper()}" for name in OperatorSettings.model_fields}
    # kubeconfig is for running outside a cluster; in a Pod the service account is used.
    assert set(env) == fields - {"MOEFLOW_OPERATOR_KUBECONFIG"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()  # the chart's strings parse as the operator's types
    assert settings.image == container["image"] == "ghcr.io/moeflow/moeflow:0.1.0"
    assert settings.model_store_host_path == "/var/lib/moeflow/models"
    assert settings.namespace == NAMESPACE
    assert settings.engine_drain_timeout_s == OperatorSettings().engine_drain_timeout_s
    assert settings == OperatorSettings.model_validate(
        {k.removeprefix("MOEFLOW_OPERATOR_").lower(): v for k, v in env.items()})


def test_operator_image_follows_the_image_values() -> None:
    container = operator_container({"image": {"repository": "reg.example/mf", "tag": "dev",
                                              "pullPolicy": "Always"}})
    env = literal_env(container)
    assert container["image"] == env["MOEFLOW_OPERATOR_IMAGE"] == "reg.example/mf:dev"
    assert container["imagePullPolicy"] == env["MOEFLOW_OPERATOR_IMAGE_PULL_POLICY"] == "Always"


@pytest.mark.parametrize("namespace", ["", "team-a"])
def test_operator_command_is_a_valid_moeflow_cli_call(namespace: str) -> None:
    container = operator_container({"operator": {"watchNamespace": namespace}})
    assert container["command"] == ["moeflow"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "operator" and args.standalone
    assert args.namespace == (namespace or None)
    port = container["ports"][0]["containerPort"]
    assert args.liveness == f"http://0.0.0.0:{port}/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_shared_gateway_command_is_a_valid_moeflow_cli_call() -> None:
    docs = render_objects(EVERYTHING_ON)
    pod = find(docs, "Deployment", "moeflow-gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])
    settings = gateway_settings(args)  # what the process runs with, flags over environment
    assert args.command == "gateway" and settings.discovery == "static"
    assert list(settings.engine_urls) == EVERYTHING_ON["gateway"]["engineUrls"]
    assert settings.host == "0.0.0.0"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
           if "valueFrom" in e}
    assert env["MOEFLOW_API_KEYS"] == {"name": "moeflow-api-keys", "key": "api-keys"}
    assert pod["automountServiceAccountToken"] is False


def test_shared_gateway_sends_the_token_and_probes_live_and_ready() -> None:
    docs = render_objects(EVERYTHING_ON)
    pod = find(docs, "Deployment", "moeflow-gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
           if "valueFrom" in e}
    # what `moeflow gateway` reads: its API keys, the token it sends to engines, and the
    # password of the Redis that holds the tenants' quota counters
    assert env == {"MOEFLOW_API_KEYS": {"name": "moeflow-api-keys", "key": "api-keys"},
                   naming.INTERNAL_TOKEN_ENV: {"name": "tiny-internal-token",
                                               "key": naming.INTERNAL_TOKEN_KEY},
                   "MOEFLOW_REDIS_PASSWORD": {"name": "moeflow-redis-auth", "key": "password"}}
    probes = {p: container[p]["httpGet"] for p in ("startupProbe", "readinessProbe",
                                                   "livenessProbe")}
    assert probes == {"startupProbe": {"path": "/health/live", "port": "http"},
                      "readinessProbe": {"path": "/health/ready", "port": "http"},
                      "livenessProbe": {"path": "/health/live", "port": "http"}}
    # The same paths as the per-Model gateway the operator makes.
    per_model = build_gateway_deployment(
        "tiny", NAMESPACE, plan_model("tiny", parse_model_spec(
            {"source": {"uri": "store://tiny"}})).gateway, OperatorSettings())
    (ours,) = per_model["spec"]["template"]["spec"]["containers"]
    assert {p: ours[p]["httpGet"] for p in probes} == probes


def test_device_plugin_runs_the_shim_from_the_moeflow_image_by_default() -> None:
    import argparse

    from moeflow.deviceplugin.__main__ import add_arguments, settings_from_args

    docs = render_objects({"devicePlugin": {"enabled": True}})
    pod = find(docs, "DaemonSet", "moeflow-device-plugin")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    operator = find(docs, *OPERATOR_DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == operator["image"]  # one image for every MoEFlow process
    assert container["args"] == ["device-plugin"]  # the image's entrypoint is `moeflow`
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {e["name"]: e.get("value") for e in container["env"]}
    settings = settings_from_args(parser.parse_args(container["args"][1:]))
    assert env["MOEFLOW_DEVICE_PLUGIN_RESOURCE"] == settings.resource_name == "moeflow.dev/npu"


def rules_of(doc: Obj) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in doc["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_operator_rbac_is_least_privilege_and_covers_what_the_operator_touches() -> None:
    docs = render_objects()
    rules = rules_of(find(docs, "ClusterRole", "moeflow-operator"))
    cluster = rules_of(find(docs, "ClusterRole", "moeflow-operator-cluster"))
    everything = rules | cluster
    assert not any("*" in triple for triple in everything)
    assert not any(r == "nodes" for _, r, _ in everything)
    # Secrets: create a Model's token once, read it back; no list/watch (every Secret of the
    # cluster), no patch (rotation), no delete (the garbage collector's job).
    assert {v for _, r, v in everything if r == "secrets"} == {"get", "create"}
    assert {v for _, r, v in everything if r == "networkpolicies"} == {
        "get", "create", "patch"}
    assert not any(v in ("escalate", "bind", "impersonate", "deletecollection")
                   for _, _, v in everything)
    assert {r for _, r, v in everything if v == "update"} == {
        "models/finalizers", "rolegroups/finalizers", "engineinstances/finalizers",
        "requests/finalizers",
        "warmpools/finalizers", "finetunes/finalizers"}
    assert cluster == {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                       ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
    # Every kind kube.py works with has rules; users' kinds are never created or deleted.
    for kind in {k.plural: k for k in kube._KINDS.values()}.values():
        group = kind.api_version.rpartition("/")[0]
        assert (group, kind.plural, "get") in rules, kind
        assert (group, kind.plural, "create") in rules or kind.plural in (
            "models", "requests", "warmpools"), kind
    for plural in ("models", "requests", "warmpools"):
        assert ("moeflow.dev", plural, "create") not in rules
        assert ("moeflow.dev", plural, "delete") not in rules
        assert ("moeflow.dev", f"{plural}/status", "patch") in rules
    # The API server only lets the operator create the per-Model gateway's and balancer's
    # Roles if it holds every permission they grant.
    (_, role, _) = build_gateway_rbac("m", "ns")
    assert rules_of(role) <= rules
    (_, role, _) = build_balancer_rbac("m", "ns")
    assert rules_of(role) <= rules
    (_, role, _) = build_trainer_rbac("m", "ns")  # a FineTune's trainer
    assert rules_of(role) <= rules


def test_watching_one_namespace_uses_a_role_there() -> None:
    values = MODES["one-namespace"]
    docs = render_objects(values)
    assert ("ClusterRole", "moeflow-operator") not in kinds(docs)
    role = find(docs, "Role", "moeflow-operator")
    binding = find(docs, "RoleBinding", "moeflow-operator")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "team-a"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mf-operator",
                                    "namespace": NAMESPACE}]
    assert rules_of(role) == rules_of(find(render_objects(), "ClusterRole", "moeflow-operator"))
    assert ("", "namespaces", "list") in rules_of(find(docs, "ClusterRole",
                                                       "moeflow-operator-cluster"))
    assert ("ServiceAccount", "mf-operator") not in kinds(docs)
    pod = find(docs, *OPERATOR_DEPLOYMENT)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mf-operator"


# Containers that must run as root, and why (each is also commented in its template).
ROOT_CONTAINERS = {
    ("DaemonSet/moeflow-device-plugin", "device-plugin"),  # socket in the kubelet's root dir
    ("DaemonSet/moeflow-model-preload", "pull-0"),  # writes into the root-owned node store
    ("DaemonSet/moeflow-model-store-agent", "agent"),  # writes into the root-owned DRAM store
}
# Containers without probes, and why.
UNPROBED_CONTAINERS = {
    ("DaemonSet/moeflow-device-plugin", "device-plugin"),  # gRPC on a unix socket, no HTTP
    ("DaemonSet/moeflow-model-preload", "idle"),  # the pause container does nothing
    ("DaemonSet/moeflow-model-store-agent", "agent"),  # a loop without a server
}


def test_every_container_is_unprivileged_with_requests_and_probes() -> None:
    seen = set()
    for owner, pod in pod_specs(render_objects(EVERYTHING_ON)):
        pod_context = pod.get("securityContext", {})
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), owner
        init_names = {c["name"] for c in pod.get("initContainers", [])}
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            key = (owner, container["name"])
            seen.add(key)
            context = container.get("securityContext", {})
            assert context.get("privileged") in (None, False), key
            assert context["allowPrivilegeEscalation"] is False, key
            assert context["readOnlyRootFilesystem"] is True, key
            assert context["capabilities"] == {"drop": ["ALL"]}, key
            runs_as_root = (context.get("runAsUser", pod_context.get("runAsUser")) == 0)
            assert runs_as_root == (key in ROOT_CONTAINERS), key
            if not runs_as_root:
                assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True
            requests = container["resources"]["requests"]
            assert requests.get("cpu") and requests.get("memory"), key
            assert container["resources"]["limits"]["memory"], key
            if key not in UNPROBED_CONTAINERS and container["name"] not in init_names:
                assert "livenessProbe" in container and "readinessProbe" in container, key
    assert seen >= ROOT_CONTAINERS | UNPROBED_CONTAINERS


def test_pod_user_is_the_image_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    pod = find(render_objects(), *OPERATOR_DEPLOYMENT)["spec"]["template"]["spec"]
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    assert f"\nUSER {uid}:{gid}\n" in dockerfile


@pytest.mark.parametrize(("replicas", "has_pdb"), [(1, False), (2, True), (4, True)])
def test_shared_gateway_gets_a_pdb_only_when_it_can_keep_one_up(replicas: int,
                                                                 has_pdb: bool) -> None:
    docs = render_objects({"gateway": {"enabled": True, "replicas": replicas,
                                       "engineUrls": ["http://e:8001"],
                                       "internalTokenSecret": {"name": "e-internal-token"}}})
    assert (("PodDisruptionBudget", "moeflow-gateway") in kinds(docs)) == has_pdb
    if has_pdb:
        pdb = find(docs, "PodDisruptionBudget", "moeflow-gateway")
        deployment = find(docs, "Deployment", "moeflow-gateway")
        assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
        assert pdb["spec"]["maxUnavailable"] == 1


def test_service_monitor_scrapes_the_gateways_the_operator_makes() -> None:
    docs = render_objects(EVERYTHING_ON)
    monitor = find(docs, "ServiceMonitor", "moeflow-gateways")
    selector = monitor["spec"]["selector"]["matchLabels"]
    per_model = build_gateway_service("m", "ns", 8000)
    shared = find(docs, "Service", "moeflow-gateway")
    for service in (per_model, shared):
        assert selector.items() <= service["metadata"]["labels"].items()
        assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    redis = find(docs, "Service", "moeflow-redis")
    assert not selector.items() <= redis["metadata"]["labels"].items()


def test_pod_monitor_scrapes_the_engine_pods_the_operator_makes() -> None:
    assert not any(d["kind"] == "PodMonitor" for d in render_objects())  # off by default
    monitor = find(render_objects(EVERYTHING_ON), "PodMonitor", "moeflow-engines")
    selector = monitor["spec"]["selector"]["matchLabels"]
    pod = engine_pod("tiny")
    assert selector.items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (container,) = pod["spec"]["containers"]
    assert endpoint["port"] in [p["name"] for p in container["ports"]]
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    # the labels it copies onto every sample exist on the Pods
    sources = {r["sourceLabels"][0] for r in endpoint["relabelings"]}
    for label in (naming.LABEL_MODEL, naming.LABEL_ROLE, naming.LABEL_RANK):
        assert "__meta_kubernetes_pod_label_" + label.replace(".", "_").replace(
            "/", "_") in sources
        assert label in pod["metadata"]["labels"]
    gateway = build_gateway_service("m", "ns", 8000)
    assert not selector.items() <= gateway["metadata"]["labels"].items()


def test_redis_is_where_the_pd_example_looks_and_admits_engine_pods() -> None:
    docs = render_objects({"redis": {"enabled": True}})
    example = yaml.safe_load((ROOT / "deploy/examples/model-pd-disaggregated.yaml").read_text())
    host = example["spec"]["transport"]["redisUrl"].split("//")[1].split(":")[0]
    service = find(docs, "Service", host)
    statefulset = find(docs, "StatefulSet", "moeflow-redis")
    assert service["spec"]["selector"].items() <= (
        statefulset["spec"]["template"]["metadata"]["labels"].items())
    policy = find(docs, "NetworkPolicy", "moeflow-redis")
    (rule,) = policy["spec"]["ingress"]
    # Engines and gateways (per-Model, shared), in any namespace; nothing else.
    admitted = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert all(peer["namespaceSelector"] == {} for peer in rule["from"])
    shared = find(render_objects(EVERYTHING_ON), "Deployment", "moeflow-gateway")

    def is_admitted(labels: dict[str, str]) -> bool:
        return any(a.items() <= labels.items() for a in admitted)

    assert is_admitted(naming.model_labels("m", naming.COMPONENT_ENGINE))
    assert is_admitted(naming.model_labels("m", naming.COMPONENT_GATEWAY))
    assert is_admitted(shared["spec"]["template"]["metadata"]["labels"])
    assert not is_admitted(naming.model_labels("m", naming.COMPONENT_BALANCER))
    assert not is_admitted(find(docs, *OPERATOR_DEPLOYMENT)["spec"]["template"]["metadata"][
        "labels"])
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--save") + 1] == "" and "noeviction" in args


def test_model_store_preload_lands_where_engines_mount_it() -> None:
    docs = render_objects(EVERYTHING_ON)
    preload = find(docs, "DaemonSet", "moeflow-model-preload")["spec"]["template"]["spec"]
    (pull,) = preload["initContainers"]
    assert pull["args"] == ["models", "pull", "smollm2-135m-instruct"]
    env = {e["name"]: e["value"] for e in pull["env"]}
    (mount,) = [m for m in pull["volumeMounts"] if m["name"] == "store"]
    # `moeflow models pull x` writes $MOEFLOW_HOME/models/x; the store volume is mounted there.
    assert mount["mountPath"] == f"{env['MOEFLOW_HOME']}/models"
    (volume,) = [v for v in preload["volumes"] if v["name"] == "store"]
    operator_env = literal_env(operator_container(EVERYTHING_ON))
    assert volume["hostPath"]["path"] == operator_env["MOEFLOW_OPERATOR_MODEL_STORE_HOST_PATH"]
    source = parse_model_spec({"source": {"uri": "store://smollm2-135m-instruct"}}).source
    assert model_path_for("smollm2-135m-instruct", source,
                          operator_env["MOEFLOW_OPERATOR_MODEL_MOUNT_PATH"]) == (
        "/models/smollm2-135m-instruct")


def test_model_store_agent_reads_models_only_and_fills_the_store_engines_map() -> None:
    docs = render_objects(EVERYTHING_ON)
    role = find(docs, "ClusterRole", "moeflow-model-store-agent")
    assert role["rules"] == [{"apiGroups": ["moeflow.dev"], "resources": ["models"],
                              "verbs": ["get", "list", "watch"]}]
    binding = find(docs, "ClusterRoleBinding", "moeflow-model-store-agent")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    pod = find(docs, "DaemonSet", "moeflow-model-store-agent")["spec"]["template"]["spec"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    assert ("ServiceAccount", pod["serviceAccountName"]) in kinds(docs)
    (container,) = pod["containers"]
    args = store_build_parser().parse_args(container["args"][1:])  # a valid `moeflow store` call
    assert container["command"] == ["moeflow"] and container["args"][0] == "store"
    assert (args.command, args.namespace, args.budget_gb, args.pinned) == (
        "agent", None, 8.0, ["smollm2-135m-instruct--float32"])
    assert args.dtype == "float32" and args.interval_s == 30.0
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    operator_env = literal_env(operator_container(EVERYTHING_ON))
    # It writes where engines of dramPreload Models map from...
    assert mounts["dram-store"] == str(args.dir)
    assert volumes["dram-store"] == operator_env["MOEFLOW_OPERATOR_DRAM_STORE_HOST_PATH"]
    # ...and reads store://NAME checkpoints where the pre-loader pulls them.
    assert mounts["store"] == str(args.models_dir)
    assert volumes["store"] == operator_env["MOEFLOW_OPERATOR_MODEL_STORE_HOST_PATH"]
    assert container["resources"]["limits"]["memory"] == "12Gi"


def test_model_store_agent_follows_the_watched_namespace() -> None:
    values = {**MODES["one-namespace"], "modelStore": {"dram": {"agent": {"enabled": True}}}}
    pod = find(render_objects(values), "DaemonSet",
               "moeflow-model-store-agent")["spec"]["template"]["spec"]
    assert store_build_parser().parse_args(pod["containers"][0]["args"][1:]).namespace == "team-a"


def notes(values: dict[str, Any] | None = None) -> str:
    return next(t for p, t in render(values).items() if p.endswith("NOTES.txt"))


def test_notes_apply_a_first_model_that_the_operator_accepts() -> None:
    text = notes()
    body = text.split("<<'MODEL'", 1)[1].split("\n", 1)[1].split("\n  MODEL\n", 1)[0]
    model = yaml.safe_load(textwrap.dedent(body))
    assert model["kind"] == "Model" and model["apiVersion"] == naming.API_VERSION
    spec = parse_model_spec(model["spec"])
    assert spec.source.scheme == "store"
    gateway = naming.gateway_name(model["metadata"]["name"])
    assert f"kubectl port-forward service/{gateway} 8000:8000" in text
    assert "/status" in text
    assert "redisUrl" not in text


def test_notes_mention_each_enabled_piece() -> None:
    text = notes(EVERYTHING_ON)
    assert "redisUrl: redis://moeflow-redis.moeflow.svc.cluster.local:6379/0" in text
    assert "moeflow-gateway.moeflow.svc.cluster.local:8000/v1" in text
    assert "docs/dashboards/moeflow-gateway.json" in text
    assert "kubectl apply -n team-a" in notes(MODES["one-namespace"])
    assert "redis://redis.infra.svc:6379/0" in notes(MODES["external-redis"])


def engine_pod(model: str) -> Obj:
    task = parse_spec(TaskSpec, {
        "model": model, "roleGroup": f"{model}-colocated", "role": Role.COLOCATED.value, "rank": 0,
        "template": {"image": "i", "source": {"uri": f"store://{model}"},
                     "modelPath": f"/models/{model}", "port": 8001}})
    return build_pod(f"{model}-colocated-0", NAMESPACE, task, OperatorSettings())


def test_shared_gateway_may_reach_the_engines_of_its_namespace_on_their_port() -> None:
    docs = render_objects(EVERYTHING_ON)
    policy = find(docs, "NetworkPolicy", "moeflow-gateway-to-engines")
    assert policy["metadata"]["namespace"] == NAMESPACE
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    pod = engine_pod("tiny")
    assert spec["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # the release namespace only
    gateway = find(docs, "Deployment", "moeflow-gateway")["spec"]["template"]["metadata"]
    assert peer["podSelector"]["matchLabels"].items() <= gateway["labels"].items()
    # Not per-Model gateways (their own Model's policy admits them), not the operator.
    operator = find(docs, *OPERATOR_DEPLOYMENT)["spec"]["template"]["metadata"]["labels"]
    for labels in (naming.model_labels("tiny", naming.COMPONENT_GATEWAY), operator):
        assert not peer["podSelector"]["matchLabels"].items() <= labels.items()
    ports = [p["port"] for p in rule["ports"]]
    assert ports == [p["name"] for p in pod["spec"]["containers"][0]["ports"]] == ["http"]
    assert ("NetworkPolicy", "moeflow-gateway-to-engines") not in kinds(
        render_objects(MODES["one-shared-gateway"]))  # networkPolicy.enabled=false


def test_operator_pods_carry_the_labels_engines_policies_admit() -> None:
    for docs in (render_objects(), render_objects(MODES["custom-image"])):
        operator = find(docs, "Deployment", next(
            d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"
            and d["metadata"]["name"].endswith("-operator")))
        labels = operator["spec"]["template"]["metadata"]["labels"]
        assert naming.operator_selector().items() <= labels.items()


def test_every_models_gateway_gets_the_tenants_and_the_quota_redis_from_the_operator() -> None:
    """The operator's settings, as the chart renders them, make per-Model gateways like the
    shared one: the same tenants Secret, the same Redis, its password by secretKeyRef."""
    values = {**EVERYTHING_ON, "gateway": {**EVERYTHING_ON["gateway"],
                                          "tenantsSecret": {"name": "moeflow-tenants"},
                                          "quota": {"onRedisFailure": "closed"}}}
    docs = render_objects(values)
    (operator,) = find(docs, "Deployment",
                       "moeflow-operator")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in operator["env"] if "value" in e}
    settings = OperatorSettings(**{
        name.removeprefix("MOEFLOW_OPERATOR_").lower(): value for name, value in env.items()
        if name.startswith(("MOEFLOW_OPERATOR_GATEWAY_TENANTS", "MOEFLOW_OPERATOR_QUOTA"))})
    assert settings.gateway_tenants_secret == "moeflow-tenants"
    assert settings.quota_redis_password_secret == "moeflow-redis-auth"
    assert settings.quota_on_redis_failure == "closed"
    plan = plan_model("tiny", parse_model_spec({"source": {"uri": "store://tiny"}}))
    per_model = build_gateway_deployment("tiny", NAMESPACE, plan.gateway, settings)
    shared = find(docs, "Deployment", "moeflow-gateway")["spec"]["template"]["spec"]
    for pod in (per_model["spec"]["template"]["spec"], shared):
        (container,) = pod["containers"]
        by_name = {e["name"]: e for e in container["env"]}
        assert by_name["MOEFLOW_GATEWAY_QUOTA_REDIS_URL"]["value"] == (
            "redis://moeflow-redis.moeflow.svc.cluster.local:6379/0")
        assert by_name["MOEFLOW_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "moeflow-redis-auth", "key": "password"}
        assert by_name["MOEFLOW_GATEWAY_TENANTS_FILE"]["value"] == (
            "/etc/moeflow/tenants/tenants.yaml")
        (volume,) = [v for v in pod["volumes"] if v["name"] == "tenants"]
        assert volume["secret"]["secretName"] == "moeflow-tenants"
    # without the chart's Redis and a tenants Secret: nothing of it
    (bare,) = find(render_objects({}), "Deployment",
                   "moeflow-operator")["spec"]["template"]["spec"]["containers"]
    assert not {e["name"] for e in bare["env"]} & {
        "MOEFLOW_OPERATOR_GATEWAY_TENANTS_SECRET", "MOEFLOW_OPERATOR_QUOTA_REDIS_URL",
        "MOEFLOW_OPERATOR_QUOTA_REDIS_PASSWORD_SECRET"}
