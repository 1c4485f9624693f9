"""FineTune.spec parsing, the trainer's argv, and the flags round trip between the operator's
argv and the local CLI's parser."""

from __future__ import annotations

from typing import Any

import pytest

from moeflow.domain.finetune_spec import (
    DataFormat,
    DType,
    HyperParameters,
    check_finetune_name,
    hyper_parameter_flags,
    parse_finetune_spec,
    parse_termination_message,
    pod_name,
    termination_message,
    trainer_argv,
)
from moeflow.domain.spec import SpecError
from moeflow.training.cli import build_parser, hyper_parameters


def spec(**extra: Any) -> dict[str, Any]:
    return {"baseModel": {"uri": "store://smollm2-135m-instruct"},
            "dataset": {"configMap": {"name": "chats"}},
            "output": {"uri": "pvc://adapters/run-1"}, **extra}


def test_defaults_are_sane_and_complete() -> None:
    parsed = parse_finetune_spec(spec())
    hp = parsed.hyper_parameters
    assert (hp.lora_rank, hp.lora_alpha, hp.lora_dropout) == (8, 16, 0.05)
    assert hp.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (hp.learning_rate, hp.epochs, hp.max_steps, hp.batch_size) == (2e-4, 1, 0, 4)
    assert (hp.max_length, hp.seed, hp.dtype) == (1024, 0, DType.FLOAT32)
    assert parsed.dataset.config_map is not None and parsed.dataset.config_map.key == "train.jsonl"
    assert parsed.dataset.format is DataFormat.AUTO
    assert (parsed.devices, parsed.backoff_limit) == (0, 2)


@pytest.mark.parametrize("bad, field", [
    ({"dataset": {}}, "exactly one of configMap and uri"),
    ({"dataset": {"configMap": {"name": "c"}, "uri": "pvc://d/x.jsonl"}}, "exactly one"),
    ({"dataset": {"uri": "s3://bucket/x.jsonl"}}, "spec.dataset.uri"),
    ({"dataset": {"uri": "pvc://claim-only"}}, "spec.dataset.uri"),
    ({"dataset": {"uri": "pvc://d/../etc/passwd"}}, "'..'"),
    ({"output": {"uri": "file:///tmp/out"}}, "spec.output.uri"),
    ({"output": {"uri": "store://../models/x"}}, "'..'"),
    ({"baseModel": {"uri": "hf://SmolLM2"}}, "spec.baseModel.uri"),
    ({"method": "dpo"}, "spec.method"),
    ({"hyperParameters": {"loraRank": 0}}, "loraRank"),
    ({"hyperParameters": {"learningRate": 0}}, "learningRate"),
    ({"hyperParameters": {"loraDropout": 0.95}}, "loraDropout"),
    ({"hyperParameters": {"targetModules": []}}, "targetModules"),
    ({"hyperParameters": {"targetModules": ["q proj"]}}, "targetModules"),
    ({"hyperParameters": {"batchSize": 8, "tempo": 2}}, "tempo"),
    ({"devices": -1}, "devices"),
    ({"backoffLimit": 11}, "backoffLimit"),
])
def test_bad_specs_are_refused_naming_the_field(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_finetune_spec(spec(**bad))
    assert field in str(e.value)


def test_names_must_leave_room_for_the_pod_suffix() -> None:
    check_finetune_name("a" * 50)
    assert len(pod_name("a" * 50, 10)) <= 63
    for bad in ("a" * 51, "Upper", "-x", "x_y"):
        with pytest.raises(SpecError):
            check_finetune_name(bad)


def test_every_hyper_parameter_survives_the_flags_round_trip() -> None:
    hp = HyperParameters(lora_rank=16, lora_alpha=32, lora_dropout=0.1,
                         target_modules=("q_proj", "v_proj"), learning_rate=3e-5, epochs=3,
                         max_steps=7, batch_size=2, gradient_accumulation_steps=4,
                         max_length=256, seed=42, warmup_steps=5, weight_decay=0.01,
                         max_grad_norm=0.5, checkpoint_every=3, dtype=DType.BFLOAT16)
    defaults = HyperParameters()
    assert all(getattr(hp, f) != getattr(defaults, f) for f in HyperParameters.model_fields)
    args = build_parser().parse_args(
        ["--model", "m", "--data", "d", "--output", "o", *hyper_parameter_flags(hp)])
    assert hyper_parameters(args) == hp


def test_trainer_argv_is_the_local_cli() -> None:
    parsed = parse_finetune_spec(spec(hyperParameters={"maxSteps": 20, "seed": 3}))
    argv = trainer_argv(parsed, model_path="/models/m", data_path="/data/train.jsonl",
                        output_dir="/output/run-1", report_to="ns/ft",
                        termination_log="/dev/termination-log")
    assert argv[:2] == ["moeflow", "finetune"]
    args = build_parser().parse_args(argv[2:])
    assert (args.model, args.data, str(args.output)) == (
        "/models/m", "/data/train.jsonl", "/output/run-1")
    assert args.report_to_finetune == "ns/ft" and args.base_model_name == (
        "store://smollm2-135m-instruct")
    assert hyper_parameters(args) == parsed.hyper_parameters


def test_termination_messages_carry_a_reason_and_fit_the_kubelet_limit() -> None:
    assert parse_termination_message(termination_message("InvalidDataset", "line 2: bad")) == (
        "InvalidDataset", "line 2: bad")
    assert parse_termination_message("Traceback (most recent call last):\n...") == (
        None, "Traceback (most recent call last):\n...")
    assert parse_termination_message(None) == (None, "")
    assert len(termination_message("TrainingFailed", "x" * 10_000).encode()) <= 4096
