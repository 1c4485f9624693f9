"""Structured-output overhead: batch-1 decode with a json_schema constraint vs without.

One engine (default SmolLM2-135M-Instruct, float32, CPU), rounds interleaved A B A B (plain,
constrained, plain, ...). Each request decodes ``--new-tokens`` after a short prompt; a
request's decode time per token is the median of its engine steps after the first token
(prefill), which a passing burst of load on a shared machine moves less than a mean. The
constrained request uses a schema whose JSON must run long (at least 64 free strings), so it
does not end early; its steps include the llguidance mask (computed, unpacked, applied) and
the grammar advance. Each step is timed in wall time and in this process's CPU time (which
leaves out waiting for a core). Reported: the medians over rounds, their ranges, the overhead of the
medians and the median of the per-round (paired) ratios, the mask step alone (timed on the
same grammar), and the load average before and after (the machine may be shared).

Usage: python benchmarks/structured_output.py [--model smollm2-135m-instruct] [--rounds 5]
Last line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from llguidance import LLMatcher

from moeflow.checkpoints.store import resolve_home, resolve_model
from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.engine.config import EngineSettings
from moeflow.engine.llm_engine import LLMEngine

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"},
                   "notes": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
    "required": ["title", "notes"],
}


def decode_ms_per_token(engine: LLMEngine, rid: str, sampling: SamplingParams) -> tuple[
        float, float, int]:
    """The median decode step in wall ms and in this process's CPU ms (batch 1: one token a
    step), and the tokens produced. CPU time leaves out the time the process waited for a
    core, which is most of the noise on a shared machine."""
    prompt = tuple(engine.tokenizer.encode("Write a long list of notes about rivers as JSON."))
    engine.add_request(GenerateRequest(request_id=rid, prompt_token_ids=prompt,
                                       sampling=sampling))
    wall_ms: list[float] = []
    cpu_ms: list[float] = []
    n = 0
    while engine.has_work:
        started, started_cpu = time.perf_counter(), time.process_time()
        produced = sum(len(chunk.token_ids) for chunk in engine.step())
        if n and produced:  # the first token is the prefill's
            wall_ms.append(1000 * (time.perf_counter() - started) / produced)
            cpu_ms.append(1000 * (time.process_time() - started_cpu) / produced)
        n += produced
    return statistics.median(wall_ms), statistics.median(cpu_ms), n


def spread(values: list[float]) -> list[float]:
    return [round(min(values), 3), round(max(values), 3)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()
    model_dir: Path = resolve_model(args.model, resolve_home(os.environ))
    engine = LLMEngine(EngineSettings(model_path=model_dir, num_threads=args.threads,
                                      kv_cache_bytes=256 * 2**20, max_model_len=512))
    grammar = LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False})
    plain = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    constrained = plain.model_copy(update={"grammar": grammar, "ignore_eos": False})
    decode_ms_per_token(engine, "warm-p", plain)
    decode_ms_per_token(engine, "warm-c", constrained)
    plain_ms: list[float] = []
    constrained_ms: list[float] = []
    plain_cpu: list[float] = []
    constrained_cpu: list[float] = []
    constrained_tokens: list[int] = []
    for r in range(args.rounds):
        ms, cpu, _ = decode_ms_per_token(engine, f"p{r}", plain)
        plain_ms.append(ms)
        plain_cpu.append(cpu)
        ms, cpu, n = decode_ms_per_token(engine, f"c{r}", constrained)
        constrained_ms.append(ms)
        constrained_cpu.append(cpu)
        constrained_tokens.append(n)
    # the mask step alone, on a fresh grammar state
    constraint = engine.grammars.constraint(grammar)
    row = torch.zeros(engine.arch.vocab_size)
    started = time.perf_counter()
    num_masks = 200
    for _ in range(num_masks):
        constraint.mask_(row)
    mask_ms = 1000 * (time.perf_counter() - started) / num_masks
    p, c = statistics.median(plain_ms), statistics.median(constrained_ms)
    paired = [100 * (ci - pi) / pi for pi, ci in zip(plain_ms, constrained_ms, strict=True)]
    pc, cc = statistics.median(plain_cpu), statistics.median(constrained_cpu)
    result = {
        "model": args.model,
        "threads": args.threads,
        "vocab_size": engine.arch.vocab_size,
        "plain_decode_ms_per_token": round(p, 3),
        "json_schema_decode_ms_per_token": round(c, 3),
        "plain_range_ms": spread(plain_ms),
        "json_schema_range_ms": spread(constrained_ms),
        "overhead_pct": round(100 * (c - p) / p, 2),
        "paired_overhead_pct_median": round(statistics.median(paired), 2),
        "paired_overhead_pct_range": spread(paired),
        "plain_cpu_ms_per_token": round(pc, 3),
        "json_schema_cpu_ms_per_token": round(cc, 3),
        "plain_cpu_range_ms": spread(plain_cpu),
        "json_schema_cpu_range_ms": spread(constrained_cpu),
        "cpu_overhead_pct": round(100 * (cc - pc) / pc, 2),
        "mask_ms_per_token": round(mask_ms, 4),
        "mask_pct_of_plain_token": round(100 * mask_ms / p, 2),
        "constrained_tokens_per_request": constrained_tokens,
        "rounds": args.rounds,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
