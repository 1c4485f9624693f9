"""Layer-wise KV transfer between a prefill and a decode instance, over XCCL.

One message per layer (or per few consecutive layers, `MIN_MESSAGE_BYTES`) under the request's
tag, layers in order (messages on one tag arrive in send order). Each side does exactly one copy
of the prompt's KV:

- prefill (`LayerwiseKVSender`, on the engine thread, before the request's blocks are freed):
  layer by layer, the prompt's slots are gathered from the KV cache straight into the
  transport's buffer (`Transport.send_into`: a pooled shm segment) and announced at once;
- decode (`LayerReceiver` in a worker thread, writing through a `KVLanding`): each layer is
  copied from the mapped segment straight into the request's reserved blocks as it arrives,
  while the prefill side is still sending the next layers, and the segment is released.

So the two copies overlap (two processes, two cores) and the transfer takes about one copy of
the KV plus one layer, instead of export + send + receive + clone + write one after the other.
Only tensors and XCCL here: the HTTP half of the exchange is disagg.py.
"""

from __future__ import annotations

import threading
import time

import torch

from moeflow.xccl import Transport, XcclError, XcclTimeout

ENGINE_SEND_TIMEOUT_S = 5.0
"""Bound on one layer's send on the prefill's engine thread (a send waits only for a full
segment pool or a decode endpoint that is not draining): a stuck decode instance can delay
the prefill's other requests by at most this, once."""

MIN_MESSAGE_BYTES = 1 << 20
"""Consecutive layers share a message up to this size: each message costs two thread wake-ups
(the receiver's progress thread, then its reader), which small layers would not amortize."""

_RECV_SLICE_S = 0.1
_FINISHED_GRACE_S = 1.0
"""After the prefill answered, how long a layer it sent may still be on its way (a datagram
not yet drained, a Redis notification not yet read)."""


class TransferFailed(RuntimeError):
    """The layer-wise transfer did not complete; the message says why."""


class LayerwiseKVSender:
    """Prefill side: sends one request's prompt KV to `decode_rank`, one message per layer.

    `export` runs on the engine thread and never raises: a failure is kept in `error`, later
    layers are not sent, and the caller answers the decode side with an error (which then
    drains what did arrive)."""

    def __init__(self, transport: Transport, decode_rank: str, tag: str,
                 timeout_s: float = ENGINE_SEND_TIMEOUT_S, *,
                 min_message_bytes: int = MIN_MESSAGE_BYTES) -> None:
        self.transport = transport
        self.min_message_bytes = min_message_bytes
        self.decode_rank = decode_rank
        self.tag = tag
        self.timeout_s = min(timeout_s, ENGINE_SEND_TIMEOUT_S)
        self.is_done = False
        self.error: BaseException | None = None
        self.num_bytes = 0
        self.send_ms = 0.0
        """All layers, gather and announce included."""
        self.first_layer_ms = 0.0
        """Layer 0 alone: the part of the transfer the decode side cannot overlap."""

    def export(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
        """Send tokens ``slots`` of every layer of ``kv_cache`` [layers, 2, S, K, Hd]."""
        if self.is_done:  # a step that failed after exporting is being recomputed
            self.error = self.error or TransferFailed("the prefill step was recomputed after "
                                                      "its KV had been sent")
            return
        self.is_done = True
        started = time.perf_counter()
        num_layers, _, _, heads, head_dim = kv_cache.shape
        layer_bytes = kv_cache.element_size() * 2 * slots.numel() * heads * head_dim
        step = min(num_layers, max(1, -(-self.min_message_bytes // max(layer_bytes, 1))))
        try:
            for first in range(0, num_layers, step):
                layers = kv_cache[first : first + step]
                spec = (kv_cache.dtype, (layers.shape[0], 2, int(slots.numel()), heads, head_dim))

                def gather(views: list[torch.Tensor], layers: torch.Tensor = layers) -> None:
                    # per layer: the layers of kv_cache are not contiguous with each other
                    for layer, view in zip(layers, views[0], strict=True):
                        torch.index_select(layer, 1, slots, out=view)

                self.transport.send_into(self.decode_rank, self.tag, [spec], gather,
                                         self.timeout_s)
                if first == 0:
                    self.first_layer_ms = 1000 * (time.perf_counter() - started)
                self.num_bytes += layer_bytes * layers.shape[0]
        except Exception as exc:  # XcclError, or a bug: this request fails, not the step
            self.error = exc
        self.send_ms = 1000 * (time.perf_counter() - started)


class KVLanding:
    """Decode side: the reserved blocks a pulled request's KV goes to, written from any thread.

    The engine creates it (on its thread) when it reserves the blocks and cancels it before it
    frees them (abort), so a write never lands in blocks another request owns: `cancel` waits
    for a write in progress, and later writes are refused."""

    def __init__(self, kv_cache: torch.Tensor, slots: torch.Tensor, skip_tokens: int,
                 num_tokens: int) -> None:
        self.kv_cache = kv_cache
        self.slots = slots
        """Cache slots of tokens [skip_tokens, num_tokens)."""
        self.skip_tokens = skip_tokens
        """Leading tokens whose blocks came from the prefix cache: written already, shared."""
        self.num_tokens = num_tokens
        self.num_layers_written = 0
        self._lock = threading.Lock()
        self._is_cancelled = False

    @property
    def num_layers(self) -> int:
        return int(self.kv_cache.shape[0])

    @property
    def is_complete(self) -> bool:
        return self.num_layers_written == self.num_layers

    def write_layers(self, kv: torch.Tensor) -> None:
        """Copy the next layers [n, 2, num_tokens, K, Hd] into the blocks, straight from ``kv``
        (a view of the transport's buffer)."""
        _, _, _, heads, head_dim = self.kv_cache.shape
        expected = (2, self.num_tokens, heads, head_dim)
        if (kv.dim() != 5 or tuple(kv.shape[1:]) != expected
                or kv.dtype != self.kv_cache.dtype):
            raise TransferFailed(
                f"received KV of shape {tuple(kv.shape)} {kv.dtype}, expected (layers, "
                f"*{expected}) {self.kv_cache.dtype}: prefill and decode must serve the same "
                "model and dtype"
            )
        for layer_kv in kv:
            # one layer per lock hold: a cancel waits for at most one layer's copy
            with self._lock:
                if self._is_cancelled:
                    raise TransferFailed("the request ended while its KV was arriving")
                if self.is_complete:
                    raise TransferFailed(f"more than {self.num_layers} layers arrived")
                layer = self.num_layers_written
                self.kv_cache[layer].index_copy_(1, self.slots, layer_kv[:, self.skip_tokens:])
                self.num_layers_written += 1

    def cancel(self) -> None:
        with self._lock:
            self._is_cancelled = True


class LayerReceiver:
    """Decode side: receives the layers of one request and writes each through its landing.

    `run` (in a worker thread) starts before the prefill is asked, so each layer is written as
    it arrives. It consumes every layer the sender sent even after a failure, so no segment of
    the sender stays pinned: it stops when all layers arrived, when the peer is gone, at the
    deadline, or once `sender_finished` was called and nothing more is queued."""

    def __init__(self, transport: Transport, peer: str, tag: str, landing: KVLanding,
                 timeout_s: float) -> None:
        self.transport = transport
        self.peer = peer
        self.tag = tag
        self.landing = landing
        self.deadline = time.monotonic() + timeout_s
        self.error: BaseException | None = None
        self.span_ms = 0.0
        """From layer 0's arrival to the last layer's write."""
        self._sender_finished = threading.Event()

    def sender_finished(self) -> None:
        """The prefill answered (or failed): it sends nothing more for this request."""
        self._sender_finished.set()

    def run(self) -> None:
        first_s = 0.0
        num_received = 0
        while num_received < self.landing.num_layers:
            try:
                (kv,) = self._next()
            except (XcclError, TransferFailed) as exc:
                self.error = self.error or exc.with_traceback(None)
                return
            if num_received == 0:
                first_s = time.perf_counter()
            num_received += max(1, kv.shape[0] if kv.dim() == 5 else 1)
            if self.error is None:
                try:
                    self.landing.write_layers(kv)
                except TransferFailed as exc:
                    # keep receiving: the sender's segments must go back (and a traceback would
                    # keep this layer's frame, so its segment, alive)
                    self.error = exc.with_traceback(None)
            del kv  # releases the sender's segment
        self.span_ms = 1000 * (time.perf_counter() - first_s)

    def _next(self) -> list[torch.Tensor]:
        while True:
            finished = self._sender_finished.is_set()
            remaining_s = self.deadline - time.monotonic()
            if remaining_s <= 0:
                raise XcclTimeout(f"the KV of {self.tag!r} did not arrive within the timeout")
            slice_s = _FINISHED_GRACE_S if finished else _RECV_SLICE_S
            try:
                return self.transport.recv(self.peer, self.tag, min(remaining_s, slice_s))
            except XcclTimeout:
                if finished:
                    raise TransferFailed(
                        f"the prefill instance finished after sending "
                        f"{self.landing.num_layers_written} of {self.landing.num_layers} layers"
                    ) from None
