"""Decode steps with one OpenMP pool in the process vs two (the served engine before the fix).

libgomp throttles every pool's spin-wait to 1,000 iterations once the workers of all pools
outnumber the CPUs (see services/moeflow/engine/kernels/openmp.py). A served engine used to
build its model on one thread and step on another: two pools. This benchmark reproduces both
states in one process, on the real engine (same model and settings as step_profile.py):
- one pool: only this thread (which steps) has opened parallel regions;
- two pools: a parked helper thread has run one tensor op with the same thread count and keeps
  its pool, as the building thread did before ``release_pool``.
The two states alternate every ``--steps`` steps (the helper releases and rebuilds its pool),
``--rounds`` times per concurrency. Reported: median [min-max] step ms per state, and
two pools / one pool (above 1: the extra pool costs that much). Usage:
  python -P benchmarks/openmp_pools.py [--concurrency 1 8 32] [--rounds 5] [--steps 10]
Last line: RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import add_step_args, start_batch, step_engine, stop_batch  # noqa: E402

from moeflow.engine.kernels.openmp import release_pool  # noqa: E402


class Helper:
    """A parked thread that opens (``hold``) or frees (``drop``) an OpenMP pool of its own."""

    def __init__(self, num_threads: int) -> None:
        self._orders: queue.Queue[str] = queue.Queue()
        self._done: queue.Queue[None] = queue.Queue()
        self._num_threads = num_threads
        threading.Thread(target=self._run, daemon=True, name="pool-helper").start()

    def _run(self) -> None:
        torch.set_num_threads(self._num_threads)
        while True:
            order = self._orders.get()
            if order == "hold":
                x = torch.randn(512, 512)
                torch.mm(x, x)  # a parallel region: this thread's pool now exists
            else:
                release_pool()
            self._done.put(None)

    def order(self, what: str) -> None:
        self._orders.put(what)
        self._done.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(parser, steps=10, rounds=5)
    args = parser.parse_args()
    new_tokens = 2 * args.rounds * (args.steps + 1) + 8  # every sequence decodes to the end
    engine = step_engine(args, new_tokens)
    helper = Helper(args.threads)
    rng = random.Random(0)
    result: dict[str, Any] = {"model": args.model, "threads": args.threads,
                              "per_step_ms": {}, "two_over_one": {}}
    for c in args.concurrency:
        start_batch(engine, c, args.prompt_tokens, new_tokens, rng)
        times: dict[str, list[float]] = {"one_pool": [], "two_pools": []}
        for round_index in range(args.rounds):
            order = list(times) if round_index % 2 == 0 else list(reversed(times))
            for state in order:
                helper.order("hold" if state == "two_pools" else "drop")
                engine.step()  # one untimed step after the switch
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    engine.step()
                times[state].append(1000 * (time.perf_counter() - t0) / args.steps)
        stop_batch(engine)
        cell = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                for k, v in times.items()}
        ratio = cell["two_pools"]["median"] / cell["one_pool"]["median"]
        result["per_step_ms"][f"c{c}"] = cell
        result["two_over_one"][f"c{c}"] = ratio
        line = ", ".join(f"{k} {v['median']:.1f} [{v['min']:.1f}-{v['max']:.1f}]"
                         for k, v in cell.items())
        print(f"c={c}: step ms {line}; two pools / one pool {ratio:.2f}x", file=sys.stderr,
              flush=True)
    helper.order("drop")
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
