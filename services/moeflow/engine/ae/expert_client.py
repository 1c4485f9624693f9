"""The attention instance's end of the expert exchange: dispatch (A2E), then combine (E2A).

``dispatch`` routes a micro-batch's tokens (already normed) to the instances hosting their top-k
experts and returns at once (XCCL sends are buffered), so the caller can run another
micro-batch's attention while the experts compute. ``combine`` waits for the answers and
returns the routed experts' output, summed per token in ascending expert order: the order of
``MoE.experts`` (and of transformers), which keeps float32 greedy output identical to
colocated serving.

Failure: an instance that vanishes (PeerGone), times out, or no longer hosts an expert it was
sent is marked dead in this instance's map, and its pairs go again to other replicas. When an
expert has no live replica left, ``ExpertsUnavailableError`` fails the step (the engine fails
that step's requests and keeps serving); the balancer re-places orphaned experts and pushes a
new placement, which clears the dead marks.

Threads: the engine's compute thread calls dispatch/combine; ``set_placement`` and ``stats``
may run on the HTTP thread (they swap or read whole objects).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moeflow.domain.messages import AttentionExpertStats, ExpertPlacement
from moeflow.engine.ae.exchange import Exchange
from moeflow.engine.ae.expert_map import ExpertMap
from moeflow.engine.ae.wire import A2E_TAG, E2A_TAG, Combine, Dispatch, Status
from moeflow.xccl import Transport
from moeflow.xccl.errors import XcclError

logger = logging.getLogger(__name__)


def imbalance(loads: Sequence[int]) -> float:
    """max / mean (1.0 when balanced, or when there is no load yet)."""
    total = sum(loads)
    return max(loads) * len(loads) / total if total else 1.0


def expert_rank(index: int) -> str:
    return f"expert-{index}"


@dataclass
class _Outstanding:
    instance: int
    seq: int
    layer: int
    sent_ns: int
    map_version: int
    tokens: torch.Tensor  # [p] token index in the micro-batch
    slots: torch.Tensor  # [p] top-k slot


@dataclass
class Pending:
    """One micro-batch's MoE layer in flight."""

    layer: int
    x: torch.Tensor  # [T, E]
    expert_ids: torch.Tensor  # [T, k]
    outstanding: list[_Outstanding] = field(default_factory=list)


@dataclass
class _LayerLatency:
    a2e_ns: int = 0
    e2a_ns: int = 0
    compute_ns: int = 0
    a2e_transfer_ns: int = 0
    e2a_transfer_ns: int = 0
    count: int = 0


class ExpertClient:
    def __init__(
        self,
        transport: Transport,
        expert_map: ExpertMap,
        moe_layer_ids: Sequence[int],
        *,
        timeout_s: float,
        exchange: Exchange | None = None,
    ) -> None:
        """`exchange`: how messages travel (default: on `transport`; see exchange.py)."""
        self._transport = transport
        self._exchange: Exchange = transport if exchange is None else exchange
        self.map = expert_map
        self._timeout_s = timeout_s
        # Start past any sequence number a previous process of this rank used, so an answer to
        # it still queued somewhere can never pass for one of ours.
        self._seq = time.time_ns()
        # answers taken off the exchange before their turn, with the E2A transfer time
        self._early: dict[tuple[int, int], tuple[Combine, int]] = {}
        self._waiting: set[tuple[int, int]] = set()
        self.moe_layer_ids = tuple(moe_layer_ids)
        self.routed_tokens = torch.zeros(expert_map.num_experts, dtype=torch.int64)
        self.pairs_per_instance = [0] * expert_map.num_instances
        self._window_pairs = [0] * expert_map.num_instances  # since the placement was set
        self._latency = {layer: _LayerLatency() for layer in self.moe_layer_ids}
        self.num_redispatches_total = 0

    @property
    def transport(self) -> Transport:
        """The XCCL endpoint (read-only: health checks probe it)."""
        return self._transport

    # -- control (any thread) ------------------------------------------------------------
    def set_placement(self, placement: ExpertPlacement) -> None:
        if len(placement.hosted) != self.map.num_instances:
            raise ValueError(
                f"placement has {len(placement.hosted)} expert instances; this attention "
                f"instance was started with {self.map.num_instances}"
            )
        hosted = {e for experts in placement.hosted for e in experts}
        missing = sorted(set(range(self.map.num_experts)) - hosted)
        if missing:
            raise ValueError(f"placement hosts experts {missing} nowhere")
        if placement.version < self.map.version:
            raise ValueError(f"placement version {placement.version} is older than "
                             f"{self.map.version}")
        self.map = ExpertMap(placement.hosted, self.map.num_experts, version=placement.version)
        self._window_pairs = [0] * self.map.num_instances
        logger.info("expert placement v%d: %s", placement.version, placement.hosted)

    def stats(self) -> AttentionExpertStats:
        m = self.map
        lat = [self._latency[layer] for layer in self.moe_layer_ids]

        def mean_ms(total_ns: int, count: int) -> float:
            return total_ns / count / 1e6 if count else 0.0

        return AttentionExpertStats(
            placement=ExpertPlacement(version=m.version, hosted=m.hosted),
            dead_instances=tuple(sorted(m.dead)),
            routed_tokens_per_expert=tuple(int(c) for c in self.routed_tokens.tolist()),
            pairs_per_instance=tuple(self.pairs_per_instance),
            a2e_ms_per_layer=tuple(mean_ms(x.a2e_ns, x.count) for x in lat),
            e2a_ms_per_layer=tuple(mean_ms(x.e2a_ns, x.count) for x in lat),
            a2e_transfer_ms_per_layer=tuple(mean_ms(x.a2e_transfer_ns, x.count) for x in lat),
            e2a_transfer_ms_per_layer=tuple(mean_ms(x.e2a_transfer_ns, x.count) for x in lat),
            expert_compute_ms_per_layer=tuple(mean_ms(x.compute_ns, x.count) for x in lat),
            num_redispatches_total=self.num_redispatches_total,
            imbalance_ratio=imbalance([p for i, p in enumerate(self._window_pairs)
                                       if i not in m.dead]),
        )

    def close(self) -> None:
        self._exchange.close()
        self._transport.close()

    # -- data path (compute thread) ------------------------------------------------------
    def dispatch(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> Pending:
        self.routed_tokens += torch.bincount(
            expert_ids.flatten(), minlength=self.map.num_experts
        )
        pending = Pending(layer, x, expert_ids)
        k = expert_ids.shape[1]
        all_tokens = torch.arange(x.shape[0]).repeat_interleave(k)
        all_slots = torch.arange(k).repeat(x.shape[0])
        self._send(pending, all_tokens, all_slots)
        return pending

    def combine(self, pending: Pending) -> torch.Tensor:
        """[T, k, E]: each pair's unweighted expert output, placed at (token, slot)."""
        x = pending.x
        results = torch.empty(x.shape[0], pending.expert_ids.shape[1], x.shape[1], dtype=x.dtype)
        while pending.outstanding:
            item = pending.outstanding.pop(0)
            answer = self._receive(item)
            if answer is None or answer.status is not Status.OK:
                moved_on = item.map_version < self.map.version
                if answer is not None:
                    logger.warning("expert-%d answered %s: sending its pairs again",
                                   item.instance, answer.status.name)
                # an answer to a dispatch made under an older placement is not a fault
                if not (moved_on and answer is not None):
                    self._mark_dead(item.instance)
                self.num_redispatches_total += int(item.tokens.numel())
                self._send(pending, item.tokens, item.slots)
                continue
            results[item.tokens, item.slots] = answer.out
        return results

    def _send(self, pending: Pending, tokens: torch.Tensor, slots: torch.Tensor) -> None:
        """Send pairs (tokens[i], slots[i]) to the instances the current map picks for them."""
        while tokens.numel():
            experts = pending.expert_ids[tokens, slots]
            plan = self.map.plan(experts[:, None])  # raises when an expert has no replica
            failed: list[torch.Tensor] = []
            for instance, rows in plan.tokens.items():
                t, s = tokens[rows], slots[rows]
                unique_tokens, inverse = torch.unique(t, return_inverse=True)
                seq = self._seq
                self._seq += 1
                message = Dispatch(seq, pending.layer, time.time_ns(), pending.x[unique_tokens],
                                   inverse, experts[rows])
                try:
                    self._exchange.send(expert_rank(instance), A2E_TAG, message.to_tensors(),
                                        self._timeout_s)
                except XcclError as exc:
                    logger.warning("expert-%d unreachable (%s): marking it dead", instance, exc)
                    self._mark_dead(instance)
                    failed.append(rows)
                    continue
                self._waiting.add((instance, seq))
                self.pairs_per_instance[instance] += int(rows.numel())
                self._window_pairs[instance] += int(rows.numel())
                pending.outstanding.append(
                    _Outstanding(instance, seq, pending.layer, message.sent_ns,
                                 self.map.version, t, s)
                )
            if not failed:
                return
            rows = torch.cat(failed)
            self.num_redispatches_total += int(rows.numel())
            tokens, slots = tokens[rows], slots[rows]

    def _receive(self, item: _Outstanding) -> Combine | None:
        key = (item.instance, item.seq)
        waiting_ns = time.time_ns()
        try:
            while key not in self._early:
                tensors = self._exchange.recv(expert_rank(item.instance), E2A_TAG,
                                              self._timeout_s)
                answer = Combine.from_tensors(tensors)
                transfer_ns = time.time_ns() - max(answer.sent_ns, waiting_ns)
                if (item.instance, answer.seq) in self._waiting:  # else: a stale answer
                    self._early[(item.instance, answer.seq)] = (answer, max(0, transfer_ns))
        except XcclError as exc:
            logger.warning("expert-%d failed mid-exchange (%s)", item.instance, exc)
            self._waiting.discard(key)
            return None
        self._waiting.discard(key)
        answer, e2a_transfer_ns = self._early.pop(key)
        arrived_ns = time.time_ns()
        lat = self._latency[item.layer]
        lat.count += 1
        lat.a2e_transfer_ns += answer.a2e_transfer_ns
        lat.e2a_transfer_ns += e2a_transfer_ns
        lat.compute_ns += answer.compute_ns
        lat.e2a_ns += max(0, arrived_ns - answer.sent_ns)
        lat.a2e_ns += max(0, answer.recv_ns - item.sent_ns)
        return answer

    def _mark_dead(self, instance: int) -> None:
        if instance not in self.map.dead:
            self.map = self.map.without(instance)
