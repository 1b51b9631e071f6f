"""IPv4 and IPv6 fragment reassembly, bounded in count, bytes and time.

Overlaps follow the BSD policy as Suricata documents it: where two fragments overlap,
the one that starts at the lower offset wins; at the same offset the first to arrive wins.
Datagrams that never complete expire and are counted (``frag_timeout``).
"""

from __future__ import annotations

from ..records import DecodeError
from ..stats import Stats

MAX_DATAGRAM = 65535 + 40
MAX_FRAGMENTS_PER_DATAGRAM = 64


class _Pending:
    __slots__ = ("fragments", "total", "first_ts", "size", "header")

    def __init__(self, ts: float):
        self.fragments: list[tuple[int, int, bytes]] = []  # (offset, arrival, data)
        self.total = -1
        self.first_ts = ts
        self.size = 0
        self.header = b""


class Reassembler:
    def __init__(self, stats: Stats, max_datagrams: int = 4096, max_bytes: int = 16 << 20,
                 timeout: float = 30.0):
        self.stats = stats
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.pending: dict[tuple, _Pending] = {}
        self.bytes = 0

    def add(self, key: tuple, ts: float, offset: int, more: bool, payload: bytes,
            header: bytes = b"") -> bytes | None:
        """Store one fragment; return the reassembled payload once it is complete.

        ``header`` is kept from the offset-0 fragment (IPv6 callers need nothing from it).
        """
        if offset + len(payload) > MAX_DATAGRAM:
            raise DecodeError("frag_too_large")
        entry = self.pending.get(key)
        if entry is None:
            self._make_room(ts)
            entry = self.pending[key] = _Pending(ts)
        if len(entry.fragments) >= MAX_FRAGMENTS_PER_DATAGRAM:
            self._drop(key)
            raise DecodeError("frag_too_many")
        if not more:
            end = offset + len(payload)
            if entry.total >= 0 and entry.total != end:
                self._drop(key)
                raise DecodeError("frag_inconsistent_end")
            entry.total = end
        if offset == 0 and header:
            entry.header = header
        for old_offset, _, old in entry.fragments:
            if offset < old_offset + len(old) and old_offset < offset + len(payload):
                self.stats.bad("frag_overlap")
                break
        entry.fragments.append((offset, len(entry.fragments), payload))
        entry.size += len(payload)
        self.bytes += len(payload)
        self.stats.table_sizes["fragments"] = len(self.pending)
        if entry.total < 0:
            return None
        return self._complete(key, entry)

    def _complete(self, key: tuple, entry: _Pending) -> bytes | None:
        covered = 0
        for offset, _, data in sorted(entry.fragments):
            if offset > covered:
                return None
            covered = max(covered, offset + len(data))
        if covered < entry.total:
            return None
        out = bytearray(entry.total)
        # Write losers first so the BSD winner (lowest offset, then earliest arrival) lands last.
        for offset, _, data in sorted(entry.fragments, key=lambda f: (-f[0], -f[1])):
            chunk = data[: max(0, entry.total - offset)]
            out[offset:offset + len(chunk)] = chunk
        self._drop(key)
        return bytes(out)

    def _drop(self, key: tuple) -> None:
        entry = self.pending.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size

    def _make_room(self, ts: float) -> None:
        self.expire(ts)
        while self.pending and (len(self.pending) >= self.max_datagrams or self.bytes >= self.max_bytes):
            oldest = next(iter(self.pending))
            self._drop(oldest)
            self.stats.evictions["fragments"] += 1

    def expire(self, now: float) -> None:
        while self.pending:
            key, entry = next(iter(self.pending.items()))
            if now - entry.first_ts <= self.timeout:
                break
            self._drop(key)
            self.stats.bad("frag_timeout")
        self.stats.table_sizes["fragments"] = len(self.pending)

    def flush(self) -> None:
        """End of input: whatever is still incomplete never will be."""
        for _ in range(len(self.pending)):
            self.stats.bad("frag_timeout")
        self.pending.clear()
        self.bytes = 0
        self.stats.table_sizes["fragments"] = 0
