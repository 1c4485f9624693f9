"""torch <-> payload conversion (moeflow.xccl.tensors): views, dtypes, shapes, no copies."""

from __future__ import annotations

import pytest
import torch

from moeflow.xccl.tensors import TORCH_DTYPES, layout_of, views_of_payload, write_payload

pytestmark = pytest.mark.timeout(30)  # a hang guard; 2 s tripped on a loaded 2-core box


def round_trip(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    metas, num_bytes = layout_of(tensors)
    payload = torch.empty(num_bytes, dtype=torch.uint8)
    write_payload(payload, metas, tensors)
    return views_of_payload(payload, metas), payload


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=str)
def test_every_dtype_and_shape_survives(dtype: torch.dtype) -> None:
    tensors = [torch.ones(shape).to(dtype) for shape in [(), (0,), (4,), (2, 0, 3), (3, 5)]]
    got, _ = round_trip(tensors)
    for g, t in zip(got, tensors, strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape and torch.equal(g, t)


def test_non_contiguous_and_sliced_inputs_are_sent_by_value() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = [base.t(), base[1:3, ::2], base[4]]
    got, _ = round_trip(tensors)
    assert all(torch.equal(g, t) for g, t in zip(got, tensors, strict=True))
    assert all(g.is_contiguous() for g in got)


def test_received_tensors_are_views_of_the_payload() -> None:
    (got,), payload = round_trip([torch.zeros(4, dtype=torch.int32)])
    payload[:4] = torch.tensor([1, 0, 0, 0], dtype=torch.uint8)
    assert got.tolist() == [1, 0, 0, 0]


def test_unsupported_inputs_are_type_errors() -> None:
    with pytest.raises(TypeError, match="unsupported dtype"):
        layout_of([torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(TypeError, match="torch.Tensor"):
        layout_of([[1, 2]])  # type: ignore[list-item]
