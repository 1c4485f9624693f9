"""The gateway's job executor: one OpenAI request -> one engine task, with limits and metrics.

``GenerationService`` turns validated protocol fields into ``SamplingParams`` (refusing what we
do not implement), enforces the in-flight bound, picks an instance, and yields ``TokenChunk``s
while recording TTFT, ITL, TPOT, end-to-end latency and token counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from moeflow.domain.errors import (
    BackendUnavailableError,
    ContextLengthExceededError,
    InvalidRequestError,
    MoeflowError,
    OverloadedError,
    PrefillUnavailableError,
)
from moeflow.domain.messages import (
    GenerateRequest,
    KVSource,
    ResumeState,
    SamplingParams,
    TokenChunk,
)
from moeflow.gateway.engine_client import EngineClient, EngineStream, InstanceFailedError
from moeflow.gateway.metrics import GatewayMetrics, RequestMeter
from moeflow.gateway.protocol import _SamplingFields
from moeflow.gateway.registry import ModelRegistry, ServedModel
from moeflow.gateway.routing import InstanceView
from moeflow.gateway.scale_from_zero import WakeQueue
from moeflow.gateway.settings import GatewaySettings

T = TypeVar("T")
logger = logging.getLogger(__name__)

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
        bias: list[tuple[int, float]] = []
        for key, value in (body.logit_bias or {}).items():
            token_id = int(key) if key.strip().lstrip("-").isdigit() else -1
            if not 0 <= token_id < vocab:
                raise _refuse("logit_bias", f"logit_bias keys must be token ids in [0, {vocab})")
            bias.append((token_id, value))
        min_tokens = body.min_tokens or 0
        if max_tokens is not None and min_tokens > max_tokens:
            raise _refuse("min_tokens", "min_tokens must not exceed max_tokens")
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else room,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            seed=body.seed,
            stop=tuple(stop),
            stop_token_ids=stop_ids,
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=(1.0 if body.repetition_penalty is None
                                else body.repetition_penalty),
            min_tokens=min_tokens,
            logit_bias=tuple(bias),
            logprobs=body.num_logprobs(),
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
        first (the wait is bounded; ``is_disconnected`` ends it early). An instance that fails,
        before or after accepting, is replaced: the request goes to another instance with the
        tokens already streamed (``ResumeState``), and the stream goes on (see ``_serve``).
        """
        self.admit()
        job = _Job(model, endpoint, request_id, tuple(prompt_token_ids), sampling,
                   deadline_s=time.monotonic() + self.settings.request_timeout_s,
                   is_disconnected=is_disconnected)
        self.num_in_flight += 1
        self.metrics.in_flight.inc()
        try:
            attempt = await self._start(job)
        except BaseException:
            self._release_job()
            raise
        return self._serve(job, attempt)

    async def _start(self, job: _Job) -> _Attempt:
        """Place the job and open its stream, trying other instances when one fails; raises
        the client's error (400, 429) at once and a clean 503 when nothing is left."""
        while True:
            if self.wake is not None:
                # again after a failed attempt: the last instance may just have scaled to zero
                await self.wake.wait_until_ready(job.model.name, job.is_disconnected)
            try:
                return await self._open_once(job)
            except _NoHealthyInstance as exc:
                # instances exist but none is healthy right now (restarting, Redis down):
                # wait a bounded time for one to come back rather than fail at once
                if time.monotonic() >= job.started_s + self.settings.failover_wait_s:
                    raise BackendUnavailableError(
                        f"no healthy instance of {job.model.name!r} came back within "
                        f"{self.settings.failover_wait_s:.0f} s", ) from exc
                await asyncio.sleep(_WAIT_POLL_S)
            except _FailedBeforeStream as failed:
                if not isinstance(failed.error, InstanceFailedError | PrefillUnavailableError):
                    # it answered, but refuses work (draining, loop dead): route elsewhere
                    self.registry.mark_unhealthy(job.model, failed.target_url, "refused")
                self._give_up_or_count(job, failed.error, failed.prefill_url)
                await asyncio.sleep(_backoff_s(job.num_failures))

    def _give_up_or_count(self, job: _Job, exc: BackendUnavailableError,
                          prefill_url: str | None = None) -> None:
        """One more failed attempt: mark a dead instance, and raise if the budget is spent."""
        if isinstance(exc, PrefillUnavailableError) and prefill_url is not None:
            logger.warning("request %s: prefill instance %s failed: %s", job.request_id,
                           prefill_url, exc.message)
            self.registry.mark_unhealthy(job.model, prefill_url, "prefill_failed")
        elif isinstance(exc, InstanceFailedError):
            logger.warning("request %s: instance %s failed (%s: %s)", job.request_id, exc.url,
                           exc.reason, exc.detail)
            if exc.reason in ("unreachable", "cut"):
                self.registry.mark_unhealthy(job.model, exc.url, exc.reason)
        else:
            logger.warning("request %s: %s", job.request_id, exc.message)
        job.num_failures += 1
        self.metrics.failovers.labels(job.model.name, _reason(exc)).inc()
        if job.num_failures > self.settings.max_failovers:
            # the last error's class and message (client-safe by contract) say why
            cls = BackendUnavailableError if isinstance(exc, InstanceFailedError) else type(exc)
            raise cls(f"{exc.message} (the request was tried {job.num_failures} times on "
                      f"instances of {job.model.name!r})") from None
        if time.monotonic() >= job.deadline_s:
            raise BackendUnavailableError(
                f"the request could not finish within {self.settings.request_timeout_s:.0f} s "
                "after its engine instance failed") from None

    async def _open_once(self, job: _Job) -> _Attempt:
        model = job.model
        resume = None
        if job.output_token_ids:
            resume = ResumeState(output_token_ids=tuple(job.output_token_ids),
                                 num_emitted_chars=job.num_emitted_chars)
        context = list(job.prompt_token_ids) + job.output_token_ids
        sampling = job.sampling.model_copy(
            update={"max_tokens": job.sampling.max_tokens - len(job.output_token_ids)})
        try:
            placement = self.registry.place(
                model, context, sampling.max_tokens, self.settings.pd_min_prompt_tokens,
                self.settings.pd_interference_weight,
            )
        except BackendUnavailableError as exc:
            if not model.instances:
                raise  # nothing to wait for (scale from zero is the wake queue's job)
            raise _NoHealthyInstance(exc.message) from exc
        used = [i for i in (placement.colocated, placement.prefill, placement.decode) if i]
        target = placement.decode or placement.colocated
        assert target is not None
        kv_source = None
        if placement.prefill is not None:
            kv_source = KVSource(
                prefill_url=placement.prefill.url, prefill_rank=placement.prefill.rank_name
            )
        for instance in used:
            instance.num_in_flight += 1
        # its prompt queues there until the first token comes back (routing counts it then)
        prefilling = _Prefilling(placement.computes_prompt, len(context))
        # a failed instance may still hold the old id: each attempt gets its own
        suffix = f":{job.num_failures}" if job.num_failures else ""
        request = GenerateRequest(
            request_id=f"{job.request_id}{suffix}",
            prompt_token_ids=job.prompt_token_ids,
            sampling=sampling,
            kv_source=kv_source,
            resume=resume,
            adapter=model.adapter,
        )
        prefill_url = placement.prefill.url if placement.prefill is not None else None
        try:
            stream = await self.client.open_generate(target.url, request)
        except BackendUnavailableError as exc:
            _release_instances(used)
            prefilling.done()
            raise _FailedBeforeStream(exc, target.url, prefill_url) from exc
        except BaseException:
            _release_instances(used)
            prefilling.done()
            raise
        return _Attempt(stream, used, "split" if placement.is_split else "colocated",
                        prefill_url, prefilling)

    async def _serve(self, job: _Job, attempt: _Attempt) -> AsyncGenerator[TokenChunk, None]:
        """Stream the job's chunks, failing over mid-stream: when the instance dies or reports
        a failure, the job goes to another instance with what was already streamed, and the
        client sees one stream with no gap and no repeat. Usage counts the original prompt."""
        m = self.metrics
        name = job.model.name
        started_s = time.perf_counter()
        first_s: float | None = None
        last_s = started_s
        last: TokenChunk | None = None
        counted = RequestMeter()
        try:
            while True:
                num_resumed = len(job.output_token_ids)
                try:
                    async for chunk in attempt.stream:
                        attempt.prefilling.done()
                        now = time.perf_counter()
                        if first_s is None:
                            first_s = now
                            m.ttft.labels(name).observe(now - started_s)
                            m.recent.record_ttft(now - started_s)
                            _observe_kv(m, name, chunk, 1000 * (now - started_s))
                        else:
                            m.itl.labels(name).observe(now - last_s)
                        last_s = now
                        if num_resumed:
                            chunk = _as_continuation(chunk, job, num_resumed)
                        job.output_token_ids.extend(chunk.token_ids)
                        job.num_emitted_chars += len(chunk.text)
                        last = chunk
                        counted.observe(m, name, chunk)
                        if chunk.finish_reason is not None:
                            # before the last yield: a consumer that stops at the finishing
                            # chunk resumes this generator only when it is closed, maybe late
                            counted.observe_end(m, name, started_s, first_s, last_s, chunk)
                        yield chunk
                        if chunk.finish_reason is not None:
                            return
                    raise InstanceFailedError(attempt.stream.url, "cut", "stream ended",
                                              is_before_accept=False)
                except MoeflowError as exc:
                    if not _is_instance_failure(exc):
                        raise
                    if exc.code == "internal_error":
                        # a step failed with this request in it: once may be bad luck (it
                        # shared the step with the culprit), twice says the culprit is this
                        # request, which must not take more instances' steps down with it
                        job.num_step_failures += 1
                        if job.num_step_failures > 1:
                            raise
                    await attempt.close()
                    self._give_up_or_count(job, _as_backend_error(exc), attempt.prefill_url)
                    await asyncio.sleep(_backoff_s(job.num_failures))
                    attempt = await self._start(job)
        finally:
            await attempt.close()
            self._release_job()
            m.requests_by_mode.labels(name, attempt.mode).inc()
            if last is not None:
                counted.observe_end(m, name, started_s, first_s, last_s, last)

    def _release_job(self) -> None:
        self.num_in_flight -= 1
        self.metrics.in_flight.dec()


@dataclass
class _Job:
    """One client request across the instances that serve it (one, or more after failover)."""

    model: ServedModel
    endpoint: str
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    deadline_s: float
    started_s: float = field(default_factory=time.monotonic)
    is_disconnected: Callable[[], Awaitable[bool]] | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_emitted_chars: int = 0
    num_failures: int = 0
    num_step_failures: int = 0


_WAIT_POLL_S = 0.25


class _NoHealthyInstance(Exception):
    pass


class _FailedBeforeStream(Exception):
    def __init__(self, error: BackendUnavailableError, target_url: str,
                 prefill_url: str | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.target_url = target_url
        self.prefill_url = prefill_url


def _backoff_s(num_failures: int) -> float:
    """A short pause before the next attempt grows with each failure, so that a burst of
    failures does not spend the whole budget before the stats poller has seen the change."""
    return min(1.0, 0.05 * 2.0 ** (num_failures - 1))


class _Prefilling:
    """One attempt's prompt, counted in its instance's ``num_in_flight_prompt_tokens`` from
    placement until its first token (or the attempt's end), once."""

    def __init__(self, instance: InstanceView, num_tokens: int) -> None:
        self.instance: InstanceView | None = instance
        self.num_tokens = num_tokens
        instance.num_in_flight_prompt_tokens += num_tokens

    def done(self) -> None:
        if self.instance is not None:
            self.instance.num_in_flight_prompt_tokens -= self.num_tokens
            self.instance = None


@dataclass
class _Attempt:
    stream: EngineStream
    instances: list[InstanceView]
    mode: str
    prefill_url: str | None
    prefilling: _Prefilling
    is_closed: bool = False

    async def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            _release_instances(self.instances)
            self.prefilling.done()
            await self.stream.aclose()


def _release_instances(instances: list[InstanceView]) -> None:
    for instance in instances:
        instance.num_in_flight -= 1


def _is_instance_failure(exc: MoeflowError) -> bool:
    """Failures of the instance rather than of the request: the instance died, cut the stream,
    lost a peer (prefill, experts, Redis) or failed a step (``internal_error``)."""
    return isinstance(exc, BackendUnavailableError) or exc.code == "internal_error"


class _StepFailedError(BackendUnavailableError):
    code = "internal_error"


def _as_backend_error(exc: MoeflowError) -> BackendUnavailableError:
    if isinstance(exc, BackendUnavailableError):
        return exc
    return _StepFailedError(f"an engine instance failed the request: {exc.message}")


def _as_continuation(chunk: TokenChunk, job: _Job, num_resumed: int) -> TokenChunk:
    """A chunk of a resumed attempt, counted as if one instance had served the whole job."""
    num_prompt = len(job.prompt_token_ids)
    return chunk.model_copy(update={
        "request_id": job.request_id,
        "num_prompt_tokens": num_prompt,
        "num_cached_tokens": min(chunk.num_cached_tokens, num_prompt),
        "num_output_tokens": chunk.num_output_tokens + num_resumed,
        "kv_bytes": 0,
        "kv_transfer_ms": 0.0,
    })


def _observe_kv(m: GatewayMetrics, name: str, chunk: TokenChunk, ttft_ms: float) -> None:
    if chunk.kv_bytes:
        m.kv_transfer_bytes.labels(name).observe(chunk.kv_bytes)
        m.kv_transfer_seconds.labels(name).observe(chunk.kv_transfer_ms / 1000)
        m.kv_transfer_ttft_ratio.labels(name).observe(
            min(1.0, chunk.kv_transfer_ms / max(ttft_ms, 1e-6))
        )


def _reason(exc: BackendUnavailableError) -> str:
    return exc.reason if isinstance(exc, InstanceFailedError) else exc.code


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
