"""Load ``signatures/*.yaml`` into a :class:`SignatureSet`: from the cache of validated sets
(``signature_cache``) when the files and the loader are unchanged, else parsed and validated
(``signature_file``, which also describes the format).

Signature files are edited by hand, so a load reports every problem at once, each as
``path:line: problem`` like a compiler, and a set with any problem is never half-loaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import signature_cache
from .matcher import SignatureSet

__all__ = ["SignatureError", "SignatureSet", "load_signatures", "default_signature_paths",
           "check_command"]

MAX_FILE_BYTES = 16 * 1024 * 1024
ENV_PATHS = "PURGE_SENSOR_SIGNATURES"


class SignatureError(Exception):
    """Every problem found in a signature set, each ``path:line: problem``."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = list(errors)


class Problems:
    """Errors of one load, kept in the order they were found."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, path: str, line: int | None, problem: str) -> None:
        where = path if line is None else f"{path}:{line}"
        self.errors.append(f"{where}: {problem}")


def _expand(paths: list[str], errors: Problems) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            try:
                found = sorted(str(p) for p in Path(path).iterdir()
                               if p.suffix in (".yaml", ".yml") and p.is_file())
            except OSError as err:
                errors.add(path, None, f"cannot list directory: {err.strerror or err}")
                continue
            if not found:
                errors.add(path, None, "directory has no *.yaml or *.yml files")
            files.extend(found)
        elif os.path.exists(path):
            files.append(path)
        else:
            errors.add(path, None, "no such file or directory")
    return files


def _read(files: list[str], errors: Problems) -> list[tuple[str, bytes]]:
    """Each file's bytes, read once: the cache key and the parser see the same content."""
    contents = []
    for path in files:
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_FILE_BYTES + 1)
        except OSError as err:
            errors.add(path, None, f"cannot read: {err.strerror or err}")
            continue
        if len(raw) > MAX_FILE_BYTES:
            errors.add(path, None, f"larger than {MAX_FILE_BYTES} bytes")
            continue
        contents.append((path, raw))
    return contents


def load_signatures(paths: list[str], use_cache: bool = True) -> SignatureSet:
    """Load files and directories (every ``*.yaml``/``*.yml`` in a directory, sorted) into
    one set; raise :class:`SignatureError` listing every problem found.  A set that loads
    is cached; a cached set is used only for the same bytes of the same files."""
    errors = Problems()
    if not paths:
        raise SignatureError(["no signature files given"])
    contents = _read(_expand([str(p) for p in paths], errors), errors)
    key = None
    if use_cache and contents and not errors.errors:
        key = signature_cache.key_of(contents)
        cached = signature_cache.load(key)
        if cached is not None:
            return cached
    from .signature_file import parse_files  # PyYAML: only when the cache has no answer

    signatures = parse_files(contents, errors)
    if key is not None:
        signature_cache.store(key, signatures)
    return signatures


def default_signature_paths() -> list[str]:
    """``$PURGE_SENSOR_SIGNATURES`` (``os.pathsep``-separated), else the repository's
    ``signatures/`` directory (editable install, checkout), else the copy a wheel installs
    under ``<prefix>/share/purge-sensor/signatures``."""
    configured = os.environ.get(ENV_PATHS, "")
    if configured.strip():
        return [part for part in configured.split(os.pathsep) if part.strip()]
    package = Path(__file__).resolve().parent.parent
    repo = package.parent / "signatures"
    if repo.is_dir():
        return [str(repo)]
    packaged = Path(sys.prefix) / "share" / "purge-sensor" / "signatures"
    if packaged.is_dir():
        return [str(packaged)]
    return [str(repo)]


def check_command(paths: list[str], out, err) -> int:
    """``purge-sensor signatures check [PATH...]``: 0 when the set loads, 2 otherwise."""
    try:
        sigs = load_signatures(paths, use_cache=False)
    except SignatureError as exc:
        for problem in exc.errors:
            print(problem, file=err)
        return 2
    files = dict.fromkeys(sig.file for sig in sigs.signatures)
    print(f"OK: {len(sigs.signatures)} indicators (ruleset {sigs.ruleset} version {sigs.version}) "
          f"from {', '.join(files)}", file=out)
    return 0
