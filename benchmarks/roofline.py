"""Roofline probes for this machine, measured in the same run as the serving benchmark.

What it measures (docs/benchmarks.md, "Method"):
- BW_eff: a torch read (`t.sum()`) of the model's own decode-step weight tensors with the engine's
  thread count, i.e. the bandwidth at exactly the model's cache residency (best of N passes);
- numpy read (`a.sum()`) and copy (`np.copyto`) at a few sizes (L2, L3, DRAM) for context;
- matmul rate: fp32 GEMM 1024^3 and bf16 GEMM 512^3 GFLOP/s at the same thread count.
From them, the batch-1 decode bound of a dense model: tokens/s <= BW_eff / bytes read per step,
where bytes per step = every weight except the embedding table (only one row is read), plus the
LM head (which is the embedding table itself when the embeddings are tied).

For a GGUF (llama.cpp's format) the bytes per step are its tensor bytes with the same rule.

Usage: python benchmarks/roofline.py --model-dir DIR [--gguf FILE] [--threads 2] [--quick]
Last line: RESULT {json}. With --serve: a stdin line protocol for benchmarks/serving.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def step_tensors(model_dir: Path) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Weight tensors one batch-1 decode step reads, in the checkpoint's own dtype."""
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    tied = bool(config.get("tie_word_embeddings", False)) or not any(
        "lm_head" in k for k in tensors
    )
    read = [t for k, t in tensors.items() if "embed_tokens" not in k or tied]
    params = sum(t.numel() for t in tensors.values())
    embed = sum(t.numel() for k, t in tensors.items() if "embed_tokens" in k)
    info = {
        "params": params,
        "non_embedding_params": params - embed,
        "tied_embeddings": tied,
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        "bytes_per_step": sum(t.numel() * t.element_size() for t in read),
    }
    return read, info


def gguf_bytes_per_step(path: Path) -> dict[str, Any]:
    """Decode-step bytes of a GGUF: all tensors, minus token_embd unless it is also the output."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name: int(t.n_bytes) for t in reader.tensors}
    tied = "output.weight" not in names
    total = sum(b for n, b in names.items() if n != "token_embd.weight" or tied)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {"file": str(path), "bytes_per_step": total, "tensor_types": types, "tied": tied}


def torch_read_gbps(tensors: list[torch.Tensor], repeats: int) -> list[float]:
    num_bytes = sum(t.numel() * t.element_size() for t in tensors)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        acc = 0.0
        for t in tensors:
            acc += float(t.sum())
        out.append(num_bytes / (time.perf_counter() - start) / 1e9)
    return out


def numpy_probe(mib: int, repeats: int) -> dict[str, float]:
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    read, copy = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        a.sum()
        read.append(a.nbytes / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        np.copyto(b, a)
        copy.append(a.nbytes / (time.perf_counter() - start) / 1e9)
    return {"read_gbps": max(read), "copy_gbps": max(copy)}


def gemm_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def probe(tensors: list[torch.Tensor], threads: int, repeats: int = 3) -> dict[str, float]:
    """A short bandwidth sample at the engine's thread count and at 1 thread (best of each)."""
    reads = torch_read_gbps(tensors, repeats)
    reads_1t = reads
    if threads > 1:  # on a shared box one thread is sometimes the faster reader
        torch.set_num_threads(1)
        reads_1t = torch_read_gbps(tensors, max(2, repeats - 1))
        torch.set_num_threads(threads)
    return {"gbps": max(reads), "gbps_median": statistics.median(reads),
            "gbps_1t": max(reads_1t), "best": max(max(reads), max(reads_1t)),
            "loadavg1": os.getloadavg()[0]}


def measure_loaded(tensors: list[torch.Tensor], info: dict[str, Any], threads: int,
                   gguf: Path | None = None, quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(threads)
    sample = probe(tensors, threads, 5 if quick else 9)
    # best of N and of both thread counts: the machine's capability at this residency (noise and
    # neighbours only ever slow a probe down, so the best is the least biased bound)
    bw = sample["best"]
    result: dict[str, Any] = {
        "threads": threads,
        "model": info,
        "weight_read": sample,
        "bandwidth_gbps": bw,
        "gemm_gflops": {
            "fp32_1024": gemm_gflops(1024, torch.float32, 3 if quick else 5),
            "bf16_512": gemm_gflops(512, torch.bfloat16, 3 if quick else 5),
        },
        "numpy": {f"{m}MiB": numpy_probe(m, 3 if quick else 5)
                  for m in ([16, 256] if quick else [1, 16, 64, 256, 1024])},
        "loadavg": os.getloadavg(),
    }
    result["bound_tok_s"] = bw * 1e9 / info["bytes_per_step"]
    # the batch at which decode turns compute-bound (fp32: 2 FLOP per 4 bytes per sequence)
    flops = result["gemm_gflops"]["fp32_1024"] * 1e9
    result["ridge_batch_fp32"] = flops / (bw * 1e9) * 2
    result["compute_bound_tok_s_fp32"] = flops / (2 * info["params"])
    if gguf is not None and gguf.exists():
        g = gguf_bytes_per_step(gguf)
        g["bound_tok_s"] = bw * 1e9 / g["bytes_per_step"]
        result["gguf"] = g
    return result


def measure(model_dir: Path, threads: int, gguf: Path | None = None,
            quick: bool = False) -> dict[str, Any]:
    tensors, info = step_tensors(model_dir)
    return measure_loaded(tensors, info, threads, gguf, quick)


def serve(model_dir: Path, threads: int, gguf: Path | None, quick: bool) -> None:
    """Line protocol on stdin/stdout, weights loaded once: `probe`, `full` or `quit`.

    Lets a benchmark sample the bandwidth between its cells (cheap: about 5 weight passes), so the
    bound is the best bandwidth seen anywhere in the run, not one possibly disturbed sample.
    """
    torch.set_num_threads(threads)
    tensors, info = step_tensors(model_dir)
    print(json.dumps({"ready": True, "model": info}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "probe":
            print(json.dumps(probe(tensors, threads)), flush=True)
        elif cmd == "full":
            print(json.dumps(measure_loaded(tensors, info, threads, gguf, quick)), flush=True)
        elif cmd == "quit":
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", action="store_true", help="stdin line protocol (see serve)")
    args = parser.parse_args()
    if args.serve:
        serve(args.model_dir, args.threads, args.gguf, args.quick)
        return
    result = measure(args.model_dir, args.threads, args.gguf, args.quick)
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
