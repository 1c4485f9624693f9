"""`moeflow up`: the platform on one machine, no cluster.

Engine instances run as child processes (``python -m moeflow.cli engine ...``); the gateway runs
in this process under uvicorn. Ctrl-C (SIGINT) or SIGTERM stops the gateway, then the children
(SIGTERM, then SIGKILL after a grace period). If an engine child dies, the gateway keeps serving
from the other instances of its role (requests on the dead one fail with a clear error); once a
role has no instance left, the whole platform stops, so nothing is left half-running.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moeflow.domain.plan import ModelPlan, TaskPlan, plan_model
from moeflow.domain.roles import Role
from moeflow.domain.spec import ModelSpec

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0
_ENGINE_START_TIMEOUT_S = 300.0


def free_port(host: str) -> int:
    return free_ports(host, 1)[0]


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports the kernel had free just now (all held open while choosing, so
    they differ; another process may still take one before the engine binds it)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


@dataclass
class EngineProcess:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    role: Role = Role.COLOCATED


class LocalRuntime:
    def __init__(self, args: argparse.Namespace, *, home: Path, engine_argv: list[str]) -> None:
        self.args = args
        self.home = home
        self.engine_argv = engine_argv
        self.engines: list[EngineProcess] = []
        self._server: object | None = None
        self._redis_url: str | None = args.redis_url

    def _model_path(self) -> Path:
        from moeflow.checkpoints.registry import PULLABLE
        from moeflow.checkpoints.store import ModelNotCachedError, resolve_model

        try:
            return resolve_model(self.args.model, self.home)
        except ModelNotCachedError:
            if self.args.model not in PULLABLE:
                raise
        from moeflow.checkpoints.pull import pull

        logger.info("model %s is not cached yet: pulling it", self.args.model)
        return pull(self.args.model, self.home, None)

    def model_spec(self, model_path: Path) -> ModelSpec:
        """The flags as a Model spec: the operator's own type, validated the same way
        (with the one difference that every role shares this host, so shm is allowed)."""
        if self.args.mode == "pd":
            mode = "pd-disaggregated"
            roles = {"prefill": {"replicas": self.args.prefill},
                     "decode": {"replicas": self.args.decode}}
        elif self.args.mode == "ae":
            mode = "attention-expert-disaggregated"
            roles = {"attention": {"replicas": self.args.attention},
                     "expert": {"replicas": self.args.experts}}
        else:
            mode, roles = "colocated", {"colocated": {"replicas": self.args.instances}}
        transport: dict[str, str] = {"kind": self.args.transport}
        if self._redis_url:
            transport["redisUrl"] = self._redis_url
        raw = {"source": {"uri": f"file://{model_path}"}, "mode": mode, "roles": roles,
               "transport": transport}
        return ModelSpec.model_validate(raw, context={"single_host": True})

    def plan(self, model_path: Path, served_name: str) -> ModelPlan:
        """What to run: the same pure planner the operator turns into Pods."""
        spec = self.model_spec(model_path)
        # --engine-port: consecutive ports from it; else ephemeral ones, chosen one by one
        # (consecutive ports from one free base collide with other local platforms)
        ports = None
        if not self.args.engine_port:
            count = sum(spec.role(role).replicas for role in spec.role_names)
            ports = free_ports(self.args.host, count)
        return plan_model(
            served_name, spec, model_path=str(model_path), host=self.args.host,
            engine_port=self.args.engine_port or 0, gateway_port=self.args.port,
            unique_ports=True, engine_ports=ports, discovery="static",
        )

    def _start_engine(self, task: TaskPlan) -> EngineProcess:
        # the task's argv is what a pod would run; add this machine's flags
        argv = [
            sys.executable, "-m", "moeflow.cli", "--log-level", self.args.log_level,
            *task.argv[1:], *self.engine_argv,
        ]
        if self._redis_url:
            argv += ["--redis-url", self._redis_url]
        process = subprocess.Popen(argv)
        engine = EngineProcess(task.name, f"http://{task.host}:{task.port}", process,
                               task.role)
        logger.info("started engine %s (pid %d) at %s", engine.name, process.pid, engine.url)
        return engine

    def _wait_ready(self, engine: EngineProcess, timeout_s: float) -> None:
        """Block until the engine answers /health; fail fast if its process exits."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = engine.process.poll()
            if code is not None:
                raise RuntimeError(f"engine {engine.name} exited with code {code} while starting")
            try:
                if httpx.get(f"{engine.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"engine {engine.name} was not ready within {timeout_s:.0f} s")

    def _watch(self, engine: EngineProcess) -> None:
        """An engine that dies is logged; the platform stops once a role has no engine left
        (the gateway keeps serving from the survivors until then)."""
        code = engine.process.wait()
        server = self._server
        if server is None or getattr(server, "should_exit", True):
            return
        role = engine.role
        alive = [e for e in self.engines if e.role == role and e.process.poll() is None]
        if alive:
            logger.error("engine %s exited with code %s; %d %s engine(s) still serve",
                         engine.name, code, len(alive), role)
            return
        logger.error("engine %s exited with code %s, the last %s engine: stopping",
                     engine.name, code, role)
        server.should_exit = True  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def _expert_balancer(self, model_path: Path) -> Iterator[None]:
        """--mode ae: the expert load balancer on a thread, every --rebalance-interval-s."""
        from moeflow.engine.ae.balancer import ExpertBalancer
        from moeflow.engine.models.arch import load_arch

        interval_s = self.args.rebalance_interval_s
        if interval_s <= 0:
            yield
            return
        budget = None if self.args.expert_budget < 0 else self.args.expert_budget
        balancer = ExpertBalancer(
            [e.url for e in self.engines if e.role is Role.ATTENTION],
            [e.url for e in self.engines if e.role is Role.EXPERT],
            load_arch(model_path).num_experts, budget=budget,
        )
        stop = threading.Event()
        thread = threading.Thread(target=balancer.run, args=(interval_s, stop),
                                  name="expert-balancer", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5.0)
            balancer.close()

    def stop_engines(self) -> None:
        for engine in self.engines:
            if engine.process.poll() is None:
                engine.process.send_signal(signal.SIGTERM)
        for engine in self.engines:
            try:
                engine.process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                engine.process.kill()
                engine.process.wait()

    def run(self) -> int:
        """Serve until Ctrl-C; 0 after a clean stop, 1 if something failed to start."""
        try:
            return self._serve()
        except RuntimeError as exc:
            logger.error("%s", exc)
            return 1

    def _serve(self) -> int:
        import uvicorn

        from moeflow.cli import _gateway_settings
        from moeflow.gateway.app import build_app
        from moeflow.gateway.settings import GatewaySettings

        model_path = self._model_path()
        served_name = self.args.served_model_name or self.args.model.rstrip("/").split("/")[-1]
        stack = contextlib.ExitStack()
        try:
            split = self.args.mode in ("pd", "ae")
            if split and self.args.transport == "redis" and not self._redis_url:
                from moeflow.xccl.redis_server import start_local_redis

                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                redis = start_local_redis(scratch, port=free_port(self.args.host))
                self._redis_url = stack.enter_context(redis).url
                logger.info("started a private redis-server at %s", self._redis_url)
            # --- autoscaling hook (moeflow.runtime.scaler): the scaler owns the engines ---
            from moeflow.runtime.scaler import autoscaling_requested, serve_autoscaled

            if autoscaling_requested(self.args):
                return serve_autoscaled(self, model_path, served_name)
            # --- end of the autoscaling hook ---
            plan = self.plan(model_path, served_name)
            self.engines = [
                self._start_engine(task) for job in plan.jobs for task in job.tasks
            ]
            for engine in self.engines:
                self._wait_ready(engine, _ENGINE_START_TIMEOUT_S)
            # expert instances answer attention instances over XCCL, never the gateway
            serving = [e.url for e in self.engines if e.role.takes_requests]
            settings = _gateway_settings(self.args, serving)
            assert isinstance(settings, GatewaySettings)
            config = uvicorn.Config(
                build_app(settings), host=settings.host, port=settings.port, log_level="info"
            )
            server = uvicorn.Server(config)
            self._server = server
            for engine in self.engines:
                threading.Thread(target=self._watch, args=(engine,), daemon=True).start()
            if self.args.mode == "ae":
                stack.enter_context(self._expert_balancer(model_path))
            logger.info(
                "serving %s at http://%s:%d/v1", served_name, settings.host, settings.port
            )
            try:
                server.run()
            except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
                logger.info("stopping on Ctrl-C")
        finally:
            self.stop_engines()
            stack.close()
        failed = [e for e in self.engines if e.process.returncode not in (0, -signal.SIGTERM)]
        return 1 if failed and not getattr(self._server, "started", False) else 0
