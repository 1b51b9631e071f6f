"""Signature file loading and validation: every problem reported, each with its file:line."""

from __future__ import annotations

import io
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sensor.detect.signatures import (
    SignatureError, check_command, default_signature_paths, load_signatures,
)
from sensor.records import DomainName

REPO_SIGNATURES = Path(__file__).resolve().parents[1] / "signatures"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "kaspersky-endpoints.md"

HEADER = 'version: "1"\nruleset: test\nindicators:\n'

VALID = HEADER + textwrap.dedent("""\
  - id: upd
    category: update
    strength: strong
    source: "[O] test"
    pattern: 's[0-1][0-9]\\.upd\\.kaspersky\\.com'
  - id: crl
    category: pki
    strength: strong
    source: "[T] test"
    exact: crl.kaspersky.com
    ports: [tcp/443, 80, 23100-23199]
  - id: bases
    category: update
    strength: strong
    source: "[C] test"
    path: '/bases/'
    with: upd
""")


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def errors_of(paths) -> list[str]:
    with pytest.raises(SignatureError) as info:
        load_signatures(paths)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def one_indicator(body: str) -> str:
    """A file whose only indicator starts on line 4."""
    return HEADER + textwrap.indent(textwrap.dedent(body), "  ")


def test_valid_file_loads(tmp_path):
    path = write(tmp_path, VALID)
    sigs = load_signatures([path])
    assert (sigs.ruleset, sigs.version, len(sigs.signatures)) == ("test", "1", 3)
    assert sigs.loaded_at > 0
    upd, crl, bases = sigs.signatures
    assert (upd.kind, upd.file, upd.line) == ("pattern", path, 4)
    assert (crl.kind, crl.value, crl.line) == ("exact", "crl.kaspersky.com", 9)
    assert sigs.ports["crl"] == ("tcp/443", "80", "23100-23199")
    assert sigs.path_requires == {"bases": ("upd",)}
    host = sigs.match_name(DomainName.from_text_bytes(b"S07.UPD.kaspersky.com."))
    assert host.id == "upd"
    assert sigs.match_path("/bases/av/kdb/i386/dailyc.kdc", host).id == "bases"
    assert sigs.match_path("/bases/av/kdb/i386/dailyc.kdc", crl) is None


def test_names_are_normalised(tmp_path):
    path = write(tmp_path, one_indicator("""\
        - {id: a, category: pki, strength: weak, source: s, exact: OCSP.Kaspersky.COM.}
        """))
    assert load_signatures([path]).signatures[0].value == "ocsp.kaspersky.com"


@pytest.mark.parametrize("body, line, message", [
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       exact: crl.kaspersky.com
       colour: red
     """, 9, "unknown key 'colour' in indicator"),
    ("""\
     - id: a
       category: pki
       strength: weak
       exact: crl.kaspersky.com
     """, 4, "missing required key 'source'"),
    ("""\
     - id: a
       category: antivirus
       strength: weak
       source: s
       exact: crl.kaspersky.com
     """, 5, "unknown category 'antivirus'"),
    ("""\
     - id: a
       category: pki
       strength: high
       source: s
       exact: crl.kaspersky.com
     """, 6, "unknown strength 'high'"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
     """, 4, "no matcher"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       exact: crl.kaspersky.com
       suffix: kaspersky.com
     """, 9, "several matchers (exact, suffix)"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       pattern: '(crl\\.kaspersky\\.com'
     """, 8, "invalid regex '(crl\\.kaspersky\\.com' in 'pattern': missing ), unterminated subpattern"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s

       pattern: '.*kaspersky\\.com'
     """, 9, "pattern '.*kaspersky\\.com' cannot be indexed"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       pattern: '(www\\.)?kaspersky\\.(com|ru)'
     """, 8, "pattern '(www\\.)?kaspersky\\.(com|ru)' cannot be indexed"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       path: '/(?<=a+)x'
     """, 8, "invalid regex '/(?<=a+)x' in 'path': look-behind requires fixed-width pattern"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       pattern: '[[a]\\.kaspersky\\.com'
     """, 8, "invalid regex '[[a]\\.kaspersky\\.com' in 'pattern': Possible nested set"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       pattern: 'x\\.kaspersky\\.cöm'
     """, 8, "pattern 'x\\.kaspersky\\.cöm' cannot be indexed"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       ja3: 0123456789abcdef
     """, 8, "invalid ja3 '0123456789abcdef': expected 32 hex digits"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       ja4: not-a-ja4
     """, 8, "invalid ja4 'not-a-ja4'"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       path: /bases/
       with: nowhere
     """, 9, "'with' refers to unknown indicator id 'nowhere'"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       exact: crl.kaspersky.com
       with: a
     """, 9, "'with' is only allowed together with 'path'"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       suffix: '*.kaspersky.com'
     """, 8, "invalid name '*.kaspersky.com' in 'suffix': wildcards are not names"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       exact: crl..kaspersky.com
     """, 8, "invalid name 'crl..kaspersky.com'"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       exact: crl.kaspersky.com
       ports: [tcp/70000]
     """, 9, "invalid port range 'tcp/70000'"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: s
       exact: crl.kaspersky.com
       ports: [sctp/80]
     """, 9, "invalid port 'sctp/80'"),
    ("""\
     - id: a
       category: pki
       category: update
       strength: weak
       source: s
       exact: crl.kaspersky.com
     """, 6, "duplicate key 'category' (first at line 5)"),
    ("""\
     - id: Not Valid
       category: pki
       strength: weak
       source: s
       exact: crl.kaspersky.com
     """, 4, "invalid id 'Not Valid'"),
    ("""\
     - id: a
       category: pki
       strength: weak
       source: [s]
       exact: crl.kaspersky.com
     """, 7, "'source' must be a non-empty string"),
    ("""\
     - just a string
     """, 4, "indicator must be a mapping"),
])
def test_validation_error_and_line(tmp_path, body, line, message):
    path = write(tmp_path, one_indicator(body))
    errors = errors_of([path])
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}:{line}: {message}"), errors


def test_with_must_point_to_a_name_indicator(tmp_path):
    path = write(tmp_path, one_indicator("""\
        - {id: fp, category: update, strength: weak, source: s, ja3: 0123456789abcdef0123456789abcdef}
        - id: p
          category: update
          strength: weak
          source: s
          path: /x
          with: fp
        """))
    assert errors_of([path]) == [
        f"{path}:10: 'with' must refer to a name indicator (exact, suffix, pattern); 'fp' is ja3"]


def test_duplicate_ids_and_matchers(tmp_path):
    path = write(tmp_path, one_indicator("""\
        - {id: a, category: pki, strength: weak, source: s, exact: crl.kaspersky.com}
        - {id: a, category: pki, strength: weak, source: s, exact: ocsp.kaspersky.com}
        - id: b
          category: pki
          strength: weak
          source: s
          exact: CRL.kaspersky.com
        """))
    assert errors_of([path]) == [
        f"{path}:5: duplicate id 'a' (first at {path}:4)",
        f"{path}:10: duplicate matcher exact 'crl.kaspersky.com' (same as 'a' at {path}:4)",
    ]


def test_duplicate_id_across_files(tmp_path):
    first = write(tmp_path, one_indicator(
        "- {id: a, category: pki, strength: weak, source: s, exact: crl.kaspersky.com}\n"), "a.yaml")
    second = write(tmp_path, one_indicator(
        "- {id: a, category: pki, strength: weak, source: s, exact: ocsp.kaspersky.com}\n"), "b.yml")
    assert errors_of([str(tmp_path)]) == [f"{second}:4: duplicate id 'a' (first at {first}:4)"]


def test_exact_and_suffix_of_one_name_are_distinct(tmp_path):
    path = write(tmp_path, one_indicator("""\
        - {id: a, category: website, strength: none, source: s, exact: kaspersky.de}
        - {id: b, category: website, strength: none, source: s, suffix: kaspersky.de}
        """))
    assert len(load_signatures([path]).signatures) == 2


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path, text):
    path = write(tmp_path, text)
    assert errors_of([path]) == [f"{path}:1: empty signature file"]


def test_yaml_syntax_error_reports_its_line(tmp_path):
    path = write(tmp_path, HEADER + "  - id: a\n    category: [pki\n    strength: weak\n")
    errors = errors_of([path])
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:6: YAML syntax error: "), errors


def test_tab_indentation_is_a_syntax_error(tmp_path):
    path = write(tmp_path, HEADER + "  - id: a\n\tcategory: pki\n")
    assert errors_of([path])[0].startswith(f"{path}:5: YAML syntax error")


def test_deep_nesting_is_reported_not_raised(tmp_path):
    path = write(tmp_path, "[" * 20000)
    errors = errors_of([path])
    # libyaml calls it a syntax error where it gives up, pure-Python PyYAML a nesting error.
    assert len(errors) == 1 and re.match(rf"{re.escape(str(path))}:[12]: YAML (nesting too deep|syntax error)",
                                         errors[0]), errors


def test_not_utf8(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(HEADER.encode() + b"  - id: \xff\n")
    assert errors_of([str(path)]) == [f"{path}:4: not valid UTF-8"]


def test_top_level_problems(tmp_path):
    path = write(tmp_path, "ruleset: t\nextra: 1\nindicators: {a: b}\n")
    assert errors_of([path]) == [
        f"{path}:2: unknown key 'extra' in file (allowed: version, ruleset, indicators)",
        f"{path}:1: missing required key 'version'",
        f"{path}:3: 'indicators' must be a list",
    ]
    listed = write(tmp_path, "- a\n- b\n", "list.yaml")
    assert errors_of([listed]) == [
        f"{listed}:1: top level must be a mapping with version, ruleset, indicators"]


def test_every_problem_is_reported(tmp_path):
    first = write(tmp_path, one_indicator("""\
        - {id: a, category: nope, strength: weak, source: s, exact: crl.kaspersky.com}
        - {id: b, category: pki, strength: weak, source: s}
        - {id: c, category: pki, strength: weak, source: s, ja3: xyz}
        """), "a.yaml")
    second = write(tmp_path, "indicators: [\n", "b.yaml")
    missing = str(tmp_path / "missing.yaml")
    errors = errors_of([first, second, missing])
    assert [e.split(": ", 1)[0] for e in errors] == [
        f"{missing}", f"{first}:4", f"{first}:5", f"{first}:6", f"{second}:2"]


def test_no_indicators_at_all(tmp_path):
    path = write(tmp_path, HEADER.replace("indicators:\n", "indicators: []\n"))
    assert errors_of([path]) == [f"{path}: no indicators"]


def test_directory_loading_is_sorted_and_filtered(tmp_path):
    write(tmp_path, one_indicator(
        "- {id: z, category: pki, strength: weak, source: s, exact: ocsp.kaspersky.com}\n"
    ).replace("ruleset: test", "ruleset: local").replace('"1"', '"2"'), "b.yml")
    write(tmp_path, one_indicator(
        "- {id: a, category: pki, strength: weak, source: s, exact: crl.kaspersky.com}\n"), "a.yaml")
    write(tmp_path, "not yaml at all: [", "notes.txt")
    sigs = load_signatures([str(tmp_path)])
    assert [s.id for s in sigs.signatures] == ["a", "z"]
    assert (sigs.ruleset, sigs.version) == ("test+local", "1+2")


def test_empty_directory_and_no_paths(tmp_path):
    assert errors_of([str(tmp_path)]) == [f"{tmp_path}: directory has no *.yaml or *.yml files"]
    assert errors_of([]) == ["no signature files given"]


def test_check_command_ok(tmp_path):
    path = write(tmp_path, VALID)
    out, err = io.StringIO(), io.StringIO()
    assert check_command([path], out, err) == 0
    assert out.getvalue() == f"OK: 3 indicators (ruleset test version 1) from {path}\n"
    assert err.getvalue() == ""


def test_check_command_errors(tmp_path):
    path = write(tmp_path, one_indicator("""\
        - {id: a, category: nope, strength: weak, source: s, exact: crl.kaspersky.com}
        - {id: b, category: pki, strength: weak, source: s}
        """))
    out, err = io.StringIO(), io.StringIO()
    assert check_command([path], out, err) == 2
    assert out.getvalue() == ""
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{path}:4: unknown category")
    assert lines[1].startswith(f"{path}:5: no matcher")


def test_check_command_via_cli(tmp_path, capsys):
    from sensor.cli import main

    try:
        code = main(["signatures", "check", write(tmp_path, VALID)])
    except SystemExit as exc:
        code = exc.code
    assert code == 0
    assert capsys.readouterr().out.startswith("OK: 3 indicators")


def test_default_signature_paths(monkeypatch, tmp_path):
    monkeypatch.delenv("PURGE_SENSOR_SIGNATURES", raising=False)
    assert default_signature_paths() == [str(REPO_SIGNATURES)]
    monkeypatch.setenv("PURGE_SENSOR_SIGNATURES", f"{tmp_path}/a.yaml:{tmp_path}/b")
    assert default_signature_paths() == [f"{tmp_path}/a.yaml", f"{tmp_path}/b"]


# --- the shipped ruleset --------------------------------------------------------------

def test_shipped_ruleset_checks_clean():
    out, err = io.StringIO(), io.StringIO()
    assert check_command([str(REPO_SIGNATURES)], out, err) == 0, err.getvalue()
    assert "ruleset kaspersky version " in out.getvalue()


def test_shipped_ruleset_policy():
    sigs = load_signatures([str(REPO_SIGNATURES)])
    assert sigs.version and sigs.ruleset == "kaspersky"
    for sig in sigs.signatures:
        assert sig.source.startswith("["), sig.id
        if sig.category == "website":
            assert sig.strength == "none", sig.id
        if sig.kind == "suffix":
            assert sig.value not in ("kaspersky.com", "kaspersky-labs.com", "geo.kaspersky.com"), sig.id
    suffixes = {s.value for s in sigs.signatures if s.kind == "suffix"}
    assert "securelist.com" in suffixes and "kaspersky.co.uk" in suffixes and "kaspersky.ru" in suffixes


def test_shipped_ruleset_excludes_unverified_names():
    if not REFERENCE.exists():
        pytest.skip("reference notes not available")
    text = REFERENCE.read_text(encoding="utf-8")
    unverified = text.split("unverified_hypotheses:", 1)[1].split("public_dns_fallback", 1)[0]
    names = [line.strip()[2:] for line in unverified.splitlines() if line.strip().startswith("- ")]
    assert len(names) == 13
    shipped = (REPO_SIGNATURES / "kaspersky.yaml").read_text(encoding="utf-8")
    for name in names:
        assert f" {name}" not in shipped and f"'{name}" not in shipped, name


# --- robustness -----------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_files_only_raise_signature_error(tmp_path, data):
    text = VALID
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = data.draw(st.sampled_from(["", ":", "-", " ", "\n", "[", "{", "'", "\\", "*",
                                           "id", "with", "pattern", "\t", "&a", "*a", "!!python/name:os.system",
                                           "\x00", "é", "?", "|", "0" * 40]))
        if action == "insert":
            text = text[:position] + chunk + text[position:]
        elif action == "delete":
            text = text[:position] + text[position + len(chunk) + 1:]
        else:
            text = text[:position] + chunk + text[position + 1:]
    path = write(tmp_path, text, "fuzz.yaml")
    try:
        sigs = load_signatures([path])
    except SignatureError as exc:
        assert exc.errors and all(e.startswith(path) for e in exc.errors)
    else:
        assert sigs.signatures


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_signature_error(tmp_path, raw):
    path = tmp_path / "random.yaml"
    path.write_bytes(raw)
    try:
        load_signatures([str(path)])
    except SignatureError as exc:
        assert exc.errors
