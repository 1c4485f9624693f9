"""Tokenization for training: loss only on assistant/completion tokens, the model's own chat
template, and the deterministic record order that makes resume exact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moeflow.domain.finetune_data import ChatRecord, CompletionRecord, DatasetError, Message
from moeflow.domain.finetune_spec import DataFormat, HyperParameters
from moeflow.training.data import IGNORE_INDEX, DatasetNotFoundError, encode, load_dataset
from moeflow.training.loop import Schedule, micro_batches


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dirs["llama"])


def trained_text(tokenizer: Any, labels: list[int]) -> str:
    return str(tokenizer.decode([t for t in labels if t != IGNORE_INDEX]))


def chat(*turns: tuple[str, str]) -> ChatRecord:
    return ChatRecord(tuple(Message(r, c) for r, c in turns), line=1)


def test_only_assistant_turns_and_their_end_of_turn_carry_loss(tokenizer: Any) -> None:
    record = chat(("system", "Be brief."), ("user", "Name a fruit."), ("assistant", "An apple."),
                  ("user", "Another?"), ("assistant", "A pear."))
    example, truncated = encode(tokenizer, record, max_length=512)
    assert not truncated
    assert trained_text(tokenizer, example.labels) == "An apple.<|im_end|>\nA pear.<|im_end|>\n"
    # The ids are the whole rendered conversation tokenized in one piece.
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in record.messages], tokenize=False)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # Every labelled position holds its own input token (the shift happens in the loss).
    assert all(label in (IGNORE_INDEX, token)
               for token, label in zip(example.input_ids, example.labels, strict=True))


def test_completion_records_train_on_the_completion_and_eos(tokenizer: Any) -> None:
    record = CompletionRecord("The capital of France is", " Paris.", line=1)
    example, _ = encode(tokenizer, record, max_length=512)
    assert trained_text(tokenizer, example.labels) == " Paris.<|im_end|>"
    assert str(tokenizer.decode(example.input_ids)).startswith("The capital of France is")


def test_long_records_are_cut_and_records_left_without_loss_are_dropped(
        tokenizer: Any, tmp_path: Path) -> None:
    long_user = "word " * 200
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": long_user}, {"role": "assistant", "content": "Ok"}],
    ]))
    dataset = load_dataset(path, tokenizer, DataFormat.AUTO, max_length=32)
    assert (dataset.num_records, dataset.num_truncated, dataset.num_dropped) == (2, 1, 1)
    assert len(dataset.examples) == 1 and len(dataset.sha256) == 64
    with pytest.raises(DatasetError, match="max length"):
        load_dataset(path, tokenizer, DataFormat.AUTO, max_length=2)


def test_missing_or_invalid_files_say_so(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError):
        load_dataset(tmp_path / "nope.jsonl", tokenizer, DataFormat.AUTO, 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"messages": []}\n\xff\xfe')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset(bad, tokenizer, DataFormat.AUTO, 64)


def test_record_order_follows_from_the_step_alone() -> None:
    hp = HyperParameters(batch_size=3, gradient_accumulation_steps=2, epochs=2, seed=5)
    schedule = Schedule.of(10, hp)
    assert (schedule.micro_per_epoch, schedule.total_steps) == (4, 4)
    steps = [micro_batches(schedule, hp.seed, s) for s in range(schedule.total_steps)]
    flat = [b for step in steps for b in step]
    epoch_0, epoch_1 = flat[:4], flat[4:]
    # Each epoch sees every record once, in its own order; the last micro-batch is short.
    assert sorted(i for b in epoch_0 for i in b) == list(range(10))
    assert sorted(i for b in epoch_1 for i in b) == list(range(10))
    assert [len(b) for b in epoch_0] == [3, 3, 3, 1] and epoch_0 != epoch_1
    assert micro_batches(schedule, hp.seed, 3) == steps[3]  # no replay needed
    assert micro_batches(schedule, hp.seed + 1, 0) != steps[0]
    # maxSteps past the epochs keeps drawing new epochs.
    longer = Schedule.of(10, hp.model_copy(update={"max_steps": 9}))
    assert longer.total_steps == 9 and len(micro_batches(longer, hp.seed, 8)) == 2
