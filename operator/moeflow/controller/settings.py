"""Operator settings: one typed object, read from MOEFLOW_OPERATOR_* environment variables.

Built once, in the kopf startup handler (`moeflow.controller.main`), and passed down through
kopf's memo; nothing below reads the environment.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOEFLOW_OPERATOR_", frozen=True, extra="ignore")

    image: str = "ghcr.io/moeflow/moeflow:0.1.0"
    """Image of engine and gateway containers (one image, the CLI picks the process)."""

    image_pull_policy: str = Field("IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")

    accelerator_resource: str = "moeflow.dev/npu"
    """Extended resource advertised by the device-plugin shim; requested per instance only when
    the Model asks for devicesPerInstance > 0."""

    engine_port: int = Field(8001, ge=1, le=65535)
    gateway_port: int = Field(8000, ge=1, le=65535)

    model_store_host_path: str = "/var/lib/moeflow/models"
    """Node directory of the model store (weights pre-loaded by the node plane)."""

    model_mount_path: str = "/models"

    dram_store_host_path: str = "/dev/shm/moeflow-store"
    """Node DRAM model store (engine-layout snapshots on the host's tmpfs, kept by `moeflow
    store agent`). Same default as the agent's `--dir` and the device plugin's
    `store_host_path`."""

    dram_store_mount_path: str = "/var/lib/moeflow/dram-store"
    """Where an engine of a `dramPreload` Model sees the DRAM store (read-only), passed as
    `--model-store`. Not the device plugin's `/models/store`: that one nests in the `store://`
    mount and is only there when devices are allocated; two mounts at one path would clash."""

    cluster_domain: str = "cluster.local"

    gateway_cpu: str = "500m"
    gateway_memory: str = "512Mi"

    gateway_tenants_secret: str | None = Field(None, min_length=1)
    """Secret (in each Model's namespace) holding the tenants file of every Model's gateway:
    mounted read-only and re-read when the kubelet refreshes it (keys rotate without a
    restart). Not optional in the Pod: a gateway waits for it rather than serve without keys.
    Unset: the gateways get no tenants file."""
    gateway_tenants_secret_key: str = Field("tenants.yaml", min_length=1)

    quota_redis_url: str | None = Field(None, pattern=r"^rediss?://.+")
    """Redis that Models' gateways keep tenants' quota counters in, shared by their replicas
    (no password in it: see `quota_redis_password_secret`). Unset: per-replica counters."""
    quota_redis_password_secret: str | None = Field(None, min_length=1)
    """Secret (in each Model's namespace) with that Redis' password, given to the gateways
    as MOEFLOW_REDIS_PASSWORD by secretKeyRef."""
    quota_redis_password_secret_key: str = Field("password", min_length=1)
    quota_on_redis_failure: str = Field("open", pattern="^(open|closed)$")
    """The gateways' policy while that Redis is unreachable (docs/security.md)."""

    startup_timeout_s: int = Field(600, ge=10)
    """How long an engine may take to answer /health after start (weight loading) before the
    kubelet restarts it: startupProbe failureThreshold x period."""

    engine_drain_timeout_s: int = Field(30, ge=1)
    """How long an engine finishes its in-flight requests after SIGTERM (scale-down, Pod
    replacement) before it exits; passed to engines as MOEFLOW_ENGINE_DRAIN_TIMEOUT_S. Engine
    Pods get a termination grace period a little longer, so the kubelet never cuts a drain."""

    namespace: str | None = None
    """The namespace the operator runs in (the chart sets it from the downward API). Engines'
    NetworkPolicies admit the operator's Pods from there only; unset (out of cluster): from
    any namespace."""

    request_timeout_s: float = Field(120.0, gt=0)
    """Per HTTP call of a batch Request against the gateway."""

    batch_progress_interval_s: float = Field(1.0, gt=0)
    """Minimum time between two status updates of a running Request."""

    kubeconfig: str | None = None
    """Out-of-cluster only: kubeconfig path for the operator's own API calls (kopf logs in by
    itself). Unset: in-cluster service account, else the default kubeconfig."""

    retry_backoff_s: float = Field(5.0, gt=0)
    """Delay before kopf retries a handler that failed with an unexpected error (API server
    hiccup, 5xx); kopf's own default is 60 s."""

    handler_workers: int = Field(16, ge=1)
    """Threads for blocking API calls from handlers."""

    autoscale_interval_s: float = Field(10.0, gt=0)
    """Period of the autoscaler's loop over each autoscaled Model (one with a role's
    maxReplicas set): read engine stats, run the policy, patch `spec.roles.<role>.replicas`."""

    engine_stats_timeout_s: float = Field(1.0, gt=0)
    """Per `GET /v1/stats` of one engine by the autoscaler; no answer = no stats this round."""

    warm_pool_socket_dir: str = "/var/run/moeflow"
    """Directory (a Pod-local emptyDir) of a warm-pool worker: its Unix socket (local claims)
    and the claim it took (`claim.json`, re-read by a restarted container)."""

    warm_pool_claim_timeout_s: float = Field(5.0, gt=0)
    """Per `POST /v1/claim` to a warm Pod (the worker answers at once, before loading); no
    answer in time = the claim failed: that Pod is deleted and the EngineInstance gets a fresh
    Pod."""
