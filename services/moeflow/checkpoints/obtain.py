"""``obtain_model``: any model reference -> a local HF checkpoint folder, ready to serve.

Contract:
- Accepts what ``hub.parse_model_ref`` accepts. A local folder (plain path or ``file://``) and a
  cached name (or ``store://NAME``) are used in place; ``hf://org/name[@rev]`` and a bare
  ``org/name`` that is not a folder are fetched into the HF cache through huggingface_hub (the
  same cache transformers and vLLM use; nothing is copied); a bare name of
  ``registry.PULLABLE`` that is not cached yet is pulled into ``<home>/models``.
- With ``supported`` given, a checkpoint whose config.json ``model_type`` is not in it is
  refused before serving (for the Hub: before its weights are downloaded).
- Every failure the user can fix raises ``ModelRefError`` (or its subclass) with one line; the
  CLI prints it without a traceback. Returns the folder and the default served model name
  (the repo's, folder's or cached name's last part).
"""

from __future__ import annotations

from pathlib import Path

from moeflow.checkpoints.hub import (
    ModelRefError,
    check_architecture,
    fetch_hub_model,
    parse_model_ref,
)
from moeflow.checkpoints.registry import PULLABLE
from moeflow.checkpoints.store import ModelNotCachedError, resolve_model


def obtain_model(text: str, home: Path, *,
                 supported: frozenset[str] | None = None) -> tuple[Path, str]:
    """(checkpoint folder, default served name) for ``text`` (see the module docstring)."""
    ref = parse_model_ref(text)
    if ref.kind == "hub":
        return fetch_hub_model(ref, supported=supported), ref.default_name
    try:
        folder = resolve_model(ref.value, home)
    except ModelNotCachedError as exc:
        if ref.kind == "name" and ref.value in PULLABLE:
            from moeflow.checkpoints.pull import PullError, pull

            try:
                folder = pull(ref.value, home, None)
            except PullError as pull_exc:
                raise ModelRefError(str(pull_exc)) from None
        else:
            raise ModelRefError(str(exc)) from None
    check_architecture(folder, supported, text)
    return folder, ref.default_name
