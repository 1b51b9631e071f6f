"""DHCPv4, DHCPv6 and mDNS -> DhcpLease(mac, ip, hostname): who a host is, not what it runs.

Evidence is attributed by IP, but people remove software from machines they know by
name.  These parsers only pull identity: DHCPv4 chaddr, yiaddr/ciaddr/option 50 and
hostname options 12/81; DHCPv6 client FQDN (39), addresses from IA_NA (3/5) and the
MAC from the client link-layer address option (79), the on-link Ethernet header or a
link-layer DUID; mDNS A/AAAA announcements under ``.local``.

Names from the wire are escaped label by label (``\\DDD``), so a hostile hostname
cannot inject separators or control characters into logs and reports.
"""

from __future__ import annotations

import struct

from ..inet import AF_INET, AF_INET6, inet_ntop
from ..records import DecodeError, DhcpLease, DnsMessage, DomainName, PacketContext, escape_label_bytes

_u16 = struct.Struct("!H").unpack_from
_option6 = struct.Struct("!HH").unpack_from

DHCP4_PORTS = (67, 68)
DHCP6_PORTS = (546, 547)
MAGIC_COOKIE = b"\x63\x82\x53\x63"
DHCP4_FIXED = 236  # BOOTP header up to the magic cookie
CHADDR = slice(28, 34)

# DHCPv4 message types (option 53) and which address field names the client's IP.
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8

# DHCPv6 message types.
SOLICIT, ADVERTISE, REQUEST6, CONFIRM, RENEW, REBIND, REPLY = 1, 2, 3, 4, 5, 6, 7
RELAY_FORW, RELAY_REPL = 12, 13
CLIENT_MESSAGES6 = frozenset((1, 3, 4, 5, 6, 8, 9, 11))
ADDRESS_MESSAGES6 = frozenset((REQUEST6, CONFIRM, RENEW, REBIND, REPLY))
OPT6_CLIENTID, OPT6_IA_NA, OPT6_IAADDR, OPT6_RELAY_MSG, OPT6_FQDN, OPT6_CLIENT_LINKLAYER = 1, 3, 5, 9, 39, 79
MAX_RELAY_DEPTH = 8  # RFC 8415 HOP_COUNT_LIMIT
MAX_MDNS_LEASES = 8
ETHERNET = 1


def parse_dhcp(payload: bytes, ctx: PacketContext) -> DhcpLease | None:
    """A lease-like identity from one DHCP packet, None when it names nobody."""
    data = bytes(payload)
    if ctx.src_port in DHCP6_PORTS or ctx.dst_port in DHCP6_PORTS:
        return _dhcp6(data, ctx)
    return _dhcp4(data, ctx)


def _mac(raw: bytes) -> str:
    return "%02x:%02x:%02x:%02x:%02x:%02x" % tuple(raw)


def _ip4(raw: bytes) -> str | None:
    return None if raw == b"\0\0\0\0" else inet_ntop(AF_INET, raw)


def _text_name(raw: bytes) -> str | None:
    """Option 12 / ASCII option 81: dotted text, some clients add a trailing NUL."""
    raw = raw.rstrip(b"\0")
    if not raw:
        return None
    return DomainName.from_text_bytes(raw).text or None


def _wire_name(data: bytes, pos: int, end: int) -> str | None:
    """Uncompressed wire-format name (RFC 4702/4704 allow a partial name without the root)."""
    labels = []
    while pos < end:
        length = data[pos]
        pos += 1
        if length == 0:
            break
        if length > 63 or pos + length > end:
            raise DecodeError("dhcp_bad_fqdn")
        labels.append(escape_label_bytes(data[pos:pos + length]))
        pos += length
    return ".".join(labels) or None


def _dhcp4(data: bytes, ctx: PacketContext) -> DhcpLease | None:
    end = len(data)
    if end < DHCP4_FIXED + 4:
        raise DecodeError("dhcp_truncated")
    if data[DHCP4_FIXED:DHCP4_FIXED + 4] != MAGIC_COOKIE:
        raise DecodeError("dhcp_bad_cookie")
    op = data[0]
    if op != 1 and op != 2:
        raise DecodeError("dhcp_bad_op")
    msg_type = 0
    requested = None
    short_name = b""
    fqdn = None
    pos = DHCP4_FIXED + 4
    while pos < end:
        code = data[pos]
        if code == 0:
            pos += 1
            continue
        if code == 255:
            break
        if pos + 2 > end:
            raise DecodeError("dhcp_option_truncated")
        start = pos + 2
        stop = start + data[pos + 1]
        if stop > end:
            raise DecodeError("dhcp_option_truncated")
        if code == 53 and stop > start:
            msg_type = data[start]
        elif code == 50 and stop - start == 4:
            requested = _ip4(data[start:stop])
        elif code == 12:
            short_name += data[start:stop]
        elif code == 81 and stop - start >= 3:
            flags = data[start]
            fqdn = _wire_name(data, start + 3, stop) if flags & 0x04 else _text_name(data[start + 3:stop])
        pos = stop
    mac = _mac(data[CHADDR]) if data[1] == ETHERNET and data[2] == 6 else ""
    ciaddr = _ip4(data[12:16])
    if msg_type == ACK:
        ip = _ip4(data[16:20]) or ciaddr
    elif msg_type == REQUEST:
        ip = requested or ciaddr
    elif msg_type == INFORM:
        ip = ciaddr
    elif msg_type == 0:  # plain BOOTP
        ip = _ip4(data[16:20]) if op == 2 else ciaddr
    else:
        ip = None
    hostname = fqdn or _text_name(short_name)
    return _lease(ctx, mac, ip, hostname)


def _lease(ctx: PacketContext, mac: str, ip: str | None, hostname: str | None) -> DhcpLease | None:
    if (mac and (ip or hostname)) or (ip and hostname):
        return DhcpLease(ctx, mac, ip, hostname)
    return None


def _options6(data: bytes, pos: int, end: int):
    """Yield (code, start, stop) of each option in data[pos:end]."""
    while pos < end:
        if pos + 4 > end:
            raise DecodeError("dhcp6_option_truncated")
        code, length = _option6(data, pos)
        start = pos + 4
        stop = start + length
        if stop > end:
            raise DecodeError("dhcp6_option_truncated")
        yield code, start, stop
        pos = stop


def _duid_mac(data: bytes, start: int, stop: int) -> str:
    """The link-layer address inside a DUID-LLT (1) or DUID-LL (3) of an Ethernet client."""
    if stop - start < 4:
        return ""
    duid_type, hw_type = _option6(data, start)
    if hw_type != ETHERNET:
        return ""
    offset = start + (8 if duid_type == 1 else 4 if duid_type == 3 else stop - start)
    return _mac(data[offset:stop]) if stop - offset == 6 else ""


def _dhcp6(data: bytes, ctx: PacketContext) -> DhcpLease | None:
    end = len(data)
    if end < 4:
        raise DecodeError("dhcp6_truncated")
    link_mac = ""
    pos = 0
    relayed = False
    for _ in range(MAX_RELAY_DEPTH + 1):
        msg_type = data[pos]
        if msg_type != RELAY_FORW and msg_type != RELAY_REPL:
            break
        relayed = True
        if end - pos < 34:
            raise DecodeError("dhcp6_truncated")
        inner = None
        for code, start, stop in _options6(data, pos + 34, end):
            if code == OPT6_RELAY_MSG:
                inner = (start, stop)
            elif code == OPT6_CLIENT_LINKLAYER and stop - start == 8 and _u16(data, start)[0] == ETHERNET:
                link_mac = _mac(data[start + 2:stop])
        if inner is None:
            return None
        pos, end = inner
        if end - pos < 4:
            raise DecodeError("dhcp6_truncated")
    else:
        raise DecodeError("dhcp6_relay_too_deep")
    duid_mac = ""
    address = None
    hostname = None
    for code, start, stop in _options6(data, pos + 4, end):
        if code == OPT6_CLIENTID:
            duid_mac = _duid_mac(data, start, stop)
        elif code == OPT6_FQDN and stop > start:
            hostname = _wire_name(data, start + 1, stop)
        elif code == OPT6_IA_NA and address is None and stop - start >= 12:
            for sub, sub_start, sub_stop in _options6(data, start + 12, stop):
                if sub == OPT6_IAADDR and sub_stop - sub_start >= 24:
                    address = inet_ntop(AF_INET6, data[sub_start:sub_start + 16])
                    break
    if not relayed:
        on_link = ctx.src_mac if msg_type in CLIENT_MESSAGES6 else ctx.dst_mac
        link_mac = link_mac or on_link or ""
    mac = link_mac or duid_mac
    ip = address if msg_type in ADDRESS_MESSAGES6 else None
    return _lease(ctx, mac, ip, hostname)


def mdns_leases(msg: DnsMessage) -> list[DhcpLease]:
    """Hostnames from mDNS A/AAAA records under ``.local``; the MAC only for the sender's own address."""
    out: list[DhcpLease] = []
    ctx = msg.ctx
    for answer in msg.answers:
        if answer.rtype != 1 and answer.rtype != 28:
            continue
        labels = answer.name.labels
        if len(labels) < 2 or labels[-1].lower() != b"local" or not answer.data:
            continue
        ip = answer.data
        if ip.startswith("169.254.") or ip.lower().startswith("fe80:"):
            continue
        hostname = ".".join(escape_label_bytes(label) for label in labels[:-1])
        mac = (ctx.src_mac or "") if ip == ctx.src_ip else ""
        out.append(DhcpLease(ctx, mac, ip, hostname))
        if len(out) >= MAX_MDNS_LEASES:
            break
    return out
