"""Deterministic names and labels of everything the operator makes. Pure; no kopf/kubernetes.

Names are functions of (model, role, rank) only, so that a restarted operator or a replayed
event finds what already exists (409 = already there) instead of making a twin:

    RoleGroup            <model>-<role>         e.g. smollm2-135m-instruct-decode
    EngineInstance/Pod   <model>-<role>-<rank>  e.g. smollm2-135m-instruct-decode-0
    gateway   <model>-gateway            Deployment, Service, ServiceAccount, Role, RoleBinding
    balancer  <model>-balancer           Deployment, ServiceAccount, Role, RoleBinding (AE only)
    headless  <model>-instances          Service; Pod DNS <task>.<model>-instances.<ns>.svc
    token     <model>-internal-token     Secret: the token gateway/balancer send to engines
    policy    <model>-engines            NetworkPolicy: who may reach the Model's engines
    results   <request>-results          ConfigMap written by a Request
    warm Pod  <pool>-<n>                 n: the lowest numbers no Pod of the pool uses

Labels follow app.kubernetes.io/* plus moeflow.dev/* keys that selectors and discovery use.

Kinds: the paper's request-job-task model names a role group a "job" and one instance a "task";
in Python (plans, `job_name`, `task_name`) those words stay. On the API server the kinds are
`RoleGroup` and `EngineInstance`: `Job` is batch/v1's and `Task` Tekton's, so `kubectl get jobs`
or `kubectl get tasks` never showed ours (v1alpha1 `Job`/`Task` objects are not converted: see
docs/operations.md, "Upgrading from the Job/Task kinds").
"""

from __future__ import annotations

from moeflow.domain.roles import Role

GROUP = "moeflow.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_MODEL = "moeflow.dev/model"
LABEL_ROLE = "moeflow.dev/role"
LABEL_RANK = "moeflow.dev/rank"
LABEL_JOB = "moeflow.dev/role-group"
LABEL_TASK = "moeflow.dev/engine-instance"
LABEL_WARM_POOL = "moeflow.dev/warm-pool"
LABEL_WARM_STATE = "moeflow.dev/warm-state"
KIND_ROLE_GROUP = "RoleGroup"
"""One role group of a Model (all replicas of one role); it has the scale subresource."""
KIND_ENGINE_INSTANCE = "EngineInstance"
"""One engine instance (one rank of one role): the controller of exactly one Pod."""
PLURAL_ROLE_GROUPS = "rolegroups"
PLURAL_ENGINE_INSTANCES = "engineinstances"
WARM_IDLE, WARM_CLAIMED = "idle", "claimed"
MANAGED_BY = "moeflow-operator"
COMPONENT_ENGINE = "engine"
COMPONENT_GATEWAY = "gateway"
COMPONENT_BALANCER = "balancer"
COMPONENT_WARM_POOL = "warm-pool"
COMPONENT_INTERNAL_TOKEN = "internal-token"
COMPONENT_OPERATOR = "operator"
"""The operator's own Pods carry this component and part-of=moeflow (chart and deploy/base)."""

# The internal token: engines accept work only with it (header x-moeflow-internal-token);
# every process that calls engines reads it from this variable, filled from the Model's Secret.
INTERNAL_TOKEN_ENV = "MOEFLOW_INTERNAL_TOKEN"
INTERNAL_TOKEN_KEY = "token"
"""Key of the token in `<model>-internal-token`."""

# Annotation on RoleGroups: the replicas the operator last wrote from the Model. A spec.replicas
# that differs was set through the scale subresource (kubectl scale, HPA, KEDA).
ANNOTATION_APPLIED_REPLICAS = "moeflow.dev/applied-replicas"

# Annotation on Pods: hash of everything the Pod was built from; a change means "recreate".
ANNOTATION_TEMPLATE_HASH = "moeflow.dev/template-hash"


def job_name(model: str, role: Role) -> str:
    return f"{model}-{role.value}"


def task_name(model: str, role: Role, rank: int) -> str:
    return f"{model}-{role.value}-{rank}"


def gateway_name(model: str) -> str:
    return f"{model}-gateway"


def balancer_name(model: str) -> str:
    return f"{model}-balancer"


def instances_service_name(model: str) -> str:
    return f"{model}-instances"


def internal_token_secret_name(model: str) -> str:
    return f"{model}-internal-token"


def engines_network_policy_name(model: str) -> str:
    return f"{model}-engines"


def results_configmap_name(request: str) -> str:
    return f"{request}-results"


def warm_pod_name(pool: str, number: int) -> str:
    return f"{pool}-{number}"


def warm_pool_labels(pool: str) -> dict[str, str]:
    """Labels of an idle warm Pod; a claim sets LABEL_WARM_STATE to WARM_CLAIMED."""
    return {
        LABEL_NAME: "moeflow",
        LABEL_INSTANCE: pool,
        LABEL_COMPONENT: COMPONENT_WARM_POOL,
        LABEL_PART_OF: "moeflow",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_WARM_POOL: pool,
        LABEL_WARM_STATE: WARM_IDLE,
    }


def model_labels(model: str, component: str) -> dict[str, str]:
    """Labels shared by every object of one Model's `component` (engine, gateway, balancer)."""
    return {
        LABEL_NAME: "moeflow",
        LABEL_INSTANCE: model,
        LABEL_COMPONENT: component,
        LABEL_PART_OF: "moeflow",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_MODEL: model,
    }


def gateway_selector(model: str) -> dict[str, str]:
    return {LABEL_MODEL: model, LABEL_COMPONENT: COMPONENT_GATEWAY}


def balancer_selector(model: str) -> dict[str, str]:
    return {LABEL_MODEL: model, LABEL_COMPONENT: COMPONENT_BALANCER}


def engine_selector(model: str) -> dict[str, str]:
    return {LABEL_MODEL: model, LABEL_COMPONENT: COMPONENT_ENGINE}


def operator_selector() -> dict[str, str]:
    """Labels of the operator's Pods (the chart's and deploy/base's Deployment)."""
    return {LABEL_PART_OF: "moeflow", LABEL_COMPONENT: COMPONENT_OPERATOR}


def job_labels(model: str, role: Role) -> dict[str, str]:
    return {**model_labels(model, COMPONENT_ENGINE), LABEL_ROLE: role.value}


def task_labels(model: str, role: Role, rank: int) -> dict[str, str]:
    return {
        **job_labels(model, role),
        LABEL_JOB: job_name(model, role),
        LABEL_TASK: task_name(model, role, rank),
        LABEL_RANK: str(rank),
    }


def instance_url(model: str, role: Role, rank: int, namespace: str, port: int,
                 cluster_domain: str = "cluster.local") -> str:
    """The stable in-cluster URL of one instance (Pod hostname + headless Service subdomain)."""
    host = f"{task_name(model, role, rank)}.{instances_service_name(model)}.{namespace}.svc"
    return f"http://{host}.{cluster_domain}:{port}"


def gateway_url(model: str, namespace: str, port: int,
                cluster_domain: str = "cluster.local") -> str:
    return f"http://{gateway_name(model)}.{namespace}.svc.{cluster_domain}:{port}"
