"""``purge-sensor run`` on a real interface finds what ``read`` finds in the same capture.

Root only: two private network namespaces joined by a veth pair (bench/veth.py); tcpreplay
sends a sample capture into one end, the sensor captures on the other with the kernel BPF
prefilter, and is stopped with SIGTERM.  Its alerts ((action, host.ip, destination.domain)
multiset) and its inventory (verdicts, evidence, indicators; not the times, which are the
replay's) must equal those of ``read``.  Nothing is routed: neither end has an address.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import veth  # noqa: E402

pytest.importorskip("pcapy")
if veth.available():
    pytest.skip(veth.available(), allow_module_level=True)

CAPTURES = ["demo.pcap", "vlan_qinq.pcap", "tls_ooo.pcap", "dns_tcp.pcap", "ipv6.pcap",
            "vxlan.pcap", "duplicates.pcap", "erspan2.pcap", "tcp_fast_open.pcap", "ip_options.pcap",
            "registered_ports.pcap", "erspan3.pcap", "geneve.pcap", "gre.pcap", "mpls.pcap", "pppoe.pcap",
            "ip_fragments.pcap", "quic_v1.pcap", "hostile_names.pcap"]
PPS = 400
TIME_KEYS = ("first_seen", "last_seen", "detected_at", "first_seen_ts", "last_seen_ts", "state")


def _sensor(*args: str) -> list[str]:
    return [sys.executable, "-m", "sensor.cli", *args]


def _alerts(path: Path) -> Counter:
    keys = Counter()
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        keys[(doc["event"]["action"], doc.get("host", {}).get("ip"),
              doc.get("destination", {}).get("domain"))] += 1
    return keys


def _hosts(state: Path) -> list[dict]:
    out = subprocess.run(_sensor("hosts", "--state", str(state), "--format", "json", "--all"),
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    hosts = json.loads(out)
    for host in hosts:
        for key in TIME_KEYS:
            host.pop(key, None)
    return sorted(hosts, key=lambda h: json.dumps(h, sort_keys=True))


def _read(capture: Path, tmp: Path):
    alerts, state = tmp / "read.json", tmp / "read.sqlite"
    subprocess.run(_sensor("read", "-q", "--state", str(state), "-o", f"file:{alerts}", str(capture)),
                   cwd=ROOT, check=True, capture_output=True)
    return _alerts(alerts), _hosts(state)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 30.0) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"sensor did not say {text!r}: {''.join(seen)}")


def _live(capture: Path, tmp: Path, *options: str, while_capturing=None, pps: int | None = PPS,
          interface: str | None = None):
    """(alerts, inventory, stderr from the stop line on) of ``run *options`` fed ``capture``.

    ``while_capturing(proc, line)`` is called once the sensor said it captures, before
    the replay.  ``pps=None`` replays at the capture's own pace.  ``interface`` replaces
    the receiving end (``any``: every interface of its namespace, Linux cooked)."""
    alerts, state = tmp / "live.json", tmp / "live.sqlite"
    with veth.veth_pair(f"t{os.getpid() % 10000}") as (tx_ns, tx_if, rx_ns, rx_if):
        proc = subprocess.Popen(
            veth.in_netns(rx_ns, _sensor("run", "-i", interface or rx_if, "--state", str(state), "-o", f"file:{alerts}",
                                         "--metrics", "127.0.0.1:0", "--status-interval", "1", *options)),
            cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            started = _wait_for(proc, "capturing on")
            if while_capturing is not None:
                while_capturing(proc, started)
            pace = [f"--pps={pps}"] if pps else []
            sent = subprocess.run(veth.in_netns(tx_ns, ["tcpreplay", f"--intf1={tx_if}", *pace, str(capture)]),
                                  check=True, capture_output=True, text=True, timeout=120)
            # A frame tcpreplay cannot send (one above the veth's MTU) fails with exit status 0.
            assert veth.failed_packets(sent.stdout) == 0, sent.stdout + sent.stderr
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            last = _wait_for(proc, "stopped:")
            tail = last + proc.stderr.read()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert " 0 dropped by kernel" in last, last
    return _alerts(alerts), _hosts(state), tail


@pytest.mark.parametrize("name", CAPTURES)
def test_live_capture_equals_read(tmp_path, name):
    capture = ROOT / "pcaps" / name
    read_alerts, read_hosts = _read(capture, tmp_path)
    live_alerts, live_hosts, _ = _live(capture, tmp_path)
    assert read_alerts, "the sample must produce detections"
    assert live_alerts == read_alerts
    assert live_hosts == read_hosts


def _tagged(source: Path, out: Path, vlan: int = 30) -> Path:
    """``source``'s untagged frames behind one 802.1Q tag, as a trunk port mirrors them
    (frames tagged already are kept as they are: a second tag would make them QinQ)."""
    import dpkt

    with source.open("rb") as src, out.open("wb") as dst:
        writer = dpkt.pcap.Writer(dst)
        for ts, frame in dpkt.pcap.Reader(src):
            if frame[12:14] not in (b"\x81\x00", b"\x88\xa8", b"\x91\x00"):
                frame = frame[:12] + b"\x81\x00" + vlan.to_bytes(2, "big") + frame[12:]
            writer.writepkt(frame, ts)
    return out


@pytest.mark.parametrize("name", ["demo.pcap", "tagged", "vxlan.pcap"])
def test_live_capture_on_any_equals_read(tmp_path, name):
    """``run -i any`` captures Linux cooked frames (SLL): the kernel takes a VLAN tag off
    and libpcap puts it back behind the cooked header's type field, where the decoder
    reads it; the kernel's filter met the frame without it.  The alerts are ``read``'s of
    the Ethernet capture.  (QinQ is left out: on ``any`` the kernel
    hands the inner tag over behind a type field that says IPv4, which no reader can
    follow; capture on the interface itself, as test_live_capture_equals_read does.)"""
    capture = ROOT / "pcaps" / name if name != "tagged" else _tagged(ROOT / "pcaps" / "demo.pcap",
                                                                       tmp_path / "tagged.pcap")
    read_alerts, _ = _read(capture, tmp_path)
    live_alerts, _, _ = _live(capture, tmp_path, interface="any")
    assert read_alerts and live_alerts == read_alerts


def test_live_capture_of_a_frame_as_large_as_gro_makes_equals_read(tmp_path):
    """A capture taken on a host with GRO holds frames of tens of kilobytes: here an HTTP
    request head and its body in one 30 KB frame.  The veth carries it (bench/veth.MTU)
    and the sensor captures it whole, as ``read`` sees it."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    eth = Ether(src="02:00:00:00:00:05", dst="02:00:00:00:00:01")
    client, server = "10.30.0.7", "198.51.100.9"
    head = b"POST /diffs HTTP/1.1\r\nHost: s07.upd.kaspersky.com\r\nContent-Length: 30000\r\n\r\n"
    packets = [eth / IP(src=client, dst=server) / TCP(sport=40000, dport=80, flags="S", seq=999),
               eth / IP(src=client, dst=server) / TCP(sport=40000, dport=80, flags="PA", seq=1000)
               / Raw(head + b"x" * 30000)]
    for i, packet in enumerate(packets):
        packet.time = 1_700_000_000 + 0.1 * i
    capture = tmp_path / "gro.pcap"
    wrpcap(str(capture), packets)
    read_alerts, read_hosts = _read(capture, tmp_path)
    live_alerts, live_hosts, _ = _live(capture, tmp_path)
    assert ("http_host", client, "s07.upd.kaspersky.com") in read_alerts
    assert live_alerts == read_alerts and live_hosts == read_hosts


def test_sighup_reloads_and_keeps_the_old_set_when_the_new_one_is_invalid(tmp_path):
    import shutil

    signatures = tmp_path / "signatures"
    shutil.copytree(ROOT / "signatures", signatures)
    with veth.veth_pair(f"h{os.getpid() % 10000}") as (_tx_ns, _tx_if, rx_ns, rx_if):
        proc = subprocess.Popen(
            veth.in_netns(rx_ns, _sensor("run", "-i", rx_if, "--no-state", "-s", str(signatures),
                                         "-o", f"file:{tmp_path / 'a.json'}",
                                         "--metrics", "127.0.0.1:0", "--status-interval", "60")),
            cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(proc, "capturing on")
            proc.send_signal(signal.SIGHUP)
            _wait_for(proc, "reloaded")
            victim = sorted(signatures.glob("*.yaml"))[0]
            victim.write_text("indicators: [\n")
            proc.send_signal(signal.SIGHUP)
            line = _wait_for(proc, "reload failed")
            assert victim.name in line
            proc.send_signal(signal.SIGTERM)
            _wait_for(proc, "stopped:")
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# A user filter that passes every frame and compiles to more instructions than the
# kernel takes (BPF_MAXINSNS, 4,096): two per length test, after the sensor's own ~1,500.
EVERY_FRAME_TOO_LONG = " and ".join(f"len != {100_000 + n}" for n in range(1_600))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_filter_the_kernel_refuses_runs_in_user_space_and_says_so(tmp_path, workers):
    """libpcap filters in user space when the kernel refuses the program and says only
    "Kernel filter failed".  The sensor names the interface in a warning at the start and
    in every status line, and still finds what ``read`` finds."""
    capture = ROOT / "pcaps" / "demo.pcap"
    read_alerts, read_hosts = _read(capture, tmp_path)
    seen = {}

    def warning(proc, started):
        seen["interface"] = started.split("capturing on ")[1].split(";")[0].split()[0]
        seen["warning"] = _wait_for(proc, "refused the capture filter")

    live_alerts, live_hosts, tail = _live(capture, tmp_path, "--bpf", EVERY_FRAME_TOO_LONG,
                                          "--workers", workers, while_capturing=warning)
    assert f"capture filter on {seen['interface']};" in seen["warning"]
    assert f"filter in user space on {seen['interface']}\n" in tail
    assert live_alerts == read_alerts and live_hosts == read_hosts


def test_the_status_line_says_nothing_of_a_filter_the_kernel_takes(tmp_path):
    _, _, tail = _live(ROOT / "pcaps" / "tls_ooo.pcap", tmp_path)
    assert "stopped:" in tail and "user space" not in tail


def answer_then_udp_flows(path: Path) -> None:
    """The internal resolver gets an upstream answer for a Kaspersky update name; then one
    client sends QUIC (long header, which the capture filter passes) to the answered
    address and another sends plain UDP on a port the filter does not know."""
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    resolver, upstream, server = "10.20.0.53", "192.0.2.53", "198.51.100.77"
    eth = Ether(src="02:00:00:00:00:05", dst="02:00:00:00:00:01")
    query = eth / IP(src=resolver, dst=upstream) / UDP(sport=53001, dport=53) / DNS(
        id=7, rd=1, qd=DNSQR(qname="dnl-01.geo.kaspersky.com"))
    answer = eth / IP(src=upstream, dst=resolver) / UDP(sport=53, dport=53001) / DNS(
        id=7, qr=1, rd=1, ra=1, qd=DNSQR(qname="dnl-01.geo.kaspersky.com"),
        an=DNSRR(rrname="dnl-01.geo.kaspersky.com", type="A", ttl=300, rdata=server))
    packets = [query, answer]
    for i in range(4):
        packets.append(eth / IP(src="10.20.0.6", dst=server) / UDP(sport=41001, dport=443)
                       / (bytes.fromhex("c300000001") + bytes(40)))
        packets.append(eth / IP(src="10.20.0.5", dst=server) / UDP(sport=41000, dport=38211) / (b"\x01" * 40))
    for i, packet in enumerate(packets):
        packet.time = 1_700_000_000 + 0.2 * i
    wrpcap(str(path), packets)


UDP_FLOW_EXPECTED = ("dns_answer_flow", "10.20.0.6", "dnl-01.geo.kaspersky.com")
UDP_FLOW_NEVER = ("dns_answer_flow", "10.20.0.5", "dnl-01.geo.kaspersky.com")


def test_udp_flows_to_an_answered_address_read_and_run_agree(tmp_path):
    """A UDP flow starts with a packet the capture filter passes on its own (here QUIC's
    long header), so read, read --no-bpf-prefilter and run judge UDP flows alike."""
    capture = tmp_path / "answer_udp.pcap"
    answer_then_udp_flows(capture)
    unfiltered = tmp_path / "plain.json"
    subprocess.run(_sensor("read", "-q", "--no-state", "--no-bpf-prefilter", "-o", f"file:{unfiltered}",
                           str(capture)), cwd=ROOT, check=True, capture_output=True)
    plain = _alerts(unfiltered)
    assert UDP_FLOW_EXPECTED in plain and UDP_FLOW_NEVER not in plain
    read_alerts, read_hosts = _read(capture, tmp_path)
    live_alerts, live_hosts, _ = _live(capture, tmp_path)
    assert read_alerts == plain
    assert live_alerts == read_alerts and live_hosts == read_hosts
