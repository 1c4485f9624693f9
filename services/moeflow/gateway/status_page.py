"""The gateway's status page: ``GET /status`` (HTML), ``GET /status/data`` (JSON) and
``GET /status/assets/{name}`` (the page's script and style; no CDN, nothing external).

What it shows comes from this gateway alone: the model registry (models, their roles and
instances, healthy or not as the stats poller last saw them) and the gateway's own Prometheus
registry. Windowed values (mean TTFT and TPOT per interval, generated tokens/s) are differences
between cumulative samples of that registry, taken when the page polls ``/status/data``. The
sample history lives on ``app.state`` (no module state), holds at most ``max_samples`` samples
and takes at most one per ``min_interval_s``, so several open pages share one series.

Behind an admin key like ``/metrics`` (``ApiKeyMiddleware``; a browser sends it as the password
of HTTP Basic auth, which it asks for once): it shows model names and instance URLs, never
prompts, outputs or keys.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry

from moeflow.domain.roles import Role
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.registry import ServedModel
from moeflow.gateway.routes.health import model_state

STATUS_SCHEMA_VERSION = 1
_STATIC_DIR = Path(__file__).parent / "static"
_ASSETS = {
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}
# Everything the page loads is same-origin; inline script and style are refused.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
_ROLE_ORDER = tuple(Role)

router = APIRouter()


@dataclass(frozen=True)
class ModelTotals:
    """Cumulative counters of one model, as the gateway's Prometheus registry holds them."""

    requests: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0
    tpot_sum_s: float = 0.0
    tpot_count: float = 0.0


# sample name -> ModelTotals field; histograms contribute their _sum and _count.
_TOTAL_FIELDS = {
    "moeflow_requests_total": "requests",
    "moeflow_prompt_tokens_total": "prompt_tokens",
    "moeflow_generation_tokens_total": "generation_tokens",
    "moeflow_time_to_first_token_seconds_sum": "ttft_sum_s",
    "moeflow_time_to_first_token_seconds_count": "ttft_count",
    "moeflow_time_per_output_token_seconds_sum": "tpot_sum_s",
    "moeflow_time_per_output_token_seconds_count": "tpot_count",
}


def read_totals(registry: CollectorRegistry) -> dict[str, ModelTotals]:
    """model -> its cumulative totals (counters summed over their other labels)."""
    sums: dict[str, dict[str, float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            name = _TOTAL_FIELDS.get(sample.name)
            model = sample.labels.get("model")
            if name is None or not model:  # "": answered before any served model was named
                continue
            per_model = sums.setdefault(model, {})
            per_model[name] = per_model.get(name, 0.0) + float(sample.value)
    return {model: ModelTotals(**values) for model, values in sums.items()}


@dataclass(frozen=True)
class Sample:
    wall_s: float
    monotonic_s: float
    totals: Mapping[str, ModelTotals]


@dataclass
class StatusHistory:
    """Recent samples of the cumulative totals, oldest first."""

    max_samples: int = 600
    min_interval_s: float = 0.5
    samples: deque[Sample] = field(default_factory=deque)

    def record(self, sample: Sample) -> None:
        """Keep `sample` unless the last one is younger than `min_interval_s`."""
        if self.samples and sample.monotonic_s - self.samples[-1].monotonic_s < (
                self.min_interval_s):
            return
        self.samples.append(sample)
        while len(self.samples) > self.max_samples:
            self.samples.popleft()


def _mean_ms(sum_s: float, count: float) -> float | None:
    return round(1000.0 * sum_s / count, 3) if count > 0 else None


def series(samples: Iterable[Sample], models: Iterable[str]) -> dict[str, Any]:
    """Per interval between consecutive samples, per model: mean TTFT and TPOT (ms; None when
    no request finished in it), generated tokens/s and finished requests/s. A model missing
    from a sample had no samples yet, which counts as zero."""
    ordered = list(samples)
    names = sorted(set(models).union(*(s.totals for s in ordered)))
    times: list[float] = []
    out: dict[str, dict[str, list[float | None]]] = {
        name: {"ttft_ms": [], "tpot_ms": [], "tokens_per_s": [], "requests_per_s": []}
        for name in names
    }
    zero = ModelTotals()
    for before, after in zip(ordered, ordered[1:], strict=False):
        dt_s = after.monotonic_s - before.monotonic_s
        if dt_s <= 0:
            continue
        times.append(round(after.wall_s, 3))
        for name in names:
            a, b = before.totals.get(name, zero), after.totals.get(name, zero)
            point = out[name]
            point["ttft_ms"].append(_mean_ms(b.ttft_sum_s - a.ttft_sum_s,
                                             b.ttft_count - a.ttft_count))
            point["tpot_ms"].append(_mean_ms(b.tpot_sum_s - a.tpot_sum_s,
                                             b.tpot_count - a.tpot_count))
            point["tokens_per_s"].append(
                round((b.generation_tokens - a.generation_tokens) / dt_s, 3))
            point["requests_per_s"].append(round((b.requests - a.requests) / dt_s, 3))
    return {"t": times, "models": out}


def describe_model(model: ServedModel, totals: ModelTotals, *,
                   can_wake: bool = False) -> dict[str, Any]:
    roles: dict[str, list[dict[str, Any]]] = {}
    for instance in model.instances:
        stats = model.stats.get(instance.url)
        roles.setdefault(instance.role, []).append({
            "url": instance.url,
            "instance_id": stats.instance_id if stats else "",
            "rank": instance.rank_name,
            "state": "healthy" if instance.is_healthy else "unhealthy",
            "reason": instance.state,
            "num_waiting": instance.num_waiting,
            "num_running": instance.num_running,
            "num_in_flight": instance.num_in_flight,
            "kv_cache_usage_ratio": round(instance.kv_usage_ratio, 4),
        })
    order: dict[str, int] = {role.value: i for i, role in enumerate(_ROLE_ORDER)}
    ordered = sorted(roles.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    return {
        "name": model.name,
        "architecture": model.info.architecture,
        "max_model_len": model.info.max_model_len,
        "state": model_state(model, can_wake=can_wake),
        "totals": {
            "requests": int(totals.requests),
            "prompt_tokens": int(totals.prompt_tokens),
            "generation_tokens": int(totals.generation_tokens),
        },
        "roles": [
            {"role": role, "num_healthy": sum(i["state"] == "healthy" for i in instances),
             "instances": instances}
            for role, instances in ordered
        ],
    }


def _history(request: Request) -> StatusHistory:
    state = request.app.state
    history: StatusHistory | None = getattr(state, "status_history", None)
    if history is None:
        history = StatusHistory()
        state.status_history = history
    return history


@router.get("/status/data")
async def status_data(request: Request, service: ServiceDep) -> JSONResponse:
    totals = read_totals(service.metrics.registry)
    history = _history(request)
    history.record(Sample(wall_s=time.time(), monotonic_s=time.monotonic(), totals=totals))
    models = service.registry.models
    body = {
        "schema_version": STATUS_SCHEMA_VERSION,
        "now_unix": round(time.time(), 3),
        "gateway": {
            "requests_in_flight": service.num_in_flight,
            "max_in_flight_requests": service.settings.max_in_flight_requests,
        },
        "models": [describe_model(models[name], totals.get(name, ModelTotals()),
                                  can_wake=service.wake is not None and service.wake.can_wake)
                   for name in sorted(models)],
        "series": series(history.samples, models),
    }
    return JSONResponse(body, headers={"cache-control": "no-store"})


@router.get("/status")
async def status_page() -> Response:
    html = (_STATIC_DIR / "status.html").read_bytes()
    return Response(html, media_type="text/html; charset=utf-8",
                    headers={"content-security-policy": _CSP, "cache-control": "no-cache"})


@router.get("/status/assets/{name}")
async def status_asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:  # a fixed list: no path from the URL ever reaches the filesystem
        raise HTTPException(status_code=404, detail=f"no status asset {name!r}")
    return Response((_STATIC_DIR / name).read_bytes(), media_type=media_type,
                    headers={"cache-control": "no-cache", "x-content-type-options": "nosniff"})
