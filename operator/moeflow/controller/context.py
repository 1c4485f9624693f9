"""What every handler needs, built once at operator startup and kept in kopf's memo.

There is no module-level state: `main.startup` builds one `OperatorContext` from the typed
settings and stores it under `memo["moeflow"]`; handlers fetch it with `context_of(memo)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from moeflow.controller.coalesce import Coalescer
from moeflow.controller.engine_report import EngineStatsClient, HttpEngineStats
from moeflow.controller.settings import OperatorSettings
from moeflow.controller.warm_claim import HttpWarmClaims, WarmClaimClient
from moeflow.kube.api import KubeApi

MEMO_KEY = "moeflow"
WARM_CLAIMS_KEY = "warm_claims"
"""A `WarmClaimClient` put in the operator's root memo under this key replaces the HTTP one
(tests: a double; `kopf.operator(memo=kopf.Memo(warm_claims=...))`)."""
T = TypeVar("T")


@dataclass
class OperatorContext:
    settings: OperatorSettings
    api: KubeApi
    refreshes: Coalescer = field(default_factory=Coalescer)
    executor: ThreadPoolExecutor | None = None
    engine_stats: EngineStatsClient | None = None
    """How the autoscaler reads engines' /v1/stats; default: HTTP on the Pod IP."""
    warm_claims: WarmClaimClient | None = None
    """How an EngineInstance hands a claimed warm Pod its instance; default: HTTP on the Pod IP."""
    autoscaled: set[tuple[str, str]] = field(default_factory=set)
    """(namespace, name) of the Models with autoscaling bounds, kept by a Model event handler."""
    background: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.engine_stats is None:
            self.engine_stats = HttpEngineStats(self.settings.engine_stats_timeout_s)
        if self.warm_claims is None:
            self.warm_claims = HttpWarmClaims(self.settings.warm_pool_claim_timeout_s)
        if self.executor is None:
            self.executor = ThreadPoolExecutor(self.settings.handler_workers,
                                               thread_name_prefix="moeflow-api")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking API function off the event loop, on the handler thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def stop_background(self) -> None:
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.background.clear()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if isinstance(self.engine_stats, HttpEngineStats):
            self.engine_stats.close()
        if isinstance(self.warm_claims, HttpWarmClaims):
            self.warm_claims.close()
        self.api.close()


def context_of(memo: Mapping[str, Any]) -> OperatorContext:
    ctx = memo.get(MEMO_KEY)
    if not isinstance(ctx, OperatorContext):
        raise RuntimeError("the moeflow startup handler has not run: no OperatorContext in memo")
    return ctx
