"""Plain torch loop (moeflow.training) vs transformers' Trainer on the same LoRA SFT work:
same model, records, batch size, steps and LoRA config; seconds per optimizer step, CPU.

    .venv/bin/python benchmarks/finetune_loop.py --model smollm2-135m-instruct --steps 8
    .venv/bin/python benchmarks/finetune_loop.py --model PATH_TO_TINY --steps 60

Each side runs `--repeats` times, interleaved, and the median is reported; prints
`RESULT {json}` like the other benchmarks. Model loading and tokenization are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moeflow.checkpoints.store import resolve_home, resolve_model
from moeflow.domain.finetune_spec import DataFormat, HyperParameters
from moeflow.training.data import IGNORE_INDEX, TOY_DATASET, load_dataset
from moeflow.training.loop import RunConfig, load_tokenizer, train
from moeflow.training.report import Event, Progress


class _Clock:
    def __init__(self) -> None:
        self.start = self.end = 0.0

    def report(self, event: Event, _progress: Progress) -> None:
        if event == "start":
            self.start = time.perf_counter()
        elif event == "step":
            self.end = time.perf_counter()

    def close(self) -> None:
        pass


def ours(model: Path, hp: HyperParameters) -> float:
    clock = _Clock()
    with tempfile.TemporaryDirectory() as out:
        train(RunConfig(model=model, data=TOY_DATASET, output=Path(out), hyper=hp,
                        device="cpu", resume=False), clock)
    return (clock.end - clock.start) / hp.max_steps


def trainer(model_dir: Path, hp: HyperParameters) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    tokenizer = load_tokenizer(model_dir)
    dataset = load_dataset(TOY_DATASET, tokenizer, DataFormat.AUTO, hp.max_length)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in dataset.examples]
    pad = tokenizer.pad_token_id or 0

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"]))
                               for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                             for r in batch])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    torch.manual_seed(hp.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(
        r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules), task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=hp.batch_size, max_steps=hp.max_steps,
            learning_rate=hp.learning_rate, save_strategy="no", report_to=[], use_cpu=True,
            logging_steps=10**9, dataloader_num_workers=0, seed=hp.seed,
            disable_tqdm=True, max_grad_norm=hp.max_grad_norm, lr_scheduler_type="linear")
        run = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        began = time.perf_counter()
        run.train()
        return (time.perf_counter() - began) / hp.max_steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resolve_model(args.model, resolve_home(os.environ))
    hp = HyperParameters(max_steps=args.steps, batch_size=4, max_length=256)
    results: dict[str, list[float]] = {"plain_loop": [], "trainer": []}
    for _ in range(args.repeats):
        results["plain_loop"].append(ours(model, hp))
        results["trainer"].append(trainer(model, hp))
    summary = {name: round(statistics.median(v), 4) for name, v in results.items()}
    result = {"model": model.name, "steps": args.steps, "threads": args.threads,
              "s_per_step": summary}
    print(f"RESULT {json.dumps(result)}")


if __name__ == "__main__":
    main()
