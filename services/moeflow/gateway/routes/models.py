"""GET /v1/models and GET /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter

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
