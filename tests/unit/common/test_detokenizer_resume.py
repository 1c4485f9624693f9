"""Failover hands a request's output to a new instance mid-stream: the new detokenizer resumes
from the tokens and the characters the client already has, and the client's text is exactly
what one uninterrupted detokenizer would have produced (stop strings and multi-byte characters
that span the hand-over included)."""

from __future__ import annotations

import random

import pytest

from moeflow.text.tokenizer import IncrementalDetokenizer
from tests.unit.common.test_tokenizer import byte_level_tokenizer


def feed(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> str:
    out = []
    i = 0
    while i < len(ids) and not detok.is_stopped:
        n = rng.randint(1, 3)
        out.append(detok.append(ids[i : i + n]))
        i += n
    return "".join(out)


@pytest.mark.parametrize("seed", range(40))
def test_a_resumed_stream_equals_an_uninterrupted_one(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab é€😀日\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 30)))
    tok = byte_level_tokenizer()
    ids = tok.encode(text)
    stops = (text[rng.randrange(len(text)):][: rng.randint(1, 3)], "§never§")
    stops = stops if rng.random() < 0.7 else ()

    whole = IncrementalDetokenizer(tok, stop=stops)
    expected = feed(whole, ids, random.Random(seed)) + whole.finish()

    cut = rng.randrange(1, len(ids))
    first = IncrementalDetokenizer(tok, stop=stops)
    received = feed(first, ids[:cut], rng)
    if first.is_stopped:  # the first instance finished the request: nothing to resume
        assert received + first.finish() == expected
        return
    second = IncrementalDetokenizer(tok, stop=stops)
    second.resume(ids[:cut], len(received))
    received += feed(second, ids[cut:], rng) + second.finish()
    assert received == expected
    assert "\ufffd" not in received or "\ufffd" in expected
