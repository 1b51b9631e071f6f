"""Records -> Detections: match names and fingerprints, attribute by the packet's direction.

Attribution here is the naive, stateless one (the querier, the TLS/HTTP client, the
destination of an answer whose query we never saw).  The tracker refines it with what
only state can tell: resolvers, answer caches, identities.
"""

from __future__ import annotations

import hashlib

from ..records import ClientHello, Detection, DnsMessage, HttpRequest, Signature
from ..stats import Stats


def _is_ip_literal(name) -> bool:
    labels = name.labels
    if len(labels) == 4 and all(label.isdigit() for label in labels):
        return True
    return len(labels) == 1 and b":" in labels[0]


class Detector:
    def __init__(self, signatures, stats: Stats, query_window: float = 10.0,
                 max_queries: int = 65536):
        self.signatures = signatures
        self.stats = stats
        self.query_window = query_window
        self.max_queries = max_queries
        self.queries: dict[tuple, float] = {}

    def detect(self, record) -> list[Detection]:
        if isinstance(record, DnsMessage):
            return self._dns(record)
        if isinstance(record, ClientHello):
            return self._hello(record)
        if isinstance(record, HttpRequest):
            return self._http(record)
        return []

    def _hit(self, record, action: str, host: str, indicator: str, sig: Signature,
             **extra) -> Detection:
        self.stats.matches[sig.category] += 1
        self.stats.detections[(action, sig.category)] += 1
        return Detection(record.ctx.ts, action, host, indicator, sig, record.ctx, record,
                         extra=extra)

    def _dns(self, msg: DnsMessage) -> list[Detection]:
        ctx = msg.ctx
        match = self.signatures.match_name
        if not msg.is_response:
            found = []
            for q in msg.questions:
                sig = match(q.name)
                if sig is not None:
                    self._remember(ctx.src_ip, ctx.src_port, msg.id, q.name.key, ctx.ts)
                    found.append(self._hit(msg, "dns_query", ctx.src_ip, q.name.text, sig))
            return found
        for q in msg.questions:
            key = (ctx.dst_ip, ctx.dst_port, msg.id, q.name.key)
            asked = self.queries.get(key)
            if asked is not None and ctx.ts - asked <= self.query_window:
                return []
        names = [q.name for q in msg.questions] + [a.name for a in msg.answers]
        for name in names:
            sig = match(name)
            if sig is not None:
                return [self._hit(msg, "dns_answer", ctx.dst_ip, name.text, sig)]
        return []

    def _remember(self, ip: str, port: int, ident: int, key: tuple, ts: float) -> None:
        queries = self.queries
        if len(queries) >= self.max_queries:
            del queries[next(iter(queries))]
            self.stats.evictions["dns_queries"] += 1
        queries[(ip, port, ident, key)] = ts
        self.stats.table_sizes["dns_queries"] = len(queries)

    def _hello(self, hello: ClientHello) -> list[Detection]:
        action = "quic_sni" if hello.over == "quic" else "tls_sni"
        host = hello.ctx.src_ip
        if hello.server_name is not None:
            sig = self.signatures.match_name(hello.server_name)
            if sig is not None:
                return [self._hit(hello, action, host, hello.server_name.text, sig,
                                  ech_offered=hello.ech_offered)]
        if hello.ja3:
            ja3 = hashlib.md5(hello.ja3.encode()).hexdigest()
            sig = self.signatures.match_ja3(ja3)
            if sig is not None:
                return [self._hit(hello, "tls_ja3", host, ja3, sig)]
        if hello.ja4:
            sig = self.signatures.match_ja4(hello.ja4)
            if sig is not None:
                return [self._hit(hello, "tls_ja4", host, hello.ja4, sig)]
        return []

    def _http(self, req: HttpRequest) -> list[Detection]:
        if req.host is None:
            return []
        sig = self.signatures.match_name(req.host)
        # A path only refines a Kaspersky name, or an IP-literal Host (an internal update
        # mirror such as the KSC server): on any other name it would make look-alikes fire.
        path_sig = (self.signatures.match_path(req.path, sig)
                    if sig is not None or _is_ip_literal(req.host) else None)
        if path_sig is not None:
            return [self._hit(req, "http_host", req.ctx.src_ip, req.host.text, path_sig,
                              name_rule=sig.id if sig else None)]
        if sig is not None:
            return [self._hit(req, "http_host", req.ctx.src_ip, req.host.text, sig)]
        return []
