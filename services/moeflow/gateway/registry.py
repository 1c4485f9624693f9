"""Served models and their engine instances, as this gateway knows them.

Filled from the instances themselves: each reports its ``ModelInfo`` (tokenizer included), so
the gateway needs no access to weights. A background task refreshes ``EngineStats`` for routing
and metrics and marks instances that stop answering as unhealthy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from moeflow.domain.errors import BackendUnavailableError, ModelNotFoundError
from moeflow.domain.messages import EngineStats, ModelInfo
from moeflow.gateway.discovery import Discovery
from moeflow.gateway.engine_client import EngineClient
from moeflow.gateway.routing import (
    InstanceView,
    Placement,
    PrefixTracker,
    adapter_instances,
    place,
    prefix_keys,
)
from moeflow.text.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    info: ModelInfo
    tokenizer: TextTokenizer
    instances: list[InstanceView] = field(default_factory=list)
    stats: dict[str, EngineStats] = field(default_factory=dict)
    prefixes: PrefixTracker = field(default_factory=PrefixTracker)
    adapter: str | None = None
    """A request's view of the model with one of its LoRA adapters (``with_adapter``)."""

    @property
    def name(self) -> str:
        """The base model's name: what limits, metrics and scale from zero are keyed by."""
        return self.info.served_model_name

    @property
    def public_name(self) -> str:
        """The name a response reports: the adapter's, or the base model's."""
        return self.adapter or self.name

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters some instance of this model serves."""
        return sorted({a for i in self.instances for a in i.adapters})

    def with_adapter(self, adapter: str) -> ServedModel:
        """This model, for requests of ``adapter`` (its instances and state are shared)."""
        return ServedModel(info=self.info, tokenizer=self.tokenizer, instances=self.instances,
                           stats=self.stats, prefixes=self.prefixes, adapter=adapter)


def instance_state(stats: EngineStats) -> str:
    """What an instance's own stats say about taking work: healthy, loop_dead,
    transport_down or draining."""
    if not stats.is_loop_alive:
        return "loop_dead"
    if not stats.is_transport_ok:
        return "transport_down"
    if stats.is_draining:
        return "draining"
    return "healthy"


class ModelRegistry:
    def __init__(self, client: EngineClient) -> None:
        self._client = client
        self.models: dict[str, ServedModel] = {}

    def get(self, name: str) -> ServedModel:
        """The model ``name`` names: a base model, ``base:adapter``, or an adapter's own name
        (a view of its base model with ``adapter`` set)."""
        model = self.models.get(name)
        if model is not None:
            return model
        base, sep, adapter = name.partition(":")
        if sep and base in self.models and adapter in self.models[base].adapters:
            return self.models[base].with_adapter(adapter)
        for candidate in self.models.values():
            if name in candidate.adapters:
                return candidate.with_adapter(name)
        known = ", ".join(sorted(self.models)) or "none"
        raise ModelNotFoundError(
            f"the model {name!r} does not exist; served models: {known} (GET /v1/models "
            "lists them with their adapters)", param="model")

    def is_awake(self, name: str) -> bool:
        """False only for a known model with no healthy instance (one to scale up from zero);
        an unknown model has nothing to wait for (``get`` refuses it)."""
        model = self.models.get(name)
        return model is None or any(i.is_healthy for i in model.instances)

    async def probe(self, discovery: Discovery) -> None:
        """Sync with ``discovery`` and refresh stats now (scale from zero polls this)."""
        await self.sync(await discovery.ready_urls())
        await self.refresh_stats()

    def place(
        self, model: ServedModel, prompt_token_ids: list[int], max_tokens: int,
        min_prompt_tokens_for_split: int, interference_weight: float = 1.0,
    ) -> Placement:
        keys = prefix_keys(prompt_token_ids, adapter=model.adapter)
        instances = adapter_instances(model.instances, model.adapter)
        matches = {i.url: model.prefixes.match_blocks(i.url, keys) for i in instances}
        placement = place(
            instances,
            num_prompt_tokens=len(prompt_token_ids),
            max_tokens=max_tokens,
            min_prompt_tokens_for_split=min_prompt_tokens_for_split,
            prefix_blocks=matches,
            interference_weight=interference_weight,
        )
        if placement is None:
            raise BackendUnavailableError(
                f"no healthy instance serves {model.public_name!r} right now")
        model.prefixes.record(placement.computes_prompt.url, keys)
        return placement

    def mark_unhealthy(self, model: ServedModel, url: str, reason: str) -> None:
        """Stop routing to an instance that failed a request (the stats poller revives it
        once it answers again)."""
        for instance in model.instances:
            if instance.url == url:
                if instance.is_healthy:
                    logger.warning("instance %s of %s marked unhealthy: %s", url, model.name,
                                   reason)
                instance.is_healthy = False
                instance.state = reason

    async def add_instance(self, url: str) -> None:
        info = await self._client.model_info(url)
        model = self.models.get(info.served_model_name)
        if model is None:
            tokenizer = TextTokenizer(
                info.tokenizer_json,
                chat_template=info.chat_template,
                bos_token=info.bos_token,
                eos_token=info.eos_token,
            )
            model = ServedModel(info=info, tokenizer=tokenizer)
            self.models[info.served_model_name] = model
        if all(i.url != url for i in model.instances):
            view = InstanceView(url=url, role=info.role, rank_name=info.xccl_rank)
            try:  # its LoRA adapters now, not at the next stats poll: a request may name one
                stats = await self._client.stats(url)
                view.adapters = frozenset(stats.adapters)
                view.resident_adapters = frozenset(stats.resident_adapters)
            except Exception as exc:  # the poller fills them in
                logger.info("instance %s: no stats yet (%s)", url, type(exc).__name__)
            model.instances.append(view)
        logger.info("serving %s from %s (%s)", info.served_model_name, url, info.role)

    async def discover(self, urls: Sequence[str], timeout_s: float) -> None:
        """Wait until every listed instance has reported its model, or fail after timeout_s."""
        deadline = time.monotonic() + timeout_s
        pending = list(urls)
        while pending:
            still: list[str] = []
            for url in pending:
                try:
                    await self.add_instance(url)
                except Exception:  # not up yet: retry until the deadline
                    still.append(url)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise BackendUnavailableError(
                        f"engine instances did not come up within {timeout_s:.0f} s: {pending}"
                    )
                await asyncio.sleep(0.2)

    async def sync(self, urls: Sequence[str]) -> None:
        """Make the instance set equal ``urls``: add new ones (once they answer), drop gone ones.

        A model whose last instance is gone stays listed (its requests get 503 until an
        instance returns), so clients do not see models flicker during restarts.
        """
        wanted = set(urls)
        for model in self.models.values():
            # in place: requests' adapter views share the list
            model.instances[:] = [i for i in model.instances if i.url in wanted]
            for url in list(model.stats):
                if url not in wanted:
                    del model.stats[url]
        known = {i.url for m in self.models.values() for i in m.instances}
        for url in urls:
            if url not in known:
                try:
                    await self.add_instance(url)
                except Exception as exc:  # not answering yet: the next sync retries
                    logger.info("instance %s not ready yet: %s", url, type(exc).__name__)

    async def follow(self, discovery: Discovery, interval_s: float) -> None:
        """Keep the instance set in step with ``discovery`` (a background task)."""
        while True:
            try:
                await self.sync(await discovery.ready_urls())
            except Exception:
                logger.exception("discovery failed; keeping the last instance set")
            await asyncio.sleep(interval_s)

    async def refresh_stats(self) -> None:
        for model in self.models.values():
            for instance in model.instances:
                try:
                    stats = await self._client.stats(instance.url)
                except Exception:
                    if instance.is_healthy:
                        logger.warning("instance %s stopped answering", instance.url)
                    instance.is_healthy, instance.state = False, "unreachable"
                    continue
                state = instance_state(stats)
                if state != instance.state:
                    logger.info("instance %s of %s: %s -> %s", instance.url, model.name,
                                instance.state, state)
                instance.is_healthy, instance.state = state == "healthy", state
                instance.num_waiting = stats.num_waiting
                instance.num_running = stats.num_running
                instance.kv_usage_ratio = stats.kv_usage_ratio
                instance.num_pending_prompt_tokens = stats.num_pending_prompt_tokens
                instance.adapters = frozenset(stats.adapters)
                instance.resident_adapters = frozenset(stats.resident_adapters)
                model.stats[instance.url] = stats

    async def poll_stats(self, interval_s: float) -> None:
        while True:
            await self.refresh_stats()
            await asyncio.sleep(interval_s)
