"""MoE benchmark: attention/expert disaggregation vs colocated serving, and expert balancing.

Model: SmolLM2-135M-Instruct upcycled to 8 experts, top-2 (``moeflow models upcycle
smollm2-135m-instruct --experts 8 --top-k 2``; made here if missing, seeded, router std = the
model's initializer_range), float32. Every server is ``moeflow up`` on a free port.

1. Balance (``--mode ae --attention 1 --experts 4``, balancer off): a skewed workload (prompts
   of digits and code-like text, which the random router sends to a few experts) is served
   once on the initial round-robin placement; the measured imbalance is max/mean of the
   (token, expert) pairs each expert instance got (the attention instance's counters for the
   window). ``ExpertBalancer.rebalance`` then plans from the routed-token counts of that run
   (budget 4 extra replicas) and reconfigures live; the same workload runs again and the
   imbalance is measured the same way. Predicted before/after comes from the planner.
2. Exchange latency (from 1's second run and from the throughput runs): mean A2E (send start ->
   expert has the message) and E2A (expert starts its answer -> attention has it in hand, which
   includes any time the answer waited while the attention instance computed the other
   micro-batch) per MoE layer, from the attention instance's /v1/experts/stats (wall clocks of
   one host); and their *transfer* parts (from the later of the send and the receiver starting
   to wait, to the receiver having it: the exchange itself, without queueing).
3. Decode throughput at concurrency 8 and 32: ``colocated`` (one engine, 2 torch threads) vs
   ``split-shm`` (1 attention + 2 expert instances, 1 thread each; on 2 cores that is 3 threads:
   the split pays for its extra processes here; defaults, so decode steps of fewer than 2 x 64
   tokens run as one micro-batch), and ``split-shm-2mb`` (two micro-batches in every step:
   each micro-batch streams every hit expert's weights again, so at decode two micro-batches
   double the experts' memory traffic); ``split-ring`` and ``split-ring-2mb`` the same on
   shared-memory rings (``--ae-spin-us``, ``--spin-us`` here). c requests start together
   (32-token random prompts, 64 output tokens, ignore_eos, streamed); decode tok/s = tokens
   streamed while all c are decoding / that window. Configurations interleave for ``--rounds``
   rounds; medians and ranges are reported.

Run: ``python -P benchmarks/moe.py`` (``--rounds 1`` for a quick look). Last line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import wait_healthy  # noqa: E402
from pd import Platform, loadavg, running  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "moe.json"
MOEFLOW = [sys.executable, "-m", "moeflow.cli"]
MODEL = "smollm2-135m-instruct-moe8x2"
SERVED = "moe"
_ENGINE_LINE = re.compile(r"started engine \S+-(attention|expert|colocated)-(\d+) .* at (\S+)")


def ensure_model() -> None:
    listed = subprocess.run([*MOEFLOW, "models", "list"], capture_output=True, text=True,
                            check=True).stdout
    if MODEL not in listed:
        subprocess.run([*MOEFLOW, "models", "pull", "smollm2-135m-instruct"], check=True)
        subprocess.run([*MOEFLOW, "models", "upcycle", "smollm2-135m-instruct", "--experts", "8",
                        "--top-k", "2"], check=True)


def engine_urls(platform: Platform, role: str) -> list[str]:
    found = sorted((int(m.group(2)), m.group(3)) for m in
                   _ENGINE_LINE.finditer(platform.log_path.read_text(errors="replace"))
                   if m.group(1) == role)
    return [url for _, url in found]


async def start(platform: Platform) -> None:
    await wait_healthy(platform.url, 600, alive=platform.is_alive)


async def stream(client: httpx.AsyncClient, url: str, prompt: list[int] | str,
                 max_tokens: int) -> list[float]:
    """Timestamps (monotonic) of each streamed token chunk."""
    body = {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"choices":[{' in line:
                stamps.append(time.monotonic())
    return stamps


def steady_rate(streams: list[list[float]]) -> float:
    """Tokens per second while every stream is decoding (after the last first token, before
    the first last token); the whole span if that window is empty."""
    start = max(s[0] for s in streams)
    end = min(s[-1] for s in streams)
    if end - start < 0.5:
        start, end = min(s[0] for s in streams), max(s[-1] for s in streams)
        return sum(len(s) - 1 for s in streams) / (end - start)
    return sum(sum(1 for t in s if start < t <= end) for s in streams) / (end - start)


async def decode_rate(url: str, concurrency: int, seed: int) -> float:
    import random

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(32)] for _ in range(concurrency)]
    async with httpx.AsyncClient(timeout=600) as client:
        await stream(client, url, prompts[0][:8], 2)  # warm-up
        streams = await asyncio.gather(*(stream(client, url, p, 64) for p in prompts))
    return steady_rate(streams)


def skewed_prompts() -> list[str]:
    """Long runs of one repeated token: near-identical hidden states, so the router sends
    them to the same few experts (a skewed workload by construction)."""
    return [" ".join([word] * 200) for word in ("7", "the", "7", "0", "the", "7", "x", "7")]


async def attention_stats(url: str) -> dict[str, Any]:
    from moeflow.web.internal_auth import internal_headers, token_from_env

    async with httpx.AsyncClient(timeout=10, headers=internal_headers(token_from_env())) as client:
        response = await client.get(f"{url}/v1/experts/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


def window_imbalance(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, list[int]]:
    pairs = [b - a for a, b in zip(before["pairs_per_instance"], after["pairs_per_instance"],
                                   strict=True)]
    mean = sum(pairs) / len(pairs)
    return (max(pairs) / mean if mean else 1.0), pairs


async def balance_phase(log_dir: Path) -> dict[str, Any]:
    from moeflow.engine import eplb
    from moeflow.engine.ae.balancer import ExpertBalancer

    platform = Platform("ae-balance", MODEL, ["--served-model-name", SERVED, "--mode", "ae",
                                              "--attention", "1", "--experts", "4",
                                              "--rebalance-interval-s", "0",
                                              # the second run must redo the first's work, not
                                              # read its prompts from the prefix cache
                                              "--no-prefix-caching"], log_dir)
    out: dict[str, Any] = {}
    with running(platform):
        await start(platform)
        [attention] = engine_urls(platform, "attention")
        balancer = ExpertBalancer([attention], engine_urls(platform, "expert"), 8, budget=4)
        try:
            routed: list[int] = []

            async def run_workload() -> tuple[float, list[int]]:
                first = await attention_stats(attention)
                async with httpx.AsyncClient(timeout=600) as client:
                    await asyncio.gather(*(stream(client, platform.url, p, 8)
                                           for p in skewed_prompts()))
                last = await attention_stats(attention)
                routed[:] = [b - a for a, b in zip(first["routed_tokens_per_expert"],
                                                   last["routed_tokens_per_expert"], strict=True)]
                return window_imbalance(first, last)

            await asyncio.to_thread(balancer.reset_window)  # plan from the skewed run only
            out["imbalance_before"], out["pairs_before"] = await run_workload()
            report = await asyncio.to_thread(balancer.rebalance, force=True)
            out["predicted_before"] = round(report.predicted_imbalance_before, 3)
            out["predicted_after"] = round(report.predicted_imbalance_after, 3)
            out["placement_after"] = report.hosted
            out["imbalance_after"], out["pairs_after"] = await run_workload()
            # what the planner's placement predicts for the routing the second run really had
            # (equal to predicted_after when the runs route alike): the split's own error
            hosted = [list(h) for h in report.hosted]
            placed = eplb.placement_of(hosted, 8, max(len(h) for h in hosted))
            out["predicted_for_second_run"] = round(
                eplb.imbalance_ratio(eplb.instance_loads(placed, routed)), 3)
            stats = await attention_stats(attention)
            for key in ("a2e", "e2a", "a2e_transfer", "e2a_transfer"):
                out[f"{key}_ms_per_layer"] = [round(v, 3) for v in stats[f"{key}_ms_per_layer"]]
            out["expert_compute_ms_per_layer"] = [
                round(v, 3) for v in stats["expert_compute_ms_per_layer"]]
        finally:
            balancer.close()
    return out


async def throughput_phase(rounds: int, log_dir: Path, spin_us: int,
                           only: list[str] | None = None) -> dict[str, Any]:
    ring = ["--ae-spin-us", str(spin_us)]
    configs = {
        "colocated": ["--num-threads", "2"],
        "split-shm": ["--mode", "ae", "--attention", "1", "--experts", "2",
                      "--rebalance-interval-s", "0", "--num-threads", "1"],
        "split-shm-2mb": ["--mode", "ae", "--attention", "1", "--experts", "2",
                          "--rebalance-interval-s", "0", "--num-threads", "1",
                          "--micro-batch-min-tokens", "1"],
        "split-ring": ["--mode", "ae", "--attention", "1", "--experts", "2",
                       "--rebalance-interval-s", "0", "--num-threads", "1", *ring],
        "split-ring-2mb": ["--mode", "ae", "--attention", "1", "--experts", "2",
                           "--rebalance-interval-s", "0", "--num-threads", "1",
                           "--micro-batch-min-tokens", "1", *ring],
    }
    if only:
        configs = {name: configs[name] for name in ["colocated", *only]}
    rates: dict[str, dict[int, list[float]]] = {n: {8: [], 32: []} for n in configs}
    latency: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        for name, extra in configs.items():
            platform = Platform(name, MODEL, ["--served-model-name", SERVED, *extra], log_dir)
            with running(platform):
                await start(platform)
                for c in (8, 32):
                    rate = await decode_rate(platform.url, c, seed=r * 100 + c)
                    rates[name][c].append(rate)
                    print(f"[moe] round {r} {name} c{c}: {rate:.1f} tok/s (load {loadavg()})",
                          file=sys.stderr)
                if name.endswith("2mb"):
                    [attention] = engine_urls(platform, "attention")
                    stats = await attention_stats(attention)
                    latency.setdefault(name, []).append(
                        {k: stats[k] for k in ("a2e_ms_per_layer", "e2a_ms_per_layer",
                                               "a2e_transfer_ms_per_layer",
                                               "e2a_transfer_ms_per_layer")})
    out: dict[str, Any] = {}
    for c in (8, 32):
        for name in configs:
            values = rates[name][c]
            out[f"{name}_c{c}_tok_s"] = {"median": round(statistics.median(values), 1),
                                         "min": round(min(values), 1),
                                         "max": round(max(values), 1)}
        for split in (n for n in configs if n != "colocated"):
            ratios = [s / b for s, b in zip(rates[split][c], rates["colocated"][c],
                                            strict=True)]
            key = f"{split.replace('-', '_')}_over_colocated_c{c}"
            out[key] = {"median": round(statistics.median(ratios), 3),
                        "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    for name, runs in latency.items():  # per MoE layer: the median over rounds
        for key in ("a2e", "e2a", "a2e_transfer", "e2a_transfer"):
            per_layer = [statistics.median(v) for v in
                         zip(*(run[f"{key}_ms_per_layer"] for run in runs), strict=True)]
            out[f"{name}_decode_{key}_ms_per_layer"] = [round(v, 3) for v in per_layer]
            out[f"{name}_decode_{key}_ms_median"] = round(statistics.median(per_layer), 3)
            print(f"[moe] {name} {key} per MoE layer: median {statistics.median(per_layer):.2f} "
                  f"ms", file=sys.stderr)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-balance", action="store_true")
    parser.add_argument("--spin-us", type=int, default=500,
                        help="--ae-spin-us of the split-ring configurations")
    parser.add_argument("--only", nargs="*", help="split configurations to run (beside "
                        "colocated): split-shm split-shm-2mb split-ring split-ring-2mb")
    args = parser.parse_args()
    # One internal token for every platform started here (moeflow up reads it, as does the
    # in-process balancer and the stats reads): the instances' control routes need it.
    os.environ.setdefault("MOEFLOW_INTERNAL_TOKEN", secrets.token_urlsafe(32))
    ensure_model()
    log_dir = Path(tempfile.mkdtemp(prefix="moe-bench-"))
    started = time.monotonic()
    result: dict[str, Any] = {"model": MODEL, "rounds": args.rounds, "load_start": loadavg()}
    if not args.skip_balance:
        result["balance"] = b = await balance_phase(log_dir)
        print(f"[moe] imbalance {b['imbalance_before']:.2f} -> {b['imbalance_after']:.2f} "
              f"(predicted {b['predicted_before']} -> {b['predicted_after']}; for the second "
              f"run's routing {b['predicted_for_second_run']})", file=sys.stderr)
    if not args.skip_throughput:
        result["throughput"] = await throughput_phase(args.rounds, log_dir, args.spin_us,
                                                      args.only)
    result["load_end"] = loadavg()
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["command"] = "python -P benchmarks/moe.py " + " ".join(sys.argv[1:])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
