"""ArcSight CEF, built from the ECS document so both formats always say the same thing.

``CEF:0|Purge Sensor|purge-sensor|<sensor version>|<rule.id>|<rule.name>|<0-10>|<extension>``

Extension keys (standard CEF dictionary; custom strings carry their labels):
``rt`` event time (ms since epoch), ``src spt smac dst dpt dmac proto app``, ``shost``
(internal host's name when it is the source), ``dhost`` (destination.domain), ``act``
(event.action), ``msg`` (rule name), ``cnt`` (suppressed repeats in a summary),
``dvchost`` (observer), ``externalId`` (event.id), ``requestMethod request
requestClientApplication`` for HTTP, ``cs1`` indicator, ``cs2`` category, ``cs3`` strength,
``cs4`` ruleset, ``cs5`` OEM vendor, ``cs6`` tunnel path.  Host events add
``cs2`` verdict and ``cs1`` the indicators seen.

Severity: strong 8 (High), medium 5, weak 3, anything else 1.
"""

from __future__ import annotations

from datetime import datetime, timezone

from .. import __version__
from .escape import cef_extension_value, cef_header
from .syslog import DEFAULT_FACILITY, DEFAULT_SD_ID, format_rfc5424

VENDOR = "Purge Sensor"
PRODUCT = "purge-sensor"
MAX_VALUE = 1023  # the common CEF limit for string extension values


def cef_severity(doc: dict) -> int:
    severity = doc.get("event", {}).get("severity", 0) or 0
    if severity >= 73:
        return 8
    if severity >= 47:
        return 5
    if severity >= 21:
        return 3
    return 1


def _epoch_ms(timestamp: str | None) -> int | None:
    try:
        moment = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None
    return int(moment.timestamp() * 1000)


def _extension(doc: dict) -> list[tuple[str, object]]:
    event = doc.get("event", {})
    source = doc.get("source", {})
    destination = doc.get("destination", {})
    network = doc.get("network", {})
    host = doc.get("host", {})
    rule = doc.get("rule", {})
    custom = doc.get("purge_sensor", {})
    host_details = custom.get("host", {})
    host_ip = host.get("ip")
    indicators = host_details.get("indicators")
    fields: list[tuple[str, object]] = [
        ("rt", _epoch_ms(doc.get("@timestamp"))),
        ("src", source.get("ip") or (host_ip if not source else None)),
        ("spt", source.get("port")),
        ("smac", source.get("mac") or (host.get("mac") if not source else None)),
        ("shost", host.get("hostname") if not source or host_ip == source.get("ip") else None),
        ("dst", destination.get("ip")),
        ("dpt", destination.get("port")),
        ("dmac", destination.get("mac")),
        ("dhost", destination.get("domain")),
        ("proto", network.get("transport", "").upper() or None),
        ("app", network.get("protocol")),
        ("act", event.get("action")),
        ("msg", rule.get("name") or event.get("action")),
        ("cnt", custom.get("summary", {}).get("count")),
        ("dvchost", doc.get("observer", {}).get("name")),
        ("externalId", event.get("id")),
        ("requestMethod", doc.get("http", {}).get("request", {}).get("method")),
        ("request", doc.get("url", {}).get("path")),
        ("requestClientApplication", doc.get("user_agent", {}).get("original")),
        ("cs1", custom.get("indicator") or (",".join(map(str, indicators)) if indicators else None)),
        ("cs1Label", "indicator"),
        ("cs2", rule.get("category") or host_details.get("verdict")),
        ("cs2Label", "category" if rule.get("category") and "verdict" not in host_details
         else "verdict"),
        ("cs3", custom.get("strength") or host_details.get("state")),
        ("cs3Label", "strength" if custom.get("strength") else "state"),
        ("cs4", rule.get("ruleset")),
        ("cs4Label", "ruleset"),
        ("cs5", custom.get("vendor")),
        ("cs5Label", "oemVendor"),
        ("cs6", " / ".join(custom.get("tunnel", ())) or None),
        ("cs6Label", "tunnel"),
    ]
    present = {key for key, value in fields if value not in (None, "") and not key.endswith("Label")}
    return [(key, value) for key, value in fields if value not in (None, "")
            and (not key.endswith("Label") or key[:-5] in present)]


def ecs_to_cef(doc: dict) -> str:
    rule = doc.get("rule", {})
    action = doc.get("event", {}).get("action", "event")
    header = "|".join((
        "CEF:0", cef_header(VENDOR), cef_header(PRODUCT), cef_header(__version__),
        cef_header(rule.get("id") or action), cef_header(rule.get("name") or action),
        str(cef_severity(doc)),
    ))
    extension = " ".join(f"{key}={cef_extension_value(str(value)[:MAX_VALUE])}"
                         for key, value in _extension(doc))
    return f"{header}|{extension}"


def cef_syslog_message(doc: dict, *, sd_id: str = DEFAULT_SD_ID, facility: int = DEFAULT_FACILITY,
                       hostname: str | None = None) -> bytes:
    return format_rfc5424(doc, ecs_to_cef(doc), sd_id=sd_id, facility=facility, hostname=hostname)
