"""Encapsulations that mirror and cloud traffic arrives in: GRE, ERSPAN I/II/III, VXLAN, Geneve.

Each returns ``(inner_ethertype, offset, label)`` where inner_ethertype is ETH_TEB for an
inner Ethernet frame, or an IP ethertype; ``label`` records the tunnel for the alert.
"""

from __future__ import annotations

import struct

from ..records import DecodeError
from .link import ETH_IPV4, ETH_IPV6, ETH_TEB

VXLAN_PORT = 4789
GENEVE_PORT = 6081

_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from

_GRE_CSUM = 0x8000
_GRE_KEY = 0x2000
_GRE_SEQ = 0x1000
_ERSPAN_II = 0x88BE
_ERSPAN_III = 0x22EB
VXLAN_PORT_BYTES = VXLAN_PORT.to_bytes(2, "big")  # as a UDP header carries it
# GRE's first word as ERSPAN type II sends it: a sequence number, no other flag (which
# fixes where the inner frame starts), and the protocol.  Type III's likewise; its 12-byte
# header then says whether a platform subheader follows (the O flag, last bit of its
# twelfth byte) and what the inner frame is (frame type, five bits of its eleventh byte
# after the P flag: 0 for Ethernet).
ERSPAN_II_GRE = struct.pack("!HH", _GRE_SEQ, _ERSPAN_II)
ERSPAN_III_GRE = struct.pack("!HH", _GRE_SEQ, _ERSPAN_III)
ERSPAN_III_HEADER = 12
ERSPAN_III_FRAME_TYPE_BITS = 0x7C  # of the header's byte 10
ERSPAN_III_SUBHEADER_BIT = 0x01  # of the header's byte 11
_ERSPAN_III_SUBHEADER = 8


def gre(data: bytes, off: int, end: int):
    if end < off + 4:
        raise DecodeError("gre_truncated")
    flags, proto = _u16(data, off)[0], _u16(data, off + 2)[0]
    if flags & 0x7:
        raise DecodeError("gre_unsupported_version")
    pos = off + 4
    key = None
    if flags & _GRE_CSUM:
        pos += 4
    if flags & _GRE_KEY:
        if end < pos + 4:
            raise DecodeError("gre_truncated")
        key = _u32(data, pos)[0]
        pos += 4
    has_seq = bool(flags & _GRE_SEQ)
    if has_seq:
        pos += 4
    if end < pos:
        raise DecodeError("gre_truncated")
    if proto == _ERSPAN_II:
        if not has_seq:
            return ETH_TEB, pos, "erspan1"
        if end < pos + 8:
            raise DecodeError("erspan_truncated")
        session = _u16(data, pos + 2)[0] & 0x03FF
        return ETH_TEB, pos + 8, f"erspan2 session={session}"
    if proto == _ERSPAN_III:
        if end < pos + ERSPAN_III_HEADER:
            raise DecodeError("erspan_truncated")
        session = _u16(data, pos + 2)[0] & 0x03FF
        frame_type = (data[pos + 10] & ERSPAN_III_FRAME_TYPE_BITS) >> 2
        hdr = ERSPAN_III_HEADER + (_ERSPAN_III_SUBHEADER if data[pos + 11] & ERSPAN_III_SUBHEADER_BIT else 0)
        if frame_type not in (0, 2):
            raise DecodeError("erspan_unknown_frame_type")
        inner = ETH_TEB if frame_type == 0 else _ip_by_version(data, pos + hdr, end)
        return inner, pos + hdr, f"erspan3 session={session}"
    label = "gre" if key is None else f"gre key={key}"
    if proto in (ETH_IPV4, ETH_IPV6, ETH_TEB):
        return proto, pos, label
    raise DecodeError("gre_unknown_protocol")


def _ip_by_version(data: bytes, off: int, end: int) -> int:
    if end <= off:
        raise DecodeError("tunnel_truncated")
    version = data[off] >> 4
    if version == 4:
        return ETH_IPV4
    if version == 6:
        return ETH_IPV6
    raise DecodeError("tunnel_unknown_payload")


def vxlan(data: bytes, off: int, end: int):
    if end < off + 8 + 14:
        raise DecodeError("vxlan_truncated")
    if not data[off] & 0x08:
        raise DecodeError("vxlan_no_vni")
    vni = _u32(data, off + 4)[0] >> 8
    return ETH_TEB, off + 8, f"vxlan vni={vni}"


def geneve(data: bytes, off: int, end: int):
    if end < off + 8:
        raise DecodeError("geneve_truncated")
    if data[off] >> 6:
        raise DecodeError("geneve_bad_version")
    opt_len = (data[off] & 0x3F) * 4
    proto = _u16(data, off + 2)[0]
    vni = _u32(data, off + 4)[0] >> 8
    pos = off + 8 + opt_len
    if end < pos:
        raise DecodeError("geneve_truncated")
    if proto not in (ETH_IPV4, ETH_IPV6, ETH_TEB):
        raise DecodeError("geneve_unknown_protocol")
    return proto, pos, f"geneve vni={vni}"
