"""Prometheus exporter.

A custom collector reads the sensor's counters at scrape time, so the packet path never
touches prometheus_client objects.  Host gauges come from a snapshot the main thread
refreshes (the SQLite store belongs to that thread).  Binds 127.0.0.1 unless told
otherwise; optional TLS and HTTP basic auth (PBKDF2-hashed password, see
``purge-sensor metrics-password``), which prometheus_client itself does not offer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import platform
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from .. import __version__

INSTALL_VERDICTS = ("install", "management_server", "oem_engine")
PBKDF2_ITERATIONS = 200_000


def hash_password(password: str, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2-sha256${iterations}${salt.hex()}${digest.hex()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, iterations, salt, digest = encoded.split("$")
        if scheme != "pbkdf2-sha256":
            return False
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


def parse_listen(addr: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT``; the host defaults to 127.0.0.1."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", addr
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad metrics address '{addr}': expected [HOST:]PORT")
    return host, int(port)


class SensorCollector:
    def __init__(self, sensor, host_cap: int = 1000):
        self.sensor = sensor
        self.host_cap = host_cap

    def collect(self):
        sensor = self.sensor
        s = sensor.stats
        yield _counter("packets", "Packets seen on the capture.", s.packets)
        yield _counter("bytes", "Bytes seen on the capture (wire length).", s.bytes)
        yield _counter("decoded_packets", "Packets that reached the IP layer.", s.decoded)
        yield _counter("duplicate_packets", "Span duplicates suppressed.", s.duplicates)
        yield _counter("shunted_flows", "TCP uploads whose later segments read leaves to the "
                       "capture filter.", s.shunted_flows)
        yield _counter("dns_servers_screened", "DNS servers whose messages naming no signature label "
                       "read leaves to the capture filter.", s.dns_servers_screened)
        yield _counter("alerts", "Alert documents sent to the sinks.", sensor.alerts)
        yield _counter("hosts_detected", "Hosts that reached an install-type verdict (host_detected alerts).",
                       sensor.hosts_detected)
        if sensor.settings.removal_start:
            yield GaugeMetricFamily("purge_sensor_removal_start_timestamp_seconds",
                                    "Configured date removal began (BOD 17-01).",
                                    value=_date_seconds(sensor.settings.removal_start))
        yield _labelled(CounterMetricFamily, "decode_errors", "Malformed input by reason.",
                        ["reason"], {(k,): v for k, v in dict(s.malformed).items()})
        yield _labelled(CounterMetricFamily, "detections", "Detections by action and category.",
                        ["action", "category"], dict(s.detections))
        yield _labelled(GaugeMetricFamily, "table_entries", "Current size of each state table.",
                        ["table"], {(k,): v for k, v in dict(s.table_sizes).items()})
        # Every known table gets a series from the first scrape, so rate() works before the first eviction.
        evictions = dict.fromkeys(s.table_sizes, 0)
        evictions.update(s.evictions)
        yield _labelled(CounterMetricFamily, "table_evictions", "Entries evicted by each table's cap.",
                        ["table"], {(k,): v for k, v in evictions.items()})
        yield from self._sinks()
        yield from self._capture()
        yield from self._hosts()
        sigs = sensor.signatures
        yield InfoMetricFamily("purge_sensor_build", "Build information.",
                               value={"version": __version__,
                                      "python": platform.python_version()})
        yield InfoMetricFamily("purge_sensor_signatures", "Loaded signature set.",
                               value={"ruleset": sigs.ruleset, "version": str(sigs.version)})
        yield GaugeMetricFamily("purge_sensor_signatures_loaded_timestamp_seconds",
                                "When the signature set was loaded.", value=sigs.loaded_at)
        yield GaugeMetricFamily("purge_sensor_signatures_indicators",
                                "Indicators in the loaded signature set.",
                                value=len(sigs.signatures))

    def _sinks(self):
        names = {"queued": ("alert_queue_depth", GaugeMetricFamily, "Alerts waiting in memory per sink."),
                 "delivered": ("alerts_delivered", CounterMetricFamily, "Alerts delivered per sink."),
                 "failed": ("alert_delivery_failures", CounterMetricFamily, "Failed delivery attempts per sink."),
                 "spooled": ("alerts_spooled", CounterMetricFamily, "Alerts written to the on-disk spool per sink."),
                 "spool_dropped": ("alerts_spool_dropped", CounterMetricFamily, "Alerts dropped because the spool was full."),
                 "spool_bytes": ("alert_spool_bytes", GaugeMetricFamily, "Bytes in the on-disk spool per sink.")}
        per_sink = self.sensor.router.sink_stats()
        for key, (name, cls, doc) in names.items():
            fam = cls("purge_sensor_" + name, doc, labels=["sink"])
            for sink, values in sorted(per_sink.items()):
                if key in values:
                    fam.add_metric([sink], values[key])
            yield fam

    def _capture(self):
        fam = CounterMetricFamily("purge_sensor_capture_drops", "Packets the capture source reports as dropped.",
                                  labels=["interface", "kind"])
        for (iface, kind), n in sorted(getattr(self.sensor, "capture_drops", {}).items()):
            fam.add_metric([iface, kind], n)
        yield fam
        # 0: the kernel refused the filter and libpcap runs it in user space (live capture).
        fam = GaugeMetricFamily("purge_sensor_capture_filter_in_kernel",
                                "1 when the kernel runs the capture filter, 0 when libpcap runs it in user space.",
                                labels=["interface"])
        for iface, in_kernel in sorted(getattr(self.sensor, "capture_filter_in_kernel", {}).items()):
            fam.add_metric([iface], int(in_kernel))
        yield fam
        # Zeek's capture_loss: the share of acknowledgements that covered bytes never seen,
        # rate(gaps) / rate(acks), is loss upstream of the sensor (span port, TAP, NIC).
        loss = self.sensor.stats.capture_loss
        yield _counter("capture_loss_acks", "TCP acknowledgements of client data judged for capture loss.",
                       loss["acks"])
        yield _counter("capture_loss_gaps", "Judged acknowledgements that covered bytes the sensor never saw.",
                       loss["gaps"])
        yield _counter("capture_loss_acked_bytes", "Client bytes covered by judged acknowledgements.",
                       loss["acked_bytes"])
        yield _counter("capture_loss_gap_bytes", "Acknowledged client bytes the sensor never saw.",
                       loss["gap_bytes"])

    def _hosts(self):
        snapshot = list(self.sensor.host_snapshot)
        fam = GaugeMetricFamily("purge_sensor_hosts", "Inventory hosts by verdict and activity state.",
                                labels=["verdict", "state"])
        counts: dict = {}
        for host in snapshot:
            key = (host.get("verdict") or "none", host.get("state") or "unknown")
            counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            fam.add_metric(list(key), n)
        yield fam
        installs = [h for h in snapshot if h.get("verdict") in INSTALL_VERDICTS]
        fam = GaugeMetricFamily("purge_sensor_install_hosts_by_category",
                                "Install-type hosts with evidence in each signature category.",
                                labels=["verdict", "category", "state"])
        counts = {}
        for host in installs:
            for category in host.get("categories") or ():
                key = (host["verdict"], category, host.get("state") or "unknown")
                counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            fam.add_metric(list(key), n)
        yield fam
        installs.sort(key=lambda h: h.get("last_seen_ts") or 0, reverse=True)
        fam = GaugeMetricFamily("purge_sensor_install_last_seen_timestamp_seconds",
                                "Last evidence time of each host with an install-type verdict (capped).",
                                labels=["ip", "hostname", "verdict"])
        for host in installs[: self.host_cap]:
            fam.add_metric([host.get("ip") or "", host.get("hostname") or "", host["verdict"]],
                           float(host.get("last_seen_ts") or 0))
        yield fam
        yield _counter("install_series_dropped", "Install hosts left out of the per-host series by the cap.",
                       max(0, len(installs) - self.host_cap))


def _date_seconds(day: str) -> float:
    from datetime import datetime, timezone

    return datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp()


def _labelled(cls, name: str, doc: str, labels: list[str], values: dict):
    fam = cls("purge_sensor_" + name, doc, labels=labels)
    for key, n in sorted(values.items()):
        fam.add_metric(list(key), n)
    return fam


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily("purge_sensor_" + name, doc, value=value)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def _with_basic_auth(app, user: str, encoded: str):
    expected_user = user.encode()

    def wrapped(environ, start_response):
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header.startswith("Basic "):
            try:
                name, _, password = base64.b64decode(header[6:]).partition(b":")
            except ValueError:
                name, password = b"", b""
            if hmac.compare_digest(name, expected_user) and verify_password(
                    password.decode("utf-8", "replace"), encoded):
                return app(environ, start_response)
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="purge-sensor"'),
                                            ("Content-Type", "text/plain")])
        return [b"unauthorized\n"]

    return wrapped


class MetricsServer:
    def __init__(self, httpd, thread):
        self.httpd = httpd
        self.thread = thread

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_metrics(settings, sensor) -> MetricsServer:
    host, port = parse_listen(settings.metrics)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SensorCollector(sensor, settings.metrics_host_cap))
    app = make_wsgi_app(registry)
    if settings.metrics_basic_auth_user or settings.metrics_basic_auth_hash:
        if not (settings.metrics_basic_auth_user and settings.metrics_basic_auth_hash):
            raise ValueError("metrics basic auth needs both basic_auth_user and basic_auth_hash")
        if not settings.metrics_basic_auth_hash.startswith("pbkdf2-sha256$"):
            raise ValueError("metrics basic_auth_hash must come from 'purge-sensor metrics-password'")
        app = _with_basic_auth(app, settings.metrics_basic_auth_user, settings.metrics_basic_auth_hash)

    class Server(ThreadingWSGIServer):
        address_family = __import__("socket").AF_INET6 if ":" in host else __import__("socket").AF_INET

    httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
    if settings.metrics_tls_cert or settings.metrics_tls_key:
        if not (settings.metrics_tls_cert and settings.metrics_tls_key):
            raise ValueError("metrics TLS needs both tls_cert and tls_key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(settings.metrics_tls_cert, settings.metrics_tls_key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)
