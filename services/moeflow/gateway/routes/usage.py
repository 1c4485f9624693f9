"""GET /admin/usage: tokens and requests per tenant, model and period (admin keys only).

``ApiKeyMiddleware`` lets only admin tenants reach ``/admin/*``. Query: ``tenant`` (repeatable;
default every tenant of the current table), ``start`` and ``end`` (unix seconds; default the
last 24 hours; at most 31 days), ``group_by`` = ``hour``, ``day`` (UTC) or ``range`` (one row
per tenant and model). ``requests`` counts answered requests (status below 400); tokens are the
``usage`` the clients received. Rows come from the shared store (Redis) plus what this replica
kept locally while Redis was unreachable.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from moeflow.domain.errors import InvalidRequestError
from moeflow.gateway.middleware import TenantGate

router = APIRouter()
_MAX_RANGE_S = 31 * 86400


class UsageEntry(BaseModel):
    tenant: str
    model: str
    period_start: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    object: Literal["usage_report"] = "usage_report"
    start: int
    end: int
    group_by: str
    data: list[UsageEntry]


@router.get("/admin/usage", response_model=UsageReport)
async def usage(
    request: Request,
    tenant: Annotated[list[str] | None, Query()] = None,
    start: int | None = None,
    end: int | None = None,
    group_by: Literal["hour", "day", "range"] = "day",
) -> UsageReport:
    gate: TenantGate = request.app.state.tenant_gate
    now = int(time.time())
    end = now + 1 if end is None else end
    start = end - 86400 if start is None else start
    if not 0 <= start < end or end - start > _MAX_RANGE_S:
        raise InvalidRequestError("need 0 <= start < end and a range of at most 31 days",
                                  param="start")
    names = tenant or sorted(gate.tenants.current().tenants)
    rows = [] if gate.quota is None else await gate.quota.usage(names, start, end, group_by)
    return UsageReport(start=start, end=end, group_by=group_by, data=[
        UsageEntry(tenant=r.tenant, model=r.model, period_start=r.period_start,
                   requests=r.requests, prompt_tokens=r.prompt_tokens,
                   completion_tokens=r.completion_tokens,
                   total_tokens=r.prompt_tokens + r.completion_tokens)
        for r in rows])
