"""The engine -> gateway wire carries any text: Unicode line separators (U+2028, U+2029,
U+0085), form feeds, CR LF and astral characters inside generated text never cut a message."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moeflow.domain.messages import GenerateRequest, ResumeState, SamplingParams, TokenChunk
from moeflow.gateway.engine_client import EngineClient
from moeflow.text.tokenizer import TextTokenizer
from moeflow.web.framing import FrameTooLargeError, encode_line, read_lines
from tests.integration.engine.engine_kit import serve
from tests.reference import make_engine

HOSTILE_TEXT = "a\u2028b\u2029c\u0085d\x0ce\r\nf\x1c\x1d\x1e g \U0001F600 \u00e9\v h"


async def chunked(data: bytes, rng: random.Random) -> AsyncIterator[bytes]:
    i = 0
    while i < len(data):
        n = rng.randint(1, 7)
        yield data[i : i + n]
        i += n


@pytest.mark.parametrize("seed", range(20))
async def test_lines_split_on_newline_bytes_only(seed: int) -> None:
    rng = random.Random(seed)
    chunks = [TokenChunk(request_id=f"r{i}", token_ids=(i,), text=HOSTILE_TEXT[: i + 1])
              for i in range(len(HOSTILE_TEXT))]
    data = b"".join(encode_line(c) for c in chunks)
    lines = [line async for line in read_lines(chunked(data, rng))]
    assert [TokenChunk.model_validate_json(line) for line in lines] == chunks


async def test_an_endless_line_is_refused() -> None:
    async def endless() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 1024

    with pytest.raises(FrameTooLargeError):
        async for _ in read_lines(endless(), max_line_bytes=16 * 1024):
            pass


@pytest.mark.slow
async def test_generated_text_with_line_separators_reaches_the_gateway_whole(
    smollm2_dir: Path,
) -> None:
    """A resumed request makes the real engine emit chosen text in its first chunk: here text
    full of characters that text decoders treat as line ends."""
    tokenizer = TextTokenizer.from_dir(smollm2_dir)
    ids = tokenizer.encode(HOSTILE_TEXT)
    expected = tokenizer.decode(ids)  # the tokenizer may normalise some whitespace
    assert all(c in expected for c in "\u2028\u2029\u0085\x0c")
    engine = make_engine(smollm2_dir)
    with serve(engine) as served:
        client = EngineClient(connect_timeout_s=5, request_timeout_s=60)
        try:
            request = GenerateRequest(
                request_id="wire", prompt_token_ids=tuple(tokenizer.encode("Hello")),
                sampling=SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                resume=ResumeState(output_token_ids=tuple(ids), num_emitted_chars=0),
            )
            stream = await client.open_generate(served.url, request)
            chunks = [chunk async for chunk in stream]
        finally:
            await client.aclose()
    text = "".join(c.text for c in chunks)
    assert text.startswith(expected)
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 3
