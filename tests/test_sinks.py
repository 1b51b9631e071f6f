"""Spool, file sink, spec parsing and the queued network sink (against a loopback receiver)."""

import json
import os
import socket
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from sensor.output.sinks import AlertRouter, JsonFileSink, NetworkSink, build_sinks
from sensor.output.spool import Spool
from sensor.output.syslog import TcpTransport, UdpTransport, ecs_syslog_message
from sensor.stats import Stats


def doc(n: int) -> dict:
    return {"@timestamp": "2024-01-01T00:00:00.000000Z", "observer": {"name": "s1"},
            "event": {"action": "dns_query", "severity": 73, "id": str(n)},
            "host": {"ip": "10.0.0.5"}, "rule": {"id": "r1", "category": "update"},
            "purge_sensor": {"indicator": f"n{n}.kaspersky.com"}, "seq": n}


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- spool ---------------------------------------------------------------------

def drain(spool: Spool) -> list[bytes]:
    out = []
    while (record := spool.read_next()) is not None:
        out.append(record[0])
        spool.commit(record[1])
    return out


def test_spool_fifo_commit_and_rewind(tmp_path):
    spool = Spool(str(tmp_path), max_bytes=1 << 20)
    for i in range(5):
        spool.append(b"m%d" % i)
    first = spool.read_next()
    second = spool.read_next()
    assert (first[0], second[0]) == (b"m0", b"m1")
    spool.commit(first[1])
    assert spool.pending == 4
    spool.rewind()
    assert drain(spool) == [b"m1", b"m2", b"m3", b"m4"]
    assert spool.pending == 0


def test_spool_prepend_goes_in_front(tmp_path):
    spool = Spool(str(tmp_path), max_bytes=1 << 20)
    spool.append(b"c")
    spool.read_next()
    spool.prepend([b"a", b"b"])
    assert drain(spool) == [b"a", b"b", b"c"]


def test_spool_survives_restart_including_cursor(tmp_path):
    spool = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1024)
    for i in range(100):
        spool.append(b"record-%03d" % i)
    for _ in range(30):
        spool.commit(spool.read_next()[1])
    spool.close()
    again = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1024)
    assert again.pending == 70
    assert drain(again) == [b"record-%03d" % i for i in range(30, 100)]


def test_spool_cap_drops_oldest_and_counts(tmp_path):
    spool = Spool(str(tmp_path), max_bytes=8192, segment_bytes=1024)
    for i in range(1000):
        spool.append(b"%04d" % i + b"x" * 60)
    assert spool.size_bytes <= 8192
    kept = drain(spool)
    assert spool.dropped + len(kept) == 1000
    assert kept[-1].startswith(b"0999")
    assert [int(k[:4]) for k in kept] == list(range(1000 - len(kept), 1000))


def test_spool_cuts_a_torn_tail_on_restart(tmp_path):
    spool = Spool(str(tmp_path), max_bytes=1 << 20)
    spool.append(b"good")
    spool.append(b"also good")
    spool.close()
    segment = next(p for p in tmp_path.iterdir() if p.suffix == ".seg")
    with open(segment, "ab") as handle:
        handle.write(b"\x00\x00\x00\x40torn")
    again = Spool(str(tmp_path), max_bytes=1 << 20)
    assert drain(again) == [b"good", b"also good"]
    again.append(b"after")
    assert drain(again) == [b"after"]


def test_spool_detects_a_flipped_bit(tmp_path):
    spool = Spool(str(tmp_path), max_bytes=1 << 20)
    spool.append(b"first")
    spool.append(b"second")
    spool.close()
    segment = next(p for p in tmp_path.iterdir() if p.suffix == ".seg")
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0x01
    segment.write_bytes(bytes(data))
    again = Spool(str(tmp_path), max_bytes=1 << 20)
    assert drain(again) == [b"first"]
    assert again.dropped == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=300), st.sampled_from(["read", "commit", "rewind"])),
                max_size=80))
def test_spool_matches_a_queue_model(tmp_path_factory, ops):
    spool = Spool(str(tmp_path_factory.mktemp("spool")), max_bytes=1 << 20, segment_bytes=1024)
    model, read, tokens = [], 0, []
    for op in ops:
        if isinstance(op, bytes):
            spool.append(op)
            model.append(op)
        elif op == "read":
            record = spool.read_next()
            if read < len(model):
                assert record[0] == model[read]
                tokens.append(record[1])
                read += 1
            else:
                assert record is None
        elif op == "commit" and tokens:
            spool.commit(tokens.pop(0))
            model.pop(0)
            read -= 1
        elif op == "rewind":
            spool.rewind()
            tokens, read = [], 0
        assert spool.pending == len(model)
    spool.rewind()
    assert drain(spool) == model
    spool.close()


# -- file sink -------------------------------------------------------------------

def test_file_sink_appends_lines_and_reopens_after_rotation(tmp_path):
    path = tmp_path / "alerts.json"
    sink = JsonFileSink(str(path))
    sink.send(doc(1))
    os.rename(path, tmp_path / "alerts.json.1")
    sink.send(doc(2))
    sink.reopen()
    sink.send(doc(3))
    sink.close()
    rotated = (tmp_path / "alerts.json.1").read_text().splitlines()
    fresh = path.read_text().splitlines()
    assert [json.loads(x)["seq"] for x in rotated] == [1, 2]
    assert [json.loads(x)["seq"] for x in fresh] == [3]
    assert sink.stats()["delivered"] == 3


def test_stdout_sink(capsys):
    sink = JsonFileSink("-")
    sink.send({"a": "line\nbreak"})
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out)["a"] == "line\nbreak"


def test_router_fans_out_and_isolates_a_failing_sink(tmp_path):
    class Broken:
        name = "broken"

        def send(self, doc):
            raise OSError("disk full")

        def flush(self): pass

        def close(self, timeout=10.0): pass

        def reopen(self): pass

        def stats(self):
            return {"delivered": 0, "failed": 0}

    good = JsonFileSink(str(tmp_path / "a.json"))
    router = AlertRouter([Broken(), good], Stats())
    router.emit(doc(1))
    router.close(timeout=1)
    stats = router.sink_stats()
    assert stats["broken"]["failed"] == 1
    assert stats[good.name]["delivered"] == 1


# -- specs ------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("http://x", "unknown scheme"),
    ("syslog+tcp://", "missing host"),
    ("syslog+tcp://127.0.0.1:99999", "out of range"),
    ("syslog+tcp://127.0.0.1:514?ca=/x", "unknown option 'ca'"),
    ("syslog+udp://127.0.0.1?bogus=1", "unknown option 'bogus'"),
    ("syslog+tls://127.0.0.1?ca=/nonexistent/ca.pem", "not a readable file"),
    ("syslog+tcp://127.0.0.1?facility=local9", "unknown syslog facility"),
    ("syslog+tcp://127.0.0.1?sd_id=noat", "structured-data id"),
    ("syslog+tcp://127.0.0.1?spool_max=lots", "not a size"),
    ("syslog+tcp://127.0.0.1?fsync=sometimes", "fsync"),
    ("file:", "needs a path"),
    ("", "empty"),
])
def test_bad_specs_are_rejected_clearly(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        build_sinks([spec], str(tmp_path / "spool"), Stats())


def test_duplicate_and_valid_specs(tmp_path):
    with pytest.raises(ValueError, match="given twice"):
        build_sinks(["stdout", "-"], str(tmp_path), Stats())
    sinks = build_sinks(["stdout", f"file:{tmp_path}/a.json", str(tmp_path / "b.json"),
                         "syslog+udp://127.0.0.1:9?facility=local3",
                         "cef+tcp://[::1]:9?queue=10&spool_max=1M&hold=0"],
                        str(tmp_path / "spool"), Stats())
    try:
        assert [s.name for s in sinks] == ["stdout", f"file:{tmp_path}/a.json",
                                           f"file:{tmp_path}/b.json", "syslog+udp://127.0.0.1:9",
                                           "cef+tcp://[::1]:9"]
    finally:
        AlertRouter(sinks, Stats()).close(timeout=0.5)


# -- network sink -------------------------------------------------------------------

class OctetReceiver:
    """A loopback syslog receiver with octet-counting framing that can be stopped and
    restarted on the same port."""

    def __init__(self, port: int = 0):
        self.messages: list[bytes] = []
        self.port = port
        self._listener = None
        self._stop = threading.Event()
        self._threads = []
        self.start()

    def start(self):
        self._stop.clear()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads = [thread]

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._read, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, conn):
        conn.settimeout(0.1)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b" " in buf:
                    length, _, rest = buf.partition(b" ")
                    if len(rest) < int(length):
                        break
                    self.messages.append(rest[:int(length)])
                    buf = rest[int(length):]

    def stop(self):
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(2)


def sequence(messages: list[bytes]) -> list[int]:
    return [json.loads(m.split(b"] ", 1)[1])["seq"] for m in messages]


def make_sink(tmp_path, port, **kw):
    return NetworkSink("syslog+tcp://test", TcpTransport("127.0.0.1", port), ecs_syslog_message,
                       Spool(str(tmp_path / "spool"), max_bytes=1 << 20), **kw).start()


def test_tcp_sink_delivers_in_order_with_octet_counting(tmp_path):
    receiver = OctetReceiver()
    sink = make_sink(tmp_path, receiver.port, hold=0.05)
    for i in range(200):
        sink.send(doc(i))
    sink.close(timeout=10)
    receiver.stop()
    assert sequence(receiver.messages) == list(range(200))
    assert sink.stats()["delivered"] == 200


def test_emit_never_blocks_and_a_dead_destination_spools(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sink = make_sink(tmp_path, port, queue_size=4)
    started = time.monotonic()
    for i in range(50):
        sink.send(doc(i))
    assert time.monotonic() - started < 2.0
    sink.close(timeout=0.5)
    stats = sink.stats()
    assert stats["delivered"] == 0 and stats["failed"] >= 1
    assert Spool(str(tmp_path / "spool"), max_bytes=1 << 20).pending == 50

    receiver = OctetReceiver(port)
    again = make_sink(tmp_path, port, hold=0.05)
    again.close(timeout=10)
    receiver.stop()
    assert sequence(receiver.messages) == list(range(50))


def test_outage_loses_nothing_and_keeps_order(tmp_path):
    receiver = OctetReceiver()
    sink = make_sink(tmp_path, receiver.port, hold=0.3, queue_size=8)
    for i in range(20):
        sink.send(doc(i))
    assert wait_for(lambda: len(receiver.messages) >= 20)
    receiver.stop()
    for i in range(20, 60):
        sink.send(doc(i))
        time.sleep(0.005)
    assert wait_for(lambda: sink.stats()["failed"] >= 1)
    receiver.start()
    sink.close(timeout=15)
    receiver.stop()
    got = sequence(receiver.messages)
    first_seen = list(dict.fromkeys(got))
    assert first_seen == list(range(60))
    assert sink.stats()["spooled"] > 0


def test_udp_sink_sends_one_datagram_per_alert(tmp_path):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    sink = NetworkSink("syslog+udp://test", UdpTransport("127.0.0.1", server.getsockname()[1]),
                       ecs_syslog_message, Spool(str(tmp_path / "spool"), max_bytes=1 << 20)).start()
    for i in range(10):
        sink.send(doc(i))
    sink.close(timeout=5)
    received = [server.recv(65536) for _ in range(10)]
    server.close()
    assert sequence(received) == list(range(10))
    assert all(m.startswith(b"<132>1 2024-01-01T00:00:00.000000Z s1 purge-sensor ") for m in received)


def test_udp_sink_keeps_what_a_closed_port_refused(tmp_path, caplog):
    """A closed UDP port answers with ICMP, which the next send (or the hold) sees: the
    refused datagrams stay spooled instead of counting as delivered, the outage is logged
    once (a UDP "connection" always succeeds, and logging each reconnect flapped), and a
    receiver that comes up later gets every alert, in order."""
    import logging

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on the port now: the kernel refuses it
    spool_dir = str(tmp_path / "spool")
    with caplog.at_level(logging.WARNING, logger="purge_sensor.output"):
        sink = NetworkSink("syslog+udp://test", UdpTransport("127.0.0.1", port), ecs_syslog_message,
                           Spool(spool_dir, max_bytes=1 << 20), hold=0.2).start()
        for i in range(10):
            sink.send(doc(i))
        sink.close(timeout=1.5)
    assert sink.stats()["delivered"] == 0
    outage = [r for r in caplog.records if "syslog+udp://test" in r.getMessage()]
    assert len(outage) == 1 and "refused" in outage[0].getMessage()

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", port))
    server.settimeout(5)
    again = NetworkSink("syslog+udp://test", UdpTransport("127.0.0.1", port), ecs_syslog_message,
                        Spool(spool_dir, max_bytes=1 << 20), hold=0.2).start()
    again.close(timeout=5)
    received = [server.recv(65536) for _ in range(10)]
    server.close()
    assert sequence(received) == list(range(10))
    assert again.stats()["delivered"] == 10
