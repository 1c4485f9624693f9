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

import torch

from moeflow.domain.messages import TokenLogprob
from moeflow.engine.models.attention import AttentionMetadata, PrefillSpan
from moeflow.engine.models.decoder import DecoderModel
from moeflow.engine.sampler import top_logprobs


@torch.inference_mode()
def _all_logprobs(model: DecoderModel, kv_dtype: torch.dtype, ids: list[int],
                  rows: slice) -> torch.Tensor:
    """Log-softmax of the logits at positions ``rows`` of ``ids``, from one forward over a
    scratch KV cache."""
    n = len(ids)
    a = model.arch
    scratch = torch.zeros(a.num_layers, 2, n, a.num_kv_heads, a.head_dim, dtype=kv_dtype)
    meta = AttentionMetadata(slot_mapping=torch.arange(n))
    meta.prefills.append(PrefillSpan(q_start=0, q_end=n))
    hidden = model.forward(torch.tensor(ids), torch.arange(n), meta, scratch)
    return torch.log_softmax(model.logits(hidden[rows]).float(), dim=-1)


def prompt_logprobs(
    model: DecoderModel, kv_dtype: torch.dtype, prompt_token_ids: Sequence[int], k: int
) -> tuple[TokenLogprob, ...]:
    """One entry per prompt token: its log-probability given the tokens before it, with the
    ``k`` most likely alternatives; the first token has ``logprob`` None (no context)."""
    ids = list(prompt_token_ids)
    first = TokenLogprob(token_id=ids[0], logprob=None)
    if len(ids) < 2:
        return (first,)
    logprobs = _all_logprobs(model, kv_dtype, ids, slice(0, -1))
    out = [first]
    for pos in range(1, len(ids)):
        row = logprobs[pos - 1]
        token_id = ids[pos]
        out.append(TokenLogprob(token_id=token_id, logprob=float(row[token_id]),
                                top=top_logprobs(row, k)))
    return tuple(out)


def next_token_logprob(
    model: DecoderModel, kv_dtype: torch.dtype, context_token_ids: Sequence[int],
    token_id: int, k: int,
) -> TokenLogprob:
    """The logprob of ``token_id`` right after ``context_token_ids``: for a first token that
    a prefill instance sampled (its logits stayed there); one more prefill of the context."""
    row = _all_logprobs(model, kv_dtype, list(context_token_ids), slice(-1, None))[0]
    return TokenLogprob(token_id=token_id, logprob=float(row[token_id]),
                        top=top_logprobs(row, k))
