"""The cache of validated signature sets (sensor/detect/signature_cache.py): a hit gives the
set the files give, needs no YAML, and anything it cannot trust is ignored."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor import cache as sensor_cache
from sensor.detect import signature_cache
from sensor.detect.signatures import SignatureError, load_signatures
from sensor.records import DomainName
from test_signatures import VALID

ROOT = Path(__file__).resolve().parents[1]

# The set test_signatures.py validates, under a version of its own.
RULES = VALID.replace('version: "1"', 'version: "7"')


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv(sensor_cache.ENV_DIR, str(directory))
    return directory


def rules_file(tmp_path: Path, text: str = RULES, name: str = "rules.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def stored(cache: Path) -> list[Path]:
    return sorted(cache.glob("signatures-*.json"))


def key_for(path: str) -> str:
    return signature_cache.key_of([(path, Path(path).read_bytes())])


def assert_same(cached, parsed) -> None:
    assert cached.signatures == parsed.signatures
    assert (cached.ruleset, cached.version) == (parsed.ruleset, parsed.version)
    assert cached.path_requires == parsed.path_requires
    assert cached.ports == parsed.ports
    for name in ("s07.upd.kaspersky.com", "crl.kaspersky.com", "s27.upd.kaspersky.com"):
        domain = DomainName.from_text_bytes(name.encode())
        assert cached.match_name(domain) == parsed.match_name(domain)
    assert cached.match_path("/bases/av.kdc", cached.signatures[0]) is not None


def test_a_loaded_set_is_stored_and_read_back_alike(cache, tmp_path):
    path = rules_file(tmp_path)
    parsed = load_signatures([path])
    assert [p.name for p in stored(cache)] == [f"signatures-{key_for(path)}.json"]
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    assert oct(stored(cache)[0].stat().st_mode & 0o777) == "0o600"
    cached = signature_cache.load(key_for(path))
    assert cached is not None
    assert_same(cached, parsed)
    assert_same(load_signatures([path]), parsed)


def test_a_hit_needs_no_yaml(cache, tmp_path):
    """A fresh interpreter in which PyYAML cannot be imported loads the set from the cache,
    and fails without one: the hit path never touches YAML."""
    path = rules_file(tmp_path)
    code = ("import sys; sys.modules['yaml'] = None\n"
            "from sensor.detect.signatures import load_signatures\n"
            "s = load_signatures([sys.argv[1]])\n"
            "print(len(s.signatures), s.ruleset, s.version)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    without = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert without.returncode != 0 and "yaml" in without.stderr
    load_signatures([path])
    hit = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    assert hit.stdout.split() == ["3", "test", "7"]


def test_an_edited_file_misses(cache, tmp_path):
    path = rules_file(tmp_path)
    load_signatures([path])
    rules_file(tmp_path, RULES.replace("crl.kaspersky.com", "crl2.kaspersky.com"))
    edited = load_signatures([path])
    assert {sig.value for sig in edited.signatures if sig.id == "crl"} == {"crl2.kaspersky.com"}
    assert len(stored(cache)) == 2


def test_a_file_added_to_the_directory_misses(cache, tmp_path):
    rules_file(tmp_path)
    first = load_signatures([str(tmp_path)])
    rules_file(tmp_path, RULES.replace("id: upd", "id: upd2").replace("id: crl", "id: crl2")
               .replace("id: bases", "id: bases2").replace("with: upd", "with: upd2")
               .replace("crl.kaspersky.com", "crl3.kaspersky.com")
               .replace("s[0-1]", "t[0-1]").replace("/bases/", "/bases2/"), name="more.yaml")
    second = load_signatures([str(tmp_path)])
    assert len(second.signatures) == 2 * len(first.signatures)


def test_an_invalid_edit_is_reported_from_the_file(cache, tmp_path):
    path = rules_file(tmp_path)
    load_signatures([path])
    rules_file(tmp_path, RULES.replace("category: pki", "category: nonsense"))
    with pytest.raises(SignatureError) as info:
        load_signatures([path])
    assert info.value.errors == [
        f"{path}:10: unknown category 'nonsense' (expected one of update, telemetry, "
        "activation, management, web_injection, pki, downloads, website, oem)"]
    assert len(stored(cache)) == 1


def _documents(valid: dict, key: str) -> dict[str, bytes]:
    def changed(**fields) -> bytes:
        return json.dumps({**valid, **fields}).encode()

    first = valid["signatures"][0]
    return {
        "garbage": b"\x00not json",
        "list": b"[]",
        "other key": changed(key="0" * 64),
        "other format": changed(format=signature_cache.FORMAT + 1),
        "missing field": changed(signatures=[{k: v for k, v in first.items() if k != "source"}]),
        "extra field": changed(signatures=[{**first, "extra": "x"}]),
        "wrong type": changed(signatures=[{**first, "line": "4"}]),
        "unknown kind": changed(signatures=[{**first, "kind": "nonsense"}]),
        "bad path regex": changed(signatures=[{**first, "kind": "path", "value": "("}]),
        "regex repeat too large": changed(signatures=[{**first, "kind": "path",
                                                        "value": "a{99999999999}"}]),
        "no signatures": changed(signatures=[]),
        "ports not a list": changed(ports={"crl": "tcp/443"}),
        "requires not a map": changed(path_requires=["upd"]),
        "ruleset not text": changed(ruleset=7),
        "not an object per signature": changed(signatures=["upd"]),
        "key": changed(key=key, signatures="upd"),
    }


def test_documents_it_cannot_use_are_ignored_and_replaced(cache, tmp_path):
    path = rules_file(tmp_path)
    parsed = load_signatures([path])
    key = key_for(path)
    document = stored(cache)[0]
    valid = json.loads(document.read_bytes())
    for label, content in _documents(valid, key).items():
        document.write_bytes(content)
        assert signature_cache.load(key) is None, label
        assert_same(load_signatures([path]), parsed)
        assert json.loads(document.read_bytes()) == valid, label


def test_a_cache_others_can_write_is_neither_read_nor_written(cache, tmp_path):
    path = rules_file(tmp_path)
    load_signatures([path])
    key = key_for(path)
    document = stored(cache)[0]
    document.chmod(0o666)
    assert signature_cache.load(key) is None
    document.chmod(0o600)
    cache.chmod(0o777)
    assert signature_cache.load(key) is None
    other = rules_file(tmp_path, RULES.replace('"7"', '"8"'), name="other.yaml")
    assert load_signatures([other]).version == "8"
    assert len(stored(cache)) == 1
    cache.chmod(0o700)
    assert signature_cache.load(key) is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_cache_of_another_user_is_not_read(cache, tmp_path):
    path = rules_file(tmp_path)
    load_signatures([path])
    key = key_for(path)
    document = stored(cache)[0]
    os.chown(document, 65534, 65534)
    assert signature_cache.load(key) is None
    os.chown(document, 0, 0)
    os.chown(cache, 65534, 65534)
    assert signature_cache.load(key) is None


def test_a_symlinked_document_is_not_followed(cache, tmp_path):
    path = rules_file(tmp_path)
    load_signatures([path])
    key = key_for(path)
    document = stored(cache)[0]
    target = tmp_path / "elsewhere.json"
    document.rename(target)
    document.symlink_to(target)
    assert signature_cache.load(key) is None


def test_a_cache_that_cannot_be_made_costs_nothing_but_time(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(sensor_cache.ENV_DIR, str(blocker / "cache"))
    path = rules_file(tmp_path)
    assert len(load_signatures([path]).signatures) == 3
    assert len(load_signatures([path]).signatures) == 3


def test_an_empty_directory_setting_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv(sensor_cache.ENV_DIR, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sensor_cache.cache_dir() is None
    load_signatures([rules_file(tmp_path)])
    assert list(tmp_path.rglob("signatures-*.json")) == []


def test_the_default_directory_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv(sensor_cache.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_signatures([rules_file(tmp_path)])
    assert len(list((tmp_path / "xdg" / "purge-sensor").glob("signatures-*.json"))) == 1


def test_only_the_newest_sets_are_kept(cache, tmp_path):
    for version in range(signature_cache.KEEP + 3):
        load_signatures([rules_file(tmp_path, RULES.replace('"7"', f'"v{version}"'))])
    kept = stored(cache)
    assert len(kept) == signature_cache.KEEP
    newest = key_for(str(tmp_path / "rules.yaml"))
    assert cache / f"signatures-{newest}.json" in kept


def test_read_alerts_alike_from_a_cold_and_a_warm_cache(cache, tmp_path):
    """The whole command, twice: the second run's set comes from the cache."""
    def alerts(run: int) -> list[dict]:
        out = tmp_path / f"alerts-{run}.json"
        subprocess.run([sys.executable, "-m", "sensor.cli", "read", "-q", "--no-state", "-o",
                        f"file:{out}", str(ROOT / "pcaps" / "demo.pcap")], cwd=ROOT, check=True)
        docs = [json.loads(line) for line in out.read_text().splitlines()]
        for doc in docs:
            del doc["event"]["id"]
        return docs

    cold = alerts(1)
    assert len(stored(cache)) == 1
    warm = alerts(2)
    assert cold and warm == cold


def test_signatures_check_always_parses_the_files(cache, tmp_path, monkeypatch):
    import io

    from sensor.detect.signatures import check_command

    path = rules_file(tmp_path)
    load_signatures([path])

    def no_cache(key):
        raise AssertionError("check read the cache")

    monkeypatch.setattr(signature_cache, "load", no_cache)
    out, err = io.StringIO(), io.StringIO()
    assert check_command([path], out, err) == 0
    assert out.getvalue().startswith("OK: 3 indicators (ruleset test version 7)")


def _containers(inner):
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3))


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=8), _containers, max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["format", "key", "ruleset", "version", "signatures",
                              "path_requires", "ports", "signature", "signature field"]),
       value=_JSON, name=st.sampled_from(sorted(signature_cache._FIELD_TYPES)))
def test_any_document_shape_loads_a_set_or_nothing(cache, tmp_path, field, value, name):
    """A document with any one part replaced by any JSON value never raises from load."""
    path = rules_file(tmp_path)
    load_signatures([path])
    key = key_for(path)
    document = stored(cache)[0]
    valid = json.loads(document.read_bytes())
    changed = json.loads(json.dumps(valid))
    if field == "signature":
        changed["signatures"][0] = value
    elif field == "signature field":
        changed["signatures"][0][name] = value
    else:
        changed[field] = value
    document.write_bytes(json.dumps(changed).encode())
    loaded = signature_cache.load(key)
    assert loaded is None or loaded.ruleset == changed["ruleset"]
    document.write_bytes(json.dumps(valid).encode())
