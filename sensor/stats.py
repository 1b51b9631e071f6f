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
    # Zeek-style capture-loss estimate (decode.capture_loss): acks, gaps, acked_bytes, gap_bytes
    capture_loss: Counter = field(default_factory=Counter)
    capture_errors: list = field(default_factory=list)

    def bad(self, reason: str) -> None:
        self.malformed[reason] += 1
