"""Per-format escapers: a hostile value must stay inside its field and read back unchanged."""

import json
import re

from hypothesis import given, settings, strategies as st

from sensor.output.escape import (APP_NAME_MAX, HOSTNAME_MAX, MSGID_MAX, cef_extension_value,
                                  cef_header, header_field, is_sd_name, json_string,
                                  sd_param_value)
from sensor.records import escape_label_bytes, escape_text_bytes

HOSTILE = 'evil\n\r\x00|=]"\\<script>\x7f\u2028\udcff.kaspersky.com'
DELIMITER_TEXT = st.text(alphabet=st.sampled_from(list('ab |=]"\\\n\r\x00\t\x7f<>é\u2028')), max_size=40)


def unescape(value: str, newlines: bool = False) -> str:
    """Reference reader: backslash takes the next character literally (CEF and RFC 5424
    parsers work this way); CEF extensions also map ``\\n`` and ``\\r``."""
    out, i = [], 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            out.append({"n": "\n", "r": "\r"}.get(nxt, nxt) if newlines else nxt)
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def presentation(value: str) -> str:
    """What the escapers promise to preserve: unsafe characters as \\DDD text."""
    out = []
    for char in value:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append("\\%03d" % (code - 0xDC00))
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or code in (0x2028, 0x2029):
            out.append("\\%03d" % code)
        else:
            out.append(char)
    return "".join(out)


def unescaped(value: str, chars: str) -> list[int]:
    """Positions of delimiter characters not protected by a backslash."""
    hits, i = [], 0
    while i < len(value):
        if value[i] == "\\":
            i += 2
            continue
        if value[i] in chars:
            hits.append(i)
        i += 1
    return hits


def test_cef_header_escapes_pipe_and_backslash():
    assert cef_header("a|b\\c") == "a\\|b\\\\c"
    assert cef_header("x=y") == "x=y"


def test_cef_header_renders_line_breaks_as_text():
    escaped = cef_header("a\nb")
    assert "\n" not in escaped and unescape(escaped) == "a\\010b"


def test_cef_extension_escapes_equals_backslash_and_newlines():
    assert cef_extension_value("a=b\\c\nd\re|f") == "a\\=b\\\\c\\nd\\re|f"


def test_sd_param_escapes_quote_backslash_bracket():
    assert sd_param_value('a"b\\c]d') == 'a\\"b\\\\c\\]d'


def test_hostile_name_stays_one_field_in_every_format():
    for escaped, chars in ((cef_header(HOSTILE), "|"), (cef_extension_value(HOSTILE), "="),
                           (sd_param_value(HOSTILE), '"]')):
        assert "\n" not in escaped and "\r" not in escaped and "\x00" not in escaped
        assert unescaped(escaped, chars) == []
        escaped.encode("utf-8")


def test_header_field_keeps_printable_ascii_and_limits():
    assert header_field("host name\n", HOSTNAME_MAX) == "host_name_"
    assert header_field("", MSGID_MAX) == "-"
    assert header_field(None, MSGID_MAX) == "-"
    assert len(header_field("x" * 300, HOSTNAME_MAX)) == HOSTNAME_MAX
    assert len(header_field("y" * 100, APP_NAME_MAX)) == APP_NAME_MAX


def test_sd_name_rules():
    assert is_sd_name("purge_sensor@32473")
    for bad in ("", "a b", 'a"b', "a]b", "a=b", "x" * 33, "é"):
        assert not is_sd_name(bad)


def test_json_string_is_ascii_and_round_trips():
    encoded = json_string(HOSTILE.replace("\udcff", ""))
    assert re.fullmatch(r'[\x20-\x7e]*', encoded)
    assert json.loads(encoded) == HOSTILE.replace("\udcff", "")


@settings(max_examples=300)
@given(DELIMITER_TEXT)
def test_cef_header_property(value):
    escaped = cef_header(value)
    assert unescaped(escaped, "|\n\r") == []
    assert unescape(escaped) == presentation(value)


@settings(max_examples=300)
@given(DELIMITER_TEXT)
def test_cef_extension_property(value):
    escaped = cef_extension_value(value)
    assert unescaped(escaped, "=\n\r") == []
    expected = presentation(value.replace("\n", "\x01n").replace("\r", "\x01r"))
    assert unescape(escaped, newlines=True) == expected.replace("\\001n", "\n").replace("\\001r", "\r")


@settings(max_examples=300)
@given(DELIMITER_TEXT)
def test_sd_param_property(value):
    escaped = sd_param_value(value)
    assert unescaped(escaped, '"]\n\r') == []
    assert unescape(escaped) == presentation(value)


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_header_field_property(value):
    field = header_field(value, MSGID_MAX)
    assert 0 < len(field) <= MSGID_MAX
    assert all(0x21 <= ord(c) <= 0x7E for c in field)


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_json_string_property(value):
    encoded = json_string(value)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert json.loads(encoded) == value


def _label_bytewise(label: bytes) -> str:
    return "".join("\\" + chr(b) if b in (0x2E, 0x5C, 0x22) else chr(b) if 0x21 <= b <= 0x7E
                   else "\\%03d" % b for b in label)


def _text_bytewise(raw: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x5C else "\\%03d" % b for b in raw)


@given(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(lambda t: t.encode())))
@settings(max_examples=400)
def test_wire_escapes_equal_their_bytewise_definition(raw):
    """The all-plain shortcut of the wire-byte escapes changes no output: every byte is
    judged as the RFC 1035 / display rules say, for bytes, bytearray and memoryview."""
    for value in (raw, bytearray(raw), memoryview(raw)):
        assert escape_label_bytes(value) == _label_bytewise(raw)
        assert escape_text_bytes(value) == _text_bytewise(raw)
