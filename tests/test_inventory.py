"""``hosts`` and ``report`` commands on a store populated through the tracker."""

import argparse
import csv
import io
import json
import re
from datetime import datetime, timezone

import pytest

from sensor.output import inventory
from sensor.records import DhcpLease
from sensor.track.store import Store
from test_store import capture
from test_tracker import T0, Harness, ctx, hello, query, response

DAY = 86400


def parser():
    p = argparse.ArgumentParser(prog="purge-sensor")
    sub = p.add_subparsers(dest="command", required=True)
    inventory.register(sub)
    return p


def run(argv, capsys):
    args = parser().parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def state(tmp_path):
    path = str(tmp_path / "inv.sqlite")
    h = Harness(store=Store(path))
    h.feed_all(capture())
    h.feed_all([
        DhcpLease(ctx(T0 + 6, "10.0.0.1", "10.0.1.9", 67, 68), "aa:bb:cc:00:00:09", "10.0.1.9",
                  "=cmd|'/c calc'!A1<script>"),
        hello(T0 + 7, "10.0.1.9", "203.0.113.12", "activation-v2.kaspersky.com"),
        query(T0 + 8, "10.0.0.53", "198.51.100.53", "dc1.ksn.kaspersky-labs.com"),
        response(T0 + 8.1, "10.0.0.53", "10.0.1.1", "example.org", ["192.0.2.1"]),
        hello(T0 + 100 * DAY, "10.0.1.5", "203.0.113.10", "s01.upd.kaspersky.com"),
    ])
    h.tracker.close()
    return path


def hosts_json(state, capsys, *extra):
    code, out, err = run(["hosts", "--state", state, "--format", "json", *extra], capsys)
    assert code == 0 and err == ""
    return {h["ip"]: h for h in json.loads(out)}


def test_hosts_json_lists_the_expected_hosts_with_verdicts(state, capsys):
    hosts = hosts_json(state, capsys)
    assert {ip: h["verdict"] for ip, h in hosts.items()} == {
        "10.0.1.5": "install", "10.0.1.6": "install", "10.0.1.8": "install", "10.0.1.9": "install",
        "10.0.5.1": "management_server", "10.0.1.7": "website_only"}
    pc5 = hosts["10.0.1.5"]
    for key in ("ip", "mac", "hostname", "verdict", "state", "first_seen", "last_seen", "evidence", "categories",
                "indicators"):
        assert key in pc5
    assert (pc5["mac"], pc5["hostname"]) == ("aa:bb:cc:00:00:05", "PC-5")
    assert pc5["evidence"] == {"dns_query": 1, "tls_sni": 2} and pc5["categories"] == {"update": 3}
    assert pc5["indicators"] == ["s01.upd.kaspersky.com"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", pc5["first_seen"])
    assert datetime.fromisoformat(pc5["last_seen"].replace("Z", "+00:00")) == \
        datetime.fromtimestamp(T0 + 100 * DAY, timezone.utc)
    assert pc5["state"] == "active" and hosts["10.0.1.6"]["state"] == "dormant"


def test_hosts_filters(state, capsys):
    assert set(hosts_json(state, capsys, "--verdict", "management_server")) == {"10.0.5.1"}
    assert set(hosts_json(state, capsys, "--verdict", "website_only", "--verdict", "management_server")) == \
        {"10.0.5.1", "10.0.1.7"}
    everything = hosts_json(state, capsys, "--all")
    assert everything["10.0.0.53"]["verdict"] == "none" and everything["10.0.0.53"]["role"] == "resolver"
    assert set(hosts_json(state, capsys, "--verdict", "none")) == {"10.0.0.53"}
    assert hosts_json(state, capsys, "--dormant-days", "1000")["10.0.1.6"]["state"] == "active"


def test_hosts_csv_guards_against_formula_injection(state, capsys):
    code, out, _ = run(["hosts", "--state", state, "--format", "csv"], capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 6
    by_ip = {r["ip"]: r for r in rows}
    assert by_ip["10.0.1.9"]["hostname"].startswith("'=cmd")
    assert by_ip["10.0.1.5"]["evidence"] == "dns_query=1;tls_sni=2"
    assert by_ip["10.0.1.5"]["verdict"] == "install"


def test_hosts_table(state, capsys):
    code, out, _ = run(["hosts", "--state", state], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["IP", "MAC", "HOSTNAME", "VERDICT"]
    assert len(lines) == 7
    assert any(line.startswith("10.0.5.1 ") and "management_server" in line for line in lines)


def test_missing_state_is_a_usage_error_naming_the_path(tmp_path, capsys):
    missing = str(tmp_path / "nope.sqlite")
    for argv in (["hosts", "--state", missing], ["report", "--state", missing, "--format", "json"]):
        code, out, err = run(argv, capsys)
        assert code == 2 and out == "" and missing in err
    assert not (tmp_path / "nope.sqlite").exists()


def test_bad_arguments_exit_2(state, capsys):
    for argv in (["report", "--state", state], ["report", "--state", state, "--format", "pdf"],
                 ["report", "--state", state, "--format", "json", "--start", "last tuesday"],
                 ["hosts", "--state", state, "--verdict", "maybe"]):
        with pytest.raises(SystemExit) as exc:
            parser().parse_args(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_help_has_descriptions(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["report", "--help"])
    assert "30/60/90-day" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser().parse_args(["hosts", "--help"])
    assert "verdict" in capsys.readouterr().out


def test_report_json_milestones_and_late_hosts(state, capsys):
    start = datetime.fromtimestamp(T0, timezone.utc).strftime("%Y-%m-%d")
    code, out, _ = run(["report", "--state", state, "--format", "json", "--start", start], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["start"].startswith(start)
    assert report["milestones"]["remove"][:10] == datetime.fromtimestamp(
        datetime.fromisoformat(start).replace(tzinfo=timezone.utc).timestamp() + 90 * DAY, timezone.utc
    ).strftime("%Y-%m-%d")
    assert report["phase"] == "overdue" and report["days_since_start"] == 100
    assert report["seen_since_removal_began"] == ["10.0.1.5"]
    by_ip = {h["ip"]: h for h in report["hosts"]}
    assert set(by_ip) == {"10.0.1.5", "10.0.1.6", "10.0.1.8", "10.0.1.9", "10.0.5.1"}
    assert by_ip["10.0.1.6"]["days_since_first_detection"] == 99
    assert by_ip["10.0.1.5"]["events"][0]["action"] in ("dns_query", "tls_sni")
    assert report["summary"]["hosts_to_remove"] == 5 and report["summary"]["active"] == 1
    assert report["summary"]["by_verdict"]["website_only"] == 1
    assert report["categories"]["management"]["hosts"] == 2
    timeline = report["timeline"]
    assert len(timeline) == 101
    assert timeline[0]["active_installs"] == 5 and timeline[50]["active_installs"] == 1
    assert timeline[-1]["active_installs"] == 1


def test_report_csv(state, capsys):
    code, out, _ = run(["report", "--state", state, "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 5
    assert {r["seen_since_removal_began"] for r in rows} == {"True", "False"}
    assert all(r["removal_by"] for r in rows)


def test_report_html_is_self_contained_and_escaped(state, capsys, tmp_path):
    target = tmp_path / "report.html"
    code, out, _ = run(["report", "--state", state, "--format", "html", "--output", str(target)], capsys)
    assert code == 0 and out == ""
    page = target.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2
    assert "<script" not in page and "&lt;script&gt;" in page
    assert not re.search(r"""(src|href)\s*=|url\(|@import""", page)
    assert "10.0.5.1" in page and "management_server" in page and "Hosts seen since removal began" in page
