"""Name, path and fingerprint matching: label-aware semantics, precedence, and the
shipped Kaspersky set checked against the research notes it was built from."""

from __future__ import annotations

import itertools
import re._constants as C
import re._parser as regex_parser
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from sensor.detect.matcher import SignatureSet, pattern_zone
from sensor.detect.signatures import default_signature_paths, load_signatures
from sensor.records import DomainName, Signature

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "kaspersky-endpoints.md"

REFERENCE_CATEGORIES = {
    "update": "update",
    "ksn_telemetry": "telemetry",
    "activation_licensing": "activation",
    "management_cloud": "management",
    "web_injection_local": "web_injection",
    "pki_crl": "pki",
    "downloads_tools": "downloads",
    "website_not_evidence": "website",
    "oem_not_kaspersky_install": "oem",
}


@pytest.fixture(scope="module")
def shipped() -> SignatureSet:
    return load_signatures(default_signature_paths())


def name(text: str) -> DomainName:
    return DomainName.from_text_bytes(text.encode("latin-1"))


def sig(ident: str, kind: str, value: str, category: str = "update", strength: str = "strong",
        **extra) -> Signature:
    return Signature(id=ident, category=category, strength=strength, kind=kind, value=value,
                     source="test", **extra)


def matched_id(sigs: SignatureSet, domain) -> str | None:
    found = sigs.match_name(domain if isinstance(domain, DomainName) else name(domain))
    return None if found is None else found.id


# --- label-aware semantics ------------------------------------------------------------

@pytest.fixture
def small() -> SignatureSet:
    return SignatureSet([
        sig("web", "exact", "kaspersky.com", "website", "none"),
        sig("labs", "suffix", "kaspersky-labs.com", "downloads", "medium"),
        sig("upd", "pattern", r"s[0-1][0-9]\.upd\.kaspersky\.com"),
        sig("y", "pattern", r"(?:[a-z]+\.)?y\.example\.com", "oem", "weak"),
    ], ruleset="t", version="1")


@pytest.mark.parametrize("text", [
    "notkaspersky.com", "kaspersky.com.evil.example", "kaspersky-com.example", "kaspersky.co",
    "www.kaspersky.com", "kaspersky", "com", "", "s20.upd.kaspersky.com", "s00.upd.kaspersky.com.evil",
    "xs00.upd.kaspersky.com", "notkaspersky-labs.com", "kaspersky-labs.com.evil.example",
])
def test_look_alikes_never_match(small, text):
    assert matched_id(small, text) is None


@pytest.mark.parametrize("text", ["kaspersky.com", "KASPERSKY.COM.", "Kaspersky.Com", "kaspersky.com."])
def test_case_and_trailing_dot(small, text):
    assert matched_id(small, text) == "web"


def test_trailing_empty_label_is_the_root(small):
    assert matched_id(small, DomainName((b"kaspersky", b"com", b""))) == "web"


def test_suffix_matches_name_and_subdomains(small):
    assert matched_id(small, "kaspersky-labs.com") == "labs"
    assert matched_id(small, "a.b.C.Kaspersky-Labs.com") == "labs"


def test_label_containing_a_dot_never_spans_labels(small):
    assert matched_id(small, DomainName((b"s00.upd", b"kaspersky", b"com"))) is None
    assert matched_id(small, DomainName((b"kaspersky.com",))) is None
    assert matched_id(small, DomainName((b"x.kaspersky-labs", b"com"))) is None
    # the zone (example, com) is reached, but "a\.y" must not satisfy "[a-z]+\." + "y"
    assert matched_id(small, DomainName((b"a.y", b"example", b"com"))) is None
    assert matched_id(small, DomainName((b"a", b"y", b"example", b"com"))) == "y"


def test_non_printable_label_bytes(small):
    assert matched_id(small, DomainName((b"s0\x000", b"upd", b"kaspersky", b"com"))) is None
    assert matched_id(small, DomainName((b"\xff\\\"", b"kaspersky-labs", b"com"))) == "labs"


def test_patterns_are_full_matches(small):
    assert matched_id(small, "s19.upd.kaspersky.com") == "upd"
    assert matched_id(small, "a.s19.upd.kaspersky.com") is None


def test_overlong_name_skips_patterns_but_not_suffixes(small):
    long_label = b"a" * 1100
    assert matched_id(small, DomainName((long_label, b"y", b"example", b"com"))) is None
    assert matched_id(small, DomainName((long_label, b"kaspersky-labs", b"com"))) == "labs"


# --- precedence -----------------------------------------------------------------------

def test_exact_beats_suffix_and_pattern():
    sigs = SignatureSet([
        sig("suffix", "suffix", "ksn.kaspersky-labs.com", "telemetry"),
        sig("pattern", "pattern", r"[a-z0-9-]+\.ksn\.kaspersky-labs\.com", "telemetry"),
        sig("exact", "exact", "mdr.ksn.kaspersky-labs.com", "telemetry", "weak"),
    ])
    assert matched_id(sigs, "mdr.ksn.kaspersky-labs.com") == "exact"
    assert matched_id(sigs, "dc1.ksn.kaspersky-labs.com") == "pattern"
    assert matched_id(sigs, "a.b.ksn.kaspersky-labs.com") == "suffix"
    assert matched_id(sigs, "ksn.kaspersky-labs.com") == "suffix"


def test_longest_suffix_wins():
    sigs = SignatureSet([
        sig("outer", "suffix", "kaspersky.ru", "website", "none"),
        sig("inner", "suffix", "upd.kaspersky.ru", "update", "weak"),
    ])
    assert matched_id(sigs, "x.upd.kaspersky.ru") == "inner"
    assert matched_id(sigs, "x.kaspersky.ru") == "outer"


def test_more_literal_pattern_then_stronger_wins():
    sigs = SignatureSet([
        sig("catch-all", "pattern", r"[a-z0-9-]+\.ksn\.kaspersky-labs\.com", "telemetry", "strong"),
        sig("dc1", "pattern", r"dc1(?:-st)?\.ksn\.kaspersky-labs\.com", "telemetry", "weak"),
        sig("weak-any", "pattern", r"[a-z]+\.z\.example\.org", "oem", "weak"),
        sig("strong-any", "pattern", r"[a-z]+\.z\.example\.org", "update", "strong"),
    ])
    assert matched_id(sigs, "dc1-st.ksn.kaspersky-labs.com") == "dc1"
    assert matched_id(sigs, "other.ksn.kaspersky-labs.com") == "catch-all"
    assert matched_id(sigs, "a.z.example.org") == "strong-any"


def test_unindexable_pattern_is_refused():
    with pytest.raises(ValueError):
        SignatureSet([sig("bad", "pattern", r".*kaspersky\.com")])


def test_duplicate_exact_name_is_refused():
    with pytest.raises(ValueError):
        SignatureSet([sig("a", "exact", "kaspersky.com"), sig("b", "exact", "KASPERSKY.COM")])


@pytest.mark.parametrize("regex, zone", [
    (r"^s[0-1][0-9]\.upd\.kaspersky\.com$", ("upd", "kaspersky", "com")),
    (r"downloads[0-9]?\.kaspersky-labs\.com", ("kaspersky-labs", "com")),
    (r"(?:activate\.)?activation-v2(?:\.geo)?\.kaspersky\.com", ("kaspersky", "com")),
    (r"crl\.kaspersky\.com", ("crl", "kaspersky", "com")),
    (r"[a-z]+kaspersky\.com", None),
    (r"(www\.)?kaspersky\.(com|ru)", None),
    (r"a\.kaspersky\.com|b\.evil\.org", None),
    (r"kaspersky\.com+", None),
    (r".*", None),
])
def test_pattern_zone(regex, zone):
    assert pattern_zone(regex)[0] == zone


# --- paths and fingerprints -----------------------------------------------------------

def test_match_path_with_and_standalone():
    host = sig("dnl", "pattern", r"dnl-[0-1][0-9]\.geo\.kaspersky\.com")
    other = sig("crl", "exact", "crl.kaspersky.com", "pki")
    bases = sig("bases", "path", r"/(?:diffs/)?bases/")
    index = sig("index", "path", r"/index/u1313g\.xml", strength="weak")
    sigs = SignatureSet([host, other, bases, index], path_requires={"bases": ("dnl",)})
    assert sigs.match_path("/bases/av/kdb/i386/dailyc.kdc", host).id == "bases"
    assert sigs.match_path("/diffs/bases/ids/i386/idsbase.kdz.srf", host).id == "bases"
    assert sigs.match_path("/bases/av/kdb/i386/dailyc.kdc", other) is None
    assert sigs.match_path("/bases/av/kdb/i386/dailyc.kdc", None) is None
    assert sigs.match_path("/x/bases/", host) is None
    assert sigs.match_path("/index/u1313g.xml", None).id == "index"
    assert sigs.match_path("/index/u1313g.xml?x=1", other).id == "index"


def test_match_path_prefers_the_stronger_indicator():
    sigs = SignatureSet([sig("weak", "path", r"/index/", strength="weak"),
                         sig("strong", "path", r"/index/u0607g\.xml")])
    assert sigs.match_path("/index/u0607g.xml", None).id == "strong"
    assert sigs.match_path("/index/other.xml", None).id == "weak"


def test_match_path_without_path_indicators_is_none():
    sigs = SignatureSet([sig("crl", "exact", "crl.kaspersky.com", "pki")])
    assert sigs.match_path("/anything", None) is None
    assert sigs.match_path("/anything", sigs.signatures[0]) is None


def test_ja3_and_ja4():
    ja4 = "t13d1516h2_8daaf6152771_02713d6af862"
    sigs = SignatureSet([sig("j3", "ja3", "0123456789ABCDEF0123456789abcdef"), sig("j4", "ja4", ja4)])
    assert sigs.match_ja3("0123456789abcdef0123456789abcdef").id == "j3"
    assert sigs.match_ja3("0123456789ABCDEF0123456789ABCDEF").id == "j3"
    assert sigs.match_ja3("f" * 32) is None
    assert sigs.match_ja4(ja4).id == "j4"
    assert sigs.match_ja4(ja4.replace("t13", "q13")) is None


# --- the shipped set against the research notes ----------------------------------------

def _reference_patterns() -> dict:
    if not REFERENCE.exists():
        pytest.skip("reference notes not available")
    text = REFERENCE.read_text(encoding="utf-8")
    section = text[text.index("## 7. Machine-readable patterns"):]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


_SAMPLE_CHARS = "ak7"


def _expand(items) -> list[str]:
    """Example strings for the small, finite-looking regexes of the notes: every branch,
    every digit of a short class, a few characters of a wide class."""
    results = [""]
    for op, value in items:
        if op == C.LITERAL:
            options = [chr(value)]
        elif op == C.AT:
            options = [""]
        elif op == C.IN:
            chars = []
            for kind, arg in value:
                if kind == C.LITERAL:
                    chars.append(chr(arg))
                elif kind == C.RANGE:
                    chars.extend(chr(c) for c in range(arg[0], arg[1] + 1))
            options = chars if len(chars) <= 10 else [c for c in _SAMPLE_CHARS if c in chars]
        elif op == C.SUBPATTERN:
            options = _expand(value[-1])
        elif op == C.BRANCH:
            options = [s for branch in value[1] for s in _expand(branch)]
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            low, high, sub = value
            inner = _expand(sub)[:3]
            counts = {low, low + 1} if high > 1 else {low, high}
            options = [s * count for count in sorted(counts) for s in inner]
        else:
            raise AssertionError(f"unexpected regex op {op}")
        results = [a + b for a, b in itertools.product(results, dict.fromkeys(options))]
        assert len(results) < 5000
    return results


def expand(regex: str) -> list[str]:
    return list(dict.fromkeys(_expand(regex_parser.parse(regex))))


def test_expander_generates_the_reference_ranges():
    names = expand(r"^s[0-1][0-9]\.upd\.kaspersky\.com$")
    assert len(names) == 20 and "s00.upd.kaspersky.com" in names and "s19.upd.kaspersky.com" in names


def _reference_names():
    ref = _reference_patterns()
    for section, category in REFERENCE_CATEGORIES.items():
        for entry in ref["categories"][section]:
            if "pattern" in entry:
                for text in expand(entry["pattern"]):
                    yield section, category, entry, text


def test_every_reference_name_matches_its_category(shipped):
    checked = 0
    for section, category, entry, text in _reference_names():
        found = shipped.match_name(name(text))
        assert found is not None, f"{text} ({section}) not matched"
        assert found.category == category, f"{text}: {found.id} is {found.category}, notes say {category}"
        if category == "website":
            assert found.strength == "none", text
        if entry.get("vendor"):
            assert found.vendor, f"{text} should carry its OEM vendor"
        checked += 1
    assert checked > 150


def test_reference_strong_names_stay_strong(shipped):
    for _, _, entry, text in _reference_names():
        found = shipped.match_name(name(text))
        if entry["strength"] == "strong" and found.id != "ksp-ksn-ppt-issuer":
            assert found.strength == "strong", text


def test_dnl_geo_carries_the_check_point_vendor(shipped):
    for number in range(20):
        found = shipped.match_name(name(f"dnl-{number:02d}.geo.kaspersky.com"))
        assert (found.category, found.vendor) == ("update", "Check Point")
    kav8 = shipped.match_name(name("kav8.zonealarm.com"))
    assert (kav8.category, kav8.vendor) == ("oem", "Check Point")


def test_reference_update_paths(shipped):
    ref = _reference_patterns()
    dnl = shipped.match_name(name("dnl-07.geo.kaspersky.com"))
    for entry in ref["categories"]["update_url_paths"]:
        for path in expand(entry["pattern"]):
            found = shipped.match_path(path + "av/kdb/i386/dailyc.kdc" if path.endswith("/") else path, dnl)
            assert found is not None and found.category == "update", path
            assert found.strength == entry["strength"], path
    assert shipped.match_path("/Updates/index/u0607g.xml", None).id == "ksp-upd-path-index-u0607g"
    assert shipped.match_path("/bases/av/kdb/i386/dailyc.kdc", None) is None


def test_injected_script_guid_path(shipped):
    host = shipped.match_name(name("gc.kis.v2.scr.kaspersky-labs.com"))
    path = "/fd126c42-ebfa-4e12-b309-bb3fdd723ac1/main.js"
    assert shipped.match_path(path, host).id == "ksp-inj-path-guid"
    assert shipped.match_path(path.upper(), host).id == "ksp-inj-path-guid"
    assert shipped.match_path(path, None) is None


def test_unverified_hypotheses_never_match(shipped):
    for text in _reference_patterns()["categories"]["unverified_hypotheses"]:
        assert shipped.match_name(name(text)) is None, text
        assert shipped.match_name(name("www." + text)) is None, text


@pytest.mark.parametrize("text", [
    "geo.kaspersky.com", "multisite.kaspersky.com", "dnl-20.geo.kaspersky.com", "dnl-1.geo.kaspersky.com",
    "s00.upd.kaspersky.com.cn", "ksc.kaspersky.com", "upd.kaspersky.com", "kaspersky-labs.com",
    "evil-kaspersky.com", "kaspersky.com.ru.evil", "kis.v2.scr.kaspersky-labs.com",
])
def test_shipped_set_does_not_wildcard(shipped, text):
    found = shipped.match_name(name(text))
    assert found is None or found.category == "website", (text, found)


def test_shipped_set_website_and_kaspersky_com_rules(shipped):
    assert shipped.match_name(name("www.kaspersky.com")).category == "website"
    assert shipped.match_name(name("multisite3.geo.kaspersky.com")).category == "website"
    assert shipped.match_name(name("support.kaspersky.co.uk")).category == "website"
    assert shipped.match_name(name("WWW.SecureList.com.")).category == "website"
    assert shipped.match_name(name("kaspersky.co")) is None
    assert shipped.match_name(name("gc.kis.v2.scr.kaspersky-labs.com")).category == "web_injection"


# --- robustness -----------------------------------------------------------------------

_zones = st.sampled_from([(), (b"kaspersky", b"com"), (b"upd", b"kaspersky", b"com"),
                          (b"ksn", b"kaspersky-labs", b"com"), (b"kaspersky", b"co", b"uk"),
                          (b"geo", b"kaspersky", b"com"), (b"example", b"org")])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=70), max_size=8), _zones)
def test_random_label_tuples_never_raise(shipped, labels, zone):
    for candidate in (tuple(labels), tuple(labels) + zone):
        found = shipped.match_name(DomainName(candidate))
        assert found is None or isinstance(found, Signature)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.booleans())
def test_random_paths_never_raise(shipped, path, with_name):
    host = shipped.match_name(name("dnl-01.geo.kaspersky.com")) if with_name else None
    found = shipped.match_path(path, host)
    assert found is None or found.kind == "path"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_random_fingerprints_never_raise(shipped, text):
    assert shipped.match_ja3(text) is None
    assert shipped.match_ja4(text) is None



def _shipped_name_examples() -> list[str]:
    """Names every shipped name indicator matches: its exact name, its suffix alone and
    under a label, and the expansions of its pattern, each also in upper case."""
    entries = yaml.safe_load((ROOT / "signatures" / "kaspersky.yaml").read_text(encoding="utf-8"))["indicators"]
    names = []
    for entry in entries:
        if "exact" in entry:
            names.append(entry["exact"])
        elif "suffix" in entry:
            names += [entry["suffix"].lstrip("."), "a7-x." + entry["suffix"].lstrip(".")]
        elif "pattern" in entry:
            names += expand(entry["pattern"])[:50]
    return names + [text.upper() for text in names]


def test_the_name_screen_passes_every_shipped_indicator(shipped):
    """The decoder drops DNS messages, ClientHellos and HTTP requests that hold none of the
    screen's labels, so every name that matches must hold one: in wire format (the DNS
    screen) and as text (a substring of the lower-cased name, the hello and request
    screen)."""
    screen = shipped.name_screen()
    wire_screen, text_labels = screen.wire, screen.text
    checked = 0
    for text in _shipped_name_examples():
        domain = name(text)
        if shipped.match_name(domain) is None:
            continue
        wire = b"".join(bytes((len(label),)) + label for label in domain.labels) + b"\0"
        assert wire_screen.search(wire), text
        assert any(label in text.lower().encode() for label in text_labels), text
        checked += 1
    assert checked > 100


def test_the_name_screen_keeps_few_distinctive_labels(shipped):
    """One text label per substring search on each hello: the shipped set's indicators
    share "kaspersky", which covers "kaspersky-labs" too; no label is short enough to
    pass ordinary names."""
    screen = shipped.name_screen()
    text_labels = screen.text
    assert b"kaspersky" in text_labels and b"kaspersky-labs" not in text_labels
    # The wire screen keeps each label whole: "\x0ekaspersky-labs" holds no "\x09kaspersky".
    assert b"kaspersky-labs" in screen.labels and set(text_labels) <= set(screen.labels)
    assert all(screen.wire.fullmatch(bytes((len(label),)) + label) for label in screen.labels)
    assert len(text_labels) <= 5
    assert all(len(label) >= 5 for label in text_labels)
    assert not any(label in b"www.example.com api.geo.cdn.example.net" for label in text_labels)
