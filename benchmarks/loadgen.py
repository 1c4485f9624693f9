"""A small async load generator for OpenAI-compatible streaming endpoints (httpx + asyncio only).

Reusable by any benchmark: build a list of ``RequestSpec`` (what to send and when), run it open
loop with ``run_open_loop`` (each request leaves at its own arrival time, so queueing delay shows
up in the latencies instead of being hidden by a closed loop), then ``summarize`` the
``RequestResult`` list. Metric definitions follow vLLM's ``bench serve`` (see
docs/benchmarks.md, "Method"):

- TTFT: request sent -> first streamed chunk that has a ``choices`` entry, even with empty text;
- E2E: request sent -> last chunk that has a ``choices`` entry;
- TPOT: (E2E - TTFT) / (n_out - 1) for requests with n_out > 1;
- ITL: gaps between consecutive ``choices`` chunks, pooled over requests;
- n_out / n_in: from the server's ``usage`` (``stream_options.include_usage``), never re-tokenized.

A request that fails (HTTP error, error event in the stream, timeout, missing usage) is kept as a
``RequestResult`` with ``ok=False`` and an ``error`` string; it never raises out of the runner and
counts as an SLO miss in ``summarize``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

Endpoint = Literal["completions", "chat"]


@dataclass(frozen=True)
class RequestSpec:
    """One request: its class label, prompt (text or token ids), length and arrival offset."""

    index: int
    label: str
    prompt: str | list[int]
    max_tokens: int
    arrival_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestResult:
    index: int
    label: str
    arrival_s: float
    expected_output_tokens: int
    expected_prompt_tokens: int | None = None  # known when the prompt is a list of token ids
    sent_s: float = math.nan  # offset from the run's start
    ok: bool = False
    error: str | None = None
    status_code: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_chunks: int = 0
    num_prompt_tokens: int | None = None
    num_output_tokens: int | None = None

    @property
    def tpot_s(self) -> float | None:
        n = self.num_output_tokens
        if self.ttft_s is None or self.e2e_s is None or n is None or n < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (n - 1)

    @property
    def usage_mismatch(self) -> bool:
        """With ignore_eos the server must return exactly max_tokens (more chunks than tokens is
        impossible), and a token-id prompt must be counted at its exact length."""
        n = self.num_output_tokens
        if n is None:
            return False
        if n != self.expected_output_tokens or self.num_chunks > n:
            return True
        expected_in = self.expected_prompt_tokens
        return expected_in is not None and self.num_prompt_tokens != expected_in


@dataclass(frozen=True)
class Slo:
    """A request is good when it succeeded and meets every bound that is set."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def is_met(self, r: RequestResult) -> bool:
        if not r.ok or r.ttft_s is None or r.e2e_s is None:
            return False
        if self.ttft_s is not None and r.ttft_s > self.ttft_s:
            return False
        tpot = r.tpot_s
        if self.tpot_s is not None and tpot is not None and tpot > self.tpot_s:
            return False
        return self.e2e_s is None or r.e2e_s <= self.e2e_s


# -- arrivals -------------------------------------------------------------------------------------


def poisson_arrivals(
    rate_rps: float, num: int, rng: random.Random, *, burstiness: float = 1.0,
    max_duration_s: float | None = None,
) -> list[float]:
    """Arrival offsets with gamma-distributed gaps (shape = burstiness; 1.0 is Poisson), mean
    gap 1/rate. Stops at ``num`` arrivals or at ``max_duration_s``, whichever comes first."""
    if rate_rps <= 0 or num <= 0:
        return []
    scale = 1.0 / (rate_rps * burstiness)
    out: list[float] = []
    t = 0.0
    while len(out) < num:
        t += rng.gammavariate(burstiness, scale)
        if max_duration_s is not None and t > max_duration_s:
            break
        out.append(t)
    return out


def random_token_prompt(rng: random.Random, num_tokens: int, low: int, high: int) -> list[int]:
    """A prompt of exactly ``num_tokens`` random ids in [low, high) (no prefix-cache hits)."""
    return [rng.randrange(low, high) for _ in range(num_tokens)]


# -- one request ----------------------------------------------------------------------------------


def _body(spec: RequestSpec, model: str, endpoint: Endpoint) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if endpoint == "chat":
        text = spec.prompt if isinstance(spec.prompt, str) else " ".join(map(str, spec.prompt))
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = spec.prompt
    body.update(spec.extra)
    return body


def new_result(spec: RequestSpec) -> RequestResult:
    prompt_len = len(spec.prompt) if isinstance(spec.prompt, list) else None
    return RequestResult(spec.index, spec.label, spec.arrival_s, spec.max_tokens, prompt_len)


def _error_text(raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        return f"{error.get('code') or error.get('type')}: {error.get('message')}"[:300]
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw[:300].decode(errors="replace")


async def send_streaming(
    client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec, *,
    endpoint: Endpoint = "completions", t0: float | None = None, timeout_s: float = 300.0,
    into: RequestResult | None = None,
) -> RequestResult:
    """Send one streaming request and time it; never raises (failures land in ``error``).
    ``into``: fill this result in place (so a caller that cancels still sees what was timed)."""
    t0 = time.perf_counter() if t0 is None else t0
    result = into if into is not None else new_result(spec)
    start = time.perf_counter()
    result.sent_s = start - t0
    last: float | None = None
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, json=_body(spec, model, endpoint)) as response:
                result.status_code = response.status_code
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code} " + _error_text(
                        await response.aread()
                    )
                    return result
                done = False
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    now = time.perf_counter()
                    event = json.loads(data)
                    if "error" in event:
                        result.error = "stream error " + _error_text(data.encode())
                        return result
                    if event.get("choices"):
                        if last is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        result.num_chunks += 1
                    usage = event.get("usage")
                    if usage:
                        result.num_prompt_tokens = int(usage["prompt_tokens"])
                        result.num_output_tokens = int(usage["completion_tokens"])
                if not done:
                    result.error = "stream ended without [DONE]"
                elif result.num_output_tokens is None:
                    result.error = "no usage in the stream"
                elif last is None:
                    result.error = "no choices chunk in the stream"
                else:
                    result.e2e_s = last - start
                    result.ok = True
    except TimeoutError:
        result.error = f"timeout after {timeout_s:.0f} s"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


# -- a whole run ----------------------------------------------------------------------------------


@dataclass
class RunOutput:
    results: list[RequestResult]
    duration_s: float  # first send -> last request finished (or given up)
    num_not_sent: int  # arrivals past the send deadline


async def run_open_loop(
    base_url: str, model: str, specs: Sequence[RequestSpec], *,
    endpoint: Endpoint = "completions", api_key: str | None = None,
    request_timeout_s: float = 300.0, send_deadline_s: float | None = None,
    drain_timeout_s: float | None = None, max_concurrency: int | None = None,
) -> RunOutput:
    """Send every spec at its ``arrival_s`` (open loop); wait for all to finish.

    ``send_deadline_s``: arrivals later than this are not sent (bounded duration).
    ``drain_timeout_s``: after the last send, requests still running this much later are
    cancelled and reported as failed. ``max_concurrency``: optional cap on requests in flight
    (a capped run is no longer fully open loop; the wait shows up in TTFT)."""
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    url = base_url.rstrip("/") + path
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    to_send = [s for s in specs if send_deadline_s is None or s.arrival_s <= send_deadline_s]
    to_send.sort(key=lambda s: s.arrival_s)
    results: dict[int, RequestResult] = {}

    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        t0 = time.perf_counter()

        async def one(spec: RequestSpec) -> None:
            result = results[spec.index] = new_result(spec)
            async with gate or contextlib.nullcontext():
                await send_streaming(client, url, model, spec, endpoint=endpoint, t0=t0,
                                     timeout_s=request_timeout_s, into=result)

        tasks: list[asyncio.Task[None]] = []
        for spec in to_send:
            delay = spec.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        end = time.perf_counter()
    out: list[RequestResult] = []
    for spec in to_send:
        r = results.get(spec.index) or new_result(spec)
        if not r.ok and r.error is None:  # cancelled while draining
            r.error = f"still running {drain_timeout_s} s after the last send"
        out.append(r)
    return RunOutput(out, end - t0, len(specs) - len(to_send))


# -- statistics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist_ms(values: Sequence[float]) -> dict[str, float | None]:
    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000.0 * x, 3)

    return {
        "mean": ms(sum(values) / len(values)) if values else None,
        "p50": ms(percentile(values, 50)),
        "p90": ms(percentile(values, 90)),
        "p99": ms(percentile(values, 99)),
        "max": ms(max(values)) if values else None,
    }


def summarize(
    results: Sequence[RequestResult], duration_s: float, slo: Slo | None = None
) -> dict[str, Any]:
    """Latency distributions (ms), throughputs and, with an SLO, goodput for these results."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [t for t in (r.tpot_s for r in ok) if t is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    n_out = sum(r.num_output_tokens or 0 for r in ok)
    n_in = sum(r.num_prompt_tokens or 0 for r in ok)
    errors = Counter(r.error for r in results if not r.ok)
    dur = max(duration_s, 1e-9)
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_failed": len(results) - len(ok),
        "errors": dict(errors.most_common(5)),
        "num_usage_mismatch": sum(1 for r in ok if r.usage_mismatch),
        "ttft_ms": _dist_ms(ttft),
        "tpot_ms": _dist_ms(tpot),
        "itl_ms": _dist_ms(itl),
        "e2e_ms": _dist_ms(e2e),
        "tokens_per_chunk": round(n_out / max(1, sum(r.num_chunks for r in ok)), 3),
        "duration_s": round(duration_s, 3),
        "request_throughput_rps": len(ok) / dur,
        "output_tok_s": n_out / dur,
        "total_tok_s": (n_in + n_out) / dur,
    }
    if slo is not None:
        good = sum(1 for r in results if slo.is_met(r))
        summary["num_good"] = good
        summary["slo_attainment"] = good / len(results) if results else None
        summary["goodput_rps"] = good / dur
    return summary


# -- Prometheus text format ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)


def _parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    labels: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        key = text[i:eq].strip().lstrip(",").strip()
        j = eq + 2  # skip ="
        value: list[str] = []
        while text[j] != '"':
            if text[j] == "\\":
                j += 1
                value.append({"n": "\n"}.get(text[j], text[j]))
            else:
                value.append(text[j])
            j += 1
        labels.append((key, "".join(value)))
        i = j + 1
        while i < len(text) and text[i] in ", ":
            i += 1
    return tuple(sorted(labels))


def parse_prometheus(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (comments and timestamps dropped)."""
    samples: list[Sample] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            label_text, rest = rest.rsplit("}", 1)
            labels = _parse_labels(label_text)
        else:
            name, rest = line.split(None, 1)
            labels = ()
        try:
            samples.append(Sample(name, labels, float(rest.split()[0])))
        except (ValueError, IndexError):
            continue
    return samples


def metric_total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value for s in samples
        if s.name == name and all(s.label(k) == v for k, v in labels.items())
    )


def histogram_buckets(
    samples: Iterable[Sample], name: str, **labels: str
) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of histogram ``name`` summed over other labels."""
    acc: dict[float, float] = {}
    for s in samples:
        if s.name != f"{name}_bucket" or not all(s.label(k) == v for k, v in labels.items()):
            continue
        le = s.label("le")
        if le is not None:
            bound = math.inf if le == "+Inf" else float(le)
            acc[bound] = acc.get(bound, 0.0) + s.value
    return sorted(acc.items())


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile (linear inside a bucket), q in [0, 1]."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def bucket_delta(
    after: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Buckets of what was observed between two scrapes of the same histogram."""
    old = dict(before)
    return [(bound, count - old.get(bound, 0.0)) for bound, count in after]


async def scrape(client: httpx.AsyncClient, url: str) -> list[Sample]:
    """GET a /metrics URL and parse it; an empty list if it cannot be read."""
    try:
        response = await client.get(url, timeout=10.0)
        response.raise_for_status()
    except httpx.HTTPError:
        return []
    return parse_prometheus(response.text)


async def wait_healthy(
    base_url: str, timeout_s: float, *, min_instances: int = 1, alive: Any = None
) -> dict[str, Any]:
    """Poll ``{base_url}/health`` until it answers 200 with at least ``min_instances`` healthy
    instances (when it reports them). ``alive``: optional callable; False stops early.
    Raises TimeoutError or RuntimeError."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError("the server process exited while starting")
            try:
                response = await client.get(base_url.rstrip("/") + "/health")
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    if int(body.get("healthy_instances", min_instances)) >= min_instances:
                        return body
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.25)
    raise TimeoutError(f"{base_url} was not healthy within {timeout_s:.0f} s")
