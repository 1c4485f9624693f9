"""Pure builders of what an engine Pod needs to fetch an `hf://org/name[@revision]` Model from
the Hugging Face Hub itself: the cache volume and its mount, and huggingface_hub's variables.

The engine runs `moeflow engine --model hf://org/name[@rev]` (`plan.model_path_for`), which
downloads through huggingface_hub, so everything is said the way every HF tool hears it:
- HF_HOME is the cache volume: an emptyDir per Pod by default (each Pod downloads; nothing
  outlives it), or the PersistentVolumeClaim `spec.source.hub.cache.claimName` (the Model's
  engines share one download and a restart finds it; huggingface_hub locks files in the cache,
  so concurrent engines do not corrupt it; more than one node needs ReadWriteMany);
- HF_ENDPOINT from `hub.endpoint` (a mirror or private hub), only when set;
- HF_HUB_OFFLINE always "1" or "0": the image sets it to 1 (air-gapped by default), so an
  online Model must say 0;
- HF_TOKEN from the Secret `hub.tokenSecretRef` names, by the kubelet: the token never sits in
  the spec, in a CR the operator writes, or in the operator's memory. Not optional: a Pod
  waits (CreateContainerConfigError) rather than start without the token it was promised.
"""

from __future__ import annotations

from typing import Any

from moeflow.controller.build_finetune import IMAGE_UID
from moeflow.domain.spec import HubSource

Obj = dict[str, Any]
CACHE_VOLUME = "hf-cache"
HF_HOME = "/var/cache/huggingface"
"""Where the cache volume is mounted; HF_HOME points there (the hub cache is <HF_HOME>/hub)."""


def hub_cache_volume(hub: HubSource) -> tuple[Obj, Obj]:
    """The cache volume and its (writable: downloads land there) engine mount."""
    if hub.cache.claim_name:
        volume: Obj = {"name": CACHE_VOLUME,
                       "persistentVolumeClaim": {"claimName": hub.cache.claim_name}}
    else:
        empty: Obj = {"sizeLimit": hub.cache.size_limit} if hub.cache.size_limit else {}
        volume = {"name": CACHE_VOLUME, "emptyDir": empty}
    return volume, {"name": CACHE_VOLUME, "mountPath": HF_HOME}


def hub_env(hub: HubSource) -> list[Obj]:
    """huggingface_hub's variables for the engine container (see the module docstring)."""
    env: list[Obj] = [{"name": "HF_HOME", "value": HF_HOME},
                      {"name": "HF_HUB_OFFLINE", "value": "1" if hub.offline else "0"}]
    if hub.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hub.endpoint})
    if hub.token_secret_ref is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": hub.token_secret_ref.name, "key": hub.token_secret_ref.key}}})
    return env


def hub_security_context(hub: HubSource) -> Obj:
    """A claim is usually root-owned when provisioned; fsGroup lets the image's user write
    it. OnRootMismatch: a full cache is not chowned file by file at every start."""
    if not hub.cache.claim_name:
        return {}
    return {"fsGroup": IMAGE_UID, "fsGroupChangePolicy": "OnRootMismatch"}
