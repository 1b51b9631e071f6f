"""libpcap reads a large capture through a widened stdio buffer (capture.read_buffer), and
reads exactly the same frames as it does without one."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

pcapy = pytest.importorskip("pcapy")

from sensor.capture import bpf, libpcap  # noqa: E402
from sensor.capture.pcapfile import open_capture  # noqa: E402
from sensor.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _libpcap_calls_apply() -> bool:
    """Whether this pcapy-ng's reader has the layout capture.libpcap knows and one libpcap
    is mapped: elsewhere pcapy's own calls are used by design, which the tests marked
    ``requires_libpcap_calls`` would report as failures."""
    handle = pcapy.open_offline(str(ROOT / "pcaps" / "demo.pcap"))
    try:
        return type(handle).__basicsize__ in libpcap._KNOWN_READER_SIZES \
            and libpcap._loaded_libpcap() is not None
    finally:
        handle.close()


requires_libpcap_calls = pytest.mark.skipif(
    not _libpcap_calls_apply(), reason="a pcapy-ng reader of another layout, or more than one libpcap")


def _dns_frame(rng: random.Random, size: int) -> bytes:
    """Ethernet/IPv4/UDP to port 53 (which the sensor's filter keeps) of ``size`` bytes."""
    payload = rng.randbytes(size - 42)
    udp = struct.pack("!HHHH", rng.randrange(1024, 65536), 53, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, rng.randrange(1, 255)]), bytes([10, 0, 1, 1])) + udp
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip


def _large_capture(path, units: int = 1_000_000) -> None:
    """A capture past MIN_CAPTURE_SIZE whose frames' sizes vary, so records straddle the
    buffer's edges at every offset."""
    rng = random.Random(7)
    magic = 0xA1B2C3D4 if units == 1_000_000 else 0xA1B23C4D
    written = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 65535, 1))
        n = 0
        while written < libpcap.MIN_CAPTURE_SIZE + libpcap.READ_BUFFER:
            frame = _dns_frame(rng, rng.randrange(60, 1515))
            out.write(struct.pack("<IIII", 1_700_000_000 + n // 1000, n % units, len(frame), len(frame)))
            out.write(frame)
            written += 16 + len(frame)
            n += 1


def _frames(capture: bpf.PrefilteredCapture) -> list:
    frames = []
    for item in capture.batches():
        if isinstance(item, bpf.Batch):
            for sec, fraction, off, caplen in struct.iter_unpack("=IIII", item.meta):
                frames.append((sec, fraction, bytes(item.buf[off:off + caplen])))
        else:
            frames.append(item)
    return frames


@requires_libpcap_calls
def test_large_capture_is_read_through_the_wide_buffer_with_the_same_frames(tmp_path, monkeypatch):
    path = tmp_path / "large.pcap"
    _large_capture(path)
    with bpf.open_prefiltered(str(path)) as capture:
        assert capture.by_libpcap and capture._read_buffer is not None
        widened = _frames(capture)
    monkeypatch.setattr(bpf, "widen_read_buffer", lambda handle: None)
    with bpf.open_prefiltered(str(path)) as capture:
        assert capture._read_buffer is None
        plain = _frames(capture)
    with open_capture(str(path)) as capture:
        python = [(int(ts), round(ts % 1 * 1_000_000), frame) for ts, _, frame, *_ in capture]
    assert widened == plain
    assert len(widened) == len(python) > 4000
    assert [frame for *_, frame in widened] == [frame for *_, frame in python]


@requires_libpcap_calls
def test_the_stream_reads_ahead_by_the_buffer(tmp_path):
    """The file's offset after the first frame shows how much stdio read in one go: the
    whole buffer once widened, a few pages otherwise."""
    path = tmp_path / "large.pcap"
    _large_capture(path)
    offsets = []
    for widen in (True, False):
        handle = pcapy.open_offline(str(path))
        kept = libpcap.widen_read_buffer(handle) if widen else None
        assert (kept is not None) == widen
        _, meta = handle.next_batch(1)
        assert len(meta) == 16
        offsets.append(os.lseek(handle.getfd(), 0, os.SEEK_CUR))
        handle.close()
        del kept
    assert offsets[0] >= libpcap.READ_BUFFER > offsets[1]


def test_a_pipe_and_a_small_capture_keep_libpcaps_buffer(tmp_path):
    """A nanosecond capture reaches libpcap through a pipe (PrologueFeed), which cannot
    move back to where stdio stands; a small one is not worth loading ctypes for."""
    path = tmp_path / "nano.pcap"
    _large_capture(path, units=1_000_000_000)
    with bpf.open_prefiltered(str(path)) as capture:
        assert capture.by_libpcap and capture._read_buffer is None
        assert libpcap.widen_read_buffer(capture._handle) is None
        assert len(_frames(capture)) > 4000
    small = tmp_path / "small.pcap"
    small.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    with bpf.open_prefiltered(str(small)) as capture:
        assert capture.by_libpcap and capture._read_buffer is None


def test_an_object_of_another_layout_is_left_alone(tmp_path):
    """Only a reader object of a known size is read for its pcap_t pointer."""
    path = tmp_path / "large.pcap"
    _large_capture(path)

    class Other:
        def __init__(self, fd):
            self.fd = fd

        def getfd(self):
            return self.fd

    with open(path, "rb") as fh:
        assert libpcap.widen_read_buffer(Other(fh.fileno())) is None


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@requires_libpcap_calls
def test_the_filter_program_is_freed(tmp_path):
    """pcapy-ng 2.1's setfilter keeps each program it compiles (8 KB a capture with this
    filter); opening a capture with the sensor's filter again and again must not grow the
    process."""
    path = tmp_path / "small.pcap"
    path.write_bytes((ROOT / "pcaps" / "demo.pcap").read_bytes())
    expression = bpf.build_filter(None, 1)

    def open_filtered(times: int) -> None:
        for _ in range(times):
            handle = pcapy.open_offline(str(path))
            libpcap.set_filter(handle, expression)
            handle.close()

    open_filtered(100)
    before = _resident_mb()
    open_filtered(600)
    assert _resident_mb() - before < 1.5  # pcapy's own setfilter: about 5 MB


def _by_iteration(opened: bpf.PrefilteredCapture) -> list:
    return [(ts, frame) for ts, _, frame, *_ in opened]


def _pcapys_setfilter(handle, expression: str) -> None:
    handle.setfilter(expression)


@pytest.mark.parametrize("name", ["demo.pcap", "vxlan.pcap", "nanosecond_be.pcap", "vlan_qinq.pcap"])
def test_the_filter_passes_what_pcapys_passes(name, monkeypatch):
    """By iteration, libpcap's calls and pcapy's give the same frames (a nanosecond capture
    reaches libpcap through a pipe, which takes the filter the same way)."""
    capture = str(ROOT / "pcaps" / name)
    with bpf.open_prefiltered(capture) as opened:
        assert opened.by_libpcap
        ours = _by_iteration(opened)
    monkeypatch.setattr(bpf, "set_filter", _pcapys_setfilter)
    with bpf.open_prefiltered(capture) as opened:
        theirs = _by_iteration(opened)
    assert ours == theirs and ours


def test_a_filter_that_does_not_compile_raises_libpcaps_message(tmp_path, capsys):
    handle = pcapy.open_offline(str(ROOT / "pcaps" / "demo.pcap"))
    with pytest.raises(pcapy.PcapError, match="syntax error"):
        libpcap.set_filter(handle, "tcp port")
    handle.close()
    assert main(["read", "-q", "--no-state", "--bpf", "tcp port", str(ROOT / "pcaps" / "demo.pcap")]) == 2
    assert "syntax error" in capsys.readouterr().err


def test_compiled_filters_are_shared_by_link_type_and_bounded(tmp_path, monkeypatch):
    """One program serves every capture of its link type, whatever each file's snap length;
    more distinct filters than the table holds are compiled again, the oldest freed."""
    demo = (ROOT / "pcaps" / "demo.pcap").read_bytes()
    short = tmp_path / "short_snap.pcap"
    short.write_bytes(demo[:16] + struct.pack("<I", 128) + demo[20:])
    captures = [str(ROOT / "pcaps" / "demo.pcap"), str(short), str(ROOT / "pcaps" / "dns_tcp.pcap")]
    filters = [f"len >= {size}" for size in range(60, 60 + 12 * 40, 40)]

    def frames(capture: str, user_filter: str) -> list:
        with bpf.open_prefiltered(capture, user_filter) as opened:
            assert opened.by_libpcap
            return _by_iteration(opened)

    ours = {(c, f): frames(c, f) for f in filters for c in captures}
    assert len(libpcap._COMPILED) <= libpcap.MAX_COMPILED
    monkeypatch.setattr(bpf, "set_filter", _pcapys_setfilter)
    theirs = {(c, f): frames(c, f) for f in filters for c in captures}
    assert ours == theirs
    assert any(ours.values()) and len({len(v) for v in ours.values()}) > 2


def _filtered(capture: str, expression: str) -> list:
    """The frames libpcap passes through ``expression`` set by set_filter."""
    handle = pcapy.open_offline(capture)
    try:
        libpcap.set_filter(handle, expression)
        frames = []
        while True:
            header, data = handle.next()
            if header is None:
                return frames
            frames.append(bytes(data))
    finally:
        handle.close()


def _cached_programs(directory: Path) -> list[Path]:
    return sorted(directory.glob(libpcap.PROGRAM_PREFIX + "*"))


@pytest.fixture
def program_cache(tmp_path, monkeypatch):
    """An empty cache directory of the test's own, and no program compiled in this process."""
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("PURGE_SENSOR_CACHE_DIR", str(directory))
    monkeypatch.setattr(libpcap, "_COMPILED", type(libpcap._COMPILED)())
    return directory


@requires_libpcap_calls
def test_a_compiled_filter_is_reused_by_the_next_start(program_cache, monkeypatch):
    """The program compiled by one start is installed by the next (a process with nothing
    compiled) without compiling it again, and passes the same frames."""
    capture = str(ROOT / "pcaps" / "demo.pcap")
    expression = bpf.build_filter(None, 1)
    compiled = _filtered(capture, expression)
    assert len(_cached_programs(program_cache)) == 1
    libpcap._COMPILED.clear()

    def no_compiling(found, expression):
        raise AssertionError("compiled again")

    monkeypatch.setattr(libpcap, "_compile", no_compiling)
    assert _filtered(capture, expression) == compiled and compiled


@requires_libpcap_calls
@pytest.mark.parametrize("damage", ["empty", "short", "trailing", "jump_out", "other_writable", "symlink"])
def test_a_damaged_or_foreign_cached_program_is_compiled_again(program_cache, damage):
    """A cached program libpcap refuses (validated as it is set: one instruction short, a
    jump out of it), a file that is not whole instructions, or one the user does not alone
    own is passed over: the filter is compiled and stored again, and passes the frames it
    passes uncached."""
    capture = str(ROOT / "pcaps" / "demo.pcap")
    expression = bpf.build_filter(None, 1)
    expected = _filtered(capture, expression)
    (cached,) = _cached_programs(program_cache)
    good = cached.read_bytes()
    if damage == "empty":
        cached.write_bytes(b"")
    elif damage == "short":
        cached.write_bytes(good[:-8])
    elif damage == "trailing":
        cached.write_bytes(good + b"\x00\x00\x00")
    elif damage == "jump_out":  # ja past the end: bpf_validate refuses it
        cached.write_bytes(struct.pack("=HBBI", 0x05, 0, 0, 1000) + good[8:])
    elif damage == "other_writable":  # a program passing everything, writable by others
        cached.write_bytes(struct.pack("=HBBI", 0x06, 0, 0, 262144))
        cached.chmod(0o666)
    else:
        elsewhere = program_cache.parent / "elsewhere"
        elsewhere.write_bytes(struct.pack("=HBBI", 0x06, 0, 0, 262144))
        cached.unlink()
        cached.symlink_to(elsewhere)
    libpcap._COMPILED.clear()
    assert _filtered(capture, expression) == expected
    assert _cached_programs(program_cache) == [cached] and cached.read_bytes() == good
    assert not cached.is_symlink() and cached.stat().st_mode & 0o077 == 0


@requires_libpcap_calls
def test_the_cached_program_is_named_by_all_it_was_compiled_from(program_cache, monkeypatch):
    """Another expression, link type, snap length or libpcap version is another program."""
    demo = (ROOT / "pcaps" / "demo.pcap").read_bytes()
    short = program_cache.parent / "short_snap.pcap"
    short.write_bytes(demo[:16] + struct.pack("<I", 128) + demo[20:])
    expression = bpf.build_filter(None, 1)
    _filtered(str(ROOT / "pcaps" / "demo.pcap"), expression)
    _filtered(str(ROOT / "pcaps" / "demo.pcap"), expression + " and len > 60")
    _filtered(str(ROOT / "pcaps" / "linux_sll.pcap"), bpf.build_filter(None, 113))
    libpcap._COMPILED.clear()
    _filtered(str(short), expression)
    assert len(_cached_programs(program_cache)) == 4
    libpcap._COMPILED.clear()
    monkeypatch.setattr(libpcap._libraries().libpcap, "pcap_lib_version", lambda: b"libpcap version 0.0")
    _filtered(str(short), expression)
    assert len(_cached_programs(program_cache)) == 5


@requires_libpcap_calls
def test_without_a_cache_directory_nothing_is_written(program_cache, monkeypatch):
    monkeypatch.setenv("PURGE_SENSOR_CACHE_DIR", "")
    capture = str(ROOT / "pcaps" / "demo.pcap")
    assert _filtered(capture, bpf.build_filter(None, 1))
    assert not any(program_cache.iterdir())
