"""PD benchmark: prefill/decode disaggregation vs colocated serving, same cores, same requests.

Configurations (each started here as ``moeflow up`` on a free port, stopped with SIGINT):
- ``colocated``: 2 colocated instances, 1 torch thread each;
- ``split-shm``: 1 prefill + 1 decode instance, 1 thread each, KV over shared memory;
- ``split-redis``: the same over a private Redis (``--transport redis``; only with ``--configs``).
The split configurations' gateway places each request (gateway/routing.py): short prompts are
computed on the decode instance itself, long ones split unless the prefill queue is too long
(``--pd-min-prompt-tokens``, ``--pd-interference-weight`` pass through to it).
On this 2-core box every configuration gets the same 2 engine cores (the gateway, Redis and this
client share them), so PD cannot add capacity here: what it can show is *interference
isolation* (decode steps no longer wait behind long prefill chunks) and what the KV hop costs.
Configurations run interleaved (colocated, split-shm, colocated, ...) for ``--rounds`` rounds;
every round of every configuration gets the identical request lists.

Workload (open loop; docs/benchmarks.md, "Method"): Poisson arrivals at ``--rate``
requests/s (fixed seed, bounded by ``--duration`` seconds and ``--max-requests``); every
``--prompt-heavy-every``-th arrival is *prompt-heavy* (1000-1500 random prompt tokens, 8 output
tokens), the rest are *decode-heavy* (16-64 prompt tokens, 64-128 output tokens): the
*interference* mix. The *decode-only* mix (``--mixes``) has decode-heavy requests alone at
``--decode-only-rate`` (default ``--rate``): what PD must not make worse. Each platform start
serves the mixes in turn, each measured on its own (metrics scraped around it). Prompts are
random token ids sent to ``/v1/completions`` (exact prompt lengths, no prefix-cache hits),
``ignore_eos`` makes output lengths exact, and token counts come from the streamed ``usage``.
Per request: TTFT, TPOT = (E2E - TTFT)/(n_out - 1), ITL, E2E (vLLM definitions, see
benchmarks/loadgen.py). Before the load, each server gets one short warm-up request; in the first
round each configuration also serves one unloaded request of each class (the numbers the SLO is
judged against, and the unloaded cost of the KV hop).

SLO (per class; goodput = requests meeting their class's SLO / run duration; failures are misses).
Single requests on an otherwise idle server (1 thread, SmolLM2-135M, this box; the "unloaded"
numbers of three runs) measured: decode-heavy (40 in / 96 out) TTFT 0.19-0.30 s and TPOT
40-53 ms; prompt-heavy (1250 in) TTFT 4.6-6.4 s (with other jobs loading the box harder:
0.27-0.5 s, 48-76 ms and 6.3-11.8 s). Hence:
- decode-heavy: TTFT <= 2 s (the common "human" bound; ~10x idle, so room for about one
  512-token prefill chunk ahead of it) and TPOT <= 150 ms (3x idle;
  >= 6.7 tokens/s per user);
- prompt-heavy: TTFT <= 15 s (2.3-3.3x idle; no TPOT bound for 8 tokens).
The bounds are flags (``--slo-*``) and the unloaded numbers of this run are in the output, so the
choice can be re-judged.

KV metrics of the split runs are scraped from the gateway's /metrics before and after the load
(differences, so warm-up is excluded): ``moeflow_kv_transfer_bytes``,
``moeflow_kv_transfer_seconds`` (XCCL time: the prefill's send + the decode's receive and copy)
and ``moeflow_kv_transfer_ttft_ratio``. From their sums: bytes and milliseconds per request, GB/s,
and KV-transfer efficiency = that GB/s / one-core memcpy GB/s at the same size, measured here
(targets: >= 0.5 for shm, >= 0.1 for Redis). Per-request quantiles come from
the histogram buckets and are coarse below 5 ms.

Noise: the box is shared. Before each cell the script waits (at most ``--quiet-wait-s``) for other
processes to use fewer than ``--quiet-cores`` cores, and it records, from /proc, the cores used by
the platform, by this client and by everything else during the load; a cell where everything else
used more than 0.5 core is marked ``noisy`` (kept, but say so when quoting it).

Usage:
    .venv/bin/python -P benchmarks/pd.py                # SmolLM2-135M, 2 rounds, ~12 min
    .venv/bin/python -P benchmarks/pd.py --quick        # tiny random model, 1 round, ~2 min
Last line: RESULT {json}, led by ``goal``: per mix, split/colocated ratios of goodput,
decode-heavy TTFT p50, ITL p99 and TPOT p50/p99 as [median, min, max] over rounds; it also
records each cell's load average. The same JSON plus per-cell and per-request details goes to
benchmarks/results/pd.json (pd-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import (  # noqa: E402
    RequestResult,
    RequestSpec,
    RunOutput,
    Sample,
    Slo,
    bucket_delta,
    histogram_buckets,
    histogram_quantile,
    metric_total,
    poisson_arrivals,
    random_token_prompt,
    run_open_loop,
    scrape,
    send_streaming,
    summarize,
    wait_healthy,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "pd.json"
MOEFLOW = [sys.executable, "-m", "moeflow.cli"]
DECODE_HEAVY = "decode_heavy"
PROMPT_HEAVY = "prompt_heavy"
CLASSES = (DECODE_HEAVY, PROMPT_HEAVY)
INTERFERENCE = "interference"
DECODE_ONLY = "decode_only"
MIXES = (INTERFERENCE, DECODE_ONLY)
CONFIGS: dict[str, list[str]] = {
    "colocated": ["--instances", "2"],
    "split-shm": ["--mode", "pd", "--prefill", "1", "--decode", "1", "--transport", "shm"],
    "split-redis": ["--mode", "pd", "--prefill", "1", "--decode", "1", "--transport", "redis"],
}
NUM_INSTANCES = 2
NOISY_CORES = 0.5
CORES_NOTE = (
    "2-core machine: split = 1 prefill + 1 decode instance, colocated = 2 colocated instances, "
    "each instance 1 torch thread, so both use the same 2 engine cores (gateway, redis and the "
    "client share them). PD cannot add capacity here; it can only isolate decode from prefill "
    "interference, at the cost of the KV hop and of a fixed 1:1 prefill:decode core split."
)


@dataclass(frozen=True)
class Workload:
    rate_rps: float
    duration_s: float
    max_requests: int
    prompt_heavy_every: int
    decode_prompt_tokens: tuple[int, int]
    decode_output_tokens: tuple[int, int]
    prompt_heavy_prompt_tokens: tuple[int, int]
    prompt_heavy_output_tokens: int
    seed: int


def build_specs(w: Workload, token_range: tuple[int, int], seed: int) -> list[RequestSpec]:
    """The request list: same seed -> same arrivals, classes, prompts and lengths."""
    rng = random.Random(seed)
    arrivals = poisson_arrivals(w.rate_rps, w.max_requests, rng, max_duration_s=w.duration_s)
    specs: list[RequestSpec] = []
    for i, arrival in enumerate(arrivals):
        if w.prompt_heavy_every > 0 and i % w.prompt_heavy_every == w.prompt_heavy_every // 2:
            n_in = rng.randint(*w.prompt_heavy_prompt_tokens)
            label, n_out = PROMPT_HEAVY, w.prompt_heavy_output_tokens
        else:
            n_in = rng.randint(*w.decode_prompt_tokens)
            label, n_out = DECODE_HEAVY, rng.randint(*w.decode_output_tokens)
        prompt = random_token_prompt(rng, n_in, *token_range)
        specs.append(RequestSpec(i, label, prompt, n_out, arrival))
    return specs


# -- the platform under test ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Platform:
    """``moeflow up`` as a child process (own session); ``stop`` always ends it."""

    def __init__(self, name: str, model: str, extra: list[str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.argv = [*MOEFLOW, "up", "--model", model, "--port", str(self.port),
                     "--num-threads", "1", *extra]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                start_new_session=True,
            )

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGINT (moeflow up's Ctrl-C path), then SIGTERM, then SIGKILL to its group."""
        p = self.process
        if p is None:
            return None
        for sig, wait_s in ((signal.SIGINT, 30.0), (signal.SIGTERM, 15.0)):
            if p.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=wait_s)
        if p.poll() is None:
            print(f"[pd] {self.name} ignored SIGINT/SIGTERM: killing its group", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return p.returncode

    def log_tail(self, num_lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def running(platform_: Platform) -> Iterator[Platform]:
    platform_.start()
    try:
        yield platform_
    finally:
        code = platform_.stop()
        if code not in (0, None):
            print(f"[pd] {platform_.name} exited with {code}; log {platform_.log_path}",
                  file=sys.stderr)


def config_argv(config: str, args: argparse.Namespace) -> list[str]:
    """``moeflow up`` flags of a configuration, with the PD placement flags for split ones."""
    extra = list(CONFIGS[config])
    if config != "colocated":
        for flag, value in (("--pd-min-prompt-tokens", args.pd_min_prompt_tokens),
                            ("--pd-interference-weight", args.pd_interference_weight)):
            if value is not None:
                extra += [flag, str(value)]
    return extra


# -- one cell: one configuration, one round -------------------------------------------------------


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: the whole machine (busy), one session (the platform's: ``pgid`` is
    its leader's id), and this process."""

    at_s: float
    machine_busy_s: float
    group_s: float
    client_s: float


def cpu_snapshot(pgid: int | None) -> CpuSnapshot:
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    group_ticks = 0
    if pgid is not None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # session, not process group: `moeflow up` (a session leader here) starts each
            # engine in a process group of its own; utime and stime follow at 11 and 12
            if int(rest[3]) == pgid:
                group_ticks += int(rest[11]) + int(rest[12])
    me = os.times()
    return CpuSnapshot(time.perf_counter(), (sum(fields) - idle) / tick, group_ticks / tick,
                       me.user + me.system)


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Average cores busy between two snapshots: ours (platform), this client, everyone else.
    (The group's exited children are not counted, so ``others`` is an upper bound.)"""
    dt = max(after.at_s - before.at_s, 1e-9)
    busy = (after.machine_busy_s - before.machine_busy_s) / dt
    ours = (after.group_s - before.group_s) / dt
    client = (after.client_s - before.client_s) / dt
    others = max(0.0, busy - ours - client)
    return {"machine_cores": round(busy, 2), "platform_cores": round(ours, 2),
            "client_cores": round(client, 2), "others_cores": round(others, 2)}


async def background_cores(seconds: float = 1.0) -> float:
    """Cores busy with other work right now (nothing of ours is running)."""
    before = cpu_snapshot(None)
    await asyncio.sleep(seconds)
    return cpu_usage(before, cpu_snapshot(None))["others_cores"]


async def wait_quiet(limit_cores: float, max_wait_s: float) -> float:
    """Wait up to ``max_wait_s`` for other processes to use less than ``limit_cores``; returns
    the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = await background_cores()
    while busy > limit_cores and time.monotonic() < deadline:
        busy = await background_cores(2.0)
    return busy


def class_slo(args: argparse.Namespace) -> dict[str, Slo]:
    return {
        DECODE_HEAVY: Slo(ttft_s=args.slo_decode_ttft_s, tpot_s=args.slo_decode_tpot_ms / 1000),
        PROMPT_HEAVY: Slo(ttft_s=args.slo_prompt_ttft_s),
    }


def _one_request_numbers(r: RequestResult) -> dict[str, Any]:
    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000 * x, 2)

    return {"ok": r.ok, "error": r.error, "ttft_ms": ms(r.ttft_s), "tpot_ms": ms(r.tpot_s),
            "e2e_ms": ms(r.e2e_s), "prompt_tokens": r.num_prompt_tokens,
            "output_tokens": r.num_output_tokens}


async def unloaded(
    url: str, model: str, w: Workload, token_range: tuple[int, int], *, calibrate: bool
) -> dict[str, Any]:
    """A warm-up request, then (``calibrate``) one unloaded request of each class, one at a time.
    Prompts differ from the load's (another seed)."""
    rng = random.Random(w.seed + 1000)

    def mid(bounds: tuple[int, int]) -> int:
        return (bounds[0] + bounds[1]) // 2

    short = random_token_prompt(rng, w.decode_prompt_tokens[0], *token_range)
    specs = [RequestSpec(-1, "warmup", short, 8)]
    if calibrate:  # the mean lengths of each class
        specs += [
            RequestSpec(-2, DECODE_HEAVY,
                        random_token_prompt(rng, mid(w.decode_prompt_tokens), *token_range),
                        mid(w.decode_output_tokens)),
            RequestSpec(-3, PROMPT_HEAVY,
                        random_token_prompt(rng, mid(w.prompt_heavy_prompt_tokens), *token_range),
                        w.prompt_heavy_output_tokens),
        ]
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=300.0) as client:
        for spec in specs:
            r = await send_streaming(client, f"{url}/v1/completions", model, spec, timeout_s=300)
            out[spec.label] = _one_request_numbers(r)
    return out


def kv_delta(before: list[Sample], after: list[Sample]) -> dict[str, Any]:
    """What the gateway's KV-transfer histograms observed between two scrapes."""

    def delta(name: str) -> tuple[float, float]:
        return (metric_total(after, f"{name}_sum") - metric_total(before, f"{name}_sum"),
                metric_total(after, f"{name}_count") - metric_total(before, f"{name}_count"))

    def q(name: str, quantile: float) -> float | None:
        buckets = bucket_delta(histogram_buckets(after, name), histogram_buckets(before, name))
        return histogram_quantile(buckets, quantile)

    bytes_sum, bytes_n = delta("moeflow_kv_transfer_bytes")
    secs_sum, secs_n = delta("moeflow_kv_transfer_seconds")
    share_sum, share_n = delta("moeflow_kv_transfer_ttft_ratio")
    p50_s = q("moeflow_kv_transfer_seconds", 0.5)
    p99_s = q("moeflow_kv_transfer_seconds", 0.99)
    return {
        "num_transfers": int(bytes_n),
        "bytes_total": int(bytes_sum),
        "bytes_per_request_mean": bytes_sum / bytes_n if bytes_n else None,
        "seconds_mean_ms": 1000 * secs_sum / secs_n if secs_n else None,
        "seconds_p50_ms": None if p50_s is None else 1000 * p50_s,
        "seconds_p99_ms": None if p99_s is None else 1000 * p99_s,
        "gb_per_s": bytes_sum / secs_sum / 1e9 if secs_sum > 0 else None,
        "ttft_share_mean": share_sum / share_n if share_n else None,
        "ttft_share_p50": q("moeflow_kv_transfer_ttft_ratio", 0.5),
    }


def by_mode_delta(before: list[Sample], after: list[Sample]) -> dict[str, int]:
    name = "moeflow_requests_by_mode_total"
    return {mode: int(metric_total(after, name, mode=mode) - metric_total(before, name, mode=mode))
            for mode in ("colocated", "split")}


def interference(results: list[RequestResult]) -> dict[str, Any]:
    """Decode-heavy requests split by whether a prompt-heavy prefill (its send -> its first
    token) overlapped their decode phase (TPOT) or was running when they were sent (TTFT).
    Interference shows as overlapped >> clean; isolation as overlapped ~= clean. (Colocated:
    the prefill may have run on the other instance, which dilutes the effect.)"""
    prefills = [(r.sent_s, r.sent_s + r.ttft_s) for r in results
                if r.label == PROMPT_HEAVY and r.ttft_s is not None]
    decodes = [r for r in results if r.label == DECODE_HEAVY and r.ok and r.ttft_s is not None
               and r.e2e_s is not None]

    def overlaps(start: float, end: float) -> bool:
        return any(a < end and start < b for a, b in prefills)

    def p50_ms(values: list[float]) -> float | None:
        return None if not values else round(1000 * statistics.median(values), 1)

    tpot_hit: list[float] = []
    tpot_clean: list[float] = []
    ttft_hit: list[float] = []
    ttft_clean: list[float] = []
    for r in decodes:
        assert r.ttft_s is not None and r.e2e_s is not None
        tpot = r.tpot_s
        if tpot is not None:
            hit = overlaps(r.sent_s + r.ttft_s, r.sent_s + r.e2e_s)
            (tpot_hit if hit else tpot_clean).append(tpot)
        (ttft_hit if overlaps(r.sent_s, r.sent_s + 1e-6) else ttft_clean).append(r.ttft_s)
    return {"tpot_p50_ms_prefill_overlapped": p50_ms(tpot_hit), "n_overlapped": len(tpot_hit),
            "tpot_p50_ms_clean": p50_ms(tpot_clean), "n_clean": len(tpot_clean),
            "ttft_p50_ms_sent_during_prefill": p50_ms(ttft_hit), "n_sent_during": len(ttft_hit),
            "ttft_p50_ms_sent_otherwise": p50_ms(ttft_clean), "n_sent_otherwise": len(ttft_clean)}


def analyse(
    run: RunOutput, before: list[Sample], after: list[Sample], slos: dict[str, Slo], *,
    with_kv: bool,
) -> dict[str, Any]:
    results = run.results
    good = sum(1 for r in results if slos[r.label].is_met(r))
    dur = max(run.duration_s, 1e-9)
    overall = summarize(results, run.duration_s)
    overall.update(num_good=good, slo_attainment=good / len(results) if results else None,
                   goodput_rps=good / dur, num_not_sent=run.num_not_sent)

    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000 * x, 1)

    return {
        "overall": overall,
        "interference": interference(results),
        "classes": {c: summarize([r for r in results if r.label == c], run.duration_s, slos[c])
                    for c in CLASSES},
        "by_mode": by_mode_delta(before, after),
        "kv": kv_delta(before, after) if with_kv else None,
        "failures": [{"index": r.index, "label": r.label, "sent_s": round(r.sent_s, 3),
                      "error": r.error} for r in results if not r.ok][:20],
        "usage_mismatches": [{"index": r.index, "expected_out": r.expected_output_tokens,
                              "usage_out": r.num_output_tokens, "chunks": r.num_chunks,
                              "expected_in": r.expected_prompt_tokens,
                              "usage_in": r.num_prompt_tokens}
                             for r in results if r.ok and r.usage_mismatch][:20],
        "requests": [{"i": r.index, "cls": r.label, "sent_s": round(r.sent_s, 3), "ok": r.ok,
                      "ttft_ms": ms(r.ttft_s), "tpot_ms": ms(r.tpot_s), "e2e_ms": ms(r.e2e_s),
                      "n_in": r.num_prompt_tokens, "n_out": r.num_output_tokens,
                      "good": slos[r.label].is_met(r)} for r in results],
    }


async def run_cell(
    config: str, round_index: int, args: argparse.Namespace,
    mixes: dict[str, tuple[Workload, list[RequestSpec]]], token_range: tuple[int, int],
    log_dir: Path,
) -> list[dict[str, Any]]:
    """One platform start of ``config``; each mix's load in turn on it (one cell per mix)."""
    shared: dict[str, Any] = {"config": config, "round": round_index}
    slos = class_slo(args)
    platform_ = Platform(config, args.model, config_argv(config, args), log_dir)
    print(f"[pd] round {round_index} {config}: starting ({' '.join(platform_.argv[2:])})",
          file=sys.stderr)
    cells: list[dict[str, Any]] = []
    first_w = next(iter(mixes.values()))[0]
    with running(platform_):
        try:
            started = time.perf_counter()
            await wait_healthy(platform_.url, args.startup_timeout_s,
                               min_instances=NUM_INSTANCES, alive=platform_.is_alive)
            shared["startup_s"] = round(time.perf_counter() - started, 2)
            shared["unloaded"] = await unloaded(platform_.url, args.served_name, first_w,
                                                token_range, calibrate=round_index == 0)
        except Exception as exc:  # a broken start is reported, never ends the run
            error = f"{type(exc).__name__}: {exc}"
            print(f"[pd] {config} failed: {error}\n{platform_.log_tail()}", file=sys.stderr)
            return [{**shared, "mix": mix, "ok": False, "error": error,
                     "log_tail": platform_.log_tail()} for mix in mixes]
        for mix, (w, specs) in mixes.items():
            cells.append(await _run_mix(platform_, {**shared, "mix": mix}, args, w, specs,
                                        slos))
    return cells


async def _run_mix(
    platform_: Platform, cell: dict[str, Any], args: argparse.Namespace, w: Workload,
    specs: list[RequestSpec], slos: dict[str, Slo],
) -> dict[str, Any]:
    cell.update(ok=False, error=None)
    config, mix, round_index = cell["config"], cell["mix"], cell["round"]
    cell["others_cores_before"] = await wait_quiet(args.quiet_cores, args.quiet_wait_s)
    cell["loadavg_before"] = loadavg()
    try:
        pgid = platform_.process.pid if platform_.process else None
        async with httpx.AsyncClient() as client:
            before = await scrape(client, f"{platform_.url}/metrics")
            cpu_before = cpu_snapshot(pgid)
            run = await run_open_loop(
                f"{platform_.url}/v1", args.served_name, specs,
                request_timeout_s=args.request_timeout_s, send_deadline_s=w.duration_s,
                drain_timeout_s=args.drain_timeout_s,
            )
            cell["cpu_during_load"] = cpu_usage(cpu_before, cpu_snapshot(pgid))
            cell["noisy"] = cell["cpu_during_load"]["others_cores"] > NOISY_CORES
            after = await scrape(client, f"{platform_.url}/metrics")
        cell["loadavg_after"] = loadavg()
        cell["server_alive_after"] = platform_.is_alive()
    except Exception as exc:  # a broken cell is reported, never ends the run
        cell["error"] = f"{type(exc).__name__}: {exc}"
        cell["log_tail"] = platform_.log_tail()
        print(f"[pd] {config} {mix} failed: {cell['error']}\n{cell['log_tail']}",
              file=sys.stderr)
        return cell
    try:
        cell.update(analyse(run, before, after, slos, with_kv=config != "colocated"), ok=True)
    except Exception as exc:  # a bug in the analysis must not lose the other cells
        cell["error"] = f"analysis failed: {type(exc).__name__}: {exc}"
        print(f"[pd] {config} {mix}: {cell['error']}", file=sys.stderr)
        return cell
    overall = cell["overall"]
    dh, ph = cell["classes"][DECODE_HEAVY], cell["classes"][PROMPT_HEAVY]
    print(f"[pd] round {round_index} {config} {mix}: {overall['num_ok']}/"
          f"{overall['num_requests']} ok, goodput {overall['goodput_rps']:.3f} rps "
          f"({overall['num_good']} good), by mode {cell['by_mode']}, "
          f"decode-heavy TTFT p50/p99 {dh['ttft_ms']['p50']}/{dh['ttft_ms']['p99']} ms "
          f"TPOT p50/p99 {dh['tpot_ms']['p50']}/{dh['tpot_ms']['p99']} ms, "
          f"prompt-heavy TTFT p50/p99 {ph['ttft_ms']['p50']}/{ph['ttft_ms']['p99']} ms, "
          f"{overall['output_tok_s']:.1f} out tok/s; load avg {cell['loadavg_before']} -> "
          f"{cell['loadavg_after']}; cores busy {cell['cpu_during_load']}", file=sys.stderr)
    return cell


# -- aggregation ----------------------------------------------------------------------------------

Getter = Callable[[dict[str, Any]], float | None]


def _get(*path: str) -> Getter:
    def get(cell: dict[str, Any]) -> float | None:
        node: Any = cell
        for key in path:
            if not isinstance(node, dict) or node.get(key) is None:
                return None
            node = node[key]
        return float(node) if isinstance(node, int | float) else None

    return get


HEADLINE: dict[str, Getter] = {
    "decode_heavy_ttft_p50_ms": _get("classes", DECODE_HEAVY, "ttft_ms", "p50"),
    "decode_heavy_ttft_p99_ms": _get("classes", DECODE_HEAVY, "ttft_ms", "p99"),
    "decode_heavy_tpot_p50_ms": _get("classes", DECODE_HEAVY, "tpot_ms", "p50"),
    "decode_heavy_tpot_p99_ms": _get("classes", DECODE_HEAVY, "tpot_ms", "p99"),
    "decode_heavy_itl_p99_ms": _get("classes", DECODE_HEAVY, "itl_ms", "p99"),
    "decode_heavy_e2e_p50_ms": _get("classes", DECODE_HEAVY, "e2e_ms", "p50"),
    "decode_heavy_slo_attainment": _get("classes", DECODE_HEAVY, "slo_attainment"),
    "decode_heavy_tpot_p50_ms_prefill_overlapped": _get(
        "interference", "tpot_p50_ms_prefill_overlapped"),
    "decode_heavy_tpot_p50_ms_clean": _get("interference", "tpot_p50_ms_clean"),
    "decode_heavy_ttft_p50_ms_sent_during_prefill": _get(
        "interference", "ttft_p50_ms_sent_during_prefill"),
    "decode_heavy_ttft_p50_ms_sent_otherwise": _get("interference", "ttft_p50_ms_sent_otherwise"),
    "prompt_heavy_ttft_p50_ms": _get("classes", PROMPT_HEAVY, "ttft_ms", "p50"),
    "prompt_heavy_ttft_p99_ms": _get("classes", PROMPT_HEAVY, "ttft_ms", "p99"),
    "prompt_heavy_tpot_p50_ms": _get("classes", PROMPT_HEAVY, "tpot_ms", "p50"),
    "prompt_heavy_tpot_p99_ms": _get("classes", PROMPT_HEAVY, "tpot_ms", "p99"),
    "prompt_heavy_slo_attainment": _get("classes", PROMPT_HEAVY, "slo_attainment"),
    "goodput_rps": _get("overall", "goodput_rps"),
    "slo_attainment": _get("overall", "slo_attainment"),
    "request_throughput_rps": _get("overall", "request_throughput_rps"),
    "output_tok_s": _get("overall", "output_tok_s"),
    "total_tok_s": _get("overall", "total_tok_s"),
    "num_failed": _get("overall", "num_failed"),
    "num_usage_mismatch": _get("overall", "num_usage_mismatch"),
    "num_split": _get("by_mode", "split"),
    "num_local": _get("by_mode", "colocated"),
    "loadavg_before": _get("loadavg_before"),
    "loadavg_after": _get("loadavg_after"),
    "kv_bytes_per_request_mean": _get("kv", "bytes_per_request_mean"),
    "kv_seconds_mean_ms": _get("kv", "seconds_mean_ms"),
    "kv_seconds_p99_ms": _get("kv", "seconds_p99_ms"),
    "kv_gb_per_s": _get("kv", "gb_per_s"),
    "kv_ttft_share_mean": _get("kv", "ttft_share_mean"),
    "kv_ttft_share_p50": _get("kv", "ttft_share_p50"),
}
RATIO_METRICS = [k for k in HEADLINE
                 if not k.startswith(("kv_", "num_", "loadavg_"))]
UNLOADED: dict[str, Getter] = {
    f"{c}_{m}": _get("unloaded", c, m) for c in CLASSES for m in ("ttft_ms", "tpot_ms", "e2e_ms")
}


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def _cell_value(cells: list[dict[str, Any]], get: Getter, config: str, mix: str,
                round_index: int) -> float | None:
    return next((get(c) for c in cells if c["config"] == config and c["mix"] == mix
                 and c["round"] == round_index), None)


def aggregate(cells: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Per mix and configuration, the median [min, max] over rounds; ratios split/colocated
    per round (same mix, same round), then their median [min, max]."""
    ok = [c for c in cells if c.get("ok")]
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    ratios: dict[str, dict[str, dict[str, Any]]] = {}
    for mix in dict.fromkeys(c["mix"] for c in cells):
        summary[mix], ratios[mix] = {}, {}
        for config in CONFIGS:
            mine = [c for c in ok if c["config"] == config and c["mix"] == mix]
            if not mine:
                continue
            summary[mix][config] = {"rounds_ok": len(mine),
                                    "noisy_rounds": sum(1 for c in mine if c.get("noisy"))}
            for name, get in HEADLINE.items():
                s = spread([v for v in map(get, mine) if v is not None])
                if s is not None:
                    summary[mix][config][name] = s
            first = next((c for c in mine if c.get("unloaded", {}).get(PROMPT_HEAVY)), None)
            numbers = {name: get(first) for name, get in UNLOADED.items()} if first else {}
            summary[mix][config]["unloaded"] = {k: v for k, v in numbers.items()
                                                if v is not None}
        for config in CONFIGS:
            if config == "colocated" or config not in summary[mix]:
                continue
            pair = ratios[mix][f"{config}/colocated"] = {}
            for name in RATIO_METRICS:
                get = HEADLINE[name]
                per_round: list[float] = []
                for r in range(rounds):
                    base = _cell_value(ok, get, "colocated", mix, r)
                    mine_v = _cell_value(ok, get, config, mix, r)
                    if base is not None and mine_v is not None and base > 0:
                        per_round.append(mine_v / base)
                s = spread(per_round)
                if s is not None:
                    s["crosses_1"] = s["min"] <= 1.0 <= s["max"]
                    pair[name] = s
    return {"summary": summary, "ratios": ratios}


# -- machine facts --------------------------------------------------------------------------------


def memcpy_gbps(num_bytes: int, repeats: int = 5) -> float:
    """One-core copy bandwidth at this size: the physical floor for moving KV once."""
    src = np.ones(max(num_bytes // 4, 1), dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best / 1e9


def model_vocab_size(model: str) -> int | None:
    from moeflow.checkpoints.store import resolve_home, resolve_model

    try:
        config = json.loads((resolve_model(model, resolve_home(os.environ)) / "config.json")
                            .read_text())
        return int(config["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_tiny(model: str) -> None:
    """``--quick``: make the tiny random llama once if it is not cached."""
    if model_vocab_size(model) is not None:
        return
    print(f"[pd] making {model} (moeflow models make-tiny --arch llama)", file=sys.stderr)
    subprocess.run([*MOEFLOW, "models", "make-tiny", "--arch", "llama"], check=True, cwd=REPO)


def machine_facts() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default=None, help="default smollm2-135m-instruct (tiny-llama "
                   "with --quick)")
    p.add_argument("--served-name", default=None, help="model name in the API (default: --model)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny random model, 1 round, 8 s of load per config")
    p.add_argument("--rounds", type=int, default=None, help="default 2 (1 with --quick)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                   default=["colocated", "split-shm"])
    p.add_argument("--mixes", nargs="+", choices=MIXES, default=list(MIXES),
                   help="interference: prompt-heavy among decode-heavy; decode_only: no "
                   "prompt-heavy requests (each on the same platform start, in turn)")
    p.add_argument("--decode-only-rate", type=float, default=None,
                   help="arrivals/s of the decode-only mix (default: --rate)")
    p.add_argument("--pd-min-prompt-tokens", type=int, default=None,
                   help="passed to the split configs' gateway (default: the gateway's)")
    p.add_argument("--pd-interference-weight", type=float, default=None,
                   help="passed to the split configs' gateway (default: the gateway's)")
    p.add_argument("--rate", type=float, default=None, help="arrivals/s (default 0.6; 3 quick)")
    p.add_argument("--duration", type=float, default=None,
                   help="send window in seconds (default 45; 8 quick)")
    p.add_argument("--max-requests", type=int, default=200)
    p.add_argument("--prompt-heavy-every", type=int, default=None,
                   help="every n-th arrival is prompt-heavy (default 5; 4 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-decode-ttft-s", type=float, default=2.0)
    p.add_argument("--slo-decode-tpot-ms", type=float, default=150.0)
    p.add_argument("--slo-prompt-ttft-s", type=float, default=15.0)
    p.add_argument("--request-timeout-s", type=float, default=180.0)
    p.add_argument("--drain-timeout-s", type=float, default=None,
                   help="after the last send, give up on requests still running (default 40, "
                   "longer than any request meeting the SLO can take; 20 quick)")
    p.add_argument("--startup-timeout-s", type=float, default=240.0)
    p.add_argument("--quiet-cores", type=float, default=0.3,
                   help="before each cell, wait for other processes to use fewer cores than this")
    p.add_argument("--quiet-wait-s", type=float, default=None,
                   help="... but at most this long (default 10; 0 quick); the reading is "
                   "recorded either way")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/pd.json (pd-quick.json with --quick)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"model": "tiny-llama" if quick else "smollm2-135m-instruct",
                "rounds": 1 if quick else 2, "rate": 3.0 if quick else 0.6,
                "duration": 8.0 if quick else 45.0, "prompt_heavy_every": 4 if quick else 5,
                "drain_timeout_s": 20.0 if quick else 40.0, "quiet_wait_s": 0.0 if quick else 10.0,
                "out": RESULTS.with_name("pd-quick.json") if quick else RESULTS}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.served_name is None:
        args.served_name = args.model.rstrip("/").split("/")[-1]
    if args.decode_only_rate is None:
        args.decode_only_rate = args.rate
    if "colocated" not in args.configs:
        p.error("--configs must include colocated (the ratios are against it)")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    w = Workload(
        rate_rps=args.rate, duration_s=args.duration, max_requests=args.max_requests,
        prompt_heavy_every=args.prompt_heavy_every, decode_prompt_tokens=(16, 64),
        decode_output_tokens=(64, 128), prompt_heavy_prompt_tokens=(1000, 1500),
        prompt_heavy_output_tokens=8, seed=args.seed,
    )
    workloads = {INTERFERENCE: w, DECODE_ONLY: replace(w, prompt_heavy_every=0,
                                                       rate_rps=args.decode_only_rate)}
    vocab = model_vocab_size(args.model) or 512
    token_range = (min(100, vocab // 4), min(vocab, 20000))
    mixes: dict[str, tuple[Workload, list[RequestSpec]]] = {}
    for mix in args.mixes:
        specs = build_specs(workloads[mix], token_range, args.seed)
        mixes[mix] = (workloads[mix], specs)
        count = {c: sum(1 for s in specs if s.label == c) for c in CLASSES}
        print(f"[pd] {mix}: {len(specs)} requests over "
              f"{specs[-1].arrival_s if specs else 0:.1f} s ({count})", file=sys.stderr)
    print(f"[pd] configs {args.configs} x {args.rounds} rounds", file=sys.stderr)
    log_dir = Path(tempfile.mkdtemp(prefix="moeflow-pd-"))
    # the servers' logs stay on the machine that ran this; the results file does not name it
    print(f"[pd] server logs in {log_dir}", file=sys.stderr)
    cells: list[dict[str, Any]] = []
    started = time.perf_counter()
    for r in range(args.rounds):
        for config in args.configs:
            cells.extend(await run_cell(config, r, args, mixes, token_range, log_dir))
    slos = class_slo(args)
    agg = aggregate(cells, args.rounds)
    first_mix = args.mixes[0]
    kv_bytes = [c["kv"]["bytes_per_request_mean"] for c in cells
                if c.get("kv") and c["kv"].get("bytes_per_request_mean")]
    kv_floor: dict[str, Any] | None = None
    efficiency: dict[str, float] = {}
    if kv_bytes:
        mean_bytes = int(statistics.median(kv_bytes))
        gbps = memcpy_gbps(mean_bytes)
        kv_floor = {"bytes": mean_bytes, "memcpy_gb_per_s": round(gbps, 2),
                    "memcpy_ms": round(1000 * mean_bytes / gbps / 1e9, 3)}
        for config in args.configs:
            rate = agg["summary"][first_mix].get(config, {}).get("kv_gb_per_s")
            if rate is not None:
                efficiency[config] = round(rate["median"] / gbps, 4)
    colocated_unloaded = agg["summary"][first_mix].get("colocated", {}).get("unloaded", {})
    hop: dict[str, Any] = {}
    for config in args.configs:
        if config == "colocated":
            continue
        mine = agg["summary"][first_mix].get(config, {}).get("unloaded", {})
        hop[config] = {
            f"{c}_ttft_delta_ms": round(mine[f"{c}_ttft_ms"] - colocated_unloaded[f"{c}_ttft_ms"],
                                        2)
            for c in CLASSES
            if mine.get(f"{c}_ttft_ms") is not None
            and colocated_unloaded.get(f"{c}_ttft_ms") is not None
        }
    return {
        "bench": "pd",
        "model": args.model,
        "quick": args.quick,
        "cores": CORES_NOTE,
        "configs": {c: " ".join(["moeflow up --num-threads 1", *config_argv(c, args)])
                    for c in args.configs},
        "workload": {
            mix: {**asdict(mw), "num_requests": len(mspecs),
                  "by_class": {c: sum(1 for x in mspecs if x.label == c) for c in CLASSES}}
            for mix, (mw, mspecs) in mixes.items()},
        "endpoint": "/v1/completions (token-id prompts, ignore_eos, include_usage)",
        "gateway": {"pd_min_prompt_tokens": args.pd_min_prompt_tokens,
                    "pd_interference_weight": args.pd_interference_weight},
        "slo": {c: asdict(s) for c, s in slos.items()},
        "rounds": args.rounds,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine_facts(),
        "summary": agg["summary"],
        "ratios": agg["ratios"],
        "ratio_note": "split/colocated per round, then median [min, max]; latency < 1 and "
                      "goodput/throughput > 1 favour split; crosses_1 = no significant difference",
        "kv": {
            "unloaded_split_minus_colocated": hop,
            "memcpy_floor": kv_floor,
            "efficiency_vs_memcpy": efficiency,
            "note": "kv_seconds = moeflow_kv_transfer_seconds (prefill send + decode receive "
                    "and copy; not the prefill, nor the copies into/out of paged blocks); "
                    "efficiency = median kv_gb_per_s / memcpy GB/s at the mean transfer size. "
                    "The unloaded TTFT delta split-colocated is the whole hop (extra HTTP "
                    "round trip, KV export/import, transfer) but is one noisy sample.",
        },
        "failed_cells": [{k: c.get(k) for k in ("config", "mix", "round", "error")}
                         for c in cells if not c.get("ok")],
        "cells": cells,
    }


def _fmt(x: float) -> str:
    return f"{x:.0f}" if 100 <= abs(x) < 100_000 else f"{x:.3g}"


def print_table(result: dict[str, Any]) -> None:
    names = ["decode_heavy_ttft_p50_ms", "decode_heavy_ttft_p99_ms", "decode_heavy_tpot_p50_ms",
             "decode_heavy_tpot_p99_ms", "decode_heavy_tpot_p50_ms_prefill_overlapped",
             "decode_heavy_tpot_p50_ms_clean", "prompt_heavy_ttft_p50_ms",
             "prompt_heavy_ttft_p99_ms", "goodput_rps", "slo_attainment", "output_tok_s",
             "num_failed", "kv_bytes_per_request_mean", "kv_seconds_mean_ms", "kv_gb_per_s",
             "kv_ttft_share_mean"]
    names += ["num_split", "num_local", "loadavg_before", "loadavg_after"]
    width = 25
    for mix, summary in result["summary"].items():
        configs = list(summary)
        print(f"{mix + ': median [min-max] over rounds':<44}"
              + "".join(f"{c:>{width}}" for c in configs), file=sys.stderr)
        for name in names:
            row = f"{name:<44}"
            for config in configs:
                s = summary[config].get(name)
                text = ("-" if s is None
                        else f"{_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}]")
                row += f"{text:>{width}}"
            print(row, file=sys.stderr)


RESULT_METRICS = [
    "decode_heavy_ttft_p50_ms", "decode_heavy_ttft_p99_ms", "decode_heavy_tpot_p50_ms",
    "decode_heavy_tpot_p99_ms", "decode_heavy_itl_p99_ms",
    "decode_heavy_tpot_p50_ms_prefill_overlapped", "decode_heavy_tpot_p50_ms_clean",
    "decode_heavy_ttft_p50_ms_sent_during_prefill", "decode_heavy_ttft_p50_ms_sent_otherwise",
    "prompt_heavy_ttft_p50_ms", "prompt_heavy_ttft_p99_ms", "goodput_rps", "slo_attainment",
    "output_tok_s", "request_throughput_rps", "num_failed", "num_usage_mismatch",
    "kv_bytes_per_request_mean", "kv_seconds_mean_ms", "kv_seconds_p99_ms", "kv_gb_per_s",
    "kv_ttft_share_mean",
]
RESULT_RATIOS = [
    "decode_heavy_ttft_p50_ms", "decode_heavy_ttft_p99_ms", "decode_heavy_tpot_p50_ms",
    "decode_heavy_tpot_p99_ms", "decode_heavy_itl_p99_ms", "prompt_heavy_ttft_p50_ms",
    "prompt_heavy_ttft_p99_ms", "goodput_rps", "slo_attainment", "output_tok_s",
]
GOAL_RATIOS = {  # the targets, split-shm/colocated per mix
    "goodput": "goodput_rps", "decode_heavy_ttft_p50": "decode_heavy_ttft_p50_ms",
    "decode_heavy_itl_p99": "decode_heavy_itl_p99_ms",
    "decode_heavy_tpot_p50": "decode_heavy_tpot_p50_ms",
    "decode_heavy_tpot_p99": "decode_heavy_tpot_p99_ms",
}


def compact(result: dict[str, Any]) -> dict[str, Any]:
    """The RESULT line: per mix, the headline ratios (``goal``), then the numbers as
    [median, min, max] over rounds (pd.json has all)."""

    def triple(s: dict[str, Any]) -> list[float]:
        return [float(f"{s[k]:.4g}") for k in ("median", "min", "max")]

    goal = {
        mix: {pair: {short: triple(d[name]) for short, name in GOAL_RATIOS.items() if name in d}
              for pair, d in pairs.items()}
        for mix, pairs in result["ratios"].items()
    }
    summary = {
        mix: {config: {"rounds_ok": d["rounds_ok"], "noisy_rounds": d["noisy_rounds"],
                       **{m: triple(d[m]) for m in RESULT_METRICS if m in d}}
              for config, d in configs.items()}
        for mix, configs in result["summary"].items()
    }
    ratios = {
        mix: {pair: {m: triple(d[m]) for m in RESULT_RATIOS if m in d}
              | {"crosses_1": [m for m in RESULT_RATIOS if d.get(m, {}).get("crosses_1")]}
              for pair, d in pairs.items()}
        for mix, pairs in result["ratios"].items()
    }
    keep = ("bench", "model", "quick", "configs", "gateway", "slo", "rounds", "wall_s",
            "failed_cells")
    kv = {k: v for k, v in result["kv"].items() if k != "note"}
    noise = [[c["config"], c.get("mix"), c["round"], c.get("loadavg_before"),
              c.get("loadavg_after"), (c.get("cpu_during_load") or {}).get("others_cores")]
             for c in result["cells"]]
    return {"goal": goal, **{k: result[k] for k in keep}, "workload": result["workload"],
            "summary": summary, "ratios": ratios, "ratio_note": result["ratio_note"], "kv": kv,
            "loadavg_machine_start": result["machine"]["loadavg_at_start"],
            "config_mix_round_loadavg_before_after_others_cores": noise}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM behaves like Ctrl-C, so the finally blocks stop every platform we started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.quick:
        ensure_tiny(args.model)
    try:
        result = asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("[pd] interrupted; every platform started here was stopped", file=sys.stderr)
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print("RESULT " + json.dumps(compact(result), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
