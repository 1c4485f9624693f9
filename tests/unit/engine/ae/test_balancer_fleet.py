"""The balancer's view of a fleet from Kubernetes Tasks (pure parts)."""

from __future__ import annotations

import pytest

from moeflow.engine.ae.balancer import ExpertBalancer, fleet_urls


def test_fleet_urls_orders_experts_by_rank_and_marks_missing_ranks() -> None:
    instances = [("expert", 2, "http://e2"), ("attention", 1, "http://a1"),
                 ("expert", 0, "http://e0"), ("attention", 0, "http://a0"),
                 ("expert", 7, "http://stray")]
    attention, experts = fleet_urls(instances, 3)
    assert attention == ["http://a0", "http://a1"]
    assert experts == ["http://e0", "", "http://e2"]  # rank 1 has no address: counts as dead


def test_set_fleet_keeps_the_number_of_expert_ranks() -> None:
    balancer = ExpertBalancer(["http://a0"], ["http://e0", "http://e1"], 8)
    try:
        balancer.set_fleet(["http://a0"], ["http://e0", ""])
        assert balancer.expert_stats()[1] is None  # no address: dead without any request
        with pytest.raises(ValueError, match="3 expert URLs for 2 ranks"):
            balancer.set_fleet(["http://a0"], ["a", "b", "c"])
    finally:
        balancer.close()
