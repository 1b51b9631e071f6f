"""Alert sinks and the router that fans documents out to them.

Local sinks (JSON-lines file, stdout) write synchronously: one ``write`` per line on an
``O_APPEND`` descriptor, so a tailer (Filebeat, Splunk forwarder) never sees half a line
and ``reopen`` after logrotate loses nothing.

Network sinks (syslog/CEF over UDP, TCP, TLS) never block the packet path.  ``send``
formats the message and appends it to a bounded in-memory queue; a sender thread delivers
it.  When the queue is full, or the spool already holds older messages, ``send`` appends
to the on-disk spool instead, so order is kept: everything in memory is older than
everything in the spool.

Delivery is at-least-once.  Syslog has no acknowledgement, so a message counts as
delivered only when the receiver's TCP has acknowledged it (SIOCOUTQ is empty) and it has
stayed that way for ``hold`` seconds without the receiver closing or resetting the
connection (a receiver killed right after its kernel acknowledged data loses that data;
the hold covers that).  On any failure the sender closes the connection, puts every
unconfirmed message back in front of the spool, reconnects with exponential backoff
(0.1 s doubling to 30 s) and delivers again from the spool, in order.  Messages sent in
the last ``hold`` seconds before an outage may therefore arrive twice; every document
carries a unique ``event.id`` for deduplication.  UDP has no acknowledgement at all: a
datagram counts as delivered once ``hold`` seconds (default 0.2) have passed without an
ICMP refusal (closed port, unreachable host) coming back on the socket; a refusal is a
failure like any other, so what was sent within the hold is spooled and sent again.  A
datagram lost without a refusal is lost.  The outage is logged once, and its end once a
message is confirmed again.

Spec syntax for ``build_sinks`` (``--output``):

* ``stdout`` or ``-``; ``file:PATH`` or a bare ``PATH``;
* ``syslog+udp://HOST[:514]``, ``syslog+tcp://HOST[:514]``, ``syslog+tls://HOST[:6514]``
  and the same with ``cef+`` for CEF in the syslog MSG;
* each network sink spools to ``<spool_dir>/<sink name with odd characters as _>``;
* options as a query string: ``ca``, ``cert``, ``key``, ``verify`` (default 1),
  ``server_name`` (TLS only); ``sd_id``, ``facility``, ``hostname``, ``queue`` (in-memory
  messages, default 1024), ``spool_max`` (bytes, K/M/G suffix, default 64M), ``fsync``
  (interval|always|never), ``hold`` (seconds, default 1 for TCP/TLS, 0.2 for UDP).
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading
import time
from typing import Callable, Protocol
from urllib.parse import parse_qsl, urlsplit

from ..stats import Stats
from .cef import cef_syslog_message
from .ecs import to_json_bytes
from .spool import FSYNC_POLICIES, Spool
from .syslog import (DEFAULT_FACILITY, DEFAULT_SD_ID, TcpTransport, UdpTransport,
                     ecs_syslog_message, facility_number, tls_context, validate_sd_id)


class _Log:
    """The output logger, imported on first use: ``logging`` is start-up time every read
    pays, and a sink that never fails never logs."""

    def __getattr__(self, name: str):
        import logging

        return getattr(logging.getLogger("purge_sensor.output"), name)


log = _Log()

BACKOFF_START = 0.1
BACKOFF_MAX = 30.0
CLOSING_RETRY = 0.2  # while closing, retry quickly until the deadline
CONNECT_GRACE = 5.0  # a connect or send in progress ends within its socket timeout
MAX_UNCONFIRMED = 4096  # messages sent but not yet confirmed; the sender waits beyond this
DEFAULT_QUEUE = 1024
DEFAULT_SPOOL_MAX = 64 * 1024 * 1024
DEFAULT_HOLD = 1.0
# UDP has no acknowledgement to wait for, only the ICMP refusal of a closed port or an
# unreachable host, which comes back within a round trip.
DEFAULT_UDP_HOLD = 0.2
DEFAULT_PORTS = {"udp": 514, "tcp": 514, "tls": 6514}
TLS_OPTIONS = {"ca", "cert", "key", "verify", "server_name"}
COMMON_OPTIONS = {"sd_id", "facility", "hostname", "queue", "spool_max", "fsync", "hold"}


class Sink(Protocol):
    name: str

    def send(self, doc: dict) -> None: ...

    def flush(self) -> None: ...

    def close(self, timeout: float = 10.0) -> None: ...

    def reopen(self) -> None: ...

    def stats(self) -> dict: ...


class JsonFileSink:
    """JSON lines, like Suricata's eve.json.  ``-`` is stdout."""

    def __init__(self, path: str):
        self.path = path
        self.name = "stdout" if path == "-" else f"file:{path}"
        self.delivered = 0
        self.failed = 0
        self._fd: int | None = None
        self._lock = threading.Lock()
        if path != "-":
            self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def send(self, doc: dict) -> None:
        line = to_json_bytes(doc) + b"\n"
        with self._lock:
            try:
                if self._fd is None:
                    sys.stdout.write(line.decode("ascii"))
                    sys.stdout.flush()
                else:
                    self._write_all(line)
                self.delivered += 1
            except (OSError, ValueError):
                self.failed += 1

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def flush(self) -> None:
        if self._fd is None:
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                self.failed += 1

    def reopen(self) -> None:
        """After logrotate moved the file (SIGHUP), continue in a new one at the same path."""
        if self.path == "-":
            return
        with self._lock:
            try:
                fresh = self._open()
            except OSError as exc:
                self.failed += 1
                log.warning("%s: cannot reopen: %s (still writing to the old file)", self.name, exc)
                return
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fresh

    def close(self, timeout: float = 10.0) -> None:
        self.flush()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def stats(self) -> dict:
        return {"queued": 0, "delivered": self.delivered, "failed": self.failed,
                "spooled": 0, "spool_dropped": 0, "spool_bytes": 0}


class _Sent:
    """A message on the wire but not yet confirmed."""

    __slots__ = ("payload", "token", "acked_at")

    def __init__(self, payload: bytes, token):
        self.payload = payload
        self.token = token  # spool commit token, None for a message that came from memory
        self.acked_at: float | None = None


class NetworkSink:
    """Queue + spool + sender thread in front of a syslog transport (see module docstring)."""

    def __init__(self, name: str, transport, formatter: Callable[[dict], bytes], spool: Spool,
                 queue_size: int = DEFAULT_QUEUE, hold: float = DEFAULT_HOLD):
        self.name = name
        self.transport = transport
        self.formatter = formatter
        self.spool = spool
        self.queue_size = max(1, queue_size)
        self.hold = hold
        self.delivered = 0
        self.failed = 0
        self.spooled = 0
        self._queue: collections.deque[bytes] = collections.deque()
        self._unconfirmed: collections.deque[_Sent] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._abort = False
        self._persisted = False
        self._backoff = BACKOFF_START
        self._outage_logged = False
        self._thread = threading.Thread(target=self._run, name=f"sink {name}", daemon=True)

    def start(self) -> "NetworkSink":
        self._thread.start()
        return self

    # -- packet path -------------------------------------------------------------

    def send(self, doc: dict) -> None:
        payload = self.formatter(doc)
        with self._lock:
            if self._persisted or self.spool.pending or len(self._queue) >= self.queue_size:
                self._spool_append(payload)
            else:
                self._queue.append(payload)
        self._wake.set()

    def _spool_append(self, payload: bytes) -> None:
        try:
            self.spool.append(payload)
            self.spooled += 1
        except OSError as exc:
            self.failed += 1
            log.error("%s: spool write failed, alert lost: %s", self.name, exc)

    # -- sender thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._abort:
                if not self.transport.connected:
                    if self._closing and self._idle():
                        break
                    if not self._connect():
                        self._pause()
                        continue
                try:
                    if not self._step():
                        break
                except OSError as exc:
                    self.failed += 1
                    log.error("%s: spool error: %s", self.name, exc)
                    self._pause()
        finally:
            self._persist()
            self.transport.close(graceful=True)

    def _idle(self) -> bool:
        with self._lock:
            return not self._queue and not self._unconfirmed and not self.spool.pending

    def _connect(self) -> bool:
        try:
            self.transport.connect()
        except OSError as exc:
            self.failed += 1
            if not self._outage_logged:
                log.warning("%s: cannot connect (%s); spooling and retrying", self.name, exc)
                self._outage_logged = True
            return False
        return True

    def _pause(self) -> None:
        delay = min(self._backoff, CLOSING_RETRY) if self._closing else self._backoff
        self._wake.wait(delay)
        self._wake.clear()
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _step(self) -> bool:
        """One unit of work on a live connection; False when the sink is done."""
        gone = self.transport.peer_closed()
        if gone:
            self._fail(None, gone)
            return True
        self._confirm()
        if len(self._unconfirmed) >= MAX_UNCONFIRMED:
            self._wake.wait(0.05)
            self._wake.clear()
            return True
        item = self._next()
        if item is None:
            if self._closing and self._idle():
                return False
            if not self._unconfirmed:
                self.spool.flush()
            self._wake.wait(0.05 if self._unconfirmed else 1.0)
            self._wake.clear()
            return True
        try:
            self.transport.send(item.payload)
        except OSError as exc:
            self._fail(item, str(exc) or type(exc).__name__)
            return True
        self._unconfirmed.append(item)
        if not self.hold and not self.transport.unacknowledged_bytes():
            self._confirm()
        return True

    def _next(self) -> _Sent | None:
        """Memory first: while the spool holds anything, ``send`` writes only there, so
        queued messages are always the older ones."""
        with self._lock:
            if self._queue:
                return _Sent(self._queue.popleft(), None)
        try:
            record = self.spool.read_next()
        except OSError as exc:
            self.failed += 1
            log.error("%s: spool read failed: %s", self.name, exc)
            return None
        return None if record is None else _Sent(record[0], record[1])

    def _confirm(self) -> None:
        unconfirmed = self._unconfirmed
        if not unconfirmed:
            return
        now = time.monotonic()
        if self.transport.unacknowledged_bytes() == 0:
            for entry in reversed(unconfirmed):
                if entry.acked_at is not None:
                    break
                entry.acked_at = now
        while unconfirmed and unconfirmed[0].acked_at is not None \
                and now - unconfirmed[0].acked_at >= self.hold:
            entry = unconfirmed.popleft()
            if entry.token is not None:
                self.spool.commit(entry.token)
            self.delivered += 1
            self._backoff = BACKOFF_START
            if self._outage_logged:
                # Said on a confirmed delivery, not on connecting: a UDP "connection" to a
                # closed port always succeeds, and logging it flapped twice a retry.
                log.warning("%s: delivering again; sending the spool", self.name)
                self._outage_logged = False

    def _fail(self, current: _Sent | None, reason: str) -> None:
        """Put everything unconfirmed back in front of the spool, in order, and reconnect."""
        self.failed += 1
        if not self._outage_logged:
            log.warning("%s: delivery failed (%s); spooling and reconnecting", self.name, reason)
            self._outage_logged = True
        self.transport.close()
        self._requeue(current)
        self._pause()

    def _requeue(self, current: _Sent | None) -> None:
        entries = list(self._unconfirmed) + ([current] if current is not None else [])
        self._unconfirmed.clear()
        with self._lock:
            memory = [e.payload for e in entries if e.token is None] + list(self._queue)
            self._queue.clear()
            try:
                if memory:
                    self.spool.prepend(memory)
                    self.spooled += len(memory)
                else:
                    self.spool.rewind()
            except OSError as exc:
                self.failed += len(memory)
                log.error("%s: spool write failed, %d alerts lost: %s", self.name, len(memory), exc)

    def _persist(self) -> None:
        """On exit, whatever is still in memory goes to the spool for the next start."""
        with self._lock:
            if self._persisted:
                return
        self._requeue(None)
        with self._lock:
            self._persisted = True
        try:
            self.spool.flush()
        except OSError as exc:
            log.error("%s: spool flush failed: %s", self.name, exc)

    # -- control -----------------------------------------------------------------

    def flush(self) -> None:
        self._wake.set()

    def reopen(self) -> None:
        """Nothing to reopen: connections are re-established on failure."""

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is pending for up to ``timeout`` seconds; the rest stays spooled."""
        self._closing = True
        self._wake.set()
        if not self._thread.is_alive():
            self._persist()
            self.spool.close()
            return
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            self._abort = True
            self._wake.set()
            self._thread.join(2 * CONNECT_GRACE)
        if not self._thread.is_alive():
            self.spool.close()

    def stats(self) -> dict:
        return {"queued": len(self._queue), "delivered": self.delivered, "failed": self.failed,
                "spooled": self.spooled, "spool_dropped": self.spool.dropped,
                "spool_bytes": self.spool.size_bytes}



class AlertRouter:
    """Fans each document out to every sink; a failing sink never affects the others."""

    def __init__(self, sinks: list[Sink], stats: Stats):
        self.sinks = list(sinks)
        self.stats = stats
        self._errors: collections.Counter = collections.Counter()
        self._dropped_seen: dict[str, int] = {}

    def emit(self, doc: dict) -> None:
        for sink in self.sinks:
            try:
                sink.send(doc)
            except (OSError, ValueError, TypeError, UnicodeError) as exc:
                self._errors[sink.name] += 1
                log.error("%s: cannot format or write alert: %s", sink.name, exc)

    def reopen(self) -> None:
        for sink in self.sinks:
            sink.reopen()

    def close(self, timeout: float = 10.0) -> None:
        """All sinks drain in parallel within one shared deadline."""
        for sink in self.sinks:
            sink.flush()
        closers = [threading.Thread(target=sink.close, kwargs={"timeout": timeout},
                                    name=f"close {sink.name}", daemon=True)
                   for sink in self.sinks]
        for closer in closers:
            closer.start()
        deadline = time.monotonic() + timeout + 2 * CONNECT_GRACE + 1.0
        for closer in closers:
            closer.join(max(0.0, deadline - time.monotonic()))
        self.sink_stats()

    def sink_stats(self) -> dict:
        """Per sink: queued, delivered, failed, spooled, spool_dropped, spool_bytes.  Spool
        drops are also added to ``stats.evictions["alert_spool"]``."""
        result = {}
        for sink in self.sinks:
            values = dict(sink.stats())
            values["failed"] = values.get("failed", 0) + self._errors[sink.name]
            dropped = values.get("spool_dropped", 0)
            new = dropped - self._dropped_seen.get(sink.name, 0)
            if new > 0:
                self.stats.evictions["alert_spool"] += new
                self._dropped_seen[sink.name] = dropped
            result[sink.name] = values
        return result


# -- specs ---------------------------------------------------------------------

_SIZE = re.compile(r"^(\d+)([kKmMgG]?)$")
_SIZE_FACTORS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def _parse_size(spec: str, key: str, value: str) -> int:
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"sink '{spec}': {key}={value} is not a size (e.g. 65536, 64M)")
    return int(match.group(1)) * _SIZE_FACTORS[match.group(2).lower()]


def _parse_bool(spec: str, key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"sink '{spec}': {key}={value} is not a boolean (1/0, true/false)")


def _parse_number(spec: str, key: str, value: str, kind=float):
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"sink '{spec}': {key}={value} is not a number") from None
    if number < 0 or number != number:
        raise ValueError(f"sink '{spec}': {key}={value} must not be negative")
    return number


def _spool_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def _file_readable(spec: str, key: str, path: str) -> str:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"sink '{spec}': {key} file '{path}' is not a readable file")
    return path


def _network_sink(spec: str, spool_dir: str) -> tuple[str, Callable[[], NetworkSink]]:
    """Validate a network spec; the sink (spool, thread) is made only when all specs are valid."""
    scheme, _, _ = spec.partition("://")
    fmt, _, proto = scheme.partition("+")
    try:
        parts = urlsplit(spec)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"sink '{spec}': {exc}") from None
    if not host:
        raise ValueError(f"sink '{spec}': missing host (e.g. {scheme}://127.0.0.1:514)")
    if parts.path not in ("", "/") or parts.fragment or parts.username:
        raise ValueError(f"sink '{spec}': expected {scheme}://HOST[:PORT][?options]")
    port = port or DEFAULT_PORTS[proto]
    options = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    allowed = COMMON_OPTIONS | (TLS_OPTIONS if proto == "tls" else set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"sink '{spec}': unknown option '{unknown[0]}' "
                         f"(known: {', '.join(sorted(allowed))})")
    name = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"

    sd_id = validate_sd_id(options.get("sd_id", DEFAULT_SD_ID))
    try:
        facility = facility_number(options.get("facility", DEFAULT_FACILITY))
    except ValueError as exc:
        raise ValueError(f"sink '{spec}': {exc}") from None
    hostname = options.get("hostname") or None
    base = ecs_syslog_message if fmt == "syslog" else cef_syslog_message

    def formatter(doc: dict) -> bytes:
        return base(doc, sd_id=sd_id, facility=facility, hostname=hostname)

    if proto == "udp":
        transport = UdpTransport(host, port)
    elif proto == "tcp":
        transport = TcpTransport(host, port)
    else:
        ca = options.get("ca") and _file_readable(spec, "ca", options["ca"])
        cert = options.get("cert") and _file_readable(spec, "cert", options["cert"])
        key = options.get("key") and _file_readable(spec, "key", options["key"])
        if key and not cert:
            raise ValueError(f"sink '{spec}': key given without cert")
        verify = _parse_bool(spec, "verify", options.get("verify", "1"))
        try:
            context = tls_context(ca or None, cert or None, key or None, verify)
        except OSError as exc:
            raise ValueError(f"sink '{spec}': cannot load TLS material: {exc}") from None
        transport = TcpTransport(host, port, context, options.get("server_name") or host)

    fsync = options.get("fsync", "interval")
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"sink '{spec}': fsync={fsync} (use {', '.join(FSYNC_POLICIES)})")
    spool_max = _parse_size(spec, "spool_max", options.get("spool_max", str(DEFAULT_SPOOL_MAX)))
    if spool_max < 4096:
        raise ValueError(f"sink '{spec}': spool_max must be at least 4096 bytes")
    queue_size = _parse_number(spec, "queue", options.get("queue", str(DEFAULT_QUEUE)), int)
    hold = _parse_number(spec, "hold", options.get(
        "hold", str(DEFAULT_UDP_HOLD if proto == "udp" else DEFAULT_HOLD)))

    def make() -> NetworkSink:
        try:
            spool = Spool(os.path.join(spool_dir, _spool_name(name)), max_bytes=spool_max,
                          fsync=fsync)
        except OSError as exc:
            raise ValueError(f"sink '{spec}': cannot use spool directory {spool_dir}: {exc}") from None
        return NetworkSink(name, transport, formatter, spool, queue_size=queue_size, hold=hold)

    return name, make


_NETWORK_SCHEMES = {f"{fmt}+{proto}" for fmt in ("syslog", "cef") for proto in ("udp", "tcp", "tls")}


def _file_sink(spec: str) -> tuple[str, Callable[[], JsonFileSink]]:
    path = spec[5:] if spec.startswith("file:") else spec
    if not path:
        raise ValueError(f"sink '{spec}': file: needs a path")

    def make() -> JsonFileSink:
        try:
            return JsonFileSink(path)
        except OSError as exc:
            raise ValueError(f"sink '{spec}': cannot open {path}: {exc.strerror}") from None

    return f"file:{path}", make


def build_sinks(specs: list[str], spool_dir: str, stats: Stats) -> list[Sink]:
    """Validate every spec before opening anything, so a bad one stops the start cleanly."""
    planned: list[tuple[str, Callable[[], Sink]]] = []
    for raw in specs:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"sink {raw!r}: empty sink specification")
        spec = raw.strip()
        if spec in ("stdout", "-"):
            plan: tuple[str, Callable[[], Sink]] = ("stdout", lambda: JsonFileSink("-"))
        elif "://" in spec:
            scheme = spec.partition("://")[0]
            if scheme not in _NETWORK_SCHEMES:
                raise ValueError(f"sink '{spec}': unknown scheme '{scheme}' (use stdout, file:PATH, "
                                 f"syslog+udp|tcp|tls://HOST:PORT or cef+udp|tcp|tls://HOST:PORT)")
            plan = _network_sink(spec, spool_dir)
        else:
            plan = _file_sink(spec)
        if any(name == plan[0] for name, _ in planned):
            raise ValueError(f"sink '{spec}': given twice")
        planned.append(plan)
    sinks: list[Sink] = []
    try:
        for _, make in planned:
            sinks.append(make())
    except ValueError:
        for sink in sinks:
            sink.close(timeout=0)
        raise
    for sink in sinks:
        if isinstance(sink, NetworkSink):
            sink.start()
    return sinks
