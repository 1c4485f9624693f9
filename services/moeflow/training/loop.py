"""The LoRA SFT loop: plain torch over a PEFT model (docs/finetuning.md says why not Trainer).

Contract:
- Deterministic given the hyper-parameters: the LoRA init and dropout draw from the global
  torch RNG seeded with `seed`; the record order of epoch `e` is a permutation drawn from its
  own generator seeded with `seed + e`, so the records of any step follow from the step number
  alone, without replaying the steps before it.
- A step is one optimizer update over `gradient_accumulation_steps` micro-batches of
  `batch_size` records. The loss of a step is the mean over its trained tokens (assistant or
  completion tokens, `data.IGNORE_INDEX` elsewhere), however they fall into micro-batches, so
  accumulation equals one large batch.
- Every `checkpoint_every` steps a checkpoint is written (`checkpoint.save`). A run started on
  an output directory that holds checkpoints of the same run (same fingerprint) resumes from
  the newest: adapter, optimizer, scheduler, RNG and step are restored, so the steps that
  follow compute exactly what an uninterrupted run computes. Checkpoints of another run are
  refused (`CHECKPOINT_MISMATCH`), never mixed in.
- The adapter is written in PEFT format (`adapter_config.json`, `adapter_model.safetensors`)
  at the root of the output directory, then `training_result.json` last: its presence means
  "done", and a rerun of a finished run returns at once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeflow.domain.finetune_spec import (
    CHECKPOINT_MISMATCH,
    INVALID_ARGUMENTS,
    MODEL_NOT_FOUND,
    DataFormat,
    DType,
    HyperParameters,
)
from moeflow.training import checkpoint
from moeflow.training.data import IGNORE_INDEX, Dataset, Example, load_dataset
from moeflow.training.report import Progress, ProgressSink

RESULT_FILE = "training_result.json"


class TrainingError(Exception):
    """A run that cannot go on; `reason` is one of the finetune_spec reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RunConfig:
    model: Path
    """A Hugging Face checkpoint directory (config.json, weights, tokenizer)."""
    data: Path
    output: Path
    hyper: HyperParameters = field(default_factory=HyperParameters)
    data_format: DataFormat = DataFormat.AUTO
    device: str = "auto"
    resume: bool = True
    """False: drop any checkpoints in `output` and start over."""
    base_model_name: str | None = None
    """What to record as the base model in training_result.json (default: the path)."""


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    steps: int
    losses: list[float]
    resumed_from_step: int | None
    already_done: bool = False

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


@dataclass(frozen=True)
class Schedule:
    num_examples: int
    batch_size: int
    accumulation: int
    micro_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, num_examples: int, hp: HyperParameters) -> Schedule:
        micro_per_epoch = math.ceil(num_examples / hp.batch_size)
        accumulation = hp.gradient_accumulation_steps
        total = hp.max_steps or math.ceil(hp.epochs * micro_per_epoch / accumulation)
        return cls(num_examples, hp.batch_size, hp.gradient_accumulation_steps, micro_per_epoch,
                   total)

    def epoch_of(self, step: int) -> float:
        """Epochs done after `step` steps."""
        return step * self.accumulation / self.micro_per_epoch


@functools.lru_cache(maxsize=4)
def _order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return tuple(int(i) for i in torch.randperm(n, generator=generator))


def micro_batches(schedule: Schedule, seed: int, step: int) -> list[list[int]]:
    """Record indices of each micro-batch of `step` (0-based), from the step number alone."""
    batches = []
    for micro in range(step * schedule.accumulation, (step + 1) * schedule.accumulation):
        epoch, offset = divmod(micro, schedule.micro_per_epoch)
        order = _order(seed, epoch, schedule.num_examples)
        batches.append(list(order[offset * schedule.batch_size:(offset + 1) * schedule.batch_size]))
    return batches


def fingerprint(hp: HyperParameters, dataset_sha256: str, model: Path, fmt: DataFormat) -> str:
    """What decides the result: hyper-parameters (not how often checkpoints are taken), the
    dataset's bytes, the base model's config and its format."""
    knobs = hp.model_dump(mode="json", exclude={"checkpoint_every"})
    config = (model / "config.json").read_bytes() if (model / "config.json").is_file() else b""
    blob = json.dumps({"hp": knobs, "data": dataset_sha256, "format": fmt.value,
                       "config": hashlib.sha256(config).hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _collate(examples: list[Example], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_lambda(hp: HyperParameters, total_steps: int) -> Any:
    """Linear warm-up over `warmup_steps`, then linear decay to 0 at the last step."""
    def factor(step: int) -> float:
        if step < hp.warmup_steps:
            return (step + 1) / (hp.warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - hp.warmup_steps))
    return factor


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise TrainingError(MODEL_NOT_FOUND, f"{model_dir} holds no Hugging Face checkpoint"
                            " (config.json); fix: point --model at a checkpoint folder or a"
                            " cached model name")
    return AutoTokenizer.from_pretrained(model_dir)


def _load_model(config: RunConfig, device: torch.device) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hp = config.hyper
    dtype = torch.bfloat16 if hp.dtype is DType.BFLOAT16 else torch.float32
    base: Any = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    base.to(device)
    base.config.use_cache = False
    targets: Any = "all-linear" if hp.target_modules == ("all-linear",) else list(
        hp.target_modules)
    lora = LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(hp.seed)  # the LoRA A matrices' init
    try:
        with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            model = get_peft_model(base, lora)
    except ValueError as e:  # e.g. target modules not in the model
        raise TrainingError(INVALID_ARGUMENTS, f"LoRA: {e}; fix: --target-modules with"
                            " names of the model's linear layers (or all-linear)") from None
    model.train()
    return model


def _existing_result(output: Path, print_: str) -> dict[str, Any] | None:
    path = output / RESULT_FILE
    if not path.is_file():
        return None
    result: dict[str, Any] = json.loads(path.read_text())
    return result if result.get("fingerprint") == print_ else None


def _write_adapter(model: Any, output: Path) -> None:
    """Adapter files into `output`, each by an atomic rename (a reader never sees half)."""
    tmp = output / f".tmp-adapter-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp.iterdir():
        # safetensors writes 0600; an adapter is read by other processes (engines) as well.
        path.chmod(0o666 & ~umask)
        os.replace(path, output / path.name)
    tmp.rmdir()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _sink_closed(sink: ProgressSink) -> Iterator[ProgressSink]:
    try:
        yield sink
    finally:
        sink.close()


def train(config: RunConfig, sink: ProgressSink) -> TrainResult:
    """Run (or resume, or find finished) the training described by `config`."""
    with _sink_closed(sink):
        return _train(config, sink)


def _train(config: RunConfig, sink: ProgressSink) -> TrainResult:
    hp, output = config.hyper, config.output
    tokenizer = load_tokenizer(config.model)
    dataset: Dataset = load_dataset(config.data, tokenizer, config.data_format, hp.max_length)
    schedule = Schedule.of(len(dataset.examples), hp)
    print_ = fingerprint(hp, dataset.sha256, config.model, config.data_format)
    output.mkdir(parents=True, exist_ok=True)
    done = _existing_result(output, print_)
    if done is not None:
        return TrainResult(output, int(done["steps"]), list(done["losses"]), None,
                           already_done=True)
    if not config.resume:
        checkpoint.remove_all(output)
    device = pick_device(config.device)
    model = _load_model(config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  _lr_lambda(hp, schedule.total_steps))
    start, losses, trained_tokens, resumed_from = 0, [], 0, None
    latest = checkpoint.latest(output)
    if latest is not None:
        saved = checkpoint.load(latest, device)
        if saved.state.fingerprint != print_:
            raise TrainingError(CHECKPOINT_MISMATCH, f"{output} holds checkpoints of another"
                                " run (different data, model or hyper-parameters); fix: use"
                                " another --output, or --no-resume to start over there")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, saved.adapter)
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        _set_rng_state(saved.rng)
        start, losses = saved.state.step, list(saved.state.losses)
        trained_tokens, resumed_from = saved.state.trained_tokens, saved.state.step
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    progress = Progress(step=start, total_steps=schedule.total_steps,
                        epoch=schedule.epoch_of(start), loss=losses[-1] if losses else None,
                        checkpoint_step=resumed_from, resumed_from_step=resumed_from,
                        trained_tokens=trained_tokens)
    sink.report("start", progress)
    began, input_tokens = time.monotonic(), 0
    for step in range(start, schedule.total_steps):
        batches = [[dataset.examples[i] for i in b] for b in micro_batches(schedule, hp.seed, step)]
        step_tokens = sum(e.num_trained for batch in batches for e in batch)
        loss_sum = 0.0
        for batch in batches:
            ids, labels, mask = _collate(batch, pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            token_losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            (token_losses / step_tokens).backward()  # type: ignore[no-untyped-call]
            loss_sum += float(token_losses.detach())
            input_tokens += int(mask.sum())
        if hp.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        learning_rate = float(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / step_tokens)
        trained_tokens += step_tokens
        elapsed = time.monotonic() - began
        done_here = step + 1 - start
        progress = Progress(
            step=step + 1, total_steps=schedule.total_steps,
            epoch=schedule.epoch_of(step + 1), loss=losses[-1], learning_rate=learning_rate,
            tokens_per_second=input_tokens / elapsed if elapsed > 0 else None,
            eta_seconds=elapsed / done_here * (schedule.total_steps - step - 1),
            checkpoint_step=progress.checkpoint_step, resumed_from_step=resumed_from,
            trained_tokens=trained_tokens)
        sink.report("step", progress)
        if (step + 1) % hp.checkpoint_every == 0 and step + 1 < schedule.total_steps:
            from peft import get_peft_model_state_dict

            state = checkpoint.TrainerState(step + 1, schedule.total_steps, list(losses),
                                            trained_tokens, print_)
            checkpoint.save(output, state, adapter=get_peft_model_state_dict(model),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            rng=_rng_state())
            progress = Progress(**{**asdict(progress), "checkpoint_step": step + 1})
            sink.report("checkpoint", progress)
    _write_adapter(model, output)
    _write_json(output / RESULT_FILE, {
        "fingerprint": print_, "base_model": config.base_model_name or str(config.model),
        "steps": schedule.total_steps, "losses": losses,
        "final_loss": losses[-1] if losses else None, "trained_tokens": trained_tokens,
        "records": dataset.num_records, "truncated": dataset.num_truncated,
        "dropped": dataset.num_dropped, "resumed_from_step": resumed_from,
        "hyper_parameters": hp.model_dump(mode="json"),
    })
    checkpoint.remove_all(output)
    sink.report("end", progress)
    return TrainResult(output, schedule.total_steps, losses, resumed_from)
