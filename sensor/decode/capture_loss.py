"""Capture-loss estimate from TCP acknowledgements, after Zeek's ``capture_loss``.

Kernel drop counters only see what the capture host itself lost; a span port that is
oversubscribed drops packets before they ever reach us.  TCP tells us anyway: when one
side acknowledges bytes the sensor never saw, those bytes crossed the wire without us.

What Zeek does (``policy/misc/capture-loss.zeek`` and its TCP reassembler): whenever an
acknowledgement moves past the point up to which the reassembler has already judged the
peer's stream, that is one *ack event* and the newly acknowledged bytes are *ack bytes*.
If any of those bytes were never delivered to the reassembler, the ack is also one *gap
event* and the missing bytes are *gap bytes*.  Acks at or below the judged point (dup
acks, old acks) are not events at all.  An ack beyond the sender's FIN is clamped to the
end of its data, since the FIN occupies a sequence number but carries no byte.  The
script then reports, once per watch interval, the gap and ack events of that interval
and ``percent_lost = 100 * gaps / acks`` (zero when there were no acks); the byte
counters are kept but are not what it reports, because one wild sequence number can
inflate them while it moves the event ratio by one.

What differs here: the BPF prefilter (``sensor.capture.bpf``) drops pure ACKs and the
server-to-client bulk, so the only stream we can judge is the client's.  Its data
segments all reach Python; the acknowledgements we get for it are the ack numbers of the
server's FIN/RST segments: the filter drops the server's SYN-ACK, pure ACKs and TLS
flight (any server segment that reaches the decoder judges, as every one does without
the filter).  The client's own FIN judges too: its sequence number is
the end of the client's data, so every byte before it was sent.  Fewer acks than Zeek
sees, but each one covers everything the client sent before it, so a dropped client
segment is still noticed by the next one of them.

Flows are keyed by the client direction's raw bytes, ``src + dst + tcp_header[0:4]``
(see ``reverse_key`` for the server direction).  ``client_segment`` runs for every
client data segment, so its common case (the segment starts where the previous one
ended) is a dict lookup, one comparison and two stores.  Every other case (holes,
retransmissions, acknowledgements) takes the slower path.  A flow whose SYN was missed
starts at the first client byte seen; earlier bytes are never judged, so a partial
connection cannot produce a false gap.  An upload that ``read`` shunts (capture.shunt) is
closed here from the first batch read without its segments, as Zeek stops judging a shunted
connection: its later bytes are not seen by design, and its FIN's ack judges nothing.  Like Zeek, the estimate assumes the capture keeps
the two directions in order: a span session that mirrors them through separate queues
can show an ack before the data it covers, and that reads as loss.
"""

from __future__ import annotations

from typing import NamedTuple

from ..stats import Stats

SEQ_MASK = 0xFFFFFFFF
# Positions are compared relative to the judged point; anything more than this far ahead
# of (or behind) the flow is a different connection on the same ports or a forged number.
MAX_SEQ_JUMP = 1 << 24
MAX_HOLES = 16
TABLE = "capture_loss"


class LossInterval(NamedTuple):
    """Counter deltas since the previous ``take_interval`` (Zeek's per-interval report)."""

    acks: int
    gap_events: int
    acked_bytes: int
    gap_bytes: int

    @property
    def loss_ratio(self) -> float:
        """Share of acknowledgements that covered bytes we never saw (Zeek's
        ``percent_lost`` / 100)."""
        return self.gap_events / self.acks if self.acks else 0.0


def reverse_key(key: bytes) -> bytes:
    """The key of the opposite direction: addresses and ports swapped.

    The decoder builds the key of the packet's own direction; CaptureLoss keys each flow
    by the client's and, in ``servers``, by this reversal of it, so a server packet finds
    its flow with the key it carries.
    """
    half = (len(key) - 4) // 2
    ports = 2 * half
    return key[half:ports] + key[:half] + key[ports + 2:ports + 4] + key[ports:ports + 2]


class _Flow:
    """One client byte stream.

    ``expect`` is the sequence number after the highest byte seen, ``judged`` the point
    up to which acknowledgements have already been counted.  ``holes`` (None while
    there are none, so the in-order path allocates nothing) are ``[start, end)``
    sequence ranges below ``expect`` that never arrived, in stream order.
    """

    __slots__ = ("expect", "judged", "holes", "fin", "last")

    def __init__(self, start: int, last: float):
        self.expect = start
        self.judged = start
        self.holes: list[tuple[int, int]] | None = None
        self.fin: int | None = None
        self.last = last


class CaptureLoss:
    """Per-flow client stream coverage and the global ack/gap counters exporters read.

    Counters (monotonic): ``acks`` acknowledgements that judged new client bytes,
    ``gap_events`` those of them that covered bytes never seen, ``acked_bytes`` and
    ``gap_bytes`` the bytes they covered and missed, ``holes`` holes opened by
    out-of-order segments (filled or not), ``merged_holes`` holes merged to respect
    ``MAX_HOLES`` (the bytes between them may then be counted as missing),
    ``resyncs`` flows restarted by a segment too far from their stream, and
    ``ignored_acks`` acknowledgements too far ahead of the stream to be believed.
    """

    def __init__(self, stats: Stats, max_flows: int = 65536, idle_timeout: float = 300.0):
        self.stats = stats
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self.flows: dict[bytes, _Flow] = {}
        # The same flows by the server direction's key (reverse_key), so a server segment
        # finds its flow with the key it carries instead of building the reversed one.
        self.servers: dict[bytes, _Flow] = {}
        # The four judged counters live in Stats.capture_loss, so exporters and the
        # capture workers' stats merging see them like every other counter.
        self.counts = stats.capture_loss
        self.holes = 0
        self.merged_holes = 0
        self.resyncs = 0
        self.ignored_acks = 0
        # Packet time as of the last expire(): stamping flows with it keeps timestamps
        # off the per-segment calls, at the cost of one expiry period of precision.
        self.clock = 0.0
        self._next_sweep = 0.0
        self._reported = LossInterval(0, 0, 0, 0)
        stats.table_sizes[TABLE] = 0

    acks = property(lambda self: self.counts["acks"])
    gap_events = property(lambda self: self.counts["gaps"])
    acked_bytes = property(lambda self: self.counts["acked_bytes"])
    gap_bytes = property(lambda self: self.counts["gap_bytes"])

    # -- hot path ----------------------------------------------------------------------
    def client_segment(self, key: bytes, seq: int, length: int) -> None:
        """Every client-to-server segment carrying ``length`` > 0 payload bytes."""
        flow = self.flows.get(key)
        if flow is not None and seq == flow.expect:
            flow.expect = (seq + length) & SEQ_MASK
            flow.last = self.clock
            return
        self._segment_slow(key, flow, seq, length)

    # -- flow events -------------------------------------------------------------------
    def syn(self, key: bytes, seq: int) -> None:
        """A client SYN: the data starts right after it, whatever was tracked before."""
        self._insert(key, (seq + 1) & SEQ_MASK)

    def server_ack(self, client_key: bytes, ack: int) -> None:
        """An acknowledgement number the server sent for the client's stream (SYN-ACK,
        ServerHello segment, FIN or RST).  Call it before ``close`` for a RST."""
        self.server_segment(reverse_key(client_key), ack, False)

    def server_segment(self, server_key: bytes, ack: int, rst: bool) -> None:
        """``server_ack`` for a segment keyed by its own (server) direction; a RST then
        closes the flow."""
        flow = self.servers.get(server_key)
        if flow is not None:
            self._judge(flow, ack)
            if rst:
                self.close(reverse_key(server_key))

    def client_fin(self, key: bytes, seq: int) -> None:
        """The client's FIN; ``seq`` is the sequence number the FIN flag occupies (the
        segment's seq plus its payload length), i.e. the end of the client's data.  It
        judges everything before it, and later server acks are clamped to it."""
        flow = self.flows.get(key)
        if flow is None:
            return
        seq &= SEQ_MASK
        self._judge(flow, seq)
        if flow.judged == seq:
            flow.fin = seq

    def close(self, key: bytes) -> None:
        if self.flows.pop(key, None) is not None:
            del self.servers[reverse_key(key)]
            self.stats.table_sizes[TABLE] = len(self.flows)

    # -- reporting and housekeeping ----------------------------------------------------
    def take_interval(self) -> LossInterval:
        """Counters accumulated since the previous call, as Zeek reports per interval."""
        current = LossInterval(self.acks, self.gap_events, self.acked_bytes, self.gap_bytes)
        before = self._reported
        self._reported = current
        return LossInterval(*(c - b for c, b in zip(current, before)))

    def expire(self, now: float) -> None:
        """Advance the clock flows are stamped with and, at most four times per idle
        timeout (the sweep visits every flow), drop flows idle for longer than it."""
        self.clock = now
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.idle_timeout / 4
        cutoff = now - self.idle_timeout
        idle = [key for key, flow in self.flows.items() if flow.last < cutoff]
        for key in idle:
            del self.flows[key]
            del self.servers[reverse_key(key)]
        self.stats.table_sizes[TABLE] = len(self.flows)

    # -- internals ---------------------------------------------------------------------
    def _insert(self, key: bytes, start: int) -> _Flow:
        flows = self.flows
        if key not in flows and len(flows) >= self.max_flows:
            oldest = next(iter(flows))
            del flows[oldest]
            del self.servers[reverse_key(oldest)]
            self.stats.evictions[TABLE] += 1
        flow = flows[key] = self.servers[reverse_key(key)] = _Flow(start, self.clock)
        self.stats.table_sizes[TABLE] = len(flows)
        return flow

    def _segment_slow(self, key: bytes, flow: _Flow | None, seq: int, length: int) -> None:
        if length <= 0:
            return
        if flow is None:
            flow = self._insert(key, seq)
        flow.last = self.clock
        judged = flow.judged
        start = (seq - judged) & SEQ_MASK
        if start > SEQ_MASK >> 1:
            start -= SEQ_MASK + 1  # before the judged point
        end = start + length
        top = (flow.expect - judged) & SEQ_MASK
        if start > top + MAX_SEQ_JUMP or end < -MAX_SEQ_JUMP:
            self.resyncs += 1
            flow = self._insert(key, seq)
            judged, start, end, top = seq, 0, length, 0
        if end <= 0:
            return  # a retransmission of bytes already judged
        start = max(start, 0)
        if start > top:
            self._add_hole(flow, top, start)
            self.holes += 1
        elif start < top and flow.holes:
            self._fill(flow, start, min(end, top))
        if end > top:
            flow.expect = (judged + end) & SEQ_MASK

    def _add_hole(self, flow: _Flow, start: int, end: int) -> None:
        """Record the missing range ``[start, end)`` (offsets from the judged point),
        which lies above every existing hole."""
        judged = flow.judged
        hole = ((judged + start) & SEQ_MASK, (judged + end) & SEQ_MASK)
        holes = flow.holes
        if holes is None:
            flow.holes = [hole]
            return
        holes.append(hole)
        if len(holes) > MAX_HOLES:
            self._merge_closest(holes)

    def _merge_closest(self, holes: list[tuple[int, int]]) -> None:
        """Join the two neighbouring holes with the fewest seen bytes between them: the
        estimate may then overstate gap bytes by that much, never gap events."""
        spacing = [((holes[i + 1][0] - holes[i][1]) & SEQ_MASK, i)
                   for i in range(len(holes) - 1)]
        _, i = min(spacing)
        holes[i:i + 2] = [(holes[i][0], holes[i + 1][1])]
        self.merged_holes += 1

    def _fill(self, flow: _Flow, start: int, end: int) -> None:
        """Take ``[start, end)`` (offsets from the judged point) out of the holes."""
        judged = flow.judged
        remaining = []
        for hole in flow.holes:
            lo = (hole[0] - judged) & SEQ_MASK
            hi = (hole[1] - judged) & SEQ_MASK
            if hi <= start or lo >= end:
                remaining.append(hole)
                continue
            if lo < start:
                remaining.append((hole[0], (judged + start) & SEQ_MASK))
            if hi > end:
                remaining.append(((judged + end) & SEQ_MASK, hole[1]))
        flow.holes = remaining or None

    def _judge(self, flow: _Flow, ack: int) -> None:
        """Count an acknowledgement of the client stream up to ``ack`` (exclusive)."""
        if flow.fin is not None and ((ack - flow.fin) & SEQ_MASK) <= SEQ_MASK >> 1:
            ack = flow.fin
        judged = flow.judged
        covered = (ack - judged) & SEQ_MASK
        if covered == 0 or covered > SEQ_MASK >> 1:
            return  # nothing new: a duplicate or older acknowledgement
        top = (flow.expect - judged) & SEQ_MASK
        if covered > top + MAX_SEQ_JUMP:
            self.ignored_acks += 1
            return
        missing = covered - top if covered > top else 0
        if flow.holes:
            remaining = []
            for hole in flow.holes:
                lo = (hole[0] - judged) & SEQ_MASK
                hi = (hole[1] - judged) & SEQ_MASK
                if lo >= covered:
                    remaining.append(hole)
                    continue
                missing += min(hi, covered) - lo
                if hi > covered:
                    remaining.append((ack, hole[1]))
            flow.holes = remaining or None
        if covered > top:
            flow.expect = ack  # written off as lost; the stream goes on after it
        flow.judged = ack
        flow.last = self.clock
        counts = self.counts
        counts["acks"] += 1
        counts["acked_bytes"] += covered
        if missing:
            counts["gaps"] += 1
            counts["gap_bytes"] += missing
