"""Offline capture reader: classic pcap and pcapng, ``struct`` only.

The reader sits in front of a loop over millions of packets, so it keeps one large
``bytes`` buffer, decodes record headers with precompiled ``struct.Struct`` objects
bound to generator locals and yields plain tuples; no object is built per packet
beyond the frame slice.  Capture files are attacker-controlled: every length is
checked against a cap before anything is allocated, and a record that cannot be
trusted ends the iteration with ``truncated`` explaining where and why (everything
before it has been yielded), like tcpdump's "truncated dump file" warning.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
from typing import BinaryIO, Iterator

# libpcap's MAXIMUM_SNAPLEN: a larger captured length means the record header is garbage.
MAX_CAPLEN = 262144
MAX_BLOCK_LEN = 16 << 20
# IDBs are only a few bytes long; without a cap a hostile file could build a huge table.
MAX_INTERFACES = 4096
# datetime's range, years 1 to 9999.  A pcapng timestamp (64 bits of units plus a signed
# offset) can lie far beyond it; no capture was taken then, and every time formatted from
# it downstream (alerts, the inventory) would fail.
MIN_TIMESTAMP = -62135596800.0
MAX_TIMESTAMP = 253402300799.0
READ_CHUNK = 1 << 20

_PCAP_MICRO = 0xA1B2C3D4
_PCAP_NANO = 0xA1B23C4D
# Alexey Kuznetzov's patched libpcap: 8 more bytes (ifindex, protocol, pkt_type) per record.
_PCAP_KUZNETZOV = 0xA1B2CD34
_PCAP_MAGICS = {
    _PCAP_MICRO: (1_000_000, "IIII"),
    _PCAP_NANO: (1_000_000_000, "IIII"),
    _PCAP_KUZNETZOV: (1_000_000, "IIII8x"),
}

_SHB = 0x0A0D0D0A
_IDB = 1
_OBSOLETE_PB = 2
_SPB = 3
_EPB = 6
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_BYTE_ORDER_MAGIC_SWAPPED = 0x4D3C2B1A
_LENGTHS_SWAPPED, _LENGTHS_MAYBE_SWAPPED = "swapped", "maybe swapped"
_OPT_ENDOFOPT = 0
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14
_DEFAULT_TS_UNITS = 1_000_000

_LE_U32 = struct.Struct("<I")
_BE_U32 = struct.Struct(">I")


class CaptureError(Exception):
    """The capture cannot be read at all; the message names the file and the problem."""


class _PcapngLayout:
    """Precompiled structs for one pcapng byte order (a file may switch per section)."""

    __slots__ = ("head", "u32", "u16", "epb", "obsolete_pb", "idb", "option", "int64")

    def __init__(self, order: str):
        self.head = struct.Struct(order + "II")
        self.u32 = struct.Struct(order + "I")
        self.u16 = struct.Struct(order + "H")
        self.epb = struct.Struct(order + "IIIII")
        self.obsolete_pb = struct.Struct(order + "HHIIII")
        self.idb = struct.Struct(order + "HxxI")
        self.option = struct.Struct(order + "HH")
        self.int64 = struct.Struct(order + "q")


_PCAPNG_LAYOUTS = {"<": _PcapngLayout("<"), ">": _PcapngLayout(">")}


def _section_byte_order(buf: bytes, pos: int) -> str | None:
    magic = _LE_U32.unpack_from(buf, pos + 8)[0]
    if magic == _BYTE_ORDER_MAGIC:
        return "<"
    if magic == _BYTE_ORDER_MAGIC_SWAPPED:
        return ">"
    return None


def _interface(buf: bytes, pos: int, block_end: int,
               layout: _PcapngLayout) -> tuple[int, int, int, int, int]:
    """(link type, snap length, units per second, offset in seconds, position of the
    if_tsresol value or -1) of the IDB at ``pos``.

    Malformed options end option parsing but keep the interface: its packets are
    still good, and the defaults (microseconds, no offset) are what most writers use.
    """
    linktype, snaplen = layout.idb.unpack_from(buf, pos + 8)
    start, end = pos + 16, block_end - 4
    units = _DEFAULT_TS_UNITS
    offset = 0
    resolution_at = -1
    option = layout.option.unpack_from
    while start + 4 <= end:
        code, length = option(buf, start)
        value = start + 4
        if code == _OPT_ENDOFOPT or value + length > end:
            break
        if code == _OPT_IF_TSRESOL and length >= 1:
            resolution = buf[value]
            units = 2 ** (resolution & 0x7F) if resolution & 0x80 else 10 ** resolution
            resolution_at = value
        elif code == _OPT_IF_TSOFFSET and length == 8:
            offset = layout.int64.unpack_from(buf, value)[0]
        start = value + ((length + 3) & ~3)
    return linktype, snaplen, units, offset, resolution_at


def _leading_blocks(head: bytes) -> tuple[_PcapngLayout, list[tuple[int, int]], int] | None:
    """(byte order's layout, (position, length) of each IDB, position of the first packet
    block) of a pcapng file's first bytes ``head``.  None when ``head`` is not pcapng, is
    malformed (a block's trailing length too: a view rewritten from it would repair what
    the full reader stops at), starts a second section or ends before a packet block."""
    if len(head) < 28 or _LE_U32.unpack_from(head)[0] != _SHB:
        return None
    order = _section_byte_order(head, 0)
    if order is None:
        return None
    layout = _PCAPNG_LAYOUTS[order]
    idbs = []
    pos = 0
    while pos + 12 <= len(head):
        block_type, block_len = layout.head.unpack_from(head, pos)
        if block_type in (_EPB, _OBSOLETE_PB, _SPB):
            return layout, idbs, pos
        if block_len & 3 or block_len < 12 or pos + block_len > len(head) \
                or layout.u32.unpack_from(head, pos + block_len - 4)[0] != block_len:
            return None
        if block_type == _SHB and pos:
            return None
        if block_type == _IDB:
            if block_len < 20:
                return None
            idbs.append((pos, block_len))
        pos += block_len
    return None


def pcapng_leading_interfaces(head: bytes) -> list[tuple[int, int, int]] | None:
    """(link type, timestamp units per second, offset in seconds) of each interface a
    pcapng file describes before its first packet block, read from the file's first
    bytes ``head``.  None when ``head`` is not pcapng, is malformed, starts a second
    section or ends before a packet block: only the full reader can tell then."""
    leading = _leading_blocks(head)
    if leading is None:
        return None
    layout, idbs, _ = leading
    interfaces = []
    for pos, length in idbs:
        linktype, _snaplen, units, offset, _ = _interface(head, pos, pos + length, layout)
        interfaces.append((linktype, units, offset))
    return interfaces


def pcapng_microsecond_view(head: bytes) -> tuple[bytes, int] | None:
    """For a pcapng whose one interface counts nanoseconds since the epoch (if_tsresol 9,
    no offset) and whose first packet block, an EPB, lies in ``head``: the bytes before
    that block with if_tsresol set to microseconds, and the packet's timestamp in
    nanoseconds.  libpcap reading the file so reports ``t // 10**6`` as seconds and
    ``t % 10**6`` as microseconds, ``t`` being each packet's nanosecond count: nothing is
    rounded away (bpf.MillisecondClock rebuilds the nanoseconds).  None otherwise."""
    leading = _leading_blocks(head)
    if leading is None or len(leading[1]) != 1:
        return None
    layout, ((pos, length),), packet_at = leading
    _linktype, _snaplen, units, offset, resolution_at = _interface(head, pos, pos + length, layout)
    first = _first_packet_time(head, layout, packet_at)
    if units != 1_000_000_000 or offset or resolution_at < 0 or head[resolution_at] != 9 or first is None:
        return None
    view = bytearray(head[:packet_at])
    view[resolution_at] = 6
    return bytes(view), first


def _first_packet_time(head: bytes, layout: _PcapngLayout, packet_at: int) -> int | None:
    """The timestamp (in its interface's units) of the packet block at ``packet_at``, when
    it is an EPB whose header lies within ``head``."""
    if layout.head.unpack_from(head, packet_at)[0] != _EPB or packet_at + 28 > len(head):
        return None
    high, low = layout.epb.unpack_from(head, packet_at + 8)[1:3]
    return high << 32 | low


def pcapng_interface_view(head: bytes, stride: int, most: int) -> tuple[bytes, int, int, int, int] | None:
    """For a pcapng whose 2 to ``most`` interfaces, all described before its first packet
    block (an EPB within ``head``), share one link type and count microseconds with no
    offset: the bytes before that block with interface ``i`` given an if_tsoffset of
    ``(i + 1) * stride`` seconds, where that block starts, the link type, the number of
    interfaces and the first packet's timestamp in microseconds.  libpcap reading the file so reports each packet's
    interface in its seconds (bpf.InterfaceClock takes it back out); the fraction is
    untouched.  None otherwise."""
    leading = _leading_blocks(head)
    if leading is None or not 2 <= len(leading[1]) <= most:
        return None
    layout, idbs, packet_at = leading
    first = _first_packet_time(head, layout, packet_at)
    if first is None:
        return None
    described = [_interface(head, pos, pos + length, layout) for pos, length in idbs]
    if any(units != _DEFAULT_TS_UNITS or offset or linktype != described[0][0]
           for linktype, _snaplen, units, offset, _ in described):
        return None
    view = bytearray()
    last = 0
    for index, (pos, length) in enumerate(idbs):
        view += head[last:pos] + _with_offset(head[pos:pos + length], (index + 1) * stride, layout)
        last = pos + length
    view += head[last:packet_at]
    return bytes(view), packet_at, described[0][0], len(idbs), first


def _with_offset(idb: bytes, seconds: int, layout: _PcapngLayout) -> bytes:
    """The IDB ``idb`` with an if_tsoffset option of ``seconds`` after its own options
    (it has none: pcapng_interface_view checked)."""
    end, pos = len(idb) - 4, 16
    while pos + 4 <= end:
        code, length = layout.option.unpack_from(idb, pos)
        if code == _OPT_ENDOFOPT or pos + 4 + length > end:
            break
        pos += 4 + ((length + 3) & ~3)
    body = (idb[8:pos] + layout.option.pack(_OPT_IF_TSOFFSET, 8) + layout.int64.pack(seconds)
            + layout.option.pack(_OPT_ENDOFOPT, 0))
    total = len(body) + 12
    return layout.head.pack(_IDB, total) + body + layout.u32.pack(total)


class CaptureFile:
    """One capture file (or stdin) being read; iterate once for its packets.

    Iteration yields ``(ts_seconds, linktype, frame, wire_len, interface_index)``.
    Timestamps are computed as one exact integer division, so a nanosecond capture
    gives the float nearest to the true instant.  ``skipped`` counts packets that
    name an interface the section never described or whose timestamp lies outside the
    years 1-9999 (MIN_TIMESTAMP, MAX_TIMESTAMP).
    """

    format: str

    def __init__(self, path: str, stream: BinaryIO, size: int | None = None,
                 close_stream: bool = True):
        self.path = path
        self.size = size
        self.truncated: str | None = None
        self.skipped = 0
        self._stream = stream
        self._close_stream = close_stream
        self._read = getattr(stream, "read1", stream.read)
        self._base = 0
        self._consumed = 0
        try:
            head = self._fill(b"", 0, 28)
        except OSError as err:
            raise CaptureError(f"{self._name}: cannot read: {err.strerror or err}") from None
        self._records = self._start(head)

    @property
    def _name(self) -> str:
        return "stdin" if self.path == "-" else self.path

    def _fail(self, problem: str) -> CaptureError:
        return CaptureError(f"{self._name}: {problem}")

    def _start(self, head: bytes) -> Iterator[tuple[float, int, bytes, int, int]]:
        if not head:
            raise self._fail("empty file")
        if len(head) >= 4:
            if _LE_U32.unpack_from(head)[0] == _SHB:
                return self._start_pcapng(head)
            for order, u32 in (("<", _LE_U32), (">", _BE_U32)):
                magic = u32.unpack_from(head)[0]
                if magic in _PCAP_MAGICS:
                    return self._start_pcap(head, order, magic)
        if head[:2] == b"\x1f\x8b":
            raise self._fail("gzip-compressed capture; decompress it first (zcat FILE | purge-sensor read -)")
        raise self._fail(f"not a pcap or pcapng file (starts with {head[:4].hex()})")

    def _start_pcap(self, head: bytes, order: str, magic: int):
        if len(head) < 24:
            raise self._fail(f"bad pcap header: file header needs 24 bytes, have {len(head)}")
        major, minor, _zone, _sigfigs, _snaplen, network = struct.unpack_from(order + "HHiIII", head, 4)
        if major != 2:
            raise self._fail(f"bad pcap header: unsupported version {major}.{minor}")
        self.format = "pcap"
        units, record_fields = _PCAP_MAGICS[magic]
        # The upper bits of the link-type field carry FCS information, not the link type.
        linktype = network & 0xFFFF
        self._consumed = 24
        # Files of format 2.0-2.2 store the two lengths the other way round, and 2.3 files
        # either way; libpcap swaps them back so (captured length first once they are), as
        # this reader must for the two to agree.
        swapped = _LENGTHS_SWAPPED if minor < 3 else _LENGTHS_MAYBE_SWAPPED if minor == 3 else None
        return self._pcap_records(head, struct.Struct(order + record_fields), linktype, units, swapped)

    def _start_pcapng(self, head: bytes):
        if len(head) < 28:
            raise self._fail(f"bad pcapng header: section header needs 28 bytes, have {len(head)}")
        order = _section_byte_order(head, 0)
        if order is None:
            raise self._fail("bad pcapng header: unknown byte-order magic")
        layout = _PCAPNG_LAYOUTS[order]
        block_len = layout.u32.unpack_from(head, 4)[0]
        if block_len & 3 or block_len < 28 or block_len > MAX_BLOCK_LEN:
            raise self._fail(f"bad pcapng header: section header length {block_len}")
        major = layout.u16.unpack_from(head, 12)[0]
        if major != 1:
            raise self._fail(f"bad pcapng header: unsupported version {major}")
        self.format = "pcapng"
        return self._pcapng_records(head, order)

    def _fill(self, buf: bytes, pos: int, need: int) -> bytes:
        """Drop what is consumed and read until ``need`` bytes are buffered or EOF.

        Reads at least a whole chunk so refills stay rare; a short result means EOF.
        """
        self._base += pos
        rest = buf[pos:]
        have = len(rest)
        parts = [rest]
        read = self._read
        while have < need:
            chunk = read(max(READ_CHUNK, need - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def _pcap_records(self, buf: bytes, record: struct.Struct, linktype: int, units: int,
                      swapped: str | None = None):
        header_len = record.size
        unpack_from = record.unpack_from
        fill = self._fill
        pos = 24
        buflen = len(buf)
        try:
            while True:
                if buflen - pos < header_len:
                    buf = fill(buf, pos, header_len)
                    pos = 0
                    buflen = len(buf)
                    if buflen < header_len:
                        if buflen:
                            self.truncated = (f"truncated record header at offset {self._base}: "
                                              f"need {header_len} bytes, have {buflen}")
                        break
                sec, frac, caplen, wire_len = unpack_from(buf, pos)
                if swapped is not None and (swapped is _LENGTHS_SWAPPED or caplen > wire_len):
                    caplen, wire_len = wire_len, caplen
                if caplen > MAX_CAPLEN:
                    self.truncated = self._garbled(
                        "record", pos, f"captured length {caplen} exceeds {MAX_CAPLEN}")
                    break
                start = pos + header_len
                end = start + caplen
                if end > buflen:
                    buf = fill(buf, pos, header_len + caplen)
                    pos = 0
                    buflen = len(buf)
                    start = header_len
                    end = start + caplen
                    if end > buflen:
                        self.truncated = (f"truncated record at offset {self._base}: "
                                          f"need {caplen} bytes, have {buflen - header_len}")
                        break
                self._consumed = self._base + end
                yield (sec * units + frac) / units, linktype, buf[start:end], wire_len, 0
                pos = end
        except OSError as err:
            self.truncated = f"read error at offset {self._base + pos}: {err.strerror or err}"
        self._consumed = self._base + pos

    def _garbled(self, what: str, pos: int, detail: str) -> str:
        return f"garbled {what} at offset {self._base + pos}: {detail}"

    def _pcapng_records(self, buf: bytes, order: str):
        """Walk blocks; interfaces are per section and hold (linktype, snaplen, units, offset_units).

        Simple Packet Blocks carry no timestamp: they get the last timestamp seen,
        which keeps time-based state (dedup windows, last-seen) monotonic.
        """
        fill = self._fill
        layout = _PCAPNG_LAYOUTS[order]
        head = layout.head.unpack_from
        epb = layout.epb.unpack_from
        u32 = layout.u32.unpack_from
        interfaces: list[tuple[int, int, int, int]] = []
        last_ts = 0.0
        pos = 0
        buflen = len(buf)
        problem = None
        try:
            while True:
                if buflen - pos < 12:
                    buf = fill(buf, pos, 12)
                    pos = 0
                    buflen = len(buf)
                    if buflen < 12:
                        if buflen:
                            problem = (f"truncated block header at offset {self._base}: "
                                       f"need 12 bytes, have {buflen}")
                        break
                block_type, block_len = head(buf, pos)
                if block_type == _SHB:
                    order = _section_byte_order(buf, pos)
                    if order is None:
                        problem = self._garbled("section header", pos, "unknown byte-order magic")
                        break
                    layout = _PCAPNG_LAYOUTS[order]
                    head = layout.head.unpack_from
                    epb = layout.epb.unpack_from
                    u32 = layout.u32.unpack_from
                    block_type, block_len = head(buf, pos)
                    interfaces = []
                if block_len & 3 or block_len < 12 or block_len > MAX_BLOCK_LEN:
                    problem = self._garbled("block", pos, f"length {block_len} (must be a multiple "
                                                          f"of 4 from 12 to {MAX_BLOCK_LEN})")
                    break
                if buflen - pos < block_len:
                    buf = fill(buf, pos, block_len)
                    pos = 0
                    buflen = len(buf)
                    if buflen < block_len:
                        problem = (f"truncated block at offset {self._base}: "
                                   f"need {block_len} bytes, have {buflen}")
                        break
                block_end = pos + block_len
                if u32(buf, block_end - 4)[0] != block_len:
                    problem = self._garbled("block", pos, "trailing length differs")
                    break
                if block_type == _EPB or block_type == _OBSOLETE_PB:
                    if block_len < 32:
                        problem = self._garbled("packet block", pos, f"length {block_len}")
                        break
                    if block_type == _EPB:
                        interface, ts_high, ts_low, caplen, wire_len = epb(buf, pos + 8)
                    else:
                        interface, _drops, ts_high, ts_low, caplen, wire_len = \
                            layout.obsolete_pb.unpack_from(buf, pos + 8)
                    if caplen > block_len - 32 or caplen > MAX_CAPLEN:
                        problem = self._garbled("packet block", pos, f"captured length {caplen}")
                        break
                    if interface < len(interfaces):
                        linktype, _snaplen, units, offset_units = interfaces[interface]
                        ts = ((ts_high << 32) + ts_low + offset_units) / units
                        if MIN_TIMESTAMP <= ts <= MAX_TIMESTAMP:
                            last_ts = ts
                            self._consumed = self._base + block_end
                            yield ts, linktype, buf[pos + 28:pos + 28 + caplen], wire_len, interface
                        else:
                            self.skipped += 1
                    else:
                        self.skipped += 1
                elif block_type == _IDB:
                    if block_len < 20:
                        problem = self._garbled("interface block", pos, f"length {block_len}")
                        break
                    if len(interfaces) < MAX_INTERFACES:
                        linktype, snaplen, units, offset, _ = _interface(buf, pos, block_end, layout)
                        interfaces.append((linktype, snaplen, units, offset * units))
                elif block_type == _SPB:
                    if block_len < 16:
                        problem = self._garbled("packet block", pos, f"length {block_len}")
                        break
                    if interfaces:
                        linktype, snaplen, _units, _offset_units = interfaces[0]
                        wire_len = u32(buf, pos + 8)[0]
                        caplen = min(wire_len, block_len - 16, snaplen or MAX_CAPLEN, MAX_CAPLEN)
                        self._consumed = self._base + block_end
                        yield last_ts, linktype, buf[pos + 12:pos + 12 + caplen], wire_len, 0
                    else:
                        self.skipped += 1
                elif block_type == _SHB:
                    if block_len < 28:
                        problem = self._garbled("section header", pos, f"length {block_len}")
                        break
                    major = layout.u16.unpack_from(buf, pos + 12)[0]
                    if major != 1:
                        problem = self._garbled("section header", pos, f"unsupported version {major}")
                        break
                pos = block_end
        except OSError as err:
            problem = f"read error at offset {self._base + pos}: {err.strerror or err}"
        self._consumed = self._base + pos
        self.truncated = problem

    def __iter__(self) -> Iterator[tuple[float, int, bytes, int, int]]:
        return self._records

    def tell(self) -> int:
        """Bytes consumed up to the end of the last record yielded."""
        return self._consumed

    def close(self) -> None:
        self._records.close()
        if self._close_stream:
            self._stream.close()

    def __enter__(self) -> "CaptureFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_capture(path: str) -> CaptureFile:
    """Open a pcap/pcapng file, or stdin for ``"-"``; raises CaptureError if unusable."""
    if path == "-":
        return CaptureFile(path, sys.stdin.buffer, None, close_stream=False)
    try:
        stream = open(path, "rb", buffering=0)
    except OSError as err:
        raise CaptureError(f"{path}: cannot open: {err.strerror or err}") from None
    try:
        info = os.fstat(stream.fileno())
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        return CaptureFile(path, stream, size)
    except BaseException:
        stream.close()
        raise
