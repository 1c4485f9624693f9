"""GET /v1/models and GET /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.middleware import request_record
from moeflow.gateway.protocol import ERROR_RESPONSES, Model, ModelList

router = APIRouter()


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(
        data=[
            Model(id=m.name, created=m.info.created_unix, max_model_len=m.info.max_model_len)
            for m in service.registry.models.values()
        ]
    )


@router.get("/v1/models/{model_id}", responses=ERROR_RESPONSES)
async def get_model(model_id: str, request: Request, service: ServiceDep) -> Model:
    m = service.registry.get(model_id)
    request_record(request.scope).model = m.name
    return Model(id=m.name, created=m.info.created_unix, max_model_len=m.info.max_model_len)
