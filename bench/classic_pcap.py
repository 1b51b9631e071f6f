"""The capture format the benchmark's tools write and rewrite: classic pcap, little-endian,
microsecond timestamps, as make_mix.py writes it (and libpcap reads it fastest)."""

from __future__ import annotations

import struct

HEADER = struct.Struct("<IHHiIII")  # magic, version 2.4, zone, accuracy, snap length, link type
RECORD = struct.Struct("<IIII")  # seconds, microseconds, captured length, wire length
MAGIC = 0xA1B2C3D4
SNAPLEN = 262144
LINKTYPE_ETHERNET = 1


def header(linktype: int = LINKTYPE_ETHERNET) -> bytes:
    return HEADER.pack(MAGIC, 2, 4, 0, 0, SNAPLEN, linktype)


def read_ethernet_header(stream) -> bool:
    """Reads the file header; whether it opens a capture in this format of Ethernet frames."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return False
    fields = HEADER.unpack(head)
    return fields[0] == MAGIC and fields[6] == LINKTYPE_ETHERNET


def records(stream):
    """``(seconds, microseconds, frame)`` of every record after the file header."""
    while True:
        head = stream.read(RECORD.size)
        if len(head) < RECORD.size:
            return
        sec, usec, caplen, _ = RECORD.unpack(head)
        yield sec, usec, stream.read(caplen)
