"""A Model's LoRA adapters (`spec.engine.loraAdapters`, `loraMemory`): the CRD and the operator
accept and refuse the same specs, and the engine variables they become give the engine the
adapters and the budget."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from crd_schema import CrdValidator

from moeflow.domain.spec import SpecError, parse_model_spec
from moeflow.engine.config import EngineOptions

ADAPTERS = {"toy": "/models/smollm2-toy", "b2": "/adapters/b"}


def model(**engine: Any) -> dict[str, Any]:
    return {"apiVersion": "moeflow.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"},
            "spec": {"source": {"uri": "store://m"}, "engine": engine}}


def test_adapters_become_the_engines_settings(crd_validator: CrdValidator,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    obj = model(loraAdapters=ADAPTERS, loraMemory="64Mi")
    crd_validator.validate(crd_validator.defaulted(obj))
    env = parse_model_spec(obj["spec"]).engine.engine_env()
    assert set(env) == {"MOEFLOW_ENGINE_LORA_ADAPTERS", "MOEFLOW_ENGINE_LORA_MEMORY_BYTES"}
    for name in [n for n in os.environ if n.startswith("MOEFLOW_ENGINE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    options = EngineOptions()  # what the engine container reads
    assert options.lora_adapters == {k: Path(v) for k, v in ADAPTERS.items()}
    assert options.lora_memory_bytes == 64 * 2**20


@pytest.mark.parametrize("engine, field", [
    ({"loraAdapters": {"toy": "relative/dir"}}, "toy"),
    ({"loraMemory": "lots"}, "loraMemory"),
])
def test_schema_and_operator_refuse_bad_adapters(crd_validator: CrdValidator,
                                                 engine: dict[str, Any], field: str) -> None:
    obj = model(**engine)
    with pytest.raises(jsonschema.ValidationError) as e:
        crd_validator.validate(crd_validator.defaulted(obj))
    assert field in str(e.value.message) + ".".join(map(str, e.value.absolute_path))
    with pytest.raises(SpecError):
        parse_model_spec(obj["spec"])


def test_the_operator_refuses_an_adapter_name_the_engine_would() -> None:
    with pytest.raises(SpecError, match="adapter name"):
        parse_model_spec(model(loraAdapters={"-bad name": "/x"})["spec"])
