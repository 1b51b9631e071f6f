"""Host attribution rules of the tracker, fed with records built here and the real detector."""

import random

import pytest

from sensor.detect.engine import Detector
from sensor.records import (ClientHello, Detection, DhcpLease, DnsAnswer, DnsMessage, DnsQuestion, DomainName,
                            FlowStart, HostEvent, HttpRequest, PacketContext, Signature)
from sensor.stats import Stats
from sensor.track.internal import InternalNetworks, is_group_address
from sensor.track.tracker import Tracker, TrackerConfig
from sensor.track.verdict import decide, tally_key

T0 = 1_700_000_000.0


def _sig(sid, category, strength, vendor=""):
    return Signature(id=sid, category=category, strength=strength, kind="exact", value=sid, source="test",
                     vendor=vendor)


EXACT = {
    "s01.upd.kaspersky.com": _sig("upd", "update", "strong"),
    "activation-v2.kaspersky.com": _sig("activation", "activation", "strong"),
    "edge.geo.kaspersky.com": _sig("edge", "update", "medium"),
    "dnl-01.geo.kaspersky.com": _sig("dnl", "update", "strong", vendor="Check Point"),
    "kav8.zonealarm.com": _sig("kav8", "oem", "weak", vendor="Check Point"),
    "www.kaspersky.com": _sig("www", "website", "none"),
    "kaspersky.com": _sig("www", "website", "none"),
    "securelist.com": _sig("securelist", "website", "none"),
    "ocsp.kaspersky.com": _sig("ocsp", "pki", "weak"),
}
KSN = _sig("ksn-catchall", "telemetry", "strong")


class FakeSignatures:
    """Just enough of SignatureSet: exact names plus the *.ksn.kaspersky-labs.com catch-all."""

    def match_name(self, name: DomainName):
        text = b".".join(name.key).decode("latin-1")
        sig = EXACT.get(text)
        if sig is None and text.endswith(".ksn.kaspersky-labs.com"):
            sig = KSN
        return sig

    def match_ja3(self, _):
        return None

    def match_ja4(self, _):
        return None

    def match_path(self, _path, _sig):
        return None


def ctx(ts, src, dst, sport, dport, transport="udp", src_mac=None, dst_mac=None):
    version = 6 if ":" in src else 4
    return PacketContext(ts, src, dst, sport, dport, transport, version, src_mac, dst_mac)


def name(text):
    return DomainName.from_text_bytes(text.encode())


def query(ts, src, dst, qname, sport=40000, ident=7):
    return DnsMessage(ctx(ts, src, dst, sport, 53), ident, False, 0, 0, [DnsQuestion(name(qname), 1, 1)], [])


def response(ts, src, dst, qname, ips, ttl=300, dport=40000, ident=7, cname=None):
    answers = []
    owner = qname
    if cname:
        answers.append(DnsAnswer(name(qname), 5, ttl, cname))
        owner = cname
    answers += [DnsAnswer(name(owner), 28 if ":" in ip else 1, ttl, ip) for ip in ips]
    return DnsMessage(ctx(ts, src, dst, 53, dport), ident, True, 0, 0, [DnsQuestion(name(qname), 1, 1)], answers)


def syn(ts, src, dst, dport, sport=50000):
    return FlowStart(ctx(ts, src, dst, sport, dport, "tcp"))


def udp(ts, src, dst, dport, sport=50000):
    return FlowStart(ctx(ts, src, dst, sport, dport, "udp"))


def hello(ts, src, dst, sni):
    return ClientHello(ctx(ts, src, dst, 50001, 443, "tcp"), name(sni))


def http(ts, src, dst, host):
    return HttpRequest(ctx(ts, src, dst, 50002, 80, "tcp"), "GET", "/", "HTTP/1.1", name(host))


class Harness:
    def __init__(self, store=None, **config):
        self.stats = Stats()
        self.signatures = FakeSignatures()
        self.detector = Detector(self.signatures, self.stats)
        self.tracker = Tracker(TrackerConfig(**config), self.signatures, self.stats, store)
        self.now = T0

    def feed(self, record):
        self.now = max(self.now, record.ctx.ts)
        return self.tracker.observe(record, self.detector.detect(record))

    def feed_all(self, records):
        out = []
        for record in records:
            out += self.feed(record)
        return out

    def hosts(self):
        return {h["ip"]: h for h in self.tracker.inventory(self.now)}


def detections(events, action=None):
    return [e for e in events if isinstance(e, Detection) and (action is None or e.action == action)]


# -- internal networks -----------------------------------------------------------------


def test_internal_networks_membership():
    nets = InternalNetworks(["10.0.0.0/8", "192.168.1.0/24", "fd00::/8"])
    assert "10.200.1.1" in nets and "192.168.1.77" in nets and "fd12::1" in nets
    assert "192.168.2.1" not in nets and "8.8.8.8" not in nets and "2001:db8::1" not in nets
    assert "::ffff:10.1.1.1" in nets
    assert "not-an-ip" not in nets and "" not in nets


def test_internal_networks_reject_bad_cidr_and_cap_memo():
    with pytest.raises(ValueError, match="10.0.0.0/33"):
        InternalNetworks(["10.0.0.0/33"])
    nets = InternalNetworks(["10.0.0.0/8"], cache_size=16)
    for i in range(100):
        assert f"10.0.0.{i}" in nets
    assert len(nets._cache) == 16


def test_declared_resolvers_are_validated_and_canonical():
    with pytest.raises(ValueError, match="--resolver 'dns1'"):
        Harness(resolvers=["dns1"])
    assert "fd00::53" in Harness(resolvers=["FD00:0::53"]).tracker.resolvers


def test_group_addresses():
    assert is_group_address("255.255.255.255") and is_group_address("10.1.1.255")
    assert is_group_address("239.1.2.3") and is_group_address("ff02::1")
    assert not is_group_address("10.1.1.20") and not is_group_address("fd00::1")


# -- direct evidence and verdicts ----------------------------------------------------------


def test_direct_query_makes_install_and_host_detected_once():
    h = Harness()
    out = h.feed(query(T0, "10.0.0.5", "10.0.0.53", "s01.upd.kaspersky.com"))
    dets = detections(out, "dns_query")
    assert len(dets) == 1 and dets[0].host_ip == "10.0.0.5"
    events = [e for e in out if isinstance(e, HostEvent)]
    assert len(events) == 1 and events[0].kind == "host_detected"
    assert events[0].host["verdict"] == "install" and events[0].host["ip"] == "10.0.0.5"
    out = h.feed(hello(T0 + 5, "10.0.0.5", "203.0.113.9", "s01.upd.kaspersky.com"))
    assert not [e for e in out if isinstance(e, HostEvent)]
    host = h.hosts()["10.0.0.5"]
    assert host["evidence"] == {"dns_query": 1, "tls_sni": 1}
    assert host["categories"] == {"update": 2}
    assert host["indicators"] == ["s01.upd.kaspersky.com"]
    assert host["state"] == "active" and host["first_seen"].endswith("Z")


def test_website_only_host():
    h = Harness()
    out = h.feed_all([hello(T0, "10.0.0.6", "203.0.113.1", "www.kaspersky.com"),
                      http(T0 + 1, "10.0.0.6", "203.0.113.2", "securelist.com")])
    assert len(detections(out)) == 2
    assert not [e for e in out if isinstance(e, HostEvent)]
    host = h.hosts()["10.0.0.6"]
    assert host["verdict"] == "website_only"
    assert host["categories"] == {"website": 2}


def test_oem_engine_and_upgrade_to_install():
    h = Harness()
    h.feed(http(T0, "10.0.0.7", "203.0.113.3", "dnl-01.geo.kaspersky.com"))
    h.feed(http(T0, "10.0.0.8", "203.0.113.3", "kav8.zonealarm.com"))
    hosts = h.hosts()
    assert hosts["10.0.0.7"]["verdict"] == "oem_engine"
    assert hosts["10.0.0.8"]["verdict"] == "oem_engine"
    h.feed(hello(T0 + 1, "10.0.0.7", "203.0.113.4", "dc1.ksn.kaspersky-labs.com"))
    assert h.hosts()["10.0.0.7"]["verdict"] == "install"


def test_medium_and_weak_evidence():
    h = Harness()
    h.feed(hello(T0, "10.0.0.9", "203.0.113.5", "edge.geo.kaspersky.com"))
    h.feed(hello(T0, "10.0.0.10", "203.0.113.5", "ocsp.kaspersky.com"))
    hosts = h.hosts()
    assert (hosts["10.0.0.9"]["verdict"], hosts["10.0.0.9"]["confidence"]) == ("install", "medium")
    assert hosts["10.0.0.10"]["verdict"] == "none"


def test_external_hosts_alert_but_stay_out_of_inventory():
    h = Harness()
    out = h.feed(hello(T0, "198.51.100.7", "203.0.113.5", "s01.upd.kaspersky.com"))
    assert detections(out)[0].host_ip == "198.51.100.7"
    assert h.hosts() == {}


def test_internal_networks_are_configurable():
    h = Harness(internal=["198.51.100.0/24"])
    h.feed(hello(T0, "198.51.100.7", "203.0.113.5", "s01.upd.kaspersky.com"))
    h.feed(hello(T0, "10.0.0.5", "203.0.113.5", "s01.upd.kaspersky.com"))
    assert set(h.hosts()) == {"198.51.100.7"}


def test_verdict_rules_table():
    def key(action, category, strength, vendor="", fallback=False):
        return tally_key(action, category, strength, vendor, fallback)

    assert decide({key("ksc_server", "management", "medium"): 1,
                   key("tls_sni", "update", "strong"): 3}, False) == ("management_server", "high")
    assert decide({key("ksc_port", "management", "medium"): 1}, False) == ("install", "medium")
    assert decide({key("dns_query", "website", "none", fallback=True): 1}, False) == ("website_only", "high")
    assert decide({key("dns_query", "update", "strong", fallback=True): 1}, True) == ("none", "low")
    assert decide({key("tls_sni", "update", "strong"): 1}, True) == ("install", "high")
    assert decide({key("http_host", "downloads", "medium"): 1}, False)[0] == "website_only"
    assert decide({}, False) == ("none", "low")


# -- resolvers ---------------------------------------------------------------------------


def test_resolver_forwarding_is_attributed_to_the_client():
    h = Harness()
    client, resolver, upstream = "10.0.1.20", "10.0.0.53", "198.51.100.53"
    out = h.feed_all([
        query(T0, client, resolver, "s01.upd.kaspersky.com", sport=41000, ident=1),
        query(T0 + 0.01, resolver, upstream, "S01.UPD.kaspersky.com", sport=33000, ident=2),
        response(T0 + 0.05, upstream, resolver, "s01.upd.kaspersky.com", ["203.0.113.50"], dport=33000, ident=2),
        response(T0 + 0.06, resolver, client, "s01.upd.kaspersky.com", ["203.0.113.50"], dport=41000, ident=1),
        syn(T0 + 0.07, client, "203.0.113.50", 443),
    ])
    forwarded = [d for d in detections(out) if d.extra.get("forwarded_by")]
    assert len(forwarded) == 1 and forwarded[0].host_ip == client
    assert forwarded[0].extra["forwarded_by"] == resolver
    assert not detections(out, "dns_answer_flow")
    hosts = h.hosts()
    assert resolver not in hosts
    assert hosts[client]["verdict"] == "install"
    assert hosts[client]["evidence"] == {"dns_query": 1}
    assert h.tracker.resolvers[resolver] in ("queried", "forwarding")


def test_resolver_forward_after_window_is_not_reattributed():
    h = Harness()
    h.feed(query(T0, "10.0.1.20", "10.0.0.53", "s01.upd.kaspersky.com"))
    out = h.feed(query(T0 + 10, "10.0.0.53", "198.51.100.53", "s01.upd.kaspersky.com"))
    det = detections(out)[0]
    assert det.host_ip == "10.0.0.53" and det.extra.get("resolver") is True
    hosts = h.hosts()
    assert hosts["10.0.0.53"]["verdict"] == "none" and hosts["10.0.0.53"]["role"] == "resolver"


def test_upstream_only_capture_attributes_the_connecting_client():
    h = Harness()
    resolver, client = "10.0.0.53", "10.0.1.30"
    h.feed_all([
        query(T0, resolver, "8.8.8.8", "dc1.ksn.kaspersky-labs.com", sport=33001, ident=3),
        response(T0 + 0.03, "8.8.8.8", resolver, "dc1.ksn.kaspersky-labs.com", ["203.0.113.60", "203.0.113.61"],
                 dport=33001, ident=3),
    ])
    out = h.feed(syn(T0 + 1, client, "203.0.113.61", 443))
    flows = detections(out, "dns_answer_flow")
    assert len(flows) == 1
    assert flows[0].host_ip == client and flows[0].indicator == "dc1.ksn.kaspersky-labs.com"
    assert flows[0].signature.category == "telemetry" and flows[0].extra["answer_ip"] == "203.0.113.61"
    hosts = h.hosts()
    assert hosts[client]["verdict"] == "install"
    assert hosts[resolver]["role"] == "resolver" and hosts[resolver]["verdict"] == "none"


def test_declared_resolver_never_becomes_install_from_queries():
    h = Harness(resolvers=["10.0.0.2"])
    out = h.feed(query(T0, "10.0.0.2", "9.9.9.9", "s01.upd.kaspersky.com"))
    det = detections(out)[0]
    assert det.extra.get("resolver") is True and "fallback_dns" not in det.extra
    assert h.hosts()["10.0.0.2"]["verdict"] == "none"


def test_host_answering_dns_becomes_resolver_retroactively():
    h = Harness()
    h.feed(query(T0, "10.0.0.54", "198.51.100.53", "s01.upd.kaspersky.com"))
    assert h.hosts()["10.0.0.54"]["verdict"] == "install"
    h.feed(response(T0 + 5, "10.0.0.54", "10.0.1.40", "example.org", ["192.0.2.1"]))
    host = h.hosts()["10.0.0.54"]
    assert host["role"] == "resolver" and host["verdict"] == "none"


def test_resolver_client_query_table_is_capped():
    h = Harness(client_query_table=100)
    for i in range(1000):
        h.feed(query(T0 + i, f"10.1.{i // 250}.{i % 250}", "10.0.0.53", f"h{i}.ksn.kaspersky-labs.com"))
    assert len(h.tracker.client_queries) == 100
    assert h.stats.evictions["resolver_client_queries"] == 900


# -- public DNS fallback -----------------------------------------------------------------


@pytest.mark.parametrize("server", ["8.8.8.8", "1.1.1.1", "223.6.6.6", "9.9.9.9", "185.228.168.168",
                                    "2606:4700:4700::1111"])
def test_public_dns_fallback_is_strong_install_evidence(server):
    h = Harness()
    src = "fd00::5" if ":" in server else "10.0.0.70"
    out = h.feed(query(T0, src, server, "ocsp.kaspersky.com"))
    assert detections(out)[0].extra["fallback_dns"] is True
    host = h.hosts()[src]
    assert (host["verdict"], host["confidence"]) == ("install", "high")
    assert host["fallback_dns"] == 1


def test_fallback_for_website_name_is_not_install():
    h = Harness()
    h.feed(query(T0, "10.0.0.71", "8.8.8.8", "www.kaspersky.com"))
    assert h.hosts()["10.0.0.71"]["verdict"] == "website_only"


def test_other_public_server_is_no_fallback():
    h = Harness()
    out = h.feed(query(T0, "10.0.0.72", "198.51.100.1", "edge.geo.kaspersky.com"))
    assert "fallback_dns" not in detections(out)[0].extra


# -- answer cache ----------------------------------------------------------------------------


def test_own_lookup_then_flow_is_not_double_counted_but_others_are_attributed():
    h = Harness()
    h.feed_all([query(T0, "10.0.2.1", "10.0.0.53", "activation-v2.kaspersky.com"),
                response(T0 + 0.02, "10.0.0.53", "10.0.2.1", "activation-v2.kaspersky.com", ["203.0.113.70"])])
    assert not detections(h.feed(syn(T0 + 0.05, "10.0.2.1", "203.0.113.70", 443)))
    other = detections(h.feed(syn(T0 + 30, "10.0.2.2", "203.0.113.70", 443)), "dns_answer_flow")
    assert [d.host_ip for d in other] == ["10.0.2.2"]
    assert h.hosts()["10.0.2.2"]["evidence"] == {"dns_answer_flow": 1}


def test_cname_chain_match_and_ttl_expiry():
    h = Harness(answer_grace=10)
    h.feed(response(T0, "10.0.0.53", "10.0.2.5", "updates.example.net", ["203.0.113.80"], ttl=60,
                    cname="s01.upd.kaspersky.com"))
    assert detections(h.feed(syn(T0 + 69, "10.0.2.6", "203.0.113.80", 443)), "dns_answer_flow")
    assert not detections(h.feed(syn(T0 + 71, "10.0.2.7", "203.0.113.80", 443)))
    assert "203.0.113.80" not in h.tracker.answers


def test_flow_from_external_host_or_to_port_53_is_ignored():
    h = Harness()
    h.feed(response(T0, "198.51.100.53", "10.0.2.8", "s01.upd.kaspersky.com", ["203.0.113.81"]))
    assert not detections(h.feed(syn(T0 + 1, "198.51.100.99", "203.0.113.81", 443)))
    assert not detections(h.feed(udp(T0 + 1, "10.0.2.9", "203.0.113.81", 53)))
    assert detections(h.feed(udp(T0 + 1, "10.0.2.9", "203.0.113.81", 443)), "dns_answer_flow")


def test_unmatched_answers_are_not_cached():
    h = Harness()
    h.feed(response(T0, "10.0.0.53", "10.0.2.5", "example.org", ["203.0.113.90"]))
    assert not h.tracker.answers


def test_answer_cache_is_lru_capped():
    h = Harness(answer_cache_size=10)
    for i in range(50):
        h.feed(response(T0 + i, "198.51.100.53", "10.0.2.10", "s01.upd.kaspersky.com", [f"203.0.113.{i}"]))
    assert len(h.tracker.answers) == 10
    assert h.stats.evictions["dns_answer_cache"] == 40
    assert h.stats.table_sizes["dns_answer_cache"] == 10
    assert "203.0.113.49" in h.tracker.answers and "203.0.113.0" not in h.tracker.answers


# -- KSC ---------------------------------------------------------------------------------------


def test_ksc_endpoints_and_server():
    h = Harness()
    server = "10.0.5.1"
    out = h.feed_all([syn(T0, "10.0.6.1", server, 13000), syn(T0 + 1, "10.0.6.2", server, 14000),
                      syn(T0 + 2, "10.0.6.1", server, 13111), syn(T0 + 3, "10.0.6.3", server, 17000)])
    dets = detections(out, "ksc_port")
    assert [d.host_ip for d in dets] == ["10.0.6.1", "10.0.6.2", "10.0.6.1", "10.0.6.3"]
    sig = dets[0].signature
    assert (sig.id, sig.category, sig.strength, sig.kind) == ("ksc-port-13000-tcp", "management", "medium", "port")
    assert dets[0].indicator == "10.0.5.1:13000/tcp" and dets[0].extra["ksc_server"] == server
    hosts = h.hosts()
    for ip in ("10.0.6.1", "10.0.6.2", "10.0.6.3"):
        assert (hosts[ip]["verdict"], hosts[ip]["confidence"]) == ("install", "medium")
    assert hosts[server]["verdict"] == "management_server"
    assert hosts[server]["evidence"] == {"ksc_server": 4}
    host_events = [e for e in out if isinstance(e, HostEvent)]
    assert {e.host["ip"] for e in host_events} == {"10.0.6.1", "10.0.6.2", "10.0.6.3", server}


def test_ksc_udp_agents_and_ignored_cases():
    h = Harness()
    out = h.feed_all([udp(T0, "10.0.5.1", "10.0.6.9", 15000), udp(T0, "10.0.6.10", "10.0.6.255", 15001),
                      syn(T0, "10.0.6.11", "203.0.113.5", 13000), udp(T0, "10.0.6.12", "10.0.6.13", 13000),
                      syn(T0, "10.0.6.14", "10.0.6.14", 13000)])
    assert [d.host_ip for d in detections(out)] == ["10.0.5.1", "10.0.6.10"]
    hosts = h.hosts()
    assert set(hosts) == {"10.0.5.1", "10.0.6.9", "10.0.6.10"}
    assert all(hosts[ip]["verdict"] == "install" for ip in hosts)
    assert hosts["10.0.6.9"]["indicators"] == ["10.0.5.1:15000/udp"]


def test_ksc_ports_confirmed_by_name_evidence_raise_confidence():
    h = Harness()
    h.feed(syn(T0, "10.0.6.1", "10.0.5.1", 13000))
    h.feed(hello(T0 + 1, "10.0.5.1", "203.0.113.5", "s01.upd.kaspersky.com"))
    h.feed(hello(T0 + 1, "10.0.6.1", "203.0.113.5", "dc1.ksn.kaspersky-labs.com"))
    hosts = h.hosts()
    assert (hosts["10.0.5.1"]["verdict"], hosts["10.0.5.1"]["confidence"]) == ("management_server", "high")
    assert (hosts["10.0.6.1"]["verdict"], hosts["10.0.6.1"]["confidence"]) == ("install", "high")


# -- identity ----------------------------------------------------------------------------------


def test_dhcp_then_dns_attaches_mac_and_hostname():
    h = Harness()
    lease = DhcpLease(ctx(T0, "10.0.0.1", "10.0.3.5", 67, 68), "AA:BB:CC:00:00:01", "10.0.3.5", "FINANCE-PC7")
    assert h.feed(lease) == []
    out = h.feed(query(T0 + 60, "10.0.3.5", "10.0.0.53", "s01.upd.kaspersky.com"))
    det = detections(out)[0]
    assert (det.host_mac, det.host_hostname) == ("aa:bb:cc:00:00:01", "FINANCE-PC7")
    host = h.hosts()["10.0.3.5"]
    assert (host["mac"], host["hostname"], host["key"]) == ("aa:bb:cc:00:00:01", "FINANCE-PC7", "mac:aa:bb:cc:00:00:01")


def test_dns_then_dhcp_merges_and_new_ip_keeps_history():
    h = Harness()
    h.feed(query(T0, "10.0.3.6", "10.0.0.53", "s01.upd.kaspersky.com"))
    h.feed(DhcpLease(ctx(T0 + 10, "10.0.0.1", "10.0.3.6", 67, 68), "aa:bb:cc:00:00:02", "10.0.3.6", "LAB-2"))
    hosts = h.hosts()
    assert hosts["10.0.3.6"]["key"] == "mac:aa:bb:cc:00:00:02" and hosts["10.0.3.6"]["hostname"] == "LAB-2"
    h.feed(DhcpLease(ctx(T0 + 86400, "10.0.0.1", "10.0.3.99", 67, 68), "aa:bb:cc:00:00:02", "10.0.3.99", None))
    h.feed(hello(T0 + 86500, "10.0.3.99", "203.0.113.5", "s01.upd.kaspersky.com"))
    hosts = h.hosts()
    assert list(hosts) == ["10.0.3.99"]
    assert hosts["10.0.3.99"]["evidence"] == {"dns_query": 1, "tls_sni": 1}
    assert hosts["10.0.3.99"]["hostname"] == "LAB-2"
    out = h.feed(hello(T0 + 86600, "10.0.3.6", "203.0.113.5", "s01.upd.kaspersky.com"))
    assert detections(out)[0].host_mac is None
    assert h.hosts()["10.0.3.6"]["key"] == "ip:10.0.3.6"


def test_mdns_announcement_names_the_host():
    h = Harness()
    announce = DnsMessage(ctx(T0, "10.0.3.7", "224.0.0.251", 5353, 5353, src_mac="02:00:00:00:00:07"), 0, True, 0,
                          0, [], [DnsAnswer(name("Lab-Mac.local"), 1, 120, "10.0.3.7")])
    h.feed(announce)
    det = detections(h.feed(hello(T0 + 1, "10.0.3.7", "203.0.113.5", "s01.upd.kaspersky.com")))[0]
    assert (det.host_mac, det.host_hostname) == ("02:00:00:00:00:07", "Lab-Mac")


# -- bounds ------------------------------------------------------------------------------------


def test_flood_of_random_subdomains_keeps_tables_at_their_caps():
    h = Harness(client_query_table=5000, answer_cache_size=5000)
    rng = random.Random(4)
    tracker = h.tracker
    for i in range(200_000):
        label = "%016x" % rng.getrandbits(64)
        ts = T0 + i * 0.001
        sub = f"{label}.ksn.kaspersky-labs.com"
        if i % 4 == 0:
            h.feed(response(ts, "198.51.100.53", "10.0.0.53", sub, [f"203.0.{(i >> 8) & 255}.{i & 255}"]))
        else:
            h.feed(query(ts, "10.0.9.9", "10.0.0.53", sub))
    host = tracker.hosts["ip:10.0.9.9"]
    cap = tracker.config.max_indicators_per_host
    assert cap <= len(host.evidence) <= cap + 64
    assert h.stats.evictions["host_indicators"] > 100_000
    assert h.hosts()["10.0.9.9"]["evidence"]["dns_query"] == 150_000
    assert len(tracker.client_queries) == 5000 and h.stats.evictions["resolver_client_queries"] > 0
    assert len(tracker.answers) == 5000 and h.stats.evictions["dns_answer_cache"] == 45_000


def test_scan_of_many_source_ips_keeps_hosts_at_cap():
    h = Harness(max_hosts=1000)
    rng = random.Random(5)
    sig_name = "s01.upd.kaspersky.com"
    for i in range(50_000):
        ip = "10.%d.%d.%d" % (rng.randrange(256), rng.randrange(256), rng.randrange(1, 255))
        h.feed(hello(T0 + i, ip, "203.0.113.5", sig_name))
    assert len(h.tracker.hosts) == 1000
    assert h.stats.table_sizes["hosts"] == 1000
    assert h.stats.evictions["hosts"] >= 45_000
    assert len(h.tracker.ip_index) <= 1000 + h.tracker.config.max_pending
