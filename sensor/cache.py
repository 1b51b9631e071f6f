"""Files a start of the sensor can reuse from the one before: the validated signature set
(detect.signature_cache) and compiled capture filters (capture.libpcap).  Each is named by
a digest of everything it was made from, so a changed input misses rather than reads a
stale file.

A cache is only as trustworthy as whoever can write it: a directory or file that is not
the user's own, or that group or others may write, is neither read nor written.  Writes
go to a temporary file renamed into place, so a reader never sees half a file, and each
kind keeps its few most recent files.
"""

from __future__ import annotations

import os

ENV_DIR = "PURGE_SENSOR_CACHE_DIR"


def cache_dir() -> str | None:
    """``$PURGE_SENSOR_CACHE_DIR`` (empty: no cache), else ``$XDG_CACHE_HOME/purge-sensor``,
    else ``~/.cache/purge-sensor``."""
    configured = os.environ.get(ENV_DIR)
    if configured is not None:
        return configured or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "purge-sensor")


def _own(stat: os.stat_result) -> bool:
    return stat.st_uid == os.geteuid() and not stat.st_mode & 0o022


def read(name: str, max_bytes: int) -> bytes | None:
    """The cached file ``name``, or None: no cache, no such file, one over ``max_bytes``,
    or a file or directory that is not the user's own alone."""
    directory = cache_dir()
    if directory is None:
        return None
    try:
        if not _own(os.stat(directory)):
            return None
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            stat = os.fstat(handle.fileno())
            if not _own(stat) or stat.st_size > max_bytes:
                return None
            return handle.read(max_bytes + 1)
    except OSError:
        return None


def write(prefix: str, name: str, data: bytes, keep: int) -> None:
    """Store ``data`` as ``name`` (which starts with ``prefix``), then keep only the
    ``keep`` most recently stored files of that prefix.  Best effort: a cache that cannot
    be written only costs the next start the work it would have saved."""
    directory = cache_dir()
    if directory is None:
        return
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _own(os.stat(directory)):
            return
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, os.path.join(directory, name))
        except OSError:
            os.unlink(temporary)
            raise
        _prune(directory, prefix, keep)
    except OSError:
        return


def _prune(directory: str, prefix: str, keep: int) -> None:
    stored = []
    for name in os.listdir(directory):
        if name.startswith(prefix):
            path = os.path.join(directory, name)
            try:
                stored.append((os.stat(path, follow_symlinks=False).st_mtime_ns, path))
            except OSError:
                continue
    for _, path in sorted(stored, reverse=True)[keep:]:
        try:
            os.unlink(path)
        except OSError:
            continue
