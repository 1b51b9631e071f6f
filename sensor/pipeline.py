"""Wires the stages: capture -> decode -> detect -> track -> output.

One Sensor owns the state store and the sinks.  The read loop calls the decoder
directly (decoding.Decoding) and touches the later stages only when a packet produced
records.  A split read (split_read) runs the same Sensor in a second process, fed the
records of the first.
"""

from __future__ import annotations

import math
import os
import time
from datetime import date

from .config import ConfigError, Settings
from .decoding import Decoding, decoder_interest, tracker_config
from .detect.engine import Detector
from .detect.signatures import SignatureError, default_signature_paths, load_signatures
from .inet import gethostname
from .output.ecs import detection_to_ecs, host_event_to_ecs
from .output.lifecycle import AlertLifecycle
from .output.sinks import AlertRouter, build_sinks
from .records import Detection, HostEvent
from .stats import Stats
from .track.store import Store, StoreError, default_state_path
from .track.tracker import Tracker

# What Sensor() raises when the configuration, the signatures or the state store are not
# usable (a state file that is not an inventory, a directory that cannot be made): the
# commands report it in one line and exit 2 without starting half-configured.
SENSOR_START_ERRORS = (ConfigError, SignatureError, StoreError, ValueError, OSError)


class Sensor(Decoding):
    def __init__(self, settings: Settings, stats: Stats | None = None):
        stats = stats or Stats()
        self.observer = settings.observer or gethostname()
        if settings.removal_start:
            try:
                date.fromisoformat(settings.removal_start)
            except ValueError:
                raise ValueError(f"removal_start: '{settings.removal_start}' is not a YYYY-MM-DD date") from None
        Decoding.__init__(self, settings, stats, load_signatures(settings.signatures or default_signature_paths()))
        self.detector = Detector(self.signatures, self.stats)
        self.store = None
        if not settings.no_state:
            path = settings.state or default_state_path()
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.store = Store(path)
        self.tracker = Tracker(tracker_config(settings), self.signatures, self.stats, self.store)
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
        self._next_inventory = None
        self.last_ts = 0.0
        self._loss_reported = (0, 0)

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
        self.tracker.flush()
        self._decoder_tick(ts)
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
