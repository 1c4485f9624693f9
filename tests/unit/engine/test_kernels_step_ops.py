"""One-pass C kernels of the step's small ops: the greedy pick equals torch's argmax and validity on
every kind of row; the fused SiLU equals torch's within a few ulps."""

from __future__ import annotations

import pytest
import torch

from moeflow.engine.kernels import native

INF, NAN = float("inf"), float("nan")


def _torch_reference(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    finite = torch.isfinite(logits).logical_or(logits == -INF).all(dim=-1)
    has_max = logits.max(dim=-1).values > -INF
    return logits.argmax(dim=-1).tolist(), finite.logical_and(has_max).tolist()


@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 64, 1000, 49152])
def test_greedy_rows_equal_torch(vocab: int) -> None:
    kernels = native.library()
    assert kernels is not None
    gen = torch.Generator().manual_seed(vocab)
    rows = [torch.randn(vocab, generator=gen) for _ in range(6)]
    rows[1][:] = 0.0  # all equal: the first index
    rows[2][vocab // 2 :] = rows[2].max() + 1  # a tie spanning lanes: the first of them
    rows[3][:] = -INF  # nothing to pick: invalid
    rows[4][vocab - 1] = -INF  # -inf entries are allowed
    rows[5][:] = torch.randint(0, 3, (vocab,), generator=gen).float()  # many ties, random
    logits = torch.stack(rows)
    assert kernels.greedy_rows(logits) == _torch_reference(logits)
    # a strided view of a wider buffer (rows not adjacent) reads the same
    wide = torch.zeros(6, vocab + 5)
    wide[:, :vocab] = logits
    assert kernels.greedy_rows(wide[:, :vocab]) == _torch_reference(logits)


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("where", [0, 5, 8, 20, 39])
def test_a_nan_or_plus_inf_anywhere_makes_the_row_invalid(bad: float, where: int) -> None:
    kernels = native.library()
    assert kernels is not None
    logits = torch.randn(3, 40)
    logits[1, where] = bad
    _, valid = kernels.greedy_rows(logits)
    assert valid == [True, False, True]


def test_the_first_maximum_wins_across_lanes() -> None:
    kernels = native.library()
    assert kernels is not None
    for first in range(0, 30):
        logits = torch.zeros(1, 37)
        logits[0, first] = 5.0
        logits[0, first + 7] = 5.0  # a later lane holds the same maximum
        assert kernels.greedy_rows(logits)[0] == [first]


def test_other_inputs_are_refused() -> None:
    kernels = native.library()
    assert kernels is not None
    with pytest.raises(ValueError):
        kernels.greedy_rows(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError):
        kernels.greedy_rows(torch.zeros(8, 2).t())


@pytest.mark.parametrize("shape", [(1, 16), (3, 1536), (512, 1536), (2, 13)])
def test_silu_mul_matches_torch_within_ulps(shape: tuple[int, int]) -> None:
    kernels = native.library()
    assert kernels is not None
    rows, width = shape[0], 2 * shape[1]
    gate_up = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)) * 6
    gate_up[0, :4] = torch.tensor([0.0, -0.0, 90.0, -90.0])  # exp's ends and both zeros
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = kernels.silu_mul(gate_up)
    torch.testing.assert_close(got, want, rtol=4e-7 * 8, atol=1e-30)
    assert torch.equal(got[0, :2], torch.zeros(2))  # silu(+-0) * u is a zero
    # rows of a wider buffer (a strided view) read the same
    wide = torch.zeros(rows, width + 7)
    wide[:, :width] = gate_up
    assert torch.equal(kernels.silu_mul(wide[:, :width]), got)
