"""Records -> token ids and labels, trained on assistant/completion tokens only.

Contract:
- Chat records are rendered with the model's own chat template (`apply_chat_template`), as
  the engine will render them when serving. The trained span of each assistant turn is the
  text that rendering that turn adds after the generation prompt: its content and the
  template's end-of-turn marker (so the model learns to stop). Everything else (system, user,
  tool turns, role headers) has label -100 and costs no loss.
- Completion records are `prompt + completion + eos` (no template); only `completion + eos`
  is trained.
- Token spans come from the fast tokenizer's character offsets over the whole rendered text,
  so the ids are exactly those of tokenizing the conversation in one piece.
- Examples longer than `max_length` tokens keep their first `max_length` tokens; one left
  with no trained token is dropped (counted in `Dataset.num_dropped`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeflow.domain.finetune_data import (
    ChatRecord,
    CompletionRecord,
    DatasetError,
    Record,
    parse_records,
)
from moeflow.domain.finetune_spec import DataFormat

IGNORE_INDEX = -100
TOY_DATASET = Path(__file__).parent / "data" / "toy_chat.jsonl"
"""A few dozen short chat records shipped with moeflow (`--data toy`)."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset path does not exist."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    """IGNORE_INDEX where no loss is taken."""

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    sha256: str
    """Of the JSONL bytes: part of a run's fingerprint (resume refuses another dataset)."""
    num_records: int
    num_truncated: int
    num_dropped: int


def resolve_data_path(data: str) -> Path:
    """`data` as a path; `toy` (when no such file exists) is the shipped toy chat set."""
    path = Path(data)
    if not path.exists() and data == "toy":
        return TOY_DATASET
    return path


def _render(tokenizer: Any, messages: Sequence[Any], *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=False,
        add_generation_prompt=generation_prompt)
    return str(text)


def chat_spans(tokenizer: Any, record: ChatRecord) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError([f"line {record.line}: the model's tokenizer has no chat template;"
                            " fix: use prompt/completion records, or a chat model"])
    text = _render(tokenizer, record.messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(record.messages):
        if message.role != "assistant" or not message.content:
            continue
        before = _render(tokenizer, record.messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, record.messages[: i + 1], generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DatasetError([
                f"line {record.line}: the model's chat template does not render this"
                " conversation turn by turn (an earlier turn changes once a later one is"
                " added), so assistant tokens cannot be told apart; fix: keep one assistant"
                " turn, last, per record"])
        spans.append((len(before), len(upto)))
    return text, spans


def _completion_text(tokenizer: Any, record: CompletionRecord) -> tuple[str, list[tuple[int, int]]]:
    eos = tokenizer.eos_token or ""
    completion = record.completion if record.completion.endswith(eos) else record.completion + eos
    return record.prompt + completion, [(len(record.prompt), len(record.prompt) + len(completion))]


def encode(tokenizer: Any, record: Record, max_length: int) -> tuple[Example, bool]:
    """(example, truncated) of one record."""
    if isinstance(record, ChatRecord):
        text, spans = chat_spans(tokenizer, record)
        special = False  # the template writes any bos itself
    else:
        text, spans = _completion_text(tokenizer, record)
        special = True
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    labels = [
        token if start != end and any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length]), truncated


def load_dataset(path: Path, tokenizer: Any, fmt: DataFormat, max_length: int) -> Dataset:
    """Read, validate and tokenize a JSONL dataset (DatasetNotFoundError, DatasetError)."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} does not exist or is not a file; fix: point --data"
                                   " at a JSONL file")
    if not getattr(tokenizer, "is_fast", False):
        raise DatasetError(["the model's tokenizer is not a fast tokenizer (no tokenizer.json),"
                            " which training needs for character offsets; fix: use a"
                            " checkpoint with tokenizer.json"])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError([f"byte {e.start}: not UTF-8; fix: save the file as UTF-8"]) from None
    records = parse_records(text, fmt)
    examples: list[Example] = []
    num_truncated = num_dropped = 0
    for record in records:
        example, truncated = encode(tokenizer, record, max_length)
        num_truncated += truncated
        if example.num_trained == 0:
            num_dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise DatasetError([f"every record lost its trained tokens to --max-length {max_length};"
                            " fix: raise the max length"])
    return Dataset(examples, hashlib.sha256(raw).hexdigest(), len(records), num_truncated,
                   num_dropped)
