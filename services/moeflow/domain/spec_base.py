"""What every spec view shares: the pydantic base (camelCase on the wire, unknown fields
refused, frozen), the one error type, and Kubernetes quantities."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class SpecError(ValueError):
    """An invalid spec. `problems` holds one "field: what is wrong; fix: what to do" per issue."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems) if len(problems) == 1 else " | ".join(problems))
        self.problems = problems


class SpecModel(BaseModel):
    """The base of every spec view."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BYTES = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("512Mi", "2G", "1073741824") as bytes; ValueError else."""
    match = _BYTES.match(quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a byte quantity; fix: write e.g. 512Mi or 2Gi")
    number, suffix = int(match.group(1)), match.group(2) or ""
    return number * (_BINARY_SUFFIXES.get(suffix) or _DECIMAL_SUFFIXES[suffix])
