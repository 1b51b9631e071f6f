"""The capture filter must not cost detections, and must drop what cannot carry evidence.

The equivalence proof runs ``purge-sensor read`` with its default prefilter and with
``--no-bpf-prefilter`` (every packet decoded) over
every capture in pcaps/ (and a slice of the benchmark mix) and compares the alerts'
(action, host.ip, destination.domain) multisets and the ``hosts --format json`` inventory.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pcapy = pytest.importorskip("pcapy")

from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop  # noqa: E402
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from sensor.capture import bpf  # noqa: E402
from sensor.capture.pcapfile import open_capture  # noqa: E402
from sensor.cli import main  # noqa: E402
from tests.helpers import read_detections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PCAPS = sorted(p for p in (ROOT / "pcaps").iterdir() if p.suffix in (".pcap", ".pcapng"))


def _alerts_and_hosts(tmp_path: Path, capture: Path, capsys, *extra: str):
    run = tmp_path / ("plain" if "--no-bpf-prefilter" in extra else "filtered")
    return read_detections(run, capture, capsys, "-q", *extra)[:2]


@pytest.mark.parametrize("capture", PCAPS, ids=[p.name for p in PCAPS])
def test_filter_keeps_every_detection(tmp_path, capsys, capture):
    plain = _alerts_and_hosts(tmp_path, capture, capsys, "--no-bpf-prefilter")
    filtered = _alerts_and_hosts(tmp_path, capture, capsys)
    assert filtered == plain


def test_filter_keeps_every_detection_in_a_span_mix(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    from make_mix import write_mix

    mix = tmp_path / "mix.pcap"
    truth = write_mix(mix, 20_000)
    plain = _alerts_and_hosts(tmp_path, mix, capsys, "--no-bpf-prefilter")
    filtered = _alerts_and_hosts(tmp_path, mix, capsys)
    assert filtered == plain
    found = {domain for (_, _, domain) in plain[0]}
    assert set(truth["kaspersky_names"]) <= found


def _as_link(sources, out: Path, link: str) -> Path:
    """The Ethernet frames of ``sources`` rewritten as ``link`` writes them
    (bench/field_variants.as_link), in one classic pcap."""
    sys.path.insert(0, str(ROOT / "bench"))
    import classic_pcap
    from field_variants import LINKTYPES, as_link

    with out.open("wb") as fh:
        fh.write(classic_pcap.header(LINKTYPES[link]))
        for source in sources:
            with open_capture(str(source)) as cap:
                for ts, linktype, data, _, _ in cap:
                    frame = as_link(data, link) if linktype == 1 else None
                    if frame is not None:
                        us = round(ts * 1e6)
                        fh.write(classic_pcap.RECORD.pack(us // 1_000_000, us % 1_000_000, len(frame), len(frame)))
                        fh.write(frame)
    return out


@pytest.mark.parametrize("link", ["sll", "sll2"])
def test_filter_keeps_every_detection_in_cooked_captures_with_tags(tmp_path, capsys, link):
    """``tcpdump -i any`` writes Linux cooked frames (SLL, or SLL2 with libpcap 1.10 and
    later), where a VLAN tag sits behind the cooked header's type field: libpcap puts back
    the tag the kernel took off (SLL), and a tag the kernel left in the frame stays.  A
    filter that took the cooked header for the whole link layer dropped every tagged
    frame (600 of the benchmark mix's 1,016 alerts were left), and the decoder read no tag
    behind SLL2.  Rewritten as that link type, a slice of the mix (30% tagged) and the
    tagged, QinQ, MPLS and PPPoE samples give the Ethernet capture's alerts, with the
    filter and without."""
    sys.path.insert(0, str(ROOT / "bench"))
    from make_mix import write_mix

    mix = tmp_path / "mix.pcap"
    write_mix(mix, 20_000)
    ethernet = [mix] + [ROOT / "pcaps" / name for name in
                        ("vlan_qinq.pcap", "mpls.pcap", "pppoe.pcap", "demo.pcap")]
    cooked = _as_link(ethernet, tmp_path / f"mix.{link}.pcap", link)
    plain = _alerts_and_hosts(tmp_path, cooked, capsys, "--no-bpf-prefilter")
    filtered = _alerts_and_hosts(tmp_path, cooked, capsys)
    assert filtered == plain
    (tmp_path / "ethernet").mkdir()
    original = _alerts_and_hosts(tmp_path / "ethernet", _as_link(ethernet, tmp_path / "mix.eth.pcap", "ethernet"),
                                 capsys, "--no-bpf-prefilter")
    assert plain[0] == original[0] and sum(plain[0].values()) > 100


def test_prefiltered_reader_matches_python_reader_with_the_same_filter():
    """libpcap path (classic pcap) and per-packet path (pcapng) yield what the compiled
    filter admits, with identical timestamps; a capture that opens with VXLAN gets the
    VXLAN filter."""
    for capture in PCAPS:
        if capture.name == "bsd_loopback.pcap":
            continue  # libpcap byte-swaps the family first; the per-packet path passes it whole
        admits = bpf.LinktypeFilters(None, bpf.file_tunnels(str(capture))).admits
        with open_capture(str(capture)) as cap:
            expected = [r for r in cap if admits(r[1], r[2])]
        with bpf.open_prefiltered(str(capture)) as cap:
            got = list(cap)
        assert [(r[0], r[1], r[2]) for r in got] == [(r[0], r[1], r[2]) for r in expected], capture.name


def _pcapng_of(capture: Path, out: Path, interfaces) -> Path:
    """``capture``'s Ethernet frames rewritten as pcapng with these interface blocks
    (make_samples.pcapng_file's ``(linktype, tsresol, name)``), all on the first."""
    from tests.helpers import load_make_samples

    with open_capture(str(capture)) as cap:
        records = [(round(ts * 1e9), data, 0) for ts, linktype, data, _, _ in cap if linktype == 1]
    out.write_bytes(load_make_samples().pcapng_file(interfaces, records))
    return out


def test_single_interface_pcapng_is_read_by_libpcap_like_the_python_reader(tmp_path, capsys):
    """Wireshark and dumpcap write pcapng: with one interface on a microsecond clock it takes
    the libpcap path, and must yield what the per-packet reader admits, with the same
    timestamps, and the same detections as --no-bpf-prefilter."""
    capture = _pcapng_of(ROOT / "pcaps" / "demo.pcap", tmp_path / "demo.pcapng", ((1, 6, b"eth0"),))
    program = bpf.LinktypeFilters(None)
    with open_capture(str(capture)) as cap:
        expected = [(r[0], r[1], r[2]) for r in cap if program.admits(r[1], r[2])]
    with bpf.open_prefiltered(str(capture)) as cap:
        assert cap.by_libpcap and cap.format == "pcapng"
        got = [(r[0], r[1], r[2]) for r in cap]
    assert got == expected and expected
    filtered = _alerts_and_hosts(tmp_path, capture, capsys)
    assert filtered == _alerts_and_hosts(tmp_path, capture, capsys, "--no-bpf-prefilter")
    assert filtered[0]


@pytest.mark.parametrize("interfaces, by_libpcap", [
    (((1, 6, b"eth0"),), True),
    (((1, 9, b"eth0"),), True),  # shown as microseconds (pcapng_microsecond_view)
    (((1, 7, b"eth0"),), False),  # libpcap would round tenths of a microsecond away
    (((1, 6, b"eth0"), (1, 6, b"eth1")), True),  # interfaces told apart by InterfaceClock
    (((1, 9, b"eth0"), (1, 9, b"eth1")), False),
    (((1, 6, b"eth0"), (113, 6, b"any")), False),
], ids=["one-microsecond", "nanosecond", "100-nanosecond", "two-interfaces", "two-nanosecond-interfaces",
        "two-link-types"])
def test_which_pcapng_files_libpcap_reads(tmp_path, interfaces, by_libpcap):
    capture = _pcapng_of(ROOT / "pcaps" / "demo.pcap", tmp_path / "x.pcapng", interfaces)
    with bpf.open_prefiltered(str(capture)) as cap:
        assert cap.by_libpcap is by_libpcap
        assert len(list(cap)) > 0


def _interleaved_pcapng(out: Path, interfaces: int = 2, clock_errors=None, tail: bytes = b"",
                        epoch: bool = False) -> Path:
    """demo.pcap's Ethernet frames as a pcapng with ``interfaces`` Ethernet interfaces on
    microsecond clocks, frame i on interface i % interfaces (a TAP's two directions on two
    NICs interleave so), then ``tail``.  ``clock_errors`` maps an interface to seconds
    added to its timestamps; ``epoch`` starts the capture ten seconds after 1970's."""
    from tests.helpers import load_make_samples

    clock_errors = clock_errors or {}
    with open_capture(str(ROOT / "pcaps" / "demo.pcap")) as cap:
        frames = [(ts, data) for ts, linktype, data, _, _ in cap if linktype == 1]
    if epoch:
        frames = [(ts - frames[0][0] + 10, data) for ts, data in frames]
    records = [(round((ts + clock_errors.get(i % interfaces, 0)) * 1e6) * 1000, data, i % interfaces)
               for i, (ts, data) in enumerate(frames)]
    names = [(1, 6, f"eth{n}".encode()) for n in range(interfaces)]
    out.write_bytes(load_make_samples().pcapng_file(names, records) + tail)
    return out


def _python_reads(capture: Path) -> list:
    admits = bpf.LinktypeFilters(None).admits
    with open_capture(str(capture)) as cap:
        return [(r[0], r[1], r[2], r[4]) for r in cap if admits(r[1], r[2])]


def _batched_reads(capture: Path) -> tuple[list, bool]:
    """What ``read`` is handed: each frame of the batches with its interface, and whether
    libpcap read it all."""
    out = []
    with bpf.open_prefiltered(str(capture)) as cap:
        started_by_libpcap = cap.by_libpcap
        for item in cap.batches():
            if type(item) is bpf.Batch:
                others = item.others or {}
                out += [((sec * cap.units + fraction) / cap.units, item.linktype, item.buf[off:off + caplen],
                         others.get(off, item.interface))
                        for sec, fraction, off, caplen in struct.iter_unpack("=IIII", item.meta)]
            else:
                out.append((item[0], item[1], item[2], item[4]))
        return out, started_by_libpcap and cap.by_libpcap


@pytest.mark.parametrize("interfaces", [2, 3, 8])
def test_a_pcapng_with_several_interfaces_is_read_by_libpcap_frame_by_frame_as_in_python(tmp_path, capsys,
                                                                                       interfaces):
    """libpcap reads one link type over several interfaces but does not say which: shown
    each interface's clock moved into a band of its own (pcapng_interface_view), it is
    told again by InterfaceClock.  Iteration and batches give the Python reader's frames,
    timestamps and interfaces, and the alerts name the interfaces the Python path names."""
    capture = _interleaved_pcapng(tmp_path / "multi.pcapng", interfaces)
    expected = _python_reads(capture)
    assert {frame[3] for frame in expected} == set(range(interfaces))
    with bpf.open_prefiltered(str(capture)) as cap:
        assert cap.by_libpcap
        assert [(r[0], r[1], r[2], r[4]) for r in cap] == expected
        assert cap.by_libpcap  # to the end: nothing fell back
    assert _batched_reads(capture) == (expected, True)
    alerts = {}
    for mode in ("filtered", "plain"):
        out = tmp_path / f"{mode}.json"
        main(["read", "-q", "--no-state", "-o", f"file:{out}", str(capture)]
             + (["--no-bpf-prefilter"] if mode == "plain" else []))
        alerts[mode] = sorted((doc["@timestamp"], doc["event"]["action"], doc.get("host", {}).get("ip"),
                               json.dumps(doc["observer"].get("ingress")))
                              for doc in map(json.loads, out.read_text().splitlines()))
    capsys.readouterr()
    assert alerts["filtered"] == alerts["plain"]
    assert len({ingress for *_, ingress in alerts["filtered"]}) > 2  # interfaces, and none for host events


@pytest.mark.parametrize("case", ["second-section", "late-interface", "clock-years-off", "clock-off-near-1970"])
def test_what_the_interface_bands_cannot_tell_goes_to_the_python_reader(tmp_path, case):
    """A later section (a cat of two pcapng files) or an interface described after the
    first packet is read by libpcap without the sensor's offsets, so its packets land in no
    interface's band; an interface whose clock is years off lands in another's, and the
    jump gives it away (near 1970 that band would put it before 1970).  Each makes the rest of the file go to the Python reader
    (ClockLost), which gives every frame its true time and interface."""
    from tests.helpers import load_make_samples

    samples = load_make_samples()
    if case == "second-section":
        second = _interleaved_pcapng(tmp_path / "second.pcapng", 2).read_bytes()
        capture = _interleaved_pcapng(tmp_path / "x.pcapng", 2, tail=second)
    elif case == "late-interface":
        ts, _, frame, _ = _python_reads(_interleaved_pcapng(tmp_path / "plain.pcapng", 2))[-1]
        ticks = round(ts * 1e6) + 1
        late = (samples._pcapng_block(1, struct.pack("<HHI", 1, 0, 262144) + samples._pcapng_option(0, b""))
                + samples._pcapng_block(6, struct.pack("<IIIII", 2, ticks >> 32, ticks & 0xFFFFFFFF,
                                                       len(frame), len(frame))
                                        + frame + bytes(-len(frame) % 4)))
        capture = _interleaved_pcapng(tmp_path / "x.pcapng", 2, tail=late)
    elif case == "clock-years-off":
        capture = _interleaved_pcapng(tmp_path / "x.pcapng", 2, clock_errors={0: 5 * 365 * 86400})
    else:
        # Interface 1's packets land in interface 2's band, which would put them before 1970.
        capture = _interleaved_pcapng(tmp_path / "x.pcapng", 3, clock_errors={1: 0.6 * bpf.INTERFACE_STRIDE},
                                      epoch=True)
    expected = _python_reads(capture)
    with bpf.open_prefiltered(str(capture)) as cap:
        got = [(r[0], r[1], r[2], r[4]) for r in cap]
        assert not cap.by_libpcap  # handed over
    assert got == expected
    batched, by_libpcap = _batched_reads(capture)
    assert batched == expected and not by_libpcap


def test_pcapng_with_a_clock_offset_is_left_to_the_python_reader(tmp_path):
    """if_tsoffset shifts every timestamp; the per-packet reader applies it, libpcap 1.9 not."""
    from tests.helpers import load_make_samples

    samples = load_make_samples()
    plain = _pcapng_of(ROOT / "pcaps" / "demo.pcap", tmp_path / "plain.pcapng", ((1, 6, b"eth0"),))
    data = plain.read_bytes()
    shb_len = struct.unpack_from("<I", data, 4)[0]
    idb_len = struct.unpack_from("<I", data, shb_len + 4)[0]
    offset_idb = samples._pcapng_block(1, struct.pack("<HHI", 1, 0, 262144)
                                       + samples._pcapng_option(14, struct.pack("<q", 3600))
                                       + samples._pcapng_option(0, b""))
    shifted = tmp_path / "shifted.pcapng"
    shifted.write_bytes(data[:shb_len] + offset_idb + data[shb_len + idb_len:])
    with bpf.open_prefiltered(str(plain)) as cap:
        first = next(iter(cap))[0]
    with bpf.open_prefiltered(str(shifted)) as cap:
        assert not cap.by_libpcap
        assert next(iter(cap))[0] == pytest.approx(first + 3600)


def _nanosecond_pcapng_records(capture: Path, start_ns: int | None = None, step_ns: int = 0):
    """``capture``'s Ethernet frames as make_samples.pcapng_file records whose nanoseconds
    do not end in 000 (a reader that went through microseconds would be caught), at their
    own times or from ``start_ns`` every ``step_ns``."""
    with open_capture(str(capture)) as cap:
        frames = [(ts, data) for ts, linktype, data, _, _ in cap if linktype == 1]
    return [((round(ts * 1e9) if start_ns is None else start_ns + i * step_ns) + 1 + i % 997, data, 0)
            for i, (ts, data) in enumerate(frames)]


def _read_every_way(capture: Path) -> tuple[list[tuple[float, int, bytes]], bool]:
    """What the per-packet reader admits, and whether libpcap handed the capture over to
    it before the end; asserts that iteration and batches of open_prefiltered, which
    starts on libpcap, yield exactly that, without a warning."""
    admits = bpf.LinktypeFilters(None).admits
    with open_capture(str(capture)) as cap:
        expected = [(r[0], r[1], r[2]) for r in cap if admits(r[1], r[2])]
    with bpf.open_prefiltered(str(capture)) as cap:
        assert cap.by_libpcap and cap.units == bpf.NANO
        assert [(r[0], r[1], r[2]) for r in cap] == expected
        assert cap.truncated is None
    with bpf.open_prefiltered(str(capture)) as cap:
        from_batches = [frame for item in cap.batches()
                        for frame in (_batch_frames(cap, *item) if type(item) is bpf.Batch else [item[:3]])]
        assert cap.truncated is None
        handed_over = not cap.by_libpcap
    assert from_batches == expected
    return expected, handed_over


def test_nanosecond_pcapng_is_read_by_libpcap_with_exact_timestamps(tmp_path, capsys):
    """dumpcap's pcapng on a nanosecond clock: libpcap would divide its timestamps to
    microseconds, so it is shown one with a microsecond resolution and MillisecondClock
    rebuilds every nanosecond; the alerts equal --no-bpf-prefilter's to the last digit."""
    from tests.helpers import load_make_samples

    capture = tmp_path / "ns.pcapng"
    capture.write_bytes(load_make_samples().pcapng_file(
        ((1, 9, b"eth0"),), _nanosecond_pcapng_records(ROOT / "pcaps" / "demo.pcap")))
    expected, handed_over = _read_every_way(capture)
    assert any(round(ts * 1e9) % 1000 for ts, _, _ in expected) and not handed_over
    filtered = _alerts_and_hosts(tmp_path, capture, capsys)
    assert filtered[0] and filtered == _alerts_and_hosts(tmp_path, capture, capsys, "--no-bpf-prefilter")


def test_millisecond_clock_unwraps_and_hands_over_what_it_cannot_follow(tmp_path):
    """libpcap's 32-bit seconds word holds the millisecond count modulo 2**32 here.  The
    packets cross a multiple of 2**32 ms, a Simple Packet Block (no timestamp: the last
    one seen) sits among them, then the clock jumps two hours and a second section follows,
    whose interface libpcap reads unconverted: from the jump on the Python reader takes
    over, and every timestamp stays exact."""
    from tests.helpers import load_make_samples

    samples = load_make_samples()
    wrap_ms = 400 << 32
    records = _nanosecond_pcapng_records(ROOT / "pcaps" / "demo.pcap",
                                         start_ns=(wrap_ms - 300) * 1_000_000, step_ns=379_123)
    jump = 1200
    records[jump:] = [(ts + 7200 * bpf.NANO, data, iface) for ts, data, iface in records[jump:]]
    assert records[0][0] // 1_000_000 < wrap_ms < records[jump - 1][0] // 1_000_000
    blob = samples.pcapng_file(((1, 9, b"eth0"),), records)
    first_blocks = samples.pcapng_file(((1, 9, b"eth0"),), records[:100])
    spb_frame = records[50][1]
    spb = samples._pcapng_block(3, struct.pack("<I", len(spb_frame)) + spb_frame)
    second_section = samples.pcapng_file(((1, 9, b"eth0"),), records[:200])
    capture = tmp_path / "wrap.pcapng"
    capture.write_bytes(first_blocks + spb + blob[len(first_blocks):] + second_section)

    expected, handed_over = _read_every_way(capture)
    after_jump = records[jump][0] / bpf.NANO
    assert handed_over and any(ts >= after_jump for ts, _, _ in expected)
    assert expected[-1][0] < after_jump  # the second section's
    assert any(ts > wrap_ms / 1000 for ts, _, _ in expected)

    clock = bpf.MillisecondClock(records[0][0])
    wrapped = struct.pack("=IIII", (wrap_ms + 5) & 0xFFFFFFFF, 123, 0, 60)
    rebased = struct.iter_unpack("=IIII", clock.rebase(wrapped))
    assert [record[:2] for record in rebased] == [divmod((wrap_ms + 5) * 1_000_000 + 123, bpf.NANO)]
    with pytest.raises(bpf.ClockLost):
        clock.rebase(struct.pack("=IIII", (wrap_ms + 5 + bpf.MAX_CLOCK_STEP + 1) & 0xFFFFFFFF, 0, 0, 60))
    # A Simple Packet Block's time is the last packet's in the file, which the filter may
    # have rejected: the Python reader takes over.
    with pytest.raises(bpf.ClockLost):
        clock.rebase(wrapped + struct.pack("=IIII", 0, 0, 60, 60))


@pytest.mark.parametrize("batch", [16, 1024])
def test_a_simple_packet_block_after_a_rejected_packet_keeps_its_time(tmp_path, monkeypatch, batch):
    """A Simple Packet Block carries no time: the per-packet reader gives it the last one in
    the file, here a packet the capture filter rejects (an ARP request), in whatever batch
    the block falls."""
    from scapy.layers.l2 import ARP
    from tests.helpers import load_make_samples

    samples = load_make_samples()
    monkeypatch.setattr(bpf, "BATCH", batch)
    monkeypatch.setattr(bpf, "SHUNTING_BATCH", batch)
    records = _nanosecond_pcapng_records(ROOT / "pcaps" / "demo.pcap")[:60]
    arp = bytes(Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.0.0.9"))
    records.insert(40, (records[39][0] + 777, arp, 0))
    spb_frame = records[10][1]
    spb = samples._pcapng_block(3, struct.pack("<I", len(spb_frame)) + spb_frame)
    first = samples.pcapng_file(((1, 9, b"eth0"),), records[:41])
    capture = tmp_path / "spb.pcapng"
    capture.write_bytes(first + spb + samples.pcapng_file(((1, 9, b"eth0"),), records)[len(first):])
    expected, _ = _read_every_way(capture)
    assert (records[40][0] / bpf.NANO, 1, spb_frame) in expected


def test_the_reader_thread_holds_a_bounded_number_of_bytes(tmp_path, monkeypatch):
    """A consumer that stalls must not let libpcap's reader thread pull a capture of large
    frames into memory: it stops at the byte limit, overshooting by one batch at most."""
    from scapy.utils import wrpcap

    monkeypatch.setattr(bpf, "BATCH", 16)
    monkeypatch.setattr(bpf, "SHUNTING_BATCH", 16)
    monkeypatch.setattr(bpf, "PREFETCH_BYTES", 256 << 10)
    monkeypatch.setattr(bpf, "READ_AHEAD_BYTES", 64 << 10)
    frames = [Ether() / IP(src="10.0.0.1", dst="10.0.0.2")
              / TCP(sport=50000, dport=443, flags="PA", seq=1 + i * 8000) / Raw(b"\0" * 8000)
              for i in range(600)]
    capture = tmp_path / "uploads.pcap"
    wrpcap(str(capture), frames)
    batch_bytes = bpf.BATCH * len(bytes(frames[0]))
    with bpf.open_prefiltered(str(capture)) as cap:
        batches = cap.batches()  # the reader starts here
        time.sleep(0.3)  # room for it to run as far ahead as it is allowed, twice
        held_before_the_first_take = cap.read_ahead.held
        seen = 0
        while not seen or cap.read_ahead.held >= bpf.READ_AHEAD_BYTES:
            seen += len(next(batches)[2]) >> 4  # through what was prefetched
        time.sleep(0.3)
        held_while_stalled = cap.read_ahead.held
        seen += sum(len(item[2]) >> 4 for item in batches)
    assert seen == len(frames)
    assert held_before_the_first_take <= bpf.PREFETCH_BYTES + batch_bytes
    assert held_while_stalled <= bpf.READ_AHEAD_BYTES + batch_bytes
    assert bpf.PREFETCH_BYTES + batch_bytes < capture.stat().st_size / 10


def _nanosecond_pcap(source: Path, out: Path, order: str = "<", cut: int = 0) -> Path:
    """``source`` (a microsecond pcap) rewritten with nanosecond fractions that do not end
    in 000, so a reader that went through microseconds would be caught; ``cut`` bytes
    short of the end."""
    data = source.read_bytes()
    linktype = struct.unpack_from("<I", data, 20)[0]
    parts = [struct.pack(order + "IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, linktype)]
    pos = 24
    while pos + 16 <= len(data):
        sec, usec, caplen, wire_len = struct.unpack_from("<IIII", data, pos)
        parts.append(struct.pack(order + "IIII", sec, usec * 1000 + 1 + usec % 997, caplen, wire_len))
        parts.append(data[pos + 16:pos + 16 + caplen])
        pos += 16 + caplen
    blob = b"".join(parts)
    out.write_bytes(blob[:len(blob) - cut])
    return out


def _batch_frames(cap, linktype: int, buf: bytes, meta: bytes, _interface: int = 0,
                  _others=None) -> list[tuple[float, int, bytes]]:
    """A ``batches()`` item as (ts, linktype, frame), its timestamps in the capture's units."""
    return [((sec * cap.units + fraction) / cap.units, linktype, buf[off:off + caplen])
            for sec, fraction, off, caplen in struct.iter_unpack("=IIII", meta)]


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_nanosecond_pcap_is_read_by_libpcap_with_exact_timestamps(tmp_path, capsys, order):
    """libpcap opened for microseconds would divide the fractions by 1,000; behind the
    microsecond magic (PrologueFeed) it passes them through, so both the iteration and
    the batch path keep every nanosecond, and the alerts equal --no-bpf-prefilter's to
    the last digit of their timestamps."""
    capture = _nanosecond_pcap(ROOT / "pcaps" / "demo.pcap", tmp_path / "ns.pcap", order)
    admits = bpf.LinktypeFilters(None).admits
    with open_capture(str(capture)) as cap:
        expected = [(r[0], r[1], r[2]) for r in cap if admits(r[1], r[2])]
    assert any(round(ts * 1e9) % 1000 for ts, _, _ in expected)
    with bpf.open_prefiltered(str(capture)) as cap:
        assert cap.by_libpcap and cap.units == bpf.NANO
        assert [(r[0], r[1], r[2]) for r in cap] == expected
    with bpf.open_prefiltered(str(capture)) as cap:
        from_batches = [frame for item in cap.batches() for frame in _batch_frames(cap, *item)]
        assert cap.tell() == capture.stat().st_size
    assert from_batches == expected

    def alert_docs(*extra):
        alerts = tmp_path / f"alerts{len(extra)}.json"
        main(["read", "-q", "--no-state", "-o", f"file:{alerts}", *extra, str(capture)])
        capsys.readouterr()
        docs = [json.loads(line) for line in alerts.read_text().splitlines()]
        for doc in docs:
            del doc["event"]["id"]  # random per alert
        return sorted(json.dumps(doc, sort_keys=True) for doc in docs)

    filtered = alert_docs()
    assert filtered and filtered == alert_docs("--no-bpf-prefilter")


def test_nanosecond_feed_ends_with_the_capture(tmp_path):
    """The feed's child keeps none of the parent's descriptors but the file and the pipe.
    Closed after one batch, or cut short in a record, the child is gone and what libpcap
    could not read is re-read in Python."""
    capture = _nanosecond_pcap(ROOT / "pcaps" / "demo.pcap", tmp_path / "ns.pcap")
    big = tmp_path / "big.pcap"
    big.write_bytes(capture.read_bytes() + capture.read_bytes()[24:] * 400)
    assert big.stat().st_size > 4 * bpf.PIPE_SIZE
    parent_socket, other_end = socket.socketpair()
    cap = bpf.open_prefiltered(str(big))
    pid = cap._feed._pid
    next(iter(cap.batches()))
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{pid}/fd")) > 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # the child closes them before it sends the first page
    kept = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    assert parent_socket.fileno() not in kept and len(kept - {0, 1, 2}) == 2
    cap.close()
    parent_socket.close()
    other_end.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    cut = _nanosecond_pcap(ROOT / "pcaps" / "demo.pcap", tmp_path / "cut.pcap", cut=7)
    with bpf.open_prefiltered(str(cut)) as cap:
        got = [(r[0], r[2]) for r in cap]
        assert cap.truncated
    with open_capture(str(cut)) as cap:
        admits = bpf.LinktypeFilters(None).admits
        assert got == [(r[0], r[2]) for r in cap if admits(r[1], r[2])]


def test_a_feed_that_fails_midway_hands_the_rest_to_the_python_reader(tmp_path, monkeypatch):
    """The feed's child stops short (a read error in it): libpcap sees a clean end of
    file, so the capture must notice and read the rest itself."""
    capture = _nanosecond_pcap(ROOT / "pcaps" / "demo.pcap", tmp_path / "ns.pcap")
    data = capture.read_bytes()
    boundary = 24
    for _ in range(20):  # the end of the 20th record: libpcap meets no cut record
        boundary += 16 + struct.unpack_from("<I", data, boundary + 8)[0]
    sendfile = os.sendfile

    def fails_at_a_record_boundary(out_fd, in_fd, offset, count):
        done = os.lseek(in_fd, 0, os.SEEK_CUR)
        if done >= boundary:
            raise OSError(errno.EIO, "Input/output error")
        return sendfile(out_fd, in_fd, offset, min(count, boundary - done))

    admits = bpf.LinktypeFilters(None).admits
    with open_capture(str(capture)) as cap:
        expected = [(r[0], r[2]) for r in cap if admits(r[1], r[2])]
    monkeypatch.setattr(os, "sendfile", fails_at_a_record_boundary)
    for batched in (False, True):
        got = []
        with bpf.open_prefiltered(str(capture)) as cap:
            for item in (cap.batches() if batched else cap):
                if type(item) is bpf.Batch:
                    got += [(ts, frame) for ts, _, frame in _batch_frames(cap, *item)]
                else:
                    got.append((item[0], item[2]))
        assert 0 < len(got) == len(expected)
        assert got == expected


def test_truncated_file_loses_nothing_before_the_cut():
    """libpcap's next_batch drops the batch it failed in; the reader re-reads it."""
    capture = ROOT / "pcaps" / "truncated.pcap"
    with bpf.open_prefiltered(str(capture)) as cap:
        got = list(cap)
        assert cap.truncated
    with open_capture(str(capture)) as cap:
        admits = bpf.LinktypeFilters(None).admits
        expected = [r[2] for r in cap if admits(r[1], r[2])]
    assert [r[2] for r in got] == expected


def test_user_filter_narrows_and_a_bad_one_is_a_usage_error(tmp_path, capsys):
    demo = str(ROOT / "pcaps" / "demo.pcap")
    with bpf.open_prefiltered(demo, "udp port 53") as cap:
        records = list(cap)
    assert records
    udp53 = pcapy.compile(1, 262144, "udp port 53", 1, 0)
    assert all(udp53.filter(r[2]) for r in records)
    assert main(["read", "-q", "--no-state", "--bpf", "udp port nonsense", demo]) == 2
    assert "filter" in capsys.readouterr().err


# -- what passes and what does not ----------------------------------------------------

CLIENT4, SERVER4 = "10.1.2.3", "203.0.113.9"
CLIENT6, SERVER6 = "fd00::3", "2001:db8::9"


def _frame(l3_l4, vlan: int = 0):
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if vlan == 1:
        eth = eth / Dot1Q(vlan=10)
    elif vlan == 2:
        eth = eth / Dot1AD(vlan=100) / Dot1Q(vlan=10)
    elif vlan == 3:
        eth = eth / Dot1AD(vlan=100) / Dot1Q(vlan=10) / Dot1Q(vlan=20)
    return bytes(eth / l3_l4)


def _ip(v6: bool, to_server: bool):
    src, dst = (CLIENT6, SERVER6) if v6 else (CLIENT4, SERVER4)
    if not to_server:
        src, dst = dst, src
    return IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)


CASES = {
    # name: (builder(v6, to_server) -> layers, passes)
    "syn": (lambda v6: _ip(v6, True) / TCP(sport=51000, dport=443, flags="S"), True),
    "syn_ack": (lambda v6: _ip(v6, False) / TCP(sport=443, dport=51000, flags="SA"), False),
    "syn_ack_from_dns_over_tcp": (lambda v6: _ip(v6, False) / TCP(sport=53, dport=51000, flags="SA"), True),
    "rst_ack_from_server": (lambda v6: _ip(v6, False) / TCP(sport=443, dport=51000, flags="RA"), True),
    "fin_from_server": (lambda v6: _ip(v6, False) / TCP(sport=443, dport=51000, flags="FA"), True),
    "client_hello_first_segment": (lambda v6: _ip(v6, True) / TCP(sport=51000, dport=443, flags="A")
                                   / Raw(b"\x16\x03\x01\x07\x00\x01" + bytes(1400)), True),
    "client_hello_continuation": (lambda v6: _ip(v6, True) / TCP(sport=51000, dport=443, flags="A")
                                  / Raw(bytes(range(256)) * 5), True),
    "hello_continuation_from_low_client_port": (lambda v6: _ip(v6, True) / TCP(sport=20, dport=443, flags="A")
                                                / Raw(bytes(range(256)) * 5), True),
    "hello_from_low_client_port": (lambda v6: _ip(v6, True) / TCP(sport=1000, dport=8443, flags="PA")
                                   / Raw(b"\x16\x03\x01\x02\x00\x01" + bytes(500)), True),
    "hello_continuation_to_a_registered_port_above_the_client": (
        lambda v6: _ip(v6, True) / TCP(sport=2000, dport=8443, flags="A") / Raw(bytes(range(256)) * 5), True),
    # Where neither port says which side is the client (both ephemeral), only a segment
    # that opens a hello or a request passes: the filter's documented blind spot.
    "hello_continuation_between_ephemeral_ports": (
        lambda v6: _ip(v6, True) / TCP(sport=40000, dport=50443, flags="A") / Raw(bytes(range(256)) * 5), False),
    "server_bulk_from_a_registered_port": (lambda v6: _ip(v6, False) / TCP(sport=8443, dport=51000, flags="A")
                                           / Raw(bytes(1448)), False),
    "server_bulk_to_a_registered_client_port": (lambda v6: _ip(v6, False) / TCP(sport=443, dport=20000, flags="A")
                                                / Raw(bytes(1448)), False),
    "hello_to_a_server_port_above_the_client": (lambda v6: _ip(v6, True) / TCP(sport=40000, dport=50443, flags="PA")
                                                / Raw(b"\x16\x03\x01\x02\x00\x01" + bytes(500)), True),
    "record_header_alone_to_a_server_port_above_the_client": (
        lambda v6: _ip(v6, True) / TCP(sport=40000, dport=50443, flags="PA") / Raw(b"\x16\x03\x01\x02\x00"), True),
    "server_hello_flight": (lambda v6: _ip(v6, False) / TCP(sport=443, dport=51000, flags="PA")
                            / Raw(b"\x16\x03\x03\x00\x7a\x02" + bytes(1200)), False),
    "http_get_from_low_client_port": (lambda v6: _ip(v6, True) / TCP(sport=1000, dport=8080, flags="PA")
                                      / Raw(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), True),
    "dns_over_tcp_answer": (lambda v6: _ip(v6, False) / TCP(sport=53, dport=51000, flags="PA")
                            / Raw(b"\x00\x20" + bytes(32)), True),
    "dns_udp": (lambda v6: _ip(v6, True) / UDP(sport=51000, dport=53) / Raw(bytes(30)), True),
    "dhcp": (lambda v6: _ip(v6, True) / UDP(sport=68, dport=67) / Raw(bytes(300)), True),
    "ksc_udp_15000": (lambda v6: _ip(v6, True) / UDP(sport=15000, dport=15000) / Raw(bytes(40)), True),
    "vxlan": (lambda v6: _ip(v6, True) / UDP(sport=40000, dport=4789) / Raw(bytes(60)), True),
    "quic_initial": (lambda v6: _ip(v6, True) / UDP(sport=51000, dport=443)
                     / Raw(b"\xc3\x00\x00\x00\x01" + bytes(1195)), True),
    "quic_initial_from_a_low_client_port": (lambda v6: _ip(v6, True) / UDP(sport=1000, dport=443)
                                            / Raw(b"\xc3\x00\x00\x00\x01" + bytes(1195)), True),
    "quic_initial_between_ephemeral_ports": (lambda v6: _ip(v6, True) / UDP(sport=51000, dport=50443)
                                             / Raw(b"\xc3\x00\x00\x00\x01" + bytes(1195)), True),
    "quic_server_initial": (lambda v6: _ip(v6, False) / UDP(sport=443, dport=51000)
                            / Raw(b"\xc3\x00\x00\x00\x01" + bytes(1195)), False),
    "quic_server_handshake": (lambda v6: _ip(v6, False) / UDP(sport=443, dport=51000)
                              / Raw(b"\xe3\x00\x00\x00\x01" + bytes(1195)), False),
    "server_bulk": (lambda v6: _ip(v6, False) / TCP(sport=443, dport=51000, flags="A")
                    / Raw(bytes(1448)), False),
    "server_http_response": (lambda v6: _ip(v6, False) / TCP(sport=80, dport=51000, flags="PA")
                             / Raw(b"HTTP/1.1 200 OK\r\n\r\n"), False),
    "pure_ack": (lambda v6: _ip(v6, True) / TCP(sport=51000, dport=443, flags="A",
                                                options=[("Timestamp", (1, 2))]), False),
    "rtp": (lambda v6: _ip(v6, True) / UDP(sport=20000, dport=20002) / Raw(b"\x80\x00" + bytes(170)), False),
    "quic_short_header": (lambda v6: _ip(v6, False) / UDP(sport=443, dport=51000)
                          / Raw(b"\x40" + bytes(1300)), False),
}


@pytest.mark.parametrize("vlan", [0, 1, 2, 3], ids=["untagged", "vlan", "qinq", "three_tags"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_filter_decisions(case, v6, vlan):
    build, passes = CASES[case]
    program = bpf.compile_filter(None)
    assert bool(program.filter(_frame(build(v6), vlan))) is passes


def _tunnel_program():
    return pcapy.compile(bpf.DLT_EN10MB, 262144, bpf.build_filter(tunnels=True), 1, 0)


def wrpcap_frames(path: Path, records) -> None:
    """``(ts, frame)`` records as a microsecond Ethernet pcap."""
    parts = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    for ts, data in records:
        sec = int(ts)
        parts.append(struct.pack("<IIII", sec, round((ts - sec) * 1e6), len(data), len(data)) + data)
    path.write_bytes(b"".join(parts))


def _wrappers():
    from tests.helpers import in_erspan2, in_erspan3, in_vxlan

    return {"vxlan": in_vxlan, "erspan2": in_erspan2, "erspan3": in_erspan3}


TUNNELS = pytest.mark.parametrize("tunnel", ["vxlan", "erspan2", "erspan3"])


@TUNNELS
@pytest.mark.parametrize("vlan", [0, 1], ids=["untagged", "vlan"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tunnel_filter_judges_the_inner_frame_as_the_frame_alone(case, v6, vlan, tunnel):
    """Cloud traffic mirroring's VXLAN and remote span's ERSPAN II: with ``tunnels`` the
    filter reaches the same verdict for the inner frame, untagged or behind a tag, as for
    the frame alone; without, tunnels pass whole."""
    build, passes = CASES[case]
    tunnelled = _wrappers()[tunnel](_frame(build(v6), vlan))
    assert bool(bpf.compile_filter(None).filter(tunnelled))
    assert bool(_tunnel_program().filter(tunnelled)) is passes


def test_tunnels_the_filter_cannot_judge_pass_whole():
    """An inner frame behind two VLAN tags, VXLAN without the I flag (the decoder counts it
    malformed), behind an outer tag or over IPv6, GRE with other flags than ERSPAN II's, and
    ERSPAN III with a platform subheader or an IP packet inside pass; so does UDP from port
    53 to VXLAN's only when its inner frame does, since the decoder reads a tunnel there.
    A filter built for some kinds of tunnel passes the others whole."""
    from tests.helpers import in_erspan2, in_erspan3, in_vxlan

    program = _tunnel_program()
    bulk = _frame(CASES["server_bulk"][0](False), 0)
    assert not program.filter(in_vxlan(bulk, 0))
    assert not program.filter(in_erspan2(bulk))
    assert program.filter(in_vxlan(_frame(CASES["server_bulk"][0](False), 2), 0))
    assert program.filter(in_vxlan(bulk, 6))  # no I flag
    assert program.filter(in_vxlan(bulk, 1))  # outer tag
    assert program.filter(in_vxlan(bulk, 2))  # outer IPv6
    assert not program.filter(in_vxlan(bulk, 9))  # from port 53
    keyed = bytearray(in_erspan2(bulk))
    keyed[34] = 0x30  # GRE key and sequence: the inner frame is 4 bytes further on
    assert program.filter(bytes(keyed))
    assert not program.filter(in_erspan3(bulk))
    assert program.filter(in_erspan3(bulk, subheader=True))  # the inner frame 8 bytes further on
    assert program.filter(in_erspan3(bulk[14:], frame_type=2))  # an IP packet, not a frame
    assert not bpf.compile_filter(None, tunnels=frozenset({"erspan3"})).filter(in_erspan3(bulk))
    assert bpf.compile_filter(None, tunnels=frozenset({"erspan3"})).filter(in_erspan2(bulk))
    assert bpf.compile_filter(None, tunnels=frozenset({"vxlan"})).filter(in_erspan3(bulk))


@TUNNELS
def test_a_capture_that_opens_with_a_tunnel_gets_the_tunnel_filter(tmp_path, capsys, tunnel):
    """The demo capture inside VXLAN or ERSPAN II or III: detected by its first records, read
    with the filter for that tunnel (fewer frames reach Python than with the plain one), and
    the detections equal --no-bpf-prefilter's."""
    wrap = _wrappers()[tunnel]
    with open_capture(str(ROOT / "pcaps" / "demo.pcap")) as cap:
        records = [(ts, wrap(data, 0)) for ts, linktype, data, _, _ in cap if linktype == 1]
    capture = tmp_path / f"{tunnel}-demo.pcap"
    wrpcap_frames(capture, records)
    assert bpf.file_filter(str(capture)) == bpf.build_filter(tunnels=frozenset({tunnel}))
    assert bpf.file_filter(str(ROOT / "pcaps" / "demo.pcap")) == bpf.build_filter()
    plain_program = bpf.compile_filter(None)
    tunnel_program = _tunnel_program()
    assert sum(1 for _, data in records if tunnel_program.filter(data)) \
        < sum(1 for _, data in records if plain_program.filter(data)) * 0.9
    filtered = _alerts_and_hosts(tmp_path, capture, capsys)
    assert filtered[0] and filtered == _alerts_and_hosts(tmp_path, capture, capsys, "--no-bpf-prefilter")


@pytest.mark.parametrize("tags", [0, 1, 2, 3])
@pytest.mark.parametrize("carrier", ["mpls", "pppoe"])
def test_mpls_and_pppoe_pass_whole_behind_any_vlan_tags(carrier, tags):
    """The decoder reads them behind tags, so the filter must not drop them there."""
    from scapy.contrib.mpls import MPLS
    from scapy.layers.ppp import PPP, PPPoE

    eth = Ether()
    for n in range(tags):
        eth = eth / (Dot1AD(vlan=100 + n) if n == 0 and tags > 1 else Dot1Q(vlan=10 + n))
    inner = IP(src=SERVER4, dst=CLIENT4) / TCP(sport=443, dport=51000, flags="A") / Raw(bytes(100))
    wrapped = MPLS(label=16, s=1) / inner if carrier == "mpls" else PPPoE(sessionid=7) / PPP(proto=0x21) / inner
    assert bpf.compile_filter(None).filter(bytes(eth / wrapped))


def test_ipv4_options_ipv6_extension_headers_and_fragments_pass_whole():
    """The filter reads transport headers at fixed offsets; what shifts them passes whole."""
    program = bpf.compile_filter(None)
    bulk = TCP(sport=443, dport=51000, flags="A") / Raw(bytes(100))
    assert not program.filter(_frame(IP(src=SERVER4, dst=CLIENT4) / bulk))
    assert program.filter(_frame(IP(src=SERVER4, dst=CLIENT4, options=[IPOption_NOP()] * 4) / bulk))
    hop = IPv6(src=SERVER6, dst=CLIENT6) / IPv6ExtHdrHopByHop() / TCP(sport=443, dport=5, flags="A") / Raw(bytes(100))
    assert program.filter(_frame(hop))
    frag = IP(src=SERVER4, dst=CLIENT4, flags="MF") / TCP(sport=443, dport=51000, flags="A") / Raw(bytes(100))
    assert program.filter(_frame(frag))


def test_filter_covers_every_port_the_decoder_and_tracker_use():
    from sensor.decode import packet, quic
    from sensor.decode.packet import DHCP_PORTS, DNS_PORTS
    from sensor.decode.tunnels import GENEVE_PORT, VXLAN_PORT
    from sensor.track.tracker import KSC_UDP_PORTS

    covered = set(bpf.UDP_PORTS)
    for lo, hi in bpf.UDP_PORT_RANGES:
        covered.update(range(lo, hi + 1))
    assert set(DNS_PORTS) | set(DHCP_PORTS) | set(KSC_UDP_PORTS) | {VXLAN_PORT, GENEVE_PORT} <= covered
    assert set(packet.KSC_UDP_PORTS) == set(KSC_UDP_PORTS)
    # The filter drops a server's QUIC long headers by the port rule the decoder applies.
    assert bpf.WELL_KNOWN_PORTS == quic.SERVER_PORT_LIMIT


@pytest.mark.parametrize("linktype", [0, 1, 101, 113, 228, 229, 276])
def test_filter_compiles_for_every_link_type_the_decoder_reads(linktype):
    bpf.compile_filter(None, bpf.dlt_for(linktype))
    bpf.compile_filter("tcp port 443", bpf.dlt_for(linktype))


# -- a frame the filter rejects must decode to nothing ------------------------------------

def _random_frame(rng, hello: bytes) -> bytes:
    """One evidence-bearing packet (a DNS query, a ClientHello, an HTTP request or a SYN)
    under a random stack: 0-3 VLAN tags, MPLS or PPPoE, a tunnel (GRE, ERSPAN, VXLAN,
    Geneve, IP-in-IP), IPv4 with or without options, IPv6 with or without a hop-by-hop
    header, odd ports and flags."""
    from scapy.contrib.erspan import ERSPAN_II
    from scapy.contrib.geneve import GENEVE
    from scapy.contrib.mpls import MPLS
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.l2 import GRE
    from scapy.layers.ppp import PPP, PPPoE
    from scapy.layers.vxlan import VXLAN

    kind = rng.choice(["dns", "tls", "http", "syn"])
    if kind == "dns":
        sport, dport = rng.choice([(40000, 53), (53, 40000), (5353, 5353), (40000, 5355)])
        l4 = UDP(sport=sport, dport=dport) / DNS(rd=1, qd=DNSQR(qname="s07.upd.kaspersky.com"))
    else:
        body = {"tls": hello, "syn": b"",
                "http": b"GET / HTTP/1.1\r\nHost: s07.upd.kaspersky.com\r\n\r\n"}[kind]
        flags = "S" if kind == "syn" else rng.choice(["PA", "A", "S", "FPA"])
        l4 = TCP(sport=rng.choice([20, 80, 443, 1000, 13000, 40000, 60000]),
                 dport=rng.choice([20, 80, 443, 8080, 8443, 13000, 14000, 50000]),
                 flags=flags, seq=1000) / Raw(body)
    if rng.random() < 0.4:
        ip = IPv6(src=CLIENT6, dst=SERVER6)
        packet = (ip / IPv6ExtHdrHopByHop() if rng.random() < 0.2 else ip) / l4
    else:
        options = [IPOption_NOP()] * 4 if rng.random() < 0.1 else []
        packet = IP(src=CLIENT4, dst=SERVER4, options=options) / l4
    outer = IP(src="192.0.2.1", dst="192.0.2.2") if rng.random() < 0.7 else IPv6(src="2001:db8::1", dst="2001:db8::2")
    inner_eth = Ether(src="02:00:00:00:00:03", dst="02:00:00:00:00:04")
    tunnel = rng.choice(["none", "none", "gre", "vxlan", "geneve", "ip-in-ip", "erspan"])
    if tunnel == "gre":
        packet = outer / GRE(proto=0x0800 if isinstance(packet, IP) else 0x86DD) / packet
    elif tunnel == "vxlan":
        packet = outer / UDP(sport=50000, dport=4789) / VXLAN(vni=5) / inner_eth / packet
    elif tunnel == "geneve":
        packet = outer / UDP(sport=50000, dport=6081) / GENEVE(vni=5, proto=0x6558) / inner_eth / packet
    elif tunnel == "ip-in-ip":
        packet = outer / packet
    elif tunnel == "erspan":
        packet = outer / GRE(proto=0x88BE, seqnum_present=1) / ERSPAN_II() / inner_eth / packet
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    tags = rng.choice([0, 0, 1, 2, 3])
    for n in range(tags):
        eth = eth / (Dot1AD(vlan=100) if n == 0 and tags > 1 else Dot1Q(vlan=10 + n))
    carrier = rng.random()
    if carrier < 0.1:
        return bytes(eth / MPLS(label=16, s=1) / packet)
    if carrier < 0.2 and isinstance(packet, IP):
        return bytes(eth / PPPoE(sessionid=1) / PPP(proto=0x21) / packet)
    return bytes(eth / packet)


def test_a_frame_the_filter_rejects_yields_no_record():
    """The filter and the decoder agree on single frames under every stack the decoder
    reads: a rejected frame would have given no record.  (Filtering the tagged MPLS and
    PPPoE frames this test builds lost about one detection in ten.)"""
    import random

    from sensor.decode.packet import DecoderConfig, PacketDecoder
    from sensor.stats import Stats
    from tests.helpers import load_make_samples

    rng = random.Random(17)
    hello = load_make_samples().client_hello(random.Random(2), b"s07.upd.kaspersky.com")
    program = bpf.compile_filter(None)
    lost = []
    for _ in range(800):
        frame = _random_frame(rng, hello)
        records = PacketDecoder(Stats(), DecoderConfig(dedup_window=0)).decode(1.0, 1, frame)
        if records and not program.filter(frame):
            lost.append(Ether(frame).summary())
    assert lost == []


def test_the_switch_interval_is_short_while_the_reader_runs_and_restored_after():
    """The reader thread returns a batch only once it has the GIL: while it runs, the
    switch interval is READER_SWITCH_INTERVAL at most, and the caller's own comes back when
    the capture is read to its end (or closed early)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        for read_all in (True, False):
            with bpf.open_prefiltered(str(ROOT / "pcaps" / "demo.pcap")) as cap:
                batches = iter(cap.batches())
                next(batches)
                assert sys.getswitchinterval() <= bpf.READER_SWITCH_INTERVAL
                if read_all:
                    for _ in batches:
                        pass
            assert sys.getswitchinterval() == 0.004
    finally:
        sys.setswitchinterval(before)


# Classic BPF opcode fields the program checks below read: classes, load modes and sizes.
_BPF_CLASS, _BPF_LD, _BPF_LDX, _BPF_ST, _BPF_STX, _BPF_JMP, _BPF_RET = 0x07, 0x00, 0x01, 0x02, 0x03, 0x05, 0x06
_BPF_ABS, _BPF_IND, _BPF_MSH, _BPF_H = 0x20, 0x40, 0xA0, 0x08
_BPF_JA, _BPF_LD_MEM, _BPF_LDX_MEM = 0x05, 0x60, 0x61


def unstored_scratch_loads(program: list[tuple[int, int, int, int]]) -> list[int]:
    """The instructions of a classic BPF program (``(code, jt, jf, k)``, as libpcap emits
    it) that load a scratch slot some path reaches without storing it: a forward pass, each
    instruction knowing the slots every path to it has stored (the kernel's checker does
    the same and refuses such a program)."""
    stored: list = [None] * (len(program) + 1)
    stored[0] = frozenset()
    found = []
    for index, (code, jt, jf, k) in enumerate(program):
        slots = stored[index]
        if slots is None:
            continue  # no path reaches it
        if code in (_BPF_LD_MEM, _BPF_LDX_MEM) and k not in slots:
            found.append(index)
        kind = code & _BPF_CLASS
        if kind in (_BPF_ST, _BPF_STX):
            slots = slots | {k}
        if kind == _BPF_RET:
            nexts = ()
        elif kind == _BPF_JMP:
            nexts = (index + 1 + k,) if code == _BPF_JA else (index + 1 + jt, index + 1 + jf)
        else:
            nexts = (index + 1,)
        for target in nexts:
            stored[target] = slots if stored[target] is None else stored[target] & slots
    return found


def test_the_scratch_slot_check_finds_a_load_before_a_store():
    store_then_load = [(0x30, 0, 0, 14), (_BPF_ST, 0, 0, 3), (_BPF_LD_MEM, 0, 0, 3), (0x16, 0, 0, 0)]
    branch_skips_store = [(0x30, 0, 0, 14), (0x15, 1, 0, 6), (_BPF_ST, 0, 0, 3),
                          (_BPF_LD_MEM, 0, 0, 3), (0x16, 0, 0, 0)]
    assert unstored_scratch_loads(store_then_load) == []
    assert unstored_scratch_loads(branch_skips_store) == [3]


@pytest.mark.parametrize("tunnels", [False, True], ids=["plain", "tunnels"])
@pytest.mark.parametrize("linktype", [1, 113, 276, 12, 228, 229, 0],
                         ids=["ethernet", "sll", "sll2", "raw", "ipv4", "ipv6", "null"])
def test_filter_programs_store_every_scratch_slot_they_load(linktype, tunnels):
    """libpcap's optimizer (1.9, 1.10) can give a value it keeps in a scratch slot a slot
    number that no instruction on the way stores: the sensor's filter compared an IPv6
    segment's ports with such a slot.  In user space the slot holds what an earlier packet
    left there; the kernel refuses the program (EINVAL), and libpcap then filters every
    packet in user space after only a warning on stderr.  Every program the sensor builds
    stores each slot before it loads it."""
    expression = bpf.build_filter(None, linktype, tunnels=tunnels)
    program = pcapy.compile(linktype, 262144, expression, 1, 0).get_bpf()
    assert len(program) < 4096  # the kernel's BPF_MAXINSNS
    assert unstored_scratch_loads(program) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="opening an interface for capture needs root")
@pytest.mark.parametrize("interface", ["lo", "any"])
def test_the_kernel_takes_the_live_filter(interface):
    """What ``run`` installs (build_filter with tunnels, for the interface's link type:
    Ethernet on ``lo``, Linux cooked on ``any``) attaches to the socket: libpcap says
    "Kernel filter failed" on stderr when the kernel refuses it, and the socket then has
    no program.  The kernel reports the program it runs as long as the one compiled, and
    LiveSource says the filter is in the kernel."""
    script = ("import pcapy; from sensor.capture.bpf import build_filter; "
              "from sensor.capture.live import LiveSource, kernel_filter_length; "
              f"s = LiveSource({interface!r}, None); "
              "n = len(pcapy.compile(s.linktype, 65535, build_filter(None, s.linktype, tunnels=True), 1, 0).get_bpf()); "
              "print(s.linktype, s.filter_in_kernel, kernel_filter_length(s.fd), n)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    linktype, in_kernel, attached, compiled = done.stdout.split()
    assert linktype in ("1", "113") and in_kernel == "True"
    assert int(attached) == int(compiled) > 1000
    assert "filter" not in done.stderr.lower(), done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="opening an interface for capture needs root")
def test_a_socket_without_a_filter_reports_none_attached():
    """The other answer of the kernel's count: a capture opened without a filter has none,
    as a socket has after the kernel refused its program (libpcap then removes its own)."""
    script = ("import pcapy; from sensor.capture.live import kernel_filter_length; "
              "h = pcapy.open_live('lo', 65535, 0, 100); print(kernel_filter_length(h.getfd())); "
              "h.setfilter('udp port 53'); print(kernel_filter_length(h.getfd()))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert before == 0 and after > 0


@pytest.mark.parametrize("tunnels", [False, True], ids=["plain", "tunnels"])
def test_cooked_live_program_loads_nothing_libpcap_cannot_move(tunnels):
    """Live ``-i any`` (Linux cooked) runs the program on the network header: libpcap moves
    each packet load past the 16-byte cooked header onto it and the type field (offset
    14) onto the kernel's protocol.  A load below offset 16 other than the type field it
    turns into the kernel's packet-type field, and one reached through X then loads
    nothing, so the kernel drops the packet: with the index's constant last
    (``ether[l4 + doff + 5]``) that was every ClientHello sent to a higher ephemeral
    port.  Every packet load of the program is past the cooked header or the type field."""
    program = pcapy.compile(113, 262144, bpf.build_filter(None, 113, tunnels=tunnels), 1, 0).get_bpf()
    loads = [(code, k) for code, _, _, k in program
             if code & _BPF_CLASS in (_BPF_LD, _BPF_LDX) and code & 0xE0 in (_BPF_ABS, _BPF_IND, _BPF_MSH)]
    assert loads
    assert [(hex(code), k) for code, k in loads
            if k < 16 and (code, k) != (_BPF_LD | _BPF_H | _BPF_ABS, 14)] == []
