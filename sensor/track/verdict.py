"""Host verdicts from evidence, and the host summary every consumer shares.

Why a rule table rather than a weighted score: the people acting on the verdict must be
able to explain it to management, and one strong observation is already proof.

Evidence is tallied per (action, category, strength, oem, fallback), where ``oem`` means
the signature names a vendor that ships the Kaspersky engine (or its category is
``oem``) and ``fallback`` means a DNS query sent straight to a public resolver.

Scoring, first rule that applies wins:

1. ``management_server`` -- the host accepted KSC connections (``ksc_server`` evidence:
   internal clients opened TCP 13000/14000/13111/17000/13291/13292/13295/13299 to it).
2. ``install`` (confidence high) -- strong evidence in a product category (update,
   telemetry, activation, management, web_injection, pki) from a non-OEM indicator, or a
   non-website Kaspersky name asked of a public resolver (fallback DNS, which only the
   product does when the system resolver fails).
3. ``install`` (confidence medium) -- the host is a managed endpoint (``ksc_port``:
   it opened a KSC port on an internal server, or received/sent UDP 15000/15001), or it
   shows medium product-category evidence.  Port evidence alone is medium: a matching
   name or certificate later raises the confidence.
4. ``oem_engine`` -- the only product evidence comes from indicators shared with an OEM
   vendor (e.g. the Check Point update path): "Kaspersky engine via <vendor>".
5. ``website_only`` -- evidence exists, but only from the website and downloads
   categories: a person browsing kaspersky.com or fetching an installer.
6. ``none`` -- anything else (weak-only evidence, or only queries a resolver forwarded).

A resolver's DNS evidence (``dns_query``/``dns_answer``, including fallback) never counts:
it asks on behalf of its clients.  Its other evidence (TLS, HTTP, flows, KSC) does.

Activity state: ``active`` while the last evidence is at most ``dormant_days`` old
relative to the reference time, ``dormant`` after that.
"""

from __future__ import annotations

from ..isotime import iso_seconds

INSTALL_VERDICTS = ("install", "management_server", "oem_engine")
VERDICTS = ("install", "management_server", "oem_engine", "website_only", "none")
PRODUCT_CATEGORIES = frozenset(("update", "telemetry", "activation", "management", "web_injection", "pki"))
PERSON_CATEGORIES = frozenset(("website", "downloads"))
DNS_ACTIONS = frozenset(("dns_query", "dns_answer"))
TOP_INDICATORS = 10


def decide(tally, resolver: bool) -> tuple[str, str]:
    """(verdict, confidence) from ``{(action, category, strength, oem, fallback): count}``."""
    strong = medium = endpoint = server = oem = person = False
    for (action, category, strength, is_oem, fallback), count in tally.items():
        if count <= 0 or (resolver and action in DNS_ACTIONS):
            continue
        if action == "ksc_server":
            server = True
        elif action == "ksc_port":
            endpoint = True
        elif is_oem or category == "oem":
            oem = oem or strength != "none"
        elif fallback and category not in PERSON_CATEGORIES and strength != "none":
            strong = True
        elif category in PRODUCT_CATEGORIES:
            strong = strong or strength == "strong"
            medium = medium or strength == "medium"
        elif category in PERSON_CATEGORIES:
            person = True
    if server:
        return "management_server", "high" if strong else "medium"
    if strong:
        return "install", "high"
    if endpoint or medium:
        return "install", "medium"
    if oem:
        return "oem_engine", "medium"
    if person:
        return "website_only", "high"
    return "none", "low"


def tally_key(action: str, category: str, strength: str, vendor: str, fallback: bool) -> tuple:
    return (action, category, strength, bool(vendor) or category == "oem", fallback)


def activity_state(last_seen: float, reference: float, dormant_days: float) -> str:
    return "dormant" if reference - last_seen > dormant_days * 86400.0 else "active"


def iso_utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    return iso_seconds(ts)


def summarize(*, key: str, ip: str | None, mac: str | None, hostname: str | None, role: str,
              first_seen: float, last_seen: float, detected_at: float | None, evidence,
              reference: float, dormant_days: float) -> dict:
    """The host object of ``hosts --format json``, inventory events and metrics.

    ``evidence`` yields (action, indicator, category, strength, vendor, count, fallback).
    """
    tally: dict = {}
    actions: dict[str, int] = {}
    categories: dict[str, int] = {}
    per_indicator: dict[str, int] = {}
    fallback_total = 0
    for action, indicator, category, strength, vendor, count, fallback in evidence:
        plain = count - fallback
        if plain:
            k = tally_key(action, category, strength, vendor, False)
            tally[k] = tally.get(k, 0) + plain
        if fallback:
            k = tally_key(action, category, strength, vendor, True)
            tally[k] = tally.get(k, 0) + fallback
            fallback_total += fallback
        actions[action] = actions.get(action, 0) + count
        categories[category] = categories.get(category, 0) + count
        if action != "ksc_server":
            per_indicator[indicator] = per_indicator.get(indicator, 0) + count
    verdict, confidence = decide(tally, role == "resolver")
    top = sorted(per_indicator.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_INDICATORS]
    return {
        "ip": ip,
        "mac": mac,
        "hostname": hostname,
        "verdict": verdict,
        "confidence": confidence,
        "state": activity_state(last_seen, reference, dormant_days),
        "role": role or None,
        "first_seen": iso_utc(first_seen),
        "last_seen": iso_utc(last_seen),
        "detected_at": iso_utc(detected_at),
        "first_seen_ts": first_seen,
        "last_seen_ts": last_seen,
        "evidence": dict(sorted(actions.items())),
        "categories": dict(sorted(categories.items())),
        "indicators": [name for name, _ in top],
        "fallback_dns": fallback_total,
        "key": key,
    }
