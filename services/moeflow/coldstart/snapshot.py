"""Weights in the engine's own layout: written once into the store, mapped by each instance.

A snapshot is the loaded ``DecoderModel`` (already in the engine's dtype, fused and transposed
as the decoder wants it) saved with ``torch.save``, plus the checkpoint's small files (config,
tokenizer, chat template). Loading it is ``torch.load(mmap=True)``: no read, no conversion, and
on /dev/shm every instance of the node shares the same physical pages (private mappings; a
write would copy, the engine never writes weights).

Snapshots hold pickled engine classes, so each records ``layout`` (a hash of the decoder and
loader sources and the torch version); a snapshot of another layout is ignored and the engine
loads the checkpoint instead. Only load snapshots this node wrote (pickle is code).

``pack``/``unpack`` turn a model into a list of tensors (skeleton first) for an XCCL message.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from moeflow.engine.models import arch as arch_module
from moeflow.engine.models import attention, decoder, loader
from moeflow.engine.models.arch import ArchConfig, load_arch
from moeflow.engine.models.decoder import DecoderModel, rope_tables
from moeflow.engine.models.loader import load_model

WEIGHTS_FILE = "weights.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_SNAPSHOT_LEN = 8192
"""RoPE table length written into snapshots; a longer max_model_len recomputes the tables."""


def store_key(model_name: str, dtype: str) -> str:
    return f"{model_name}--{dtype}"


def layout_fingerprint() -> str:
    digest = hashlib.sha256(torch.__version__.encode())
    for module in (arch_module, attention, decoder, loader):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def write_snapshot(model_dir: Path, dest: Path, *, dtype: str) -> dict[str, Any]:
    """Load the checkpoint in ``model_dir`` and write a snapshot into ``dest``; its metadata."""
    arch = load_arch(model_dir)
    max_len = min(arch.max_position_embeddings, MAX_SNAPSHOT_LEN)
    model = load_model(model_dir, arch, dtype=DTYPES[dtype], max_len=max_len)
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, dest / path.name)
    torch.save(model, dest / WEIGHTS_FILE)
    return {"source": str(model_dir), "dtype": dtype, "layout": layout_fingerprint(),
            "max_len": max_len}


def is_compatible(meta: dict[str, Any], dtype: str) -> bool:
    return meta.get("dtype") == dtype and meta.get("layout") == layout_fingerprint()


def fit_rope(model: DecoderModel, arch: ArchConfig, max_len: int) -> None:
    if model.cos.shape[0] < max_len:
        cos, sin = rope_tables(arch, max_len)
        model.cos, model.sin = cos.to(model.embed.dtype), sin.to(model.embed.dtype)


def read_snapshot(entry_dir: Path, arch: ArchConfig, *, max_len: int) -> DecoderModel:
    model = torch.load(entry_dir / WEIGHTS_FILE, mmap=True, weights_only=False)
    if not isinstance(model, DecoderModel):
        raise TypeError(f"{entry_dir / WEIGHTS_FILE} does not hold a DecoderModel")
    model.arch = arch
    fit_rope(model, arch, max_len)
    return model


class _Packer(pickle.Pickler):
    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self._index: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:
        if not isinstance(obj, torch.Tensor):
            return None
        key = id(obj)
        if key not in self._index:
            self._index[key] = len(self.tensors)
            self.tensors.append(obj)
        return self._index[key]


class _Unpacker(pickle.Unpickler):
    def __init__(self, buffer: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(buffer)
        self._tensors = tensors

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self._tensors[int(pid)]


def pack(model: DecoderModel) -> list[torch.Tensor]:
    """[skeleton bytes as uint8, tensor 0, tensor 1, ...]: the model as one XCCL message."""
    buffer = io.BytesIO()
    packer = _Packer(buffer)
    packer.dump(model)
    skeleton = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    return [skeleton, *packer.tensors]


def unpack(tensors: list[torch.Tensor]) -> DecoderModel:
    """Inverse of ``pack``. The tensors are used as given: clone transport views first."""
    skeleton, *weights = tensors
    model = _Unpacker(io.BytesIO(skeleton.numpy().tobytes()), weights).load()
    if not isinstance(model, DecoderModel):
        raise TypeError("the message does not hold a DecoderModel")
    return model
