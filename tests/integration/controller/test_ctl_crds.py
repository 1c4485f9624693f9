"""The CRDs in deploy/crds: shape, schema refusals, defaults equal to the operator's, and the
cross-field (CEL) rules mirrored by the operator's own checks."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cluster_kit import EXAMPLES
from crd_schema import CRD_DIR, CrdValidator, load_crds, openapi_schema

from moeflow.domain.spec import ModelSpec, RequestSpec, SpecError, parse_model_spec, parse_spec

CRDS = load_crds()


def minimal_model(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "moeflow.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"},
            "spec": {"source": {"uri": "store://m"}, **spec}}


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_crd_has_the_common_shape(kind: str) -> None:
    crd = CRDS[kind]
    spec = crd["spec"]
    assert spec["group"] == "moeflow.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["categories"] == ["moeflow"]
    assert spec["names"]["shortNames"][0].startswith("mf")
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"]["status"] == {}
    assert set(version["subresources"]) <= {"status", "scale"}
    assert version["additionalPrinterColumns"][-1]["name"] == "Age"
    status = openapi_schema(crd)["properties"]["status"]["properties"]
    assert status["conditions"]["items"]["required"] == ["type", "status"]


# Kinds a cluster commonly has already: `kubectl get <plural>` or a short name of ours must never
# show theirs (the v1alpha1 `Job` was shadowed by batch/v1, `Task` by Tekton).
COMMON_KINDS = {
    # core, apps, batch
    "Pod", "Service", "Job", "CronJob", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet",
    "Event", "Endpoints", "Node", "Namespace", "ConfigMap", "Secret",
    # Tekton (pipelines, triggers)
    "Task", "TaskRun", "Pipeline", "PipelineRun", "ClusterTask", "StepAction", "CustomRun",
    "Run", "EventListener", "TriggerTemplate", "TriggerBinding", "Trigger",
    # Argo (Workflows, CD, Rollouts, Events)
    "Workflow", "WorkflowTemplate", "ClusterWorkflowTemplate", "CronWorkflow",
    "WorkflowTaskSet", "WorkflowTaskResult", "WorkflowEventBinding", "WorkflowArtifactGCTask",
    "Application", "ApplicationSet", "AppProject", "Rollout", "AnalysisRun",
    "AnalysisTemplate", "ClusterAnalysisTemplate", "Experiment", "EventSource", "Sensor",
    "EventBus",
    # the serving ecosystem that sits beside MoEFlow
    "InferenceService", "ServingRuntime", "InferencePool", "InferenceModel", "LeaderWorkerSet",
}
COMMON_SHORT_NAMES = {"po", "svc", "job", "cj", "deploy", "sts", "ds", "rs", "ev", "ep", "no",
                      "ns", "cm", "wf", "cwf", "wftmpl", "app", "ro", "tr", "pr", "isvc", "hpa"}


def undescribed(schema: dict[str, Any], path: str) -> list[str]:
    """Every field below `path` without a description (what `kubectl explain` would show)."""
    missing = [] if schema.get("description") else [path]
    for name, sub in (schema.get("properties") or {}).items():
        missing += undescribed(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        for name, sub in (schema["items"].get("properties") or {}).items():
            missing += undescribed(sub, f"{path}[].{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        missing += undescribed(schema["additionalProperties"], f"{path}{{}}")
    return missing


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_field_is_described(kind: str) -> None:
    schema = openapi_schema(CRDS[kind])
    assert schema["description"]
    missing = [path for part in ("spec", "status")
               for path in undescribed(schema["properties"][part], part)]
    assert missing == []


def test_no_kind_collides_with_common_kinds() -> None:
    names = [crd["spec"]["names"] for crd in CRDS.values()]
    kinds = {n["kind"] for n in names}
    assert kinds.isdisjoint(COMMON_KINDS), kinds & COMMON_KINDS
    plurals = {n["plural"] for n in names} | {n["singular"] for n in names}
    assert plurals.isdisjoint({k.lower() + s for k in COMMON_KINDS for s in ("", "s")})
    short = {s for n in names for s in n.get("shortNames", [])}
    assert short.isdisjoint(COMMON_SHORT_NAMES) and len(short) == sum(
        len(n.get("shortNames", [])) for n in names)
    assert {"RoleGroup", "EngineInstance"} <= kinds and not kinds & {"Job", "Task"}


def test_no_crd_points_at_a_missing_design_doc() -> None:
    for path in CRD_DIR.glob("*.yaml"):
        assert "DESIGN.md" not in path.read_text(), path.name


def test_role_group_has_the_scale_subresource_and_answers_is_it_serving() -> None:
    (version,) = CRDS["RoleGroup"]["spec"]["versions"]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    status = openapi_schema(CRDS["RoleGroup"])["properties"]["status"]["properties"]
    assert status["selector"]["type"] == "string" and status["replicas"]["type"] == "integer"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Desired"] == ".spec.replicas" and columns["Ready"] == ".status.summary"
    (instance,) = CRDS["EngineInstance"]["spec"]["versions"]
    columns = {c["name"]: c["jsonPath"] for c in instance["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Node"] == ".status.nodeName"


def test_model_engine_fields_reach_every_template() -> None:
    """What a Model says about its Pods is carried by RoleGroup and EngineInstance templates
    (the operator writes them there; a closed schema would prune what it lacks)."""
    model = openapi_schema(CRDS["Model"])["properties"]["spec"]["properties"]
    for kind in ("RoleGroup", "EngineInstance"):
        template = openapi_schema(CRDS[kind])["properties"]["spec"]["properties"]["template"]
        for field in ("source", "engine", "env", "nodeSelector", "tolerations", "affinity",
                      "podTemplate"):
            assert template["properties"][field] == model[field], (kind, field)


def structural_problems(schema: dict[str, Any], path: str = "") -> list[str]:
    """The API server's structural-schema rules that a CRD must satisfy to be accepted."""
    problems = []
    special = schema.get("x-kubernetes-int-or-string") or schema.get(
        "x-kubernetes-preserve-unknown-fields")
    if "type" not in schema and not special:
        problems.append(f"{path or '<root>'}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: both properties and additionalProperties")
    for junction in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(junction, []):
            if set(sub) & {"description", "default", "properties", "items"}:
                problems.append(f"{path}.{junction}: may only hold value validations")
    for name, sub in (schema.get("properties") or {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += structural_problems(schema[key], f"{path}[]")
    return problems


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crds_are_valid_and_structural(kind: str) -> None:
    kubernetes_validate.validate(CRDS[kind], "1.37.0", strict=True)
    assert structural_problems(openapi_schema(CRDS[kind])) == []


def test_model_printer_columns_show_mode_and_ready_per_role() -> None:
    columns = {c["name"]: c["jsonPath"] for c in
               CRDS["Model"]["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Mode"] == ".spec.mode"
    assert columns["Ready"] == ".status.readySummary"


@pytest.mark.parametrize("bad, field", [
    ({"mode": "sharded"}, "mode"),
    ({"roles": {"colocated": {"replicas": -1}}}, "replicas"),
    ({"devicesPerInstance": -2}, "devicesPerInstance"),
    ({"source": None}, "source"),
    ({"source": {"uri": "s3://bucket/model"}}, "uri"),
    ({"roles": {"everything": {}}}, "everything"),
    ({"gateway": {"replicas": 1, "tls": True}}, "tls"),
    ({"resources": {"cpu": "lots"}}, "cpu"),
    ({"source": {"uri": "hf://no-org"}}, "uri"),
    ({"source": {"uri": "hf://org/name", "hub": {"token": "hf_literal"}}}, "token"),
    ({"source": {"uri": "hf://org/name", "hub": {"tokenSecretRef": {"key": "k"}}}}, "name"),
])
def test_schema_refuses_bad_models(crd_validator: CrdValidator, bad: dict[str, Any],
                                   field: str) -> None:
    model = minimal_model()
    model["spec"].update(bad)
    model["spec"] = {k: v for k, v in model["spec"].items() if v is not None}
    with pytest.raises(jsonschema.ValidationError) as e:
        crd_validator.validate(crd_validator.defaulted(model))
    assert field in str(e.value.message) + ".".join(map(str, e.value.absolute_path))
    with pytest.raises(SpecError):  # and the operator refuses the same spec by itself
        parse_model_spec(model["spec"])


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(crd_validator: CrdValidator, path: Any) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] in CRDS:
            crd_validator.validate(crd_validator.defaulted(doc))


def test_crd_defaults_are_the_operators_defaults(crd_validator: CrdValidator) -> None:
    model = crd_validator.defaulted(minimal_model())
    assert parse_model_spec(model["spec"]) == ModelSpec.model_validate(
        {"source": {"uri": "store://m"}})
    assert model["spec"]["roles"] == {} and model["spec"]["gateway"] == {"replicas": 1}
    request = {"kind": "Request", "spec": {"model": "m", "input": {"name": "cm"}}}
    defaulted = crd_validator.defaulted(request)["spec"]
    assert parse_spec(RequestSpec, defaulted) == parse_spec(RequestSpec, request["spec"])
    role = crd_validator.defaulted(minimal_model(roles={"colocated": {}}))
    assert role["spec"]["roles"]["colocated"] == {"replicas": 1, "minReplicas": 0}
    hub_source = {"uri": "hf://org/name@v1", "hub": {"tokenSecretRef": {"name": "s"}}}
    hub = crd_validator.defaulted(minimal_model(source=hub_source))
    assert hub["spec"]["source"]["hub"] == {"offline": False, "cache": {},
                                            "tokenSecretRef": {"name": "s", "key": "HF_TOKEN"}}
    assert parse_model_spec(hub["spec"]) == ModelSpec.model_validate({"source": hub_source})


def _cel_messages(schema: dict[str, Any]) -> list[str]:
    messages = [r["message"] for r in schema.get("x-kubernetes-validations", [])]
    for sub in (schema.get("properties") or {}).values():
        messages += _cel_messages(sub)
    return messages


# Each CEL rule of the Model CRD (by its message), and a spec that breaks it; the JSON schema
# lets these through, so the operator must refuse them itself.
CEL_CASES: dict[str, dict[str, Any] | None] = {
    "minReplicas must be <= maxReplicas":
        {"roles": {"colocated": {"replicas": 1, "minReplicas": 3, "maxReplicas": 2}}},
    "replicas must be >= minReplicas":
        {"roles": {"colocated": {"replicas": 1, "minReplicas": 2}}},
    "replicas must be <= maxReplicas":
        {"roles": {"colocated": {"replicas": 3, "maxReplicas": 2}}},
    "mode colocated uses only": {"roles": {"prefill": {}}},
    "mode pd-disaggregated uses only": {"mode": "pd-disaggregated", "roles": {"expert": {}},
                                        "transport": {"redisUrl": "redis://r"}},
    "mode attention-expert-disaggregated uses only": {
        "mode": "attention-expert-disaggregated", "roles": {"decode": {}},
        "transport": {"redisUrl": "redis://r"}},
    "transport.kind shm only": {"mode": "pd-disaggregated", "transport": {"kind": "shm"}},
    "transport.redisUrl is required": {"mode": "pd-disaggregated"},
    "metadata.name must be at most 40": None,  # check_model_name, unit-tested
    "maxNumBatchedTokens must be >= maxNumSeqs":
        {"engine": {"maxNumSeqs": 64, "maxNumBatchedTokens": 32}},
    "source.hub applies to hf:// sources only": {"source": {"uri": "store://m", "hub": {}}},
    "offline needs cache.claimName": {"source": {"uri": "hf://a/b", "hub": {"offline": True}}},
    "sizeLimit applies to the emptyDir cache only": {"source": {"uri": "hf://a/b", "hub": {
        "cache": {"claimName": "c", "sizeLimit": "1Gi"}}}},
    "openaiSidecar serves one engine on its own": {
        "mode": "pd-disaggregated", "transport": {"redisUrl": "redis://r"}, "openaiSidecar": {}},
}


def test_every_cel_rule_is_also_checked_by_the_operator(crd_validator: CrdValidator) -> None:
    messages = _cel_messages(openapi_schema(CRDS["Model"]))
    # per role (x5 roles), spec-level, root, engine, source (source, hub, hub cache)
    assert len(messages) == 3 * 5 + 6 + 1 + 1 + 3
    for message in messages:
        (bad,) = [case for prefix, case in CEL_CASES.items() if message.startswith(prefix)]
        if bad is None:
            continue
        model = minimal_model(**bad)
        crd_validator.validate(crd_validator.defaulted(model))  # the JSON schema passes it
        with pytest.raises(SpecError):
            parse_model_spec(copy.deepcopy(model["spec"]))
