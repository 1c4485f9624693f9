"""Operator settings from MOEFLOW_OPERATOR_* and the `moeflow operator` subcommand."""

from __future__ import annotations

import argparse

import pytest

from moeflow.controller import cli
from moeflow.controller.settings import OperatorSettings


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = OperatorSettings()
    assert defaults.image == "ghcr.io/moeflow/moeflow:0.1.0"
    assert defaults.accelerator_resource == "moeflow.dev/npu"
    monkeypatch.setenv("MOEFLOW_OPERATOR_IMAGE", "registry.local/moeflow:dev")
    monkeypatch.setenv("MOEFLOW_OPERATOR_ACCELERATOR_RESOURCE", "huawei.com/ascend-910")
    monkeypatch.setenv("MOEFLOW_OPERATOR_ENGINE_PORT", "9001")
    settings = OperatorSettings()
    assert settings.image == "registry.local/moeflow:dev"
    assert settings.accelerator_resource == "huawei.com/ascend-910"
    assert settings.engine_port == 9001


def test_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_OPERATOR_IMAGE_PULL_POLICY", "Sometimes")
    with pytest.raises(ValueError, match="image_pull_policy"):
        OperatorSettings()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moeflow")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["operator", *argv])


def test_operator_subcommand_flags() -> None:
    args = parse()
    assert args.func is cli.run
    assert (args.namespace, args.all_namespaces, args.standalone) == (None, False, False)
    args = parse("--namespace", "serving", "--standalone")
    assert (args.namespace, args.standalone) == ("serving", True)
    assert parse("-A").all_namespaces is True
    with pytest.raises(SystemExit):
        parse("--namespace", "a", "--all-namespaces")


def test_run_hands_the_scope_to_kopf(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    assert cli.run(parse("-n", "serving")) == 0
    assert cli.run(parse("--standalone")) == 0
    assert calls[0]["namespaces"] == ["serving"] and calls[0]["clusterwide"] is False
    assert calls[1]["clusterwide"] is True and calls[1]["standalone"] is True
