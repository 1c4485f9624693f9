"""The FineTune CRD: it refuses bad specs (the operator's own parser refuses the same), its
defaults are the operator's, every CEL rule is mirrored by the operator, and the example is
valid."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml
from cluster_kit import EXAMPLES
from crd_schema import CrdValidator, load_crds, openapi_schema

from moeflow.domain.finetune_spec import FineTuneSpec, parse_finetune_spec
from moeflow.domain.spec import SpecError

CRD = load_crds()["FineTune"]


def minimal(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "moeflow.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "f"},
            "spec": {"baseModel": {"uri": "store://m"}, "dataset": {"configMap": {"name": "c"}},
                     "output": {"uri": "pvc://out"}, **spec}}


def descriptions_missing(schema: dict[str, Any], path: str = "") -> list[str]:
    missing = [] if schema.get("description") else [path or "<root>"]
    for name, sub in (schema.get("properties") or {}).items():
        missing += descriptions_missing(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        missing += descriptions_missing(schema["items"], f"{path}[]")
    return missing


def test_names_columns_and_descriptions() -> None:
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "FineTune", "finetunes", ["mfft"])
    columns = [c["name"] for c in CRD["spec"]["versions"][0]["additionalPrinterColumns"]
               if not c.get("priority")]
    assert columns == ["Phase", "Step", "Total", "Loss", "Age"]
    assert descriptions_missing(openapi_schema(CRD)) == []


@pytest.mark.parametrize("bad, field", [
    ({"baseModel": {"uri": "s3://bucket/m"}}, "uri"),
    ({"dataset": {"uri": "http://x/data.jsonl"}}, "uri"),
    ({"dataset": {"uri": "pvc://claim-only"}}, "uri"),
    ({"dataset": {"configMap": {"name": "c"}, "format": "parquet"}}, "format"),
    ({"output": {"uri": "s3://bucket/out"}}, "uri"),
    ({"output": None}, "output"),
    ({"method": "dpo"}, "method"),
    ({"hyperParameters": {"loraRank": 0}}, "loraRank"),
    ({"hyperParameters": {"loraAlpha": 0}}, "loraAlpha"),
    ({"hyperParameters": {"loraDropout": 0.95}}, "loraDropout"),
    ({"hyperParameters": {"targetModules": []}}, "targetModules"),
    ({"hyperParameters": {"targetModules": ["q proj"]}}, "targetModules"),
    ({"hyperParameters": {"learningRate": 2}}, "learningRate"),
    ({"hyperParameters": {"epochs": 0}}, "epochs"),
    ({"hyperParameters": {"maxLength": 8}}, "maxLength"),
    ({"hyperParameters": {"batchSize": "four"}}, "batchSize"),
    ({"hyperParameters": {"dtype": "float16"}}, "dtype"),
    ({"hyperParameters": {"optimizer": "sgd"}}, "optimizer"),
    ({"devices": 65}, "devices"),
    ({"backoffLimit": -1}, "backoffLimit"),
    ({"resources": {"cpu": "lots"}}, "cpu"),
])
def test_schema_refuses_bad_finetunes(crd_validator: CrdValidator, bad: dict[str, Any],
                                      field: str) -> None:
    obj = minimal()
    obj["spec"].update(bad)
    obj["spec"] = {k: v for k, v in obj["spec"].items() if v is not None}
    with pytest.raises(jsonschema.ValidationError) as e:
        crd_validator.validate(crd_validator.defaulted(obj))
    assert field in str(e.value.message) + ".".join(map(str, e.value.absolute_path))
    with pytest.raises(SpecError):  # and the operator refuses the same spec by itself
        parse_finetune_spec(obj["spec"])


def test_crd_defaults_are_the_operators_defaults(crd_validator: CrdValidator) -> None:
    defaulted = crd_validator.defaulted(minimal())["spec"]
    assert parse_finetune_spec(defaulted) == FineTuneSpec.model_validate(minimal()["spec"])
    hyper = defaulted["hyperParameters"]
    assert hyper["loraRank"] == 8 and hyper["targetModules"] == [
        "q_proj", "k_proj", "v_proj", "o_proj"]
    assert defaulted["dataset"]["configMap"]["key"] == "train.jsonl"


def _cel(schema: dict[str, Any], path: str = "") -> list[tuple[str, str, str]]:
    rules = [(path, r["rule"], r["message"]) for r in schema.get("x-kubernetes-validations", [])]
    for name, sub in (schema.get("properties") or {}).items():
        rules += _cel(sub, f"{path}.{name}")
    return rules


# Each CEL rule (by message) and a spec that breaks it; the JSON schema lets these through.
CEL_CASES: dict[str, dict[str, Any] | None] = {
    "learningRate must be > 0": {"hyperParameters": {"learningRate": 0}},
    "dataset: set exactly one of configMap and uri": {"dataset": {}},
    "dataset.uri must not contain '..'": {"dataset": {"uri": "pvc://c/../x.jsonl"}},
    "output.uri must not contain '..'": {"output": {"uri": "store://../other"}},
    "spec is immutable": None,  # a transition rule: no create can break it
    "metadata.name must be at most 50": None,  # check_finetune_name, unit-tested
}


def test_every_cel_rule_is_also_checked_by_the_operator(crd_validator: CrdValidator) -> None:
    rules = _cel(openapi_schema(CRD))
    assert len(rules) == len(CEL_CASES)
    for _, _, message in rules:
        (bad,) = [case for prefix, case in CEL_CASES.items() if message.startswith(prefix)]
        if bad is None:
            continue
        obj = minimal(**bad)
        crd_validator.validate(crd_validator.defaulted(obj))  # the JSON schema passes it
        with pytest.raises(SpecError):
            parse_finetune_spec(copy.deepcopy(obj["spec"]))


def test_the_example_is_valid(crd_validator: CrdValidator) -> None:
    config_map, finetune = yaml.safe_load_all((EXAMPLES / "finetune-toy.yaml").read_text())
    crd_validator.validate(crd_validator.defaulted(finetune))
    spec = parse_finetune_spec(crd_validator.defaulted(finetune)["spec"])
    assert spec.dataset.config_map is not None
    assert spec.dataset.config_map.name == config_map["metadata"]["name"]
