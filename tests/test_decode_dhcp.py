"""DHCPv4 / DHCPv6 / mDNS identity parsing, on scapy-built packets and hostile bytes."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import BOOTP, DHCP
from scapy.layers.dhcp6 import (DHCP6_Advertise, DHCP6_RelayForward, DHCP6_Reply, DHCP6_Request, DHCP6_Solicit,
                                DHCP6OptClientFQDN, DHCP6OptClientId, DHCP6OptClientLinkLayerAddr, DHCP6OptIA_NA,
                                DHCP6OptIAAddress, DHCP6OptRelayMsg, DUID_EN, DUID_LL, DUID_LLT)

from sensor.decode.dhcp import mdns_leases, parse_dhcp
from sensor.records import DecodeError, DhcpLease, DnsAnswer, DnsMessage, DomainName, PacketContext

MAC = bytes.fromhex("aabbcc000001")


def v4ctx(sport=68, dport=67, src="0.0.0.0", dst="255.255.255.255"):
    return PacketContext(1.0, src, dst, sport, dport, "udp", 4, "02:00:00:00:00:99", "ff:ff:ff:ff:ff:ff")


def v6ctx(sport=546, dport=547, src_mac="aa:bb:cc:00:00:0e", dst_mac="33:33:00:01:00:02"):
    return PacketContext(1.0, "fe80::1", "ff02::1:2", sport, dport, "udp", 6, src_mac, dst_mac)


def dhcp4(options, op=1, ciaddr="0.0.0.0", yiaddr="0.0.0.0", chaddr=MAC, htype=1, hlen=6):
    return bytes(BOOTP(op=op, htype=htype, hlen=hlen, chaddr=chaddr, ciaddr=ciaddr, yiaddr=yiaddr)
                 / DHCP(options=options + ["end"]))


def test_dhcp4_request_with_hostname_and_requested_address():
    raw = dhcp4([("message-type", "request"), ("requested_addr", "10.0.3.5"), ("hostname", b"FINANCE-PC7")])
    lease = parse_dhcp(raw, v4ctx())
    assert (lease.mac, lease.ip, lease.hostname) == ("aa:bb:cc:00:00:01", "10.0.3.5", "FINANCE-PC7")


def test_dhcp4_ack_uses_yiaddr_from_the_server_reply():
    raw = dhcp4([("message-type", "ack")], op=2, yiaddr="10.0.3.6")
    lease = parse_dhcp(raw, v4ctx(67, 68, "10.0.0.1", "10.0.3.6"))
    assert (lease.mac, lease.ip, lease.hostname) == ("aa:bb:cc:00:00:01", "10.0.3.6", None)


def test_dhcp4_renewal_and_inform_use_ciaddr():
    for kind in ("request", "inform"):
        lease = parse_dhcp(dhcp4([("message-type", kind), ("hostname", b"x")], ciaddr="10.0.3.7"), v4ctx())
        assert lease.ip == "10.0.3.7"


def test_dhcp4_discover_gives_hostname_but_no_address_and_offer_gives_nothing():
    lease = parse_dhcp(dhcp4([("message-type", "discover"), ("requested_addr", "10.0.3.8"),
                              ("hostname", b"LAB-1\x00")]), v4ctx())
    assert (lease.ip, lease.hostname) == (None, "LAB-1")
    assert parse_dhcp(dhcp4([("message-type", "offer")], op=2, yiaddr="10.0.3.8"), v4ctx(67, 68)) is None


def test_dhcp4_client_fqdn_wire_and_ascii_forms_win_over_option_12():
    wire = b"\x05\x00\x00" + b"\x02pc\x04corp\x07example\x00"
    lease = parse_dhcp(dhcp4([("message-type", "request"), ("hostname", b"PC"), (81, wire),
                              ("requested_addr", "10.0.3.9")]), v4ctx())
    assert lease.hostname == "pc.corp.example"
    ascii_form = b"\x01\x00\x00pc2.corp.example"
    lease = parse_dhcp(dhcp4([("message-type", "request"), (81, ascii_form)], ciaddr="10.0.3.10"), v4ctx())
    assert lease.hostname == "pc2.corp.example"


def test_dhcp4_hostile_hostname_is_escaped():
    lease = parse_dhcp(dhcp4([("message-type", "request"), ("hostname", b"evil\n<b>\x7f\\x"),
                              ("requested_addr", "10.0.3.11")]), v4ctx())
    assert lease.hostname == "evil\\010<b>\\127\\\\x"
    assert "\n" not in lease.hostname


def test_dhcp4_non_ethernet_client_without_hostname_is_ignored():
    raw = dhcp4([("message-type", "ack")], op=2, yiaddr="10.0.3.12", htype=32, hlen=0, chaddr=b"")
    assert parse_dhcp(raw, v4ctx(67, 68)) is None
    raw = dhcp4([("message-type", "request"), ("hostname", b"ib-node"), ("requested_addr", "10.0.3.12")],
                htype=32, hlen=0, chaddr=b"")
    lease = parse_dhcp(raw, v4ctx())
    assert (lease.mac, lease.ip, lease.hostname) == ("", "10.0.3.12", "ib-node")


@pytest.mark.parametrize("raw,reason", [
    (b"\x01" * 100, "dhcp_truncated"),
    (b"\x01" * 236 + b"\x00\x00\x00\x00", "dhcp_bad_cookie"),
    (b"\x07" + b"\x00" * 235 + b"\x63\x82\x53\x63", "dhcp_bad_op"),
    (b"\x01" + b"\x00" * 235 + b"\x63\x82\x53\x63\x0c\x10abc", "dhcp_option_truncated"),
    (b"\x01" + b"\x00" * 235 + b"\x63\x82\x53\x63\x0c", "dhcp_option_truncated"),
    (b"\x01" + b"\x00" * 235 + b"\x63\x82\x53\x63\x51\x05\x04\x00\x00\x50a", "dhcp_bad_fqdn"),
])
def test_dhcp4_malformed(raw, reason):
    with pytest.raises(DecodeError) as err:
        parse_dhcp(raw, v4ctx())
    assert err.value.reason == reason


def test_dhcp6_solicit_fqdn_and_on_link_mac():
    raw = bytes(DHCP6_Solicit(trid=5) / DHCP6OptClientId(duid=DUID_EN(enterprisenum=9, id=b"abc"))
                / DHCP6OptClientFQDN(flags=1, fqdn=b"laptop.corp.example."))
    lease = parse_dhcp(raw, v6ctx())
    assert (lease.mac, lease.ip, lease.hostname) == ("aa:bb:cc:00:00:0e", None, "laptop.corp.example")


def test_dhcp6_reply_address_and_duid_mac_when_no_ethernet_header():
    raw = bytes(DHCP6_Reply(trid=5) / DHCP6OptClientId(duid=DUID_LLT(lladdr="aa:bb:cc:00:00:02", timeval=5))
                / DHCP6OptIA_NA(iaid=1, ianaopts=[DHCP6OptIAAddress(addr="fd00::25")]))
    lease = parse_dhcp(raw, v6ctx(547, 546, src_mac=None, dst_mac=None))
    assert (lease.mac, lease.ip) == ("aa:bb:cc:00:00:02", "fd00::25")
    raw = bytes(DHCP6_Reply(trid=5) / DHCP6OptClientId(duid=DUID_LL(lladdr="aa:bb:cc:00:00:04"))
                / DHCP6OptIA_NA(iaid=1, ianaopts=[DHCP6OptIAAddress(addr="fd00::26")]))
    lease = parse_dhcp(raw, v6ctx(547, 546, src_mac="02:00:00:00:00:01", dst_mac="aa:bb:cc:00:00:05"))
    assert (lease.mac, lease.ip) == ("aa:bb:cc:00:00:05", "fd00::26")


def test_dhcp6_advertise_offers_no_address():
    raw = bytes(DHCP6_Advertise(trid=5) / DHCP6OptClientId(duid=DUID_LL(lladdr="aa:bb:cc:00:00:02"))
                / DHCP6OptIA_NA(iaid=1, ianaopts=[DHCP6OptIAAddress(addr="fd00::27")]))
    assert parse_dhcp(raw, v6ctx(547, 546, src_mac=None, dst_mac=None)) is None


def test_dhcp6_relayed_request_uses_client_link_layer_option():
    inner = DHCP6_Request(trid=9) / DHCP6OptClientFQDN(fqdn=b"srv9.corp.") \
        / DHCP6OptIA_NA(iaid=1, ianaopts=[DHCP6OptIAAddress(addr="fd00::99")])
    raw = bytes(DHCP6_RelayForward(linkaddr="fd00::1", peeraddr="fe80::1")
                / DHCP6OptClientLinkLayerAddr(lltype=1, clladdr="aa:bb:cc:00:00:03")
                / DHCP6OptRelayMsg(message=inner))
    lease = parse_dhcp(raw, v6ctx(547, 547, src_mac="02:00:00:00:00:01"))
    assert (lease.mac, lease.ip, lease.hostname) == ("aa:bb:cc:00:00:03", "fd00::99", "srv9.corp")


def test_dhcp6_relay_nesting_is_bounded():
    raw = bytes(DHCP6_Request(trid=1))
    for _ in range(12):
        raw = struct.pack("!BB16s16s", 12, 0, b"\0" * 16, b"\0" * 16) + struct.pack("!HH", 9, len(raw)) + raw
    with pytest.raises(DecodeError) as err:
        parse_dhcp(raw, v6ctx())
    assert err.value.reason == "dhcp6_relay_too_deep"


@pytest.mark.parametrize("raw,reason", [
    (b"\x01\x00", "dhcp6_truncated"),
    (b"\x01\x00\x00\x05\x00\x27\x00\x10ab", "dhcp6_option_truncated"),
    (b"\x01\x00\x00\x05\x00", "dhcp6_option_truncated"),
    (b"\x0c" + b"\x00" * 20, "dhcp6_truncated"),
])
def test_dhcp6_malformed(raw, reason):
    with pytest.raises(DecodeError) as err:
        parse_dhcp(raw, v6ctx())
    assert err.value.reason == reason


def _dns_ctx(src="10.0.3.7", mac="02:00:00:00:00:07"):
    return PacketContext(1.0, src, "224.0.0.251", 5353, 5353, "udp", 4, mac, "01:00:5e:00:00:fb")


def _ans(text, rtype, data):
    return DnsAnswer(DomainName.from_text_bytes(text.encode()), rtype, 120, data)


def test_mdns_announcements_name_the_sender_and_others():
    msg = DnsMessage(_dns_ctx(), 0, True, 0, 0, [], [
        _ans("Lab-Mac.local", 1, "10.0.3.7"), _ans("Lab-Mac.local", 28, "fe80::1"),
        _ans("printer.local", 1, "10.0.3.50"), _ans("_ipp._tcp.local", 12, "printer._ipp._tcp.local"),
        _ans("www.example.com", 1, "192.0.2.1"), _ans("linklocal.local", 1, "169.254.3.3")])
    leases = mdns_leases(msg)
    assert [(x.mac, x.ip, x.hostname) for x in leases] == [
        ("02:00:00:00:00:07", "10.0.3.7", "Lab-Mac"), ("", "10.0.3.50", "printer")]


def test_mdns_leases_are_capped_per_message():
    answers = [_ans(f"h{i}.local", 1, f"10.0.4.{i}") for i in range(50)]
    assert len(mdns_leases(DnsMessage(_dns_ctx(), 0, True, 0, 0, [], answers))) == 8


def _only_decode_errors(raw, ctx):
    try:
        result = parse_dhcp(raw, ctx)
    except DecodeError as err:
        assert err.reason and err.reason.replace("_", "").isalnum()
        return
    assert result is None or isinstance(result, DhcpLease)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_only_raise_decode_error(raw, v6):
    _only_decode_errors(raw, v6ctx() if v6 else v4ctx())


VALID4 = dhcp4([("message-type", "request"), ("requested_addr", "10.0.3.5"), ("hostname", b"PC"),
                (81, b"\x05\x00\x00\x02pc\x04corp\x00")])
VALID6 = bytes(DHCP6_RelayForward(linkaddr="fd00::1", peeraddr="fe80::1")
               / DHCP6OptClientLinkLayerAddr(lltype=1, clladdr="aa:bb:cc:00:00:03")
               / DHCP6OptRelayMsg(message=DHCP6_Request(trid=9) / DHCP6OptClientFQDN(fqdn=b"srv9.corp.")
                                  / DHCP6OptIA_NA(iaid=1, ianaopts=[DHCP6OptIAAddress(addr="fd00::99")])))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([VALID4, VALID6]), st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)),
                                                  max_size=8), st.integers(0, 700))
def test_mutated_packets_only_raise_decode_error(base, flips, cut):
    raw = bytearray(base)
    for pos, value in flips:
        if pos < len(raw):
            raw[pos] = value
    ctx = v6ctx() if base is VALID6 else v4ctx()
    _only_decode_errors(bytes(raw[:cut] if cut < len(raw) else raw), ctx)
