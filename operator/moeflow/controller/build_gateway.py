"""Pure builders of a Model's gateway and of the list of everything a Model owns (gateway,
instances Service, expert balancer in attention/expert mode, RoleGroups).

The gateway is a Deployment, not a RoleGroup of EngineInstances: it is stateless, holds no rank and
no
weights, and is scaled and rolled like any web front end (HPA, rolling updates). It finds the
engine instances itself by listing the Model's EngineInstances (`--discovery kubernetes`), for
which it
gets its own ServiceAccount and a namespaced Role limited to reading EngineInstances and Models,
and to
patching its own Model (scale from zero sets `spec.roles.<role>.replicas`,
`moeflow.gateway.kube_scale`).

The gateway holds the Model's internal token (MOEFLOW_INTERNAL_TOKEN from
`<model>-internal-token`) and sends it to the engines, which accept work only with it. Its
probes: readiness on /health/ready (503 while no served model can be served: the Pod leaves
the Service, nothing restarts), liveness on /health/live (the process answering; it does not
depend on engines, so a gateway waiting for its engines is never restarted).

Tenants and quotas (`gateway_tenancy`): from the operator's settings, every Model's gateway gets
the tenants Secret as a file and the quota Redis with its password, like the chart's shared one.
"""

from __future__ import annotations

from typing import Any

from moeflow.controller.build_balancer import build_balancer_deployment, build_balancer_rbac
from moeflow.controller.build_engine import (
    LIVE_PATH,
    READY_PATH,
    build_instances_service,
    build_job,
    http_probe,
    task_template,
)
from moeflow.controller.build_rbac import build_service_account_rbac
from moeflow.controller.build_security import (
    build_engines_network_policy,
    internal_token_env,
)
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.plan import GatewayPlan, ModelPlan

Obj = dict[str, Any]

TENANTS_DIR = "/etc/moeflow/tenants"
"""Where a gateway sees the tenants Secret: the whole Secret, not a subPath, so the kubelet's
refreshes reach the file (a subPath mount never changes)."""


def gateway_tenancy(settings: OperatorSettings) -> tuple[list[Obj], list[Obj], list[Obj]]:
    """Env, volumes and mounts that give a Model's gateway the tenants file and the quota
    Redis of the operator's settings, as the chart gives its shared gateway. The password
    comes by secretKeyRef (never a literal); both Secrets must exist in the Model's namespace
    and are not optional: a gateway waits for them rather than serve without keys."""
    env: list[Obj] = []
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    if settings.gateway_tenants_secret:
        env.append({"name": "MOEFLOW_GATEWAY_TENANTS_FILE",
                    "value": f"{TENANTS_DIR}/{settings.gateway_tenants_secret_key}"})
        volumes.append({"name": "tenants", "secret": {
            "secretName": settings.gateway_tenants_secret, "defaultMode": 0o444}})
        mounts.append({"name": "tenants", "mountPath": TENANTS_DIR, "readOnly": True})
    if settings.quota_redis_url:
        env.append({"name": "MOEFLOW_GATEWAY_QUOTA_REDIS_URL",
                    "value": settings.quota_redis_url})
        if settings.quota_redis_password_secret:
            env.append({"name": "MOEFLOW_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
                "name": settings.quota_redis_password_secret,
                "key": settings.quota_redis_password_secret_key}}})
        env.append({"name": "MOEFLOW_GATEWAY_QUOTA_ON_REDIS_FAILURE",
                    "value": settings.quota_on_redis_failure})
    return env, volumes, mounts


def build_gateway_deployment(model: str, namespace: str, gateway: GatewayPlan,
                             settings: OperatorSettings) -> Obj:
    labels = naming.model_labels(model, naming.COMPONENT_GATEWAY)
    tenancy_env, volumes, mounts = gateway_tenancy(settings)
    container: Obj = {
        "name": "gateway",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(gateway.argv),
        "ports": [{"name": "http", "containerPort": gateway.port, "protocol": "TCP"}],
        "env": [internal_token_env(model), *tenancy_env],
        "resources": {
            "requests": {"cpu": settings.gateway_cpu, "memory": settings.gateway_memory},
            "limits": {"memory": settings.gateway_memory},
        },
        # /health/ready is 503 while no engine can serve: that only takes the Pod out of the
        # Service; liveness (/health/live) must not restart a gateway that waits for engines
        # imports and start-up take seconds on a slow node: up to 2 minutes before liveness
        "startupProbe": http_probe("http", LIVE_PATH, period_s=2, failure_threshold=60),
        "readinessProbe": http_probe("http", READY_PATH, period_s=5, failure_threshold=3),
        "livenessProbe": http_probe("http", LIVE_PATH, period_s=10, failure_threshold=3),
    }
    pod_spec: Obj = {"serviceAccountName": gateway.name, "enableServiceLinks": False,
                     "containers": [container]}
    if volumes:
        container["volumeMounts"] = mounts
        pod_spec["volumes"] = volumes
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": gateway.name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": gateway.replicas,
            "selector": {"matchLabels": naming.gateway_selector(model)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels},
                "spec": pod_spec,
            },
        },
    }


def build_gateway_service(model: str, namespace: str, port: int) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": naming.gateway_name(model), "namespace": namespace,
                     "labels": naming.model_labels(model, naming.COMPONENT_GATEWAY)},
        "spec": {
            "type": "ClusterIP",
            "selector": naming.gateway_selector(model),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_gateway_rbac(model: str, namespace: str) -> list[Obj]:
    """ServiceAccount, Role (read EngineInstances and Models, patch this Model) and RoleBinding."""
    return build_service_account_rbac(
        naming.gateway_name(model), namespace,
        naming.model_labels(model, naming.COMPONENT_GATEWAY),
        [{"apiGroups": [naming.GROUP], "resources": [naming.PLURAL_ENGINE_INSTANCES, "models"],
          "verbs": ["get", "list", "watch"]},
         {"apiGroups": [naming.GROUP], "resources": ["models"],
          "resourceNames": [model], "verbs": ["patch"]}])


def build_model_children(plan: ModelPlan, namespace: str, settings: OperatorSettings) -> list[Obj]:
    """Everything a Model owns directly, in apply order: RBAC before the Deployment that uses
    it, Services before the Pods that register in them, the engines' NetworkPolicy before any
    engine exists, the expert balancer (attention/expert mode), then one RoleGroup per role. Not the
    internal token Secret: that one is created once, never applied (`reconcile_model`)."""
    template = task_template(plan.spec, plan.model_path, settings)
    balancer: list[Obj] = []
    if plan.balancer is not None:
        balancer = [*build_balancer_rbac(plan.model, namespace),
                    build_balancer_deployment(plan.model, namespace, plan.balancer, settings)]
    return [
        *build_gateway_rbac(plan.model, namespace),
        build_gateway_service(plan.model, namespace, plan.gateway.port),
        build_instances_service(plan.model, namespace, settings.engine_port),
        build_engines_network_policy(plan.model, namespace, settings),
        build_gateway_deployment(plan.model, namespace, plan.gateway, settings),
        *balancer,
        *(build_job(plan.model, namespace, job, template) for job in plan.jobs),
    ]
