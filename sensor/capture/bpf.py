"""The capture filter: everything that can carry evidence, nothing else.

The filter runs in the kernel for live capture and inside libpcap for files, so the
packets it rejects never become Python objects.  What must pass:

* DNS (UDP/TCP 53, mDNS 5353, LLMNR 5355), DHCP/DHCPv6, the KSC Network Agent UDP
  ports, a client's QUIC long-header packets (Initials), tunnels (VXLAN, Geneve,
  GRE/ERSPAN, IP-in-IP, 6in4), IP fragments, MPLS and PPPoE frames, IPv4 with options,
  IPv6 with extension headers.
* Every TCP SYN (but a SYN-ACK), FIN and RST: flow starts drive ``dns_answer_flow`` and
  ``ksc_port``, ends close streams and judge capture loss.  A SYN-ACK carries nothing the
  decoder reads but on port 53 (DNS over TCP), which passes whole.
* TCP payload that may be the start of a client's stream: a segment that opens with a
  ClientHello's handshake record or an HTTP method, whatever the ports, and any segment
  sent towards the lower port, a port below 1024, or from a port of 1024 or above to a
  higher one below EPHEMERAL_PORTS.  Clients use ephemeral ports above the server's, so
  the second and third segments of a large (post-quantum) ClientHello still pass while
  the server-to-client bulk, which is most of a span port's volume, does not.  A client
  on a port below its server's keeps them when the server's port is below 1024 (scapy's
  default source port is 20) or below EPHEMERAL_PORTS (port 2000 to 8443); a hello to a
  server on an ephemeral port above its client's, also ephemeral, loses the segments
  after its first.

With ``tunnels`` (live capture, and capture files that open with a tunnel:
opens_with_tunnel) VXLAN and ERSPAN types II and III over untagged IPv4 are judged by their
inner frame, untagged or behind one tag, by the same tests (_inner_frame): cloud traffic
mirroring delivers a whole span port in VXLAN, a remote span session in ERSPAN.

What it drops: pure ACKs, SYN-ACKs, server-to-client data (the server's TLS flight too:
its handshake record opens with a ServerHello), RTP and other UDP media, QUIC
short-header (1-RTT) packets and the long-header ones a server sends (from a port below
1024 to one above).  Client-to-server data past the hello still passes and is shed by the
decoder's per-flow bypass, and in a ``read`` an upload's bulk by tests this filter's accepting
returns lead to (capture.shunt), as are a known DNS server's messages that name nothing
(capture.dns_screen).

libpcap's optimizer (1.9, 1.10) can keep a value in a scratch slot and later load it
from a slot that no instruction on the way stored.  The kernel refuses such a program
(EINVAL), and libpcap then filters in user space, where the slot holds what an earlier
packet left: until the port test below was reshaped, every live capture ran so, and
IPv6 segments were judged on such a slot.  tests/test_bpf_filter.py walks every
program the sensor builds for loads before stores.

VLAN tags are walked at fixed ``ether[]`` offsets, not with libpcap's ``vlan`` keyword.
Live, ``vlan`` tests the kernel's tag metadata at every offset, which made the kernel
program five times the offline one (3,272 instructions against 651), and libpcap 1.9
and 1.10 then kept the tag offset in a scratch slot that earlier tests also used: any
small growth of the filter made it reject every QinQ frame (tests/test_live_veth.py
showed it twice).  Without it the live program is the offline one.  A packet socket
gets its frames with the outer tag already removed by the kernel, so live a
single-tagged frame matches the untagged tests and a QinQ frame the single-tagged ones.

The filter runs on every packet, so its order is its cost.  IPv4 without options or
fragments and IPv6 without extension headers (nearly all traffic) are tested at fixed
``ip[]``/``ip6[]`` offsets, with the cheapest decisive test first: libpcap's ``tcp[]``
accessors reload the header length and re-check for fragments at every use, which made
a server-to-client segment cost 80 instructions more than it does now (52; 37.5 on
average over the first 200,000 packets of the benchmark mix).  IPv4 with options or fragments and IPv6 with extension
headers pass whole: they are rare, and a second, accessor-based copy of the tests doubled
the time libpcap's optimizer takes over the program (6 ms now, on the sensor's start-up).
Tagged variants come after the untagged one, up to three tags deep (802.1Q, 802.1ad and
0x9100 TPIDs, as ``vlan`` accepts).  MPLS and PPPoE session frames pass whole, tagged or
not: once libpcap's ``mpls``/``pppoes`` keywords shift the offsets they cannot be undone
for the rest of the expression.
"""

from __future__ import annotations

import array
import fcntl
import functools
import os
import queue
import select
import signal
import stat
import struct
import sys
import termios
import threading
import time
from typing import NamedTuple

from ..decode.link import COOKED_HEADERS
from ..decode.tunnels import (ERSPAN_II_GRE, ERSPAN_III_FRAME_TYPE_BITS, ERSPAN_III_GRE, ERSPAN_III_HEADER,
                              ERSPAN_III_SUBHEADER_BIT, GENEVE_PORT, VXLAN_PORT, VXLAN_PORT_BYTES)
from ..records import BATCH_RECORD
from .libpcap import filter_slot, set_filter, widen_read_buffer
from .dns_screen import MIN_SNAPLEN as DNS_MIN_SNAPLEN
from .shunt import MIN_SNAPLEN, FrameLayout, ShuntTable
from .pcapfile import (CaptureError, open_capture, pcapng_interface_view, pcapng_leading_interfaces,
                       pcapng_microsecond_view)

DLT_EN10MB = 1

# Keep in step with decode.packet (DNS_PORTS, DHCP_PORTS; the tunnel ports come from
# decode.tunnels) and track.tracker (KSC_UDP_PORTS); tests/test_bpf_filter.py checks them.
UDP_PORTS = (53, 5353, 5355, VXLAN_PORT, GENEVE_PORT)
UDP_PORT_RANGES = ((67, 68), (546, 547), (15000, 15001))
TCP_PORTS = (53,)

_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
WELL_KNOWN_PORTS = 1024  # IANA system ports: a server's, never a client's ephemeral one
# Where the ephemeral ranges start (Linux 32768, Windows and macOS 49152): below it, between
# two ports of 1024 or above, the higher one may be the server's (8443, 8080, KSC's 13000)
# and the lower a client's own (behind a port-translating NAT, or a FreeBSD host's 10000+).
EPHEMERAL_PORTS = 32768
# First four payload bytes of the HTTP request methods the decoder knows, as big-endian words.
_HTTP_METHOD_WORDS = tuple(int.from_bytes(m, "big") for m in (
    b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"CONN", b"PATC", b"TRAC"))


def _udp_port(port: str) -> str:
    """``port`` is one the decoder reads over UDP, tested as a short search: most UDP on a
    span port is QUIC (443) or media on high ports, which leave after three comparisons."""
    ranges = sorted([(p, p) for p in UDP_PORTS] + list(UDP_PORT_RANGES))
    low = [r for r in ranges if r[0] < 1024]
    high = [r for r in ranges if r[0] >= 1024]

    def search(group: list, floor: int) -> str:
        """The group's tests, behind bounds that let most ports skip them."""
        tests = " or ".join(f"{port} == {lo}" if lo == hi else f"({port} >= {lo} and {port} <= {hi})"
                            for lo, hi in group)
        above = f"{port} >= {floor} and " if floor else ""
        return f"({above}{port} <= {max(hi for _, hi in group)} and ({tests}))"

    return f"({search(low, 0)} or {search(high, high[0][0])})"


def _client_payload(more: str, sport: str, dport: str, first: str, word: str,
                    short: str, hello_type: str) -> str:
    """TCP payload that may start a client's stream; ``more`` says the segment has payload.

    Sent towards the lower port or a well-known one (below 1024: a client on a low port,
    such as scapy's default 20, still has its hello's later segments kept) or from a port
    of 1024 or above to a higher one below EPHEMERAL_PORTS (a client on port 2000 talking
    to 8443, whose hello's later segments go to the higher port), or opening with a
    ClientHello's handshake record or an HTTP method (an upper-case first byte, then the
    word).  Server-to-client bulk, the commonest packet, fails on the ports and the first
    byte before the payload length is computed.  A server's TLS flight opens with a
    handshake record too, but its first message (``hello_type``, the sixth byte) is a
    ServerHello, not a ClientHello (1): it is dropped here rather than by
    StreamTable.settle_server_flight, one frame fewer per TLS connection.  A record header
    alone (``short``: under six bytes of payload) still passes.

    Written as (ports or opening) and payload: the opening only matters when the ports
    fail, that is when the destination port is not below the source port, which an
    earlier form tested again, and that second comparison of two fields is what made
    libpcap's optimizer load a scratch slot it had not stored (see the module's
    docstring)."""
    methods = " or ".join(f"{word} == 0x{w:08x}" for w in _HTTP_METHOD_WORDS)
    return (f"((({dport} < {sport} or {dport} < {WELL_KNOWN_PORTS}"
            f" or ({sport} >= {WELL_KNOWN_PORTS} and {dport} < {EPHEMERAL_PORTS}))"
            f" or ({first} == 0x{_TLS_HANDSHAKE:02x}"
            f" and ({short} or {hello_type} == 0x{_CLIENT_HELLO:02x})"
            f" or ({first} & 0xe0 == 0x40 and ({methods})))) and {more})")


def _fixed_tcp(base: str, l4: int, payload_len: str) -> str:
    """TCP at a fixed offset ``l4`` of ``base`` (IPv4 without options, IPv6 without
    extension headers): plain loads, no index register and no fragment checks, which
    libpcap's ``tcp[]`` accessor repeats at every use."""
    doff = f"(({base}[{l4 + 12}] & 0xf0) >> 2)"
    sport, dport = f"{base}[{l4}:2]", f"{base}[{l4 + 2}:2]"
    ports = " or ".join(f"{sport} == {p} or {dport} == {p}" for p in TCP_PORTS)
    flags = f"{base}[{l4 + 13}]"
    return (f"(({flags} & 0x07 != 0 and {flags} & 0x12 != 0x12) or {ports} or "
            + _client_payload(f"{payload_len} > {doff}", sport, dport,
                              f"{base}[{l4} + {doff}]", f"{base}[{l4} + {doff}:4]",
                              f"{payload_len} < {doff} + 6", f"{base}[{l4 + 5} + {doff}]") + ")")


def _fixed_udp(base: str, l4: int) -> str:
    """A QUIC long header passes unless a server sent it (from a well-known port to an
    ephemeral one): the decoder reads a client's Initials only (quic.SERVER_PORT_LIMIT),
    and a server answers each with several long-header datagrams (Initial, Handshake)."""
    sport, dport = f"{base}[{l4}:2]", f"{base}[{l4 + 2}:2]"
    from_client = f"({sport} >= {WELL_KNOWN_PORTS} or {dport} < {WELL_KNOWN_PORTS})"
    return (f"({base}[{l4 + 8}] & 0xc0 == 0xc0 and {from_client}"
            f" or {_udp_port(sport)} or {_udp_port(dport)})")


_IPV6_WHOLE = (0, 43, 44, 51, 60, 135, 139, 140, 47, 4, 41)
# The TPIDs libpcap's ``vlan`` accepts: 802.1Q, 802.1ad and the pre-standard QinQ one.
_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
MAX_VLAN_TAGS = 3


def _ip_layers(v4: str, v6: str, ip: int, ipv4_type: str, ipv6_type: str,
               tunnels: frozenset = frozenset()) -> str:
    """IPv4 and IPv6 whose header starts at ``v4[ip]`` and ``v6[ip]`` (``ip``/``ip6`` from
    0, or ``ether`` from the header's offset); ``ipv4_type``/``ipv6_type`` test that the
    frame carries them.  IPv4 with options (rare: router alerts, the odd probe) or
    fragmented passes whole, as IPv6 with extension headers does: the rest is tested at
    fixed offsets.  With ``tunnels``, VXLAN (the I flag set: the decoder counts a frame
    without it malformed) and ERSPAN type II over IPv4 are judged by their inner frame
    (_inner_frame), 16 bytes past the IPv4 header for both: UDP and VXLAN's headers, or
    GRE with a sequence number (flags word 0x1000, nothing else, which fixes the offset)
    and ERSPAN II's header; ERSPAN type III 20 bytes past it, when its header announces
    an Ethernet frame and no platform subheader.  The decoder reads UDP to VXLAN's port as
    VXLAN whatever the other port says.  ``tunnels`` names the kinds (TUNNEL_KINDS) to
    judge so; VXLAN and ERSPAN II share their inner frame's tests, type III has its own."""
    tests = (f"({v4}[{ip}] != 0x45 or {v4}[{ip + 6}:2] & 0x3fff != 0"
             f" or ({v4}[{ip + 9}] == 6 and "
             + _fixed_tcp(v4, ip + 20, f"{v4}[{ip + 2}:2] - 20") + ")"
             f" or ({v4}[{ip + 9}] == 17 and " + _fixed_udp(v4, ip + 20) + ")"
             f" or {v4}[{ip + 9}] == 47 or {v4}[{ip + 9}] == 4 or {v4}[{ip + 9}] == 41)")
    if tunnels:
        # pcap-filter gives ``and`` and ``or`` one precedence, left to right: every
        # grouping here is spelled out.
        judged, whole = [], []
        tunnel = (f"({v4}[{ip}] == 0x45 and {v4}[{ip + 6}:2] & 0x3fff == 0"
                  f" and (({v4}[{ip + 9}] == 17 and {v4}[{ip + 22}:2] == {VXLAN_PORT}"
                  f" and {v4}[{ip + 28}] & 0x08 != 0)"
                  f" or ({v4}[{ip + 9}] == 47 and {v4}[{ip + 20}:4] == 0x{ERSPAN_II_GRE.hex()})))")
        erspan3_header = ip + 28
        erspan3 = (f"({v4}[{ip}] == 0x45 and {v4}[{ip + 6}:2] & 0x3fff == 0 and {v4}[{ip + 9}] == 47"
                   f" and {v4}[{ip + 20}:4] == 0x{ERSPAN_III_GRE.hex()}"
                   f" and {v4}[{erspan3_header + 10}] & 0x{ERSPAN_III_FRAME_TYPE_BITS:02x} == 0"
                   f" and {v4}[{erspan3_header + 11}] & 0x{ERSPAN_III_SUBHEADER_BIT:02x} == 0)")
        if tunnels & {"vxlan", "erspan2"}:
            judged.append(f"({tunnel} and {_inner_frame(ip + 36)})")
            whole.append(f"not {tunnel}")
        if "erspan3" in tunnels:
            judged.append(f"({erspan3} and {_inner_frame(erspan3_header + ERSPAN_III_HEADER)})")
            whole.append(f"not {erspan3}")
        tests = f"({' or '.join(judged)} or ({' and '.join(whole)} and {tests}))"
    ipv4 = f"({ipv4_type} and {tests})"
    ipv6 = (f"({ipv6_type} and (({v6}[{ip + 6}] == 6 and "
            + _fixed_tcp(v6, ip + 40, f"{v6}[{ip + 4}:2]") + ")"
            f" or ({v6}[{ip + 6}] == 17 and " + _fixed_udp(v6, ip + 40) + ")"
            " or " + " or ".join(f"{v6}[{ip + 6}] == {p}" for p in _IPV6_WHOLE) + "))")
    return f"({ipv4} or {ipv6})"


def _inner_frame(inner: int) -> str:
    """The inner Ethernet frame of a tunnel, at ``ether[inner]``, untagged or behind one
    VLAN tag, by the tests such a frame gets; an inner frame of another type (ARP, a
    second tag) passes whole.  Cloud traffic mirroring (VXLAN) and remote span (ERSPAN)
    deliver a span port so: without this every one of its packets would reach Python."""
    outer_type, tagged_type = f"ether[{inner + 12}:2]", f"ether[{inner + 16}:2]"
    tagged = " or ".join(f"{outer_type} == 0x{tpid:04x}" for tpid in _VLAN_TPIDS)

    def judged(etype: str, ip: int) -> str:
        return (f"(({etype} != 0x0800 and {etype} != 0x86dd) or "
                + _ip_layers("ether", "ether", ip, f"{etype} == 0x0800", f"{etype} == 0x86dd") + ")")

    return (f"((({tagged}) and {judged(tagged_type, inner + 18)})"
            f" or (not ({tagged}) and {judged(outer_type, inner + 14)}))")


# Link types without VLAN tags or a type field: libpcap's ``ip[]``/``ip6[]`` find the
# network header.
_CORE = _ip_layers("ip", "ip6", 0, "ip", "ip6")


def _tagged_at(tags: int, first_type: int, network: int, tunnels: frozenset = frozenset()) -> str:
    """Frames behind ``tags`` VLAN tags, tested at fixed ``ether[]`` (link header) offsets
    rather than with ``vlan`` (see the module's docstring): the link header's type field at
    ``first_type``, what it announces (the network header, or a tag's TCI) at ``network``,
    and each tag's TCI followed by the next type field, as in Ethernet.  With
    ``tunnels``, those kinds over untagged IPv4 by their inner frame."""
    types = [first_type] + [network + 4 * n + 2 for n in range(tags)]
    type_at = types[-1]
    tpids = [" or ".join(f"ether[{at}:2] == 0x{tpid:04x}" for tpid in _VLAN_TPIDS) for at in types[:-1]]
    whole = " or ".join(f"ether[{type_at}:2] == 0x{etype:04x}" for etype in _WHOLE_ETHERTYPES)
    layers = _ip_layers("ether", "ether", network + 4 * tags, f"ether[{type_at}:2] == 0x0800",
                        f"ether[{type_at}:2] == 0x86dd", tunnels=tunnels if tags == 0 else frozenset())
    return " and ".join([f"({t})" for t in tpids] + [f"({whole} or {layers})"])


@functools.lru_cache(maxsize=32)
def _tagged_link(first_type: int, network: int, tunnels: frozenset = frozenset()) -> str:
    return " or ".join(f"({_tagged_at(tags, first_type, network, tunnels)})"
                       for tags in range(MAX_VLAN_TAGS + 1))


# The tunnels the filter can judge by their inner frame; live capture judges them all, a
# capture file those it opens with (opens_with_tunnel): each costs program and libpcap's
# optimizer time (the three together 2,003 instructions against 941, and 25 ms more than
# VXLAN and ERSPAN II alone, which share their inner frame's tests).
TUNNEL_KINDS = frozenset({"vxlan", "erspan2", "erspan3"})


# MPLS (unicast, multicast) and PPPoE sessions pass whole, tagged or not: libpcap's
# ``mpls``/``pppoes`` keywords shift the offsets for the rest of the expression.
_WHOLE_ETHERTYPES = (0x8847, 0x8848, 0x8864)
_ETHERNET = _tagged_link(12, 14)
# Linux cooked captures carry VLAN tags too, after the type field: libpcap puts back the
# tag the kernel took off (SLL, which ``tcpdump -i any`` and live ``-i any`` give), and a
# tag the kernel left in the frame stays (SLL2, today's ``tcpdump -i any``).  Their types
# (MPLS, PPPoE) and the decoder's reading of tags (decode.link) are Ethernet's.  Live,
# libpcap moves loads past a cooked header onto the network header and the type field
# onto the kernel's protocol; the kernel has removed the outer tag, as for Ethernet.  A
# load whose index is all in X (offset 0) it turns into the kernel's packet-type field,
# and the kernel then drops every packet that reaches it: an index's constant must come
# first (``ether[N + doff]``, which keeps N in the load), as _fixed_tcp writes them.
DLT_LINUX_SLL, DLT_LINUX_SLL2 = 113, 276
_COOKED = COOKED_HEADERS  # (type field, network header) offsets, by link type
# The link types (as capture files name them) whose batches the decoder's batch loop reads
# as Ethernet (decode.packet._cooked_as_ethernet, _bare_ip_as_ethernet), with where their
# frames hold their type and network header: the ones capture.shunt can shunt.  Bare IP
# (raw, and IPv4 or IPv6 alone) is told by its version.
_BARE_IP = FrameLayout(None, 0)
SHUNTED_LINKTYPES = {DLT_EN10MB: FrameLayout(12, 14),
                     **{linktype: FrameLayout(*at) for linktype, at in _COOKED.items()},
                     101: _BARE_IP, 12: _BARE_IP, 228: _BARE_IP, 229: _BARE_IP}
TUNNEL_LOOKAHEAD = 64  # leading records of a capture looked at for a tunnel


def build_filter(user_filter: str | None = None, linktype: int = DLT_EN10MB,
                 tunnels: bool | frozenset = False) -> str:
    """The sensor's filter for this link type, narrowed by the operator's own (tcpdump syntax);
    ``tunnels`` (True: all TUNNEL_KINDS, or a set of them) judges those tunnels by their
    inner frame (_inner_frame) instead of passing them whole.

    The operator's part comes first: a ``vlan`` or ``mpls`` in it shifts libpcap's
    ``ip[]`` offsets for everything after it, which the sensor's ``ether[]`` tests for
    Ethernet ignore."""
    kinds = TUNNEL_KINDS if tunnels is True else frozenset(tunnels or ())
    if linktype == DLT_EN10MB:
        base = _tagged_link(12, 14, kinds)
    elif linktype in _COOKED:
        base = _tagged_link(*_COOKED[linktype], kinds)
    else:
        base = _CORE
    if user_filter:
        return f"({user_filter}) and ({base})"
    return base


def opens_with_tunnel(head: bytes, order: str) -> frozenset:
    """The tunnels (TUNNEL_KINDS) that Ethernet frames among the first TUNNEL_LOOKAHEAD
    records whole in ``head``, a classic pcap's first bytes in byte order ``order``, carry
    over untagged IPv4: the capture then gets ``build_filter(tunnels=...)`` with them."""
    kinds: set = set()
    if len(head) < PCAP_HEADER or struct.unpack_from(order + "I", head, 20)[0] & 0xFFFF != DLT_EN10MB:
        return frozenset()
    record = struct.Struct(order + "8xI4x")
    pos = PCAP_HEADER
    for _ in range(TUNNEL_LOOKAHEAD):
        if pos + 16 > len(head):
            break
        caplen = record.unpack_from(head, pos)[0]
        frame = head[pos + 16:pos + 16 + min(caplen, 51)]
        if len(frame) == 51 and frame[12:15] == b"\x08\x00\x45":
            if frame[23] == 17 and frame[36:38] == VXLAN_PORT_BYTES and frame[42] & 0x08:
                kinds.add("vxlan")
            elif frame[23] == 47 and frame[34:38] == ERSPAN_II_GRE:
                kinds.add("erspan2")
            elif frame[23] == 47 and frame[34:38] == ERSPAN_III_GRE:
                kinds.add("erspan3")
        pos += 16 + caplen
    return frozenset(kinds)


def file_filter(path: str, user_filter: str | None = None) -> str:
    """The filter ``read`` gives libpcap for this capture file (``build_filter``'s, with
    tunnels judged inside for a capture that opens with one); the benchmark gives tcpdump
    the same."""
    known = PrefilteredCapture._libpcap_format(path)
    if known is None:
        return build_filter(user_filter)
    return build_filter(user_filter, dlt_for(known.linktype), tunnels=known.tunnels)


def file_tunnels(path: str) -> frozenset:
    """The tunnels (TUNNEL_KINDS) ``file_filter`` judges inside for this capture file: as
    ``LinktypeFilters(user_filter, file_tunnels(path))`` filters its frames one by one."""
    known = PrefilteredCapture._libpcap_format(path)
    return known.tunnels if known is not None else frozenset()


class LibpcapFile(NamedTuple):
    """How libpcap reads a capture file (PrefilteredCapture._libpcap_format)."""

    linktype: int
    format: str
    units: int  # timestamp fractions a second in next_batch's records
    prologue: bytes | None = None  # PrologueFeed's, for a nanosecond file or several interfaces
    first_ns: int | None = None  # MillisecondClock's start, for a nanosecond pcapng
    tunnels: frozenset = frozenset()  # those it opens with (opens_with_tunnel), for build_filter
    resume: int | None = None  # where the file goes on after the prologue, if not at its length
    first_us: int | None = None  # InterfaceClock's start, for a pcapng with several interfaces
    interfaces: int = 1


class FilterError(ValueError):
    """The filter does not compile for this link type (libpcap's message included)."""


def compile_filter(user_filter: str | None, linktype: int = DLT_EN10MB, snaplen: int = 262144,
                   tunnels: bool | frozenset = False):
    """A compiled ``pcapy.BPFProgram`` for ``build_filter``; raises FilterError with libpcap's reason."""
    import pcapy

    try:
        return pcapy.compile(linktype, snaplen, build_filter(user_filter, linktype, tunnels), 1, 0)
    except pcapy.PcapError as err:
        raise FilterError(f"bad capture filter for link type {linktype}: {err}") from None


# pcap files name link types by LINKTYPE_*, libpcap's compiler by DLT_*; they differ for raw IP.
_LINKTYPE_TO_DLT = {101: 12}
MAX_FILTER_PROGRAMS = 64
REJECT = object()
# BSD loopback's 4-byte family is in the writer's byte order; libpcap swaps it when it reads
# the file, a program run on the raw frame cannot, so the sensor's filter passes these whole.
_WRITER_ORDER_LINKTYPES = (0, 108)
BATCH = 1024
# Batches of a shunting read (capture.shunt) are smaller: a flow is shunted LAG_BATCHES
# batches after the decoder asks, so the fewer frames a batch holds, the more of a short
# upload the filter drops (on the benchmark's mixes 12,700 more of 75,000 frames, and
# 15,000 of 103,000 where connections are short, for about 170 more batches a million frames).
SHUNTING_BATCH = 256
# Bytes of batches libpcap's reader thread may hold that nobody has taken yet: PREFETCH_BYTES
# while the sensor starts up (before the first batch is taken), then READ_AHEAD_BYTES, enough
# to keep both cores busy.  Bytes, not batches: a batch of jumbo or GSO-sized frames is large.
PREFETCH_BYTES = 40 << 20
READ_AHEAD_BYTES = 4 << 20
# The reader thread hands a batch over only once it holds the GIL again, and a thread waiting
# for the GIL gets it after the switch interval: at Python's default 5 ms that is slower than
# libpcap reads a batch, so the decoder would idle on it.  At 1 ms the decoder still waited
# 12-20 ms in all for batches on the benchmark mix, at 0.2 ms 1-2 ms: the reader asks for the
# GIL about twice a batch whatever the interval, so the decoder is not interrupted more often.
READER_SWITCH_INTERVAL = 0.0002
MICRO, NANO = 1_000_000, 1_000_000_000
# The microsecond magic per byte order: what libpcap is shown for a nanosecond file too
# (PrologueFeed).
_MICRO_MAGIC = {"<": b"\xd4\xc3\xb2\xa1", ">": b"\xa1\xb2\xc3\xd4"}
# Classic pcap magics libpcap reads here, with their byte order and timestamp units.  The
# feed opens its pipe by /proc/self/fd and sizes it with F_SETPIPE_SZ: Linux only;
# elsewhere nanosecond files stay with the Python reader.
_LIBPCAP_MAGICS = {magic: (order, MICRO) for order, magic in _MICRO_MAGIC.items()}
_FEEDS_WORK = sys.platform.startswith("linux")
if _FEEDS_WORK:
    _LIBPCAP_MAGICS.update({b"\x4d\x3c\xb2\xa1": ("<", NANO), b"\xa1\xb2\x3c\x4d": (">", NANO)})
PCAP_HEADER = 24
PIPE_SIZE = 1 << 20
FEED_PAUSE = 0.0002  # seconds; libpcap reads half a pipe in about that
PCAPNG_HEAD = 1 << 16  # bytes looked at for the interfaces a pcapng describes before its packets
# The feed writes what precedes the packets into the pipe before libpcap opens it: it must
# fit an unenlarged pipe (64 KiB), or the write would wait for a reader that never comes.
MAX_PROLOGUE = 16 << 10
# The largest step between consecutive packets MillisecondClock follows, in milliseconds.
MAX_CLOCK_STEP = 3_600_000
_HALF_WRAP, _WRAP_MASK = 1 << 31, (1 << 32) - 1


class ClockLost(Exception):
    """MillisecondClock or InterfaceClock cannot follow the capture's clock: the rest is
    read in Python."""


class MillisecondClock:
    """The nanosecond timestamps of a pcapng libpcap reads through
    pcapfile.pcapng_microsecond_view: ``next_batch`` reports the millisecond count modulo
    2**32 (its seconds word is 32 bits) and the nanoseconds within the millisecond.  Each
    record's count is unwrapped against the one before it, starting from the first
    packet's exact timestamp.  A step of more than MAX_CLOCK_STEP either way (an idle
    hour, or a later section of the file, whose interface libpcap reads unconverted)
    raises ClockLost, as does a time past the 32-bit seconds, so nothing is guessed.  So
    does a Simple Packet Block (all zeros from libpcap): pcapfile.CaptureFile gives it the
    last timestamp in the file before it, which may be a packet the filter rejected and
    this clock never saw."""

    def __init__(self, first_ns: int):
        self.milliseconds = first_ns // 1_000_000
        self.sec, self.fraction = divmod(first_ns, NANO)

    def rebase(self, meta: bytes) -> bytes:
        """``meta`` with (seconds, nanoseconds) in place of libpcap's two time words."""
        out = bytearray(len(meta))
        pack_into = BATCH_RECORD.pack_into
        milliseconds, sec, fraction = self.milliseconds, self.sec, self.fraction
        pos = 0
        try:
            for wrapped, within, offset, caplen in BATCH_RECORD.iter_unpack(meta):
                step = ((wrapped - milliseconds + _HALF_WRAP) & _WRAP_MASK) - _HALF_WRAP
                if step > MAX_CLOCK_STEP or step < -MAX_CLOCK_STEP or not (wrapped or within):
                    raise ClockLost
                milliseconds += step
                sec, rest = divmod(milliseconds, 1000)
                fraction = rest * 1_000_000 + within
                pack_into(out, pos, sec, fraction, offset, caplen)
                pos += 16
        except struct.error:
            raise ClockLost from None
        self.milliseconds, self.sec, self.fraction = milliseconds, sec, fraction
        return bytes(out)

    def convert(self, meta: bytes) -> tuple[bytes, int, None]:
        return self.rebase(meta), 0, None


def _unconverted(meta: bytes) -> tuple[bytes, int, None]:
    """The ``convert`` of a capture libpcap reports as it is: one interface, true times."""
    return meta, 0, None


# A pcapng with several interfaces is shown to libpcap with interface i's clock moved
# (i + 1) * INTERFACE_STRIDE seconds on (pcapfile.pcapng_interface_view): about four years
# apart, and at most MAX_LIBPCAP_INTERFACES of them, so today's times stay in the 32-bit
# seconds of next_batch's records until the 2060s.
INTERFACE_STRIDE = 1 << 27
MAX_LIBPCAP_INTERFACES = 8
# How far a batch's packets may lie from the packet before them, in seconds.
MAX_INTERFACE_STEP = 7 * 86400


class InterfaceClock:
    """The interfaces of a pcapng with several, which libpcap reads but does not report:
    each packet's seconds lie in its interface's band (pcapfile.pcapng_interface_view),
    bands counted from the first packet's seconds.  ``convert`` takes the bands back out,
    with list and array operations rather than a loop over the records.  A packet in no
    interface's band (a later section's, or an interface described after the first
    packet, which libpcap reads without an offset) raises ClockLost, and so does a batch
    reaching more than MAX_INTERFACE_STEP from the packet before it: a clock so wrong that
    it put a packet in another interface's band would be years off.  Nothing is guessed."""

    def __init__(self, first_us: int, interfaces: int):
        self.start = first_us // MICRO - INTERFACE_STRIDE // 2  # where band 0 begins
        self.interfaces = interfaces
        self.last = first_us // MICRO

    def convert(self, meta: bytes) -> tuple[bytes, int, dict | None]:
        """``meta`` with the true seconds, the interface of most of its frames, and the
        others' by frame offset (None when there are none)."""
        words = array.array("I")
        words.frombytes(meta)
        seconds = words[0::4]
        start, stride = self.start, INTERFACE_STRIDE
        low, high = min(seconds), max(seconds)
        low_band, high_band = (low - start) // stride, (high - start) // stride
        if low_band < 1 or high_band > self.interfaces:
            raise ClockLost
        others = None
        try:
            if low_band == high_band:
                band = low_band
                shift = band * stride
                words[0::4] = array.array("I", [sec - shift for sec in seconds])
                low, high = low - shift, high - shift
            else:
                bands = [(sec - start) // stride for sec in seconds]
                true = array.array("I", [sec - b * stride for sec, b in zip(seconds, bands)])
                words[0::4] = true
                low, high = min(true), max(true)
                band = max(set(bands), key=bands.count)
                others = {offset: b - 1 for offset, b in zip(words[2::4], bands) if b != band}
        except OverflowError:
            raise ClockLost from None  # a band that puts a packet before 1970
        if low < self.last - MAX_INTERFACE_STEP or high > self.last + MAX_INTERFACE_STEP:
            raise ClockLost
        self.last = high
        return words.tobytes(), band - 1, others


class Batch(NamedTuple):
    """A libpcap batch as PrefilteredCapture.batches gives it (Sensor.handle_batch's
    arguments)."""

    linktype: int
    buf: bytes
    meta: bytes
    interface: int = 0
    others: dict | None = None  # offsets of frames from another interface, to theirs


def dlt_for(linktype: int) -> int:
    return _LINKTYPE_TO_DLT.get(linktype, linktype)


class LinktypeFilters:
    """Compiled programs per link type for captures libpcap cannot read itself (pcapng with
    several interfaces, nanosecond clocks, stdin); capped, since pcapng names link types freely."""

    def __init__(self, user_filter: str | None, tunnels: frozenset = frozenset()):
        self.user_filter = user_filter
        self.tunnels = tunnels  # as build_filter's: what libpcap ran on the same capture
        self.programs: dict = {}

    def admits(self, linktype: int, frame: bytes) -> bool:
        program = self.programs.get(linktype, False)
        if program is False:
            program = None
            if len(self.programs) < MAX_FILTER_PROGRAMS and (
                    self.user_filter or linktype not in _WRITER_ORDER_LINKTYPES):
                try:
                    program = compile_filter(self.user_filter, dlt_for(linktype), tunnels=self.tunnels)
                except FilterError:
                    # The sensor's filter alone passes such a link type whole (the decoder
                    # judges it); an operator's filter that cannot apply to it matches nothing.
                    program = REJECT if self.user_filter else None
                self.programs[linktype] = program
        if program is None:
            return True
        return program is not REJECT and program.filter(frame) > 0


class ReadAhead:
    """The bytes libpcap's reader thread has read and the consumer not yet taken: the
    reader waits while they reach the limit, PREFETCH_BYTES until the first batch is taken,
    READ_AHEAD_BYTES afterwards (the batch read last may overshoot it)."""

    def __init__(self):
        self._changed = threading.Condition()
        self.held = 0
        self.limit = PREFETCH_BYTES

    def wait(self, stop: threading.Event) -> bool:
        """Until there is room; False once ``stop`` is set."""
        with self._changed:
            while self.held >= self.limit and not stop.is_set():
                self._changed.wait(0.05)
        return not stop.is_set()

    def add(self, size: int) -> None:
        with self._changed:
            self.held += size

    def take(self, size: int) -> None:
        with self._changed:
            self.held -= size
            self.limit = READ_AHEAD_BYTES
            self._changed.notify()


class PrologueFeed:
    """A capture shown to libpcap through a pipe, with what precedes its packets rewritten:
    a nanosecond capture as a microsecond one, a pcapng with several interfaces with their
    clocks moved apart (pcapfile.pcapng_interface_view, InterfaceClock; ``resume`` is where
    the file goes on after that rewritten prologue).

    libpcap opened for microseconds (all pcapy offers) divides a nanosecond file's
    fractions by 1,000.  A classic pcap's ``prologue`` is its header under the
    microsecond magic: libpcap then passes the fractions through untouched, so
    ``next_batch``'s second word is the exact nanosecond fraction and the timestamps equal
    pcapfile.CaptureFile's.  A pcapng's is what precedes its first packet with the
    interface's resolution set to microseconds (pcapfile.pcapng_microsecond_view, whose
    timestamps MillisecondClock rebuilds).  The prologue is written here, before libpcap
    opens the pipe (its open blocks reading it, holding the GIL).  The rest is moved by ``sendfile`` in a
    forked child: a pipe takes a page at a time, and a thread would need the GIL back
    after each of ~200k calls.  The child ends when the file does or libpcap's end of the
    pipe closes; it shares the file's offset, which is how far the feed has come."""

    def __init__(self, path: str, prologue: bytes, resume: int | None = None):
        self._file = os.open(path, os.O_RDONLY)
        self._pid = 0
        self._status = 0
        try:
            self.size = os.fstat(self._file).st_size
            read_end, write_end = os.pipe()
        except OSError:
            os.close(self._file)
            raise
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # capped by /proc/sys/fs/pipe-max-size; a smaller pipe only means more wake-ups
        try:
            os.write(write_end, prologue)
            os.lseek(self._file, len(prologue) if resume is None else resume, os.SEEK_SET)
            self._pid = os.fork()
        except OSError:
            for fd in (read_end, write_end, self._file):
                os.close(fd)
            raise
        if self._pid == 0:
            self._feed(read_end, write_end)
        os.close(write_end)
        self.path = f"/proc/self/fd/{read_end}"
        self._read_end = read_end

    def _feed(self, read_end: int, write_end: int) -> None:
        """The child's loop.  It tops the pipe up only once libpcap has emptied half of it:
        writing as each page frees would wake both sides ~200k times (a read of the 1M
        mix spent 0.66 s in the kernel that way, 0.31 s so).  Exit status 1: the file
        failed to read."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the reading process decides when to stop
        status = 0
        try:
            # Its copies of the parent's sockets and files would keep them open after the
            # parent closes them (a SIEM connection it drops would not see a FIN).
            for name in os.listdir("/proc/self/fd"):
                if int(name) > 2 and int(name) not in (write_end, self._file):
                    try:
                        os.close(int(name))
                    except OSError:
                        pass  # the descriptor listdir itself had open
            # While it waits it cannot meet EPIPE: a pipe whose reader is gone polls POLLERR.
            reader_gone = select.poll()
            reader_gone.register(write_end, 0)
            while True:
                queued = _queued(write_end)
                if queued > PIPE_SIZE // 2:
                    if reader_gone.poll(0):
                        break
                    time.sleep(FEED_PAUSE)
                elif not os.sendfile(write_end, self._file, None, PIPE_SIZE - queued):
                    break
        except BrokenPipeError:
            pass  # libpcap's end closed: the capture was closed before its end
        except BaseException:  # noqa: BLE001 - whatever it is, the parent reports a cut file
            status = 1
        os._exit(status)

    def failed(self) -> bool:
        """At libpcap's end of file: whether the child stopped short of the file's end."""
        if self._pid:
            _, status = os.waitpid(self._pid, 0)
            self._pid = 0
            self._status = os.waitstatus_to_exitcode(status)
        return self._status != 0

    @property
    def offset(self) -> int:
        try:
            return os.lseek(self._file, 0, os.SEEK_CUR)
        except OSError:
            return 0

    def opened(self) -> None:
        """libpcap holds the pipe open by its own descriptor now."""
        os.close(self._read_end)
        self._read_end = -1

    def close(self) -> None:
        if self._read_end >= 0:
            self.opened()
        self.failed()
        os.close(self._file)


def _queued(pipe: int) -> int:
    """Bytes waiting in a pipe; 0 where the kernel will not say, which only costs wake-ups."""
    try:
        return struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


class PrefilteredCapture:
    """A capture read with the sensor's filter applied before Python sees a packet.

    Classic pcap files (microsecond, or nanosecond through PrologueFeed), and pcapng
    files with one interface on a microsecond clock (or a nanosecond one, through
    PrologueFeed and MillisecondClock), are read by libpcap itself
    (``next_batch``), so rejected packets cost no Python work at all; ``units`` is what a
    second of its batches' second timestamp word is divided into.  Anything else is read
    by pcapfile.CaptureFile and filtered per packet with the same compiled program.
    Iteration yields the same tuples as CaptureFile; ``wire_len`` is the captured length
    on the libpcap path, which ``next_batch`` does not report.
    """

    def __init__(self, path: str, user_filter: str | None = None):
        self.path = path
        self.user_filter = user_filter
        self._tunnels: frozenset = frozenset()
        self.truncated: str | None = None
        self.skipped = 0
        self._fd = -1
        self._handle = None
        # widen_read_buffer's buffer: libpcap's stream reads into it until the handle closes.
        self._read_buffer = None
        self._reader: threading.Thread | None = None
        self._stop_reader = threading.Event()
        self.read_ahead: ReadAhead | None = None
        # Flows the decoder shunts (capture.shunt), for a capture libpcap reads whose link
        # type is in SHUNTED_LINKTYPES.
        self.shunts: ShuntTable | None = None
        self._filter_slot = None
        self._capture = None
        self._feed: PrologueFeed | None = None
        # MillisecondClock's or InterfaceClock's convert, for the captures that need one.
        self._convert = _unconverted
        self.units = MICRO
        known = self._libpcap_format(path)
        linktype = known.linktype if known is not None else None
        if linktype is not None:
            import pcapy

            opened = path
            if known.prologue is not None:
                try:
                    self._feed = PrologueFeed(path, known.prologue, known.resume)
                except OSError as err:
                    raise CaptureError(f"{path}: {err.strerror}") from None
                opened = self._feed.path
            try:
                handle = pcapy.open_offline(opened)
            except pcapy.PcapError as err:
                self._close_feed()
                raise CaptureError(f"{path}: {err}") from None
            if self._feed is not None:
                self._feed.opened()
            self._tunnels = known.tunnels
            expression = build_filter(user_filter, dlt_for(linktype), tunnels=known.tunnels)
            try:
                set_filter(handle, expression)
            except pcapy.PcapError:
                handle.close()
                self._close_feed()
                linktype = None
            else:
                self._handle = handle
                self.units = known.units
                if self._feed is not None:
                    self.size = self._feed.size
                else:
                    self._fd = handle.getfd()
                    self.size = os.fstat(self._fd).st_size if self._fd >= 0 else None
                    self._read_buffer = widen_read_buffer(handle)
                self.format = known.format
                self._linktype = linktype
                self._open_shunts(expression)
                if known.first_ns is not None:
                    self._convert = MillisecondClock(known.first_ns).convert
                elif known.interfaces > 1:
                    self._convert = InterfaceClock(known.first_us, known.interfaces).convert
                self._records = self._libpcap_records(linktype)
        if linktype is None:
            self._capture = open_capture(path)
            self.size = self._capture.size
            self.format = self._capture.format
            self._records = self._python_records()

    def _open_shunts(self, expression: str) -> None:
        """Shunting reads a frame's network header where it stands untagged or behind one
        tag (SHUNTED_LINKTYPES), as the decoder's batch loop does; a capture that opens with
        a tunnel is read at its inner frames instead."""
        layout = SHUNTED_LINKTYPES.get(self._linktype)
        if layout is None or self._tunnels:
            return
        slot = filter_slot(self._handle, expression, MIN_SNAPLEN)
        if slot is not None:
            self._filter_slot = slot
            self.shunts = ShuntTable(slot.main, layout, dns=slot.snaplen >= DNS_MIN_SNAPLEN)

    @property
    def by_libpcap(self) -> bool:
        return self._handle is not None

    @staticmethod
    def _libpcap_format(path: str) -> LibpcapFile | None:
        """How libpcap reads a capture it reads exactly as pcapfile does, else None: a
        classic pcap (only these are looked at for tunnels), or a pcapng whose one
        interface (microsecond or nanosecond clock, no offset) is described before its
        first packet.  libpcap would round a pcapng's other clocks and cannot report which
        interface a packet came from."""
        if path == "-":
            return None
        try:
            # A pipe or a FIFO (``read <(zcat x.pcap.gz)``) can be read once only: by the
            # Python reader, as stdin is, not here and then again by libpcap.
            if not stat.S_ISREG(os.stat(path).st_mode):
                return None
            with open(path, "rb") as fh:
                head = fh.read(PCAPNG_HEAD)
        except OSError:
            return None
        classic = _LIBPCAP_MAGICS.get(head[:4]) if len(head) >= PCAP_HEADER else None
        if classic is not None:
            order, units = classic
            prologue = _MICRO_MAGIC[order] + head[4:PCAP_HEADER] if units == NANO else None
            return LibpcapFile(struct.unpack_from(order + "I", head, 20)[0] & 0xFFFF, "pcap", units,
                               prologue, tunnels=opens_with_tunnel(head, order))
        interfaces = pcapng_leading_interfaces(head)
        if interfaces is not None and len(interfaces) == 1:
            linktype, units, offset = interfaces[0]
            if units == MICRO and offset == 0:
                return LibpcapFile(linktype, "pcapng", MICRO)
            view = pcapng_microsecond_view(head) if _FEEDS_WORK else None
            if view is not None and len(view[0]) <= MAX_PROLOGUE:
                return LibpcapFile(linktype, "pcapng", NANO, *view)
        elif interfaces is not None and _FEEDS_WORK:
            view = pcapng_interface_view(head, INTERFACE_STRIDE, MAX_LIBPCAP_INTERFACES)
            if view is not None and len(view[0]) <= MAX_PROLOGUE:
                prologue, resume, linktype, count, first_us = view
                return LibpcapFile(linktype, "pcapng", MICRO, prologue, resume=resume,
                                   first_us=first_us, interfaces=count)
        return None

    def _libpcap_records(self, linktype: int):
        import pcapy

        next_batch = self._handle.next_batch
        unpack_from = BATCH_RECORD.unpack_from
        units = self.units
        convert = self._convert
        yielded = 0
        try:
            while True:
                buf, meta = next_batch(BATCH)
                if not meta:
                    if not self._feed_failed():
                        return
                    break
                meta, interface, others = convert(meta)
                for pos in range(0, len(meta), 16):
                    sec, fraction, off, caplen = unpack_from(meta, pos)
                    yield ((sec * units + fraction) / units, linktype, buf[off:off + caplen], caplen,
                           others.get(off, interface) if others else interface)
                yielded += len(meta) >> 4
        except pcapy.PcapError as err:
            self.truncated = str(err)
        except ClockLost:
            pass
        yield from self._python_rest(yielded)

    def _feed_failed(self) -> bool:
        """A PrologueFeed that stopped short ends libpcap's file early, where no error
        shows: the Python reader takes over, and meets (and reports) the failure itself."""
        return self._feed is not None and self._feed.failed()

    def _python_rest(self, done: int):
        """next_batch drops the packets of the batch it failed in: re-read them in Python.
        libpcap's handle and the feed it drained are no longer needed: they go first."""
        self._close_handle()
        self._close_feed()
        self._capture = open_capture(self.path)
        self.size = self._capture.size
        skip = done
        for record in self._python_records():
            if skip:
                skip -= 1
                continue
            yield record

    def batches(self):
        """The capture as libpcap ``next_batch`` batches (Batch: meta holds native (sec,
        usec, offset, caplen) records), so the reader can drop bypassed flows without
        slicing each frame out.  Frames libpcap cannot read (other
        formats, the rest of a file after a libpcap error) come as the 5-tuples iteration
        yields.  Use this or iteration, not both; calling it again returns the same batches.

        libpcap starts reading at once, in a thread of its own: ``next_batch`` releases the
        GIL while it runs, so on two cores reading the file and running the filter overlap
        with whatever the caller still sets up and then with the decoding of earlier
        batches, within the bytes ReadAhead allows.  libpcap handles are not thread-safe:
        the reader thread alone touches the handle until it has stopped."""
        if self._handle is not None and self.read_ahead is None:
            self._records.close()
            self._records = self._batched_records(self._start_reader())
        return self._records

    def _start_reader(self) -> tuple:
        import pcapy

        batches: queue.SimpleQueue = queue.SimpleQueue()
        room = self.read_ahead = ReadAhead()
        stop = threading.Event()
        next_batch = self._handle.next_batch
        convert = self._convert
        linktype = self._linktype
        shunts, slot = self.shunts, self._filter_slot

        def read() -> None:
            table = shunts
            installed = table.main if table is not None else None
            size = SHUNTING_BATCH if table is not None else BATCH
            index = 0
            while room.wait(stop):
                if table is not None:
                    program = table.program_for(index, stop)
                    if program is None:
                        return
                    if program is not installed:
                        installed = program
                        if not slot.install(program):
                            table.disable()
                            table = None
                            size = BATCH
                index += 1
                try:
                    buf, meta = next_batch(size)
                    batch = Batch(linktype, buf, *convert(meta)) if meta else Batch(linktype, buf, meta)
                except Exception as err:  # noqa: BLE001 - the consumer must not wait for a batch that never comes
                    batches.put(err)
                    return
                room.add(len(buf))
                batches.put(batch)
                if not meta:
                    return

        self._stop_reader = stop
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, READER_SWITCH_INTERVAL))
        self._reader = threading.Thread(target=read, name="pcap-reader", daemon=True)
        self._reader.start()
        return batches, room

    def _batched_records(self, reader: tuple):
        """``_libpcap_records`` by whole batches; records after a libpcap error one by one."""
        import pcapy

        batches, room = reader
        shunts = self.shunts
        yielded = 0
        taken = -1
        try:
            while True:
                item = batches.get()
                taken += 1
                if isinstance(item, ClockLost):
                    break
                if isinstance(item, pcapy.PcapError):
                    self.truncated = str(item)
                    break
                if isinstance(item, Exception):
                    raise item
                room.take(len(item.buf))
                if not item.meta:
                    if not self._feed_failed():
                        return
                    break
                if shunts is not None:
                    shunts.entering(taken)
                yield item
                yielded += len(item.meta) >> 4
                if shunts is not None:
                    shunts.finished(taken)
        finally:
            self._join_reader()
        yield from self._python_rest(yielded)

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._stop_reader.set()
            self._reader.join()
            self._reader = None
            sys.setswitchinterval(self._switch_interval)

    def _python_records(self):
        capture = self._capture
        admits = LinktypeFilters(self.user_filter, self._tunnels).admits
        for record in capture:
            if admits(record[1], record[2]):
                yield record
        self.truncated = capture.truncated or self.truncated
        self.skipped = capture.skipped

    def __iter__(self):
        return self._records

    def tell(self) -> int:
        if self._capture is not None:
            return self._capture.tell()
        if self._feed is not None:
            return self._feed.offset
        try:
            return os.lseek(self._fd, 0, os.SEEK_CUR)
        except OSError:
            return 0

    def close(self) -> None:
        self._records.close()
        self._join_reader()
        self._close_handle()
        self._close_feed()
        if self._capture is not None:
            self._capture.close()

    def _close_handle(self) -> None:
        """libpcap's handle, then the buffer its stream read into."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._read_buffer = None

    def _close_feed(self) -> None:
        """After libpcap's handle: the feed's child ends on the pipe libpcap closed."""
        if self._feed is not None:
            self._feed.close()
            self._feed = None

    def __enter__(self) -> "PrefilteredCapture":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_prefiltered(path: str, user_filter: str | None = None) -> PrefilteredCapture:
    """Like pcapfile.open_capture, with the sensor's filter (and the operator's) applied first."""
    return PrefilteredCapture(path, user_filter)
