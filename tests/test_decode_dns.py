"""DNS decoder: names kept as raw labels, strict backward-only compression, answers with
A/AAAA/CNAME data, DNS-over-TCP framing, and hostile input only ever raising DecodeError."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import DNS, DNSQR, DNSRR

from sensor.decode.dns import MAX_ANSWERS, MAX_QUESTIONS, parse_dns, split_tcp_dns
from sensor.records import DecodeError, DomainName, PacketContext

CTX = PacketContext(ts=1.0, src_ip="192.0.2.10", dst_ip="192.0.2.53", src_port=40000,
                    dst_port=53, transport="udp")


# --- builders ------------------------------------------------------------------------------

def header(ident=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack(">HHHHHH", ident, flags, qd, an, ns, ar)


def wire_name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def dotted(name: str) -> bytes:
    return wire_name(*(label.encode() for label in name.split(".")))


def pointer(offset: int) -> bytes:
    return struct.pack(">H", 0xC000 | offset)


def question(name: bytes, qtype=1, qclass=1) -> bytes:
    return name + struct.pack(">HH", qtype, qclass)


def record(name: bytes, rtype: int, rdata: bytes, ttl=300, rclass=1) -> bytes:
    return name + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def query(name: str, qtype=1) -> bytes:
    return header() + question(dotted(name), qtype)


def reason(buf: bytes) -> str:
    with pytest.raises(DecodeError) as err:
        parse_dns(buf, CTX)
    return err.value.reason


# --- header and questions -------------------------------------------------------------------

def test_simple_query():
    msg = parse_dns(query("dnl-01.geo.kaspersky.com", qtype=28), CTX)
    assert msg.ctx is CTX
    assert msg.id == 0x1234
    assert msg.is_response is False
    assert msg.opcode == 0 and msg.rcode == 0
    assert len(msg.questions) == 1
    q = msg.questions[0]
    assert q.name == DomainName((b"dnl-01", b"geo", b"kaspersky", b"com"))
    assert q.name.text == "dnl-01.geo.kaspersky.com"
    assert (q.qtype, q.qclass) == (28, 1)
    assert msg.answers == []


def test_flags_response_opcode_rcode():
    flags = 0x8000 | (5 << 11) | 0x0003  # QR, opcode UPDATE, NXDOMAIN
    msg = parse_dns(header(flags=flags) + question(dotted("a.example")), CTX)
    assert msg.is_response is True
    assert msg.opcode == 5
    assert msg.rcode == 3


def test_zero_questions_allowed():
    msg = parse_dns(header(qd=0), CTX)
    assert msg.questions == [] and msg.answers == []


def test_root_name_question():
    msg = parse_dns(header() + question(b"\x00", qtype=2), CTX)
    assert msg.questions[0].name.labels == ()
    assert msg.questions[0].name.text == ""


def test_upper_case_preserved():
    msg = parse_dns(query("DNL-01.Geo.KASPERSKY.com"), CTX)
    name = msg.questions[0].name
    assert name.labels == (b"DNL-01", b"Geo", b"KASPERSKY", b"com")
    assert name.key == (b"dnl-01", b"geo", b"kaspersky", b"com")


def test_questions_capped_but_walked():
    count = MAX_QUESTIONS + 8
    body = b"".join(question(dotted(f"q{i}.example")) for i in range(count))
    answer = record(dotted("q0.example"), 1, bytes([192, 0, 2, 1]))
    msg = parse_dns(header(flags=0x8180, qd=count, an=1) + body + answer, CTX)
    assert len(msg.questions) == MAX_QUESTIONS
    assert msg.questions[-1].name.text == f"q{MAX_QUESTIONS - 1}.example"
    assert msg.answers[0].data == "192.0.2.1"


# --- raw label bytes --------------------------------------------------------------------------

def test_label_with_dot_stays_one_label():
    msg = parse_dns(header() + question(wire_name(b"kaspersky.com", b"evil", b"example")), CTX)
    name = msg.questions[0].name
    assert name.labels == (b"kaspersky.com", b"evil", b"example")
    assert name.text == "kaspersky\\.com.evil.example"
    assert name.key[-2:] != (b"kaspersky", b"com")


def test_nul_ff_and_newline_bytes_preserved():
    label = b"a\x00b\xffc\nd"
    msg = parse_dns(header() + question(wire_name(label, b"com")), CTX)
    name = msg.questions[0].name
    assert name.labels == (label, b"com")
    assert name.text == "a\\000b\\255c\\010d.com"


def test_non_utf8_label_does_not_crash():
    msg = parse_dns(header() + question(wire_name(b"\xc3\x28\x80", b"kaspersky", b"com")), CTX)
    assert msg.questions[0].name.labels[0] == b"\xc3\x28\x80"


def test_label_63_ok_64_rejected():
    ok = parse_dns(header() + question(wire_name(b"a" * 63, b"com")), CTX)
    assert len(ok.questions[0].name.labels[0]) == 63
    assert reason(header() + b"\x40" + b"a" * 64 + b"\x00" + b"\x00\x01\x00\x01") == "dns_bad_label"


def test_extended_label_type_0x80_rejected():
    assert reason(header() + b"\x80\x01a\x00\x00\x01\x00\x01") == "dns_bad_label"


def test_name_of_255_octets_ok_256_rejected():
    # four labels of 63 octets = 4 * 64 + 1 = 257 wire octets; trim to the limits
    at_limit = wire_name(b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61)  # 64*3 + 62 + 1 = 255
    assert len(at_limit) == 255
    msg = parse_dns(header() + question(at_limit), CTX)
    assert len(msg.questions[0].name.labels) == 4
    too_long = wire_name(b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 62)
    assert len(too_long) == 256
    assert reason(header() + question(too_long)) == "dns_name_too_long"


def test_name_too_long_through_pointers():
    base = header(qd=2)
    first = wire_name(b"a" * 63, b"b" * 63, b"c" * 63)  # 193 octets at offset 12
    second = bytes([63]) + b"d" * 63 + pointer(12)  # 64 + 193 = 257 octets
    assert reason(base + question(first) + question(second)) == "dns_name_too_long"


# --- compression ------------------------------------------------------------------------------

def test_chain_of_pointers():
    # q1: kaspersky.com at 12; q2: "upd" + ptr(12); q3: "s01" + ptr(q2); q4: ptr(q3)
    buf = header(qd=4)
    q1 = question(dotted("kaspersky.com"))
    q2_at = len(buf) + len(q1)
    q2 = question(b"\x03upd" + pointer(12))
    q3_at = q2_at + len(q2)
    q3 = question(b"\x03s01" + pointer(q2_at))
    q4 = question(pointer(q3_at), qtype=28)
    msg = parse_dns(buf + q1 + q2 + q3 + q4, CTX)
    texts = [q.name.text for q in msg.questions]
    assert texts == ["kaspersky.com", "upd.kaspersky.com", "s01.upd.kaspersky.com",
                     "s01.upd.kaspersky.com"]
    assert msg.questions[3].qtype == 28  # the offset after a pointer is right


def test_pointer_into_middle_of_earlier_name():
    buf = header(qd=2) + question(dotted("www.kaspersky.com"))
    buf += question(b"\x03ksn" + pointer(12 + 4))  # skip the "www" label
    msg = parse_dns(buf, CTX)
    assert msg.questions[1].name.text == "ksn.kaspersky.com"


def test_self_pointer_rejected():
    assert reason(header() + pointer(12) + b"\x00\x01\x00\x01") == "dns_bad_pointer"


def test_forward_pointer_rejected():
    # the question name points at a copy of a name placed after it
    body = pointer(12 + 6) + b"\x00\x01\x00\x01" + dotted("kaspersky.com")
    assert reason(header() + body) == "dns_bad_pointer"


def test_pointer_back_into_current_segment_rejected():
    # "a" label then a pointer to that same label: a loop made of a backward pointer
    assert reason(header() + b"\x01a" + pointer(12) + b"\x00\x01\x00\x01") == "dns_bad_pointer"


def test_pointer_loop_between_two_names_rejected():
    # name 1 at 12 points to name 2 at 18, which points back to 12
    body = pointer(18) + b"\x00\x01\x00\x01" + pointer(12) + b"\x00\x01\x00\x01"
    assert reason(header(qd=2) + body) == "dns_bad_pointer"


def test_out_of_range_pointer_rejected():
    assert reason(header() + pointer(0x3FFF) + b"\x00\x01\x00\x01") == "dns_bad_pointer"


def test_pointer_into_header_rejected():
    assert reason(header() + pointer(4) + b"\x00\x01\x00\x01") == "dns_bad_pointer"


def test_long_pointer_chain_is_a_loop():
    # every answer name is a pointer to the previous one: legal direction, absurd depth
    buf = bytearray(header(flags=0x8180, an=40) + question(dotted("kaspersky.com")))
    previous = 12
    for _ in range(40):
        here = len(buf)
        buf += record(pointer(previous), 16, b"")
        previous = here
    assert reason(bytes(buf)) == "dns_pointer_loop"


def test_pointer_cut_in_half_is_truncated():
    assert reason(header() + b"\xc0") == "dns_truncated"


# --- answers ----------------------------------------------------------------------------------

def test_a_aaaa_cname_answers_with_ttls():
    name = dotted("dnl-01.geo.kaspersky.com")
    buf = header(flags=0x8180, an=4) + question(name)
    buf += record(pointer(12), 5, b"\x03cdn" + pointer(12 + 7), ttl=0xFFFFFFFF)
    buf += record(pointer(12), 1, bytes([198, 51, 100, 7]), ttl=60)
    buf += record(pointer(12), 28, bytes.fromhex("20010db8000000000000000000000001"), ttl=0)
    buf += record(pointer(12), 16, b"\x05hello", ttl=5)
    msg = parse_dns(buf, CTX)
    assert msg.is_response is True
    got = [(a.name.text, a.rtype, a.ttl, a.data) for a in msg.answers]
    assert got == [
        ("dnl-01.geo.kaspersky.com", 5, 0xFFFFFFFF, "cdn.geo.kaspersky.com"),
        ("dnl-01.geo.kaspersky.com", 1, 60, "198.51.100.7"),
        ("dnl-01.geo.kaspersky.com", 28, 0, "2001:db8::1"),
        ("dnl-01.geo.kaspersky.com", 16, 5, ""),
    ]


def test_cname_target_escaped():
    buf = header(flags=0x8180, an=1) + question(dotted("a.example"))
    buf += record(pointer(12), 5, wire_name(b"x.y", b"\x00", b"com"))
    assert parse_dns(buf, CTX).answers[0].data == "x\\.y.\\000.com"


def test_a_record_with_wrong_length_rejected():
    buf = header(flags=0x8180, an=1) + question(dotted("a.example"))
    assert reason(buf + record(pointer(12), 1, b"\x01\x02\x03")) == "dns_bad_rdata"


def test_cname_overrunning_rdata_rejected():
    buf = header(flags=0x8180, an=1) + question(dotted("a.example"))
    rr = pointer(12) + struct.pack(">HHIH", 5, 1, 60, 3) + dotted("longer.example")
    assert reason(buf + rr) == "dns_bad_rdata"


def test_a_in_other_class_has_no_address():
    buf = header(flags=0x8180, an=1) + question(dotted("version.bind"), qtype=16, qclass=3)
    msg = parse_dns(buf + record(pointer(12), 1, b"\x00\x01\x02", rclass=3), CTX)
    assert msg.answers[0].data == ""


def test_mdns_cache_flush_class_still_decoded():
    buf = header(ident=0, flags=0x8400, qd=0, an=1)
    msg = parse_dns(buf + record(dotted("host.local"), 1, bytes([10, 0, 0, 5]), rclass=0x8001),
                    CTX)
    assert msg.answers[0].data == "10.0.0.5"


def test_answers_capped_and_sections_walked():
    count = MAX_ANSWERS + 10
    buf = header(flags=0x8180, an=count, ns=1, ar=1) + question(dotted("a.example"))
    for i in range(count):
        buf += record(pointer(12), 1, bytes([10, 0, i // 256, i % 256]))
    buf += record(pointer(12), 2, dotted("ns.example"))
    buf += b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0)  # EDNS OPT
    msg = parse_dns(buf, CTX)
    assert len(msg.answers) == MAX_ANSWERS
    assert msg.answers[-1].data == f"10.0.0.{MAX_ANSWERS - 1}"


def test_truncated_additional_section_rejected():
    buf = header(flags=0x8180, an=1, ar=1) + question(dotted("a.example"))
    buf += record(pointer(12), 1, bytes(4))
    assert reason(buf + b"\x00\x00\x29") == "dns_truncated"


@pytest.mark.parametrize("cut", [0, 5, 11, 13, 20, 27])
def test_short_buffers_truncated(cut):
    buf = header(flags=0x8180, an=1) + question(dotted("a.example"))
    buf += record(pointer(12), 1, bytes(4))
    assert reason(buf[:cut]) == "dns_truncated"


def test_scapy_built_response():
    pkt = DNS(id=7, qr=1, rd=1, ra=1, qd=DNSQR(qname="dnl-01.geo.kaspersky.com", qtype="A"),
              an=[DNSRR(rrname="dnl-01.geo.kaspersky.com", type="CNAME", rdata="x.akamai.net",
                        ttl=30),
                  DNSRR(rrname="x.akamai.net", type="A", rdata="23.1.2.3", ttl=60),
                  DNSRR(rrname="x.akamai.net", type="AAAA", rdata="2a02:26f0::1", ttl=61)])
    msg = parse_dns(bytes(pkt), CTX)
    assert msg.id == 7 and msg.is_response
    assert msg.questions[0].name.text == "dnl-01.geo.kaspersky.com"
    assert [(a.name.text, a.rtype, a.ttl, a.data) for a in msg.answers] == [
        ("dnl-01.geo.kaspersky.com", 5, 30, "x.akamai.net"),
        ("x.akamai.net", 1, 60, "23.1.2.3"),
        ("x.akamai.net", 28, 61, "2a02:26f0::1"),
    ]


def _dpkt_view(buf: bytes):
    ref = dpkt.dns.DNS(buf)
    rdata = []
    for rr in ref.an:
        if rr.type == 1:
            rdata.append(dpkt.utils.inet_to_str(rr.ip))
        elif rr.type == 28:
            rdata.append(dpkt.utils.inet_to_str(rr.ip6))
        elif rr.type == 5:
            rdata.append(rr.cname)
        else:
            rdata.append("")
    return (ref.id, bool(ref.qr), ref.opcode, ref.rcode,
            [(q.name, q.type, q.cls) for q in ref.qd],
            [(rr.name, rr.type, rr.ttl) for rr in ref.an], rdata)


def _our_view(buf: bytes):
    msg = parse_dns(buf, CTX)
    return (msg.id, msg.is_response, msg.opcode, msg.rcode,
            [(q.name.text, q.qtype, q.qclass) for q in msg.questions],
            [(a.name.text, a.rtype, a.ttl) for a in msg.answers], [a.data for a in msg.answers])


@pytest.mark.parametrize("pkt", [
    DNS(id=1, rd=1, qd=DNSQR(qname="ksn-a-stat-geo.kaspersky-labs.com", qtype="A")),
    DNS(id=2, qr=1, rcode=3, qd=DNSQR(qname="nosuch.kaspersky.com", qtype="AAAA")),
    DNS(id=3, qr=1, qd=DNSQR(qname="ds.kaspersky.com"),
        an=[DNSRR(rrname="ds.kaspersky.com", type="CNAME", rdata="ds.geo.kaspersky.com", ttl=9),
            DNSRR(rrname="ds.geo.kaspersky.com", type="A", rdata="77.74.181.1", ttl=3600),
            DNSRR(rrname="ds.geo.kaspersky.com", type="TXT", rdata="v=1", ttl=1)]),
    DNS(id=4, qr=1, qd=DNSQR(qname="example.org", qtype="AAAA"),
        an=DNSRR(rrname="example.org", type="AAAA", rdata="2606:2800:220:1::", ttl=86400)),
], ids=["query", "nxdomain", "cname_chain", "aaaa"])
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_matches_dpkt_on_normal_packets(pkt, compressed):
    buf = bytes(pkt.compress() if compressed else pkt)
    assert _our_view(buf) == _dpkt_view(buf)


# --- DNS over TCP -----------------------------------------------------------------------------

def framed(msg: bytes) -> bytes:
    return struct.pack(">H", len(msg)) + msg


def test_tcp_two_messages_in_one_buffer():
    first, second = query("a.kaspersky.com"), query("b.kaspersky.com", qtype=28)
    stream = framed(first) + framed(second)
    messages, used = split_tcp_dns(stream)
    assert messages == [first, second]
    assert used == len(stream)
    assert parse_dns(messages[1], CTX).questions[0].name.text == "b.kaspersky.com"


def test_tcp_message_split_across_buffers():
    first, second = query("a.kaspersky.com"), query("b.kaspersky.com")
    stream = framed(first) + framed(second)
    cut = len(framed(first)) + 7
    messages, used = split_tcp_dns(stream[:cut])
    assert messages == [first]
    assert used == len(framed(first))
    messages, used2 = split_tcp_dns(stream[used:])
    assert messages == [second]
    assert used2 == len(framed(second))


@pytest.mark.parametrize("stream", [b"", b"\x00", b"\x00\x20", b"\x00\x20abc"])
def test_tcp_incomplete_consumes_nothing(stream):
    assert split_tcp_dns(stream) == ([], 0)


def test_tcp_zero_length_rejected():
    with pytest.raises(DecodeError) as err:
        split_tcp_dns(framed(query("a.example")) + b"\x00\x00")
    assert err.value.reason == "dns_tcp_zero_length"


# --- hostile input ----------------------------------------------------------------------------

VALID = [
    bytes(DNS(id=3, qr=1, qd=DNSQR(qname="ds.kaspersky.com"),
              an=[DNSRR(rrname="ds.kaspersky.com", type="CNAME", rdata="ds.geo.kaspersky.com"),
                  DNSRR(rrname="ds.geo.kaspersky.com", type="A", rdata="77.74.181.1"),
                  DNSRR(rrname="ds.geo.kaspersky.com", type="AAAA", rdata="::1")]).compress()),
    query("dnl-01.geo.kaspersky.com"),
    header(flags=0x8180, an=1, ns=1, ar=1) + question(dotted("a.example"))
    + record(pointer(12), 5, b"\x01b" + pointer(12)) + record(pointer(12), 2, pointer(12))
    + b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0),
]


def _parses_or_decode_error(buf: bytes) -> None:
    try:
        msg = parse_dns(buf, CTX)
    except DecodeError as err:
        assert err.reason.startswith("dns_")
        return
    for item in msg.questions + msg.answers:
        item.name.text  # noqa: B018 - rendering must not fail either


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_random_bytes_only_decode_error(buf):
    _parses_or_decode_error(buf)


@settings(max_examples=300)
@given(st.binary(min_size=12, max_size=12), st.binary(max_size=300))
def test_random_body_behind_plausible_header(head, body):
    # small section counts make the random body actually get walked
    counts = struct.pack(">HHHH", *(b % 4 for b in head[4:8]))
    _parses_or_decode_error(head[:4] + counts + body)


@settings(max_examples=300)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                         max_size=6),
       st.integers(0, 10_000))
def test_mutated_valid_messages_only_decode_error(base, flips, cut):
    buf = bytearray(base)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    _parses_or_decode_error(bytes(buf[:cut % (len(buf) + 1)]))


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_split_tcp_random_streams(stream):
    try:
        messages, used = split_tcp_dns(stream)
    except DecodeError as err:
        assert err.reason == "dns_tcp_zero_length"
        return
    assert 0 <= used <= len(stream)
    assert sum(len(m) + 2 for m in messages) == used
    assert b"".join(framed(m) for m in messages) == stream[:used]
