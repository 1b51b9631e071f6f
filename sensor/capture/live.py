"""Live capture: ``purge-sensor run -i IFACE``.

libpcap (pcapy-ng) opens the interface with the default BPF prefilter (bpf.py) so
packets that cannot carry evidence never reach Python; ``next_batch`` amortises the
C/Python boundary.  The capture is opened first (needs CAP_NET_RAW), then privileges
are dropped to ``--user`` before the state store and sinks are opened.  SIGHUP reloads
signatures and config atomically (an invalid set keeps the old one), SIGTERM/SIGINT
flush state and sinks and exit 0.

With ``--workers N`` (N > 1) N processes capture: each opens every interface and joins
that interface's PACKET_FANOUT group.  The kernel's fanout hash is symmetric (addresses and
ports sorted) and leaves the ports out for every IP fragment, so both directions of a flow
reach the same worker, and so do all fragments of a datagram.  PACKET_FANOUT_FLAG_DEFRAG is
deliberately not set: the kernel would then reassemble instead of the sensor, and it throws
away datagrams with overlapping fragments that ``read`` decodes (BSD policy).  Workers
decode and send their records to the main process, which alone owns the state store,
the sinks and the metrics.  Records are merged in packet-time order (each worker also
reports a watermark: it will send nothing older), so DNS answers are seen before the
connections they explain even when another worker decoded them.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import pwd
import select
import signal
import sys
import time
import traceback

from ..records import BATCH_RECORD
from ..track.verdict import INSTALL_VERDICTS
from .bpf import build_filter

BATCH = 1024
MAX_BATCHES = 64
MAX_WORKERS = 64
# SO_ATTACH_FILTER's reading side (asm-generic/socket.h), at socket level SOL_SOCKET.
SOL_SOCKET = 1
SO_GET_FILTER = 26


# pcap_activate's error statuses (pcap/pcap.h), worded as tcpdump reports them.
ACTIVATE_ERRORS = {
    -1: "cannot open the device (generic libpcap error)",
    -5: "no such device",
    -6: "monitor mode is not supported",
    -8: "permission denied: capturing needs root or CAP_NET_RAW",
    -9: "the device is not up",
    -11: "permission denied for promiscuous mode",
}


class LiveSource:
    """One interface opened through libpcap with the sensor's filter, read without blocking."""

    def __init__(self, interface: str, bpf: str | None, snaplen: int = 65535,
                 buffer_mb: int = 64, promisc: bool = True, fanout_group: int | None = None,
                 timeout_ms: int = 100):
        import pcapy

        self.interface = interface
        try:
            handle = pcapy.create(interface)
            handle.set_snaplen(snaplen)
            handle.set_promisc(promisc)
            handle.set_timeout(timeout_ms)
            handle.set_buffer_size(buffer_mb << 20)
            # pcapy returns pcap_activate's status instead of raising: on a negative one
            # the handle stays unactivated, and the first call on it fails with a message
            # about that ("not-yet-activated pcap_t") instead of the reason.
            status = handle.activate()
            if isinstance(status, int) and status < 0:
                raise OSError(f"{interface}: {ACTIVATE_ERRORS.get(status, f'libpcap error {status}')}")
            if fanout_group is not None:
                handle.set_fanout(fanout_group, pcapy.PACKET_FANOUT_HASH)
            self.linktype = handle.datalink()
            # A span port fed by cloud traffic mirroring or remote span is all VXLAN or
            # ERSPAN: the larger program costs its compile once, and the kernel a few
            # tests per packet over untagged IPv4.
            handle.setfilter(build_filter(bpf, self.linktype, tunnels=True))
            handle.setnonblock(1)
        except pcapy.PcapError as err:
            raise OSError(f"{interface}: {err}") from None
        self.handle = handle
        self.fd = handle.getfd()
        attached = kernel_filter_length(self.fd)
        # None where the kernel cannot be asked: nothing is claimed either way.
        self.filter_in_kernel = None if attached is None else attached > 0
        self._stats_error = pcapy.PcapError
        self._last = (0, 0, 0)
        self.drained = True
        # TPACKET_V3 hands a ring block to user space when it is full or its timeout
        # expires, so a packet can stay invisible that long after the kernel stamped it.
        self.hidden_for = 2 * timeout_ms / 1000 + 0.02
        if fanout_group is not None:
            self.discard_backlog()

    def discard_backlog(self) -> None:
        """Drop what the socket queued before it joined its fanout group.

        Until the join it received every packet of the interface, so that backlog is also
        in the other workers' rings; keeping it would decode those packets twice."""
        while self.handle.next_batch(BATCH)[1]:
            pass

    def batches(self):
        """Yield the libpcap batches (buffer, 16-byte records) ready now, without blocking.

        Drains up to MAX_BATCHES batches, so a busy link is read in large gulps while
        signals and the status line are still looked at between gulps; ``drained`` tells
        afterwards whether the ring was emptied."""
        next_batch = self.handle.next_batch
        self.drained = False
        for _ in range(MAX_BATCHES):
            buf, meta = next_batch(BATCH)
            if not meta:
                self.drained = True
                return
            yield buf, meta

    def drops(self) -> tuple[int, int, int]:
        """(received, kernel drops, interface drops) as libpcap reports them."""
        try:
            self._last = self.handle.stats()
        except self._stats_error:
            pass  # the interface went away: keep reporting the last counters we had
        return self._last

    def close(self) -> None:
        self.handle.close()


def kernel_filter_length(fd: int) -> int | None:
    """Instructions of the classic BPF program the kernel runs for socket ``fd``: 0 when
    none is attached, None where the kernel cannot be asked (not Linux, no C library).

    libpcap attaches the capture filter to its socket; when the kernel refuses the
    program (over 4,096 instructions, or a load from a scratch slot nothing stored)
    libpcap runs it in user space instead, after the kernel has copied every packet of
    the link into the ring, and says no more than "Warning: Kernel filter failed" on
    stderr.  Asked with no buffer and a zero length, SO_GET_FILTER returns the count:
    socket.getsockopt cannot pass those, and any buffer it can pass the kernel may
    overrun (it takes the length for a count of 8-byte instructions)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        getsockopt = ctypes.CDLL(None, use_errno=True).getsockopt
    except (OSError, AttributeError):
        return None
    count = ctypes.c_uint(0)
    if getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, None, ctypes.byref(count)) != 0:
        return None
    return count.value


def report_kernel_filters(sensor, sockets) -> None:
    """Record whether the kernel runs each interface's filter, from ``sockets``' reports
    (``{interface: LiveSource.filter_in_kernel}``: one per process capturing), and warn of
    every interface where it does not.  An interface's filter runs in the kernel when it
    does on every socket.  A filter the kernel refused costs the sensor its speed, not its
    results: said once, by interface, with what to look at."""
    known = sensor.capture_filter_in_kernel
    for report in sockets:
        for iface, in_kernel in report.items():
            if in_kernel is not None:
                known[iface] = known.get(iface, True) and in_kernel
    for interface in user_space_filters(sensor):
        print(f"purge-sensor: warning: the kernel refused the capture filter on {interface}; "
              "libpcap filters in user space, so every packet is copied out of the kernel and "
              "drops come sooner (a long --bpf? the kernel takes at most 4,096 instructions)",
              file=sys.stderr, flush=True)


def user_space_filters(sensor) -> list[str]:
    return sorted(iface for iface, in_kernel in sensor.capture_filter_in_kernel.items() if not in_kernel)


def drop_privileges(user: str) -> None:
    _import_what_runs_later()
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def _import_what_runs_later() -> None:
    """Import now the modules the sensor would otherwise load lazily after the switch.

    The unprivileged user may not be able to read the interpreter's own library (a Python
    installed under /root, say); whatever is imported before the switch keeps working."""
    import importlib

    # encodings.idna: socket calls encode host names with it; cryptography: the first QUIC
    # Initial; tomllib: a SIGHUP reload of the config file; signature_file (PyYAML): a load
    # that misses the signature cache.
    for name in ("encodings.idna", "sqlite3", "tomllib", "cryptography.exceptions",
                 "cryptography.hazmat.primitives.ciphers", "cryptography.hazmat.primitives.ciphers.aead",
                 "..output.metrics", "..pipeline", "..detect.signature_file"):
        importlib.import_module(name, __package__)


def cmd_run(args) -> int:
    if args.workers > 1:
        return _run_workers(args)
    return _run_single(args)


def _switch_user(user: str | None) -> bool:
    """Drop to ``user`` when one is given; False, with the reason on stderr, if that fails."""
    if not user:
        return True
    try:
        drop_privileges(user)
    except (KeyError, PermissionError) as err:
        print(f"purge-sensor: cannot switch to user {user!r}: {err}", file=sys.stderr)
        return False
    return True


def _start_sensor(settings):
    """The Sensor and its metrics endpoint: ``run`` always serves metrics."""
    from ..output.metrics import start_metrics
    from ..pipeline import Sensor

    if not settings.metrics:
        settings.metrics = "127.0.0.1:9917"
    sensor = Sensor(settings)
    return sensor, start_metrics(settings, sensor)


def _run_single(args) -> int:
    from ..cli import EXIT_OK, EXIT_USAGE, _settings
    from ..pipeline import SENSOR_START_ERRORS

    sources = []
    try:
        for iface in args.interface:
            sources.append(LiveSource(iface, args.bpf, buffer_mb=args.buffer_mb))
    except (OSError, ImportError) as err:
        print(f"purge-sensor: cannot open capture: {err}", file=sys.stderr)
        return EXIT_USAGE
    if not _switch_user(args.user):
        return EXIT_USAGE
    try:
        settings = _settings(args)
        sensor, metrics = _start_sensor(settings)
    except SENSOR_START_ERRORS as err:
        print(f"purge-sensor: {err}", file=sys.stderr)
        return EXIT_USAGE
    flags = {"stop": False, "reload": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGINT, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGHUP, lambda *_: flags.__setitem__("reload", True))
    print(f"purge-sensor: capturing on {', '.join(args.interface)}; metrics on {settings.metrics}",
          file=sys.stderr, flush=True)
    report_kernel_filters(sensor, [{source.interface: source.filter_in_kernel for source in sources}])
    handle_batch = sensor.handle_batch
    status = _StatusLine(args.status_interval)
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
                for buf, meta in source.batches():
                    handle_batch(source.linktype, buf, meta, index)
            if status.due():
                _record_drops(sensor, sources)
                status.report(sensor)
    finally:
        for index, source in enumerate(sources):
            for buf, meta in source.batches():
                handle_batch(source.linktype, buf, meta, index)
        _record_drops(sensor, sources)
        for source in sources:
            source.close()
        sensor.close()
        metrics.close()
        _status(sensor, "stopped: ")
    return EXIT_OK


# -- capture workers ---------------------------------------------------------------------

SEND_INTERVAL = 0.05  # seconds between a worker's messages: its records and its watermark
SEND_GROUPS = 4096  # packets with records after which a worker sends without waiting
STATS_INTERVAL = 1.0  # seconds between a worker's counter reports
WORKER_RING_TIMEOUT_MS = 20  # short, so ring blocks reach the worker and the merge soon
MAX_PENDING = 200_000  # records the main process holds back for ordering, at most
STOP_TIMEOUT = 10.0  # seconds workers get to drain and report before they are killed


def fanout_groups(interfaces: int) -> list[int]:
    """One PACKET_FANOUT group id per interface, unique to this sensor instance.

    The kernel joins sockets that name the same id on the same interface, whoever opened
    them, so the ids come from our pid rather than a constant."""
    base = os.getpid() * MAX_WORKERS
    return [(base + index) & 0xFFFF for index in range(interfaces)]


def _worker_decoder(settings, signatures):
    """The one place a worker builds its decoder.

    Its interest has no answered addresses (the tracker that knows them is in the main
    process), so it reports every flow start and the main process judges them."""
    from ..decode.packet import DecoderConfig, PacketDecoder
    from ..pipeline import decoder_interest
    from ..stats import Stats

    return PacketDecoder(Stats(), DecoderConfig(dedup_window=settings.dedup_window),
                         interest=decoder_interest(signatures))


class _CaptureWorker:
    """The loop of one worker process: capture, decode, send records and counters."""

    def __init__(self, sources, decoder, conn, control):
        self.sources = sources
        self.decoder = decoder
        self.stats = decoder.stats
        self.conn = conn
        self.control = control
        self.groups: list = []  # (packet ts, records) not yet sent
        self.watermarks = [0.0] * len(sources)
        self.reported = self.stats.counters()
        self.next_send = 0.0
        self.next_stats = time.monotonic() + STATS_INTERVAL

    def run(self, should_stop) -> None:
        fds = [source.fd for source in self.sources]
        while not should_stop():
            try:
                select.select(fds + [self.control.fileno()], [], [], SEND_INTERVAL)
            except InterruptedError:
                pass
            while self.control.poll():
                self.decoder.interest = self.control.recv()  # the main process reloaded signatures
            self.gulp()
            now = time.monotonic()
            if now >= self.next_send or len(self.groups) >= SEND_GROUPS:
                self.send_records(min(self.watermarks))
            if now >= self.next_stats:
                self.send_stats()
        self.drain(fds)
        self.decoder.finish()
        self.send_records(math.inf)
        self.send_stats()
        self.conn.send(("bye",))

    def drain(self, fds) -> None:
        """Decode what arrived before the stop, including ring blocks not yet handed over."""
        settled = time.monotonic() + max(source.hidden_for for source in self.sources)
        deadline = settled + STOP_TIMEOUT / 2
        while time.monotonic() < deadline:
            self.gulp()
            if time.monotonic() >= settled and all(source.drained for source in self.sources):
                return
            try:
                select.select(fds, [], [], SEND_INTERVAL)
            except InterruptedError:
                pass

    def gulp(self) -> None:
        """Decode what every interface has ready and advance its watermark.

        A drained interface cannot later yield a packet stamped before the drain began,
        less the time a packet can sit in a ring block not yet handed over; one read only
        in part has delivered everything up to its last packet."""
        stats = self.stats
        decoder = self.decoder
        decode = decoder.decode
        groups = self.groups
        for index, source in enumerate(self.sources):
            started = time.time() - source.hidden_for
            linktype = source.linktype
            meta = None
            for buf, meta in source.batches():
                for ts, data, caplen in decoder.batch(linktype, buf, meta):
                    stats.packets += 1
                    stats.bytes += caplen
                    records = decode(ts, linktype, data, index)
                    if records:
                        groups.append((ts, records))
            if source.drained or meta is None:
                self.watermarks[index] = started
            else:
                sec, usec = BATCH_RECORD.unpack_from(meta, len(meta) - 16)[:2]
                self.watermarks[index] = (sec * 1_000_000 + usec) / 1_000_000

    def send_records(self, watermark: float) -> None:
        self.conn.send(("records", watermark, self.groups))
        self.groups = []
        self.next_send = time.monotonic() + SEND_INTERVAL

    def send_stats(self) -> None:
        from ..stats import Stats

        counters = self.stats.counters()
        delta = Stats.delta(counters, self.reported)
        self.reported = counters
        captures = {source.interface: source.drops() for source in self.sources}
        self.conn.send(("stats", delta, dict(self.stats.table_sizes), captures))
        self.next_stats = time.monotonic() + STATS_INTERVAL


def _worker_main(args, settings, signatures, groups, conn, control, stop_event) -> None:
    """Entry point of a worker process (forked from the main one)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    terminated = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
    parent = os.getppid()
    try:
        sources = [LiveSource(iface, args.bpf, buffer_mb=args.buffer_mb, fanout_group=group,
                              timeout_ms=WORKER_RING_TIMEOUT_MS)
                   for iface, group in zip(args.interface, groups)]
    except (OSError, ImportError) as err:
        conn.send(("error", f"cannot open capture: {err}"))
        sys.exit(2)
    if args.user:
        try:
            drop_privileges(args.user)
        except (KeyError, PermissionError) as err:
            conn.send(("error", f"cannot switch to user {args.user!r}: {err}"))
            sys.exit(2)
    conn.send(("ready", os.getpid(), {source.interface: source.filter_in_kernel for source in sources}))
    worker = _CaptureWorker(sources, _worker_decoder(settings, signatures), conn, control)
    try:
        worker.run(lambda: bool(terminated) or stop_event.is_set() or os.getppid() != parent)
    except (BrokenPipeError, ConnectionResetError):
        sys.exit(1)  # the main process is gone; nobody is left to report to
    except Exception:  # noqa: BLE001 - a worker reports any failure to the main before leaving
        conn.send(("error", traceback.format_exc(limit=8).rstrip()))
        sys.exit(1)


class _WorkerState:
    __slots__ = ("index", "process", "conn", "control", "pid", "ready", "finished", "watermark", "packets",
                 "captures", "table_sizes", "filters_in_kernel")

    def __init__(self, index, process, conn, control):
        self.index = index
        self.process = process
        self.conn = conn
        self.control = control
        self.pid = process.pid
        self.ready = False
        self.finished = False
        self.watermark = 0.0
        self.packets = 0
        self.captures: dict = {}
        self.table_sizes: dict = {}
        self.filters_in_kernel: dict = {}


class WorkerPool:
    """The main process's side: start the workers, merge what they send, stop them.

    Records wait in a heap until every worker still running has announced a watermark
    past them, then reach ``Sensor.handle_records`` in packet-time order.  The heap is
    capped: beyond MAX_PENDING records the oldest go through unordered, counted as
    evictions of ``worker_merge``."""

    def __init__(self, args, settings, signatures, count: int):
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.stop_event = context.Event()
        self.workers: list[_WorkerState] = []
        self.failure: str | None = None
        self.pending: list = []
        self.sequence = itertools.count()
        groups = fanout_groups(len(args.interface))
        for index in range(count):
            receiver, sender = context.Pipe(duplex=False)
            control_in, control_out = context.Pipe(duplex=False)
            process = context.Process(target=_worker_main, name=f"purge-sensor-worker-{index}",
                                      args=(args, settings, signatures, groups, sender, control_in,
                                            self.stop_event),
                                      daemon=True)
            process.start()
            sender.close()
            control_in.close()
            self.workers.append(_WorkerState(index, process, receiver, control_out))

    @property
    def running(self) -> list[_WorkerState]:
        return [w for w in self.workers if w.conn is not None]

    @property
    def stopped_by_signal(self) -> bool:
        """A worker left cleanly on its own: someone sent it SIGTERM (systemd stops the whole
        control group that way), which stops the sensor."""
        return any(w.finished for w in self.workers) and not self.stop_event.is_set()

    def wait_ready(self, timeout: float = 30.0) -> str | None:
        """None once every worker has opened its captures, else why one could not."""
        from multiprocessing.connection import wait

        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.workers):
            waiting = {w.conn: w for w in self.workers if not w.ready}
            ready = wait(list(waiting), max(0.0, deadline - time.monotonic()))
            if not ready:
                return "capture workers did not start in time"
            for conn in ready:
                worker = waiting[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return f"worker {worker.index} exited while starting"
                if message[0] == "error":
                    return message[1]
                worker.filters_in_kernel = message[2]
                worker.ready = True
        return None

    def poll(self, sensor, timeout: float) -> None:
        from multiprocessing.connection import wait

        running = {w.conn: w for w in self.running}
        if running:
            for conn in wait(list(running), timeout):
                self._receive(running[conn], sensor)
        self._release(sensor, min((w.watermark for w in self.running), default=math.inf))

    def _receive(self, worker: _WorkerState, sensor) -> None:
        conn = worker.conn
        for _ in range(64):  # then let the other workers and the main loop have a turn
            try:
                if not conn.poll():
                    return
                message = conn.recv()
            except (EOFError, OSError):
                self._lost(worker)
                return
            kind = message[0]
            if kind == "records":
                _, watermark, groups = message
                for ts, records in groups:
                    heapq.heappush(self.pending, (ts, next(self.sequence), records))
                worker.watermark = max(worker.watermark, watermark)
            elif kind == "stats":
                _, delta, worker.table_sizes, worker.captures = message
                sensor.stats.merge(delta)
                worker.packets += delta["packets"]
                self.record_capture(sensor)
            elif kind == "bye":
                worker.finished = True
            elif kind == "error":
                self.failure = self.failure or f"worker {worker.index} failed: {message[1]}"

    def _lost(self, worker: _WorkerState) -> None:
        worker.conn.close()
        worker.conn = None
        if not worker.finished and self.failure is None:
            worker.process.join(1.0)
            self.failure = (f"worker {worker.index} (pid {worker.pid}) exited unexpectedly "
                            f"(exit code {worker.process.exitcode})")

    def _release(self, sensor, watermark: float) -> None:
        pending = self.pending
        handle_records = sensor.handle_records
        while pending and (pending[0][0] <= watermark or len(pending) > MAX_PENDING):
            if pending[0][0] > watermark:
                sensor.stats.evictions["worker_merge"] += 1
            ts, _, records = heapq.heappop(pending)
            handle_records(records, ts)
        sensor.stats.table_sizes["worker_merge"] = len(pending)
        if 0.0 < watermark < math.inf:
            handle_records((), watermark)  # packet time moves on even when nothing matched

    def record_capture(self, sensor) -> None:
        """Kernel drops add up over the workers' sockets; interface drops are the device's
        own counter, which every socket reports alike."""
        interfaces = {iface for worker in self.workers for iface in worker.captures}
        for iface in interfaces:
            counts = [w.captures.get(iface, (0, 0, 0)) for w in self.workers]
            sensor.capture_drops[(iface, "kernel")] = sum(kernel for _, kernel, _ in counts)
            sensor.capture_drops[(iface, "interface")] = max(interface for _, _, interface in counts)
        sizes: dict = {}
        for worker in self.workers:
            for table, size in worker.table_sizes.items():
                sizes[table] = sizes.get(table, 0) + size
        sensor.stats.table_sizes.update(sizes)

    def stop(self, sensor) -> None:
        """Ask every worker to drain and report, take all they send, then make sure they are gone."""
        self.stop_event.set()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.running and time.monotonic() < deadline:
            self.poll(sensor, 0.2)
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                print(f"purge-sensor: worker {worker.index} (pid {worker.pid}) did not stop; killing it",
                      file=sys.stderr, flush=True)
                worker.process.kill()
                worker.process.join()
            if worker.conn is not None:
                worker.conn.close()
                worker.conn = None
            worker.control.close()
        self._release(sensor, math.inf)

    def replace_signatures(self, signatures) -> None:
        """Send every worker the decoder interest of a reloaded signature set (a few hundred
        bytes, so the send does not wait on a busy worker)."""
        from ..pipeline import decoder_interest

        interest = decoder_interest(signatures)
        for worker in self.running:
            try:
                worker.control.send(interest)
            except OSError:
                pass  # the worker is leaving; its end of the pipe tells the main loop soon

    def describe(self) -> str:
        return ", ".join(f"#{w.index} {w.packets:,} packets" for w in self.workers)


def _run_workers(args) -> int:
    from ..cli import EXIT_USAGE, _settings
    from ..detect.signatures import default_signature_paths, load_signatures
    from ..pipeline import SENSOR_START_ERRORS

    try:
        settings = _settings(args)
        signatures = load_signatures(settings.signatures or default_signature_paths())
    except SENSOR_START_ERRORS as err:
        print(f"purge-sensor: {err}", file=sys.stderr)
        return EXIT_USAGE
    pool = WorkerPool(args, settings, signatures, args.workers)
    sensor = metrics = None
    try:
        problem = pool.wait_ready()
        if problem:
            print(f"purge-sensor: {problem}", file=sys.stderr)
            return EXIT_USAGE
        if not _switch_user(args.user):
            return EXIT_USAGE
        try:
            sensor, metrics = _start_sensor(settings)
        except SENSOR_START_ERRORS as err:
            print(f"purge-sensor: {err}", file=sys.stderr)
            return EXIT_USAGE
        return _serve_workers(args, pool, sensor)
    finally:
        if sensor is None:
            pool.stop_event.set()
            for worker in pool.workers:
                worker.conn.close()  # a worker blocked on sending gets EPIPE and leaves
                worker.process.join(STOP_TIMEOUT)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
        else:
            pool.stop(sensor)
            sensor.close()
            if metrics is not None:
                metrics.close()
            _status(sensor, "stopped: ")
            print(f"purge-sensor: workers: {pool.describe()}", file=sys.stderr, flush=True)
            if pool.failure:
                print(f"purge-sensor: {pool.failure}", file=sys.stderr, flush=True)


def _serve_workers(args, pool: WorkerPool, sensor) -> int:
    from ..cli import EXIT_CAPTURE, EXIT_OK

    flags = {"stop": False, "reload": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGINT, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGHUP, lambda *_: flags.__setitem__("reload", True))
    pids = ", ".join(str(w.pid) for w in pool.workers)
    print(f"purge-sensor: capturing on {', '.join(args.interface)} with {len(pool.workers)} workers "
          f"(pids {pids}); metrics on {sensor.settings.metrics}", file=sys.stderr, flush=True)
    report_kernel_filters(sensor, [worker.filters_in_kernel for worker in pool.workers])
    status = _StatusLine(args.status_interval)
    while not flags["stop"] and pool.failure is None and not pool.stopped_by_signal:
        if flags["reload"]:
            flags["reload"] = False
            if _reload(sensor, args):
                pool.replace_signatures(sensor.signatures)
        pool.poll(sensor, 0.2)
        if status.due():
            status.report(sensor)
    return EXIT_CAPTURE if pool.failure else EXIT_OK


def _record_drops(sensor, sources) -> None:
    for source in sources:
        _, dropped, ifdropped = source.drops()
        sensor.capture_drops[(source.interface, "kernel")] = dropped
        sensor.capture_drops[(source.interface, "interface")] = ifdropped


class _StatusLine:
    """The periodic status line, every --status-interval seconds of wall time; it also
    moves the sensor's clock on when the link is quiet, so summaries and inventories go out."""

    def __init__(self, interval: float):
        self.interval = interval
        self.next = time.monotonic() + interval
        self.packets = 0

    def due(self) -> bool:
        return time.monotonic() >= self.next

    def report(self, sensor) -> None:
        self.next = time.monotonic() + self.interval
        if sensor.last_ts:
            sensor.tick(max(sensor.last_ts, time.time()))
        rate = (sensor.stats.packets - self.packets) / self.interval
        self.packets = sensor.stats.packets
        _status(sensor, f"{rate:,.0f} pkt/s, ")


def _status(sensor, prefix: str) -> None:
    """The one-line status: what an operator tails to see the sensor keeps up."""
    drops = sensor.capture_drops
    kernel = sum(n for (_, kind), n in drops.items() if kind == "kernel")
    interface = sum(n for (_, kind), n in drops.items() if kind == "interface")
    hosts = sum(1 for h in sensor.host_snapshot if h.get("verdict") in INSTALL_VERDICTS)
    gaps, acks = sensor.capture_loss_interval()
    loss = f"{100.0 * gaps / acks:.2f}% ({gaps:,} of {acks:,} acks)" if acks else "n/a (no acks)"
    user_space = user_space_filters(sensor)
    filtering = f", filter in user space on {', '.join(user_space)}" if user_space else ""
    print(f"purge-sensor: {prefix}{sensor.stats.packets:,} packets, {kernel:,} dropped by kernel, "
          f"{interface:,} by interface, capture loss {loss}, {sensor.alerts:,} alerts, "
          f"{hosts} install hosts{filtering}", file=sys.stderr, flush=True)


def _reload(sensor, args) -> bool:
    from ..cli import _settings
    from ..detect.signatures import default_signature_paths, load_signatures
    from ..pipeline import SENSOR_START_ERRORS

    try:
        settings = _settings(args)
        signatures = load_signatures(settings.signatures or default_signature_paths())
    except SENSOR_START_ERRORS as err:
        print(f"purge-sensor: reload failed, keeping the old configuration: {err}",
              file=sys.stderr, flush=True)
        return False
    sensor.replace_signatures(signatures)
    sensor.reopen()
    print(f"purge-sensor: reloaded {len(signatures.signatures)} indicators "
          f"(version {signatures.version})", file=sys.stderr, flush=True)
    return True


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
    p.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                   help=f"capture and decode in N processes (1-{MAX_WORKERS}, default 1), one PACKET_FANOUT "
                        "group per interface with a symmetric flow hash; the main process keeps the "
                        "state, sinks and metrics")
    p.add_argument("--buffer-mb", type=int, default=64, metavar="MB",
                   help="kernel capture buffer per interface and worker (default 64)")
    p.add_argument("--status-interval", type=float, default=60.0, metavar="SECONDS",
                   help="period of the one-line status on stderr (default 60)")
    p.set_defaults(func=cmd_run)


def _worker_count(text: str) -> int:
    import argparse

    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_WORKERS}, not {text!r}")
    return count
