"""The tracker's answers to the decoder, kept where the tracker is not: in the decoding
process of a split read (split_read).

The decoder asks the tracker, packet by packet, which addresses a flow start is evidence
towards (``Tracker.answer_keys``) and whether a DNS server's nameless messages can still
change anything (``Tracker.report_redundant``).  Across a pipe the answers would come late
and depend on timing, so this process keeps them itself, from the same records the
tracker receives, in the same order, by the same rules (track.tables):

* the answer cache's addresses exactly: every put of ``Tracker._cache_answers`` and every
  removal of an expired entry by ``Tracker._flow``, under the same LRU cap, so the
  decoder reports the same flow starts as it would beside the tracker;
* a subset of the resolvers: those the state store held at the start, the declared ones
  and those the tracker marks from a DNS message between internal hosts.  The tracker
  also marks resolvers from forwarded queries and upstream-only lookups; a server missing here is only
  screened less (its messages reach the decoder, which drops them itself).  The one
  difference left is eviction: a tracker holding more than ``max_resolvers`` resolvers
  evicts some this copy may keep, and the decoder would then screen a server whose
  once-a-minute report could have marked it again.
"""

from __future__ import annotations

from collections import OrderedDict

from ..records import DnsMessage, FlowStart
from ..stats import Stats
from .internal import InternalNetworks, canonical_ip
from .tables import (TrackerConfig, answered_name, cache_answer, cached_answers, caches_answers, put,
                     report_redundant, resolver_marked)


class TrackerMirror:
    def __init__(self, config: TrackerConfig, signatures, stored_resolvers=()):
        """``stored_resolvers``: those the state store holds, oldest first, as the tracker
        loads them (Store.resolvers)."""
        self.config = config
        self.match_name = signatures.match_name
        self.internal = InternalNetworks(config.internal)
        self.resolvers: OrderedDict[str, bool] = OrderedDict((ip, True) for ip in stored_resolvers)
        for ip in config.resolvers:
            self.resolvers[canonical_ip(ip)] = True
        self.expiry: OrderedDict[str, float] = OrderedDict()  # answered address -> until when
        self.answer_keys: set[bytes] = set()
        self._evictions = Stats()  # the tracker counts its own

    def observe(self, records) -> None:
        for record in records:
            kind = type(record)
            if kind is DnsMessage:
                self._dns(record)
            elif kind is FlowStart:
                self._flow(record)

    def report_redundant(self, ip: str) -> bool:
        """Tracker.report_redundant with this copy's resolvers."""
        return report_redundant(ip, self.internal, self.resolvers)

    def _dns(self, msg: DnsMessage) -> None:
        marked = resolver_marked(msg, self.internal)
        if marked is not None:
            put(self.resolvers, marked[0], True, self.config.max_resolvers, self._evictions,
                "resolvers")
        if caches_answers(msg):
            self._cache_answers(msg)

    def _cache_answers(self, msg: DnsMessage) -> None:
        if answered_name(msg, self.match_name) is None:
            return
        ts = msg.ctx.ts
        for address, window in cached_answers(msg, self.config.answer_grace):
            cache_answer(self.expiry, self.answer_keys, address, ts + window,
                         self.config.answer_cache_size, self._evictions)

    def _flow(self, flow: FlowStart) -> None:
        ctx = flow.ctx
        if ctx.src_ip not in self.internal:
            return
        expiry = self.expiry.get(ctx.dst_ip)
        if expiry is not None and ctx.dst_port != 53 and ctx.ts > expiry:
            del self.expiry[ctx.dst_ip]
