"""checkov 3.3.30 over the chart rendered with the real Helm library, in two value sets (the
defaults; every optional component on): no failed check, and every skip is a checkov skip
annotation in the chart that says why (docs/security.md lists them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.deploy.chart_kit import EVERYTHING_ON, objects, render

VALUE_SETS = {"defaults": {}, "everything-on": EVERYTHING_ON}


def checkov() -> Path:
    """$MOEFLOW_CHECKOV (what `make test` sets: a venv of its own), else one next to Python."""
    configured = os.environ.get("MOEFLOW_CHECKOV")
    found = (Path(configured) if configured else Path(sys.executable).parent / "checkov").absolute()
    if not found.exists():
        pytest.fail(f"checkov not found at {found}: run the tests with `make test`, which "
                    "installs it (see docs/security.md)")
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("checkov")
    files = []
    for name, values in VALUE_SETS.items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(objects(render(values))))
        files += ["-f", str(path)]
    # Kubernetes checks only, offline: a few seconds.
    done = subprocess.run(
        [str(checkov()), "--skip-download", "--framework", "kubernetes", "--compact",
         "-o", "json", *files],
        capture_output=True, text=True, timeout=120, cwd=folder,
    )
    assert done.stdout.strip(), done.stderr[-2000:]
    found = json.loads(done.stdout)
    return found if isinstance(found, list) else [found]


@pytest.mark.timeout(150)
def test_the_chart_has_no_failed_checkov_check(report: list[dict[str, Any]]) -> None:
    failed = [(f["check_id"], f["resource"], Path(f["file_path"]).name)
              for r in report for f in r["results"]["failed_checks"]]
    assert failed == []
    assert sum(r["summary"]["passed"] for r in report) > 100  # it did check the renders
    assert sum(r["summary"]["parsing_errors"] for r in report) == 0


@pytest.mark.timeout(150)
def test_every_skipped_check_is_an_annotated_choice_with_a_reason(
        report: list[dict[str, Any]]) -> None:
    skipped = [s for r in report for s in r["results"]["skipped_checks"]]
    assert skipped, "the chart's deliberate choices are annotated"
    for check in skipped:
        reason = check["check_result"].get("suppress_comment", "")
        assert reason and reason != "No comment provided", check["check_id"]
    # root only where the job needs it: the device plugin and the DRAM store agent
    root = {s["resource"].split(".")[-1] for s in skipped if s["check_id"] == "CKV_K8S_23"}
    assert root == {"moeflow-device-plugin", "moeflow-model-store-agent"}



@pytest.mark.timeout(150)
def test_security_doc_has_the_threat_model_tenants_rotation_and_every_skip(
        report: list[dict[str, Any]]) -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "security.md").read_text()
    for heading in ("## Threat model: who can reach what", "## Tenants and quotas",
                    "## Key rotation", "## The Helm chart and checkov"):
        assert heading in doc, heading
    threat_model = doc.split("## Threat model")[1].split("\n## ")[0]
    assert len(threat_model.splitlines()) <= 60  # one page
    skipped = {s["check_id"] for r in report for s in r["results"]["skipped_checks"]}
    assert sorted(c for c in skipped if c not in doc) == []  # each choice explained there

def pod_of(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def test_redis_requires_a_password_from_a_secret_and_the_gateway_sends_it() -> None:
    docs = objects(render(EVERYTHING_ON))
    redis = pod_of(docs, "StatefulSet", "moeflow-redis")
    (container,) = redis["containers"]
    assert "requirepass" in container["command"][2]
    assert "env" not in container  # the password is a mounted file, never an env value
    (auth,) = [v for v in redis["volumes"] if v["name"] == "auth"]
    assert auth["secret"]["secretName"] == "moeflow-redis-auth"
    assert redis["securityContext"]["runAsUser"] >= 10000
    (gateway,) = pod_of(docs, "Deployment", "moeflow-gateway")["containers"]
    env = {e["name"]: e for e in gateway["env"]}
    # what GatewaySettings.quota_redis_password reads; the URL carries no password
    assert env["MOEFLOW_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "moeflow-redis-auth", "key": "password"}
    assert env["MOEFLOW_GATEWAY_QUOTA_REDIS_URL"]["value"] == (
        "redis://moeflow-redis.moeflow.svc.cluster.local:6379/0")


def test_the_tenants_secret_is_mounted_where_the_gateway_reads_it() -> None:
    values = {**EVERYTHING_ON, "gateway": {**EVERYTHING_ON["gateway"],
                                          "tenantsSecret": {"name": "moeflow-tenants"}}}
    pod = pod_of(objects(render(values)), "Deployment", "moeflow-gateway")
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tenants"]
    assert volume["secret"]["secretName"] == "moeflow-tenants"
    assert env["MOEFLOW_GATEWAY_TENANTS_FILE"] == f"{mounts['tenants']}/tenants.yaml"


def test_the_rendered_redis_start_and_probe_require_the_password(tmp_path: Path) -> None:
    """The chart's Redis command and readiness probe, run for real with redis-server (paths
    moved under tmp_path): without the password Redis refuses, with it the probe passes."""
    import shutil
    import socket
    import time

    import redis

    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is needed (apt-get install redis-server)"
    pod = pod_of(objects(render({"redis": {"enabled": True}})), "StatefulSet", "moeflow-redis")
    (container,) = pod["containers"]
    data, auth = tmp_path / "data", tmp_path / "auth"
    data.mkdir()
    auth.mkdir()
    (auth / "password").write_text("s3cret-from-the-secret")

    def local(text: str) -> str:
        return text.replace("/etc/redis-auth", str(auth)).replace("/data", str(data))

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [local(a) for a in container["args"]]
    args[args.index("--port") + 1] = str(port)
    shell, flag, script, name = container["command"]
    process = subprocess.Popen([shell, flag, local(script), name, *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                raise AssertionError("Redis answered without a password")
            except redis.exceptions.AuthenticationError:
                break  # up, and it wants the password
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis did not start"
                time.sleep(0.05)
        assert redis.Redis(port=port, password="s3cret-from-the-secret").ping()
        assert (data / "auth.conf").stat().st_mode & 0o077 == 0
        probe = [local(p).replace("-p 6379", f"-p {port}")
                 for p in container["readinessProbe"]["exec"]["command"]]
        assert subprocess.run(probe, timeout=10).returncode == 0
        (auth / "password").write_text("wrong")
        assert subprocess.run(probe, timeout=10).returncode != 0
    finally:
        process.terminate()
        process.wait(timeout=10)
