"""How the attention/expert messages travel: the XCCL transport itself, or shared-memory rings
polled for a spin window (``moeflow.xccl.ring``) with the transport as doorbell and liveness.

Rings need one host (transport shm) and a spin window (``EngineSettings.ae_spin_us`` > 0);
otherwise every message goes on the transport. Both give the same ``send``/``recv`` contract
(per-peer order, ``XcclTimeout``/``PeerGone``), so ``ExpertClient`` and ``ExpertWorker`` do
not know which one they use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from moeflow.xccl import Transport
from moeflow.xccl.config import ShmConfig
from moeflow.xccl.ring import RingEndpoint


class Exchange(Protocol):
    def send(self, peer: str, tag: str, tensors: Sequence[torch.Tensor],
             timeout_s: float) -> None: ...

    def recv(self, peer: str, tag: str, timeout_s: float) -> list[torch.Tensor]: ...

    def close(self) -> None: ...


def open_exchange(transport: Transport, kind: str, spin_us: int,
                  peers: Sequence[str]) -> Exchange:
    """Rings to and from `peers` when `kind` is "shm" and spin_us > 0, else `transport`."""
    if kind != "shm" or spin_us <= 0:
        return transport
    return RingEndpoint(transport, ShmConfig().shm_dir, peers, spin_s=spin_us / 1e6)
