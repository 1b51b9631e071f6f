"""SQLite inventory: hosts, identities, evidence counts and a sample of evidence events.

Durability: WAL journal with ``synchronous=NORMAL``.  In WAL mode a commit is complete
once its frames are in the WAL file; NORMAL only skips the fsync, so ``kill -9`` of the
sensor never loses a committed batch and never corrupts the file (SQLite guarantees
atomic commits either way); only an OS crash or power cut can roll back the last few
batches.  FULL would add an fsync per commit, and while reading a pcap the pipeline
commits every 5 s of *packet* time, which can be thousands of commits a second.

All writes of one ``flush()`` go into one transaction (``write``), so a crash loses at
most the batch being built, and a restart continues from the last commit.

Re-reading the same capture must not double counts.  Two mechanisms:

* evidence rows keep their covered time interval ``[first_seen, last_seen]`` and the
  flow key of the last counted observation; the tracker counts an observation only
  when it lies outside that interval (or at ``last_seen`` with another flow key).  This
  is a per-(host, action, indicator) high-water mark: a live sensor always moves
  forward, a second read of the same file falls inside the interval.  The price: a
  different capture of an already-covered period is not counted either.
* sampled events are keyed by (host, action, indicator, packet ts, flow tuple), so
  inserting them twice is a no-op.

Default path: ``$PURGE_SENSOR_STATE``, else ``$STATE_DIRECTORY/inventory.sqlite``
(systemd ``StateDirectory=``), else ``~/.local/state/purge-sensor/inventory.sqlite``.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass, field

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts(
    key TEXT PRIMARY KEY,
    ip TEXT, mac TEXT, hostname TEXT,
    role TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    verdict TEXT NOT NULL, confidence TEXT NOT NULL,
    detected_at REAL);
CREATE INDEX IF NOT EXISTS hosts_ip ON hosts(ip);
CREATE TABLE IF NOT EXISTS evidence(
    host_key TEXT NOT NULL, action TEXT NOT NULL, indicator TEXT NOT NULL,
    signature_id TEXT NOT NULL, category TEXT NOT NULL, strength TEXT NOT NULL,
    vendor TEXT NOT NULL, count INTEGER NOT NULL, fallback INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, last_key TEXT NOT NULL,
    sampled_at REAL NOT NULL,
    PRIMARY KEY(host_key, action, indicator)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events(
    host_key TEXT NOT NULL, ts REAL NOT NULL, action TEXT NOT NULL, indicator TEXT NOT NULL,
    signature_id TEXT NOT NULL, flow TEXT NOT NULL, detail TEXT NOT NULL,
    UNIQUE(host_key, action, indicator, ts, flow));
CREATE INDEX IF NOT EXISTS events_host ON events(host_key, ts);
CREATE TABLE IF NOT EXISTS identities(
    mac TEXT NOT NULL, ip TEXT NOT NULL, hostname TEXT NOT NULL, source TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    PRIMARY KEY(mac, ip, hostname)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS identities_seen ON identities(last_seen);
CREATE TABLE IF NOT EXISTS resolvers(
    ip TEXT PRIMARY KEY, source TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL);
"""

HOST_COLUMNS = "key, ip, mac, hostname, role, first_seen, last_seen, verdict, confidence, detected_at"
EVIDENCE_COLUMNS = ("action, indicator, signature_id, category, strength, vendor, count, fallback, "
                    "first_seen, last_seen, last_key, sampled_at")


class StoreError(Exception):
    """The state file cannot be opened or is not a purge-sensor inventory."""


def default_state_path() -> str:
    explicit = os.environ.get("PURGE_SENSOR_STATE")
    if explicit:
        return explicit
    state_dir = os.environ.get("STATE_DIRECTORY")
    if state_dir:
        return os.path.join(state_dir.split(":")[0], "inventory.sqlite")
    return os.path.join(os.path.expanduser("~"), ".local", "state", "purge-sensor", "inventory.sqlite")


@dataclass
class Batch:
    """Everything one flush writes, as plain tuples in the tables' column order."""

    hosts: list = field(default_factory=list)
    evidence: list = field(default_factory=list)  # (host_key, *EVIDENCE_COLUMNS)
    events: list = field(default_factory=list)  # (host_key, ts, action, indicator, signature_id, flow, detail)
    identities: list = field(default_factory=list)  # (mac, ip, hostname, source, first, last)
    resolvers: list = field(default_factory=list)  # (ip, source, first, last)
    renames: list = field(default_factory=list)  # (old_key, new_key): merged hosts
    new_hosts: int = 0
    last_ts: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.hosts or self.evidence or self.events or self.identities
                    or self.resolvers or self.renames)


class Store:
    def __init__(self, path: str, readonly: bool = False, max_hosts: int = 100000,
                 max_identities: int = 200000, events_per_host: int = 20):
        self.path = path
        self.readonly = readonly
        self.max_hosts = max_hosts
        self.max_identities = max_identities
        self.events_per_host = events_per_host
        self.evictions = {"store_hosts": 0, "store_identities": 0}
        try:
            if readonly:
                uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None)
            else:
                self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA busy_timeout=5000")
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(_SCHEMA)
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            version = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{path}: not a purge-sensor inventory ({err})") from None
        if version is None or version[0] != SCHEMA_VERSION:
            raise StoreError(f"{path}: unsupported inventory schema {version[0] if version else '?'}")
        self._host_count = self.db.execute("SELECT COUNT(*) FROM hosts").fetchone()[0]
        # The keys and IPs the hosts table holds, so that looking up an endpoint that is not
        # there (most of a watched flow's endpoints, on a young inventory) costs no query.
        # Only write() adds hosts (the sensor is the inventory's one writer): it adds here
        # what it writes, and reloads both sets after deleting (merges, the host cap).  A
        # read-only store may have another writer, so it always asks.
        self._stored_keys: set[str] | None = None
        self._event_bounds: dict[str, int] = {}
        self._stored_ips: set[str] | None = None
        if not readonly:
            self._load_stored()

    def _load_stored(self) -> None:
        self._stored_keys = set()
        self._stored_ips = set()
        for key, ip in self.db.execute("SELECT key, ip FROM hosts"):
            self._stored_keys.add(key)
            self._stored_ips.add(ip)

    # -- reads used by the tracker -------------------------------------------------

    def load_host(self, key: str):
        """(host row, evidence rows) or None; rows in HOST_COLUMNS / EVIDENCE_COLUMNS order."""
        if self._stored_keys is not None and key not in self._stored_keys:
            return None
        row = self.db.execute(f"SELECT {HOST_COLUMNS} FROM hosts WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        evidence = self.db.execute(f"SELECT {EVIDENCE_COLUMNS} FROM evidence WHERE host_key=?",
                                   (key,)).fetchall()
        return row, evidence

    def key_for_ip(self, ip: str) -> str | None:
        if self._stored_ips is not None and ip not in self._stored_ips:
            return None
        row = self.db.execute("SELECT key FROM hosts WHERE ip=? ORDER BY last_seen DESC LIMIT 1",
                              (ip,)).fetchone()
        return row[0] if row is not None else None

    def recent_identities(self, limit: int) -> list[tuple]:
        """(mac, ip, hostname) newest last, so replaying them into LRU tables keeps the newest."""
        rows = self.db.execute("SELECT mac, ip, hostname FROM identities ORDER BY last_seen DESC LIMIT ?",
                               (limit,)).fetchall()
        rows.reverse()
        return rows

    def resolvers(self, limit: int) -> list[tuple[str, str]]:
        rows = self.db.execute("SELECT ip, source FROM resolvers ORDER BY last_seen DESC LIMIT ?",
                               (limit,)).fetchall()
        rows.reverse()
        return rows

    # -- reads used by the commands ------------------------------------------------

    def last_ts(self) -> float | None:
        row = self.db.execute("SELECT value FROM meta WHERE key='last_ts'").fetchone()
        return float(row[0]) if row else None

    def host_rows(self) -> list[tuple]:
        return self.db.execute(f"SELECT {HOST_COLUMNS} FROM hosts ORDER BY key").fetchall()

    def evidence_by_host(self) -> dict[str, list[tuple]]:
        """host key -> [(action, indicator, category, strength, vendor, count, fallback)]."""
        out: dict[str, list[tuple]] = {}
        for row in self.db.execute("SELECT host_key, action, indicator, category, strength, vendor, "
                                   "count, fallback FROM evidence"):
            out.setdefault(row[0], []).append(row[1:])
        return out

    def events(self, host_key: str, limit: int) -> list[tuple]:
        """(ts, action, indicator, signature_id, flow, detail), oldest first."""
        rows = self.db.execute("SELECT ts, action, indicator, signature_id, flow, detail FROM events "
                               "WHERE host_key=? ORDER BY ts DESC LIMIT ?", (host_key, limit)).fetchall()
        rows.reverse()
        return rows

    def identity_history(self, mac: str) -> list[tuple]:
        return self.db.execute("SELECT ip, hostname, source, first_seen, last_seen FROM identities "
                               "WHERE mac=? ORDER BY first_seen", (mac,)).fetchall()

    # -- writes ----------------------------------------------------------------------

    def write(self, batch: Batch) -> None:
        """Commit one batch atomically, then enforce the table caps inside the same transaction."""
        db = self.db
        deleted = bool(batch.renames)
        db.execute("BEGIN IMMEDIATE")
        try:
            for old, new in batch.renames:
                db.execute("UPDATE OR IGNORE events SET host_key=? WHERE host_key=?", (new, old))
                db.execute("DELETE FROM events WHERE host_key=?", (old,))
                db.execute("DELETE FROM evidence WHERE host_key=?", (old,))
                db.execute("DELETE FROM hosts WHERE key=?", (old,))
            db.executemany(
                f"INSERT INTO hosts ({HOST_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET ip=excluded.ip, mac=excluded.mac, "
                "hostname=excluded.hostname, role=excluded.role, first_seen=excluded.first_seen, "
                "last_seen=excluded.last_seen, verdict=excluded.verdict, "
                "confidence=excluded.confidence, detected_at=excluded.detected_at", batch.hosts)
            db.executemany(f"INSERT OR REPLACE INTO evidence (host_key, {EVIDENCE_COLUMNS}) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", batch.evidence)
            if batch.events:
                db.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?)", batch.events)
                for host_key in self._over_event_cap(batch.events, batch.renames):
                    db.execute("DELETE FROM events WHERE host_key=? AND rowid NOT IN (SELECT rowid FROM "
                               "events WHERE host_key=? ORDER BY ts DESC LIMIT ?)",
                               (host_key, host_key, self.events_per_host))
            db.executemany("INSERT INTO identities VALUES (?,?,?,?,?,?) ON CONFLICT(mac, ip, hostname) "
                           "DO UPDATE SET first_seen=min(first_seen, excluded.first_seen), "
                           "last_seen=max(last_seen, excluded.last_seen)", batch.identities)
            db.executemany("INSERT INTO resolvers VALUES (?,?,?,?) ON CONFLICT(ip) DO UPDATE SET "
                           "last_seen=max(last_seen, excluded.last_seen)", batch.resolvers)
            if batch.last_ts:
                db.execute("INSERT INTO meta VALUES ('last_ts', ?) ON CONFLICT(key) DO UPDATE SET "
                           "value=max(CAST(value AS REAL), CAST(excluded.value AS REAL))",
                           (repr(batch.last_ts),))
            if batch.renames:
                self._host_count = db.execute("SELECT COUNT(*) FROM hosts").fetchone()[0]
            else:
                self._host_count += batch.new_hosts
            if self._host_count > self.max_hosts:
                self._host_count = db.execute("SELECT COUNT(*) FROM hosts").fetchone()[0]
                self._trim_hosts(self._host_count - self.max_hosts)
                deleted = True
            if batch.identities:
                self._trim_identities()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if deleted:
            self._event_bounds.clear()
            self._load_stored()
        elif self._stored_keys is not None:
            for row in batch.hosts:
                self._stored_keys.add(row[0])
                self._stored_ips.add(row[1])

    def _over_event_cap(self, events: list, renames: list) -> list:
        """The hosts of a batch's events that may now hold more than ``events_per_host``.
        A host this process created, or trimmed to the cap, has a known upper bound of its
        events: while that stays under the cap it needs no trimming query (one per host a
        batch touched, most of a young inventory's write).  Other hosts, and hosts that a
        merge just gave another's events, are trimmed as before, after which the cap is
        their bound.  Called inside write()'s transaction, after the merges and before the
        batch's new hosts join ``_stored_keys``."""
        added: dict[str, int] = {}
        for event in events:
            added[event[0]] = added.get(event[0], 0) + 1
        bounds = self._event_bounds
        stored = self._stored_keys
        merged = {new for _, new in renames}
        cap = self.events_per_host
        over = []
        for host_key, count in added.items():
            bound = None if host_key in merged else bounds.get(host_key)
            if bound is None and stored is not None and host_key not in stored \
                    and host_key not in merged:
                bound = 0  # a host first written now holds no event yet
            if bound is not None and bound + count <= cap:
                bounds[host_key] = bound + count
            else:
                over.append(host_key)
                if stored is not None:
                    bounds[host_key] = cap
        return over

    def _trim_hosts(self, excess: int) -> None:
        """Drop the least valuable hosts first: no install-type verdict, then oldest evidence."""
        if excess <= 0:
            return
        doomed = [r[0] for r in self.db.execute(
            "SELECT key FROM hosts ORDER BY verdict IN ('install','management_server','oem_engine'), "
            "last_seen LIMIT ?", (excess,))]
        for key in doomed:
            self.db.execute("DELETE FROM events WHERE host_key=?", (key,))
            self.db.execute("DELETE FROM evidence WHERE host_key=?", (key,))
            self.db.execute("DELETE FROM hosts WHERE key=?", (key,))
        self.evictions["store_hosts"] += len(doomed)
        self._host_count -= len(doomed)

    def _trim_identities(self) -> None:
        count = self.db.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
        excess = count - self.max_identities
        if excess > 0:
            self.db.execute("DELETE FROM identities WHERE (mac, ip, hostname) IN (SELECT mac, ip, "
                            "hostname FROM identities ORDER BY last_seen LIMIT ?)", (excess,))
            self.evictions["store_identities"] += excess

    @property
    def host_count(self) -> int:
        return self._host_count

    def close(self) -> None:
        self.db.close()
