"""The packet side of the pipeline: capture -> decode, up to the records.

A whole Sensor (pipeline) and the decoding process of a split read (split_read) share
it; what becomes of the records (``handle_records``) and of a packet-time tick with none
(``tick``) is theirs.  It imports nothing of the tracker's store or of the outputs, so a
decoding process does not load them.
"""

from __future__ import annotations

import sys
import time

from .config import DEFAULT_INTERNAL, Settings
from .decode.packet import DecoderConfig, Interest, PacketDecoder
from .stats import Stats
from .track.tables import KSC_TCP_PORTS, KSC_UDP_PORTS, TrackerConfig

FLUSH_INTERVAL = 5.0  # seconds of packet time between store commits and summary checks
FLOW_EVIDENCE_PORTS = frozenset([("tcp", p) for p in KSC_TCP_PORTS] + [("udp", p) for p in KSC_UDP_PORTS])


def decoder_interest(signatures, flow_addresses: set | None = None) -> Interest:
    """What the detector and tracker can use of decoded packets (decode.packet.Interest).

    ``flow_addresses`` is the tracker's live set of answered addresses (or its copy,
    track.mirror); None (for capture workers in other processes) reports every flow start."""
    screen = signatures.name_screen()
    return Interest(dns_screen=screen.wire if screen else None,
                    text_labels=screen.text if screen else None,
                    dns_labels=screen.labels if screen else None,
                    fingerprints=signatures.has_fingerprints or screen is None,
                    ip_literal_paths=signatures.has_standalone_paths,
                    flow_ports=FLOW_EVIDENCE_PORTS, flow_addresses=flow_addresses)


def tracker_config(settings: Settings) -> TrackerConfig:
    return TrackerConfig(internal=settings.internal or list(DEFAULT_INTERNAL),
                         resolvers=list(settings.resolvers),
                         dormant_days=settings.dormant_days,
                         answer_grace=settings.answer_grace)


class Decoding:
    """Packets in, records out to ``handle_records``; ``tick`` every FLUSH_INTERVAL of packet
    time, on the first packet past it that made no record (one that did ticks there)."""

    def __init__(self, settings: Settings, stats: Stats, signatures):
        self.settings = settings
        self.stats = stats
        self.signatures = signatures
        self.decoder = PacketDecoder(stats, DecoderConfig(dedup_window=settings.dedup_window))
        self._next_flush = 0.0

    def handle_records(self, records, ts: float) -> None:
        raise NotImplementedError

    def tick(self, ts: float) -> None:
        raise NotImplementedError

    def _decoder_tick(self, ts: float) -> None:
        """The decoder's part of a tick.  A Sensor and the decoding process of a split read
        both run it, at the same packet times, so their decoders hand the same DNS servers'
        messages back from the capture filter and make the same records."""
        self._next_flush = ts + FLUSH_INTERVAL
        self.decoder.recheck_dns_servers()

    def handle(self, ts: float, linktype: int, data: bytes, wire_len: int, interface: int = 0):
        stats = self.stats
        stats.packets += 1
        stats.bytes += wire_len
        records = self.decoder.decode(ts, linktype, data, interface)
        if records:
            self.handle_records(records, ts)
        elif ts >= self._next_flush:
            self.tick(ts)

    def handle_batch(self, linktype: int, buf: bytes, meta: bytes, interface: int = 0,
                     units: int = 1_000_000, others: dict | None = None) -> None:
        """A libpcap batch (``next_batch``: one buffer, 16-byte (sec, fraction, offset,
        caplen) records, ``units`` fractions a second), through PacketDecoder.batch, which
        drops on the buffer what it can rule out of Ethernet and Linux cooked frames.
        ``wire_len`` is the captured length here.  ``others`` maps the offsets of frames
        captured on another interface than ``interface`` to theirs."""
        handle = self.handle
        if others:
            for ts, frame, caplen, offset in self.decoder.batch(linktype, buf, meta, units, offsets=True):
                handle(ts, linktype, frame, caplen, others.get(offset, interface))
            return
        for ts, frame, caplen in self.decoder.batch(linktype, buf, meta, units):
            handle(ts, linktype, frame, caplen, interface)

    def attach_shunts(self, shunts) -> None:
        """The ShuntTable of the capture whose batches come next (capture.shunt), or None
        once it is read: its program also drops the DNS messages the decoder would
        (capture.dns_screen)."""
        self.decoder.shunts = shunts
        self.decoder.dns_decided.clear()
        if shunts is not None:
            interest = self.decoder.interest
            shunts.screen_dns(interest.dns_labels if interest is not None else None)


class Progress:
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.next = 0.0
        self.start = time.monotonic()

    def update(self, name: str, done: int, size: int | None, packets: int) -> None:
        now = time.monotonic()
        if not self.enabled or now < self.next:
            return
        self.next = now + 0.5
        rate = done / max(now - self.start, 1e-6) / 1e6
        pct = f"{100.0 * done / size:5.1f}% " if size else ""
        sys.stderr.write(f"\r{name}: {pct}{packets:,} packets, {rate:.1f} MB/s ")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
