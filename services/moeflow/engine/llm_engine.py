"""The synchronous engine core: admission, one step at a time, and output assembly.

``step()`` schedules, runs the model once, samples, detokenizes incrementally and applies stop
strings, returning one ``TokenChunk`` per request that produced output. It is driven by a single
thread (``AsyncEngine``); nothing here is thread-safe, except the read-only ``check_admission``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeflow.domain.coldstart import ColdStartRecord
from moeflow.domain.errors import (
    ContextLengthExceededError,
    ExpertsUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    MoeflowError,
    OverloadedError,
)
from moeflow.domain.messages import (
    EngineStats,
    GenerateRequest,
    ModelInfo,
    TokenChunk,
    TokenLogprob,
)
from moeflow.domain.roles import Role
from moeflow.engine.adapter_store import adapter_applied, build_store
from moeflow.engine.block_manager import BlockManager, num_blocks_for
from moeflow.engine.config import EngineSettings
from moeflow.engine.constraints import GrammarCompiler
from moeflow.engine.kv_transfer import KVLanding, LayerwiseKVSender
from moeflow.engine.logprobs import next_token_logprob, prompt_logprobs
from moeflow.engine.model_runner import ModelRunner
from moeflow.engine.models.arch import load_arch
from moeflow.engine.sampler import INVALID_TOKEN, RequestSampling, needs_state
from moeflow.engine.scheduler import Scheduler, StepPlan
from moeflow.engine.sequence import Sequence
from moeflow.text.tokenizer import IncrementalDetokenizer, TextTokenizer

if TYPE_CHECKING:
    from moeflow.engine.preloaded import Preloaded

logger = logging.getLogger(__name__)


STEP_FAILED_MESSAGE = (
    "the engine failed while computing this request; it was stopped (other requests go on)"
)
INVALID_LOGITS_MESSAGE = "the model produced invalid scores for this request; it was stopped"


class StepFailed(Exception):
    """A step could not run: its requests are already aborted here (KV blocks freed, nothing
    indexed in the prefix cache) and must be failed with ``error``; the engine itself keeps
    serving.

    Two kinds: no live expert for a routed token (``ExpertsUnavailableError``: the fleet's
    fault, transient; ``is_internal`` False), and anything else that raised while the step
    ran: the model forward, sampling, the postprocess (``is_internal`` True, error code
    ``internal_error``, a client-safe message; the cause is logged). A driver that sees
    internal failures step after step should consider the engine broken."""

    def __init__(self, request_ids: list[str], error: MoeflowError, *,
                 is_internal: bool = False) -> None:
        super().__init__(error.message)
        self.request_ids = request_ids
        self.error = error
        self.is_internal = is_internal


@dataclass
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    num_reported_tokens: int = 0


class LLMEngine:
    def __init__(self, settings: EngineSettings, *, preloaded: Preloaded | None = None,
                 cold_start: ColdStartRecord | None = None) -> None:
        # cold start (moeflow.coldstart): weights may come preloaded; the record times the steps
        self.cold_start = cold_start or ColdStartRecord.from_process()
        self.cold_start.mark_load_started()
        num_threads = settings.resolved_num_threads()  # the container's CPU limit
        torch.set_num_threads(num_threads)
        self.settings = settings
        self.created_unix = int(time.time())
        self.arch = preloaded.arch if preloaded else load_arch(settings.model_path)
        self.tokenizer = (
            preloaded.tokenizer if preloaded else TextTokenizer.from_dir(settings.model_path)
        )
        num_blocks = ModelRunner.num_blocks_for_bytes(
            self.arch, settings.dtype, settings.block_size, settings.kv_cache_bytes
        )
        # An unset context length shrinks to what the KV memory holds; a set one is a promise.
        self.max_model_len = settings.max_model_len or min(
            self.arch.max_position_embeddings, 8192, num_blocks * settings.block_size
        )
        if num_blocks < num_blocks_for(self.max_model_len, settings.block_size):
            raise ValueError(
                f"kv_cache_bytes={settings.kv_cache_bytes} holds {num_blocks} blocks, fewer than "
                f"one sequence of max_model_len={self.max_model_len} needs; raise kv_cache_bytes "
                "or lower max_model_len"
            )
        started = time.perf_counter()
        if settings.role is Role.ATTENTION:
            from moeflow.engine.ae.attention_runner import build_attention_runner

            self.runner: ModelRunner = build_attention_runner(
                settings, self.arch, num_blocks=num_blocks, max_model_len=self.max_model_len
            )
        else:
            self.runner = ModelRunner(
                settings.model_path,
                self.arch,
                dtype=settings.dtype,
                num_blocks=num_blocks,
                block_size=settings.block_size,
                max_model_len=self.max_model_len,
                model=preloaded.model if preloaded else None,
            )
        self.weight_load_s = time.perf_counter() - started
        runner_load_s = (
            0.0 if preloaded else getattr(self.runner, "weight_load_s", self.weight_load_s)
        )
        self.cold_start.mark_load_done(time.monotonic() - self.weight_load_s + runner_load_s)
        self.adapters = build_store(settings, self.arch, self.runner.dtype)
        self.runner.adapters = self.adapters
        self.block_manager = BlockManager(
            num_blocks, settings.block_size, enable_prefix_caching=settings.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            prefill_max_wait_s=settings.prefill_max_wait_s,
        )
        eos = set(self.arch.eos_token_ids)
        if self.tokenizer.eos_token and (eos_id := self.tokenizer.token_to_id(
            self.tokenizer.eos_token
        )) is not None:
            eos.add(eos_id)
        self.eos_token_ids = frozenset(eos)
        self.grammars = GrammarCompiler(self.tokenizer.tokenizer_json, self.arch.vocab_size,
                                        self.eos_token_ids)
        """Structured output: llguidance's view of the tokenizer, built at the first use."""
        self._requests: dict[str, _Request] = {}
        self.exported_kv: dict[str, torch.Tensor] = {}
        """Prefill role: request_id -> prompt KV, filled before the request's last chunk."""
        self.kv_senders: dict[str, LayerwiseKVSender] = {}
        """Prefill role: where requests added with a sender send their KV."""
        self.pending_kv_pulls: list[str] = []
        """Decode role: requests whose blocks are reserved and whose KV should be fetched."""
        self.kv_landings: dict[str, KVLanding] = {}
        """Decode role: the reserved blocks of those requests, writable until they end."""
        self.failed_requests: list[tuple[str, MoeflowError]] = []
        """Requests a step failed on their own (e.g. non-finite logits), already aborted; the
        driver delivers the errors and clears the list."""
        self.last_step_was_idle = False
        self.num_prefix_hit_tokens = 0
        self.num_prompt_tokens_total = 0
        logger.info(
            "engine ready: %s (%s), %d KV blocks of %d tokens, max_model_len=%d, threads=%d",
            settings.name, self.arch.model_type, num_blocks, settings.block_size,
            self.max_model_len, num_threads,
        )

    # -- admission -------------------------------------------------------------------------
    def check_admission(self, request: GenerateRequest) -> None:
        """Raise the client's error now, before any work: bad ids, too long, queue full."""
        num_prompt = len(request.context_token_ids)
        if num_prompt + request.sampling.max_tokens > self.max_model_len:
            if num_prompt >= self.max_model_len:
                msg = (
                    f"the prompt has {num_prompt} tokens; this model's context is "
                    f"{self.max_model_len} tokens"
                )
            else:
                msg = (
                    f"the prompt ({num_prompt} tokens) plus max_tokens "
                    f"({request.sampling.max_tokens}) exceeds this model's context of "
                    f"{self.max_model_len} tokens; lower max_tokens or shorten the prompt"
                )
            raise ContextLengthExceededError(msg, param="messages")
        vocab = self.arch.vocab_size
        if any(t < 0 or t >= vocab for t in request.context_token_ids):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        if len(self.scheduler.waiting) >= self.settings.max_num_waiting:
            raise OverloadedError(
                f"the engine's queue is full ({self.settings.max_num_waiting} waiting requests)"
            )
        if request.request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}")
        if request.sampling.grammar is not None:
            self.grammars.check(request.sampling.grammar)
        if request.adapter is not None and not self.adapters.has(request.adapter):
            raise ModelNotFoundError(
                f"the adapter {request.adapter!r} is not loaded on this instance", param="model")
        if request.kv_source is not None and self.settings.role is not Role.DECODE:
            raise InvalidRequestError(
                f"this instance's role is {self.settings.role!r}: only decode instances take "
                "requests whose KV comes from a prefill instance"
            )

    def add_request(self, request: GenerateRequest, *,
                    exports_kv: bool | LayerwiseKVSender = False) -> None:
        """``exports_kv``: prefill role; True keeps the prompt's KV in ``exported_kv``, a sender
        sends it layer by layer from the blocks when the prompt's last chunk is computed."""
        self.check_admission(request)
        sampling = request.sampling
        if needs_state(sampling):
            # penalties and logprobs keep per-request state in the sampler; plain requests
            # keep plain params and cost the sampler nothing
            constraint = None
            if sampling.grammar is not None:
                constraint = self.grammars.constraint(sampling.grammar)
            bound = RequestSampling.bind(sampling, request.context_token_ids,
                                         self.eos_token_ids, constraint)
            for token_id in request.resume.output_token_ids if request.resume else ():
                bound.state.accept(token_id)
            sampling = bound
        adapter_id = self.adapters.acquire(request.adapter) if request.adapter else 0
        seq = Sequence(
            adapter_id=adapter_id,
            request_id=request.request_id,
            prompt_token_ids=list(request.context_token_ids),
            sampling=sampling,
            eos_token_ids=self.eos_token_ids,
            arrival_s=time.monotonic(),
            is_remote_prefill=request.kv_source is not None,
            exports_kv=exports_kv is not False,
        )
        if isinstance(exports_kv, LayerwiseKVSender):
            self.kv_senders[request.request_id] = exports_kv
        detok = IncrementalDetokenizer(self.tokenizer, stop=request.sampling.stop)
        if request.resume is not None:  # failover: continue another instance's output
            detok.resume(request.resume.output_token_ids, request.resume.num_emitted_chars)
        self._requests[request.request_id] = _Request(seq, detok)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        self.kv_senders.pop(request_id, None)
        if (landing := self.kv_landings.pop(request_id, None)) is not None:
            landing.cancel()  # before the blocks are freed: waits for a write in progress
        if (req := self._requests.pop(request_id, None)) is not None:
            self.scheduler.abort(request_id)
            self.runner.forget(request_id)
            self._release_adapter(req.seq)
        self.exported_kv.pop(request_id, None)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_id:
            self.adapters.release(seq.adapter_id)
            seq.adapter_id = 0  # released once, however it ends

    def close(self) -> None:
        """Release what the runner holds outside this process (XCCL endpoints)."""
        self.runner.close()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[TokenChunk]:
        plan = self.scheduler.schedule()
        for seq in plan.kv_pulls:
            self.pending_kv_pulls.append(seq.request_id)
            self.kv_landings[seq.request_id] = self._landing(seq)
        self.last_step_was_idle = plan.is_empty
        if plan.is_empty:
            return []
        try:
            sampled = self.runner.execute(plan)
            sampled = self._drop_invalid(plan, sampled)
            for item in plan.scheduled:
                seq = item.seq
                if seq.exports_kv and item.completes_sequence and not seq.output_token_ids:
                    # copy out before postprocess frees the blocks of this one-token request
                    # (a sender stays until the step went through: exporting twice, after a
                    # failed step, fails the request, since the decode side has layers already)
                    sender = self.kv_senders.get(seq.request_id)
                    if sender is not None:
                        sender.export(self.runner.kv_cache, self.runner.kv_slots(
                            seq.block_table, seq.num_prompt_tokens))
                    else:
                        self.exported_kv[seq.request_id] = self.runner.read_kv(
                            seq.block_table, seq.num_prompt_tokens
                        )
            self.scheduler.postprocess(plan, sampled)
            for item in plan.scheduled:
                if item.completes_sequence:
                    self.kv_senders.pop(item.seq.request_id, None)
        except Exception as exc:
            # A failed step indexes nothing in the prefix cache (that happens in postprocess).
            members = [item.seq for item in plan.scheduled]
            if len(members) > 1 and not isinstance(exc, ExpertsUnavailableError):
                # which request made it fail? Each recomputes alone until a step of its own
                # succeeds; the culprit's own step fails next, and only it fails
                logger.warning("a step of %d requests failed (%s: %s); running them one at a "
                               "time to find the cause", len(members), type(exc).__name__, exc)
                for seq in members:
                    self.exported_kv.pop(seq.request_id, None)
                self.scheduler.quarantine(members)
                return []
            failed = [seq.request_id for seq in members]
            for request_id in failed:
                self.abort(request_id)
            if isinstance(exc, ExpertsUnavailableError):
                raise StepFailed(failed, exc) from exc
            logger.exception("step failed for %d requests", len(failed))
            raise StepFailed(failed, MoeflowError(STEP_FAILED_MESSAGE), is_internal=True) from exc
        chunks: list[TokenChunk] = []
        for request_id, token_id in sampled.items():
            req = self._requests.get(request_id)
            if req is None:
                continue
            try:
                chunks.append(self._emit(req, token_id))
            except Exception:  # detokenizing one request must not fail the others
                logger.exception("output of request %s failed", request_id)
                self.abort(request_id)
                self.failed_requests.append((request_id, MoeflowError(STEP_FAILED_MESSAGE)))
        return chunks

    def _drop_invalid(self, plan: StepPlan, sampled: dict[str, int]) -> dict[str, int]:
        """Fail (alone) the requests whose row had non-finite logits; the rest go on."""
        invalid = {rid for rid, token_id in sampled.items() if token_id == INVALID_TOKEN}
        if not invalid:
            return sampled
        logger.error("non-finite logits for %d requests; failing them", len(invalid))
        plan.scheduled = [s for s in plan.scheduled if s.seq.request_id not in invalid]
        for request_id in invalid:
            self.abort(request_id)
            self.failed_requests.append((request_id, MoeflowError(INVALID_LOGITS_MESSAGE)))
        return {rid: t for rid, t in sampled.items() if rid not in invalid}

    def _landing(self, seq: Sequence) -> KVLanding:
        # full blocks that came from the prefix cache (a sibling's prompt: ``n`` > 1) hold this
        # KV already and may be read by others: only the blocks past them are written
        skip = seq.num_computed_tokens // self.block_manager.block_size
        skip_tokens = skip * self.block_manager.block_size
        slots = self.runner.kv_slots(seq.block_table[skip:], seq.num_prompt_tokens - skip_tokens)
        return KVLanding(self.runner.kv_cache, slots, skip_tokens, seq.num_prompt_tokens)

    def attach_kv(
        self, request_id: str, kv: torch.Tensor | None, first_token_id: int, *,
        num_cached_tokens: int = 0, kv_bytes: int = 0, kv_transfer_ms: float = 0.0,
    ) -> TokenChunk | None:
        """Decode role: the prompt's KV and first token arrived; the request starts decoding.

        ``kv`` [layers, 2, tokens, K, Hd] is written into the blocks here; None means it was
        written layer by layer through the request's ``KVLanding`` (which must be complete).
        Returns the first token's chunk, or None if the request is gone (aborted meanwhile).
        """
        req = self._requests.get(request_id)
        if req is None:
            return None
        seq = req.seq
        landing = self.kv_landings.pop(request_id, None)
        if kv is not None:
            shared = seq.num_computed_tokens // self.block_manager.block_size
            self.runner.write_kv(seq.block_table[shared:],
                                 kv[:, :, shared * self.block_manager.block_size:])
        elif landing is None or not landing.is_complete:
            raise ValueError(f"the KV of request {request_id!r} did not arrive in full")
        self.scheduler.kv_arrived(seq)
        seq.num_cached_tokens = num_cached_tokens
        seq.append_token(first_token_id)
        if seq.finish_reason is not None:
            self.scheduler.finish_early(seq, seq.finish_reason)
        chunk = self._emit(req, first_token_id)
        return chunk.model_copy(update={"kv_bytes": kv_bytes, "kv_transfer_ms": kv_transfer_ms})

    def _emit(self, req: _Request, token_id: int) -> TokenChunk:
        """Detokenize one new token, apply stop strings, and retire the request if done."""
        seq = req.seq
        if len(seq.output_token_ids) == 1:
            self.num_prefix_hit_tokens += seq.num_cached_tokens
            self.num_prompt_tokens_total += seq.num_prompt_tokens
        logprobs: tuple[TokenLogprob, ...] = ()
        if isinstance(seq.sampling, RequestSampling):
            state = seq.sampling.state
            logprob = state.take_logprob(token_id)
            state.accept(token_id)
            if seq.sampling.logprobs is not None:
                if logprob is None:
                    # sampled on a prefill instance, whose logits stayed there: recompute
                    with adapter_applied(self.runner.model, self.adapters, seq.adapter_id):
                        logprob = next_token_logprob(
                            self.runner, seq.token_ids[:-1], token_id, seq.sampling.logprobs)
                logprobs = (logprob,)
        prompt_lps: tuple[TokenLogprob, ...] = ()
        k = seq.sampling.prompt_logprobs
        if k is not None and len(seq.output_token_ids) == 1:
            with adapter_applied(self.runner.model, self.adapters, seq.adapter_id):
                prompt_lps = prompt_logprobs(self.runner, seq.prompt_token_ids, k)
        text = req.detokenizer.append([token_id])
        if req.detokenizer.is_stopped and not seq.is_finished:
            self.scheduler.finish_early(seq)
        if seq.is_finished:
            text += req.detokenizer.finish()
            del self._requests[seq.request_id]
            self.runner.forget(seq.request_id)
            self._release_adapter(seq)
        return TokenChunk(
            request_id=seq.request_id,
            token_ids=(token_id,),
            text=text,
            finish_reason=seq.finish_reason if seq.is_finished else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=len(seq.output_token_ids),
            logprobs=logprobs,
            prompt_logprobs=prompt_lps,
        )

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            instance_id=self.settings.instance_name,
            role=self.settings.role,
            num_waiting=len(self.scheduler.waiting) + len(self.scheduler.awaiting_kv),
            num_running=len(self.scheduler.running),
            num_free_blocks=self.block_manager.num_free_blocks,
            num_total_blocks=self.block_manager.num_blocks,
            num_prefix_hit_tokens=self.num_prefix_hit_tokens,
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            num_memory_waits_total=self.scheduler.num_memory_waits_total,
            adapters=self.adapters.names(),
            resident_adapters=self.adapters.resident_names(),
            num_pending_prompt_tokens=self.scheduler.num_pending_prompt_tokens,
        )

    def model_info(self) -> ModelInfo:
        tok = self.tokenizer
        return ModelInfo(
            served_model_name=self.settings.name,
            architecture=self.arch.model_type,
            max_model_len=self.max_model_len,
            tokenizer_json=tok.tokenizer_json,
            chat_template=tok.chat_template,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            created_unix=self.created_unix,
            role=self.settings.role,
            xccl_rank=self.settings.instance_name,
        )
