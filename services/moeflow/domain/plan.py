"""What to run for a Model: the desired RoleGroups, EngineInstances, gateway and (attention/expert
mode) expert
balancer, as plain data. Pure; no I/O.

`plan_model(name, spec)` is the one decision both runtimes share. The operator turns a plan
into RoleGroup/EngineInstance custom resources and Pods; the local runtime turns the same plan into
processes
(`unique_ports=True` gives every instance its own port on one host, and `model_path` points at
a local checkpoint). The argv of each instance is exactly the engine/gateway/balancer CLI:

    moeflow engine --model P --served-model-name M --role R --rank N --host H --port 8001
    moeflow gateway --host H --port 8000 --discovery kubernetes --namespace NS
                    --served-model-name M
    moeflow balancer --discovery kubernetes --namespace NS --served-model-name M
                     --num-expert-instances N

Ranks run 0..replicas-1 per role; scale-down removes the highest ranks first, so ranks stay
dense and a rank names the same instance across scale events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeflow.domain import naming
from moeflow.domain.roles import Mode, Role
from moeflow.domain.spec import ModelSpec, Source, TransportKind

DEFAULT_ENGINE_PORT = 8001
DEFAULT_GATEWAY_PORT = 8000
DEFAULT_MODEL_ROOT = "/models"


@dataclass(frozen=True)
class TaskPlan:
    """One engine instance."""

    name: str
    role: Role
    rank: int
    host: str
    port: int
    argv: tuple[str, ...]


@dataclass(frozen=True)
class JobPlan:
    """One role group: `replicas` EngineInstances with ranks 0..replicas-1."""

    name: str
    role: Role
    replicas: int
    tasks: tuple[TaskPlan, ...]


@dataclass(frozen=True)
class GatewayPlan:
    name: str
    replicas: int
    host: str
    port: int
    argv: tuple[str, ...]


@dataclass(frozen=True)
class BalancerPlan:
    """The expert load balancer of an attention/expert Model: one process, no port."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class ModelPlan:
    model: str
    spec: ModelSpec
    model_path: str
    transport: TransportKind
    jobs: tuple[JobPlan, ...]
    gateway: GatewayPlan
    balancer: BalancerPlan | None = None
    """Only in attention/expert mode."""

    @property
    def roles(self) -> tuple[Role, ...]:
        return tuple(job.role for job in self.jobs)

    @property
    def num_instances(self) -> int:
        return sum(job.replicas for job in self.jobs)

    def job(self, role: Role) -> JobPlan:
        for job in self.jobs:
            if job.role is role:
                return job
        raise KeyError(f"role {role.value!r} is not part of this plan (roles: {self.roles})")


def engine_argv(*, model_path: str, served_model_name: str, role: Role, rank: int, host: str,
                port: int, num_attention: int = 0, num_experts: int = 0,
                model_store: str | None = None) -> tuple[str, ...]:
    """What one instance runs. Attention and expert instances also learn the size of the other
    side (XCCL ranks attention-i / expert-j are derived from it). `model_store`: the node DRAM
    store to map the weights from when it holds them."""
    argv: tuple[str, ...] = (
        "moeflow", "engine",
        "--model", model_path,
        "--served-model-name", served_model_name,
        "--role", role.value,
        "--rank", str(rank),
        "--host", host,
        "--port", str(port),
    )
    if role in (Role.ATTENTION, Role.EXPERT):
        argv += ("--num-expert-instances", str(num_experts))
    if role is Role.EXPERT:
        argv += ("--num-attention-instances", str(num_attention))
    if model_store:
        argv += ("--model-store", model_store)
    return argv


def gateway_argv(*, served_model_name: str, host: str, port: int, discovery: str,
                 namespace: str) -> tuple[str, ...]:
    argv = ["moeflow", "gateway", "--host", host, "--port", str(port), "--discovery", discovery]
    if discovery == "kubernetes":
        argv += ["--namespace", namespace]
    return (*argv, "--served-model-name", served_model_name)


def balancer_argv(*, served_model_name: str, num_experts: int, discovery: str,
                  namespace: str) -> tuple[str, ...]:
    """The expert fleet's size is part of the argv: expert URLs are indexed by rank, so a new
    expert replica count means a new balancer process."""
    argv = ["moeflow", "balancer", "--discovery", discovery]
    if discovery == "kubernetes":
        argv += ["--namespace", namespace]
    return (*argv, "--served-model-name", served_model_name,
            "--num-expert-instances", str(num_experts))


def model_path_for(model: str, source: Source, model_root: str = DEFAULT_MODEL_ROOT) -> str:
    """Where the weights appear inside an engine container. The node model store is mounted
    at `model_root` (so `store://x` is `<root>/x`); a PVC or node directory is mounted at
    `<root>/<model>`. An hf:// source is no path: the engine fetches the uri itself."""
    if source.scheme == "hf":
        return source.uri
    if source.scheme == "store":
        return f"{model_root}/{source.location.strip('/')}"
    return f"{model_root}/{model}"


def plan_model(
    name: str,
    spec: ModelSpec,
    *,
    namespace: str = "default",
    model_path: str | None = None,
    host: str = "0.0.0.0",
    engine_port: int = DEFAULT_ENGINE_PORT,
    gateway_port: int = DEFAULT_GATEWAY_PORT,
    unique_ports: bool = False,
    engine_ports: Sequence[int] | None = None,
    discovery: str = "kubernetes",
) -> ModelPlan:
    """The desired RoleGroups (one per role of `spec.mode`, in the mode's role order), their
    EngineInstances
    and the gateway. With `unique_ports`, instance i (in plan order) listens on
    `engine_port + i`; otherwise every instance uses `engine_port` (one per Pod). Explicit
    `engine_ports` (one per instance, in plan order) override both. Attention/expert mode
    adds the expert balancer."""
    path = model_path if model_path is not None else model_path_for(name, spec.source)
    jobs: list[JobPlan] = []
    instance_index = 0
    if engine_ports is not None:
        needed = sum(spec.role(role).replicas for role in spec.role_names)
        if len(engine_ports) < needed:
            raise ValueError(f"{len(engine_ports)} engine ports for {needed} instances")
    sizes = {role: spec.role(role).replicas for role in spec.role_names}
    for role in spec.role_names:
        replicas = spec.role(role).replicas
        tasks: list[TaskPlan] = []
        for rank in range(replicas):
            port = engine_port + instance_index if unique_ports else engine_port
            if engine_ports is not None:
                port = engine_ports[instance_index]
            elif unique_ports and port == gateway_port:
                instance_index += 1
                port += 1
            instance_index += 1
            tasks.append(TaskPlan(
                name=naming.task_name(name, role, rank), role=role, rank=rank, host=host,
                port=port,
                argv=engine_argv(model_path=path, served_model_name=name, role=role, rank=rank,
                                 host=host, port=port,
                                 num_attention=sizes.get(Role.ATTENTION, 0),
                                 num_experts=sizes.get(Role.EXPERT, 0)),
            ))
        jobs.append(JobPlan(name=naming.job_name(name, role), role=role, replicas=replicas,
                            tasks=tuple(tasks)))
    gateway = GatewayPlan(
        name=naming.gateway_name(name), replicas=spec.gateway.replicas, host=host,
        port=gateway_port,
        argv=gateway_argv(served_model_name=name, host=host, port=gateway_port,
                          discovery=discovery, namespace=namespace),
    )
    balancer = None
    if spec.mode is Mode.ATTENTION_EXPERT_DISAGGREGATED:
        balancer = BalancerPlan(
            name=naming.balancer_name(name),
            argv=balancer_argv(served_model_name=name, num_experts=sizes[Role.EXPERT],
                               discovery=discovery, namespace=namespace),
        )
    return ModelPlan(model=name, spec=spec, model_path=path, transport=spec.transport_kind,
                     jobs=tuple(jobs), gateway=gateway, balancer=balancer)
