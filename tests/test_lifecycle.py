"""Zeek-notice-style suppression: first alert at once, repeats counted, counts never lost."""

import math

from hypothesis import given, settings, strategies as st

from sensor.output.lifecycle import AlertLifecycle
from sensor.records import Detection, PacketContext, Signature

SIG = Signature("ksp-1", "update", "strong", "suffix", "kaspersky.com", "test")


def det(ts, host="10.0.0.5", indicator="dnl-01.kaspersky.com", action="dns_query"):
    ctx = PacketContext(ts, host, "10.0.0.53", 40000, 53, "udp")
    return Detection(ts, action, host, indicator, SIG, ctx)


def test_first_alert_goes_out_and_repeats_are_suppressed():
    life = AlertLifecycle(window=100)
    assert life.admit(det(0)) == (True, None)
    assert life.admit(det(10)) == (False, None)
    assert life.admit(det(99.9)) == (False, None)


def test_first_alert_after_window_carries_the_count():
    life = AlertLifecycle(window=100)
    life.admit(det(0))
    for t in (1, 2, 3):
        life.admit(det(t))
    assert life.admit(det(100)) == (True, 3)
    assert life.admit(det(150)) == (False, None)
    assert life.admit(det(200)) == (True, 1)


def test_after_a_quiet_window_without_repeats_no_count_is_reported():
    life = AlertLifecycle(window=100)
    life.admit(det(0))
    assert life.admit(det(500)) == (True, None)


def test_keys_are_host_indicator_action():
    life = AlertLifecycle(window=100)
    assert life.admit(det(0))[0]
    assert life.admit(det(1, host="10.0.0.6"))[0]
    assert life.admit(det(2, indicator="other.kaspersky.com"))[0]
    assert life.admit(det(3, action="tls_sni"))[0]
    assert not life.admit(det(4))[0]


def test_expired_summaries_report_suppressed_repeats_once():
    life = AlertLifecycle(window=100)
    life.admit(det(0))
    life.admit(det(5))
    last = det(7)
    life.admit(last)
    assert life.expired_summaries(50) == []
    summaries = life.expired_summaries(100)
    assert summaries == [(last, 2)]
    assert life.expired_summaries(1000) == []
    assert life.admit(det(1001)) == (True, None)


def test_shutdown_flushes_every_open_count():
    life = AlertLifecycle(window=3600)
    life.admit(det(0))
    life.admit(det(1))
    life.admit(det(0, host="10.0.0.9"))
    assert [count for _, count in life.expired_summaries(math.inf)] == [1]
    assert len(life) == 0


def test_window_zero_disables_suppression():
    life = AlertLifecycle(window=0)
    assert all(life.admit(det(0)) == (True, None) for _ in range(3))


def test_key_cap_evicts_oldest_but_keeps_its_count():
    life = AlertLifecycle(window=100, max_keys=2)
    life.admit(det(0, host="10.0.0.1"))
    life.admit(det(1, host="10.0.0.1"))
    life.admit(det(2, host="10.0.0.2"))
    life.admit(det(3, host="10.0.0.3"))
    assert len(life) == 2 and life.evictions == 1
    summaries = life.expired_summaries(4)
    assert [(d.host_ip, n) for d, n in summaries] == [("10.0.0.1", 1)]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.floats(0, 1000), st.integers(0, 3)), max_size=60))
def test_every_detection_is_emitted_or_counted(events):
    """Conservation: emitted + all reported counts == detections, whatever the order."""
    life = AlertLifecycle(window=50, max_keys=3)
    emitted = counted = 0
    for ts, host in sorted(events):
        admit, count = life.admit(det(ts, host=f"10.0.0.{host}"))
        emitted += admit
        counted += count or 0
        counted += sum(n for _, n in life.expired_summaries(ts))
    counted += sum(n for _, n in life.expired_summaries(math.inf))
    assert emitted + counted == len(events)
