"""Validated signature sets cached on disk, keyed by the bytes they were loaded from.

Importing PyYAML, composing the bundled file and validating its indicators took about 30 ms
of every start of ``read`` and ``run`` (3% of a read of the benchmark mix); rebuilding the
set from a cached document takes about 5 ms and needs no YAML at all.  The document is
stdlib JSON: orjson parses its 24 KB in 0.13 ms instead of 0.33, but importing it costs
5 ms more, which a split read's decoding process (split_read) never needs otherwise.  Suricata keeps its
compiled Hyperscan databases the same way (``sgh-mpm-caching``).

The key is a SHA-256 over the cache format, the package version, the source of the loader
(``signature_file.py``) and each file's path and bytes, so an edited signature file, a
file added to a directory or a changed validation misses.  Only sets that loaded without a
problem are stored, so every error is still reported from the files themselves.

The files are kept as sensor.cache keeps them (the user's own alone); a document of the
wrong shape is ignored (and replaced by the next store).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import fields

from .. import __version__, cache
from ..records import Signature
from .matcher import SignatureSet

FORMAT = 1
MAX_DOCUMENT_BYTES = 64 << 20
KEEP = 8  # cached sets per directory: sensors with different signature sets may share one
_LOADER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "signature_file.py")
_FIELD_TYPES = {field.name: (int if field.name == "line" else str) for field in fields(Signature)}
_PREFIX = "signatures-"
_SUFFIX = ".json"


def key_of(contents: list[tuple[str, bytes]]) -> str | None:
    """None when the loader's source cannot be read (a zipped install): no cache then."""
    try:
        with open(_LOADER_SOURCE, "rb") as handle:
            loader = handle.read()
    except OSError:
        return None
    digest = hashlib.sha256(f"{FORMAT}\0{__version__}\0{len(loader)}\0".encode())
    digest.update(loader)
    for path, raw in contents:
        name = os.fsencode(path)
        digest.update(b"%d\0%s%d\0" % (len(name), name, len(raw)))
        digest.update(raw)
    return digest.hexdigest()


def _document(key: str) -> str:
    return _PREFIX + key + _SUFFIX


def load(key: str | None) -> SignatureSet | None:
    if key is None:
        return None
    raw = cache.read(_document(key), MAX_DOCUMENT_BYTES)
    if raw is None:
        return None
    try:
        return _from_document(json.loads(raw), key)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, re.error,
            RecursionError):
        return None


def _strings(value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError("expected a list of strings")
    return tuple(value)


def _from_document(document, key: str) -> SignatureSet | None:
    if document.get("format") != FORMAT or document.get("key") != key:
        return None
    signatures = []
    for entry in document["signatures"]:
        if entry.keys() != _FIELD_TYPES.keys() or not all(
                type(entry[name]) is kind for name, kind in _FIELD_TYPES.items()):
            return None
        signatures.append(Signature(**entry))
    ruleset, version = document["ruleset"], document["version"]
    if not signatures or not isinstance(ruleset, str) or not isinstance(version, str):
        return None
    return SignatureSet(signatures, ruleset=ruleset, version=version,
                        path_requires={k: _strings(v) for k, v in document["path_requires"].items()},
                        ports={k: _strings(v) for k, v in document["ports"].items()})


def store(key: str, signatures: SignatureSet) -> None:
    """Best effort: a cache that cannot be written only costs the next start its 30 ms."""
    document = json.dumps({
        "format": FORMAT, "key": key, "ruleset": signatures.ruleset,
        "version": signatures.version,
        "signatures": [{name: getattr(sig, name) for name in _FIELD_TYPES}
                       for sig in signatures.signatures],
        "path_requires": signatures.path_requires, "ports": signatures.ports},
        separators=(",", ":")).encode()
    cache.write(_PREFIX, _document(key), document, KEEP)
