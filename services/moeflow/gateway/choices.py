"""``n`` choices of one prompt: n engine requests, opened together.

Each choice is its own engine request, so each has its own sampling state. They are opened
back to back; on one instance the engine computes the prompt once: the other choices wait for
the first one's full prompt blocks and share them through the prefix cache
(``moeflow.engine.prefill_policy.waits_for_shared_prefix``). A request
with a ``seed`` gives choice ``i`` the seed ``seed + i``: equal seeds would give n equal
choices, which no client asking for n wants.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

from moeflow.domain.messages import SamplingParams, TokenChunk
from moeflow.gateway.generation import GenerationService
from moeflow.gateway.registry import ServedModel

_SEED_MODULUS = 2**64


def choice_samplings(sampling: SamplingParams, n: int) -> list[SamplingParams]:
    """The sampling of each of ``n`` choices (seeds offset by the choice's index)."""
    if n == 1 or sampling.seed is None:
        return [sampling] * n
    out = []
    for i in range(n):
        seed = sampling.seed + i
        if seed >= _SEED_MODULUS:  # stay inside the range SamplingParams accepts
            seed -= _SEED_MODULUS
        out.append(sampling.model_copy(update={"seed": seed}))
    return out


async def open_choices(
    service: GenerationService,
    model: ServedModel,
    endpoint: str,
    request_id: str,
    prompt_ids: list[int],
    samplings: Sequence[SamplingParams],
    is_disconnected: Callable[[], Awaitable[bool]] | None,
    *,
    index_offset: int = 0,
) -> list[AsyncGenerator[TokenChunk, None]]:
    """Open one engine stream per sampling; on failure close those already open and raise.
    Request ids get ``-<index>`` suffixes when there are several."""
    streams: list[AsyncGenerator[TokenChunk, None]] = []
    try:
        for i, sampling in enumerate(samplings):
            several = len(samplings) > 1 or index_offset > 0
            rid = f"{request_id}-{index_offset + i}" if several else request_id
            streams.append(await service.open(model, endpoint, rid, prompt_ids, sampling,
                                              is_disconnected))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    return streams
