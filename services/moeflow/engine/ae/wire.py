"""The tensor messages between attention and expert instances (the XCCL side of the AE split).

Per MoE layer and micro-batch, an attention instance sends each expert instance that serves at
least one of its (token, expert) pairs one ``Dispatch`` (A2E) under tag ``A2E_TAG``; the expert
instance answers with one ``Combine`` (E2A) under ``E2A_TAG``, with one output row per pair in
the pair order it was given. Messages on one (sender, receiver, tag) arrive in send order
(the XCCL contract), and ``seq`` (per attention instance, increasing) pairs each answer with its
question, so a re-dispatch after a failure cannot be confused with an older answer.

Timestamps are wall-clock nanoseconds (``time.time_ns``): comparable across processes of one
host, which is what the A2E/E2A latency metrics need; across hosts they are only as good as NTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

A2E_TAG = "a2e"
E2A_TAG = "e2a"


class Status(IntEnum):
    OK = 0
    MISSING_EXPERT = 1
    """The instance does not host an expert it was sent (placement changed under the sender)."""
    FAILED = 2


def _header(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


@dataclass
class Dispatch:
    seq: int
    layer: int
    sent_ns: int
    hidden: torch.Tensor  # [n, E]: each token once per destination instance
    rows: torch.Tensor  # [p] int64: the row of `hidden` of each (token, expert) pair
    experts: torch.Tensor  # [p] int64: the expert of each pair

    def to_tensors(self) -> list[torch.Tensor]:
        return [_header(self.seq, self.layer, self.sent_ns), self.hidden, self.rows, self.experts]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> Dispatch:
        if len(tensors) != 4 or tensors[0].numel() != 3:
            raise ValueError(f"not an A2E message: {len(tensors)} tensors")
        seq, layer, sent_ns = (int(v) for v in tensors[0].tolist())
        return cls(seq, layer, sent_ns, tensors[1], tensors[2], tensors[3])


@dataclass
class Combine:
    seq: int
    status: Status
    recv_ns: int
    """When the expert instance had the Dispatch in hand."""
    sent_ns: int
    """When it started sending this answer."""
    compute_ns: int
    out: torch.Tensor  # [p, E]: unweighted expert output per pair, in the Dispatch's order
    a2e_transfer_ns: int = 0
    """recv_ns less the later of the Dispatch's send and the expert starting to wait for it."""

    def to_tensors(self) -> list[torch.Tensor]:
        header = _header(self.seq, int(self.status), self.recv_ns, self.sent_ns, self.compute_ns,
                         self.a2e_transfer_ns)
        return [header, self.out]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> Combine:
        if len(tensors) != 2 or tensors[0].numel() != 6:
            raise ValueError(f"not an E2A message: {len(tensors)} tensors")
        seq, status, recv_ns, sent_ns, compute_ns, transfer_ns = (
            int(v) for v in tensors[0].tolist())
        return cls(seq, Status(status), recv_ns, sent_ns, compute_ns, tensors[1], transfer_ns)
