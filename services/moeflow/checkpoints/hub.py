"""Model references users bring, and turning one into a local HF checkpoint folder.

Contract:
- ``parse_model_ref(text)`` reads what `moeflow up --model`, `moeflow engine --model` and
  `moeflow models pull` accept, without touching disk or network:
  ``hf://org/name[@revision]`` (Hugging Face Hub), ``org/name[@revision]`` when it is not an
  existing path (the `vllm serve Qwen/...` habit), ``store://NAME`` (a model of the disk model
  store, ``<home>/models/NAME``), ``file:///abs/dir`` or a plain path (a local HF folder), or a
  bare NAME (a cached model, or one of ``registry.PULLABLE``). Malformed input raises
  ``ModelRefError`` with a one-line message.
- ``fetch_hub_model(ref, ...)`` downloads a Hub repo through huggingface_hub, so HF_ENDPOINT,
  HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE and HF_TOKEN apply as for every HF tool. Only what the
  engine reads is fetched (config, safetensors weights, tokenizer files, chat template). The
  architecture is checked from config.json *before* the weights are downloaded; unsupported
  ones raise ``UnsupportedArchitectureError`` naming the supported set. Without a folder it
  returns the snapshot in the HF cache (shared with transformers, vLLM, ...); with ``local_dir``
  it writes a plain folder there.
- ``check_architecture(model_dir, supported)`` refuses a local folder the same way.
- The caller passes the supported ``model_type`` set (the engine's; this package sits below the
  engine and does not import it). No torch or transformers imports here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moeflow.checkpoints.store import CONFIG_FILENAME

HUB_SCHEME = "hf://"
STORE_SCHEME = "store://"
FILE_SCHEME = "file://"

ENGINE_FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
"""What a Hub download fetches: configs, safetensors weights and their index, tokenizer files
(json, merges/vocab txt, sentencepiece .model, tiktoken) and chat templates. Never *.bin,
*.gguf, *.onnx or other formats the engine does not read."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

RefKind = Literal["hub", "path", "name"]


class ModelRefError(ValueError):
    """A model reference that cannot be understood, or a model that cannot be obtained."""


class UnsupportedArchitectureError(ModelRefError):
    """The checkpoint's ``model_type`` is not one the engine runs."""


@dataclass(frozen=True)
class ModelRef:
    """One parsed model reference."""

    kind: RefKind
    value: str
    """hub: the repo id; path: the folder; name: the cached (or pullable) name."""
    revision: str | None = None
    """hub only: branch, tag or commit (None: the repo's default, "main")."""

    @property
    def default_name(self) -> str:
        """The name a pulled copy and the served model get: the repo's or folder's last part."""
        return self.value.rstrip("/").split("/")[-1]


def is_repo_id(text: str) -> bool:
    """``org/name`` with Hub-legal characters (not a path: no leading ``/``, ``.`` or ``~``)."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def parse_model_ref(text: str) -> ModelRef:
    """The reference ``text`` names (see the module docstring); no network, one stat at most."""
    text = text.strip()
    if not text:
        raise ModelRefError("no model given: pass --model NAME, a folder, or hf://org/name")
    if text.startswith(HUB_SCHEME):
        return _hub_ref(text[len(HUB_SCHEME):], text)
    if text.startswith(STORE_SCHEME):
        name = text[len(STORE_SCHEME):].strip("/")
        if not name or "/" in name:
            raise ModelRefError(f"{text!r}: store:// takes one model name, e.g. store://my-model")
        return ModelRef("name", name)
    if text.startswith(FILE_SCHEME):
        path = text[len(FILE_SCHEME):]
        if not path.startswith("/"):
            raise ModelRefError(f"{text!r}: file:// takes an absolute path, e.g. file:///models/x")
        return ModelRef("path", path)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ModelRefError(f"{text!r}: unknown scheme {scheme}://; use hf://, store://, "
                            "file:// or a folder")
    as_path = Path(text).expanduser()
    if as_path.exists():
        return ModelRef("path", text)
    base = text.split("@", 1)[0]
    if is_repo_id(base):
        return _hub_ref(text, text)
    if "/" in text or text.startswith((".", "~")):
        return ModelRef("path", text)
    return ModelRef("name", text)


def _hub_ref(body: str, original: str) -> ModelRef:
    repo_id, _, revision = body.partition("@")
    if not is_repo_id(repo_id):
        raise ModelRefError(f"{original!r}: a Hub model is hf://org/name[@revision]")
    if "@" in body and not revision:
        raise ModelRefError(f"{original!r}: empty revision after '@'")
    return ModelRef("hub", repo_id, revision or None)


def model_type_of(model_dir: Path) -> str:
    """config.json's ``model_type`` ("" when absent or unreadable)."""
    try:
        raw = json.loads((model_dir / CONFIG_FILENAME).read_text())
    except (OSError, ValueError):
        return ""
    return str(raw.get("model_type", "")) if isinstance(raw, dict) else ""


def architecture_error(what: str, model_type: str, supported: frozenset[str]) -> str:
    """The one-line refusal for an unsupported architecture."""
    shown = model_type or "unknown (config.json has no model_type)"
    return (f"{what}: architecture {shown} is not supported by the moeflow engine; "
            f"supported: {', '.join(sorted(supported))}")


def check_architecture(model_dir: Path, supported: frozenset[str] | None, what: str) -> None:
    """Raise ``UnsupportedArchitectureError`` unless config.json's model_type is supported
    (``supported`` None: no check)."""
    if supported is None:
        return
    model_type = model_type_of(model_dir)
    if model_type not in supported:
        raise UnsupportedArchitectureError(architecture_error(what, model_type, supported))


def terminal_bar() -> type:
    """A tqdm class that draws on a terminal only (bytes, rate, ETA), whatever the logging
    level; in a log (stderr not a TTY) it stays silent. Hub downloads use it."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    class TerminalBar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs.pop("name", None)  # huggingface_hub's own bar class takes a group name
            kwargs["disable"] = None  # tqdm: None = off unless stderr is a terminal
            super().__init__(*args, **kwargs)

    return TerminalBar


def fetch_hub_model(ref: ModelRef, *, supported: frozenset[str] | None = None,
                    local_dir: Path | None = None) -> Path:
    """Download a Hub model's engine files; return the folder (see the module docstring).

    Raises ``ModelRefError`` with one line for what the user can fix: unknown repo or revision,
    a gated/private repo without a token, offline with nothing cached, no endpoint, no
    safetensors weights, or an unsupported architecture.
    """
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    assert ref.kind == "hub", ref
    where = f"hf://{ref.value}" + (f"@{ref.revision}" if ref.revision else "")
    try:
        config_path = Path(hf_hub_download(ref.value, CONFIG_FILENAME, revision=ref.revision))
        if supported is not None:
            check_architecture(config_path.parent, supported, where)
        folder = snapshot_download(
            ref.value, revision=ref.revision, allow_patterns=list(ENGINE_FILE_PATTERNS),
            local_dir=None if local_dir is None else str(local_dir),
            tqdm_class=terminal_bar())
    except GatedRepoError:
        raise ModelRefError(f"{where}: the repo is gated; accept its terms on the Hub and set "
                            "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelRefError(f"{where}: no such model on {hub_constants.ENDPOINT} (or it is "
                            "private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelRefError(f"{where}: revision {ref.revision} not found") from None
    except LocalEntryNotFoundError:
        hint = ("HF_HUB_OFFLINE is set and it is not in the HF cache; unset it or pull it on a "
                "connected machine" if hub_constants.HF_HUB_OFFLINE else
                f"cannot reach {hub_constants.ENDPOINT}; check the network or HF_ENDPOINT")
        raise ModelRefError(f"{where}: {hint}") from None
    except (HfHubHTTPError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelRefError(f"{where}: download failed: {first}") from None
    path = Path(folder)
    if not any(path.glob("*.safetensors")):
        raise ModelRefError(f"{where}: the repo has no *.safetensors weights (the engine reads "
                            "safetensors only)")
    return path
