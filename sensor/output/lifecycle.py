"""Alert suppression in the style of Zeek's notice framework.

The first alert for a (host, indicator, action) goes out at once and opens a window
(default one hour, Zeek's ``Notice::default_suppression_interval``).  Repeats inside the
window are only counted.  The count is never lost: it rides on the first alert after the
window, or, if the host goes quiet, is handed out as a summary by ``expired_summaries``
(which the pipeline calls periodically and once more at shutdown with ``now=inf``).

Time is packet time, so a pcap read suppresses exactly as live capture would.
"""

from __future__ import annotations

from ..records import Detection

_START, _COUNT, _LAST = 0, 1, 2


class AlertLifecycle:
    def __init__(self, window: float = 3600.0, max_keys: int = 100000):
        self.window = window
        self.max_keys = max(1, max_keys)
        # key -> [window start, suppressed repeats, last suppressed Detection]; insertion
        # order is window-start order, so expiry scans only the head.
        self._windows: dict[tuple, list] = {}
        self._evicted: list[tuple[Detection, int]] = []
        self.evictions = 0
        self.evicted_counts_lost = 0

    def __len__(self) -> int:
        return len(self._windows)

    def admit(self, det: Detection) -> tuple[bool, int | None]:
        if self.window <= 0:
            return True, None
        key = (det.host_ip, det.indicator, det.action)
        windows = self._windows
        entry = windows.get(key)
        if entry is None:
            self._make_room()
            windows[key] = [det.ts, 0, None]
            return True, None
        if det.ts - entry[_START] < self.window:
            entry[_COUNT] += 1
            entry[_LAST] = det
            return False, None
        suppressed = entry[_COUNT]
        del windows[key]
        windows[key] = [det.ts, 0, None]
        return True, suppressed or None

    def expired_summaries(self, now: float) -> list[tuple[Detection, int]]:
        """Summaries for windows that ended with suppressed repeats; those windows close,
        so the next alert for the key goes out at once."""
        summaries = self._evicted
        self._evicted = []
        windows = self._windows
        expired = []
        for key, entry in windows.items():
            if now - entry[_START] < self.window:
                break
            expired.append(key)
            if entry[_COUNT]:
                summaries.append((entry[_LAST], entry[_COUNT]))
        for key in expired:
            del windows[key]
        return summaries

    def _make_room(self) -> None:
        """At the cap, the oldest window closes early; its count is kept for the next
        ``expired_summaries`` call (itself capped, and what that cap drops is counted)."""
        windows = self._windows
        if len(windows) < self.max_keys:
            return
        key = next(iter(windows))
        entry = windows.pop(key)
        self.evictions += 1
        if entry[_COUNT]:
            if len(self._evicted) < self.max_keys:
                self._evicted.append((entry[_LAST], entry[_COUNT]))
            else:
                self.evicted_counts_lost += entry[_COUNT]
