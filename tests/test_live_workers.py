"""``purge-sensor run --workers N`` and ``--user``: fanout workers find what ``read`` finds.

The veth tests need root, ip and tcpreplay (as tests/test_live_veth.py, whose replay
helpers they reuse).  Two workers share each interface through PACKET_FANOUT; their
records reach the main process, which must alert and keep the inventory exactly as
``read`` does on the same capture, with nothing dropped, both workers busy on a
capture with many flows, and no worker left behind when the sensor stops.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import veth  # noqa: E402

WORKER_CAPTURES = ["demo.pcap", "vlan_qinq.pcap", "tls_ooo.pcap", "dns_tcp.pcap", "ipv6.pcap",
                   "vxlan.pcap", "duplicates.pcap", "erspan2.pcap", "ip_fragments.pcap", "quic_v1.pcap"]
MANY_FLOWS = {"demo.pcap"}  # 235 flows: the flow hash cannot leave a worker idle


@pytest.fixture
def live():
    """tests/test_live_veth.py's replay helpers, or a skip where veth tests cannot run."""
    pytest.importorskip("pcapy")
    why = veth.available()
    if why:
        pytest.skip(why)
    from tests import test_live_veth

    return test_live_veth


@pytest.fixture
def shared_dir():
    """A directory the sensor can still write to after it switched to nobody."""
    path = Path(tempfile.mkdtemp(prefix="purge-workers-"))
    path.chmod(0o777)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def _worker_pids(line: str) -> list[int]:
    match = re.search(r"with (\d+) workers \(pids ([\d, ]+)\)", line)
    assert match, line
    pids = [int(pid) for pid in match.group(2).split(", ")]
    assert len(pids) == int(match.group(1))
    return pids


def _worker_packets(tail: str) -> list[int]:
    match = re.search(r"workers: (.*)", tail)
    assert match, tail
    return [int(n.replace(",", "")) for n in re.findall(r"#\d+ ([\d,]+) packets", match.group(1))]


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"/proc/{pid}/status has no {name}")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid``, which tells a process from a later one reusing its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("name", WORKER_CAPTURES)
def test_two_workers_find_what_read_finds(live, tmp_path, name):
    capture = ROOT / "pcaps" / name
    read_alerts, read_hosts = live._read(capture, tmp_path)
    live_alerts, live_hosts, tail = live._live(capture, tmp_path, "--workers", "2")
    assert read_alerts, "the sample must produce detections"
    assert live_alerts == read_alerts
    assert live_hosts == read_hosts
    per_worker = _worker_packets(tail)
    assert len(per_worker) == 2
    total = int(re.search(r"stopped: ([\d,]+) packets", tail).group(1).replace(",", ""))
    assert sum(per_worker) == total > 0
    if name in MANY_FLOWS:
        assert all(n > 0 for n in per_worker), tail


@pytest.mark.parametrize("workers", ["1", "2"])
def test_user_switch_after_opening_the_capture(live, shared_dir, workers):
    nobody = pwd.getpwnam("nobody")
    capture = ROOT / "pcaps" / "demo.pcap"
    checked = []

    def runs_as_nobody(proc, line):
        pids = [proc.pid] + (_worker_pids(line) if workers != "1" else [])
        for pid in pids:
            assert _status_field(pid, "Uid").split() == [str(nobody.pw_uid)] * 4, pid
            assert _status_field(pid, "Gid").split() == [str(nobody.pw_gid)] * 4, pid
            assert _status_field(pid, "Groups") == "", pid
            checked.append(pid)

    read_dir = shared_dir / "read"
    read_dir.mkdir()
    read_alerts, read_hosts = live._read(capture, read_dir)
    live_alerts, live_hosts, _ = live._live(capture, shared_dir, "--workers", workers, "--user", "nobody",
                                           while_capturing=runs_as_nobody)
    assert len(checked) == int(workers) + (0 if workers == "1" else 1)
    assert live_alerts == read_alerts
    assert live_hosts == read_hosts


def _start_workers(rx_ns: str, rx_if: str, tmp: Path, live) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen(
        veth.in_netns(rx_ns, live._sensor("run", "-i", rx_if, "--workers", "2", "--no-state",
                                          "-o", f"file:{tmp / 'a.json'}", "--metrics", "127.0.0.1:0")),
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    pids = _worker_pids(live._wait_for(proc, "capturing on"))
    for pid in pids:
        assert _status_field(pid, "PPid") == str(proc.pid)
    return proc, pids


def _gone(pids: list[int], started: dict, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_start_time(pid) != started[pid] for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_sigterm_stops_every_worker_and_exits_0(live, tmp_path):
    with veth.veth_pair(f"s{os.getpid() % 10000}") as (_tx_ns, _tx_if, rx_ns, rx_if):
        proc, pids = _start_workers(rx_ns, rx_if, tmp_path, live)
        started = {pid: _start_time(pid) for pid in pids}
        try:
            proc.send_signal(signal.SIGTERM)
            live._wait_for(proc, "stopped:")
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert _gone(pids, started), "a worker outlived the sensor"


def test_a_dead_worker_stops_the_sensor_with_an_error(live, tmp_path):
    with veth.veth_pair(f"k{os.getpid() % 10000}") as (_tx_ns, _tx_if, rx_ns, rx_if):
        proc, pids = _start_workers(rx_ns, rx_if, tmp_path, live)
        started = {pid: _start_time(pid) for pid in pids}
        try:
            os.kill(pids[0], signal.SIGKILL)
            live._wait_for(proc, "stopped:")
            rest = proc.stderr.read()
            assert proc.wait(timeout=30) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert f"worker 0 (pid {pids[0]}) exited unexpectedly" in rest, rest
    assert _gone(pids, started), "a worker outlived the sensor"


@pytest.mark.parametrize("count", ["0", "65", "two"])
def test_worker_count_is_validated(count):
    proc = subprocess.run([sys.executable, "-m", "sensor.cli", "run", "-i", "lo", "--workers", count],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--workers: must be a whole number from 1 to 64" in proc.stderr


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
@pytest.mark.parametrize("how, reason", [
    ("no device", "nosuchif0: no such device"),
    ("no CAP_NET_RAW", "lo: permission denied: capturing needs root or CAP_NET_RAW")])
def test_a_capture_that_cannot_open_says_why(live, workers, how, reason):
    """libpcap's activation status, not the "not-yet-activated pcap_t" that the filter
    call after a failed activation reports."""
    argv = [sys.executable, "-m", "sensor.cli", "run", "--no-state", *workers]
    if how == "no device":
        argv += ["-i", "nosuchif0"]
    else:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop the capability")
        argv = [setpriv, "--bounding-set", "-net_raw,-net_admin", *argv, "-i", "lo"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert reason in proc.stderr and "not-yet-activated" not in proc.stderr


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_a_state_file_that_is_no_inventory_stops_run_with_one_line(live, tmp_path, workers):
    """Capture opened (on lo: nothing is sent), then the state store refuses: exit 2 and
    the reason in one line, from the single process and from the worker pool's owner."""
    state = tmp_path / "s.sqlite"
    state.write_bytes(b"\x00not sqlite at all" * 300)
    proc = subprocess.run([sys.executable, "-m", "sensor.cli", "run", "-i", "lo", *workers,
                           "--state", str(state), "-o", f"file:{tmp_path / 'a.json'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{state}: not a purge-sensor inventory" in proc.stderr and "Traceback" not in proc.stderr


PLACEHOLDER_SIGNATURES = """\
version: "1"
ruleset: kaspersky
indicators:
  - id: nothing-in-the-samples
    category: update
    strength: strong
    exact: update.example.invalid
    source: "[C] test"
"""


def test_sighup_gives_the_workers_the_reloaded_signatures(live, tmp_path):
    """The workers screen packets by the signature set's names, so after a reload they
    must screen by the new set: a capture replayed after the SIGHUP finds what ``read``
    finds with the new set, although the sensor started with a set matching none of it."""
    capture = ROOT / "pcaps" / "demo.pcap"
    signatures = tmp_path / "signatures"
    signatures.mkdir()
    (signatures / "kaspersky.yaml").write_text(PLACEHOLDER_SIGNATURES)
    read_dir = tmp_path / "read"
    read_dir.mkdir()
    read_alerts, read_hosts = live._read(capture, read_dir)

    def reload_the_full_set(proc, line):
        (signatures / "kaspersky.yaml").write_text((ROOT / "signatures" / "kaspersky.yaml").read_text())
        proc.send_signal(signal.SIGHUP)
        live._wait_for(proc, "reloaded")

    live_alerts, live_hosts, _ = live._live(capture, tmp_path, "--workers", "2", "-s", str(signatures),
                                           while_capturing=reload_the_full_set)
    assert live_alerts == read_alerts
    assert live_hosts == read_hosts


def test_workers_judge_udp_flows_to_answered_addresses_like_read(live, tmp_path):
    """The answer and the flows may hash to different workers; the main process holds the
    answer cache, so the result must still be read's."""
    capture = tmp_path / "answer_udp.pcap"
    live.answer_then_udp_flows(capture)
    read_alerts, read_hosts = live._read(capture, tmp_path)
    alerts, hosts, _ = live._live(capture, tmp_path, "--workers", "2")
    assert live.UDP_FLOW_EXPECTED in alerts and live.UDP_FLOW_NEVER not in alerts
    assert alerts == read_alerts and hosts == read_hosts
