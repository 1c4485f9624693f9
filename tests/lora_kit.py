"""Tiny LoRA adapters made with PEFT, and PEFT's own greedy output as the reference."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: Path, out_dir: Path, *, seed: int, targets: Sequence[str],
                 rank: int = 4, alpha: int = 8) -> Path:
    """A random adapter (A and B both non-zero, so outputs differ from the base model),
    written by PEFT's ``save_pretrained``; no training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                        lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # PEFT's non-zero init is small; make the update matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(str(out_dir))
    return out_dir


@lru_cache(maxsize=8)
def peft_model(model_dir: Path, adapter_dir: Path) -> Any:
    """transformers + PEFT with the adapter unmerged (as PEFT serves it by default)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model


def peft_greedy(model_dir: Path, adapter_dir: Path, prompt_ids: Sequence[int],
                max_new_tokens: int) -> list[int]:
    model = peft_model(model_dir, adapter_dir)
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([list(prompt_ids)]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    return [int(t) for t in out[0, len(prompt_ids):]]


def two_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    """"a" on the attention projections (r 4), "b" on every projection (r 8)."""
    return {"a": make_adapter(model_dir, root / "a", seed=1, targets=ATTENTION),
            "b": make_adapter(model_dir, root / "b", seed=2, targets=ALL_LINEAR, rank=8,
                              alpha=16)}
