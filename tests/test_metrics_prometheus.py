"""A real Prometheus scrapes real sensors, and every Grafana panel query returns data.

Three sensors run as child processes: one reads pcaps/demo.pcap with the sample systemd
config and lingers, one captures live on the loopback interface (the only source of the
capture-drop counters, fed with DNS packets sent to 127.0.0.1), and one serves its metrics
over TLS with basic auth, scraped through the TLS example config. Prometheus is started from
deploy/prometheus/prometheus.yml with rules.yml loaded. Every wait is a bounded poll.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import math
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = json.loads((DEPLOY / "grafana" / "purge-sensor.json").read_text())
DEMO = ROOT / "pcaps" / "demo.pcap"
TLS_USER, TLS_PASSWORD = "prometheus", "correct horse battery staple"
RATE_INTERVAL = "10s"
RANGE_SECONDS = 45
pytestmark = [
    pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                       reason="prometheus/promtool not installed (Debian package prometheus)"),
    pytest.mark.skipif(not DEMO.exists(), reason="pcaps/demo.pcap not generated"),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check, timeout: float, tick=None, interval: float = 0.25):
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if tick is not None:
            tick()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def dns_query(name: str, query_id: int) -> bytes:
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    return struct.pack("!6H", query_id, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!2H", 1, 1)


class LoopbackTraffic:
    """A Kaspersky update lookup and a DNS message whose name under a Kaspersky label loops
    back on itself, both to 127.0.0.1:53, for the live sensor on lo. Nothing leaves the
    machine. (A message without a signature label is screened, not parsed, so its
    malformation would not be counted.)"""

    MALFORMED = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x09kaspersky\xc0\x0c"

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sent = 0

    def __call__(self):
        self.sent += 1
        self.sock.sendto(dns_query("s07.upd.kaspersky.com", self.sent & 0xFFFF), ("127.0.0.1", 53))
        self.sock.sendto(self.MALFORMED, ("127.0.0.1", 53))

    def close(self):
        self.sock.close()


class Child:
    def __init__(self, name: str, argv: list[str], workdir: Path):
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self.stdout = open(workdir / f"{name}.stdout", "wb")
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.stdout, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.stdout.close()
        self.stderr.close()


def sensor_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sensor.cli", *args]


def self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "purge-sensor test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "metrics.crt", workdir / "metrics.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def fetch(url: str, *, context=None, auth: tuple[str, str] | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


class Stack:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.children: list[Child] = []
        self.traffic = LoopbackTraffic()
        self.ports = {name: free_port() for name in ("demo", "live", "tls", "prometheus")}
        self.demo_target = f"127.0.0.1:{self.ports['demo']}"
        self.live_target = f"127.0.0.1:{self.ports['live']}"
        self.tls_target = f"127.0.0.1:{self.ports['tls']}"

    def start(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self.workdir)
        self.children.append(child)
        return child

    def close(self):
        for child in reversed(self.children):
            child.stop()
        self.traffic.close()

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = fetch(url)
        payload = json.loads(body)
        assert status == 200 and payload["status"] == "success", f"{path} {params}: {body[:500]}"
        return payload["data"]

    def query(self, expr: str, at: float | None = None) -> list:
        return self.api("query", query=expr, time=at or time.time())["result"]

    def query_range(self, expr: str, start: float, end: float) -> list:
        return self.api("query_range", query=expr, start=start, end=end, step=1)["result"]


def prometheus_config(stack: Stack, cert: Path, password_file: Path) -> dict:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    job = config["scrape_configs"][0]
    job["static_configs"][0]["targets"] = [stack.demo_target, stack.live_target]
    tls_job = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-tls.yml").read_text())["scrape_configs"][0]
    tls_job["job_name"] = "purge-sensor-tls"
    tls_job["tls_config"]["ca_file"] = str(cert)
    tls_job["basic_auth"]["username"] = TLS_USER
    tls_job["basic_auth"]["password_file"] = str(password_file)
    tls_job["static_configs"] = [{"targets": [stack.tls_target]}]
    config["scrape_configs"].append(tls_job)
    return config


def samples_for(stack: Stack, instance: str, minimum: int) -> bool:
    result = stack.query(f'count_over_time(up{{instance="{instance}"}}[1m])')
    up = stack.query(f'up{{instance="{instance}"}}')
    return bool(result and up and float(result[0]["value"][1]) >= minimum and up[0]["value"][1] == "1")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus-stack")
    stack = Stack(workdir)
    try:
        cert, key = self_signed_cert(workdir)
        hashed = subprocess.run(sensor_argv("metrics-password"), input=TLS_PASSWORD + "\n", capture_output=True,
                                text=True, cwd=ROOT, timeout=60)
        assert hashed.returncode == 0, hashed.stderr
        (workdir / "tls.toml").write_text(
            "[metrics]\n"
            f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
            f'basic_auth_user = "{TLS_USER}"\nbasic_auth_hash = "{hashed.stdout.strip()}"\n')
        password_file = workdir / "metrics.password"
        password_file.write_text(TLS_PASSWORD)

        stack.demo = stack.start("demo", sensor_argv(
            "read", "--config", str(DEPLOY / "systemd" / "purge-sensor.toml"),
            "--signatures", str(ROOT / "signatures"), "--state", str(workdir / "demo.sqlite"),
            "-o", f"file:{workdir / 'demo.json'}", "--metrics", stack.demo_target, "--linger", "--quiet",
            str(DEMO)))
        stack.live = stack.start("live", sensor_argv(
            "run", "-i", "lo", "--state", str(workdir / "live.sqlite"), "--internal", "127.0.0.0/8",
            "-o", f"file:{workdir / 'live.json'}", "--metrics", stack.live_target, "--status-interval", "1"))
        stack.tls = stack.start("tls", sensor_argv(
            "read", "--config", str(workdir / "tls.toml"), "--no-state", "-o", f"file:{workdir / 'tls.json'}",
            "--metrics", stack.tls_target, "--linger", "--quiet", str(DEMO)))

        wait_for("the live sensor to open lo", lambda: "capturing on lo" in stack.live.stderr_text()
                 or not stack.live.alive(), 60)
        if not stack.live.alive():
            pytest.skip(f"live capture on lo unavailable (needs CAP_NET_RAW): {stack.live.stderr_text()[-300:]}")
        wait_for("the demo read to finish", lambda: "serving metrics" in stack.demo.stderr_text(), 120)
        wait_for("the TLS sensor to finish its read", lambda: "serving metrics" in stack.tls.stderr_text(), 120)

        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(prometheus_config(stack, cert, password_file)))
        check = subprocess.run(["promtool", "check", "config", str(config_path)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        stack.prometheus = stack.start("prometheus", [
            "prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{stack.ports['prometheus']}"])

        def ready():
            try:
                return fetch(f"http://127.0.0.1:{stack.ports['prometheus']}/-/ready", timeout=2)[0] == 200
            except OSError:
                assert stack.prometheus.alive(), stack.prometheus.stderr_text()[-2000:]
                return False

        wait_for("Prometheus to become ready", ready, 60)
        for target in (stack.demo_target, stack.live_target, stack.tls_target):
            wait_for(f"two scrapes of {target}", lambda t=target: samples_for(stack, t, 2), 60)
        # Traffic starts only now, so Prometheus sees the live counters move from their first value.
        wait_for("live packet and decode-error rates", lambda: stack.query(
            f'rate(purge_sensor_packets_total{{instance="{stack.live_target}"}}[{RATE_INTERVAL}]) > 0'
            f' and on () sum(rate(purge_sensor_decode_errors_total{{instance="{stack.live_target}"}}'
            f'[{RATE_INTERVAL}])) > 0'), 60, tick=stack.traffic, interval=0.5)
        for _ in range(3):
            stack.traffic()
        wait_for("the new-install alert on the live sensor", lambda: any(
            a["labels"].get("alertname") == "PurgeSensorNewInstallHost"
            and a["labels"].get("instance") == stack.live_target for a in stack.api("alerts")["alerts"]),
            60, tick=stack.traffic, interval=0.5)
        stack.query_end = time.time()
        yield stack
    finally:
        stack.close()


def detection_counts_from_json(path: Path) -> tuple[Counter, int]:
    """(detections by (action, category), host_detected alerts): a summary document stands for
    ``purge_sensor.summary.count`` detections."""
    detections, hosts = Counter(), 0
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        action = doc["event"]["action"]
        if action == "host_detected":
            hosts += 1
            continue
        summary = doc.get("purge_sensor", {}).get("summary")
        detections[(action, doc["rule"]["category"])] += summary["count"] if summary else 1
    return detections, hosts


def test_detection_counters_match_the_sensor_json_output(stack):
    expected, host_alerts = detection_counts_from_json(stack.workdir / "demo.json")
    assert sum(expected.values()) > 0
    result = stack.query(f'purge_sensor_detections_total{{instance="{stack.demo_target}"}}', stack.query_end)
    got = Counter({(r["metric"]["action"], r["metric"]["category"]): int(float(r["value"][1])) for r in result})
    assert got == expected
    total = stack.query(f'sum(purge_sensor_detections_total{{instance="{stack.demo_target}"}})', stack.query_end)
    assert int(float(total[0]["value"][1])) == sum(expected.values())
    hosts = stack.query(f'purge_sensor_hosts_detected_total{{instance="{stack.demo_target}"}}', stack.query_end)
    assert int(float(hosts[0]["value"][1])) == host_alerts > 0


def test_the_live_sensor_reports_its_filter_in_the_kernel(stack):
    """The kernel takes the sensor's filter on lo (the read sensor has no capture socket and
    no such series); a refused one would read 0 and fire PurgeSensorFilterInUserSpace."""
    result = stack.query("purge_sensor_capture_filter_in_kernel", stack.query_end)
    assert [(r["metric"]["instance"], r["metric"]["interface"], r["value"][1]) for r in result] == [
        (stack.live_target, "lo", "1")]


def test_host_gauges_match_the_inventory_command(stack):
    proc = subprocess.run(sensor_argv("hosts", "--state", str(stack.workdir / "demo.sqlite"), "--format", "json",
                                      "--all"), capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    inventory = json.loads(proc.stdout)
    expected = Counter((h["verdict"] or "none", h["state"]) for h in inventory)
    result = stack.query(f'purge_sensor_hosts{{instance="{stack.demo_target}"}}', stack.query_end)
    got = Counter({(r["metric"]["verdict"], r["metric"]["state"]): int(float(r["value"][1])) for r in result})
    assert got == expected and expected
    installs = {(h["ip"], h["hostname"] or "", h["verdict"]): h["last_seen_ts"] for h in inventory
                if h["verdict"] in ("install", "management_server", "oem_engine")}
    result = stack.query(f'purge_sensor_install_last_seen_timestamp_seconds{{instance="{stack.demo_target}"}}',
                         stack.query_end)
    series = {(r["metric"]["ip"], r["metric"].get("hostname", ""), r["metric"]["verdict"]): float(r["value"][1])
              for r in result}
    assert series.keys() == installs.keys() and installs
    for key, last_seen in installs.items():
        assert series[key] == pytest.approx(last_seen, abs=1e-3)


def panel_targets():
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            yield pytest.param(panel, target, id=f"{panel['title']}/{target['refId']}")


def substitute(expr: str) -> str:
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", "1m")
            .replace("$instance", ".+").replace("$job", ".+"))


def has_values(result: list) -> bool:
    for series in result:
        values = series.get("values") or [series["value"]]
        if any(not math.isnan(float(v)) for _, v in values):
            return True
    return False


@pytest.mark.parametrize("panel,target", list(panel_targets()))
def test_every_panel_query_returns_data(stack, panel, target):
    expr = substitute(target["expr"])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    if target.get("instant"):
        result = stack.query(expr, stack.query_end)
    else:
        result = stack.query_range(expr, stack.query_end - RANGE_SECONDS, stack.query_end)
    assert has_values(result), f"{panel['title']}: no data for {expr}"


def test_dashboard_variables_and_annotations_resolve(stack):
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    jobs = stack.api("label/job/values", **{"match[]": "purge_sensor_build_info"})
    assert "purge-sensor" in jobs
    match = re.match(r"label_values\((.*), (\w+)\)$", substitute(variables["instance"]["definition"]))
    instances = stack.api(f"label/{match.group(2)}/values", **{"match[]": match.group(1)})
    assert {stack.demo_target, stack.live_target, stack.tls_target} <= set(instances)
    for annotation in DASHBOARD["annotations"]["list"]:
        if "expr" in annotation:
            result = stack.query_range(substitute(annotation["expr"]), stack.query_end - RANGE_SECONDS,
                                       stack.query_end)
            assert has_values(result), annotation["name"]


def test_rules_evaluate_without_errors_against_real_series(stack):
    groups = stack.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules and all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
    exposed = set()
    for target in (stack.demo_target, stack.live_target):
        _, body = fetch(f"http://{target}/metrics")
        exposed |= {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and line[0] != "#"}
    used = set(re.findall(r"\bpurge_sensor_\w+", (DEPLOY / "prometheus" / "rules.yml").read_text()))
    used |= set(re.findall(r"\bpurge_sensor_\w+", json.dumps(DASHBOARD)))
    assert used <= exposed, f"not exported by the sensor: {used - exposed}"


@pytest.mark.parametrize("which", ["demo", "live"])
def test_exposition_passes_promtool_check_metrics(stack, which):
    target = stack.demo_target if which == "demo" else stack.live_target
    status, body = fetch(f"http://{target}/metrics")
    assert status == 200 and "purge_sensor_packets_total" in body
    proc = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_tls_exporter_requires_valid_credentials(stack):
    context = ssl.create_default_context(cafile=str(stack.workdir / "metrics.crt"))
    url = f"https://{stack.tls_target}/metrics"
    status, body = fetch(url, context=context, auth=(TLS_USER, TLS_PASSWORD))
    assert status == 200 and "purge_sensor_detections_total" in body
    assert fetch(url, context=context)[0] == 401
    assert fetch(url, context=context, auth=(TLS_USER, "wrong"))[0] == 401
    assert fetch(url, context=context, auth=("admin", TLS_PASSWORD))[0] == 401
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        fetch(f"http://{stack.tls_target}/metrics", timeout=5)
    with pytest.raises(urllib.error.URLError):
        fetch(url, context=ssl.create_default_context(), auth=(TLS_USER, TLS_PASSWORD))


def test_prometheus_scrapes_the_tls_exporter_with_the_example_config(stack):
    up = stack.query(f'up{{job="purge-sensor-tls", instance="{stack.tls_target}"}}', stack.query_end)
    assert up and up[0]["value"][1] == "1"
    detections = stack.query(f'sum(purge_sensor_detections_total{{instance="{stack.tls_target}"}})', stack.query_end)
    expected, _ = detection_counts_from_json(stack.workdir / "tls.json")
    assert int(float(detections[0]["value"][1])) == sum(expected.values())


def test_live_sensor_stops_cleanly_on_sigterm(stack):
    """Runs last in this module: the live sensor is done being scraped. systemd stops the
    service with SIGTERM and counts any other exit status as a failure."""
    stack.live.proc.send_signal(signal.SIGTERM)
    assert stack.live.proc.wait(timeout=30) == 0, stack.live.stderr_text()[-1000:]
    state = subprocess.run(sensor_argv("hosts", "--state", str(stack.workdir / "live.sqlite"), "--format", "json"),
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert state.returncode == 0, state.stderr
    assert any(h["ip"] == "127.0.0.1" and h["verdict"] == "install" for h in json.loads(state.stdout))
