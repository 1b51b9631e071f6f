"""SQLite inventory: persistence, crash safety, idempotent re-reads, caps, merges."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sensor.records import DhcpLease
from sensor.track.store import Store, StoreError, default_state_path
from test_tracker import T0, Harness, ctx, hello, query, response, syn

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def capture():
    """A small capture's worth of records: installs, a KSC estate, a website visitor, a resolver."""
    return [
        DhcpLease(ctx(T0, "10.0.0.1", "10.0.1.5", 67, 68), "aa:bb:cc:00:00:05", "10.0.1.5", "PC-5"),
        query(T0 + 1, "10.0.1.5", "10.0.0.53", "s01.upd.kaspersky.com"),
        response(T0 + 1.01, "10.0.0.53", "10.0.1.5", "s01.upd.kaspersky.com", ["203.0.113.10"]),
        hello(T0 + 1.02, "10.0.1.5", "203.0.113.10", "s01.upd.kaspersky.com"),
        syn(T0 + 2, "10.0.1.6", "10.0.5.1", 13000),
        syn(T0 + 3, "10.0.1.6", "10.0.5.1", 13000, sport=50001),
        hello(T0 + 4, "10.0.1.7", "203.0.113.11", "www.kaspersky.com"),
        syn(T0 + 5, "10.0.1.8", "203.0.113.10", 443),
    ]


def evidence_counts(store):
    return {(r[0], r[1], r[2]): r[7] for r in store.db.execute(
        "SELECT host_key, action, indicator, signature_id, category, strength, vendor, count FROM evidence")}


def test_default_state_path(monkeypatch):
    monkeypatch.setenv("PURGE_SENSOR_STATE", "/x/explicit.sqlite")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/purge-sensor")
    assert default_state_path() == "/x/explicit.sqlite"
    monkeypatch.delenv("PURGE_SENSOR_STATE")
    assert default_state_path() == "/var/lib/purge-sensor/inventory.sqlite"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("HOME", "/home/op")
    assert default_state_path() == "/home/op/.local/state/purge-sensor/inventory.sqlite"


def test_store_uses_wal_and_survives_reopen(tmp_path):
    path = str(tmp_path / "inv.sqlite")
    h = Harness(store=Store(path))
    h.feed_all(capture())
    h.tracker.close()
    store = Store(path)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.last_ts() == pytest.approx(T0 + 5)
    h2 = Harness(store=store)
    hosts = {x["ip"]: x for x in h2.tracker.inventory(T0 + 10)}
    assert hosts["10.0.1.5"]["verdict"] == "install" and hosts["10.0.1.5"]["hostname"] == "PC-5"
    assert hosts["10.0.1.6"]["verdict"] == "install" and hosts["10.0.5.1"]["verdict"] == "management_server"
    assert hosts["10.0.1.7"]["verdict"] == "website_only"
    assert hosts["10.0.1.8"]["evidence"] == {"dns_answer_flow": 1}
    assert store.identity_history("aa:bb:cc:00:00:05")[0][:2] == ("10.0.1.5", "PC-5")
    h2.feed(hello(T0 + 100, "10.0.1.5", "203.0.113.10", "s01.upd.kaspersky.com"))
    hosts = {x["ip"]: x for x in h2.tracker.inventory(T0 + 100)}
    assert hosts["10.0.1.5"]["evidence"] == {"dns_query": 1, "tls_sni": 2}
    h2.tracker.close()


def test_rereading_the_same_capture_does_not_double_counts(tmp_path):
    path = str(tmp_path / "inv.sqlite")
    for _ in range(2):
        h = Harness(store=Store(path))
        h.feed_all(capture())
        h.tracker.close()
    store = Store(path)
    first = evidence_counts(store)
    events = store.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert first[("mac:aa:bb:cc:00:00:05", "tls_sni", "s01.upd.kaspersky.com")] == 1
    assert first[("ip:10.0.1.6", "ksc_port", "10.0.5.1:13000/tcp")] == 2
    assert first[("ip:10.0.5.1", "ksc_server", "tcp/13000")] == 2
    h = Harness(store=store)
    h.feed_all(capture())
    h.tracker.close()
    store = Store(path)
    assert evidence_counts(store) == first
    assert store.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == events


def test_host_detected_is_not_repeated_after_restart(tmp_path):
    path = str(tmp_path / "inv.sqlite")
    h = Harness(store=Store(path))
    assert any(getattr(e, "kind", None) == "host_detected" for e in h.feed_all(capture()))
    h.tracker.close()
    h = Harness(store=Store(path))
    later = h.feed(hello(T0 + 500, "10.0.1.5", "203.0.113.10", "dc1.ksn.kaspersky-labs.com"))
    assert not [e for e in later if getattr(e, "kind", None) == "host_detected"]
    h.tracker.close()


def test_evicted_hosts_are_reloaded_from_the_store(tmp_path):
    h = Harness(store=Store(str(tmp_path / "inv.sqlite")), cached_hosts=10)
    for i in range(30):
        h.feed(hello(T0 + i, f"10.0.2.{i}", "203.0.113.5", "s01.upd.kaspersky.com"))
    h.tracker.flush()
    h.feed(hello(T0 + 100, "10.0.2.0", "203.0.113.5", "s01.upd.kaspersky.com"))
    h.tracker.flush()
    assert len(h.tracker.hosts) == 10 and h.stats.evictions["hosts"] >= 20
    row = h.tracker.store.load_host("ip:10.0.2.0")
    assert row[1][0][6] == 2  # count column of the only evidence row
    h.tracker.close()


def test_store_host_cap_prefers_installs(tmp_path):
    h = Harness(store=Store(str(tmp_path / "inv.sqlite")), max_hosts=50)
    for i in range(40):
        h.feed(hello(T0 + i, f"10.0.3.{i}", "203.0.113.5", "s01.upd.kaspersky.com"))
    for i in range(100):
        h.feed(hello(T0 + 100 + i, f"10.0.4.{i}", "203.0.113.5", "www.kaspersky.com"))
    h.tracker.flush()
    store = h.tracker.store
    assert store.db.execute("SELECT COUNT(*) FROM hosts").fetchone()[0] == 50
    assert store.db.execute("SELECT COUNT(*) FROM hosts WHERE verdict='install'").fetchone()[0] == 40
    assert h.stats.evictions["store_hosts"] == 90
    assert store.db.execute("SELECT COUNT(*) FROM evidence WHERE host_key NOT IN (SELECT key FROM hosts)"
                            ).fetchone()[0] == 0
    h.tracker.close()


def test_scan_of_many_sources_keeps_store_and_memory_at_their_caps(tmp_path):
    h = Harness(store=Store(str(tmp_path / "inv.sqlite")), max_hosts=2000, cached_hosts=500, max_pending=5000)
    for i in range(50_000):
        h.feed(hello(T0 + i, "10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), "203.0.113.5",
                     "s01.upd.kaspersky.com"))
    h.tracker.flush()
    store = h.tracker.store
    assert store.db.execute("SELECT COUNT(*) FROM hosts").fetchone()[0] == 2000 == store.host_count
    assert h.stats.evictions["store_hosts"] == 48_000
    assert len(h.tracker.hosts) == 500 and h.stats.evictions["hosts"] == 49_500
    assert len(h.tracker.ip_index) == 500 and not h.tracker._dirty
    newest = {r[1] for r in store.host_rows()}
    assert "10.0.195.79" in newest and "10.0.0.1" not in newest
    h.tracker.close()


def test_dhcp_flood_keeps_identity_tables_capped(tmp_path):
    h = Harness(store=Store(str(tmp_path / "inv.sqlite"), max_identities=3000), identity_table=1000)
    for i in range(20_000):
        mac = "02:00:00:%02x:%02x:%02x" % (i >> 16, (i >> 8) & 255, i & 255)
        h.feed(DhcpLease(ctx(T0 + i, "10.0.0.1", "10.9.0.1", 67, 68), mac, "10.9.%d.%d" % (i >> 8 & 255, i & 255),
                         f"h{i}"))
    h.tracker.flush()
    assert len(h.tracker.ip_mac) == 1000 and len(h.tracker.mac_name) == 1000
    assert h.stats.evictions["identities"] > 0
    store = h.tracker.store
    assert store.db.execute("SELECT COUNT(*) FROM identities").fetchone()[0] == 3000
    assert h.stats.evictions["store_identities"] == 17_000
    h.tracker.close()


def test_event_sample_is_capped_per_host(tmp_path):
    h = Harness(store=Store(str(tmp_path / "inv.sqlite")), evidence_sample=5)
    for i in range(40):
        h.feed(hello(T0 + i, "10.0.5.5", "203.0.113.5", f"n{i}.ksn.kaspersky-labs.com"))
    h.tracker.flush()
    store = h.tracker.store
    rows = store.events("ip:10.0.5.5", 100)
    assert len(rows) == 5 and rows[-1][2] == "n39.ksn.kaspersky-labs.com"
    h.tracker.close()


def test_event_cap_holds_across_flushes_reopens_and_merges(tmp_path):
    """Store._over_event_cap skips the trimming query for a host whose events it can
    bound under the cap: the table must still hold each host's newest ``cap`` events after
    every flush, for hosts created here, hosts from an earlier run and merged hosts, and
    the query must run only for hosts that may be over."""
    path = str(tmp_path / "inv.sqlite")
    cap = 4
    trims = []

    def traced(store):
        store.db.set_trace_callback(lambda sql: trims.append(sql) if "rowid NOT IN" in sql else None)
        return store

    def held(store, key):
        return [r[2] for r in store.events(key, 100)]

    h = Harness(store=traced(Store(path)), evidence_sample=cap)
    fed = {"10.0.8.1": [], "10.0.8.2": []}
    for i in range(12):
        for ip in fed:
            name = f"n{i}.ksn.kaspersky-labs.com"
            h.feed(hello(T0 + i, ip, "203.0.113.5", name))
            fed[ip].append(name)
        if i % 2 == 1:
            before = len(trims)
            h.tracker.flush()
            # Two events per host per flush: no host can pass the cap before the third flush.
            assert (len(trims) > before) == (i >= 5), i
            for ip, names in fed.items():
                assert held(h.tracker.store, f"ip:{ip}") == names[-cap:][::-1] or \
                    sorted(held(h.tracker.store, f"ip:{ip}")) == sorted(names[-cap:]), (i, ip)
    h.tracker.close()

    h = Harness(store=traced(Store(path)), evidence_sample=cap)
    h.feed(hello(T0 + 20, "10.0.8.1", "203.0.113.5", "late.ksn.kaspersky-labs.com"))
    h.tracker.flush()
    assert len(held(h.tracker.store, "ip:10.0.8.1")) == cap
    assert "late.ksn.kaspersky-labs.com" in held(h.tracker.store, "ip:10.0.8.1")
    h.feed(DhcpLease(ctx(T0 + 21, "10.0.0.1", "10.0.8.2", 67, 68), "aa:bb:cc:00:08:02", "10.0.8.2", "PC-82"))
    for i in range(3):
        h.feed(hello(T0 + 22 + i, "10.0.8.2", "203.0.113.5", f"m{i}.ksn.kaspersky-labs.com"))
    h.tracker.flush()
    merged = held(h.tracker.store, "mac:aa:bb:cc:00:08:02")
    assert len(merged) == cap and {f"m{i}.ksn.kaspersky-labs.com" for i in range(3)} <= set(merged)
    h.tracker.close()


def test_merge_moves_stored_evidence_to_the_mac_host(tmp_path):
    path = str(tmp_path / "inv.sqlite")
    h = Harness(store=Store(path))
    h.feed(query(T0, "10.0.6.6", "10.0.0.53", "s01.upd.kaspersky.com"))
    h.tracker.flush()
    h.feed(DhcpLease(ctx(T0 + 5, "10.0.0.1", "10.0.6.6", 67, 68), "aa:bb:cc:00:00:66", "10.0.6.6", "HR-6"))
    h.tracker.close()
    store = Store(path)
    keys = [r[0] for r in store.host_rows()]
    assert keys == ["mac:aa:bb:cc:00:00:66"]
    assert store.events("mac:aa:bb:cc:00:00:66", 10)[0][1] == "dns_query"
    assert store.db.execute("SELECT COUNT(*) FROM evidence WHERE host_key='ip:10.0.6.6'").fetchone()[0] == 0


def test_lookups_answer_as_the_table_does_after_writes_merges_and_trims(tmp_path):
    """The store answers "absent" from memory (Store._stored_keys): it must still agree
    with the table after hosts are added, merged away (a rename deletes a row) and
    trimmed by the cap, and across a reopen."""
    path = str(tmp_path / "inv.sqlite")
    h = Harness(store=Store(path), max_hosts=20, cached_hosts=5)
    ips = [f"10.0.7.{i}" for i in range(40)]
    for i, ip in enumerate(ips):
        h.feed(hello(T0 + i, ip, "203.0.113.5", "s01.upd.kaspersky.com"))
        if i % 7 == 0:
            h.feed(DhcpLease(ctx(T0 + i + 0.5, "10.0.0.1", ip, 67, 68), f"aa:bb:cc:00:07:{i:02x}", ip, f"PC-{i}"))
        if i % 5 == 4:
            h.tracker.flush()
    h.tracker.flush()
    store = h.tracker.store
    oracle = Store(path, readonly=True)
    keys = [f"ip:{ip}" for ip in ips] + [f"mac:aa:bb:cc:00:07:{i:02x}" for i in range(40)]
    assert any(store.load_host(k) is None for k in keys) and any(store.load_host(k) for k in keys)
    for key in keys:
        assert (store.load_host(key) is None) == (oracle.load_host(key) is None), key
    for ip in ips:
        assert store.key_for_ip(ip) == oracle.key_for_ip(ip), ip
    assert len(store._stored_keys) == store.host_count == 20  # bounded by the table's cap
    h.tracker.close()
    reopened = Store(path)
    for key in keys:
        assert (reopened.load_host(key) is None) == (oracle.load_host(key) is None), key


def test_learned_resolvers_persist(tmp_path):
    path = str(tmp_path / "inv.sqlite")
    h = Harness(store=Store(path))
    h.feed(response(T0, "10.0.0.53", "10.0.1.1", "example.org", ["192.0.2.1"]))
    h.tracker.close()
    h = Harness(store=Store(path))
    assert h.tracker.resolvers == {"10.0.0.53": "answers"}
    h.feed(query(T0 + 60, "10.0.0.53", "198.51.100.53", "s01.upd.kaspersky.com"))
    assert {x["ip"]: x for x in h.tracker.inventory(T0 + 60)}["10.0.0.53"]["verdict"] == "none"
    h.tracker.close()


def test_not_an_inventory(tmp_path):
    bogus = tmp_path / "bogus.sqlite"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="bogus.sqlite"):
        Store(str(bogus))


WRITER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from sensor.track.store import Store
    from test_tracker import T0, Harness, hello
    h = Harness(store=Store({path!r}))
    i = 0
    while True:
        h.feed(hello(T0 + i, "10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255), "203.0.113.5",
                     "s01.upd.kaspersky.com"))
        i += 1
        if i % 250 == 0:
            h.tracker.flush()
            print(h.tracker.store.host_count, flush=True)
""")


def test_kill_9_mid_stream_keeps_committed_hosts_and_a_sound_file(tmp_path):
    path = str(tmp_path / "inv.sqlite")
    code = WRITER.format(root=str(ROOT), tests=str(TESTS), path=path)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    committed = 0
    try:
        for line in proc.stdout:
            committed = int(line)
            if committed >= 5000:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and committed >= 5000
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    store = Store(path)
    count = store.host_count
    assert count >= committed
    h = Harness(store=store)
    h.feed(hello(T0 + 10**7, "10.200.0.1", "203.0.113.5", "s01.upd.kaspersky.com"))
    h.tracker.close()
    assert Store(path).host_count == count + 1
