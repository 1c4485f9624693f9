"""Training records of a FineTune: JSONL text -> typed records, or a `DatasetError` that names
the lines at fault. Pure (no tokenizer); the trainer tokenizes what this returns, and the
operator runs it over a ConfigMap dataset before it starts any Pod.

One record per non-blank line, either
- chat: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}`
  with at least one assistant message (only assistant turns are trained on), or
- completion: `{"prompt": "...", "completion": "..."}` (only the completion is trained on).
Other keys of a record (an "id", metadata) are ignored. `DataFormat.AUTO` takes each line for
what it is; CHAT or COMPLETION insist on one kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from moeflow.domain.finetune_spec import DataFormat

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_PROBLEMS = 5


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatRecord:
    messages: tuple[Message, ...]
    line: int


@dataclass(frozen=True)
class CompletionRecord:
    prompt: str
    completion: str
    line: int


Record = ChatRecord | CompletionRecord


class DatasetError(ValueError):
    """Records that cannot be trained on. `problems`: "line N: what; fix: what to do"."""

    def __init__(self, problems: list[str], total: int | None = None) -> None:
        total = len(problems) if total is None else total
        shown = "; ".join(problems[:MAX_REPORTED_PROBLEMS])
        more = total - min(total, MAX_REPORTED_PROBLEMS)
        super().__init__(shown + (f" (and {more} more)" if more > 0 else ""))
        self.problems = problems


def _chat(obj: dict[str, object], line: int) -> ChatRecord:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        parsed.append(Message(str(role), content))
    if not any(m.role == "assistant" and m.content for m in parsed):
        raise ValueError("no assistant message with content: there is nothing to learn")
    return ChatRecord(tuple(parsed), line)


def _completion(obj: dict[str, object], line: int) -> CompletionRecord:
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError('"prompt" and "completion" must both be strings')
    if not completion:
        raise ValueError('"completion" is empty: there is nothing to learn')
    return CompletionRecord(prompt, completion, line)


def _record(obj: dict[str, object], line: int, fmt: DataFormat) -> Record:
    if fmt is DataFormat.CHAT or (fmt is DataFormat.AUTO and "messages" in obj):
        return _chat(obj, line)
    if fmt is DataFormat.COMPLETION or "prompt" in obj or "completion" in obj:
        return _completion(obj, line)
    raise ValueError('neither "messages" nor "prompt"/"completion"')


def parse_records(text: str, fmt: DataFormat = DataFormat.AUTO) -> list[Record]:
    """Every record of `text` (JSONL), or DatasetError listing the bad lines (1-based)."""
    records: list[Record] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not valid JSON ({e.msg} at column {e.colno});"
                            " fix: one JSON object per line")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {number}: a JSON {type(obj).__name__}, not an object;"
                            " fix: one JSON object per line")
            continue
        try:
            records.append(_record(obj, number, fmt))
        except ValueError as e:
            problems.append(f"line {number}: {e}; fix: see docs/finetuning.md for the"
                            " record formats")
    if problems:
        raise DatasetError(problems)
    if not records:
        raise DatasetError(["the dataset has no records; fix: one JSON object per line"])
    return records
