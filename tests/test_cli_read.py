"""`purge-sensor read` end to end, as a user runs it: alerts, summary, exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PCAPS = ROOT / "pcaps"


def sensor(*args, stdin=None, check=None):
    proc = subprocess.run([sys.executable, "-m", "sensor.cli", *args], cwd=ROOT, input=stdin,
                          capture_output=True, timeout=120)
    if check is not None:
        assert proc.returncode == check, proc.stderr.decode()
    return proc


def alerts(proc):
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def test_demo_alerts_are_ecs_and_attributed(tmp_path):
    proc = sensor("read", "--state", str(tmp_path / "s.sqlite"), str(PCAPS / "demo.pcap"), check=0)
    docs = alerts(proc)
    detections = [d for d in docs if d["event"]["kind"] == "alert" and d["event"]["action"] != "host_detected"]
    assert detections
    for doc in detections:
        assert doc["@timestamp"].endswith("Z") and doc["event"]["category"] == ["network"]
        assert doc["rule"]["ruleset"] and doc["rule"]["version"] and doc["observer"]["name"]
        assert doc["host"]["ip"]
    dns = [d for d in detections if d["event"]["action"] == "dns_query"]
    for d in dns:
        forwarder = d["purge_sensor"].get("detail", {}).get("forwarded_by")
        # A resolver's forwarded query is attributed to the client that asked it.
        assert d["host"]["ip"] == d["source"]["ip"] if forwarder is None else \
            (d["source"]["ip"] == forwarder and d["host"]["ip"] != forwarder)
    assert {d["dns"]["question"]["name"] for d in dns} >= {"s07.upd.kaspersky.com"}
    tls = [d for d in detections if d["event"]["action"] == "tls_sni"]
    assert all(d["tls"]["client"]["server_name"] == d["destination"]["domain"] for d in tls)
    http = [d for d in detections if d["event"]["action"] == "http_host"]
    assert all(d["url"]["domain"] and d["user_agent"]["original"] for d in http)
    browsing = [d for d in detections if d["rule"]["category"] == "website"]
    assert browsing and {d["host"]["ip"] for d in browsing}.isdisjoint(
        {d["host"]["ip"] for d in docs if d["event"]["action"] == "host_detected"})
    err = proc.stderr.decode()
    assert "packets" in err and "matches by category" in err and "\r" not in err


def test_summary_says_when_its_packet_count_is_of_what_the_filter_passed():
    """libpcap does not count what the capture filter rejects; the summary must not pass
    the filtered count off as the file's."""
    import re

    from sensor.capture.pcapfile import open_capture

    with open_capture(str(PCAPS / "demo.pcap")) as cap:
        in_file = sum(1 for _ in cap)
    counts = {}
    for extra in ((), ("--no-bpf-prefilter",)):
        err = sensor("read", "--no-state", *extra, str(PCAPS / "demo.pcap"), check=0).stderr.decode()
        counts[extra] = re.search(r"^packets ([\d,]+)( passed by filter)?  ", err, re.M).groups()
    passed, unfiltered = counts[()], counts[("--no-bpf-prefilter",)]
    assert passed[1] and int(passed[0].replace(",", "")) < in_file
    assert unfiltered == (f"{in_file:,}", None)


def test_lookalikes_never_match():
    proc = sensor("read", "--no-state", str(PCAPS / "lookalikes.pcap"), check=0)
    assert alerts(proc) == []


def test_case_and_trailing_dot_match():
    docs = alerts(sensor("read", "--no-state", "-q", str(PCAPS / "case_trailing_dot.pcap"), check=0))
    assert {d["rule"]["id"] for d in docs if d["event"]["action"] != "host_detected"} >= {"ksp-upd-s-nn"}


def test_truncated_capture_is_reported_and_earlier_records_processed():
    proc = sensor("read", "--no-state", str(PCAPS / "truncated.pcap"), check=0)
    assert "truncated" in proc.stderr.decode()
    assert any(d.get("dns", {}).get("question", {}).get("name") == "s14.upd.kaspersky.com"
               for d in alerts(proc))


def test_stdin_capture():
    data = (PCAPS / "vlan_qinq.pcap").read_bytes()
    proc = sensor("read", "--no-state", "-q", "-", stdin=data, check=0)
    assert any(d["event"]["action"] == "tls_sni" for d in alerts(proc))


@pytest.mark.parametrize("name", ["demo.pcap", "vxlan.pcap", "nanosecond_be.pcap"])
def test_a_named_pipe_is_read_once_like_the_file(tmp_path, name):
    """``read <(zcat x.pcap.gz)`` and ``mkfifo`` hand the sensor a pipe, which can be read
    only once: its alerts must be the file's (its head used to be read for the format,
    and the capture then found the pipe emptied of it)."""
    fifo = tmp_path / "capture.fifo"
    os.mkfifo(fifo)
    data = (PCAPS / name).read_bytes()
    writer = subprocess.Popen(["sh", "-c", f'cat "{PCAPS / name}" > "{fifo}"'])
    try:
        piped = sensor("read", "--no-state", "-q", str(fifo), check=0)
    finally:
        writer.wait(timeout=30)
    direct = sensor("read", "--no-state", "-q", str(PCAPS / name), check=0)
    key = lambda doc: json.dumps({k: v for k, v in doc.items() if k != "event"}, sort_keys=True)  # noqa: E731
    assert data and sorted(map(key, alerts(piped))) == sorted(map(key, alerts(direct)))
    assert alerts(direct)


def test_unreadable_capture_exits_1_but_reads_the_others(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all")
    proc = sensor("read", "--no-state", "-q", str(bad), str(PCAPS / "gre.pcap"), check=1)
    assert str(bad) in proc.stderr.decode()
    assert alerts(proc)


def test_invalid_signatures_refuse_to_start(tmp_path):
    sig = tmp_path / "bad.yaml"
    sig.write_text("version: 1\nruleset: t\nindicators:\n  - id: x\n    category: nope\n"
                   "    strength: strong\n    exact: a.example\n    source: test\n")
    proc = sensor("read", "--no-state", "--signatures", str(sig), str(PCAPS / "gre.pcap"), check=2)
    err = proc.stderr.decode()
    assert f"{sig}:5" in err and proc.stdout == b""


def test_invalid_config_names_the_key(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("[sensor]\ninternal = ['10.0.0.0/8']\nbogus = 1\n")
    proc = sensor("read", "--no-state", "--config", str(conf), str(PCAPS / "gre.pcap"), check=2)
    assert "sensor.bogus" in proc.stderr.decode() and str(conf) in proc.stderr.decode()


def test_bad_sink_spec_is_a_usage_error():
    sensor("read", "--no-state", "-o", "syslog+carrier-pigeon://x", str(PCAPS / "gre.pcap"), check=2)


@pytest.mark.parametrize("argv", [[], ["read"], ["names"], ["signatures"], ["signatures", "check"],
                                  ["hosts"], ["report"], ["run"], ["metrics-password"]])
def test_every_command_has_help(argv):
    proc = sensor(*argv, "--help", check=0)
    assert b"usage:" in proc.stdout


def test_usage_error_exit_code():
    sensor("read", check=2)


def test_reading_twice_does_not_double_evidence(tmp_path):
    state = str(tmp_path / "s.sqlite")
    sensor("read", "-q", "--state", state, str(PCAPS / "demo.pcap"), check=0)
    first = json.loads(sensor("hosts", "--state", state, "--format", "json", check=0).stdout)
    sensor("read", "-q", "--state", state, str(PCAPS / "demo.pcap"), check=0)
    second = json.loads(sensor("hosts", "--state", state, "--format", "json", check=0).stdout)
    assert [h["evidence"] for h in first] == [h["evidence"] for h in second]
    verdicts = {h["ip"]: h["verdict"] for h in first}
    assert verdicts["10.10.1.40"] == "website_only"
    assert verdicts["10.10.0.20"] == "management_server"
    assert sum(v == "install" for v in verdicts.values()) >= 3


def test_a_pcapng_from_beyond_year_9999_is_counted_not_a_crash(tmp_path):
    """A hostile pcapng timestamp (64 bits of seconds) used to reach the inventory's time
    formatting and end the read, then every later `hosts`, with a traceback."""
    from sensor.capture.pcapfile import open_capture
    from tests.helpers import load_make_samples

    with open_capture(str(PCAPS / "demo.pcap")) as cap:
        frames = [frame for _, _, frame, _, _ in cap]
    # One interface counting whole seconds (if_tsresol 10^0); every other packet's time is
    # the largest 64-bit count, some 584 billion years out.
    seconds = [(1 << 64) - 1 - n if n % 2 else 1_700_000_000 + n for n in range(len(frames))]
    capture = load_make_samples().pcapng_file(
        [(1, 0, b"eth0")], [(second * 10**9, frame, 0) for second, frame in zip(seconds, frames)])
    path = tmp_path / "future.pcapng"
    path.write_bytes(capture)
    state = str(tmp_path / "s.sqlite")
    proc = sensor("read", "--state", state, str(path), check=0)
    assert f"capture_record={len(frames) // 2}" in proc.stderr.decode()
    assert all(doc["@timestamp"].startswith("2023-11-") for doc in alerts(proc))
    hosts = sensor("hosts", "--state", state, "--format", "json", check=0)
    assert json.loads(hosts.stdout)


def test_read_raises_the_collector_threshold_only_while_it_runs(tmp_path, monkeypatch):
    import gc

    from sensor import cli, pipeline

    seen = []
    handle_batch = pipeline.Sensor.handle_batch

    def recording(self, *args, **kwargs):
        seen.append(gc.get_threshold()[0])
        return handle_batch(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Sensor, "handle_batch", recording)
    before = gc.get_threshold()
    try:
        gc.set_threshold(555, before[1], before[2])
        code = cli.main(["read", "-q", "--state", str(tmp_path / "s.sqlite"),
                         "-o", f"file:{tmp_path / 'a.json'}", str(PCAPS / "demo.pcap")])
        assert code == 0
        assert seen and set(seen) == {cli.READ_GC_THRESHOLD}
        assert gc.get_threshold()[0] == 555
    finally:
        gc.set_threshold(*before)


def test_a_state_file_that_is_no_inventory_refuses_to_start(tmp_path):
    """A foreign or corrupt state file is a configuration error: one line naming the file
    and exit 2, not a traceback."""
    state = tmp_path / "s.sqlite"
    state.write_bytes(b"\x00not sqlite at all" * 300)
    proc = sensor("read", "--state", str(state), str(PCAPS / "demo.pcap"), check=2)
    err = proc.stderr.decode()
    assert str(state) in err and "not a purge-sensor inventory" in err
    assert "Traceback" not in err and proc.stdout == b""


def test_a_failed_start_stops_libpcaps_reader_thread(tmp_path, monkeypatch):
    """The capture opens (and libpcap's reader starts) before the sensor is built; when
    building it fails in a way nobody expected, the reader must still be stopped: left
    running into the interpreter's exit, it crashed the process in libpcap."""
    import threading

    from sensor import cli, pipeline
    from sensor.capture import bpf
    from tests.helpers import load_make_samples

    def broken(self, settings, stats=None):
        raise RuntimeError("start-up broke")

    monkeypatch.setattr(bpf, "PREFETCH_BYTES", 1 << 16)
    monkeypatch.setattr(pipeline.Sensor, "__init__", broken)
    from sensor.capture.pcapfile import open_capture

    with open_capture(str(PCAPS / "demo.pcap")) as cap:
        frames = [frame for _, _, frame, _, _ in cap]
    # The demo repeated: megabytes the filter passes, far beyond the reader's prefetch.
    records = [(n * 1000, frame) for n, frame in enumerate(frames * 200)]
    path = tmp_path / "many.pcap"
    path.write_bytes(load_make_samples().pcap_file(1, records))
    with pytest.raises(RuntimeError, match="start-up broke") as raised:
        cli.main(["read", "-q", "--no-state", str(path)])
    # Checked while the traceback (and so every frame of the read) is still alive, as it is
    # while the interpreter prints it and exits.
    assert raised.traceback and not [t for t in threading.enumerate() if t.name == "pcap-reader"]
