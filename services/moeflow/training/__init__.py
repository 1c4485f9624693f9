"""Post-training: LoRA supervised fine-tuning of a causal LM, locally (`moeflow finetune`) or
as the Pod of a `FineTune` custom resource (same entry point, same flags).

Modules:
- `data`: records (`moeflow.domain.finetune_data`) -> token ids with labels on assistant or
  completion tokens only (the model's own chat template);
- `loop`: the training loop (plain torch + PEFT), deterministic data order, checkpoints and
  resume that reproduce an uninterrupted run;
- `checkpoint`: atomic checkpoint directories (adapter, optimizer, scheduler, RNG, step);
- `report`: where progress goes (a progress bar, log lines, the FineTune's status);
- `cli`: `moeflow finetune` (`main(argv) -> int`).
See docs/finetuning.md.
"""
