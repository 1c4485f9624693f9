"""Engine instance discovery from EngineInstance objects, for the gateway (`--discovery
kubernetes`).

- `instances_from_tasks` is pure: EngineInstance dicts in, `Instance`s out, sorted by (role, rank).
  An EngineInstance being deleted is left out; readiness is the EngineInstance's `status.ready`,
  which the
  operator mirrors from the Pod's readiness probe on GET /health.
- `KubeTaskDiscovery` reads EngineInstances with the Kubernetes client. `list_instances` is one LIST
  (label selector `moeflow.dev/model=<name>`); `watch` polls and yields only on change.
  Polling rather than a watch stream keeps it restart-free and cheap enough for a gateway
  (one LIST per interval per model), at the cost of `interval_s` of staleness.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from moeflow.domain import naming
from moeflow.kube import api as kube
from moeflow.kube.api import KubeApi

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Instance:
    model: str
    role: str
    rank: int
    url: str
    is_ready: bool


def instances_from_tasks(task_objects: Iterable[Mapping[str, Any]]) -> list[Instance]:
    instances: list[Instance] = []
    for task in task_objects:
        meta = task.get("metadata") or {}
        spec = task.get("spec") or {}
        task_status = task.get("status") or {}
        if meta.get("deletionTimestamp") or "role" not in spec or "rank" not in spec:
            continue
        url = task_status.get("endpoint")
        if not url:
            continue  # the operator has not observed its Pod yet: nothing to route to
        instances.append(Instance(
            model=str(spec.get("model", "")), role=str(spec["role"]), rank=int(spec["rank"]),
            url=str(url), is_ready=bool(task_status.get("ready", False)),
        ))
    return sorted(instances, key=lambda i: (i.model, i.role, i.rank))


class KubeTaskDiscovery:
    """Instances of a Model in one namespace, read from the API server."""

    def __init__(self, namespace: str, *, api: KubeApi | None = None,
                 kubeconfig: str | None = None) -> None:
        self.namespace = namespace
        self._api = api if api is not None else KubeApi.from_config(kubeconfig)

    async def list_instances(self, model_name: str) -> list[Instance]:
        tasks = await asyncio.to_thread(self._api.list, kube.ENGINE_INSTANCE, self.namespace,
                                        {naming.LABEL_MODEL: model_name})
        return [i for i in instances_from_tasks(tasks) if i.model == model_name]

    async def watch(self, model_name: str, *, interval_s: float = 2.0
                    ) -> AsyncIterator[list[Instance]]:
        """Yield the instance list now, then each time it changes. Errors of single polls are
        not raised: the last known list stays valid until a poll succeeds."""
        last: list[Instance] | None = None
        while True:
            current: list[Instance] | None
            try:
                current = await self.list_instances(model_name)
            except Exception as e:  # an API hiccup must not kill the gateway's discovery loop
                logger.warning("listing EngineInstances of %s failed, keeping the last list: %s",
                               model_name, e)
                current = last
            if current is not None and current != last:
                last = current
                yield current
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        self._api.close()
