"""Grammar-constrained decoding (structured output, forced tool calls) with llguidance.

A request whose ``SamplingParams.grammar`` is set (an llguidance grammar: JSON schema, Lark or
regex, built by the gateway) gets a ``GrammarConstraint``: before each of its tokens is
sampled, the grammar's allowed-token mask sets every other logit of its row to ``-inf``; each
token it emits advances the grammar. Only such rows pay for it. The constraint is rebuilt from
the grammar and the tokens already emitted wherever the request continues (a decode instance
after the prefill instance's first token, a new instance after a failover).

Once the grammar is complete only end-of-sequence tokens are allowed, so a constrained request
ends by itself with ``finish_reason`` "stop" (or "length" if ``max_tokens`` cuts it first).
"""

from __future__ import annotations

from collections.abc import Iterable

import llguidance
import torch

from moeflow.domain.errors import InvalidRequestError

_BITS = torch.arange(8, dtype=torch.uint8)


class GrammarCompiler:
    """One per engine: the tokenizer view llguidance needs (built once, ~a second for a large
    vocabulary), and matchers made from it."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(
                self._tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos)
        return self._tokenizer

    def check(self, grammar: str) -> None:
        """Raise the client's error for a grammar that cannot be used."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer)
        if is_error:
            raise InvalidRequestError(f"the output constraint is invalid: {messages[0][:500]}",
                                      param="response_format")

    def constraint(self, grammar: str) -> GrammarConstraint:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"the output constraint is invalid: {matcher.get_error()[:500]}",
                param="response_format")
        return GrammarConstraint(matcher, self.vocab_size)


class GrammarConstraint:
    """One request's grammar state."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def mask_(self, row: torch.Tensor) -> None:
        """Set the logits of the tokens the grammar does not allow next to ``-inf``."""
        if self._matcher.is_error():
            return  # a rejected token (cannot happen when the mask was applied); stay usable
        packed = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        allowed = ((packed.unsqueeze(-1) >> _BITS) & 1).flatten()[: row.shape[-1]]
        if allowed.shape[-1] < row.shape[-1]:
            allowed = torch.nn.functional.pad(allowed, (0, row.shape[-1] - allowed.shape[-1]))
        row.masked_fill_(allowed == 0, float("-inf"))

    def accept(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    @property
    def is_done(self) -> bool:
        return bool(self._matcher.is_stopped())
