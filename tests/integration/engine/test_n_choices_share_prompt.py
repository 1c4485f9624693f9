"""``n`` > 1 in the real engine (tiny llama, float32): the choices of one prompt share its KV
blocks, compute the prompt about once, and produce exactly the tokens each choice produces as
a request of its own (greedy: transformers' tokens; seeded: the same draws), colocated and
prefill/decode split (a prefill and a decode engine in this process, KV handed over as the
servers do: ``exported_kv`` on the prefill side, ``attach_kv`` on the decode side).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.domain.messages import GenerateRequest, KVSource, SamplingParams
from moeflow.domain.roles import Role
from moeflow.engine.disagg import prefill_only
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.scheduler import StepPlan
from moeflow.text.tokenizer import TextTokenizer
from tests.reference import hf_greedy, make_engine

TEXT = ("Once upon a time there was a small town by a river, and every morning the baker "
        "opened his shop before the sun came up.")
N = 4
BLOCK = 4
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def seeded(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234 + i)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def prompt(model_dir: Path) -> list[int]:
    ids = TextTokenizer.from_dir(model_dir).encode(TEXT)
    ids = ids[: len(ids) // BLOCK * BLOCK - 2]  # full blocks and a partial last one (2 tokens)
    assert len(ids) > 6 * BLOCK
    return ids


def _counting(engine: LLMEngine) -> list[int]:
    """Record the prompt tokens each step computes (tokens of sequences with no output yet)."""
    counts: list[int] = []
    schedule = engine.scheduler.schedule

    def counted() -> StepPlan:
        plan = schedule()
        counts.append(sum(s.num_new_tokens for s in plan.scheduled if not s.seq.output_token_ids))
        return plan

    engine.scheduler.schedule = counted  # type: ignore[method-assign]
    return counts


def _run(engine: LLMEngine, prompt: list[int], samplings: list[SamplingParams]
         ) -> list[list[int]]:
    """All choices admitted at once, as the gateway opens them; tokens per choice."""
    for i, sampling in enumerate(samplings):
        engine.add_request(GenerateRequest(request_id=f"c-{i}", prompt_token_ids=tuple(prompt),
                                           sampling=sampling))
    out: dict[str, list[int]] = {f"c-{i}": [] for i in range(len(samplings))}
    for _ in range(500):
        if not engine.has_work:
            break
        for chunk in engine.step():
            out[chunk.request_id].extend(chunk.token_ids)
    assert not engine.has_work
    return list(out.values())


def _alone(model_dir: Path, prompt: list[int], samplings: list[SamplingParams]
           ) -> list[list[int]]:
    """Before sharing: each choice as a request of its own, nothing cached."""
    return [_run(make_engine(model_dir, block_size=BLOCK, enable_prefix_caching=False),
                 prompt, [s])[0] for s in samplings]


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_n_choices_compute_the_prompt_once_and_match_separate_requests(
    model_dir: Path, prompt: list[int], kind: str
) -> None:
    samplings = [GREEDY] * N if kind == "greedy" else [seeded(i) for i in range(N)]
    engine = make_engine(model_dir, block_size=BLOCK)
    counts = _counting(engine)
    outputs = _run(engine, prompt, samplings)
    assert outputs == _alone(model_dir, prompt, samplings)
    if kind == "greedy":
        assert outputs == [hf_greedy(model_dir, prompt, 10)] * N
    else:
        assert len({tuple(o) for o in outputs}) > 1  # distinct seeds, distinct choices
    # the first choice computes the prompt; each sibling only its last, partial block
    assert sum(counts) == len(prompt) + (N - 1) * (len(prompt) % BLOCK)
    assert engine.num_prefix_hit_tokens == (N - 1) * (len(prompt) // BLOCK * BLOCK)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _run_pd(model_dir: Path, prompt: list[int], samplings: list[SamplingParams]
            ) -> tuple[list[list[int]], list[int], int]:
    """Choices through a prefill engine and a decode engine: (tokens per choice, prompt tokens
    the prefill side computed per step, decode-side blocks held once every KV arrived)."""
    prefill = make_engine(model_dir, block_size=BLOCK, role=Role.PREFILL)
    decode = make_engine(model_dir, block_size=BLOCK, role=Role.DECODE)
    counts = _counting(prefill)
    source = KVSource(prefill_url="http://prefill.invalid", prefill_rank="prefill-0")
    requests = {f"c-{i}": GenerateRequest(request_id=f"c-{i}", prompt_token_ids=tuple(prompt),
                                          sampling=s, kv_source=source)
                for i, s in enumerate(samplings)}
    for request in requests.values():
        decode.add_request(request)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    blocks_held = 0
    for _ in range(500):
        if not decode.has_work:
            break
        for chunk in decode.step():
            out[chunk.request_id].extend(chunk.token_ids)
        pulls = list(decode.pending_kv_pulls)
        decode.pending_kv_pulls.clear()
        # what /v1/prefill does for each pull, the pulls of one step side by side
        for rid in pulls:
            prefill.add_request(prefill_only(requests[rid]), exports_kv=True)
        first: dict[str, int] = {}
        while prefill.has_work:
            for chunk in prefill.step():
                first[chunk.request_id] = chunk.token_ids[0]
        for rid in pulls:
            kv = prefill.exported_kv.pop(rid)
            attached = decode.attach_kv(rid, kv, first[rid])
            assert attached is not None
            out[rid].extend(attached.token_ids)
        if len(decode.scheduler.running) == len(requests) and not blocks_held:
            manager = decode.block_manager
            blocks_held = manager.num_blocks - manager.num_free_blocks
    assert not decode.has_work
    return list(out.values()), counts, blocks_held


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_n_choices_in_pd_share_the_prompt_on_both_sides(
    model_dir: Path, prompt: list[int], kind: str
) -> None:
    samplings = [GREEDY] * N if kind == "greedy" else [seeded(i) for i in range(N)]
    outputs, counts, blocks = _run_pd(model_dir, prompt, samplings)
    alone = [_run_pd(model_dir, prompt, [s])[0][0] for s in samplings]
    assert outputs == alone
    if kind == "greedy":
        assert outputs == [hf_greedy(model_dir, prompt, 10)] * N
    # prefill side: the prompt once, then each sibling's last partial block
    assert sum(counts) == len(prompt) + (N - 1) * (len(prompt) % BLOCK)
    # decode side: the prompt's blocks once, plus one block of its own per sibling (the
    # partial last block; the first decode token may have opened one more for each)
    prompt_blocks = -(-len(prompt) // BLOCK)
    assert blocks <= prompt_blocks + (N - 1) + N
    assert blocks < N * prompt_blocks
