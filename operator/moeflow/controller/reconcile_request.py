"""Running one batch `Request` to completion (async; the body of a kopf daemon in `main`).

Lifecycle in status.phase: Pending (waiting for the Model's endpoint) -> Running (counts and
progress updated at most every `batch_progress_interval_s`) -> Succeeded (every line has a
result, some may have failed: Degraded says so) or Failed (the batch could not run: invalid
spec, missing input). Results go to a ConfigMap owned by the Request.

Delivery is at-least-once: if the operator restarts mid-batch, the daemon starts the batch
again from the first line (results are only written at the end, in one ConfigMap update).
kopf adds its finalizer to a Request only while the daemon runs, so that the batch is
stopped before the object goes; it removes it once the phase is final.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from moeflow.controller import status
from moeflow.controller.batch import (
    CompletionClient,
    HttpCompletionClient,
    Progress,
    parse_prompts,
    results_jsonl,
    run_batch,
)
from moeflow.controller.context import OperatorContext
from moeflow.controller.events import Decision, as_body, post
from moeflow.domain import naming
from moeflow.domain.spec import RequestSpec, SpecError, parse_spec
from moeflow.kube import api as kube

FINAL_PHASES = ("Succeeded", "Failed")
# A ConfigMap holds at most 1 MiB in all; keep room for metadata.
MAX_RESULTS_BYTES = 1_000_000
_MODEL_POLL_S = 5.0


def is_unfinished(body: Mapping[str, Any], **_: Any) -> bool:
    return (body.get("status") or {}).get("phase") not in FINAL_PHASES


async def _resolve_endpoint(ctx: OperatorContext, spec: RequestSpec, namespace: str,
                            stopped: kopf.DaemonStopped,
                            set_status: Callable[[dict[str, Any]], Awaitable[None]]) -> str | None:
    """spec.endpoint, else the Model's endpoint once the Model is Ready (None if stopped)."""
    if spec.endpoint:
        return spec.endpoint
    while not stopped:
        model = await ctx.call(ctx.api.get, kube.MODEL, namespace, spec.model)
        model_status = (model or {}).get("status") or {}
        ready = any(c.get("type") == status.READY and c.get("status") == "True"
                    for c in model_status.get("conditions") or [])
        if ready and model_status.get("endpoint"):
            return str(model_status["endpoint"])
        waiting = "to be Ready" if model else "to exist"
        await set_status({"phase": "Pending",
                          "message": f"waiting for Model {spec.model} {waiting}"})
        await stopped.wait(_MODEL_POLL_S)
    return None


async def run_request(ctx: OperatorContext, body: kopf.Body, stopped: kopf.DaemonStopped,
                      logger: logging.Logger | logging.LoggerAdapter[Any],
                      client: CompletionClient | None = None) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    previous: dict[str, Any] = dict(body.get("status") or {})

    async def set_status(fields: dict[str, Any]) -> None:
        new = {**fields, "observedGeneration": meta.get("generation")}
        if status.changed(previous, new):
            previous.update(new)
            await ctx.call(ctx.api.patch_status, kube.REQUEST, namespace, name, new)

    async def fail(reason: str, message: str) -> None:
        # Event first: a final phase stops this daemon, possibly before the next line runs.
        post(body, [Decision(reason, message, "Warning")])
        await set_status({"phase": "Failed", "message": message, **status.invalid_status(
            message, reason=reason, previous=previous, now=status.now_iso())})

    try:
        spec = parse_spec(RequestSpec, body.get("spec"))
    except SpecError as e:
        return await fail("InvalidSpec", str(e))
    endpoint = await _resolve_endpoint(ctx, spec, namespace, stopped, set_status)
    if endpoint is None:
        return
    config_map = await ctx.call(ctx.api.get, kube.CONFIG_MAP, namespace, spec.input.name)
    jsonl = ((config_map or {}).get("data") or {}).get(spec.input.key)
    if jsonl is None:
        return await fail("InputNotFound", f"ConfigMap {spec.input.name} with key"
                          f" {spec.input.key!r} not found; fix: create it, then recreate the"
                          " Request")
    items, invalid = parse_prompts(jsonl, api=spec.api, model=spec.model,
                                   max_tokens=spec.max_tokens, temperature=spec.temperature)
    total = len(items) + len(invalid)
    running = f"{total} prompts against {endpoint}"
    await set_status({"phase": "Running", "total": total, "succeeded": 0, "failed": 0,
                      "progress": f"0/{total}", "startedAt": status.now_iso(),
                      "endpoint": endpoint, "message": running,
                      "conditions": status.batch_conditions(running, num_failed=0,
                                                            total=total, is_done=False)})
    post(body, [Decision("Started", f"fanning {total} prompts out to {endpoint}"
                         f" ({spec.parallelism} in flight)")])

    async def on_progress(p: Progress) -> None:
        await set_status({"succeeded": p.succeeded, "failed": p.failed, "progress": p.summary})

    http_client = client or HttpCompletionClient(ctx.settings.request_timeout_s)
    try:
        results = await run_batch(items, http_client, endpoint, api=spec.api,
                                  parallelism=spec.parallelism, already_failed=invalid,
                                  on_progress=on_progress,
                                  progress_interval_s=ctx.settings.batch_progress_interval_s)
    finally:
        if isinstance(http_client, HttpCompletionClient):
            await http_client.aclose()
    output_name = spec.output.name or naming.results_configmap_name(name)
    jsonl_out = results_jsonl(results)
    if len(jsonl_out.encode()) > MAX_RESULTS_BYTES:
        return await fail("ResultsTooLarge", f"{len(jsonl_out.encode())} bytes of results do"
                          f" not fit a ConfigMap ({MAX_RESULTS_BYTES} bytes); fix: split the"
                          " prompts over several Requests or lower spec.maxTokens")
    output = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": output_name, "namespace": namespace,
                           "labels": {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}},
              "data": {spec.output.key: jsonl_out}}
    kopf.adopt(output, owner=as_body(body))
    await ctx.call(ctx.api.apply, output)
    num_failed = sum(not r.ok for r in results)
    message = f"{total - num_failed}/{total} succeeded; results in ConfigMap {output_name}"
    post(body, [Decision("Completed", message, "Warning" if num_failed else "Normal")])
    logger.info("Request %s/%s: %s", namespace, name, message)
    # Last: the final phase flips the daemon's filter and kopf stops (cancels) this coroutine.
    await set_status({"phase": "Succeeded", "succeeded": total - num_failed,
                      "failed": num_failed, "progress": f"{total}/{total}",
                      "completedAt": status.now_iso(), "outputConfigMap": output_name,
                      "message": message, "conditions": status.batch_conditions(
                          message, num_failed=num_failed, total=total, is_done=True)})
