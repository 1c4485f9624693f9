"""Tenants, keys and request quotas at the edge (ApiKeyMiddleware with a TenantGate, local
counters), the tenants file and its reload, and `moeflow tenants`."""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from moeflow.gateway.middleware import ApiKeyMiddleware, TenantGate
from moeflow.gateway.quota import Quota, QuotaExceededError, QuotaUnavailableError
from moeflow.gateway.tenants import (
    TenantSource,
    TenantSpec,
    build_table,
    current_tenant,
    hash_key,
    read_tenants_file,
    write_tenants_file,
)
from moeflow.gateway.tenants_cli import main as tenants_main


async def whoami(request: Request) -> JSONResponse:
    tenant = current_tenant.get()
    return JSONResponse({"tenant": tenant.name if tenant else None})


def inner() -> Starlette:
    return Starlette(routes=[Route("/v1/whoami", whoami), Route("/metrics", whoami),
                             Route("/status/data", whoami), Route("/health", whoami)])


def gateway(source: TenantSource, quota: Quota | None = None) -> httpx.AsyncClient:
    app = ApiKeyMiddleware(inner(), gate=TenantGate(source, quota))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tenants_file(tmp_path: Path, specs: dict[str, TenantSpec]) -> Path:
    path = tmp_path / "tenants.yaml"
    write_tenants_file(path, specs)
    return path


def test_keys_are_stored_hashed_and_plain_keys_are_refused_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"tenants": {"a": {"keys": ["sk-plain"]}}}))
    with pytest.raises(ValueError, match="stored hashed"):
        read_tenants_file(path)
    path.write_text(json.dumps({"tenants": {"a": {"keys": [hash_key("sk-a")],
                                                  "tokens_per_minute": 10}}}))
    specs = read_tenants_file(path)
    assert specs["a"].tokens_per_minute == 10
    assert "sk-a" not in path.read_text()


def test_a_key_shared_by_two_tenants_is_refused() -> None:
    with pytest.raises(ValueError, match="also a key"):
        build_table({"a": TenantSpec(keys=(hash_key("k"),)),
                     "b": TenantSpec(keys=(hash_key("k"),))})


def test_flat_keys_are_the_default_tenant_and_admin_only_without_other_admins() -> None:
    alone = build_table({}, flat_keys=["k1"])
    assert alone.lookup("k1") is not None and alone.lookup("k1").admin  # type: ignore[union-attr]
    with_admin = build_table({}, flat_keys=["k1"], admin_keys=["root"])
    default, admin = with_admin.lookup("k1"), with_admin.lookup("root")
    assert default is not None and default.name == "default" and not default.admin
    assert admin is not None and admin.admin
    assert with_admin.lookup("k2") is None


async def test_the_caller_is_known_by_its_tenant_and_unknown_keys_get_401(
        tmp_path: Path) -> None:
    path = tenants_file(tmp_path, {"team-a": TenantSpec(keys=(hash_key("sk-a"),))})
    async with gateway(TenantSource(path)) as c:
        known = await c.get("/v1/whoami", headers=bearer("sk-a"))
        unknown = await c.get("/v1/whoami", headers=bearer("sk-b"))
        missing = await c.get("/v1/whoami")
    assert known.json() == {"tenant": "team-a"}
    for r in (unknown, missing):
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert "sk-" not in r.text


async def test_admin_paths_need_an_admin_key_and_health_is_open(tmp_path: Path) -> None:
    path = tenants_file(tmp_path, {"team-a": TenantSpec(keys=(hash_key("sk-a"),)),
                                   "ops": TenantSpec(keys=(hash_key("sk-ops"),), admin=True)})
    async with gateway(TenantSource(path)) as c:
        assert (await c.get("/health")).status_code == 200
        for admin_path in ("/metrics", "/status/data"):
            user = await c.get(admin_path, headers=bearer("sk-a"))
            assert user.status_code == 403
            assert user.json()["error"]["code"] == "permission_denied"
            assert (await c.get(admin_path)).status_code == 401
            assert (await c.get(admin_path, headers=bearer("sk-ops"))).status_code == 200
        # a browser on the status page sends the key as the Basic password
        basic = base64.b64encode(b"anyone:sk-ops").decode()
        page = await c.get("/status/data", headers={"Authorization": f"Basic {basic}"})
        assert page.status_code == 200
        refused = await c.get("/status/data")
        assert 'Basic realm="moeflow admin"' in refused.headers.get_list("www-authenticate")
        # Basic is for admin pages only: /v1 takes bearer keys
        v1 = await c.get("/v1/whoami", headers={"Authorization": f"Basic {basic}"})
        assert v1.status_code == 401


async def test_over_its_request_rate_a_tenant_gets_429_and_the_other_does_not(
        tmp_path: Path) -> None:
    path = tenants_file(tmp_path, {
        "small": TenantSpec(keys=(hash_key("sk-small"),), requests_per_minute=2),
        "big": TenantSpec(keys=(hash_key("sk-big"),), requests_per_minute=100)})
    async with gateway(TenantSource(path), Quota(None)) as c:
        small = [await c.get("/v1/whoami", headers=bearer("sk-small")) for _ in range(3)]
        big = [await c.get("/v1/whoami", headers=bearer("sk-big")) for _ in range(5)]
    assert [r.status_code for r in small] == [200, 200, 429]
    refused = small[2]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "requests_per_minute" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert [r.status_code for r in big] == [200] * 5


async def test_concurrent_requests_are_bounded_per_tenant_and_freed_at_the_end() -> None:
    quota = Quota(None)
    table = build_table({"a": TenantSpec(keys=(hash_key("k"),), concurrent_requests=2)})
    tenant = table.tenants["a"]
    first, second = await quota.admit(tenant), await quota.admit(tenant)
    with pytest.raises(Exception, match="concurrent_requests"):
        await quota.admit(tenant)
    await quota.release(first)
    third = await quota.admit(tenant)
    for lease in (second, third):
        await quota.release(lease)


async def test_tokens_per_minute_refuse_a_prompt_that_would_pass_the_limit() -> None:
    quota = Quota(None)
    tenant = build_table({"a": TenantSpec(keys=(hash_key("k"),),
                                          tokens_per_minute=100)}).tenants["a"]
    await quota.charge_tokens(tenant, 60, check=True)
    await quota.charge_tokens(tenant, 30, check=False)  # a completion, charged at the end
    with pytest.raises(Exception, match="tokens_per_minute") as refused:
        await quota.charge_tokens(tenant, 20, check=True)
    assert getattr(refused.value, "retry_after_s", 0) >= 1
    await quota.charge_tokens(tenant, 10, check=True)  # exactly up to the limit still fits


async def test_a_rotated_key_works_after_reload_and_the_old_one_gets_401(tmp_path: Path) -> None:
    path = tenants_file(tmp_path, {"a": TenantSpec(keys=(hash_key("sk-old"),))})
    async with gateway(TenantSource(path, reload_interval_s=0)) as c:
        assert (await c.get("/v1/whoami", headers=bearer("sk-old"))).status_code == 200
        write_tenants_file(path, {"a": TenantSpec(keys=(hash_key("sk-new"),))})
        assert (await c.get("/v1/whoami", headers=bearer("sk-new"))).status_code == 200
        assert (await c.get("/v1/whoami", headers=bearer("sk-old"))).status_code == 401
        path.write_text("tenants: [not, a, mapping")  # a broken edit keeps the last table
        assert (await c.get("/v1/whoami", headers=bearer("sk-new"))).status_code == 200


def test_moeflow_tenants_prints_a_key_once_and_stores_only_its_hash(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tenants.yaml"
    assert tenants_main(["add-key", str(path), "team-a", "--tokens-per-minute", "500",
                         "--model", "tiny"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-mf-") and key not in path.read_text()
    spec = read_tenants_file(path)["team-a"]
    assert spec.keys == (hash_key(key),) and spec.tokens_per_minute == 500
    assert spec.models == ("tiny",)
    assert path.stat().st_mode & 0o077 == 0
    table = TenantSource(path).current()
    assert table.lookup(key) is not None
    assert tenants_main(["revoke-key", str(path), "team-a", "--key", key]) == 0
    assert TenantSource(path).current().lookup(key) is None


def unreachable_redis_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there: connections are refused


async def test_without_redis_open_mode_enforces_limits_locally_and_closed_mode_refuses() -> None:
    tenant = build_table({"a": TenantSpec(keys=(hash_key("k"),),
                                          requests_per_minute=1)}).tenants["a"]
    backends: list[str] = []
    fail_open = Quota(unreachable_redis_url(), on_redis_failure="open",
                      on_backend=backends.append)
    await fail_open.admit(tenant)  # Redis refused: this replica's counters decide
    assert fail_open.backend == "local" and backends == ["local"]
    with pytest.raises(QuotaExceededError, match="requests_per_minute"):
        await fail_open.admit(tenant)
    await fail_open.aclose()
    fail_closed = Quota(unreachable_redis_url(), on_redis_failure="closed")
    with pytest.raises(QuotaUnavailableError) as refused:
        await fail_closed.admit(tenant)
    assert refused.value.status_code == 503
    assert "127.0.0.1" not in refused.value.message  # no internal address for clients
    await fail_closed.aclose()
