"""HTTP request-head decoder: stream classification (NOT_HTTP / NEED_MORE / COMPLETE),
Host and User-Agent extraction, target forms, and hostile bytes kept as raw labels."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor.decode.http import (
    COMPLETE,
    MAX_DISPLAY,
    MAX_HEAD,
    NEED_MORE,
    NOT_HTTP,
    http_request_status,
    parse_http_request,
)
from sensor.records import DecodeError, DomainName, HttpRequest, PacketContext

CTX = PacketContext(ts=1.0, src_ip="192.0.2.10", dst_ip="198.51.100.7", src_port=50000,
                    dst_port=80, transport="tcp")

GET = (b"GET /diffs/bases/av/kdb/i386/kdb-i386-1211g.xzip HTTP/1.1\r\n"
       b"Host: dnl-03.geo.kaspersky.com:8080\r\n"
       b"User-Agent: KSN/1.0 (Kaspersky Endpoint Security)\r\n"
       b"Accept: */*\r\n"
       b"\r\n")


def parse(buf: bytes) -> HttpRequest:
    assert http_request_status(buf) == COMPLETE
    return parse_http_request(buf, CTX)


def reason(buf: bytes) -> str:
    with pytest.raises(DecodeError) as err:
        parse_http_request(buf, CTX)
    return err.value.reason


# --- parsing ----------------------------------------------------------------------------------

def test_normal_get_with_host_port():
    req = parse(GET)
    assert req.ctx is CTX
    assert req.method == "GET"
    assert req.path == "/diffs/bases/av/kdb/i386/kdb-i386-1211g.xzip"
    assert req.version == "HTTP/1.1"
    assert req.host == DomainName((b"dnl-03", b"geo", b"kaspersky", b"com"))
    assert req.host_port == 8080
    assert req.user_agent == "KSN/1.0 (Kaspersky Endpoint Security)"


def test_body_and_pipelined_request_ignored():
    req = parse(b"POST /a HTTP/1.0\r\nHost: first.example\r\nContent-Length: 4\r\n\r\n"
                b"Host: body.example\r\n\r\nGET /b HTTP/1.1\r\nHost: second.example\r\n\r\n")
    assert req.method == "POST" and req.version == "HTTP/1.0"
    assert req.host.text == "first.example"
    assert req.host_port is None


def test_host_without_port_and_trailing_dot():
    req = parse(b"GET / HTTP/1.1\r\nHost: ksn.kaspersky-labs.com.\r\n\r\n")
    assert req.host.labels == (b"ksn", b"kaspersky-labs", b"com")
    assert req.host_port is None
    assert req.user_agent is None


def test_header_names_case_insensitive_and_first_host_wins():
    req = parse(b"GET / HTTP/1.1\r\nhOsT: One.Example\r\nHOST: two.example\r\n"
                b"user-AGENT: a\r\nUser-Agent: b\r\n\r\n")
    assert req.host.labels == (b"One", b"Example")
    assert req.host.key == (b"one", b"example")
    assert req.user_agent == "a"


def test_absolute_form_gives_host_when_missing():
    req = parse(b"GET http://user:pw@upd.kaspersky.com:8080/index/u1313g.xml?x=1 HTTP/1.1\r\n"
                b"Proxy-Connection: keep-alive\r\n\r\n")
    assert req.host.text == "upd.kaspersky.com"
    assert req.host_port == 8080
    assert req.path == "/index/u1313g.xml?x=1"


def test_absolute_form_without_path():
    req = parse(b"GET HTTP://dnl-01.geo.kaspersky.com HTTP/1.1\r\n\r\n")
    assert req.host.text == "dnl-01.geo.kaspersky.com"
    assert req.host_port is None
    assert req.path == "/"


def test_host_header_preferred_over_absolute_form():
    req = parse(b"GET http://target.example/x HTTP/1.1\r\nHost: header.example\r\n\r\n")
    assert req.host.text == "header.example"
    assert req.path == "/x"


def test_missing_host():
    req = parse(b"GET /index.html HTTP/1.0\r\nAccept: */*\r\n\r\n")
    assert req.host is None
    assert req.host_port is None
    assert req.path == "/index.html"


def test_empty_host_header_means_no_host():
    req = parse(b"GET / HTTP/1.1\r\nHost:\r\n\r\n")
    assert req.host is None


def test_connect_authority_form():
    req = parse(b"CONNECT ksn-a-stat-geo.kaspersky-labs.com:443 HTTP/1.1\r\n"
                b"User-Agent: curl/8.0\r\n\r\n")
    assert req.method == "CONNECT"
    assert req.host.text == "ksn-a-stat-geo.kaspersky-labs.com"
    assert req.host_port == 443
    assert req.path == "ksn-a-stat-geo.kaspersky-labs.com:443"


def test_bracketed_ipv6_host():
    req = parse(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n")
    assert req.host.labels == (b"2001:db8::1",)
    assert req.host_port == 8443
    req = parse(b"GET / HTTP/1.1\r\nHost: [::ffff:192.0.2.1]\r\n\r\n")
    assert req.host.text == "::ffff:192.0.2.1"
    assert req.host_port is None


def test_ipv4_host():
    req = parse(b"GET / HTTP/1.1\r\nHost: 192.0.2.80:80\r\n\r\n")
    assert req.host.text == "192.0.2.80"
    assert req.host_port == 80


@pytest.mark.parametrize("value", [b"kaspersky.com:99999", b"kaspersky.com:http",
                                   b"kaspersky.com:", b"kaspersky.com:-1"])
def test_bad_port_keeps_host(value):
    req = parse(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    assert req.host.text == "kaspersky.com"
    assert req.host_port is None


def test_odd_whitespace_and_bare_lf():
    req = parse(b"GET  /x   HTTP/1.1\nHost :\t  upd.kaspersky.com \t\nUser-Agent:KES\n\n")
    assert req.path == "/x"
    assert req.host.text == "upd.kaspersky.com"
    assert req.user_agent == "KES"


def test_obs_fold_continuation():
    req = parse(b"GET / HTTP/1.1\r\nUser-Agent: Mozilla/5.0\r\n \t(compatible; KAV)\r\n"
                b"X-Other: a\r\n\tcontinued\r\nHost: h.example\r\n\r\n")
    assert req.user_agent == "Mozilla/5.0 (compatible; KAV)"
    assert req.host.text == "h.example"


def test_header_line_without_colon_skipped():
    req = parse(b"GET / HTTP/1.1\r\nthis is not a header\r\nHost: h.example\r\n\r\n")
    assert req.host.text == "h.example"


def test_hostile_host_bytes_kept_raw():
    raw = b"a\x00b\xff|\"c.kaspersky.com"
    req = parse(b"GET / HTTP/1.1\r\nHost: " + raw + b"\r\n\r\n")
    assert req.host.labels == (b"a\x00b\xff|\"c", b"kaspersky", b"com")
    assert req.host.text == 'a\\000b\\255|\\"c.kaspersky.com'


def test_path_and_user_agent_escaped_and_capped():
    long_path = b"/" + b"\xff" * (MAX_DISPLAY + 500)
    req = parse(b"GET " + long_path + b" HTTP/1.1\r\nUser-Agent: x\\y\x01\r\n\r\n")
    assert req.path == "/" + "\\255" * (MAX_DISPLAY - 1)
    assert req.user_agent == "x\\092y\\001"


def test_webdav_method():
    req = parse(b"PROPFIND /dav/ HTTP/1.1\r\nHost: files.example\r\nDepth: 1\r\n\r\n")
    assert req.method == "PROPFIND"


@pytest.mark.parametrize("buf,why", [
    (b"GET / HTTP/2.0\r\n\r\n", "http_bad_request_line"),
    (b"GET /\r\n\r\n", "http_bad_request_line"),
    (b"GET / HTTP/1.1 extra\r\n\r\n", "http_bad_request_line"),
    (b"get / HTTP/1.1\r\n\r\n", "http_bad_request_line"),
    (b"BREW /pot HTTP/1.1\r\n\r\n", "http_bad_method"),
    (b"GET / HTTP/1.1", "http_truncated"),
])
def test_bad_requests(buf, why):
    assert reason(buf) == why


# --- stream classification ---------------------------------------------------------------------

@pytest.mark.parametrize("buf", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS ClientHello
    b"\x00\x00\x00\x00\x00\x00",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GETX / HTTP/1.1\r\n",
    b"G\x00",
    b"GET \x00\x01\x02\x03",
    b"GET / HTTP/3\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\n\r\n",
])
def test_not_http(buf):
    assert http_request_status(buf) == NOT_HTTP


def test_binary_rejected_on_first_bytes():
    assert http_request_status(b"\x17" + bytes(5000)) == NOT_HTTP
    assert http_request_status(b"POST /upload" + b"\x00" * 5000) == NOT_HTTP
    assert http_request_status(b"GET /" + b"\x00" * (MAX_HEAD * 2)) == NOT_HTTP


@pytest.mark.parametrize("buf", [
    b"G", b"GE", b"GET", b"GET ", b"PROPF", b"GET /index", b"GET / HTTP/1.1\r",
    b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: a.example\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r",
])
def test_need_more(buf):
    assert http_request_status(buf) == NEED_MORE


@pytest.mark.parametrize("buf", [
    b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\n\n", b"GET / HTTP/1.0\r\nA: b\r\n\r\nbody",
    b"GET / HTTP/1.1\r\nA: b\n\n",
])
def test_complete(buf):
    assert http_request_status(buf) == COMPLETE


def test_request_split_over_segments_grows_to_complete():
    states = [http_request_status(GET[:n]) for n in range(1, len(GET) + 1)]
    assert states[:-1] == [NEED_MORE] * (len(GET) - 1)
    assert states[-1] == COMPLETE


def test_cap_without_end_is_complete_and_parses_what_is_there():
    buf = (b"GET /x HTTP/1.1\r\nHost: big.kaspersky.com\r\n"
           + b"X-Pad: " + b"a" * (MAX_HEAD + 100) + b"\r\n\r\n")
    assert http_request_status(buf[:MAX_HEAD - 1]) == NEED_MORE
    assert http_request_status(buf[:MAX_HEAD]) == COMPLETE
    assert http_request_status(buf) == COMPLETE
    req = parse_http_request(buf, CTX)
    assert req.host.text == "big.kaspersky.com"


def test_host_cut_by_cap_is_dropped():
    pad = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD - 40) + b"\r\n"
    buf = pad + b"Host: kaspersky.com.evil.example.org\r\n\r\n"
    assert len(pad) < MAX_HEAD < len(buf) - 4
    assert http_request_status(buf) == COMPLETE
    assert parse_http_request(buf, CTX).host is None


def test_overlong_request_line_is_complete_then_rejected():
    buf = b"GET /" + b"a" * MAX_HEAD
    assert http_request_status(buf) == COMPLETE
    assert reason(buf) == "http_truncated"


# --- hostile input ----------------------------------------------------------------------------

def _only_decode_error(buf: bytes) -> None:
    status = http_request_status(buf)
    assert status in (NOT_HTTP, NEED_MORE, COMPLETE)
    try:
        req = parse_http_request(buf, CTX)
    except DecodeError as err:
        assert err.reason.startswith("http_")
        return
    if req.host is not None:
        req.host.text  # noqa: B018 - rendering must not fail either


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_random_bytes_only_decode_error(buf):
    _only_decode_error(buf)


HEAD_PIECES = [b"GET ", b"CONNECT ", b"/", b"http://", b"[", b"]", b":", b"@", b"443", b" ",
               b"HTTP/1.1", b"\r\n", b"\n", b"Host", b"User-Agent", b": ", b"\t", b"\x00",
               b"\xff", b"kaspersky.com", b"\r\n\r\n", b"a"]


@settings(max_examples=300)
@given(st.lists(st.sampled_from(HEAD_PIECES), max_size=30))
def test_request_like_bytes_only_decode_error(pieces):
    _only_decode_error(b"".join(pieces))


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       st.integers(0, 10_000))
def test_mutated_valid_request_only_decode_error(flips, cut):
    buf = bytearray(GET)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    _only_decode_error(bytes(buf[:cut % (len(buf) + 1)]))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_complete_requests_parse(garbage_host):
    """Whatever bytes a Host value holds (no line break), a well-framed request parses."""
    value = garbage_host.replace(b"\r", b"").replace(b"\n", b"")
    req = parse_http_request(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n", CTX)
    if req.host is not None:
        assert b".".join(req.host.labels) in value
