"""The generation service with tenants: model access, the ``max_tokens`` ceiling, token quotas
and metering, around ``GenerationService.open`` (every engine task of every route passes there).

The tenant comes from ``current_tenant`` (set by ``ApiKeyMiddleware`` for the request). Per
engine task: the prompt is charged at admission (429 when it would pass the tenant's tokens per
minute; refunded when the task never starts), and the completion when the task ends, with the
counts the client receives in ``usage``; both feed the usage store and the Prometheus counters.
The choices of one prompt (``n`` > 1) share its prompt tokens, charged once, as in ``usage``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from moeflow.domain.errors import ModelNotFoundError
from moeflow.domain.messages import SamplingParams, TokenChunk
from moeflow.gateway.generation import GenerationService
from moeflow.gateway.quota import Quota, QuotaExceededError
from moeflow.gateway.registry import ServedModel
from moeflow.gateway.tenants import Tenant, current_tenant, request_prompts

logger = logging.getLogger(__name__)


class TenantMetrics:
    """Per-tenant counters; label values are tenant names (bounded by the tenants file), never
    keys."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "moeflow_tenant_requests", "Answers to /v1 requests per tenant and final status",
            ["tenant", "status"], registry=registry)
        self.prompt_tokens = Counter(
            "moeflow_tenant_prompt_tokens", "Prompt tokens per tenant and model",
            ["tenant", "model"], registry=registry)
        self.completion_tokens = Counter(
            "moeflow_tenant_completion_tokens", "Completion tokens per tenant and model",
            ["tenant", "model"], registry=registry)
        self.rate_limited = Counter(
            "moeflow_tenant_rate_limited", "Requests refused with 429 per tenant and limit",
            ["tenant", "limit"], registry=registry)
        self.backend = Gauge(
            "moeflow_gateway_quota_backend",
            "1 for the store quotas use now: redis, or local (this replica's memory)",
            ["backend"], registry=registry)

    def set_backend(self, backend: str) -> None:
        for name in ("redis", "local"):
            self.backend.labels(name).set(1 if name == backend else 0)


@dataclass
class MeteredGenerationService(GenerationService):
    quota: Quota | None = None
    tenant_metrics: TenantMetrics | None = None
    _settling: set[asyncio.Task[None]] = field(default_factory=set)

    async def open(
        self,
        model: ServedModel,
        endpoint: str,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        tenant = current_tenant.get()
        if tenant is None or self.quota is None:
            return await super().open(model, endpoint, request_id, prompt_token_ids, sampling,
                                      is_disconnected)
        if not tenant.may_use(model.name):
            # the same answer as a model that does not exist: no probing of other tenants'
            raise ModelNotFoundError(f"the model {model.name!r} does not exist",
                                     param="model")
        ceiling = tenant.limits.max_tokens
        if ceiling and sampling.max_tokens > ceiling:
            sampling = sampling.model_copy(update={"max_tokens": ceiling})
        charged = request_prompts.get()
        key = hash(tuple(prompt_token_ids))
        is_new_prompt = charged is None or key not in charged
        if charged is not None:
            charged.add(key)
        num_prompt = len(prompt_token_ids) if is_new_prompt else 0
        try:
            await self.quota.charge_tokens(tenant, num_prompt, check=True)
        except QuotaExceededError as exc:
            if self.tenant_metrics is not None:
                self.tenant_metrics.rate_limited.labels(tenant.name, exc.limit).inc()
            raise
        try:
            stream = await super().open(model, endpoint, request_id, prompt_token_ids,
                                        sampling, is_disconnected)
        except BaseException:
            await self.quota.charge_tokens(tenant, -num_prompt, check=False)
            raise
        return self._metered(stream, tenant, model.name, num_prompt, is_new_prompt)

    async def _metered(self, stream: AsyncGenerator[TokenChunk, None], tenant: Tenant,
                       model: str, num_prompt: int, is_new_prompt: bool
                       ) -> AsyncGenerator[TokenChunk, None]:
        last: TokenChunk | None = None
        try:
            async for chunk in stream:
                last = chunk
                yield chunk
        finally:
            await stream.aclose()
            prompt = (last.num_prompt_tokens if last is not None else num_prompt
                      ) if is_new_prompt else 0
            completion = last.num_output_tokens if last is not None else 0
            # a task, so that a cancelled request still settles; shielded while we wait for it
            task = asyncio.create_task(self._settle(tenant, model, num_prompt, prompt,
                                                    completion))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
            await asyncio.shield(task)

    async def _settle(self, tenant: Tenant, model: str, charged_prompt: int, prompt: int,
                      completion: int) -> None:
        assert self.quota is not None
        try:
            await self.quota.charge_tokens(tenant, prompt - charged_prompt + completion,
                                           check=False)
            await self.quota.record_usage(tenant.name, model, prompt_tokens=prompt,
                                          completion_tokens=completion)
        except Exception:  # metering must never break an answer already given
            logger.exception("usage of tenant %s not recorded", tenant.name)
        if self.tenant_metrics is not None:
            self.tenant_metrics.prompt_tokens.labels(tenant.name, model).inc(prompt)
            self.tenant_metrics.completion_tokens.labels(tenant.name, model).inc(completion)
