"""ECS documents for detections and host events, and the one-line JSON encoding."""

import hashlib
import json
import os
import uuid

from hypothesis import given, settings, strategies as st

from tests.helpers import parse_cef
from sensor.output.cef import ecs_to_cef
from sensor.output.ecs import detection_to_ecs, host_event_to_ecs, iso_time, to_json_line
from sensor.records import (ClientHello, Detection, DnsAnswer, DnsMessage, DnsQuestion,
                            DomainName, FlowStart, HostEvent, HttpRequest, PacketContext, Signature)

TS = 1700000000.123456
SIG = Signature("ksp-update-1", "update", "strong", "suffix", "kaspersky.com", "vendor docs",
                "Kaspersky update servers")
NAME = DomainName((b"dnl-01", b"geo", b"kaspersky", b"com"))


def ctx(**kw):
    base = dict(ts=TS, src_ip="10.0.0.5", dst_ip="203.0.113.7", src_port=40000, dst_port=443,
                transport="tcp", src_mac="aa:bb:cc:00:00:01", dst_mac="aa:bb:cc:00:00:02")
    base.update(kw)
    return PacketContext(**base)


def ecs(det, **kw):
    return detection_to_ecs(det, observer="sensor-1", ruleset="kaspersky", version="2024.06", **kw)


def dns_query(name=NAME):
    c = ctx(dst_ip="10.0.0.53", src_port=53000, dst_port=53, transport="udp")
    msg = DnsMessage(c, 0x1234, False, 0, 0, [DnsQuestion(name, 28, 1)], [])
    return Detection(TS, "dns_query", "10.0.0.5", name.text, SIG, c, msg)


def test_event_ids_are_version_4_uuids_unique_within_and_across_forked_processes():
    ids = [ecs(dns_query())["event"]["id"] for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(hex=i).version == 4 and uuid.UUID(hex=i).hex == i for i in ids)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, "".join(ecs(dns_query())["event"]["id"] for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    parent = "".join(ecs(dns_query())["event"]["id"] for _ in range(3))
    assert len(child) == len(parent) == 96 and child != parent


def test_alert_base_fields():
    doc = ecs(dns_query())
    assert doc["@timestamp"] == "2023-11-14T22:13:20.123456Z"
    event = doc["event"]
    assert (event["kind"], event["category"], event["type"]) == ("alert", ["network"], ["info"])
    assert (event["dataset"], event["module"], event["action"]) == \
        ("purge_sensor.alert", "purge_sensor", "dns_query")
    assert event["severity"] == 73
    assert doc["rule"] == {"id": "ksp-update-1", "name": "Kaspersky update servers",
                           "category": "update", "ruleset": "kaspersky", "version": "2024.06"}
    assert doc["threat"]["indicator"]["type"] == "domain-name"
    assert doc["threat"]["indicator"]["url"]["domain"] == "dnl-01.geo.kaspersky.com"
    assert doc["observer"]["name"] == "sensor-1"
    assert doc["purge_sensor"]["strength"] == "strong"
    assert "summary" not in doc["purge_sensor"]


def test_dns_query_fields_follow_packet_direction():
    doc = ecs(dns_query())
    assert doc["source"] == {"ip": "10.0.0.5", "port": 53000, "mac": "AA-BB-CC-00-00-01"}
    assert doc["destination"]["ip"] == "10.0.0.53" and doc["destination"]["port"] == 53
    assert doc["destination"]["domain"] == "dnl-01.geo.kaspersky.com"
    assert doc["network"] == {"transport": "udp", "type": "ipv4", "protocol": "dns"}
    assert doc["dns"]["question"] == {"name": "dnl-01.geo.kaspersky.com", "type": "AAAA", "class": "IN"}
    assert doc["dns"]["type"] == "query" and doc["dns"]["id"] == 0x1234
    assert doc["host"]["ip"] == "10.0.0.5"


def test_dns_answer_lists_answers_and_resolved_ips():
    c = ctx(src_ip="10.0.0.53", dst_ip="10.0.0.5", src_port=53, dst_port=53000, transport="udp")
    cname = DomainName((b"cdn", b"kaspersky-labs", b"com"))
    answers = [DnsAnswer(NAME, 5, 60, cname.text), DnsAnswer(cname, 1, 60, "198.51.100.1"),
               DnsAnswer(cname, 28, 60, "2001:db8::1")]
    msg = DnsMessage(c, 7, True, 0, 0, [DnsQuestion(NAME, 1, 1)], answers)
    doc = ecs(Detection(TS, "dns_answer", "10.0.0.5", cname.text, SIG, c, msg))
    assert doc["dns"]["type"] == "answer"
    assert doc["dns"]["resolved_ip"] == ["198.51.100.1", "2001:db8::1"]
    assert [a["type"] for a in doc["dns"]["answers"]] == ["CNAME", "A", "AAAA"]
    assert doc["destination"]["domain"] == "dnl-01.geo.kaspersky.com"
    assert doc["threat"]["indicator"]["url"]["domain"] == "cdn.kaspersky-labs.com"
    assert doc["host"]["ip"] == doc["destination"]["ip"] == "10.0.0.5"
    assert "198.51.100.1" in doc["related"]["ip"]


def test_tls_fields_and_fingerprints():
    hello = ClientHello(ctx(), NAME, alpn=("h2", "http/1.1"), ja3="771,4865,0,29,0",
                        ja4="t13d1516h2_8daaf6152771_02713d6af862", ech_offered=True)
    doc = ecs(Detection(TS, "tls_sni", "10.0.0.5", NAME.text, SIG, hello.ctx, hello))
    assert doc["tls"]["client"]["server_name"] == "dnl-01.geo.kaspersky.com"
    assert doc["tls"]["client"]["ja3"] == hashlib.md5(b"771,4865,0,29,0").hexdigest()
    assert doc["tls"]["client"]["ja4"] == "t13d1516h2_8daaf6152771_02713d6af862"
    assert doc["purge_sensor"]["tls"] == {"alpn": ["h2", "http/1.1"], "ech_offered": True}
    assert doc["network"]["protocol"] == "tls"
    assert doc["destination"]["domain"] == "dnl-01.geo.kaspersky.com"


def test_quic_protocol_and_ipv6():
    c = ctx(src_ip="fd00::5", dst_ip="2001:db8::7", transport="udp", ip_version=6)
    hello = ClientHello(c, NAME, over="quic")
    doc = ecs(Detection(TS, "quic_sni", "fd00::5", NAME.text, SIG, c, hello))
    assert doc["network"]["protocol"] == "quic" and doc["network"]["type"] == "ipv6"


def test_ja3_detection_is_not_a_domain_indicator():
    hello = ClientHello(ctx(), None, ja3="771,1,2,3,4")
    sig = Signature("ksp-ja3", "update", "medium", "ja3", "abc", "test")
    doc = ecs(Detection(TS, "tls_ja3", "10.0.0.5", "abc", sig, hello.ctx, hello))
    assert doc["threat"]["indicator"]["type"] == "artifact"
    assert "domain" not in doc["destination"]
    assert doc["event"]["severity"] == 47
    assert doc["rule"]["name"] == "Kaspersky update indicator abc"


def test_ksc_port_detection_is_a_port_indicator():
    c = ctx(dst_ip="10.0.0.20", dst_port=13000)
    sig = Signature("ksc-port-13000-tcp", "management", "medium", "port", "13000", "test")
    doc = ecs(Detection(TS, "ksc_port", "10.0.0.5", "10.0.0.20:13000/tcp", sig, c, FlowStart(c)))
    assert doc["threat"]["indicator"] == {"description": "10.0.0.20:13000/tcp", "type": "port",
                                          "ip": "10.0.0.20", "port": 13000, "provider": "test"}
    assert "domain" not in doc["destination"] and "hosts" not in doc["related"]
    assert doc["purge_sensor"]["indicator"] == "10.0.0.20:13000/tcp"


def test_indicator_type_tells_addresses_from_names():
    """Names skip the address parser (ecs._ip_type): a name that starts with a digit, or
    an address of either family, must still be typed by what it is."""
    c = ctx()
    cases = {"203.0.113.9": "ipv4-addr", "2001:db8::9": "ipv6-addr",
             "1-2.kaspersky.com": "domain-name", "7.upd.kaspersky.com": "domain-name",
             "dnl-01.geo.kaspersky.com": "domain-name",
             # ipaddress reads "::%..." as an IPv6 address with a scope (found by
             # test_hostile_labels_give_one_line_that_reads_back).
             "::%.kaspersky.com": "domain-name", "fe80::1%eth0": "domain-name"}
    for indicator, expected in cases.items():
        doc = ecs(Detection(TS, "tls_sni", "10.0.0.5", indicator, SIG, c, FlowStart(c)))
        assert doc["threat"]["indicator"]["type"] == expected, indicator
        if expected == "domain-name":
            assert doc["threat"]["indicator"]["url"] == {"domain": indicator}
        else:
            assert doc["threat"]["indicator"]["ip"] == indicator


def test_dns_answer_flow_names_the_resolved_domain():
    c = ctx(dst_ip="198.51.100.1")
    doc = ecs(Detection(TS, "dns_answer_flow", "10.0.0.5", NAME.text, SIG, c, FlowStart(c),
                        extra={"answer_ip": "198.51.100.1"}))
    assert doc["destination"]["domain"] == NAME.text
    assert doc["purge_sensor"]["detail"] == {"answer_ip": "198.51.100.1"}


def test_http_fields():
    req = HttpRequest(ctx(dst_port=80), "GET", "/bases/av/index.xml", "1.1", NAME, None,
                      "KSDE\\0101.0")
    doc = ecs(Detection(TS, "http_host", "10.0.0.5", NAME.text, SIG, req.ctx, req))
    assert doc["url"] == {"path": "/bases/av/index.xml", "domain": "dnl-01.geo.kaspersky.com"}
    assert doc["http"]["request"]["method"] == "GET"
    assert doc["user_agent"]["original"] == "KSDE\\0101.0"
    assert doc["network"]["protocol"] == "http"


def test_qinq_tunnel_host_identity_and_summary():
    c = ctx(vlan=(100, 200), tunnel=("vxlan vni=42",), interface=2)
    hello = ClientHello(c, NAME)
    d = Detection(TS, "tls_sni", "10.0.0.5", NAME.text, SIG, c, hello,
                  host_mac="aa:bb:cc:00:00:01", host_hostname="pc-17")
    doc = ecs(d, summary_count=41)
    assert doc["network"]["vlan"] == {"id": "100"}
    assert doc["network"]["inner"] == {"vlan": {"id": "200"}}
    assert doc["purge_sensor"]["tunnel"] == ["vxlan vni=42"]
    assert doc["observer"]["ingress"]["interface"]["id"] == "2"
    assert doc["host"] == {"ip": "10.0.0.5", "mac": "AA-BB-CC-00-00-01", "hostname": "pc-17",
                           "name": "pc-17"}
    assert doc["purge_sensor"]["summary"] == {"count": 41}
    assert "pc-17" in doc["related"]["hosts"]


def test_host_detected_is_an_alert_and_inventory_an_asset():
    host = {"ip": "10.0.0.5", "mac": "aa:bb:cc:00:00:01", "hostname": "pc-17", "verdict": "install",
            "state": "active", "first_seen": TS - 3600, "last_seen": TS, "evidence": 5,
            "categories": {"update", "telemetry"}, "indicators": ["dnl-01.geo.kaspersky.com"]}
    alert = host_event_to_ecs(HostEvent(TS, "host_detected", host), observer="sensor-1")
    assert (alert["event"]["kind"], alert["event"]["action"]) == ("alert", "host_detected")
    assert alert["host"]["ip"] == "10.0.0.5"
    details = alert["purge_sensor"]["host"]
    assert details["verdict"] == "install" and details["state"] == "active"
    assert details["first_seen"] == "2023-11-14T21:13:20.123456Z"
    assert details["categories"] == ["telemetry", "update"]
    inventory = host_event_to_ecs(HostEvent(TS, "inventory", host), observer="sensor-1")
    assert (inventory["event"]["kind"], inventory["event"]["action"]) == ("asset", "inventory")
    assert inventory["event"]["dataset"] == "purge_sensor.inventory"
    json.loads(to_json_line(inventory))


def test_iso_time_survives_impossible_timestamps():
    assert iso_time(float("nan")) == "1970-01-01T00:00:00.000000Z"
    assert iso_time(1e300) == "1970-01-01T00:00:00.000000Z"


def test_json_line_escapes_every_control_character():
    doc = {"a": "x\ny\r\x00\x1b\x7f\u2028z", "b": b"\xff\n", "c": {1, 2}}
    line = to_json_line(doc)
    assert "\n" not in line and all(0x20 <= ord(c) <= 0x7E for c in line)
    back = json.loads(line)
    assert back["a"] == doc["a"] and back["b"] == "\\255\\010" and back["c"] == [1, 2]


LABELS = st.lists(st.binary(min_size=1, max_size=12), min_size=1, max_size=5)


@settings(max_examples=300)
@given(LABELS)
def test_hostile_labels_give_one_line_that_reads_back(labels):
    name = DomainName(tuple(labels) + (b"kaspersky", b"com"))
    doc = ecs(dns_query(name))
    line = to_json_line(doc)
    assert "\n" not in line and "\r" not in line
    assert all(0x20 <= ord(c) <= 0x7E for c in line)
    back = json.loads(line)
    assert back["dns"]["question"]["name"] == name.text
    assert back["threat"]["indicator"]["url"]["domain"] == name.text
    cef = ecs_to_cef(doc)
    assert "\n" not in cef and "\r" not in cef and "\x00" not in cef
    header, extension = parse_cef(cef)
    assert header[4] == "ksp-update-1" and header[6] == "8"
    assert extension["cs1"] == extension["dhost"] == name.text
    assert set(extension) <= CEF_KEYS


CEF_KEYS = {"rt", "src", "spt", "smac", "shost", "dst", "dpt", "dmac", "dhost", "proto", "app",
            "act", "msg", "cnt", "dvchost", "externalId", "requestMethod", "request",
            "requestClientApplication", "cs1", "cs1Label", "cs2", "cs2Label", "cs3", "cs3Label",
            "cs4", "cs4Label", "cs5", "cs5Label", "cs6", "cs6Label"}




JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
                | st.binary(max_size=6) | st.sets(st.integers(0, 9), max_size=3))
JSON_DOCS = st.recursive(
    JSON_SCALARS,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=6) | st.integers(0, 3), inner, max_size=4)),
    max_leaves=24)


@settings(max_examples=400)
@given(JSON_DOCS)
def test_json_line_has_the_stdlib_encoders_value(doc):
    """orjson writes most lines; whatever it writes or refuses must read back as the stdlib
    encoder's line does, and stay one ASCII line."""
    from sensor.output.ecs import _JSON_ENCODER

    line = to_json_line({"doc": doc})
    assert all(0x20 <= ord(c) <= 0x7E for c in line)
    assert json.loads(line) == json.loads(_JSON_ENCODER.encode({"doc": doc}))


def test_json_line_of_non_ascii_text_is_the_stdlib_encoders():
    from sensor.output.ecs import _JSON_ENCODER

    doc = {"name": "k\u00e4spersky.\U0001f600\u2028", "big": 2 ** 70, 3: "int key"}
    assert to_json_line(doc) == _JSON_ENCODER.encode(doc)


def test_json_line_escapes_del_in_ascii_text():
    """DEL is ASCII, so orjson's line keeps it raw unless escaped afterwards."""
    assert to_json_line({"a": "x\x7fy"}) == '{"a":"x\\u007fy"}'
