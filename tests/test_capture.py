"""Offline capture reader: classic pcap / pcapng layouts, garbled and truncated files."""

import io
import os
import random
import shutil
import struct
import subprocess
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.capture import pcapfile
from sensor.capture.pcapfile import CaptureError, CaptureFile, open_capture

MICRO, NANO = 1_000_000, 1_000_000_000
FRAMES = [bytes(range(60)), b"\xaa" * 1514, b"\x01\x02\x03", b""]


def exact(sec, frac, units):
    """The float nearest to sec + frac/units: what a careful reader must return."""
    return float(Fraction(sec * units + frac, units))


def pcap_file(records, order="<", magic=0xA1B2C3D4, network=1, major=2, extra=b""):
    """records: (sec, frac, frame, wire_len); ``extra`` pads each record header (Kuznetzov)."""
    out = [struct.pack(order + "IHHiIII", magic, major, 4, 0, 0, 262144, network)]
    for sec, frac, frame, wire_len in records:
        out.append(struct.pack(order + "IIII", sec, frac, len(frame), wire_len) + extra + frame)
    return b"".join(out)


def block(order, block_type, body):
    body += b"\0" * (-len(body) % 4)
    length = len(body) + 12
    return struct.pack(order + "II", block_type, length) + body + struct.pack(order + "I", length)


def option(order, code, value):
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(order="<"):
    return block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(order, linktype, snaplen=262144, tsresol=None, tsoffset=None):
    options = b""
    if tsresol is not None:
        options += option(order, 9, bytes([tsresol]))
    if tsoffset is not None:
        options += option(order, 14, struct.pack(order + "q", tsoffset))
    if options:
        options += option(order, 0, b"")
    return block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + options)


def epb(order, interface, ts_units, frame, wire_len=None):
    wire_len = len(frame) if wire_len is None else wire_len
    head = struct.pack(order + "IIIII", interface, ts_units >> 32, ts_units & 0xFFFFFFFF,
                       len(frame), wire_len)
    return block(order, 6, head + frame)


def spb(order, frame, wire_len=None):
    wire_len = len(frame) if wire_len is None else wire_len
    return block(order, 3, struct.pack(order + "I", wire_len) + frame)


def obsolete_pb(order, interface, ts_units, frame):
    head = struct.pack(order + "HHIIII", interface, 0, ts_units >> 32, ts_units & 0xFFFFFFFF,
                       len(frame), len(frame))
    return block(order, 2, head + frame)


def read_bytes(data, path="test.pcap"):
    cap = CaptureFile(path, io.BytesIO(data), len(data))
    return cap, list(cap)


def write(tmp_path, data, name="capture.pcap"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# --- classic pcap -------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("magic,units", [(0xA1B2C3D4, MICRO), (0xA1B23C4D, NANO)])
def test_pcap_byte_orders_and_resolutions(tmp_path, order, magic, units):
    records = [(1735725600, units - 1, FRAMES[0], 60),
               (1735725601, 123456 if units == MICRO else 123456789, FRAMES[1], 1514),
               (4294967295, 1, FRAMES[2], 9000)]
    data = pcap_file(records, order, magic)
    path = write(tmp_path, data)
    with open_capture(path) as cap:
        got = list(cap)
        assert cap.format == "pcap"
        assert cap.size == len(data)
        assert cap.tell() == len(data)
        assert cap.truncated is None
    assert [(lt, frame, wire, iface) for _, lt, frame, wire, iface in got] == \
        [(1, frame, wire, 0) for _, _, frame, wire in records]
    for (ts, *_), (sec, frac, _, _) in zip(got, records):
        expected = exact(sec, frac, units)
        assert abs(ts - expected) <= 1e-9
        assert ts == expected


def test_pcap_linktype_ignores_fcs_bits():
    fcs_present_4_bytes = 0x10000000 | (2 << 29)
    _, got = read_bytes(pcap_file([(1, 0, FRAMES[0], 60)], network=113 | fcs_present_4_bytes))
    assert got[0][1] == 113


@pytest.mark.parametrize("minor, swap", [(2, "always"), (3, "when caplen > len"), (4, "never")])
def test_pcap_versions_before_2_4_have_their_lengths_swapped_as_libpcap_does(tmp_path, minor, swap):
    """Format 2.0-2.2 files hold (len, caplen) where 2.4 holds (caplen, len), and 2.3 files
    either; libpcap swaps them back (always, or when the first exceeds the second).  Found
    by the prefiltered fuzz target: the Python reader cut a frame libpcap read whole."""
    import pcapy

    frames = [bytes(range(60)), bytes(range(100))]
    # (first, second) length fields and the bytes stored: a 60-byte frame cut to 40 in the
    # first record, whole in the second.
    fields = [(60, 40), (100, 100)] if swap != "never" else [(40, 60), (100, 100)]
    stored = [frames[0][:40], frames[1]]
    if swap == "when caplen > len":
        fields[0] = (60, 40)
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, minor, 0, 0, 262144, 1)
    for (first, second), frame in zip(fields, stored):
        data += struct.pack("<IIII", 1_700_000_000, 0, first, second) + frame
    path = tmp_path / "old.pcap"
    path.write_bytes(data)
    with open_capture(str(path)) as cap:
        python = [(frame, wire_len) for _, _, frame, wire_len, _ in cap]
    assert python == [(frames[0][:40], 60), (frames[1], 100)]
    handle = pcapy.open_offline(str(path))
    buf, meta = handle.next_batch(10)
    assert [buf[off:off + caplen] for _, _, off, caplen in struct.iter_unpack("=IIII", meta)] == \
        [frame for frame, _ in python]


def test_pcap_kuznetzov_records_have_longer_headers():
    data = pcap_file([(5, 6, FRAMES[0], 60), (7, 8, FRAMES[2], 3)], magic=0xA1B2CD34,
                     extra=b"\x01\x02\x03\x04\x00\x08\x00\x00")
    cap, got = read_bytes(data)
    assert [(ts, frame) for ts, _, frame, _, _ in got] == [(5.000006, FRAMES[0]), (7.000008, FRAMES[2])]
    assert cap.truncated is None


def test_pcap_header_only_is_an_empty_capture():
    cap, got = read_bytes(pcap_file([]))
    assert got == [] and cap.truncated is None and cap.tell() == 24


def test_pcap_truncated_last_record_keeps_everything_before(tmp_path):
    data = pcap_file([(1, 0, FRAMES[0], 60), (2, 0, FRAMES[1], 1514)])
    path = write(tmp_path, data[:-1314])
    with open_capture(path) as cap:
        got = list(cap)
    assert [frame for _, _, frame, _, _ in got] == [FRAMES[0]]
    assert cap.truncated == "truncated record at offset 100: need 1514 bytes, have 200"
    assert cap.tell() == 100


def test_pcap_truncated_record_header():
    data = pcap_file([(1, 0, FRAMES[0], 60)]) + b"\0" * 10
    cap, got = read_bytes(data)
    assert len(got) == 1
    assert cap.truncated == "truncated record header at offset 100: need 16 bytes, have 10"


def test_pcap_oversized_caplen_is_garbled_not_allocated():
    data = pcap_file([(1, 0, FRAMES[0], 60)]) + struct.pack("<IIII", 2, 0, 0x7FFFFFFF, 60) + b"x" * 100
    cap, got = read_bytes(data)
    assert len(got) == 1
    assert cap.truncated.startswith("garbled record at offset 100: captured length 2147483647")


def test_pcap_records_across_buffer_refills_match_dpkt(tmp_path):
    dpkt = pytest.importorskip("dpkt")
    rng = random.Random(7)
    records = []
    size = 0
    while size < 3 * pcapfile.READ_CHUNK:
        frame = rng.randbytes(rng.choice([0, 1, 60, 1514, 9000, 65535, 262144]))
        records.append((rng.randrange(1 << 32), rng.randrange(MICRO), frame, len(frame)))
        size += len(frame) + 16
    path = write(tmp_path, pcap_file(records))
    with open_capture(path) as cap:
        got = [(ts, frame) for ts, _, frame, _, _ in cap]
    with open(path, "rb") as handle:
        expected = [(ts, bytes(frame)) for ts, frame in dpkt.pcap.Reader(handle)]
    assert len(got) == len(records)
    assert [frame for _, frame in got] == [frame for _, frame in expected]
    assert all(abs(a - float(b)) <= 1e-6 for (a, _), (b, _) in zip(got, expected))


class Trickle(io.RawIOBase):
    """A pipe that hands out a few bytes per read, like a slow ``tcpdump -w - |``."""

    def __init__(self, data, fail_after=None):
        self.data = data
        self.pos = 0
        self.fail_after = fail_after
        self.rng = random.Random(3)

    def readable(self):
        return True

    def read(self, size=-1):
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise OSError(5, "Input/output error")
        chunk = self.data[self.pos:self.pos + min(size, self.rng.randint(1, 7))]
        self.pos += len(chunk)
        return chunk


def test_short_reads_give_the_same_packets():
    data = pcap_file([(1, 2, FRAMES[0], 60), (3, 4, FRAMES[1], 1514), (5, 6, FRAMES[2], 3)])
    _, expected = read_bytes(data)
    cap = CaptureFile("-", Trickle(data))
    assert list(cap) == expected and cap.truncated is None


def test_read_error_mid_file_stops_with_reason():
    data = pcap_file([(1, 2, FRAMES[0], 60), (3, 4, FRAMES[1], 1514)])
    cap = CaptureFile("-", Trickle(data, fail_after=200))
    got = list(cap)
    assert [frame for _, _, frame, _, _ in got] == [FRAMES[0]]
    assert cap.truncated.startswith("read error at offset 100: Input/output error")


def test_stdin_dash(monkeypatch):
    data = pcap_file([(1, 0, FRAMES[0], 60)])

    class FakeStdin:
        buffer = io.BytesIO(data)

    monkeypatch.setattr(pcapfile.sys, "stdin", FakeStdin)
    with open_capture("-") as cap:
        assert cap.size is None and cap.path == "-"
        assert [frame for _, _, frame, _, _ in cap] == [FRAMES[0]]
    assert not FakeStdin.buffer.closed


def test_close_mid_iteration_ends_iteration(tmp_path):
    path = write(tmp_path, pcap_file([(1, 0, FRAMES[0], 60)] * 3))
    cap = open_capture(path)
    iterator = iter(cap)
    next(iterator)
    cap.close()
    assert list(iterator) == []


# --- unreadable files ---------------------------------------------------------------------

@pytest.mark.parametrize("content,problem", [
    (b"", "empty file"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a pcap or pcapng file"),
    (b"\x1f\x8b\x08\x00" + b"\0" * 40, "gzip-compressed"),
    (struct.pack("<IHH", 0xA1B2C3D4, 2, 4), "bad pcap header"),
    (pcap_file([], major=3), "unsupported version 3.4"),
    (shb()[:20], "bad pcapng header"),
    (shb()[:8] + b"\0\0\0\0" + shb()[12:], "byte-order magic"),
    (b"\x0a\x0d\x0d\x0a\x1d\x00\x00\x00" + shb()[8:], "section header length 29"),
])
def test_unreadable_capture_names_file_and_problem(tmp_path, content, problem):
    path = write(tmp_path, content)
    with pytest.raises(CaptureError) as err:
        open_capture(path)
    assert str(err.value).startswith(path + ": ")
    assert problem in str(err.value)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.pcap")
    with pytest.raises(CaptureError, match=r"nope\.pcap: cannot open: No such file or directory"):
        open_capture(path)


def test_directory(tmp_path):
    with pytest.raises(CaptureError, match="cannot (open|read)"):
        open_capture(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied(tmp_path):
    path = write(tmp_path, pcap_file([]))
    os.chmod(path, 0)
    with pytest.raises(CaptureError, match="Permission denied"):
        open_capture(path)


# --- pcapng -------------------------------------------------------------------------------

def test_pcapng_two_interfaces_with_own_linktype_and_resolution(tmp_path):
    o = "<"
    data = (shb(o) + idb(o, 1) + idb(o, 113, tsresol=9)
            + epb(o, 0, 1735725600 * MICRO + 999999, FRAMES[0])
            + epb(o, 1, 1735725600 * NANO + 123456789, FRAMES[2], wire_len=1500)
            + epb(o, 0, 1735725601 * MICRO, FRAMES[1]))
    path = write(tmp_path, data, "multi.pcapng")
    with open_capture(path) as cap:
        got = list(cap)
        assert cap.format == "pcapng" and cap.truncated is None and cap.skipped == 0
        assert cap.tell() == len(data) == cap.size
    assert [(lt, frame, wire, iface) for _, lt, frame, wire, iface in got] == [
        (1, FRAMES[0], 60, 0), (113, FRAMES[2], 1500, 1), (1, FRAMES[1], 1514, 0)]
    assert [ts for ts, *_ in got] == [exact(1735725600, 999999, MICRO),
                                      exact(1735725600, 123456789, NANO),
                                      1735725601.0]


def test_pcapng_power_of_two_resolution_and_offset():
    o = "<"
    data = shb(o) + idb(o, 1, tsresol=0x80 | 10, tsoffset=1_700_000_000) + epb(o, 0, 5 * 1024 + 512, FRAMES[0])
    cap, got = read_bytes(data)
    assert got[0][0] == 1_700_000_005.5


def test_pcapng_big_endian_section():
    o = ">"
    data = shb(o) + idb(o, 101, tsresol=9) + epb(o, 0, 1735725600 * NANO + 1, FRAMES[0])
    cap, got = read_bytes(data)
    assert cap.truncated is None
    assert got == [(exact(1735725600, 1, NANO), 101, FRAMES[0], 60, 0)]


def test_pcapng_second_section_resets_interfaces_and_byte_order():
    data = (shb("<") + idb("<", 1) + idb("<", 113) + epb("<", 1, 10 * MICRO, FRAMES[0])
            + shb(">") + idb(">", 228, tsresol=9)
            + epb(">", 1, 20 * NANO, FRAMES[1])
            + epb(">", 0, 30 * NANO, FRAMES[2]))
    cap, got = read_bytes(data)
    assert [(ts, lt, frame, iface) for ts, lt, frame, _, iface in got] == [
        (10.0, 113, FRAMES[0], 1), (30.0, 228, FRAMES[2], 0)]
    assert cap.skipped == 1 and cap.truncated is None


def test_pcapng_timestamps_outside_years_1_to_9999_are_skipped_and_counted():
    o = "<"
    data = (shb(o) + idb(o, 1, tsresol=0) + idb(o, 1, tsresol=9, tsoffset=-(1 << 62))
            + epb(o, 0, (1 << 64) - 1, FRAMES[0])
            + epb(o, 0, 253402300799, FRAMES[1])
            + epb(o, 0, 253402300800, FRAMES[2])
            + epb(o, 1, 0, FRAMES[0])
            + spb(o, FRAMES[1]))
    cap, got = read_bytes(data)
    assert cap.truncated is None and cap.skipped == 3
    # The kept packet's time carries on to the Simple Packet Block after the skipped ones.
    assert [(ts, frame) for ts, _, frame, _, _ in got] == [(253402300799.0, FRAMES[1]),
                                                           (253402300799.0, FRAMES[1])]


def test_pcapng_skips_other_blocks_by_length():
    o = "<"
    nrb = block(o, 4, struct.pack(o + "HH4s", 1, 4, b"\x0a\0\0\x01") + b"host\0" + struct.pack(o + "HH", 0, 0))
    isb = block(o, 5, struct.pack(o + "III", 0, 0, 0))
    dsb = block(o, 0x0A, struct.pack(o + "II", 0x544C534B, 0))
    custom = block(o, 0x40000BAD, struct.pack(o + "I", 32473) + b"vendor stuff")
    journal = block(o, 9, b"__REALTIME_TIMESTAMP=1\n")
    data = (shb(o) + nrb + idb(o, 1) + dsb + epb(o, 0, MICRO, FRAMES[0]) + isb + custom + journal
            + epb(o, 0, 2 * MICRO, FRAMES[1]))
    cap, got = read_bytes(data)
    assert [frame for _, _, frame, _, _ in got] == [FRAMES[0], FRAMES[1]]
    assert cap.truncated is None and cap.skipped == 0


def test_pcapng_simple_and_obsolete_packet_blocks():
    o = "<"
    data = (shb(o) + idb(o, 1, snaplen=64)
            + obsolete_pb(o, 0, 7 * MICRO, FRAMES[0])
            + spb(o, FRAMES[1][:64], wire_len=1514)
            + spb(o, FRAMES[2]))
    cap, got = read_bytes(data)
    assert got == [(7.0, 1, FRAMES[0], 60, 0),
                   (7.0, 1, FRAMES[1][:64], 1514, 0),
                   (7.0, 1, FRAMES[2], 3, 0)]


def test_pcapng_packets_without_interface_are_skipped():
    o = "<"
    data = shb(o) + spb(o, FRAMES[0]) + epb(o, 0, 1, FRAMES[0]) + idb(o, 1) + epb(o, 3, 1, FRAMES[1]) \
        + epb(o, 0, 1, FRAMES[2])
    cap, got = read_bytes(data)
    assert [frame for _, _, frame, _, _ in got] == [FRAMES[2]]
    assert cap.skipped == 3 and cap.truncated is None


def test_pcapng_malformed_options_keep_defaults():
    o = "<"
    lying_option = struct.pack(o + "HH", 9, 200) + b"\x09\0\0\0"
    data = (shb(o) + block(o, 1, struct.pack(o + "HHI", 1, 0, 0) + lying_option)
            + epb(o, 0, 3 * MICRO, FRAMES[0]))
    cap, got = read_bytes(data)
    assert got[0][0] == 3.0 and cap.truncated is None


def test_pcapng_truncated_last_block():
    o = "<"
    head = shb(o) + idb(o, 1)
    first = epb(o, 0, MICRO, FRAMES[0])
    data = head + first + epb(o, 0, 2 * MICRO, FRAMES[1])[:100]
    cap, got = read_bytes(data)
    assert [frame for _, _, frame, _, _ in got] == [FRAMES[0]]
    offset = len(head) + len(first)
    assert cap.truncated == f"truncated block at offset {offset}: need 1548 bytes, have 100"
    assert cap.tell() == offset


@pytest.mark.parametrize("garble,reason", [
    (lambda b: b[:4] + struct.pack("<I", len(b) + 2) + b[8:], "length"),
    (lambda b: b[:4] + struct.pack("<I", 1 << 30) + b[8:], "length 1073741824"),
    (lambda b: b[:4] + struct.pack("<I", 8) + b[8:], "length 8"),
    (lambda b: b[:-4] + struct.pack("<I", len(b) + 4), "trailing length differs"),
    (lambda b: b[:20] + struct.pack("<I", 10_000) + b[24:], "captured length 10000"),
    (lambda b: b[:4] + struct.pack("<I", 24) + b[8:20] + struct.pack("<I", 24), "length 24"),
])
def test_pcapng_garbled_block_stops_reading(garble, reason):
    o = "<"
    head = shb(o) + idb(o, 1) + epb(o, 0, MICRO, FRAMES[0])
    data = head + garble(epb(o, 0, 2 * MICRO, FRAMES[2])) + epb(o, 0, 3 * MICRO, FRAMES[1])
    cap, got = read_bytes(data)
    assert [frame for _, _, frame, _, _ in got] == [FRAMES[0]]
    assert cap.truncated.startswith(f"garbled packet block at offset {len(head)}") or \
        cap.truncated.startswith(f"garbled block at offset {len(head)}")
    assert reason in cap.truncated


def test_pcapng_later_section_with_bad_magic_stops_reading():
    data = shb("<") + idb("<", 1) + epb("<", 0, 1, FRAMES[0]) + shb("<")[:8] + b"\0" * 20
    cap, got = read_bytes(data)
    assert len(got) == 1 and "byte-order magic" in cap.truncated


def test_pcapng_interface_table_is_capped(monkeypatch):
    monkeypatch.setattr(pcapfile, "MAX_INTERFACES", 2)
    o = "<"
    data = shb(o) + idb(o, 1) + idb(o, 113) + idb(o, 101) + epb(o, 2, 1, FRAMES[0]) + epb(o, 1, 1, FRAMES[1])
    cap, got = read_bytes(data)
    assert [(lt, iface) for _, lt, _, _, iface in got] == [(113, 1)]
    assert cap.skipped == 1


# --- cross-checks with other writers ------------------------------------------------------

def test_scapy_written_pcap_and_pcapng(tmp_path):
    scapy_all = pytest.importorskip("scapy.all")
    packets = []
    for i in range(20):
        pkt = scapy_all.Ether() / scapy_all.IP(dst="192.0.2.1") / scapy_all.UDP(dport=53) / (b"q" * i)
        pkt.time = Fraction(1735725600) + Fraction(i * 1234567, NANO)
        packets.append(pkt)
    pcap_path = str(tmp_path / "scapy.pcap")
    pcapng_path = str(tmp_path / "scapy.pcapng")
    scapy_all.wrpcap(pcap_path, packets, nano=True)
    scapy_all.wrpcapng(pcapng_path, packets)
    for path, fmt in ((pcap_path, "pcap"), (pcapng_path, "pcapng")):
        with open_capture(path) as cap:
            got = list(cap)
            assert cap.format == fmt and cap.truncated is None
        assert [frame for _, _, frame, _, _ in got] == [bytes(p) for p in packets]
        assert all(abs(ts - float(p.time)) <= 1e-6 for (ts, *_), p in zip(got, packets))
        assert {lt for _, lt, _, _, _ in got} == {1}


@pytest.mark.skipif(shutil.which("editcap") is None, reason="editcap not installed")
def test_wireshark_pcapng_matches_source_pcap(tmp_path):
    records = [(1735725600 + i, i * 7919, FRAMES[i % 3], len(FRAMES[i % 3]) + i) for i in range(50)]
    source = write(tmp_path, pcap_file(records, magic=0xA1B23C4D), "source.pcap")
    converted = str(tmp_path / "converted.pcapng")
    subprocess.run(["editcap", "-F", "pcapng", source, converted], check=True, capture_output=True)
    with open_capture(source) as cap:
        expected = list(cap)
    with open_capture(converted) as cap:
        got = list(cap)
        assert cap.format == "pcapng" and cap.truncated is None
    assert got == expected


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_tcpdump_rewritten_capture(tmp_path):
    records = [(1735725600, i, FRAMES[i % 3], len(FRAMES[i % 3])) for i in range(10)]
    source = write(tmp_path, pcap_file(records, order=">"), "be.pcap")
    rewritten = str(tmp_path / "tcpdump.pcap")
    subprocess.run(["tcpdump", "-r", source, "-w", rewritten], check=True, capture_output=True)
    with open_capture(source) as cap:
        expected = list(cap)
    with open_capture(rewritten) as cap:
        assert list(cap) == expected


# --- hostile input ------------------------------------------------------------------------

def consume(data):
    """Open and iterate; only CaptureError at open is acceptable, iteration must end quietly."""
    try:
        cap = CaptureFile("fuzz", io.BytesIO(data), len(data))
    except CaptureError:
        return None
    with cap:
        for ts, linktype, frame, wire_len, iface in cap:
            assert isinstance(frame, bytes) and len(frame) <= pcapfile.MAX_CAPLEN
            assert isinstance(ts, float) and 0 <= linktype <= 0xFFFF
        assert cap.truncated is None or isinstance(cap.truncated, str)
        assert cap.tell() <= len(data)
    return cap


VALID_PCAP = pcap_file([(1, 2, FRAMES[0], 60), (3, 4, FRAMES[2], 3), (5, 6, FRAMES[3], 0)])
VALID_PCAPNG = (shb("<") + idb("<", 1, tsresol=9, tsoffset=-5) + block("<", 4, b"\0" * 8)
                + epb("<", 0, 123, FRAMES[0]) + spb("<", FRAMES[2]) + shb(">") + idb(">", 113)
                + obsolete_pb(">", 0, 1, FRAMES[2]) + epb(">", 0, 1 << 40, FRAMES[0]))


def test_valid_fuzz_seeds_read_cleanly():
    assert consume(VALID_PCAP).truncated is None
    cap = consume(VALID_PCAPNG)
    assert cap.truncated is None and cap.tell() == len(VALID_PCAPNG)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(data):
    consume(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from([VALID_PCAP, VALID_PCAPNG]),
       edits=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 1000), prefix_only=st.booleans())
def test_mutated_captures_never_crash(seed, edits, cut, prefix_only):
    data = bytearray(seed)
    for where, value in edits:
        data[where % len(data)] = value
    if prefix_only:
        data = data[:cut % (len(data) + 1)]
    consume(bytes(data))


NANOSECOND_PCAPNG = (shb("<") + idb("<", 1, tsresol=9) + block("<", 4, b"\0" * 8)
                     + epb("<", 0, 1735725600 * NANO + 123456789, FRAMES[0]) + spb("<", FRAMES[2]))


@pytest.mark.parametrize("order", ["<", ">"])
def test_microsecond_view_of_a_nanosecond_pcapng(order):
    """The head libpcap is shown (bpf.PrologueFeed): the bytes before the first packet
    with the one interface's resolution set to microseconds, and that packet's time."""
    data = (shb(order) + idb(order, 1, tsresol=9) + block(order, 4, b"\0" * 8)
            + epb(order, 0, 1735725600 * NANO + 123456789, FRAMES[0]))
    prologue, first_ns = pcapfile.pcapng_microsecond_view(data)
    assert first_ns == 1735725600 * NANO + 123456789
    packet_at = data.index(epb(order, 0, 1735725600 * NANO + 123456789, FRAMES[0]))
    changed = [i for i in range(packet_at) if prologue[i] != data[i]]
    assert len(prologue) == packet_at and len(changed) == 1
    assert (data[changed[0]], prologue[changed[0]]) == (9, 6)


@pytest.mark.parametrize("data", [
    shb("<") + idb("<", 1) + epb("<", 0, 5, FRAMES[0]),  # microseconds already
    shb("<") + idb("<", 1, tsresol=9, tsoffset=5) + epb("<", 0, 5, FRAMES[0]),
    shb("<") + idb("<", 1, tsresol=9) + idb("<", 1, tsresol=9) + epb("<", 0, 5, FRAMES[0]),
    shb("<") + idb("<", 1, tsresol=9) + spb("<", FRAMES[0]),  # no time to start the clock
    shb("<") + idb("<", 1, tsresol=0x80 | 30) + epb("<", 0, 5, FRAMES[0]),
], ids=["microsecond", "offset", "two-interfaces", "simple-block-first", "binary-resolution"])
def test_no_microsecond_view_where_libpcap_could_not_be_exact(data):
    assert pcapfile.pcapng_microsecond_view(data) is None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 200))
def test_mutated_pcapng_heads_give_a_faithful_view_or_none(edits, cut):
    """A hostile head never raises, and any view differs from it in the resolution alone."""
    data = bytearray(NANOSECOND_PCAPNG)
    for where, value in edits:
        data[where % len(data)] = value
    head = bytes(data[:len(data) - cut % len(data)])
    view = pcapfile.pcapng_microsecond_view(head)
    if view is not None:
        prologue, _ = view
        changed = [i for i in range(len(prologue)) if prologue[i] != head[i]]
        assert len(changed) == 1 and (head[changed[0]], prologue[changed[0]]) == (9, 6)
