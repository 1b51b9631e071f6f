"""The cached ISO 8601 formatting gives exactly what ``datetime`` gives, at the rounding
edges too, and the alert and inventory formats built on it keep their contracts."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from hypothesis import given, settings, strategies as st

from sensor import isotime
from sensor.output.ecs import iso_time
from sensor.track.verdict import iso_utc

LATEST = 253402300799.0  # 9999-12-31T23:59:59, datetime's last second


def datetime_micro(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None).isoformat(
        timespec="microseconds") + "Z"


def datetime_seconds(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def near_rounding_edges(draw_second: int, half_micro: int) -> float:
    """A time half a microsecond (give or take the float's last bits) from a microsecond
    boundary, where the split must round as datetime does."""
    return draw_second + (half_micro + 0.5) / 1e6


def just_before(second: int, tenths_of_micro: int) -> float:
    """Less than a microsecond and a half before a whole second (below the epoch too), where
    the fraction rounds to minus one microsecond."""
    return second - tenths_of_micro / 1e7


TIMES = st.one_of(
    st.builds(just_before, st.integers(-10**9, 10**9), st.integers(5, 14)),
    st.floats(min_value=-62135596800.0, max_value=LATEST, allow_nan=False),
    st.floats(min_value=1.5e9, max_value=1.8e9, allow_nan=False),
    st.builds(near_rounding_edges, st.integers(0, 4_000_000_000), st.integers(-1, 999_999)),
    st.builds(math.nextafter, st.integers(0, 4_000_000_000).map(float),
              st.sampled_from([math.inf, -math.inf])),
)


@settings(max_examples=3000)
@given(TIMES)
def test_cached_formatting_equals_datetimes(ts):
    isotime._second_texts.clear()
    assert isotime.iso_micro(ts) == datetime_micro(ts)
    assert iso_utc(ts) == datetime_seconds(ts)
    # and again from the cache
    assert isotime.iso_micro(ts) == datetime_micro(ts)
    assert iso_utc(ts) == datetime_seconds(ts)


def test_the_cache_stays_bounded():
    isotime._second_texts.clear()
    for second in range(isotime.MAX_CACHED_SECONDS * 3):
        assert isotime.iso_seconds(second + 0.25) == datetime_seconds(second + 0.25)
        assert len(isotime._second_texts) <= isotime.MAX_CACHED_SECONDS


def test_impossible_times_raise_as_datetime_does_and_alerts_fall_back_to_the_epoch():
    for ts in (math.nan, math.inf, -math.inf, 1e300, LATEST + 1.0):
        try:
            datetime.fromtimestamp(ts, timezone.utc)
        except (OverflowError, OSError, ValueError):
            pass
        else:
            raise AssertionError(f"datetime accepted {ts}")
        try:
            isotime.iso_micro(ts)
        except (OverflowError, OSError, ValueError):
            pass
        else:
            raise AssertionError(f"iso_micro accepted {ts}")
        assert iso_time(ts) == "1970-01-01T00:00:00.000000Z"
    assert iso_utc(None) is None
