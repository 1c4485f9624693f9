"""`moeflow models ...` subcommands, driven through a real argparse parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from moeflow.checkpoints.cli import format_param_count, format_size_bytes, register

torch.set_num_threads(1)


def _run(home: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="moeflow")
    register(parser.add_subparsers(dest="command", required=True), lambda: home)
    args = parser.parse_args(list(argv))
    exit_code: int = args.func(args)
    return exit_code


def test_make_tiny_default_out_then_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, "models", "list") == 0
    assert "no models cached" in capsys.readouterr().err

    assert _run(tmp_path, "models", "make-tiny", "--arch", "qwen3_moe", "--seed", "3") == 0
    out_dir = tmp_path / "models" / "tiny-qwen3-moe"
    assert capsys.readouterr().out.strip() == str(out_dir)
    assert json.loads((out_dir / "moeflow.json").read_text())["source"] == "tiny:qwen3_moe"

    assert _run(tmp_path, "models", "list") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "ARCHITECTURE", "PARAMS", "SIZE"]
    assert row.split()[:3] == ["tiny-qwen3-moe", "qwen3_moe", "288.1K"]
    assert row.endswith("MiB")


def test_make_tiny_explicit_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "somewhere" / "m"
    assert _run(tmp_path, "models", "make-tiny", "--arch", "llama", "--out", str(out_dir)) == 0
    assert (out_dir / "config.json").is_file()
    assert not (tmp_path / "models").exists()


def test_make_tiny_rejects_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _run(tmp_path, "models", "make-tiny", "--arch", "gpt2")


def test_pull_unknown_model_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, "models", "pull", "no-such-model") == 1
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "smollm2-135m-instruct" in err


def test_formatting() -> None:
    assert format_param_count(134_515_008) == "134.5M"
    assert format_param_count(106_816) == "106.8K"
    assert format_param_count(12) == "12"
    assert format_param_count(7_000_000_000) == "7.0B"
    assert format_size_bytes(538_090_408) == "513.2 MiB"
    assert format_size_bytes(512) == "512 B"
    assert format_size_bytes(3 * 1024**4) == "3072.0 GiB"
