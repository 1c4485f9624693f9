"""Next-token choice for a batch: greedy, temperature, top-k, top-p, per-request seeds.

Greedy rows take ``argmax`` of float32 logits, exactly what ``transformers`` does with
``do_sample=False``. A request with a ``seed`` draws from its own ``torch.Generator``, so its
output does not depend on what else is in the batch.

Numerical safety (every value ``SamplingParams`` accepts must give a token, never an error):

- A request is *effectively greedy* (argmax, no draw) when ``SamplingParams.is_greedy``
  (temperature 0 or top_k 1), when ``temperature < GREEDY_TEMPERATURE`` (1e-5: dividing by
  such a value overflows float32 and the tempered distribution is one-hot in any case), or
  when ``top_p * vocab <= 1`` (the most likely token alone holds at least ``1 / vocab`` of the
  mass, so such a nucleus never keeps a second token).
- Otherwise the logits are shifted by their maximum before the division by the temperature,
  so every scaled logit is ``<= 0`` and the best one is exactly 0: ``exp`` cannot overflow,
  at least one probability is 1 before normalisation, and no ``inf - inf`` can appear.
  Probabilities come from ``softmax`` of those values (finite, summing to 1); top-k with
  ``k >= vocab`` keeps everything.
- A row whose logits are not finite (NaN or +inf: the model broke, which should not happen)
  gets ``INVALID_TOKEN`` instead of a token; the engine fails only that request.

Per-request extras (``RequestSampling``: penalties, ``min_tokens``, ``logit_bias``, logprobs)
cost only the rows that ask for them: a batch without such rows runs exactly the code above,
and a plain row in a batch with such rows is neither copied nor changed. Logprobs are the
log-softmax of the model's raw float32 logits (before penalties and temperature), as OpenAI
and vLLM report them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from pydantic import PrivateAttr

from moeflow.domain.messages import SamplingParams, TokenLogprob, TopLogprob
from moeflow.engine.kernels import native

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are treated as 0 (greedy)."""

INVALID_TOKEN = -1
"""Returned for a row whose logits are not finite; never a real token id."""


def is_effectively_greedy(params: SamplingParams, vocab_size: int) -> bool:
    """True when the request's distribution is one-hot on the argmax (see the module doc)."""
    return (
        params.is_greedy
        or params.temperature < GREEDY_TEMPERATURE
        or params.top_p * vocab_size <= 1.0
    )


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.is_greedy or params.temperature < GREEDY_TEMPERATURE or params.seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed)
    return generator


class TokenConstraint(Protocol):
    """A per-request output constraint (``moeflow.engine.constraints``)."""

    def mask_(self, row: torch.Tensor) -> None:
        """Set the logits of tokens not allowed next to ``-inf``, in place."""

    def accept(self, token_id: int) -> None:
        """Advance past an emitted token."""


@dataclass
class RowState:
    """What one request's row needs across steps: the tokens it has seen (penalties), how many
    it produced (``min_tokens``), and the logprob of the token sampled last (read by the engine
    when it emits that token)."""

    prompt_token_ids: frozenset[int]
    blocked_until_min: tuple[int, ...]
    """Token ids that cannot be sampled before ``min_tokens`` (EOS and stop ids)."""
    output_counts: dict[int, int] = field(default_factory=dict)
    num_output: int = 0
    pending: TokenLogprob | None = None
    constraint: TokenConstraint | None = None

    def accept(self, token_id: int) -> None:
        """Record a token the request emitted (sampled here, on a prefill instance, or
        generated before a failover)."""
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        self.num_output += 1
        if self.constraint is not None:
            self.constraint.accept(token_id)

    def take_logprob(self, token_id: int) -> TokenLogprob | None:
        """The logprob computed for ``token_id`` in the last step, if any (consumed)."""
        pending, self.pending = self.pending, None
        return pending if pending is not None and pending.token_id == token_id else None


class RequestSampling(SamplingParams):
    """The engine's per-request ``SamplingParams``: the same fields, plus the request's
    ``RowState``. The engine builds one only for requests that need state (penalties,
    ``min_tokens``, ``logit_bias``, logprobs); every other request keeps its plain params."""

    _state: RowState | None = PrivateAttr(None)

    @property
    def state(self) -> RowState:
        assert self._state is not None, "RequestSampling.bind() was not called"
        return self._state

    @classmethod
    def bind(cls, params: SamplingParams, prompt_token_ids: Iterable[int],
             eos_token_ids: Iterable[int],
             constraint: TokenConstraint | None = None) -> RequestSampling:
        made = cls.model_validate(params.model_dump())
        blocked = set(params.stop_token_ids)
        blocked.update(eos_token_ids)
        made._state = RowState(
            prompt_token_ids=(frozenset(prompt_token_ids)
                              if params.repetition_penalty != 1.0 else frozenset()),
            blocked_until_min=tuple(sorted(blocked)) if params.min_tokens else (),
            constraint=constraint,
        )
        return made


def needs_state(params: SamplingParams) -> bool:
    """True when the request needs a ``RequestSampling`` (see its doc)."""
    return params.has_logit_processing or params.logprobs is not None


def _process(row: torch.Tensor, params: SamplingParams, state: RowState) -> None:
    """Penalties, ``logit_bias`` and ``min_tokens`` on one row of logits, in place."""
    if params.repetition_penalty != 1.0:
        seen = state.prompt_token_ids.union(state.output_counts)
        if seen:
            ids = torch.tensor(sorted(seen), dtype=torch.long)
            values = row[ids]
            rp = params.repetition_penalty
            row[ids] = torch.where(values > 0, values / rp, values * rp)
    if (params.frequency_penalty or params.presence_penalty) and state.output_counts:
        ids = torch.tensor(list(state.output_counts), dtype=torch.long)
        counts = torch.tensor(list(state.output_counts.values()), dtype=row.dtype)
        row[ids] -= counts * params.frequency_penalty + params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        row.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias], dtype=row.dtype))
    if state.num_output < params.min_tokens and state.blocked_until_min:
        row[torch.tensor(state.blocked_until_min, dtype=torch.long)] = float("-inf")
    if state.constraint is not None:
        state.constraint.mask_(row)


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[TopLogprob, ...]:
    """The ``k`` most likely tokens of one row of log-probabilities, most likely first."""
    if k <= 0:
        return ()
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return tuple(TopLogprob(token_id=int(i), logprob=float(v))
                 for i, v in zip(ids.tolist(), values.tolist(), strict=True))


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of finite float32 logits [V].

    Returns the tempered logits shifted so that the largest is 0 (log-probabilities up to a
    constant), with filtered ids at ``-inf``; the largest always survives. Needs
    ``params.temperature >= GREEDY_TEMPERATURE``.
    """
    logits = (logits - logits.max()) / params.temperature  # <= 0, the best exactly 0
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        cumulative = probs.cumsum(-1)
        # drop tokens once the mass *before* them already reaches top_p; keep at least one.
        # (compare in float64: a tiny top_p such as 1e-300 would round to 0 in float32)
        before = (cumulative - probs).double()
        drop_sorted = before >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def greedy_and_valid(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Per row of ``logits [B, V]``: its argmax (the first maximum), and whether it is valid:
    no NaN or +inf, and not all -inf (such a row has no token to pick). One pass per row in
    the C kernels (at B = 32 the five torch passes took ~4 ms a step); torch otherwise."""
    kernels = native.library()
    if (kernels is not None and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[1] > 0 and logits.stride(1) == 1):
        return kernels.greedy_rows(logits)
    if not logits.shape[-1]:  # an empty row has no token either
        return [0] * logits.shape[0], [False] * logits.shape[0]
    greedy = logits.argmax(dim=-1).tolist()
    finite = torch.isfinite(logits).logical_or(logits == float("-inf")).all(dim=-1)
    has_max = logits.max(dim=-1).values > float("-inf")
    return greedy, finite.logical_and(has_max).tolist()


def sample(
    logits: torch.Tensor,  # [B, V] float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token id per row, or ``INVALID_TOKEN`` for a row whose logits are not finite.

    Rows whose params are ``RequestSampling`` get their processing first, and, when they ask
    for logprobs, ``state.pending`` set for the token they sampled.
    """
    vocab_size = logits.shape[-1]
    stateful = [row for row, p in enumerate(params) if isinstance(p, RequestSampling)]
    raw_logprobs: dict[int, torch.Tensor] = {}
    if stateful:
        wants = [row for row in stateful if params[row].logprobs is not None]
        if wants:
            rows = torch.tensor(wants, dtype=torch.long)
            for row, lp in zip(wants, torch.log_softmax(logits[rows].float(), dim=-1),
                               strict=True):
                raw_logprobs[row] = lp
        processed = [row for row in stateful if params[row].has_logit_processing]
        if processed:
            logits = logits.clone()  # the caller's tensor stays the model's output
            for row in processed:
                p = params[row]
                assert isinstance(p, RequestSampling)
                _process(logits[row], p, p.state)
    greedy, valid = greedy_and_valid(logits)
    token_ids: list[int] = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not valid[row]:
            token_ids.append(INVALID_TOKEN)
        elif is_effectively_greedy(p, vocab_size):
            token_ids.append(int(greedy[row]))
        else:
            probs = _filter(logits[row], p).softmax(-1)
            token_ids.append(int(torch.multinomial(probs, 1, generator=generator).item()))
    for row, lp in raw_logprobs.items():
        p = params[row]
        assert isinstance(p, RequestSampling)
        token_id = token_ids[row]
        if token_id != INVALID_TOKEN:
            p.state.pending = TokenLogprob(token_id=token_id, logprob=float(lp[token_id]),
                                           top=top_logprobs(lp, p.logprobs or 0))
    return token_ids
