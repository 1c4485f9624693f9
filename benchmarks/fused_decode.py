"""Decode steps with every layer in one C call vs the per-layer Python loop, same engine.

``models/fused_decode.py`` runs a decode-only step's layers in one call into
``kernels/csrc/decoder.c``; the per-layer path (``DecoderModel.forward``) calls the very same C
kernels one by one from Python. Both compute the same bits; this measures what the Python
between the calls cost. The two paths alternate every ``--steps`` steps on the same running
batch (order flipped each round), ``--rounds`` times per concurrency. Also reported: the
batch-1 step's weight-read rate (bytes of every product / step time). Usage:
  python -P benchmarks/fused_decode.py [--concurrency 1 8 32] [--rounds 6] [--steps 10]
Last line: RESULT {json}, with per-layer / fused step-time ratios (above 1: fused is faster).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import add_step_args, start_batch, step_engine, stop_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(parser, steps=10, rounds=6)
    args = parser.parse_args()
    new_tokens = 2 * args.rounds * (args.steps + 1) + 8  # every sequence decodes to the end
    engine = step_engine(args, new_tokens)
    model = engine.runner.model
    fused = model.fused_decode()
    if fused is None:
        raise SystemExit("this model or machine has no fused decode (see models/fused_decode.py)")
    product_bytes = sum(linear.nbytes for layer in model.layers
                        for linear in (layer.qkv, layer.o_proj, layer.mlp.gate_up,
                                       layer.mlp.down)) + model.lm_head.nbytes
    rng = random.Random(0)
    result: dict[str, Any] = {"model": args.model, "threads": args.threads,
                              "product_bytes": product_bytes, "per_step_ms": {},
                              "layer_path_over_fused": {}}
    for c in args.concurrency:
        start_batch(engine, c, args.prompt_tokens, new_tokens, rng)
        times: dict[str, list[float]] = {"fused": [], "layer_path": []}
        for round_index in range(args.rounds):
            order = list(times) if round_index % 2 == 0 else list(reversed(times))
            for state in order:
                model._fused = fused if state == "fused" else None
                engine.step()  # one untimed step after the switch
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    engine.step()
                times[state].append(1000 * (time.perf_counter() - t0) / args.steps)
        stop_batch(engine)
        model._fused = fused
        cell: dict[str, Any] = {k: {"median": statistics.median(v), "min": min(v),
                                    "max": max(v)} for k, v in times.items()}
        ratios = [b / a for a, b in zip(times["fused"], times["layer_path"], strict=True)]
        ratio = statistics.median(ratios)
        cell["ratio_range"] = [min(ratios), max(ratios)]
        result["per_step_ms"][f"c{c}"] = cell
        result["layer_path_over_fused"][f"c{c}"] = ratio
        line = ", ".join(f"{k} {cell[k]['median']:.1f} [{cell[k]['min']:.1f}-"
                         f"{cell[k]['max']:.1f}]" for k in times)
        if c == 1:
            rate = {k: product_bytes / (cell[k]["median"] / 1000) / 1e9 for k in times}
            result["batch1_weight_read_gb_s"] = rate
            line += "; weights read at " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items())
            line += " GB/s"
        print(f"c={c}: step ms {line}; per-layer / fused {ratio:.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
