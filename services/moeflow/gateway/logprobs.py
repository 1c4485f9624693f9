"""Engine logprobs (token ids) -> the OpenAI wire forms (token text): chat's ``content`` list
and the legacy completions' parallel lists.

A token's text is its own decoding (special tokens included); a token that is only part of a
multi-byte character decodes to U+FFFD, as in OpenAI's answers, and its ``bytes`` are those
of that text.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeflow.domain.messages import TokenLogprob
from moeflow.gateway.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
)
from moeflow.text.tokenizer import TextTokenizer


def token_text(tokenizer: TextTokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: TextTokenizer, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> ChatTopLogprob:
        text = token_text(tokenizer, token_id)
        return ChatTopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for e in entries:
        text = token_text(tokenizer, e.token_id)
        content.append(ChatTokenLogprob(
            token=text,
            logprob=e.logprob if e.logprob is not None else 0.0,
            bytes=list(text.encode()),
            top_logprobs=[top(t.token_id, t.logprob) for t in e.top],
        ))
    return ChatLogprobs(content=content)


def completion_logprobs(
    tokenizer: TextTokenizer, entries: Sequence[TokenLogprob], text_offset: int = 0
) -> CompletionLogprobs:
    """``text_offset`` is where the first token's text starts in the choice's text."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = text_offset
    for e in entries:
        text = token_text(tokenizer, e.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append(
            None if e.logprob is None
            else {token_text(tokenizer, t.token_id): t.logprob for t in e.top}
        )
        out.text_offset.append(offset)
        offset += len(text)
    return out
