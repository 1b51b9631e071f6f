#!/usr/bin/env python3
"""Generate the sample captures in this folder.

Every file here is produced by this script, never edited by hand, so a sample can always be
explained and rebuilt.  Output is byte-for-byte reproducible: each capture draws from its own
seeded ``random.Random`` and all timestamps are fixed, so ``tests/test_samples.py`` can compare
a fresh build against the committed files by SHA-256.

scapy builds the IP/IPv6/UDP/TCP layers (so lengths and checksums are right); the application
payloads (DNS, TLS ClientHello, HTTP, DHCP), link headers, tunnels and the capture file
formats are written with ``struct`` because the samples need exact control over bytes that
scapy would normalise (labels holding dots, lying length fields, byte orders, pcapng options).

Usage: ``python3 pcaps/make_samples.py [--out DIR]`` (default: the folder of this script).
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP, IPOption_Router_Alert
from scapy.layers.inet6 import (IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                PadN, RouterAlert)
from scapy.packet import Raw

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETH_IPV4, ETH_IPV6, ETH_8021Q, ETH_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
ETH_MPLS, ETH_PPPOE_SESSION, ETH_TEB = 0x8847, 0x8864, 0x6558
GRE_ERSPAN_2, GRE_ERSPAN_3 = 0x88BE, 0x22EB

T0_NS = 1_735_725_600 * 10**9  # 2025-01-01T10:00:00Z: every capture starts here
MS = 1_000_000
TCP_OPTION_FAST_OPEN = 34  # RFC 7413 section 4.1.1
US = 1_000

ROUTER_MAC = "02:00:5e:00:00:01"
RESOLVER = "10.10.0.53"
UPSTREAM = "203.0.113.53"
KSC_SERVER = "10.10.0.20"
DHCP_SERVER = "10.10.0.1"
UPDATER_UA = b"Mozilla/4.0 (compatible; Kaspersky Updater 11.11.0.452)"
BROWSER_UA = (b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
              b"(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36")


# --------------------------------------------------------------------------- file formats

def pcap_file(linktype: int, records, *, nanosecond=False, big_endian=False,
              snaplen=262144) -> bytes:
    """Classic pcap; ``records`` are (ts_ns, data[, orig_len]) already in file order."""
    order = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    record_header = struct.Struct(order + "IIII")
    for ts_ns, data, *orig in records:
        sec, frac = divmod(ts_ns, 10**9)
        frac = frac if nanosecond else frac // 1000
        out.append(record_header.pack(sec, frac, len(data), orig[0] if orig else len(data)))
        out.append(data)
    return b"".join(out)


def _pcapng_block(block_type: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    total = len(body) + 12
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def _pcapng_option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def pcapng_file(interfaces, records) -> bytes:
    """pcapng with one IDB per ``(linktype, tsresol_exponent, name)``; records are
    (ts_ns, data, interface_id) in file order."""
    shb_options = _pcapng_option(4, b"purge-sensor make_samples.py") + _pcapng_option(0, b"")
    out = [_pcapng_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + shb_options)]
    for linktype, tsresol, name in interfaces:
        options = (_pcapng_option(2, name) + _pcapng_option(9, bytes([tsresol]))
                   + _pcapng_option(0, b""))
        out.append(_pcapng_block(1, struct.pack("<HHI", linktype, 0, 262144) + options))
    for ts_ns, data, iface in records:
        ticks = ts_ns // 10 ** (9 - interfaces[iface][1])
        body = struct.pack("<IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data))
        out.append(_pcapng_block(6, body + data + b"\0" * (-len(data) % 4)))
    return b"".join(out)


# --------------------------------------------------------------------------- link layers

def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def host_mac(ip: str) -> str:
    """Internal hosts get a stable locally administered MAC; everything else is the router."""
    addr = ipaddress.ip_address(ip)
    if addr.is_private and not addr.is_unspecified:
        tail = addr.packed[-4:]
        return "02:1a:" + ":".join(f"{b:02x}" for b in tail)
    if ip == "255.255.255.255":
        return "ff:ff:ff:ff:ff:ff"
    return ROUTER_MAC


def ethertype_of(ip_packet: bytes) -> int:
    return ETH_IPV6 if ip_packet[0] >> 4 == 6 else ETH_IPV4


def ethernet(ip_packet: bytes, src: str, dst: str, tags=(), ethertype=None) -> bytes:
    """Ethernet frame from ``src`` to ``dst``; ``tags`` are (tpid, vlan_id) outermost first."""
    parts = [mac_bytes(host_mac(dst)), mac_bytes(host_mac(src))]
    for tpid, vid in tags:
        parts.append(struct.pack("!HH", tpid, vid & 0x0FFF))
    parts.append(struct.pack("!H", ethertype or ethertype_of(ip_packet)))
    parts.append(ip_packet)
    return b"".join(parts)


def linux_sll(ip_packet: bytes, src: str, dst: str) -> bytes:
    """Linux cooked v1: packet type (0 to us, 4 outgoing), ARPHRD_ETHER, sender address."""
    packet_type = 4 if ipaddress.ip_address(src).is_private else 0
    return (struct.pack("!HHH", packet_type, 1, 6) + mac_bytes(host_mac(src)) + b"\0\0"
            + struct.pack("!H", ethertype_of(ip_packet)) + ip_packet)


def linux_sll2(ip_packet: bytes, src: str, dst: str) -> bytes:
    """Linux cooked v2 (20-byte header, protocol first, interface index included)."""
    packet_type = 4 if ipaddress.ip_address(src).is_private else 0
    return (struct.pack("!HHIHBB", ethertype_of(ip_packet), 0, 3, 1, packet_type, 6)
            + mac_bytes(host_mac(src)) + b"\0\0" + ip_packet)


def bsd_loopback(ip_packet: bytes, src: str, dst: str) -> bytes:
    """DLT_NULL: address family in the writer's (here little-endian) byte order."""
    family = 24 if ip_packet[0] >> 4 == 6 else 2
    return struct.pack("<I", family) + ip_packet


def raw_ip(ip_packet: bytes, src: str, dst: str) -> bytes:
    return ip_packet


def _ones_complement(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def outer_ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int) -> bytes:
    return bytes(IP(src=src, dst=dst, proto=proto, id=ident, ttl=62, flags="DF") / Raw(payload))


def outer_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, ident: int) -> bytes:
    return bytes(IP(src=src, dst=dst, id=ident, ttl=62) / UDP(sport=sport, dport=dport)
                 / Raw(payload))


# --------------------------------------------------------------------------- capture builder

@dataclass
class Capture:
    """Collects timestamped frames for one file.

    ``wrap(ip_packet, src, dst)`` turns an IP packet into the link-layer frame, which is how
    one traffic recipe is reused under VLANs, cooked headers and tunnels.  ``names`` records
    every (kind, name) the traffic is meant to expose, for the README and the tshark checks.
    """

    wrap: Callable[[bytes, str, str], bytes]
    rng: random.Random
    frames: list = field(default_factory=list)
    names: list = field(default_factory=list)
    ip_ident: int = 0x1000
    ipv6_extensions: bool = False
    ipv4_options: bool = False

    def note(self, kind: str, name: str) -> None:
        if (kind, name) not in self.names:
            self.names.append((kind, name))

    def next_ident(self) -> int:
        self.ip_ident = (self.ip_ident + 1) & 0xFFFF
        return self.ip_ident

    def ip_packet(self, src: str, dst: str, l4) -> bytes:
        if ":" in src:
            header = IPv6(src=src, dst=dst, hlim=64)
            if self.ipv6_extensions:
                header = (header / IPv6ExtHdrHopByHop(options=[RouterAlert(value=0), PadN(optdata=b"")])
                          / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0\0\0\0")]))
            return bytes(header / l4)
        ttl = 64 if ipaddress.ip_address(src).is_private else 57
        # Router Alert then NOP padding: a 28-byte header (IHL 7), which moves every
        # transport field the capture filter reads.
        options = [IPOption_Router_Alert(), IPOption_NOP(), IPOption_NOP(), IPOption_NOP(),
                   IPOption_NOP()] if self.ipv4_options else []
        return bytes(IP(src=src, dst=dst, id=self.next_ident(), ttl=ttl, options=options) / l4)

    def emit(self, ts_ns: int, src: str, dst: str, l4) -> None:
        self.emit_ip(ts_ns, self.ip_packet(src, dst, l4), src, dst)

    def emit_ip(self, ts_ns: int, packet: bytes, src: str, dst: str) -> None:
        self.frames.append((ts_ns, self.wrap(packet, src, dst)))

    def emit_frame(self, ts_ns: int, frame: bytes, orig_len: int | None = None) -> None:
        self.frames.append((ts_ns, frame) if orig_len is None else (ts_ns, frame, orig_len))

    def ordered(self) -> list:
        """Frames sorted by time; equal timestamps keep emission order (stable sort)."""
        return sorted(self.frames, key=lambda record: record[0])


def labels(name: str) -> tuple[bytes, ...]:
    return tuple(part.encode() for part in name.rstrip(".").split(".")) if name.strip(".") else ()


def text_labels(raw: bytes) -> tuple[bytes, ...]:
    """Labels of a dotted name from SNI or Host, one trailing dot dropped (as the sensor does)."""
    raw = raw[:-1] if raw.endswith(b".") else raw
    return tuple(raw.split(b".")) if raw else ()


def presentation(name_labels) -> str:
    """The escaped text form (``\\.`` inside a label, ``\\DDD`` for odd bytes), lower-cased."""
    out = []
    for label in name_labels:
        text = []
        for b in label:
            if b in (0x2E, 0x5C, 0x22):
                text.append("\\" + chr(b))
            elif 0x21 <= b <= 0x7E:
                text.append(chr(b))
            else:
                text.append("\\%03d" % b)
        out.append("".join(text))
    return ".".join(out).lower()


# --------------------------------------------------------------------------- DNS

TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28


class _DnsWriter:
    """Writes names with RFC 1035 suffix compression, as real servers do; a longer name
    written after its suffix therefore yields pointer chains."""

    def __init__(self, header: bytes, compress: bool):
        self.buf = bytearray(header)
        self.offsets: dict[tuple, int] = {}
        self.compress = compress

    def name(self, name_labels) -> None:
        for i in range(len(name_labels)):
            suffix = tuple(label.lower() for label in name_labels[i:])
            if self.compress and suffix in self.offsets:
                self.buf += struct.pack("!H", 0xC000 | self.offsets[suffix])
                return
            if len(self.buf) < 0x3FFF:
                self.offsets.setdefault(suffix, len(self.buf))
            self.buf += bytes([len(name_labels[i])]) + name_labels[i]
        self.buf += b"\0"


def dns_message(txid: int, questions, answers=(), *, response=False, compress=True) -> bytes:
    """questions: [(labels, qtype)]; answers: [(labels, rtype, ttl, rdata)], rdata an address
    string for A/AAAA or labels for CNAME."""
    flags = 0x8180 if response else 0x0100
    writer = _DnsWriter(struct.pack("!HHHHHH", txid, flags, len(questions), len(answers), 0, 0),
                        compress)
    for qname, qtype in questions:
        writer.name(qname)
        writer.buf += struct.pack("!HH", qtype, 1)
    for owner, rtype, ttl, rdata in answers:
        writer.name(owner)
        writer.buf += struct.pack("!HHI", rtype, 1, ttl)
        length_at = len(writer.buf)
        writer.buf += b"\0\0"
        if rtype == TYPE_CNAME:
            writer.name(rdata)
        else:
            writer.buf += ipaddress.ip_address(rdata).packed
        struct.pack_into("!H", writer.buf, length_at, len(writer.buf) - length_at - 2)
    return bytes(writer.buf)


def answer_chain(name: str, chain: tuple[str, ...], address: str, ttl=300) -> list:
    """A CNAME chain name -> chain[0] -> ... -> address record."""
    answers = []
    owner = labels(name)
    for target in chain:
        answers.append((owner, TYPE_CNAME, ttl, labels(target)))
        owner = labels(target)
    answers.append((owner, TYPE_AAAA if ":" in address else TYPE_A, ttl, address))
    return answers


# --------------------------------------------------------------------------- TLS

GREASE_VALUES = tuple(0x0A0A + 0x1010 * i for i in range(16))
TLS13_CIPHERS = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8,
                 0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035)
SIGNATURE_ALGORITHMS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)
GROUP_X25519, GROUP_X25519MLKEM768 = 29, 0x11EC


def _vector(data: bytes, width: int) -> bytes:
    return len(data).to_bytes(width, "big") + data


def _u16s(values) -> bytes:
    return struct.pack("!%dH" % len(values), *values)


def sni_extension(server_name: bytes) -> bytes:
    return _vector(b"\0" + _vector(server_name, 2), 2)


def client_hello(rng: random.Random, server_name: bytes | None, *, post_quantum=False,
                 alpn=(b"h2", b"http/1.1"), sni_last=False, legacy=False) -> bytes:
    """A Chrome-like TLS 1.3 ClientHello record (GREASE, ALPN, key_share, supported_versions);
    ``post_quantum`` adds the 1216-byte X25519MLKEM768 share that pushes it past one MSS,
    ``legacy`` gives an older TLS 1.2 agent's hello (no GREASE, no TLS 1.3 extensions)."""
    grease_cipher, grease_ext1, grease_ext2, grease_group, grease_version = rng.sample(GREASE_VALUES, 5)
    extensions = []
    if not legacy:
        extensions.append((grease_ext1, b""))
    if server_name is not None and not sni_last:
        extensions.append((0, sni_extension(server_name)))
    groups = (GROUP_X25519, 23, 24) if legacy else (
        (grease_group, GROUP_X25519MLKEM768, GROUP_X25519, 23, 24) if post_quantum
        else (grease_group, GROUP_X25519, 23, 24))
    extensions += [(23, b""), (0xFF01, b"\0"), (10, _vector(_u16s(groups), 2)),
                   (11, b"\x01\x00"), (35, b"")]
    if alpn:
        extensions.append((16, _vector(b"".join(_vector(p, 1) for p in alpn), 2)))
    extensions += [(5, b"\x01\x00\x00\x00\x00"), (13, _vector(_u16s(SIGNATURE_ALGORITHMS), 2))]
    if not legacy:
        shares = struct.pack("!HH", grease_group, 1) + b"\0"
        if post_quantum:
            shares += struct.pack("!HH", GROUP_X25519MLKEM768, 1216) + rng.randbytes(1216)
        shares += struct.pack("!HH", GROUP_X25519, 32) + rng.randbytes(32)
        extensions += [(18, b""), (51, _vector(shares, 2)), (45, b"\x01\x01"),
                       (43, _vector(_u16s((grease_version, 0x0304, 0x0303)), 1)),
                       (27, b"\x02\x00\x02")]
    if server_name is not None and sni_last:
        extensions.append((0, sni_extension(server_name)))
    if not legacy:
        extensions.append((grease_ext2, b"\0"))
    ext_bytes = b"".join(struct.pack("!H", etype) + _vector(body, 2) for etype, body in extensions)
    ciphers = TLS13_CIPHERS[3:] if legacy else (grease_cipher,) + TLS13_CIPHERS
    body = (struct.pack("!H", 0x0303) + rng.randbytes(32) + _vector(rng.randbytes(32), 1)
            + _vector(_u16s(ciphers), 2) + b"\x01\x00" + _vector(ext_bytes, 2))
    handshake = b"\x01" + _vector(body, 3)
    return b"\x16\x03\x01" + _vector(handshake, 2)


def server_flight(rng: random.Random) -> bytes:
    """ServerHello (TLS 1.3 via supported_versions), ChangeCipherSpec and the encrypted rest."""
    extensions = (struct.pack("!HHH", 43, 2, 0x0304)
                  + struct.pack("!HHHH", 51, 36, GROUP_X25519, 32) + rng.randbytes(32))
    body = (struct.pack("!H", 0x0303) + rng.randbytes(32) + _vector(rng.randbytes(32), 1)
            + struct.pack("!HB", 0x1301, 0) + _vector(extensions, 2))
    hello = b"\x16\x03\x03" + _vector(b"\x02" + _vector(body, 3), 2)
    return hello + b"\x14\x03\x03\x00\x01\x01" + tls_app_data(rng, rng.randint(1100, 1900))


def tls_app_data(rng: random.Random, size: int) -> bytes:
    return b"\x17\x03\x03" + _vector(rng.randbytes(size), 2)


# --------------------------------------------------------------------------- TCP sessions

class TcpSession:
    """One TCP connection with consistent sequence numbers; payloads are cut at the MSS
    unless explicit split points are given."""

    def __init__(self, cap: Capture, t: int, client: str, server: str, sport: int, dport: int,
                 mss: int = 1460):
        self.cap, self.t = cap, t
        self.client, self.server, self.sport, self.dport, self.mss = client, server, sport, dport, mss
        self.seq = {True: cap.rng.getrandbits(32), False: cap.rng.getrandbits(32)}
        self.rtt = cap.rng.randint(8, 40) * MS if not ipaddress.ip_address(server).is_private else 300 * US

    def _segment(self, from_client: bool, flags: str, payload: bytes = b"", seq=None, options=()):
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        sport, dport = (self.sport, self.dport) if from_client else (self.dport, self.sport)
        tcp = TCP(sport=sport, dport=dport, flags=flags, window=64240 if from_client else 65160,
                  seq=self.seq[from_client] if seq is None else seq,
                  ack=self.seq[not from_client] if "A" in flags else 0, options=list(options))
        return src, dst, (tcp / Raw(payload)) if payload else tcp

    def _emit(self, from_client: bool, flags: str, payload: bytes = b"", seq=None, options=()):
        src, dst, l4 = self._segment(from_client, flags, payload, seq, options)
        self.cap.emit(self.t, src, dst, l4)

    def tick(self, low_us=40, high_us=900) -> None:
        self.t += self.cap.rng.randint(low_us, high_us) * US

    def handshake(self) -> None:
        self._syn_exchange([("MSS", self.mss), ("NOP", None), ("WScale", 8), ("NOP", None),
                            ("NOP", None), ("SAckOK", b"")],
                           [("MSS", 1460), ("NOP", None), ("NOP", None), ("SAckOK", b""),
                            ("NOP", None), ("WScale", 7)])
        self._emit(True, "A")

    def fast_open(self, data: bytes) -> None:
        """A TCP Fast Open handshake (RFC 7413): the SYN carries a cookie and ``data``, the
        SYN-ACK acknowledges both, and the client's next bytes follow ``data``."""
        cookie = (TCP_OPTION_FAST_OPEN, self.cap.rng.randbytes(8))
        self._syn_exchange([("MSS", self.mss), ("SAckOK", b""), cookie],
                           [("MSS", 1460), ("SAckOK", b"")], data)

    def _syn_exchange(self, syn_options, syn_ack_options, data: bytes = b"") -> None:
        """The client's SYN (carrying ``data`` under Fast Open) and the server's SYN-ACK,
        half a round trip apart; both sides' sequence numbers move past them."""
        self._emit(True, "S", data, options=syn_options)
        self.seq[True] = (self.seq[True] + 1 + len(data)) & 0xFFFFFFFF
        self.t += self.rtt // 2
        self._emit(False, "SA", options=syn_ack_options)
        self.seq[False] = (self.seq[False] + 1) & 0xFFFFFFFF
        self.t += self.rtt // 2

    def pieces(self, payload: bytes, splits=None) -> list[tuple[int, bytes]]:
        """(offset, bytes) pieces of ``payload``: at ``splits`` if given, else at the MSS."""
        cuts = list(splits) if splits else list(range(self.mss, len(payload), self.mss))
        bounds = [0] + cuts + [len(payload)]
        return [(a, payload[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]

    def send(self, from_client: bool, payload: bytes, *, splits=None, order=None,
             retransmit=()) -> None:
        """Send ``payload``; ``order`` permutes the pieces on the wire, ``retransmit`` lists
        piece indexes sent a second time right after their first copy."""
        pieces = self.pieces(payload, splits)
        base = self.seq[from_client]
        for index in (order or range(len(pieces))):
            offset, chunk = pieces[index]
            copies = 2 if index in retransmit else 1
            for _ in range(copies):
                self.tick(20, 200)
                self._emit(from_client, "PA", chunk, seq=(base + offset) & 0xFFFFFFFF)
        self.seq[from_client] = (base + len(payload)) & 0xFFFFFFFF

    def ack(self, from_client: bool) -> None:
        self.tick()
        self._emit(from_client, "A")

    def reply_delay(self) -> None:
        self.t += self.rtt

    def close(self) -> None:
        self.tick(1000, 30000)
        self._emit(True, "FA")
        self.seq[True] = (self.seq[True] + 1) & 0xFFFFFFFF
        self.t += self.rtt // 2
        self._emit(False, "FA")
        self.seq[False] = (self.seq[False] + 1) & 0xFFFFFFFF
        self.t += self.rtt // 2
        self._emit(True, "A")


def ephemeral_port(rng: random.Random) -> int:
    return rng.randint(49152, 65000)


# --------------------------------------------------------------------------- traffic recipes

def dns_lookup(cap: Capture, t: int, client: str, server: str, name: str, answers, *,
               qtype=TYPE_A, forward_to: str | None = None, note=True) -> int:
    """Client asks ``server``; when ``forward_to`` is set the server first asks upstream.
    Returns the time after the answer reached the client."""
    rng = cap.rng
    qname = labels(name)
    txid, sport = rng.getrandbits(16), ephemeral_port(rng)
    cap.emit(t, client, server, UDP(sport=sport, dport=53)
             / Raw(dns_message(txid, [(qname, qtype)])))
    t += rng.randint(100, 600) * US
    if forward_to:
        up_id, up_port = rng.getrandbits(16), ephemeral_port(rng)
        cap.emit(t, server, forward_to, UDP(sport=up_port, dport=53)
                 / Raw(dns_message(up_id, [(qname, qtype)])))
        t += rng.randint(8, 35) * MS
        cap.emit(t, forward_to, server, UDP(sport=53, dport=up_port)
                 / Raw(dns_message(up_id, [(qname, qtype)], answers, response=True)))
        t += rng.randint(100, 400) * US
    elif not ipaddress.ip_address(server).is_private:
        t += rng.randint(10, 40) * MS
    cap.emit(t, server, client, UDP(sport=53, dport=sport)
             / Raw(dns_message(txid, [(qname, qtype)], answers, response=True)))
    if note:
        cap.note("dns", presentation(qname))
    return t + rng.randint(200, 2000) * US


def tls_session(cap: Capture, t: int, client: str, server: str, sni: bytes | None, *,
                port=443, post_quantum=False, splits=None, bulk=2, legacy=False,
                alpn=(b"h2", b"http/1.1"), note=True, client_port=None) -> int:
    """Handshake, ClientHello (split like a real stack when it exceeds the MSS), server
    flight, a little application data, teardown."""
    rng = cap.rng
    session = TcpSession(cap, t, client, server, client_port or ephemeral_port(rng), port)
    session.handshake()
    session.tick()
    session.send(True, client_hello(rng, sni, post_quantum=post_quantum, legacy=legacy,
                                    alpn=alpn), splits=splits)
    session.reply_delay()
    session.send(False, server_flight(rng))
    session.ack(True)
    session.send(True, tls_app_data(rng, 74) + tls_app_data(rng, rng.randint(300, 600)))
    session.reply_delay()
    for _ in range(bulk):
        session.send(False, tls_app_data(rng, rng.randint(600, 1380)))
    session.ack(True)
    session.close()
    if note and sni is not None:
        cap.note("tls_sni", presentation(text_labels(sni)))
    return session.t


def http_get(cap: Capture, t: int, client: str, server: str, host: bytes, path: bytes, *,
             user_agent=BROWSER_UA, port=80, note=True) -> int:
    rng = cap.rng
    session = TcpSession(cap, t, client, server, ephemeral_port(rng), port)
    session.handshake()
    session.tick()
    session.send(True, b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nUser-Agent: "
                 + user_agent + b"\r\nAccept: */*\r\nConnection: Keep-Alive\r\n\r\n")
    session.reply_delay()
    body = rng.randbytes(rng.randint(200, 900)).hex().encode()[:rng.randint(300, 1200)]
    session.send(False, b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    session.ack(True)
    session.close()
    if note:
        name = host.rsplit(b":", 1)[0] if host.count(b":") == 1 else host
        cap.note("http_host", presentation(text_labels(name)))
    return session.t


def dhcp_packet(message_type: int, xid: int, mac: str, *, yiaddr="0.0.0.0",
                hostname: bytes | None = None, fqdn: bytes | None = None) -> bytes:
    """BOOTP + DHCP options: 53 type, 12 hostname, 81 client FQDN, 54/51/1/3 from the server."""
    op = 1 if message_type in (1, 3) else 2
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, xid, 0, 0x8000,
                        bytes(4), ipaddress.ip_address(yiaddr).packed, bytes(4), bytes(4),
                        mac_bytes(mac), b"", b"")
    options = bytes([53, 1, message_type])
    if op == 1:
        options += bytes([61, 7, 1]) + mac_bytes(mac)
        if hostname:
            options += bytes([12, len(hostname)]) + hostname
        if fqdn:
            options += bytes([81, len(fqdn) + 3, 0x01, 0, 0]) + fqdn
        options += bytes([55, 6, 1, 3, 6, 15, 51, 54])
    else:
        options += (bytes([54, 4]) + ipaddress.ip_address(DHCP_SERVER).packed
                    + bytes([51, 4]) + struct.pack("!I", 86400)
                    + bytes([1, 4, 255, 255, 0, 0]) + bytes([3, 4]) + ipaddress.ip_address(DHCP_SERVER).packed
                    + bytes([6, 4]) + ipaddress.ip_address(RESOLVER).packed)
    return fixed + b"\x63\x82\x53\x63" + options + b"\xff"


def dhcp_exchange(cap: Capture, t: int, client_ip: str, hostname: bytes, fqdn: bytes) -> int:
    rng = cap.rng
    mac = host_mac(client_ip)
    xid = rng.getrandbits(32)
    broadcast = "255.255.255.255"
    steps = ((1, "0.0.0.0", broadcast, 68, 67), (2, DHCP_SERVER, broadcast, 67, 68),
             (3, "0.0.0.0", broadcast, 68, 67), (5, DHCP_SERVER, broadcast, 67, 68))
    for message_type, src, dst, sport, dport in steps:
        payload = dhcp_packet(message_type, xid, mac,
                              yiaddr=client_ip if message_type in (2, 5) else "0.0.0.0",
                              hostname=hostname, fqdn=fqdn)
        packet = bytes(IP(src=src, dst=dst, id=cap.next_ident(), ttl=64 if src != "0.0.0.0" else 128)
                       / UDP(sport=sport, dport=dport) / Raw(payload))
        frame_src = DHCP_SERVER if src == DHCP_SERVER else client_ip
        cap.emit_frame(t, ethernet(packet, frame_src, broadcast))
        t += rng.randint(2, 30) * MS
    return t


def ntp_query(cap: Capture, t: int, client: str, server: str) -> int:
    rng = cap.rng
    request = bytes([0xE3, 0, 6, 0xE9]) + bytes(36) + rng.randbytes(8)
    cap.emit(t, client, server, UDP(sport=123, dport=123) / Raw(request))
    t += rng.randint(10, 40) * MS
    reply = bytes([0x24, 2, 6, 0xE9]) + rng.randbytes(8) + b"GPS\0" + rng.randbytes(32)
    cap.emit(t, server, client, UDP(sport=123, dport=123) / Raw(reply))
    return t


def quic_noise(cap: Capture, t: int, client: str, server: str, count: int) -> int:
    """1-RTT short-header datagrams of an already running QUIC connection: no Initial, so
    nothing to decrypt and no name to find."""
    rng = cap.rng
    sport = ephemeral_port(rng)
    dcid = rng.randbytes(8)
    for i in range(count):
        outbound = i % 3 != 2
        payload = (bytes([0x40 | rng.getrandbits(5)]) + (dcid if outbound else b"")
                   + rng.randbytes(rng.randint(40, 1200)))
        if outbound:
            cap.emit(t, client, server, UDP(sport=sport, dport=443) / Raw(payload))
        else:
            cap.emit(t, server, client, UDP(sport=443, dport=sport) / Raw(payload))
        t += rng.randint(1, 25) * MS
    return t


# --------------------------------------------------------------------------- the demo capture

COMMON_SITES = (
    ("www.example.com", (), "198.51.100.10"),
    ("github.com", (), "198.51.100.11"),
    ("www.wikipedia.org", ("dyna.wikimedia.org",), "198.51.100.12"),
    ("outlook.office365.com", ("outlook.ha.office365.com", "outlook.ms-acdc.office.com"),
     "198.51.100.13"),
    ("www.google.com", (), "198.51.100.14"),
    ("slack.com", (), "198.51.100.15"),
    ("login.microsoftonline.com", ("login.mso.msidentity.com",), "198.51.100.16"),
    ("news.ycombinator.com", (), "198.51.100.17"),
    ("www.bbc.co.uk", ("www.bbc.net.uk",), "198.51.100.18"),
    ("cdn.jsdelivr.net", ("jsdelivr.map.fastly.net",), "198.51.100.19"),
    ("docs.python.org", ("dualstack.python.map.fastly.net",), "198.51.100.20"),
    ("www.youtube.com", ("youtube-ui.l.google.com",), "198.51.100.21"),
)
PLAIN_HTTP_SITES = (("neverssl.com", "198.51.100.30"), ("www.example.com", "198.51.100.10"))

KASPERSKY_TLS = (
    ("s07.upd.kaspersky.com", ("upd-geo.kaspersky-cdn.example.net", "e7.cdn.example.net"),
     "203.0.113.71"),
    ("dc1.ksn.kaspersky-labs.com", (), "203.0.113.72"),
    ("activation-v2.kaspersky.com", ("activation-v2.geo.kaspersky.com",), "203.0.113.73"),
    ("ksn-ru-geo.kaspersky-labs.com", ("ksn-geo.kaspersky-cdn.example.net",), "203.0.113.74"),
)
KASPERSKY_HTTP = ("dnl-03.geo.kaspersky.com", ("dnl-geo.kaspersky-cdn.example.net",), "203.0.113.80")
UPDATE_PATHS = (b"/index/u0607g.xml", b"/bases/av/kdb/i386/kdb-i386-0607g.xml.dif",
                b"/bases/av/kdb/i386/dailyc.kdc")

NORMAL_HOSTS = tuple(f"10.10.1.{n}" for n in range(11, 23))
KASPERSKY_HOSTS = ("10.10.2.31", "10.10.2.32", "10.10.2.33")
VLAN_HOSTS = {"10.10.2.33": 20}
BROWSING_HOST = "10.10.1.40"
FALLBACK_HOST = "10.10.3.50"
DHCP_CLIENTS = (("10.10.1.11", b"WS-FIN-011"), ("10.10.1.14", b"WS-HR-014"),
                ("10.10.2.31", b"WS-ACCT-031"), ("10.10.2.32", b"WS-ACCT-032"),
                ("10.10.1.40", b"LAPTOP-SOC-040"))


class Resolver:
    """The internal resolver: forwards a name upstream the first time, then answers it
    from its cache."""

    def __init__(self, cap: Capture):
        self.cap, self.cached = cap, set()

    def lookup(self, t: int, client: str, name: str, chain, address: str) -> int:
        forward = None if name in self.cached else UPSTREAM
        self.cached.add(name)
        return dns_lookup(self.cap, t, client, RESOLVER, name, answer_chain(name, chain, address),
                          forward_to=forward)


def demo_wrap(packet: bytes, src: str, dst: str) -> bytes:
    vlan = VLAN_HOSTS.get(src) or VLAN_HOSTS.get(dst)
    return ethernet(packet, src, dst, ((ETH_8021Q, vlan),) if vlan else ())


def build_demo() -> Capture:
    cap = Capture(demo_wrap, random.Random("demo"))
    rng = cap.rng
    resolver = Resolver(cap)
    fqdn_domain = b".corp.example"
    t = T0_NS + 2 * MS
    for client, hostname in DHCP_CLIENTS:
        t = dhcp_exchange(cap, t, client, hostname, hostname.lower() + fqdn_domain) + 400 * MS

    for index, host in enumerate(NORMAL_HOSTS):
        post_quantum = index % 3 != 2
        legacy = index % 6 == 5
        when = sorted(rng.randint(5, 590) for _ in range(rng.randint(4, 6)))
        for visit, second in enumerate(when):
            t = T0_NS + second * 10**9 + rng.randint(0, 999) * MS
            if visit == 2 and index % 2 == 0:
                name, address = PLAIN_HTTP_SITES[index % len(PLAIN_HTTP_SITES)]
                t = resolver.lookup(t, host, name, (), address)
                http_get(cap, t, host, address, name.encode(), b"/")
                continue
            name, chain, address = COMMON_SITES[rng.randrange(len(COMMON_SITES))]
            t = resolver.lookup(t, host, name, chain, address)
            tls_session(cap, t, host, address, name.encode(), post_quantum=post_quantum,
                        legacy=legacy, bulk=rng.randint(1, 2))
        ntp_query(cap, T0_NS + rng.randint(1, 599) * 10**9, host, "203.0.113.123")
        if index % 4 == 1:
            quic_noise(cap, T0_NS + rng.randint(10, 580) * 10**9, host, "198.51.100.14",
                       rng.randint(6, 12))

    for index, host in enumerate(KASPERSKY_HOSTS):
        for round_start in (30 + 40 * index, 330 + 40 * index):
            t = T0_NS + round_start * 10**9
            for name, chain, address in KASPERSKY_TLS:
                t = resolver.lookup(t, host, name, chain, address)
                splits = (517, 1301) if index == 1 else None
                t = tls_session(cap, t, host, address, name.encode(), post_quantum=index != 2,
                                splits=splits, bulk=1) + rng.randint(200, 900) * MS
            name, chain, address = KASPERSKY_HTTP
            t = resolver.lookup(t, host, name, chain, address)
            for path in UPDATE_PATHS[: 2 if round_start < 300 else 3]:
                t = http_get(cap, t, host, address, name.encode(), path,
                             user_agent=UPDATER_UA) + rng.randint(50, 300) * MS
        ksc_agent_traffic(cap, T0_NS + (100 + 60 * index) * 10**9, host)

    t = T0_NS + 200 * 10**9
    for name, address in (("www.kaspersky.com", "203.0.113.90"), ("securelist.com", "203.0.113.91")):
        t = resolver.lookup(t, BROWSING_HOST, name, (), address)
        t = tls_session(cap, t, BROWSING_HOST, address, name.encode(), post_quantum=True,
                        bulk=3) + 20 * 10**9

    t = T0_NS + 450 * 10**9
    name = "downloads.upd.kaspersky.com"
    t = dns_lookup(cap, t, FALLBACK_HOST, "223.6.6.6", name,
                   answer_chain(name, (), "203.0.113.75"))
    tls_session(cap, t, FALLBACK_HOST, "203.0.113.75", name.encode(), bulk=1)
    return cap


def ksc_agent_traffic(cap: Capture, t: int, host: str) -> int:
    """Network Agent to Administration Server: TLS without SNI on 13000, the legacy
    unencrypted 14000 channel, and the server's UDP 15000 wake-up to the agent."""
    rng = cap.rng
    t = tls_session(cap, t, host, KSC_SERVER, None, port=13000, alpn=(), bulk=2)
    session = TcpSession(cap, t + 2 * 10**9, host, KSC_SERVER, ephemeral_port(rng), 14000)
    session.handshake()
    session.send(True, struct.pack("!I", 96) + b"KLPXG" + rng.randbytes(91))
    session.reply_delay()
    session.send(False, struct.pack("!I", 48) + rng.randbytes(48))
    session.ack(True)
    session.close()
    t = session.t + 5 * 10**9
    cap.emit(t, KSC_SERVER, host, UDP(sport=rng.randint(49152, 65000), dport=15000)
             / Raw(b"\x00\x01" + rng.randbytes(30)))
    return t


# --------------------------------------------------------------------------- edge-case captures

CLIENT = "192.168.1.20"
LAN_RESOLVER = "192.168.1.1"
KASPERSKY_SERVER = "203.0.113.70"


def basic_traffic(cap: Capture, t: int, *, dns=(), tls=(), http=(), client=CLIENT,
                  resolver=LAN_RESOLVER, server=KASPERSKY_SERVER, post_quantum=True) -> int:
    """DNS lookups, TLS sessions and HTTP GETs for the given names, one after the other."""
    for name in dns:
        address = "2001:db8:40::70" if ":" in client else server
        qtype = TYPE_AAAA if ":" in client else TYPE_A
        t = dns_lookup(cap, t, client, resolver, name, answer_chain(name, (), address),
                       qtype=qtype) + 5 * MS
    for sni in tls:
        t = tls_session(cap, t, client, server, sni, post_quantum=post_quantum, bulk=1) + 5 * MS
    for host, path in http:
        t = http_get(cap, t, client, server, host, path, user_agent=UPDATER_UA) + 5 * MS
    return t


def ethernet_wrap(tags=()):
    return lambda packet, src, dst: ethernet(packet, src, dst, tags)


def simple_capture(seed: str, wrap=None, **fields) -> Capture:
    return Capture(wrap or ethernet_wrap(), random.Random(seed), **fields)


def sample_vlan_qinq():
    cap = simple_capture("vlan_qinq", ethernet_wrap(((ETH_8021AD, 100), (ETH_8021Q, 20))))
    t = basic_traffic(cap, T0_NS, dns=("s01.upd.kaspersky.com",), tls=(b"s01.upd.kaspersky.com",))
    cap.wrap = ethernet_wrap(((ETH_8021AD, 100), (ETH_8021Q, 200), (ETH_8021Q, 30)))
    basic_traffic(cap, t + 10**9, dns=("dc1.ksn.kaspersky-labs.com",),
                  tls=(b"dc1.ksn.kaspersky-labs.com",),
                  http=((b"dnl-02.geo.kaspersky.com", b"/index/u0607g.xml"),))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_multi_if():
    ether = simple_capture("multi_if-eth")
    basic_traffic(ether, T0_NS, dns=("s02.upd.kaspersky.com",), tls=(b"s02.upd.kaspersky.com",))
    cooked = simple_capture("multi_if-sll", linux_sll)
    basic_traffic(cooked, T0_NS + 137 * MS + 123, client="10.20.0.5", resolver="10.20.0.53",
                  dns=("ksn-info-geo.kaspersky-labs.com",),
                  http=((b"dnl-05.geo.kaspersky.com", b"/index/u0607g.xml"),))
    records = sorted([(ts, data, 0) for ts, data in ether.frames]
                     + [(ts, data, 1) for ts, data in cooked.frames], key=lambda r: r[0])
    data = pcapng_file(((LINKTYPE_ETHERNET, 6, b"eth1"), (LINKTYPE_LINUX_SLL, 9, b"any")), records)
    return data, ether.names + [n for n in cooked.names if n not in ether.names]


def sample_linux_sll():
    cap = simple_capture("linux_sll", linux_sll)
    basic_traffic(cap, T0_NS, dns=("s03.upd.kaspersky.com", "ksn-info-geo.kaspersky-labs.com"),
                  tls=(b"ksn-info-geo.kaspersky-labs.com",))
    return pcap_file(LINKTYPE_LINUX_SLL, cap.ordered()), cap.names


def sample_linux_sll2():
    cap = simple_capture("linux_sll2", linux_sll2)
    basic_traffic(cap, T0_NS, dns=("s04.upd.kaspersky.com",),
                  tls=(b"dc1-file.ksn.kaspersky-labs.com",),
                  http=((b"dnl-04.geo.kaspersky.com", b"/bases/av/kdb/i386/dailyc.kdc"),))
    return pcap_file(LINKTYPE_LINUX_SLL2, cap.ordered()), cap.names


def sample_raw_ip():
    cap = simple_capture("raw_ip", raw_ip)
    t = basic_traffic(cap, T0_NS, dns=("s17.upd.kaspersky.com",), tls=(b"s17.upd.kaspersky.com",))
    basic_traffic(cap, t, client="fd00:20::17", resolver="fd00:20::53", server="2001:db8:40::70",
                  dns=("dc1-pp.ksn.kaspersky-labs.com",), tls=(b"dc1-pp.ksn.kaspersky-labs.com",))
    return pcap_file(LINKTYPE_RAW, cap.ordered()), cap.names


def sample_raw_ipv6():
    cap = simple_capture("raw_ipv6", raw_ip)
    basic_traffic(cap, T0_NS, client="fd00:20::18", resolver="fd00:20::53", server="2001:db8:40::71",
                  dns=("mdr.ksn.kaspersky-labs.com",), tls=(b"mdr.ksn.kaspersky-labs.com",))
    return pcap_file(LINKTYPE_IPV6, cap.ordered()), cap.names


def sample_bsd_loopback():
    cap = simple_capture("bsd_loopback", bsd_loopback)
    t = basic_traffic(cap, T0_NS, client="127.0.0.1", resolver="127.0.0.53", server="127.0.0.1",
                      dns=("s16.upd.kaspersky.com",))
    basic_traffic(cap, t, client="::1", resolver="::1", server="::1",
                  tls=(b"s16.upd.kaspersky.com",))
    return pcap_file(LINKTYPE_NULL, cap.ordered()), cap.names


def sample_dns_compression():
    cap = simple_capture("dns_compression")
    rng = cap.rng
    t = T0_NS
    qname = labels("s09.upd.kaspersky.com")
    chain, owner = [], qname
    for depth in range(1, 11):
        target = (b"c%d" % depth,) + owner
        chain.append((owner, TYPE_CNAME, 60, target))
        owner = target
    chain.append((owner, TYPE_A, 60, "203.0.113.79"))
    questions = [(labels("ksn-url-geo.kaspersky-labs.com"), TYPE_A),
                 (labels("ksn-file-geo.kaspersky-labs.com"), TYPE_A)]
    exchanges = (
        ([(qname, TYPE_A)], chain, True),
        (questions, answer_chain("ksn-url-geo.kaspersky-labs.com",
                                 ("ksn-geo.kaspersky-labs.com", "ksn.kaspersky-cdn.example.net"),
                                 "203.0.113.81"), True),
        ([(labels("activation-v2.kaspersky.com"), TYPE_A)],
         answer_chain("activation-v2.kaspersky.com", ("activation-v2.geo.kaspersky.com",),
                      "203.0.113.73"), False),
    )
    for questions_, answers, compress in exchanges:
        txid, sport = rng.getrandbits(16), ephemeral_port(rng)
        cap.emit(t, CLIENT, LAN_RESOLVER, UDP(sport=sport, dport=53)
                 / Raw(dns_message(txid, questions_, compress=compress)))
        t += 3 * MS
        cap.emit(t, LAN_RESOLVER, CLIENT, UDP(sport=53, dport=sport)
                 / Raw(dns_message(txid, questions_, answers, response=True, compress=compress)))
        t += 50 * MS
        for name_labels, _ in questions_:
            cap.note("dns", presentation(name_labels))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def answer_hello_and_close(session: TcpSession, sni: bytes) -> int:
    """After a ClientHello naming ``sni``: the server's flight, the client's ack, teardown,
    and the SNI noted; returns the time the connection ended."""
    session.reply_delay()
    session.send(False, server_flight(session.cap.rng))
    session.ack(True)
    session.close()
    session.cap.note("tls_sni", presentation(text_labels(sni)))
    return session.t


def sample_tls_ooo():
    cap = simple_capture("tls_ooo")
    rng = cap.rng
    t = T0_NS
    for sni, order, retransmit in ((b"s11.upd.kaspersky.com", (0, 2, 1), (2,)),
                                   (b"ksn-url-geo.kaspersky-labs.com", (2, 1, 0), (0,))):
        session = TcpSession(cap, t, CLIENT, KASPERSKY_SERVER, ephemeral_port(rng), 443)
        session.handshake()
        hello = client_hello(rng, sni, post_quantum=True, sni_last=True)
        session.send(True, hello, splits=(600, 1300), order=order, retransmit=retransmit)
        t = answer_hello_and_close(session, sni) + 10**9
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_tcp_fast_open():
    """Fast Open SYNs carrying a whole ClientHello, the first 900 bytes of a post-quantum one
    (the rest, with the SNI, in the next segment) and an HTTP request."""
    cap = simple_capture("tcp_fast_open")
    rng = cap.rng
    t = T0_NS
    for sni, post_quantum in ((b"s03.upd.kaspersky.com", False),
                              (b"dc1.ksn.kaspersky-labs.com", True)):
        session = TcpSession(cap, t, CLIENT, KASPERSKY_SERVER, ephemeral_port(rng), 443)
        hello = client_hello(rng, sni, post_quantum=post_quantum, sni_last=post_quantum)
        first = 900 if post_quantum else len(hello)
        session.fast_open(hello[:first])
        if first < len(hello):
            session.send(True, hello[first:])
        else:
            session.ack(True)
        t = answer_hello_and_close(session, sni) + 10**9
    session = TcpSession(cap, t, CLIENT, KASPERSKY_SERVER, ephemeral_port(rng), 80)
    host = b"dnl-09.geo.kaspersky.com"
    session.fast_open(b"GET /index/u0607g.xml HTTP/1.1\r\nHost: " + host + b"\r\nUser-Agent: "
                      + BROWSER_UA + b"\r\nAccept: */*\r\n\r\n")
    session.ack(True)
    session.reply_delay()
    session.send(False, b"HTTP/1.1 304 Not Modified\r\n\r\n")
    session.ack(True)
    session.close()
    cap.note("http_host", presentation(text_labels(host)))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_ipv6():
    cap = simple_capture("ipv6", ipv6_extensions=True)
    basic_traffic(cap, T0_NS, client="fd00:10::21", resolver="fd00:10::53", server="2001:db8:40::72",
                  dns=("s10.upd.kaspersky.com", "dc1-cert.ksn.kaspersky-labs.com"),
                  tls=(b"s10.upd.kaspersky.com",),
                  http=((b"dnl-10.geo.kaspersky.com", b"/index/u0607g.xml"),))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_registered_ports():
    cap = simple_capture("registered_ports")
    t = T0_NS
    for sni, client_port, port in ((b"s12.upd.kaspersky.com", 2000, 8443),
                                   (b"dc3.ksn.kaspersky-labs.com", 12000, 13443),
                                   (b"dnl-12.geo.kaspersky.com", 51000, 8443)):
        t = tls_session(cap, t, "10.10.4.22", KASPERSKY_SERVER, sni, port=port,
                        post_quantum=True, bulk=3, client_port=client_port) + 5 * MS
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_ip_options():
    cap = simple_capture("ip_options", ipv4_options=True)
    basic_traffic(cap, T0_NS, client="10.10.4.21", dns=("s11.upd.kaspersky.com",
                                                         "dc2.ksn.kaspersky-labs.com"),
                  tls=(b"s11.upd.kaspersky.com", b"dc2.ksn.kaspersky-labs.com"),
                  http=((b"dnl-11.geo.kaspersky.com", b"/index/u0607g.xml"),))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


LOOKALIKES = ("notkaspersky.com", "kaspersky.com.evil.example", "kaspersky-com.example",
              "kaspersky.co", "xkaspersky.com", "s07.upd.kaspersky.com.evil.example",
              "upd-kaspersky.com")


def sample_lookalikes():
    cap = simple_capture("lookalikes")
    basic_traffic(cap, T0_NS, server="198.51.100.66", dns=LOOKALIKES,
                  tls=tuple(name.encode() for name in LOOKALIKES),
                  http=tuple((name.encode(), b"/index/u0607g.xml") for name in LOOKALIKES[:3]))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_case_trailing_dot():
    cap = simple_capture("case_trailing_dot")
    basic_traffic(cap, T0_NS, dns=("S07.UPD.KASPERSKY.COM.", "Dc1.KSN.Kaspersky-Labs.COM"),
                  tls=(b"S07.UPD.KASPERSKY.COM.",),
                  http=((b"DNL-01.Geo.Kaspersky.com.:80", b"/index/u0607g.xml"),))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


HOSTILE_LABELS = (b"new\nline", b"nul\0byte", b"pipe|bar", b"key=value", b"close]bracket",
                  b'quote"mark', b"<script>alert(1)</script>", b"dot.inside",
                  bytes(range(0x80, 0x8C)), b"caf\xc3\xa9", b"\xff\xfe", b"back\\slash",
                  b"space here")
HOSTILE_SNI = (b"new\nline.ksn.kaspersky-labs.com", b"<script>.ksn.kaspersky-labs.com",
               b"caf\xe9|x=1.ksn.kaspersky-labs.com", b"nul\0.s07.upd.kaspersky.com")
HOSTILE_HOSTS = (b'quote"<b>.ksn.kaspersky-labs.com', b"\x80\xff]=.dnl-01.geo.kaspersky.com:80")


def sample_hostile_names():
    cap = simple_capture("hostile_names")
    rng = cap.rng
    t = T0_NS
    for label in HOSTILE_LABELS:
        name = (label,) + labels("ksn.kaspersky-labs.com")
        txid, sport = rng.getrandbits(16), ephemeral_port(rng)
        cap.emit(t, CLIENT, LAN_RESOLVER, UDP(sport=sport, dport=53)
                 / Raw(dns_message(txid, [(name, TYPE_A)])))
        cap.emit(t + 2 * MS, LAN_RESOLVER, CLIENT, UDP(sport=53, dport=sport)
                 / Raw(dns_message(txid, [(name, TYPE_A)], [(name, TYPE_A, 60, KASPERSKY_SERVER)],
                                   response=True)))
        cap.note("dns", presentation(name))
        t += 20 * MS
    basic_traffic(cap, t, tls=HOSTILE_SNI,
                  http=tuple((host, b"/index/u0607g.xml") for host in HOSTILE_HOSTS))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def _udp_frame(cap: Capture, src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return ethernet(cap.ip_packet(src, dst, UDP(sport=sport, dport=dport) / Raw(payload)), src, dst)


def _tcp_frame(cap: Capture, src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    tcp = TCP(sport=sport, dport=dport, flags="PA", seq=1000, ack=2000, window=64240)
    return ethernet(cap.ip_packet(src, dst, tcp / Raw(payload)), src, dst)


def malformed_frames(cap: Capture) -> list[tuple[bytes, int | None]]:
    """(frame, orig_len) for each kind of damage a hostile or broken sender produces."""
    rng = cap.rng
    frames: list[tuple[bytes, int | None]] = []
    frames += [(rng.randbytes(rng.randint(1, 200)), None) for _ in range(12)]
    frames.append((mac_bytes(ROUTER_MAC) + b"\x02\x1a", None))
    valid = _udp_frame(cap, CLIENT, LAN_RESOLVER, 40000, 53,
                       dns_message(7, [(labels("s05.upd.kaspersky.com"), TYPE_A)]))
    frames.append((valid[:14 + 12], None))
    frames.append((valid[:60], len(valid)))
    bad_ihl_short = bytearray(valid)
    bad_ihl_short[14] = 0x43
    frames.append((bytes(bad_ihl_short), None))
    bad_ihl_long = bytearray(valid[:14 + 40])
    bad_ihl_long[14] = 0x4F
    frames.append((bytes(bad_ihl_long), None))
    total_length_lies = bytearray(valid)
    struct.pack_into("!H", total_length_lies, 16, 1400)
    frames.append((bytes(total_length_lies), None))
    wrong_version = bytearray(valid)
    wrong_version[14] = 0x75
    frames.append((bytes(wrong_version), None))
    tcp = bytearray(_tcp_frame(cap, CLIENT, KASPERSKY_SERVER, 40001, 443, b"\x16\x03\x01\x00\x05hello"))
    tcp[14 + 20 + 12] = 0xF0
    frames.append((bytes(tcp), None))
    header = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0)
    dns_bodies = (
        header + b"\x03abc\xc0\x0c" + b"\x00\x01\x00\x01",
        header + b"\x03abc\xc0\x13" + b"\x00\x01\x00\x01" + b"\x03def\xc0\x0c",
        header + b"\xc0\x20" + b"\x00\x01\x00\x01" + b"\x00" * 12 + b"\x03ksn\x00",
        header + b"\x3fshort",
        header + b"\x03abc\x80def\x00\x00\x01\x00\x01",
        header[:7],
        struct.pack("!HHHHHH", 10, 0x8180, 1, 60000, 0, 0) + b"\x03abc\x00\x00\x01\x00\x01",
        header + b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00\x00\x01\x00\x01",
    )
    for body in dns_bodies:
        frames.append((_udp_frame(cap, CLIENT, LAN_RESOLVER, 40002, 53, body), None))
    hello = bytearray(client_hello(rng, b"s06.upd.kaspersky.com", post_quantum=False))
    lying = (
        (3, 0xFFFF),                      # record length beyond the segment
        (6, 0xFFFF),                      # handshake length beyond the record
        (43, 0xFF20),                     # session id length 0xFF
        (9 + 2 + 32 + 1 + 32, 0xEEEE),    # cipher suites length
    )
    for offset, value in lying:
        broken = bytearray(hello)
        struct.pack_into("!H", broken, offset, value)
        frames.append((_tcp_frame(cap, CLIENT, KASPERSKY_SERVER, 40003 + offset, 443, bytes(broken)), None))
    sni_at = bytes(hello).find(b"s06.upd")
    broken = bytearray(hello)
    struct.pack_into("!H", broken, sni_at - 2, 0x7FFF)
    frames.append((_tcp_frame(cap, CLIENT, KASPERSKY_SERVER, 40100, 443, bytes(broken)), None))
    frames.append((_tcp_frame(cap, CLIENT, KASPERSKY_SERVER, 40101, 443, bytes(hello[:70])), None))
    frames.append((_tcp_frame(cap, CLIENT, KASPERSKY_SERVER, 40102, 80,
                              b"GET / HTTP/1.1\r\nHost: \r\nHost: " + b"x" * 300), None))
    frames.append((_udp_frame(cap, CLIENT, "198.51.100.14", 40103, 443,
                              b"\xc3\x00\x00\x00\x01\xff" + rng.randbytes(40)), None))
    return frames


def sample_garbage():
    cap = simple_capture("garbage")
    t = T0_NS
    damaged = malformed_frames(cap)
    for index, (frame, orig_len) in enumerate(damaged):
        cap.emit_frame(t, frame, orig_len)
        t += 7 * MS
        if index == len(damaged) // 2:
            t = basic_traffic(cap, t, dns=("s05.upd.kaspersky.com",))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_nanosecond_be():
    cap = simple_capture("nanosecond_be")
    basic_traffic(cap, T0_NS + 123_456_789, dns=("s13.upd.kaspersky.com",),
                  tls=(b"ppt-issuer.ksn.kaspersky-labs.com",))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered(), nanosecond=True, big_endian=True), cap.names


def sample_truncated():
    cap = simple_capture("truncated")
    t = basic_traffic(cap, T0_NS, dns=("s14.upd.kaspersky.com",), tls=(b"cm.k.kaspersky-labs.com",))
    names = list(cap.names)
    last = _udp_frame(cap, CLIENT, LAN_RESOLVER, 40200, 53,
                      dns_message(11, [(labels("s15.upd.kaspersky.com"), TYPE_A)]))
    data = pcap_file(LINKTYPE_ETHERNET, cap.ordered() + [(t + MS, last)])
    return data[: len(data) - len(last) // 2], names


# --------------------------------------------------------------------------- tunnels

OUTER_SWITCH, OUTER_SENSOR = "192.168.200.1", "192.168.200.10"
VTEP_A, VTEP_B = "192.168.210.1", "192.168.210.2"


def tunnel_capture(seed: str, encapsulate) -> Capture:
    """Inner Ethernet frames (as the mirrored port saw them) carried by ``encapsulate``,
    which returns the outer IP packet; the outer frame is plain Ethernet."""
    cap = simple_capture(seed)

    def wrap(packet: bytes, src: str, dst: str) -> bytes:
        outer = encapsulate(cap, ethernet(packet, src, dst))
        return ethernet(outer, OUTER_SWITCH, OUTER_SENSOR)

    cap.wrap = wrap
    return cap


def _gre(flags: int, protocol: int, fields: bytes, payload: bytes) -> bytes:
    return struct.pack("!HH", flags, protocol) + fields + payload


def erspan2(cap: Capture, frame: bytes) -> bytes:
    seq = cap.next_ident()
    header = struct.pack("!HHI", (1 << 12) | 10, (0 << 13) | (3 << 11) | 7, 0)
    gre = _gre(0x1000, GRE_ERSPAN_2, struct.pack("!I", seq), header + frame)
    return outer_ipv4(OUTER_SWITCH, OUTER_SENSOR, 47, gre, seq)


def erspan3(cap: Capture, frame: bytes) -> bytes:
    seq = cap.next_ident()
    header = struct.pack("!HHIHH", (2 << 12) | 10, 9, seq * 1000, 0, 1 << 15)
    gre = _gre(0x1000, GRE_ERSPAN_3, struct.pack("!I", seq), header + frame)
    return outer_ipv4(OUTER_SWITCH, OUTER_SENSOR, 47, gre, seq)


def _flow_port(frame: bytes) -> int:
    """The outer UDP source port a VTEP gives the inner frame's flow (RFC 7348 and RFC 8926
    ask for a hash of the inner headers): the same for every packet of one direction of a
    flow, so that a switch's ECMP, and a sensor's fanout by flow, keep the flow together."""
    if frame[12:14] == b"\x08\x00":
        flow = frame[23:24] + frame[26:38]
    elif frame[12:14] == b"\x86\xdd":
        flow = frame[20:21] + frame[22:58]
    else:
        flow = frame[:14]
    return 49152 + zlib.crc32(flow) % 16000


def vxlan(cap: Capture, frame: bytes) -> bytes:
    sport = _flow_port(frame)
    return outer_udp(VTEP_A, VTEP_B, sport, 4789, struct.pack("!BBHI", 0x08, 0, 0, 4242 << 8) + frame,
                     cap.next_ident())


def geneve(cap: Capture, frame: bytes) -> bytes:
    sport = _flow_port(frame)
    option = struct.pack("!HBB", 0x0103, 0x01, 1) + b"\x00\x00\x00\x2a"
    header = struct.pack("!BBHI", len(option) // 4, 0, ETH_TEB, 77 << 8) + option
    return outer_udp(VTEP_A, VTEP_B, sport, 6081, header + frame, cap.next_ident())


def gre_ip(cap: Capture, packet: bytes) -> bytes:
    """GRE with checksum, key and sequence present, carrying the bare IP packet."""
    seq = cap.next_ident()
    flags, key = 0xB000, 0x0000_1F40
    unsummed = _gre(flags, ETH_IPV4, struct.pack("!HHII", 0, 0, key, seq), packet)
    checksum = _ones_complement(unsummed)
    return outer_ipv4(OUTER_SWITCH, OUTER_SENSOR, 47,
                      _gre(flags, ETH_IPV4, struct.pack("!HHII", checksum, 0, key, seq), packet), seq)


def sample_tunnel(seed: str, encapsulate, names):
    cap = tunnel_capture(seed, encapsulate)
    dns_name, tls_name = names
    basic_traffic(cap, T0_NS, dns=(dns_name,), tls=(tls_name.encode(),),
                  http=((b"dnl-07.geo.kaspersky.com", b"/index/u0607g.xml"),))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_gre():
    cap = simple_capture("gre")
    cap.wrap = lambda packet, src, dst: ethernet(gre_ip(cap, packet), OUTER_SWITCH, OUTER_SENSOR)
    basic_traffic(cap, T0_NS, dns=("ksn-verdict-geo.kaspersky-labs.com",),
                  tls=(b"ksn-verdict-geo.kaspersky-labs.com",))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def mpls_wrap(packet: bytes, src: str, dst: str) -> bytes:
    stack = struct.pack("!II", (16004 << 12) | 64, (24001 << 12) | (1 << 8) | 64)
    return ethernet(stack + packet, src, dst, ethertype=ETH_MPLS)


def pppoe_wrap(packet: bytes, src: str, dst: str) -> bytes:
    protocol = 0x0057 if packet[0] >> 4 == 6 else 0x0021
    ppp = struct.pack("!H", protocol) + packet
    return ethernet(struct.pack("!BBHH", 0x11, 0, 0x1A2B, len(ppp)) + ppp, src, dst,
                    ethertype=ETH_PPPOE_SESSION)


def sample_mpls():
    cap = simple_capture("mpls", mpls_wrap)
    basic_traffic(cap, T0_NS, dns=("s12.upd.kaspersky.com",), tls=(b"s12.upd.kaspersky.com",))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_pppoe():
    cap = simple_capture("pppoe", pppoe_wrap)
    basic_traffic(cap, T0_NS, dns=("s18.upd.kaspersky.com",),
                  tls=(b"activation-v2.kaspersky.com",),
                  http=((b"dnl-08.geo.kaspersky.com", b"/index/u0607g.xml"),))
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


# --------------------------------------------------------------------------- reassembly

def big_dns_response(name: str, count: int, ipv6=False) -> bytes:
    answers = [(labels(name), TYPE_AAAA if ipv6 else TYPE_A, 300,
                f"2001:db8:77::{i + 1:x}" if ipv6 else f"203.0.113.{i + 1}") for i in range(count)]
    return dns_message(0x4D2, [(labels(name), TYPE_AAAA if ipv6 else TYPE_A)], answers, response=True)


def fragment_bounds(length: int, size: int, first: int) -> list[tuple[int, int]]:
    """(start, end) of each fragment: a ``first`` fragment (a multiple of 8, so small that it
    cuts the DNS question in two when the sample wants that), then ``size``-byte pieces."""
    bounds, start = [], 0
    while start < length:
        end = min(start + (first if not bounds else size), length)
        bounds.append((start, end))
        start = end
    return bounds


def ipv4_fragments(src: str, dst: str, datagram: bytes, ident: int, *, size=512, first=512,
                   overlap=0) -> list[bytes]:
    """IPv4 fragments of ``datagram`` (a whole UDP datagram); ``overlap`` bytes of each
    later fragment repeat the end of the previous one, with identical content."""
    packets = []
    for start, end in fragment_bounds(len(datagram), size, first):
        start = max(start - overlap, 0)
        packets.append(bytes(IP(src=src, dst=dst, id=ident, proto=17, ttl=60,
                                flags="MF" if end < len(datagram) else 0, frag=start // 8)
                             / Raw(datagram[start:end])))
    return packets


def ipv6_fragments(src: str, dst: str, datagram: bytes, ident: int, *, size=504,
                   first=504) -> list[bytes]:
    packets = []
    for start, end in fragment_bounds(len(datagram), size, first):
        packets.append(bytes(IPv6(src=src, dst=dst, hlim=60)
                             / IPv6ExtHdrFragment(nh=17, offset=start // 8, m=int(end < len(datagram)),
                                                  id=ident)
                             / Raw(datagram[start:end])))
    return packets


def sample_ip_fragments():
    cap = simple_capture("ip_fragments")
    t = T0_NS
    resolver_v6, client_v6 = "fd00:10::53", "fd00:10::21"

    def udp_datagram(src, dst, payload):
        header = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
        return bytes((header / UDP(sport=53, dport=41000) / Raw(payload))[UDP])

    sets = (  # name, from, to, first fragment size, overlap, never completes, reversed
        ("ksn-url-geo.kaspersky-labs.com", LAN_RESOLVER, CLIENT, 32, 0, False, False),
        ("ksn-file-geo.kaspersky-labs.com", LAN_RESOLVER, CLIENT, 512, 24, False, True),
        ("ksn-cinfo-geo.kaspersky-labs.com", resolver_v6, client_v6, 32, 0, False, False),
        ("s19.upd.kaspersky.com", LAN_RESOLVER, CLIENT, 512, 0, True, False),
    )
    for ident, (name, src, dst, first, overlap, incomplete, reverse) in enumerate(sets, start=0x2201):
        ipv6 = ":" in src
        datagram = udp_datagram(src, dst, big_dns_response(name, 40, ipv6))
        packets = (ipv6_fragments(src, dst, datagram, ident, first=first) if ipv6
                   else ipv4_fragments(src, dst, datagram, ident, first=first, overlap=overlap))
        if incomplete:
            packets = packets[:1]
        if reverse:
            packets = packets[::-1]
        for packet in packets:
            cap.emit_ip(t, packet, src, dst)
            t += 150 * US
        if not incomplete:
            cap.note("dns", name)
        t += 200 * MS
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_dns_tcp():
    cap = simple_capture("dns_tcp")
    rng = cap.rng
    session = TcpSession(cap, T0_NS, CLIENT, LAN_RESOLVER, ephemeral_port(rng), 53)
    session.handshake()

    def framed(message: bytes) -> bytes:
        return struct.pack("!H", len(message)) + message

    def query(txid, name):
        cap.note("dns", name)
        return dns_message(txid, [(labels(name), TYPE_A)])

    def reply(txid, name, chain=()):
        return dns_message(txid, [(labels(name), TYPE_A)], answer_chain(name, chain, KASPERSKY_SERVER),
                           response=True)

    session.send(True, framed(query(1, "s08.upd.kaspersky.com"))
                 + framed(query(2, "dc1-st.ksn.kaspersky-labs.com")))
    session.reply_delay()
    first = framed(reply(1, "s08.upd.kaspersky.com", ("upd.kaspersky-cdn.example.net",)))
    session.send(False, first + framed(reply(2, "dc1-st.ksn.kaspersky-labs.com")),
                 splits=(len(first) // 2,))
    session.ack(True)
    third = framed(query(3, "crl.kaspersky.com"))
    session.send(True, third, splits=(9,), order=(1, 0))
    session.reply_delay()
    session.send(False, framed(reply(3, "crl.kaspersky.com")))
    session.ack(True)
    session.close()
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


def sample_duplicates():
    cap = simple_capture("duplicates")
    basic_traffic(cap, T0_NS, dns=("s06.upd.kaspersky.com",), tls=(b"dc1.ksn.kaspersky-labs.com",),
                  http=((b"dnl-06.geo.kaspersky.com", b"/index/u0607g.xml"),))
    doubled = []
    for ts, frame in cap.ordered():
        doubled += [(ts, frame), (ts + 3 * US, frame)]
    return pcap_file(LINKTYPE_ETHERNET, doubled), cap.names


# --------------------------------------------------------------------------- registry and CLI

def sample_demo():
    cap = build_demo()
    return pcap_file(LINKTYPE_ETHERNET, cap.ordered()), cap.names


@dataclass(frozen=True)
class Sample:
    filename: str
    description: str
    build: Callable[[], tuple[bytes, list]]
    exact: bool = True  # tshark and the sensor should report the same name set


SAMPLES = (
    Sample("demo.pcap", "10 minutes of an office LAN: resolver 10.10.0.53 forwarding to "
           "203.0.113.53, DHCP with options 12/81, 12 ordinary workstations (DNS, TLS 1.3 with "
           "post-quantum ClientHellos over several segments, HTTP, NTP, QUIC 1-RTT noise), 3 Kaspersky "
           "workstations (10.10.2.31-33, .33 on VLAN 20) with KSC traffic to 10.10.0.20 on TCP "
           "13000/14000 and UDP 15000, a browse-only host 10.10.1.40 and 10.10.3.50 asking 223.6.6.6 "
           "directly", sample_demo),
    Sample("vlan_qinq.pcap", "802.1ad+802.1Q double tags, then triple tags", sample_vlan_qinq),
    Sample("multi_if.pcapng", "pcapng with an Ethernet interface (if_tsresol 6) and a Linux SLL "
           "interface (if_tsresol 9)", sample_multi_if),
    Sample("linux_sll.pcap", "Linux cooked capture v1 (linktype 113)", sample_linux_sll),
    Sample("linux_sll2.pcap", "Linux cooked capture v2 (linktype 276)", sample_linux_sll2),
    Sample("raw_ip.pcap", "raw IP (linktype 101), IPv4 and IPv6 mixed", sample_raw_ip),
    Sample("raw_ipv6.pcap", "raw IPv6 (linktype 229)", sample_raw_ipv6),
    Sample("bsd_loopback.pcap", "BSD loopback / DLT_NULL (linktype 0), IPv4 and IPv6",
           sample_bsd_loopback),
    Sample("dns_compression.pcap", "DNS answers with a 10-deep compression pointer chain and "
           "CNAME chains, two questions in one message, one uncompressed response",
           sample_dns_compression),
    Sample("tls_ooo.pcap", "ClientHellos in three TCP segments delivered out of order with one "
           "segment retransmitted, SNI in the last segment", sample_tls_ooo),
    Sample("tcp_fast_open.pcap", "TCP Fast Open: SYNs with a cookie carrying a whole "
           "ClientHello, the first 900 bytes of a post-quantum one (SNI in the next segment) and "
           "an HTTP request", sample_tcp_fast_open),
    Sample("ipv6.pcap", "IPv6 with hop-by-hop and destination-options headers: DNS AAAA, TLS, HTTP",
           sample_ipv6),
    Sample("registered_ports.pcap", "TLS with post-quantum ClientHellos over several segments "
           "to servers on 8443 and 13443 from client ports below them (2000, 12000), and from "
           "an ephemeral one (51000)", sample_registered_ports),
    Sample("ip_options.pcap", "IPv4 with options (Router Alert and NOP padding, IHL 7): DNS, "
           "TLS with post-quantum ClientHellos over several segments, HTTP", sample_ip_options),
    Sample("lookalikes.pcap", "DNS, TLS and HTTP for names that only look like Kaspersky ("
           + ", ".join(LOOKALIKES) + "): none must match", sample_lookalikes),
    Sample("case_trailing_dot.pcap", "upper/mixed case DNS names, SNI with a trailing dot, "
           "Host: DNL-01.Geo.Kaspersky.com.:80", sample_case_trailing_dot),
    Sample("hostile_names.pcap", "DNS labels with newline, NUL, | = ] \" <script>, a dot inside "
           "a label, bytes 0x80-0xff, backslash and space under ksn.kaspersky-labs.com; SNI and "
           "Host with such bytes", sample_hostile_names, exact=False),
    Sample("garbage.pcap", "random frames, truncated headers, bad IHL/version/total length, TCP "
           "data offset beyond the packet, DNS pointer loops and forward pointers, ClientHellos "
           "with lying lengths, snaplen-cut frames; one valid query in the middle",
           sample_garbage, exact=False),
    Sample("nanosecond_be.pcap", "classic pcap, big-endian, nanosecond magic", sample_nanosecond_be),
    Sample("truncated.pcap", "last record cut in half (its s15.upd.kaspersky.com query is lost)",
           sample_truncated),
    Sample("erspan2.pcap", "ERSPAN type II (GRE 0x88BE) mirror session",
           lambda: sample_tunnel("erspan2", erspan2, ("s20.upd.kaspersky.com",
                                                      "dc1.ksn.kaspersky-labs.com"))),
    Sample("erspan3.pcap", "ERSPAN type III (GRE 0x22EB) mirror session",
           lambda: sample_tunnel("erspan3", erspan3, ("p03.upd.kaspersky.com",
                                                      "ksn-tcert-geo.kaspersky-labs.com"))),
    Sample("vxlan.pcap", "VXLAN (UDP 4789, VNI 4242)",
           lambda: sample_tunnel("vxlan", vxlan, ("s02.upd2.kaspersky.com",
                                                  "activation-v2.kaspersky.com"))),
    Sample("geneve.pcap", "Geneve (UDP 6081, VNI 77, one option)",
           lambda: sample_tunnel("geneve", geneve, ("ds.kaspersky.com",
                                                    "ksn-kas-geo.kaspersky-labs.com"))),
    Sample("gre.pcap", "GRE with checksum, key and sequence carrying IPv4", sample_gre),
    Sample("mpls.pcap", "two-label MPLS stack over Ethernet", sample_mpls),
    Sample("pppoe.pcap", "PPPoE session (0x8864) with PPP IPv4", sample_pppoe),
    Sample("ip_fragments.pcap", "fragmented DNS responses: IPv4 and IPv6 (fragment header) with "
           "a 32-byte first fragment that cuts the question name, IPv4 with overlapping "
           "fragments in reverse order, and a set that never completes "
           "(its s19.upd.kaspersky.com is never visible)", sample_ip_fragments),
    Sample("dns_tcp.pcap", "DNS over TCP: two length-prefixed queries in one segment, a response "
           "split across segments, a query whose two segments arrive out of order", sample_dns_tcp),
    Sample("duplicates.pcap", "span duplicates: every frame twice, 3 microseconds apart",
           sample_duplicates),
)

KASPERSKY_DOMAINS = ("kaspersky.com", "kaspersky-labs.com")


def is_kaspersky_name(name: str) -> bool:
    return any(name == domain or name.endswith("." + domain) for domain in KASPERSKY_DOMAINS)


def readme(built: dict[str, tuple[bytes, list]]) -> str:
    lines = ["# Sample captures", "",
             "Generated by `python3 pcaps/make_samples.py` (deterministic; never edit by hand). "
             "One line per file: what it holds, and the Kaspersky names in it.", ""]
    for sample in SAMPLES:
        names = []
        for _, name in built[sample.filename][1]:
            if is_kaspersky_name(name) and name not in names:
                names.append(name)
        listed = ", ".join(f"`{name}`" for name in names) if names else "none"
        lines.append(f"- `{sample.filename}`: {sample.description}. Kaspersky names: {listed}.")
    lines.append("- `quic_*.pcap`: QUIC Initial samples written by `make_quic_samples.py`; "
                 "see that script's docstring for what each holds.")
    return "\n".join(lines) + "\n"


def build_all() -> dict[str, tuple[bytes, list]]:
    """filename -> (file bytes, [(kind, name)] the traffic is built to expose)."""
    return {sample.filename: sample.build() for sample in SAMPLES}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the sample captures (deterministic).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory to write to (default: the folder of this script)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    built = build_all()
    for filename, (data, _) in built.items():
        (args.out / filename).write_bytes(data)
    (args.out / "README.md").write_text(readme(built))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_quic_samples

    make_quic_samples.main(["--out", str(args.out)])
    total = sum(len(data) for data, _ in built.values())
    print(f"wrote {len(built)} captures ({total} bytes) and README.md to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
