"""Prompt log-likelihoods (``echo`` with ``logprobs`` on completions; evaluation harnesses).

A prompt's logprobs need the model's logits at every prompt position, which a serving step
never computes (it keeps only each sequence's last row). They are computed once per request,
when its first token is emitted, by a separate forward of the prompt over a scratch KV cache:
the engine's cache, shared through the prefix cache with other requests, is never written.
That costs one more prefill of the prompt for the requests that ask, and nothing for others.
The same forward gives a split request's first-token logprob on the decode instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from moeflow.domain.messages import TokenLogprob
from moeflow.engine.models.decoder import DecoderModel
from moeflow.engine.sampler import top_logprobs


class ScratchForward(Protocol):
    """What the logprob helpers need of a model runner."""

    model: DecoderModel

    def forward_scratch(self, ids: list[int]) -> torch.Tensor: ...


@torch.inference_mode()
def _all_logprobs(runner: ScratchForward, ids: list[int], rows: slice) -> torch.Tensor:
    """Log-softmax of the logits at positions ``rows`` of ``ids``, from one forward over a
    scratch KV cache (the runner's: in attention/expert mode it reaches the experts too)."""
    hidden = runner.forward_scratch(ids)
    return torch.log_softmax(runner.model.logits(hidden[rows]).float(), dim=-1)


def prompt_logprobs(
    runner: ScratchForward, prompt_token_ids: Sequence[int], k: int
) -> tuple[TokenLogprob, ...]:
    """One entry per prompt token: its log-probability given the tokens before it, with the
    ``k`` most likely alternatives; the first token has ``logprob`` None (no context)."""
    ids = list(prompt_token_ids)
    first = TokenLogprob(token_id=ids[0], logprob=None)
    if len(ids) < 2:
        return (first,)
    logprobs = _all_logprobs(runner, ids, slice(0, -1))
    out = [first]
    for pos in range(1, len(ids)):
        row = logprobs[pos - 1]
        token_id = ids[pos]
        out.append(TokenLogprob(token_id=token_id, logprob=float(row[token_id]),
                                top=top_logprobs(row, k)))
    return tuple(out)


def next_token_logprob(
    runner: ScratchForward, context_token_ids: Sequence[int], token_id: int, k: int
) -> TokenLogprob:
    """The logprob of ``token_id`` right after ``context_token_ids``: for a first token that
    a prefill instance sampled (its logits stayed there); one more prefill of the context."""
    row = _all_logprobs(runner, list(context_token_ids), slice(-1, None))[0]
    return TokenLogprob(token_id=token_id, logprob=float(row[token_id]),
                        top=top_logprobs(row, k))
