"""The capture filter: everything that can carry evidence, nothing else.

The filter runs in the kernel for live capture and inside libpcap for files, so the
packets it rejects never become Python objects.  What must pass:

* DNS (UDP/TCP 53, mDNS 5353, LLMNR 5355), DHCP/DHCPv6, the KSC Network Agent UDP
  ports, QUIC long-header packets (Initials), tunnels (VXLAN, Geneve, GRE/ERSPAN,
  IP-in-IP, 6in4), IP fragments, MPLS and PPPoE frames, IPv6 with extension headers.
* Every TCP SYN, FIN and RST: flow starts drive ``dns_answer_flow`` and ``ksc_port``.
* TCP payload that may be the start of a client's stream: a segment that opens with a
  TLS handshake record or an HTTP method, whatever the ports, and any segment sent
  towards the lower port.  Clients use ephemeral ports above the server's, so the
  second and third segments of a large (post-quantum) ClientHello still pass while the
  server-to-client bulk, which is most of a span port's volume, does not.

What it drops: pure ACKs, server-to-client data, RTP and other UDP media, QUIC
short-header (1-RTT) packets.  Client-to-server data past the hello still passes and is
shed by the decoder's per-flow bypass.

libpcap's ``tcp[]``/``udp[]`` accessors only work over IPv4, so IPv6 uses ``ip6[]``
offsets (TCP/UDP right after the fixed header; IPv6 with extension headers passes
whole).  ``vlan`` shifts every later offset in libpcap, so the tagged variants come
last, up to three tags deep (802.1ad QinQ included).  Untagged MPLS and PPPoE session
frames pass whole: once libpcap's ``mpls``/``pppoes`` keywords shift the offsets they
cannot be undone for the rest of the expression.

The watch list: a UDP flow from an internal host to an address a Kaspersky name resolved
to is ``dns_answer_flow`` evidence whatever its port, so UDP towards the addresses the
tracker holds passes too (``build_filter(watch=...)``, updated at run time through
``set_watch``).  It is bounded by the program size, not by a round count: for a live
Ethernet interface libpcap reads VLAN tags from kernel metadata and the sensor's filter
alone already compiles to about 3100 of the kernel's 4096 classic BPF instructions (about
1000 offline).  A watched IPv4 address costs about 4 more live, an IPv6 /64 about 21 (an
exact IPv6 address about 50), so WATCH_BUDGET keeps the worst case near 3650 and leaves
room for an operator's filter.  Past the kernel's limit libpcap would
silently filter in user space, copying every packet out of the kernel.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import struct
import threading
from collections.abc import Iterable

from .pcapfile import CaptureError, open_capture

DLT_EN10MB = 1

# Keep in step with decode.packet (DNS_PORTS, DHCP_PORTS, tunnels) and track.tracker
# (KSC_UDP_PORTS); tests/test_bpf_filter.py checks that they are all covered.
UDP_PORTS = (53, 5353, 5355, 4789, 6081)
UDP_PORT_RANGES = ((67, 68), (546, 547), (15000, 15001))
TCP_PORTS = (53,)

_TLS_HANDSHAKE = 0x16
# First four payload bytes of the HTTP request methods the decoder knows, as big-endian words.
_HTTP_METHOD_WORDS = tuple(int.from_bytes(m, "big") for m in (
    b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"CONN", b"PATC", b"TRAC"))


def _port_terms() -> str:
    terms = [f"udp port {p}" for p in UDP_PORTS]
    terms += [f"udp portrange {lo}-{hi}" for lo, hi in UDP_PORT_RANGES]
    terms += [f"tcp port {p}" for p in TCP_PORTS]
    return " or ".join(terms)


def _client_payload(payload_len: str, sport: str, dport: str, first: str, word: str) -> str:
    methods = " or ".join(f"{word} == 0x{w:08x}" for w in _HTTP_METHOD_WORDS)
    return (f"({payload_len} > 0 and ({dport} < {sport} or {first} == 0x{_TLS_HANDSHAKE:02x}"
            f" or {methods}))")


_TCP4_DOFF = "((tcp[12] & 0xf0) >> 2)"
_IPV4_TERMS = (_port_terms() +
               " or ip[6:2] & 0x3fff != 0"
               " or ip proto 47 or ip proto 4 or ip proto 41"
               " or (udp and udp[8] & 0xc0 == 0xc0)"
               " or (tcp and tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0)"
               " or (tcp and " + _client_payload(
                   f"ip[2:2] - ((ip[0] & 0xf) << 2) - {_TCP4_DOFF}", "tcp[0:2]", "tcp[2:2]",
                   f"tcp[{_TCP4_DOFF}]", f"tcp[{_TCP4_DOFF}:4]") + ")")

_TCP6_DOFF = "((ip6[52] & 0xf0) >> 2)"
_IPV6_WHOLE = (0, 43, 44, 51, 60, 135, 139, 140, 47, 4, 41)
_IPV6_TERMS = (_port_terms() +
               " or " + " or ".join(f"ip6[6] == {p}" for p in _IPV6_WHOLE) +
               " or (ip6[6] == 17 and ip6[48] & 0xc0 == 0xc0)"
               " or (ip6[6] == 6 and ip6[53] & 0x07 != 0)"
               " or (ip6[6] == 6 and " + _client_payload(
                   f"ip6[4:2] - {_TCP6_DOFF}", "ip6[40:2]", "ip6[42:2]",
                   f"ip6[40 + {_TCP6_DOFF}]", f"ip6[40 + {_TCP6_DOFF}:4]") + ")")

# What a watched address adds to the live program, in units of about 4 instructions: an
# IPv4 address one comparison per VLAN variant, an IPv6 /64 two words reloaded per variant.
WATCH_BUDGET = 128
_IPV4_COST = 1
_IPV6_PREFIX_COST = 5


def watch_list(addresses: Iterable[str]) -> tuple[tuple[str, ...], int]:
    """The addresses a filter can watch, and how many the budget left out.

    ``addresses`` come oldest first (as ``Tracker.answer_addresses`` gives them); the newest
    that fit WATCH_BUDGET are kept, the first one that does not fit ends the list (the
    older ones are counted as left out, not parsed: the tracker may hold tens of thousands).
    IPv6 is watched by /64, so an address whose /64 is already watched costs nothing.
    The result is canonical, without repeats and sorted, so the same set always yields the
    same filter text.  Raises ValueError for anything that is not a plain IPv4/IPv6 address (a
    scope id such as ``%eth0`` would be interpolated into the filter as it stands)."""
    ordered = list(addresses)
    kept: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, None] = {}
    prefixes: set[int] = set()
    spent = 0
    for position in range(len(ordered) - 1, -1, -1):
        text = ordered[position]
        if not isinstance(text, str):
            raise ValueError(f"watch address must be a string, not {type(text).__name__}")
        address = ipaddress.ip_address(text)
        if getattr(address, "scope_id", None):
            raise ValueError(f"watch address {text!r} has a scope id")
        if address in kept:
            continue
        prefix = int(address) >> 64 if address.version == 6 else None
        cost = _IPV4_COST if prefix is None else (0 if prefix in prefixes else _IPV6_PREFIX_COST)
        if spent + cost > WATCH_BUDGET:
            watched = _sorted_text(kept)
            return watched, len(set(ordered[:position + 1]).difference(watched))
        kept[address] = None
        if prefix is not None:
            prefixes.add(prefix)
        spent += cost
    return _sorted_text(kept), 0


def _sorted_text(addresses) -> tuple[str, ...]:
    return tuple(str(a) for a in sorted(addresses, key=lambda a: (a.version, int(a))))


def _core(watch: tuple[str, ...]) -> str:
    """``_CORE`` with UDP towards the watched addresses: IPv4 exactly, IPv6 by /64 (an exact
    IPv6 comparison costs twice as much live; the /64 around a Kaspersky server is its
    operator's, so what else it lets through is little)."""
    ipv4_terms, ipv6_terms = _IPV4_TERMS, _IPV6_TERMS
    watched4 = [a for a in watch if ":" not in a]
    watched6 = sorted({ipaddress.IPv6Network((a, 64), strict=False) for a in watch if ":" in a})
    if watched4:
        ipv4_terms += " or (ip proto 17 and (" + " or ".join(f"ip dst host {a}" for a in watched4) + "))"
    if watched6:
        ipv6_terms += " or (ip6[6] == 17 and (" + " or ".join(f"ip6 dst net {n}" for n in watched6) + "))"
    return f"((ip and ({ipv4_terms})) or (ip6 and ({ipv6_terms})))"


def _ethernet(core: str) -> str:
    return ("ether[12:2] == 0x8847 or ether[12:2] == 0x8848 or ether[12:2] == 0x8864 or "
            f"{core} or (vlan and ({core} or (vlan and ({core} or (vlan and {core})))))")


def build_filter(user_filter: str | None = None, linktype: int = DLT_EN10MB,
                 watch: Iterable[str] = ()) -> str:
    """The sensor's filter for this link type, narrowed by the operator's own (tcpdump syntax),
    widened by UDP towards the ``watch`` addresses (``watch_list`` validates and caps them).

    The operator's part comes first: the ``vlan`` terms of the sensor's part shift libpcap's
    offsets for everything after them."""
    core = _core(watch_list(watch)[0])
    base = _ethernet(core) if linktype == DLT_EN10MB else core
    if user_filter:
        return f"({user_filter}) and ({base})"
    return base


class FilterError(ValueError):
    """The filter does not compile for this link type (libpcap's message included)."""


def compile_filter(user_filter: str | None, linktype: int = DLT_EN10MB, snaplen: int = 262144,
                   watch: Iterable[str] = ()):
    """A compiled ``pcapy.BPFProgram`` for ``build_filter``; raises FilterError with libpcap's reason."""
    import pcapy

    try:
        return pcapy.compile(linktype, snaplen, build_filter(user_filter, linktype, watch), 1, 0)
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
# Batches libpcap's reader thread may have ready: enough to keep both cores busy, few
# enough that a watch list update (set_watch) applies soon.
READ_AHEAD = 2
# Packets a capture file yields between two watch list recompiles.  The sensor spends
# 15-30 us of Python on each packet that passes, so 65536 packets are 1-2 s of work and
# even the worst-case recompile (about 190 ms, WATCH_BUDGET IPv4 addresses) costs at most
# a tenth of it; a file read is not slowed down by a network that keeps resolving new
# Kaspersky addresses.
FILE_WATCH_GAP = 65536
_PCAP_MICRO_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")
_META = struct.Struct("=IIII")


def dlt_for(linktype: int) -> int:
    return _LINKTYPE_TO_DLT.get(linktype, linktype)


class WatchUpdates:
    """Decides when a capture recompiles its filter for a new watch list.

    Recompiling costs 15-190 ms, so it happens only when the list gains an address, and
    no sooner than ``min_gap`` after the previous one (seconds of wall time live, packets
    for files).  An address that merely expired stays watched until the next addition:
    it only costs the kernel a comparison.  A refused update is not remembered; callers
    offer the tracker's list again regularly and a later offer applies it."""

    def __init__(self, min_gap: float):
        self.min_gap = min_gap
        self.watch: tuple[str, ...] = ()
        self.left_out = 0  # addresses the budget has kept out of the recompiled lists
        self.postponed = False  # the last offer came too soon and must be made again
        self._last: float | None = None

    def due(self, addresses: Iterable[str], now: float) -> tuple[str, ...] | None:
        """The watch list to compile now, or None when there is nothing new or it is too
        soon (then ``postponed`` is set)."""
        self.postponed = self._last is not None and now - self._last < self.min_gap
        if self.postponed:
            return None
        watch, left_out = watch_list(addresses)
        if set(watch).issubset(self.watch):
            return None
        self.watch = watch
        self.left_out += left_out
        self._last = now
        return watch


class LinktypeFilters:
    """Compiled programs per link type for captures libpcap cannot read itself (pcapng with
    several link types, nanosecond pcaps, stdin); capped, since pcapng names link types freely."""

    def __init__(self, user_filter: str | None):
        self.user_filter = user_filter
        self.watch: tuple[str, ...] = ()
        self.programs: dict = {}

    def set_watch(self, watch: tuple[str, ...]) -> None:
        """Recompile for a new watch list, each link type when its next frame comes."""
        self.watch = watch
        self.programs.clear()

    def admits(self, linktype: int, frame: bytes) -> bool:
        program = self.programs.get(linktype, False)
        if program is False:
            program = None
            if len(self.programs) < MAX_FILTER_PROGRAMS and (
                    self.user_filter or linktype not in _WRITER_ORDER_LINKTYPES):
                try:
                    program = compile_filter(self.user_filter, dlt_for(linktype), watch=self.watch)
                except FilterError:
                    # The sensor's filter alone passes such a link type whole (the decoder
                    # judges it); an operator's filter that cannot apply to it matches nothing.
                    program = REJECT if self.user_filter else None
                self.programs[linktype] = program
        if program is None:
            return True
        return program is not REJECT and program.filter(frame) > 0


class PrefilteredCapture:
    """A capture read with the sensor's filter applied before Python sees a packet.

    Classic microsecond pcap files are read by libpcap itself (``next_batch``), so rejected
    packets cost no Python work at all.  Anything else is read by pcapfile.CaptureFile and
    filtered per packet with the same compiled program.  Iteration yields the same tuples
    as CaptureFile; ``wire_len`` is the captured length on the libpcap path, which
    ``next_batch`` does not report.
    """

    def __init__(self, path: str, user_filter: str | None = None):
        self.path = path
        self.user_filter = user_filter
        self.truncated: str | None = None
        self.skipped = 0
        self.yielded = 0
        self.watch_updates = WatchUpdates(FILE_WATCH_GAP)
        self._reader: threading.Thread | None = None
        self._pending_filter: str | None = None
        self.filter_error: str | None = None
        self._filters = LinktypeFilters(user_filter)
        self._linktype: int | None = None
        self._fd = -1
        self._handle = None
        self._capture = None
        linktype = self._classic_linktype(path)
        if linktype is not None:
            import pcapy

            try:
                handle = pcapy.open_offline(path)
            except pcapy.PcapError as err:
                raise CaptureError(f"{path}: {err}") from None
            try:
                handle.setfilter(build_filter(user_filter, dlt_for(linktype)))
            except pcapy.PcapError:
                handle.close()
                linktype = None
            else:
                self._handle = handle
                self._linktype = linktype
                self._fd = handle.getfd()
                self.size = os.fstat(self._fd).st_size if self._fd >= 0 else None
                self.format = "pcap"
                self._linktype = linktype
                self._records = self._libpcap_records(linktype)
        if linktype is None:
            self._capture = open_capture(path)
            self.size = self._capture.size
            self.format = self._capture.format
            self._records = self._python_records()

    @staticmethod
    def _classic_linktype(path: str) -> int | None:
        """The link type of a classic microsecond pcap file, else None (libpcap would
        round nanosecond timestamps, and pcapng may mix link types)."""
        if path == "-":
            return None
        try:
            with open(path, "rb") as fh:
                head = fh.read(24)
        except OSError:
            return None
        if len(head) < 24 or head[:4] not in _PCAP_MICRO_MAGICS:
            return None
        order = "<" if head[:4] == _PCAP_MICRO_MAGICS[0] else ">"
        return struct.unpack_from(order + "I", head, 20)[0] & 0xFFFF

    def _libpcap_records(self, linktype: int):
        import pcapy

        next_batch = self._handle.next_batch
        unpack_from = _META.unpack_from
        yielded = 0
        try:
            while True:
                buf, meta = next_batch(BATCH)
                if not meta:
                    return
                self.yielded = yielded
                for pos in range(0, len(meta), 16):
                    sec, usec, off, caplen = unpack_from(meta, pos)
                    yield (sec * 1_000_000 + usec) / 1_000_000, linktype, buf[off:off + caplen], caplen, 0
                yielded += len(meta) >> 4
        except pcapy.PcapError as err:
            self.truncated = str(err)
        yield from self._python_rest(yielded)

    def _python_rest(self, done: int):
        """next_batch drops the packets of the batch it failed in: re-read them in Python."""
        self._capture = open_capture(self.path)
        self.size = self._capture.size
        self._handle.close()
        self._handle = None
        skip = done
        for record in self._python_records():
            if skip:
                skip -= 1
                continue
            yield record

    def batches(self):
        """The capture as libpcap ``next_batch`` batches, ``(linktype, buffer, meta)`` with
        meta holding native (sec, usec, offset, caplen) records, so the reader can drop
        bypassed flows without slicing each frame out.  Frames libpcap cannot read (other
        formats, the rest of a file after a libpcap error) come as the 5-tuples iteration
        yields.  Use this or iteration, not both."""
        if self._handle is not None:
            self._records.close()
            self._records = self._batched_records()
        return self._records

    def _batched_records(self):
        """``_libpcap_records`` by whole batches; records after a libpcap error one by one.

        libpcap reads and filters in a thread of its own: ``next_batch`` releases the GIL
        while it runs, so on a machine with two cores reading the file and running the
        filter overlap with the decoding of the previous batches instead of adding to it.
        The queue is bounded, so the reader never runs more than READ_AHEAD batches ahead.
        libpcap handles are not thread-safe: the reader thread alone touches the handle
        until it has stopped, and applies new filters (set_watch) between two batches."""
        import pcapy

        linktype = self._linktype
        batches: queue.Queue = queue.Queue(READ_AHEAD)
        stop = threading.Event()

        def read() -> None:
            handle = self._handle
            next_batch = handle.next_batch
            try:
                while not stop.is_set():
                    pending = self._pending_filter
                    if pending is not None:
                        self._pending_filter = None
                        try:
                            handle.setfilter(pending)
                        except pcapy.PcapError as err:
                            self.filter_error = f"watch list filter rejected, old one kept: {err}"
                    buf, meta = next_batch(BATCH)
                    batches.put((buf, meta))
                    if not meta:
                        return
            except pcapy.PcapError as err:
                batches.put(err)

        reader = self._reader = threading.Thread(target=read, name="pcap-reader", daemon=True)
        reader.start()
        try:
            while True:
                item = batches.get()
                if isinstance(item, pcapy.PcapError):
                    self.truncated = str(item)
                    break
                buf, meta = item
                if not meta:
                    return
                yield linktype, buf, meta
                self.yielded += len(meta) >> 4
        finally:
            stop.set()
            while reader.is_alive():
                try:
                    batches.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._reader = None
        yield from self._python_rest(self.yielded)

    def _python_records(self):
        capture = self._capture
        admits = self._filters.admits
        for record in capture:
            if admits(record[1], record[2]):
                self.yielded += 1
                yield record
        self.truncated = capture.truncated or self.truncated
        self.skipped = capture.skipped

    def __iter__(self):
        return self._records

    def set_watch(self, addresses: Iterable[str]) -> bool:
        """Also pass UDP towards these addresses (``build_filter`` ``watch``); True when the
        filter was recompiled (see WatchUpdates: at most once per FILE_WATCH_GAP packets).

        Read-ahead: libpcap filters a whole batch (up to BATCH passing packets) when
        ``next_batch`` reads it, and with ``batches()`` its reader thread keeps up to
        READ_AHEAD batches ready, so on that path the new filter applies once those are
        read; packets they hold were judged by the old filter and those it rejected are
        gone.  The per-packet path (pcapng, nanosecond pcap, stdin) applies it from the very
        next packet.  Raises FilterError when libpcap rejects the new filter (the old one
        stays)."""
        watch = self.watch_updates.due(addresses, self.yielded)
        if watch is None:
            return False
        if self._handle is not None:
            import pcapy

            text = build_filter(self.user_filter, dlt_for(self._linktype), watch)
            if self._reader is not None:
                self._pending_filter = text
            else:
                try:
                    self._handle.setfilter(text)
                except pcapy.PcapError as err:
                    raise FilterError(f"bad capture filter with a watch list: {err}") from None
        self._filters.set_watch(watch)
        return True

    def tell(self) -> int:
        if self._capture is not None:
            return self._capture.tell()
        try:
            return os.lseek(self._fd, 0, os.SEEK_CUR)
        except OSError:
            return 0

    def close(self) -> None:
        self._records.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._capture is not None:
            self._capture.close()

    def __enter__(self) -> "PrefilteredCapture":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_prefiltered(path: str, user_filter: str | None = None) -> PrefilteredCapture:
    """Like pcapfile.open_capture, with the sensor's filter (and the operator's) applied first."""
    return PrefilteredCapture(path, user_filter)
