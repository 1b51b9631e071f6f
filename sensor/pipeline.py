"""Wires the stages: capture -> decode -> detect -> track -> output.

One Sensor owns the state store and the sinks.  The read loop calls the decoder
directly and touches the later stages only when a packet produced records.
"""

from __future__ import annotations

import math
import os
import sys
import time
from datetime import date

from .config import DEFAULT_INTERNAL, ConfigError, Settings
from .decode.packet import DecoderConfig, Interest, PacketDecoder
from .detect.engine import Detector
from .detect.signatures import SignatureError, default_signature_paths, load_signatures
from .inet import gethostname
from .output.ecs import detection_to_ecs, host_event_to_ecs
from .output.lifecycle import AlertLifecycle
from .output.sinks import AlertRouter, build_sinks
from .records import Detection, HostEvent
from .stats import Stats
from .track.store import Store, StoreError, default_state_path
from .track.tracker import KSC_TCP_PORTS, KSC_UDP_PORTS, Tracker, TrackerConfig

FLUSH_INTERVAL = 5.0  # seconds of packet time between store commits and summary checks
# What Sensor() raises when the configuration, the signatures or the state store are not
# usable (a state file that is not an inventory, a directory that cannot be made): the
# commands report it in one line and exit 2 without starting half-configured.
SENSOR_START_ERRORS = (ConfigError, SignatureError, StoreError, ValueError, OSError)
FLOW_EVIDENCE_PORTS = frozenset([("tcp", p) for p in KSC_TCP_PORTS] + [("udp", p) for p in KSC_UDP_PORTS])


def decoder_interest(signatures, flow_addresses: set | None = None) -> Interest:
    """What the detector and tracker can use of decoded packets (decode.packet.Interest).

    ``flow_addresses`` is the tracker's live set of answered addresses; None (for capture
    workers in other processes) reports every flow start."""
    screen = signatures.name_screen()
    return Interest(dns_screen=screen.wire if screen else None,
                    text_labels=screen.text if screen else None,
                    dns_labels=screen.labels if screen else None,
                    fingerprints=signatures.has_fingerprints or screen is None,
                    ip_literal_paths=signatures.has_standalone_paths,
                    flow_ports=FLOW_EVIDENCE_PORTS, flow_addresses=flow_addresses)


class Sensor:
    def __init__(self, settings: Settings, stats: Stats | None = None):
        self.settings = settings
        self.stats = stats or Stats()
        self.observer = settings.observer or gethostname()
        if settings.removal_start:
            try:
                date.fromisoformat(settings.removal_start)
            except ValueError:
                raise ValueError(f"removal_start: '{settings.removal_start}' is not a YYYY-MM-DD date") from None
        self.signatures = load_signatures(settings.signatures or default_signature_paths())
        self.decoder = PacketDecoder(self.stats, DecoderConfig(dedup_window=settings.dedup_window))
        self.detector = Detector(self.signatures, self.stats)
        self.store = None
        if not settings.no_state:
            path = settings.state or default_state_path()
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.store = Store(path)
        self.tracker = Tracker(TrackerConfig(internal=settings.internal or list(DEFAULT_INTERNAL),
                                             resolvers=list(settings.resolvers),
                                             dormant_days=settings.dormant_days,
                                             answer_grace=settings.answer_grace),
                               self.signatures, self.stats, self.store)
        self.decoder.interest = decoder_interest(self.signatures, self.tracker.answer_keys)
        self.decoder.report_redundant = self.tracker.report_redundant
        self.lifecycle = AlertLifecycle(window=settings.suppress_window)
        spool = settings.spool_dir or os.path.join(
            os.path.dirname(os.path.abspath(settings.state or default_state_path())), "spool")
        self.router = AlertRouter(build_sinks(settings.outputs or ["stdout"], spool, self.stats),
                                  self.stats)
        self.alerts = 0
        self.hosts_detected = 0
        self.host_snapshot: list[dict] = []
        self.capture_drops: dict = {}
        self.capture_filter_in_kernel: dict = {}  # interface -> whether the kernel runs the filter
        self.want_snapshots = bool(settings.metrics)
        self._next_snapshot = 0.0
        self._next_flush = 0.0
        self._next_inventory = None
        self.last_ts = 0.0
        self._loss_reported = (0, 0)

    def handle(self, ts: float, linktype: int, data: bytes, wire_len: int, interface: int = 0):
        stats = self.stats
        stats.packets += 1
        stats.bytes += wire_len
        records = self.decoder.decode(ts, linktype, data, interface)
        if records:
            self.handle_records(records, ts)
        elif ts >= self._next_flush:
            self.tick(ts)

    def handle_records(self, records, ts: float) -> None:
        """Records decoded here or by a capture worker, from packets up to time ``ts``.

        Live capture workers decode in their own processes; this is where their records
        join the one state store and the sinks, along the same path as ``handle``'s."""
        detect = self.detector.detect
        observe = self.tracker.observe
        for record in records:
            for event in observe(record, detect(record)):
                self.emit(event)
        if ts >= self._next_flush:
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

    def capture_loss_interval(self) -> tuple[int, int]:
        """(gaps, acks) of the capture-loss estimate since the previous call: Zeek reports
        capture loss per interval, so a loss burst is not averaged away by hours of calm."""
        loss = self.stats.capture_loss
        gaps, acks = loss["gaps"] - self._loss_reported[0], loss["acks"] - self._loss_reported[1]
        self._loss_reported = (loss["gaps"], loss["acks"])
        return gaps, acks

    def tick(self, ts: float) -> None:
        """Periodic work driven by packet time, so pcap reads behave like live capture."""
        self.last_ts = max(self.last_ts, ts)
        self._next_flush = ts + FLUSH_INTERVAL
        self.tracker.flush()
        self.decoder.recheck_dns_servers()
        if self.want_snapshots and time.monotonic() >= self._next_snapshot:
            self.refresh_snapshot()
        for det, count in self.lifecycle.expired_summaries(ts):
            self._send_detection(det, count)
        if self._next_inventory is None:
            self._next_inventory = ts + self.settings.inventory_interval
        elif ts >= self._next_inventory:
            self._next_inventory = ts + self.settings.inventory_interval
            self.send_inventory(ts)

    def refresh_snapshot(self) -> None:
        """Host list for the metrics thread, which must not touch the store itself."""
        self._next_snapshot = time.monotonic() + 10.0
        self.host_snapshot = self.tracker.inventory(self.last_ts)

    def send_inventory(self, ts: float) -> None:
        for host in self.tracker.inventory(ts):
            self.emit(HostEvent(ts, "inventory", host))

    def emit(self, event) -> None:
        if isinstance(event, Detection):
            admit, count = self.lifecycle.admit(event)
            if admit:
                self._send_detection(event, count)
        else:
            self.alerts += 1
            if event.kind == "host_detected":
                self.hosts_detected += 1
            self.router.emit(host_event_to_ecs(event, observer=self.observer))

    def _send_detection(self, det: Detection, count) -> None:
        self.alerts += 1
        self.router.emit(detection_to_ecs(det, observer=self.observer,
                                          ruleset=self.signatures.ruleset,
                                          version=self.signatures.version,
                                          summary_count=count))

    def replace_signatures(self, signatures) -> None:
        """SIGHUP: swap in a validated set; the stages keep their state."""
        self.signatures = signatures
        self.detector.signatures = signatures
        self.tracker.signatures = signatures
        self.decoder.interest = decoder_interest(signatures, self.tracker.answer_keys)

    def reopen(self) -> None:
        self.router.reopen()

    def close(self, snapshot: bool = True) -> None:
        """Flush everything; ``snapshot`` takes a last host list for the metrics and the
        summary (a quiet read without metrics has no reader for it)."""
        self.decoder.finish()
        for det, count in self.lifecycle.expired_summaries(math.inf):
            self._send_detection(det, count)
        self.tracker.flush()
        if snapshot:
            self.refresh_snapshot()
        self.tracker.close()
        self.router.close()


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
