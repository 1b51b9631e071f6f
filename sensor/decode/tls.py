"""TLS ClientHello decoder: SNI, ALPN, version/cipher/extension lists, ECH, JA3 and JA4.

The ClientHello is the only cleartext the client sends that names its destination, so this
is where TLS (and, through the QUIC decoder, HTTP/3) evidence comes from.  The record layer
is reassembled here because post-quantum key shares push ClientHellos past one segment and
some stacks (and DPI-evasion tools) split the handshake over several records.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array

from ..records import ClientHello, DecodeError, DomainName, PacketContext, escape_text_bytes

NOT_TLS, NEED_MORE, COMPLETE = 0, 1, 2
MAX_CLIENT_HELLO = 65536  # largest handshake body we buffer, like Suricata's cap
MAX_RECORD_PAYLOAD = 1 << 14  # TLSPlaintext.length limit (RFC 8446 5.1)
MAX_ALPN_PROTOCOLS = 32  # real clients offer a handful; the rest of a longer list is dropped

CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
RECORD_HEADER_LEN = 5
HANDSHAKE_HEADER_LEN = 4
RANDOM_LEN = 32
MAX_SESSION_ID_LEN = 32

EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_GROUPS = 0x000A
EXT_EC_POINT_FORMATS = 0x000B
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D
SNI_HOST_NAME = 0

_U16 = struct.Struct(">H")
_EXTENSION_HEADER = struct.Struct(">HH")
_RECORD_LENGTH = struct.Struct(">H")
_NEEDS_BYTESWAP = sys.byteorder == "little"

_JA4_VERSIONS = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}
_JA4_EMPTY_HASH = "000000000000"
_JA4_HASH_EXCLUDED = (EXT_SERVER_NAME, EXT_ALPN)
_ALNUM = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def is_grease(value: int) -> bool:
    """RFC 8701 reserves 0x0a0a, 0x1a1a ... 0xfafa so clients can exercise unknown-value paths;
    fingerprints must ignore them or every Chrome connection would look different."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def _reject(first_record: bool, reason: str) -> int:
    """The first record decides whether this is TLS at all; a bad later record is a malformed
    TLS stream and deserves a metric, not a silent bypass."""
    if first_record:
        return NOT_TLS
    raise DecodeError(reason)


def _scan_records(buf, fragments: list | None) -> tuple[int, int]:
    """Walk handshake records from the stream start; returns (status, handshake message length).

    When ``fragments`` is a list, the memoryview slices that make up the message are appended,
    so the status check and the parser share one walk without the check paying for copies.
    """
    view = memoryview(buf)
    end = len(view)
    pos = 0
    first = True
    header = b""
    needed = 0
    collected = 0
    while True:
        available = end - pos
        if available < 1:
            return NEED_MORE, needed
        if view[pos] != CONTENT_HANDSHAKE:
            return _reject(first, "tls_unexpected_record"), needed
        if available < 2:
            return NEED_MORE, needed
        if view[pos + 1] != 3:
            return _reject(first, "tls_bad_record"), needed
        if available < 3:
            return NEED_MORE, needed
        if view[pos + 2] > 4:
            return _reject(first, "tls_bad_record"), needed
        if available < RECORD_HEADER_LEN:
            return NEED_MORE, needed
        record_len = _RECORD_LENGTH.unpack_from(view, pos + 3)[0]
        if record_len == 0 or record_len > MAX_RECORD_PAYLOAD:
            return _reject(first, "tls_bad_record"), needed
        start = pos + RECORD_HEADER_LEN
        if first:
            if available < RECORD_HEADER_LEN + 1:
                return NEED_MORE, needed
            if view[start] != HANDSHAKE_CLIENT_HELLO:
                return NOT_TLS, needed
        stop = min(start + record_len, end)
        if not needed:
            header += bytes(view[start:min(stop, start + HANDSHAKE_HEADER_LEN - len(header))])
            if len(header) == HANDSHAKE_HEADER_LEN:
                body_len = int.from_bytes(header[1:], "big")
                if body_len > MAX_CLIENT_HELLO:
                    raise DecodeError("tls_hello_too_large")
                needed = HANDSHAKE_HEADER_LEN + body_len
        if fragments is not None:
            fragments.append(view[start:stop])
        collected += stop - start
        if needed and collected >= needed:
            return COMPLETE, needed
        if start + record_len > end:
            return NEED_MORE, needed
        pos = start + record_len
        first = False


def client_hello_status(buf: bytes) -> int:
    """NOT_TLS / NEED_MORE / COMPLETE for the first bytes of a client->server TCP stream.

    Six bytes are enough to reject; acceptance waits for the whole ClientHello message,
    however many records carry it.  A declared message above MAX_CLIENT_HELLO raises
    DecodeError("tls_hello_too_large") so the stream is dropped instead of buffered.
    """
    # Nearly every hello sits in one record: judged from its nine header bytes, the answer
    # ``_scan_records`` would give at a fifth of its cost.
    if len(buf) >= 9 and buf[0] == CONTENT_HANDSHAKE and buf[1] == 3 and buf[2] <= 4 \
            and buf[5] == HANDSHAKE_CLIENT_HELLO:
        needed = HANDSHAKE_HEADER_LEN + (buf[6] << 16 | buf[7] << 8 | buf[8])
        # A record's cap (2^14) is below MAX_CLIENT_HELLO, so the message is within it too.
        if needed <= (buf[3] << 8 | buf[4]) <= MAX_RECORD_PAYLOAD:
            return COMPLETE if len(buf) - RECORD_HEADER_LEN >= needed else NEED_MORE
    if isinstance(buf, bytearray):
        buf = bytes(buf)  # the walk's memoryview would pin a stream buffer that must still grow
    return _scan_records(buf, None)[0]


def parse_client_hello_stream(buf: bytes, ctx: PacketContext) -> ClientHello:
    """Reassemble the ClientHello from consecutive handshake records and parse it."""
    fragments: list = []
    status, needed = _scan_records(buf, fragments)
    if status == NOT_TLS:
        raise DecodeError("tls_not_handshake")
    if status == NEED_MORE:
        raise DecodeError("tls_truncated")
    message = b"".join(fragments)[:needed]
    return parse_client_hello_message(message, ctx, "tcp")


def _u16_values(data) -> tuple[int, ...]:
    """Big-endian uint16 vector in one C-level pass (data length already checked even)."""
    values = array("H", data)
    if _NEEDS_BYTESWAP:
        values.byteswap()
    return tuple(values)


def _vector16(data: bytes, reason: str) -> bytes:
    """Body of a ``<..2^16-1>`` vector that must fill the extension exactly."""
    if len(data) < 2 or _U16.unpack_from(data)[0] != len(data) - 2:
        raise DecodeError(reason)
    return data[2:]


def _vector8(data: bytes, reason: str) -> bytes:
    """Body of a ``<..2^8-1>`` vector that must fill the extension exactly."""
    if len(data) < 1 or data[0] != len(data) - 1:
        raise DecodeError(reason)
    return data[1:]


def _u16_list(body: bytes, reason: str) -> tuple[int, ...]:
    if len(body) & 1:
        raise DecodeError(reason)
    return _u16_values(body)


def _parse_server_name(data: bytes) -> DomainName | None:
    """First host_name entry of the server_name list (RFC 6066 3); other name types are skipped."""
    body = _vector16(data, "tls_bad_sni")
    if not body:
        raise DecodeError("tls_bad_sni")
    pos = 0
    end = len(body)
    found = None
    while pos < end:
        if pos + 3 > end:
            raise DecodeError("tls_bad_sni")
        name_type = body[pos]
        name_len = _U16.unpack_from(body, pos + 1)[0]
        pos += 3
        if name_len == 0 or pos + name_len > end:
            raise DecodeError("tls_bad_sni")
        if name_type == SNI_HOST_NAME and found is None:
            found = DomainName.from_text_bytes(body[pos:pos + name_len])
        pos += name_len
    return found


def _parse_alpn(data: bytes) -> tuple[str, ...]:
    body = _vector16(data, "tls_bad_alpn")
    protocols = []
    pos = 0
    end = len(body)
    while pos < end:
        name_len = body[pos]
        pos += 1
        if pos + name_len > end:
            raise DecodeError("tls_bad_alpn")
        if len(protocols) < MAX_ALPN_PROTOCOLS:
            protocols.append(escape_text_bytes(body[pos:pos + name_len]))
        pos += name_len
    return tuple(protocols)


def parse_client_hello_message(msg: bytes, ctx: PacketContext, over: str) -> ClientHello:
    """Parse one handshake message (type byte 1, 3-byte length, body): what the TCP record
    layer reassembles and what QUIC CRYPTO frames carry.  Bytes after the message are ignored."""
    if len(msg) < HANDSHAKE_HEADER_LEN:
        raise DecodeError("tls_truncated")
    if msg[0] != HANDSHAKE_CLIENT_HELLO:
        raise DecodeError("tls_not_client_hello")
    body_len = int.from_bytes(msg[1:HANDSHAKE_HEADER_LEN], "big")
    if body_len > MAX_CLIENT_HELLO:
        raise DecodeError("tls_hello_too_large")
    end = HANDSHAKE_HEADER_LEN + body_len
    if len(msg) < end:
        raise DecodeError("tls_truncated")

    pos = HANDSHAKE_HEADER_LEN
    if pos + 2 + RANDOM_LEN + 1 > end:
        raise DecodeError("tls_truncated")
    legacy_version = _U16.unpack_from(msg, pos)[0]
    pos += 2 + RANDOM_LEN
    session_id_len = msg[pos]
    pos += 1
    if session_id_len > MAX_SESSION_ID_LEN:
        raise DecodeError("tls_bad_session_id")
    pos += session_id_len
    if pos + 2 > end:
        raise DecodeError("tls_truncated")
    ciphers_len = _U16.unpack_from(msg, pos)[0]
    pos += 2
    if ciphers_len == 0 or ciphers_len & 1:
        raise DecodeError("tls_bad_cipher_suites")
    if pos + ciphers_len > end:
        raise DecodeError("tls_truncated")
    cipher_suites = _u16_values(msg[pos:pos + ciphers_len])
    pos += ciphers_len
    if pos + 1 > end:
        raise DecodeError("tls_truncated")
    compression_len = msg[pos]
    pos += 1
    if compression_len == 0:
        raise DecodeError("tls_bad_compression")
    if pos + compression_len > end:
        raise DecodeError("tls_truncated")
    pos += compression_len

    hello = ClientHello(ctx=ctx, server_name=None, legacy_version=legacy_version,
                        cipher_suites=cipher_suites, over=over)
    if pos < end:
        _parse_extensions(msg, pos, end, hello)
    hello.ja3 = ja3_string(hello)
    hello.ja4 = ja4_string(hello)
    return hello


def _parse_extensions(msg: bytes, pos: int, end: int, hello: ClientHello) -> None:
    """Fill ``hello`` from the extensions block; the first occurrence of a duplicated
    extension wins (servers reject duplicates, so a later copy never took effect)."""
    if pos + 2 > end:
        raise DecodeError("tls_bad_extensions")
    block_len = _U16.unpack_from(msg, pos)[0]
    pos += 2
    if pos + block_len != end:
        raise DecodeError("tls_bad_extensions")
    types = []
    seen = set()
    while pos < end:
        if pos + 4 > end:
            raise DecodeError("tls_bad_extension")
        ext_type, ext_len = _EXTENSION_HEADER.unpack_from(msg, pos)
        pos += 4
        if pos + ext_len > end:
            raise DecodeError("tls_bad_extension")
        types.append(ext_type)
        if ext_type not in seen:
            seen.add(ext_type)
            _parse_extension(ext_type, msg[pos:pos + ext_len], hello)
        pos += ext_len
    hello.extensions = tuple(types)


def _parse_extension(ext_type: int, data: bytes, hello: ClientHello) -> None:
    if ext_type == EXT_SERVER_NAME:
        hello.server_name = _parse_server_name(data)
    elif ext_type == EXT_ALPN:
        hello.alpn = _parse_alpn(data)
    elif ext_type == EXT_SUPPORTED_VERSIONS:
        reason = "tls_bad_supported_versions"
        hello.supported_versions = _u16_list(_vector8(data, reason), reason)
    elif ext_type == EXT_SUPPORTED_GROUPS:
        reason = "tls_bad_supported_groups"
        hello.supported_groups = _u16_list(_vector16(data, reason), reason)
    elif ext_type == EXT_EC_POINT_FORMATS:
        hello.ec_point_formats = tuple(_vector8(data, "tls_bad_ec_point_formats"))
    elif ext_type == EXT_SIGNATURE_ALGORITHMS:
        reason = "tls_bad_signature_algorithms"
        hello.signature_algorithms = _u16_list(_vector16(data, reason), reason)
    elif ext_type == EXT_ENCRYPTED_CLIENT_HELLO:
        # The real SNI is encrypted; server_name stays the outer ClientHello's, i.e. the
        # ECHConfig public_name.  GREASE ECH looks the same, so this means "offered" only.
        hello.ech_offered = True


def _dash_joined(values) -> str:
    return "-".join(str(value) for value in values)


def ja3_string(hello: ClientHello) -> str:
    """Salesforce JA3: SSLVersion,Ciphers,Extensions,EllipticCurves,EllipticCurvePointFormats
    in decimal, GREASE removed; SSLVersion is legacy_version, as Zeek/tshark compute it."""
    return ",".join((
        str(hello.legacy_version),
        _dash_joined(v for v in hello.cipher_suites if not is_grease(v)),
        _dash_joined(v for v in hello.extensions if not is_grease(v)),
        _dash_joined(v for v in hello.supported_groups if not is_grease(v)),
        _dash_joined(hello.ec_point_formats),
    ))


def ja3_hash(ja3: str) -> str:
    """The md5 hex digest that JA3 lists and Suricata/Zeek logs use."""
    return hashlib.md5(ja3.encode()).hexdigest()


def _unescape_text(text: str) -> bytes:
    """Inverse of escape_text_bytes (which escapes ``\\`` itself, so ``\\DDD`` is unambiguous)."""
    out = bytearray()
    pos = 0
    end = len(text)
    while pos < end:
        char = text[pos]
        digits = text[pos + 1:pos + 4]
        if char == "\\" and len(digits) == 3 and digits.isascii() and digits.isdigit():
            out.append(int(digits) & 0xFF)
            pos += 4
        else:
            out.append(ord(char) & 0xFF)
            pos += 1
    return bytes(out)


def _ja4_alpn(hello: ClientHello) -> str:
    """First and last character of the first ALPN value; the hex form's first and last
    character when either byte is not alphanumeric (FoxIO JA4 spec, "ALPN Extension Value")."""
    if not hello.alpn:
        return "00"
    raw = _unescape_text(hello.alpn[0])
    if not raw:
        return "00"
    if raw[0] in _ALNUM and raw[-1] in _ALNUM:
        return chr(raw[0]) + chr(raw[-1])
    hexed = raw.hex()
    return hexed[0] + hexed[-1]


def _ja4_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ja4_string(hello: ClientHello) -> str:
    """FoxIO JA4 (technical_details/JA4.md): ``{t|q}{ver}{d|i}{ciphers}{exts}{alpn}_{b}_{c}``."""
    versions = [v for v in hello.supported_versions if not is_grease(v)]
    version = _JA4_VERSIONS.get(max(versions) if versions else hello.legacy_version, "00")
    ciphers = [v for v in hello.cipher_suites if not is_grease(v)]
    extensions = [v for v in hello.extensions if not is_grease(v)]
    part_a = "%s%s%s%02d%02d%s" % (
        "q" if hello.over == "quic" else "t",
        version,
        "d" if EXT_SERVER_NAME in extensions else "i",
        min(len(ciphers), 99),
        min(len(extensions), 99),
        _ja4_alpn(hello),
    )
    sorted_ciphers = sorted("%04x" % v for v in ciphers)
    part_b = _ja4_hash(",".join(sorted_ciphers)) if sorted_ciphers else _JA4_EMPTY_HASH
    hashed_extensions = sorted("%04x" % v for v in extensions if v not in _JA4_HASH_EXCLUDED)
    if hashed_extensions:
        text = ",".join(hashed_extensions)
        algorithms = [v for v in hello.signature_algorithms if not is_grease(v)]
        if algorithms:
            text += "_" + ",".join("%04x" % v for v in algorithms)
        part_c = _ja4_hash(text)
    else:
        part_c = _JA4_EMPTY_HASH
    return "%s_%s_%s" % (part_a, part_b, part_c)
