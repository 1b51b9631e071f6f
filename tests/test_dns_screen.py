"""The DNS name screen in a ``read``'s filter program (sensor/capture/dns_screen.py): the
stage run by libpcap's own ``bpf_filter`` on crafted frames and random messages against the
decoder's screen, and ``read`` of a capture whose resolvers the stage takes over, against the
same read without the stage and without the capture filter."""

from __future__ import annotations

import random
import re
import socket
import struct
from pathlib import Path

import pytest

pcapy = pytest.importorskip("pcapy")

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop  # noqa: E402
from scapy.layers.l2 import Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from sensor.capture import bpf, dns_screen, shunt  # noqa: E402
from sensor.detect.signatures import default_signature_paths, load_signatures  # noqa: E402
from tests.helpers import capture_filter_program, libpcap_bpf, load_make_samples, read_detections  # noqa: E402

MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
RESOLVER4, RESOLVER6 = "10.1.0.53", "fd00::35"


@pytest.fixture(scope="module")
def screen():
    return load_signatures(default_signature_paths()).name_screen()


def _libpcap():
    lib = libpcap_bpf()
    if lib is None:
        pytest.skip("no single libpcap mapped into the process")
    return lib


def _pair(address: str, direction: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.inet_pton(family, address) + direction


def _table(labels, servers, main: bytes, layout=shunt.ETHERNET) -> shunt.ShuntTable:
    table = shunt.ShuntTable(main, layout, dns=True)
    table.screen_dns(labels)
    for address, direction in servers:
        assert table.list_dns_server(_pair(address, direction))
    table.finished(shunt.UNSHUNTED_BATCHES)
    return table


def _message(name: bytes, response: bool = False, txid: int = 0x1234) -> bytes:
    wire = b"".join(bytes((len(label),)) + label for label in name.split(b".")) + b"\0"
    flags = 0x8180 if response else 0x0100
    return struct.pack("!HHHHHH", txid, flags, 1, 0, 0, 0) + wire + b"\0\1\0\1"


def _dns_frame(message: bytes, client: str, server: str, response: bool = False, tags=(),
               client_port: int = 40000, server_port: int = 53) -> bytes:
    layers = Ether(**MACS)
    for tag in tags:
        layers = layers / tag
    network = IPv6 if ":" in client else IP
    if response:
        datagram = network(src=server, dst=client) / UDP(sport=server_port, dport=client_port)
    else:
        datagram = network(src=client, dst=server) / UDP(sport=client_port, dport=server_port)
    return bytes(layers / datagram / Raw(message))


def test_a_listed_servers_messages_pass_only_when_they_may_name_a_screened_label(screen):
    lib = _libpcap()
    main = capture_filter_program()
    table = _table(screen.labels, [(RESOLVER4, b"q"), (RESOLVER4, b"r"), (RESOLVER6, b"q"),
                                   (RESOLVER6, b"r")], main)
    program = table.program
    assert lib.bpf_validate(program, len(program) // 8)

    def verdict(frame):
        before = lib.bpf_filter(main, frame, len(frame), len(frame))
        assert before, "the capture filter passes every frame here"
        return lib.bpf_filter(program, frame, len(frame), len(frame))

    for client, server in (("10.0.0.5", RESOLVER4), ("fd00::5", RESOLVER6)):
        for response in (False, True):
            for tags in ((), (Dot1Q(vlan=7),)):
                def frame(name, **extra):
                    return _dns_frame(_message(name, response), client, server, response, tags, **extra)

                assert verdict(frame(b"www.example.com")) == 0, (server, response, tags)
                for name in (b"dnl-01.geo.kaspersky.com", b"DNL-01.GEO.KASPERSKY.COM",
                             b"ds.KaSpErSkY-LaBs.com", b"x.securelist.com"):
                    assert verdict(frame(name)) != 0, (name, server, response, tags)
        # Another server, and a server's address in the other role, pass whole.
        other = "10.1.0.54" if ":" not in client else "fd00::36"
        assert verdict(_dns_frame(_message(b"www.example.com"), client, other)) != 0
        assert verdict(_dns_frame(_message(b"www.example.com"), server, "10.9.9.9" if ":" not in client
                                  else "fd00::99")) != 0
    # Neither a query (QR clear) to port 53 nor a response from it: left to the decoder.
    assert verdict(_dns_frame(_message(b"www.example.com"), "10.0.0.5", RESOLVER4, client_port=53,
                              server_port=5353)) != 0
    assert verdict(_dns_frame(_message(b"www.example.com", True), "10.0.0.5", RESOLVER4,
                              server_port=5353, response=True)) != 0
    # A response towards VXLAN's port is the tunnel's (the batch loop's order of tests).
    assert verdict(_dns_frame(_message(b"www.example.com", True), "10.0.0.5", RESOLVER4, True,
                              client_port=4789)) != 0


def test_what_the_decoder_would_count_or_cannot_search_passes(screen):
    lib = _libpcap()
    main = capture_filter_program()
    program = _table(screen.labels, [(RESOLVER4, b"q"), (RESOLVER6, b"q")], main).program

    def verdicts(frame):
        return (lib.bpf_filter(main, frame, len(frame), len(frame)),
                lib.bpf_filter(program, frame, len(frame), len(frame)))

    plain = _message(b"www.example.com")
    long_name = b".".join([b"a" * 60] * 9) + b".example.com"
    udp = UDP(sport=40000, dport=53)
    frames = [
        # A DNS header cut short; an IP length past the frame's end (the decoder counts both).
        bytes(Ether(**MACS) / IP(src="10.0.0.5", dst=RESOLVER4) / udp / Raw(plain[:11])),
        bytes(Ether(**MACS) / IP(src="10.0.0.5", dst=RESOLVER4, len=200) / udp / Raw(plain)),
        bytes(Ether(**MACS) / IPv6(src="fd00::5", dst=RESOLVER6, plen=200) / udp / Raw(plain)),
        # IPv4 options, a fragment, IPv6 extension headers: the decoder reads them whole.
        bytes(Ether(**MACS) / IP(src="10.0.0.5", dst=RESOLVER4, options=b"\x01\x01\x01\x00") / udp / Raw(plain)),
        bytes(Ether(**MACS) / IP(src="10.0.0.5", dst=RESOLVER4, flags="MF") / udp / Raw(plain)),
        bytes(Ether(**MACS) / IPv6(src="fd00::5", dst=RESOLVER6) / IPv6ExtHdrHopByHop() / udp / Raw(plain)),
        # Longer than the search: passes whole.
        _dns_frame(_message(long_name), "10.0.0.5", RESOLVER4),
        # Two tags: the batch loop reads one.
        _dns_frame(plain, "10.0.0.5", RESOLVER4, tags=(Dot1Q(vlan=7), Dot1Q(vlan=8))),
    ]
    assert len(_message(long_name)) > dns_screen.SCAN_BYTES
    for frame in frames:
        before, after = verdicts(frame)
        assert before and after == before
    # DNS over TCP and every other frame the filter passes meet the stage unchanged.
    for frame in (bytes(Ether(**MACS) / IP(src="10.0.0.5", dst=RESOLVER4) / TCP(sport=40000, dport=53, flags="PA")
                        / Raw(struct.pack("!H", len(plain)) + plain)),
                  bytes(Ether(**MACS) / IP(src="10.0.0.5", dst="198.51.100.7") / TCP(sport=40000, dport=443, flags="S")),
                  bytes(Ether(**MACS) / IP(src="10.0.0.5", dst="224.0.0.251") / UDP(sport=5353, dport=5353) / Raw(plain))):
        assert verdicts(frame)[1] == verdicts(frame)[0]


def test_the_stage_drops_nothing_the_decoders_screen_would_keep(screen):
    """Random messages, many holding a screened label (in any case, at any offset, cut at
    any point) or the first bytes of one: whenever the program drops one, the decoder's own
    screen finds nothing in it past the DNS header."""
    lib = _libpcap()
    main = capture_filter_program()
    program = _table(screen.labels, [(RESOLVER4, b"q")], main).program
    rng = random.Random(11)
    wire_labels = [bytes((len(label),)) + label for label in screen.labels]
    dropped = kept_by_screen = 0
    for _ in range(3000):
        message = bytearray(rng.randbytes(rng.randint(12, dns_screen.SCAN_BYTES + 40)))
        if rng.random() < 0.7:
            label = bytearray(rng.choice(wire_labels))
            for index in range(1, len(label)):
                if rng.random() < 0.5:
                    label[index] = label[index] ^ 0x20 if chr(label[index]).isalpha() else label[index]
            if rng.random() < 0.3:
                label = label[:rng.randint(3, len(label))]
            at = rng.randint(0, max(0, len(message) - len(label)))
            message[at:at + len(label)] = label
            del message[dns_screen.SCAN_BYTES + 40:]
        message[2] &= 0x7F  # a query
        frame = _dns_frame(bytes(message), "10.0.0.5", RESOLVER4)
        if lib.bpf_filter(program, frame, len(frame), len(frame)) == 0:
            dropped += 1
            assert screen.wire.search(bytes(message), dns_screen.DNS_HEADER) is None, bytes(message)
        elif screen.wire.search(bytes(message), dns_screen.DNS_HEADER):
            kept_by_screen += 1
    assert dropped > 500 and kept_by_screen > 500


def test_the_labels_the_search_can_compare():
    words = dns_screen.label_prefixes([b"kaspersky", b"KASPERSKY-labs"])
    assert words == tuple(sorted({0x096B6173, 0x0E6B6173}))
    assert dns_screen.label_prefixes([b"kaspersky", b"ab"]) is None
    assert dns_screen.label_prefixes([b"%03dlabel" % n for n in range(dns_screen.MAX_PREFIXES + 1)]) is None
    assert dns_screen.label_prefixes([]) is None


def test_a_full_list_of_servers_fits_and_the_next_one_is_left_to_the_decoder(screen):
    lib = _libpcap()
    main = capture_filter_program()
    table = shunt.ShuntTable(main, shunt.ETHERNET, dns=True)
    table.screen_dns(screen.labels)
    for index in range(dns_screen.MAX_SERVERS):
        assert table.list_dns_server(_pair(f"fd00::{index + 1:x}", b"r"))
    assert not table.list_dns_server(_pair("fd00::ffff", b"r"))
    table.finished(shunt.UNSHUNTED_BATCHES)
    program = table.program
    assert lib.bpf_validate(program, len(program) // 8)
    last = f"fd00::{dns_screen.MAX_SERVERS:x}"
    frame = _dns_frame(_message(b"www.example.com", True), "fd00::5", last, True)
    assert lib.bpf_filter(program, frame, len(frame), len(frame)) == 0
    table.unlist_dns_server(_pair(last, b"r"))
    table.finished(shunt.UNSHUNTED_BATCHES + 1)
    assert lib.bpf_filter(table.program, frame, len(frame), len(frame)) != 0
    # A capture whose snap length may cut a DNS message short gets no stage.
    cut = shunt.ShuntTable(main, shunt.ETHERNET, dns=False)
    cut.screen_dns(screen.labels)
    assert not cut.dns_enabled and not cut.list_dns_server(_pair(RESOLVER4, b"q"))


@pytest.mark.parametrize("link", ["sll", "sll2", "raw"])
def test_the_stage_reads_other_link_types_where_their_frames_hold_the_network_header(screen, link):
    from tests.test_shunt import _OTHER_LINKS

    lib = _libpcap()
    linktype, wrap, tags = _OTHER_LINKS[link]
    dlt = bpf.dlt_for(linktype)
    main = capture_filter_program(dlt)
    program = _table(screen.labels, [(RESOLVER4, b"q"), (RESOLVER6, b"r")], main,
                     bpf.SHUNTED_LINKTYPES[linktype]).program
    for tag in (False, True) if tags else (False,):
        for name, dropped in ((b"www.example.com", True), (b"dnl-01.geo.kaspersky.com", False)):
            for packet, ethertype in (
                    (bytes(IP(src="10.0.0.5", dst=RESOLVER4) / UDP(sport=40000, dport=53)
                           / Raw(_message(name))), b"\x08\x00"),
                    (bytes(IPv6(src=RESOLVER6, dst="fd00::5") / UDP(sport=53, dport=40000)
                           / Raw(_message(name, True))), b"\x86\xdd")):
                protocol = b"\x81\x00" + struct.pack("!H", 7) + ethertype if tag else ethertype
                frame = wrap(packet, protocol)
                assert lib.bpf_filter(main, frame, len(frame), len(frame))
                verdict = lib.bpf_filter(program, frame, len(frame), len(frame))
                assert (verdict == 0) == dropped, (name, tag, ethertype)


# ---------------------------------------------------------------------------- read


def _resolvers_capture(path: Path) -> None:
    """Lookups through a LAN resolver (IPv4 and IPv6) and an external one, many naming
    nothing, then Kaspersky names among them and connections to what they answered; an
    internal server only external clients ask at first, which an internal client asks
    more than a minute later and which then looks a Kaspersky name up itself: a resolver
    refreshing its cache, not an install, once the decoder reported that question."""
    samples = load_make_samples()
    cap = samples.simple_capture("dns-screen")
    second = 10**9
    t = samples.T0_NS
    lan, lan6, external, quiet = samples.LAN_RESOLVER, "fd00::53", "198.51.100.53", "192.168.1.2"
    clients = [(samples.CLIENT, lan), ("fd00::20", lan6), ("192.168.1.21", external)]
    for round_ in range(40):
        for client, server in clients:
            t = samples.dns_lookup(cap, t, client, server, "www.example.com",
                                   samples.answer_chain("www.example.com", (), "2001:db8::9"
                                                        if ":" in client else "198.51.100.9"),
                                   qtype=samples.TYPE_AAAA if ":" in client else samples.TYPE_A)
        t = samples.dns_lookup(cap, t, "203.0.113.9", quiet, "www.example.net",
                               samples.answer_chain("www.example.net", (), "198.51.100.10"))
    for client, server in clients:
        for name in ("dnl-01.geo.kaspersky.com", "DC1.KSN.KasPerSky-Labs.COM"):
            address = "2001:db8:40::70" if ":" in client else samples.KASPERSKY_SERVER
            t = samples.dns_lookup(cap, t, client, server, name, samples.answer_chain(name, (), address),
                                   qtype=samples.TYPE_AAAA if ":" in client else samples.TYPE_A)
            t = samples.tls_session(cap, t, client, address, None, bulk=1)
            t = samples.dns_lookup(cap, t, client, server, "www.example.com",
                                   samples.answer_chain("www.example.com", (), "2001:db8::9"
                                                        if ":" in client else "198.51.100.9"),
                                   qtype=samples.TYPE_AAAA if ":" in client else samples.TYPE_A)
    t += 70 * second
    t = samples.dns_lookup(cap, t, "192.168.1.22", quiet, "www.example.net",
                           samples.answer_chain("www.example.net", (), "198.51.100.10"))
    t = samples.dns_lookup(cap, t, quiet, external, "activation-v2.kaspersky.com",
                           samples.answer_chain("activation-v2.kaspersky.com", (), samples.KASPERSKY_SERVER))
    path.write_bytes(samples.pcap_file(samples.LINKTYPE_ETHERNET, cap.ordered()))


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 32 packets, filtered by the stage from the second on, one batch after the
    decoder asks: the capture is a few hundred packets, the defaults are set for a million."""
    monkeypatch.setattr(bpf, "SHUNTING_BATCH", 32)
    monkeypatch.setattr(shunt, "LAG_BATCHES", 1)
    monkeypatch.setattr(shunt, "UNSHUNTED_BATCHES", 1)


def _read(tmp_path: Path, capture: Path, capsys, name: str, *extra: str):
    keys, hosts, status, summary = read_detections(tmp_path / name, capture, capsys, *extra)
    assert status == 0
    packets = int(re.search(r"packets ([\d,]+)", summary).group(1).replace(",", ""))
    return keys, hosts, packets, summary


def test_read_leaves_known_servers_nameless_messages_to_the_filter_and_finds_what_it_finds_without(
        tmp_path, capsys, small_batches, monkeypatch):
    capture = tmp_path / "resolvers.pcap"
    _resolvers_capture(capture)
    plain = _read(tmp_path, capture, capsys, "plain", "--no-bpf-prefilter")
    screened = _read(tmp_path, capture, capsys, "screened")
    again = _read(tmp_path, capture, capsys, "again")
    monkeypatch.setattr(bpf, "filter_slot", lambda *args: None)
    filtered = _read(tmp_path, capture, capsys, "filtered")

    assert screened[:2] == plain[:2] == filtered[:2]
    asked = {(host, domain.lower()) for action, host, domain in screened[0] if action == "dns_query"}
    assert {(client, name) for client in ("192.168.1.20", "fd00::20", "192.168.1.21")
            for name in ("dnl-01.geo.kaspersky.com", "dc1.ksn.kaspersky-labs.com")} <= asked
    # The LAN resolver's queries and answers over IPv4 and IPv6 and the external one's: the
    # server only external clients asked stays the decoder's, and became a resolver.
    assert re.search(r"DNS servers screened 6\b", screened[3]), screened[3]
    assert "screened" not in filtered[3] and "screened" not in plain[3]
    quiet = [host for host in screened[1] if host["ip"] == "192.168.1.2"]
    assert quiet and quiet[0]["role"] == "resolver" and quiet[0]["verdict"] != "install"
    # Most of the 240 nameless messages of the three listed servers never reach Python, the
    # same ones on every read.
    assert screened[2] < filtered[2] - 200
    assert again[2] == screened[2]
