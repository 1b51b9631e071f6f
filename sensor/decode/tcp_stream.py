"""Bounded TCP stream buffers for the first bytes of each flow direction.

Only the start of a stream can carry what we look for (a ClientHello, an HTTP request
head, DNS messages on port 53), so a direction is buffered in sequence order until the
application decoder says COMPLETE or NOT, and then bypassed: later segments of that flow
cost one dict lookup.  Out-of-order segments, retransmissions and overlaps are placed by
sequence number.  Streams whose SYN was missed start at the lowest sequence number seen.
"""

from __future__ import annotations

import re

from ..records import DecodeError
from ..stats import Stats
from . import http, tls
from .http import HEAD_END

SEQ_MOD = 1 << 32
SEQ_WINDOW = 1 << 20  # how far a segment may sit from the stream base and still belong to it
MAX_STREAM_BYTES = tls.MAX_CLIENT_HELLO + 4096
MAX_DNS_STREAM_BYTES = 256 * 1024
MAX_PENDING_SEGMENTS = 64
NOSYN_PROBE_SEGMENTS = 4
MAX_HTTP_REQUESTS = 16

HTTP_FIRST_BYTES = frozenset(b"GHPDCOTMLSUBRN")
# Opens with a literal newline, as HEAD_END does, which the regex engine skips to
# instead of trying every position (a leading ``\r?`` cost five times as much on a
# 100-byte head).
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:[ \t]*(\d{1,9})", re.I)

KIND_UNKNOWN, KIND_TLS, KIND_HTTP, KIND_DNS = 0, 1, 2, 3
REJECT_HEAD = 6  # bytes that let client_hello_status rule a stream start out


def may_open_client_stream(payload: bytes) -> bool:
    """Whether a stream first seen at this segment may still be a client's TLS or HTTP
    stream.  A handshake record that cannot hold a ClientHello, which is how a server's
    flight (ServerHello onwards) opens, one segment per TLS connection, is ruled out by its
    first six bytes, as is a first byte that starts neither a record nor an HTTP method."""
    first = payload[0]
    if first == tls.CONTENT_HANDSHAKE:
        return tls.client_hello_status(payload[:REJECT_HEAD]) != tls.NOT_TLS
    return first in HTTP_FIRST_BYTES


class _Stream:
    __slots__ = ("base", "syn", "buf", "pending", "kind", "last", "segments", "consumed", "items")

    def __init__(self, base: int, syn: bool, kind: int, ts: float):
        self.base = base
        self.syn = syn
        self.buf = bytearray()
        self.pending: dict[int, bytes] = {}
        self.kind = kind
        self.last = ts
        self.segments = 0
        self.consumed = 0  # bytes of buf already handed out (DNS / HTTP keep-alive)
        self.items = 0


class StreamTable:
    """Returns application payloads ready to parse: ``(kind, bytes)`` items."""

    def __init__(self, stats: Stats, max_streams: int = 65536, max_bytes: int = 64 << 20,
                 idle_timeout: float = 120.0, max_bypass: int = 262144):
        self.stats = stats
        self.max_streams = max_streams
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self.max_bypass = max_bypass
        self.streams: dict[tuple, _Stream] = {}
        self.bypass: dict[tuple, int] = {}
        self.bytes = 0

    def syn(self, key: tuple, seq: int, ts: float, dns: bool) -> None:
        """A SYN (or, for DNS, a SYN-ACK) fixes the stream base exactly."""
        self.bypass.pop(key, None)
        self._forget(key)
        self._insert(key, _Stream((seq + 1) % SEQ_MOD, True, KIND_DNS if dns else KIND_UNKNOWN, ts))

    def close(self, key: tuple) -> None:
        self.bypass.pop(key, None)
        self._forget(key)

    def cut(self, key: tuple, seq: int) -> None:
        """The capture kept only the start of the segment at ``seq`` (its snap length): the
        stream cannot be reassembled past it, so it is given up and its later segments
        bypassed, instead of waiting on a hole that never fills."""
        st = self.streams.get(key)
        if st is not None:
            self._finish(key, st)
        elif key not in self.bypass:
            self._bypass(key, seq)

    def segment(self, key: tuple, seq: int, payload: bytes, ts: float, dns: bool) -> list:
        st = self.streams.get(key)
        if st is None:
            first_seen = self.bypass.get(key)
            if first_seen is not None:
                # A segment from before the first one we bypassed may be the real stream start.
                if (first_seen - seq) % SEQ_MOD >= SEQ_WINDOW or first_seen == seq:
                    return []
                del self.bypass[key]
            elif not dns and not may_open_client_stream(payload):
                self._bypass(key, seq)
                return []
            st = _Stream(seq, False, KIND_DNS if dns else KIND_UNKNOWN, ts)
            self._insert(key, st)
        st.last = ts
        st.segments += 1
        self._place(st, seq, payload)
        if len(self.streams) > 1 and next(reversed(self.streams)) is not key:
            self.streams[key] = self.streams.pop(key)
        try:
            items, done = self._drain(st)
        except DecodeError:
            self._finish(key, st)
            raise
        if done or (not st.syn and not items and st.kind == KIND_UNKNOWN
                    and st.segments >= NOSYN_PROBE_SEGMENTS):
            self._finish(key, st)
        elif self.bytes > self.max_bytes:
            self._evict_oldest()
        return items

    def settle_hello(self, key: tuple, seq: int, payload: bytes, may_match, ts: float) -> bool:
        """What ``segment`` concludes for a ClientHello's segments in order on a stream whose
        SYN was seen, at a fraction of the cost; False changes nothing.  True when

        * ``payload`` opens the stream with a hello that needs more bytes (a post-quantum
          one): it is held exactly as ``segment`` holds it, and yields nothing yet;
        * ``payload`` completes the held hello, or opens the stream with a whole one, and
          ``may_match`` rules the hello out: the stream is bypassed as ``segment`` would
          leave it, and the hello would have been dropped unparsed."""
        st = self.streams.get(key)
        if st is None or not st.syn or st.pending or st.consumed:
            return False
        if st.kind == KIND_UNKNOWN and not st.buf and seq == st.base:
            hello = payload
        elif st.kind == KIND_TLS and st.buf and (seq - st.base) % SEQ_MOD == len(st.buf):
            hello = bytes(st.buf) + payload
        else:
            return False
        try:
            status = tls.client_hello_status(hello)
        except DecodeError:
            return False
        if status == tls.NEED_MORE:
            self.segment(key, seq, payload, ts, False)
            return True
        if status != tls.COMPLETE or may_match(hello):
            return False
        self._finish(key, st)
        return True

    def settle_request(self, key: tuple, seq: int, payload: bytes, may_match, ts: float) -> bool:
        """``segment`` without the decoder's work on what it returns, for a segment that opens
        a stream whose SYN was seen and ends where its first header block does (a request
        without a body, the commonest), when ``may_match`` (see
        decode.packet.Interest.request_may_match) rules the segment out.  The only item
        ``segment`` can return then is the whole segment as a request head, which the
        decoder would drop unparsed for the same reason; the stream is left as ``segment``
        leaves it, so later requests on the connection are still read.  False changes
        nothing."""
        st = self.streams.get(key)
        if st is None or not st.syn or st.kind != KIND_UNKNOWN or st.buf or st.pending \
                or seq != st.base or payload[-1:] != b"\n":
            return False
        end = HEAD_END.search(payload)
        if end is None or end.end() != len(payload) or may_match(payload):
            return False
        self.segment(key, seq, payload, ts, False)
        return True

    def settle_server_flight(self, key: tuple, seq: int) -> bool:
        """What ``segment`` concludes for a non-DNS stream first seen at a segment of six or
        more bytes that opens with a handshake record whose message type (the sixth byte) is
        not ClientHello, as the caller has checked: ``may_open_client_stream`` rules any such
        start out, so the stream is bypassed at once.  False changes nothing."""
        if key in self.streams or key in self.bypass:
            return False
        self._bypass(key, seq)
        return True

    def _place(self, st: _Stream, seq: int, payload: bytes) -> None:
        rel = (seq - st.base) % SEQ_MOD
        if rel >= SEQ_MOD - SEQ_WINDOW:
            if st.syn or st.consumed:
                # Before the known start: a retransmission of the SYN's era, overlap only.
                back = SEQ_MOD - rel
                if back >= len(payload):
                    return
                payload = payload[back:]
                rel = 0
            else:
                # The stream really starts earlier than what we saw first: rebase.
                if st.buf:
                    st.pending[st.base] = bytes(st.buf)
                    self.bytes -= len(st.buf)
                    st.buf = bytearray()
                st.base = seq
                rel = 0
        elif rel >= SEQ_WINDOW:
            self.stats.bad("tcp_seq_out_of_window")
            return
        have = len(st.buf)
        if rel <= have:
            extra = payload[have - rel:]
            if extra:
                st.buf += extra
                self.bytes += len(extra)
            self._assemble(st)
        elif len(st.pending) < MAX_PENDING_SEGMENTS:
            absolute = (st.base + rel) % SEQ_MOD
            old = st.pending.get(absolute)
            if old is None or len(old) < len(payload):
                st.pending[absolute] = payload
                self.bytes += len(payload) - (len(old) if old else 0)
        else:
            self.stats.bad("tcp_too_many_pending")

    def _assemble(self, st: _Stream) -> None:
        progressed = True
        while st.pending and progressed:
            progressed = False
            end = len(st.buf)
            for absolute in list(st.pending):
                rel = (absolute - st.base) % SEQ_MOD
                if rel <= end:
                    data = st.pending.pop(absolute)
                    self.bytes -= len(data)
                    extra = data[end - rel:]
                    if extra:
                        st.buf += extra
                        self.bytes += len(extra)
                        end = len(st.buf)
                    progressed = True

    def _drain(self, st: _Stream) -> tuple[list, bool]:
        """Hand out whatever is complete; True when the stream needs no more bytes."""
        buf = st.buf
        status = None
        if st.kind == KIND_UNKNOWN:
            if not buf:
                return [], False
            status = tls.client_hello_status(buf)
            if status != tls.NOT_TLS:
                st.kind = KIND_TLS
            else:
                status = http.http_request_status(bytes(buf))
                if status == http.NOT_HTTP:
                    return [], st.syn
                st.kind = KIND_HTTP
        if st.kind == KIND_TLS:
            if status is None:
                status = tls.client_hello_status(buf)
            if status == tls.COMPLETE:
                return [(KIND_TLS, bytes(buf))], True
            if status == tls.NOT_TLS:
                return [], True
            return [], len(buf) >= MAX_STREAM_BYTES
        if st.kind == KIND_HTTP:
            return self._drain_http(st)
        return self._drain_dns(st)

    def _drain_http(self, st: _Stream) -> tuple[list, bool]:
        items = []
        while st.items < MAX_HTTP_REQUESTS:
            head = bytes(st.buf[st.consumed:])
            if not head:
                break
            status = http.http_request_status(head)
            if status == http.NOT_HTTP:
                return items, True
            if status == http.NEED_MORE:
                return items, len(st.buf) >= MAX_STREAM_BYTES
            items.append((KIND_HTTP, head))
            st.items += 1
            end = HEAD_END.search(head)
            if end is None:
                return items, True
            length = _CONTENT_LENGTH.search(head, 0, end.start())
            st.consumed += end.end() + (int(length.group(1)) if length else 0)
            if st.consumed >= MAX_STREAM_BYTES:
                return items, True
        return items, st.items >= MAX_HTTP_REQUESTS

    def _drain_dns(self, st: _Stream) -> tuple[list, bool]:
        from .dns import split_tcp_dns

        messages, used = split_tcp_dns(bytes(st.buf))
        if used:
            del st.buf[:used]
            self.bytes -= used
            st.base = (st.base + used) % SEQ_MOD
            st.consumed += used
            self._assemble(st)
        items = [(KIND_DNS, m) for m in messages]
        st.items += len(items)
        return items, st.consumed >= MAX_DNS_STREAM_BYTES

    def _insert(self, key: tuple, st: _Stream) -> None:
        if len(self.streams) >= self.max_streams:
            self._evict_oldest()
        self.streams[key] = st
        self.stats.table_sizes["tcp_streams"] = len(self.streams)

    def _evict_oldest(self) -> None:
        key = next(iter(self.streams))
        self._finish(key, self.streams[key])
        self.stats.evictions["tcp_streams"] += 1

    def _forget(self, key: tuple) -> None:
        st = self.streams.pop(key, None)
        if st is not None:
            self.bytes -= len(st.buf)
            if st.pending:
                self.bytes -= sum(len(p) for p in st.pending.values())
            self.stats.table_sizes["tcp_streams"] = len(self.streams)

    def _finish(self, key: tuple, st: _Stream) -> None:
        self._forget(key)
        self._bypass(key, st.base)

    def _bypass(self, key: tuple, seq: int) -> None:
        if len(self.bypass) >= self.max_bypass:
            del self.bypass[next(iter(self.bypass))]
            self.stats.evictions["tcp_bypass"] += 1
        self.bypass[key] = seq

    def expire(self, now: float) -> None:
        cutoff = now - self.idle_timeout
        while self.streams:
            key, st = next(iter(self.streams.items()))
            if st.last >= cutoff:
                break
            self._finish(key, st)
            self.stats.evictions["tcp_streams_idle"] += 1
        self.stats.table_sizes["tcp_streams"] = len(self.streams)
        self.stats.table_sizes["tcp_bypass"] = len(self.bypass)
