"""Where a request runs (pure: plain data in, a choice out).

DeepServe's Algorithm 1 with load, as implemented here:
1. Split or not (``split_or_local``). A prompt is computed either on a prefill instance, whose
   KV then moves to a decode instance (split), or where it will be decoded (local: a
   colocated instance or, in a prefill+decode fleet, the decode instance itself; no KV moves).
   - Short prompts (under ``min_prompt_tokens_for_split``) stay local: their prefill costs the
     decode batch less than the split's extra hop and the prefill queue would cost them.
   - A one-token answer gains nothing from a decode instance: with colocated instances it goes
     there, in a prefill+decode fleet the prefill instance serves it whole (no KV moves).
   - A long prompt splits unless the prefill queue would delay it more than computing it
     locally costs. Both sides are counted in prompt tokens to compute first (same speed per
     token on both sides): split waits for the prefill instance's pending prompt tokens;
     local waits for the local instance's own pending prompt tokens and stalls each request
     decoding there for the whole prompt, weighted by ``interference_weight`` (at least one
     such request is assumed: decodes arrive while it runs). So a long prompt is computed
     locally only when the prefill instance is backed up and the decode side is nearly idle.
   The pending prompt tokens of an instance are the larger of what its stats last reported
   and what this gateway sent it since and has not seen a first token of (stats are polled).
2. Which instance: among instances whose load is within ``load_tolerance`` of the least loaded,
   take the one with the longest cached prefix of this prompt (as the gateway remembers what it
   routed where); if none has any, take the least loaded. Ties break by URL for determinism.
   Decode instances are picked least loaded.

A request for a LoRA adapter first narrows the instances to those that serve it
(``adapter_instances``): those holding its weights in memory when any is healthy, else those
that know it (they read it back on use). Its prefix keys start from the adapter's own root,
as the engine's do, so prefix affinity never mixes adapters either.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from moeflow.domain.roles import Role

PREFIX_BLOCK_TOKENS = 16


@dataclass
class InstanceView:
    url: str
    role: Role = Role.COLOCATED
    rank_name: str = ""
    is_healthy: bool = True
    state: str = "healthy"
    """Why it is (un)healthy: healthy, unreachable, cut, loop_dead, transport_down, draining."""
    num_waiting: int = 0
    num_running: int = 0
    num_in_flight: int = 0
    kv_usage_ratio: float = 0.0
    adapters: frozenset[str] = frozenset()
    """LoRA adapters the instance serves (from its stats)."""
    resident_adapters: frozenset[str] = frozenset()
    """Those whose weights it holds in memory now."""
    num_pending_prompt_tokens: int = 0
    """Prompt tokens it has still to compute, as its last stats reported."""
    num_in_flight_prompt_tokens: int = 0
    """Prompt tokens this gateway sent it to compute since, whose first token has not come."""

    @property
    def load(self) -> int:
        return max(self.num_waiting + self.num_running, self.num_in_flight)

    @property
    def pending_prompt_tokens(self) -> int:
        """Prompt tokens queued ahead of a new one (the two counts overlap: take the larger)."""
        return max(self.num_pending_prompt_tokens, self.num_in_flight_prompt_tokens)


@dataclass(frozen=True)
class Placement:
    """Either ``colocated`` is set, or both ``prefill`` and ``decode`` are."""

    colocated: InstanceView | None = None
    """Computes the prompt and decodes (a colocated instance, or a split fleet's instance
    serving the request whole)."""
    prefill: InstanceView | None = None
    decode: InstanceView | None = None

    @property
    def is_split(self) -> bool:
        return self.decode is not None

    @property
    def computes_prompt(self) -> InstanceView:
        instance = self.prefill or self.colocated
        assert instance is not None
        return instance


def prefix_keys(token_ids: Sequence[int], max_blocks: int = 64,
                adapter: str | None = None) -> list[int]:
    """Chained keys of the prompt's full 16-token blocks (same idea as the engine's index),
    from a root of their own for an adapter's prompts."""
    keys: list[int] = []
    parent = 0 if adapter is None else hash(("lora", adapter))
    size = PREFIX_BLOCK_TOKENS
    for i in range(min(len(token_ids) // size, max_blocks)):
        parent = hash((parent, tuple(token_ids[i * size : (i + 1) * size])))
        keys.append(parent)
    return keys


@dataclass
class PrefixTracker:
    """Per instance, the prefix keys of recently routed prompts (bounded, LRU)."""

    max_keys_per_instance: int = 4096
    _keys: dict[str, OrderedDict[int, None]] = field(default_factory=dict)

    def record(self, url: str, keys: Sequence[int]) -> None:
        known = self._keys.setdefault(url, OrderedDict())
        for key in keys:
            known[key] = None
            known.move_to_end(key)
        while len(known) > self.max_keys_per_instance:
            known.popitem(last=False)

    def match_blocks(self, url: str, keys: Sequence[int]) -> int:
        known = self._keys.get(url)
        if not known:
            return 0
        num = 0
        for key in keys:
            if key not in known:
                break
            num += 1
        return num


def adapter_instances(instances: Sequence[InstanceView], adapter: str | None
                      ) -> list[InstanceView]:
    """The instances a request for ``adapter`` (None: the base model) may go to: every one for
    the base model; for an adapter, the healthy instances of each role that hold it in memory,
    or, for a role where none does, those that know it."""
    if adapter is None:
        return list(instances)
    chosen: list[InstanceView] = []
    roles = dict.fromkeys(Role(i.role).routes_as for i in instances)
    for role in roles:
        knowing = [i for i in instances
                   if Role(i.role).routes_as == role and adapter in i.adapters]
        holding = [i for i in knowing if i.is_healthy and adapter in i.resident_adapters]
        chosen.extend(holding or knowing)
    return chosen


def least_loaded(instances: Sequence[InstanceView]) -> InstanceView | None:
    healthy = [i for i in instances if i.is_healthy]
    if not healthy:
        return None
    return min(healthy, key=lambda i: (i.load, i.kv_usage_ratio, i.url))


def pick_instance(
    instances: Sequence[InstanceView], prefix_blocks: Mapping[str, int], load_tolerance: int
) -> InstanceView | None:
    least = least_loaded(instances)
    if least is None:
        return None
    balanced = [i for i in instances if i.is_healthy and i.load - least.load <= load_tolerance]
    best = max(balanced, key=lambda i: (prefix_blocks.get(i.url, 0), -i.load, i.url))
    return best if prefix_blocks.get(best.url, 0) > 0 else least


def split_or_local(
    *, num_prompt_tokens: int, min_prompt_tokens_for_split: int,
    prefill_pending_tokens: int, local_pending_tokens: int, local_load: int,
    interference_weight: float = 1.0,
) -> bool:
    """True to split a prompt of more than one output token (step 1 of the module doc)."""
    if num_prompt_tokens < min_prompt_tokens_for_split:
        return False
    local_cost = local_pending_tokens + interference_weight * num_prompt_tokens * max(
        local_load, 1)
    return prefill_pending_tokens <= local_cost


def place(
    instances: Sequence[InstanceView],
    *,
    num_prompt_tokens: int,
    max_tokens: int,
    min_prompt_tokens_for_split: int,
    prefix_blocks: Mapping[str, int],
    load_tolerance: int = 2,
    interference_weight: float = 1.0,
) -> Placement | None:
    """Choose split vs local, then instances; None if no healthy instance can serve."""
    by_role: dict[Role, list[InstanceView]] = {Role.COLOCATED: [], Role.PREFILL: [],
                                               Role.DECODE: []}
    for instance in instances:
        role = Role(instance.role).routes_as
        if instance.is_healthy and role in by_role:
            by_role[role].append(instance)
    colocated = pick_instance(by_role[Role.COLOCATED], prefix_blocks, load_tolerance)
    decode = least_loaded(by_role[Role.DECODE])
    prefill = pick_instance(by_role[Role.PREFILL], prefix_blocks, load_tolerance)
    if prefill is None or decode is None:
        return None if colocated is None else Placement(colocated=colocated)
    if max_tokens <= 1 and num_prompt_tokens >= min_prompt_tokens_for_split:
        return Placement(colocated=colocated or prefill)
    local = colocated or decode
    if split_or_local(
        num_prompt_tokens=num_prompt_tokens,
        min_prompt_tokens_for_split=min_prompt_tokens_for_split,
        prefill_pending_tokens=prefill.pending_prompt_tokens,
        local_pending_tokens=local.pending_prompt_tokens, local_load=local.load,
        interference_weight=interference_weight,
    ):
        return Placement(prefill=prefill, decode=decode)
    return Placement(colocated=local)
