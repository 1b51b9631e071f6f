"""The signature file format: ``signatures/*.yaml`` parsed and validated into a
:class:`SignatureSet`.

Signature files are edited by hand, so a load reports every problem at once, each as
``path:line: problem`` like a compiler, and a set with any problem is never half-loaded.
The YAML node API (``yaml.compose``) keeps the line of every key and value; plain
``yaml.safe_load`` would lose them and silently keep the last of two duplicate keys.

File format::

    version: "2026.11.28"          # ruleset version, reported in alerts and metrics
    ruleset: kaspersky
    indicators:
      - id: ksp-upd-s-nn           # stable, unique across all loaded files
        category: update           # update telemetry activation management web_injection
                                   # pki downloads website oem
        strength: strong           # strong medium weak none
        source: "[O] KES 11.6 topic 202507"
        pattern: 's[0-1][0-9]\\.upd\\.kaspersky\\.com'
        # optional: description, vendor (OEM vendor sharing the indicator), ports

Exactly one matcher per indicator:

``exact: name``     the name only.
``suffix: name``    the name and every subdomain, label by label.
``pattern: regex``  full match against the lower-cased presentation name (no trailing
                    dot).  The regex must end in at least two literal labels
                    (``\\.kaspersky\\.com``); that tail is the index key, derived from the
                    regex itself, so write one entry per zone instead of ``(com|ru)``.
``path: regex``     HTTP URL path, matched from its start; ``with: <id>`` (or a list of
                    ids) ties it to name indicators, without ``with`` it matches any host.
``ja3: md5hex``     MD5 of the JA3 string, 32 hex digits.
``ja4: string``     JA4 fingerprint (``t13d1516h2_8daaf6152771_02713d6af862``).
"""

from __future__ import annotations

import re
import warnings

import yaml

from ..records import Signature
from .matcher import NAME_KINDS, PATTERN_FLAGS, SignatureSet, pattern_zone
from .signatures import Problems, SignatureError

CATEGORIES = ("update", "telemetry", "activation", "management", "web_injection", "pki",
              "downloads", "website", "oem")
STRENGTHS = ("strong", "medium", "weak", "none")
MATCHER_KEYS = ("exact", "suffix", "pattern", "path", "ja3", "ja4")
REQUIRED_KEYS = ("id", "category", "strength", "source")
OPTIONAL_KEYS = ("description", "vendor", "ports", "with")
INDICATOR_KEYS = REQUIRED_KEYS + MATCHER_KEYS + OPTIONAL_KEYS
TOP_KEYS = ("version", "ruleset", "indicators")

_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_JA3 = re.compile(r"[0-9a-fA-F]{32}")
_JA4 = re.compile(r"[tqd][0-9a-z]{2}[di][0-9]{4}[0-9a-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}")
_PORTS = re.compile(r"(?:(tcp|udp)/)?([0-9]{1,5})(?:-([0-9]{1,5}))?")


def _line(node) -> int:
    return node.start_mark.line + 1


def _scalar(node) -> str | None:
    """A scalar's text, ``None`` for YAML null or a non-scalar node."""
    if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
        return None
    return node.value


def _mapping(node, path: str, what: str, allowed: tuple, errors: Problems) -> dict:
    """Key -> (key node, value node); reports unknown and duplicate keys."""
    fields: dict = {}
    for key_node, value_node in node.value:
        key = _scalar(key_node)
        if key is None:
            errors.add(path, _line(key_node), f"{what} key must be a plain string")
        elif key in fields:
            errors.add(path, _line(key_node),
                       f"duplicate key '{key}' (first at line {_line(fields[key][0])})")
        elif key not in allowed:
            errors.add(path, _line(key_node),
                       f"unknown key '{key}' in {what} (allowed: {', '.join(allowed)})")
        else:
            fields[key] = (key_node, value_node)
    return fields


def _name_problem(value: str) -> str | None:
    if "*" in value:
        return "wildcards are not names; use 'suffix:' for a name and its subdomains"
    labels = value.split(".")
    if len(value) > 253:
        return "longer than 253 characters"
    for label in labels:
        if not _LABEL.fullmatch(label):
            return f"label '{label}' is not a hostname label (a-z, 0-9, '-', '_', 1-63 chars)"
    return None


def _ports_problem(values: list[str]) -> str | None:
    for value in values:
        found = _PORTS.fullmatch(value)
        if found is None:
            return f"invalid port '{value}' (expected N, N-M, tcp/N or udp/N-M)"
        low = int(found.group(2))
        high = int(found.group(3) or low)
        if not 0 < low <= high <= 65535:
            return f"invalid port range '{value}'"
    return None


class _Entry:
    """A validated indicator plus the bits only the loader needs."""

    __slots__ = ("sig", "requires", "requires_line", "ports", "matcher_line")

    def __init__(self, sig, requires, requires_line, ports, matcher_line):
        self.sig = sig
        self.requires = requires
        self.requires_line = requires_line
        self.ports = ports
        self.matcher_line = matcher_line


def _matcher_value(kind: str, raw: str, path: str, line: int, errors: Problems) -> str | None:
    """Normalised matcher value, or ``None`` after reporting why it is unusable."""
    if kind in ("exact", "suffix"):
        value = raw.strip().lower()
        if value.endswith("."):
            value = value[:-1]
        problem = _name_problem(value)
        if problem:
            errors.add(path, line, f"invalid name '{raw}' in '{kind}': {problem}")
            return None
        return value
    if kind in ("pattern", "path"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)
                re.compile(raw, PATTERN_FLAGS if kind == "pattern" else 0)
            zone, _ = pattern_zone(raw)
        except (re.error, RecursionError, OverflowError, FutureWarning) as err:
            errors.add(path, line, f"invalid regex '{raw}' in '{kind}': {err}")
            return None
        if kind == "pattern" and zone is None:
            errors.add(path, line,
                       f"pattern '{raw}' cannot be indexed: it must end in at least two "
                       "literal labels, e.g. '\\.kaspersky\\.com' (write one entry per zone "
                       "rather than an alternation)")
            return None
        return raw
    if kind == "ja3":
        if not _JA3.fullmatch(raw):
            errors.add(path, line, f"invalid ja3 '{raw}': expected 32 hex digits (MD5 of the JA3 string)")
            return None
        return raw.lower()
    if not _JA4.fullmatch(raw):
        errors.add(path, line, f"invalid ja4 '{raw}': expected a JA4 fingerprint such as "
                               "t13d1516h2_8daaf6152771_02713d6af862")
        return None
    return raw


def _indicator(node, path: str, errors: Problems) -> _Entry | None:
    if not isinstance(node, yaml.MappingNode):
        errors.add(path, _line(node), "indicator must be a mapping of keys")
        return None
    count = len(errors.errors)
    fields = _mapping(node, path, "indicator", INDICATOR_KEYS, errors)
    text: dict[str, str] = {}
    for key, (_, value_node) in fields.items():
        if key in ("ports", "with"):
            continue
        value = _scalar(value_node)
        if value is None or value == "":
            errors.add(path, _line(value_node), f"'{key}' must be a non-empty string")
        else:
            text[key] = value
    for key in REQUIRED_KEYS:
        if key not in fields:
            errors.add(path, _line(node), f"missing required key '{key}'")
    ident = text.get("id")
    if ident is not None and not _ID.fullmatch(ident):
        errors.add(path, _line(fields["id"][1]),
                   f"invalid id '{ident}' (lower-case letters, digits, '.', '_', '-')")
    category = text.get("category")
    if category is not None and category not in CATEGORIES:
        errors.add(path, _line(fields["category"][1]),
                   f"unknown category '{category}' (expected one of {', '.join(CATEGORIES)})")
    strength = text.get("strength")
    if strength is not None and strength not in STRENGTHS:
        errors.add(path, _line(fields["strength"][1]),
                   f"unknown strength '{strength}' (expected one of {', '.join(STRENGTHS)})")
    kinds = [key for key in MATCHER_KEYS if key in fields]
    value = None
    if not kinds:
        errors.add(path, _line(node), f"no matcher: give exactly one of {', '.join(MATCHER_KEYS)}")
    elif len(kinds) > 1:
        errors.add(path, _line(fields[kinds[1]][0]),
                   f"several matchers ({', '.join(kinds)}): exactly one is allowed")
    elif kinds[0] in text:
        value = _matcher_value(kinds[0], text[kinds[0]], path, _line(fields[kinds[0]][1]), errors)
    requires, requires_line = _string_list(fields.get("with"), "with", path, errors)
    if requires and kinds and kinds != ["path"]:
        errors.add(path, requires_line, "'with' is only allowed together with 'path'")
    ports, _ = _string_list(fields.get("ports"), "ports", path, errors)
    if ports:
        problem = _ports_problem(ports)
        if problem:
            errors.add(path, _line(fields["ports"][1]), problem)
    if len(errors.errors) != count or value is None:
        return None
    sig = Signature(id=ident, category=category, strength=strength, kind=kinds[0], value=value,
                    source=text["source"], description=text.get("description", ""),
                    vendor=text.get("vendor", ""), file=path, line=_line(node))
    return _Entry(sig, tuple(requires), requires_line, tuple(ports), _line(fields[kinds[0]][1]))


def _string_list(pair, key: str, path: str, errors: Problems) -> tuple[list[str], int]:
    """A scalar or a list of scalars (``ports: [80, tcp/443]``, ``with: [a, b]``)."""
    if pair is None:
        return [], 0
    node = pair[1]
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    values = []
    for item in items:
        value = _scalar(item)
        if value is None or value == "":
            errors.add(path, _line(item), f"'{key}' must be a string or a list of strings")
            return [], _line(node)
        values.append(value)
    if not values:
        errors.add(path, _line(node), f"'{key}' must not be empty")
    return values, _line(node)


# libyaml's parser, when PyYAML was built with it, is ten times faster at start-up and
# reports the same marks; the pure-Python one is the fallback.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_text(text: str, path: str, errors: Problems):
    try:
        return yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = err.problem or err.context or "invalid YAML"
        errors.add(path, line, f"YAML syntax error: {problem}")
    except yaml.reader.ReaderError as err:
        errors.add(path, text.count("\n", 0, err.position) + 1, f"YAML syntax error: {err.reason}")
    except yaml.YAMLError as err:
        errors.add(path, 1, f"YAML syntax error: {err}")
    except RecursionError:
        errors.add(path, 1, "YAML nesting too deep")
    return None


def _load_file(path: str, raw: bytes, errors: Problems) -> tuple[dict, list[_Entry]]:
    """Header values and indicators of one file; problems go to ``errors``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        errors.add(path, raw.count(b"\n", 0, err.start) + 1, "not valid UTF-8")
        return {}, []
    count = len(errors.errors)
    root = _parse_text(text, path, errors)
    if root is None or (isinstance(root, yaml.ScalarNode) and _scalar(root) is None):
        if len(errors.errors) == count:
            errors.add(path, 1, "empty signature file")
        return {}, []
    if not isinstance(root, yaml.MappingNode):
        errors.add(path, _line(root), "top level must be a mapping with version, ruleset, indicators")
        return {}, []
    fields = _mapping(root, path, "file", TOP_KEYS, errors)
    header = {}
    for key in ("version", "ruleset"):
        if key not in fields:
            errors.add(path, _line(root), f"missing required key '{key}'")
            continue
        value = _scalar(fields[key][1])
        if not value:
            errors.add(path, _line(fields[key][1]), f"'{key}' must be a non-empty string")
        else:
            header[key] = value
    if "indicators" not in fields:
        errors.add(path, _line(root), "missing required key 'indicators'")
        return header, []
    node = fields["indicators"][1]
    if not isinstance(node, yaml.SequenceNode):
        errors.add(path, _line(node), "'indicators' must be a list")
        return header, []
    entries = [entry for entry in (_indicator(item, path, errors) for item in node.value)
               if entry is not None]
    return header, entries




def _cross_check(entries: list[_Entry], errors: Problems) -> None:
    """Checks that need every file: duplicate ids and matchers, ``with`` references."""
    by_id: dict[str, _Entry] = {}
    by_matcher: dict[tuple, _Entry] = {}
    for entry in entries:
        sig = entry.sig
        first = by_id.get(sig.id)
        if first is not None:
            errors.add(sig.file, sig.line, f"duplicate id '{sig.id}' "
                                           f"(first at {first.sig.file}:{first.sig.line})")
        else:
            by_id[sig.id] = entry
        matcher = (sig.kind, sig.value, entry.requires)
        first = by_matcher.get(matcher)
        if first is not None:
            errors.add(sig.file, entry.matcher_line,
                       f"duplicate matcher {sig.kind} '{sig.value}' (same as '{first.sig.id}' "
                       f"at {first.sig.file}:{first.sig.line})")
        else:
            by_matcher[matcher] = entry
    for entry in entries:
        for ident in entry.requires:
            target = by_id.get(ident)
            if target is None:
                errors.add(entry.sig.file, entry.requires_line,
                           f"'with' refers to unknown indicator id '{ident}'")
            elif target.sig.kind not in NAME_KINDS:
                errors.add(entry.sig.file, entry.requires_line,
                           f"'with' must refer to a name indicator (exact, suffix, pattern); "
                           f"'{ident}' is {target.sig.kind}")




def parse_files(contents: list[tuple[str, bytes]], errors: Problems) -> SignatureSet:
    """The files' bytes, as read, into one set; raise :class:`SignatureError` listing every
    problem found, those already in ``errors`` first."""
    entries: list[_Entry] = []
    rulesets: dict[str, None] = {}
    versions: dict[str, None] = {}
    for path, raw in contents:
        header, found = _load_file(path, raw, errors)
        entries.extend(found)
        if "ruleset" in header:
            rulesets[header["ruleset"]] = None
        if "version" in header:
            versions[header["version"]] = None
    _cross_check(entries, errors)
    if not entries and not errors.errors:
        errors.add(", ".join(path for path, _ in contents), None, "no indicators")
    if errors.errors:
        raise SignatureError(errors.errors)
    return SignatureSet([entry.sig for entry in entries], ruleset="+".join(rulesets),
                        version="+".join(versions),
                        path_requires={e.sig.id: e.requires for e in entries if e.requires},
                        ports={e.sig.id: e.ports for e in entries if e.ports})
