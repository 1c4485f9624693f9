"""An expert instance's compute: hosted experts' weights and one serving thread per attention
instance (receive a Dispatch, run the experts, send the Combine back).

Experts are added and dropped live (``load`` / ``unload``, from the HTTP thread): the weights
dict is replaced as a whole, so a serving thread sees either the old or the new set, never a
half-built one. A Dispatch naming an expert this instance does not host is answered with
``Status.MISSING_EXPERT`` (the sender re-sends those pairs elsewhere), never dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moeflow.domain.messages import ExpertInstanceStats
from moeflow.engine.ae.exchange import Exchange
from moeflow.engine.ae.wire import A2E_TAG, E2A_TAG, Combine, Dispatch, Status
from moeflow.engine.models.arch import ArchConfig
from moeflow.engine.models.decoder import expert_mlp
from moeflow.engine.models.loader import ExpertWeights, load_experts
from moeflow.xccl import Transport
from moeflow.xccl.errors import PeerGone, TransportClosed, XcclError, XcclTimeout

logger = logging.getLogger(__name__)

# How long one receive waits before re-checking for shutdown; bounds stop() latency.
_POLL_S = 0.5

Loader = Callable[[Sequence[int]], dict[int, ExpertWeights]]


def checkpoint_loader(model_dir: Path, arch: ArchConfig, dtype: torch.dtype) -> Loader:
    def load(experts: Sequence[int]) -> dict[int, ExpertWeights]:
        return load_experts(model_dir, arch, experts, dtype=dtype)

    return load


def compute(weights: dict[int, ExpertWeights], message: Dispatch) -> torch.Tensor:
    """[p, E]: the unweighted output of each pair's expert on its token, in pair order.

    Experts run in ascending id, each on its tokens in token order, as ``MoE.experts`` does."""
    layer = weights[message.layer]
    out = torch.empty(message.rows.shape[0], message.hidden.shape[1], dtype=message.hidden.dtype)
    for e in torch.unique(message.experts).tolist():
        (pairs,) = torch.nonzero(message.experts == e, as_tuple=True)
        gate_up, down = layer[e]
        out[pairs] = expert_mlp(message.hidden[message.rows[pairs]], gate_up, down)
    return out


class ExpertWorker:
    def __init__(
        self,
        transport: Transport,
        rank: str,
        attention_ranks: Sequence[str],
        num_experts: int,
        initial_experts: Sequence[int],
        loader: Loader,
        *,
        timeout_s: float,
        exchange: Exchange | None = None,
    ) -> None:
        """`exchange`: how messages travel (default: on `transport`; see exchange.py)."""
        self._transport = transport
        self._exchange: Exchange = transport if exchange is None else exchange
        self.rank = rank
        self._attention_ranks = tuple(attention_ranks)
        self._num_experts = num_experts
        self._loader = loader
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # serialises load/unload, not the data path
        self._weights: dict[int, ExpertWeights] = loader(initial_experts)
        self.hosted: frozenset[int] = frozenset(initial_experts)
        self._tokens = torch.zeros(num_experts, dtype=torch.int64)
        self._counters = threading.Lock()  # one serving thread per attention peer updates them
        self._num_dispatches = 0
        self._num_missing = 0
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve, args=(peer,), name=f"a2e-{peer}", daemon=True)
            for peer in self._attention_ranks
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=_POLL_S * 4)
        if self._exchange is not self._transport:
            self._exchange.close()  # the transport is the app's to close

    # -- placement changes (HTTP thread) ---------------------------------------------------
    def load(self, experts: Sequence[int]) -> list[int]:
        """Add experts (weights read before they become visible). Returns the hosted ids."""
        bad = [e for e in experts if not 0 <= e < self._num_experts]
        if bad:
            raise ValueError(f"experts {bad} do not exist: the model has {self._num_experts}")
        with self._lock:
            new = sorted(set(experts) - self.hosted)
            if new:
                fresh = self._loader(new)
                merged = {layer: {**w, **fresh[layer]} for layer, w in self._weights.items()}
                self._weights = merged
                self.hosted = self.hosted | set(new)
            logger.info("%s hosts experts %s", self.rank, sorted(self.hosted))
            return sorted(self.hosted)

    def unload(self, experts: Sequence[int]) -> list[int]:
        with self._lock:
            drop = set(experts)
            self._weights = {layer: {e: t for e, t in w.items() if e not in drop}
                             for layer, w in self._weights.items()}
            self.hosted = self.hosted - drop
            logger.info("%s hosts experts %s", self.rank, sorted(self.hosted))
            return sorted(self.hosted)

    def stats(self) -> ExpertInstanceStats:
        return ExpertInstanceStats(
            rank=self.rank,
            hosted=tuple(sorted(self.hosted)),
            tokens_per_expert=tuple(int(c) for c in self._tokens.tolist()),
            num_dispatches_total=self._num_dispatches,
            num_missing_expert_total=self._num_missing,
        )

    @property
    def is_healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads) and not self._stopping.is_set()

    # -- data path (one thread per attention instance) -------------------------------------
    def _serve(self, peer: str) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            waiting_ns = time.time_ns()
            try:
                tensors = self._exchange.recv(peer, A2E_TAG, _POLL_S)
            except XcclTimeout:
                continue
            except PeerGone:  # the attention instance restarts or went away: wait for it
                self._stopping.wait(_POLL_S)
                continue
            except TransportClosed:
                return
            except XcclError as exc:  # e.g. Redis restarting: the transport reconnects
                logger.warning("receiving from %s failed (%s); retrying", peer, exc)
                self._stopping.wait(_POLL_S)
                continue
            recv_ns = time.time_ns()
            try:
                message = Dispatch.from_tensors(tensors)
            except ValueError:
                logger.exception("malformed A2E message from %s dropped", peer)
                continue
            self._answer(peer, message, recv_ns, recv_ns - max(message.sent_ns, waiting_ns))

    def _answer(self, peer: str, message: Dispatch, recv_ns: int, transfer_ns: int) -> None:
        weights = self._weights  # one consistent snapshot for the whole message
        started = time.perf_counter_ns()
        hosted_here = weights.get(message.layer, {})
        missing = set(message.experts.tolist()) - set(hosted_here)
        if missing:
            status, out = Status.MISSING_EXPERT, torch.empty(0)
        else:
            with torch.inference_mode():
                out = compute(weights, message)
            status = Status.OK
        with self._counters:
            self._num_dispatches += 1
            if missing:
                self._num_missing += 1
            else:
                self._tokens += torch.bincount(message.experts, minlength=self._num_experts)
        answer = Combine(message.seq, status, recv_ns, time.time_ns(),
                         time.perf_counter_ns() - started, out, max(0, transfer_ns))
        try:
            self._exchange.send(peer, E2A_TAG, answer.to_tensors(), self._timeout_s)
        except XcclError as exc:
            logger.warning("answer to %s lost (%s); it re-sends or fails the step", peer, exc)
