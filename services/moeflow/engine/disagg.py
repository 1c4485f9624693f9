"""Prefill/decode disaggregation: moving a request's prompt KV between instances over XCCL.

Decode pulls (DeepServe's TE-to-TE transfer, with back-pressure): a decode instance reserves
blocks for a request first, and only then asks the prefill instance (``POST /v1/prefill``) to
compute the prompt and send its KV to the decode instance's XCCL rank under the tag
``kv/<request_id>``; the prefill answers with the first token once the KV is sent. So a decode
instance that is out of memory makes prefill wait, never fail, and the prefill side holds no
blocks after its answer (KV is copied out before the blocks are freed), whatever happens to the
decode side afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import httpx
import torch

from moeflow.domain.errors import (
    BackendUnavailableError,
    MoeflowError,
    PrefillUnavailableError,
    error_from_code,
)
from moeflow.domain.messages import GenerateRequest, PrefillRequest, PrefillResponse
from moeflow.web.internal_auth import internal_headers
from moeflow.xccl import Transport, XcclError

logger = logging.getLogger(__name__)


def kv_tag(request_id: str) -> str:
    return f"kv/{request_id}"


def prefill_only(request: GenerateRequest) -> GenerateRequest:
    """The prefill side's version of a request: the prompt and exactly one sampled token."""
    sampling = request.sampling.model_copy(update={"max_tokens": 1, "stop": ()})
    return request.model_copy(update={"sampling": sampling, "kv_source": None})


@dataclass
class PulledKV:
    kv: torch.Tensor  # [layers, 2, prompt tokens, K, Hd]
    response: PrefillResponse
    transfer_ms: float
    """XCCL time only: the prefill's send plus the decode's receive and copy."""


class KVPuller:
    """Decode side: ask the prefill instance for a request's KV and receive it."""

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

    async def pull(self, request: GenerateRequest) -> PulledKV:
        source = request.kv_source
        if source is None:
            raise ValueError("pull() needs a request with kv_source")
        started = time.perf_counter()
        tag = kv_tag(request.request_id)
        body = PrefillRequest(request=prefill_only(request), decode_rank=self.self_rank, tag=tag)
        try:
            response = await self._http.post(
                f"{source.prefill_url}/v1/prefill", content=body.model_dump_json(),
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
        answer = PrefillResponse.model_validate_json(response.content)
        recv_started = time.perf_counter()
        remaining_s = max(0.0, self.timeout_s - (recv_started - started))
        try:
            tensors = await asyncio.to_thread(
                self.transport.recv, source.prefill_rank, tag, remaining_s
            )
        except XcclError as exc:
            raise PrefillUnavailableError(f"the KV transfer from the prefill instance failed: "
                                          f"{type(exc).__name__}") from exc
        # shm hands out views of the sender's buffers: keep a private copy, release them now
        kv = tensors[0].clone()
        del tensors
        # transfer time = the prefill side's send + this side's receive (not the prefill itself)
        transfer_ms = answer.send_ms + 1000 * (time.perf_counter() - recv_started)
        return PulledKV(kv, answer, transfer_ms)


def _remote_error(response: httpx.Response) -> MoeflowError:
    try:
        error = json.loads(response.content)["error"]
        return error_from_code(str(error["code"]), str(error["message"]), error.get("param"))
    except (ValueError, KeyError, TypeError):
        return BackendUnavailableError(f"prefill instance answered HTTP {response.status_code}")


def send_kv(transport: Transport, decode_rank: str, tag: str, kv: torch.Tensor,
            timeout_s: float) -> float:
    """Prefill side: send the KV; returns milliseconds spent. Raises BackendUnavailableError."""
    started = time.perf_counter()
    try:
        transport.send(decode_rank, tag, [kv], timeout_s)
    except XcclError as exc:
        logger.warning("sending KV to %s failed: %s", decode_rank, exc)
        raise BackendUnavailableError(
            f"sending KV to the decode instance failed ({type(exc).__name__})") from exc
    return 1000 * (time.perf_counter() - started)
