"""Signature matching for every DNS name, TLS/QUIC SNI and HTTP Host the sensor sees.

Almost every name on a network is not a Kaspersky name, so the miss path is what has
to be cheap.  Names are matched label by label against a trie keyed by lower-cased
label bytes, walked from the top-level label down: ``www.example.org`` costs one dict
lookup (``org`` is not in the trie), ``www.google.com`` two.  A label is compared as a
whole, so ``notkaspersky.com`` and ``kaspersky.com.evil.example`` never reach a
Kaspersky node, and a label that itself contains a ``.`` never equals two labels.

Exact and suffix indicators live on trie nodes.  Regex indicators are indexed by their
*zone*: the literal labels the regex must end with (``s[0-1][0-9]\\.upd\\.kaspersky\\.com``
ends with ``upd.kaspersky.com``).  The zone is derived by parsing the regex, so a rule
author cannot declare a zone that disagrees with the regex; a regex without at least
two literal trailing labels is rejected at load time.  A regex therefore only ever runs
against names that already sit under its zone.
"""

from __future__ import annotations

import re
import re._parser as regex_parser
import re._constants as regex_constants
import time
from collections import Counter
from typing import NamedTuple

from ..records import DomainName, Signature, labels_text

NAME_KINDS = ("exact", "suffix", "pattern")
STRENGTH_RANK = {"none": 0, "weak": 1, "medium": 2, "strong": 3}
MIN_ZONE_LABELS = 2
PATTERN_FLAGS = re.IGNORECASE | re.ASCII
MAX_PATTERN_TEXT = 1024
"""Names whose presentation text is longer than this skip regex indicators.  No real
DNS name is longer than 253 characters (1012 when every byte is escaped), and the cap
keeps an attacker-sized SNI from feeding long input to a regex."""
MIN_SCREEN_LABEL = 5  # bytes; shorter labels ("com", "geo", "upd") are too common to screen on

_ZONE_LABEL = re.compile(r"[a-z0-9_-]{1,63}")

_ANCHORS = (regex_constants.AT_BEGINNING, regex_constants.AT_BEGINNING_STRING)
_END_ANCHORS = (regex_constants.AT_END, regex_constants.AT_END_STRING)


class NameScreen(NamedTuple):
    """SignatureSet.name_screen: ``wire`` searches DNS messages, ``text`` ClientHellos and
    request heads; ``labels`` are every label ``wire`` searches for (capture.dns_screen)."""

    wire: re.Pattern
    text: tuple[bytes, ...]
    labels: tuple[bytes, ...]


def pattern_zone(regex: str) -> tuple[tuple[str, ...] | None, int]:
    """The literal trailing labels a name must have to fully match ``regex``, and the
    number of literal characters in the regex (used to rank two matching regexes).

    Returns ``(None, n)`` when fewer than ``MIN_ZONE_LABELS`` whole labels are literal,
    e.g. for a top-level alternation or a regex ending in a group.  Raises ``re.error``
    for an invalid regex.
    """
    items = list(regex_parser.parse(regex, PATTERN_FLAGS))
    while items and items[0][0] == regex_constants.AT and items[0][1] in _ANCHORS:
        items.pop(0)
    while items and items[-1][0] == regex_constants.AT and items[-1][1] in _END_ANCHORS:
        items.pop()
    literal_op = regex_constants.LITERAL
    literal_count = sum(1 for op, _ in items if op == literal_op)
    tail = []
    for op, value in reversed(items):
        if op != literal_op:
            break
        tail.append(chr(value))
    whole = len(tail) == len(items)
    labels = "".join(reversed(tail)).lower().split(".")
    if not whole:
        labels = labels[1:]
    if len(labels) < MIN_ZONE_LABELS or not all(map(_ZONE_LABEL.fullmatch, labels)):
        return None, literal_count
    return tuple(labels), literal_count


class _Node:
    """One label position in the name trie."""

    __slots__ = ("children", "exact", "suffix", "patterns")

    def __init__(self) -> None:
        self.children: dict[bytes, _Node] = {}
        self.exact: Signature | None = None
        self.suffix: Signature | None = None
        self.patterns: tuple = ()


def _name_labels(value: str) -> tuple[bytes, ...]:
    return tuple(label.encode("ascii") for label in value.lower().rstrip(".").split("."))




class SignatureSet:
    """An immutable, indexed set of signatures; reloads build a new one and swap it in.

    ``path_requires`` maps a path indicator id to the name indicator ids it must be
    seen with (empty or absent: the path matches on any host).  ``ports`` keeps each
    indicator's documented ports (``"tcp/80"``, ``"23100-23199"``) for reporting.
    """

    def __init__(self, signatures: list[Signature], ruleset: str = "", version: str = "",
                 path_requires: dict[str, tuple[str, ...]] | None = None,
                 ports: dict[str, tuple[str, ...]] | None = None,
                 loaded_at: float | None = None):
        self.ruleset = ruleset
        self.version = version
        self.loaded_at = time.time() if loaded_at is None else loaded_at
        self.signatures = list(signatures)
        self.ports = dict(ports or {})
        self.path_requires = {k: tuple(v) for k, v in (path_requires or {}).items()}
        self._root = _Node()
        self._ja3: dict[str, Signature] = {}
        self._ja4: dict[str, Signature] = {}
        paths = []
        for sig in self.signatures:
            if sig.kind in ("exact", "suffix"):
                self._add_name(sig)
            elif sig.kind == "pattern":
                self._add_pattern(sig)
            elif sig.kind == "ja3":
                self._add_unique(self._ja3, sig.value.lower(), sig)
            elif sig.kind == "ja4":
                self._add_unique(self._ja4, sig.value, sig)
            elif sig.kind == "path":
                _, weight = pattern_zone(sig.value)
                paths.append((STRENGTH_RANK[sig.strength], weight, sig))
            else:
                raise ValueError(f"{sig.id}: unknown signature kind {sig.kind!r}")
        paths.sort(key=lambda item: (-item[0], -item[1]))
        self._paths = tuple((re.compile(sig.value), sig, self.path_requires.get(sig.id, ()))
                            for _, _, sig in paths)
        self._has_standalone_path = any(not requires for _, _, requires in self._paths)

    @staticmethod
    def _add_unique(table: dict, key, sig: Signature) -> None:
        if key in table:
            raise ValueError(f"{sig.id}: same {sig.kind} as {table[key].id}")
        table[key] = sig

    def _node(self, labels: tuple) -> _Node:
        node = self._root
        for label in reversed(labels):
            child = node.children.get(label)
            if child is None:
                child = node.children[label] = _Node()
            node = child
        return node

    def _add_name(self, sig: Signature) -> None:
        node = self._node(_name_labels(sig.value))
        if getattr(node, sig.kind) is not None:
            raise ValueError(f"{sig.id}: same {sig.kind} name as {getattr(node, sig.kind).id}")
        setattr(node, sig.kind, sig)

    def _add_pattern(self, sig: Signature) -> None:
        zone, weight = pattern_zone(sig.value)
        if zone is None:
            raise ValueError(f"{sig.id}: pattern {sig.value!r} does not end in literal labels")
        node = self._node(tuple(label.encode("ascii") for label in zone))
        node.patterns += ((re.compile(sig.value, PATTERN_FLAGS), sig, weight),)

    def match_name(self, name: DomainName) -> Signature | None:
        """Best indicator for ``name``: an exact indicator wins, otherwise the longest
        match (a regex matches the whole name, a suffix only its tail), then the regex
        with more literal characters, then the stronger indicator.

        Labels are lower-cased one at a time while walking, not via ``DomainName.key``,
        so a miss only lower-cases the one or two labels it looked at."""
        labels = name.labels
        if labels and not labels[-1]:
            labels = labels[:-1]
        node = self._root
        suffix = None
        patterns = ()
        index = len(labels)
        while index:
            index -= 1
            node = node.children.get(labels[index].lower())
            if node is None:
                break
            if node.suffix is not None:
                suffix = node.suffix
            if node.patterns:
                patterns += node.patterns
        else:
            if node.exact is not None:
                return node.exact
        if not patterns:
            return suffix
        return self._best(tuple(label.lower() for label in labels), suffix, patterns)

    @staticmethod
    def _best(key: tuple[bytes, ...], suffix: Signature | None, patterns: tuple) -> Signature | None:
        best = suffix
        if suffix is not None:
            best_rank = (len(suffix.value), len(suffix.value), STRENGTH_RANK[suffix.strength])
        text = labels_text(key)
        if len(text) > MAX_PATTERN_TEXT:
            return best
        for regex, sig, weight in patterns:
            if regex.fullmatch(text) is None:
                continue
            rank = (len(text), weight, STRENGTH_RANK[sig.strength])
            if best is None or rank > best_rank:
                best, best_rank = sig, rank
        return best

    @property
    def has_fingerprints(self) -> bool:
        return bool(self._ja3 or self._ja4)

    @property
    def has_standalone_paths(self) -> bool:
        """Whether a URL path alone can match, on a request to an IP-literal Host."""
        return self._has_standalone_path

    def name_screen(self) -> NameScreen | None:
        """What any payload holding a matching name must contain: a byte regex for DNS wire
        format (length-prefixed labels) and lower-case labels for text (SNI, Host), one of
        which a matching text name contains.

        Every exact, suffix and pattern indicator sits at least two labels deep, so a
        matching name carries each of the indicator's labels below the top level
        ("kaspersky" for ``kaspersky.com.tr`` and ``*.upd.kaspersky.com``).  In wire format
        that label is preceded by its length byte, also under compression, which points at
        an earlier literal copy.  A payload with none of them cannot match, and the decoder
        skips building records for it: the cheap miss path for the 99% of DNS and
        ClientHellos that are not Kaspersky's.  None when an indicator sits on a top-level
        label alone, which no screen can cover.

        Each indicator is screened by the label of its own that the most indicators share,
        counting only labels of MIN_SCREEN_LABEL bytes or more (a short one such as "com" or
        "geo" would pass most names), then the longest: "kaspersky" rather than
        "activation" for ``activation.kaspersky.com``.  Every text label is one substring
        search over each ClientHello and request head, so fewer is cheaper, and a text
        label holding another one is dropped ("kaspersky" covers "kaspersky-labs")."""
        root = self._root
        if root.exact or root.suffix or root.patterns:
            return None
        paths = []
        pending = [(tld, ()) for tld in root.children.values()]
        while pending:
            node, path = pending.pop()
            if node.exact or node.suffix or node.patterns:
                if not path:
                    return None
                paths.append(path)
            pending.extend((child, path + (label,)) for label, child in node.children.items())
        if not paths:
            return None
        shared = Counter(label for path in paths for label in set(path))

        def preference(label: bytes) -> tuple:
            return (shared[label] if len(label) >= MIN_SCREEN_LABEL else 0, len(label), label)

        labels = {max(path, key=preference) for path in paths}
        ordered = sorted(labels, key=lambda label: (-len(label), label))
        wire = b"|".join(re.escape(bytes((len(label),)) + label) for label in ordered)
        text = tuple(label for label in ordered
                     if not any(other != label and other in label for other in labels))
        return NameScreen(re.compile(wire, re.IGNORECASE), text, tuple(ordered))

    def match_path(self, path: str, name_sig: Signature | None) -> Signature | None:
        """Strongest path indicator matching at the start of ``path``; a path tied to name
        indicators (``with:``) only counts when the host matched one of them."""
        if name_sig is None and not self._has_standalone_path:
            return None
        for regex, sig, requires in self._paths:
            if requires and (name_sig is None or name_sig.id not in requires):
                continue
            if regex.match(path) is not None:
                return sig
        return None

    def match_ja3(self, ja3_md5: str) -> Signature | None:
        return self._ja3.get(ja3_md5.lower())

    def match_ja4(self, ja4: str) -> Signature | None:
        return self._ja4.get(ja4)
