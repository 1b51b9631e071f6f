"""deploy/systemd: the unit passes systemd's own checks, keeps its hardening, and the sample
config and ExecStart line are accepted by the sensor itself."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from sensor.cli import build_parser
from sensor.config import Settings, load_config

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "purge-sensor.service"
SAMPLE = SYSTEMD / "purge-sensor.toml"
SYSUSERS = SYSTEMD / "purge-sensor.sysusers"
INSTALLED_BINARY = "/usr/local/bin/purge-sensor"
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze not installed (Debian package systemd)")


def parse_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",),
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str
    parser.read(path)
    return parser


def unit_for_verify(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart pointing at an executable that exists here: systemd-analyze
    verify rejects a unit whose binary is missing."""
    binary = tmp_path / "purge-sensor"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    path = tmp_path / "purge-sensor.service"
    path.write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return path


def verify_problems(path: Path) -> list[str]:
    """systemd-analyze verify exits 0 on unknown keys and bad values and only prints them,
    so every line that names the unit file counts as a problem."""
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                          timeout=60)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if path.name in line]
    if proc.returncode != 0:
        lines.append(f"exit status {proc.returncode}: {proc.stderr.strip()}")
    return lines


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT)


def test_unit_runs_as_dedicated_user_with_only_capture_capabilities(unit):
    service = unit["Service"]
    assert service["User"] == "purge-sensor" and service["Group"] == "purge-sensor"
    assert set(service["AmbientCapabilities"].split()) == {"CAP_NET_RAW", "CAP_NET_ADMIN"}
    assert set(service["CapabilityBoundingSet"].split()) == {"CAP_NET_RAW", "CAP_NET_ADMIN"}
    assert service["NoNewPrivileges"] == "yes"


def test_unit_hardening(unit):
    service = unit["Service"]
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "purge-sensor"
    assert service["LogsDirectory"] == "purge-sensor"
    assert set(service["RestrictAddressFamilies"].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_PACKET", "AF_NETLINK"}
    for key in ("PrivateTmp", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces", "RestrictSUIDSGID",
                "LockPersonality", "PrivateDevices"):
        assert service[key] == "yes", key
    assert service["SystemCallFilter"] == "@system-service"
    assert service["MemoryMax"]


def test_reload_sends_sighup_and_stop_sends_sigterm(unit):
    service = unit["Service"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"


def environment(service) -> dict[str, str]:
    """systemd's Environment=: space-separated assignments, quoted as a shell would."""
    return dict(item.split("=", 1) for item in shlex.split(service["Environment"]))


def test_execstart_is_accepted_by_the_sensor_cli(unit):
    service = unit["Service"]
    interface = environment(service)["PURGE_SENSOR_INTERFACE"]
    argv = shlex.split(service["ExecStart"].replace("${PURGE_SENSOR_INTERFACE}", interface))
    assert argv[0] == INSTALLED_BINARY
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.interface == [interface]
    assert args.config == f"/etc/{service['ConfigurationDirectory']}/purge-sensor.toml"
    assert args.user is None, "systemd switches the user; --user would need root"


def test_signature_cache_is_the_units_private_cache_directory(unit):
    service = unit["Service"]
    assert environment(service)["PURGE_SENSOR_CACHE_DIR"] == f"/var/cache/{service['CacheDirectory']}"
    assert service["CacheDirectoryMode"] == "0700"


def test_sample_config_loads_and_matches_the_unit(unit):
    values = load_config(str(SAMPLE))
    settings = Settings(**values)
    assert settings.removal_start and settings.resolvers and settings.internal
    assert settings.signatures == ["/etc/purge-sensor/signatures"]
    assert settings.metrics == "127.0.0.1:9917"
    logs_dir = f"/var/log/{unit['Service']['LogsDirectory']}/"
    files = [o.split(":", 1)[1] for o in settings.outputs if o.startswith("file:")]
    assert files and all(f.startswith(logs_dir) for f in files), \
        "ProtectSystem=strict: the JSON file must live in LogsDirectory"
    assert settings.state is None, "the unit relies on $STATE_DIRECTORY for the SQLite store"


@needs_systemd_analyze
def test_systemd_analyze_verify_passes(tmp_path):
    assert verify_problems(unit_for_verify(tmp_path, UNIT.read_text())) == []


@needs_systemd_analyze
def test_verify_check_catches_a_broken_unit(tmp_path):
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictest")
    problems = verify_problems(unit_for_verify(tmp_path, broken))
    assert any("ProtectSystem" in line or "protect system" in line.lower() for line in problems)


@needs_systemd_analyze
def test_security_exposure_is_low(tmp_path):
    path = unit_for_verify(tmp_path, UNIT.read_text())
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=30", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_entry_creates_the_unit_user(tmp_path):
    proc = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", "--dry-run", str(SYSUSERS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Creating user 'purge-sensor'" in proc.stdout + proc.stderr


README = ROOT / "deploy" / "README.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[list[str]]:
    """Every ``purge-sensor ...`` invocation in the README's shell blocks, continuation lines
    joined, pipes, redirections and comments cut off."""
    commands = []
    for block in readme_blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"\s(?:\||&&|>)\s", line.split(" #")[0]):
                words = shlex.split(part)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words.pop(0)
                if words[:1] == ["timeout"]:
                    words = words[2:]
                if words[:1] == ["time"]:
                    words = words[1:]
                if words[:1] == ["purge-sensor"]:
                    commands.append(words[1:])
    return commands


def test_readme_commands_are_accepted_by_the_cli():
    commands = readme_commands()
    used = {c[0] for c in commands}
    assert {"run", "names", "read", "signatures", "metrics-password"} <= used
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"README command rejected: purge-sensor {shlex.join(argv)} ({err})")


def test_readme_config_snippets_load(tmp_path):
    for i, block in enumerate(readme_blocks("toml")):
        path = tmp_path / f"snippet{i}.toml"
        path.write_text(block)
        assert load_config(str(path))
    for block in readme_blocks("yaml"):
        assert yaml.safe_load(block)
    ini = readme_blocks("ini")
    assert ini and "INDEXED_EXTRACTIONS = json" in ini[0]
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#",))
    parser.read_string(ini[0])
    assert parser["purge_sensor:ecs"]["INDEXED_EXTRACTIONS"] == "json"
    assert parser["monitor:///var/log/purge-sensor/alerts.json"]["sourcetype"] == "purge_sensor:ecs"


def test_readme_covers_the_switches_and_sinks():
    text = README.read_text()
    for needle in ("monitor session", "analyzer", "mirred", "dvSwitch", "VXLAN", "TAP", "filestream",
                   "ndjson", "inputs.conf", "props.conf", "syslog+tls://", "cef+tcp://",
                   "signatures check", "systemctl reload", "--status-interval", "capture_drops_total"):
        assert needle in text, needle
