"""Differential test: the names (and JA3 strings) ``purge-sensor names`` extracts from every
capture in pcaps/ must be the ones tshark extracts.

tshark is an independent decoder with its own link layers, tunnels, defragmentation and TCP
reassembly, so agreement on every sample is strong evidence that the sensor sees what an
analyst would see in Wireshark.  Sets of (kind, name) are compared, lower-cased on both sides.

Known, legitimate differences, each with its reason:

* ``duplicates.pcap``: tshark lists every frame twice, the sensor drops span duplicates within
  its dedup window.  The *sets* are equal, so no exception is needed.
* ``truncated.pcap``: tshark stops with "cut short in the middle of a packet" (exit 2) after
  the complete records; the sensor warns and keeps what it read.  Same sets.
* ``hostile_names.pcap``: tshark renders odd bytes lossily (a dot inside a label is printed
  as a plain dot, bytes >= 0x80 as UTF-8 or U+FFFD, a space unescaped, an SNI cut at its
  first NUL), so its text cannot be mapped back to labels.  Instead the sensor must print
  exactly the escaped forms the generator put on the wire, and every plain-ASCII Kaspersky
  name tshark shows.
* ``garbage.pcap``: tshark dissects damaged frames as far as it can (it reads a DNS query
  whose IPv4 total length exceeds the frame, and prints placeholders such as "<Name contains
  a pointer that loops>"); the sensor drops them.  The one valid Kaspersky query must be found.
* ``quic_malformed.pcap``: tshark decrypts an Initial whose Length field runs past the end of
  the datagram and shows its SNI; the sensor rejects that packet (``quic_truncated``) as
  RFC 9000 section 12.2 requires.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import load_make_samples

ROOT = Path(__file__).resolve().parents[1]
PCAPS = ROOT / "pcaps"
CAPTURES = sorted([*PCAPS.glob("*.pcap"), *PCAPS.glob("*.pcapng")])
TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")

TSHARK_OPTIONS = (
    "-n",
    "-o", "tls.desegment_ssl_records:TRUE",
    "-o", "tcp.desegment_tcp_streams:TRUE",
    "-o", "tcp.reassemble_out_of_order:TRUE",  # off by default in 4.0; tls_ooo and dns_tcp need it
    "-d", "tcp.port==13000,tls",  # KSC Network Agent TLS: tshark has no TLS heuristic for it
)
AGGREGATOR = "\x1f"  # never printed inside a name: tshark escapes control characters
NAME_FIELDS = ("dns.qry.name", "tls.handshake.extensions_server_name", "http.host")
HOSTILE = "hostile_names.pcap"
GARBAGE = "garbage.pcap"
TSHARK_ONLY = {
    "quic_malformed.pcap": {("quic_sni", "bad.kaspersky.com")},
}


make_samples = load_make_samples()


def capture_id(path: Path) -> str:
    return path.name


def run_tshark(path: Path, fields) -> list[list[list[str]]]:
    """One row per frame; each column a list of occurrences."""
    args = [TSHARK, "-r", str(path), *TSHARK_OPTIONS, "-T", "fields", "-E", "separator=/t",
            "-E", "occurrence=a", "-E", f"aggregator={AGGREGATOR}"]
    for field in fields:
        args += ["-e", field]
    result = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=180)
    problems = [line for line in result.stderr.splitlines()
                if "Running as user" not in line and "cut short in the middle of a packet" not in line]
    assert not problems, f"tshark on {path.name}: {problems}"
    return [[column.split(AGGREGATOR) if column else [] for column in line.split("\t")]
            for line in result.stdout.splitlines()]


def normalise(kind: str, value: str) -> str:
    value = value.lower()
    if kind == "http_host" and re.search(r":\d+$", value) and not value.endswith("]"):
        value = value.rsplit(":", 1)[0]
    if kind != "dns" and value.endswith("."):
        value = value[:-1]
    if kind == "dns" and value == "<root>":
        value = ""
    return value


def tshark_names(path: Path) -> set[tuple[str, str]]:
    names = set()
    for protocols, queries, server_names, hosts in run_tshark(path, ("frame.protocols",) + NAME_FIELDS):
        sni_kind = "quic_sni" if any("quic" in p.split(":") for p in protocols) else "tls_sni"
        for kind, values in (("dns", queries), (sni_kind, server_names), ("http_host", hosts)):
            names.update((kind, normalise(kind, value)) for value in values)
    return names


def tshark_ja3(path: Path) -> tuple[set[str], set[str]]:
    full, hashes = set(), set()
    for strings, digests in run_tshark(path, ("tls.handshake.ja3_full", "tls.handshake.ja3")):
        full.update(strings)
        hashes.update(digests)
    return full, hashes


def sensor_command() -> list[str]:
    installed = shutil.which("purge-sensor")
    if installed:
        return [installed]
    return [sys.executable, "-c", "import sys; from sensor.cli import main; sys.exit(main())"]


def run_sensor(path: Path, *options: str) -> list[tuple[str, str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([*sensor_command(), "names", *options, str(path)], capture_output=True,
                            text=True, errors="strict", timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, f"purge-sensor names {path.name}: {result.stderr}"
    rows = []
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        assert len(fields) == 5, f"not ts/src/dst/kind/name: {line!r}"
        float(fields[0])
        rows.append((fields[3], fields[4]))
    return rows


def sensor_names(path: Path) -> set[tuple[str, str]]:
    return {(kind, name.lower()) for kind, name in run_sensor(path)
            if kind in ("dns", "tls_sni", "quic_sni", "http_host")}


@pytest.mark.parametrize("path", CAPTURES, ids=capture_id)
def test_names_match_tshark(path):
    ours, theirs = sensor_names(path), tshark_names(path)
    if path.name == HOSTILE:
        intended = set(make_samples.sample_hostile_names()[1])
        assert intended <= ours, sorted(intended - ours)
        plain = {(kind, name) for kind, name in theirs
                 if re.fullmatch(r'[!#-\[\]-~]*', name) and make_samples.is_kaspersky_name(name)}
        dots_unescaped = {(kind, name.replace("\\.", ".")) for kind, name in ours}
        assert plain <= dots_unescaped, sorted(plain - dots_unescaped)
        assert all(make_samples.is_kaspersky_name(name) for _, name in ours)
        return
    if path.name == GARBAGE:
        assert ("dns", "s05.upd.kaspersky.com") in ours
        assert {name for _, name in ours if make_samples.is_kaspersky_name(name)} <= {
            "s05.upd.kaspersky.com", "s06.upd.kaspersky.com"}
        return
    allowed = TSHARK_ONLY.get(path.name, set())
    assert ours - theirs == set(), f"only the sensor sees {sorted(ours - theirs)}"
    assert theirs - ours - allowed == set(), f"only tshark sees {sorted(theirs - ours - allowed)}"


@pytest.mark.parametrize("path", CAPTURES, ids=capture_id)
def test_ja3_matches_tshark(path):
    rows = run_sensor(path, "--ja3")
    ours = {value for kind, value in rows if kind == "ja3"}
    our_hashes = {value for kind, value in rows if kind == "ja3_hash"}
    for ja3 in ours:
        assert re.fullmatch(r"\d+,[\d-]*,[\d-]*,[\d-]*,[\d-]*", ja3), ja3
    if path.name in (GARBAGE, "quic_malformed.pcap"):
        return  # damaged hellos: which of them deserve a fingerprint is decoder policy
    theirs, their_hashes = tshark_ja3(path)
    assert ours == theirs
    assert our_hashes == their_hashes


def test_every_sample_is_compared():
    """A capture added to pcaps/ without a place in this test would be silently untested."""
    names = {path.name for path in CAPTURES}
    assert {sample.filename for sample in make_samples.SAMPLES} <= names
    assert {HOSTILE, GARBAGE} <= names
