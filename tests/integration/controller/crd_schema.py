"""CRD openAPIV3Schema -> JSON Schema, and the API server's structural defaulting.

The emulator validates nothing, so tests validate every custom resource they apply (and every
object the operator writes, status included) with jsonschema against the CRD in deploy/crds.

Conversion rules (what the API server does that plain JSON Schema would not):
- objects with `properties` are closed (`additionalProperties: false`): kubectl's default
  strict field validation rejects unknown fields instead of pruning them silently;
- `x-kubernetes-int-or-string` keeps its `anyOf` (integer | string);
- `x-kubernetes-preserve-unknown-fields` opens an object; other `x-kubernetes-*` keys
  (CEL `x-kubernetes-validations`, list types) are dropped: CEL is not evaluated here, which is
  why the operator re-checks those rules itself.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Mapping
from typing import Any

import jsonschema
import yaml

CRD_DIR = pathlib.Path(__file__).resolve().parents[3] / "deploy" / "crds"


def load_crds(crd_dir: pathlib.Path = CRD_DIR) -> dict[str, dict[str, Any]]:
    """CRDs by kind."""
    crds = [yaml.safe_load(p.read_text()) for p in sorted(crd_dir.glob("*.yaml"))]
    return {crd["spec"]["names"]["kind"]: crd for crd in crds}


def openapi_schema(crd: Mapping[str, Any], version: str = "v1alpha1") -> dict[str, Any]:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return dict(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"version {version} not in CRD {crd['metadata']['name']}")


def to_json_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            result[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            result[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            result[key] = [to_json_schema(sub) for sub in value]
        elif key == "nullable":
            continue
        else:
            result[key] = copy.deepcopy(value)
    if schema.get("nullable") and "type" in result:
        result["type"] = [result["type"], "null"]
    is_open = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and "additionalProperties" not in schema and not is_open:
        result["additionalProperties"] = False
    return result


def apply_defaults(obj: Any, schema: Mapping[str, Any]) -> Any:
    """A copy of `obj` with the schema's defaults filled in, recursively (a defaulted object
    gets its own properties' defaults too), as the API server does on create and update."""
    if not isinstance(obj, Mapping):
        return copy.deepcopy(obj)
    result = {k: copy.deepcopy(v) for k, v in obj.items()}
    for name, sub in (schema.get("properties") or {}).items():
        if name not in result and "default" in sub:
            result[name] = copy.deepcopy(sub["default"])
        if name in result:
            result[name] = apply_defaults(result[name], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        for name in result.keys() - (schema.get("properties") or {}).keys():
            result[name] = apply_defaults(result[name], extra)
    return result


class CrdValidator:
    """Validates and defaults moeflow.dev objects like the API server would (minus CEL)."""

    def __init__(self, crds: Mapping[str, Mapping[str, Any]]) -> None:
        self._schemas = {kind: openapi_schema(crd) for kind, crd in crds.items()}
        self._validators = {
            kind: jsonschema.Draft7Validator(to_json_schema(schema))
            for kind, schema in self._schemas.items()
        }

    def kinds(self) -> list[str]:
        return sorted(self._schemas)

    def defaulted(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = apply_defaults(obj, self._schemas[obj["kind"]])
        return result

    def validate(self, obj: Mapping[str, Any]) -> None:
        """Raise jsonschema.ValidationError naming the first bad field."""
        self._validators[obj["kind"]].validate(dict(obj))

    def errors(self, obj: Mapping[str, Any]) -> list[str]:
        validator = self._validators[obj["kind"]]
        return sorted(
            f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(dict(obj))
        )
