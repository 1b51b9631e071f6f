"""Live capture: ``purge-sensor run -i IFACE``.

libpcap (pcapy-ng) opens the interface with the default BPF prefilter (bpf.py) so
packets that cannot carry evidence never reach Python; ``next_batch`` amortises the
C/Python boundary.  The capture is opened first (needs CAP_NET_RAW), then privileges
are dropped to ``--user`` before the state store and sinks are opened.  SIGHUP reloads
signatures and config atomically (an invalid set keeps the old one), SIGTERM/SIGINT
flush state and sinks and exit 0.
"""

from __future__ import annotations

import os
import pwd
import select
import signal
import struct
import sys
import time

from ..track.verdict import INSTALL_VERDICTS
from .bpf import FilterError, WatchUpdates, build_filter

_META = struct.Struct("=IIII")
BATCH = 1024
MAX_BATCHES = 64


class LiveSource:
    """One interface opened through libpcap with the sensor's filter, read without blocking."""

    def __init__(self, interface: str, bpf: str | None, snaplen: int = 65535,
                 buffer_mb: int = 64, promisc: bool = True):
        import pcapy

        self.interface = interface
        self.user_filter = bpf
        self.watch_updates = WatchUpdates(min_gap=1.0)
        try:
            handle = pcapy.create(interface)
            handle.set_snaplen(snaplen)
            handle.set_promisc(promisc)
            handle.set_timeout(100)
            handle.set_buffer_size(buffer_mb << 20)
            handle.activate()
            self.linktype = handle.datalink()
            handle.setfilter(build_filter(bpf, self.linktype))
            handle.setnonblock(1)
        except pcapy.PcapError as err:
            raise OSError(f"{interface}: {err}") from None
        self.handle = handle
        self.fd = handle.getfd()
        self._stats_error = pcapy.PcapError
        self._last = (0, 0, 0)

    def batch(self):
        """Yield (ts, linktype, data, wire_len) for what is ready now, without blocking.

        Drains up to MAX_BATCHES batches, so a busy link is read in large gulps while
        signals and the status line are still looked at between gulps.  ``next_batch``
        does not report wire lengths; the captured length stands in for it.
        """
        next_batch = self.handle.next_batch
        unpack_from = _META.unpack_from
        linktype = self.linktype
        for _ in range(MAX_BATCHES):
            buf, meta = next_batch(BATCH)
            if not meta:
                return
            for i in range(0, len(meta), 16):
                sec, usec, off, caplen = unpack_from(meta, i)
                yield (sec * 1_000_000 + usec) / 1_000_000, linktype, buf[off:off + caplen], caplen

    def set_watch(self, addresses) -> bool:
        """Also pass UDP towards these addresses (bpf.build_filter ``watch``); True when the
        kernel filter was replaced.  Offer the tracker's list after every ``batch``: a
        recompile happens only when it gains an address and at most once a second
        (bpf.WatchUpdates), so a refused offer is applied by a later one.  Packets already
        in the capture buffer were judged by the old filter.  Raises FilterError when
        libpcap rejects the new filter (the old one stays)."""
        watch = self.watch_updates.due(addresses, time.monotonic())
        if watch is None:
            return False
        try:
            self.handle.setfilter(build_filter(self.user_filter, self.linktype, watch))
        except self._stats_error as err:
            raise FilterError(f"{self.interface}: bad capture filter with a watch list: {err}") from None
        return True

    def drops(self) -> tuple[int, int, int]:
        """(received, kernel drops, interface drops) as libpcap reports them."""
        try:
            self._last = self.handle.stats()
        except self._stats_error:
            pass  # the interface went away: keep reporting the last counters we had
        return self._last

    def close(self) -> None:
        self.handle.close()


def drop_privileges(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def cmd_run(args) -> int:
    from ..cli import EXIT_OK, EXIT_USAGE, _settings
    from ..config import ConfigError
    from ..detect.signatures import SignatureError
    from ..pipeline import Sensor

    sources = []
    try:
        for iface in args.interface:
            sources.append(LiveSource(iface, args.bpf, buffer_mb=args.buffer_mb))
    except (OSError, ImportError) as err:
        print(f"purge-sensor: cannot open capture: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.user:
        try:
            drop_privileges(args.user)
        except (KeyError, PermissionError) as err:
            print(f"purge-sensor: cannot switch to user {args.user!r}: {err}", file=sys.stderr)
            return EXIT_USAGE
    try:
        settings = _settings(args)
        if not settings.metrics:
            settings.metrics = "127.0.0.1:9917"
        sensor = Sensor(settings)
        from ..output.metrics import start_metrics

        metrics = start_metrics(settings, sensor)
    except (ConfigError, SignatureError, ValueError, OSError) as err:
        print(f"purge-sensor: {err}", file=sys.stderr)
        return EXIT_USAGE
    flags = {"stop": False, "reload": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGINT, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGHUP, lambda *_: flags.__setitem__("reload", True))
    print(f"purge-sensor: capturing on {', '.join(args.interface)}; metrics on {settings.metrics}",
          file=sys.stderr, flush=True)
    handle = sensor.handle
    next_status = time.monotonic() + args.status_interval
    last_packets = 0
    fds = [s.fd for s in sources]
    try:
        while not flags["stop"]:
            if flags["reload"]:
                flags["reload"] = False
                _reload(sensor, args)
            try:
                select.select(fds, [], [], 0.2)
            except InterruptedError:
                continue
            for index, source in enumerate(sources):
                for ts, linktype, data, wire_len in source.batch():
                    handle(ts, linktype, data, wire_len, index)
            now = time.monotonic()
            if now >= next_status:
                _record_drops(sensor, sources)
                if sensor.last_ts:
                    sensor.tick(max(sensor.last_ts, time.time()))
                rate = (sensor.stats.packets - last_packets) / args.status_interval
                last_packets = sensor.stats.packets
                _status(sensor, f"{rate:,.0f} pkt/s, ")
                next_status = now + args.status_interval
    finally:
        for index, source in enumerate(sources):
            for ts, linktype, data, wire_len in source.batch():
                handle(ts, linktype, data, wire_len, index)
        _record_drops(sensor, sources)
        for source in sources:
            source.close()
        sensor.close()
        metrics.close()
        _status(sensor, "stopped: ")
    return EXIT_OK


def _record_drops(sensor, sources) -> None:
    for source in sources:
        _, dropped, ifdropped = source.drops()
        sensor.capture_drops[(source.interface, "kernel")] = dropped
        sensor.capture_drops[(source.interface, "interface")] = ifdropped


def _status(sensor, prefix: str) -> None:
    """The one-line status: what an operator tails to see the sensor keeps up."""
    drops = sensor.capture_drops
    kernel = sum(n for (_, kind), n in drops.items() if kind == "kernel")
    interface = sum(n for (_, kind), n in drops.items() if kind == "interface")
    hosts = sum(1 for h in sensor.host_snapshot if h.get("verdict") in INSTALL_VERDICTS)
    print(f"purge-sensor: {prefix}{sensor.stats.packets:,} packets, {kernel:,} dropped by kernel, "
          f"{interface:,} by interface, {sensor.alerts:,} alerts, {hosts} install hosts",
          file=sys.stderr, flush=True)


def _reload(sensor, args) -> None:
    from ..cli import _settings
    from ..config import ConfigError
    from ..detect.signatures import SignatureError, default_signature_paths, load_signatures

    try:
        settings = _settings(args)
        signatures = load_signatures(settings.signatures or default_signature_paths())
    except (ConfigError, SignatureError) as err:
        print(f"purge-sensor: reload failed, keeping the old configuration: {err}",
              file=sys.stderr, flush=True)
        return
    sensor.replace_signatures(signatures)
    sensor.reopen()
    print(f"purge-sensor: reloaded {len(signatures.signatures)} indicators "
          f"(version {signatures.version})", file=sys.stderr, flush=True)


def register(sub) -> None:
    from ..cli import _add_sensor_options

    p = sub.add_parser("run", help="capture live from one or more interfaces",
                       description="Capture live (libpcap, kernel BPF prefilter), alert and keep the "
                                   "inventory. Needs root or CAP_NET_RAW to open the interface; "
                                   "--user drops privileges afterwards. SIGHUP reloads signatures "
                                   "and config; SIGTERM flushes and exits 0. Metrics are always "
                                   "served (default 127.0.0.1:9917).")
    _add_sensor_options(p)
    p.add_argument("--interface", "-i", action="append", required=True, metavar="IFACE",
                   help="interface to capture on (repeatable)")
    p.add_argument("--bpf", metavar="FILTER", help="extra capture filter (tcpdump syntax), ANDed with the sensor's")
    p.add_argument("--user", metavar="USER", help="drop to this user after opening the capture")
    p.add_argument("--buffer-mb", type=int, default=64, metavar="MB", help="kernel capture buffer (default 64)")
    p.add_argument("--status-interval", type=float, default=60.0, metavar="SECONDS",
                   help="period of the one-line status on stderr (default 60)")
    p.set_defaults(func=cmd_run)
