"""Attribute detections to internal hosts and keep the inventory those hosts make up.

The detector attributes naively (querier, TLS/HTTP client, answer recipient).  This stage
adds what needs state:

* **DNS answer cache.**  A/AAAA records of any response whose question or answer owner
  names match a signature are cached by IP (TTL capped at a day, plus ``answer_grace``;
  LRU-capped).  A flow start (TCP SYN or first UDP packet) from an internal host to a
  cached IP becomes ``dns_answer_flow`` for that host -- unless the same host's own
  ``dns_query``/``dns_answer`` for that name was counted within the TTL window: the flow
  is then the follow-up of a lookup already counted, and counting it again would double
  the evidence.  Flows to port 53 are ignored.
* **Resolvers.**  An internal host is a resolver when it is declared (``--resolver``),
  sends DNS responses to internal hosts, receives DNS queries from internal hosts, or
  forwards a matched query within ``forward_window`` seconds after a client asked it the
  same name.  A forwarded query is re-attributed to that client (``extra.forwarded_by``)
  and not counted again, since the client's own query already was.  A resolver's
  remaining DNS evidence never makes it an install (see verdict.py).  When only the
  resolver's upstream lookup is visible and another internal host then connects to the
  answered IP without having received the answer itself, the recipient is inferred to be
  a resolver (``upstream_only``) and the connecting host gets ``dns_answer_flow``.
* **Public-DNS fallback.**  A non-resolver internal host asking one of the public
  resolvers Kaspersky products fall back to gets ``extra.fallback_dns = True``.
* **KSC ports.**  TCP 13000/14000/13111/17000/13291/13292/13295/13299 between internal
  hosts: the connecting host gets ``ksc_port`` (managed endpoint), the listener
  ``ksc_server`` evidence (Administration Server candidate; no separate alert).  UDP
  15000/15001 are Network Agent listeners, so both ends run an agent: the sender gets the
  alert, a unicast internal receiver ``ksc_port`` evidence too.
* **Identity.**  DHCP (v4/v6) and mDNS give MAC and hostname.  A host is keyed by MAC
  once known (``mac:…``), else by IP (``ip:…``); an IP-keyed host is merged into the MAC
  host when a lease ties the two, and a MAC host follows its lease to a new IP.

Alerts go out for every detection, external hosts included; only internal hosts enter
the inventory.  Every table is capped and its evictions counted in ``stats.evictions``.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from ..decode.dhcp import mdns_leases
from ..records import AppRecord, Detection, DhcpLease, DnsMessage, FlowStart, HostEvent, Signature
from ..stats import Stats
from .internal import InternalNetworks, canonical_ip, host_port, is_group_address
from .store import Batch, Store
from .tables import (KSC_TCP_PORTS, KSC_UDP_PORTS, TrackerConfig, answered_name, cache_answer, cached_answers,
                     caches_answers, report_redundant, resolver_marked)
from .tables import put as _put
from .verdict import INSTALL_VERDICTS, decide, summarize, tally_key

# json.dumps with options builds an encoder per call, which cost more than encoding a
# detection's few details.
_DETAIL_JSON = json.JSONEncoder(sort_keys=True, default=str)

PUBLIC_FALLBACK_RESOLVERS = frozenset((
    "8.8.8.8", "1.1.1.1", "223.6.6.6", "9.9.9.9", "185.228.168.168",
    "2001:4860:4860::8888", "2606:4700:4700::1111", "2400:3200:baba::1", "2620:fe::fe",
    "2a0d:2a00:1::",
))

FOLD_SLACK = 64  # folded "(other …)" rows allowed beyond the per-host indicator cap


class Evidence:
    __slots__ = ("signature_id", "category", "strength", "vendor", "count", "fallback", "first",
                 "last", "last_key", "sampled_at")

    def __init__(self, signature_id, category, strength, vendor, count=0, fallback=0, first=0.0,
                 last=0.0, last_key="", sampled_at=float("-inf")):
        self.signature_id = signature_id
        self.category = category
        self.strength = strength
        self.vendor = vendor
        self.count = count
        self.fallback = fallback
        self.first = first
        self.last = last
        self.last_key = last_key
        self.sampled_at = sampled_at

    def observe(self, ts: float, flow: str) -> bool:
        """Count an observation unless it falls inside the interval already counted (a re-read)."""
        if self.count and self.first <= ts <= self.last and not (ts == self.last and flow != self.last_key):
            return False
        if not self.count:
            self.first = self.last = ts
            self.last_key = flow
        elif ts < self.first:
            self.first = ts
        else:
            self.last = ts
            self.last_key = flow
        self.count += 1
        return True


class Host:
    __slots__ = ("key", "ip", "mac", "hostname", "role", "first_seen", "last_seen", "verdict",
                 "confidence", "detected_at", "evidence", "tally", "dirty_rows", "stored")

    def __init__(self, key, ip, mac, hostname, role, first_seen, last_seen, verdict="none",
                 confidence="low", detected_at=None, stored=False):
        self.key = key
        self.ip = ip
        self.mac = mac
        self.hostname = hostname
        self.role = role
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.verdict = verdict
        self.confidence = confidence
        self.detected_at = detected_at
        self.evidence: dict[tuple[str, str], Evidence] = {}
        self.tally: dict[tuple, int] = {}
        self.dirty_rows: set = set()
        self.stored = stored

    def add_tally(self, key: tuple, count: int) -> bool:
        """True when the key is new, which is the only time the verdict can change."""
        old = self.tally.get(key, 0)
        self.tally[key] = old + count
        return old == 0

    def rejudge(self) -> None:
        self.verdict, self.confidence = decide(self.tally, self.role == "resolver")

    def evidence_rows(self):
        for (action, indicator), ev in self.evidence.items():
            yield action, indicator, ev.category, ev.strength, ev.vendor, ev.count, ev.fallback


class _Lookup:
    """Who received one DNS answer; shared by the cache entries of all its addresses."""

    __slots__ = ("recipient", "upstream", "flowed")

    def __init__(self, recipient: str, upstream: bool):
        self.recipient = recipient
        self.upstream = upstream
        self.flowed = False


class _Answer:
    __slots__ = ("name", "signature", "expiry", "window", "lookup")

    def __init__(self, name, signature, expiry, window, lookup):
        self.name = name
        self.signature = signature
        self.expiry = expiry
        self.window = window
        self.lookup = lookup


def _flow_key(ctx) -> str:
    return f"{ctx.transport} {ctx.src_ip}:{ctx.src_port} > {ctx.dst_ip}:{ctx.dst_port}"


class Tracker:
    def __init__(self, config: TrackerConfig, signatures, stats: Stats, store: Store | None = None):
        self.config = config
        self.signatures = signatures
        self.stats = stats
        self.store = store
        self.internal = InternalNetworks(config.internal)
        self.declared = {canonical_ip(ip) for ip in config.resolvers}
        self.resolvers: OrderedDict[str, str] = OrderedDict()
        self.answers: OrderedDict[str, _Answer] = OrderedDict()
        # Packed forms of the answer cache's addresses, for the decoder's flow screen
        # (decode.packet.Interest.flow_addresses): a superset, pruned as the cache turns over.
        self.answer_keys: set[bytes] = set()
        self.client_queries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self.hosts: OrderedDict[str, Host] = OrderedDict()
        self.ip_index: dict[str, str] = {}
        self.ip_mac: OrderedDict[str, str] = OrderedDict()
        self.mac_ip: OrderedDict[str, str] = OrderedDict()
        self.mac_name: OrderedDict[str, str] = OrderedDict()
        self.ip_name: OrderedDict[str, str] = OrderedDict()
        self.last_ts = 0.0
        self._dirty: dict[str, Host] = {}
        self._events: list[tuple] = []
        self._identities: dict[tuple, list] = {}
        self._resolver_rows: dict[str, tuple] = {}
        self._renames: list[tuple[str, str]] = []
        self._ksc_signatures: dict[tuple[int, str], Signature] = {}
        self._memory_cap = config.max_hosts if store is None else min(config.max_hosts, config.cached_hosts)
        if store is not None:
            store.max_hosts = config.max_hosts
            store.events_per_host = config.evidence_sample
            for ip, source in store.resolvers(config.max_resolvers):
                self.resolvers[ip] = source
            for mac, ip, hostname in store.recent_identities(config.identity_table):
                self._remember_identity(mac or None, ip or None, hostname or None)
        for ip in self.declared:
            self.resolvers[ip] = "declared"
        self._sizes()

    # -- entry point -----------------------------------------------------------------

    def observe(self, record: AppRecord, detections: list[Detection]) -> list:
        ts = record.ctx.ts
        if ts > self.last_ts:
            self.last_ts = ts
        if isinstance(record, FlowStart):
            out = self._flow(record)
        elif isinstance(record, DnsMessage):
            out = self._dns(record, detections)
        elif isinstance(record, DhcpLease):
            self.learn_identity(record.mac, record.ip, record.hostname, ts, "dhcp")
            out = []
        else:
            out = []
            for det in detections:
                self._attribute(det, out)
        if len(self._dirty) + len(self._events) + len(self._identities) >= self.config.max_pending:
            self.flush()
        return out

    # -- DNS ---------------------------------------------------------------------------

    def _dns(self, msg: DnsMessage, detections: list[Detection]) -> list:
        ctx = msg.ctx
        if msg.is_response and ctx.src_port == 5353:
            for lease in mdns_leases(msg):
                self.learn_identity(lease.mac, lease.ip, lease.hostname, ctx.ts, "mdns")
        marked = resolver_marked(msg, self.internal)
        if marked is not None:
            self.mark_resolver(*marked, ctx.ts)
        if caches_answers(msg):
            self._cache_answers(msg)
        out: list = []
        for det in detections:
            if det.action == "dns_query":
                self._query(det, out)
            else:
                self._attribute(det, out)
        return out

    def _query(self, det: Detection, out: list) -> None:
        ctx = det.ctx
        querier = det.host_ip
        name = det.indicator.lower()
        if ctx.dst_port == 53 and ctx.dst_ip != querier and ctx.dst_ip in self.internal:
            _put(self.client_queries, (ctx.dst_ip, name), (querier, ctx.ts),
                 self.config.client_query_table, self.stats, "resolver_client_queries")
        asked = self.client_queries.get((querier, name))
        if asked is not None and 0.0 <= ctx.ts - asked[1] <= self.config.forward_window \
                and asked[0] != querier:
            self.mark_resolver(querier, "forwarding", ctx.ts)
            det.host_ip = asked[0]
            det.extra["forwarded_by"] = querier
            self._enrich(det)
            out.append(det)
            return
        if querier in self.resolvers:
            det.extra["resolver"] = True
        elif ctx.dst_ip in PUBLIC_FALLBACK_RESOLVERS and querier in self.internal:
            det.extra["fallback_dns"] = True
        self._attribute(det, out)

    def _cache_answers(self, msg: DnsMessage) -> None:
        found = answered_name(msg, self.signatures.match_name)
        if found is None:
            return
        name, sig = found
        ctx = msg.ctx
        lookup = _Lookup(ctx.dst_ip, ctx.src_ip not in self.internal)
        for address, window in cached_answers(msg, self.config.answer_grace):
            cache_answer(self.answers, self.answer_keys, address,
                         _Answer(name, sig, ctx.ts + window, window, lookup),
                         self.config.answer_cache_size, self.stats)
        self.stats.table_sizes["dns_answer_cache"] = len(self.answers)

    # -- flows -------------------------------------------------------------------------

    def _flow(self, flow: FlowStart) -> list:
        ctx = flow.ctx
        src = ctx.src_ip
        if src not in self.internal:
            return []
        out: list = []
        dport = ctx.dst_port
        if ctx.transport == "tcp":
            if dport in KSC_TCP_PORTS and ctx.dst_ip != src and ctx.dst_ip in self.internal:
                self._ksc(flow, "tcp", out)
        elif dport in KSC_UDP_PORTS and ctx.dst_ip != src and (
                ctx.dst_ip in self.internal or is_group_address(ctx.dst_ip)):
            self._ksc(flow, "udp", out)
        entry = self.answers.get(ctx.dst_ip)
        if entry is not None and dport != 53:
            if ctx.ts > entry.expiry:
                del self.answers[ctx.dst_ip]
                self.stats.table_sizes["dns_answer_cache"] = len(self.answers)
            else:
                self._answer_flow(flow, entry, out)
        return out

    def _answer_flow(self, flow: FlowStart, entry: _Answer, out: list) -> None:
        ctx = flow.ctx
        src = ctx.src_ip
        lookup = entry.lookup
        if lookup.recipient == src:
            lookup.flowed = True
        host = self._find_host(src)
        if host is not None:
            for action in ("dns_query", "dns_answer"):
                ev = host.evidence.get((action, entry.name))
                if ev is not None and ctx.ts - ev.last <= entry.window:
                    return
        if (lookup.recipient != src and lookup.upstream and not lookup.flowed
                and lookup.recipient in self.internal and lookup.recipient not in self.resolvers):
            self.mark_resolver(lookup.recipient, "upstream_only", ctx.ts)
        sig = entry.signature
        self.stats.detections[("dns_answer_flow", sig.category)] += 1
        det = Detection(ctx.ts, "dns_answer_flow", src, entry.name, sig, ctx, flow,
                        extra={"answer_ip": ctx.dst_ip})
        self._attribute(det, out)

    def _ksc(self, flow: FlowStart, transport: str, out: list) -> None:
        ctx = flow.ctx
        port = ctx.dst_port
        sig = self._ksc_signature(port, transport)
        self.stats.detections[("ksc_port", sig.category)] += 1
        if transport == "tcp":
            extra = {"ksc_role": "endpoint", "ksc_server": ctx.dst_ip}
        else:
            extra = {"ksc_role": "agent", "ksc_peer": ctx.dst_ip}
        det = Detection(ctx.ts, "ksc_port", ctx.src_ip, host_port(ctx.dst_ip, port, transport), sig,
                        ctx, flow, extra=extra)
        self._attribute(det, out)
        if transport == "tcp":
            event = self._record(ctx.dst_ip, "ksc_server", f"{transport}/{port}", sig, ctx, False)
        elif not is_group_address(ctx.dst_ip):
            event = self._record(ctx.dst_ip, "ksc_port", host_port(ctx.src_ip, port, transport), sig, ctx, False)
        else:
            event = None
        if event is not None:
            out.append(event)

    def _ksc_signature(self, port: int, transport: str) -> Signature:
        sig = self._ksc_signatures.get((port, transport))
        if sig is None:
            purpose = (KSC_TCP_PORTS if transport == "tcp" else KSC_UDP_PORTS)[port]
            sig = Signature(id=f"ksc-port-{port}-{transport}", category="management", strength="medium",
                            kind="port", value=f"{transport}/{port}",
                            source="Kaspersky Security Center port table (KSC 13-15 documentation)",
                            description=f"Kaspersky Security Center: {purpose}")
            self._ksc_signatures[(port, transport)] = sig
        return sig

    # -- attribution and evidence --------------------------------------------------------

    def _attribute(self, det: Detection, out: list) -> None:
        out.append(det)
        event = self._record(det.host_ip, det.action, det.indicator, det.signature, det.ctx,
                             bool(det.extra.get("fallback_dns")), det)
        if event is not None:
            out.append(event)

    def _enrich(self, det: Detection) -> None:
        host = self._find_host(det.host_ip)
        if host is not None:
            det.host_mac, det.host_hostname = host.mac, host.hostname
        else:
            mac = self.ip_mac.get(det.host_ip)
            det.host_mac = mac
            det.host_hostname = (self.mac_name.get(mac) if mac else None) or self.ip_name.get(det.host_ip)

    def _record(self, ip: str, action: str, indicator: str, sig: Signature, ctx, fallback: bool,
                det: Detection | None = None) -> HostEvent | None:
        if ip not in self.internal:
            return None
        ts = ctx.ts
        host = self._host(ip, ts)
        if det is not None:
            det.host_mac, det.host_hostname = host.mac, host.hostname
        key = (action, indicator)
        ev = host.evidence.get(key)
        if ev is None:
            cap = self.config.max_indicators_per_host
            if len(host.evidence) >= cap:
                self.stats.evictions["host_indicators"] += 1
                key = (action, f"(other {sig.id})")
                ev = host.evidence.get(key)
                if ev is None and len(host.evidence) >= cap + FOLD_SLACK:
                    return None
            if ev is None:
                ev = Evidence(sig.id, sig.category, sig.strength, sig.vendor)
                host.evidence[key] = ev
        flow = _flow_key(ctx)
        if not ev.observe(ts, flow):
            return None
        if fallback:
            ev.fallback += 1
        if ts < host.first_seen:
            host.first_seen = ts
        if ts > host.last_seen:
            host.last_seen = ts
        host.dirty_rows.add(key)
        self._dirty[host.key] = host
        if ts - ev.sampled_at >= self.config.sample_interval:
            ev.sampled_at = ts
            detail = _DETAIL_JSON.encode(det.extra) if det is not None and det.extra else ""
            self._events.append((host.key, ts, action, key[1], sig.id, flow, detail))
        if host.add_tally(tally_key(action, ev.category, ev.strength, ev.vendor, fallback), 1):
            return self._rejudge(host, ts)
        return None

    def _rejudge(self, host: Host, ts: float) -> HostEvent | None:
        host.rejudge()
        self._dirty[host.key] = host
        if host.verdict in INSTALL_VERDICTS and host.detected_at is None:
            host.detected_at = ts
            return HostEvent(ts, "host_detected", self._summary(host, ts))
        return None

    # -- hosts -----------------------------------------------------------------------------

    def _find_host(self, ip: str) -> Host | None:
        """The host an IP belongs to, from memory or the store, without creating one."""
        key = self.ip_index.get(ip)
        if key is not None:
            host = self.hosts.get(key) or self._dirty.get(key)
            if host is not None:
                return host
        mac = self.ip_mac.get(ip)
        if mac is not None:
            host = self._load("mac:" + mac)
            if host is not None:
                return host
        host = self._load("ip:" + ip)
        if host is None and self.store is not None:
            key = self.store.key_for_ip(ip)
            if key is not None:
                host = self._load(key)
        if host is not None:
            self._keep(host)
        return host

    def _host(self, ip: str, ts: float) -> Host:
        host = self._find_host(ip)
        if host is None:
            mac = self.ip_mac.get(ip)
            hostname = (self.mac_name.get(mac) if mac else None) or self.ip_name.get(ip)
            role = "resolver" if ip in self.resolvers else ""
            host = Host(("mac:" + mac) if mac else ("ip:" + ip), ip, mac, hostname, role, ts, ts)
            self._dirty[host.key] = host
        elif host.ip != ip:
            self._move_ip(host, ip)
        self._keep(host)
        return host

    def _load(self, key: str) -> Host | None:
        host = self.hosts.get(key) or self._dirty.get(key)
        if host is not None or self.store is None:
            return host
        loaded = self.store.load_host(key)
        if loaded is None:
            return None
        (key, ip, mac, hostname, role, first, last, verdict, confidence, detected), rows = loaded
        host = Host(key, ip, mac, hostname, role, first, last, verdict, confidence, detected, stored=True)
        for action, indicator, sig_id, category, strength, vendor, count, fallback, ev_first, ev_last, \
                last_key, sampled_at in rows:
            host.evidence[(action, indicator)] = Evidence(sig_id, category, strength, vendor, count, fallback,
                                                         ev_first, ev_last, last_key, sampled_at)
            if count - fallback:
                host.add_tally(tally_key(action, category, strength, vendor, False), count - fallback)
            if fallback:
                host.add_tally(tally_key(action, category, strength, vendor, True), fallback)
        if ip in self.resolvers and role != "resolver":
            host.role = "resolver"
        host.rejudge()
        return host

    def _keep(self, host: Host) -> None:
        """Make the host the most recently used one in memory, evicting the least recent."""
        hosts = self.hosts
        if host.key in hosts:
            hosts.move_to_end(host.key)
        else:
            if len(hosts) >= self._memory_cap:
                _, old = hosts.popitem(last=False)
                self.stats.evictions["hosts"] += 1
                if self.store is None:
                    self._dirty.pop(old.key, None)
                if old.key not in self._dirty and self.ip_index.get(old.ip) == old.key:
                    del self.ip_index[old.ip]
            hosts[host.key] = host
            self.stats.table_sizes["hosts"] = len(hosts)
        if host.ip:
            self.ip_index[host.ip] = host.key

    def _move_ip(self, host: Host, ip: str) -> None:
        if host.ip and self.ip_index.get(host.ip) == host.key:
            del self.ip_index[host.ip]
        host.ip = ip
        self.ip_index[ip] = host.key
        self._dirty[host.key] = host

    def _merge(self, source: Host, target: Host) -> None:
        """Fold an IP-keyed host into the MAC-keyed host a lease says it is."""
        for key, ev in source.evidence.items():
            mine = target.evidence.get(key)
            if mine is None:
                target.evidence[key] = ev
            else:
                mine.count += ev.count
                mine.fallback += ev.fallback
                mine.first = min(mine.first, ev.first)
                if ev.last > mine.last:
                    mine.last, mine.last_key = ev.last, ev.last_key
                mine.sampled_at = max(mine.sampled_at, ev.sampled_at)
            target.dirty_rows.add(key)
        for key, count in source.tally.items():
            target.add_tally(key, count)
        target.first_seen = min(target.first_seen, source.first_seen)
        target.last_seen = max(target.last_seen, source.last_seen)
        if source.detected_at is not None and (target.detected_at is None
                                               or source.detected_at < target.detected_at):
            target.detected_at = source.detected_at
        if source.role == "resolver":
            target.role = "resolver"
        target.rejudge()
        self.hosts.pop(source.key, None)
        self._dirty.pop(source.key, None)
        if self.ip_index.get(source.ip) == source.key:
            del self.ip_index[source.ip]
        if source.stored:
            self._renames.append((source.key, target.key))
        self._events = [(target.key,) + e[1:] if e[0] == source.key else e for e in self._events]
        self._dirty[target.key] = target

    # -- identity ------------------------------------------------------------------------

    def _remember_identity(self, mac: str | None, ip: str | None, hostname: str | None) -> None:
        cap, stats = self.config.identity_table, self.stats
        if mac and ip:
            previous = self.mac_ip.get(mac)
            if previous is not None and previous != ip and self.ip_mac.get(previous) == mac:
                del self.ip_mac[previous]
            _put(self.ip_mac, ip, mac, cap, stats, "identities")
            _put(self.mac_ip, mac, ip, cap, stats, "identities")
        if hostname:
            if mac:
                _put(self.mac_name, mac, hostname, cap, stats, "identities")
            if ip:
                _put(self.ip_name, ip, hostname, cap, stats, "identities")
        stats.table_sizes["identities"] = len(self.ip_mac) + len(self.mac_ip) + len(self.mac_name) + len(self.ip_name)

    def learn_identity(self, mac: str | None, ip: str | None, hostname: str | None, ts: float,
                       source: str) -> None:
        """A DHCP lease or mDNS announcement: remember it and update the host it names."""
        mac = mac.lower() if mac else None
        if not (mac or ip):
            return
        hostname = hostname or None
        self._remember_identity(mac, ip, hostname)
        row_key = (mac or "", ip or "", hostname or "")
        row = self._identities.get(row_key)
        if row is None:
            self._identities[row_key] = [source, ts, ts]
        else:
            row[1], row[2] = min(row[1], ts), max(row[2], ts)
        if mac:
            host = self._load("mac:" + mac)
            if ip:
                other_key = self.ip_index.get(ip)
                other = self._load(other_key) if other_key else self._load("ip:" + ip)
                if other is not None and other.key.startswith("ip:"):
                    if host is None:
                        host = Host("mac:" + mac, other.ip, mac, other.hostname, other.role,
                                    other.first_seen, other.last_seen)
                    self._merge(other, host)
            if host is None:
                return
            host.mac = mac
            if ip and host.ip != ip:
                self._move_ip(host, ip)
        else:
            host = self._find_host(ip)
            if host is None:
                return
        if hostname and host.hostname != hostname:
            host.hostname = hostname
        self._dirty[host.key] = host
        self._keep(host)

    def mark_resolver(self, ip: str, source: str, ts: float) -> None:
        if ip in self.resolvers:
            self.resolvers.move_to_end(ip)
            return
        if ip not in self.internal:
            return
        _put(self.resolvers, ip, source, self.config.max_resolvers, self.stats, "resolvers")
        self.stats.table_sizes["resolvers"] = len(self.resolvers)
        self._resolver_rows[ip] = (ip, source, ts, ts)
        host = self._find_host(ip)
        if host is not None and host.role != "resolver":
            host.role = "resolver"
            host.rejudge()
            self._dirty[host.key] = host

    def report_redundant(self, ip: str) -> bool:
        return report_redundant(ip, self.internal, self.resolvers)

    # -- outputs ---------------------------------------------------------------------------

    def _summary(self, host: Host, reference: float) -> dict:
        return summarize(key=host.key, ip=host.ip, mac=host.mac, hostname=host.hostname, role=host.role,
                         first_seen=host.first_seen, last_seen=host.last_seen,
                         detected_at=host.detected_at, evidence=host.evidence_rows(),
                         reference=reference, dormant_days=self.config.dormant_days)

    def inventory(self, now: float) -> list[dict]:
        """Snapshots of every inventory host (the store's, once flushed, else memory's)."""
        if self.store is None:
            return [self._summary(h, now) for h in self.hosts.values() if h.evidence]
        self.flush()
        evidence = self.store.evidence_by_host()
        out = []
        for key, ip, mac, hostname, role, first, last, _, _, detected in self.store.host_rows():
            out.append(summarize(key=key, ip=ip, mac=mac, hostname=hostname, role=role, first_seen=first,
                                 last_seen=last, detected_at=detected, evidence=evidence.get(key, ()),
                                 reference=now, dormant_days=self.config.dormant_days))
        return out

    def flush(self) -> None:
        """Commit pending changes in one transaction (without a store, only reset the bookkeeping)."""
        dirty = self._dirty
        batch = Batch(last_ts=self.last_ts)
        for host in dirty.values():
            if not host.evidence:
                continue
            if not host.stored:
                batch.new_hosts += 1
                host.stored = True
            batch.hosts.append((host.key, host.ip, host.mac, host.hostname, host.role, host.first_seen,
                                host.last_seen, host.verdict, host.confidence, host.detected_at))
            for key in host.dirty_rows:
                ev = host.evidence.get(key)
                if ev is not None:
                    batch.evidence.append((host.key, key[0], key[1], ev.signature_id, ev.category,
                                           ev.strength, ev.vendor, ev.count, ev.fallback, ev.first,
                                           ev.last, ev.last_key, ev.sampled_at))
            host.dirty_rows.clear()
        batch.events = self._events
        batch.identities = [k + tuple(v) for k, v in self._identities.items()]
        batch.resolvers = list(self._resolver_rows.values())
        batch.renames = self._renames
        if batch and self.store is not None:
            self.store.write(batch)
            for name, count in self.store.evictions.items():
                self.stats.evictions[name] = count
        for key in list(dirty):
            if key not in self.hosts:
                host = dirty[key]
                if self.ip_index.get(host.ip) == key:
                    del self.ip_index[host.ip]
        dirty.clear()
        self._events = []
        self._identities = {}
        self._resolver_rows = {}
        self._renames = []
        self._sizes()

    def _sizes(self) -> None:
        sizes = self.stats.table_sizes
        sizes["dns_answer_cache"] = len(self.answers)
        sizes["resolver_client_queries"] = len(self.client_queries)
        sizes["hosts"] = len(self.hosts)
        sizes["resolvers"] = len(self.resolvers)
        sizes["identities"] = len(self.ip_mac) + len(self.mac_ip) + len(self.mac_name) + len(self.ip_name)
        if self.store is not None:
            sizes["store_hosts"] = self.store.host_count

    def close(self) -> None:
        self.flush()
        if self.store is not None:
            self.store.close()
