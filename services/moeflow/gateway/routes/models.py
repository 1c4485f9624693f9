"""GET /v1/models and GET /v1/models/{id}: base models, and their LoRA adapters with
``parent`` set to the base model."""

from __future__ import annotations

from fastapi import APIRouter, Request

from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.middleware import request_record
from moeflow.gateway.protocol import ERROR_RESPONSES, Model, ModelList
from moeflow.gateway.registry import ServedModel

router = APIRouter()


def _model(m: ServedModel) -> Model:
    return Model(id=m.public_name, created=m.info.created_unix,
                 max_model_len=m.info.max_model_len, parent=m.name if m.adapter else None)


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(service: ServiceDep) -> ModelList:
    data = []
    for m in service.registry.models.values():
        data.append(_model(m))
        data.extend(_model(m.with_adapter(a)) for a in m.adapters)
    return ModelList(data=data)


@router.get("/v1/models/{model_id}", responses=ERROR_RESPONSES)
async def get_model(model_id: str, request: Request, service: ServiceDep) -> Model:
    m = service.registry.get(model_id)
    request_record(request.scope).model = m.name
    return _model(m)
