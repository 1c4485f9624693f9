"""Engine benchmark: MoEFlow's engine vs Hugging Face transformers eager, same model, same run.

Measures, interleaved round by round (ours, HF, ours, HF, ...):
- batch-1 decode tokens/s and TTFT;
- decode tokens/s and TTFT p50 at concurrency 8 and 32 (all requests arrive at once);
- the machine's memory bandwidth, read the way decode reads it (a torch pass over the model's own
  weights, same thread count), giving the batch-1 roofline bound = bandwidth / weight bytes per
  token.
HF is measured two ways at concurrency > 1: as a one-request-at-a-time server (what a plain
`generate` service does; its throughput is its batch-1 speed) and as one padded static batch
(`generate` on all prompts at once), the stronger baseline. Both ratios are reported.

Usage: python benchmarks/engine.py [--model smollm2-135m-instruct] [--rounds 3] [--threads 2]
Last line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from moeflow.engine.kernels import Linear
from moeflow.engine.llm_engine import LLMEngine


def weight_tensors(engine: LLMEngine) -> list[torch.Tensor]:
    """The tensors one decode step reads (the embedding table only via its tied LM head)."""
    model = engine.runner.model
    def weight(linear: Linear) -> torch.Tensor:
        # packed bytes read as the weight's dtype (a uint8 sum would measure integer adds)
        return linear.storage.view(linear.dtype)

    tensors: list[torch.Tensor] = [model.final_norm, weight(model.lm_head)]

    def collect(obj: object) -> None:
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, Linear):
                tensors.append(weight(value))
            elif hasattr(value, "__dict__"):
                collect(value)

    for layer in model.layers:
        collect(layer)
    return tensors


def measure_bandwidth_gbps(tensors: list[torch.Tensor], repeats: int = 7) -> float:
    num_bytes = sum(t.numel() * t.element_size() for t in tensors)
    best_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total = 0.0
        for t in tensors:
            total += float(t.sum())
        best_s = min(best_s, time.perf_counter() - start)
    return num_bytes / best_s / 1e9


def run_ours(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    stamp = f"{time.perf_counter_ns()}"
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(
            GenerateRequest(request_id=f"{stamp}-{i}", prompt_token_ids=tuple(p), sampling=sampling)
        )
    first: dict[str, float] = {}
    chunk_times: list[float] = []
    while engine.has_work:
        chunks = engine.step()
        now = time.perf_counter()
        for c in chunks:
            first.setdefault(c.request_id, now)
            chunk_times.append(now)
    end = time.perf_counter()
    all_first = max(first.values())
    num_decode = sum(1 for t in chunk_times if t > all_first)
    window_s = end - all_first
    return {
        "decode_tok_s": num_decode / window_s if window_s > 0 else float("nan"),
        "output_tok_s": len(chunk_times) / (end - start),
        "ttft_p50_ms": 1000 * statistics.median(t - start for t in first.values()),
    }


def run_hf(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int) -> dict[str, float]:
    """One padded static batch through `generate` (batch of 1 = plain eager generation)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad_id)
        return time.perf_counter() - start

    ttft_s = generate(1)
    total_s = generate(new_tokens)
    decode_s = max(total_s - ttft_s, 1e-9)
    return {
        "decode_tok_s": len(prompts) * (new_tokens - 1) / decode_s,
        "output_tok_s": len(prompts) * new_tokens / total_s,
        "ttft_p50_ms": 1000 * ttft_s,
        "request_s": total_s,
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model_dir: Path = resolve_model(args.model, resolve_home(os.environ))
    engine = LLMEngine(EngineSettings(
        model_path=model_dir, num_threads=args.threads, kv_cache_bytes=1024 * 2**20,
        max_model_len=args.prompt_tokens + args.new_tokens + 16, max_num_seqs=64,
    ))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad_id = engine.arch.eos_token_ids[0] if engine.arch.eos_token_ids else 0
    rng = random.Random(0)
    vocab = engine.arch.vocab_size

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(100, vocab) for _ in range(args.prompt_tokens)] for _ in range(n)]

    tensors = weight_tensors(engine)
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    run_ours(engine, prompts(2), 8)  # warm-up both
    run_hf(hf, prompts(1), 4, pad_id)

    ours: dict[int, list[dict[str, float]]] = {c: [] for c in args.concurrency}
    theirs: dict[int, list[dict[str, float]]] = {c: [] for c in args.concurrency}
    bandwidths: list[float] = []
    for r in range(args.rounds):
        bandwidths.append(measure_bandwidth_gbps(tensors))
        for c in args.concurrency:
            batch = prompts(c)
            ours[c].append(run_ours(engine, batch, args.new_tokens))
            theirs[c].append(run_hf(hf, batch, args.new_tokens, pad_id))
            print(f"round {r} c={c}: ours {ours[c][-1]['decode_tok_s']:.1f} decode tok/s, "
                  f"HF batch {theirs[c][-1]['decode_tok_s']:.1f}", file=sys.stderr)

    bw = statistics.median(bandwidths)
    bound_tok_s = bw * 1e9 / weight_bytes
    hf_b1 = statistics.median(x["decode_tok_s"] for x in theirs[1]) if 1 in theirs else None
    hf_b1_request_s = statistics.median(x["request_s"] for x in theirs[1]) if 1 in theirs else None
    result: dict[str, Any] = {
        "model": args.model, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "rounds": args.rounds,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "bandwidth_gbps": summary(bandwidths), "weight_bytes_per_token": weight_bytes,
        "bound_tok_s": bound_tok_s, "ours": {}, "hf_batch": {}, "hf_sequential": {},
        "ratios": {},
    }
    for c in args.concurrency:
        o = statistics.median(x["decode_tok_s"] for x in ours[c])
        h = statistics.median(x["decode_tok_s"] for x in theirs[c])
        result["ours"][f"c{c}"] = {
            "decode_tok_s": summary([x["decode_tok_s"] for x in ours[c]]),
            "output_tok_s": summary([x["output_tok_s"] for x in ours[c]]),
            "ttft_p50_ms": summary([x["ttft_p50_ms"] for x in ours[c]]),
        }
        result["hf_batch"][f"c{c}"] = {
            "decode_tok_s": summary([x["decode_tok_s"] for x in theirs[c]]),
            "ttft_p50_ms": summary([x["ttft_p50_ms"] for x in theirs[c]]),
        }
        ratios = {"vs_hf_batch": o / h}
        if hf_b1 is not None and hf_b1_request_s is not None:
            # one request at a time: throughput is batch-1 speed; request i waits for i before it
            result["hf_sequential"][f"c{c}"] = {
                "decode_tok_s": hf_b1,
                "ttft_p50_ms": 1000 * statistics.median(i * hf_b1_request_s for i in range(c))
                + statistics.median(x["ttft_p50_ms"] for x in theirs[1]),
            }
            ratios["vs_hf_sequential"] = o / hf_b1
        result["ratios"][f"c{c}"] = ratios
    if 1 in ours:
        b1 = statistics.median(x["decode_tok_s"] for x in ours[1])
        result["batch1_fraction_of_bound"] = b1 / bound_tok_s
        result["hf_batch1_fraction_of_bound"] = (hf_b1 or 0.0) / bound_tok_s
    result["targets"] = {"batch1_vs_hf": 2.0, "c32_vs_hf": 10.0, "batch1_fraction_of_bound": 0.7}
    out = Path(__file__).parent / "results" / "engine.json"
    out.write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
