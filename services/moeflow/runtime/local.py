"""`moeflow up`: the platform on one machine, no cluster.

``LocalRuntime(settings, home=...)`` takes one typed ``LocalPlatformSettings`` (built by the
CLI) and runs:

- the engine instances the operator's own planner (``plan_model``) asks for, as child
  processes started through an ``EngineLauncher`` (``launcher.py``), each on its own port;
- for ``--mode pd|ae --transport redis`` without a Redis URL, a private redis-server;
- the gateway, in this process under uvicorn (``--mode ae`` adds the expert balancer on a
  thread; autoscaling hands the engines to the local scaler, ``scaler.py``).

Supervision (``supervisor.py``): an engine or the private redis-server that dies is restarted
on the same port with exponential backoff and counted in ``moeflow_engine_restarts_total{role}``
(``moeflow_local_redis_restarts_total``) on the gateway's /metrics; after
``max_start_failures`` consecutive failed starts of one process the platform stops and exits 1
with a one-line reason. Every engine child gets the platform's internal token
(``MOEFLOW_INTERNAL_TOKEN``), and the gateway the same one.

Ctrl-C (SIGINT) or SIGTERM stops the gateway gracefully, then the children (SIGTERM, then
SIGKILL after ``stop_grace_s``), then the private redis-server.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import Counter
from pydantic import SecretStr

from moeflow.domain.plan import ModelPlan, plan_model
from moeflow.domain.roles import Role
from moeflow.domain.spec import ModelSpec
from moeflow.runtime.launcher import EngineLauncher, ProcessLauncher
from moeflow.runtime.settings import LocalPlatformSettings
from moeflow.runtime.supervisor import EngineUnit, RedisUnit, Supervisor

logger = logging.getLogger(__name__)


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


def engine_restart_counter() -> Counter:
    """``moeflow_engine_restarts_total{role}``, registered on the gateway's registry once the
    gateway runs (a collector may live in several registries)."""
    return Counter("moeflow_engine_restarts", "Engine processes moeflow up started again "
                   "after they died or failed to start", ["role"], registry=None)


def redis_restart_counter() -> Counter:
    return Counter("moeflow_local_redis_restarts", "Times moeflow up started its private "
                   "redis-server again", registry=None)


class GatewayServer:
    """uvicorn for the gateway, with two hooks: ``on_started`` once it serves (its metrics
    registry exists then) and ``on_exit_signal`` when Ctrl-C/SIGTERM arrives (stop restarting
    children before anything else)."""

    def __init__(self, app: Any, host: str, port: int, *, on_started: Callable[[], None],
                 on_exit_signal: Callable[[], None]) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets)
                if self.started:
                    on_started()

            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                on_exit_signal()
                super().handle_exit(sig, frame)

        self._server = _Server(uvicorn.Config(app, host=host, port=port, log_level="info"))

    def run(self) -> None:
        try:
            self._server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the signal after its graceful shutdown
            logger.info("stopped on Ctrl-C/SIGTERM")

    def request_exit(self) -> None:
        """Make ``run`` return (graceful shutdown); callable from any thread."""
        self._server.should_exit = True

    @property
    def started(self) -> bool:
        return bool(self._server.started)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM before the gateway runs: clean up as Ctrl-C does


class LocalRuntime:
    """See the module docstring. ``launcher`` replaces the process launcher (tests)."""

    def __init__(self, settings: LocalPlatformSettings, *, home: Path,
                 launcher: EngineLauncher | None = None) -> None:
        self.settings = settings
        self.home = home
        self._launcher = launcher
        self._server: GatewayServer | None = None
        self._failure: str | None = None
        self._lock = threading.Lock()
        self.engine_restarts = engine_restart_counter()
        self.redis_restarts = redis_restart_counter()
        self._has_private_redis = False
        self._exit_hooks: list[Callable[[], None]] = []
        """Called first on Ctrl-C/SIGTERM: supervisors stop restarting what stops next."""

    # -- what to run (pure but for the model lookup) -------------------------------------------
    def model_path(self) -> Path:
        from moeflow.checkpoints.registry import PULLABLE
        from moeflow.checkpoints.store import ModelNotCachedError, resolve_model

        model = self.settings.model
        try:
            return resolve_model(model, self.home)
        except ModelNotCachedError:
            if model not in PULLABLE:
                raise
        from moeflow.checkpoints.pull import pull

        logger.info("model %s is not cached yet: pulling it", model)
        return pull(model, self.home, None)

    def model_spec(self, model_path: Path, *, instances: int | None = None,
                   redis_url: str | None = None) -> ModelSpec:
        """The settings as a Model spec: the operator's own type, validated the same way
        (with the one difference that every role shares this host, so shm is allowed).
        ``instances`` replaces the colocated count (the scaler plans every replica)."""
        s = self.settings
        if s.mode == "pd":
            mode = "pd-disaggregated"
            roles = {"prefill": {"replicas": s.prefill}, "decode": {"replicas": s.decode}}
        elif s.mode == "ae":
            mode = "attention-expert-disaggregated"
            roles = {"attention": {"replicas": s.attention}, "expert": {"replicas": s.experts}}
        else:
            count = s.instances if instances is None else instances
            mode, roles = "colocated", {"colocated": {"replicas": count}}
        transport: dict[str, str] = {"kind": s.engine.transport}
        redis_url = redis_url or s.engine.redis_url
        if redis_url:
            transport["redisUrl"] = redis_url
        raw = {"source": {"uri": f"file://{model_path}"}, "mode": mode, "roles": roles,
               "transport": transport}
        return ModelSpec.model_validate(raw, context={"single_host": True})

    def plan(self, model_path: Path, *, instances: int | None = None,
             redis_url: str | None = None) -> ModelPlan:
        """What to run: the same pure planner the operator turns into Pods."""
        spec = self.model_spec(model_path, instances=instances, redis_url=redis_url)
        host, engine_port = self.settings.gateway.host, self.settings.engine_port
        # engine_port: consecutive ports from it; else ephemeral ones, chosen one by one
        # (consecutive ports from one free base collide with other local platforms)
        ports = None
        if not engine_port:
            count = sum(spec.role(role).replicas for role in spec.role_names)
            ports = free_ports(host, count)
        return plan_model(
            self.settings.name, spec, model_path=str(model_path), host=host,
            engine_port=engine_port, gateway_port=self.settings.gateway.port,
            unique_ports=True, engine_ports=ports, discovery="static",
        )

    # -- running it ------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until Ctrl-C or SIGTERM: 0 after a clean stop; 1 when a process could not be
        started (the last log line says which and why)."""
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            code = self._serve()
        except RuntimeError as exc:
            self._failure = self._failure or str(exc)
            code = 1
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if self._failure is not None:
            logger.error("moeflow up stopped: %s", self._failure)
            return 1
        return code

    def _give_up(self, reason: str) -> None:
        with self._lock:
            self._failure = self._failure or reason
            server = self._server
        if server is not None:
            server.request_exit()

    def _internal_token(self) -> str:
        """The platform's internal token: the configured one, else a fresh random one."""
        token = self.settings.gateway.internal_token
        return token.get_secret_value() if token else secrets.token_urlsafe(32)

    def _serve(self) -> int:
        model_path = self.model_path()
        token = self._internal_token()
        sup = self.settings.supervision
        with contextlib.ExitStack() as stack:
            redis_url = self.settings.engine.redis_url
            if (self.settings.is_split and self.settings.engine.transport == "redis"
                    and not redis_url):
                redis_url = self._start_private_redis(stack)
                if redis_url is None:
                    return 1
            launcher = self._launcher
            if launcher is None:
                options = self.settings.engine.model_copy(update={"redis_url": redis_url})
                process_launcher = ProcessLauncher(options, self.settings.log_level, token)
                stack.callback(process_launcher.close)
                launcher = process_launcher
            if self.settings.autoscaling.is_enabled:
                return self._serve_autoscaled(launcher, model_path, token, stack)
            plan = self.plan(model_path, redis_url=redis_url)
            units = [EngineUnit(launcher, task, sup.engine_start_timeout_s)
                     for job in plan.jobs for task in job.tasks]
            for unit in units:  # every role shows up in /metrics, at 0
                self.engine_restarts.labels(unit.role)
            engines = Supervisor(
                units, sup, on_give_up=self._give_up,
                on_restart=lambda role: self.engine_restarts.labels(role).inc())
            stack.callback(engines.stop)
            self._exit_hooks.append(engines.stop_restarting)
            engines.start()
            if not engines.wait_ready():
                return 1
            # expert instances answer attention instances over XCCL, never the gateway
            serving = [u.url for u in units if u.task.role.takes_requests]
            settings = self.settings.gateway.model_copy(update={
                "engine_urls": tuple(serving), "internal_token": SecretStr(token)})
            from moeflow.gateway.app import build_app

            app = build_app(settings)
            if self.settings.mode == "ae":
                stack.enter_context(self._expert_balancer(model_path, units, token))
            self._serve_gateway(app)
        return 0

    def _start_private_redis(self, stack: contextlib.ExitStack) -> str | None:
        """A supervised redis-server on a free port (same port on every restart)."""
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moeflow-")))
        unit = RedisUnit(free_port(self.settings.gateway.host), scratch)
        supervisor = Supervisor([unit], self.settings.supervision, on_give_up=self._give_up,
                                on_restart=lambda _role: self.redis_restarts.inc())
        stack.callback(supervisor.stop)
        self._exit_hooks.append(supervisor.stop_restarting)
        supervisor.start()
        if not supervisor.wait_ready():
            return None
        logger.info("started a private redis-server at %s", unit.url)
        self._has_private_redis = True
        return unit.url

    def _serve_gateway(self, app: Any) -> None:
        """Run the gateway until Ctrl-C, SIGTERM or a give-up."""

        def started() -> None:
            registry = app.state.service.metrics.registry
            registry.register(self.engine_restarts)
            if self._has_private_redis:
                registry.register(self.redis_restarts)

        def exiting() -> None:
            for hook in self._exit_hooks:
                hook()

        gateway = self.settings.gateway
        server = GatewayServer(app, gateway.host, gateway.port, on_started=started,
                               on_exit_signal=exiting)
        with self._lock:
            self._server = server
            if self._failure is not None:  # gave up while the gateway was being built
                return
        logger.info("serving %s at http://%s:%d/v1", self.settings.name, gateway.host,
                    gateway.port)
        try:
            server.run()
        finally:
            exiting()

    def _serve_autoscaled(self, launcher: EngineLauncher, model_path: Path, token: str,
                          stack: contextlib.ExitStack) -> int:
        """Autoscaling: the scaler owns the engines, the gateway follows it."""
        from moeflow.gateway.app import build_app
        from moeflow.runtime.scaler import LocalScaler

        s = self.settings
        policy = s.autoscaling.policy(s.instances)
        # plan every replica the scaler may start: fixed ports, so fixed URLs
        plan = self.plan(model_path, instances=policy.max_replicas)
        tasks = [task for job in plan.jobs for task in job.tasks]
        for task in tasks:
            self.engine_restarts.labels(task.role.value)
        gateway = s.gateway.model_copy(update={"internal_token": SecretStr(token)})
        scaler = LocalScaler(launcher, tasks, policy, s.supervision,
                             drain_s=gateway.discovery_interval_s + 1.0,
                             on_restart=lambda role: self.engine_restarts.labels(role).inc())
        stack.callback(scaler.join)
        stack.callback(scaler.stop_engines)
        stack.callback(scaler.stop)
        # the first start teaches the gateway the model (tokenizer, context), even with min 0
        if not scaler.start_initial(min(max(s.instances, policy.min_replicas, 1),
                                        policy.max_replicas)):
            self._failure = "the initial engine(s) failed to start"
            return 1
        gateway = gateway.model_copy(update={"engine_urls": tuple(scaler.ready_engine_urls)})
        app = build_app(gateway, discovery=scaler, scale_up=scaler)
        scaler.app = app  # the SLO check reads the gateway's recent TTFT/TPOT
        self._exit_hooks.append(scaler.stop_restarting)
        scaler.start()
        logger.info("autoscaling %s between %d and %d replicas (idle window %s s)", s.name,
                    policy.min_replicas, policy.max_replicas, policy.idle_window_s)
        self._serve_gateway(app)
        return 0

    @contextlib.contextmanager
    def _expert_balancer(self, model_path: Path, units: list[EngineUnit],
                         token: str) -> Iterator[None]:
        """--mode ae: the expert load balancer on a thread, every rebalance_interval_s."""
        from moeflow.engine.ae.balancer import ExpertBalancer
        from moeflow.engine.models.arch import load_arch

        interval_s = self.settings.rebalance_interval_s
        if interval_s <= 0:
            yield
            return
        budget = None if self.settings.expert_budget < 0 else self.settings.expert_budget
        balancer = ExpertBalancer(
            [u.url for u in units if u.task.role is Role.ATTENTION],
            [u.url for u in units if u.task.role is Role.EXPERT],
            load_arch(model_path).num_experts, budget=budget, internal_token=token,
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
