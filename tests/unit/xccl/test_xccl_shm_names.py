"""Pure naming and sizing rules of the shm backend (no files are touched)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.xccl.shm_names import PREFIX, parse_name, quote_name, socket_path
from moeflow.xccl.shm_segments import capacity_for

pytestmark = pytest.mark.timeout(30)  # a hang guard; 2 s tripped on a loaded 2-core box

KIB, MIB = 1 << 10, 1 << 20


@pytest.mark.parametrize("name", ["prefill-0", "Qwen/Qwen3-30B-A3B", "a@b", "x.y", "ünï", "*?["])
def test_any_group_and_rank_round_trip_through_file_names(name: str) -> None:
    assert "/" not in quote_name(name) and "@" not in quote_name(name)
    assert parse_name(socket_path(Path("/dev/shm"), name, name).name) == (name, name, "sock")
    segment = f"{PREFIX}{quote_name(name)}@{quote_name('r')}@0a1b-3.seg"
    assert parse_name(segment) == (name, "r", "seg")


def test_foreign_files_are_not_ours() -> None:
    for filename in ("sem.foo", "xccl@only-one.sock", "xccl@a@b@c@d.seg", "xccl@a@b.txt"):
        assert parse_name(filename) is None


def test_socket_paths_longer_than_sun_path_are_refused() -> None:
    with pytest.raises(ValueError, match="shorter"):
        socket_path(Path("/dev/shm"), "g" * 50, "r" * 50)


def test_segment_capacities_are_size_classes_at_most_an_eighth_above_the_payload() -> None:
    assert capacity_for(1, 256 * KIB) == 256 * KIB
    assert capacity_for(MIB, 256 * KIB) == MIB
    assert capacity_for(MIB + 1, 256 * KIB) == MIB + 256 * KIB
    assert capacity_for(64 * MIB, 256 * KIB) == 64 * MIB
    for num_bytes in (300 * KIB, 5 * MIB + 3, 40 * MIB, 100 * MIB + 7):
        capacity = capacity_for(num_bytes, 256 * KIB)
        assert num_bytes <= capacity <= num_bytes * 1.25
