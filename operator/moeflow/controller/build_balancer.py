"""Pure builders of an attention/expert Model's expert load balancer (`moeflow balancer`).

One Deployment of one replica with the `Recreate` strategy: two balancers of one Model would
both move experts around, so a rollout stops the old one before the new one starts. Each cycle
it lists the Model's EngineInstances (`--discovery kubernetes`) and calls the instances'
/v1/experts/* endpoints, with the Model's internal token (MOEFLOW_INTERNAL_TOKEN from
`<model>-internal-token`), which engines require. It serves nothing (no port, no Service, so
nothing to probe): a cycle's HTTP errors are logged and the next cycle retries, anything else
ends the process and the kubelet restarts it. Its own ServiceAccount and Role allow exactly
that LIST: get/list/watch on EngineInstances. The expert fleet's size is in the argv, so scaling the
expert role rolls the balancer.
"""

from __future__ import annotations

from typing import Any

from moeflow.controller.build_rbac import build_service_account_rbac
from moeflow.controller.build_security import internal_token_env
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.plan import BalancerPlan

Obj = dict[str, Any]

# One LIST of EngineInstances and a few small HTTP calls per cycle; no weights, no torch.
BALANCER_CPU = "100m"
BALANCER_MEMORY = "256Mi"


def build_balancer_deployment(model: str, namespace: str, balancer: BalancerPlan,
                              settings: OperatorSettings) -> Obj:
    labels = naming.model_labels(model, naming.COMPONENT_BALANCER)
    container: Obj = {
        "name": "balancer",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(balancer.argv),
        "env": [internal_token_env(model)],
        "resources": {
            "requests": {"cpu": BALANCER_CPU, "memory": BALANCER_MEMORY},
            "limits": {"memory": BALANCER_MEMORY},
        },
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": balancer.name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": naming.balancer_selector(model)},
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"serviceAccountName": balancer.name, "enableServiceLinks": False,
                         "containers": [container]},
            },
        },
    }


def build_balancer_rbac(model: str, namespace: str) -> list[Obj]:
    """ServiceAccount, Role (read EngineInstances) and RoleBinding."""
    return build_service_account_rbac(
        naming.balancer_name(model), namespace,
        naming.model_labels(model, naming.COMPONENT_BALANCER),
        [{"apiGroups": [naming.GROUP], "resources": [naming.PLURAL_ENGINE_INSTANCES],
          "verbs": ["get", "list", "watch"]}])
