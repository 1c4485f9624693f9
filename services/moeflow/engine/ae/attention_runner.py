"""The attention instance's model runner: everything but the routed experts, in micro-batches.

A step's sequences split into (up to) two micro-batches of about equal token counts, when each
gets at least ``micro_batch_min_tokens`` tokens (else the step runs whole). Layer by
layer, each micro-batch first collects its previous layer's expert output, then runs this
layer's attention and dispatches its tokens to the experts; so micro-batch B's attention runs
while micro-batch A's tokens are at the experts, and the other way round (xDeepServe's
two-micro-batch pipeline). Dense layers (a MoE model's non-sparse ones) run here, at once.

Numerics: attention is per sequence (batch composition never changes a token), the router and
shared expert run here as in ``MoE``, and ``sum_in_expert_order`` adds the routed outputs in
the same order as ``MoE.experts``: float32 greedy tokens equal colocated serving's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moeflow.engine.ae.exchange import open_exchange
from moeflow.engine.ae.expert_client import ExpertClient, Pending, expert_rank
from moeflow.engine.ae.expert_map import ExpertMap, round_robin_hosted
from moeflow.engine.config import EngineSettings
from moeflow.engine.model_runner import ModelRunner
from moeflow.engine.models.arch import ArchConfig
from moeflow.engine.models.attention import AttentionMetadata
from moeflow.engine.models.decoder import MoE, rms_norm
from moeflow.engine.scheduler import ScheduledSeq, StepPlan
from moeflow.xccl import make_transport


def split_plan(plan: StepPlan, num_micro_batches: int, min_tokens: int = 1) -> list[StepPlan]:
    """Up to `num_micro_batches` plans with about equal token counts (greedy, largest first),
    each keeping the original order of its sequences; never an empty one, and no more parts
    than leave `min_tokens` tokens to each."""
    parts = min(num_micro_batches, len(plan.scheduled), plan.num_tokens // min_tokens)
    if parts <= 1:
        return [plan]
    tokens = [0] * parts
    members: list[list[int]] = [[] for _ in range(parts)]
    order = sorted(range(len(plan.scheduled)), key=lambda i: -plan.scheduled[i].num_new_tokens)
    for i in order:
        lightest = min(range(parts), key=lambda p: (tokens[p], p))
        tokens[lightest] += plan.scheduled[i].num_new_tokens
        members[lightest].append(i)
    return [StepPlan(scheduled=[plan.scheduled[i] for i in sorted(m)]) for m in members]


def sum_in_expert_order(
    results: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum_j w_j * results[:, j] per token, adding experts in ascending id: [T, k, E] -> [T, E]."""
    weighted = results * weights[..., None]
    order = torch.argsort(expert_ids, dim=1, stable=True)
    ordered = torch.gather(weighted, 1, order[..., None].expand_as(weighted))
    out = torch.zeros_like(results[:, 0])
    for slot in range(ordered.shape[1]):
        out = out + ordered[:, slot]
    return out


@dataclass
class _MicroBatch:
    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    meta: AttentionMetadata
    pending: Pending | None = None
    weights: torch.Tensor | None = None
    shared: torch.Tensor | None = None


class AttentionRunner(ModelRunner):
    def __init__(
        self,
        model_dir: Path,
        arch: ArchConfig,
        *,
        dtype: str,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        client: ExpertClient,
        num_micro_batches: int = 2,
        micro_batch_min_tokens: int = 1,
    ) -> None:
        super().__init__(model_dir, arch, dtype=dtype, num_blocks=num_blocks,
                         block_size=block_size, max_model_len=max_model_len,
                         with_routed_experts=False)
        self.client = client
        self.num_micro_batches = num_micro_batches
        self.micro_batch_min_tokens = micro_batch_min_tokens

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> dict[str, int]:
        parts = [self._prepare(p) for p in split_plan(plan, self.num_micro_batches,
                                                       self.micro_batch_min_tokens)]
        hiddens = self._forward([(ids, pos, meta) for ids, pos, meta, _, _ in parts])
        rows = [hidden[sample_rows] for hidden, (*_, sample_rows) in zip(hiddens, parts,
                                                                          strict=True)]
        items: list[ScheduledSeq] = [item for part in parts for item in part[3]]
        return self._sample(torch.cat(rows), items)

    @torch.inference_mode()
    def forward_scratch(self, ids: list[int]) -> torch.Tensor:
        """As the colocated runner's, with the MoE layers at the expert instances (the XCCL
        client is idle: this runs on the engine thread between steps)."""
        meta, scratch = self.scratch_prefill(len(ids))
        return self._forward([(torch.tensor(ids), torch.arange(len(ids)), meta)], scratch)[0]

    def _forward(
        self, parts: list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
        kv_cache: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        model = self.model
        cache = self.kv_cache if kv_cache is None else kv_cache
        eps = self.arch.rms_norm_eps
        batches = []
        for input_ids, positions, meta in parts:
            cos, sin = model.rope(positions)
            batches.append(_MicroBatch(F.embedding(input_ids, model.embed), cos, sin, meta))
        for i, layer in enumerate(model.layers):
            for mb in batches:
                self._collect(mb)
                mb.x = model.attention_block(i, mb.x, mb.cos, mb.sin, mb.meta, cache)
                h = rms_norm(mb.x, layer.post_norm, eps)
                if isinstance(layer.mlp, MoE):
                    expert_ids, mb.weights = layer.mlp.route(h)
                    mb.pending = self.client.dispatch(i, h, expert_ids)
                    mb.shared = layer.mlp.shared_output(h)  # overlaps the experts' work
                else:
                    mb.x = mb.x + layer.mlp(h)
        for mb in batches:
            self._collect(mb)
        return [rms_norm(mb.x, model.final_norm, eps) for mb in batches]

    def _collect(self, mb: _MicroBatch) -> None:
        if mb.pending is None:
            return
        assert mb.weights is not None
        results = self.client.combine(mb.pending)
        out = sum_in_expert_order(results, mb.pending.expert_ids, mb.weights)
        if mb.shared is not None:
            out = out + mb.shared
        mb.x = mb.x + out
        mb.pending = mb.weights = mb.shared = None

    def close(self) -> None:
        self.client.close()


def build_attention_runner(
    settings: EngineSettings, arch: ArchConfig, *, num_blocks: int, max_model_len: int
) -> AttentionRunner:
    """The runner of an attention instance: its XCCL endpoint (rank ``attention-<rank>``) and
    the initial round-robin placement, which is also where expert instances start."""
    if not arch.is_moe:
        raise ValueError(f"role attention needs a MoE model; {arch.model_type} is dense")
    num_instances = settings.num_expert_instances
    if num_instances > arch.num_experts:
        raise ValueError(f"{num_instances} expert instances for {arch.num_experts} experts: "
                         "some would host nothing")
    transport = make_transport(settings.transport, settings.xccl_group, settings.instance_name,
                               redis_url=settings.redis_url,
                               redis_password=settings.redis_password_value)
    expert_map = ExpertMap(round_robin_hosted(arch.num_experts, num_instances), arch.num_experts)
    exchange = open_exchange(transport, settings.transport, settings.ae_spin_us,
                             [expert_rank(i) for i in range(num_instances)])
    client = ExpertClient(transport, expert_map, arch.moe_layer_ids,
                          timeout_s=settings.expert_timeout_s, exchange=exchange)
    return AttentionRunner(
        settings.model_path, arch, dtype=settings.dtype, num_blocks=num_blocks,
        block_size=settings.block_size, max_model_len=max_model_len, client=client,
        num_micro_batches=settings.num_micro_batches,
        micro_batch_min_tokens=settings.micro_batch_min_tokens,
    )
