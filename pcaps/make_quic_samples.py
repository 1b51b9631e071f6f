#!/usr/bin/env python3
"""Writes deterministic QUIC Initial sample captures for the decoder tests and for tshark.

Real HTTP/3 captures of Kaspersky hosts cannot be shipped, and what matters for the decoder
(a post-quantum ClientHello spread over two Initials, CRYPTO frames out of order and
duplicated, QUIC v2, hostile lengths) is easier to pin down when every byte is chosen here.
The Initials are protected by the encoder below, which is written from RFC 9001 section 5
and RFC 9369 independently of the decoder: it only borrows the key derivation, which the
tests check against the RFC vectors.

    python3 pcaps/make_quic_samples.py --out DIR

writes quic_v1.pcap, quic_v2.pcap, quic_shuffled.pcap and quic_malformed.pcap.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensor.decode.quic import QUIC_V1, QUIC_V2, derive_initial_keys  # noqa: E402

BASE_TS = 1_718_000_000.0
CLIENT_MAC, SERVER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
CLIENT_V4, SERVER_V4 = "192.168.10.23", "198.51.100.7"
CLIENT_V6, SERVER_V6 = "fd00:10::23", "2001:db8:100::7"
CLIENT_PORT, SERVER_PORT = 51234, 443
MIN_DATAGRAM = 1200  # RFC 9000 section 14.1

V1_SNI = "s07.upd.kaspersky.com"
V2_SNI = "ksn-url-geo.kaspersky-labs.com"
SHUFFLED_SNI = "dc1.ksn.kaspersky-labs.com"

GREASE = 0x0A0A
X25519 = 0x001D
X25519_MLKEM768 = 0x11EC
MLKEM768_SHARE_LEN = 1184 + 32  # ML-KEM-768 encapsulation key + X25519 share

FRAME_PING = b"\x01"
_INITIAL_TYPE_BITS = {QUIC_V1: 0x00, QUIC_V2: 0x10}
_HANDSHAKE_TYPE_BITS = {QUIC_V1: 0x20, QUIC_V2: 0x30}


def fixed_bytes(seed: str, length: int) -> bytes:
    """Pseudo-random but reproducible filler (randoms, key shares, connection IDs)."""
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return out[:length]


def varint(value: int, size: int = 0) -> bytes:
    """RFC 9000 section 16 encoding, shortest form unless ``size`` forces one."""
    if not size:
        size = 1 if value < 0x40 else 2 if value < 0x4000 else 4 if value < 0x40000000 else 8
    prefix = {1: 0, 2: 1, 4: 2, 8: 3}[size] << (8 * size - 2)
    return (prefix | value).to_bytes(size, "big")


def _ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def _vec16(body: bytes) -> bytes:
    return struct.pack("!H", len(body)) + body


def _vec8(body: bytes) -> bytes:
    return bytes((len(body),)) + body


def _u16s(*values: int) -> bytes:
    return b"".join(struct.pack("!H", v) for v in values)


def client_hello(sni: str, seed: str, post_quantum: bool = True) -> bytes:
    """A Chrome-shaped TLS 1.3 ClientHello handshake message (type, 24-bit length, body)
    for HTTP/3: GREASE, h3 ALPN, QUIC transport parameters, and with ``post_quantum`` an
    X25519MLKEM768 key share that pushes the message past one Initial."""
    host = sni.encode()
    groups = (GREASE, X25519_MLKEM768, X25519, 0x0017, 0x0018) if post_quantum else \
        (GREASE, X25519, 0x0017, 0x0018)
    shares = _u16s(GREASE) + _vec16(b"\x00")
    if post_quantum:
        shares += _u16s(X25519_MLKEM768) + _vec16(fixed_bytes(seed + "/mlkem", MLKEM768_SHARE_LEN))
    shares += _u16s(X25519) + _vec16(fixed_bytes(seed + "/x25519", 32))
    transport_parameters = (varint(0x04) + _vec8(varint(15_728_640, 4))  # initial_max_data
                            + varint(0x01) + _vec8(varint(30_000, 4))  # max_idle_timeout
                            + varint(0x0F) + _vec8(fixed_bytes(seed + "/scid", 8)))
    extensions = b"".join((
        _ext(GREASE, b""),
        _ext(0x0000, _vec16(b"\x00" + _vec16(host))),
        _ext(0x0010, _vec16(_vec8(b"h3"))),
        _ext(0x000A, _vec16(_u16s(*groups))),
        _ext(0x000D, _vec16(_u16s(0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501,
                                   0x0806, 0x0601))),
        _ext(0x002D, _vec8(b"\x01")),
        _ext(0x002B, _vec8(_u16s(GREASE, 0x0304))),
        _ext(0x0033, _vec16(shares)),
        _ext(0x001B, _vec8(_u16s(0x0002))),
        _ext(0x0039, transport_parameters),
        _ext(0x1A1A, b"\x00"),
    ))
    body = (b"\x03\x03" + fixed_bytes(seed + "/random", 32) + _vec8(b"")
            + _vec16(_u16s(GREASE, 0x1301, 0x1302, 0x1303)) + _vec8(b"\x00")
            + _vec16(extensions))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def protect_long_header(version: int, type_bits: int, dcid: bytes, scid: bytes, pn: int,
                        frames: bytes, keys: tuple[bytes, bytes, bytes], *, token: bytes = b"",
                        pn_len: int = 2, pad_to: int = MIN_DATAGRAM,
                        length_override: int | None = None) -> bytes:
    """Encrypt one long-header packet (RFC 9001 sections 5.3-5.4).  PADDING is appended so
    the packet reaches ``pad_to`` bytes; the Length field always uses two bytes."""
    key, iv, hp = keys
    first = 0xC0 | type_bits | (pn_len - 1)
    head = (bytes((first,)) + struct.pack("!I", version) + _vec8(dcid) + _vec8(scid)
            + varint(len(token)) + token)
    length = pn_len + len(frames) + 16
    if len(head) + 2 + length < pad_to:
        frames += bytes(pad_to - len(head) - 2 - length)
        length = pn_len + len(frames) + 16
    header = head + varint(length if length_override is None else length_override, 2) \
        + pn.to_bytes(pn_len, "big")
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, frames, header)
    pn_offset = len(header) - pn_len
    sample = sealed[4 - pn_len:4 - pn_len + 16]
    mask = Cipher(algorithms.AES(hp), modes.ECB()).encryptor().update(sample)
    protected = bytearray(header)
    protected[0] ^= mask[0] & 0x0F
    for i in range(pn_len):
        protected[pn_offset + i] ^= mask[1 + i]
    return bytes(protected) + sealed


def client_initial(version: int, dcid: bytes, scid: bytes, pn: int, frames: bytes,
                   **kwargs) -> bytes:
    return protect_long_header(version, _INITIAL_TYPE_BITS[version], dcid, scid, pn, frames,
                               derive_initial_keys(dcid, version), **kwargs)


def server_initial(version: int, original_dcid: bytes, client_scid: bytes, server_cid: bytes,
                   pn: int, frames: bytes) -> bytes:
    """The server's reply: protected with the server keys of the client's original DCID and
    addressed to the client's SCID, so the decoder must not mistake it for a client's."""
    return protect_long_header(version, _INITIAL_TYPE_BITS[version], client_scid, server_cid,
                               pn, frames, derive_initial_keys(original_dcid, version,
                                                               b"server in"),
                               pad_to=0)


def udp_frame(datagram: bytes, ipv6: bool = False, reply: bool = False):
    """Ethernet/IP/UDP around one datagram, client to server unless ``reply``."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    src, dst = (CLIENT_V6, SERVER_V6) if ipv6 else (CLIENT_V4, SERVER_V4)
    sport, dport = CLIENT_PORT, SERVER_PORT
    smac, dmac = CLIENT_MAC, SERVER_MAC
    if reply:
        src, dst, sport, dport, smac, dmac = dst, src, dport, sport, dmac, smac
    ip = IPv6(src=src, dst=dst, hlim=64) if ipv6 else IP(src=src, dst=dst, ttl=64, id=0x4242)
    return Ether(src=smac, dst=dmac) / ip / UDP(sport=sport, dport=dport) / Raw(datagram)


def split_message(message: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """(offset, bytes) pieces of ``message`` cut at the given offsets."""
    bounds = [0, *cuts, len(message)]
    return [(bounds[i], message[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1)]


def v1_datagrams() -> list[tuple[bytes, bool]]:
    """Chrome-like: the first Initial carries the start of the ClientHello, the second the
    rest as several small CRYPTO frames among PING and PADDING; then the server's Initial."""
    dcid = fixed_bytes("v1/dcid", 8)
    message = client_hello(V1_SNI, "v1")
    first_len = 1100
    tail = split_message(message[first_len:], [120, 300])
    second = FRAME_PING + b"".join(
        crypto_frame(first_len + off, piece) + FRAME_PING + b"\x00\x00" for off, piece in tail)
    server_cid = fixed_bytes("v1/server-cid", 8)
    ack = b"\x02\x01\x00\x00\x01"  # ACK of packets 0-1
    return [
        (client_initial(QUIC_V1, dcid, b"", 0, crypto_frame(0, message[:first_len])), False),
        (client_initial(QUIC_V1, dcid, b"", 1, second), False),
        (server_initial(QUIC_V1, dcid, b"", server_cid, 0, ack), True),
    ]


def v2_datagrams() -> list[tuple[bytes, bool]]:
    dcid = fixed_bytes("v2/dcid", 12)
    message = client_hello(V2_SNI, "v2", post_quantum=False)
    return [(client_initial(QUIC_V2, dcid, fixed_bytes("v2/scid", 4), 0,
                            crypto_frame(0, message)), False)]


def shuffled_datagrams() -> list[tuple[bytes, bool]]:
    """Six pieces spread over three Initials sent in the order pn 1, 0, 2, each with its
    frames out of order; piece 4 is sent twice (in pn 0 and again in pn 2)."""
    dcid = fixed_bytes("shuffled/dcid", 16)
    message = client_hello(SHUFFLED_SNI, "shuffled")
    p = split_message(message, [200, 430, 700, 950, 1210])
    frame = [crypto_frame(off, data) for off, data in p]
    pn0 = frame[3] + frame[0] + frame[4]
    pn1 = frame[5] + FRAME_PING + frame[1]
    pn2 = frame[4] + frame[2]
    return [(client_initial(QUIC_V1, dcid, b"", 1, pn1), False),
            (client_initial(QUIC_V1, dcid, b"", 0, pn0), False),
            (client_initial(QUIC_V1, dcid, b"", 2, pn2), False)]


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes((data[-1] ^ 0x01,))


def malformed_cases() -> list[tuple[str, bytes, str | None]]:
    """(name, datagram, reason the decoder must give); ``None`` marks a datagram that must
    not pass ``looks_like_quic_initial``.  Each well-formed-looking case has its own DCID so
    no case depends on state left by another."""
    hello = client_hello("bad.kaspersky.com", "malformed", post_quantum=False)
    good = crypto_frame(0, hello)

    def dcid(name: str) -> bytes:
        return fixed_bytes("malformed/" + name, 8)

    valid = client_initial(QUIC_V1, dcid("truncated"), b"", 0, good)
    draft29 = bytearray(client_initial(QUIC_V1, dcid("draft29"), b"", 0, good))
    draft29[1:5] = struct.pack("!I", 0xFF00001D)
    negotiation = b"\xc0" + bytes(4) + _vec8(dcid("vn")) + _vec8(b"") + struct.pack("!I", QUIC_V1)
    long_cid = bytearray(client_initial(QUIC_V1, dcid("long-cid"), b"", 0, good))
    long_cid[5] = 21
    keys_v1 = derive_initial_keys(dcid("handshake"), QUIC_V1)
    handshake = protect_long_header(QUIC_V1, _HANDSHAKE_TYPE_BITS[QUIC_V1], dcid("handshake"),
                                    b"", 0, good, keys_v1)
    huge_token = (b"\xc0" + struct.pack("!I", QUIC_V1) + _vec8(dcid("token")) + _vec8(b"")
                  + varint(0x3FFFFFFF, 4) + bytes(1200))
    relabelled = bytearray(client_initial(QUIC_V1, dcid("relabelled"), b"", 0, good))
    relabelled[0] |= _INITIAL_TYPE_BITS[QUIC_V2]
    relabelled[1:5] = struct.pack("!I", QUIC_V2)
    huge_offset = crypto_frame(1 << 40, b"x" * 16)
    huge_hello = crypto_frame(0, b"\x01\xff\xff\xff" + hello[4:])
    stream_frame = b"\x08\x00" + b"GET /"
    return [
        ("draft-29 version", bytes(draft29), None),
        ("version negotiation", negotiation, None),
        ("handshake packet", handshake, None),
        ("dcid longer than 20", bytes(long_cid), None),
        ("truncated", valid[:300], "quic_truncated"),
        ("length beyond datagram",
         client_initial(QUIC_V1, dcid("length"), b"", 0, good, length_override=4000),
         "quic_truncated"),
        ("token length beyond datagram", huge_token, "quic_truncated"),
        ("corrupted tag", _flip_last(client_initial(QUIC_V1, dcid("tag"), b"", 0, good)),
         "quic_decrypt_failed"),
        ("v1 packet relabelled v2", bytes(relabelled), "quic_decrypt_failed"),
        ("crypto offset beyond cap",
         client_initial(QUIC_V1, dcid("offset"), b"", 0, huge_offset), "quic_crypto_too_large"),
        ("hello length beyond cap",
         client_initial(QUIC_V1, dcid("hello-len"), b"", 0, huge_hello), "quic_crypto_too_large"),
        ("stream frame in initial",
         client_initial(QUIC_V1, dcid("stream"), b"", 0, stream_frame), "quic_bad_frame"),
    ]


def write_pcap(path: Path, datagrams: list[tuple[bytes, bool]], ipv6: bool = False) -> None:
    from scapy.utils import wrpcap

    packets = []
    for i, (datagram, reply) in enumerate(datagrams):
        packet = udp_frame(datagram, ipv6=ipv6, reply=reply)
        packet.time = BASE_TS + i * 0.001
        packets.append(packet)
    wrpcap(str(path), packets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the .pcap files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_pcap(args.out / "quic_v1.pcap", v1_datagrams())
    write_pcap(args.out / "quic_v2.pcap", v2_datagrams(), ipv6=True)
    write_pcap(args.out / "quic_shuffled.pcap", shuffled_datagrams())
    write_pcap(args.out / "quic_malformed.pcap",
               [(datagram, False) for _, datagram, _ in malformed_cases()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
