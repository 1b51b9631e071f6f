"""bench/field_variants.py: a capture rewritten as field captures differ (TCP timestamp
options, padding and a frame check sequence, reordering, retransmissions, a slower clock)
is what it says, and the sensor's filter costs no detection on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dpkt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import field_variants  # noqa: E402
import run as bench_run  # noqa: E402

DEMO = ROOT / "pcaps" / "demo.pcap"


def _frames(path: Path) -> list[tuple[float, bytes]]:
    with open(path, "rb") as handle:
        return list(dpkt.pcap.Reader(handle))


def _tcp_headers(frames):
    for _, frame in frames:
        eth = dpkt.ethernet.Ethernet(frame)
        ip = eth.data
        if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(ip.data, dpkt.tcp.TCP):
            yield ip, ip.data


def test_every_variant_at_once(tmp_path):
    out = tmp_path / "field.pcap"
    assert field_variants.main([str(DEMO), str(out), "--tcp-timestamps", "--trailer",
                                "--reorder", "0.05", "--retransmit", "0.05", "--stretch", "3"]) == 0
    before, after = _frames(DEMO), _frames(out)
    assert len(after) > len(before)  # the retransmissions
    assert all(frame.endswith(field_variants.FRAME_CHECK_SEQUENCE) and len(frame) >= 64
               for _, frame in after)
    stamps = [ts for ts, _ in after]
    assert stamps == sorted(stamps)
    assert stamps[-1] - stamps[0] > 2.9 * (before[-1][0] - before[0][0])
    segments = list(_tcp_headers(after))
    bare = sum(tcp.off == 5 for _, tcp in _tcp_headers(before))
    assert bare and all(tcp.off > 5 for _, tcp in segments)
    assert sum(field_variants.TIMESTAMP_OPTION in bytes(tcp.opts) for _, tcp in segments) >= bare
    originals = {bytes(tcp.data) for _, tcp in _tcp_headers(before)}
    assert {bytes(tcp.data) for _, tcp in segments} == originals

    alerts = {}
    for name, flags in (("filtered", []), ("plain", ["--no-bpf-prefilter"])):
        sink = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "-m", "sensor.cli", "read", "-q", "--no-state", *flags,
                        "-o", f"file:{sink}", str(out)], check=True, cwd=ROOT, timeout=120)
        alerts[name] = bench_run.alerts_of(sink)
    assert sum(alerts["filtered"].values()) > 0
    assert alerts["filtered"] == alerts["plain"]


def test_a_capture_it_cannot_rewrite_is_refused(tmp_path):
    out = tmp_path / "out.pcap"
    assert field_variants.main([str(ROOT / "pcaps" / "linux_sll.pcap"), str(out)]) == 2



def test_link_types_carry_the_same_packets(tmp_path):
    """``--link``: each frame as Linux cooked v1 and v2 carry it (the sender's address, the
    type field, then what followed it, tags included) or as the bare IP packet, and the
    same alerts as the Ethernet capture."""
    ethernet = [frame for _, frame in _frames(DEMO)]
    packets = [bytes(dpkt.ethernet.Ethernet(frame).data) for frame in ethernet
               if isinstance(dpkt.ethernet.Ethernet(frame).data, (dpkt.ip.IP, dpkt.ip6.IP6))]
    expected = None
    for link in ("ethernet", "sll", "sll2", "raw"):
        out = tmp_path / f"{link}.pcap"
        assert field_variants.main([str(DEMO), str(out), "--link", link]) == 0
        with open(out, "rb") as handle:
            pcap = dpkt.pcap.Reader(handle)
            assert pcap.datalink() == field_variants.LINKTYPES[link]
            frames = [frame for _, frame in pcap]
        if link == "sll":
            assert [(f[6:12], f[14:]) for f in frames] == [(e[6:12], e[12:]) for e in ethernet]
        elif link == "sll2":
            assert [(f[12:18], f[:2], f[20:]) for f in frames] == [(e[6:12], e[12:14], e[14:]) for e in ethernet]
        elif link == "raw":
            assert frames == packets and packets
        sink = tmp_path / f"{link}.json"
        subprocess.run([sys.executable, "-m", "sensor.cli", "read", "-q", "--no-state",
                        "-o", f"file:{sink}", str(out)], check=True, cwd=ROOT, timeout=120)
        alerts = bench_run.alerts_of(sink)
        assert sum(alerts.values()) > 0
        expected = expected or alerts
        assert alerts == expected, link
