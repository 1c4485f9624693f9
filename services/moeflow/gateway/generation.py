"""The gateway's job executor: one OpenAI request -> one engine task, with limits and metrics.

``GenerationService`` turns validated protocol fields into ``SamplingParams`` (refusing what we
do not implement), enforces the in-flight bound, picks an instance, and yields ``TokenChunk``s
while recording TTFT, ITL, TPOT, end-to-end latency and token counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from moeflow.domain.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    OverloadedError,
)
from moeflow.domain.messages import GenerateRequest, KVSource, SamplingParams, TokenChunk
from moeflow.gateway.engine_client import EngineClient, EngineStream, EngineUnreachableError
from moeflow.gateway.metrics import GatewayMetrics
from moeflow.gateway.protocol import _SamplingFields
from moeflow.gateway.registry import ModelRegistry, ServedModel
from moeflow.gateway.routing import InstanceView
from moeflow.gateway.scale_from_zero import WakeQueue
from moeflow.gateway.settings import GatewaySettings

T = TypeVar("T")

_MAX_PLACEMENT_ATTEMPTS = 2


class _InstanceUnreachable(Exception):
    def __init__(self, instance: InstanceView, error: EngineUnreachableError) -> None:
        super().__init__(str(error))
        self.instance = instance
        self.error = error


def _refuse(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


@dataclass
class GenerationService:
    settings: GatewaySettings
    registry: ModelRegistry
    client: EngineClient
    metrics: GatewayMetrics
    wake: WakeQueue | None = None
    """Scale from zero; None: a model without a ready instance gets 503 at once."""
    num_in_flight: int = 0

    def sampling_params(
        self,
        body: _SamplingFields,
        *,
        num_prompt_tokens: int,
        model: ServedModel,
        max_tokens: int | None,
    ) -> SamplingParams:
        if body.n != 1:
            raise _refuse("n", "only n=1 is supported")
        if body.logprobs:
            raise _refuse("logprobs", "logprobs are not supported yet")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise _refuse(name, f"{name} is not supported yet; leave it unset or 0")
        max_model_len = model.info.max_model_len
        if num_prompt_tokens >= max_model_len:
            raise ContextLengthExceededError(
                f"the prompt has {num_prompt_tokens} tokens; this model's context is "
                f"{max_model_len} tokens",
                param="messages",
            )
        room = max_model_len - num_prompt_tokens
        if max_tokens is not None and max_tokens > room:
            raise ContextLengthExceededError(
                f"max_tokens={max_tokens} plus the prompt's {num_prompt_tokens} tokens exceeds "
                f"this model's context of {max_model_len} tokens",
                param="max_tokens",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > self.settings.max_stop_sequences:
            raise _refuse("stop", f"at most {self.settings.max_stop_sequences} stop sequences")
        if any(not s for s in stop):
            raise _refuse("stop", "stop sequences must be non-empty")
        vocab = model.tokenizer.vocab_size
        stop_ids = tuple(body.stop_token_ids or ())
        if any(t < 0 or t >= vocab for t in stop_ids):
            raise _refuse("stop_token_ids", f"token ids must lie in [0, {vocab})")
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else room,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            seed=body.seed,
            stop=tuple(stop),
            stop_token_ids=stop_ids,
            ignore_eos=body.ignore_eos,
        )

    def admit(self) -> None:
        if self.num_in_flight >= self.settings.max_in_flight_requests:
            raise OverloadedError(
                f"the gateway holds {self.num_in_flight} requests, its limit",
                retry_after_s=self.settings.retry_after_s,
            )

    async def open(
        self,
        model: ServedModel,
        endpoint: str,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """Admit and start the request on an instance; return its chunk stream.

        Errors before the engine accepts (limits, unknown instance, engine 429) raise here, so
        the caller can still answer with a proper status code. A model scaled to zero is woken
        first (the wait is bounded; ``is_disconnected`` ends it early).
        """
        self.admit()
        for attempt in range(_MAX_PLACEMENT_ATTEMPTS):
            if self.wake is not None:
                # again after a failed attempt: the last instance may just have scaled to zero
                await self.wake.wait_until_ready(model.name, is_disconnected)
            try:
                return await self._open_once(model, endpoint, request_id, prompt_token_ids,
                                             sampling)
            except _InstanceUnreachable as exc:
                # an instance that refuses connections is dead or gone: stop routing to it
                # (the stats poller revives it if it comes back) and place the request again
                exc.instance.is_healthy = False
                if attempt + 1 == _MAX_PLACEMENT_ATTEMPTS:
                    raise exc.error from None
        raise AssertionError("unreachable")

    async def _open_once(
        self,
        model: ServedModel,
        endpoint: str,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
    ) -> AsyncGenerator[TokenChunk, None]:
        placement = self.registry.place(
            model, prompt_token_ids, sampling.max_tokens, self.settings.pd_min_prompt_tokens
        )
        used = [i for i in (placement.colocated, placement.prefill, placement.decode) if i]
        target = placement.decode or placement.colocated
        assert target is not None
        kv_source = None
        if placement.prefill is not None:
            kv_source = KVSource(
                prefill_url=placement.prefill.url, prefill_rank=placement.prefill.rank_name
            )
        self.num_in_flight += 1
        self.metrics.in_flight.inc()
        for instance in used:
            instance.num_in_flight += 1
        urls = [i.url for i in used]
        started_s = time.perf_counter()
        try:
            request = GenerateRequest(
                request_id=request_id,
                prompt_token_ids=tuple(prompt_token_ids),
                sampling=sampling,
                kv_source=kv_source,
            )
            stream = await self.client.open_generate(target.url, request)
        except EngineUnreachableError as exc:
            self._release(urls, model)
            raise _InstanceUnreachable(target, exc) from exc
        except BaseException as exc:
            self._release(urls, model)
            self.metrics.requests.labels(model.name, endpoint, _status(exc)).inc()
            raise
        mode = "split" if placement.is_split else "colocated"
        return self._observe(stream, model, endpoint, started_s, urls, mode)

    async def _observe(
        self,
        stream: EngineStream,
        model: ServedModel,
        endpoint: str,
        started_s: float,
        urls: list[str],
        mode: str,
    ) -> AsyncGenerator[TokenChunk, None]:
        m = self.metrics
        name = model.name
        first_s: float | None = None
        last_s = started_s
        last: TokenChunk | None = None
        status = "499"
        try:
            async for chunk in stream:
                now = time.perf_counter()
                if first_s is None:
                    first_s = now
                    m.ttft.labels(name).observe(now - started_s)
                    m.recent.record_ttft(now - started_s)
                    if chunk.kv_bytes:
                        m.kv_transfer_bytes.labels(name).observe(chunk.kv_bytes)
                        m.kv_transfer_seconds.labels(name).observe(chunk.kv_transfer_ms / 1000)
                        ttft_ms = 1000 * (now - started_s)
                        m.kv_transfer_ttft_share.labels(name).observe(
                            min(1.0, chunk.kv_transfer_ms / max(ttft_ms, 1e-6))
                        )
                else:
                    m.itl.labels(name).observe(now - last_s)
                last_s = now
                last = chunk
                yield chunk
            status = "200"
        except BaseException as exc:
            status = _status(exc)
            raise
        finally:
            await stream.aclose()
            self._release(urls, model)
            m.requests.labels(name, endpoint, status).inc()
            m.requests_by_mode.labels(name, mode).inc()
            if last is not None:
                m.e2e.labels(name).observe(last_s - started_s)
                m.prompt_tokens.labels(name).inc(last.num_prompt_tokens)
                m.generation_tokens.labels(name).inc(last.num_output_tokens)
                m.cached_prompt_tokens.labels(name).inc(last.num_cached_tokens)
                if first_s is not None and last.num_output_tokens > 1:
                    tpot_s = (last_s - first_s) / (last.num_output_tokens - 1)
                    m.tpot.labels(name).observe(tpot_s)
                    m.recent.record_tpot(tpot_s)

    def _release(self, urls: list[str], model: ServedModel) -> None:
        self.num_in_flight -= 1
        self.metrics.in_flight.dec()
        for instance in model.instances:
            if instance.url in urls:
                instance.num_in_flight -= 1


def _status(exc: BaseException) -> str:
    code = getattr(exc, "status_code", None)
    if isinstance(code, int):
        return str(code)
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "499"
    return "500"


async def until_disconnected(
    is_disconnected: Callable[[], Awaitable[bool]], work: Awaitable[T], poll_s: float = 0.25
) -> T:
    """Run ``work``; cancel it if the client goes away first (non-streaming requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()
