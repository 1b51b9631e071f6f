"""The tracker's configuration and the rules of the two tables the decoder consults.

The decoder asks the tracker two things while it reads: whether a flow start towards an
address is worth a record (the DNS answer cache's addresses) and whether a DNS server's
nameless messages can still change anything (its resolvers).  A read that tracks in a
second process (split_read) keeps a copy of those two tables in the decoding process
(track.mirror), so both follow the rules written here, and this module imports nothing
that a decoding process does not need (no SQLite, no output formats).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from ..inet import AF_INET, AF_INET6, inet_pton
from ..stats import Stats
from .internal import DEFAULT_INTERNAL

KSC_TCP_PORTS = {
    13000: "Network Agent / secondary server to Administration Server (TLS)",
    14000: "Network Agent to Administration Server (legacy, no TLS)",
    13111: "KSN proxy on the Administration Server",
    17000: "activation proxy on the Administration Server",
    13291: "Administration Console to Administration Server",
    13292: "mobile devices to Administration Server",
    13295: "distribution point server push",
    13299: "Web Console OpenAPI",
}
KSC_UDP_PORTS = {
    15000: "Administration Server / distribution point to Network Agent",
    15001: "distribution point updates to Network Agent",
}

A, AAAA = 1, 28
MAX_ANSWER_TTL = 86400


@dataclass
class TrackerConfig:
    internal: list[str] = field(default_factory=lambda: list(DEFAULT_INTERNAL))
    resolvers: list[str] = field(default_factory=list)
    answer_grace: float = 300.0
    answer_cache_size: int = 65536
    max_hosts: int = 100000  # inventory cap (the store's, or memory's without a store)
    cached_hosts: int = 20000  # hosts kept in memory in front of the store (LRU)
    dormant_days: float = 14.0
    evidence_sample: int = 20
    forward_window: float = 2.0  # seconds between a client query and the resolver's forward
    client_query_table: int = 65536
    max_indicators_per_host: int = 256
    identity_table: int = 65536
    max_resolvers: int = 4096
    max_pending: int = 20000  # dirty hosts + events + identities before flush() is forced
    sample_interval: float = 3600.0  # a row's next event is sampled after this long


def packed(address: str) -> bytes:
    return inet_pton(AF_INET6 if ":" in address else AF_INET, address)


def put(table: OrderedDict, key, value, cap: int, stats: Stats, name: str) -> None:
    """Insert or refresh ``key`` in an LRU table of at most ``cap`` entries."""
    if key in table:
        table.move_to_end(key)
    elif len(table) >= cap:
        table.popitem(last=False)
        stats.evictions[name] += 1
    table[key] = value


def resolver_marked(msg, internal) -> tuple[str, str] | None:
    """(server, how) a DNS message between two internal hosts marks a resolver: the server
    that answers one (``answers``) or is asked (``queried``); None for any other message."""
    ctx = msg.ctx
    if msg.is_response:
        if ctx.src_port != 53:
            return None
        server, how = ctx.src_ip, "answers"
    elif ctx.dst_port == 53:
        server, how = ctx.dst_ip, "queried"
    else:
        return None
    if ctx.src_ip != ctx.dst_ip and ctx.src_ip in internal and ctx.dst_ip in internal:
        return server, how
    return None


def caches_answers(msg) -> bool:
    """Whether a DNS message's addresses may enter the answer cache: a DNS server's response
    with answers (not mDNS's)."""
    return msg.is_response and msg.ctx.src_port == 53 and bool(msg.answers)


def report_redundant(ip: str, internal, resolvers) -> bool:
    """Whether a DNS message to or from server ``ip`` that names nothing can change nothing
    in the tables: only an internal server is marked a resolver, and one that is already a
    resolver only moves up the table (capture.dns_screen)."""
    return ip not in internal or ip in resolvers


def answered_name(msg, match_name):
    """(name, signature) of a DNS response whose addresses the answer cache keeps: the first
    question, else the first answer owner, that matches a signature; None otherwise."""
    for q in msg.questions:
        sig = match_name(q.name)
        if sig is not None:
            return q.name.text, sig
    for ans in msg.answers:
        sig = match_name(ans.name)
        if sig is not None:
            return ans.name.text, sig
    return None


def cached_answers(msg, grace: float):
    """(address, window) of each answer of a response that the answer cache keeps (an A or
    AAAA record with an address): how long after the answer a flow to the address still
    counts, its TTL capped at a day plus ``grace``."""
    for ans in msg.answers:
        if (ans.rtype == A or ans.rtype == AAAA) and ans.data:
            yield ans.data, min(max(ans.ttl, 0), MAX_ANSWER_TTL) + grace


def cache_answer(answers: OrderedDict, keys: set, address: str, value, cap: int, stats: Stats) -> None:
    """Put ``address`` in the answer cache ``answers`` (LRU, at most ``cap``) and in ``keys``,
    the packed superset of its addresses the decoder screens flow starts with, rebuilding
    that first once stale addresses outnumber the live."""
    put(answers, address, value, cap, stats, "dns_answer_cache")
    if len(keys) > 2 * len(answers) + 64:
        keys.clear()
        for known in answers:
            keys.add(packed(known))
    keys.add(packed(address))
