"""Operator fan-out latency: seconds from `Model` create to all of its Pods created.

Workload: one colocated Model with N replicas (N = 1, 16, 64), the real operator (kopf +
moeflow.controller, in its own thread) against kmock's KubernetesEmulator with the test shim
(tests/integration/controller), over real HTTP on 127.0.0.1. Each run starts a fresh
emulator and operator; the timer starts at the Model's POST and stops when the N-th Pod
exists. Medians over --runs runs. What it measures is the operator's own path
(Model -> Job -> N Tasks -> N Pods, with status and kopf bookkeeping on the way), not a
kubelet: there is none.

    .venv/bin/python benchmarks/controlplane.py [--runs 3] [--replicas 1 16 64]

(Named controlplane.py, not operator.py: a script called operator.py in benchmarks/ would shadow
the standard library's `operator` module for every other script in the folder.)

Prints one line per size and a last line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "controller"))

import kmock  # noqa: E402
import kubernetes  # noqa: E402
import yaml  # noqa: E402
from cluster_kit import OperatorRunner  # noqa: E402
from crd_schema import CRD_DIR  # noqa: E402
from kube_emulator import ClusterEmulator  # noqa: E402

from moeflow.kube import api as kube  # noqa: E402


def model(replicas: int) -> dict[str, object]:
    return {"apiVersion": "moeflow.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": "bench", "namespace": "default"},
            "spec": {"source": {"uri": "store://smollm2-135m-instruct"}, "mode": "colocated",
                     "roles": {"colocated": {"replicas": replicas, "minReplicas": 0}}}}


async def one_run(replicas: int, workdir: pathlib.Path) -> float:
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.declare_crds(CRD_DIR)
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "e",
            "clusters": [{"name": "e", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "e", "context": {"cluster": "e", "user": "u"}}]}))
        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kubeconfig)
        os.environ["MOEFLOW_OPERATOR_KUBECONFIG"] = str(kubeconfig)
        runner = await OperatorRunner().start()
        try:
            started = time.perf_counter()
            async with server.client.post(kube.MODEL.path("default"), json=model(replicas)) as r:
                assert r.status < 300, await r.text()
            deadline = started + 300
            while len(emulator.live_objects("v1/pods")) < replicas:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{replicas} pods not created within 300 s")
                await asyncio.sleep(0.005)
            return time.perf_counter() - started
        finally:
            await runner.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # kopf's per-run notices would drown the lines
    medians_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for replicas in args.replicas:
            samples_s = [await one_run(replicas, pathlib.Path(tmp)) for _ in range(args.runs)]
            medians_s[str(replicas)] = round(statistics.median(samples_s), 3)
            print(f"replicas={replicas:3d}  create->all pods created: median "
                  f"{medians_s[str(replicas)]:.3f} s  (runs: "
                  f"{', '.join(f'{s:.3f}' for s in samples_s)})", flush=True)
    result = {
        "benchmark": "operator_model_to_pods_s", "median_s_by_replicas": medians_s,
        "runs": args.runs, "mode": "colocated", "api_server": "kmock 0.8 emulator + shim",
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
