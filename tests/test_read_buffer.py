"""libpcap reads a large capture through a widened stdio buffer (capture.read_buffer), and
reads exactly the same frames as it does without one."""

from __future__ import annotations

import os
import random
import struct

import pytest

pcapy = pytest.importorskip("pcapy")

from sensor.capture import bpf, read_buffer  # noqa: E402
from sensor.capture.pcapfile import open_capture  # noqa: E402


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
        while written < read_buffer.MIN_CAPTURE_SIZE + read_buffer.READ_BUFFER:
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


def test_the_stream_reads_ahead_by_the_buffer(tmp_path):
    """The file's offset after the first frame shows how much stdio read in one go: the
    whole buffer once widened, a few pages otherwise."""
    path = tmp_path / "large.pcap"
    _large_capture(path)
    offsets = []
    for widen in (True, False):
        handle = pcapy.open_offline(str(path))
        kept = read_buffer.widen_read_buffer(handle) if widen else None
        assert (kept is not None) == widen
        _, meta = handle.next_batch(1)
        assert len(meta) == 16
        offsets.append(os.lseek(handle.getfd(), 0, os.SEEK_CUR))
        handle.close()
        del kept
    assert offsets[0] >= read_buffer.READ_BUFFER > offsets[1]


def test_a_pipe_and_a_small_capture_keep_libpcaps_buffer(tmp_path):
    """A nanosecond capture reaches libpcap through a pipe (PrologueFeed), which cannot
    move back to where stdio stands; a small one is not worth loading ctypes for."""
    path = tmp_path / "nano.pcap"
    _large_capture(path, units=1_000_000_000)
    with bpf.open_prefiltered(str(path)) as capture:
        assert capture.by_libpcap and capture._read_buffer is None
        assert read_buffer.widen_read_buffer(capture._handle) is None
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
        assert read_buffer.widen_read_buffer(Other(fh.fileno())) is None
