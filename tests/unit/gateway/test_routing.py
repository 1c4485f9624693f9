"""least_loaded: healthy instances only, lowest load, then KV usage, then name."""

from __future__ import annotations

from moeflow.gateway.routing import InstanceView, least_loaded


def test_no_instances_or_none_healthy_gives_none() -> None:
    assert least_loaded([]) is None
    assert least_loaded([InstanceView("http://a", is_healthy=False)]) is None


def test_the_instance_with_fewest_queued_and_running_requests_wins() -> None:
    busy = InstanceView("http://a", num_waiting=3, num_running=4)
    light = InstanceView("http://b", num_waiting=0, num_running=2)
    assert least_loaded([busy, light]) is light


def test_unhealthy_instances_are_skipped_however_idle() -> None:
    idle_but_down = InstanceView("http://a", is_healthy=False)
    busy = InstanceView("http://b", num_running=50)
    assert least_loaded([idle_but_down, busy]) is busy


def test_requests_sent_since_the_last_report_count_as_load() -> None:
    # Both reported idle, but this gateway already sent 3 requests to a.
    a = InstanceView("http://a", num_in_flight=3)
    b = InstanceView("http://b", num_in_flight=1)
    assert least_loaded([a, b]) is b
    assert a.load == 3


def test_load_does_not_double_count_in_flight_requests_the_engine_already_reported() -> None:
    reported = InstanceView("http://a", num_waiting=1, num_running=2, num_in_flight=3)
    assert reported.load == 3


def test_kv_usage_breaks_load_ties() -> None:
    full = InstanceView("http://a", num_running=1, kv_usage_ratio=0.9)
    empty = InstanceView("http://b", num_running=1, kv_usage_ratio=0.1)
    assert least_loaded([full, empty]) is empty


def test_remaining_ties_break_by_url_whatever_the_order() -> None:
    instances = [InstanceView(f"http://engine-{i}") for i in (3, 1, 2)]
    assert least_loaded(instances) is instances[1]
    assert least_loaded(list(reversed(instances))) is instances[1]
