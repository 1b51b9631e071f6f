"""The capture filter must not cost detections, and must drop what cannot carry evidence.

The equivalence proof runs ``purge-sensor read`` with its default prefilter and with
``--no-bpf-prefilter`` (every packet decoded) over
every capture in pcaps/ (and a slice of the benchmark mix) and compares the alerts'
(action, host.ip, destination.domain) multisets and the ``hosts --format json`` inventory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pcapy = pytest.importorskip("pcapy")

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop  # noqa: E402
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402
from scapy.utils import wrpcap, wrpcapng  # noqa: E402

from sensor.capture import bpf  # noqa: E402
from sensor.capture.pcapfile import open_capture  # noqa: E402
from sensor.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PCAPS = sorted(p for p in (ROOT / "pcaps").iterdir() if p.suffix in (".pcap", ".pcapng"))


def _alerts_and_hosts(tmp_path: Path, capture: Path, capsys, *extra: str):
    run = tmp_path / ("plain" if "--no-bpf-prefilter" in extra else "filtered")
    run.mkdir()
    alerts = run / "alerts.json"
    state = run / "state.sqlite"
    main(["read", "-q", "--state", str(state), "-o", f"file:{alerts}", *extra, str(capture)])
    capsys.readouterr()
    keys = Counter()
    for line in alerts.read_text().splitlines():
        doc = json.loads(line)
        keys[(doc["event"]["action"], doc.get("host", {}).get("ip"),
              doc.get("destination", {}).get("domain"))] += 1
    assert main(["hosts", "--state", str(state), "--format", "json", "--all"]) == 0
    hosts = json.loads(capsys.readouterr().out)
    return keys, hosts


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


def test_prefiltered_reader_matches_python_reader_with_the_same_filter():
    """libpcap path (classic pcap) and per-packet path (pcapng) yield what the compiled
    filter admits, with identical timestamps."""
    for capture in PCAPS:
        if capture.name == "bsd_loopback.pcap":
            continue  # libpcap byte-swaps the family first; the per-packet path passes it whole
        program = bpf.LinktypeFilters(None)
        with open_capture(str(capture)) as cap:
            expected = [r for r in cap if program.admits(r[1], r[2])]
        with bpf.open_prefiltered(str(capture)) as cap:
            got = list(cap)
        assert [(r[0], r[1], r[2]) for r in got] == [(r[0], r[1], r[2]) for r in expected], capture.name


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
    return bytes(eth / l3_l4)


def _ip(v6: bool, to_server: bool):
    src, dst = (CLIENT6, SERVER6) if v6 else (CLIENT4, SERVER4)
    if not to_server:
        src, dst = dst, src
    return IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)


CASES = {
    # name: (builder(v6, to_server) -> layers, passes)
    "syn": (lambda v6: _ip(v6, True) / TCP(sport=51000, dport=443, flags="S"), True),
    "fin_from_server": (lambda v6: _ip(v6, False) / TCP(sport=443, dport=51000, flags="FA"), True),
    "client_hello_first_segment": (lambda v6: _ip(v6, True) / TCP(sport=51000, dport=443, flags="A")
                                   / Raw(b"\x16\x03\x01\x07\x00\x01" + bytes(1400)), True),
    "client_hello_continuation": (lambda v6: _ip(v6, True) / TCP(sport=51000, dport=443, flags="A")
                                  / Raw(bytes(range(256)) * 5), True),
    "hello_from_low_client_port": (lambda v6: _ip(v6, True) / TCP(sport=1000, dport=8443, flags="PA")
                                   / Raw(b"\x16\x03\x01\x02\x00\x01" + bytes(500)), True),
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


@pytest.mark.parametrize("vlan", [0, 1, 2], ids=["untagged", "vlan", "qinq"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_filter_decisions(case, v6, vlan):
    build, passes = CASES[case]
    program = bpf.compile_filter(None)
    assert bool(program.filter(_frame(build(v6), vlan))) is passes


def test_ipv6_extension_headers_and_fragments_pass_whole():
    program = bpf.compile_filter(None)
    hop = IPv6(src=SERVER6, dst=CLIENT6) / IPv6ExtHdrHopByHop() / TCP(sport=443, dport=5, flags="A") / Raw(bytes(100))
    assert program.filter(_frame(hop))
    frag = IP(src=SERVER4, dst=CLIENT4, flags="MF") / TCP(sport=443, dport=51000, flags="A") / Raw(bytes(100))
    assert program.filter(_frame(frag))


def test_filter_covers_every_port_the_decoder_and_tracker_use():
    from sensor.decode.packet import DHCP_PORTS, DNS_PORTS
    from sensor.decode.tunnels import GENEVE_PORT, VXLAN_PORT
    from sensor.track.tracker import KSC_UDP_PORTS

    covered = set(bpf.UDP_PORTS)
    for lo, hi in bpf.UDP_PORT_RANGES:
        covered.update(range(lo, hi + 1))
    assert set(DNS_PORTS) | set(DHCP_PORTS) | set(KSC_UDP_PORTS) | {VXLAN_PORT, GENEVE_PORT} <= covered


@pytest.mark.parametrize("linktype", [0, 1, 101, 113, 228, 229, 276])
def test_filter_compiles_for_every_link_type_the_decoder_reads(linktype):
    bpf.compile_filter(None, bpf.dlt_for(linktype))
    bpf.compile_filter("tcp port 443", bpf.dlt_for(linktype))


# -- the watch list: UDP towards addresses from Kaspersky DNS answers --------------------

WATCHED4, UNWATCHED4 = "198.51.100.7", "198.51.100.8"
WATCHED6, UNWATCHED6 = "2001:db8:5:6::7", "2001:db8:5:7::7"  # another /64


def _udp_to(dst: str, sport: int = 51000, dport: int = 38211):
    ip = IPv6(src=CLIENT6, dst=dst) if ":" in dst else IP(src=CLIENT4, dst=dst)
    return ip / UDP(sport=sport, dport=dport) / Raw(b"\x17" + bytes(99))


@pytest.mark.parametrize("vlan", [0, 1, 2], ids=["untagged", "vlan", "qinq"])
@pytest.mark.parametrize("watched,unwatched", [(WATCHED4, UNWATCHED4), (WATCHED6, UNWATCHED6)],
                         ids=["ipv4", "ipv6"])
def test_udp_to_a_watched_address_passes_on_any_port(watched, unwatched, vlan):
    program = bpf.compile_filter(None, watch=[UNWATCHED4 if ":" in watched else UNWATCHED6, watched])
    assert program.filter(_frame(_udp_to(watched), vlan))
    assert program.filter(_frame(_udp_to(watched, 1234, 65000), vlan))
    assert not program.filter(_frame(_udp_to(unwatched), vlan))
    assert not bpf.compile_filter(None).filter(_frame(_udp_to(watched), vlan))
    answer = _frame(_ip(":" in watched, False) / UDP(sport=38211, dport=51000) / Raw(bytes(100)), vlan)
    assert not program.filter(answer), "only the direction towards the watched address passes"


def test_watch_list_keeps_the_newest_within_the_budget_and_counts_the_rest():
    oldest = [f"10.200.{i >> 8}.{i & 255}" for i in range(200)]
    watch, left_out = bpf.watch_list(oldest + ["2001:db8::1", "2001:db8::2", "10.200.0.5"])
    # 10.200.0.5 and the /64 cost 1 + 5; the rest goes to the newest of the 200, and the
    # old entry of 10.200.0.5 is not counted as left out since it is watched.
    assert left_out == 200 - (bpf.WATCH_BUDGET - 6) - 1
    assert "10.200.0.5" in watch and "10.200.0.4" not in watch and oldest[-1] in watch
    assert "2001:db8::1" in watch and "2001:db8::2" in watch  # one /64, paid once
    assert list(watch) == sorted(watch, key=lambda a: (":" in a, ipaddress.ip_address(a)))
    assert bpf.watch_list(["2001:DB8::0:1", "2001:db8::1"]) == (("2001:db8::1",), 0)


def _worst_case_watch_lists():
    rng = random.Random(4096)
    ipv4 = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(2 * bpf.WATCH_BUDGET)]
    ipv6 = [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(2 * bpf.WATCH_BUDGET)]
    return {"ipv4": ipv4, "ipv6": ipv6, "mixed": [a for pair in zip(ipv4, ipv6) for a in pair]}


@pytest.mark.parametrize("kind", ["ipv4", "ipv6", "mixed"])
def test_worst_case_watch_list_stays_under_the_kernel_limit(kind, tmp_path):
    """4096 is the kernel's BPF_MAXINSNS; past it libpcap silently filters in user space.

    The live program is the larger one: libpcap reads the outer VLAN tag from kernel
    metadata there, so it is also compiled for the loopback interface when possible."""
    addresses = _worst_case_watch_lists()[kind]
    watch, left_out = bpf.watch_list(addresses)
    assert left_out and len(watch) < len(addresses)
    offline = bpf.compile_filter(None, watch=addresses).get_bpf()
    assert len(offline) < 4096
    assert len(offline) > len(bpf.compile_filter(None).get_bpf()) + len(watch)
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None or os.geteuid() != 0:
        pytest.skip("the live program needs tcpdump and root")
    expression = tmp_path / "filter"
    expression.write_text(bpf.build_filter(None, watch=addresses))
    out = subprocess.run([tcpdump, "-d", "-i", "lo", "-F", str(expression)],
                         capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) < 4096


@pytest.mark.parametrize("bad", ["10.0.0.1 or tcp", "10.0.0.256", "fe80::1%eth0", "", 167772161, None])
def test_a_watch_address_that_is_not_an_address_is_refused(bad):
    with pytest.raises(ValueError):
        bpf.build_filter(None, watch=["10.0.0.1", bad])
    with bpf.open_prefiltered(str(ROOT / "pcaps" / "demo.pcap")) as cap:
        with pytest.raises(ValueError):
            cap.set_watch([bad])


def test_watch_updates_recompile_only_for_new_addresses_and_not_too_often():
    updates = bpf.WatchUpdates(min_gap=100)
    assert updates.due([], 0) is None
    assert updates.due([WATCHED4], 0) == (WATCHED4,)
    assert updates.due([WATCHED4, UNWATCHED4], 99) is None, "within the gap"
    assert updates.due([WATCHED4], 150) is None, "nothing new"
    assert updates.due([], 150) is None, "an address that expired stays watched"
    assert updates.due([WATCHED4, UNWATCHED4], 150) == (WATCHED4, UNWATCHED4)
    assert updates.due([WATCHED6], 250) == (WATCHED6,), "the tracker's list replaces the old one"


def _interleaved_capture(path: Path, pcapng: bool) -> list[bytes]:
    """DNS queries (always pass) alternating with UDP to WATCHED4 on port 40000+i."""
    frames = []
    for i in range(1500):
        frames.append(_frame(_ip(False, True) / UDP(sport=52000, dport=53) / Raw(i.to_bytes(2, "big") + bytes(28))))
        frames.append(_frame(_udp_to(WATCHED4, dport=40000 + i)))
    packets = [Ether(f) for f in frames]
    for i, packet in enumerate(packets):
        packet.time = 1_700_000_000 + i / 1000
    (wrpcapng if pcapng else wrpcap)(str(path), packets)
    return frames


def test_set_watch_applies_from_the_next_libpcap_batch(tmp_path):
    """The first next_batch call already filtered BATCH DNS queries, reading ahead over
    the UDP packets between them; those are gone, the next batch has the new filter."""
    capture = tmp_path / "interleaved.pcap"
    frames = _interleaved_capture(capture, pcapng=False)
    with bpf.open_prefiltered(str(capture)) as cap:
        records = iter(cap)
        first = next(records)
        assert cap.set_watch([UNWATCHED4, WATCHED4]) is True
        assert cap.set_watch([UNWATCHED4, WATCHED4, "192.0.2.1"]) is False, "rate-limited"
        got = [first[2]] + [r[2] for r in records]
    last_read_ahead = 2 * bpf.BATCH - 2  # index of the batch's last DNS query
    expected = [f for i, f in enumerate(frames) if i % 2 == 0 or i > last_read_ahead]
    assert got == expected


def test_set_watch_applies_from_the_next_packet_on_the_per_packet_path(tmp_path):
    capture = tmp_path / "interleaved.pcapng"
    frames = _interleaved_capture(capture, pcapng=True)
    with bpf.open_prefiltered(str(capture)) as cap:
        records = iter(cap)
        first = next(records)
        assert cap.set_watch([WATCHED4]) is True
        got = [first[2]] + [r[2] for r in records]
    assert got == frames, "the UDP packet right after the update passes"


def test_a_udp_flow_to_an_answered_address_is_found_through_the_watch_list(tmp_path):
    """End to end: the tracker's answer addresses widen the filter, and the flow to one of
    them on a port nothing else passes becomes ``dns_answer_flow`` evidence."""
    from scapy.layers.dns import DNS, DNSQR, DNSRR

    from sensor.config import Settings
    from sensor.pipeline import Sensor

    resolver, asker, flower = "10.1.2.53", "10.1.2.50", "10.1.2.3"
    answer = (IP(src=resolver, dst=asker) / UDP(sport=53, dport=52000)
              / DNS(id=7, qr=1, qd=DNSQR(qname="ds.kaspersky.com"),
                    an=DNSRR(rrname="ds.kaspersky.com", type="A", ttl=300, rdata=WATCHED4)))
    flow = IP(src=flower, dst=WATCHED4) / UDP(sport=51000, dport=38211) / Raw(bytes(64))
    packets = [Ether(_frame(answer)), Ether(_frame(flow))]
    for i, packet in enumerate(packets):
        packet.time = 1_700_000_000 + i
    capture = tmp_path / "answer_then_udp.pcapng"
    wrpcapng(str(capture), packets)
    sensor = Sensor(Settings(no_state=True, outputs=[f"file:{tmp_path / 'alerts.json'}"]))
    try:
        with bpf.open_prefiltered(str(capture)) as cap:
            for ts, linktype, data, wire_len, iface in cap:
                sensor.handle(ts, linktype, data, wire_len, iface)
                cap.set_watch(sensor.tracker.answer_addresses)
        assert sensor.tracker.answer_addresses == [WATCHED4]
        assert sum(n for (action, _), n in sensor.stats.detections.items()
                   if action == "dns_answer_flow") == 1
    finally:
        sensor.close()


def test_answer_addresses_leave_out_expired_answers():
    from sensor.config import Settings
    from sensor.pipeline import Sensor

    sensor = Sensor(Settings(no_state=True, outputs=["stdout"]))
    try:
        from scapy.layers.dns import DNS, DNSQR, DNSRR

        def answer(ts, ttl, address):
            msg = (IP(src="10.1.2.53", dst="10.1.2.50") / UDP(sport=53, dport=52000)
                   / DNS(id=ts & 0xFFFF, qr=1, qd=DNSQR(qname="ds.kaspersky.com"),
                         an=DNSRR(rrname="ds.kaspersky.com", type="A", ttl=ttl, rdata=address)))
            sensor.handle(float(ts), 1, _frame(msg), 100)

        answer(1000, 10, "198.51.100.1")
        answer(1001, 3600, "198.51.100.2")
        assert sensor.tracker.answer_addresses == ["198.51.100.1", "198.51.100.2"]
        answer(1000 + 10 + 300 + 1, 3600, "198.51.100.3")  # past the first one's TTL + grace
        assert sensor.tracker.answer_addresses == ["198.51.100.2", "198.51.100.3"]
    finally:
        sensor.close()
