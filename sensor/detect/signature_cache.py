"""Validated signature sets cached on disk, keyed by the bytes they were loaded from.

Importing PyYAML, composing the bundled file and validating its indicators took about 30 ms
of every start of ``read`` and ``run`` (3% of a read of the benchmark mix); rebuilding the
set from a cached document takes about 5 ms and needs no YAML at all.  Suricata keeps its
compiled Hyperscan databases the same way (``sgh-mpm-caching``).

The key is a SHA-256 over the cache format, the package version, the source of the loader
(``signature_file.py``) and each file's path and bytes, so an edited signature file, a
file added to a directory or a changed validation misses.  Only sets that loaded without a
problem are stored, so every error is still reported from the files themselves.

A cache is only as trustworthy as whoever can write it: a directory or file that is not the
user's own, or that group or others may write, is neither read nor written, and a document
of the wrong shape is ignored (and replaced by the next store).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import fields

import orjson

from .. import __version__
from ..records import Signature
from .matcher import SignatureSet

ENV_DIR = "PURGE_SENSOR_CACHE_DIR"
FORMAT = 1
MAX_DOCUMENT_BYTES = 64 << 20
KEEP = 8  # cached sets per directory: sensors with different signature sets may share one
_LOADER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "signature_file.py")
_FIELD_TYPES = {field.name: (int if field.name == "line" else str) for field in fields(Signature)}
_PREFIX = "signatures-"
_SUFFIX = ".json"


def cache_dir() -> str | None:
    """``$PURGE_SENSOR_CACHE_DIR`` (empty: no cache), else ``$XDG_CACHE_HOME/purge-sensor``,
    else ``~/.cache/purge-sensor``."""
    configured = os.environ.get(ENV_DIR)
    if configured is not None:
        return configured or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "purge-sensor")


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


def _document(directory: str, key: str) -> str:
    return os.path.join(directory, _PREFIX + key + _SUFFIX)


def _own(stat: os.stat_result) -> bool:
    return stat.st_uid == os.geteuid() and not stat.st_mode & 0o022


def load(key: str | None) -> SignatureSet | None:
    directory = cache_dir()
    if key is None or directory is None:
        return None
    try:
        if not _own(os.stat(directory)):
            return None
        fd = os.open(_document(directory, key), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            stat = os.fstat(handle.fileno())
            if not _own(stat) or stat.st_size > MAX_DOCUMENT_BYTES:
                return None
            document = orjson.loads(handle.read(MAX_DOCUMENT_BYTES + 1))
        return _from_document(document, key)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError, re.error,
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
    directory = cache_dir()
    if directory is None:
        return
    document = orjson.dumps({
        "format": FORMAT, "key": key, "ruleset": signatures.ruleset,
        "version": signatures.version,
        "signatures": [{name: getattr(sig, name) for name in _FIELD_TYPES}
                       for sig in signatures.signatures],
        "path_requires": signatures.path_requires, "ports": signatures.ports})
    temporary = os.path.join(directory, f".{_PREFIX}{key}.{os.getpid()}.tmp")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _own(os.stat(directory)):
            return
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(document)
            os.replace(temporary, _document(directory, key))
        except OSError:
            os.unlink(temporary)
            raise
        _prune(directory)
    except OSError:
        return


def _prune(directory: str) -> None:
    """Keep the KEEP most recently stored sets."""
    stored = []
    for name in os.listdir(directory):
        if name.startswith(_PREFIX) and name.endswith(_SUFFIX):
            path = os.path.join(directory, name)
            try:
                stored.append((os.stat(path, follow_symlinks=False).st_mtime_ns, path))
            except OSError:
                continue
    for _, path in sorted(stored, reverse=True)[KEEP:]:
        try:
            os.unlink(path)
        except OSError:
            continue
