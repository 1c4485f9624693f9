"""GET /v1/models, GET /v1/models/{id}, and GET /health."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.protocol import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(
        data=[
            ModelCard(id=m.name, created=m.info.created_unix, max_model_len=m.info.max_model_len)
            for m in service.registry.models.values()
        ]
    )


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, service: ServiceDep) -> ModelCard:
    m = service.registry.get(model_id)
    return ModelCard(id=m.name, created=m.info.created_unix, max_model_len=m.info.max_model_len)


@router.get("/health")
async def health(service: ServiceDep) -> JSONResponse:
    models = service.registry.models.values()
    num_healthy = sum(1 for m in models for i in m.instances if i.is_healthy)
    # a gateway that can wake its models serves them even at zero instances
    can_wake = service.wake is not None and service.wake.can_wake
    is_ok = num_healthy > 0 or (can_wake and bool(models))
    return JSONResponse(
        {"status": "ok" if is_ok else "unavailable", "healthy_instances": num_healthy,
         "scale_from_zero": can_wake},
        status_code=200 if is_ok else 503,
    )
