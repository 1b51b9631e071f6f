"""Counters shared by all stages; exporters read them, nothing on the hot path formats them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    packets: int = 0
    bytes: int = 0
    decoded: int = 0  # packets that reached an IP layer
    malformed: Counter = field(default_factory=Counter)  # reason -> count
    matches: Counter = field(default_factory=Counter)  # category -> count
    detections: Counter = field(default_factory=Counter)  # (action, category) -> count
    evictions: Counter = field(default_factory=Counter)  # table -> count
    table_sizes: dict = field(default_factory=dict)  # table -> current size
    duplicates: int = 0
    shunted_flows: int = 0  # left to the capture filter by ``read`` (capture.shunt)
    dns_servers_screened: int = 0  # whose nameless messages ``read`` leaves to it (capture.dns_screen)
    # Zeek-style capture-loss estimate (decode.capture_loss): acks, gaps, acked_bytes, gap_bytes
    capture_loss: Counter = field(default_factory=Counter)
    capture_errors: list = field(default_factory=list)

    def bad(self, reason: str) -> None:
        self.malformed[reason] += 1

    # Capture workers decode in their own process with their own Stats; the process that owns
    # the sinks and metrics adds what they counted since their last report.
    _TOTALS = ("packets", "bytes", "decoded", "duplicates", "shunted_flows", "dns_servers_screened")
    _COUNTERS = ("malformed", "matches", "detections", "evictions", "capture_loss")

    def counters(self) -> dict:
        """A picklable copy of every cumulative counter (not the gauges in table_sizes)."""
        copy: dict = {name: getattr(self, name) for name in self._TOTALS}
        copy.update((name, Counter(getattr(self, name))) for name in self._COUNTERS)
        return copy

    @classmethod
    def delta(cls, now: dict, before: dict) -> dict:
        """What was counted between two ``counters()`` copies of the same Stats."""
        change: dict = {name: now[name] - before[name] for name in cls._TOTALS}
        change.update((name, now[name] - before[name]) for name in cls._COUNTERS)
        return change

    def merge(self, delta: dict) -> None:
        for name in self._TOTALS:
            setattr(self, name, getattr(self, name) + delta[name])
        for name in self._COUNTERS:
            getattr(self, name).update(delta[name])
