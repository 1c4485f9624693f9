"""One OpenMP pool per engine process: ``release_pool`` frees a thread's workers, and the
threads that do one-off tensor work (the engine build, helper threads) give theirs back.

Each case runs in a fresh interpreter: the test process has pools of its own. Threads are
counted in /proc/self/task; torch runs 2 threads per parallel region in every case, so a pool
holds one worker thread.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

PRELUDE = """
import json, os, threading, torch
from moeflow.engine.kernels.openmp import release_pool, then_release
torch.set_num_threads(2)
def threads():
    # a released worker leaves /proc a moment after the release returns: read until stable
    import time
    seen = [len(os.listdir("/proc/self/task"))]
    while len(seen) < 3 or len(set(seen[-3:])) > 1:
        time.sleep(0.02)
        seen.append(len(os.listdir("/proc/self/task")))
    return seen[-1]
def work(): x = torch.randn(1024, 1024); return float((x @ x).sum())
"""


def run(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_release_frees_the_calling_threads_workers_and_a_new_region_still_runs() -> None:
    r = run("""
        before = threads(); work(); with_pool = threads()
        ok = release_pool(); after = threads()
        work(); again = threads()
        print(json.dumps(dict(before=before, with_pool=with_pool, ok=ok, after=after,
                              again=again)))
    """)
    assert r["with_pool"] == r["before"] + 1  # the region started a worker, which stays
    assert r["ok"] is True
    assert r["after"] == r["before"]  # released: the worker exited
    assert r["again"] == r["before"] + 1  # a later region starts a new pool


def test_release_leaves_other_threads_pools_alone() -> None:
    r = run("""
        work()  # the main thread's pool
        done, go = threading.Event(), threading.Event()
        def other():
            work(); done.set(); go.wait(); release_pool()
        t = threading.Thread(target=other); t.start(); done.wait()
        both = threads()  # main + its worker + other + its worker + torch's own
        release_pool()  # the main thread's only
        main_released = threads()
        go.set(); t.join()
        print(json.dumps(dict(both=both, main_released=main_released, end=threads())))
    """)
    assert r["main_released"] == r["both"] - 1
    assert r["end"] == r["main_released"] - 2  # the other thread and its worker are gone


def test_then_release_gives_a_helper_threads_pool_back_after_the_work() -> None:
    # one helper thread (asyncio.to_thread's executor may start a second under load)
    r = run("""
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(1)
        pool.submit(lambda: None).result()  # the helper thread exists now
        idle = threads()
        pool.submit(work).result()
        after_kept = threads()
        pool.submit(release_pool).result()
        value = pool.submit(then_release(work)).result()
        print(json.dumps(dict(idle=idle, after_kept=after_kept, after_released=threads(),
                              value_is_float=isinstance(value, float))))
    """)
    assert r["after_kept"] == r["idle"] + 1  # plain helper work leaves a worker behind
    assert r["after_released"] == r["idle"]  # then_release took it back
    assert r["value_is_float"] is True


def test_building_an_engine_leaves_no_pool_on_the_building_thread(
    tiny_dirs: dict[str, Path],
) -> None:
    r = run(f"""
        from moeflow.coldstart import launch
        from moeflow.domain.coldstart import ColdStartRecord
        from moeflow.engine.config import EngineSettings
        settings = EngineSettings(model_path={str(tiny_dirs["llama"])!r}, num_threads=2,
                                  kv_cache_bytes=8 << 20, max_model_len=64)
        base = threads()
        keep = launch.release_pool
        launch.release_pool = lambda: True  # first without the release: the build's regions
        launch.build_engine(settings, ColdStartRecord(0.0)).close()
        unreleased = threads()
        release_pool()
        launch.release_pool = keep
        launch.build_engine(settings, ColdStartRecord(0.0)).close()
        print(json.dumps(dict(base=base, unreleased=unreleased, built=threads())))
    """)
    assert r["unreleased"] == r["base"] + 1  # loading and warming up do open regions
    assert r["built"] == r["base"], "the building thread kept OpenMP workers"


def test_building_an_expert_instance_leaves_no_pool_on_the_building_thread(
    tiny_dirs: dict[str, Path],
) -> None:
    r = run(f"""
        from moeflow.engine.ae import expert_app
        from moeflow.engine.config import EngineSettings
        settings = EngineSettings(
            model_path={str(tiny_dirs["qwen3_moe"])!r}, role="expert", rank=0,
            num_expert_instances=1, num_attention_instances=1, transport="memory",
            group="expert-pools", num_threads=2, kv_cache_bytes=8 << 20, max_model_len=64)
        base = threads()
        work()  # tensor work on the building thread before the build (its pool exists)
        with_pool = threads()
        expert_app.build_expert_app(settings)
        print(json.dumps(dict(base=base, with_pool=with_pool, built=threads())))
    """)
    assert r["with_pool"] == r["base"] + 1
    assert r["built"] == r["base"], "the building thread kept OpenMP workers"
