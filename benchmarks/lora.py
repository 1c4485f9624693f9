"""Multi-LoRA decode benchmark: decode tokens/s of one batch with 0, 1 and 4 adapters active.

One engine holds every adapter (random PEFT adapters, made at start, no training). Each round
runs the same batch of ``--batch`` requests (same prompts, greedy, ``--max-tokens`` each) three
ways, interleaved: every row on the base model (0), every row on one adapter (1), and the rows
spread evenly over four adapters (4). Only decode steps are timed (steps after every request
has its first token), so prefill does not blur the per-step cost of the adapters. Two rates:
tokens per wall second, and tokens per CPU second of this process (``cpu_tok_s``), which other
load on a shared machine disturbs far less (with ``--threads 1`` it is the work of a step).

``--configs 0`` needs no adapter support at all: run it on an older checkout to compare the
engine's no-adapter decode step before and after adapters existed.

Usage: python benchmarks/lora.py [--model smollm2-135m-instruct] [--rounds 3] [--threads 2]
       [--batch 8] [--max-tokens 32] [--rank 8] [--targets q_proj,k_proj,v_proj,o_proj]
Last line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moeflow.checkpoints.store import resolve_home, resolve_model
from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.engine.config import EngineSettings
from moeflow.engine.llm_engine import LLMEngine


def make_adapters(model_dir: Path, out: Path, n: int, rank: int, targets: list[str]
                  ) -> dict[str, Path]:
    # this folder's kernels.py would shadow the `kernels` package that transformers imports
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters = {}
    for i in range(n):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(i)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                target_modules=targets, init_lora_weights=False))
        model.save_pretrained(str(out / f"lora{i}"))
        adapters[f"lora{i}"] = out / f"lora{i}"
    return adapters


def decode_tok_s(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None],
                 max_tokens: int, tag: str) -> tuple[float, float]:
    """Decode tokens per wall second and per CPU second."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        extra: dict[str, Any] = {"adapter": adapter} if adapter else {}
        engine.add_request(GenerateRequest(request_id=f"{tag}-{i}", prompt_token_ids=tuple(prompt),
                                           sampling=sampling, **extra))
    started: set[str] = set()
    tokens = 0
    elapsed = cpu = 0.0
    while engine.has_work:
        decoding = len(started) == len(prompts)
        t0, c0 = time.perf_counter(), time.process_time()
        chunks = engine.step()
        if decoding:
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
            tokens += len(chunks)
        started.update(c.request_id for c in chunks)
    return tokens / elapsed, tokens / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--configs", default="0,1,4", help="adapters active per batch")
    args = parser.parse_args()
    configs = [int(c) for c in args.configs.split(",")]
    model_dir = resolve_model(args.model, resolve_home(os.environ))
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        num_adapters = max(configs)
        adapters = (make_adapters(model_dir, Path(tmp), num_adapters, args.rank,
                                  args.targets.split(",")) if num_adapters else {})
        extra: dict[str, Any] = {"lora_adapters": adapters} if adapters else {}
        engine = LLMEngine(EngineSettings(model_path=model_dir, num_threads=args.threads,
                                          max_model_len=1024, warmup=False, **extra))
        names = sorted(adapters)
        prompts = [[(17 * i + 3 * j) % 5000 + 100 for j in range(48)] for i in range(args.batch)]
        layouts = {c: [names[i % c] if c else None for i in range(args.batch)] for c in configs}
        decode_tok_s(engine, prompts, layouts[configs[-1]], 4, "warm")  # first-use costs
        walls: dict[int, list[float]] = {c: [] for c in configs}
        cpus: dict[int, list[float]] = {c: [] for c in configs}
        for r in range(args.rounds):
            for c in configs:
                wall, cpu = decode_tok_s(engine, prompts, layouts[c], args.max_tokens, f"{r}-{c}")
                walls[c].append(wall)
                cpus[c].append(cpu)
                print(f"round {r}: {c} adapters: {wall:.1f} decode tok/s, {cpu:.1f} per CPU s",
                      flush=True)
    summary = {f"adapters_{c}": round(statistics.median(v), 1) for c, v in walls.items()}
    summary |= {f"cpu_adapters_{c}": round(statistics.median(v), 1) for c, v in cpus.items()}
    base = summary.get("cpu_adapters_0")
    ratios = {f"cpu_ratio_{c}_vs_0": round(summary[f"cpu_adapters_{c}"] / base, 3)
              for c in configs if c and base}
    print("RESULT " + json.dumps({"model": args.model, "batch": args.batch, "rank": args.rank,
                                  "targets": args.targets, "threads": args.threads,
                                  "rounds": args.rounds, **summary, **ratios},
                                 separators=(",", ":")))


if __name__ == "__main__":
    main()
