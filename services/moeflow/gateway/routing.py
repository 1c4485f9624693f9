"""Which instance serves a request (pure: plain data in, a choice out).

``least_loaded`` scores healthy instances by queued + running requests as last reported, plus
what this gateway has sent since that report, and breaks ties by name for determinism.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class InstanceView:
    url: str
    is_healthy: bool = True
    num_waiting: int = 0
    num_running: int = 0
    num_in_flight: int = 0
    kv_usage_ratio: float = 0.0

    @property
    def load(self) -> int:
        return max(self.num_waiting + self.num_running, self.num_in_flight)


def least_loaded(instances: Sequence[InstanceView]) -> InstanceView | None:
    healthy = [i for i in instances if i.is_healthy]
    if not healthy:
        return None
    return min(healthy, key=lambda i: (i.load, i.kv_usage_ratio, i.url))
