"""Link layers, tunnels, IP options/extension headers, fragments, dedup: through the real decoder."""

import struct

import pytest
from scapy.all import (GRE, IP, UDP, VXLAN, Dot1AD, Dot1Q, Ether, IPv6, IPv6ExtHdrDestOpt,
                       IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, PPPoE, PPP, TCP, Raw, fragment,
                       CookedLinux, fragment6)
from scapy.contrib.erspan import ERSPAN_II, ERSPAN_III
from scapy.contrib.geneve import GENEVE
from scapy.contrib.mpls import MPLS
from scapy.layers.dns import DNS, DNSQR

from sensor.decode import link
from sensor.decode.packet import DecoderConfig, PacketDecoder
from sensor.records import DecodeError, DnsMessage, FlowStart
from sensor.stats import Stats

SYN = TCP(sport=40000, dport=443, flags="S", seq=1000)
INNER = IP(src="10.1.2.3", dst="192.0.2.10") / SYN


def decode(frame, linktype=1, ts=1.0, decoder=None):
    decoder = decoder or PacketDecoder(Stats(), DecoderConfig(dedup_window=0))
    return decoder.decode(ts, linktype, bytes(frame)), decoder


def flow_start(records):
    starts = [r for r in records if isinstance(r, FlowStart)]
    assert len(starts) == 1, records
    return starts[0].ctx


def test_ethernet_vlan_stack_any_depth():
    frame = Ether(src="00:11:22:33:44:55", dst="66:77:88:99:aa:bb") / Dot1AD(vlan=100) / \
        Dot1Q(vlan=200) / Dot1Q(vlan=300) / INNER
    ctx = flow_start(decode(frame)[0])
    assert ctx.vlan == (100, 200, 300)
    assert ctx.src_mac == "00:11:22:33:44:55" and ctx.dst_mac == "66:77:88:99:aa:bb"
    assert (ctx.src_ip, ctx.dst_ip, ctx.dst_port, ctx.transport) == ("10.1.2.3", "192.0.2.10", 443, "tcp")


def test_vlan_depth_is_bounded():
    frame = Ether() / (Dot1Q(vlan=1) / Dot1Q(vlan=1) / Dot1Q(vlan=1) / Dot1Q(vlan=1) / Dot1Q(vlan=1)
                       / Dot1Q(vlan=1) / Dot1Q(vlan=1) / Dot1Q(vlan=1) / Dot1Q(vlan=1)) / INNER
    records, dec = decode(frame)
    assert not records and dec.stats.malformed["vlan_too_deep"] == 1


def test_ipv4_options_are_skipped():
    pkt = Ether() / IP(src="10.0.0.1", dst="192.0.2.1", options=b"\x94\x04\x00\x00" * 3) / SYN
    assert flow_start(decode(pkt)[0]).src_ip == "10.0.0.1"


def test_ipv6_extension_headers():
    pkt = Ether() / IPv6(src="fd00::1", dst="2001:db8::1") / IPv6ExtHdrHopByHop() / \
        IPv6ExtHdrDestOpt() / SYN
    ctx = flow_start(decode(pkt)[0])
    assert (ctx.src_ip, ctx.dst_ip, ctx.ip_version) == ("fd00::1", "2001:db8::1", 6)


@pytest.mark.parametrize("linktype,frame", [
    (113, CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6, src=b"\x00\x11\x22\x33\x44\x55\x00\x00", proto=0x0800) / INNER),
    (101, INNER),
    (228, INNER),
    (229, IPv6(src="fd00::5", dst="2001:db8::9") / SYN),
    (0, struct.pack("<I", 2) + bytes(INNER)),
])
def test_link_types(linktype, frame):
    ctx = flow_start(decode(frame, linktype)[0])
    assert ctx.dst_port == 443


def test_linux_sll2():
    header = struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\x00\x11\x22\x33\x44\x55\x00\x00")
    ctx = flow_start(decode(header + bytes(INNER), 276)[0])
    assert ctx.src_mac == "00:11:22:33:44:55" and ctx.src_ip == "10.1.2.3"


def test_unknown_linktype_is_counted():
    records, dec = decode(bytes(INNER), 147)
    assert not records and dec.stats.malformed["unsupported_linktype"] == 1


def test_mpls_stack():
    frame = Ether(type=0x8847) / MPLS(label=16, s=0) / MPLS(label=17, s=1) / INNER
    assert flow_start(decode(frame)[0]).src_ip == "10.1.2.3"


def test_pppoe_session():
    frame = Ether() / PPPoE(sessionid=7) / PPP(proto=0x0021) / INNER
    assert flow_start(decode(frame)[0]).src_ip == "10.1.2.3"


OUTER = Ether() / IP(src="172.16.0.1", dst="172.16.0.2")


@pytest.mark.parametrize("frame,label", [
    (OUTER / GRE(key_present=1, key=77, seqnum_present=1, seqence_number=5, chksum_present=1) / INNER, "gre key=77"),
    (OUTER / GRE(proto=0x88BE, seqnum_present=1) / ERSPAN_II(session_id=12) / Ether() / INNER, "erspan2 session=12"),
    (OUTER / GRE(proto=0x22EB, seqnum_present=1) / ERSPAN_III(session_id=9) / Ether() / INNER, "erspan3 session=9"),
    (OUTER / UDP(sport=5555, dport=4789) / VXLAN(vni=4242) / Ether() / INNER, "vxlan vni=4242"),
    (OUTER / UDP(sport=5555, dport=6081) / GENEVE(vni=99, proto=0x6558) / Ether() / INNER, "geneve vni=99"),
])
def test_tunnels_give_inner_addresses_and_label(frame, label):
    ctx = flow_start(decode(frame)[0])
    assert (ctx.src_ip, ctx.dst_ip) == ("10.1.2.3", "192.0.2.10")
    assert ctx.tunnel == (label,)


def test_nested_tunnels_are_bounded():
    pkt = INNER
    for _ in range(6):
        pkt = IP(src="172.16.0.1", dst="172.16.0.2") / GRE() / pkt
    records, dec = decode(Ether() / pkt)
    assert not records and dec.stats.malformed["tunnel_too_deep"] == 1


def _dns_query(name="s07.upd.kaspersky.com", pad=0):
    return DNS(id=7, rd=1, qd=DNSQR(qname=name)) / Raw(b"\x00" * pad) if pad else DNS(id=7, rd=1, qd=DNSQR(qname=name))


def test_ipv4_fragments_reassemble_in_any_order():
    pkt = IP(src="10.0.0.5", dst="10.0.0.53", id=321) / UDP(sport=5353, dport=53) / DNS(
        id=7, rd=1, qd=DNSQR(qname="s07.upd.kaspersky.com"), ar=None)
    frags = fragment(pkt, fragsize=16)
    assert len(frags) > 2
    dec = PacketDecoder(Stats(), DecoderConfig(dedup_window=0))
    out = []
    for frag in reversed(frags):
        out += dec.decode(1.0, 1, bytes(Ether() / frag))
    dns = [r for r in out if isinstance(r, DnsMessage)]
    assert len(dns) == 1 and dns[0].questions[0].name.text == "s07.upd.kaspersky.com"


def test_ipv6_fragments_reassemble():
    pkt = IPv6(src="fd00::5", dst="fd00::53") / IPv6ExtHdrFragment(id=99) / UDP(sport=5353, dport=53) / \
        DNS(id=7, rd=1, qd=DNSQR(qname="dc1.ksn.kaspersky-labs.com"))
    frags = fragment6(pkt, 80)
    assert len(frags) >= 2
    dec = PacketDecoder(Stats(), DecoderConfig(dedup_window=0))
    out = []
    for frag in frags:
        out += dec.decode(1.0, 1, bytes(Ether() / frag))
    dns = [r for r in out if isinstance(r, DnsMessage)]
    assert [q.name.text for q in dns[0].questions] == ["dc1.ksn.kaspersky-labs.com"]


def test_overlapping_fragments_follow_bsd_policy():
    from sensor.decode.fragments import Reassembler

    stats = Stats()
    r = Reassembler(stats)
    assert r.add(("k",), 1.0, 8, True, b"BBBBBBBB") is None
    assert r.add(("k",), 1.0, 8, True, b"XXXXXXXX") is None  # same offset: first one wins
    assert r.add(("k",), 1.0, 4, True, b"CCCCCCCC") is None  # starts earlier: it wins the overlap
    assert r.add(("k",), 1.0, 16, False, b"DD") is None
    whole = r.add(("k",), 1.0, 0, True, b"AAAA")
    assert whole == b"AAAACCCCCCCCBBBBDD"
    assert stats.malformed["frag_overlap"] >= 2


def test_incomplete_fragments_expire_and_are_counted():
    from sensor.decode.fragments import Reassembler

    stats = Stats()
    r = Reassembler(stats, timeout=30)
    r.add(("a",), 1.0, 8, False, b"tail")
    r.expire(100.0)
    assert stats.malformed["frag_timeout"] == 1 and not r.pending and r.bytes == 0


def test_fragment_table_is_capped():
    from sensor.decode.fragments import Reassembler

    stats = Stats()
    r = Reassembler(stats, max_datagrams=10)
    for i in range(100):
        r.add((i,), 1.0, 8, True, b"x" * 8)
    assert len(r.pending) <= 10 and stats.evictions["fragments"] == 90


def test_span_duplicates_are_suppressed_within_window():
    frame = bytes(Ether() / IP(src="10.0.0.5", dst="10.0.0.53") / UDP(sport=5353, dport=53) / _dns_query())
    stats = Stats()
    dec = PacketDecoder(stats, DecoderConfig(dedup_window=0.05))
    first = dec.decode(1.0, 1, frame)
    second = dec.decode(1.001, 1, frame)
    later = dec.decode(2.0, 1, frame)
    assert any(isinstance(r, DnsMessage) for r in first)
    assert second == [] and stats.duplicates == 1
    assert any(isinstance(r, DnsMessage) for r in later)


def test_duplicate_with_vlan_tag_on_one_copy_only():
    inner = IP(src="10.0.0.5", dst="10.0.0.53") / UDP(sport=5353, dport=53) / _dns_query()
    stats = Stats()
    dec = PacketDecoder(stats, DecoderConfig(dedup_window=0.05))
    dec.decode(1.0, 1, bytes(Ether() / Dot1Q(vlan=5) / inner))
    assert dec.decode(1.0, 1, bytes(Ether() / inner)) == [] and stats.duplicates == 1


def test_fast_open_syn_data_starts_the_stream_and_its_span_copy_does_not_restart_it():
    """RFC 7413: a SYN's data is the stream's first bytes.  Here the SYN holds the first
    900 bytes of a post-quantum hello whose SNI is in the rest; a span copy of the SYN
    must not reset the stream, or the hello could never be completed."""
    import random

    from tests.helpers import load_make_samples
    from sensor.records import ClientHello
    hello = load_make_samples().client_hello(random.Random(5), b"dc1.ksn.kaspersky-labs.com",
                                             post_quantum=True, sni_last=True)
    head, rest = hello[:900], hello[900:]
    ip = IP(src="10.0.0.5", dst="192.0.2.70")
    syn = bytes(Ether() / ip / TCP(sport=40000, dport=443, flags="S", seq=7000,
                                   options=[(34, b"cookie!!")]) / Raw(head))
    follow = bytes(Ether() / ip / TCP(sport=40000, dport=443, flags="PA", seq=7001 + len(head),
                                      ack=1) / Raw(rest))
    stats = Stats()
    dec = PacketDecoder(stats, DecoderConfig(dedup_window=0.05))
    records = dec.decode(1.0, 1, syn) + dec.decode(1.000003, 1, syn) + dec.decode(1.01, 1, follow)
    hellos = [r for r in records if isinstance(r, ClientHello)]
    assert [h.server_name.text for h in hellos] == ["dc1.ksn.kaspersky-labs.com"]
    assert stats.duplicates == 1
    key = bytes((10, 0, 0, 5, 192, 0, 2, 70)) + struct.pack("!HH", 40000, 443)
    flow = dec.loss.flows[key]  # the SYN's bytes count as seen: the stream is whole past them
    assert flow.expect == 7001 + len(hello) and flow.holes is None


def test_udp_flow_start_once_per_flow_both_directions():
    dec = PacketDecoder(Stats(), DecoderConfig(dedup_window=0))
    a = IP(src="10.0.0.5", dst="10.0.0.9") / UDP(sport=40000, dport=15000) / Raw(b"x")
    b = IP(src="10.0.0.9", dst="10.0.0.5") / UDP(sport=15000, dport=40000) / Raw(b"y")
    starts = [r for f in (a, b, a) for r in dec.decode(1.0, 101, bytes(f)) if isinstance(r, FlowStart)]
    assert len(starts) == 1 and starts[0].ctx.dst_port == 15000


@pytest.mark.parametrize("sport,dport,starts", [(51000, 443, 1), (443, 51000, 0), (50443, 51000, 1)],
                         ids=["client", "server", "between_ephemeral_ports"])
def test_a_quic_long_header_starts_a_udp_flow_unless_a_server_sent_it(sport, dport, starts):
    """As the capture filter decides (a server's long headers never pass it), so a read
    without the filter finds the same flow starts."""
    dec = PacketDecoder(Stats(), DecoderConfig(dedup_window=0))
    frame = IP(src="10.0.0.5", dst="10.0.0.9") / UDP(sport=sport, dport=dport) / Raw(b"\xe3" + bytes(60))
    found = [r for r in dec.decode(1.0, 101, bytes(frame)) if isinstance(r, FlowStart)]
    assert len(found) == starts


@pytest.mark.parametrize("cut", range(0, 60, 3))
def test_truncated_frames_never_raise(cut):
    frame = bytes(Ether() / Dot1Q(vlan=3) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53) / _dns_query())
    dec = PacketDecoder(Stats())
    dec.decode(1.0, 1, frame[:cut])


def test_link_decoders_raise_decode_error_only():
    for fn in link.LINK_DECODERS.values():
        for size in range(0, 24):
            try:
                fn(b"\x81\x00" * size, 0)
            except DecodeError:
                pass
