"""Tenants on two gateway replicas sharing one real Redis (with a password), in front of one
real engine: a tenant over its tokens per minute gets 429 from either replica (the other tenant
is untouched), usage and the per-tenant metrics equal what the clients received, keys rotate
without a restart, and /metrics and /admin/usage need an admin key."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from moeflow.gateway.app import build_app
from moeflow.gateway.settings import GatewaySettings
from moeflow.gateway.tenants import TenantSpec, hash_key, write_tenants_file
from moeflow.gateway.tenants_cli import main as tenants_main
from moeflow.xccl.redis_server import start_local_redis
from tests.integration.engine.engine_kit import serve, serve_app
from tests.platform_process import free_port
from tests.reference import make_engine

MODEL = "tiny"
GREEDY_TPM = 120
MAX_TOKENS = 8


@contextmanager
def gateway(settings: GatewaySettings) -> Iterator[str]:
    with serve_app(build_app(settings)) as url:
        yield f"{url}"


@pytest.fixture(scope="module")
def replicas(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[list[str], Path]]:
    """Two gateway replicas (same tenants file, same Redis) and the tenants file."""
    tmp = tmp_path_factory.mktemp("tenants")
    path = tmp / "tenants.yaml"
    write_tenants_file(path, {
        "greedy": TenantSpec(keys=(hash_key("sk-greedy"),), tokens_per_minute=GREEDY_TPM),
        "polite": TenantSpec(keys=(hash_key("sk-polite"),), tokens_per_minute=100_000),
        "ops": TenantSpec(keys=(hash_key("sk-ops"),), admin=True),
    })
    with ExitStack() as stack:
        # as the chart's Redis: a password, given apart from the URL
        redis = stack.enter_context(start_local_redis(tmp, port=free_port(),
                                                      requirepass="chart-redis-password"))
        engine = stack.enter_context(serve(make_engine(tiny_dirs["llama"],
                                                       served_model_name=MODEL)))
        prefix = f"test-{uuid.uuid4().hex[:8]}:"
        urls = [stack.enter_context(gateway(GatewaySettings(
            port=free_port(), engine_urls=(engine.url,), tenants_file=path,
            tenants_reload_interval_s=0, quota_redis_url=redis.url,
            quota_redis_password="chart-redis-password", quota_key_prefix=prefix,
            stats_poll_interval_s=0.2))) for _ in range(2)]
        yield urls, path


def complete(base: str, key: str, prompt: str = "once upon a time") -> openai.types.Completion:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                     temperature=0, extra_body={"ignore_eos": True})


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer sk-ops"}).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_over_quota_tenant_gets_429_on_both_replicas_and_usage_matches(
        replicas: tuple[list[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="moeflow.gateway.access")
    (a, b), _ = replicas
    received: dict[str, list[int]] = {"greedy": [0, 0, 0], "polite": [0, 0, 0]}

    def add(tenant: str, r: openai.types.Completion) -> None:
        assert r.usage is not None
        got = received[tenant]
        got[0] += 1
        got[1] += r.usage.prompt_tokens
        got[2] += r.usage.completion_tokens

    refusals: list[openai.RateLimitError] = []
    for i in range(40):  # alternate replicas: the window is shared through Redis
        try:
            add("greedy", complete((a, b)[i % 2], "sk-greedy"))
        except openai.RateLimitError as exc:
            refusals.append(exc)
            if len(refusals) == 2:
                break
        add("polite", complete((b, a)[i % 2], "sk-polite"))
    greedy = received["greedy"]
    assert len(refusals) == 2, "the greedy tenant never hit its limit"
    # the shared window: both replicas served it, and together they stopped it at the limit
    assert greedy[0] >= 2
    assert greedy[1] + greedy[2] <= GREEDY_TPM + MAX_TOKENS
    for exc in refusals:
        error = exc.body if isinstance(exc.body, dict) else {}
        assert error.get("code") == "rate_limit_exceeded"
        assert "tokens_per_minute" in str(error.get("message"))
        assert 1 <= int(exc.response.headers["retry-after"]) <= 60
    assert {str(e.request.url).split("/v1")[0] for e in refusals} == {a, b}
    assert received["polite"][0] >= greedy[0]  # never refused

    # usage: the admin route of either replica sums both replicas' charges
    for base in (a, b):
        report = httpx.get(f"{base}/admin/usage", params={"group_by": "range"},
                           headers={"Authorization": "Bearer sk-ops"}).json()
        rows = {r["tenant"]: r for r in report["data"]}
        for tenant, (requests, prompt, completion) in received.items():
            row = rows[tenant]
            assert (row["model"], row["requests"], row["prompt_tokens"],
                    row["completion_tokens"]) == (MODEL, requests, prompt, completion), tenant
    # Prometheus: each replica counts what it served; the two together are the usage
    for tenant, (requests, prompt, completion) in received.items():
        assert sum(metric(u, "moeflow_tenant_prompt_tokens_total", tenant=tenant)
                   for u in (a, b)) == prompt
        assert sum(metric(u, "moeflow_tenant_completion_tokens_total", tenant=tenant)
                   for u in (a, b)) == completion
        assert sum(metric(u, "moeflow_tenant_requests_total", tenant=tenant, status="200")
                   for u in (a, b)) == requests
    assert sum(metric(u, "moeflow_tenant_rate_limited_total", tenant="greedy",
                      limit="tokens_per_minute") for u in (a, b)) == 2
    assert metric(a, "moeflow_gateway_quota_backend", backend="redis") == 1
    # the access log names the tenant, never the key
    access = [r.getMessage() for r in caplog.records if r.name == "moeflow.gateway.access"]
    assert any(re.search(r"POST /v1/completions 429 tenant=greedy", m) for m in access)
    assert any("tenant=polite" in m for m in access)
    assert not any("sk-" in m for m in access)


def test_admin_paths_need_the_admin_key_and_health_says_nothing_internal(
        replicas: tuple[list[str], Path]) -> None:
    (a, _), _ = replicas
    for path in ("/metrics", "/status/data", "/admin/usage"):
        assert httpx.get(f"{a}{path}").status_code == 401
        assert httpx.get(f"{a}{path}", headers={"Authorization": "Bearer sk-polite"}
                         ).status_code == 403
        assert httpx.get(f"{a}{path}", headers={"Authorization": "Bearer sk-ops"}
                         ).status_code == 200
    health = httpx.get(f"{a}/health")
    assert health.status_code == 200
    assert "127.0.0.1" not in health.text and "http" not in health.text


def test_keys_rotate_without_a_restart(replicas: tuple[list[str], Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (a, b), path = replicas
    assert tenants_main(["add-key", str(path), "polite"]) == 0
    new_key = capsys.readouterr().out.strip()
    for base in (a, b):
        assert complete(base, new_key).usage is not None
        assert complete(base, "sk-polite").usage is not None  # both keys during the overlap
    assert tenants_main(["revoke-key", str(path), "polite", "--key", "sk-polite"]) == 0
    for base in (a, b):
        with pytest.raises(openai.AuthenticationError):
            complete(base, "sk-polite")
        with pytest.raises(openai.AuthenticationError):
            complete(base, "sk-never-issued")
        assert complete(base, new_key).usage is not None
