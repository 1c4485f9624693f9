"""Gateway health: GET /health/live, GET /health/ready and GET /health (= ready).

Liveness is the process answering. Readiness is whether a request for each served model would
be served: a model is ``ready`` (every instance healthy), ``degraded`` (every role it needs
still has a healthy instance), ``scaled_to_zero`` (no instance, but this gateway can wake it:
a request waits for the scale-up) or ``unavailable``. Bodies name states and counts, never
instance addresses (the status page, behind the API key, shows those).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from moeflow.domain.roles import Role
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.registry import ServedModel

router = APIRouter()


def model_state(model: ServedModel, *, can_wake: bool) -> str:
    """ready, degraded, scaled_to_zero or unavailable (see the module docstring)."""
    if not model.instances:
        return "scaled_to_zero" if can_wake else "unavailable"
    healthy: dict[Role, list[bool]] = {}
    for instance in model.instances:
        role = Role(instance.role).routes_as
        if role is Role.EXPERT:
            continue  # expert instances serve attention instances, not the gateway
        healthy.setdefault(role, []).append(instance.is_healthy)
    can_colocate = any(healthy.get(Role.COLOCATED, []))
    can_split = any(healthy.get(Role.PREFILL, [])) and any(healthy.get(Role.DECODE, []))
    if not (can_colocate or can_split):
        return "unavailable"
    if all(all(states) for states in healthy.values()):
        return "ready"
    return "degraded"


@router.get("/health/live")
async def live() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/health/ready")
@router.get("/health")
async def ready(service: ServiceDep) -> JSONResponse:
    can_wake = service.wake is not None and service.wake.can_wake
    states = {m.name: model_state(m, can_wake=can_wake)
              for m in service.registry.models.values()}
    is_ok = bool(states) and all(s != "unavailable" for s in states.values())
    num_healthy = sum(1 for m in service.registry.models.values()
                      for i in m.instances if i.is_healthy)
    return JSONResponse(
        {"status": "ok" if is_ok else "unavailable", "models": states,
         "healthy_instances": num_healthy, "scale_from_zero": can_wake},
        status_code=200 if is_ok else 503,
    )
