"""ISO 8601 UTC text for capture timestamps, shared by the alert documents and the host
inventory.

A read formats thousands of timestamps a second (``@timestamp``, ``first_seen``,
``last_seen``), nearly all within the same few seconds of packet time, and building a
``datetime`` for each costs more than the rest of the formatting.  So the date and time of
day are formatted once per whole second and kept; only the microseconds are formatted per
call.  The split into seconds and microseconds is ``datetime.fromtimestamp``'s own (the
fraction rounded half to even), so the text is the same as ``datetime`` would give.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

MAX_CACHED_SECONDS = 4096  # a read's seconds come in order; a live sensor's are the last few

_second_texts: dict[int, str] = {}


def split_micro(ts: float) -> tuple[int, int]:
    """Whole seconds and microseconds of ``ts`` as ``datetime.fromtimestamp`` splits them.
    Raises ValueError, OverflowError or TypeError for what is not a finite number."""
    fraction, whole = math.modf(ts)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        whole += 1.0
        micro -= 1_000_000
    elif micro < 0:
        whole -= 1.0
        micro += 1_000_000
    return int(whole), micro


def second_text(second: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a whole second; raises as ``datetime.fromtimestamp`` does
    for a second outside its range."""
    text = _second_texts.get(second)
    if text is None:
        # isoformat pads years below 1000 to four digits, as ISO 8601 wants.
        text = datetime.fromtimestamp(second, timezone.utc).replace(tzinfo=None).isoformat()
        if len(_second_texts) >= MAX_CACHED_SECONDS:
            _second_texts.clear()
        _second_texts[second] = text
    return text


def iso_micro(ts: float) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ``; raises for an impossible time (see second_text)."""
    second, micro = split_micro(ts)
    return f"{second_text(second)}.{micro:06d}Z"


def iso_seconds(ts: float) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ``: the microseconds rounded as above, then dropped."""
    return second_text(split_micro(ts)[0]) + "Z"
