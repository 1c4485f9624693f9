"""Kernel microbenchmark: the decoder's products and decode attention, old vs new, interleaved.

On the model's own weight shapes (every layer's qkv, o_proj, gate_up, down, then the LM head,
each layer with its own weights so nothing stays in cache between products, like a real step),
for each batch size M, one round runs every variant once, round after round (A B C A B C ...),
so the machine's neighbours slow every variant alike. Reported per variant: median, min and max
of the layers' products and of the LM head, in ms per decode step.

Variants:
- ``transposed``: the previous layout, ``x @ w_t`` on a contiguous [K, N] copy for qkv, gate_up
  and the LM head, ``F.linear`` for o_proj and down;
- ``dense``: ``F.linear`` on the [N, K] weight (what transformers runs);
- ``packed``: ``moeflow.engine.kernels.Linear`` (oneDNN, weight packed once).

Decode attention (``--context`` tokens per sequence, D = M sequences, every layer's own cache,
blocks scattered over the cache as a busy block manager leaves them):
- ``gather_sdpa``: the torch path, a gathered copy of each context, then SDPA;
- ``c_kernel``: ``kernels/csrc/paged_attention.c``, reading the cache in place.

Usage: python benchmarks/kernels.py [--model smollm2-135m-instruct] [--m 1 8 32] [--rounds 7]
Last line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeflow.checkpoints.store import resolve_home, resolve_model
from moeflow.engine.kernels import Linear, native
from moeflow.engine.models.arch import ArchConfig, load_arch
from moeflow.engine.models.attention import decode_gather

Product = Callable[[torch.Tensor], torch.Tensor]


def variants(shapes: list[tuple[int, int]], generator: torch.Generator
             ) -> dict[str, list[Product]]:
    """For each variant, one product per weight (same random weights for every variant)."""
    out: dict[str, list[Product]] = {"transposed": [], "dense": [], "packed": []}
    for i, (n, k) in enumerate(shapes):
        w = torch.randn(n, k, generator=generator) * 0.05
        kind = i % 4 if i < len(shapes) - 1 else 0  # qkv, o, gate_up, down; LM head like qkv
        if kind in (0, 2):
            w_t = w.t().contiguous()
            out["transposed"].append(lambda x, w_t=w_t: x @ w_t)
        else:
            out["transposed"].append(lambda x, w=w: F.linear(x, w))
        out["dense"].append(lambda x, w=w: F.linear(x, w))
        out["packed"].append(Linear(w))
    return out


def run_step(products: list[Product], inputs: list[torch.Tensor]) -> tuple[float, float]:
    """ms in the layers' products, ms in the LM head."""
    t0 = time.perf_counter()
    for product, x in zip(products[:-1], inputs[:-1], strict=True):
        product(x)
    t1 = time.perf_counter()
    products[-1](inputs[-1])
    t2 = time.perf_counter()
    return 1000 * (t1 - t0), 1000 * (t2 - t1)


def attention_variants(arch: ArchConfig, num_seqs: int, context: int, block_size: int,
                       generator: torch.Generator) -> dict[str, Callable[[], None]]:
    """One decode step's attention over every layer, per variant."""
    k, hd, h = arch.num_kv_heads, arch.head_dim, arch.num_heads
    width = (context + block_size - 1) // block_size
    num_blocks = max(4 * num_seqs * width, 1024)
    caches = [torch.randn(2, num_blocks * block_size, k, hd, generator=generator)
              for _ in range(arch.num_layers)]
    order = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    tables = order[: num_seqs * width].view(num_seqs, width).contiguous()
    lens = torch.tensor([context - i % 5 for i in range(num_seqs)], dtype=torch.int32)
    q = torch.randn(num_seqs, h + k, hd, generator=generator)[:, :h]
    scale = hd**-0.5
    gather, mask = decode_gather(tables, lens, block_size)
    kernels = native.library()

    def gather_sdpa() -> None:
        for c in caches:
            kd, vd = c[0][gather].transpose(1, 2), c[1][gather].transpose(1, 2)
            F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale,
                                           enable_gqa=True)

    out: dict[str, Callable[[], None]] = {"gather_sdpa": gather_sdpa}
    if kernels is not None:
        def c_kernel() -> None:
            for c in caches:
                kernels.paged_decode_attention(q, c[0], c[1], tables, lens, block_size, scale)

        out["c_kernel"] = c_kernel
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--context", type=int, default=160, help="decode attention context")
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    arch = load_arch(resolve_model(args.model, resolve_home(os.environ)))
    e, hd = arch.hidden_size, arch.head_dim
    layer = [((arch.num_heads + 2 * arch.num_kv_heads) * hd, e), (e, arch.num_heads * hd),
             (2 * arch.intermediate_size, e), (e, arch.intermediate_size)]
    shapes = layer * arch.num_layers + [(arch.vocab_size, e)]
    generator = torch.Generator().manual_seed(0)
    products = variants(shapes, generator)
    result: dict[str, Any] = {"model": args.model, "threads": args.threads,
                              "rounds": args.rounds, "context": args.context,
                              "ms_per_step": {}}
    for m in args.m:
        inputs = [torch.randn(m, k, generator=generator) for _, k in shapes]
        for fns in products.values():  # first calls (oneDNN builds its kernels per shape)
            run_step(fns, inputs)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in products}
        for _ in range(args.rounds):
            for name, fns in products.items():
                times[name].append(run_step(fns, inputs))
        cell: dict[str, Any] = {}
        for name, samples in times.items():
            cell[name] = {"layers": summary([a for a, _ in samples]),
                          "lm_head": summary([b for _, b in samples]),
                          "total": summary([a + b for a, b in samples])}
        result["ms_per_step"][f"m{m}"] = cell
        line = "  ".join(
            f"{name} {c['total']['median']:.1f} [{c['total']['min']:.1f}-{c['total']['max']:.1f}]"
            f" (head {c['lm_head']['median']:.1f})" for name, c in cell.items())
        print(f"M={m}: {line}", file=sys.stderr, flush=True)

        attention = attention_variants(arch, m, args.context, args.block_size, generator)
        samples: dict[str, list[float]] = {name: [] for name in attention}
        for fn in attention.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in attention.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(1000 * (time.perf_counter() - t0))
        result["attention_ms_per_step"] = result.get("attention_ms_per_step", {})
        result["attention_ms_per_step"][f"d{m}"] = {n: summary(v) for n, v in samples.items()}
        line = "  ".join(f"{n} {statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]"
                         for n, v in samples.items())
        print(f"D={m} attention, context {args.context}: {line}", file=sys.stderr, flush=True)
    out = Path(__file__).parent / "results" / "kernels.json"
    out.write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
