"""Prefill/decode disaggregation: moving a request's prompt KV between instances over XCCL.

Decode pulls (DeepServe's TE-to-TE transfer, with back-pressure): a decode instance reserves
blocks for a request first, and only then asks the prefill instance (``POST /v1/prefill``) to
compute the prompt and send its KV to the decode instance's XCCL rank under the tag
``kv/<request_id>``, one message per layer (kv_transfer.py); the prefill answers with the first
token once the KV is sent. The decode side listens before it asks, so it writes each layer into
its blocks as it arrives. So a decode instance that is out of memory makes prefill wait, never
fail, and the prefill side holds no blocks after its answer (the KV leaves before the blocks are
freed), whatever happens to the decode side afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import httpx

from moeflow.domain.errors import (
    BackendUnavailableError,
    MoeflowError,
    PrefillUnavailableError,
    error_from_code,
)
from moeflow.domain.messages import GenerateRequest, PrefillRequest, PrefillResponse
from moeflow.engine.kernels.openmp import then_release
from moeflow.engine.kv_transfer import KVLanding, LayerReceiver
from moeflow.web.internal_auth import internal_headers
from moeflow.xccl import Transport

logger = logging.getLogger(__name__)

_RECEIVING: set[asyncio.Task[None]] = set()


def kv_tag(request_id: str) -> str:
    return f"kv/{request_id}"


def prefill_only(request: GenerateRequest) -> GenerateRequest:
    """The prefill side's version of a request: the prompt and exactly one sampled token."""
    sampling = request.sampling.model_copy(update={"max_tokens": 1, "stop": ()})
    return request.model_copy(update={"sampling": sampling, "kv_source": None})


@dataclass
class PulledKV:
    """A pull that completed: every layer is in the request's blocks."""

    response: PrefillResponse
    transfer_ms: float
    """The transfer's wall time: the prefill's send of layer 0 plus the decode side's span from
    layer 0's arrival to the last layer's write (the copies of both sides overlap in it)."""


class KVPuller:
    """Decode side: ask the prefill instance for a request's KV and land it layer by layer."""

    def __init__(self, transport: Transport, self_rank: str, timeout_s: float, *,
                 internal_token: str | None = None) -> None:
        """``internal_token``: sent to the prefill instance (``moeflow.web.internal_auth``)."""
        self.transport = transport
        self.self_rank = self_rank
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0),
                                       headers=internal_headers(internal_token))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def pull(self, request: GenerateRequest, landing: KVLanding) -> PulledKV:
        """Receive the prompt's KV into ``landing`` (the reserved blocks); raises the errors
        the gateway acts on (``prefill_unavailable`` re-places the request)."""
        source = request.kv_source
        if source is None:
            raise ValueError("pull() needs a request with kv_source")
        tag = kv_tag(request.request_id)
        # Listening before the prefill is asked: layers are written as they arrive.
        receiver = LayerReceiver(self.transport, source.prefill_rank, tag, landing,
                                 self.timeout_s)
        # the receive writes tensors on a helper thread: its OpenMP pool must not outlive it
        receiving = asyncio.create_task(asyncio.to_thread(then_release(receiver.run)))
        _RECEIVING.add(receiving)  # the loop holds tasks weakly; a cancelled pull drops its own
        receiving.add_done_callback(_RECEIVING.discard)
        try:
            answer = await self._ask(source.prefill_url, request, tag)
        except Exception:
            receiver.sender_finished()
            await receiving  # take what it did send, so none of its segments stays pinned
            raise
        receiver.sender_finished()
        await receiving
        if receiver.error is not None:
            raise PrefillUnavailableError(
                f"the KV transfer from the prefill instance failed: "
                f"{type(receiver.error).__name__}: {receiver.error}") from receiver.error
        return PulledKV(answer, answer.first_layer_send_ms + receiver.span_ms)

    async def _ask(self, prefill_url: str, request: GenerateRequest, tag: str) -> PrefillResponse:
        body = PrefillRequest(request=prefill_only(request), decode_rank=self.self_rank, tag=tag)
        try:
            response = await self._http.post(
                f"{prefill_url}/v1/prefill", content=body.model_dump_json(),
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise PrefillUnavailableError(
                f"the prefill instance failed: {type(exc).__name__}"
            ) from exc
        if response.status_code != 200:
            error = _remote_error(response)
            if isinstance(error, BackendUnavailableError):  # the instance, not the request
                raise PrefillUnavailableError(f"the prefill instance failed: {error.message}")
            raise error
        return PrefillResponse.model_validate_json(response.content)


def _remote_error(response: httpx.Response) -> MoeflowError:
    try:
        error = json.loads(response.content)["error"]
        return error_from_code(str(error["code"]), str(error["message"]), error.get("param"))
    except (ValueError, KeyError, TypeError):
        return BackendUnavailableError(f"prefill instance answered HTTP {response.status_code}")
