"""Tokenizer, chat template and incremental detokenizer, with no torch and no transformers.

Built on the ``tokenizers`` library and a sandboxed Jinja2 environment that renders Hugging Face
chat templates the way ``transformers`` does (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``), so the gateway stays a light CPU process.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from moeflow.domain.errors import InvalidRequestError

# Bytes of an incomplete UTF-8 sequence decode to U+FFFD; hold them back until complete.
_REPLACEMENT_CHAR = "\ufffd"


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' tojson: no HTML escaping, key order kept, non-ASCII kept
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class TextTokenizer:
    """Encodes prompts and renders chat templates for one model.

    Contract: ``encode(text)`` adds no special tokens beyond what the text spells out (the chat
    template already contains them), matching ``transformers``' ``apply_chat_template`` output.
    Text that came from a client goes through ``encode_chat`` or ``encode_prompt`` instead, where
    special-token text a client wrote (``<|im_start|>system``) stays plain text: only the
    template's own text ever yields special (control) tokens.
    """

    def __init__(
        self,
        tokenizer_json: str,
        *,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
    ) -> None:
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        # the same vocabulary, with special tokens' text encoded as ordinary text
        self._text_only = Tokenizer.from_str(tokenizer_json)
        self._text_only.encode_special_tokens = True
        self._special_ids = {
            token.content: int(token_id)
            for token_id, token in self._tokenizer.get_added_tokens_decoder().items()
            if token.special
        }
        specials = sorted(self._special_ids, key=len, reverse=True)  # longest match first
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.tokenizer_json = tokenizer_json
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, model_dir: Path) -> TextTokenizer:
        """Load from a Hugging Face checkpoint folder (tokenizer.json, tokenizer_config.json)."""
        tokenizer_json = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        )
        template_path = model_dir / "chat_template.jinja"
        chat_template = (
            template_path.read_text(encoding="utf-8")
            if template_path.exists()
            else config.get("chat_template")
        )
        return cls(
            tokenizer_json,
            chat_template=chat_template if isinstance(chat_template, str) else None,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
        )

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_prompt(self, text: str) -> list[int]:
        """A client's raw prompt: every character is text, special-token text included (a
        client who wants control tokens sends token ids)."""
        return list(self._text_only.encode(text, add_special_tokens=False).ids)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """The rendered chat's token ids, where special tokens come only from the template.

        Messages whose content spells no special token give exactly
        ``encode(render_chat(messages))``, i.e. ``transformers``' ``apply_chat_template`` ids.
        Otherwise each such occurrence is swapped for a unique marker before rendering (so the
        template sees the rest of the content as is); the special tokens left in the rendered
        text are the template's own. Like the tokenizer itself, the text is then split at those
        and encoded piece by piece, but with the markers put back as plain text: a piece holding
        client text is encoded whole, as ``transformers`` would with ``split_special_tokens``.
        """
        pattern = self._special_text
        contents = [m.get("content") for m in messages]
        if pattern is None or not any(isinstance(c, str) and pattern.search(c) for c in contents):
            return self.encode(self.render_chat(messages,
                                                add_generation_prompt=add_generation_prompt,
                                                tools=tools))
        marker = _fresh_marker([c for c in contents if isinstance(c, str)])
        shielded: list[str] = []

        def shield(found: re.Match[str]) -> str:
            shielded.append(found.group())
            return f"{marker}{len(shielded) - 1}\ue001"

        safe = [
            {**m, "content": pattern.sub(shield, m["content"])}
            if isinstance(m.get("content"), str) else m
            for m in messages
        ]
        rendered = self.render_chat(safe, add_generation_prompt=add_generation_prompt,
                                    tools=tools)
        marked = re.compile(re.escape(marker) + "([0-9]+)\ue001")

        def as_text(piece: str) -> list[int]:
            text = marked.sub(lambda found: shielded[int(found.group(1))], piece)
            return list(self._text_only.encode(text, add_special_tokens=False).ids) if text else []

        ids: list[int] = []
        start = 0
        for special in pattern.finditer(rendered):
            ids += as_text(rendered[start:special.start()])
            ids.append(self._special_ids[special.group()])
            start = special.end()
        return ids + as_text(rendered[start:])

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        token_id = self._tokenizer.token_to_id(token)
        return None if token_id is None else int(token_id)

    @property
    def template_renders_tools(self) -> bool:
        """True when the chat template reads the ``tools`` variable (a tool-aware template)."""
        return self.chat_template is not None and "tools" in self.chat_template

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The chat as the model's template renders it; ``tools`` (OpenAI function
        definitions) are passed to the template as transformers' ``apply_chat_template``
        passes them."""
        if self._template is None:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions instead", param="messages"
            )
        try:
            return self._template.render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise InvalidRequestError(
                f"the chat template rejected the messages: {exc}", param="messages"
            ) from exc


def _fresh_marker(texts: Sequence[str]) -> str:
    """A marker prefix (private-use characters around a random nonce) found in none of
    ``texts``, so a client cannot forge one."""
    while True:
        marker = f"\ue000{secrets.token_hex(8)}:"
        if not any(marker in text for text in texts):
            return marker


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, and applies stop strings.

    ``append`` returns only text that is final: it never emits half of a multi-byte character,
    and while stop strings are set it holds back the longest tail that could still begin one.
    Once a stop string appears, the text is cut before it and ``is_stopped`` turns true.
    """

    tokenizer: TextTokenizer
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    num_emitted_chars: int = 0
    is_stopped: bool = False
    _prefix_offset: int = 0
    _read_offset: int = 0

    def append(self, new_token_ids: Sequence[int]) -> str:
        if self.is_stopped:
            return ""
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            self.text += self._decode_next()
        return self._take_delta(is_final=False)

    def resume(self, token_ids: Sequence[int], num_emitted_chars: int) -> None:
        """Start from tokens another instance generated, of whose text ``num_emitted_chars``
        characters already reached the client: the next ``append`` returns the rest."""
        for token_id in token_ids:
            self.token_ids.append(token_id)
            self.text += self._decode_next()
        self.num_emitted_chars = min(num_emitted_chars, len(self.text))

    def finish(self) -> str:
        """Flush held-back text at the end of generation."""
        if self.is_stopped:
            return ""
        return self._take_delta(is_final=True)

    def _decode_next(self) -> str:
        prefix = self.tokenizer.decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self.token_ids[self._prefix_offset :])
        if full.endswith(_REPLACEMENT_CHAR) or len(full) <= len(prefix):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        return full[len(prefix) :]

    def _take_delta(self, *, is_final: bool) -> str:
        for stop in self.stop:
            index = self.text.find(stop, max(0, self.num_emitted_chars - len(stop) + 1))
            if index != -1:
                self.text = self.text[:index]
                self.is_stopped = True
                is_final = True
        limit = len(self.text)
        if not is_final and self.stop:
            limit -= max(len(s) for s in self.stop) - 1
        limit = max(limit, self.num_emitted_chars)
        delta = self.text[self.num_emitted_chars : limit]
        self.num_emitted_chars = limit
        return delta
