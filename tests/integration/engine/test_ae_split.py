"""Attention/expert split in one process (XCCL memory backend): real engine, real workers.

The process-level tests (shm, Redis, the balancer over HTTP, `moeflow up --mode ae`) are in
tests/integration/gateway/test_ae_platform.py; these pin the numerics and the failure paths.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moeflow.domain.errors import ExpertsUnavailableError
from moeflow.domain.messages import ExpertPlacement, GenerateRequest, SamplingParams
from moeflow.engine.ae.attention_runner import AttentionRunner
from moeflow.engine.ae.expert_map import round_robin_hosted
from moeflow.engine.ae.expert_worker import ExpertWorker, checkpoint_loader
from moeflow.engine.llm_engine import LLMEngine, StepFailed
from moeflow.engine.models.arch import load_arch
from moeflow.xccl import make_transport
from tests.reference import hf_greedy, make_engine, run_engine

MOE_ARCHS = ("qwen3_moe", "mixtral", "qwen2_moe")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11][: 3 + i] * (1 + i) for i in range(5)]
_groups = itertools.count()


@dataclass
class Fleet:
    engine: LLMEngine
    workers: list[ExpertWorker]

    @property
    def runner(self) -> AttentionRunner:
        assert isinstance(self.engine.runner, AttentionRunner)
        return self.engine.runner

    def place(self, hosted: list[list[int]]) -> None:
        """Make before break, as the balancer does."""
        for worker, experts in zip(self.workers, hosted, strict=True):
            worker.load(experts)
        version = self.runner.client.map.version + 1
        self.runner.client.set_placement(ExpertPlacement(
            version=version, hosted=tuple(tuple(h) for h in hosted)))
        for worker, experts in zip(self.workers, hosted, strict=True):
            worker.unload(sorted(set(worker.hosted) - set(experts)))


@pytest.fixture
def fleet_factory() -> Iterator[object]:
    made: list[Fleet] = []

    def make(model_dir: Path, num_experts: int = 2, **engine_overrides: object) -> Fleet:
        group = f"ae-test-{next(_groups)}"
        arch = load_arch(model_dir)
        workers = []
        for i, hosted in enumerate(round_robin_hosted(arch.num_experts, num_experts)):
            transport = make_transport("memory", group, f"expert-{i}")
            worker = ExpertWorker(transport, f"expert-{i}", ["attention-0"], arch.num_experts,
                                  hosted, checkpoint_loader(model_dir, arch, torch.float32),
                                  timeout_s=10)
            worker.start()
            workers.append(worker)
        engine_overrides.setdefault("micro_batch_min_tokens", 1)  # two micro-batches always
        engine = make_engine(model_dir, role="attention", num_expert_instances=num_experts,
                             transport="memory", group=group, expert_timeout_s=5,
                             **engine_overrides)
        fleet = Fleet(engine, workers)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        for worker in fleet.workers:
            worker.stop()
        fleet.engine.close()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_split_equals_colocated_and_transformers(
    arch: str, tiny_dirs: dict[str, Path], fleet_factory: object
) -> None:
    model_dir = tiny_dirs[arch]
    fleet = fleet_factory(model_dir)  # type: ignore[operator]
    split, _ = run_engine(fleet.engine, PROMPTS, 10)
    colocated, _ = run_engine(make_engine(model_dir), PROMPTS, 10)
    assert split == colocated
    assert split == [hf_greedy(model_dir, p, 10) for p in PROMPTS]
    stats = fleet.runner.client.stats()
    assert all(p > 0 for p in stats.pairs_per_instance)  # both expert instances did work
    assert sum(stats.routed_tokens_per_expert) > 0
    assert len(stats.a2e_ms_per_layer) == len(load_arch(model_dir).moe_layer_ids)
    # the transfer part of each latency (no queueing) is part of it, never more
    for part, whole in ((stats.a2e_transfer_ms_per_layer, stats.a2e_ms_per_layer),
                        (stats.e2a_transfer_ms_per_layer, stats.e2a_ms_per_layer)):
        assert len(part) == len(whole)
        assert all(0 <= p <= w + 1e-9 for p, w in zip(part, whole, strict=True))


@pytest.mark.slow
def test_upcycled_smollm2_split_equals_colocated_and_transformers(
    upcycled_smollm2_dir: Path, smollm2_dir: Path, fleet_factory: object
) -> None:
    from tests.reference import hf_chat_ids

    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Hi",
                 "Name three colours."]
    prompts = [hf_chat_ids(smollm2_dir, [{"role": "user", "content": q}]) for q in questions]
    fleet = fleet_factory(upcycled_smollm2_dir, kv_cache_bytes=64 * 2**20)  # type: ignore[operator]
    split, _ = run_engine(fleet.engine, prompts, 20)
    assert split == [hf_greedy(upcycled_smollm2_dir, p, 20) for p in prompts]
    fleet.place([[0, 1, 2, 3], [1, 3]])  # live: hot-expert replicas on the second instance
    again, _ = run_engine(fleet.engine, prompts, 20, prefix="again")
    assert again == split


def test_chunked_prefill_and_one_micro_batch_give_the_same_tokens(
    tiny_dirs: dict[str, Path], fleet_factory: object
) -> None:
    model_dir = tiny_dirs["qwen3_moe"]
    reference = [hf_greedy(model_dir, p, 8) for p in PROMPTS]
    chunked = fleet_factory(model_dir, max_num_batched_tokens=16, block_size=4)  # type: ignore[operator]
    assert run_engine(chunked.engine, PROMPTS, 8)[0] == reference
    single = fleet_factory(model_dir, num_micro_batches=1)  # type: ignore[operator]
    assert run_engine(single.engine, PROMPTS, 8)[0] == reference


def test_live_rebalance_keeps_outputs(tiny_dirs: dict[str, Path], fleet_factory: object) -> None:
    model_dir = tiny_dirs["mixtral"]
    fleet = fleet_factory(model_dir)  # type: ignore[operator]
    expected = [hf_greedy(model_dir, p, 12) for p in PROMPTS]
    sampling = SamplingParams(max_tokens=12, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        fleet.engine.add_request(GenerateRequest(
            request_id=f"r{i}", prompt_token_ids=tuple(prompt), sampling=sampling))
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    steps = 0
    while fleet.engine.has_work:
        for chunk in fleet.engine.step():
            outputs[chunk.request_id].extend(chunk.token_ids)
        steps += 1
        if steps == 3:  # mid-generation: replicate every expert on both instances
            fleet.place([list(range(8)), list(range(8))])
        if steps == 6:  # then move everything around
            fleet.place([[4, 5, 6, 7], [0, 1, 2, 3]])
    assert [outputs[f"r{i}"] for i in range(len(PROMPTS))] == expected
    assert fleet.runner.client.map.version == 2
    assert fleet.workers[0].hosted == frozenset({4, 5, 6, 7})


def test_dead_instance_with_replicas_is_routed_around(
    tiny_dirs: dict[str, Path], fleet_factory: object
) -> None:
    model_dir = tiny_dirs["qwen3_moe"]
    fleet = fleet_factory(model_dir)  # type: ignore[operator]
    fleet.place([list(range(8)), list(range(8))])
    fleet.workers[1].stop()  # expert-1 vanishes: its endpoint closes, peers see PeerGone
    fleet.workers[1]._transport.close()
    out, _ = run_engine(fleet.engine, PROMPTS, 6)
    assert out == [hf_greedy(model_dir, p, 6) for p in PROMPTS]
    stats = fleet.runner.client.stats()
    assert stats.dead_instances == (1,)


def test_dead_instance_without_replicas_fails_the_step_then_recovers(
    tiny_dirs: dict[str, Path], fleet_factory: object
) -> None:
    model_dir = tiny_dirs["qwen3_moe"]
    fleet = fleet_factory(model_dir)  # type: ignore[operator]
    fleet.workers[1].stop()
    fleet.workers[1]._transport.close()
    fleet.engine.add_request(GenerateRequest(
        request_id="doomed", prompt_token_ids=(5, 6, 7, 8), sampling=SamplingParams(max_tokens=4)))
    with pytest.raises(StepFailed) as failure:
        while fleet.engine.has_work:
            fleet.engine.step()
    assert failure.value.request_ids == ["doomed"]
    assert isinstance(failure.value.error, ExpertsUnavailableError)
    assert not fleet.engine.has_work
    assert fleet.engine.block_manager.num_free_blocks == fleet.engine.block_manager.num_blocks
    # the balancer's healing move: every expert onto the survivor
    fleet.workers[0].load(range(8))
    fleet.runner.client.set_placement(ExpertPlacement(version=1, hosted=(tuple(range(8)), ())))
    out, _ = run_engine(fleet.engine, PROMPTS[:2], 6)
    assert out == [hf_greedy(model_dir, p, 6) for p in PROMPTS[:2]]


def test_placement_that_orphans_an_expert_is_refused(
    tiny_dirs: dict[str, Path], fleet_factory: object
) -> None:
    fleet = fleet_factory(tiny_dirs["qwen3_moe"])  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"experts \[7\] nowhere"):
        fleet.runner.client.set_placement(
            ExpertPlacement(version=1, hosted=((0, 1, 2, 3), (4, 5, 6))))
    with pytest.raises(ValueError, match="3 expert instances"):
        fleet.runner.client.set_placement(
            ExpertPlacement(version=1, hosted=((0, 1, 2, 3), (4, 5, 6, 7), ())))
