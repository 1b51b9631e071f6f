"""``purge-sensor hosts`` and ``purge-sensor report``: the inventory for the people who remove.

Both read the SQLite state read-only, so they can run while a sensor is writing.  The
reference time for "active"/"dormant" and "days since" is the newest packet time the
sensor committed (a pcap analysed today describes the capture's days, not today).

BOD 17-01 milestones count from ``--start`` (default: the first detection): identify
within 30 days, plan within 60, begin removal within 90.  A host with evidence after
day 90 was "seen since removal began".

CSV cells that a spreadsheet would run as a formula (leading ``= + - @`` or a control
character) are prefixed with ``'``: hostnames come from the wire.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import ipaddress
import json
import math
import os
import sys
import time
from datetime import datetime, timezone

from ..track.store import Store, StoreError, default_state_path
from ..track.verdict import INSTALL_VERDICTS, VERDICTS, iso_utc, summarize

EXIT_OK, EXIT_USAGE = 0, 2
DAY = 86400.0
MILESTONES = (("identify", 30), ("plan", 60), ("remove", 90))
VERDICT_ORDER = {v: i for i, v in enumerate(VERDICTS)}
MAX_TIMELINE_POINTS = 370
EVENTS_PER_HOST = 5
CSV_HOST_FIELDS = ("ip", "mac", "hostname", "verdict", "confidence", "state", "role", "first_seen",
                   "last_seen", "evidence", "categories", "indicators", "fallback_dns")


def register(subparsers) -> None:
    hosts = subparsers.add_parser(
        "hosts", help="list the host inventory (who still runs Kaspersky, with evidence)",
        description="List the hosts of the inventory with their verdict (install, management_server, "
                    "oem_engine, website_only), activity state, first/last evidence time (UTC), evidence "
                    "counts by action and category, and the top matched names. Hosts whose evidence "
                    "proves nothing (verdict none, e.g. a resolver's forwarded queries) are listed only "
                    "with --all or --verdict none.")
    _common(hosts)
    hosts.add_argument("--format", choices=("table", "json", "csv"), default="table",
                       help="output format (default table)")
    hosts.add_argument("--verdict", action="append", choices=VERDICTS, metavar="V",
                       help="only hosts with this verdict (repeatable): " + ", ".join(VERDICTS))
    hosts.add_argument("--all", action="store_true", help="include hosts with verdict none")
    hosts.set_defaults(func=cmd_hosts)

    report = subparsers.add_parser(
        "report", help="BOD 17-01 compliance report (HTML, CSV or JSON)",
        description="Write a compliance report for the people who must act: hosts to remove with "
                    "evidence, first and last seen, days since first detection against the 30/60/90-day "
                    "milestones (identify, plan, begin removal) of the start date, and the hosts seen "
                    "since removal began. The HTML report is one self-contained file (inline SVG "
                    "timeline of active installs and a chart by evidence category) that opens in a "
                    "browser without network access.")
    _common(report)
    report.add_argument("--format", choices=("html", "csv", "json"), required=True, help="report format")
    report.add_argument("--start", type=_date, metavar="DATE",
                        help="start of the removal programme, YYYY-MM-DD (default: the first detection)")
    report.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    report.set_defaults(func=cmd_report)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", metavar="PATH",
                   help="SQLite inventory (default: $PURGE_SENSOR_STATE, $STATE_DIRECTORY/inventory.sqlite "
                        "or ~/.local/state/purge-sensor/inventory.sqlite)")
    p.add_argument("--dormant-days", type=float, default=14.0, metavar="DAYS",
                   help="a host without evidence for this long is dormant (default 14)")


def _date(text: str) -> float:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (want YYYY-MM-DD): {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _fail(message: str) -> int:
    print(f"purge-sensor: {message}", file=sys.stderr)
    return EXIT_USAGE


def load_inventory(path: str, dormant_days: float):
    """(host summaries, reference time, open read-only store); StoreError/OSError when unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    store = Store(path, readonly=True)
    reference = store.last_ts() or time.time()
    evidence = store.evidence_by_host()
    hosts = []
    for key, ip, mac, hostname, role, first, last, _, _, detected in store.host_rows():
        hosts.append(summarize(key=key, ip=ip, mac=mac, hostname=hostname, role=role, first_seen=first,
                               last_seen=last, detected_at=detected, evidence=evidence.get(key, ()),
                               reference=reference, dormant_days=dormant_days))
    hosts.sort(key=lambda h: (VERDICT_ORDER.get(h["verdict"], 99), _ip_order(h["ip"]), h["key"]))
    return hosts, reference, store


def _ip_order(ip: str | None) -> tuple:
    try:
        address = ipaddress.ip_address(ip or "")
    except ValueError:
        return (9, 0)
    return (address.version, int(address))


def _open(args):
    path = args.state or default_state_path()
    try:
        return load_inventory(path, args.dormant_days)
    except FileNotFoundError:
        return _fail(f"no inventory at {path} (run 'purge-sensor read --state {path}' first)")
    except (StoreError, OSError, ValueError) as err:
        return _fail(f"cannot read inventory {path}: {err}")


def cmd_hosts(args) -> int:
    opened = _open(args)
    if isinstance(opened, int):
        return opened
    hosts, _, store = opened
    store.close()
    if args.verdict:
        hosts = [h for h in hosts if h["verdict"] in args.verdict]
    elif not args.all:
        hosts = [h for h in hosts if h["verdict"] != "none"]
    out = sys.stdout
    if args.format == "json":
        json.dump(hosts, out, indent=2)
        out.write("\n")
    elif args.format == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_HOST_FIELDS)
        for h in hosts:
            writer.writerow([_cell(_flat(h[f])) for f in CSV_HOST_FIELDS])
    else:
        _table(hosts, out)
    return EXIT_OK


def _flat(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ";".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return str(value)


def _cell(text: str) -> str:
    if text and (text[0] in "=+-@" or ord(text[0]) < 0x20):
        return "'" + text
    return text


def _table(hosts: list[dict], out) -> None:
    header = ("IP", "MAC", "HOSTNAME", "VERDICT", "CONF", "STATE", "FIRST SEEN", "LAST SEEN", "EVIDENCE",
              "TOP INDICATOR")
    rows = [header]
    for h in hosts:
        rows.append((h["ip"] or "-", h["mac"] or "-", h["hostname"] or "-", h["verdict"], h["confidence"],
                     h["state"], h["first_seen"], h["last_seen"],
                     ",".join(f"{k}={v}" for k, v in h["evidence"].items()),
                     h["indicators"][0] if h["indicators"] else "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header) - 1)]
    for row in rows:
        out.write("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + str(row[-1]) + "\n")


# -- report ----------------------------------------------------------------------------------


def build_report(hosts: list[dict], reference: float, start: float | None, dormant_days: float,
                 events: dict[str, list[tuple]] | None = None) -> dict:
    """The report as data; the HTML, CSV and JSON renderings all come from this."""
    installs = [h for h in hosts if h["verdict"] in INSTALL_VERDICTS]
    if start is None:
        first = min((h["first_seen_ts"] for h in installs), default=reference)
        start = math.floor(first / DAY) * DAY
    removal_began = start + 90 * DAY
    days_since_start = (reference - start) / DAY
    phase = next((name for name, days in MILESTONES if days_since_start < days), "overdue")
    to_remove = []
    for h in installs:
        entry = dict(h)
        entry["days_since_first_detection"] = int((reference - h["first_seen_ts"]) // DAY)
        entry["seen_since_removal_began"] = h["last_seen_ts"] >= removal_began
        entry["events"] = [
            {"ts": iso_utc(ts), "action": action, "indicator": indicator, "signature": sig, "flow": flow,
             "detail": json.loads(detail) if detail else {}}
            for ts, action, indicator, sig, flow, detail in (events or {}).get(h["key"], [])]
        to_remove.append(entry)
    by_verdict: dict[str, int] = {}
    for h in hosts:
        by_verdict[h["verdict"]] = by_verdict.get(h["verdict"], 0) + 1
    categories: dict[str, dict[str, int]] = {}
    for h in installs:
        for category, count in h["categories"].items():
            slot = categories.setdefault(category, {"hosts": 0, "evidence": 0})
            slot["hosts"] += 1
            slot["evidence"] += count
    return {
        "generated_at": iso_utc(time.time()),
        "reference_time": iso_utc(reference),
        "start": iso_utc(start),
        "milestones": {name: iso_utc(start + days * DAY) for name, days in MILESTONES},
        "days_since_start": math.floor(days_since_start),
        "phase": phase if days_since_start >= 0 else "not_started",
        "dormant_days": dormant_days,
        "summary": {
            "hosts_to_remove": len(installs),
            "active": sum(1 for h in installs if h["state"] == "active"),
            "dormant": sum(1 for h in installs if h["state"] == "dormant"),
            "seen_since_removal_began": sum(1 for h in to_remove if h["seen_since_removal_began"]),
            "by_verdict": dict(sorted(by_verdict.items())),
        },
        "hosts": to_remove,
        "seen_since_removal_began": [h["ip"] for h in to_remove if h["seen_since_removal_began"]],
        "timeline": _timeline(installs, start, reference, dormant_days),
        "categories": dict(sorted(categories.items(), key=lambda kv: (-kv[1]["hosts"], kv[0]))),
    }


def _timeline(installs: list[dict], start: float, reference: float, dormant_days: float) -> list[dict]:
    """Install-type hosts per day, each counted from its first detection until it went dormant
    (``dormant_days`` after its last evidence); weekly points past a year."""
    first = min([start] + [h["first_seen_ts"] for h in installs])
    begin = math.floor(first / DAY) * DAY
    days = max(1, int((reference - begin) // DAY) + 1)
    step = DAY if days <= MAX_TIMELINE_POINTS else 7 * DAY
    points = []
    t = begin
    limit = dormant_days * DAY
    while t <= reference and len(points) < MAX_TIMELINE_POINTS * 2:
        end = t + step
        active = sum(1 for h in installs if h["first_seen_ts"] < end and t - h["last_seen_ts"] <= limit)
        points.append({"date": iso_utc(t)[:10], "active_installs": active})
        t = end
    return points


def cmd_report(args) -> int:
    opened = _open(args)
    if isinstance(opened, int):
        return opened
    hosts, reference, store = opened
    try:
        events = {h["key"]: store.events(h["key"], EVENTS_PER_HOST) for h in hosts
                  if h["verdict"] in INSTALL_VERDICTS}
    finally:
        store.close()
    report = build_report(hosts, reference, args.start, args.dormant_days, events)
    if args.format == "json":
        text = json.dumps(report, indent=2) + "\n"
    elif args.format == "csv":
        text = render_csv(report)
    else:
        text = render_html(report)
    if not args.output or args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    try:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as err:
        return _fail(f"cannot write {args.output}: {err.strerror}")
    return EXIT_OK


def render_csv(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    fields = CSV_HOST_FIELDS + ("days_since_first_detection", "seen_since_removal_began")
    milestones = report["milestones"]
    writer.writerow(fields + ("start", "identify_by", "plan_by", "removal_by"))
    for h in report["hosts"]:
        writer.writerow([_cell(_flat(h[f])) for f in fields]
                        + [report["start"], milestones["identify"], milestones["plan"], milestones["remove"]])
    return buf.getvalue()


# -- HTML ----------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em;color:#1d232a}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#eef}.num{text-align:right}.late{color:#b00020;font-weight:bold}
.muted{color:#667}svg{background:#fafbff;border:1px solid #ccd}code{font-size:12px}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _svg_timeline(points: list[dict], milestones: dict, width: int = 860, height: int = 260) -> str:
    left, right, top, bottom = 50, 20, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(points)
    peak = max([p["active_installs"] for p in points] + [1])
    x = (lambda i: left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2))
    y = (lambda v: top + plot_h - plot_h * v / peak)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="Active installs per day">',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#445"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#445"/>']
    for tick in sorted({0, peak // 2, peak}):
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11">{tick}</text>')
    if points:
        coords = " ".join(f"{x(i):.1f},{y(p['active_installs']):.1f}" for i, p in enumerate(points))
        parts.append(f'<polyline fill="none" stroke="#b00020" stroke-width="2" points="{coords}"/>')
        for i in sorted({0, n // 2, n - 1}):
            anchor = "start" if i == 0 else "end" if i == n - 1 else "middle"
            parts.append(f'<text x="{x(i):.1f}" y="{height - 12}" text-anchor="{anchor}" font-size="11">'
                         f'{_e(points[i]["date"])}</text>')
        dates = [p["date"] for p in points]
        for name, when in milestones.items():
            day = when[:10]
            if dates[0] <= day <= dates[-1]:
                i = next(k for k, d in enumerate(dates) if d >= day)
                parts.append(f'<line x1="{x(i):.1f}" y1="{top}" x2="{x(i):.1f}" y2="{top + plot_h}" '
                             f'stroke="#2255aa" stroke-dasharray="4 3"/>')
                parts.append(f'<text x="{x(i) + 3:.1f}" y="{top + 10}" font-size="11" fill="#2255aa">'
                             f'{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_categories(categories: dict, width: int = 860) -> str:
    rows = list(categories.items())
    bar_h, gap, label_w = 22, 6, 140
    height = max(40, len(rows) * (bar_h + gap) + 20)
    peak = max([c["hosts"] for _, c in rows] + [1])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="Hosts to remove by evidence category">']
    for i, (name, counts) in enumerate(rows):
        top = 10 + i * (bar_h + gap)
        length = (width - label_w - 200) * counts["hosts"] / peak
        parts.append(f'<text x="{label_w - 8}" y="{top + 15}" text-anchor="end" font-size="12">{_e(name)}</text>')
        parts.append(f'<rect x="{label_w}" y="{top}" width="{length:.1f}" height="{bar_h}" fill="#2255aa"/>')
        parts.append(f'<text x="{label_w + length + 6:.1f}" y="{top + 15}" font-size="12">{counts["hosts"]} hosts, '
                     f'{counts["evidence"]} events</text>')
    if not rows:
        parts.append('<text x="10" y="25" font-size="12">no evidence</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict) -> str:
    s = report["summary"]
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">',
           "<title>Kaspersky removal report (BOD 17-01)</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>Kaspersky removal report (BOD 17-01)</h1>",
           f'<p class="muted">Evidence up to {_e(report["reference_time"])}; generated '
           f'{_e(report["generated_at"])} by purge-sensor. A host is dormant after '
           f'{report["dormant_days"]:g} days without evidence.</p>',
           "<h2>Milestones</h2><table><tr><th>start</th><th>identify (30 days)</th><th>plan (60 days)</th>"
           "<th>begin removal (90 days)</th><th>days since start</th><th>phase</th></tr>",
           f'<tr><td>{_e(report["start"][:10])}</td><td>{_e(report["milestones"]["identify"][:10])}</td>'
           f'<td>{_e(report["milestones"]["plan"][:10])}</td><td>{_e(report["milestones"]["remove"][:10])}</td>'
           f'<td class="num">{_e(report["days_since_start"])}</td><td>{_e(report["phase"])}</td></tr></table>',
           "<h2>Summary</h2><table>",
           f'<tr><th>hosts to remove</th><td class="num">{s["hosts_to_remove"]}</td></tr>',
           f'<tr><th>active</th><td class="num">{s["active"]}</td></tr>',
           f'<tr><th>dormant (possibly removed)</th><td class="num">{s["dormant"]}</td></tr>',
           f'<tr><th>seen since removal began</th><td class="num">{s["seen_since_removal_began"]}</td></tr>']
    for verdict, count in s["by_verdict"].items():
        out.append(f'<tr><th>verdict {_e(verdict)}</th><td class="num">{count}</td></tr>')
    out.append("</table>")
    out.append("<h2>Active installs over time</h2>")
    out.append(_svg_timeline(report["timeline"], report["milestones"]))
    out.append("<h2>Hosts to remove by evidence category</h2>")
    out.append(_svg_categories(report["categories"]))
    out.append("<h2>Hosts to remove</h2>")
    out.append(_host_table(report["hosts"]))
    late = [h for h in report["hosts"] if h["seen_since_removal_began"]]
    out.append("<h2>Hosts seen since removal began</h2>")
    out.append(_host_table(late) if late else "<p>None.</p>")
    out.append("<h2>Evidence samples</h2>")
    for h in report["hosts"]:
        out.append(f'<h3>{_e(h["ip"])} {_e(h["hostname"] or "")}</h3>')
        if not h["events"]:
            out.append('<p class="muted">no sampled events</p>')
            continue
        out.append("<table><tr><th>time (UTC)</th><th>action</th><th>indicator</th><th>signature</th>"
                   "<th>flow</th></tr>")
        for ev in h["events"]:
            out.append(f'<tr><td>{_e(ev["ts"])}</td><td>{_e(ev["action"])}</td><td><code>{_e(ev["indicator"])}'
                       f'</code></td><td>{_e(ev["signature"])}</td><td><code>{_e(ev["flow"])}</code></td></tr>')
        out.append("</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _host_table(hosts: list[dict]) -> str:
    rows = ["<table><tr><th>IP</th><th>hostname</th><th>MAC</th><th>verdict</th><th>state</th>"
            "<th>first seen</th><th>last seen</th><th>days since first detection</th><th>evidence</th>"
            "<th>top indicators</th></tr>"]
    for h in hosts:
        late = ' class="late"' if h["seen_since_removal_began"] else ""
        evidence = "<br>".join(f"{_e(k)}: {v}" for k, v in h["evidence"].items())
        indicators = "<br>".join(f"<code>{_e(i)}</code>" for i in h["indicators"][:5])
        rows.append(f'<tr><td>{_e(h["ip"])}</td><td>{_e(h["hostname"] or "")}</td><td>{_e(h["mac"] or "")}</td>'
                    f'<td>{_e(h["verdict"])} ({_e(h["confidence"])})</td><td>{_e(h["state"])}</td>'
                    f'<td>{_e(h["first_seen"])}</td><td{late}>{_e(h["last_seen"])}</td>'
                    f'<td class="num">{h["days_since_first_detection"]}</td><td>{evidence}</td>'
                    f"<td>{indicators}</td></tr>")
    rows.append("</table>")
    return "".join(rows)
