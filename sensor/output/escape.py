"""One escaper per output format, because each format has its own delimiters.

Names reach this module already in presentation form (``\\DDD`` for odd bytes), but the
escapers do not rely on that: any control character, DEL or stray surrogate is first
rendered as ``\\DDD`` (the same convention the records use, so a SIEM sees one spelling),
and only then are the format's own delimiters escaped.  The result of every function is a
single line that cannot close the field, record or event it sits in.
"""

from __future__ import annotations

import json

NILVALUE = "-"
HOSTNAME_MAX = 255
APP_NAME_MAX = 48
PROCID_MAX = 128
MSGID_MAX = 32
SD_NAME_MAX = 32

_SURROGATE_ESCAPE_BASE = 0xDC00


def _ddd(char: str) -> str:
    """``\\DDD`` for a character that must not appear raw in any output.

    ``surrogateescape`` decoding maps undecodable byte b to U+DC00+b; recover b so the
    rendering matches what the records would have produced for the same wire byte.
    """
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return "\\%03d" % (code - _SURROGATE_ESCAPE_BASE)
    if 0xD800 <= code <= 0xDFFF:
        return "\\u%04x" % code
    return "\\%03d" % code


def _is_unsafe(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or 0xD800 <= code <= 0xDFFF \
        or code in (0x2028, 0x2029)


def _translate(value: str, table: dict[str, str]) -> str:
    """Single pass, so an escape produced for one character is never re-escaped."""
    out = []
    append = out.append
    for char in value:
        mapped = table.get(char)
        if mapped is not None:
            append(mapped)
        elif _is_unsafe(char):
            append(table["\\"] + _ddd(char)[1:])
        else:
            append(char)
    return "".join(out)


_CEF_HEADER = {"\\": "\\\\", "|": "\\|"}
_CEF_EXTENSION = {"\\": "\\\\", "=": "\\=", "\n": "\\n", "\r": "\\r"}
_SD_PARAM = {"\\": "\\\\", '"': '\\"', "]": "\\]"}


def cef_header(value: str) -> str:
    """CEF header field: ``\\`` and ``|`` escaped; no line breaks may appear in a header."""
    return _translate(str(value), _CEF_HEADER)


def cef_extension_value(value: str) -> str:
    """CEF extension value: ``\\``, ``=`` escaped, CR/LF as ``\\r``/``\\n`` (the spec allows
    line breaks only there, and only escaped).  ``|`` needs no escape in the extension."""
    return _translate(str(value), _CEF_EXTENSION)


def sd_param_value(value: str) -> str:
    """RFC 5424 PARAM-VALUE: ``"``, ``\\`` and ``]`` escaped with a backslash (§6.3.3)."""
    return _translate(str(value), _SD_PARAM)


def is_sd_name(value: str) -> bool:
    """RFC 5424 SD-NAME (SD-ID and PARAM-NAME): 1-32 printable US-ASCII, not ``= ] "`` or space."""
    return 0 < len(value) <= SD_NAME_MAX and all(
        0x21 <= ord(c) <= 0x7E and c not in '=]"' for c in value)


def header_field(value: str | None, max_len: int) -> str:
    """RFC 5424 header field (HOSTNAME, APP-NAME, PROCID, MSGID): PRINTUSASCII only
    (%d33-126), length-capped, ``-`` when empty.  Anything else becomes ``_`` because
    these fields allow no escape mechanism at all."""
    if not value:
        return NILVALUE
    cleaned = "".join(c if 0x21 <= ord(c) <= 0x7E else "_" for c in str(value)[:max_len])
    return cleaned or NILVALUE


def json_string(value: str) -> str:
    """A JSON string literal in pure ASCII: controls, DEL, U+2028/2029 and non-ASCII as
    ``\\uXXXX``, so no byte of the output can end a line in any reader."""
    return json.dumps(str(value), ensure_ascii=True).replace("\x7f", "\\u007f")
