"""Frame -> application records.  The per-packet hot path.

Work is done on the raw bytes with precompiled structs; a PacketContext and a record
are only built for packets that can carry evidence (DNS, ClientHello, HTTP request head,
QUIC Initial, DHCP, flow starts).  Everything else leaves after a few integer checks.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from ..records import DecodeError, FlowStart, PacketContext
from ..stats import Stats
from . import dns, http, tls
from .fragments import Reassembler
from .link import ETH_IPV4, ETH_IPV6, ETH_TEB, LINK_DECODERS, ethernet, format_mac
from .tcp_stream import KIND_HTTP, KIND_TLS, SEQ_MOD, SEQ_WINDOW, StreamTable
from .tunnels import GENEVE_PORT, VXLAN_PORT, geneve, gre, vxlan

_u16 = struct.Struct("!H").unpack_from
_HH = struct.Struct("!HH").unpack_from
_tcp_hdr = struct.Struct("!HHI").unpack_from  # sport, dport, seq

DNS_PORTS = frozenset((53, 5353, 5355))
DHCP_PORTS = frozenset((67, 68, 546, 547))
MAX_TUNNEL_DEPTH = 4

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

_IPV6_EXT = frozenset((0, 43, 60, 51, 135, 139, 140))
_IPV6_FRAGMENT = 44
_NO_RECORDS: tuple = ()


@dataclass
class DecoderConfig:
    dedup_window: float = 0.05  # seconds; identical packets inside it are span duplicates
    dedup_table: int = 65536
    udp_flow_table: int = 262144
    max_streams: int = 65536
    stream_idle: float = 120.0
    fragment_timeout: float = 30.0


class PacketDecoder:
    def __init__(self, stats: Stats, config: DecoderConfig | None = None):
        self.stats = stats
        self.config = config or DecoderConfig()
        self.streams = StreamTable(stats, max_streams=self.config.max_streams,
                                   idle_timeout=self.config.stream_idle)
        self.fragments = Reassembler(stats, timeout=self.config.fragment_timeout)
        self.udp_flows: dict[tuple, None] = {}
        self.recent: dict[int, float] = {}
        self.quic = None
        self._next_expiry = 0.0
        try:
            from .quic import QuicInitialTable, looks_like_quic_initial
        except ImportError:
            self._looks_like_quic = None
        else:
            self.quic = QuicInitialTable(stats)
            self._looks_like_quic = looks_like_quic_initial
        try:
            from .dhcp import parse_dhcp
        except ImportError:
            parse_dhcp = None
        self._parse_dhcp = parse_dhcp

    # -- entry point -------------------------------------------------------------------
    def decode(self, ts: float, linktype: int, data: bytes, interface: int = 0):
        if ts >= self._next_expiry:
            self.expire(ts)
        link = LINK_DECODERS.get(linktype)
        if link is None:
            self.stats.bad("unsupported_linktype")
            return _NO_RECORDS
        out: list = []
        try:
            etype, off, src_mac, dst_mac, vlans = link(data, 0)
            self._network(out, ts, etype, data, off, len(data), src_mac, dst_mac, vlans, (),
                          interface, 0)
        except DecodeError as err:
            self.stats.bad(err.reason)
        return out

    def expire(self, now: float) -> None:
        self._next_expiry = now + 1.0
        self.streams.expire(now)
        self.fragments.expire(now)
        if self.quic is not None:
            self.quic.expire(now)

    def finish(self) -> None:
        self.fragments.flush()

    # -- layers ------------------------------------------------------------------------
    def _network(self, out, ts, etype, data, off, end, src_mac, dst_mac, vlans, tunnel,
                 interface, depth):
        if etype == ETH_IPV4:
            if end - off < 20:
                raise DecodeError("ipv4_truncated")
            vihl = data[off]
            ihl = (vihl & 0x0F) << 2
            if vihl >> 4 != 4 or ihl < 20:
                raise DecodeError("ipv4_bad_header")
            total = _u16(data, off + 2)[0]
            if total < ihl:
                raise DecodeError("ipv4_bad_length")
            if off + total < end:
                end = off + total  # Ethernet padding
            elif off + total > end:
                self.stats.bad("ipv4_snapped")
            if end - off < ihl:
                raise DecodeError("ipv4_truncated")
            proto = data[off + 9]
            src = data[off + 12:off + 16]
            dst = data[off + 16:off + 20]
            frag = _u16(data, off + 6)[0]
            l4 = off + ihl
            if frag & 0x3FFF:
                whole = self.fragments.add((4, src, dst, proto, _u16(data, off + 4)[0]), ts,
                                           (frag & 0x1FFF) << 3, bool(frag & 0x2000),
                                           data[l4:end])
                if whole is None:
                    return
                data, l4, end = whole, 0, len(whole)
            version = 4
        elif etype == ETH_IPV6:
            if end - off < 40:
                raise DecodeError("ipv6_truncated")
            if data[off] >> 4 != 6:
                raise DecodeError("ipv6_bad_header")
            plen = _u16(data, off + 4)[0]
            if plen and off + 40 + plen < end:
                end = off + 40 + plen
            proto = data[off + 6]
            src = data[off + 8:off + 24]
            dst = data[off + 24:off + 40]
            l4 = off + 40
            for _ in range(8):
                if proto in _IPV6_EXT:
                    if end - l4 < 8:
                        raise DecodeError("ipv6_ext_truncated")
                    nxt = data[l4]
                    l4 += (data[l4 + 1] + 2) * 4 if proto == 51 else (data[l4 + 1] + 1) * 8
                    proto = nxt
                elif proto == _IPV6_FRAGMENT:
                    if end - l4 < 8:
                        raise DecodeError("ipv6_ext_truncated")
                    nxt = data[l4]
                    fo = _u16(data, l4 + 2)[0]
                    ident = data[l4 + 4:l4 + 8]
                    whole = self.fragments.add((6, src, dst, ident), ts, fo & 0xFFF8,
                                               bool(fo & 1), data[l4 + 8:end])
                    if whole is None:
                        return
                    data, l4, end, proto = whole, 0, len(whole), nxt
                else:
                    break
            else:
                raise DecodeError("ipv6_too_many_ext")
            if l4 > end:
                raise DecodeError("ipv6_ext_truncated")
            version = 6
        else:
            return
        if depth == 0:
            self.stats.decoded += 1
        if proto == 6:
            self._tcp(out, ts, data, l4, end, src, dst, version, src_mac, dst_mac, vlans, tunnel,
                      interface)
        elif proto == 17:
            self._udp(out, ts, data, l4, end, src, dst, version, src_mac, dst_mac, vlans, tunnel,
                      interface, depth)
        elif proto in (47, 4, 41):
            if depth >= MAX_TUNNEL_DEPTH:
                raise DecodeError("tunnel_too_deep")
            if proto == 47:
                inner, pos, label = gre(data, l4, end)
            else:
                inner, pos, label = (ETH_IPV4 if proto == 4 else ETH_IPV6), l4, "ip-in-ip"
            self._inner(out, ts, inner, data[pos:end], tunnel + (label,), interface, depth)

    def _inner(self, out, ts, inner, payload, tunnel, interface, depth):
        if inner == ETH_TEB:
            etype, off, src_mac, dst_mac, vlans = ethernet(payload, 0)
        else:
            etype, off, src_mac, dst_mac, vlans = inner, 0, None, None, ()
        self._network(out, ts, etype, payload, off, len(payload), src_mac, dst_mac, vlans,
                      tunnel, interface, depth + 1)

    def _context(self, ts, src, dst, sport, dport, transport, version, src_mac, dst_mac, vlans,
                 tunnel, interface) -> PacketContext:
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        return PacketContext(ts, socket.inet_ntop(family, src), socket.inet_ntop(family, dst),
                             sport, dport, transport, version, format_mac(src_mac),
                             format_mac(dst_mac), vlans, tunnel, interface)

    def _duplicate(self, ts: float, packet: bytes) -> bool:
        """Span ports often deliver a packet twice; the second copy must not count again."""
        window = self.config.dedup_window
        if window <= 0:
            return False
        recent = self.recent
        while recent:
            oldest = next(iter(recent))
            if ts - recent[oldest] <= window and len(recent) < self.config.dedup_table:
                break
            del recent[oldest]
        digest = hash(packet)
        if digest in recent:
            self.stats.duplicates += 1
            return True
        recent[digest] = ts
        return False

    def _tcp(self, out, ts, data, l4, end, src, dst, version, src_mac, dst_mac, vlans, tunnel,
             interface):
        if end - l4 < 20:
            raise DecodeError("tcp_truncated")
        sport, dport, seq = _tcp_hdr(data, l4)
        doff = (data[l4 + 12] >> 4) << 2
        flags = data[l4 + 13]
        if doff < 20:
            raise DecodeError("tcp_bad_offset")
        key = (src, dst, sport, dport)
        streams = self.streams
        if flags & TCP_SYN:
            if flags & TCP_ACK:
                if sport == 53:
                    streams.syn(key, seq, ts, True)
                return
            if self._duplicate(ts, data[l4:end] + src + dst):
                return
            streams.syn(key, seq, ts, dport == 53)
            out.append(FlowStart(self._context(ts, src, dst, sport, dport, "tcp", version,
                                               src_mac, dst_mac, vlans, tunnel, interface)))
            return
        start = l4 + doff
        if start >= end:
            if start > end and end - l4 >= 20 and doff > 60:
                raise DecodeError("tcp_bad_offset")
            if flags & (TCP_FIN | TCP_RST):
                streams.close(key)
            return
        seen = streams.bypass.get(key)
        if seen is not None and ((seen - seq) % SEQ_MOD >= SEQ_WINDOW or seen == seq):
            return
        items = streams.segment(key, seq, data[start:end], ts,
                                dport == 53 or sport == 53)
        if flags & (TCP_FIN | TCP_RST):
            streams.close(key)
        if not items:
            return
        ctx = self._context(ts, src, dst, sport, dport, "tcp", version, src_mac, dst_mac, vlans,
                            tunnel, interface)
        for kind, buf in items:
            try:
                if kind == KIND_TLS:
                    out.append(tls.parse_client_hello_stream(buf, ctx))
                elif kind == KIND_HTTP:
                    out.append(http.parse_http_request(buf, ctx))
                else:
                    out.append(dns.parse_dns(buf, ctx))
            except DecodeError as err:
                self.stats.bad(err.reason)

    def _udp(self, out, ts, data, l4, end, src, dst, version, src_mac, dst_mac, vlans, tunnel,
             interface, depth):
        if end - l4 < 8:
            raise DecodeError("udp_truncated")
        sport, dport = _HH(data, l4)
        start = l4 + 8
        if dport == VXLAN_PORT or dport == GENEVE_PORT:
            if depth >= MAX_TUNNEL_DEPTH:
                raise DecodeError("tunnel_too_deep")
            inner, pos, label = (vxlan if dport == VXLAN_PORT else geneve)(data, start, end)
            self._inner(out, ts, inner, data[pos:end], tunnel + (label,), interface, depth)
            return
        key = (src, dst, sport, dport)
        new_flow = key not in self.udp_flows and (dst, src, dport, sport) not in self.udp_flows
        is_dns = dport in DNS_PORTS or sport in DNS_PORTS
        is_dhcp = dport in DHCP_PORTS and sport in DHCP_PORTS
        quic = (self._looks_like_quic is not None and start < end and data[start] & 0xC0 == 0xC0
                and not is_dns and not is_dhcp)
        if not (new_flow or is_dns or is_dhcp or quic):
            return
        payload = data[start:end]
        if quic and not self._looks_like_quic(payload):
            quic = False
            if not new_flow:
                return
        if self._duplicate(ts, payload + src + dst + data[l4:l4 + 4]):
            return
        ctx = self._context(ts, src, dst, sport, dport, "udp", version, src_mac, dst_mac, vlans,
                            tunnel, interface)
        if new_flow:
            flows = self.udp_flows
            if len(flows) >= self.config.udp_flow_table:
                del flows[next(iter(flows))]
                self.stats.evictions["udp_flows"] += 1
            flows[key] = None
            out.append(FlowStart(ctx))
        if is_dns:
            out.append(dns.parse_dns(payload, ctx))
        elif is_dhcp:
            if self._parse_dhcp is not None:
                lease = self._parse_dhcp(payload, ctx)
                if lease is not None:
                    out.append(lease)
        elif quic:
            hello = self.quic.feed(payload, ctx)
            if hello is not None:
                out.append(hello)
