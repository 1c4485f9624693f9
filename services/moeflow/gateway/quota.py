"""Per-tenant quotas shared by every gateway replica, and usage metering.

Counters live in Redis and are changed only by Lua scripts, so a check and its charge are one
atomic step however many replicas admit requests at once (the ``limits`` package offers
rate-limit windows but no concurrency leases and no atomic check-then-charge of a weighted
cost, and would be one more dependency; three short scripts cover all of it).

* Requests per minute and tokens per minute are fixed windows that open at the first charge and
  last 60 s (a key with a TTL): over the limit, 429 with Retry-After = the window's remaining
  time. A burst at a window edge can reach twice the limit over 60 s; accepted for simplicity.
* Concurrent requests: a sorted set of leases (score = expiry). A replica that dies holding
  leases frees them after ``lease_s`` (the request timeout), never sooner, never later.
* Tokens: the prompt is charged at admission (refused when it would pass the limit); the
  completion is charged when the request ends (its final count), so a tenant can overshoot by
  what its requests in flight generate (bounded by ``concurrent_requests`` x ``max_tokens``);
  the next request then waits for the window to end.
* Usage (requests, prompt and completion tokens per tenant, model and hour) is kept for
  ``retention_days`` in Redis hashes; the admin route sums them per hour, day or the range.

When Redis is unreachable (or no URL is configured) the same rules run on this replica's
memory: ``on_redis_failure="open"`` (the default) serves with per-replica limits and local
usage, ``"closed"`` refuses /v1 requests with 503 until Redis answers. Redis is tried again
``retry_s`` after a failure, so a dead Redis costs one timeout per ``retry_s``, not one per
request. The fallback is logged when it starts and ends, and shown as
``moeflow_gateway_quota_backend{backend="redis"|"local"}``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from moeflow.domain.errors import BackendUnavailableError, OverloadedError
from moeflow.gateway.tenants import Tenant

if TYPE_CHECKING:
    from moeflow.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

WINDOW_S = 60
_HOUR_S = 3600

LimitName = Literal["requests_per_minute", "tokens_per_minute", "concurrent_requests"]


class QuotaExceededError(OverloadedError):
    """A tenant is over one of its limits: 429, ``rate_limit_exceeded``, the limit named."""

    code = "rate_limit_exceeded"

    def __init__(self, tenant: str, limit: LimitName, value: int, retry_after_s: int) -> None:
        super().__init__(f"tenant {tenant!r} is over its {limit} limit ({value}); retry after "
                         f"{retry_after_s} s", retry_after_s=max(1, retry_after_s))
        self.limit = limit


class QuotaUnavailableError(BackendUnavailableError):
    code = "quota_unavailable"


# KEYS: rpm window, concurrency set. ARGV: rpm limit, concurrency limit, lease id, lease ms.
# Returns {0, 0} admitted, {1, retry_ms} over rpm, {2, retry_ms} over concurrency.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, conc, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {2, math.min(1000, tonumber(first[2]) - now)}
  end
end
if rpm > 0 then
  local used = tonumber(redis.call('GET', KEYS[1]) or '0')
  if used >= rpm then return {1, redis.call('PTTL', KEYS[1])} end
  if redis.call('INCR', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
end
if conc > 0 then
  redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], lease_ms)
end
return {0, 0}
"""

# KEYS: tpm window. ARGV: limit, tokens, check (1: refuse past the limit), window ms.
# Returns {0, used} charged, {1, retry_ms} refused.
_CHARGE = """
local limit, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[3] == '1' and limit > 0 and used + n > limit then
  return {1, redis.call('PTTL', KEYS[1])}
end
local now_used = redis.call('INCRBY', KEYS[1], n)
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return {0, now_used}
"""


@dataclass(frozen=True)
class Lease:
    """One admitted request; ``Quota.release`` ends it."""

    tenant: str
    lease_id: str
    backend: Literal["redis", "local", "none"]


@dataclass(frozen=True)
class UsageRow:
    tenant: str
    model: str
    period_start: int
    """Unix seconds (UTC) of the hour, day or range start."""
    requests: int
    prompt_tokens: int
    completion_tokens: int


_FIELDS = ("requests", "prompt_tokens", "completion_tokens")


class _LocalCounters:
    """The same rules on this replica's memory (the fallback, and the store without Redis)."""

    def __init__(self) -> None:
        self.windows: dict[str, tuple[float, int]] = {}  # key -> (expires at, used)
        self.leases: dict[str, dict[str, float]] = defaultdict(dict)
        self.usage: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0, 0])

    def _window(self, key: str, now: float) -> tuple[float, int]:
        expires, used = self.windows.get(key, (0.0, 0))
        return (expires, used) if expires > now else (now + WINDOW_S, 0)

    def admit(self, rpm_key: str, conc_key: str, rpm: int, conc: int, lease_id: str,
              lease_s: float) -> tuple[int, float]:
        now = time.monotonic()
        leases = self.leases[conc_key]
        for lid in [k for k, exp in leases.items() if exp <= now]:
            del leases[lid]
        if conc and len(leases) >= conc:
            return 2, min(1.0, min(leases.values()) - now)
        expires, used = self._window(rpm_key, now)
        if rpm and used >= rpm:
            return 1, expires - now
        if rpm:
            self.windows[rpm_key] = (expires, used + 1)
        if conc:
            leases[lease_id] = now + lease_s
        return 0, 0.0

    def charge(self, key: str, limit: int, n: int, check: bool) -> tuple[int, float]:
        now = time.monotonic()
        expires, used = self._window(key, now)
        if check and limit and used + n > limit:
            return 1, expires - now
        self.windows[key] = (expires, used + n)
        return 0, 0.0


class Quota:
    """Admission, token charges and usage of tenants (see the module docstring)."""

    def __init__(self, redis_url: str | None, *, password: str | None = None,
                 prefix: str = "moeflow:quota:",
                 on_redis_failure: Literal["open", "closed"] = "open", lease_s: float = 600.0,
                 retry_s: float = 5.0, timeout_s: float = 0.5, retention_days: int = 35,
                 on_backend: Callable[[str], None] | None = None) -> None:
        # `password` applies when the URL has none (redis-py: the URL's own wins)
        self._redis = (aioredis.Redis.from_url(redis_url, password=password,
                                               socket_timeout=timeout_s,
                                               socket_connect_timeout=timeout_s)
                       if redis_url else None)
        self.prefix = prefix
        self.on_redis_failure = on_redis_failure
        self.lease_s = lease_s
        self.retry_s = retry_s
        self.retention_s = retention_days * 86400
        self.local = _LocalCounters()
        self._down_until = 0.0
        self.on_backend = on_backend
        self._admit = self._redis.register_script(_ADMIT) if self._redis else None
        self._charge = self._redis.register_script(_CHARGE) if self._redis else None

    @property
    def backend(self) -> Literal["redis", "local"]:
        if self._redis is None or time.monotonic() < self._down_until:
            return "local"
        return "redis"

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _on_redis(self, op: Callable[[], Awaitable[T]]) -> T | None:
        """``op`` on Redis; None when Redis is (or just went) unreachable, after applying the
        failure mode (``closed``: raise 503)."""
        if self.backend == "local":
            if self._redis is not None and self.on_redis_failure == "closed":
                raise QuotaUnavailableError("rate limiting is unavailable; try again shortly",
                                            )
            return None
        try:
            result = await op()
        except redis.exceptions.AuthenticationError as exc:
            # a wrong or missing password will not heal by itself: say so plainly, once per retry
            logger.error("quota store refused the password (%s); set MOEFLOW_REDIS_PASSWORD or"
                         " the URL's password; %s for %.0f s", exc,
                         "serving with this replica's counters"
                         if self.on_redis_failure == "open" else "refusing requests",
                         self.retry_s)
            self._fell_back()
            return None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            logger.warning("quota store unreachable (%s); %s for %.0f s", type(exc).__name__,
                           "serving with this replica's counters"
                           if self.on_redis_failure == "open" else "refusing requests",
                           self.retry_s)
            self._fell_back()
            return None
        if self.on_backend is not None:
            self.on_backend("redis")
        return result

    def _fell_back(self) -> None:
        """Redis just failed: local counters for ``retry_s``, or 503 when ``closed``."""
        self._down_until = time.monotonic() + self.retry_s
        if self.on_backend is not None:
            self.on_backend("local")
        if self.on_redis_failure == "closed":
            raise QuotaUnavailableError("rate limiting is unavailable; try again shortly")

    async def admit(self, tenant: Tenant) -> Lease:
        """Count one request against requests per minute and take a concurrency slot; raises
        ``QuotaExceededError`` (429) when over either."""
        limits = tenant.limits
        lease_id = uuid.uuid4().hex
        if not (limits.requests_per_minute or limits.concurrent_requests):
            return Lease(tenant.name, lease_id, "none")
        rpm_key, conc_key = self._key("rpm", tenant.name), self._key("conc", tenant.name)

        async def on_redis() -> list[int]:
            assert self._admit is not None
            result: list[int] = await self._admit(
                keys=[rpm_key, conc_key],
                args=[limits.requests_per_minute, limits.concurrent_requests, lease_id,
                      int(self.lease_s * 1000), WINDOW_S * 1000])
            return result

        found = await self._on_redis(on_redis)
        if found is not None:
            verdict, retry_s = int(found[0]), int(found[1]) / 1000
            backend: Literal["redis", "local"] = "redis"
        else:
            verdict, retry_s = self.local.admit(rpm_key, conc_key, limits.requests_per_minute,
                                                limits.concurrent_requests, lease_id,
                                                self.lease_s)
            backend = "local"
        if verdict == 1:
            raise QuotaExceededError(tenant.name, "requests_per_minute",
                                     limits.requests_per_minute, _ceil(retry_s))
        if verdict == 2:
            raise QuotaExceededError(tenant.name, "concurrent_requests",
                                     limits.concurrent_requests, _ceil(retry_s))
        return Lease(tenant.name, lease_id, backend)

    async def release(self, lease: Lease) -> None:
        """End a request's concurrency lease (best effort: an unreachable Redis expires it)."""
        conc_key = self._key("conc", lease.tenant)
        if lease.backend == "local":
            self.local.leases[conc_key].pop(lease.lease_id, None)
        elif lease.backend == "redis" and self._redis is not None:
            # unreachable: the lease expires by itself after lease_s
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self._redis.zrem(conc_key, lease.lease_id)

    async def charge_tokens(self, tenant: Tenant, num_tokens: int, *, check: bool) -> None:
        """Add ``num_tokens`` to the tenant's tokens-per-minute window; with ``check``, refuse
        (429) instead when they would pass the limit. Negative refunds."""
        limit = tenant.limits.tokens_per_minute
        if not limit or not num_tokens:
            return
        key = self._key("tpm", tenant.name)

        async def on_redis() -> list[int]:
            assert self._charge is not None
            result: list[int] = await self._charge(
                keys=[key], args=[limit, num_tokens, 1 if check else 0, WINDOW_S * 1000])
            return result

        try:
            found = await self._on_redis(on_redis)
        except QuotaUnavailableError:
            if check:
                raise
            return
        if found is not None:
            verdict, retry_s = int(found[0]), int(found[1]) / 1000
        else:
            verdict, retry_s = self.local.charge(key, limit, num_tokens, check)
        if verdict:
            raise QuotaExceededError(tenant.name, "tokens_per_minute", limit, _ceil(retry_s))

    async def record_usage(self, tenant: str, model: str, *, requests: int = 0,
                           prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Add to the tenant's usage of ``model`` in the current hour."""
        hour = int(time.time()) // _HOUR_S * _HOUR_S
        values = (requests, prompt_tokens, completion_tokens)
        key = self._key("usage", str(hour), tenant)

        async def on_redis() -> None:
            assert self._redis is not None
            async with self._redis.pipeline(transaction=True) as pipe:
                for name, value in zip(_FIELDS, values, strict=True):
                    if value:
                        pipe.hincrby(key, f"{model}\x1f{name}", value)
                pipe.expire(key, self.retention_s)
                await pipe.execute()
            return None

        try:
            if self._redis is not None and self.backend == "redis":
                await on_redis()
                return
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning("usage not written to the quota store (%s): kept on this replica",
                           type(exc).__name__)
        row = self.local.usage[(tenant, model, hour)]
        for i, value in enumerate(values):
            row[i] += value

    async def usage(self, tenants: list[str], start: int, end: int,
                    group_by: Literal["hour", "day", "range"]) -> list[UsageRow]:
        """Usage of ``tenants`` in the hours from ``start`` to ``end`` (unix seconds), summed
        per tenant, model and period; Redis' rows plus what this replica kept locally."""
        hours = list(range(start // _HOUR_S * _HOUR_S, end, _HOUR_S))
        totals: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0, 0])

        def period(hour: int) -> int:
            if group_by == "hour":
                return hour
            return hour // 86400 * 86400 if group_by == "day" else start

        if self._redis is not None and self.backend == "redis" and hours:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for tenant in tenants:
                        for hour in hours:
                            pipe.hgetall(self._key("usage", str(hour), tenant))
                    found = await pipe.execute()
            except (redis.exceptions.RedisError, OSError) as exc:
                raise QuotaUnavailableError("usage is unavailable while its store is "
                                            "unreachable") from exc
            i = 0
            for tenant in tenants:
                for hour in hours:
                    for raw_field, raw_value in found[i].items():
                        model, _, name = raw_field.decode().rpartition("\x1f")
                        totals[(tenant, model, period(hour))][_FIELDS.index(name)] += int(
                            raw_value)
                    i += 1
        wanted = set(tenants)
        for (tenant, model, hour), values in self.local.usage.items():
            if tenant in wanted and start // _HOUR_S * _HOUR_S <= hour < end:
                row = totals[(tenant, model, period(hour))]
                for j, value in enumerate(values):
                    row[j] += value
        return [UsageRow(t, m, p, *v) for (t, m, p), v in sorted(totals.items())]


def _ceil(seconds: float) -> int:
    return max(1, int(-(-seconds // 1)))


def quota_from_settings(settings: GatewaySettings) -> Quota:
    """The gateway's quota store: its Redis (password apart from the URL), failure policy,
    leases that outlive the longest request."""
    url, password = settings.quota_redis_url, settings.quota_redis_password
    return Quota(url.get_secret_value() if url else None,
                 password=password.get_secret_value() if password else None,
                 prefix=settings.quota_key_prefix,
                 on_redis_failure=settings.quota_on_redis_failure,
                 lease_s=settings.request_timeout_s + 60,
                 retention_days=settings.usage_retention_days)
