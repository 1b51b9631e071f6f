"""Frame -> application records.  The per-packet hot path.

Work is done on the raw bytes with precompiled structs; a PacketContext and a record
are only built for packets that can carry evidence (DNS, ClientHello, HTTP request head,
QUIC Initial, DHCP, flow starts).  Everything else leaves after a few integer checks.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from itertools import islice

from ..inet import AF_INET, AF_INET6, inet_ntop
from ..records import BATCH_RECORD, DecodeError, DnsMessage, FlowStart, PacketContext
from ..stats import Stats
from . import dns, http, tls
from .capture_loss import CaptureLoss
from .fragments import Reassembler
from .link import (ETH_IPV4, ETH_IPV6, ETH_TEB, LINK_DECODERS, LINKTYPE_ETHERNET, LINKTYPE_IPV4,
                   LINKTYPE_IPV6, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW,
                   LINKTYPE_RAW_LEGACY, COOKED_HEADERS, ethernet, format_mac)
from .quic import SERVER_PORT_LIMIT as QUIC_SERVER_PORT_LIMIT
from .quic import QuicInitialTable, looks_like_quic_initial
from .tcp_stream import HTTP_FIRST_BYTES, KIND_HTTP, KIND_TLS, SEQ_MOD, SEQ_WINDOW, StreamTable
from .tunnels import (ERSPAN_II_GRE, ERSPAN_III_FRAME_TYPE_BITS, ERSPAN_III_GRE, ERSPAN_III_HEADER,
                      ERSPAN_III_SUBHEADER_BIT, GENEVE_PORT, VXLAN_PORT, VXLAN_PORT_BYTES, geneve, gre,
                      vxlan)

_u16 = struct.Struct("!H").unpack_from
_HH = struct.Struct("!HH").unpack_from
_tcp_hdr = struct.Struct("!HHI").unpack_from  # sport, dport, seq

DNS_PORTS = frozenset((53, 5353, 5355))
DHCP_PORTS = frozenset((67, 68, 546, 547))
KSC_UDP_PORTS = frozenset((15000, 15001))  # track.tracker.KSC_UDP_PORTS; the capture filter passes them
# UDP ports ``_udp`` reads a datagram for; to or from none of them it reads only a client's
# QUIC long header.
_UDP_READ_PORTS = DNS_PORTS | DHCP_PORTS | KSC_UDP_PORTS
MAX_TUNNEL_DEPTH = 4

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

_dns_header = struct.Struct("!HH").unpack_from  # id, flags
# From the ethertype, as IPv4 without options carrying TCP: (ethertype, version/IHL, total
# length, flags/fragment, protocol, addresses and ports (the flow key), sequence number, data
# offset byte, flags).  One unpack for the commonest frame; 36 bytes.
_BATCH_IPV4_TCP = struct.Struct("!HBxHxxHxBxx12sI4xBB")
# From the IPv6 header: (version/class, payload length, next header)
_BATCH_IPV6 = struct.Struct("!B3xHB")
# From the TCP header: (sequence number, data offset byte, flags)
_BATCH_TCP = struct.Struct("!4xI4xBB")
# From the UDP header: (source port, destination port, DNS flags' first byte)
_BATCH_UDP_DNS = struct.Struct("!HH6xB")
_DNS_PORT_BYTES = b"\x00\x35"  # 53 as a header carries it
# From the IPv4 payload to the inner Ethernet frame, for VXLAN (UDP and VXLAN's headers) and
# for ERSPAN type II (GRE with a sequence number, ERSPAN II's header) alike; for type III
# without a platform subheader, GRE's 8 bytes and its header.
_TUNNEL_INNER = 16
_ERSPAN_III_INNER = 8 + ERSPAN_III_HEADER
# Tag protocol identifiers of a service tag (802.1ad, and the pre-standard QinQ ones the
# full path's ``ethernet`` reads).
_SERVICE_TPIDS = (0x88A8, 0x9100, 0x9200)
TAG_LOOKAHEAD = 8  # leading frames of a batch looked at for one (_past_outer_tag)
_TAG_FIRST_BYTES = frozenset(tpid >> 8 for tpid in _SERVICE_TPIDS + (0x8100,))
# From the ethertype of an IPv4 frame: (ethertype, version and IHL, total length, fragment
# word, protocol, the payload's first four bytes (UDP's ports, or GRE's flags and
# protocol), VXLAN's flags)
_IPV4_TUNNEL = struct.Struct("!HBxHxxHxB10x4s4xB")


def _tunnel_inner(buf: bytes, off: int, end: int) -> tuple[int, int] | None:
    """(start, end) of the inner Ethernet frame of the frame ``buf[off:end]`` when it is a
    tunnel that ethernet_batch reads at its inner frame: untagged or single-tagged IPv4
    without options or fragments, or IPv6 without extension headers, carrying VXLAN with
    the I flag (without it ``vxlan`` rejects the frame) or ERSPAN type II or III (``gre``:
    a sequence number and no other flag; type III without a platform subheader and with
    an Ethernet frame inside), the inner frame 54 bytes or more; it ends where the IP
    packet does."""
    if end - off < 54:
        return None
    tag = off + 4 if buf[off + 12] == 0x81 and buf[off + 13] == 0 else off
    # IPv4 (what cloud mirroring and remote span send) with one unpack.
    etype, vihl, total, frag, proto, words, flags = _IPV4_TUNNEL.unpack_from(buf, tag + 12)
    if etype == 0x0800:
        if vihl != 0x45 or frag & 0x3FFF:
            return None
        l4 = tag + 34
        ip_end = tag + 14 + total
    elif etype == 0x86DD and end >= tag + 63:
        # Through VXLAN's flags byte, the 63rd from the tag: a frame that ends before it
        # may be the last of its batch.
        if buf[tag + 14] >> 4 != 6:
            return None
        proto = buf[tag + 20]
        l4 = tag + 54
        ip_end = l4 + _u16(buf, tag + 18)[0]
        words, flags = buf[l4:l4 + 4], buf[l4 + 8]
    else:
        return None
    if proto == 17 and words.endswith(VXLAN_PORT_BYTES) and flags & 0x08 \
            or proto == 47 and words == ERSPAN_II_GRE:
        inner = l4 + _TUNNEL_INNER
    elif proto == 47 and words == ERSPAN_III_GRE:
        inner = l4 + _ERSPAN_III_INNER
    else:
        return None
    if not (ip_end - inner >= 54 and ip_end <= end):
        return None
    if words == ERSPAN_III_GRE and (buf[l4 + 8 + 10] & ERSPAN_III_FRAME_TYPE_BITS
                                    or buf[l4 + 8 + 11] & ERSPAN_III_SUBHEADER_BIT):
        return None  # another inner frame than Ethernet, or a platform subheader before it
    return inner, ip_end


def batch_frames(buf: bytes, meta: bytes, units: int = 1_000_000, offsets: bool = False):
    """``(ts, frame, caplen)`` of every record of a libpcap batch (``next_batch``: one
    buffer, native (sec, fraction, offset, caplen) records, ``units`` fractions a second),
    each frame sliced out; with ``offsets`` the frame's offset in the buffer follows."""
    for sec, fraction, off, caplen in BATCH_RECORD.iter_unpack(meta):
        if offsets:
            yield (sec * units + fraction) / units, buf[off:off + caplen], caplen, off
        else:
            yield (sec * units + fraction) / units, buf[off:off + caplen], caplen


def _cooked_as_ethernet(buf: bytes, meta: bytes, linktype: int) -> tuple[bytes, bytes, dict]:
    """A Linux cooked batch read as Ethernet: each frame from where its network header is 14
    bytes on (two bytes in for SLL, six for SLL2), its protocol field standing where an
    Ethernet type does (SLL2's, which opens its header, copied there over the last two bytes
    of its address, in a copy of the buffer).  A frame shorter than its header stays where
    it is, a runt to the loop: moved, an empty one would start where the frame after it
    does.  Returns the buffer to read, its records, and each moved frame's own (offset,
    caplen) by its new offset, so that a frame the full path needs is handed over as
    captured.  ``tcpdump -i any`` writes SLL, and SLL2 with libpcap 1.10 and later.  One
    Python step per frame, kept small: 0.5 us a frame for SLL2, where copying each out
    behind a pseudo header took 1.5 us, a tenth of a read."""
    type_at, header = COOKED_HEADERS[linktype]
    shift = header - 14
    type_to = header - 2
    copied = type_to != type_at
    layout = bytearray(buf) if copied else buf
    view = memoryview(bytearray(meta)).cast("I")
    outer = {}
    for index in range(2, len(view), 4):
        off, caplen = view[index], view[index + 1]
        if caplen >= header:
            if copied:
                # Two byte stores: a two-byte slice assigned cost 550 ns, these 260.
                layout[off + type_to] = buf[off + type_at]
                layout[off + type_to + 1] = buf[off + type_at + 1]
            start = off + shift
            view[index], view[index + 1] = start, caplen - shift
            outer[start] = (off, caplen)
    return bytes(layout) if copied else buf, view.tobytes(), outer


# The pseudo Ethernet header _bare_ip_as_ethernet puts before a bare IP packet: twelve zero
# bytes, then the type its link type fixes (IPv4 or IPv6 only), or else its IP version's,
# as decode.link reads them.  _NO_TYPE's, for a packet too short or of no IP version, has a
# type the batch loop hands over to the full path.
_NO_TYPE = bytes(14)
_IP_VERSION_HEADERS = {4: bytes(12) + ETH_IPV4.to_bytes(2, "big"), 6: bytes(12) + ETH_IPV6.to_bytes(2, "big")}
_BARE_IP_HEADERS = {LINKTYPE_RAW: None, LINKTYPE_RAW_LEGACY: None,
                    LINKTYPE_IPV4: _IP_VERSION_HEADERS[4], LINKTYPE_IPV6: _IP_VERSION_HEADERS[6]}


def _bare_ip_as_ethernet(buf: bytes, meta: bytes, linktype: int) -> tuple[bytes, bytes, dict]:
    """A batch of bare IP packets (no link header: raw IP, tun and WireGuard interfaces),
    copied out as the loop reads Ethernet, each behind a pseudo header; returned as
    _cooked_as_ethernet returns (0.7 us a frame)."""
    fixed = _BARE_IP_HEADERS[linktype]
    headers = _IP_VERSION_HEADERS
    view = memoryview(bytearray(meta)).cast("I")
    outer = {}
    chunks: list = []
    append = chunks.append
    pos = 0
    for index in range(2, len(view), 4):
        off, caplen = view[index], view[index + 1]
        append(fixed or (headers.get(buf[off] >> 4, _NO_TYPE) if caplen else _NO_TYPE))
        append(buf[off:off + caplen])
        view[index], view[index + 1] = pos, caplen + 14
        outer[pos] = (off, caplen)
        pos += caplen + 14
    return b"".join(chunks), view.tobytes(), outer


def _relocated_view(buf: bytes, meta: bytes, part_of) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """``meta`` with the record of each frame ``buf[off:end]`` that ``part_of(buf, off,
    end)`` gives a part of to read instead, as (start, end), pointing at that part, and
    the frame's own (offset, caplen) by the part's start, so that a frame the full path
    needs is handed over whole; the other records as they are.  The batch loop then reads
    a tunnel's inner frame (_tunnel_inner) or a frame past a tag it does not read
    (_past_outer_tag)."""
    view = memoryview(bytearray(meta)).cast("I")
    outer = {}
    for index in range(2, len(view), 4):
        off, caplen = view[index], view[index + 1]
        part = part_of(buf, off, off + caplen)
        if part is not None:
            start, end = part
            outer[start] = (off, caplen)
            view[index], view[index + 1] = start, end - start
    return view.tobytes(), outer


def _outer_tag(buf: bytes, off: int, caplen: int) -> bool:
    """Whether the frame at ``off`` opens with a tag the batch loop does not read (it reads
    one 802.1Q tag): a service tag (802.1ad or a pre-standard TPID), or the outer of two
    802.1Q tags.  Provider networks mirror their traffic so (QinQ)."""
    if caplen < 22:
        return False
    tpid = (buf[off + 12] << 8) | buf[off + 13]
    return tpid in _SERVICE_TPIDS or tpid == 0x8100 and buf[off + 16] == 0x81 and buf[off + 17] == 0


def _past_outer_tag(buf: bytes, off: int, end: int) -> tuple[int, int] | None:
    """A frame that opens with such a tag from four bytes in, where the tag's inner type
    stands as the frame's type does."""
    return (off + 4, end) if _outer_tag(buf, off, end - off) else None


def _leads_with_outer_tags(buf: bytes, meta: bytes) -> bool:
    """Whether one of the batch's first TAG_LOOKAHEAD frames opens with such a tag: the
    type's first byte rules out nearly every other frame before _outer_tag is asked."""
    for _, _, off, caplen in islice(BATCH_RECORD.iter_unpack(meta), TAG_LOOKAHEAD):
        if caplen >= 22 and buf[off + 12] in _TAG_FIRST_BYTES and _outer_tag(buf, off, caplen):
            return True
    return False


_DNS_QR = 0x8000
_DNS_HEADER_LEN = 12
MDNS_PORT = 5353
# A lower-cased request head whose host may be an IP literal (engine._is_ip_literal): the
# request line's target (matched at the start) or a Host value (after any whitespace or
# line folding) starting with a digit or '[', or holding a ':' before the line ends.  Loose
# on purpose: a false positive only costs a parse.  Two patterns, not one alternation:
# the Host one then opens with a literal newline, which the regex engine skips to, instead
# of trying both branches at every byte (0.9 us against 4.2 on a 100-byte head).
_MAYBE_IP_LITERAL_TARGET = re.compile(rb"[^ \r\n]* +[^ \r\n/]*?(?:[0-9\[]|:)")
_MAYBE_IP_LITERAL_HOST = re.compile(rb"\n[ \t]*host[ \t]*:[ \t\r\n]*(?:[0-9\[]|[^\r\n]*:)")
RESOLVER_REPORT_INTERVAL = 60.0  # seconds between two reports of one DNS server
RESOLVER_REPORT_TABLE = 65536


def _server_text(pair: bytes) -> str:
    """The address of a resolver report's key (the server's packed address, then b"q" or
    b"r"), as the tracker writes addresses."""
    return inet_ntop(AF_INET if len(pair) == 5 else AF_INET6, pair[:-1])


_IPV6_EXT = frozenset((0, 43, 60, 51, 135, 139, 140))
_IPV6_FRAGMENT = 44
_NO_RECORDS: tuple = ()
_NO_FLOWS: dict = {}
# Client bytes past a bypassed stream's start (capture.shunt): past what a browsing
# connection sends (a post-quantum hello, HTTP/2's preface and a few requests: 2-4 KB), so
# that the 128 flows the program holds are uploads, not every HTTPS connection.
SHUNT_AFTER = 4 * 1024


@dataclass
class DecoderConfig:
    dedup_window: float = 0.05  # seconds; identical packets inside it are span duplicates
    dedup_table: int = 65536
    udp_flow_table: int = 262144
    max_streams: int = 65536
    stream_idle: float = 120.0
    fragment_timeout: float = 30.0


@dataclass
class Interest:
    """What the later stages can use, so the decoder builds records only for that.

    Without an Interest every DNS message, ClientHello and flow start becomes a record
    (``purge-sensor names`` wants them all).  With one, the miss path costs a regex
    search over the payload instead of a parse, a context and three stage calls:

    * ``dns_screen`` / ``text_labels``: a byte regex that a DNS message (wire format) must
      match, and lower-case labels one of which a ClientHello must contain, to hold a
      signature name (SignatureSet.name_screen).
      DNS messages that miss still tell the tracker who answers DNS: a header-only
      DnsMessage goes out once per server and RESOLVER_REPORT_INTERVAL.  ``dns_labels``
      are all the labels ``dns_screen`` searches for, which a ``read``'s filter program
      searches too (capture.dns_screen).
    * ``fingerprints``: the signatures match JA3/JA4, so every ClientHello is parsed.
    * ``ip_literal_paths``: a URL path alone matches when the request names an IP-literal
      host (an update mirror), so such requests are parsed whatever their labels.
    * ``flow_ports`` and ``flow_addresses``: a flow start is only evidence towards these
      ports ((transport, port) pairs) or these addresses (packed bytes, the tracker's
      answer cache, shared and updated in place); ``flow_addresses=None`` means every
      flow start is reported (capture workers, which do not share the tracker's memory).
    """

    dns_screen: object = None
    text_labels: tuple | None = None
    dns_labels: tuple | None = None  # every label dns_screen searches for (capture.dns_screen)
    fingerprints: bool = True
    ip_literal_paths: bool = True
    flow_ports: frozenset = frozenset()
    flow_addresses: set | None = None

    @property
    def screens_hellos(self) -> bool:
        """Whether a ClientHello can be ruled out by its labels at all."""
        return not self.fingerprints and self.text_labels is not None

    def hello_may_match(self, hello: bytes) -> bool:
        """Substring tests on the lower-cased hello: a case-insensitive regex over 2 KB of
        key shares costs a hundred times more."""
        return not self.screens_hellos or self._holds_label(hello.lower())

    def request_may_match(self, head: bytes) -> bool:
        """The same test on an HTTP request head (what http.parse_http_request reads),
        which also passes any head whose host may be an IP literal when URL paths alone
        can match: a Host or target authority that starts with a digit or '[' or holds a
        ':' (a port, or an IPv6 address)."""
        if self.text_labels is None:
            return True
        lowered = head[:http.MAX_HEAD].lower()
        return self._holds_label(lowered) or self.ip_literal_paths and (
            _MAYBE_IP_LITERAL_TARGET.match(lowered) is not None
            or _MAYBE_IP_LITERAL_HOST.search(lowered) is not None)

    def _holds_label(self, lowered: bytes) -> bool:
        # bytes.find, not ``in``: Python 3.11's bytes.__contains__ first tries its argument
        # as an integer, so every bytes needle formats and clears a TypeError (about 2,000
        # instructions, more than the search through a 2 KB hello).
        find = lowered.find
        for label in self.text_labels:
            if find(label) != -1:
                return True
        return False


class PacketDecoder:
    def __init__(self, stats: Stats, config: DecoderConfig | None = None,
                 interest: Interest | None = None):
        self.stats = stats
        self.config = config or DecoderConfig()
        self.interest = interest
        self.streams = StreamTable(stats, max_streams=self.config.max_streams,
                                   idle_timeout=self.config.stream_idle)
        self.fragments = Reassembler(stats, timeout=self.config.fragment_timeout)
        self.loss = CaptureLoss(stats)
        self.udp_flows: dict[bytes, None] = {}
        self.resolver_reports: dict[bytes, float] = {}
        self.recent: dict[int, float] = {}
        self.quic = QuicInitialTable(stats)
        # The capture's ShuntTable (capture.shunt) while its batches are decoded.
        self.shunts = None
        # Whether a report of a DNS server (its address as text) can no longer change the
        # tracker (Tracker.report_redundant), and the (server, direction) pairs asked about
        # since their last report: such a server's messages that name nothing are left to
        # the capture filter (capture.dns_screen).
        self.report_redundant = None
        self.dns_decided: set[bytes] = set()
        self._next_expiry = 0.0
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

    def batch(self, linktype: int, buf: bytes, meta: bytes, units: int = 1_000_000,
              offsets: bool = False):
        """The frames of a libpcap batch for ``decode``, as ``(ts, frame, caplen)``, with
        ``offsets`` followed by the frame's offset in ``buf``: Ethernet, Linux cooked and
        bare IP batches through ethernet_batch, which drops on the buffer what it can rule
        out; other link types every frame (batch_frames)."""
        if linktype == LINKTYPE_ETHERNET:
            return self.ethernet_batch(buf, meta, units, offsets=offsets)
        as_ethernet = _cooked_as_ethernet if linktype in COOKED_HEADERS else \
            _bare_ip_as_ethernet if linktype in _BARE_IP_HEADERS else None
        if as_ethernet is not None:
            layout, records, outer = as_ethernet(buf, meta, linktype)
            return self.ethernet_batch(layout, records, units, captured=(buf, meta, outer),
                                       offsets=offsets)
        return batch_frames(buf, meta, units, offsets)

    def ethernet_batch(self, buf: bytes, meta: bytes, units: int = 1_000_000,
                       tunnelled: bool = False, captured: tuple | None = None,
                       offsets: bool = False):
        """The frames of a libpcap batch (``next_batch``: one buffer, native (sec, fraction,
        offset, caplen) records, ``units`` fractions a second) that ``decode`` could make
        something of, as ``(ts, frame, caplen)``; the rest are counted here and never
        sliced out:

        * a TCP segment (no SYN/FIN/RST) of a flow in the stream bypass: its hello is parsed
          or it is known to carry nothing.  This is the client-to-server bulk that the
          capture filter has to let through, as it cannot tell a hello's third segment from
          an upload's.  A flow is shunted (``shunts``, capture.shunt) once it is
          SHUNT_AFTER bytes past its stream's start: its later segments without
          SYN, FIN or RST are then dropped by libpcap's filter program.  The SYN or FIN of a
          shunted flow discards it;
        * a ClientHello's segments in order after a seen SYN (StreamTable.settle_hello): the
          first of a hello that needs more is held in the stream table, and the one that
          completes a hello the Interest's labels rule out bypasses the stream;
        * an HTTP request head that opens a stream whose SYN was seen, fills its segment and
          is ruled out by the Interest (StreamTable.settle_request): read into the stream,
          which stays open for the connection's later requests, and dropped unparsed;
        * the first segment of a stream not seen before that opens with a handshake record
          holding no ClientHello (StreamTable.settle_server_flight): a server's flight, one
          per TLS connection.  The capture filter drops it unless the ports make the
          server look like a client (or there is no filter);
        * a DNS message on port 53 that the Interest's screen rules out, from a server
          reported within RESOLVER_REPORT_INTERVAL;
        * a client's QUIC Initial towards an address and port the Interest does not watch,
          unless it completes a ClientHello the Interest's labels may match or is malformed
          (QuicInitialTable.settle_initial): a hello in one datagram or two is decrypted,
          held and ruled out on the buffer, only the full decoder's context and records
          around that work go;
        * a SYN-ACK (but DNS's), a client's SYN without Fast Open data towards a port and
          address the Interest does not watch, or a FIN/RST without payload: what ``_tcp``
          does with them (nothing; starting the stream and its capture-loss record;
          closing the stream and judging capture loss) is done here;
        * what the capture filter drops but passes inside a tunnel: a pure ACK (its capture
          loss judged), and UDP that ``_udp`` reads nothing of (media, QUIC short headers,
          a server's long ones);
        * a VXLAN or ERSPAN II frame whose inner frame one of these rules settles, as the
          full path decodes it: a batch that opens with one is read at its inner frames
          (_relocated_view), elsewhere a VXLAN frame's inner frame goes through this loop
          alone (``tunnelled``: not counted, no deeper tunnel).  Cloud traffic mirroring
          and remote span deliver a span port so, and the capture filter may pass
          tunnels whole.

        ``captured``: ``buf`` and ``meta`` are another link type's batch read as Ethernet
        (_cooked_as_ethernet, _bare_ip_as_ethernet), and this is the batch as captured with
        the map from the frames read to its own; frames are handed over from it.  A batch with a frame behind a tag the loop does not read
        among its first is read past such tags (_past_outer_tag).  Untagged or
        single-tagged IPv4 without options or fragments and IPv6 without extension
        headers are judged here; anything else takes the full path.  This loop is the read
        path's hot spot, so it is written out flat with local names."""
        bypass_get = self.streams.bypass.get
        close = self.streams.close
        loss = self.loss
        loss_get = loss.flows.get
        client_segment = loss.client_segment
        reports = self.resolver_reports
        interest = self.interest
        screen = interest.dns_screen if interest is not None else None
        wants_flow = self._wants_flow
        stream_syn = self.streams.syn
        settle_hello = self.streams.settle_hello
        settle_flight = self.streams.settle_server_flight
        hello_may_match = interest.hello_may_match if interest is not None \
            and interest.screens_hellos else None
        request_may_match = interest.request_may_match if interest is not None \
            and interest.text_labels is not None else None
        settle_request = self.streams.settle_request
        loss_syn = loss.syn
        settle_initial = self.quic.settle_initial if hello_may_match is not None else None
        yielded = yielded_bytes = 0
        next_expiry = self._next_expiry
        # Whole seconds before the next expiry: a frame stamped earlier needs no float time.
        expiry_sec = int(next_expiry)
        clock = loss.clock
        ipv4_tcp_at = _BATCH_IPV4_TCP.unpack_from
        ipv6_at = _BATCH_IPV6.unpack_from
        tcp_at = _BATCH_TCP.unpack_from
        udp_dns_at = _BATCH_UDP_DNS.unpack_from
        # Module constants the loop tests on every frame, as locals.
        seq_mod, seq_window = SEQ_MOD, SEQ_WINDOW
        report_interval = RESOLVER_REPORT_INTERVAL
        report_whole_seconds = RESOLVER_REPORT_INTERVAL - 1.0
        # A batch that opens with a tunnel frame is likely all tunnel (cloud traffic
        # mirroring's VXLAN, remote span's ERSPAN): read at the inner frames from the
        # start; elsewhere a VXLAN frame is read again at its inner frame one by one.
        counted = meta
        outer = None
        frames = buf
        # Flows to shunt (capture.shunt) are found only where the filter program looks for
        # them: at each captured frame's own network header (another link type's read as
        # Ethernet), not inside a tunnel or a tag.
        shunts = None if tunnelled else self.shunts
        if captured is not None:
            frames, counted, outer = captured
        elif not tunnelled and meta:
            first, first_caplen = BATCH_RECORD.unpack_from(meta)[2:]
            if _tunnel_inner(buf, first, first + first_caplen) is not None:
                meta, outer = _relocated_view(buf, meta, _tunnel_inner)
                shunts = None
            elif _leads_with_outer_tags(buf, meta):
                # Likewise a batch with a frame behind a service tag among its first: the
                # frames that carry one are read behind it.
                meta, outer = _relocated_view(buf, meta, _past_outer_tag)
                shunts = None
        descend = not tunnelled and outer is None
        dns_decided = self.dns_decided
        dns_servers = shunts if shunts is not None and shunts.dns_enabled \
            and self.report_redundant is not None else None
        if shunts is not None and shunts.enabled:
            shunted = shunts.flows
            shunt_mark = seq_mod - SHUNT_AFTER
            shunt_renew = shunts.renew_after
            started = shunts.take_started()
            if started:
                self._shunted(started)
        else:
            shunts = None
            shunted = _NO_FLOWS
            shunt_mark = shunt_renew = 0
        for sec, fraction, off, caplen in BATCH_RECORD.iter_unpack(meta):
            end = off + caplen
            # Before the next table expiry only: the full path runs it first.
            if caplen >= 54 and (sec < expiry_sec or (sec * units + fraction) / units < next_expiry):
                # Read as IPv4 TCP at once (most frames are); caplen >= 54 covers the 36
                # bytes behind a tag too, and the smallest DNS message over UDP.
                etype, vihl, total, frag, proto, key, seq, offset, flags = ipv4_tcp_at(buf, off + 12)
                tag = off
                if etype == 0x8100:
                    tag = off + 4
                    etype, vihl, total, frag, proto, key, seq, offset, flags = ipv4_tcp_at(buf, tag + 12)
                if etype == 0x0800:
                    if vihl != 0x45 or frag & 0x3FFF:
                        proto = 0
                    l4 = tag + 34
                    ip_end = tag + 14 + total
                elif etype == 0x86DD and end >= tag + 62:
                    version, length, proto = ipv6_at(buf, tag + 14)
                    if version >> 4 != 6:
                        proto = 0
                    l4 = tag + 54
                    ip_end = l4 + length
                    if proto == 6 and l4 + 20 <= end:
                        seq, offset, flags = tcp_at(buf, l4)
                        key = buf[tag + 22:l4 + 4]
                else:
                    proto = 0
                # Snapped or short datagrams take the full path, which counts them.
                if proto == 6:
                    if l4 + 20 <= ip_end <= end:
                        payload = ip_end - l4 - (offset >> 2 & 0x3C)
                        if offset < 0x50:
                            pass
                        elif not flags & 0x07:
                            seen = bypass_get(key)
                            if seen is not None and payload >= 0:
                                behind = (seen - seq) % seq_mod
                                if behind >= seq_window or seen == seq:
                                    flow = loss_get(key)
                                    if flow is not None:
                                        if payload:
                                            # CaptureLoss.client_segment's in-order case,
                                            # written out: this runs for every bulk segment.
                                            if seq == flow.expect:
                                                flow.expect = (seq + payload) & 0xFFFFFFFF
                                                flow.last = clock
                                            else:
                                                client_segment(key, seq, payload)
                                    elif flags & 0x10 and loss.flows and key not in shunted:
                                        self._judge_loss(key, flags, seq, buf, l4, payload)
                                    if seq_window <= behind < shunt_mark and (
                                            key not in shunted or (seq - shunted[key][2])
                                            & 0xFFFFFFFF >= shunt_renew):
                                        # SHUNT_AFTER bytes past the stream's start, or a
                                        # shunted flow's segment past the window of
                                        # sequence numbers the filter drops.
                                        shunts.add(key, seq)
                                    continue
                            elif seen is None and payload > 0:
                                start = ip_end - payload
                                # A flight (a handshake record holding no ClientHello)
                                # first: it is never a held hello's stream, so settle_hello
                                # would decline it, after copying it out.  DNS over TCP
                                # (port 53) is never a flight.
                                if payload > 5 and buf[start] == 0x16 and buf[start + 5] != 0x01 \
                                        and buf[l4:l4 + 2] != _DNS_PORT_BYTES \
                                        and buf[l4 + 2:l4 + 4] != _DNS_PORT_BYTES \
                                        and settle_flight(key, seq):
                                    settled = True
                                elif request_may_match is not None \
                                        and buf[start] in HTTP_FIRST_BYTES and settle_request(
                                            key, seq, buf[start:ip_end], request_may_match,
                                            (sec * units + fraction) / units):
                                    settled = True
                                else:
                                    settled = hello_may_match is not None and settle_hello(
                                        key, seq, buf[start:ip_end], hello_may_match,
                                        (sec * units + fraction) / units)
                                if settled:
                                    if loss.flows:
                                        self._judge_loss(key, flags, seq, buf, l4, payload)
                                    continue
                            elif payload == 0:
                                # A pure ACK: ``_tcp`` judges capture loss and returns.  The
                                # capture filter drops these; inside a tunnel they come.
                                if loss.flows:
                                    self._judge_loss(key, flags, seq, buf, l4, 0)
                                continue
                        elif flags & 0x12 == 0x12:
                            if buf[l4:l4 + 2] != _DNS_PORT_BYTES:
                                continue
                        elif flags & 0x02 and payload == 0:
                            dport = (buf[l4 + 2] << 8) | buf[l4 + 3]
                            # The destination address ends where the TCP header starts.
                            if key in shunted:
                                # The same ports again: a new connection (capture.shunt).
                                self._unshunt(shunts, key)
                            if not wants_flow("tcp", dport, buf[l4 - 4:l4] if etype == 0x0800
                                              else buf[l4 - 16:l4]):
                                stream_syn(key, seq, (sec * units + fraction) / units, dport == 53)
                                loss_syn(key, seq)
                                continue
                        elif flags & 0x05 and payload == 0:
                            if loss.flows:
                                self._judge_loss(key, flags, seq, buf, l4, 0)
                            close(key)
                            if key in shunted:
                                self._unshunt(shunts, key)
                            continue
                    elif l4 + 20 <= end < ip_end and offset >= 0x50 and not flags & 0x02:
                        # Cut by the snap length (``_tcp``'s ``missing``): the headers say
                        # what the segment carried.  One whose payload was cut off whole, or
                        # a bypassed flow's, is settled here as ``_tcp`` settles it; a
                        # capture taken with a short snap length is mostly these.
                        start = l4 + (offset >> 2 & 0x3C)
                        if start == end or start < end and (seen := bypass_get(key)) is not None \
                                and ((seen - seq) % seq_mod >= seq_window or seen == seq):
                            self.stats.bad("ipv4_snapped" if etype == 0x0800 else "ipv6_snapped")
                            if loss.flows:
                                self._judge_loss(key, flags, seq, buf, l4, ip_end - start)
                            if start == end and flags & 0x05:
                                close(key)
                            continue
                elif proto == 17 and screen is not None and l4 + 20 <= ip_end <= end:
                    sport, dport, dns_flags = udp_dns_at(buf, l4)
                    # The addresses end where the UDP header starts, the destination last.
                    # UDP to a tunnel port is the tunnel to the full path whatever the other
                    # port says.
                    width = 4 if etype == 0x0800 else 16
                    if dport == 53 and not dns_flags & 0x80:
                        server = buf[l4 - width:l4] + b"q"
                    elif sport == 53 and dns_flags & 0x80 and dport != VXLAN_PORT \
                            and dport != GENEVE_PORT:
                        server = buf[l4 - 2 * width:l4 - width] + b"r"
                    else:
                        server = None
                    if server is not None:
                        last = reports.get(server)
                        # The whole second alone settles it unless it straddles an end of the
                        # interval: the frame's time lies in [sec, sec + 1).
                        if last is not None and (
                                0.0 <= sec - last < report_whole_seconds
                                or 0.0 <= (sec * units + fraction) / units - last
                                < report_interval) \
                                and screen.search(buf, l4 + 8, ip_end) is None:
                            if dns_servers is not None and server not in dns_decided:
                                self._decide_dns_server(server, dns_servers)
                            continue
                    elif dport == VXLAN_PORT:
                        # The inner frame by the same rules, one level deep; what they
                        # settle was the whole frame.
                        found = _tunnel_inner(buf, off, end) if descend else None
                        if found is not None:
                            for _ in self.ethernet_batch(
                                    buf, BATCH_RECORD.pack(sec, fraction, found[0], found[1] - found[0]),
                                    units, tunnelled=True):
                                break
                            else:
                                continue
                    elif dport != GENEVE_PORT and sport not in _UDP_READ_PORTS \
                            and dport not in _UDP_READ_PORTS:
                        if buf[l4 + 8] & 0xC0 != 0xC0 or sport < QUIC_SERVER_PORT_LIMIT <= dport:
                            # Nothing ``_udp`` reads: media, QUIC's short headers and a
                            # server's long ones.  The capture filter drops these; inside a
                            # tunnel they come.
                            continue
                        if settle_initial is not None \
                                and not wants_flow("udp", dport, buf[l4 - width:l4]):
                            # A client's QUIC long header towards an address and port the
                            # Interest does not watch: ``_udp`` would only feed the Initial
                            # table, which takes it here unless a hello may match.
                            family = AF_INET if width == 4 else AF_INET6
                            if settle_initial(buf[l4 + 8:ip_end],
                                              (inet_ntop(family, buf[l4 - 2 * width:l4 - width]), sport,
                                               inet_ntop(family, buf[l4 - width:l4]), dport),
                                              (sec * units + fraction) / units, hello_may_match):
                                continue
            if outer is not None and off in outer:
                off, caplen = outer[off]
                end = off + caplen
            yielded += 1
            yielded_bytes += caplen
            if offsets:
                yield (sec * units + fraction) / units, frames[off:end], caplen, off
            else:
                yield (sec * units + fraction) / units, frames[off:end], caplen
            next_expiry = self._next_expiry
            expiry_sec = int(next_expiry)
            clock = loss.clock
        if tunnelled:
            return  # the outer frame is counted
        # What was not yielded was counted and judged here; caplen is the last of each
        # record's four native words.
        skipped = len(counted) // BATCH_RECORD.size - yielded
        stats = self.stats
        stats.packets += skipped
        stats.bytes += sum(memoryview(counted).cast("I")[3::4]) - yielded_bytes
        stats.decoded += skipped

    def expire(self, now: float) -> None:
        self._next_expiry = now + 1.0
        self.streams.expire(now)
        self.fragments.expire(now)
        self.loss.expire(now)
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
            missing = 0  # payload bytes the snap length cut off
            if off + total < end:
                end = off + total  # Ethernet padding
            elif off + total > end:
                self.stats.bad("ipv4_snapped")
                missing = off + total - end
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
                data, l4, end, missing = whole, 0, len(whole), 0
            version = 4
        elif etype == ETH_IPV6:
            if end - off < 40:
                raise DecodeError("ipv6_truncated")
            if data[off] >> 4 != 6:
                raise DecodeError("ipv6_bad_header")
            plen = _u16(data, off + 4)[0]
            missing = 0
            if plen and off + 40 + plen < end:
                end = off + 40 + plen
            elif plen and off + 40 + plen > end:
                self.stats.bad("ipv6_snapped")
                missing = off + 40 + plen - end
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
                    data, l4, end, proto, missing = whole, 0, len(whole), nxt, 0
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
                      interface, missing)
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
        family = AF_INET if version == 4 else AF_INET6
        return PacketContext(ts, inet_ntop(family, src), inet_ntop(family, dst),
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

    def _wants_flow(self, transport: str, dport: int, dst: bytes) -> bool:
        interest = self.interest
        if interest is None or interest.flow_addresses is None:
            return True
        return (transport, dport) in interest.flow_ports or dst in interest.flow_addresses

    def _tcp(self, out, ts, data, l4, end, src, dst, version, src_mac, dst_mac, vlans, tunnel,
             interface, missing=0):
        """``missing``: payload bytes the snap length cut off.  Capture loss counts them as
        seen (they crossed the wire and reached the capture), and a stream they leave a
        hole in is given up rather than left waiting for bytes that never come."""
        if end - l4 < 20:
            raise DecodeError("tcp_truncated")
        sport, dport, seq = _tcp_hdr(data, l4)
        doff = (data[l4 + 12] >> 4) << 2
        flags = data[l4 + 13]
        if doff < 20:
            raise DecodeError("tcp_bad_offset")
        key = src + dst + data[l4:l4 + 4]
        streams = self.streams
        start = l4 + doff
        if flags & TCP_SYN:
            if flags & TCP_ACK:
                if sport == 53:
                    streams.syn(key, seq, ts, True)
                return
            fast_open = start < end
            # A span copy of a Fast Open SYN must not restart the stream its data began.
            if fast_open and self._duplicate(ts, data[l4:end] + src + dst):
                return
            streams.syn(key, seq, ts, dport == 53)
            self.loss.syn(key, seq)
            if self._wants_flow("tcp", dport, dst) and (
                    fast_open or not self._duplicate(ts, data[l4:end] + src + dst)):
                out.append(FlowStart(self._context(ts, src, dst, sport, dport, "tcp", version,
                                                   src_mac, dst_mac, vlans, tunnel, interface)))
            if not fast_open:
                return
            # TCP Fast Open (RFC 7413): the client's first bytes, a ClientHello or a
            # request, ride in the SYN and start one sequence number after it.
            seq = (seq + 1) % SEQ_MOD
            self.loss.client_segment(key, seq, end - start + missing)
        else:
            if self.loss.flows and start <= end:
                self._judge_loss(key, flags, seq, data, l4, end - start + missing)
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
        if missing:
            streams.cut(key, seq)
        if flags & (TCP_FIN | TCP_RST):
            streams.close(key)
        if not items:
            return
        interest = self.interest
        ctx = None
        for kind, buf in items:
            if interest is not None and (
                    not interest.hello_may_match(buf) if kind == KIND_TLS
                    else kind == KIND_HTTP and not interest.request_may_match(buf)):
                continue
            if ctx is None:
                ctx = self._context(ts, src, dst, sport, dport, "tcp", version, src_mac, dst_mac,
                                    vlans, tunnel, interface)
            try:
                if kind == KIND_TLS:
                    out.append(tls.parse_client_hello_stream(buf, ctx))
                elif kind == KIND_HTTP:
                    out.append(http.parse_http_request(buf, ctx))
                else:
                    out.append(dns.parse_dns(buf, ctx))
            except DecodeError as err:
                self.stats.bad(err.reason)

    def _shunted(self, keys: tuple) -> None:
        """Flows whose later segments the capture filter drops from this batch on
        (capture.shunt): the capture-loss estimate stops judging them, as those bytes are
        not seen by design."""
        for key in keys:
            self.loss.close(key)
        self.stats.shunted_flows += len(keys)
        self.stats.table_sizes["tcp_shunt"] = len(self.shunts.flows)

    def _decide_dns_server(self, pair: bytes, shunts) -> None:
        """A server whose message the batch loop dropped, its report not due: its messages
        that name nothing are left to the capture filter if a report of it can no longer
        change anything (capture.dns_screen); asked again after its next report."""
        decided = self.dns_decided
        if len(decided) >= RESOLVER_REPORT_TABLE:
            decided.clear()
        decided.add(pair)
        if self.report_redundant(_server_text(pair)) and shunts.list_dns_server(pair):
            self.stats.dns_servers_screened += 1

    def recheck_dns_servers(self) -> None:
        """Give the messages of a server left to the capture filter back to the decoder once
        a report of it could matter again: the tracker dropped it from its resolvers."""
        shunts = self.shunts
        if shunts is None or not shunts.dns_servers or self.report_redundant is None:
            return
        for pair in list(shunts.dns_servers):
            if not self.report_redundant(_server_text(pair)):
                shunts.unlist_dns_server(pair)
                self.dns_decided.discard(pair)

    def _unshunt(self, shunts, key: bytes) -> None:
        shunts.discard(key)
        self.stats.table_sizes["tcp_shunt"] = len(shunts.flows)

    def _judge_loss(self, key: bytes, flags: int, seq: int, data, l4: int,
                    payload_len: int) -> None:
        """Feed the capture-loss estimate: the client's bytes and FIN, the server's acks.
        Only connections whose SYN was seen are judged, so the direction is known."""
        loss = self.loss
        if key in loss.flows:
            if payload_len:
                loss.client_segment(key, seq, payload_len)
            if flags & TCP_FIN:
                loss.client_fin(key, seq + payload_len)
            if flags & TCP_RST:
                loss.close(key)
        elif flags & TCP_ACK and key in loss.servers:
            loss.server_segment(key, int.from_bytes(data[l4 + 8:l4 + 12], "big"), flags & TCP_RST)

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
        is_dns = dport in DNS_PORTS or sport in DNS_PORTS
        is_dhcp = dport in DHCP_PORTS and sport in DHCP_PORTS
        # A QUIC long header a client sent: a server's (from a well-known port to an
        # ephemeral one) is dropped by the capture filter and ignored by QuicInitialTable.
        client_long_header = (start < end and data[start] & 0xC0 == 0xC0
                              and not sport < QUIC_SERVER_PORT_LIMIT <= dport)
        quic = client_long_header and not is_dns and not is_dhcp
        interest = self.interest
        if is_dns and interest is not None and interest.dns_screen is not None \
                and sport != MDNS_PORT and dport != MDNS_PORT \
                and interest.dns_screen.search(data, start, end) is None:
            self._dns_miss(out, ts, data, start, end, src, dst, sport, dport, version, src_mac,
                           dst_mac, vlans, tunnel, interface)
            return
        # A UDP flow starts with a packet the capture filter passes on its own (DNS, DHCP,
        # KSC, a client's QUIC long header): other UDP reaches the sensor only unfiltered,
        # and a later packet of a flow whose start was not seen must not pass for its start.
        key = src + dst + data[l4:l4 + 4]
        new_flow = ((is_dns or is_dhcp or client_long_header
                     or dport in KSC_UDP_PORTS or sport in KSC_UDP_PORTS)
                    and key not in self.udp_flows
                    and dst + src + data[l4 + 2:l4 + 4] + data[l4:l4 + 2] not in self.udp_flows
                    and self._wants_flow("udp", dport, dst))
        if not (new_flow or is_dns or is_dhcp or quic):
            return
        payload = data[start:end]
        if quic and not looks_like_quic_initial(payload):
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
            hello = self.quic.feed(payload, ctx, interest.hello_may_match if interest else None)
            if hello is not None:
                out.append(hello)

    def _dns_miss(self, out, ts, data, start, end, src, dst, sport, dport, version, src_mac,
                  dst_mac, vlans, tunnel, interface):
        """A DNS message that cannot hold a signature name: only who serves DNS matters (the
        tracker learns resolvers from it), reported once per server and interval."""
        if end - start < _DNS_HEADER_LEN:
            raise DecodeError("dns_truncated")
        if sport != 53 and dport != 53:
            return
        ident, flags = _dns_header(data, start)
        is_response = bool(flags & _DNS_QR)
        pair = src + b"r" if is_response else dst + b"q"
        reports = self.resolver_reports
        last = reports.get(pair)
        if last is not None and 0.0 <= ts - last < RESOLVER_REPORT_INTERVAL:
            return
        if last is None and len(reports) >= RESOLVER_REPORT_TABLE:
            del reports[next(iter(reports))]
            self.stats.evictions["resolver_reports"] += 1
        reports.pop(pair, None)
        reports[pair] = ts
        self.dns_decided.discard(pair)
        ctx = self._context(ts, src, dst, sport, dport, "udp", version, src_mac, dst_mac, vlans,
                            tunnel, interface)
        out.append(DnsMessage(ctx=ctx, id=ident, is_response=is_response, opcode=(flags >> 11) & 0xF,
                              rcode=flags & 0xF, questions=[], answers=[]))
