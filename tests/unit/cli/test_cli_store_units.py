"""`moeflow store list` speaks GiB: a 16 GiB budget reads "16.0 GiB", not "17179.9 MB"."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.coldstart import store_cli


def test_store_list_uses_binary_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert store_cli.main(["--dir", str(tmp_path / "store"), "--budget-gb", "16", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["KEY", "SIZE", "PINNED", "SOURCE"]
    assert out[-1] == "used 0 B of 16.0 GiB"
    assert "MB" not in "\n".join(out)
