"""The sample captures in pcaps/: reproducible, small, and holding what pcaps/README.md says.

The content checks use tshark as an independent reader, so a capture that only our own
decoder could make sense of (a wrong checksum, a malformed header) fails here rather than
silently shaping the differential test.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import load_make_samples

ROOT = Path(__file__).resolve().parents[1]
PCAPS = ROOT / "pcaps"


make_samples = load_make_samples()
SAMPLES = {sample.filename: sample for sample in make_samples.SAMPLES}
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
TSHARK_OPTIONS = ("-n", "-o", "tcp.desegment_tcp_streams:TRUE", "-o", "tls.desegment_ssl_records:TRUE",
                  "-o", "tcp.reassemble_out_of_order:TRUE", "-d", "tcp.port==13000,tls")
FIELD_KINDS = (("dns.qry.name", "dns"), ("tls.handshake.extensions_server_name", "tls_sni"),
               ("http.host", "http_host"))


@pytest.fixture(scope="module")
def built():
    return make_samples.build_all()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_regenerating_gives_byte_identical_files(tmp_path):
    subprocess.run([sys.executable, str(PCAPS / "make_samples.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    for filename in list(SAMPLES) + ["README.md"]:
        committed = PCAPS / filename
        assert committed.exists(), f"{filename} missing: run python3 pcaps/make_samples.py"
        assert sha256(tmp_path / filename) == sha256(committed), \
            f"{filename} differs from a fresh build: regenerate with python3 pcaps/make_samples.py"


def test_generator_is_deterministic_within_one_process(built):
    again = make_samples.build_all()
    assert {name: data for name, (data, _) in built.items()} == \
           {name: data for name, (data, _) in again.items()}


def test_folder_stays_small():
    captures = [p for p in PCAPS.iterdir() if p.suffix in (".pcap", ".pcapng")]
    assert sum(p.stat().st_size for p in captures) < 1_500_000
    assert all(p.stat().st_size < 800_000 for p in captures)


def test_readme_has_a_line_for_every_capture():
    readme = (PCAPS / "README.md").read_text()
    listed = re.findall(r"^- `([^`]+)`", readme, flags=re.M)
    for capture in PCAPS.iterdir():
        if capture.suffix in (".pcap", ".pcapng"):
            assert any(fnmatch.fnmatch(capture.name, pattern) for pattern in listed), capture.name
    for filename in SAMPLES:
        assert f"- `{filename}`:" in readme


def test_readme_names_only_what_the_capture_holds(built):
    readme = (PCAPS / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("- `lookalikes.pcap`"))
    assert line.endswith("Kaspersky names: none.")
    assert not any(make_samples.is_kaspersky_name(name) for _, name in built["lookalikes.pcap"][1])
    demo_line = next(l for l in readme.splitlines() if l.startswith("- `demo.pcap`"))
    for name in ("s07.upd.kaspersky.com", "dc1.ksn.kaspersky-labs.com", "activation-v2.kaspersky.com",
                 "ksn-ru-geo.kaspersky-labs.com", "dnl-03.geo.kaspersky.com",
                 "downloads.upd.kaspersky.com"):
        assert f"`{name}`" in demo_line


def test_is_kaspersky_name_is_label_aware():
    assert make_samples.is_kaspersky_name("s07.upd.kaspersky.com")
    assert make_samples.is_kaspersky_name("kaspersky.com")
    for name in make_samples.LOOKALIKES:
        assert not make_samples.is_kaspersky_name(name), name


def test_presentation_escapes_like_the_sensor():
    from sensor.records import DomainName

    for label in make_samples.HOSTILE_LABELS:
        name = DomainName((label, b"ksn", b"kaspersky-labs", b"com"))
        assert make_samples.presentation(name.labels) == name.text.lower()


# --------------------------------------------------------------------------- tshark reads them

def run_tshark(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TSHARK, "-r", str(path), *TSHARK_OPTIONS, *args],
                          capture_output=True, text=True, errors="replace", timeout=120)


def tshark_stderr(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without the banner tshark prints whenever it runs as root."""
    return [line for line in result.stderr.splitlines() if "Running as user" not in line]


def tshark_names(path: Path) -> set[tuple[str, str]]:
    fields = [arg for field, _ in FIELD_KINDS for arg in ("-e", field)]
    result = run_tshark(path, "-T", "fields", "-E", "separator=/t", "-E", "occurrence=a",
                        "-E", "aggregator=\x1f", *fields)
    names = set()
    for line in result.stdout.splitlines():
        for (_, kind), column in zip(FIELD_KINDS, line.split("\t")):
            for value in filter(None, column.split("\x1f")):
                value = value.lower()
                if kind == "http_host" and re.search(r":\d+$", value):
                    value = value.rsplit(":", 1)[0]
                if kind != "dns" and value.endswith("."):
                    value = value[:-1]
                names.add((kind, value))
    return names


@needs_tshark
@pytest.mark.parametrize("filename", list(SAMPLES))
def test_tshark_reads_the_capture_cleanly(filename):
    result = run_tshark(PCAPS / filename, "-T", "fields", "-e", "frame.number")
    if filename == "truncated.pcap":
        assert result.returncode != 0
        assert any("cut short in the middle of a packet" in line for line in tshark_stderr(result))
    else:
        assert result.returncode == 0, result.stderr
        assert tshark_stderr(result) == []
    assert result.stdout.count("\n") >= 5
    malformed = run_tshark(PCAPS / filename, "-Y", "_ws.malformed", "-T", "fields", "-e", "frame.number")
    if filename == "garbage.pcap":
        assert malformed.stdout.strip(), "garbage.pcap should contain frames tshark calls malformed"
    else:
        assert malformed.stdout.strip() == "", f"malformed frames in {filename}: {malformed.stdout}"


@needs_tshark
@pytest.mark.parametrize("filename", list(SAMPLES))
def test_tshark_sees_every_intended_name(filename, built):
    seen = tshark_names(PCAPS / filename)
    intended = set(built[filename][1])
    if SAMPLES[filename].exact:
        assert intended <= seen, sorted(intended - seen)
        assert seen == intended, f"names the generator did not mean to add: {sorted(seen - intended)}"
    else:
        plain = {(kind, name) for kind, name in intended if "\\" not in name}
        assert plain <= seen, sorted(plain - seen)
        assert any(make_samples.is_kaspersky_name(name) for _, name in seen)


def tshark_fields(path: Path, display_filter: str, *fields: str) -> list[list[str]]:
    args = ["-T", "fields", "-E", "separator=/t"]
    if display_filter:
        args += ["-Y", display_filter]
    for field in fields:
        args += ["-e", field]
    return [line.split("\t") for line in run_tshark(path, *args).stdout.splitlines()]


@needs_tshark
def test_demo_has_the_described_mix():
    demo = PCAPS / "demo.pcap"
    times = [float(row[0]) for row in tshark_fields(demo, "", "frame.time_epoch")]
    assert 1000 <= len(times) <= 3000
    assert 500 <= times[-1] - times[0] <= 660
    assert times == sorted(times)
    hostnames = {row[0] for row in tshark_fields(demo, "dhcp.option.hostname", "dhcp.option.hostname")}
    assert {"WS-ACCT-031", "WS-ACCT-032"} <= hostnames
    assert tshark_fields(demo, "dhcp.option.type == 81", "frame.number")
    vlan_hosts = {row[0] for row in tshark_fields(demo, "vlan.id == 20", "ip.src")}
    assert vlan_hosts == {"10.10.2.33", "10.10.0.53", "203.0.113.71", "203.0.113.72", "203.0.113.73",
                          "203.0.113.74", "203.0.113.80", "10.10.0.20"}
    forwarded = tshark_fields(demo, "ip.src == 10.10.0.53 && ip.dst == 203.0.113.53 && dns", "dns.qry.name")
    assert {"s07.upd.kaspersky.com", "github.com"} <= {row[0] for row in forwarded}
    cnames = tshark_fields(demo, 'dns.qry.name == "s07.upd.kaspersky.com" && dns.flags.response == 1',
                           "dns.cname")
    assert any("e7.cdn.example.net" in row[0] for row in cnames)
    big_hellos = tshark_fields(demo, "tls.handshake.type == 1 && tcp.reassembled.length > 1500",
                               "tls.handshake.extensions_server_name", "tcp.segment.count")
    assert {row[0] for row in big_hellos} >= {"s07.upd.kaspersky.com", "dc1.ksn.kaspersky-labs.com"}
    assert {row[1] for row in big_hellos} >= {"2", "3"}
    pq_shares = tshark_fields(demo, "tls.handshake.type == 1", "tls.handshake.extensions_key_share_group",
                              "tls.handshake.extensions_key_share_key_exchange_length")
    assert any("4588" in row[0] and "1216" in row[1] for row in pq_shares)
    ksc = tshark_fields(demo, "ip.dst == 10.10.0.20 && tls.handshake.type == 1",
                        "tls.handshake.extensions_server_name", "tcp.dstport")
    assert ksc and all(row == ["", "13000"] for row in ksc)
    assert tshark_fields(demo, "tcp.dstport == 14000 && tcp.len > 0", "frame.number")
    assert tshark_fields(demo, "udp.dstport == 15000 && ip.src == 10.10.0.20", "frame.number")
    fallback = tshark_fields(demo, "ip.dst == 223.6.6.6 && dns", "ip.src", "dns.qry.name")
    assert fallback == [["10.10.3.50", "downloads.upd.kaspersky.com"]]
    updates = tshark_fields(demo, "http.request", "http.request.uri", "http.user_agent")
    assert any(row[0] == "/index/u0607g.xml" and "Kaspersky" in row[1] for row in updates)
    assert any(row[0].startswith("/bases/") for row in updates)
    assert tshark_fields(demo, "udp.port == 123 && ntp", "frame.number")
    assert tshark_fields(demo, "udp.dstport == 443", "frame.number")


@needs_tshark
def test_link_layers_and_encapsulations_are_what_the_names_say():
    def protocols(filename):
        return " ".join(row[0] for row in tshark_fields(PCAPS / filename, "", "frame.protocols"))

    qinq = protocols("vlan_qinq.pcap")
    assert "ieee8021ad:ethertype:vlan:ethertype:ip" in qinq
    assert "ieee8021ad:ethertype:vlan:ethertype:vlan:ethertype:ip" in qinq
    assert "sll" in protocols("linux_sll.pcap")
    assert "sll" in protocols("linux_sll2.pcap")
    assert "null" in protocols("bsd_loopback.pcap")
    assert "raw:ip" in protocols("raw_ip.pcap") and "raw:ipv6" in protocols("raw_ip.pcap")
    assert "erspan:eth" in protocols("erspan2.pcap") and "erspan:eth" in protocols("erspan3.pcap")
    assert "vxlan:eth" in protocols("vxlan.pcap")
    assert "geneve:eth" in protocols("geneve.pcap")
    assert "mpls:ip" in protocols("mpls.pcap")
    assert "pppoes:ppp:ip" in protocols("pppoe.pcap")
    assert "ipv6.hopopts:ipv6.dstopts" in protocols("ipv6.pcap")
    ip_options = tshark_fields(PCAPS / "ip_options.pcap", "ip", "ip.hdr_len", "ip.opt.type")
    assert ip_options and all(row[0] == "28" and row[1].startswith("148") for row in ip_options)
    gre = tshark_fields(PCAPS / "gre.pcap", "gre", "gre.flags.checksum", "gre.flags.key",
                        "gre.flags.sequence_number", "gre.checksum.status")
    assert gre and all(row == ["1", "1", "1", "1"] for row in gre)
    versions = {row[0] for row in tshark_fields(PCAPS / "erspan3.pcap", "erspan", "erspan.version")}
    assert versions == {"2"}
    interfaces = {tuple(row) for row in tshark_fields(PCAPS / "multi_if.pcapng", "", "frame.interface_id",
                                                      "frame.encap_type")}
    assert interfaces == {("0", "1"), ("1", "25")}


@needs_tshark
def test_timestamps_keep_their_resolution():
    ns_times = tshark_fields(PCAPS / "nanosecond_be.pcap", "", "frame.time_epoch")
    assert ns_times[0][0].endswith(".123456789")
    header = (PCAPS / "nanosecond_be.pcap").read_bytes()[:4]
    assert header == bytes.fromhex("a1b23c4d")
    sll_times = [row[0] for row in tshark_fields(PCAPS / "multi_if.pcapng", "frame.interface_id == 1",
                                                  "frame.time_epoch")]
    assert sll_times and all(not t.endswith("000") for t in sll_times)


@needs_tshark
def test_reassembly_captures_hide_names_until_reassembled():
    fragments = PCAPS / "ip_fragments.pcap"
    names = {row[0] for row in tshark_fields(fragments, "dns", "dns.qry.name")}
    assert "s19.upd.kaspersky.com" not in names
    assert tshark_fields(fragments, "ip.fragment.overlap", "frame.number")
    assert tshark_fields(fragments, "ipv6.fragment", "frame.number")
    one_packet = run_tshark(fragments, "-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE",
                            "-T", "fields", "-e", "dns.qry.name")
    unreassembled = set(one_packet.stdout.split())
    assert "ksn-url-geo.kaspersky-labs.com" not in unreassembled
    assert "ksn-cinfo-geo.kaspersky-labs.com" not in unreassembled
    tcp_dns = tshark_fields(PCAPS / "dns_tcp.pcap", "dns", "dns.qry.name", "tcp.reassembled.length")
    assert any(row[1] for row in tcp_dns)
    ooo = tshark_fields(PCAPS / "tls_ooo.pcap", "tcp.analysis.out_of_order || tcp.analysis.retransmission",
                        "frame.number")
    assert len(ooo) >= 3


def test_truncated_capture_ends_mid_record():
    data = (PCAPS / "truncated.pcap").read_bytes()
    offset, last_declared = 24, None
    while offset + 16 <= len(data):
        caplen = int.from_bytes(data[offset + 8: offset + 12], "little")
        last_declared = (offset + 16, caplen)
        offset += 16 + caplen
    start, caplen = last_declared
    assert 0 < len(data) - start < caplen


def test_duplicates_repeat_every_frame_back_to_back():
    data = (PCAPS / "duplicates.pcap").read_bytes()
    frames, offset = [], 24
    while offset < len(data):
        caplen = int.from_bytes(data[offset + 8: offset + 12], "little")
        frames.append(data[offset + 16: offset + 16 + caplen])
        offset += 16 + caplen
    assert len(frames) % 2 == 0 and len(frames) > 20
    assert all(frames[i] == frames[i + 1] for i in range(0, len(frames), 2))
    assert len(set(frames)) == len(frames) // 2
