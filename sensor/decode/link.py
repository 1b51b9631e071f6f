"""Link layers: find where the network-layer packet starts without building objects.

Every function returns ``(ethertype, offset, src_mac, dst_mac, vlans)`` or raises
DecodeError.  MACs are raw 6-byte slices (formatted only when a record is built).
"""

from __future__ import annotations

import struct

from ..records import DecodeError

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_VLAN_TAGS = (0x8100, 0x88A8, 0x9100, 0x9200)
ETH_MPLS = (0x8847, 0x8848)
ETH_PPPOE_SESSION = 0x8864
ETH_TEB = 0x6558  # transparent Ethernet bridging (Ethernet inside GRE/Geneve)

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_LEGACY = 12
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

MAX_VLAN_DEPTH = 8
MAX_MPLS_DEPTH = 16

_H = struct.Struct("!H")
_u16 = _H.unpack_from
_u32 = struct.Struct("!I").unpack_from
_le32 = struct.Struct("<I").unpack_from

# BSD loopback address families that mean IPv6 on the various BSDs.
_NULL_AF_INET6 = {24, 28, 30}


def format_mac(raw: bytes | None) -> str | None:
    if not raw:
        return None
    return raw.hex(":")


def ethernet(data: bytes, off: int):
    """Ethernet II with any depth of 802.1Q/802.1ad tags (bounded) and MPLS / PPPoE below it."""
    if len(data) < off + 14:
        raise DecodeError("eth_truncated")
    dst = data[off:off + 6]
    src = data[off + 6:off + 12]
    etype, off, vlans = _behind_type(data, _u16(data, off + 12)[0], off + 14)
    return etype, off, src, dst, vlans


def _behind_type(data: bytes, etype: int, off: int):
    """(type, offset, VLAN ids) of what an Ethernet-style type field announces at ``off``:
    VLAN tags walked (bounded), MPLS and PPPoE sessions opened.  Linux cooked headers end
    with such a field, and libpcap puts the tag the kernel removed back behind it."""
    vlans = ()
    depth = 0
    while etype in ETH_VLAN_TAGS:
        depth += 1
        if depth > MAX_VLAN_DEPTH:
            raise DecodeError("vlan_too_deep")
        if len(data) < off + 4:
            raise DecodeError("vlan_truncated")
        vlans += (_u16(data, off)[0] & 0x0FFF,)
        etype = _u16(data, off + 2)[0]
        off += 4
    if etype in ETH_MPLS:
        etype, off = mpls(data, off)
    elif etype == ETH_PPPOE_SESSION:
        etype, off = pppoe_session(data, off)
    return etype, off, vlans


def mpls(data: bytes, off: int):
    """Walk an MPLS label stack to its bottom and guess the payload from the IP version nibble."""
    for _ in range(MAX_MPLS_DEPTH):
        if len(data) < off + 4:
            raise DecodeError("mpls_truncated")
        entry = _u32(data, off)[0]
        off += 4
        if entry & 0x100:
            break
    else:
        raise DecodeError("mpls_too_deep")
    if len(data) <= off:
        raise DecodeError("mpls_truncated")
    version = data[off] >> 4
    if version == 4:
        return ETH_IPV4, off
    if version == 6:
        return ETH_IPV6, off
    raise DecodeError("mpls_unknown_payload")


_PPP_IPV4 = 0x0021
_PPP_IPV6 = 0x0057


def pppoe_session(data: bytes, off: int):
    if len(data) < off + 8:
        raise DecodeError("pppoe_truncated")
    if data[off] != 0x11:
        raise DecodeError("pppoe_bad_version")
    proto = _u16(data, off + 6)[0]
    if proto == _PPP_IPV4:
        return ETH_IPV4, off + 8
    if proto == _PPP_IPV6:
        return ETH_IPV6, off + 8
    return proto, off + 8


def _raw_ip(data: bytes, off: int):
    if len(data) <= off:
        raise DecodeError("raw_truncated")
    version = data[off] >> 4
    if version == 4:
        return ETH_IPV4, off, None, None, ()
    if version == 6:
        return ETH_IPV6, off, None, None, ()
    raise DecodeError("raw_bad_version")


# Linux cooked headers: SLL's ends with its type field, SLL2's opens with it; the network
# header follows.  By link type, where the type field stands and the network header starts
# (capture.bpf's filter and the decoder's batch loop read them so).
SLL_HEADER = 16
SLL2_HEADER = 20
COOKED_HEADERS = {LINKTYPE_LINUX_SLL: (SLL_HEADER - 2, SLL_HEADER), LINKTYPE_LINUX_SLL2: (0, SLL2_HEADER)}


def linux_sll(data: bytes, off: int):
    if len(data) < off + SLL_HEADER:
        raise DecodeError("sll_truncated")
    halen = _u16(data, off + 4)[0]
    src = data[off + 6:off + 12] if halen == 6 else None
    etype, off, vlans = _behind_type(data, _u16(data, off + SLL_HEADER - 2)[0], off + SLL_HEADER)
    return etype, off, src, None, vlans


def linux_sll2(data: bytes, off: int):
    if len(data) < off + SLL2_HEADER:
        raise DecodeError("sll2_truncated")
    halen = data[off + 11]
    src = data[off + 12:off + 18] if halen == 6 else None
    etype, off, vlans = _behind_type(data, _u16(data, off)[0], off + SLL2_HEADER)
    return etype, off, src, None, vlans


def null_loopback(data: bytes, off: int):
    if len(data) < off + 4:
        raise DecodeError("null_truncated")
    family = _le32(data, off)[0]
    if family > 0xFFFF:
        family = _u32(data, off)[0]
    if family == 2:
        return ETH_IPV4, off + 4, None, None, ()
    if family in _NULL_AF_INET6:
        return ETH_IPV6, off + 4, None, None, ()
    raise DecodeError("null_unknown_family")


def _ipv4_only(data: bytes, off: int):
    return ETH_IPV4, off, None, None, ()


def _ipv6_only(data: bytes, off: int):
    return ETH_IPV6, off, None, None, ()


LINK_DECODERS = {
    LINKTYPE_ETHERNET: ethernet,
    LINKTYPE_LINUX_SLL: linux_sll,
    LINKTYPE_LINUX_SLL2: linux_sll2,
    LINKTYPE_RAW: _raw_ip,
    LINKTYPE_RAW_LEGACY: _raw_ip,
    LINKTYPE_IPV4: _ipv4_only,
    LINKTYPE_IPV6: _ipv6_only,
    LINKTYPE_NULL: null_loopback,
    LINKTYPE_LOOP: null_loopback,
}
