"""C kernels (``csrc/``), compiled once per machine and cached on disk, called through ctypes.

The library is built with the system C compiler (``$CC``, else ``cc``) for this CPU
(``-march=native``) into ``$MOEFLOW_HOME/kernels/moeflow-kernels-<key>.so``; the key hashes the
sources, the flags and the CPU's feature flags, so a changed source or another CPU gets its own
build and a cached build is never stale. The first start on a machine compiles (about a second,
logged); every later start only maps the cached file.

Where no compiler is (the container image's runtime stage), prebuilt portable variants are
used: ``python -m moeflow.engine.kernels.prebuild --portable DIR`` compiles one library per x86-64
micro-architecture level (v4: AVX-512, v3: AVX2/FMA) into DIR, and ``$MOEFLOW_KERNELS_PREBUILT``
names that folder at run time; the best level this CPU supports is loaded. Without a compiler
and without a fitting prebuilt variant, or with ``MOEFLOW_NATIVE_KERNELS=0``, ``library()`` is
None and callers use their torch path.

The library uses OpenMP and links ``libgomp.so.1``, the soname of the runtime torch loads, so it
runs on torch's thread pool (and stays fork-safe exactly as torch's own parallel ops are).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from moeflow.checkpoints.store import resolve_home

logger = logging.getLogger(__name__)

ENV_SWITCH = "MOEFLOW_NATIVE_KERNELS"
"""``0`` turns the C kernels off (the torch paths run instead)."""
ENV_EXTRA_FLAGS = "MOEFLOW_NATIVE_KERNELS_CFLAGS"
"""Extra compiler flags, space-separated, e.g. ``-mno-avx512f`` to build and measure the AVX2
paths on an AVX-512 machine (part of the build key)."""
ENV_PREBUILT = "MOEFLOW_KERNELS_PREBUILT"
"""A folder of prebuilt portable variants (see ``prebuild``), used when nothing can compile."""
ABI = 5
SOURCES = tuple(Path(__file__).parent / "csrc" / name
                for name in ("paged_attention.c", "packed_linear.c", "fused.c", "threads.c",
                             "decoder.c"))
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in ("vexp.h",))
"""Included by the sources: part of every build key, never compiled on their own."""
# ISO C and no contraction: a * b + c stays two roundings, as in torch's separate ops
PORTABLE_FLAGS = ("-O3", "-fopenmp", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC")
FLAGS = ("-march=native", *PORTABLE_FLAGS)
VARIANTS: dict[str, tuple[str, ...]] = {
    # x86-64 micro-architecture levels, best first: the CPU flags each needs (/proc/cpuinfo)
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma"),
    "x86-64-v3": ("avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"),
}
COMPILE_TIMEOUT_S = 120.0
PACKED_BLOCKS = (64, 16)
"""The block layouts (output rows per block) ``packed_linear`` reads: oneDNN's fp32 layouts on
AVX-512 (64) and AVX2-only (16) CPUs."""



def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_key(extra_flags: tuple[str, ...] = ()) -> str:
    flags = " ".join((*FLAGS, *extra_flags))
    digest = hashlib.sha256(f"{ABI}|{flags}|{platform.machine()}|".encode())
    digest.update(_cpu_flags().encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def source_key() -> str:
    """What a prebuilt variant is keyed by: the ABI, the portable flags and the sources."""
    digest = hashlib.sha256(f"{ABI}|{' '.join(PORTABLE_FLAGS)}|".encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def variant_path(folder: Path, variant: str) -> Path:
    return folder / f"moeflow-kernels-{variant}-{source_key()}.so"


def best_variant(cpu_flags: str, available: tuple[str, ...] = tuple(VARIANTS)) -> str | None:
    """The best level of ``available`` whose instructions are all in ``cpu_flags``."""
    have = set(cpu_flags.split())
    for variant, needs in VARIANTS.items():
        if variant in available and have.issuperset(needs):
            return variant
    return None


def _compile(dest: Path, extra_flags: tuple[str, ...],
             flags: tuple[str, ...] = FLAGS) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc, gcc or $CC)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # build beside the destination, then rename: concurrent starts never see a partial file
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, *extra_flags, f"-DMOEFLOW_KERNELS_ABI={ABI}", "-o", tmp,
                        *map(str, SOURCES), "-lm"], check=True,
                       capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        os.replace(tmp, dest)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"compiling the kernels failed: {exc.stderr.strip()[-2000:]}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class NativeKernels:
    """Typed entry points of the compiled library."""

    def __init__(self, lib: ctypes.CDLL, variant: str = "native") -> None:
        self.variant = variant
        """``native`` (built on this machine) or the prebuilt level that was loaded."""
        lib.moeflow_kernels_abi.restype = ctypes.c_int
        if lib.moeflow_kernels_abi() != ABI:
            raise RuntimeError("the cached kernel library has another ABI")
        lib.moeflow_packed_linear_rows.restype = ctypes.c_int
        lib.moeflow_packed_linear_rows.argtypes = [ctypes.c_int]
        self.packed_linear_rows: dict[int, int] = {
            block: int(lib.moeflow_packed_linear_rows(block)) for block in PACKED_BLOCKS}
        """Per block layout (rows per block): products of up to this many rows run
        ``packed_linear`` (0: this build has no loop for that layout)."""
        linear = lib.moeflow_packed_linear
        linear.restype = ctypes.c_int
        linear.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_int]
        self._packed_linear = linear
        norm = lib.moeflow_add_rms_norm
        norm.restype = None
        norm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
        self._add_rms_norm = norm
        rope = lib.moeflow_rope_store
        rope.restype = None
        rope.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        self._rope_store = rope
        fn = lib.moeflow_paged_decode_attention
        fn.restype = ctypes.c_int
        i64 = ctypes.c_int64
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, i64, ctypes.c_void_p, i64, i64, i64, i64, i64,
                       ctypes.c_float, ctypes.c_int]
        self._paged_decode_attention = fn
        greedy = lib.moeflow_greedy_rows
        greedy.restype = None
        greedy.argtypes = [ctypes.c_void_p, i64, i64, i64, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_int]
        self._greedy_rows = greedy
        silu = lib.moeflow_silu_mul
        silu.restype = None
        silu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64, ctypes.c_int]
        self._silu_mul = silu
        layers = lib.moeflow_decoder_layers
        layers.restype = ctypes.c_int
        p = ctypes.c_void_p
        layers.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, p, p, p, p, i64,
                           i64, p, i64, p, i64, ctypes.c_float, ctypes.c_float, ctypes.c_int]
        self.decoder_layers = layers
        """``csrc/decoder.c``: every layer of a decode-only step in one call (its arguments
        are raw addresses; ``models/fused_decode.py`` is the typed caller)."""
        for name in ("moeflow_bind_threads", "moeflow_unbind_threads"):
            getattr(lib, name).restype = ctypes.c_int
        lib.moeflow_bind_threads.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.moeflow_unbind_threads.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self._lib = lib

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of a float32 ``[T, 2I]`` gate_up product (gate columns, then
        up; contiguous rows) as ``[T, I]``, in one pass (``csrc/fused.c``)."""
        if gate_up.dtype != torch.float32 or gate_up.dim() != 2 or gate_up.stride(1) != 1 \
                or gate_up.shape[1] % 2:
            raise ValueError("silu_mul needs a float32 [T, 2I] tensor with contiguous rows")
        rows, width = gate_up.shape
        out = torch.empty((rows, width // 2), dtype=torch.float32)
        self._silu_mul(out.data_ptr(), gate_up.data_ptr(), rows, width // 2, gate_up.stride(0),
                       torch.get_num_threads())
        return out

    def greedy_rows(self, logits: torch.Tensor) -> tuple[list[int], list[bool]]:
        """Per row of float32 ``logits [B, V]`` (contiguous rows): the first index of its
        maximum, and whether the row is valid (no NaN, no +inf, not all -inf), in one pass."""
        if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
            raise ValueError("greedy_rows needs float32 [B, V] logits with contiguous rows")
        rows = logits.shape[0]
        argmax = torch.empty(rows, dtype=torch.int64)
        valid = torch.empty(rows, dtype=torch.uint8)
        self._greedy_rows(logits.data_ptr(), rows, logits.shape[1], logits.stride(0),
                          argmax.data_ptr(), valid.data_ptr(), torch.get_num_threads())
        return argmax.tolist(), [bool(v) for v in valid.tolist()]

    def bind_threads(self, cpus: list[int]) -> None:
        """Pin the calling thread's parallel team: thread i on ``cpus[i]`` (the caller is
        thread 0). Call it on the thread that computes; torch's thread count must be
        ``len(cpus)``. Raises OSError when a CPU cannot be used."""
        array = (ctypes.c_int32 * len(cpus))(*cpus)
        if self._lib.moeflow_bind_threads(array, len(cpus)) != 0:
            raise OSError(f"could not pin compute threads to CPUs {cpus}")

    def unbind_threads(self, cpus: list[int]) -> None:
        """Let every thread of the calling thread's team run on any of ``cpus`` again."""
        array = (ctypes.c_int32 * len(cpus))(*cpus)
        if self._lib.moeflow_unbind_threads(array, len(cpus), torch.get_num_threads()) != 0:
            raise OSError(f"could not unpin compute threads from CPUs {cpus}")

    def paged_decode_attention(
        self,
        q: torch.Tensor,  # [D, H, Hd] float32, dims and heads contiguous
        k_cache: torch.Tensor,  # [S, K, Hd] float32 contiguous
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [D, max_blocks] int32 contiguous
        context_lens: torch.Tensor,  # [D] int32, each >= 1
        block_size: int,
        scale: float,
    ) -> torch.Tensor:  # [D, H, Hd]
        """Each row of ``q`` attends to its sequence's first ``context_lens`` cached tokens."""
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[1]
        if q.stride(2) != 1 or q.stride(1) != head_dim:
            raise ValueError("q's heads and dims must be contiguous")
        out = torch.empty(q.shape, dtype=q.dtype)
        err = self._paged_decode_attention(
            out.data_ptr(), q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), num_seqs,
            num_heads, num_kv_heads, head_dim, block_size, scale, torch.get_num_threads())
        if err != 0:
            raise MemoryError("paged decode attention could not allocate its scratch memory")
        return out


    def packed_linear(self, x: torch.Tensor, packed: torch.Tensor, n: int, k: int,
                      kp: int, block: int = 64) -> torch.Tensor:
        """``x [M, K] @ W.T`` with W packed in blocks of ``block`` output rows, each ``[kp]
        [block]`` (see ``csrc/packed_linear.c``); ``x`` float32 with contiguous rows."""
        if x.stride(1) != 1:
            raise ValueError("x's rows must be contiguous")
        y = torch.empty((x.shape[0], n), dtype=torch.float32)
        err = self._packed_linear(y.data_ptr(), x.data_ptr(), x.shape[0], x.stride(0),
                                  packed.data_ptr(), n, k, kp, block, torch.get_num_threads())
        if err != 0:
            raise RuntimeError(f"this kernel build has no packed linear for {block}-row blocks")
        return y


    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, rms_norm(x + delta) * weight)`` for float32 [T, E] rows (contiguous);
        without ``delta``, ``(x, rms_norm(x) * weight)``."""
        rows, width = x.shape
        if not (x.is_contiguous() and weight.is_contiguous()
                and (delta is None or delta.is_contiguous())):
            raise ValueError("add_rms_norm takes contiguous tensors")
        out = x if delta is None else torch.empty_like(x)
        h = torch.empty_like(x)
        self._add_rms_norm(out.data_ptr(), h.data_ptr(), x.data_ptr(),
                           None if delta is None else delta.data_ptr(), weight.data_ptr(),
                           rows, width, eps)
        return out, h

    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """RoPE on q and k of float32 ``qkv`` [T, (H + 2K) * Hd] (rows contiguous) with each
        token's ``cos`` / ``sin`` rows [T, Hd] (contiguous); k and v are written to the cache
        at ``slots`` (int64); returns the rotated q and k heads [T, H + K, Hd]."""
        tokens = qkv.shape[0]
        if qkv.stride(1) != 1 or not (cos.is_contiguous() and sin.is_contiguous()
                                       and slots.is_contiguous()):
            raise ValueError("rope_store takes contiguous rows")
        qk = torch.empty((tokens, num_heads + num_kv_heads, head_dim), dtype=torch.float32)
        self._rope_store(qk.data_ptr(), qkv.data_ptr(), qkv.stride(0), cos.data_ptr(),
                         sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                         slots.data_ptr(), tokens, num_heads, num_kv_heads, head_dim)
        return qk


def build_prebuilt(folder: Path, variants: tuple[str, ...] = tuple(VARIANTS)) -> list[Path]:
    """Compile the portable variants into ``folder`` (for images built on another CPU)."""
    built = []
    for variant in variants:
        path = variant_path(folder, variant)
        _compile(path, (), (f"-march={variant}", *PORTABLE_FLAGS))
        built.append(path)
    return built


def load_prebuilt(folder: Path) -> NativeKernels:
    """The best prebuilt variant in ``folder`` for this CPU; raises when none fits."""
    available = tuple(v for v in VARIANTS if variant_path(folder, v).exists())
    variant = best_variant(_cpu_flags(), available)
    if variant is None:
        raise FileNotFoundError(f"no prebuilt kernel variant in {folder} fits this CPU "
                                f"(found: {', '.join(available) or 'none'})")
    return NativeKernels(ctypes.CDLL(str(variant_path(folder, variant))), variant)


def load(extra_flags: tuple[str, ...] = ()) -> NativeKernels:
    """Build (once per key) and load the kernels; without a compiler, the prebuilt variant
    named by ``$MOEFLOW_KERNELS_PREBUILT``; raises when neither is possible."""
    path = (resolve_home(os.environ) / "kernels"
            / f"moeflow-kernels-{build_key(extra_flags)}.so")
    if not path.exists():
        started = time.perf_counter()
        try:
            _compile(path, extra_flags)
        except FileNotFoundError:
            prebuilt = os.environ.get(ENV_PREBUILT)
            if not prebuilt or extra_flags:
                raise
            kernels = load_prebuilt(Path(prebuilt))
            logger.info("no C compiler: loaded the prebuilt %s kernels", kernels.variant)
            return kernels
        logger.info("compiled the C kernels into %s in %.2f s", path,
                    time.perf_counter() - started)
    return NativeKernels(ctypes.CDLL(str(path)))


@functools.cache
def library() -> NativeKernels | None:
    """The compiled kernels for this machine (built on first use), or None when unavailable."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        return load(tuple(os.environ.get(ENV_EXTRA_FLAGS, "").split()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("C kernels unavailable (%s): the torch paths run instead", exc)
        return None
