"""Wire types between the gateway and engine instances (one module for every process boundary).

The gateway sends a ``GenerateRequest`` (token ids, already templated and tokenized) to an
engine instance, which answers with a stream of ``TokenChunk`` lines (NDJSON). ``ModelInfo`` is
what an instance tells a gateway about the model it serves, tokenizer included, so a gateway
needs no access to the weights' storage. ``EngineStats`` feeds routing and metrics.
Every message carries ``schema_version``; a receiver rejects versions it does not know.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moeflow.domain.roles import Role

SCHEMA_VERSION: Literal[1] = 1

FinishReason = Literal["stop", "length", "abort"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = SCHEMA_VERSION


class SamplingParams(BaseModel):
    """How to pick each next token. ``temperature == 0`` means greedy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    """Any value torch.Generator.manual_seed accepts."""
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Subtracted once from the logit of every token already in the output (OpenAI)."""
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Subtracted from a token's logit once per time it occurs in the output (OpenAI)."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    """Divides positive (multiplies negative) logits of tokens in the prompt or output (CTRL,
    as transformers applies it); 1 disables."""
    min_tokens: int = Field(0, ge=0)
    """End-of-sequence and ``stop_token_ids`` cannot be sampled before this many tokens."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """``(token_id, bias)`` pairs added to the logits before sampling; bias in [-100, 100]."""
    logprobs: int | None = Field(None, ge=0, le=20)
    """Return each sampled token's log-probability and this many most likely alternatives
    (log-softmax of the model's raw logits, before penalties and temperature); None: none."""
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    """Return each prompt token's log-probability given the tokens before it (and this many
    alternatives); the first prompt token has none. None: none."""
    grammar: str | None = None
    """Constrain the output to this llguidance grammar (a JSON schema, Lark or regex grammar
    in llguidance's JSON form), built by the gateway from ``response_format`` or forced tool
    calls. None: unconstrained."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_logit_processing(self) -> bool:
        """True when anything beyond temperature/top-k/top-p changes this request's logits
        (penalties, ``min_tokens``, ``logit_bias``, a grammar): only such rows pay for it."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
            or self.min_tokens or self.logit_bias or self.grammar is not None
        )


class KVSource(BaseModel):
    """Where a decode instance fetches a request's prompt KV (prefill/decode disaggregation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_url: str
    prefill_rank: str


class ResumeState(BaseModel):
    """Failover: what an earlier instance already generated for this request and the client
    already received. The new instance computes the prompt plus ``output_token_ids`` as its
    context and continues after them; its detokenizer starts from those tokens, so stop strings
    and multi-byte characters that span the hand-over come out exactly as without one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_token_ids: tuple[int, ...] = Field(min_length=1)
    num_emitted_chars: int = Field(0, ge=0)
    """Characters of text the client has received (the rest is held back, e.g. a possible
    stop-string prefix, and comes out with the next chunk)."""


class GenerateRequest(_Message):
    request_id: str = Field(min_length=1, max_length=128)
    prompt_token_ids: tuple[int, ...] = Field(min_length=1)
    """The original prompt. With ``resume`` the instance computes ``prompt_token_ids +
    resume.output_token_ids`` and ``sampling.max_tokens`` counts only new tokens."""
    sampling: SamplingParams
    kv_source: KVSource | None = None
    """Set by the gateway for a split request: the decode instance pulls the prompt's KV."""
    resume: ResumeState | None = None
    """Set by the gateway when it moves a request whose instance failed mid-stream."""
    adapter: str | None = Field(None, min_length=1, max_length=128)
    """The LoRA adapter to serve it with (its name on the instance); None: the base model."""

    @property
    def context_token_ids(self) -> tuple[int, ...]:
        """What the instance computes before its first new token."""
        if self.resume is None:
            return self.prompt_token_ids
        return self.prompt_token_ids + self.resume.output_token_ids

    def __repr__(self) -> str:  # never log prompt contents
        return (
            f"GenerateRequest(request_id={self.request_id!r}, "
            f"num_prompt_tokens={len(self.prompt_token_ids)}, sampling={self.sampling!r})"
        )

    __str__ = __repr__


class TopLogprob(BaseModel):
    """One candidate token and its log-probability."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_id: int
    logprob: float


class TokenLogprob(BaseModel):
    """A token's log-probability and the most likely alternatives at its position (most likely
    first). ``logprob`` is None for a prompt's first token, which has no context."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_id: int
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()


class TokenChunk(_Message):
    """One step's worth of output for one request. The last chunk has ``finish_reason``."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    kv_bytes: int = 0
    """Split requests, first chunk: bytes of prompt KV moved from the prefill instance."""
    kv_transfer_ms: float = 0.0
    """Split requests, first chunk: wall time of the layer-wise KV transfer (the prefill's
    send of layer 0, then the decode side's span from layer 0's arrival to the last layer
    written into its blocks; the copies of both sides overlap in it)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """With ``SamplingParams.logprobs``: one entry per id in ``token_ids``."""
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    """With ``SamplingParams.prompt_logprobs``: one per prompt token, on the first chunk."""


class PrefillRequest(_Message):
    """Decode -> prefill: compute this prompt, send its KV over XCCL to ``decode_rank``."""

    request: GenerateRequest
    decode_rank: str
    tag: str


class PrefillResponse(_Message):
    """Prefill -> decode, after the KV is sent: the first token and what was moved."""

    request_id: str
    first_token_id: int
    num_cached_tokens: int
    kv_bytes: int
    send_ms: float
    """Sending every layer (gathered from the blocks straight into the transport's buffers)."""
    first_layer_send_ms: float = 0.0
    """Sending layer 0 alone: the part of the transfer the decode side cannot overlap."""


class ErrorChunk(_Message):
    """Sent in place of a TokenChunk when a request fails after its stream started."""

    request_id: str
    code: str
    message: str


class ModelInfo(_Message):
    served_model_name: str
    architecture: str
    max_model_len: int
    tokenizer_json: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]
    created_unix: int
    role: Role = Role.COLOCATED
    xccl_rank: str = ""


class EngineStats(_Message):
    instance_id: str
    role: Role
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    num_prefix_hit_tokens: int
    num_prompt_tokens_total: int
    num_preemptions_total: int
    num_memory_waits_total: int = 0
    """Requests that had to wait in the queue for free KV blocks (back-pressure)."""
    is_loop_alive: bool = True
    """False once the engine loop died (the process is about to exit)."""
    is_transport_ok: bool = True
    """False while the instance's XCCL transport (e.g. its Redis) is unreachable."""
    is_draining: bool = False
    """True after POST /v1/drain or SIGTERM: in-flight requests finish, new ones go elsewhere."""
    adapters: tuple[str, ...] = ()
    """LoRA adapters the instance serves (requests may name them)."""
    resident_adapters: tuple[str, ...] = ()
    """Those of ``adapters`` whose weights are in memory now (the rest are read on use)."""
    num_pending_prompt_tokens: int = 0
    """Prompt tokens still to compute here (waiting and part-prefilled requests; not those
    whose KV comes from a prefill instance): the gateway's measure of the prefill queue."""

    @property
    def kv_usage_ratio(self) -> float:
        if self.num_total_blocks == 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks


# -- attention/expert split: balancer <-> attention and expert instances (HTTP) ----------------
class ExpertPlacement(_Message):
    """Which experts each expert instance hosts (index i = XCCL rank ``expert-i``), for every
    MoE layer alike. ``version`` increases with each change the balancer makes."""

    version: int = Field(ge=0)
    hosted: tuple[tuple[int, ...], ...]


class ExpertLoadRequest(_Message):
    """Ask an expert instance to add (load) or drop (unload) these experts."""

    experts: tuple[int, ...]


class ExpertInstanceStats(_Message):
    rank: str
    hosted: tuple[int, ...]
    tokens_per_expert: tuple[int, ...]
    """(token, expert) pairs computed per expert id, over all MoE layers, since start."""
    num_dispatches_total: int
    num_missing_expert_total: int


class AttentionExpertStats(_Message):
    """An attention instance's view of the expert fleet (cumulative counters since start)."""

    placement: ExpertPlacement
    dead_instances: tuple[int, ...]
    routed_tokens_per_expert: tuple[int, ...]
    """Top-k hits per expert id, summed over MoE layers: what the balancer balances."""
    pairs_per_instance: tuple[int, ...]
    """(token, expert) pairs sent to each expert instance."""
    a2e_ms_per_layer: tuple[float, ...]
    """Mean A2E latency (send start -> expert has the message) per MoE layer, in order."""
    e2a_ms_per_layer: tuple[float, ...]
    """Mean E2A latency (expert starts its answer -> attention has it) per MoE layer."""
    a2e_transfer_ms_per_layer: tuple[float, ...] = ()
    """The exchange's own share of A2E: from when the message was sent or the expert started
    waiting for it, whichever is later, to when it had it (A2E less time queued behind the
    expert's other work)."""
    e2a_transfer_ms_per_layer: tuple[float, ...] = ()
    """The same for E2A: from the answer's send or the attention instance starting to wait for
    it, whichever is later, to when it had it."""
    expert_compute_ms_per_layer: tuple[float, ...]
    num_redispatches_total: int
    """Pairs sent again to another replica after an expert instance failed."""
    imbalance_ratio: float
    """max / mean of the pairs each live expert instance got since the placement was set."""
