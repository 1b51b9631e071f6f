"""A read split in two processes (sensor.split_read) against a read in one, as a user runs
them: the same alerts in the same order, the same inventory and summary, and the failures
of either process reported and survived."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers import load_make_samples

ROOT = Path(__file__).resolve().parents[1]
PCAPS = ROOT / "pcaps"
CAPTURES = sorted(p for p in PCAPS.iterdir() if p.suffix in (".pcap", ".pcapng"))
# Runs ``purge-sensor`` and says on stderr when the read split (split_read.fork ran): on a
# machine with one CPU to run on it does not, and these tests have nothing to compare.
PROBE = ("import sys\nimport sensor.split_read as split\nreal = split.fork\n"
         "def fork(*args):\n    sys.stderr.write('split read\\n')\n    return real(*args)\n"
         "split.fork = fork\nfrom sensor.cli import main\nsys.exit(main())\n")
SPLIT_MARK = "split read\n"

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="a read splits only with two CPUs to run on")


def read(tmp_path: Path, name: str, capture: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    state, alerts = tmp_path / f"{name}.sqlite", tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, "read", "--state", str(state),
                           "-o", f"file:{alerts}", *extra, str(capture)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc, state, alerts


def alert_lines(path: Path) -> list[dict]:
    """The alerts in order, without event.id (random per document)."""
    docs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for doc in docs:
        doc["event"].pop("id")
    return docs


def inventory(state: Path) -> list:
    proc = subprocess.run([sys.executable, "-m", "sensor.cli", "hosts", "--state", str(state),
                           "--format", "json", "--all"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_a_split_read_writes_what_a_read_in_one_process_writes(tmp_path, capture):
    split, split_state, split_alerts = read(tmp_path, "split", capture)
    whole, whole_state, whole_alerts = read(tmp_path, "whole", capture, "--no-split")
    assert split.stderr.startswith(SPLIT_MARK), split.stderr
    assert SPLIT_MARK not in whole.stderr
    assert split.returncode == whole.returncode, split.stderr
    assert split.stderr[len(SPLIT_MARK):] == whole.stderr
    assert alert_lines(split_alerts) == alert_lines(whole_alerts)
    assert inventory(split_state) == inventory(whole_state)


def answer_flows_capture(path: Path) -> Path:
    """Lookups through the LAN resolver, then connections to the answered addresses from
    hosts that never asked (no SNI): the tracker's answer cache alone attributes those
    (dns_answer_flow), and only if the decoder reported their flow starts, which it does
    for addresses in that cache only."""
    samples = load_make_samples()
    cap = samples.simple_capture("split-answer-flows")
    t = samples.T0_NS
    for n in range(3):
        name, address = f"dnl-{n:02}.geo.kaspersky.com", f"203.0.113.{80 + n}"
        t = samples.dns_lookup(cap, t, samples.CLIENT, samples.LAN_RESOLVER, name,
                               samples.answer_chain(name, (), address)) + 5 * samples.MS
        t = samples.tls_session(cap, t, f"192.168.1.{40 + n}", address, None) + 5 * samples.MS
    path.write_bytes(samples.pcap_file(1, cap.ordered()))
    return path


def test_a_split_read_attributes_flows_to_answered_addresses_as_one_process_does(tmp_path):
    capture = answer_flows_capture(tmp_path / "answer_flows.pcap")
    split, split_state, split_alerts = read(tmp_path, "split", capture)
    whole, whole_state, whole_alerts = read(tmp_path, "whole", capture, "--no-split")
    assert split.stderr.startswith(SPLIT_MARK) and split.returncode == whole.returncode == 0
    flows = [d for d in alert_lines(whole_alerts) if d["event"]["action"] == "dns_answer_flow"]
    assert len(flows) == 3
    assert alert_lines(split_alerts) == alert_lines(whole_alerts)
    assert inventory(split_state) == inventory(whole_state)


def test_the_comparison_sees_a_decoding_process_blind_to_the_answer_cache(tmp_path):
    """The tests above compare what could differ: with the decoding process's copy of the
    answer cache left empty, those flow starts are never reported and their alerts are
    missing from the split read."""
    capture = answer_flows_capture(tmp_path / "answer_flows.pcap")
    blind = PROBE.replace("from sensor.cli import main",
                          "import sensor.track.mirror as mirror\n"
                          "mirror.TrackerMirror._cache_answers = lambda self, msg: None\n"
                          "from sensor.cli import main")
    alerts = tmp_path / "blind.json"
    proc = subprocess.run([sys.executable, "-c", blind, "read", "-q", "--no-state", "-o",
                           f"file:{alerts}", str(capture)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stderr == SPLIT_MARK and proc.returncode == 0
    _, _, whole_alerts = read(tmp_path, "whole", capture, "--no-split")
    assert [d for d in alert_lines(whole_alerts) if d["event"]["action"] == "dns_answer_flow"]
    assert not [d for d in alert_lines(alerts) if d["event"]["action"] == "dns_answer_flow"]


def test_a_state_store_that_cannot_start_stops_the_split_read_with_exit_2(tmp_path):
    state = tmp_path / "s.sqlite"
    state.write_bytes(b"\x00not sqlite at all" * 300)
    proc = subprocess.run([sys.executable, "-c", PROBE, "read", "--state", str(state),
                           str(PCAPS / "demo.pcap")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.stderr.startswith(SPLIT_MARK)
    assert proc.returncode == 2, proc.stderr
    errors = proc.stderr[len(SPLIT_MARK):].splitlines()
    assert len(errors) == 1 and str(state) in errors[0] and "not a purge-sensor inventory" in errors[0]
    assert proc.stdout == ""


def repeated_demo(times: int) -> bytes:
    """demo.pcap's packets again and again, each copy later: enough records that the
    decoding process sends many messages."""
    from sensor.capture.pcapfile import open_capture

    with open_capture(str(PCAPS / "demo.pcap")) as cap:
        packets = [(ts, frame) for ts, _, frame, _, _ in cap]
    base = packets[0][0]
    records = [(int((ts - base + copy * 600) * 1_000_000), frame)
               for copy in range(times) for ts, frame in packets]
    return load_make_samples().pcap_file(1, records)


def children_of(pid: int) -> list[int]:
    """From /proc's stat lines (a kernel without CONFIG_PROC_CHILDREN has no children file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def state_process(pid: int, timeout: float = 30.0) -> int:
    """The pid of the read's state process, once it is forked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = children_of(pid)
        if children:
            return children[0]
        time.sleep(0.01)
    raise AssertionError("no state process")


def catches(pid: int, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def start_stdin_read(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROBE, "read", "-q", "--state",
                             str(tmp_path / "s.sqlite"), "-o", f"file:{tmp_path / 'a.json'}",
                             *extra, "-"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_dead_state_process_is_reported_with_exit_3(tmp_path):
    data = repeated_demo(4)
    proc = start_stdin_read(tmp_path)
    try:
        os.kill(state_process(proc.pid), signal.SIGKILL)
        try:
            proc.stdin.write(data)
        except BrokenPipeError:
            pass  # the read stopped at the first message it could not send
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert "state process exited unexpectedly (killed by signal 9)" in err.decode()


def test_the_state_process_keeps_what_it_was_sent_when_the_decoding_process_dies(tmp_path):
    """Nothing detected is lost: killed, the decoding process closes its end of the pipe,
    and the state process commits the hosts of the alerts it wrote before it exits."""
    proc = start_stdin_read(tmp_path)
    alerts = tmp_path / "a.json"
    try:
        child = state_process(proc.pid)
        proc.stdin.write(repeated_demo(6))
        proc.stdin.flush()
        wait_for(lambda: alerts.exists() and alerts.stat().st_size > 0)
        proc.kill()
        proc.wait(timeout=30)
        wait_for(lambda: not Path(f"/proc/{child}").exists()
                 or Path(f"/proc/{child}/stat").read_text().split(") ")[1][0] == "Z")
    finally:
        proc.kill()
    attributed = {doc["host"]["ip"] for doc in alert_lines(alerts) if doc["event"]["action"] == "host_detected"}
    assert attributed
    assert attributed <= {host["ip"] for host in inventory(tmp_path / "s.sqlite")}


def test_sighup_reopens_the_state_process_sinks(tmp_path):
    """logrotate renames the alert file and sends SIGHUP to the process it knows: the
    decoding process passes it on to the state process, which owns the sinks."""
    alerts, rotated = tmp_path / "a.json", tmp_path / "a.json.1"
    proc = start_stdin_read(tmp_path)
    try:
        child = state_process(proc.pid)
        data = repeated_demo(8)
        half = len(data) // 2
        proc.stdin.write(data[:half])
        proc.stdin.flush()
        wait_for(lambda: alerts.exists() and alerts.stat().st_size > 0)
        # The decoding process sets its handler once the capture's header has come.
        wait_for(lambda: catches(proc.pid, signal.SIGHUP) and catches(child, signal.SIGHUP))
        alerts.rename(rotated)
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: alerts.exists())
        proc.stdin.write(data[half:])
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    (tmp_path / "all.pcap").write_bytes(data)
    _, _, whole_alerts = read(tmp_path, "whole", tmp_path / "all.pcap", "--no-split")
    assert alert_lines(rotated) and alert_lines(alerts)
    assert alert_lines(rotated) + alert_lines(alerts) == alert_lines(whole_alerts)


def test_the_decoding_process_starts_with_the_resolvers_the_store_holds(tmp_path):
    """As the tracker loads them: a second read screens the demo's LAN resolver from
    the start, and a store it cannot read leaves the copy empty (the state process says why)."""
    from sensor.config import Settings
    from sensor.split_read import _stored_resolvers

    state = tmp_path / "s.sqlite"
    settings = Settings(state=str(state))
    assert _stored_resolvers(settings) == []
    read(tmp_path, "first", PCAPS / "demo.pcap", "--no-split")
    assert _stored_resolvers(Settings(state=str(tmp_path / "first.sqlite"))) == ["10.10.0.53"]
    state.write_bytes(b"\x00not sqlite at all" * 300)
    assert _stored_resolvers(settings) == []


def test_a_read_that_cannot_fork_reads_in_one_process(tmp_path):
    """No process to spare (EAGAIN): a warning, then the read as one process makes it."""
    probe = PROBE.replace("from sensor.cli import main",
                          "import errno, os\n"
                          "def refuse():\n    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))\n"
                          "os.fork = refuse\n"
                          "from sensor.cli import main")
    state, alerts = tmp_path / "s.sqlite", tmp_path / "a.json"
    proc = subprocess.run([sys.executable, "-c", probe, "read", "--state", str(state), "-o",
                           f"file:{alerts}", str(PCAPS / "demo.pcap")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    whole, whole_state, whole_alerts = read(tmp_path, "whole", PCAPS / "demo.pcap", "--no-split")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == SPLIT_MARK.strip()
    assert lines[1].startswith("purge-sensor: warning: reading in one process: cannot fork")
    assert "\n".join(lines[2:]) + "\n" == whole.stderr
    assert alert_lines(alerts) == alert_lines(whole_alerts)
    assert inventory(state) == inventory(whole_state)
