"""`moeflow finetune`: LoRA SFT of a local checkpoint on a JSONL dataset, with a progress bar;
prints the adapter's directory on stdout (everything else goes to stderr).

    moeflow finetune --model smollm2-135m-instruct --data toy --output ./adapter \\
        --max-steps 100 --learning-rate 1e-3

The operator's trainer Pods run this same command (`finetune_spec.trainer_argv`), with
`--report-to-finetune NS/NAME` (progress into that FineTune's status) and `--termination-log`
(the outcome, "<Reason>: <message>", where the kubelet picks it up).

Exit codes: 0 done (or already done), 2 for a permanent failure (bad dataset, model, flags,
checkpoints of another run: rerunning cannot help), 1 for anything else (worth a retry;
a rerun resumes from the last checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moeflow.domain.finetune_spec import (
    COMPLETED,
    DATASET_NOT_FOUND,
    EXIT_PERMANENT,
    INVALID_ARGUMENTS,
    INVALID_DATASET,
    MODEL_NOT_FOUND,
    PERMANENT_FAILURES,
    TRAINING_FAILED,
    DataFormat,
    HyperParameters,
    termination_message,
)

logger = logging.getLogger("moeflow.finetune")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


# What each hyper-parameter does (the FineTune CRD's descriptions, in the CLI's words).
_HYPER_HELP = {
    "lora_rank": "LoRA rank r (adapter width)",
    "lora_alpha": "LoRA alpha; the update is scaled by alpha / rank",
    "lora_dropout": "dropout on the LoRA input, in [0, 0.9]",
    "target_modules": "comma-separated names of the linear layers that get an adapter (matched"
                      " against the end of module names), or all-linear",
    "learning_rate": "peak learning rate (AdamW), after warm-up; decays linearly to 0",
    "epochs": "passes over the dataset (unless --max-steps is set)",
    "max_steps": "optimizer steps to run; 0: as many as the epochs take",
    "batch_size": "records per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_length": "tokens per record; longer records keep their first MAX_LENGTH tokens",
    "seed": "seed of the LoRA init, dropout and record order (same seed, same run)",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm; 0: no clipping",
    "checkpoint_every": "steps between checkpoints; a rerun resumes from the newest",
    "dtype": "base model weights dtype (the adapter trains in float32)",
}


def _hyper_help(field: str, info: Any) -> str:
    default = info.default
    if isinstance(default, tuple):
        default = ",".join(default)
    elif isinstance(default, StrEnum):
        default = default.value
    return f"{_HYPER_HELP[field]} (default {default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeflow finetune",
        description="LoRA supervised fine-tuning (PEFT); prints the adapter directory",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="base model: a Hugging Face checkpoint folder or a cached name"
                             " (required)")
    parser.add_argument("--data", required=True,
                        help="JSONL records: {\"messages\": [...]} or {\"prompt\", \"completion\"}"
                             " ('toy': the small chat set shipped with moeflow) (required)")
    parser.add_argument("--output", required=True, type=Path,
                        help="directory for the adapter (and checkpoints while it trains)"
                             " (required)")
    parser.add_argument("--format", choices=[f.value for f in DataFormat], default="auto",
                        help="record format (default: auto, per line)")
    hyper = parser.add_argument_group("hyper-parameters")
    for field, info in HyperParameters.model_fields.items():
        annotation = info.annotation
        choices = None
        if isinstance(annotation, type) and issubclass(annotation, StrEnum):
            choices = [e.value for e in annotation]
        hyper.add_argument(_flag(field), dest=f"hp_{field}", default=None, choices=choices,
                           metavar=None if choices else field.upper(),
                           help=_hyper_help(field, info))
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto",
                     help="auto (cuda if present), cpu, cuda, cuda:N (default: auto)")
    run.add_argument("--num-threads", type=int, default=None,
                     help="torch CPU threads (default: torch's own, the usable cores)")
    run.add_argument("--no-resume", dest="resume", action="store_false",
                     help="drop checkpoints found in --output and start over (default: resume"
                          " from the newest)")
    run.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                     help="a bar on a terminal, log lines otherwise (default: auto)")
    run.add_argument("--base-model-name", default=None,
                     help="what training_result.json records as the base model (default: the"
                          " --model folder)")
    cluster = parser.add_argument_group("cluster (set by the operator)")
    cluster.add_argument("--report-to-finetune", metavar="NAMESPACE/NAME", default=None,
                         help="patch this FineTune's status.progress as training goes"
                              " (default: none)")
    cluster.add_argument("--report-interval-s", type=float, default=5.0,
                         help="seconds between status patches (default: %(default)s)")
    cluster.add_argument("--kubeconfig", default=None,
                         help="out of cluster: kubeconfig for --report-to-finetune (default:"
                              " in-cluster, else KUBECONFIG or ~/.kube/config)")
    cluster.add_argument("--termination-log", type=Path, default=None,
                         help="write the outcome here (the Pod's terminationMessagePath;"
                              " default: none)")
    return parser


def _value(field: str, text: str) -> Any:
    """A flag's text as its field's number type; lists (comma-separated) and enums stay text
    for pydantic, which also checks the ranges."""
    annotation = HyperParameters.model_fields[field].annotation
    return annotation(text) if annotation in (int, float) else text


def hyper_parameters(args: argparse.Namespace) -> HyperParameters:
    """The hyper-parameters given on the command line (defaults for the rest)."""
    given: dict[str, Any] = {}
    for field in HyperParameters.model_fields:
        text = getattr(args, f"hp_{field}")
        if text is not None:
            try:
                given[field] = _value(field, text)
            except ValueError:
                raise _Failure(INVALID_ARGUMENTS,
                               f"{_flag(field)} {text!r}: not a number") from None
    try:
        return HyperParameters.model_validate(given)
    except ValidationError as e:
        problems = [f"{_flag(str(err['loc'][0]))}: {err['msg']}" for err in e.errors()]
        raise _Failure(INVALID_ARGUMENTS, "; ".join(problems)) from None


class _Failure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _sinks(args: argparse.Namespace) -> Any:
    from moeflow.training.report import (
        BarSink,
        FineTuneStatusSink,
        LogSink,
        ProgressSink,
        Sinks,
        kube_status_writer,
    )

    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    if mode != "bar":  # transformers' own bars (loading weights) would clutter logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    sinks: list[ProgressSink] = []
    if mode == "bar":
        sinks.append(BarSink())
    elif mode == "log":
        sinks.append(LogSink())
    if args.report_to_finetune:
        try:
            writer = kube_status_writer(args.report_to_finetune, args.kubeconfig)
        except ValueError as e:
            raise _Failure(INVALID_ARGUMENTS, str(e)) from None
        sinks.append(FineTuneStatusSink(writer, interval_s=args.report_interval_s))
    return Sinks(sinks)


def _run(args: argparse.Namespace) -> Path:
    from moeflow.checkpoints.store import ModelNotCachedError, resolve_home, resolve_model
    from moeflow.domain.finetune_data import DatasetError
    from moeflow.training.data import DatasetNotFoundError, resolve_data_path
    from moeflow.training.loop import RunConfig, TrainingError, train

    hyper = hyper_parameters(args)
    try:
        model = resolve_model(args.model, resolve_home(os.environ))
    except ModelNotCachedError as e:
        raise _Failure(MODEL_NOT_FOUND, str(e)) from None
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    config = RunConfig(model=model, data=resolve_data_path(args.data), output=args.output,
                       hyper=hyper, data_format=DataFormat(args.format), device=args.device,
                       resume=args.resume, base_model_name=args.base_model_name)
    try:
        result = train(config, _sinks(args))
    except DatasetError as e:
        raise _Failure(INVALID_DATASET, str(e)) from None
    except DatasetNotFoundError as e:
        raise _Failure(DATASET_NOT_FOUND, str(e)) from None
    except TrainingError as e:
        raise _Failure(e.reason, str(e)) from None
    if result.already_done:
        logger.info("already trained (%s holds this run's result)", result.adapter_dir)
    summary = f"adapter in {result.adapter_dir} after {result.steps} steps"
    if result.final_loss is not None:
        summary += f", final loss {result.final_loss:.4f}"
    _terminate(args, COMPLETED, summary)
    logger.info("%s", summary)
    return result.adapter_dir


def _terminate(args: argparse.Namespace, reason: str, message: str) -> None:
    if args.termination_log is not None:
        try:
            args.termination_log.write_text(termination_message(reason, message))
        except OSError as e:
            logger.warning("could not write the termination log: %s", e)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            stream=sys.stderr)
    try:
        adapter = _run(args)
    except _Failure as e:
        _terminate(args, e.reason, str(e))
        logger.error("%s: %s", e.reason, e)
        return EXIT_PERMANENT if e.reason in PERMANENT_FAILURES else 1
    except Exception as e:  # an unexpected failure: say so where the operator looks, retry
        _terminate(args, TRAINING_FAILED, f"{type(e).__name__}: {e}")
        raise
    sys.stdout.write(f"{adapter}\n")
    sys.stdout.flush()
    return 0
