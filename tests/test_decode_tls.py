"""TLS ClientHello decoder: record reassembly, field extraction, JA3 (checked against tshark)
and JA4 (checked against the FoxIO spec's published values)."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.decode import tls
from sensor.decode.tls import (
    COMPLETE,
    MAX_CLIENT_HELLO,
    NEED_MORE,
    NOT_TLS,
    client_hello_status,
    ja3_hash,
    ja3_string,
    ja4_string,
    parse_client_hello_message,
    parse_client_hello_stream,
)
from sensor.records import ClientHello, DecodeError, DomainName, PacketContext

CTX = PacketContext(ts=1.0, src_ip="192.0.2.10", dst_ip="198.51.100.7", src_port=50000,
                    dst_port=443, transport="tcp")


# --- builders (struct, so every length can be controlled) ---------------------------------

def u16s(values) -> bytes:
    return b"".join(struct.pack(">H", v) for v in values)


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">HH", ext_type, len(data)) + data


def sni_ext(name: bytes) -> bytes:
    entry = struct.pack(">BH", 0, len(name)) + name
    return ext(0x0000, struct.pack(">H", len(entry)) + entry)


def alpn_ext(protocols) -> bytes:
    body = b"".join(bytes([len(p)]) + p for p in protocols)
    return ext(0x0010, struct.pack(">H", len(body)) + body)


def versions_ext(versions) -> bytes:
    body = u16s(versions)
    return ext(0x002B, bytes([len(body)]) + body)


def groups_ext(groups) -> bytes:
    body = u16s(groups)
    return ext(0x000A, struct.pack(">H", len(body)) + body)


def point_formats_ext(formats) -> bytes:
    return ext(0x000B, bytes([len(formats)]) + bytes(formats))


def sigalgs_ext(algorithms) -> bytes:
    body = u16s(algorithms)
    return ext(0x000D, struct.pack(">H", len(body)) + body)


def key_share_ext(shares) -> bytes:
    body = b"".join(struct.pack(">HH", group, size) + b"\x42" * size for group, size in shares)
    return ext(0x0033, struct.pack(">H", len(body)) + body)


def ech_outer_ext() -> bytes:
    """ECHClientHello outer: type 0, HPKE suite (KDF 1, AEAD 1), config id, enc, payload."""
    enc = b"\x11" * 32
    payload = b"\x22" * 144
    body = (b"\x00" + struct.pack(">HHB", 1, 1, 7) + struct.pack(">H", len(enc)) + enc
            + struct.pack(">H", len(payload)) + payload)
    return ext(0xFE0D, body)


def hello_message(ciphers=(0x1301, 0x1302, 0xC02B), extensions=b"", version=0x0303,
                  session_id=b"\x5a" * 32, compression=b"\x00", with_extensions=True,
                  extensions_block=None) -> bytes:
    """``extensions_block`` replaces the length-prefixed extensions block verbatim."""
    body = (struct.pack(">H", version) + bytes(range(32)) + bytes([len(session_id)]) + session_id
            + struct.pack(">H", 2 * len(ciphers)) + u16s(ciphers)
            + bytes([len(compression)]) + compression)
    if extensions_block is not None:
        body += extensions_block
    elif with_extensions:
        body += struct.pack(">H", len(extensions)) + extensions
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes=None, version=0x0301) -> bytes:
    """Split a handshake message over TLS records of the given fragment sizes (rest in the last)."""
    sizes = list(sizes or [])
    out = b""
    pos = 0
    while pos < len(message):
        size = sizes.pop(0) if sizes else len(message) - pos
        fragment = message[pos:pos + size]
        out += struct.pack(">BHH", 22, version, len(fragment)) + fragment
        pos += size
    return out


def default_extensions(name=b"dnl-03.geo.kaspersky.com") -> bytes:
    return (sni_ext(name) + alpn_ext([b"h2", b"http/1.1"]) + versions_ext([0x0304, 0x0303])
            + groups_ext([0x001D, 0x0017]) + point_formats_ext([0]) + sigalgs_ext([0x0403, 0x0804]))


def spec_hello(ciphers, extension_order, sigalgs, alpn=b"h2", over_versions=(0x0304, 0x0303)):
    """A ClientHello carrying exactly the given cipher/extension/sigalg lists, in that order."""
    parts = b""
    for ext_type in extension_order:
        if ext_type == 0x0000:
            parts += sni_ext(b"example.com")
        elif ext_type == 0x0010:
            parts += alpn_ext([alpn])
        elif ext_type == 0x002B:
            parts += versions_ext(over_versions)
        elif ext_type == 0x000A:
            parts += groups_ext([0x001D, 0x0017])
        elif ext_type == 0x000B:
            parts += point_formats_ext([0])
        elif ext_type == 0x000D:
            parts += sigalgs_ext(sigalgs)
        else:
            parts += ext(ext_type, b"")
    return parse_client_hello_message(hello_message(ciphers, parts), CTX, "tcp")


def hexlist(text: str) -> list[int]:
    return [int(item, 16) for item in text.split(",")]


# --- field extraction ------------------------------------------------------------------

def test_scapy_built_hello_fields():
    from scapy.layers.tls.extensions import (
        ProtocolName,
        ServerName,
        TLS_Ext_ALPN,
        TLS_Ext_ServerName,
        TLS_Ext_SignatureAlgorithms,
        TLS_Ext_SupportedGroups,
        TLS_Ext_SupportedPointFormat,
        TLS_Ext_SupportedVersion_CH,
    )
    from scapy.layers.tls.handshake import TLSClientHello
    from scapy.layers.tls.record import TLS

    hello = TLSClientHello(version=0x0303, ciphers=[0x0A0A, 0x1301, 0xC02B], ext=[
        TLS_Ext_ServerName(
            servernames=[ServerName(servername=b"ksn-a-stat-geo.kaspersky-labs.com")]),
        TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2"), ProtocolName(protocol=b"http/1.1")]),
        TLS_Ext_SupportedVersion_CH(versions=[0x1A1A, 0x0304, 0x0303]),
        TLS_Ext_SupportedGroups(groups=[0x2A2A, 29, 23]),
        TLS_Ext_SupportedPointFormat(ecpl=[0]),
        TLS_Ext_SignatureAlgorithms(sig_algs=[0x0403, 0x0804]),
    ])
    stream = bytes(TLS(msg=[hello]))
    assert client_hello_status(stream) == COMPLETE
    parsed = parse_client_hello_stream(stream, CTX)
    assert parsed.server_name == DomainName.from_text_bytes(b"ksn-a-stat-geo.kaspersky-labs.com")
    assert parsed.server_name.text == "ksn-a-stat-geo.kaspersky-labs.com"
    assert parsed.alpn == ("h2", "http/1.1")
    assert parsed.legacy_version == 0x0303
    assert parsed.cipher_suites == (0x0A0A, 0x1301, 0xC02B)
    assert parsed.extensions == (0x0000, 0x0010, 0x002B, 0x000A, 0x000B, 0x000D)
    assert parsed.supported_versions == (0x1A1A, 0x0304, 0x0303)
    assert parsed.supported_groups == (0x2A2A, 29, 23)
    assert parsed.ec_point_formats == (0,)
    assert parsed.signature_algorithms == (0x0403, 0x0804)
    assert parsed.ech_offered is False
    assert parsed.over == "tcp"
    assert parsed.ctx is CTX
    assert parsed.ja3 == "771,4865-49195,0-16-43-10-11-13,29-23,0"
    assert parsed.ja4.startswith("t13d0206h2_")


def test_grease_removed_from_ja3_but_kept_in_record():
    extensions = ext(0x3A3A, b"") + default_extensions() + ext(0xFAFA, b"\x00")
    hello = parse_client_hello_message(
        hello_message([0xDADA, 0x1301, 0x2A2A], extensions), CTX, "tcp")
    assert hello.extensions[0] == 0x3A3A and hello.extensions[-1] == 0xFAFA
    assert hello.ja3 == "771,4865,0-16-43-10-11-13,29-23,0"


def test_sni_keeps_raw_bytes_and_escapes_for_display():
    hello = parse_client_hello_message(
        hello_message(extensions=sni_ext(b"we\x00ird name.Kaspersky.com.")), CTX, "tcp")
    assert hello.server_name.labels == (b"we\x00ird name", b"Kaspersky", b"com")
    assert hello.server_name.key == (b"we\x00ird name", b"kaspersky", b"com")
    assert hello.server_name.text == "we\\000ird\\032name.Kaspersky.com"


def test_sni_first_host_name_entry_and_first_extension_win():
    other_type = struct.pack(">BH", 7, 3) + b"abc"
    first = struct.pack(">BH", 0, 9) + b"first.com"
    second = struct.pack(">BH", 0, 10) + b"second.com"
    listing = other_type + first + second
    extensions = ext(0, struct.pack(">H", len(listing)) + listing) + sni_ext(b"third.com")
    hello = parse_client_hello_message(hello_message(extensions=extensions), CTX, "tcp")
    assert hello.server_name.text == "first.com"
    assert hello.extensions == (0, 0)


def test_alpn_non_printable_escaped():
    hello = parse_client_hello_message(
        hello_message(extensions=alpn_ext([b"h\x01\\x", b"spdy/3"])), CTX, "tcp")
    assert hello.alpn == ("h\\001\\092x", "spdy/3")


def test_no_extensions_is_valid_ssl3_style_hello():
    hello = parse_client_hello_message(
        hello_message([0x002F, 0x0035], version=0x0300, session_id=b"", with_extensions=False),
        CTX, "tcp")
    assert hello.server_name is None
    assert hello.extensions == ()
    assert hello.ja3 == "768,47-53,,,"
    assert hello.ja4 == "ts3i0200" + "00_" + hashlib.sha256(b"002f,0035").hexdigest()[:12] \
        + "_000000000000"


def test_large_post_quantum_hello_over_several_segments():
    extensions = (sni_ext(b"dnl-01.geo.kaspersky.com") + versions_ext([0x0304])
                  + groups_ext([0x11EC, 0x001D]) + sigalgs_ext([0x0403])
                  + key_share_ext([(0x11EC, 1216), (0x001D, 32)]) + ech_outer_ext()
                  + ext(0x0015, b"\x00" * 64))
    message = hello_message(extensions=extensions)
    stream = records(message)
    assert len(stream) > 1500
    for cut in (6, 100, 1460, len(stream) - 1):
        assert client_hello_status(stream[:cut]) == NEED_MORE
    assert client_hello_status(stream) == COMPLETE
    hello = parse_client_hello_stream(stream, CTX)
    assert hello.supported_groups == (0x11EC, 0x001D)
    assert 0x0033 in hello.extensions
    assert hello.server_name.text == "dnl-01.geo.kaspersky.com"


def test_hello_fragmented_over_three_records_equals_single_record():
    message = hello_message(extensions=default_extensions())
    single = parse_client_hello_stream(records(message), CTX)
    third = len(message) // 3
    stream = records(message, [third, third])
    assert stream.count(b"\x16\x03\x01") >= 3
    assert client_hello_status(stream) == COMPLETE
    split = parse_client_hello_stream(stream, CTX)
    assert split == single
    assert split.server_name.text == "dnl-03.geo.kaspersky.com"


def test_handshake_header_split_across_records():
    message = hello_message(extensions=default_extensions())
    stream = records(message, [1, 2, 1])
    assert client_hello_status(stream) == COMPLETE
    assert parse_client_hello_stream(stream, CTX).alpn == ("h2", "http/1.1")


def test_every_strict_prefix_needs_more():
    message = hello_message(extensions=default_extensions())
    stream = records(message, [40, 70])
    for cut in range(1, len(stream)):
        assert client_hello_status(stream[:cut]) == NEED_MORE, cut
        with pytest.raises(DecodeError) as err:
            parse_client_hello_stream(stream[:cut], CTX)
        assert err.value.reason == "tls_truncated"
    assert client_hello_status(stream) == COMPLETE


def test_bytes_after_the_hello_are_ignored():
    message = hello_message(extensions=default_extensions())
    stream = records(message) + b"\x14\x03\x03\x00\x01\x01"
    assert client_hello_status(stream) == COMPLETE
    assert parse_client_hello_stream(stream, CTX).server_name is not None
    assert parse_client_hello_message(message + b"junk", CTX, "quic").over == "quic"


@pytest.mark.parametrize("first_bytes", [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6p1\r\n",
    b"\x80\x2e\x01\x00\x02\x00\x15",  # SSLv2-compatible hello
    b"\x15\x03\x03\x00\x02\x02\x28",  # alert record
    b"\x17\x03\x03\x00\x20" + b"\x00" * 32,  # application data
    b"\x16\x02\x00\x00\x30\x01",  # record major version 2
    b"\x16\x03\x05\x00\x30\x01",  # record minor version 5
    b"\x16\x03\x01\x00\x00\x01",  # empty record
    b"\x16\x03\x01\x40\x01\x01",  # record longer than 2^14
    b"\x16\x03\x03\x00\x30\x02",  # ServerHello
    b"\x16\x03\x03\x00\x30\x0b",  # Certificate
])
def test_not_tls_decided_within_six_bytes(first_bytes):
    assert client_hello_status(first_bytes[:6]) == NOT_TLS
    assert client_hello_status(first_bytes) == NOT_TLS
    with pytest.raises(DecodeError) as err:
        parse_client_hello_stream(first_bytes, CTX)
    assert err.value.reason == "tls_not_handshake"


@given(st.binary(min_size=1, max_size=64).filter(lambda b: b[0] != 0x16))
@settings(max_examples=200)
def test_random_first_bytes_are_not_tls(data):
    assert client_hello_status(data) == NOT_TLS


def test_short_consistent_prefix_needs_more():
    header = b"\x16\x03\x01\x02\x00"
    for cut in range(len(header) + 1):
        assert client_hello_status(header[:cut]) == NEED_MORE


def test_declared_length_above_cap_raises():
    too_large = MAX_CLIENT_HELLO + 1
    stream = b"\x16\x03\x01\x40\x00\x01" + too_large.to_bytes(3, "big")
    with pytest.raises(DecodeError) as err:
        client_hello_status(stream)
    assert err.value.reason == "tls_hello_too_large"
    with pytest.raises(DecodeError) as err:
        parse_client_hello_message(b"\x01" + too_large.to_bytes(3, "big"), CTX, "quic")
    assert err.value.reason == "tls_hello_too_large"
    at_cap = b"\x16\x03\x01\x40\x00\x01" + MAX_CLIENT_HELLO.to_bytes(3, "big")
    assert client_hello_status(at_cap) == NEED_MORE


@pytest.mark.parametrize("second_record, reason", [
    (b"\x17\x03\x03\x00\x05hello", "tls_unexpected_record"),
    (b"\x16\x04\x03\x00\x05hello", "tls_bad_record"),
    (b"\x16\x03\x03\x00\x00", "tls_bad_record"),
])
def test_malformed_continuation_record_raises(second_record, reason):
    message = hello_message(extensions=default_extensions())
    stream = records(message[:20]) + second_record
    with pytest.raises(DecodeError) as err:
        client_hello_status(stream)
    assert err.value.reason == reason


def _with_body(mutate) -> bytes:
    message = bytearray(hello_message(extensions=default_extensions()))
    mutate(message)
    return bytes(message)


SESSION_ID_AT = 4 + 2 + 32
CIPHERS_AT = SESSION_ID_AT + 1 + 32


MALFORMED_CASES = [
    (b"\x01\x00", "tls_truncated"),
    (b"\x02\x00\x00\x00", "tls_not_client_hello"),
    (hello_message()[:-3], "tls_truncated"),
    (b"\x01\x00\x00\x10" + b"\x03\x03" + b"\x00" * 14, "tls_truncated"),
    (_with_body(lambda m: m.__setitem__(SESSION_ID_AT, 33)), "tls_bad_session_id"),
    (hello_message(ciphers=()), "tls_bad_cipher_suites"),
    (_with_body(lambda m: m.__setitem__(slice(CIPHERS_AT, CIPHERS_AT + 2), b"\x00\x05")),
     "tls_bad_cipher_suites"),
    (hello_message(compression=b""), "tls_bad_compression"),
    (hello_message(extensions_block=b"\x00\x09" + ext(0x0017, b"")), "tls_bad_extensions"),
    (hello_message(extensions_block=b"\x00\x02" + ext(0x0017, b"")), "tls_bad_extensions"),
    (hello_message(extensions_block=b"\x00"), "tls_bad_extensions"),
    (hello_message(extensions=b"\x00\x17\x00\x05\x00"), "tls_bad_extension"),
    (hello_message(extensions=b"\x00\x17"), "tls_bad_extension"),
    (hello_message(extensions=ext(0, b"\x00\x06\x00\x00\x02ab")), "tls_bad_sni"),
    (hello_message(extensions=ext(0, b"\x00\x06\x00\x00\x04ab")), "tls_bad_sni"),
    (hello_message(extensions=ext(0, b"\x00\x03\x00\x00\x00")), "tls_bad_sni"),
    (hello_message(extensions=ext(0, b"")), "tls_bad_sni"),
    (hello_message(extensions=ext(0, b"\x00\x00")), "tls_bad_sni"),
    (hello_message(extensions=ext(0, b"\x00\x02\x00\x00")), "tls_bad_sni"),
    (hello_message(extensions=ext(0x10, b"\x00\x03\x05h2x")), "tls_bad_alpn"),
    (hello_message(extensions=ext(0x10, b"\x00\x04\x02h2")), "tls_bad_alpn"),
    (hello_message(extensions=ext(0x2B, b"\x03\x03\x04\x03")), "tls_bad_supported_versions"),
    (hello_message(extensions=ext(0x2B, b"\x04\x03\x04")), "tls_bad_supported_versions"),
    (hello_message(extensions=ext(0x0A, b"\x00\x03\x00\x1d\x00")), "tls_bad_supported_groups"),
    (hello_message(extensions=ext(0x0B, b"\x02\x00")), "tls_bad_ec_point_formats"),
    (hello_message(extensions=ext(0x0D, b"\x00\x04\x04\x03")), "tls_bad_signature_algorithms"),
]


@pytest.mark.parametrize("message, reason", MALFORMED_CASES,
                         ids=[reason for _, reason in MALFORMED_CASES])
def test_malformed_hello_reasons(message, reason):
    with pytest.raises(DecodeError) as err:
        parse_client_hello_message(message, CTX, "tcp")
    assert err.value.reason == reason
    if len(message) >= 4:
        with pytest.raises(DecodeError):
            parse_client_hello_stream(records(message), CTX)


def test_ech_offered_reports_outer_public_name():
    extensions = (sni_ext(b"cloudflare-ech.com") + versions_ext([0x0304])
                  + alpn_ext([b"h2"]) + ech_outer_ext())
    hello = parse_client_hello_stream(records(hello_message(extensions=extensions)), CTX)
    assert hello.ech_offered is True
    assert hello.server_name.text == "cloudflare-ech.com"
    assert hello.extensions[-1] == 0xFE0D


# --- JA3 -------------------------------------------------------------------------------

def test_ja3_hash_salesforce_readme_example():
    # Example string and digest from the salesforce/ja3 README.
    text = "769,47-53-5-10-49161-49162-49171-49172-50-56-19-4,0-10-11,23-24-25,0"
    assert ja3_hash(text) == "ada70206e40642a3e4461f35503241d5"


def test_ja3_string_is_recomputable_from_record():
    hello = parse_client_hello_message(hello_message(extensions=default_extensions()), CTX, "tcp")
    assert ja3_string(hello) == hello.ja3
    assert ja4_string(hello) == hello.ja4


JA3_TSHARK_CASES = [
    hello_message([0x0A0A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0x00FF],
                  ext(0x1A1A, b"") + default_extensions() + ext(0x0017, b"") + ext(0x0023, b"")
                  + key_share_ext([(0x2A2A, 1), (0x11EC, 1216)]) + ext(0xFE0D, b"\x00" * 20)
                  + ext(0xBABA, b"\x00")),
    hello_message([0x002F, 0x0035, 0x000A], version=0x0301, session_id=b"",
                  with_extensions=False),
    hello_message([0xC02B], sni_ext(b"ds.kaspersky.com") + ext(0x0017, b"")),
]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_ja3_matches_tshark(tmp_path):
    from scapy.all import IP, TCP, Ether, Raw, wrpcap

    packets = []
    for index, message in enumerate(JA3_TSHARK_CASES):
        segment = records(message, [len(message) // 2]) if index == 0 else records(message)
        packets.append(Ether() / IP(src="127.0.0.1", dst="127.0.0.1")
                       / TCP(sport=40000 + index, dport=443, flags="PA", seq=1000) / Raw(segment))
    pcap = tmp_path / "hellos.pcap"
    wrpcap(str(pcap), packets)
    result = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-T", "fields",
         "-e", "tls.handshake.ja3_full", "-e", "tls.handshake.ja3"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    lines = [line.split("\t") for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == len(JA3_TSHARK_CASES), result.stderr
    for message, (ja3_full, ja3_md5) in zip(JA3_TSHARK_CASES, lines):
        hello = parse_client_hello_message(message, CTX, "tcp")
        assert hello.ja3 == ja3_full
        assert ja3_hash(hello.ja3) == ja3_md5


# --- JA4 (FoxIO-LLC/ja4 technical_details/JA4.md and its test data) ---------------------

SPEC_CIPHERS = hexlist("1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,0035")
SPEC_EXTENSIONS = hexlist("001b,0000,0033,0010,4469,0017,002d,000d,0005,0023,0012,002b,ff01,000b,"
                          "000a,0015")
SPEC_SIGALGS = hexlist("0403,0804,0401,0503,0805,0501,0806,0601")


def test_ja4_spec_example():
    # JA4.md "Example": JA4 = t13d1516h2_8daaf6152771_e5627efa2ab1
    hello = spec_hello(SPEC_CIPHERS, SPEC_EXTENSIONS, SPEC_SIGALGS)
    assert hello.ja4 == "t13d1516h2_8daaf6152771_e5627efa2ab1"


def test_ja4_spec_example_without_signature_algorithms():
    # JA4.md "Extension hash": the same extension list with no signature algorithms = 6d807ffa2a79
    hello = spec_hello(SPEC_CIPHERS, SPEC_EXTENSIONS, [])
    assert hello.ja4 == "t13d1516h2_8daaf6152771_6d807ffa2a79"


def test_ja4_grease_everywhere_and_ech_vector():
    # FoxIO-LLC/ja4 python/test/testdata/sigalg-grease.pcapng.json: JA4_ro.1 gives the original
    # order, JA4.1 = t13d1517h2_8daaf6152771_cb7bf5808d99 (GREASE added here, as Chrome does).
    extension_order = [0x0A0A] + hexlist("fe0d,0010,0017,0033,44cd,ff01,000a,000d,0023,002b,000b,"
                                         "ca34,002d,0000,0005,001b,0012") + [0x4A4A]
    sigalgs = [0x9A9A] + hexlist("0904,0905,0906,0403,0804,0401,0503,0805,0501,0806,0601")
    hello = spec_hello([0x3A3A] + SPEC_CIPHERS, extension_order, sigalgs,
                       over_versions=(0x7A7A, 0x0304, 0x0303))
    assert hello.ech_offered is True
    assert hello.ja4 == "t13d1517h2_8daaf6152771_cb7bf5808d99"


def test_ja4_badcurveball_vector():
    # FoxIO-LLC/ja4 python/test/testdata/badcurveball.pcap.json:
    # JA4.1 = t13d1615h2_46e7e9700bed_45f260be83e2
    ciphers = hexlist("1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,"
                      "0035,000a")
    extension_order = hexlist("0000,0017,ff01,000a,000b,0023,0010,0005,000d,0012,0033,002d,002b,"
                              "001b,0015")
    sigalgs = hexlist("0403,0804,0401,0503,0805,0501,0806,0601,0201")
    hello = spec_hello(ciphers, extension_order, sigalgs)
    assert hello.ja4 == "t13d1615h2_46e7e9700bed_45f260be83e2"


@pytest.mark.parametrize("alpn, expected", [
    # JA4.md "ALPN Extension Value" examples
    (b"h2", "h2"),
    (b"http/1.1", "h1"),
    (b"\xab", "ab"),
    (b"\xab\xcd", "ad"),
    (b"\x30\xab", "3b"),
    (b"\x30\x31\xab\xcd", "3d"),
    (b"\x30\xab\xcd\x31", "01"),
    (b"x", "xx"),
    (b"", "00"),
    (b"\\", "5c"),
    (b"9\\009", "99"),
])
def test_ja4_alpn_characters(alpn, expected):
    hello = spec_hello([0x1301], [0x0010], [], alpn=alpn)
    assert hello.ja4[8:10] == expected


def _ja4_for(**fields) -> str:
    base = dict(ctx=CTX, server_name=None, cipher_suites=(0x1301,), extensions=(0x000A,))
    base.update(fields)
    return ja4_string(ClientHello(**base))


def test_ja4_prefix_rules():
    assert _ja4_for(legacy_version=0x0303)[:4] == "t12i"
    assert _ja4_for(legacy_version=0x0301)[:3] == "t10"
    assert _ja4_for(legacy_version=0x0300)[:3] == "ts3"
    assert _ja4_for(legacy_version=0x0305)[:3] == "t00"
    assert _ja4_for(legacy_version=0x0303, supported_versions=(0x0303, 0x0304, 0x8A8A))[:3] == "t13"
    assert _ja4_for(legacy_version=0x0303, supported_versions=(0xAAAA,))[:3] == "t12"
    assert _ja4_for(legacy_version=0x0303, over="quic")[:1] == "q"
    assert _ja4_for(extensions=(0x0000, 0x000A))[3] == "d"
    assert _ja4_for(alpn=())[8:10] == "00"


def test_ja4_counts_capped_and_empty_hashes():
    many = _ja4_for(cipher_suites=tuple(range(1, 151)), extensions=tuple(range(0x100, 0x200)))
    assert many[4:8] == "9999"
    only_grease = _ja4_for(cipher_suites=(0x0A0A,), extensions=(0x0000, 0x0010, 0x1A1A))
    assert only_grease.split("_")[1:] == ["000000000000", "000000000000"]
    assert only_grease[4:8] == "0002"


# --- robustness ------------------------------------------------------------------------

VALID_MESSAGE = hello_message(
    [0x0A0A, 0x1301, 0xC02B],
    default_extensions() + key_share_ext([(0x001D, 32)]) + ech_outer_ext())
VALID_STREAM = records(VALID_MESSAGE, [50, 120])


def _only_decode_errors(data: bytes) -> None:
    for call in (lambda: client_hello_status(data),
                 lambda: parse_client_hello_stream(data, CTX),
                 lambda: parse_client_hello_message(data, CTX, "quic")):
        try:
            call()
        except DecodeError as err:
            assert err.reason and err.reason.replace("_", "").isalnum()


@given(st.binary(max_size=600))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_only_raise_decode_error(data):
    _only_decode_errors(data)
    _only_decode_errors(b"\x16\x03\x01" + data)
    _only_decode_errors(b"\x01" + data)


@st.composite
def mutated(draw, original: bytes):
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if not data:
            break
        index = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[index] = draw(st.sampled_from([0x00, 0x01, 0x0A, 0x16, 0x7F, 0x80, 0xFF]))
        elif action == "cut":
            del data[index:]
        elif action == "insert":
            data[index:index] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[index:index + draw(st.integers(1, 4))]
    return bytes(data)


@given(mutated(VALID_MESSAGE))
@settings(max_examples=300)
def test_mutated_message_only_raises_decode_error(data):
    _only_decode_errors(data)
    _only_decode_errors(records(data, [7, 30]) if data else data)


@given(mutated(VALID_STREAM))
@settings(max_examples=300)
def test_mutated_stream_only_raises_decode_error(data):
    _only_decode_errors(data)


def test_module_constants_match_interface():
    assert (tls.NOT_TLS, tls.NEED_MORE, tls.COMPLETE) == (0, 1, 2)
    assert tls.MAX_CLIENT_HELLO == 65536


def _walk_status(stream: bytes):
    """The record walk's answer (or its DecodeError reason), without the one-record shortcut."""
    try:
        return tls._scan_records(stream, None)[0]
    except DecodeError as err:
        return err.reason


_BODY_LENGTHS = st.one_of(st.integers(0, 300), st.sampled_from(
    [0x3FFB, 0x3FFC, 0x3FFD, MAX_CLIENT_HELLO - 1, MAX_CLIENT_HELLO, MAX_CLIENT_HELLO + 1]))


@given(body_len=_BODY_LENGTHS, record_slack=st.integers(-3, 3), minor=st.integers(0, 5),
       handshake=st.sampled_from([1, 2]), cut_slack=st.integers(-3, 3), second=st.booleans())
@settings(max_examples=800)
def test_one_record_shortcut_agrees_with_the_record_walk(body_len, record_slack, minor, handshake,
                                                         cut_slack, second):
    """client_hello_status judges a one-record hello from its header: the same answer as
    walking the records, around the edges where the record holds just the message, the
    stream just its end, and the record and message lengths their caps."""
    needed = 4 + body_len
    record_len = max(0, min(0xFFFF, needed + record_slack))
    stream = (bytes((0x16, 3, minor)) + record_len.to_bytes(2, "big") + bytes((handshake,))
              + body_len.to_bytes(3, "big"))
    stream += bytes(max(0, 5 + record_len - len(stream)))
    if second:
        stream += b"\x16\x03\x03\x00\x10" + bytes(16)
    stream = stream[:max(0, 5 + needed + cut_slack)]
    try:
        fast = client_hello_status(stream)
    except DecodeError as err:
        fast = err.reason
    assert fast == _walk_status(stream)
