"""Alerts against a real rsyslogd over UDP, TCP (octet counting) and TLS (gtls), syslog and CEF.

Each test starts its own rsyslogd child with a config in tmp_path; every input writes
``%rawmsg%`` one per line to its own file, and the test parses every line back.
"""

import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import parse_cef
from sensor.output.ecs import detection_to_ecs
from sensor.output.sinks import AlertRouter, build_sinks
from sensor.records import Detection, DnsMessage, DnsQuestion, DomainName, PacketContext, Signature
from sensor.stats import Stats

RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None)
pytestmark = pytest.mark.skipif(RSYSLOGD is None, reason="rsyslogd is not installed")

SIG = Signature("ksp-update-1", "update", "strong", "suffix", "kaspersky.com", "test",
                "Kaspersky update servers")
HOSTILE_LABELS = [
    b"evil\n<13>1 2024-01-01T00:00:00Z forged purge-sensor - - - {\"event\":1}",
    b"cef\nCEF:0|x|y|1|2|3|10|act=forged",
    b'inj"] [forged@1 a="b"]',
    b"<script>alert(1)</script>",
    b"\x00\xff\xfe=|\\",
    b"dot.inside",
    b"\r\n\t",
]
TRANSPORTS = ("udp", "tcp", "tls")
FORMATS = ("syslog", "cef")


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_certificates(directory) -> dict:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "purge-sensor test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: str(directory / f"{name}.pem") for name in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as handle:
        handle.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    return paths


class Rsyslog:
    """rsyslogd -n as a child: one input per (format, transport), each to its own file."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.certs = make_certificates(tmp_path)
        self.ports = {(fmt, proto): free_port(socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
                      for fmt in FORMATS for proto in TRANSPORTS}
        (tmp_path / "work").mkdir()
        self.conf = tmp_path / "rsyslog.conf"
        self.conf.write_text(self._config())
        self.proc = None

    def _config(self) -> str:
        lines = [
            f'global(workDirectory="{self.dir}/work" maxMessageSize="64k"',
            f'       DefaultNetstreamDriverCAFile="{self.certs["ca"]}"',
            f'       DefaultNetstreamDriverCertFile="{self.certs["cert"]}"',
            f'       DefaultNetstreamDriverKeyFile="{self.certs["key"]}")',
            'module(load="imudp")',
            'module(load="imtcp")',
            'template(name="raw" type="string" string="%rawmsg%\\n")',
        ]
        for (fmt, proto), port in self.ports.items():
            name = f"{fmt}_{proto}"
            if proto == "udp":
                lines.append(f'input(type="imudp" address="127.0.0.1" port="{port}" ruleset="{name}")')
            elif proto == "tcp":
                lines.append(f'input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="{name}")')
            else:
                lines.append(f'input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="{name}" '
                             'streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")')
            lines.append(f'ruleset(name="{name}") {{ action(type="omfile" file="{self.path(fmt, proto)}" '
                         'template="raw") }')
        return "\n".join(lines) + "\n"

    def path(self, fmt, proto):
        return self.dir / f"{fmt}_{proto}.log"

    def spec(self, fmt, proto) -> str:
        spec = f"{fmt}+{proto}://127.0.0.1:{self.ports[(fmt, proto)]}"
        return spec + (f"?ca={self.certs['ca']}" if proto == "tls" else "")

    def start(self):
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.dir / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "rsyslogd.err", "ab"))
        deadline = time.monotonic() + 15
        pending = [port for (fmt, proto), port in self.ports.items() if proto != "udp"]
        while pending and time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "rsyslogd.err").read_text()
            try:
                socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.05)
        assert not pending, "rsyslogd did not open its ports"
        time.sleep(0.2)  # the UDP inputs start with the TCP ones; give them a moment

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def lines(self, fmt, proto) -> list[str]:
        path = self.path(fmt, proto)
        if not path.exists():
            return []
        return path.read_text(encoding="utf-8", errors="strict").splitlines()

    def wait_lines(self, fmt, proto, count, timeout=15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines(fmt, proto)
            if len(lines) >= count:
                return lines
            time.sleep(0.05)
        return self.lines(fmt, proto)


@pytest.fixture
def rsyslog(tmp_path):
    server = Rsyslog(tmp_path)
    server.start()
    yield server
    server.stop()


# -- parsing the received lines back ----------------------------------------------

HEADER = re.compile(r"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ")


def parse_rfc5424(line: str) -> tuple[list[str], str, dict, str]:
    match = HEADER.match(line)
    assert match, line
    i = match.end()
    assert line[i] == "["
    sd_id_end = line.index(" ", i)
    sd_id = line[i + 1:sd_id_end]
    params: dict = {}
    i = sd_id_end
    while line[i] == " ":
        eq = line.index("=", i)
        name = line[i + 1:eq]
        assert line[eq + 1] == '"'
        i = eq + 2
        value = []
        while line[i] != '"':
            if line[i] == "\\":
                value.append(line[i + 1])
                i += 2
            else:
                assert line[i] != "]"
                value.append(line[i])
                i += 1
        assert name not in params
        params[name] = "".join(value)
        i += 1
    assert line[i:i + 2] == "] ", line[i:i + 20]
    return list(match.groups()), sd_id, params, line[i + 2:]



def detections(count: int) -> list[Detection]:
    out = []
    for n in range(count):
        hostile = HOSTILE_LABELS[n % len(HOSTILE_LABELS)]
        name = DomainName((hostile, b"n%d" % n, b"kaspersky", b"com"))
        ctx = PacketContext(1700000000.0 + n, "10.0.0.5", "10.0.0.53", 40000 + n, 53, "udp")
        msg = DnsMessage(ctx, n, False, 0, 0, [DnsQuestion(name, 1, 1)], [])
        out.append(Detection(ctx.ts, "dns_query", "10.0.0.5", name.text, SIG, ctx, msg))
    return out


def documents(count: int) -> list[dict]:
    return [detection_to_ecs(d, observer="sensor-1", ruleset="kaspersky", version="1",
                             summary_count=None) for d in detections(count)]


def check_syslog_line(line: str, by_id: dict) -> str:
    header, sd_id, params, msg = parse_rfc5424(line)
    assert sd_id == "purge_sensor@32473"
    doc = json.loads(msg)
    sent = by_id[doc["event"]["id"]]
    assert doc == json.loads(json.dumps(sent))
    assert params["indicator"] == sent["purge_sensor"]["indicator"]
    assert params["action"] == "dns_query" and params["host"] == "10.0.0.5"
    assert header[2:5] == ["sensor-1", "purge-sensor", header[4]] and header[5] == "dns_query"
    return doc["event"]["id"]


def check_cef_line(line: str, by_id: dict) -> str:
    _, _, params, msg = parse_rfc5424(line)
    fields, extension = parse_cef(msg)
    assert fields[:5] == ["CEF:0", "Purge Sensor", "purge-sensor", fields[3], "ksp-update-1"]
    sent = by_id[extension["externalId"]]
    assert extension["cs1"] == params["indicator"] == sent["purge_sensor"]["indicator"]
    assert extension["dhost"] == sent["destination"]["domain"]
    assert extension["act"] == "dns_query" and extension["src"] == "10.0.0.5"
    return extension["externalId"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_alert_arrives_once_and_unforged(rsyslog, tmp_path, fmt):
    docs = documents(42)
    by_id = {d["event"]["id"]: d for d in docs}
    sinks = build_sinks([rsyslog.spec(fmt, proto) + ("&" if proto == "tls" else "?") + "hold=0.2"
                         for proto in TRANSPORTS], str(tmp_path / "spool"), Stats())
    router = AlertRouter(sinks, Stats())
    for doc in docs:
        router.emit(doc)
    router.close(timeout=20)
    check = check_syslog_line if fmt == "syslog" else check_cef_line
    for proto in TRANSPORTS:
        lines = rsyslog.wait_lines(fmt, proto, len(docs))
        time.sleep(0.3)
        lines = rsyslog.lines(fmt, proto)
        assert len(lines) == len(docs), (proto, len(lines))
        ids = [check(line, by_id) for line in lines]
        assert sorted(ids) == sorted(by_id), proto
        if proto != "udp":
            assert ids == [d["event"]["id"] for d in docs], f"{proto} order"
    stats = router.sink_stats()
    assert all(values["delivered"] == len(docs) for values in stats.values()), stats


@pytest.mark.parametrize("proto", ["tcp", "tls"])
def test_receiver_outage_loses_nothing(rsyslog, tmp_path, proto):
    """Stop rsyslog mid-stream, keep alerting (they spool), restart it on the same port:
    every alert arrives, in order.  Duplicates are allowed (at-least-once: messages sent
    within the hold time before the outage are replayed), so order is checked on first
    occurrence."""
    docs = documents(80)
    order = [d["event"]["id"] for d in docs]
    sinks = build_sinks([rsyslog.spec("syslog", proto)], str(tmp_path / "spool"), Stats())
    router = AlertRouter(sinks, Stats())
    for doc in docs[:30]:
        router.emit(doc)
    assert len(rsyslog.wait_lines("syslog", proto, 30)) >= 30
    rsyslog.stop()
    for doc in docs[30:]:
        router.emit(doc)
        time.sleep(0.002)
    deadline = time.monotonic() + 10
    while router.sink_stats()[sinks[0].name]["failed"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert router.sink_stats()[sinks[0].name]["failed"] > 0
    rsyslog.start()
    router.close(timeout=30)
    lines = rsyslog.wait_lines("syslog", proto, len(docs))
    by_id = {d["event"]["id"]: d for d in docs}
    ids = [check_syslog_line(line, by_id) for line in lines]
    assert list(dict.fromkeys(ids)) == order
    stats = router.sink_stats()[sinks[0].name]
    assert stats["spooled"] > 0 and stats["spool_dropped"] == 0


def test_spooled_alerts_are_delivered_after_a_restart_of_the_sensor(rsyslog, tmp_path):
    """Receiver down for the whole run: the alerts wait on disk and a new process sends them."""
    docs = documents(10)
    rsyslog.stop()
    spec = rsyslog.spec("cef", "tcp")
    first = AlertRouter(build_sinks([spec], str(tmp_path / "spool"), Stats()), Stats())
    for doc in docs:
        first.emit(doc)
    first.close(timeout=0.5)
    rsyslog.start()
    second = AlertRouter(build_sinks([spec], str(tmp_path / "spool"), Stats()), Stats())
    second.close(timeout=20)
    lines = rsyslog.wait_lines("cef", "tcp", len(docs))
    by_id = {d["event"]["id"]: d for d in docs}
    assert [check_cef_line(line, by_id) for line in lines] == [d["event"]["id"] for d in docs]
