"""`moeflow finetune` on the tiny llama checkpoint and the shipped toy chat set: the loss goes
down, the adapter is PEFT's format and changes the model; gradient accumulation equals one
large batch; a run killed with SIGKILL resumes from its checkpoint and ends exactly where an
uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow.cli import main as moeflow_main
from moeflow.domain.finetune_spec import DataFormat, HyperParameters
from moeflow.training import checkpoint
from moeflow.training.cli import main as finetune_main
from moeflow.training.data import IGNORE_INDEX, TOY_DATASET, load_dataset
from moeflow.training.loop import RESULT_FILE, RunConfig, TrainResult, train
from moeflow.training.report import Event, Progress

FAST = HyperParameters(max_steps=30, learning_rate=5e-3, batch_size=4, max_length=128,
                       checkpoint_every=10, seed=1)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Event, Progress]] = []
        self.closed = False

    def report(self, event: Event, progress: Progress) -> None:
        self.events.append((event, progress))

    def close(self) -> None:
        self.closed = True


def run(model: Path, output: Path, hp: HyperParameters = FAST) -> tuple[TrainResult, Recorder]:
    recorder = Recorder()
    result = train(RunConfig(model=model, data=TOY_DATASET, output=output, hyper=hp,
                             device="cpu"), recorder)
    return result, recorder


def mean_loss(model: Any, examples: list[Any]) -> float:
    losses = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


def test_tiny_lora_run_learns_and_writes_a_peft_adapter(tiny_dirs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_dirs["llama"]
    result, recorder = run(base_dir, tmp_path / "out")
    losses = result.losses
    assert len(losses) == 30 and result.steps == 30 and not result.already_done
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    # Progress: start, every step, checkpoints at 10 and 20 (not at the end), end.
    kinds = [e for e, _ in recorder.events]
    assert kinds.count("step") == 30 and kinds.count("checkpoint") == 2
    assert kinds[0] == "start" and kinds[-1] == "end" and recorder.closed
    last = recorder.events[-1][1]
    assert (last.step, last.total_steps, last.eta_seconds) == (30, 30, 0)
    assert last.tokens_per_second and last.trained_tokens > 0 and last.epoch > 1
    # PEFT format at the output's root; the checkpoints are gone once it is done.
    out = result.adapter_dir
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / checkpoint.CHECKPOINTS).exists()
    assert json.loads((out / RESULT_FILE).read_text())["losses"] == losses
    # It loads with PEFT and changes (improves) the model on the data it was trained on.
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = load_dataset(TOY_DATASET, tokenizer, DataFormat.AUTO, 128).examples[:8]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    before = mean_loss(base, examples)
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)
    assert mean_loss(tuned, examples) < before - 0.5
    # A second run on the same output finds the work done.
    again, _ = run(base_dir, tmp_path / "out")
    assert again.already_done and again.losses == losses


def test_accumulated_micro_batches_equal_one_large_batch(tiny_dirs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    # No dropout: two micro-batches draw other dropout masks than one batch would.
    hp = FAST.model_copy(update={"max_steps": 6, "lora_dropout": 0.0})
    one, _ = run(tiny_dirs["llama"], tmp_path / "one", hp)
    split, _ = run(tiny_dirs["llama"], tmp_path / "two",
                   hp.model_copy(update={"batch_size": 2, "gradient_accumulation_steps": 2}))
    assert split.losses == pytest.approx(one.losses, rel=1e-4)


def test_labels_outside_assistant_turns_cost_nothing(tiny_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    dataset = load_dataset(TOY_DATASET, tokenizer, DataFormat.AUTO, 128)
    trained = sum(e.num_trained for e in dataset.examples)
    total = sum(len(e.labels) for e in dataset.examples)
    assert 0 < trained < total / 2
    assert all(e.labels[0] == IGNORE_INDEX for e in dataset.examples)


RESUME_FLAGS = ["--data", "toy", "--max-steps", "60", "--batch-size", "8",
                "--learning-rate", "5e-3", "--max-length", "128", "--checkpoint-every", "5",
                "--seed", "1", "--num-threads", "1", "--progress", "log", "--device", "cpu"]


def test_a_run_killed_with_sigkill_resumes_from_its_checkpoint(
        tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, output = tiny_dirs["llama"], tmp_path / "adapter"
    argv = ["--model", str(model), "--output", str(output), *RESUME_FLAGS]
    killed = subprocess.Popen([sys.executable, "-m", "moeflow.training", *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint.complete(output):
        assert killed.poll() is None, killed.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert not (output / RESULT_FILE).exists(), "the run finished before the kill: too fast"
    kept = checkpoint.latest(output)
    assert kept is not None
    kept_step = json.loads((kept / checkpoint.STATE_FILE).read_text())["step"]
    assert 5 <= kept_step < 60 and kept_step % 5 == 0
    # `moeflow finetune` again on the same output: it resumes, and says so.
    assert moeflow_main(["finetune", *argv]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(output)
    # An uninterrupted run of the same configuration computes the same steps.
    reference, _ = run(model, tmp_path / "reference", HyperParameters(
        max_steps=60, batch_size=8, learning_rate=5e-3, max_length=128, checkpoint_every=5,
        seed=1))
    result = json.loads((output / RESULT_FILE).read_text())
    assert result["resumed_from_step"] == kept_step
    assert result["losses"] == pytest.approx(reference.losses, rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    resumed_weights = load_file(output / "adapter_model.safetensors")
    reference_weights = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert resumed_weights.keys() == reference_weights.keys()
    for key, value in reference_weights.items():
        assert torch.allclose(resumed_weights[key], value, atol=1e-6), key


class CrashAt(Recorder):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def report(self, event: Event, progress: Progress) -> None:
        if progress.step == self.step:
            raise RuntimeError("simulated crash")


def test_checkpoints_of_another_run_are_refused_not_mixed(tiny_dirs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(RunConfig(model=tiny_dirs["llama"], data=TOY_DATASET, output=output,
                        hyper=FAST, device="cpu"), CrashAt(12))
    assert checkpoint.latest(output) == checkpoint.checkpoint_dir(output, 10)
    log = tmp_path / "termination-log"
    code = finetune_main(["--model", str(tiny_dirs["llama"]), "--data", "toy", "--output",
                          str(output), "--max-steps", "30", "--seed", "2", "--progress", "none",
                          "--termination-log", str(log)])
    assert code == 2
    assert log.read_text().startswith("CheckpointMismatch: ")
    assert checkpoint.latest(output) is not None  # left alone
    # --no-resume starts over there instead.
    assert finetune_main(["--model", str(tiny_dirs["llama"]), "--data", "toy", "--output",
                          str(output), "--max-steps", "3", "--seed", "2", "--progress", "none",
                          "--no-resume", "--termination-log", str(log)]) == 0
    assert log.read_text().startswith("Completed: adapter in ")
    assert json.loads((output / RESULT_FILE).read_text())["resumed_from_step"] is None


def test_bad_input_fails_with_a_reason_and_exit_code_2(tiny_dirs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    log = tmp_path / "termination-log"
    base = ["--output", str(tmp_path / "o"), "--progress", "none", "--termination-log", str(log)]
    cases = [
        (["--model", str(tiny_dirs["llama"]), "--data", str(bad)], "InvalidDataset: line 1: "),
        (["--model", str(tiny_dirs["llama"]), "--data", str(tmp_path / "nope.jsonl")],
         "DatasetNotFound: "),
        (["--model", str(tmp_path), "--data", "toy"], "ModelNotFound: "),
        (["--model", str(tiny_dirs["llama"]), "--data", "toy", "--lora-rank", "0"],
         "InvalidArguments: --lora-rank"),
        (["--model", str(tiny_dirs["llama"]), "--data", "toy", "--target-modules", "nope"],
         "InvalidArguments: LoRA: "),
    ]
    for argv, says in cases:
        assert finetune_main([*argv, *base]) == 2, says
        assert log.read_text().startswith(says), log.read_text()
