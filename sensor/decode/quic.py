"""QUIC client Initial decoder: recovers the TLS ClientHello (and so the SNI) of HTTP/3.

Initial packets are encrypted, but with keys anyone can derive from the Destination
Connection ID the client put in the header (RFC 9001 section 5.2, RFC 9369 section 3.3), so
a passive sensor can read the ClientHello exactly as the server does.  Post-quantum key
shares make Chrome's ClientHello larger than one packet, and browsers deliberately split and
reorder CRYPTO frames, so the CRYPTO stream is reassembled by offset across packets before
the handshake message goes to the TLS decoder.

Only client Initials carry a ClientHello.  Server Initials are protected with server keys we
could only derive from the client's original DCID, so they are recognised cheaply and
ignored rather than counted as malformed:

* a DCID shorter than 8 bytes: RFC 9000 section 7.2 makes a client's first Initial use at
  least 8, so a shorter one is a server Initial (its DCID is the client's own SCID, often
  empty) or a post-Retry client Initial, which repeats the ClientHello we already saw;
* a well-known source port talking to an ephemeral one (``sport < 1024 <= dport``).

Anything else that fails authentication raises ``DecodeError("quic_decrypt_failed")``.
Only the first packet of a coalesced datagram is read: a client's datagram starts with its
Initial, and whatever follows it (0-RTT, Handshake) is under keys we do not have.
"""

from __future__ import annotations

import hashlib
import re
import struct

from ..records import ClientHello, DecodeError, PacketContext
from ..stats import Stats
from . import tls

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF

# RFC 9001 section 5.2 and RFC 9369 section 3.3.1.
_INITIAL_SALTS = {
    QUIC_V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    QUIC_V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
# RFC 9369 section 3.3.2 renames the packet protection labels.
_LABEL_PREFIXES = {QUIC_V1: b"quic ", QUIC_V2: b"quicv2 "}
# Header form, fixed bit and long packet type (upper nibble of byte 0) of an Initial:
# type 0b00 in v1 (RFC 9000 section 17.2.2), 0b01 in v2 (RFC 9369 section 3.2).
_INITIAL_HIGH_NIBBLE = {QUIC_V1: 0xC0, QUIC_V2: 0xD0}

MAX_CID_LEN = 20  # RFC 9000 section 17.2
MIN_CLIENT_DCID_LEN = 8  # RFC 9000 section 7.2
SERVER_PORT_LIMIT = 1024
PN_SAMPLE_OFFSET = 4  # RFC 9001 section 5.4.2: sample as if the packet number were 4 bytes
SAMPLE_LEN = 16
MAX_CRYPTO_PIECES = 64  # out-of-order CRYPTO fragments held per connection
MAX_KEY_CACHE = 1024
DEFAULT_MAX_TOTAL_BYTES = 32 << 20

FRAME_PADDING = 0x00
FRAME_PING = 0x01
FRAME_ACK = 0x02
FRAME_ACK_ECN = 0x03
FRAME_CRYPTO = 0x06
FRAME_CONNECTION_CLOSE = 0x1C
FRAME_CONNECTION_CLOSE_APP = 0x1D

HANDSHAKE_HEADER_LEN = 4

_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from
_U64 = struct.Struct("!Q").unpack_from
# A run of PADDING frames: a repeated literal is matched by a tight loop in the regex
# engine, about six times faster than searching for the first byte that is not zero.
_PADDING_RUN = re.compile(rb"\x00+")
_SHA256 = hashlib.sha256
_SHA256_BLOCK = 64
_IPAD = bytes(byte ^ 0x36 for byte in range(256))
_OPAD = bytes(byte ^ 0x5C for byte in range(256))


def looks_like_quic_initial(payload: bytes) -> bool:
    """Integer checks only, so the UDP path can reject non-QUIC before building anything."""
    if len(payload) < 7:
        return False
    nibble = _INITIAL_HIGH_NIBBLE.get(_U32(payload, 1)[0])
    return nibble is not None and payload[0] & 0xF0 == nibble and payload[5] <= MAX_CID_LEN


def _hmac_pads(key: bytes) -> tuple:
    """SHA-256 states that have absorbed ``key``'s inner and outer pads (RFC 2104; keys
    here are at most 32 bytes, under the 64-byte block)."""
    block = key.ljust(_SHA256_BLOCK, b"\x00")
    return _SHA256(block.translate(_IPAD)), _SHA256(block.translate(_OPAD))


def _hmac(pads: tuple, message: bytes) -> bytes:
    """HMAC-SHA256 from ``_hmac_pads``: copying the padded states instead of building an
    ``hmac`` object per call halves the key derivation every QUIC connection pays, and
    the salts' and each secret's pads are computed once."""
    inner = pads[0].copy()
    inner.update(message)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()


def _expand_label_info(label: bytes, length: int) -> bytes:
    """TLS 1.3 HKDF-Expand-Label's info with an empty context, and HKDF-Expand's block
    counter: one HMAC block covers every length QUIC asks for (<= 32)."""
    full_label = b"tls13 " + label
    return struct.pack("!HB", length, len(full_label)) + full_label + b"\x00\x01"


_SALT_PADS = {version: _hmac_pads(salt) for version, salt in _INITIAL_SALTS.items()}
_CLIENT_SECRET_INFO = _expand_label_info(b"client in", 32)
# (key, iv, hp) labels per version, with their lengths.
_PACKET_KEY_INFOS = {version: (_expand_label_info(prefix + b"key", 16),
                               _expand_label_info(prefix + b"iv", 12),
                               _expand_label_info(prefix + b"hp", 16))
                     for version, prefix in _LABEL_PREFIXES.items()}


def derive_initial_keys(dcid: bytes, version: int,
                        secret_label: bytes = b"client in") -> tuple[bytes, bytes, bytes]:
    """(key, iv, hp) protecting Initial packets for the client's original DCID: the client's
    by default, the server's with ``b"server in"`` (what the sample generator needs)."""
    salt_pads = _SALT_PADS.get(version)
    if salt_pads is None:
        raise DecodeError("quic_bad_version")
    initial_secret = _hmac(salt_pads, dcid)
    info = _CLIENT_SECRET_INFO if secret_label == b"client in" else _expand_label_info(secret_label, 32)
    pads = _hmac_pads(_hmac(_hmac_pads(initial_secret), info))
    key_info, iv_info, hp_info = _PACKET_KEY_INFOS[version]
    return _hmac(pads, key_info)[:16], _hmac(pads, iv_info)[:12], _hmac(pads, hp_info)[:16]


_cipher_makers = None
# RFC 9001 A.2: a header protection key and the sample it encrypts.
_HP_EXAMPLE = (bytes.fromhex("9f50449e04a0e810283a1e9933adedd2"),
               bytes.fromhex("d1b1c98dd7689fb8ec11d242b123dc9b"))


def _ciphers() -> tuple:
    """(AESGCM, a function making an AES-ECB encryptor's ``update`` from a key, the AEAD's
    authentication failure), imported on the first QUIC Initial, not at start-up:
    cryptography's bindings cost more to load than a whole short pcap read."""
    global _cipher_makers
    if _cipher_makers is None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        ecb = modes.ECB()
        context = _encryption_context() or (lambda algorithm, mode: Cipher(algorithm, mode).encryptor())

        def ecb_encrypt(key: bytes):
            # ECB is stateless per block, so one encryptor context serves every packet.
            return context(algorithms.AES(key), ecb).update

        _cipher_makers = AESGCM, ecb_encrypt, InvalidTag
    return _cipher_makers


def _encryption_context():
    """cryptography's own constructor of an encryptor context (what ``Cipher.encryptor``
    returns), or None where this version has none or it does not encrypt RFC 9001 A.2's
    sample as ``Cipher`` does.  Every connection needs a context under its own header
    protection key: ``Cipher``'s argument checks, which a 16-byte AES key in ECB mode
    always passes, made that 19 us against 6, the largest share of a QUIC Initial's cost
    (cryptography 48).  The constructor is not public API, so it is tried once here,
    where a change in it costs the fast path and not a packet."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key, sample = _HP_EXAMPLE
    try:
        context = _context_constructor()
        mask = context(algorithms.AES(key), modes.ECB()).update(sample)
    except Exception:  # noqa: BLE001 - any failure here only means the public path
        return None
    return context if mask == Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(sample) else None


def _context_constructor():
    from cryptography.hazmat.bindings._rust import openssl

    return openssl.ciphers.create_encryption_ctx


class InitialKeys:
    """Ready-to-use cipher objects: building them costs more than decrypting one packet."""

    __slots__ = ("aead", "iv", "header_mask")

    def __init__(self, dcid: bytes, version: int):
        aesgcm, ecb_encrypt, _ = _ciphers()
        key, iv, hp = derive_initial_keys(dcid, version)
        self.aead = aesgcm(key)
        self.iv = int.from_bytes(iv, "big")
        self.header_mask = ecb_encrypt(hp)


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """RFC 9000 section 16 variable-length integer at ``pos``: (value, next position)."""
    if pos >= end:
        raise DecodeError("quic_truncated")
    first = buf[pos]
    prefix = first >> 6
    if prefix == 0:
        return first, pos + 1
    if prefix == 1:
        if pos + 2 > end:
            raise DecodeError("quic_truncated")
        return _U16(buf, pos)[0] & 0x3FFF, pos + 2
    if prefix == 2:
        if pos + 4 > end:
            raise DecodeError("quic_truncated")
        return _U32(buf, pos)[0] & 0x3FFFFFFF, pos + 4
    if pos + 8 > end:
        raise DecodeError("quic_truncated")
    return _U64(buf, pos)[0] & 0x3FFFFFFFFFFFFFFF, pos + 8


def parse_initial_header(payload: bytes) -> tuple[int, bytes, int, int]:
    """(version, dcid, packet number offset, end of this packet) of the datagram's first
    packet, which must be an Initial."""
    if not looks_like_quic_initial(payload):
        raise DecodeError("quic_not_initial")
    version = _U32(payload, 1)[0]
    end = len(payload)
    dcid_len = payload[5]
    pos = 6 + dcid_len
    if pos >= end:
        raise DecodeError("quic_truncated")
    dcid = payload[6:pos]
    scid_len = payload[pos]
    if scid_len > MAX_CID_LEN:
        raise DecodeError("quic_bad_header")
    pos += 1 + scid_len
    token_len, pos = _varint(payload, pos, end)
    pos += token_len
    length, pos = _varint(payload, pos, end)
    packet_end = pos + length
    if packet_end > end:
        raise DecodeError("quic_truncated")
    if length < PN_SAMPLE_OFFSET + SAMPLE_LEN:
        raise DecodeError("quic_truncated")
    return version, dcid, pos, packet_end


def decrypt_initial(payload: bytes, pn_offset: int, packet_end: int, keys: InitialKeys) -> bytes:
    """Remove header protection (RFC 9001 section 5.4) and open the AEAD payload
    (section 5.3); returns the frames."""
    sample = payload[pn_offset + PN_SAMPLE_OFFSET:pn_offset + PN_SAMPLE_OFFSET + SAMPLE_LEN]
    mask = keys.header_mask(sample)
    first = payload[0] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    pn_end = pn_offset + pn_len
    packet_number = (int.from_bytes(payload[pn_offset:pn_end], "big")
                     ^ int.from_bytes(mask[1:1 + pn_len], "big"))
    header = (bytes((first,)) + payload[1:pn_offset]
              + packet_number.to_bytes(pn_len, "big"))
    nonce = (keys.iv ^ packet_number).to_bytes(12, "big")
    try:
        return keys.aead.decrypt(nonce, payload[pn_end:packet_end], header)
    except _ciphers()[2]:
        raise DecodeError("quic_decrypt_failed") from None


def crypto_frames(frames: bytes) -> list[tuple[int, bytes]]:
    """(offset, data) of every CRYPTO frame, in packet order.  Only the frame types RFC 9000
    section 12.4 allows in an Initial are accepted; CONNECTION_CLOSE ends the packet."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    end = len(frames)
    while pos < end:
        frame_type = frames[pos]
        if frame_type == FRAME_PADDING:
            pos = _PADDING_RUN.match(frames, pos).end()
        elif frame_type == FRAME_CRYPTO:
            offset, pos = _varint(frames, pos + 1, end)
            length, pos = _varint(frames, pos, end)
            if pos + length > end:
                raise DecodeError("quic_truncated")
            out.append((offset, frames[pos:pos + length]))
            pos += length
        elif frame_type == FRAME_PING:
            pos += 1
        elif frame_type == FRAME_ACK or frame_type == FRAME_ACK_ECN:
            pos = _skip_ack(frames, pos + 1, end, frame_type == FRAME_ACK_ECN)
        elif frame_type == FRAME_CONNECTION_CLOSE or frame_type == FRAME_CONNECTION_CLOSE_APP:
            break
        else:
            raise DecodeError("quic_bad_frame")
    return out


def _skip_ack(frames: bytes, pos: int, end: int, ecn: bool) -> int:
    _, pos = _varint(frames, pos, end)  # largest acknowledged
    _, pos = _varint(frames, pos, end)  # ack delay
    range_count, pos = _varint(frames, pos, end)
    _, pos = _varint(frames, pos, end)  # first range
    if range_count > (end - pos) // 2:  # each further range takes two varints
        raise DecodeError("quic_bad_frame")
    for _ in range(2 * range_count + (3 if ecn else 0)):
        _, pos = _varint(frames, pos, end)
    return pos


class _Connection:
    """CRYPTO stream of one client Initial: the contiguous prefix plus early pieces."""

    __slots__ = ("prefix", "pending", "size", "last", "done")

    def __init__(self, ts: float):
        self.prefix = bytearray()
        self.pending: dict[int, bytes] = {}
        self.size = 0  # bytes held, for the table-wide budget
        self.last = ts
        self.done = False

    def add(self, offset: int, data: bytes) -> None:
        """Place one CRYPTO frame.  Bytes already in the prefix are kept (first arrival
        wins); at one pending offset the longer piece is kept."""
        have = len(self.prefix)
        end = offset + len(data)
        if end <= have or not data:
            return
        if offset > have:
            known = self.pending.get(offset)
            if known is None or len(known) < len(data):
                self.pending[offset] = data
                if len(self.pending) > MAX_CRYPTO_PIECES:
                    raise DecodeError("quic_crypto_fragmented")
        else:
            self.prefix += data[have - offset:]
            self._drain()
        self.size = len(self.prefix) + sum(len(piece) for piece in self.pending.values())

    def _drain(self) -> None:
        """Append pending pieces that now touch the prefix; each pass removes at least one
        piece, so this ends within MAX_CRYPTO_PIECES passes."""
        progress = True
        while progress and self.pending:
            progress = False
            for offset in [o for o in self.pending if o <= len(self.prefix)]:
                piece = self.pending.pop(offset)
                have = len(self.prefix)
                if offset + len(piece) > have:
                    self.prefix += piece[have - offset:]
                progress = True

    def release(self) -> None:
        self.prefix = bytearray()
        self.pending = {}
        self.size = 0
        self.done = True


class QuicInitialTable:
    """Per-connection CRYPTO reassembly for client Initial packets, bounded."""

    def __init__(self, stats: Stats, max_connections: int = 4096,
                 max_crypto_bytes: int = 65536, idle_timeout: float = 30.0,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES):
        self.stats = stats
        self.max_connections = max_connections
        self.max_crypto_bytes = max_crypto_bytes
        self.idle_timeout = idle_timeout
        self.max_total_bytes = max_total_bytes
        self.connections: dict[tuple, _Connection] = {}  # least recently fed first
        self.keys: dict[tuple[int, bytes], InitialKeys] = {}
        self.total_bytes = 0
        stats.table_sizes["quic_initial"] = 0

    def feed(self, payload: bytes, ctx: PacketContext, screen=None) -> ClientHello | None:
        """Decrypt one datagram's Initial and add its CRYPTO frames; the ClientHello comes
        back once, when its last byte arrives, and only if ``screen`` (see
        decode.packet.Interest.hello_may_match) lets it through."""
        version, dcid, pn_offset, packet_end = parse_initial_header(payload)
        if len(dcid) < MIN_CLIENT_DCID_LEN or ctx.src_port < SERVER_PORT_LIMIT <= ctx.dst_port:
            return None
        key = (ctx.src_ip, ctx.src_port, ctx.dst_ip, ctx.dst_port, dcid)
        conn = self._touch(key, ctx.ts)
        if conn is not None and conn.done:
            return None
        pieces = self._crypto_pieces(payload, version, dcid, pn_offset, packet_end)
        if conn is None:
            if not pieces:
                return None
            conn = self._open(key, ctx.ts)
        before = conn.size
        try:
            message = self._reassemble(conn, pieces)
        except DecodeError:
            self._finish(conn, before)
            raise
        self.total_bytes += conn.size - before
        if message is None:
            self._enforce_budget(key)
            return None
        self._finish(conn, conn.size)
        if screen is not None and not screen(message):
            return None
        return tls.parse_client_hello_message(message, ctx, "quic")

    def settle_initial(self, payload: bytes, key: tuple, ts: float, screen) -> bool:
        """``feed`` for the batch path (decode.packet.ethernet_batch), which builds no
        context: True when ``feed`` would give nothing for this datagram, with the table and
        the malformed counters left as ``feed`` and the decoder leave them; False, with
        nothing changed that ``feed`` does not change again, when ``feed`` must take it: a
        hello ``screen`` lets through, or a header or a new connection's frames it would
        count as malformed.  Most HTTP/3 connections are settled here whole: a ClientHello
        in one datagram or two (post-quantum key shares), its retransmissions, Initials
        without CRYPTO frames.  ``key`` is ``feed``'s connection key without the DCID."""
        try:
            version, dcid, pn_offset, packet_end = parse_initial_header(payload)
        except DecodeError:
            return False
        if len(dcid) < MIN_CLIENT_DCID_LEN:
            return True
        key += (dcid,)
        conn = self._touch(key, ts)
        if conn is not None and conn.done:
            return True
        try:
            pieces = self._crypto_pieces(payload, version, dcid, pn_offset, packet_end)
        except DecodeError:
            return False
        fresh = conn is None
        if fresh:
            if not pieces:
                return True
            conn = _Connection(ts)  # in the table only once nothing here can fail
        before = conn.size
        try:
            message = self._reassemble(conn, pieces)
        except DecodeError as err:
            if fresh:
                return False
            self._finish(conn, before)
            self.stats.bad(err.reason)
            return True
        if fresh:
            if message is not None and screen(message):
                return False
            self._open(key, ts, conn)
        self.total_bytes += conn.size - before
        if message is None:
            self._enforce_budget(key)
            return True
        if screen(message):
            # ``feed`` finds the whole hello again (its pieces are duplicates now), finishes
            # the connection and parses it.
            return False
        self._finish(conn, conn.size)
        return True

    def expire(self, now: float) -> None:
        """Drop connections idle for longer than ``idle_timeout``; those whose ClientHello
        never completed are counted."""
        connections = self.connections
        cutoff = now - self.idle_timeout
        while connections:
            key = next(iter(connections))
            conn = connections[key]
            if conn.last >= cutoff:
                break
            del connections[key]
            self.total_bytes -= conn.size
            if not conn.done:
                self.stats.evictions["quic_initial_idle"] += 1
        self.stats.table_sizes["quic_initial"] = len(connections)

    def _touch(self, key: tuple, ts: float) -> _Connection | None:
        """The connection of ``key``, if any, made the most recently fed."""
        conn = self.connections.pop(key, None)
        if conn is not None:
            self.connections[key] = conn
            conn.last = ts
        return conn

    def _crypto_pieces(self, payload: bytes, version: int, dcid: bytes, pn_offset: int,
                       packet_end: int) -> list[tuple[int, bytes]]:
        return crypto_frames(decrypt_initial(payload, pn_offset, packet_end, self._keys(version, dcid)))

    def _keys(self, version: int, dcid: bytes) -> InitialKeys:
        cache_key = (version, dcid)
        keys = self.keys.get(cache_key)
        if keys is None:
            if len(self.keys) >= MAX_KEY_CACHE:
                del self.keys[next(iter(self.keys))]
            keys = self.keys[cache_key] = InitialKeys(dcid, version)
        return keys

    def _open(self, key: tuple, ts: float, conn: _Connection | None = None) -> _Connection:
        connections = self.connections
        if len(connections) >= self.max_connections:
            self._evict_oldest()
        conn = connections[key] = conn or _Connection(ts)
        self.stats.table_sizes["quic_initial"] = len(connections)
        return conn

    def _evict_oldest(self) -> None:
        connections = self.connections
        oldest = next(iter(connections))
        self.total_bytes -= connections.pop(oldest).size
        self.stats.evictions["quic_initial"] += 1
        self.stats.table_sizes["quic_initial"] = len(connections)

    def _enforce_budget(self, keep: tuple) -> None:
        """Evict the least recently fed connections while buffered bytes exceed the
        table-wide budget, sparing the one just fed."""
        while self.total_bytes > self.max_total_bytes and next(iter(self.connections)) != keep:
            self._evict_oldest()

    def _finish(self, conn: _Connection, accounted: int) -> None:
        """Stop buffering: later Initials of this connection are ignored without decryption."""
        self.total_bytes -= accounted
        conn.release()

    def _reassemble(self, conn: _Connection, pieces: list[tuple[int, bytes]]) -> bytes | None:
        limit = self.max_crypto_bytes
        for offset, data in pieces:
            if offset + len(data) > limit:
                raise DecodeError("quic_crypto_too_large")
            conn.add(offset, data)
        prefix = conn.prefix
        if len(prefix) < HANDSHAKE_HEADER_LEN:
            return None
        if prefix[0] != tls.HANDSHAKE_CLIENT_HELLO:
            raise DecodeError("quic_not_client_hello")
        total = HANDSHAKE_HEADER_LEN + int.from_bytes(prefix[1:HANDSHAKE_HEADER_LEN], "big")
        if total > limit:
            raise DecodeError("quic_crypto_too_large")
        if len(prefix) < total:
            return None
        return bytes(prefix[:total])
