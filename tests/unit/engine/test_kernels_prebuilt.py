"""Prebuilt portable kernel variants: what a container image without a compiler loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeflow.engine.kernels import native, prebuild

ROOT = Path(__file__).resolve().parents[3]

PROBE = """
import json, torch
from moeflow.engine.kernels import native
lib = native.library()
out = {"variant": None if lib is None else lib.variant}
if lib is not None:
    x, w = torch.randn(3, 64), torch.rand(64) + 0.5
    _, h = lib.add_rms_norm(x.clone(), None, w, 1e-6)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    out["max_err"] = float((h - ref).abs().max())
print(json.dumps(out))
"""


def probe_without_compiler(tmp_path: Path, prebuilt: Path) -> dict[str, object]:
    """Run the loader in a process that finds no C compiler and has no cached build."""
    no_tools = tmp_path / "bin"
    no_tools.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", native.ENV_SWITCH)}
    env.update(PATH=str(no_tools), MOEFLOW_HOME=str(tmp_path / "home"),
               MOEFLOW_KERNELS_PREBUILT=str(prebuilt),
               PYTHONPATH=os.pathsep.join([str(ROOT / "services"), str(ROOT / "operator")]))
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_best_level_the_cpu_supports_is_chosen() -> None:
    v4 = "avx512f avx512bw avx512cd avx512dq avx512vl avx2 fma bmi1 bmi2 f16c movbe"
    v3 = "sse4_2 avx avx2 fma bmi1 bmi2 f16c movbe"
    assert native.best_variant(v4) == "x86-64-v4"
    assert native.best_variant(v3) == "x86-64-v3"
    assert native.best_variant(v4, available=("x86-64-v3",)) == "x86-64-v3"
    assert native.best_variant("sse4_2 avx") is None
    assert native.best_variant(v3, available=("x86-64-v4",)) is None


@pytest.mark.skipif(native.best_variant(native._cpu_flags()) is None,
                    reason="the portable variants are x86-64 v3/v4 builds")
def test_without_a_compiler_the_prebuilt_variant_loads_and_computes(tmp_path: Path) -> None:
    prebuilt = tmp_path / "prebuilt"
    assert prebuild.main(["--portable", str(prebuilt), "--variants", "x86-64-v3"]) == 0
    result = probe_without_compiler(tmp_path, prebuilt)
    assert result["variant"] == "x86-64-v3"
    assert isinstance(result["max_err"], float) and result["max_err"] < 1e-5


def test_without_a_compiler_or_a_fitting_variant_the_torch_paths_run(tmp_path: Path) -> None:
    empty = tmp_path / "prebuilt"
    empty.mkdir()
    assert probe_without_compiler(tmp_path, empty) == {"variant": None}


def test_unknown_variants_are_refused(capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        prebuild.main(["--portable", str(tmp_path), "--variants", "x86-64-v9"])
    assert exit_info.value.code == 2
    assert "unknown variant(s) x86-64-v9" in capsys.readouterr().err
