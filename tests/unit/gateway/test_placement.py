"""Colocated-vs-split and instance choice (DeepServe Algorithm 1 as implemented), on plain data."""

from __future__ import annotations

from moeflow.domain.roles import Role
from moeflow.gateway.routing import (
    InstanceView,
    PrefixTracker,
    pick_instance,
    place,
    prefix_keys,
    split_or_local,
)


def _view(url: str, role: str, load: int = 0, healthy: bool = True,
          pending: int = 0) -> InstanceView:
    return InstanceView(url=url, role=Role(role), rank_name=url, is_healthy=healthy,
                        num_running=load, num_pending_prompt_tokens=pending)


def _pd(prefill_pending: int = 0, decode_load: int = 0, decode_pending: int = 0
        ) -> list[InstanceView]:
    return [_view("p", "prefill", pending=prefill_pending),
            _view("d", "decode", load=decode_load, pending=decode_pending)]


def test_split_fleet_splits_a_long_prompt_when_the_prefill_queue_is_short() -> None:
    instances = _pd(prefill_pending=300, decode_load=2)
    placement = place(instances, num_prompt_tokens=1200, max_tokens=50,
                      min_prompt_tokens_for_split=256, prefix_blocks={})
    assert placement is not None and placement.is_split
    assert placement.prefill is instances[0] and placement.decode is instances[1]
    assert placement.computes_prompt is instances[0]


def test_split_fleet_computes_a_short_prompt_on_the_decode_instance() -> None:
    instances = _pd()  # an idle prefill instance does not tempt it: the hop costs more
    placement = place(instances, num_prompt_tokens=40, max_tokens=100,
                      min_prompt_tokens_for_split=256, prefix_blocks={})
    assert placement is not None and not placement.is_split
    assert placement.colocated is instances[1] and placement.computes_prompt is instances[1]


def test_a_backed_up_prefill_queue_sends_a_long_prompt_to_an_idle_decode_instance() -> None:
    placement = place(_pd(prefill_pending=3000, decode_load=0), num_prompt_tokens=1200,
                      max_tokens=50, min_prompt_tokens_for_split=256, prefix_blocks={})
    assert placement is not None and not placement.is_split
    assert placement.colocated is not None and placement.colocated.url == "d"


def test_a_busy_decode_instance_keeps_long_prompts_off_it_despite_the_queue() -> None:
    # 3 decoding requests would each stall for the whole 1200-token prompt: queue instead
    placement = place(_pd(prefill_pending=3000, decode_load=3), num_prompt_tokens=1200,
                      max_tokens=50, min_prompt_tokens_for_split=256, prefix_blocks={})
    assert placement is not None and placement.is_split


def test_tokens_the_gateway_sent_count_before_the_stats_report_them() -> None:
    instances = _pd(decode_load=0)
    instances[0].num_in_flight_prompt_tokens = 2500  # sent since the last stats poll
    assert instances[0].pending_prompt_tokens == 2500
    placement = place(instances, num_prompt_tokens=1200, max_tokens=50,
                      min_prompt_tokens_for_split=256, prefix_blocks={})
    assert placement is not None and not placement.is_split
    instances[0].num_pending_prompt_tokens = 3000  # reported: the larger count, not the sum
    assert instances[0].pending_prompt_tokens == 3000


def test_split_fleet_serves_a_long_one_token_request_whole_on_the_prefill_instance() -> None:
    instances = _pd()
    placement = place(instances, num_prompt_tokens=1200, max_tokens=1,
                      min_prompt_tokens_for_split=256, prefix_blocks={})
    assert placement is not None and not placement.is_split
    assert placement.colocated is instances[0]


def test_split_or_local_weighs_the_prefill_queue_against_local_interference() -> None:
    def split(num_prompt_tokens: int = 1000, prefill_pending_tokens: int = 0,
              local_pending_tokens: int = 0, local_load: int = 0,
              interference_weight: float = 1.0) -> bool:
        return split_or_local(
            num_prompt_tokens=num_prompt_tokens, min_prompt_tokens_for_split=256,
            prefill_pending_tokens=prefill_pending_tokens,
            local_pending_tokens=local_pending_tokens, local_load=local_load,
            interference_weight=interference_weight)

    assert not split(num_prompt_tokens=255)  # short: always local
    assert split(prefill_pending_tokens=1000)  # a tie splits: decodes may arrive meanwhile
    assert not split(prefill_pending_tokens=1001)
    assert split(prefill_pending_tokens=1001, local_pending_tokens=1)  # local queue counts
    assert split(prefill_pending_tokens=2999, local_load=3, interference_weight=1.0)
    assert not split(prefill_pending_tokens=2999, local_load=3, interference_weight=0.5)
    assert not split(prefill_pending_tokens=1, interference_weight=0.0)


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
