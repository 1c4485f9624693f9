"""Pure pieces of the attention/expert split: routing table, micro-batches, combine order."""

from __future__ import annotations

import pytest
import torch

from moeflow.domain.errors import ExpertsUnavailableError
from moeflow.engine.ae.attention_runner import split_plan, sum_in_expert_order
from moeflow.engine.ae.expert_client import imbalance
from moeflow.engine.ae.expert_map import ExpertMap, round_robin_hosted
from moeflow.engine.ae.wire import Combine, Dispatch, Status
from moeflow.engine.models.decoder import MoE, expert_mlp
from moeflow.engine.scheduler import ScheduledSeq, StepPlan
from tests.unit.engine.scheduler_kit import make_seq


def test_round_robin_hosts_every_expert_once() -> None:
    assert round_robin_hosted(8, 3) == [[0, 3, 6], [1, 4, 7], [2, 5]]
    with pytest.raises(ValueError):
        round_robin_hosted(0, 2)


def _pairs(plan_tokens: dict[int, torch.Tensor], plan_slots: dict[int, torch.Tensor]
           ) -> list[tuple[int, int, int]]:
    return sorted((j, int(t), int(s)) for j in plan_tokens
                  for t, s in zip(plan_tokens[j], plan_slots[j], strict=True))


def test_every_pair_goes_to_an_instance_hosting_its_expert() -> None:
    m = ExpertMap([[0, 1, 2], [2, 3], [3, 0]], 4)
    expert_ids = torch.tensor([[0, 2], [3, 1], [2, 0], [1, 3], [0, 3]])
    plan = m.plan(expert_ids)
    seen = _pairs(plan.tokens, plan.slots)
    assert len(seen) == expert_ids.numel()
    assert {(t, s) for _, t, s in seen} == {(t, s) for t in range(5) for s in range(2)}
    for j, t, s in seen:
        assert int(expert_ids[t, s]) in m.hosted[j]


def test_replicas_split_an_expert_evenly() -> None:
    m = ExpertMap([[0, 1], [0]], 2)
    plan = m.plan(torch.zeros(10, 1, dtype=torch.int64))  # every token to expert 0
    assert sorted(int(plan.tokens[j].numel()) for j in plan.tokens) == [5, 5]


def test_dead_instances_get_nothing_and_orphans_fail_clearly() -> None:
    m = ExpertMap([[0, 1], [0, 1, 2], [2]], 3).without(1)
    plan = m.plan(torch.tensor([[0, 2], [1, 2]]))
    assert 1 not in plan.tokens
    orphaned = ExpertMap([[0], [1]], 2).without(1)
    assert orphaned.orphans == [1]
    with pytest.raises(ExpertsUnavailableError, match=r"experts \[1\]"):
        orphaned.plan(torch.tensor([[0, 1]]))


def test_split_plan_balances_tokens_and_keeps_order() -> None:
    sizes = [1, 1, 9, 1, 6, 1]
    items = [ScheduledSeq(make_seq(f"r{i}", list(range(20))), n) for i, n in enumerate(sizes)]
    parts = split_plan(StepPlan(scheduled=items), 2)
    assert len(parts) == 2
    assert sorted(p.num_tokens for p in parts) == [9, 10]
    for part in parts:
        ids = [s.seq.request_id for s in part.scheduled]
        assert ids == sorted(ids, key=lambda r: int(r[1:]))
    assert split_plan(StepPlan(scheduled=items[:1]), 2)[0].scheduled == items[:1]
    # 19 tokens: two micro-batches of >= 9 tokens each, but not of >= 10
    assert len(split_plan(StepPlan(scheduled=items), 2, min_tokens=9)) == 2
    assert split_plan(StepPlan(scheduled=items), 2, min_tokens=10) == [StepPlan(scheduled=items)]


def test_combine_order_reproduces_moe_experts_bit_for_bit() -> None:
    torch.manual_seed(0)
    num_experts, hidden, inter, k, tokens = 6, 16, 24, 3, 11
    moe = MoE(router=torch.randn(num_experts, hidden), gate_up=torch.randn(num_experts, 2 * inter,
              hidden), down=torch.randn(num_experts, hidden, inter), top_k=k, norm_topk_prob=True)
    x = torch.randn(tokens, hidden)
    expert_ids, weights = moe.route(x)
    expected = moe.experts(x, expert_ids, weights)
    # each expert on its tokens, unweighted, rows in MoE.experts' order (a GEMM's row results
    # may depend on where the row sits in the batch, so the test holds that fixed)
    results = torch.empty(tokens, k, hidden)
    for e in range(num_experts):
        slot, token_idx = torch.nonzero((expert_ids == e).t(), as_tuple=True)
        if token_idx.numel():
            results[token_idx, slot] = expert_mlp(x[token_idx], moe.gate_up[e], moe.down[e])
    # same per-pair values, same order of additions as MoE.experts: identical bits
    assert torch.equal(sum_in_expert_order(results, expert_ids, weights), expected)


def test_wire_messages_round_trip() -> None:
    d = Dispatch(7, 3, 123, torch.randn(2, 4), torch.tensor([0, 1, 1]), torch.tensor([5, 2, 6]))
    back = Dispatch.from_tensors(d.to_tensors())
    assert (back.seq, back.layer, back.sent_ns) == (7, 3, 123)
    assert torch.equal(back.hidden, d.hidden) and torch.equal(back.experts, d.experts)
    c = Combine(7, Status.MISSING_EXPERT, 1, 2, 3, torch.empty(0), 4)
    back_c = Combine.from_tensors(c.to_tensors())
    assert back_c.status is Status.MISSING_EXPERT and back_c.a2e_transfer_ns == 4
    with pytest.raises(ValueError):
        Dispatch.from_tensors([torch.zeros(2)])


def test_imbalance_ratio() -> None:
    assert imbalance([10, 10]) == 1.0
    assert imbalance([30, 10]) == 1.5
    assert imbalance([0, 0]) == 1.0
