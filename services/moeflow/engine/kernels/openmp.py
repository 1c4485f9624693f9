"""One OpenMP pool per engine process: the compute thread's.

libgomp (the OpenMP runtime torch and the C kernels share) gives every thread that opens a
parallel region a pool of worker threads, kept after the region ends, and counts the workers of
all pools. When that count exceeds the CPUs, it cuts every pool's spin-wait from ~300,000
iterations to 1,000: between two parallel regions the workers sleep, and each of the hundreds
of regions of a decode step starts with a futex wake-up. A served engine builds and warms up
its model on one thread and steps on another, so it had two pools and ran in that throttled
mode: on a 2-CPU box, a c = 1 decode step took ~40 ms served against ~26 ms in-process, the
OpenMP worker sleeping 46 % of the time (benchmarks/openmp_pools.py measures it in-process).

``release_pool`` frees the calling thread's pool (OpenMP 5's ``omp_pause_resource_all``):
threads that ran tensor work once (the engine build, a LoRA or expert load, a KV receive)
call it when done, so only the compute thread keeps workers.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_RUNTIMES = ("libgomp.so.1", "libiomp5.so", "libomp.so")
"""OpenMP runtimes torch may have loaded (GNU, Intel, LLVM); each has the OpenMP 5 call."""
_OMP_PAUSE_SOFT = 1
P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime already in this process (never a second copy), or None."""
    import torch  # noqa: F401  (loads torch's OpenMP runtime, if it has one)

    no_load = getattr(os, "RTLD_NOLOAD", 0)
    if not no_load:
        return None  # cannot look a library up without loading it: leave OpenMP alone
    for name in _RUNTIMES:
        try:
            lib = ctypes.CDLL(name, mode=no_load | os.RTLD_LAZY)
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            lib.omp_pause_resource_all.restype = ctypes.c_int
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            return lib
    return None


def release_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (a later parallel region on this thread
    starts new ones). Returns False when there is no OpenMP runtime to ask or it refused (the
    call is made inside a parallel region). Other threads' pools are untouched."""
    lib = _runtime()
    if lib is None:
        return False
    return int(lib.omp_pause_resource_all(_OMP_PAUSE_SOFT)) == 0


def then_release(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, then ``release_pool`` on the thread that ran it: for one-off tensor work handed
    to a helper thread (``asyncio.to_thread``), whose pool would otherwise outlive the work."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            release_pool()

    return run
