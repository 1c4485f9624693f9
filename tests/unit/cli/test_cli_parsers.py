"""Every flag of every `moeflow` subcommand has help and shows its default (or says required).

Walks the real parsers: the top-level one with all its subcommands, and the parsers of every
delegated command (`DELEGATED`: store, device-plugin, warm-pool, finetune, tenants, ...), with
their own subcommands, rendering each help string with the parser's own formatter, as `--help`
does.
"""

from __future__ import annotations

import argparse
import importlib

import pytest

from moeflow.cli import DELEGATED, build_parser, contradictions, main, walk_parsers
from moeflow.coldstart import store_cli

_NO_HELP_NEEDED = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _roots() -> dict[str, argparse.ArgumentParser]:
    """The top-level parser and each delegated command's own: a new DELEGATED entry is walked
    too (its module must have `build_parser()`)."""
    roots = {"moeflow": build_parser()}
    for name, (module, _) in DELEGATED.items():
        roots[name] = importlib.import_module(module).build_parser()
    return roots


def _rendered(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def test_the_walk_reaches_every_subcommand() -> None:
    progs = {p.prog for root in _roots().values() for p in walk_parsers(root)}
    for name in ("engine", "gateway", "balancer", "up", "operator", "models pull",
                 "models upcycle", "models make-tiny", "models list"):
        assert f"moeflow {name}" in progs, name
    assert {"moeflow store add", "moeflow store agent", "moeflow device-plugin",
            "moeflow warm-pool", "moeflow finetune", "moeflow tenants add-key",
            "moeflow tenants revoke-key", "moeflow tenants set-limits",
            "moeflow tenants list"} <= progs


@pytest.mark.parametrize("root", ["moeflow", *DELEGATED])
def test_every_flag_has_help_and_shows_its_default(root: str) -> None:
    missing: list[str] = []
    for parser in walk_parsers(_roots()[root]):
        for action in parser._actions:
            if isinstance(action, _NO_HELP_NEEDED):
                continue
            name = "/".join(action.option_strings) or action.dest
            text = _rendered(parser, action)
            if not action.help or not action.help.strip():
                missing.append(f"{parser.prog} {name}: no help")
            elif action.option_strings and "default" not in text and "required" not in text:
                missing.append(f"{parser.prog} {name}: no default shown ({text!r})")
            elif "%(" in text:
                missing.append(f"{parser.prog} {name}: unexpanded {text!r}")
    assert not missing, "\n".join(missing)


def test_defaults_are_the_real_values() -> None:
    up = next(p for p in walk_parsers(build_parser()) if p.prog == "moeflow up")
    help_text = up.format_help()
    assert "[default 'colocated'; env MOEFLOW_UP_MODE]" in " ".join(help_text.split())
    store = store_cli.build_parser().format_help()
    assert "(default: 16.0; env MOEFLOW_STORE_BUDGET_GB)" in " ".join(store.split())
    finetune = " ".join(_roots()["finetune"].format_help().split())
    assert "--lora-rank LORA_RANK LoRA rank r (adapter width) (default 8)" in finetune
    assert "(default q_proj,k_proj,v_proj,o_proj)" in finetune
    assert "seconds between status patches (default: 5.0)" in finetune


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("moeflow ")


def test_delegated_commands_are_listed() -> None:
    assert set(DELEGATED) >= {"store", "device-plugin", "warm-pool"}


@pytest.mark.parametrize(("mode", "counts", "problem"), [
    ("pd", ["instances"], "--instances does not apply to --mode pd"),
    ("pd-disaggregated", ["prefill", "instances"], "--instances does not apply"),
    ("ae", ["prefill"], "--prefill does not apply to --mode ae"),
    ("colocated", ["experts"], "--expert-instances does not apply"),
    ("pd", ["prefill", "decode"], None),
    ("attention-expert-disaggregated", ["attention", "experts"], None),
    ("colocated", ["instances", "engine_port"], None),
])
def test_contradictory_counts(mode: str, counts: list[str], problem: str | None) -> None:
    found = contradictions(mode, counts)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_crd_mode_names_and_the_deprecated_alias(capsys: pytest.CaptureFixture[str]) -> None:
    from moeflow.cli import platform_settings

    args = build_parser().parse_args(["up", "--mode", "attention-expert-disaggregated",
                                      "--experts", "3"])
    assert "--experts is deprecated" in capsys.readouterr().err
    settings = platform_settings(args)
    assert (settings.mode, settings.experts) == ("ae", 3)
    args = build_parser().parse_args(["up", "--mode", "pd-disaggregated",
                                      "--expert-instances", "2"])
    assert capsys.readouterr().err == ""
    assert platform_settings(args).mode == "pd"


def test_flags_without_a_settings_class_read_moeflow_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_BALANCER_INTERVAL_S", "7.5")
    monkeypatch.setenv("MOEFLOW_OPERATOR_WATCH_NAMESPACE", "team-a")
    monkeypatch.setenv("MOEFLOW_LOG_LEVEL", "debug")
    monkeypatch.setenv("MOEFLOW_STORE_AGENT_INTERVAL_S", "3")
    balancer = build_parser().parse_args(["balancer"])
    assert (balancer.interval_s, balancer.log_level) == (7.5, "DEBUG")
    assert build_parser().parse_args(["balancer", "--interval-s", "2"]).interval_s == 2.0
    assert build_parser().parse_args(["operator"]).namespace == "team-a"
    assert build_parser().parse_args(["operator", "-n", "b"]).namespace == "b"
    assert store_cli.build_parser().parse_args(["agent"]).interval_s == 3.0


def test_a_malformed_variable_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOEFLOW_BALANCER_BUDGET", "lots")
    assert main(["balancer"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moeflow balancer: error: MOEFLOW_BALANCER_BUDGET='lots' is not a valid value"
