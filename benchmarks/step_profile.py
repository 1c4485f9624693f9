"""Where one decode step's time goes: a per-step budget at several batch sizes.

For each concurrency c, c requests (random prompts, fixed seed) are prefilled, then decode steps
run while every sequence is decoding. Two measurements per c, alternated round by round:
- wall: ``engine.step()`` with nothing attached (median and range over the steps);
- budget: the same steps under ``torch.profiler`` (the quietest round is reported): op
  self-times grouped into products (matrix products of the layers), LM head, attention (SDPA
  and the KV gather/scatter around it, also split by op), sampling, step preparation (Python
  building the batch tensors), and other tensor ops (norms, RoPE, SiLU, residual adds,
  embedding); a decode-only step whose layers run in one C call (``models/fused_decode.py``)
  counts them whole as ``fused_layers``. What the profiler does not attribute to an op is
  Python/dispatch overhead; it is reported as ``wall - attributed``, using the wall median.

The profiler adds a few microseconds per op, so the categories are a budget, not a stopwatch:
compare them within one run. Usage:
  python benchmarks/step_profile.py [--model smollm2-135m-instruct] [--concurrency 1 8 32]
Last line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from moeflow.checkpoints.store import resolve_home, resolve_model
from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.engine import model_runner as model_runner_module
from moeflow.engine.config import EngineSettings
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.models import decoder as decoder_module

REGIONS = ("lm_head", "attention", "sampling", "prepare", "products", "fused_layers")
PRODUCT_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
    "mkldnn::_linear_pointwise",
}


def _wrap_region(owner: Any, attr: str, label: str) -> None:
    """Replace ``owner.attr`` by a wrapper that marks a profiler region named ``label``."""
    inner = getattr(owner, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return inner(*args, **kwargs)

    setattr(owner, attr, wrapped)


def instrument(engine: LLMEngine) -> None:
    # products that are not torch ops (the C loop) are seen through their Linear wrapper
    try:
        from moeflow.engine.kernels.linear import Linear
    except ImportError:  # a tree from before the kernels (old/new A/B runs)
        pass
    else:
        _wrap_region(Linear, "__call__", "products")
    try:  # a decode-only step's layers in one C call: products, attention and the rest
        from moeflow.engine.models.fused_decode import FusedDecode
    except ImportError:  # a tree from before it
        pass
    else:
        _wrap_region(FusedDecode, "__call__", "fused_layers")
    _wrap_region(decoder_module, "paged_attention", "attention")
    _wrap_region(model_runner_module, "sample", "sampling")
    _wrap_region(engine.runner, "_prepare", "prepare")
    _wrap_region(engine.runner.model, "logits", "lm_head")


def budget(prof: Any, steps: int) -> dict[str, float]:
    """Milliseconds per step by category, from the profiler's event tree.

    A region (``REGIONS``) counts its whole duration, Python inside it included; attention is
    also split by op (``attention/<op>``, self times). Outside regions, ops count their self
    time as ``products`` (matrix products) or ``other_ops``."""
    out: dict[str, float] = defaultdict(float)

    def walk(event: Any, region: str | None) -> None:
        name = event.name
        if name in REGIONS and region is None:
            out[name] += event.cpu_time_total / 1000
            region = name
        elif region == "attention":
            out[f"attention/{name.removeprefix('aten::')}"] += event.self_cpu_time_total / 1000
        elif region is None and not name.startswith("ProfilerStep"):
            out["products" if name in PRODUCT_OPS else "other_ops"] += (
                event.self_cpu_time_total / 1000)
        for child in event.cpu_children:
            walk(child, region)

    for event in prof.events():
        if event.cpu_parent is None:
            walk(event, None)
    return {k: v / steps for k, v in out.items()}


def add_step_args(parser: argparse.ArgumentParser, *, steps: int, rounds: int) -> None:
    """The arguments every in-process step benchmark shares (model, threads, batch shape)."""
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=steps, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])


def step_engine(args: argparse.Namespace, new_tokens: int) -> LLMEngine:
    """An engine for ``add_step_args``' arguments, warmed up on a small batch."""
    torch.set_num_threads(args.threads)
    model_dir: Path = resolve_model(args.model, resolve_home(os.environ))
    engine = LLMEngine(EngineSettings(
        model_path=model_dir, num_threads=args.threads, kv_cache_bytes=1024 * 2**20,
        max_model_len=args.prompt_tokens + new_tokens, max_num_seqs=64,
    ))
    start_batch(engine, 2, 16, new_tokens, random.Random(1))
    for _ in range(3):
        engine.step()
    stop_batch(engine)
    return engine


def start_batch(
    engine: LLMEngine, c: int, prompt_tokens: int, new_tokens: int, rng: random.Random
) -> None:
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    vocab = engine.arch.vocab_size
    stamp = time.perf_counter_ns()
    for i in range(c):
        prompt = tuple(rng.randrange(100, vocab) for _ in range(prompt_tokens))
        engine.add_request(GenerateRequest(
            request_id=f"{stamp}-{i}", prompt_token_ids=prompt, sampling=sampling))
    seen: set[str] = set()
    while len(seen) < c:  # prefill (chunked as the scheduler likes) until every one decodes
        seen.update(chunk.request_id for chunk in engine.step())


def stop_batch(engine: LLMEngine) -> None:
    for request_id in list(engine._requests):
        engine.abort(request_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(parser, steps=8, rounds=3)
    args = parser.parse_args()
    new_tokens = 2 * args.rounds * args.steps + 8
    engine = step_engine(args, new_tokens)
    instrument(engine)
    rng = random.Random(0)
    result: dict[str, Any] = {"model": args.model, "threads": args.threads,
                              "prompt_tokens": args.prompt_tokens, "per_step_ms": {}}
    for c in args.concurrency:
        start_batch(engine, c, args.prompt_tokens, new_tokens, rng)
        walls: list[float] = []
        budgets: list[dict[str, float]] = []
        for _ in range(args.rounds):
            for _ in range(args.steps):
                t0 = time.perf_counter()
                engine.step()
                walls.append(1000 * (time.perf_counter() - t0))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    engine.step()
                profiled_ms = 1000 * (time.perf_counter() - t0) / args.steps
            cats = budget(prof, args.steps)
            # what no op or region accounts for, within the same profiled steps
            cats["python_overhead"] = profiled_ms - sum(v for k, v in cats.items() if "/" not in k)
            cats["profiled_step"] = profiled_ms
            budgets.append(cats)
        stop_batch(engine)
        wall = statistics.median(walls)
        # the quietest profiled round (the box is shared: neighbours only ever add time)
        cats = dict(sorted(min(budgets, key=lambda b: b["profiled_step"]).items()))
        result["per_step_ms"][f"c{c}"] = {
            "wall_median": wall, "wall_min": min(walls), "wall_max": max(walls),
            "categories": cats,
        }
        line = ", ".join(f"{k} {v:.1f}" for k, v in cats.items())
        print(f"c={c}: step {wall:.1f} ms [{min(walls):.1f}-{max(walls):.1f}]: {line}",
              file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
