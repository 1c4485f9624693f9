"""Scale from zero on Kubernetes: the gateway's ``ScaleUpRequester`` that wakes its Model.

``request_scale_up(model, num_waiting)`` returns at once; one worker thread reads the Model and,
if a role of its mode is at zero replicas, merge-patches ``spec.roles.<role>.replicas`` to
``max(1, minReplicas)`` (``moeflow.domain.autoscale.wake_replicas``), locked on the Model's
resourceVersion. The operator then makes the Job's Task and Pod as for any replica change, and
the gateway's discovery sees the Task turn ready.

Idempotent: a Model with no role at zero is left alone, a call while the previous one for the
same model is still running is dropped, and a lost race (409) is retried on the next call (the
wake queue calls about every second while requests wait). The gateway's Role allows ``patch``
on its own Model only (``moeflow.controller.build_gateway.build_gateway_rbac``).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from moeflow.domain.autoscale import replicas_patch, wake_replicas
from moeflow.domain.spec import SpecError, parse_model_spec
from moeflow.kube import api as kube
from moeflow.kube.api import Conflict, KubeApi

logger = logging.getLogger(__name__)


class KubeScaleUp:
    """``ScaleUpRequester`` that patches the Model's replicas in ``namespace``."""

    def __init__(self, namespace: str, *, api: KubeApi | None = None,
                 kubeconfig: str | None = None) -> None:
        self.namespace = namespace
        self._api = api if api is not None else KubeApi.from_config(kubeconfig)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moeflow-scale-up")
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()

    def request_scale_up(self, model: str, num_waiting: int) -> None:
        with self._lock:
            if model in self._in_flight:
                return
            self._in_flight.add(model)
        future = self._pool.submit(self.wake, model, num_waiting)
        future.add_done_callback(lambda f: self._done(model, f))

    def _done(self, model: str, future: Future[bool]) -> None:
        with self._lock:
            self._in_flight.discard(model)
        if not future.cancelled() and (error := future.exception()) is not None:
            logger.warning("waking %s failed; retried while requests wait: %s", model, error)

    def wake(self, model: str, num_waiting: int = 0) -> bool:
        """Blocking: patch the Model if a role is at zero. True if it patched."""
        body = self._api.get(kube.MODEL, self.namespace, model)
        if body is None:
            logger.warning("cannot wake %s: no Model %s/%s", model, self.namespace, model)
            return False
        try:
            wanted = wake_replicas(parse_model_spec(body.get("spec")))
        except SpecError as e:
            logger.warning("cannot wake %s: invalid spec: %s", model, e)
            return False
        if not wanted:
            return False
        patch = replicas_patch(wanted, body["metadata"].get("resourceVersion"))
        try:
            self._api.patch(kube.MODEL, self.namespace, model, patch)
        except Conflict:
            return False  # changed meanwhile; the next call reads it again
        logger.info("woke %s for %d waiting request(s): %s", model, num_waiting,
                    ", ".join(f"{role.value}={n}" for role, n in wanted.items()))
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()
