"""Detections and host events as Elastic Common Schema documents (nested objects).

Field choices, where ECS leaves room:

* ``source.*``/``destination.*`` follow the packet's own direction; ``host.*`` is the
  internal host the evidence is attributed to (for a DNS answer that is the destination).
* ``destination.domain`` is the name the client asked for (the DNS question, the SNI, the
  Host header); ``threat.indicator.url.domain`` is the name that matched the signature,
  which for a DNS answer may be a CNAME target rather than the question.
* Encapsulation has no ECS home, so the tunnel path (outermost first, e.g.
  ``"vxlan vni=42"``) goes to the custom ``purge_sensor.tunnel`` list; the capture
  interface index goes to ``observer.ingress.interface.id``.  QinQ: the outer tag is
  ``network.vlan.id``, the inner one ``network.inner.vlan.id`` (ECS's own convention).
* ``event.severity`` uses the Elastic risk-score bands (strong 73, medium 47, weak 21).
* ``event.id`` is random per document (a version-4 UUID in hex): delivery is
  at-least-once, so a SIEM that wants exactly-once deduplicates on it.
* Everything product-specific lives under ``purge_sensor.*``; ``purge_sensor.indicator``
  is the matched value whatever its type (name, JA3 hash, address).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random

import orjson

from .. import __version__
from ..isotime import iso_micro
from ..records import (ClientHello, Detection, DnsMessage, HostEvent, HttpRequest,
                       escape_text_bytes)

SEVERITY = {"strong": 73, "medium": 47, "weak": 21, "none": 0}
HOST_DETECTED_SEVERITY = 73
MAX_LIST_ITEMS = 64  # answers, indicators, evidence: a SIEM document must stay small

DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
             28: "AAAA", 33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT", 43: "DS",
             46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
DNS_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
              5: "REFUSED", 6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH",
              10: "NOTZONE"}
FINGERPRINT_KINDS = ("ja3", "ja4")
PORT_ACTION = "ksc_port"  # the indicator is ``ip:port/transport``, not a name


# uuid4() asks the kernel for 16 bytes per call, and each such call lets libpcap's reader
# thread take the GIL: 20 us an alert while a capture is read, against 3 us for this
# generator, seeded from os.urandom at import and again in every forked child (--workers)
# so that no two processes share a sequence.
_event_ids = random.Random()
os.register_at_fork(after_in_child=_event_ids.seed)
# The bits uuid.UUID(version=4) sets, set here without building the object: version
# nibble 0100 (bits 76-79), variant 10 (bits 62-63), RFC 9562.
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID4_SET = (0x4 << 76) | (0x2 << 62)


def event_id() -> str:
    return "%032x" % (_event_ids.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)


def iso_time(ts: float) -> str:
    """ISO 8601 UTC with microseconds and ``Z``; an impossible time becomes the epoch
    rather than an exception, since ``ts`` comes from a capture file."""
    try:
        return iso_micro(ts)
    except (OverflowError, OSError, ValueError, TypeError):
        return iso_micro(0.0)


def dns_type_name(rtype: int) -> str:
    """Mnemonic, or RFC 3597's ``TYPEnnn`` for types without one."""
    return DNS_TYPES.get(rtype) or f"TYPE{rtype}"


def _unique(values) -> list:
    seen = []
    for value in values:
        if value and value not in seen:
            seen.append(value)
    return seen


def _ip_type(text: str) -> str | None:
    """The indicator's address family, if it is an address.  Most indicators are names,
    which ``ip_address`` rejects with two exceptions; a name has no ``:`` and does not
    start with a digit (the ones that do still get asked).  ``ip_address`` also takes an
    IPv6 scope (``fe80::1%eth0``), where anything may follow the ``%``: a hostile name such
    as ``::%.kaspersky.com`` would be typed an address, and a SIEM that maps
    ``threat.indicator.ip`` as an address rejects the whole alert.  No indicator is a
    scoped address."""
    if "%" in text or (":" not in text and not text[:1].isdigit()):
        return None
    try:
        return "ipv%d-addr" % ipaddress.ip_address(text).version
    except ValueError:
        return None


def _endpoint(ip: str, port: int, mac: str | None) -> dict:
    out: dict = {"ip": ip, "port": port}
    if mac:
        out["mac"] = _ecs_mac(mac)
    return out


def _ecs_mac(mac: str) -> str:
    """ECS wants upper-case, dash-separated MACs."""
    return mac.replace(":", "-").upper()


def _network(det: Detection) -> dict:
    ctx = det.ctx
    network: dict = {"transport": ctx.transport, "type": f"ipv{ctx.ip_version}"}
    protocol = _protocol(det)
    if protocol:
        network["protocol"] = protocol
    if ctx.vlan:
        network["vlan"] = {"id": str(ctx.vlan[0])}
        if len(ctx.vlan) > 1:
            network["inner"] = {"vlan": {"id": str(ctx.vlan[1])}}
    return network


def _protocol(det: Detection) -> str | None:
    record = det.record
    if isinstance(record, DnsMessage):
        return "dns"
    if isinstance(record, ClientHello):
        return "quic" if record.over == "quic" else "tls"
    if isinstance(record, HttpRequest):
        return "http"
    return None


def _dns_fields(msg: DnsMessage, doc: dict) -> str | None:
    dns: dict = {"id": msg.id, "type": "answer" if msg.is_response else "query",
                 "op_code": "QUERY" if msg.opcode == 0 else str(msg.opcode)}
    queried = None
    if msg.questions:
        question = msg.questions[0]
        queried = question.name.text
        dns["question"] = {"name": queried, "type": dns_type_name(question.qtype),
                           "class": "IN" if question.qclass == 1 else f"CLASS{question.qclass}"}
    if msg.is_response:
        dns["response_code"] = DNS_RCODES.get(msg.rcode, str(msg.rcode))
        answers = msg.answers[:MAX_LIST_ITEMS]
        dns["answers"] = [{"name": a.name.text, "type": dns_type_name(a.rtype), "ttl": a.ttl,
                           **({"data": a.data} if a.data else {})} for a in answers]
        resolved = [a.data for a in answers if a.rtype in (1, 28) and a.data]
        if resolved:
            dns["resolved_ip"] = resolved
    doc["dns"] = dns
    return queried


def _tls_fields(hello: ClientHello, doc: dict, custom: dict) -> str | None:
    client: dict = {}
    name = hello.server_name.text if hello.server_name is not None else None
    if name:
        client["server_name"] = name
    if hello.ja3:
        client["ja3"] = hashlib.md5(hello.ja3.encode("ascii", "backslashreplace")).hexdigest()
    if hello.ja4:
        client["ja4"] = hello.ja4
    if client:
        doc["tls"] = {"client": client}
    custom["tls"] = {"alpn": list(hello.alpn[:MAX_LIST_ITEMS]), "ech_offered": hello.ech_offered}
    return name


def _http_fields(req: HttpRequest, doc: dict) -> str | None:
    name = req.host.text if req.host is not None else None
    url: dict = {"path": req.path}
    if name:
        url["domain"] = name
    if req.host_port is not None:
        url["port"] = req.host_port
    doc["url"] = url
    doc["http"] = {"request": {"method": req.method}, "version": req.version}
    if req.user_agent is not None:
        doc["user_agent"] = {"original": req.user_agent}
    return name


def _threat(det: Detection) -> dict:
    indicator: dict = {"description": det.signature.description or det.indicator}
    ip_type = _ip_type(det.indicator)
    if det.signature.kind in FINGERPRINT_KINDS:
        indicator["type"] = "artifact"
    elif det.action == PORT_ACTION:
        indicator["type"] = "port"
        indicator["ip"] = det.ctx.dst_ip
        indicator["port"] = det.ctx.dst_port
    elif ip_type:
        indicator["type"] = ip_type
        indicator["ip"] = det.indicator
    else:
        indicator["type"] = "domain-name"
        indicator["url"] = {"domain": det.indicator}
    indicator["provider"] = det.signature.source or "purge-sensor"
    return {"indicator": indicator}


def rule_name(det: Detection) -> str:
    sig = det.signature
    return sig.description or f"Kaspersky {sig.category} indicator {sig.value}"


def detection_to_ecs(det: Detection, *, observer: str, ruleset: str, version: str,
                     summary_count: int | None = None) -> dict:
    """One alert document.  ``summary_count`` is the number of suppressed repeats this
    document stands for (see lifecycle.py); it is reported as ``purge_sensor.summary.count``."""
    sig = det.signature
    ctx = det.ctx
    custom: dict = {"indicator": det.indicator, "strength": sig.strength,
                    "signature": {"kind": sig.kind, "value": sig.value}}
    doc: dict = {
        "@timestamp": iso_time(det.ts),
        "event": {"kind": "alert", "category": ["network"], "type": ["info"],
                  "dataset": "purge_sensor.alert", "module": "purge_sensor",
                  "action": det.action, "severity": SEVERITY.get(sig.strength, 0),
                  "id": event_id()},
        "host": {"ip": det.host_ip},
        "source": _endpoint(ctx.src_ip, ctx.src_port, ctx.src_mac),
        "destination": _endpoint(ctx.dst_ip, ctx.dst_port, ctx.dst_mac),
        "network": _network(det),
        "observer": {"name": observer, "hostname": observer, "type": "sensor",
                     "vendor": "purge-sensor", "product": "purge-sensor",
                     "version": __version__,
                     "ingress": {"interface": {"id": str(ctx.interface)}}},
        "rule": {"id": sig.id, "name": rule_name(det), "category": sig.category,
                 "ruleset": ruleset, "version": version},
        "threat": _threat(det),
    }
    if det.host_mac:
        doc["host"]["mac"] = _ecs_mac(det.host_mac)
    if det.host_hostname:
        doc["host"]["hostname"] = det.host_hostname
        doc["host"]["name"] = det.host_hostname
    if sig.vendor:
        custom["vendor"] = sig.vendor
    if ctx.tunnel:
        custom["tunnel"] = list(ctx.tunnel)
    if summary_count is not None:
        custom["summary"] = {"count": summary_count}
    if det.extra:
        custom["detail"] = det.extra

    record = det.record
    domain = None
    if isinstance(record, DnsMessage):
        domain = _dns_fields(record, doc)
    elif isinstance(record, ClientHello):
        domain = _tls_fields(record, doc, custom)
    elif isinstance(record, HttpRequest):
        domain = _http_fields(record, doc)
    if domain is None and doc["threat"]["indicator"]["type"] == "domain-name":
        domain = det.indicator
    if domain:
        doc["destination"]["domain"] = domain

    matched_name = det.indicator if doc["threat"]["indicator"]["type"] == "domain-name" else None
    doc["related"] = {"ip": _unique([det.host_ip, ctx.src_ip, ctx.dst_ip,
                                     *doc.get("dns", {}).get("resolved_ip", ())])}
    related_hosts = _unique([domain, matched_name, det.host_hostname])
    if related_hosts:
        doc["related"]["hosts"] = related_hosts
    doc["purge_sensor"] = custom
    return doc


_PLAIN_TYPES = frozenset([str, int, float, bool, type(None)])


def _host_value(key: str, value):
    if type(value) is str or value is None:  # most of a summary's values: at once
        return value
    if key in ("first_seen", "last_seen"):
        if isinstance(value, (int, float)):
            return iso_time(value)
    elif type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if isinstance(value, (list, tuple)):
        return list(value[:MAX_LIST_ITEMS])
    if isinstance(value, dict):
        return {str(k): v for k, v in list(value.items())[:MAX_LIST_ITEMS]}
    return value


def host_event_to_ecs(ev: HostEvent, *, observer: str) -> dict:
    """``host_detected`` is an alert; an ``inventory`` entry is an ECS ``asset`` document,
    one per host, so the SIEM can keep the current list by taking the latest per host.ip."""
    host = ev.host
    detected = ev.kind == "host_detected"
    event: dict = {"kind": "alert" if detected else "asset",
                   "category": ["host"], "type": ["info"],
                   "dataset": "purge_sensor.alert" if detected else "purge_sensor.inventory",
                   "module": "purge_sensor",
                   "action": "host_detected" if detected else "inventory",
                   "id": event_id()}
    if detected:
        event["severity"] = HOST_DETECTED_SEVERITY
    ecs_host: dict = {}
    if host.get("ip"):
        ecs_host["ip"] = host["ip"]
    if host.get("mac"):
        ecs_host["mac"] = _ecs_mac(str(host["mac"]))
    if host.get("hostname"):
        ecs_host["hostname"] = host["hostname"]
        ecs_host["name"] = host["hostname"]
    doc: dict = {"@timestamp": iso_time(ev.ts), "event": event, "host": ecs_host,
                 "observer": {"name": observer, "hostname": observer, "type": "sensor",
                              "vendor": "purge-sensor", "product": "purge-sensor",
                              "version": __version__}}
    if detected:
        doc["rule"] = {"id": "purge_sensor.host_detected",
                       "name": "Kaspersky product present on host",
                       "category": str(host.get("verdict") or "install")}
    details = {key: _host_value(key, value) for key, value in host.items()
               if key not in ("ip", "mac", "hostname")}
    doc["purge_sensor"] = {"host": details}
    indicators = details.get("indicators")
    related: dict = {"ip": [host["ip"]] if host.get("ip") else []}
    hosts = _unique([host.get("hostname"),
                     *(i for i in (indicators or ()) if isinstance(i, str))])
    if hosts:
        related["hosts"] = hosts
    doc["related"] = related
    return doc


def _json_default(value):
    """The records only hold JSON types, but a tuple, set or stray bytes must still render
    (as list or escaped text) instead of aborting the alert."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return escape_text_bytes(bytes(value))
    return str(value)


# The stdlib encoder writes what orjson will not: non-ASCII text as \uXXXX escapes,
# integers beyond 64 bits, keys that are not strings.  One for every document: json.dumps
# with options builds a new one per call.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=_json_default)
# Dataclasses and datetimes go to _json_default (``str``) as with the stdlib encoder.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def to_json_bytes(doc: dict) -> bytes:
    """One ASCII line: every control and non-ASCII character becomes ``\\uXXXX``, DEL
    included, so no field can end the line or start a new event.

    orjson writes a 1.6 KB alert in about 5 us, the stdlib encoder in 31 (it builds a list
    of small strings and joins them).  orjson escapes control characters as the stdlib
    does but writes other text as UTF-8: a line that is not pure ASCII, or a document
    orjson refuses, is written by the stdlib encoder instead.  Both give the same JSON
    value; floats may differ in spelling (``1e16`` against ``1e+16``), and orjson writes a
    NaN or an infinity, which JSON cannot spell, as null."""
    try:
        line = orjson.dumps(doc, default=_json_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: a big integer, a key that is not a string
        line = None
    if line is None or not line.isascii():
        return _JSON_ENCODER.encode(doc).encode("ascii")  # escapes DEL itself
    return line.replace(b"\x7f", b"\\u007f")


def to_json_line(doc: dict) -> str:
    """``to_json_bytes`` as text."""
    return to_json_bytes(doc).decode("ascii")
