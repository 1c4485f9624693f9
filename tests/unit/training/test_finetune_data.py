"""JSONL records: what is accepted, and errors that name each bad line."""

from __future__ import annotations

import json

import pytest

from moeflow.domain.finetune_data import ChatRecord, CompletionRecord, DatasetError, parse_records
from moeflow.domain.finetune_spec import DataFormat
from moeflow.training.data import TOY_DATASET


def chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def test_both_record_kinds_and_blank_lines() -> None:
    text = "\n".join([chat(("user", "Hi"), ("assistant", "Hello")), "",
                      json.dumps({"prompt": "2+2=", "completion": "4", "id": 7})])
    first, second = parse_records(text)
    assert isinstance(first, ChatRecord) and first.line == 1
    assert [m.role for m in first.messages] == ["user", "assistant"]
    assert isinstance(second, CompletionRecord) and second.line == 3
    assert (second.prompt, second.completion) == ("2+2=", "4")


@pytest.mark.parametrize("line, says", [
    ('{"messages": [', "not valid JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"text": "free text"}', 'neither "messages" nor "prompt"/"completion"'),
    (chat(("user", "Hi")), "no assistant message"),
    (chat(("user", "Hi"), ("robot", "beep")), "'robot' is not one of"),
    ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
    ('{"prompt": "x"}', '"prompt" and "completion" must both be strings'),
    ('{"prompt": "x", "completion": ""}', "nothing to learn"),
])
def test_each_bad_line_is_named_with_the_fix(line: str, says: str) -> None:
    text = chat(("user", "Hi"), ("assistant", "Hello")) + "\n" + line + "\n"
    with pytest.raises(DatasetError) as e:
        parse_records(text)
    assert str(e.value).startswith("line 2: ") and says in str(e.value)
    assert "fix:" in str(e.value)


def test_many_problems_are_summed_up() -> None:
    with pytest.raises(DatasetError) as e:
        parse_records("\n".join(["nope"] * 9))
    assert len(e.value.problems) == 9 and str(e.value).endswith("(and 4 more)")


def test_a_forced_format_refuses_the_other_kind() -> None:
    with pytest.raises(DatasetError, match="line 1"):
        parse_records(json.dumps({"prompt": "a", "completion": "b"}), DataFormat.CHAT)
    with pytest.raises(DatasetError, match="line 1"):
        parse_records(chat(("user", "a"), ("assistant", "b")), DataFormat.COMPLETION)


def test_empty_dataset_is_an_error() -> None:
    with pytest.raises(DatasetError, match="no records"):
        parse_records("\n\n")


def test_the_shipped_toy_set_is_valid_ascii_chat() -> None:
    text = TOY_DATASET.read_text()
    records = parse_records(text, DataFormat.CHAT)
    assert 30 <= len(records) <= 60
    assert text.isascii()  # the tiny test tokenizer's alphabet
