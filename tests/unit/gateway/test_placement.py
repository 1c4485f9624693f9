"""Colocated-vs-split and instance choice (DeepServe Algorithm 1 as implemented), on plain data."""

from __future__ import annotations

from moeflow.gateway.routing import InstanceView, PrefixTracker, pick_instance, place, prefix_keys


def _view(url: str, role: str, load: int = 0, healthy: bool = True) -> InstanceView:
    return InstanceView(url=url, role=role, rank_name=url, is_healthy=healthy, num_running=load)


def test_only_split_instances_split_every_request() -> None:
    instances = [_view("p", "prefill"), _view("d", "decode")]
    placement = place(instances, num_prompt_tokens=3, max_tokens=5,
                      min_prompt_tokens_for_split=256, prefix_blocks={})
    assert placement is not None and placement.is_split
    assert placement.prefill is instances[0] and placement.decode is instances[1]


def test_mixed_fleet_splits_long_prompts_and_colocates_short_ones() -> None:
    instances = [_view("c", "colocated"), _view("p", "prefill"), _view("d", "decode")]
    long = place(instances, num_prompt_tokens=300, max_tokens=50,
                 min_prompt_tokens_for_split=256, prefix_blocks={})
    short = place(instances, num_prompt_tokens=20, max_tokens=50,
                  min_prompt_tokens_for_split=256, prefix_blocks={})
    one_token = place(instances, num_prompt_tokens=300, max_tokens=1,
                      min_prompt_tokens_for_split=256, prefix_blocks={})
    assert long is not None and long.is_split
    assert short is not None and short.colocated is instances[0]
    assert one_token is not None and not one_token.is_split


def test_a_role_without_healthy_instances_falls_back_or_fails() -> None:
    sick_prefill = _view("p", "prefill", healthy=False)
    instances = [_view("c", "colocated"), sick_prefill, _view("d", "decode")]
    placement = place(instances, num_prompt_tokens=999, max_tokens=9,
                      min_prompt_tokens_for_split=1, prefix_blocks={})
    assert placement is not None and placement.colocated is instances[0]
    assert place([_view("d", "decode")], num_prompt_tokens=9, max_tokens=9,
                 min_prompt_tokens_for_split=1, prefix_blocks={}) is None


def test_longest_prefix_wins_when_load_is_balanced_else_least_loaded() -> None:
    a, b = _view("a", "colocated", load=1), _view("b", "colocated", load=2)
    assert pick_instance([a, b], {"b": 3}, load_tolerance=2) is b
    assert pick_instance([a, b], {}, load_tolerance=2) is a
    b.num_running = 9
    assert pick_instance([a, b], {"b": 3}, load_tolerance=2) is a


def test_prefix_tracker_matches_only_a_leading_run_of_blocks() -> None:
    tracker = PrefixTracker(max_keys_per_instance=100)
    prompt = list(range(64))
    tracker.record("a", prefix_keys(prompt))
    assert tracker.match_blocks("a", prefix_keys(prompt)) == 4
    assert tracker.match_blocks("a", prefix_keys(prompt[:40])) == 2
    assert tracker.match_blocks("a", prefix_keys([7] + prompt[1:])) == 0
    assert tracker.match_blocks("b", prefix_keys(prompt)) == 0


def test_prefix_tracker_forgets_oldest_keys_past_its_bound() -> None:
    tracker = PrefixTracker(max_keys_per_instance=4)
    old, new = list(range(64)), list(range(100, 164))
    tracker.record("a", prefix_keys(old))
    tracker.record("a", prefix_keys(new))
    assert tracker.match_blocks("a", prefix_keys(old)) == 0
    assert tracker.match_blocks("a", prefix_keys(new)) == 4
