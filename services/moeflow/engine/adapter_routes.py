"""The engine's LoRA adapter API: load, unload and list adapters at run time.

``POST /v1/adapters/load {"name", "path"}`` reads a PEFT adapter folder on the instance's own
file system (off the event loop) and makes it servable; ``POST /v1/adapters/unload {"name"}``
stops new requests from using it (those in flight finish with it); ``GET /v1/adapters`` lists
them with their memory and use. Like every engine route but health and metrics, these need the
internal token when one is set. Errors are the OpenAI envelope (``moeflow.web.errors``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from moeflow.engine.adapter_store import AdapterStore
from moeflow.engine.kernels.openmp import then_release


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1, max_length=4096)
    """The adapter's folder (adapter_config.json, adapter_model.safetensors) on this instance."""


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)


def add_adapter_routes(app: FastAPI, store: AdapterStore) -> None:
    @app.post("/v1/adapters/load")
    async def load(body: LoadAdapter) -> dict[str, object]:
        known = await asyncio.to_thread(then_release(store.load), body.name, Path(body.path))
        return {"name": known.name, "loaded": True}

    @app.post("/v1/adapters/unload")
    async def unload(body: UnloadAdapter) -> dict[str, object]:
        store.unload(body.name)
        return {"name": body.name, "loaded": False}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict[str, object]:
        return {"data": store.describe(), "budget_bytes": store.budget_bytes}
