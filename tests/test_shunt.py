"""Flow shunting (sensor/capture/shunt.py): the filter program it builds, run by libpcap's own
``bpf_filter`` on crafted frames, and ``read`` of a capture with long uploads, against the
same read without shunting and without the capture filter."""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
from pathlib import Path

import pytest

pcapy = pytest.importorskip("pcapy")

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop  # noqa: E402
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from sensor.capture import bpf, shunt  # noqa: E402
from sensor.decode.packet import SHUNT_AFTER  # noqa: E402
from tests.helpers import capture_filter_program, libpcap_bpf, load_make_samples, read_detections  # noqa: E402

MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


def _libpcap():
    lib = libpcap_bpf()
    if lib is None:
        pytest.skip("no single libpcap mapped into the process")
    return lib


def _key(ip, tcp) -> bytes:
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return (socket.inet_pton(family, ip.src) + socket.inet_pton(family, ip.dst)
            + struct.pack("!HH", tcp.sport, tcp.dport))


def _frame(ip, tcp, tags=(), payload=b"x" * 600) -> bytes:
    layers = Ether(**MACS)
    for tag in tags:
        layers = layers / tag
    return bytes(layers / ip / tcp / Raw(payload)) if payload else bytes(layers / ip / tcp)


def test_the_program_drops_a_shunted_flows_segments_and_leaves_every_other_frame_to_the_filter():
    lib = _libpcap()
    main_program = capture_filter_program()
    rng = random.Random(7)
    flows = []
    for index in range(40):
        v6 = index % 3 == 0
        ip = (IPv6(src=f"fd00::{index + 1:x}", dst=f"2001:db8::{index % 5 + 1:x}") if v6
              else IP(src=f"10.0.{index % 4}.{index + 1}", dst=f"198.51.100.{index % 6 + 1}"))
        # Some flows share their port word, so the search ends in a run of them.
        sport = 50000 if index % 7 == 0 else rng.randint(1024, 65535)
        flows.append((ip, sport, rng.choice([443, 8443, 80]), (Dot1Q(vlan=index),) if index % 2 else ()))
    shunted = flows[::2]
    # Scapy's segments carry sequence number 0: in each window but the first flow's.
    windows = [shunt.SEQ_WINDOW if index == 0 else rng.choice([0, -5, 1 - shunt.SEQ_WINDOW])
               for index in range(len(shunted))]
    program = shunt.build_program([(_key(ip, TCP(sport=s, dport=d)), window)
                                   for (ip, s, d, _), window in zip(shunted, windows)],
                                  main_program)
    assert lib.bpf_validate(program, len(program) // 8)

    def verdicts(frame):
        return (lib.bpf_filter(main_program, frame, len(frame), len(frame)),
                lib.bpf_filter(program, frame, len(frame), len(frame)))

    dropped = 0
    for position, (ip, sport, dport, tags) in enumerate(flows):
        is_shunted = position % 2 == 0 and position > 0
        for flags in ("A", "PA", "S", "F", "FA", "R", "RA", "SA"):
            for payload in (b"", b"x" * 700):
                frame = _frame(ip, TCP(sport=sport, dport=dport, flags=flags), tags, payload)
                before, after = verdicts(frame)
                if is_shunted and not set(flags) & set("SFR"):
                    assert after == 0, (ip.src, sport, flags)
                    dropped += 1
                else:
                    assert after == before, (ip.src, sport, flags)
        # The server's direction and a flow with one port changed are other flows.
        reverse = ip.copy()
        reverse.src, reverse.dst = ip.dst, ip.src
        for other_ip, other_tcp in ((reverse, TCP(sport=dport, dport=sport, flags="PA")),
                                    (ip, TCP(sport=sport ^ 1, dport=dport, flags="PA"))):
            frame = _frame(other_ip, other_tcp, tags)
            assert verdicts(frame)[1] == verdicts(frame)[0]
        if is_shunted:
            # Outside the window, on either side: a new connection on the same ports.
            window = windows[position // 2]
            for seq in (window - 1, window + shunt.SEQ_WINDOW, window + (1 << 31)):
                frame = _frame(ip, TCP(sport=sport, dport=dport, flags="PA", seq=seq & 0xFFFFFFFF), tags)
                before, after = verdicts(frame)
                assert after == before != 0, (ip.src, sport, seq)
            frame = _frame(ip, TCP(sport=sport, dport=dport, flags="PA",
                                   seq=(window + shunt.SEQ_WINDOW - 1) & 0xFFFFFFFF), tags)
            assert verdicts(frame)[1] == 0
    assert dropped == (len(shunted) - 1) * 4

    # Frames the flows' tests do not read are the capture filter's alone, even of a shunted flow.
    ip, sport, dport, _ = shunted[1]
    ip6, sport6, dport6, _ = shunted[0]
    others = [
        _frame(ip, TCP(sport=sport, dport=dport, flags="PA"), (Dot1AD(vlan=5), Dot1Q(vlan=6))),
        bytes(Ether(**MACS) / IP(src=ip.src, dst=ip.dst, options=b"\x01\x01\x01\x00")
              / TCP(sport=sport, dport=dport, flags="PA") / Raw(b"x" * 600)),
        bytes(Ether(**MACS) / IP(src=ip.src, dst=ip.dst, flags="MF")
              / TCP(sport=sport, dport=dport, flags="PA") / Raw(b"x" * 600)),
        bytes(Ether(**MACS) / IPv6(src=ip6.src, dst=ip6.dst) / IPv6ExtHdrHopByHop()
              / TCP(sport=sport6, dport=dport6, flags="PA") / Raw(b"x" * 600)),
        bytes(Ether(**MACS) / IP(src=ip.src, dst=ip.dst) / UDP(sport=sport, dport=dport) / Raw(b"x" * 600)),
        _frame(ip, TCP(sport=sport, dport=dport, flags="PA"))[:60],
        b"\x02" * 20,
    ]
    for frame in others:
        before, after = verdicts(frame)
        assert after == before


def _linux_cooked(packet: bytes, protocol: bytes) -> bytes:
    return struct.pack("!HHH", 4, 1, 6) + bytes.fromhex("020000000001") + b"\0\0" + protocol + packet


def _linux_cooked_v2(packet: bytes, protocol: bytes) -> bytes:
    # The protocol opens the header; a tag the kernel left stays in the frame behind it.
    header = protocol[:2] + struct.pack("!HIHBB", 0, 3, 1, 4, 6) + bytes.fromhex("0200000000010000")
    return header + protocol[2:] + packet


# Link types other than Ethernet: how a frame wraps an IP packet behind a type field
# (with a tag: 0x8100, the tag, the packet's type), and whether it can carry a tag.
_OTHER_LINKS = {
    "sll": (bpf.DLT_LINUX_SLL, _linux_cooked, True),
    "sll2": (bpf.DLT_LINUX_SLL2, _linux_cooked_v2, True),
    "raw": (101, lambda packet, protocol: packet, False),
}


@pytest.mark.parametrize("link", sorted(_OTHER_LINKS))
def test_the_program_reads_other_link_types_where_their_frames_hold_the_network_header(link):
    """Linux cooked frames (``tcpdump -i any``: SLL, and SLL2 since libpcap 1.10) and bare
    IP hold their type and network header elsewhere than Ethernet does."""
    lib = _libpcap()
    linktype, wrap, tags = _OTHER_LINKS[link]
    dlt = bpf.dlt_for(linktype)
    main_program = capture_filter_program(dlt)

    def frame_of(ip, tcp, tag=False, payload=b"x" * 600) -> bytes:
        ethertype = b"\x86\xdd" if ip.version == 6 else b"\x08\x00"
        protocol = b"\x81\x00" + struct.pack("!H", 7) + ethertype if tag else ethertype
        return wrap(bytes(ip / tcp / Raw(payload)), protocol)

    flows = [(IP(src="10.0.0.1", dst="198.51.100.7"), 50001, False),
             (IP(src="10.0.0.2", dst="198.51.100.7"), 50002, tags),
             (IPv6(src="fd00::1", dst="2001:db8::7"), 50003, False)]
    keys = [(_key(ip, TCP(sport=sport, dport=443)), 0) for ip, sport, _ in flows]
    program = shunt.build_program(keys, main_program, bpf.SHUNTED_LINKTYPES[linktype])
    assert lib.bpf_validate(program, len(program) // 8)

    def verdicts(frame):
        return (lib.bpf_filter(main_program, frame, len(frame), len(frame)),
                lib.bpf_filter(program, frame, len(frame), len(frame)))

    for ip, sport, tag in flows:
        before, after = verdicts(frame_of(ip, TCP(sport=sport, dport=443, flags="PA"), tag))
        assert before != 0 and after == 0, (ip.src, tag)
        for other in (TCP(sport=sport, dport=443, flags="S"), TCP(sport=sport + 100, dport=443, flags="PA"),
                      TCP(sport=sport, dport=443, flags="PA", seq=shunt.SEQ_WINDOW)):
            frame = frame_of(ip, other, tag)
            assert verdicts(frame)[1] == verdicts(frame)[0] != 0, (ip.src, tag, other.flags)
    # Packets the tests do not read stay the capture filter's: IPv4 with options, IPv6
    # with an extension header, and a frame cut short.
    ip, sport, _ = flows[0]
    ip6, sport6, _ = flows[2]
    for frame in (frame_of(IP(src=ip.src, dst=ip.dst, options=b"\x01\x01\x01\x00"),
                           TCP(sport=sport, dport=443, flags="PA")),
                  wrap(bytes(IPv6(src=ip6.src, dst=ip6.dst) / IPv6ExtHdrHopByHop()
                             / TCP(sport=sport6, dport=443, flags="PA") / Raw(b"x" * 600)), b"\x86\xdd"),
                  frame_of(ip, TCP(sport=sport, dport=443, flags="PA"))[:40]):
        before, after = verdicts(frame)
        assert after == before
    # The Ethernet program's offsets would read the wrong bytes of these frames.
    ethernet = shunt.build_program(keys, main_program)
    frame = frame_of(flows[0][0], TCP(sport=flows[0][1], dport=443, flags="PA"))
    assert lib.bpf_filter(ethernet, frame, len(frame), len(frame)) != 0


def test_a_full_table_of_ipv6_flows_stays_within_the_kernels_program_limit():
    lib = _libpcap()
    rng = random.Random(3)
    user_filter = " or ".join(f"host 198.51.100.{n}" for n in range(1, 60))
    for main_program in (capture_filter_program(), capture_filter_program(user_filter=user_filter)):
        table = shunt.ShuntTable(main_program)
        assert 0 < table.max_flows <= shunt.MAX_FLOWS
        for _ in range(table.max_flows):
            table.add(rng.randbytes(shunt.IPV6_KEY), rng.getrandbits(32))
        table.finished(0)
        assert len(table.program) // 8 <= shunt.MAX_PROGRAM
        assert lib.bpf_validate(table.program, len(table.program) // 8)


def test_flows_sharing_a_port_word_past_a_runs_length_are_all_found():
    """A run never splits one port word: thirty IPv6 clients on the same ports, among others,
    make one run of several hundred instructions, whose skip and way out still land right."""
    lib = _libpcap()
    main_program = capture_filter_program()
    rng = random.Random(5)
    shared = [IPv6(src=f"fd00::{n + 1:x}", dst="2001:db8::1") for n in range(30)]
    others = [IP(src=f"10.0.1.{n + 1}", dst="198.51.100.7") for n in range(40)]
    ports = {id(ip): (50000, 443) if ip in shared else (rng.randint(1024, 65535), 443)
             for ip in shared + others}
    shunted = shared[::3] + others[::2]
    program = shunt.build_program([(_key(ip, TCP(sport=ports[id(ip)][0], dport=443)), 0) for ip in shunted],
                                  main_program)
    assert lib.bpf_validate(program, len(program) // 8)
    for ip in shared + others:
        frame = _frame(ip, TCP(sport=ports[id(ip)][0], dport=443, flags="PA"))
        verdict = lib.bpf_filter(program, frame, len(frame), len(frame))
        assert (verdict == 0) == (ip in shunted), ip.src
        assert lib.bpf_filter(main_program, frame, len(frame), len(frame)) != 0


def test_the_table_evicts_its_oldest_flow_and_rebuilds_only_what_changed():
    table = shunt.ShuntTable(b"\x06\x00\x00\x00\xff\xff\x00\x00")
    keys = [bytes([n]) * shunt.IPV4_KEY for n in range(table.max_flows + 1)]
    for key in keys:
        table.add(key, 0)
    assert len(table.flows) == table.max_flows and keys[0] not in table.flows
    assert table.evicted == 1
    table.finished(0)
    built = table.program
    assert built != table.main
    table.finished(1)
    assert table.program is built
    table.discard(keys[1])
    table.finished(2)
    assert table.program is not built


# ---------------------------------------------------------------------------- read


def _uploads_capture(path: Path, linktype: int = 1) -> dict:
    """TLS connections whose client uploads well past SHUNT_AFTER, over IPv4 (untagged and
    tagged) and IPv6, side by side; DNS lookups between them; and, after the first ends, a
    new connection on its ports with another name.  Frames of another ``linktype`` than
    Ethernet carry no tags.  Returns the SNIs."""
    samples = load_make_samples()
    other = {samples.LINKTYPE_LINUX_SLL: samples.linux_sll, samples.LINKTYPE_LINUX_SLL2: samples.linux_sll2,
             samples.LINKTYPE_RAW: samples.raw_ip}.get(linktype)

    def wrap(tags=()):
        return other or samples.ethernet_wrap(tags)

    cap = samples.simple_capture("shunt")
    rng = cap.rng
    server, server6 = "203.0.113.70", "2001:db8:40::70"
    sessions = [
        (samples.CLIENT, server, b"s01.upd.kaspersky.com", ()),
        ("192.168.1.21", server, b"www.example.org", ((samples.ETH_8021Q, 20),)),
        ("fd00::21", server6, b"dc1.ksn.kaspersky-labs.com", ()),
    ]
    t0 = samples.T0_NS
    reused_port = 50123
    for number, (client, to, sni, tags) in enumerate(sessions):
        cap.wrap = wrap(tags)
        session = samples.TcpSession(cap, t0 + number * 1000, client, to,
                                     reused_port if number == 0 else 40000 + number, 443)
        session.handshake()
        session.send(True, samples.client_hello(rng, sni, post_quantum=True))
        session.reply_delay()
        session.send(False, samples.server_flight(rng))
        session.send(True, samples.tls_app_data(rng, 1300) * 150)
        session.close()
        last = session.t
    cap.wrap = wrap()
    t = t0
    while t < last + 10**9:
        t = samples.dns_lookup(cap, t, samples.CLIENT, samples.LAN_RESOLVER, "www.example.com",
                               samples.answer_chain("www.example.com", (), "198.51.100.9"))
    session = samples.TcpSession(cap, t, samples.CLIENT, server, reused_port, 443)
    session.handshake()
    session.send(True, samples.client_hello(rng, b"activation-v2.kaspersky.com", post_quantum=True))
    session.send(True, samples.tls_app_data(rng, 1300) * 40)
    session.close()
    path.write_bytes(samples.pcap_file(linktype, cap.ordered()))
    return {sni.decode() for _, _, sni, _ in sessions} | {"activation-v2.kaspersky.com"}


def _read(tmp_path: Path, capture: Path, capsys, name: str, *extra: str):
    keys, hosts, status, summary = read_detections(tmp_path / name, capture, capsys, *extra)
    assert status == 0
    packets = int(re.search(r"packets ([\d,]+)", summary).group(1).replace(",", ""))
    # No line when no acknowledgement judged anything.
    loss = re.search(r"capture loss: (\d+) of ([\d,]+) acks", summary)
    return keys, hosts, packets, loss.groups() if loss else ("0", "0"), summary


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 32 packets, shunted from the second on, one batch after the decoder asks:
    the sample is a few thousand packets, the defaults are set for a million."""
    monkeypatch.setattr(bpf, "SHUNTING_BATCH", 32)
    monkeypatch.setattr(shunt, "LAG_BATCHES", 1)
    monkeypatch.setattr(shunt, "UNSHUNTED_BATCHES", 1)


def test_read_shunts_uploads_and_finds_what_it_finds_without(tmp_path, capsys, small_batches, monkeypatch):
    capture = tmp_path / "uploads.pcap"
    names = _uploads_capture(capture)
    plain = _read(tmp_path, capture, capsys, "plain", "--no-bpf-prefilter")
    shunting = _read(tmp_path, capture, capsys, "shunting")
    again = _read(tmp_path, capture, capsys, "again")
    # A user's filter is in the program the flows' tests follow too (one that passes every
    # frame here: "tcp" alone would not match the 802.1Q-tagged connection).
    user = _read(tmp_path, capture, capsys, "user", "--bpf", "not arp")
    monkeypatch.setattr(bpf, "filter_slot", lambda *args: None)
    filtered = _read(tmp_path, capture, capsys, "filtered")

    assert shunting[:2] == plain[:2] == filtered[:2] == user[:2]
    assert {domain for _, _, domain in shunting[0]} >= names - {"www.example.org"}
    # Most of the three uploads (450 segments) never reach Python, and the same ones on
    # every read.
    assert shunting[2] < filtered[2] - 300
    assert again[2:] == shunting[2:]
    assert user[2] == shunting[2]
    assert re.search(r"shunted flows 4\b", shunting[4]) and "shunted" not in filtered[4]
    # The shunted bytes are not judged as lost.
    assert shunting[3][0] == filtered[3][0] == "0"


@pytest.mark.parametrize("link", sorted(_OTHER_LINKS))
def test_read_shunts_uploads_of_other_link_types_as_it_shunts_ethernet_ones(tmp_path, capsys, small_batches,
                                                                          monkeypatch, link):
    """``tcpdump -i any`` writes Linux cooked frames (SLL, SLL2), tun interfaces bare IP:
    the flows' tests read them where their network header stands, and the read finds what
    it finds without shunting and without the filter."""
    capture = tmp_path / f"uploads-{link}.pcap"
    names = _uploads_capture(capture, _OTHER_LINKS[link][0])
    plain = _read(tmp_path, capture, capsys, "plain", "--no-bpf-prefilter")
    shunting = _read(tmp_path, capture, capsys, "shunting")
    monkeypatch.setattr(bpf, "filter_slot", lambda *args: None)
    filtered = _read(tmp_path, capture, capsys, "filtered")
    assert shunting[:2] == plain[:2] == filtered[:2]
    assert {domain for _, _, domain in shunting[0]} >= names - {"www.example.org"}
    assert shunting[2] < filtered[2] - 300
    assert re.search(r"shunted flows 4\b", shunting[4])
    assert shunting[3][0] == filtered[3][0] == "0"


def test_a_connection_that_reuses_a_shunted_flows_ports_at_once_is_read_whole(tmp_path, capsys,
                                                                               small_batches):
    """The program that drops an upload's segments is installed batches after the decoder
    asks, and stays so batches after its FIN: a new connection on the same ports at once,
    its initial sequence number outside the upload's window, must lose nothing."""
    samples = load_make_samples()
    cap = samples.simple_capture("reuse")
    server = "203.0.113.71"
    upload = samples.TcpSession(cap, samples.T0_NS, samples.CLIENT, server, 50999, 443)
    upload.handshake()
    upload.send(True, samples.client_hello(cap.rng, b"www.example.org"))
    upload.reply_delay()
    upload.send(False, samples.server_flight(cap.rng))
    upload.send(True, samples.tls_app_data(cap.rng, 1300) * 120)
    upload.close()
    reuse = samples.TcpSession(cap, upload.t + samples.MS, samples.CLIENT, server, 50999, 443)
    reuse.seq[True] = (upload.seq[True] + (1 << 31)) & 0xFFFFFFFF
    reuse.handshake()
    reuse.send(True, samples.client_hello(cap.rng, b"activation-v2.kaspersky.com", post_quantum=True))
    reuse.reply_delay()
    reuse.send(False, samples.server_flight(cap.rng))
    reuse.send(True, samples.tls_app_data(cap.rng, 1300) * 20)
    reuse.close()
    capture = tmp_path / "reuse.pcap"
    capture.write_bytes(samples.pcap_file(samples.LINKTYPE_ETHERNET, cap.ordered()))
    plain = _read(tmp_path, capture, capsys, "plain", "--no-bpf-prefilter")
    shunting = _read(tmp_path, capture, capsys, "shunting")
    assert re.search(r"shunted flows 1\b", shunting[4])
    assert shunting[2] < plain[2] - 60
    assert "activation-v2.kaspersky.com" in {domain for _, _, domain in shunting[0]}
    assert shunting[:2] == plain[:2]


def _upload_segment(flags: str, seq: int, payload: bytes = b"") -> bytes:
    return bytes(Ether(**MACS) / IP(src="10.0.0.1", dst="198.51.100.7")
                 / TCP(sport=50000, dport=443, flags=flags, seq=seq & 0xFFFFFFFF) / payload)


def test_an_upload_past_its_window_is_shunted_anew_from_where_it_is():
    """The filter drops SEQ_WINDOW bytes of a shunted flow; its segments past them reach the
    decoder again, which shunts the flow anew from there (once, not for every segment)."""
    from tests.test_batch_path import _batch, _decoder

    decoder = _decoder()
    table = decoder.shunts = shunt.ShuntTable(struct.pack("=HBBI", 0x06, 0, 0, 262144))
    table.lag, table.unshunted = 1, 1
    isn = 1000
    shunted_at = isn + 1 + 20000
    first = [_upload_segment("S", isn), _upload_segment("PA", isn + 1, b"\x17\x03\x03" + bytes(200)),
             _upload_segment("PA", shunted_at, bytes(200))]

    def decode(t0: float, frames: list) -> None:
        for ts, frame, _ in decoder.batch(1, *_batch([(t0 + n / 1000, f) for n, f in enumerate(frames)])):
            decoder.decode(ts, 1, frame)

    decode(1.0, first)
    (key,) = table.flows
    assert table.flows[key][2] == shunted_at
    table.finished(0)
    table.entering(1)
    # Read before the program took effect, then past its window, then just past that.
    later = [shunted_at + 200, shunted_at + shunt.SEQ_WINDOW + 5, shunted_at + shunt.SEQ_WINDOW + 205]
    table.changed = False
    decode(2.0, [_upload_segment("A", seq, bytes(200)) for seq in later])
    assert decoder.stats.shunted_flows == 1
    assert table.flows[key][2] == shunted_at + shunt.SEQ_WINDOW + 5 and table.changed


def test_an_upload_already_under_way_when_the_capture_starts_is_shunted_too():
    """A span port's capture starts in the middle of connections: an upload whose SYN came
    before it is bypassed all the same, and shunted once past SHUNT_AFTER."""
    from tests.test_batch_path import _batch, _decoder

    decoder = _decoder()
    table = decoder.shunts = shunt.ShuntTable(struct.pack("=HBBI", 0x06, 0, 0, 262144))
    start = 7_000_000
    frames = [_upload_segment("PA", start + n * 1200, b"\x17\x03\x03" + bytes(1197)) for n in range(12)]
    for ts, frame, _ in decoder.batch(1, *_batch([(1.0 + n / 1000, f) for n, f in enumerate(frames)])):
        decoder.decode(ts, 1, frame)
    (key,) = table.flows
    assert table.flows[key][2] == start + 4800 == start + -(-SHUNT_AFTER // 1200) * 1200


def test_a_flow_counts_as_shunted_from_the_first_batch_read_without_it():
    table = shunt.ShuntTable(b"\x06\x00\x00\x00\xff\xff\x00\x00")
    table.lag, table.unshunted = 2, 3
    first, second = bytes(12), bytes(range(12))
    table.add(first, 0)
    table.finished(0)  # for batch 2, which the first three read with the filter alone
    table.add(second, 7)
    table.finished(1)  # for batch 3
    table.discard(first)
    table.finished(2)  # for batch 4
    stop = threading.Event()
    assert table.program_for(2, stop) == table.main
    seen = []
    for index in range(5):
        table.entering(index)
        seen.append(set(table.take_started()))
    assert seen == [set(), set(), set(), {first, second}, set()]
    with_both, with_second = table.program_for(3, stop), table.program_for(4, stop)
    assert with_both == shunt.build_program([(first, 0), (second, 7)], table.main)
    assert with_second == shunt.build_program([(second, 7)], table.main)


def test_a_new_connection_shunted_before_the_old_ones_program_is_gone_counts_as_shunted_anew():
    """A FIN discards a flow and its ports' next connection is shunted before a program
    without the first was built: both programs hold the key, yet the second connection's
    segments are dropped from its own start on, so the decoder must stop judging it too."""
    table = shunt.ShuntTable(b"\x06\x00\x00\x00\xff\xff\x00\x00")
    table.lag, table.unshunted = 1, 1
    key = bytes(range(12))
    table.add(key, 0)
    table.finished(0)
    table.discard(key)
    table.add(key, 1 << 30)
    table.finished(1)
    table.finished(2)
    seen = []
    for index in range(4):
        table.entering(index)
        seen.append(set(table.take_started()))
    assert seen == [set(), {key}, {key}, set()]


def test_a_filter_that_does_not_accept_by_one_constant_is_not_shunted_behind():
    returns_a = struct.pack("=HBBI", 0x16, 0, 0, 0)
    two_lengths = (struct.pack("=HBBI", 0x15, 0, 1, 6) + struct.pack("=HBBI", 0x06, 0, 0, 96)
                   + struct.pack("=HBBI", 0x06, 0, 0, 262144))
    for main_program in (returns_a, two_lengths):
        table = shunt.ShuntTable(main_program)
        table.add(bytes(shunt.IPV4_KEY), 0)
        table.finished(0)
        assert table.max_flows == 0 and not table.flows and table.program == main_program


def test_a_disabled_table_keeps_nothing_for_later_batches():
    table = shunt.ShuntTable(b"\x06\x00\x00\x00\xff\xff\x00\x00")
    table.lag, table.unshunted = 1, 1
    table.add(bytes(shunt.IPV4_KEY), 0)
    table.disable()
    for index in range(100):
        table.finished(index)
    assert not table._programs and not table._starting
