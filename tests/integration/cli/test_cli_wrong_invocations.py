"""Wrong invocations of the real `moeflow` command: each exits non-zero within seconds with one
line on stderr that says what to do, never a traceback and never a silent hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

CASES = [
    (["up", "--model", "no-such-model"], 1, "model 'no-such-model' is not cached"),
    (["up", "--model", "./no/such/folder"], 1, "no such folder: ./no/such/folder"),
    (["up", "--model", "hf://not-a-repo"], 1, "a Hub model is hf://org/name[@revision]"),
    (["up", "--mode", "pd", "--prefill", "1", "--instances", "2"], 2,
     "--instances does not apply to --mode pd"),
    (["up", "--mode", "pd", "--prefill", "0", "--instances", "2"], 2, "prefill"),
    (["up", "--mode", "ae", "--instances", "2"], 2, "--instances does not apply to --mode ae"),
    (["balancer"], 2, "no attention instance to balance: pass --attention URL"),
    (["balancer", "--discovery", "kubernetes"], 2, "needs --served-model-name"),
    (["gateway"], 2, "no engine to serve: pass --engine URL"),
    (["operator"], 2, "no Kubernetes cluster configured"),
    (["models", "pull", "no-such-model"], 1, "unknown model 'no-such-model'"),
    (["up", "--model", "hf://org/absent"], 1, "HF_HUB_OFFLINE is set and it is not in the HF"),
]


@pytest.mark.parametrize(("argv", "code", "message"), CASES,
                         ids=[" ".join(c[0]) for c in CASES])
def test_wrong_invocation_fails_fast_with_one_line(
        argv: list[str], code: int, message: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOEFLOW_", "KUBERNETES_", "HF_"))}
    env.update(MOEFLOW_HOME=str(tmp_path / "home"), HOME=str(tmp_path),
               KUBECONFIG=str(tmp_path / "no-kubeconfig"), HF_HUB_OFFLINE="1")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "moeflow.cli", *argv], capture_output=True,
                          text=True, timeout=30, env=env, cwd=tmp_path, check=False)
    assert time.monotonic() - started < 30
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert message in lines[0], lines[0]
    assert lines[0].startswith(f"moeflow {argv[0]}")
    assert "Traceback" not in done.stderr
    assert "models pull ./" not in lines[0]  # a path is never suggested as a model to pull
