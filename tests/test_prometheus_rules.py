"""deploy/prometheus: promtool accepts the configs and rules, the unit tests pass, every alert
has a firing and a quiet case, and the unit tests actually depend on each rule."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules.yml"
RULES_TEST = PROM / "rules_test.yml"
pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool not installed (Debian package prometheus)")
REQUIRED_ALERTS = {"PurgeSensorNewInstallHost", "PurgeSensorInstallsAfterRemovalStart", "PurgeSensorDown",
                   "PurgeSensorNoPackets", "PurgeSensorCaptureDrops", "PurgeSensorFilterInUserSpace",
                   "PurgeSensorUpstreamCaptureLoss",
                   "PurgeSensorAlertSpoolGrowing"}


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_check_rules():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-tls.yml"])
def test_check_config(config, tmp_path):
    """The TLS example names files that exist only on a real Prometheus host; they are created
    empty here so promtool checks the rest."""
    text = (PROM / config).read_text()
    shutil.copy(RULES, tmp_path / "rules.yml")
    for name in ("purge-sensor-ca.pem", "purge-sensor-metrics.password"):
        (tmp_path / name).write_text("")
        text = text.replace(f"/etc/prometheus/{name}", str(tmp_path / name))
    (tmp_path / config).write_text(text)
    proc = promtool("check", "config", str(tmp_path / config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_unit_tests_pass():
    proc = promtool("test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_firing_and_quiet_cases():
    rules = alert_rules()
    assert REQUIRED_ALERTS <= set(rules)
    firing, quiet = set(), set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == set(rules), f"no firing case for {set(rules) - firing}"
    assert quiet == set(rules), f"no quiet case for {set(rules) - quiet}"


def test_every_alert_has_severity_and_text():
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_unit_tests_fail_when_the_rule_never_fires(alert, tmp_path):
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1) == 0"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    proc = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert alert in proc.stdout + proc.stderr


@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_unit_tests_fail_when_the_rule_always_fires(alert, tmp_path):
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1)"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    proc = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert alert in proc.stdout + proc.stderr
