"""Request-scoped access to the app's services (no module-level singletons)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from moeflow.gateway.generation import GenerationService


def get_service(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.service
    return service


ServiceDep = Annotated[GenerationService, Depends(get_service)]
