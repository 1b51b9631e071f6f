"""HTTP/1.x request-head decoder: method, target, Host and User-Agent.

The sensor only needs the name a client asked for, so nothing past the header block is
read and only a bounded head (``MAX_HEAD``) is ever examined.  Parsing is lenient where
real clients are sloppy (bare LF line ends, obsolete line folding, whitespace around
header names) because a strict server rejecting such a request does not make the client
any less interesting; it is strict on the request line, which is what decides whether a
stream is HTTP at all.
"""

from __future__ import annotations

import re

from ..records import DecodeError, DomainName, HttpRequest, PacketContext, escape_text_bytes

NOT_HTTP, NEED_MORE, COMPLETE = 0, 1, 2

MAX_HEAD = 8 * 1024
MAX_DISPLAY = 2048

METHODS = frozenset((
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    # WebDAV (RFC 4918, RFC 5323, RFC 3253)
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH",
    b"REPORT",
))
_METHOD_PREFIXES = frozenset(
    (method + b" ")[:n] for method in METHODS for n in range(1, len(method) + 1)
)
_METHOD_PROBE = max(len(method) for method in METHODS) + 1

# The end of a header block, where ``\r?\n\r?\n``'s first match would end (its start may lie
# one byte later, past a '\r'); opening with a literal newline lets the regex engine skip
# to each line instead of trying every byte.  The stream table cuts requests with it too.
HEAD_END = re.compile(rb"\n\r?\n")
_REQUEST_LINE = re.compile(
    rb"([A-Z]+) +([^\x00-\x20\x7f]+) +(HTTP/1\.[0-9])[ \t]*\r?\Z")
_PARTIAL_REQUEST_LINE = re.compile(rb"[A-Z]+ [^\x00-\x1f\x7f]*\r?\Z")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)(.*)\Z", re.S)
_OWS = b" \t"


def http_request_status(buf: bytes) -> int:
    """Classify the start of a client stream so the stream table knows whether to keep buffering.

    The method token and, once its line ends, the whole request line are checked, so a
    binary protocol is rejected on its first segment rather than after 8 KiB.
    """
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    probe = buf[:_METHOD_PROBE]
    space = probe.find(b" ")
    if space < 0:
        return NEED_MORE if probe in _METHOD_PREFIXES else NOT_HTTP
    if probe[:space] not in METHODS:
        return NOT_HTTP
    line_end = buf.find(b"\n", 0, MAX_HEAD)
    if line_end < 0:
        if not _PARTIAL_REQUEST_LINE.match(buf, 0, MAX_HEAD):
            return NOT_HTTP
        return COMPLETE if len(buf) >= MAX_HEAD else NEED_MORE
    if not _REQUEST_LINE.match(buf, 0, line_end):
        return NOT_HTTP
    if HEAD_END.search(buf, line_end, MAX_HEAD) is not None or len(buf) >= MAX_HEAD:
        return COMPLETE
    return NEED_MORE


def parse_http_request(buf: bytes, ctx: PacketContext) -> HttpRequest:
    """Decode the request head at the start of ``buf`` (anything after it is ignored).

    Header lines without a colon are skipped silently: they carry nothing we report and
    rejecting the request for them would hide a Host that is present.  When the head has
    no end within ``MAX_HEAD``, the unterminated last line is dropped, since a cut Host
    value would name a different domain.  The first Host header wins; without one, an
    absolute-form or authority-form (CONNECT) target supplies the host.
    """
    head = bytes(buf[:MAX_HEAD])
    end = HEAD_END.search(head)
    if end is not None:
        lines = head[:end.start()].split(b"\n")
    else:
        lines = head.split(b"\n")
        if len(lines) < 2:
            raise DecodeError("http_truncated")
        lines.pop()

    match = _REQUEST_LINE.match(lines[0])
    if match is None:
        raise DecodeError("http_bad_request_line")
    method, target, version = match.groups()
    if method not in METHODS:
        raise DecodeError("http_bad_method")

    raw_host = None
    user_agent = None
    folding = None  # the wanted header an obs-fold continuation line extends
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            if folding == b"host":
                raw_host += b" " + line.strip(_OWS)
            elif folding == b"user-agent":
                user_agent += b" " + line.strip(_OWS)
            continue
        folding = None
        colon = line.find(b":")
        if colon < 0:
            continue
        name = line[:colon].strip(_OWS).lower()
        if name == b"host" and raw_host is None:
            raw_host = line[colon + 1:].strip(_OWS)
            folding = name
        elif name == b"user-agent" and user_agent is None:
            user_agent = line[colon + 1:].strip(_OWS)
            folding = name

    path = target
    authority = None
    absolute = _ABSOLUTE_FORM.match(target)
    if absolute is not None:
        authority, path = absolute.groups()
        authority = authority.rpartition(b"@")[2]
        if not path.startswith(b"/"):
            path = b"/" + path
    elif method == b"CONNECT":
        authority = target

    host = None
    port = None
    if raw_host:
        host, port = split_host_port(raw_host)
    if host is None and authority:
        host, port = split_host_port(authority)

    return HttpRequest(
        ctx=ctx,
        method=method.decode("ascii"),
        path=escape_text_bytes(path[:MAX_DISPLAY]),
        version=version.decode("ascii"),
        host=host,
        host_port=port,
        user_agent=None if user_agent is None else escape_text_bytes(user_agent[:MAX_DISPLAY]),
    )


def split_host_port(raw: bytes) -> tuple[DomainName | None, int | None]:
    """Split ``host[:port]`` or ``[v6]:port``; a port that is not a 16-bit number is dropped
    and the host kept, because the name is the evidence and the port only decoration."""
    if raw.startswith(b"["):
        close = raw.find(b"]")
        if close < 0:
            return DomainName.from_text_bytes(raw), None
        name, rest = raw[1:close], raw[close + 1:]
        port = _port(rest[1:]) if rest.startswith(b":") else None
    elif raw.count(b":") == 1:
        name, _, port_text = raw.partition(b":")
        port = _port(port_text)
    else:
        name, port = raw, None
    if not name:
        return None, port
    return DomainName.from_text_bytes(name), port


def _port(text: bytes) -> int | None:
    if not text or len(text) > 5 or not text.isdigit():
        return None
    value = int(text)
    return value if value <= 0xFFFF else None
