"""TCP stream buffering through the real decoder: segments out of order, retransmitted,
overlapping, missing SYN, HTTP keep-alive, DNS over TCP, and the caps."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, Ether, Raw

from sensor.decode.packet import DecoderConfig, PacketDecoder
from sensor.decode.tcp_stream import StreamTable, may_open_client_stream
from sensor.records import ClientHello, DnsMessage, HttpRequest
from sensor.stats import Stats
from tests.test_decode_tls import default_extensions, hello_message, key_share_ext, records

CLIENT, SERVER = "10.0.0.7", "192.0.2.80"
ISN = 0xFFFFF000  # close to wrap-around on purpose


def seg(payload=b"", seq=ISN + 1, flags="PA", sport=50000, dport=443, src=CLIENT, dst=SERVER):
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, seq=seq % (1 << 32),
                                                      flags=flags) / Raw(payload))


def big_hello(name=b"s07.upd.kaspersky.com") -> bytes:
    ext = default_extensions(name) + key_share_ext([(0x11EC, 1216)])
    return records(hello_message(extensions=ext))


def run(frames):
    dec = PacketDecoder(Stats(), DecoderConfig(dedup_window=0))
    out = []
    for i, frame in enumerate(frames):
        out += dec.decode(1.0 + i * 0.001, 1, frame)
    return out, dec


def split(data: bytes, sizes):
    parts, pos = [], 0
    for size in sizes:
        parts.append((pos, data[pos:pos + size]))
        pos += size
    parts.append((pos, data[pos:]))
    return [p for p in parts if p[1]]


def hellos(out):
    return [r for r in out if isinstance(r, ClientHello)]


def test_hello_in_three_segments_out_of_order_with_retransmission():
    stream = big_hello()
    parts = split(stream, [600, 700])
    frames = [seg(flags="S", seq=ISN)]
    order = [parts[2], parts[0], parts[2], parts[1], parts[0]]
    frames += [seg(data, ISN + 1 + off) for off, data in order]
    out, dec = run(frames)
    found = hellos(out)
    assert len(found) == 1 and found[0].server_name.text == "s07.upd.kaspersky.com"
    assert not dec.streams.streams  # done: the flow is bypassed
    assert dec.stats.table_sizes.get("tcp_streams", 0) == 0


def test_overlapping_segments_with_different_boundaries():
    stream = big_hello()
    frames = [seg(flags="S", seq=ISN), seg(stream[:900], ISN + 1), seg(stream[500:1400], ISN + 501),
              seg(stream[1200:], ISN + 1201)]
    assert len(hellos(run(frames)[0])) == 1


def test_missing_syn_and_later_segment_first():
    stream = big_hello()
    first, second = stream[:1000], stream[1000:]
    out, _ = run([seg(second, ISN + 1001), seg(first, ISN + 1)])
    assert [h.server_name.text for h in hellos(out)] == ["s07.upd.kaspersky.com"]


def test_server_direction_and_bulk_are_bypassed_after_first_segment():
    server_hello = b"\x16\x03\x03\x00\x30\x02" + b"\x00" * 0x2F
    frames = [seg(flags="SA", seq=5000, sport=443, dport=50000, src=SERVER, dst=CLIENT),
              seg(server_hello, 5001, sport=443, dport=50000, src=SERVER, dst=CLIENT)]
    frames += [seg(b"\x17\x03\x03" + b"x" * 1000, 5001 + 53 + i * 1003, sport=443, dport=50000,
                   src=SERVER, dst=CLIENT) for i in range(50)]
    out, dec = run(frames)
    assert not hellos(out) and not dec.streams.streams
    assert (SERVER.encode() and len(dec.streams.bypass)) == 1


def test_a_stream_first_seen_at_a_server_flight_is_bypassed_at_once():
    """A handshake record that holds no ClientHello cannot open a client's stream: no probe
    buffer is kept for it, while a record that opens a ClientHello, or is too short to
    tell, is kept until it can be judged."""
    server_hello = b"\x16\x03\x03\x00\x30\x02" + b"\x00" * 0x2F
    server = dict(sport=443, dport=50000, src=SERVER, dst=CLIENT)
    _, dec = run([seg(server_hello, 5001, **server)])
    assert not dec.streams.streams and len(dec.streams.bypass) == 1
    for opening in (big_hello()[:1000], server_hello[:5]):
        _, dec = run([seg(opening, 5001, **server)])
        assert len(dec.streams.streams) == 1 and not dec.streams.bypass


def test_http_keep_alive_requests_are_all_seen():
    reqs = (b"GET /index/u0607g.xml HTTP/1.1\r\nHost: dnl-03.geo.kaspersky.com\r\n\r\n"
            b"POST /x HTTP/1.1\r\nHost: dnl-04.geo.kaspersky.com\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /bases/av/kdb/i386/dailyc.kdc HTTP/1.1\r\nHost: dnl-05.geo.kaspersky.com\r\n\r\n")
    frames = [seg(flags="S", seq=ISN, dport=80)]
    frames += [seg(data, ISN + 1 + off, dport=80) for off, data in split(reqs, [70, 90])]
    out, _ = run(frames)
    hosts = [r.host.text for r in out if isinstance(r, HttpRequest)]
    assert hosts == ["dnl-03.geo.kaspersky.com", "dnl-04.geo.kaspersky.com", "dnl-05.geo.kaspersky.com"]


def _dns_wire(name: str, ident: int) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    msg = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01"
    return struct.pack("!H", len(msg)) + msg


def test_dns_over_tcp_two_messages_per_segment_and_split_message_out_of_order():
    stream = _dns_wire("s01.upd.kaspersky.com", 1) + _dns_wire("s02.upd.kaspersky.com", 2) + \
        _dns_wire("s03.upd.kaspersky.com", 3)
    cut = len(_dns_wire("s01.upd.kaspersky.com", 1)) * 2 + 10
    frames = [seg(flags="S", seq=ISN, dport=53), seg(stream[cut:], ISN + 1 + cut, dport=53),
              seg(stream[:cut], ISN + 1, dport=53)]
    out, _ = run(frames)
    names = [q.name.text for r in out if isinstance(r, DnsMessage) for q in r.questions]
    assert names == ["s01.upd.kaspersky.com", "s02.upd.kaspersky.com", "s03.upd.kaspersky.com"]


def test_stream_table_caps_and_counts_evictions():
    stats = Stats()
    table = StreamTable(stats, max_streams=100)
    for i in range(1000):
        table.syn((b"k", i), 1, 1.0, False)
        table.segment((b"k", i), 2, b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc", 1.0, False)
    assert len(table.streams) <= 100 and stats.evictions["tcp_streams"] >= 900


def test_idle_streams_expire():
    stats = Stats()
    table = StreamTable(stats, idle_timeout=10)
    table.syn(("a",), 1, 1.0, False)
    table.segment(("a",), 2, b"\x16\x03\x01\x40\x00\x01", 1.0, False)
    table.expire(100.0)
    assert not table.streams and stats.evictions["tcp_streams_idle"] == 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.binary(min_size=1, max_size=400)), max_size=12),
       st.randoms())
def test_random_segments_never_raise_and_stay_bounded(pieces, rnd):
    stream = big_hello()
    frames = [seg(flags="S", seq=ISN)]
    for off, junk in pieces:
        frames.append(seg(junk if rnd.random() < 0.5 else stream[off:off + len(junk)], ISN + 1 + off))
    out, dec = run(frames)
    assert dec.streams.bytes >= 0
    assert len(dec.streams.streams) <= 1


def test_http_update_path_on_a_lookalike_host_is_not_evidence():
    from sensor.detect.engine import Detector
    from sensor.detect.signatures import default_signature_paths, load_signatures

    detector = Detector(load_signatures(default_signature_paths()), Stats())
    req = b"GET /index/u0607g.xml HTTP/1.1\r\nHost: %s\r\n\r\n"
    found = {}
    for host in (b"notkaspersky.com", b"dnl-03.geo.kaspersky.com", b"10.10.0.20"):
        out, _ = run([seg(flags="S", seq=ISN, dport=80), seg(req % host, ISN + 1, dport=80)])
        found[host] = [d.signature.id for r in out for d in detector.detect(r)]
    assert found[b"notkaspersky.com"] == []
    assert found[b"dnl-03.geo.kaspersky.com"] and found[b"10.10.0.20"]


_NO_HELLO_RECORDS = st.binary(min_size=6, max_size=40).map(
    lambda b: b"\x16" + b[1:5] + bytes([b[5] if b[5] != 1 else 2]) + b[6:])


@given(_NO_HELLO_RECORDS)
@settings(max_examples=300)
def test_a_handshake_record_holding_no_hello_never_opens_a_client_stream(payload):
    """What the batch path checks before StreamTable.settle_server_flight (a handshake
    record whose sixth byte is not ClientHello) is a start ``segment`` bypasses too."""
    assert not may_open_client_stream(payload)


def test_a_segment_cut_by_the_snap_length_gives_the_stream_up():
    """A hello whose first segment the capture cut short can never be reassembled: the
    stream is given up and its later segments bypassed, instead of waiting on the hole."""
    hello = big_hello()
    first, second = hello[:1400], hello[1400:]
    frames = [seg(flags="S", seq=ISN), seg(first)[:200], seg(second, seq=ISN + 1 + len(first))]
    out, dec = run(frames)
    key = next(iter(dec.streams.bypass))
    assert not hellos(out)
    assert not dec.streams.streams and len(dec.streams.bypass) == 1
    assert dec.stats.malformed["ipv4_snapped"] == 1
    assert dec.streams.bypass[key] == (ISN + 1) % (1 << 32)

    whole, dec = run([seg(flags="S", seq=ISN), seg(first), seg(second, seq=ISN + 1 + len(first))])
    assert [h.server_name.text for h in hellos(whole)] == ["s07.upd.kaspersky.com"]
