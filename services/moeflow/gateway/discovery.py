"""Where the gateway learns which engine instances exist (pluggable; I/O at the edge).

``Discovery.ready_urls()`` returns the URLs of instances that are ready to serve now.
``StaticDiscovery`` is the local runtime's (a fixed list); ``KubeDiscovery`` reads the Task
objects of one Model on a cluster (the operator mirrors Pod readiness into Task status).
The registry reconciles its instances against this list (``ModelRegistry.sync``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from moeflow.domain.roles import Role


class Discovery(Protocol):
    async def ready_urls(self) -> list[str]: ...

    def close(self) -> None: ...


class StaticDiscovery:
    def __init__(self, urls: Sequence[str]) -> None:
        self._urls = list(urls)

    async def ready_urls(self) -> list[str]:
        return list(self._urls)

    def close(self) -> None:
        return None


class KubeDiscovery:
    """Ready instances of ``model_name`` in ``namespace``, from its Task objects."""

    def __init__(self, namespace: str, model_name: str, kubeconfig: str | None = None) -> None:
        from moeflow.kube.discovery import KubeTaskDiscovery

        self._tasks = KubeTaskDiscovery(namespace, kubeconfig=kubeconfig)
        self._model = model_name

    async def ready_urls(self) -> list[str]:
        instances = await self._tasks.list_instances(self._model)
        # expert instances answer attention instances over XCCL, never a gateway
        return [i.url for i in instances if i.is_ready and i.role != Role.EXPERT]

    def close(self) -> None:
        self._tasks.close()
