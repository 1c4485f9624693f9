"""Prefill order: TTFT of short prompts that arrive behind a long one, arrival order vs
shortest remaining prefill first (with aging), same engine, rounds interleaved.

Each round: one long prompt arrives, then short prompts arrive one by one while it is being
prefilled in chunks (open loop: arrivals follow the wall clock, not the engine). Arrival order
(``prefill_max_wait_s = 0``) gives the long prompt's chunks the step budget until its prefill is
done; shortest-first lets each short prompt through first, and the long prompt pays with a
later first token (bounded by aging). Prefix caching is off so that rounds do not help each
other; prompts are random token ids.

Usage: python benchmarks/prefill_order.py [--model smollm2-135m-instruct] [--rounds 3]
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
from pathlib import Path
from typing import Any

import torch

from moeflow.checkpoints.store import resolve_home, resolve_model
from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.engine.config import EngineSettings
from moeflow.engine.llm_engine import LLMEngine

POLICIES = {"arrival_order": 0.0, "shortest_first": 30.0}
"""prefill_max_wait_s per policy: 0 is arrival order; 30 s never ages within one round."""


def run_round(engine: LLMEngine, rng: random.Random, args: argparse.Namespace,
              tag: str) -> dict[str, Any]:
    vocab = engine.arch.vocab_size
    sampling = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def prompt(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(100, vocab) for _ in range(n))

    # (offset s, request id, prompt): the long one first, then the short ones
    arrivals = [(0.0, f"{tag}-long", prompt(args.long_tokens))]
    arrivals += [(args.first_short_s + i * args.short_gap_s, f"{tag}-s{i}",
                  prompt(args.short_tokens)) for i in range(args.num_short)]
    arrived: dict[str, float] = {}
    ttft: dict[str, float] = {}
    start = time.perf_counter()
    pending = list(arrivals)
    while pending or engine.has_work:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, rid, ids = pending.pop(0)
            engine.add_request(GenerateRequest(request_id=rid, prompt_token_ids=ids,
                                               sampling=sampling))
            arrived[rid] = time.perf_counter()
        if not engine.has_work:
            time.sleep(min(0.001, max(0.0, pending[0][0] - now)))
            continue
        for chunk in engine.step():
            if chunk.request_id not in ttft:
                ttft[chunk.request_id] = time.perf_counter() - arrived[chunk.request_id]
    shorts = [1000 * v for k, v in ttft.items() if not k.endswith("-long")]
    return {"short_ttft_p50_ms": statistics.median(shorts),
            "short_ttft_max_ms": max(shorts),
            "long_ttft_ms": 1000 * ttft[f"{tag}-long"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--long-tokens", type=int, default=1024)
    parser.add_argument("--short-tokens", type=int, default=32)
    parser.add_argument("--num-short", type=int, default=6)
    parser.add_argument("--first-short-s", type=float, default=0.05)
    parser.add_argument("--short-gap-s", type=float, default=0.05)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model_dir: Path = resolve_model(args.model, resolve_home(os.environ))
    engine = LLMEngine(EngineSettings(
        model_path=model_dir, num_threads=args.threads, kv_cache_bytes=512 * 2**20,
        max_model_len=args.long_tokens + args.new_tokens + 16,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
    ))
    rng = random.Random(0)
    engine.scheduler.prefill_max_wait_s = 0.0
    run_round(engine, rng, args, "warmup")
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    for r in range(args.rounds):
        for policy, max_wait_s in POLICIES.items():
            engine.scheduler.prefill_max_wait_s = max_wait_s
            results[policy].append(run_round(engine, rng, args, f"{policy}-{r}"))
            print(f"round {r} {policy}: {results[policy][-1]}", file=sys.stderr)

    def median(policy: str, key: str) -> float:
        return float(statistics.median(x[key] for x in results[policy]))

    result: dict[str, Any] = {
        "model": args.model, "threads": args.threads, "rounds": args.rounds,
        "long_tokens": args.long_tokens, "short_tokens": args.short_tokens,
        "num_short": args.num_short, "max_num_batched_tokens": args.max_num_batched_tokens,
        "cpu_count": os.cpu_count(),
    }
    for policy in POLICIES:
        result[policy] = {k: median(policy, k) for k in results[policy][0]}
    result["short_ttft_p50_ratio"] = (result["shortest_first"]["short_ttft_p50_ms"]
                                      / result["arrival_order"]["short_ttft_p50_ms"])
    result["long_ttft_ratio"] = (result["shortest_first"]["long_ttft_ms"]
                                 / result["arrival_order"]["long_ttft_ms"])
    out = Path(__file__).parent / "results" / "prefill_order.json"
    out.write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
