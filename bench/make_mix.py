#!/usr/bin/env python3
"""Writes a deterministic span-port mix for the benchmark (bench/run.py).

    python3 bench/make_mix.py [--packets 1000000] [--out bench/out/mix.pcap]

What a mirror port of an office uplink carries, in proportion: long TLS downloads (server
data, client ACKs) and some uploads, HTTP, QUIC (Initials, then 1-RTT both ways), RTP
calls, ~3% DNS, ClientHellos of which a share are post-quantum and span two segments,
30% of flows VLAN-tagged, 13% IPv6, and ~1% of the names looked up or sent as SNI/Host
belong to Kaspersky.  Frames are built from scapy header templates made once; per packet
only struct patches the addresses, ports, lengths and sequence numbers.

Payloads are framed as on the wire, because a dissector's cost depends on it: a TLS
session has the server's TLS 1.3 flight (ServerHello, ChangeCipherSpec, encrypted
records), the client's Finished and request, then full-size application-data records
(16 KiB + tag) cut at the MSS; an HTTP download starts with a response header whose
Content-Length covers the body.  (Random bytes on port 443, as this generator wrote
before, are dropped by tshark's TLS dissector after one look, which made tshark 70x
tcpdump here, against 117x on the span mix the issue measured.)
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
from pathlib import Path

import classic_pcap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pcaps"))
sys.path.insert(0, str(ROOT))

SEED = 20240606
# Bumped whenever the mix changes; bench/run.py rewrites a default mix of another version.
GENERATOR = 3
BASE_TS = 1_718_000_000
MSS = 1448
TLS_RECORD_BODY = 16384 + 17  # a full TLS 1.3 application-data record: plaintext, type, AEAD tag
MAX_BULK_SEGMENTS = 400
CONCURRENT_FLOWS = 400
DNS_SHARE = 0.015  # lookups per packet; each is two packets, so ~3% of packets
KASPERSKY_SHARE = 0.01

KASPERSKY_NAMES = ("s07.upd.kaspersky.com", "dc1.ksn.kaspersky-labs.com",
                   "dnl-03.geo.kaspersky.com", "activation-v2.kaspersky.com",
                   "ksn-url-geo.kaspersky-labs.com", "s12.upd.kaspersky.com")
COMMON_NAMES = tuple(f"{svc}.{dom}" for dom in (
    "example.com", "example.net", "example.org", "cdn.example", "office.example",
    "video.example", "news.example", "shop.example", "mail.example", "cloud.example")
    for svc in ("www", "api", "static", "img", "login", "cdn1", "cdn2", "edge", "update", "media"))

_SEQ_ACK_FLAGS = struct.Struct("!IIBB")
_U16 = struct.Struct("!H")

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class Template:
    """Ethernet[/802.1Q]/IPv4|IPv6/TCP|UDP headers from scapy, with the offsets to patch."""

    def __init__(self, ipv6: bool, vlan: bool, tcp: bool):
        from scapy.layers.inet import IP, TCP, UDP
        from scapy.layers.inet6 import IPv6
        from scapy.layers.l2 import Dot1Q, Ether

        frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        if vlan:
            frame = frame / Dot1Q(vlan=20)
        frame = frame / (IPv6(hlim=64) if ipv6 else IP(ttl=64, id=1))
        frame = frame / (TCP(window=64240, flags="A") if tcp else UDP())
        self.header = bytearray(bytes(frame))
        self.ip = 18 if vlan else 14
        self.ipv6 = ipv6
        self.tcp = tcp
        self.l4 = self.ip + (40 if ipv6 else 20)
        self.addr_len = 16 if ipv6 else 4
        self.addr_off = self.ip + (8 if ipv6 else 12)

    def for_flow(self, src: bytes, dst: bytes, sport: int, dport: int) -> bytearray:
        header = bytearray(self.header)
        header[self.addr_off:self.addr_off + self.addr_len] = src
        header[self.addr_off + self.addr_len:self.addr_off + 2 * self.addr_len] = dst
        struct.pack_into("!HH", header, self.l4, sport, dport)
        return header

    def frame(self, header: bytearray, payload: bytes, seq: int = 0, ack: int = 0,
              flags: int = ACK) -> bytes:
        packet = header + payload
        l4_len = len(packet) - self.l4
        if self.ipv6:
            _U16.pack_into(packet, self.ip + 4, l4_len)
        else:
            _U16.pack_into(packet, self.ip + 2, l4_len + 20)
        if self.tcp:
            _SEQ_ACK_FLAGS.pack_into(packet, self.l4 + 4, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags)
        else:
            _U16.pack_into(packet, self.l4 + 4, l4_len)
        return bytes(packet)


class Mix:
    def __init__(self, rng: random.Random, max_bulk_segments: int = MAX_BULK_SEGMENTS,
                 kaspersky_share: float = KASPERSKY_SHARE):
        self.rng = rng
        self.max_bulk_segments = max_bulk_segments
        self.kaspersky_share = kaspersky_share
        self.templates = {(v6, vlan, tcp): Template(v6, vlan, tcp)
                          for v6 in (False, True) for vlan in (False, True) for tcp in (False, True)}
        self.hellos = self._hello_pool()
        self.server_flights, self.client_finishes, self.requests = self._tls_pools()
        record = b"\x17\x03\x03" + struct.pack("!H", TLS_RECORD_BODY) + rng.randbytes(TLS_RECORD_BODY)
        self.tls_bulk = record * (max_bulk_segments * MSS // len(record) + 1)
        self.http_body = rng.randbytes(MSS)
        self.quic_protect, self.quic_hellos = self._quic_pool()
        self.names_used: dict[str, int] = {}

    # -- pools built once --------------------------------------------------------------
    def _hello_pool(self) -> dict:
        from make_samples import client_hello

        pool = {}
        for name in COMMON_NAMES + KASPERSKY_NAMES:
            pool[name] = [client_hello(self.rng, name.encode(), post_quantum=pq) for pq in (False, True)]
        return pool

    def _tls_pools(self):
        """TLS 1.3 flights, each made once and reused: the server's (ServerHello,
        ChangeCipherSpec, encrypted extensions and certificate chain, then CertificateVerify
        and Finished, 2.5-5 KB as records), the client's ChangeCipherSpec and Finished, and
        its first request (an application-data record of a few hundred bytes)."""
        from make_samples import server_flight, tls_app_data

        rng = self.rng
        flights = [server_flight(rng) + tls_app_data(rng, rng.randint(300, 2500)) for _ in range(16)]
        finishes = [b"\x14\x03\x03\x00\x01\x01" + tls_app_data(rng, 53) for _ in range(4)]
        requests = [tls_app_data(rng, rng.randint(90, 600)) for _ in range(16)]
        return flights, finishes, requests

    def _quic_pool(self):
        """(protect, hellos): ``protect(dcid, frames)`` makes a client Initial, and
        ``hellos`` holds per name the CRYPTO frame of its ClientHello.  Each flow's Initial
        is protected under a connection ID of its own (quic_flow), as browsers draw one per
        connection, so the sensor derives Initial keys for every flow as it must on a span
        port."""
        from make_quic_samples import QUIC_V1, client_hello, client_initial, crypto_frame

        def protect(dcid: bytes, frames: bytes) -> bytes:
            return client_initial(QUIC_V1, dcid, b"", 0, frames)

        return protect, {name: crypto_frame(0, client_hello(name, "bench/" + name, post_quantum=False))
                         for name in COMMON_NAMES[:20] + KASPERSKY_NAMES}

    # -- addressing --------------------------------------------------------------------
    def pick_name(self, pool) -> str:
        if self.rng.random() < self.kaspersky_share:
            name = self.rng.choice(KASPERSKY_NAMES)
        else:
            name = self.rng.choice(pool)
        self.names_used[name] = self.names_used.get(name, 0) + 1
        return name

    def endpoints(self, ipv6: bool):
        rng = self.rng
        if ipv6:
            client = bytes.fromhex("fd000000000000010000000000") + rng.randbytes(3)
            server = bytes.fromhex("20010db8000000000000000000") + rng.randbytes(3)
        else:
            client = bytes((10, 1, rng.randrange(0, 32), rng.randrange(1, 255)))
            server = bytes((203, 0, 113, rng.randrange(1, 255))) if rng.random() < 0.5 else \
                bytes((198, 51, 100, rng.randrange(1, 255)))
        return client, server, rng.randrange(32768, 61000)

    def flow_shape(self):
        rng = self.rng
        ipv6 = rng.random() < 0.16
        vlan = rng.random() < 0.30
        return ipv6, vlan

    # -- flows (generators of frames) --------------------------------------------------
    def tcp_flow(self, kind: str):
        rng = self.rng
        ipv6, vlan = self.flow_shape()
        tpl = self.templates[(ipv6, vlan, True)]
        client, server, cport = self.endpoints(ipv6)
        sport = 80 if kind == "http" else 443
        c2s = tpl.for_flow(client, server, cport, sport)
        s2c = tpl.for_flow(server, client, sport, cport)
        cseq, sseq = rng.getrandbits(32), rng.getrandbits(32)
        yield tpl.frame(c2s, b"", cseq, 0, SYN)
        yield tpl.frame(s2c, b"", sseq, cseq + 1, SYN | ACK)
        cseq += 1
        sseq += 1
        yield tpl.frame(c2s, b"", cseq, sseq, ACK)
        if kind == "http":
            name = self.pick_name(COMMON_NAMES)
            request = (f"GET /files/{rng.randrange(1 << 20):x}.bin HTTP/1.1\r\nHost: {name}\r\n"
                       "User-Agent: Mozilla/5.0\r\nAccept: */*\r\n\r\n").encode()
            first = [request]
        else:
            name = self.pick_name(COMMON_NAMES)
            hello = self.hellos[name][rng.random() < 0.4]
            first = [hello[i:i + MSS] for i in range(0, len(hello), MSS)]
        for piece in first:
            yield tpl.frame(c2s, piece, cseq, sseq, ACK | PSH)
            cseq += len(piece)
        upload = kind == "upload"
        segments = (rng.randrange(20, self.max_bulk_segments) if kind != "http"
                    else rng.randrange(2, 60))
        if kind == "http":
            header = (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Length: {segments * MSS}\r\n\r\n").encode()
            body = header + self.http_body * segments
        else:
            flight = rng.choice(self.server_flights)
            sseq = yield from self._segments(tpl, s2c, c2s, flight, sseq, cseq, ACK | PSH)
            finish = rng.choice(self.client_finishes) + rng.choice(self.requests)
            yield tpl.frame(c2s, finish, cseq, sseq, ACK | PSH)
            cseq += len(finish)
            body = memoryview(self.tls_bulk)[:segments * MSS]
        sender, receiver = (c2s, s2c) if upload else (s2c, c2s)
        seq, peer = (cseq, sseq) if upload else (sseq, cseq)
        seq = yield from self._segments(tpl, sender, receiver, body, seq, peer, ACK)
        yield tpl.frame(c2s, b"", cseq if not upload else seq, sseq if not upload else peer, FIN | ACK)
        yield tpl.frame(s2c, b"", sseq if upload else seq, cseq + 1, FIN | ACK)
        yield tpl.frame(c2s, b"", cseq + 1, seq + 1, ACK)

    @staticmethod
    def _segments(tpl, sender, receiver, data, seq, peer, flags):
        """``data`` cut at the MSS, the receiver acking every second segment; returns the
        sender's next sequence number."""
        for n, at in enumerate(range(0, len(data), MSS)):
            piece = data[at:at + MSS]
            yield tpl.frame(sender, piece, seq, peer, flags)
            seq += len(piece)
            if n & 1:
                yield tpl.frame(receiver, b"", peer, seq, ACK)
        return seq

    def quic_flow(self):
        rng = self.rng
        ipv6, vlan = self.flow_shape()
        tpl = self.templates[(ipv6, vlan, False)]
        client, server, cport = self.endpoints(ipv6)
        c2s = tpl.for_flow(client, server, cport, 443)
        s2c = tpl.for_flow(server, client, 443, cport)
        name = self.pick_name(COMMON_NAMES[:20])
        yield tpl.frame(c2s, self.quic_protect(rng.randbytes(8), self.quic_hellos[name]))
        yield tpl.frame(s2c, b"\xc0\x00\x00\x00\x01" + rng.randbytes(1195))
        data = b"\x40" + rng.randbytes(1349)
        ack = b"\x40" + rng.randbytes(40)
        for n in range(rng.randrange(30, 300)):
            yield tpl.frame(s2c, data)
            if n % 3 == 2:
                yield tpl.frame(c2s, ack)

    def rtp_flow(self):
        rng = self.rng
        ipv6, vlan = self.flow_shape()
        tpl = self.templates[(ipv6, vlan, False)]
        client, server, cport = self.endpoints(ipv6)
        port = rng.randrange(16384, 32768) & ~1
        legs = (tpl.for_flow(client, server, port, port + 2), tpl.for_flow(server, client, port + 2, port))
        ssrc = rng.getrandbits(32)
        voice = rng.randbytes(160)
        for n in range(rng.randrange(100, 600)):
            yield tpl.frame(legs[n & 1], struct.pack("!BBHII", 0x80, 0, n & 0xFFFF, n * 160, ssrc) + voice)

    def dns_lookup(self):
        rng = self.rng
        ipv6, vlan = self.flow_shape()
        tpl = self.templates[(ipv6, vlan, False)]
        client, _, cport = self.endpoints(ipv6)
        resolver = bytes.fromhex("fd000000000000010000000000000035") if ipv6 else bytes((10, 1, 0, 53))
        name = self.pick_name(COMMON_NAMES)
        txid = rng.getrandbits(16)
        qname = b"".join(bytes((len(label),)) + label.encode() for label in name.split(".")) + b"\0"
        question = qname + struct.pack("!HH", 28 if ipv6 else 1, 1)
        query = struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + question
        if ipv6:
            answer = struct.pack("!HHHIH", 0xC00C, 28, 1, 300, 16) + bytes.fromhex("20010db8") + rng.randbytes(12)
        else:
            answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 300, 4) + bytes((203, 0, 113, rng.randrange(1, 255)))
        response = struct.pack("!HHHHHH", txid, 0x8180, 1, 1, 0, 0) + question + answer
        yield tpl.frame(tpl.for_flow(client, resolver, cport, 53), query)
        yield tpl.frame(tpl.for_flow(resolver, client, 53, cport), response)

    def new_flow(self):
        r = self.rng.random()
        if r < 0.55:
            return self.tcp_flow("download")
        if r < 0.65:
            return self.tcp_flow("upload")
        if r < 0.80:
            return self.tcp_flow("http")
        if r < 0.93:
            return self.quic_flow()
        return self.rtp_flow()


def write_mix(path: Path, packets: int, seed: int = SEED,
              max_bulk_segments: int = MAX_BULK_SEGMENTS, kaspersky_share: float = KASPERSKY_SHARE) -> dict:
    rng = random.Random(seed)
    mix = Mix(rng, max_bulk_segments, kaspersky_share)
    flows = [mix.new_flow() for _ in range(CONCURRENT_FLOWS)]
    pending: list[bytes] = []
    written = 0
    total_bytes = 0
    usec = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    record = classic_pcap.RECORD.pack
    with open(path, "wb") as out:
        out.write(classic_pcap.header())
        chunk: list[bytes] = []
        while written < packets:
            if pending:
                frame = pending.pop()
            elif rng.random() < DNS_SHARE:
                pending = list(mix.dns_lookup())[::-1]
                continue
            else:
                slot = rng.randrange(CONCURRENT_FLOWS)
                frame = next(flows[slot], None)
                if frame is None:
                    flows[slot] = mix.new_flow()
                    continue
            usec += rng.randrange(1, 120)
            chunk.append(record(BASE_TS + usec // 1_000_000, usec % 1_000_000, len(frame), len(frame)))
            chunk.append(frame)
            written += 1
            total_bytes += len(frame)
            if len(chunk) >= 8192:
                out.write(b"".join(chunk))
                chunk.clear()
        out.write(b"".join(chunk))
    truth = {"generator": GENERATOR, "packets": written, "frame_bytes": total_bytes, "seed": seed,
             "max_bulk_segments": max_bulk_segments, "kaspersky_share": kaspersky_share,
             "kaspersky_names": sorted(n for n in mix.names_used if n in KASPERSKY_NAMES),
             "names": dict(sorted(mix.names_used.items()))}
    path.with_suffix(".json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "mix.pcap")
    parser.add_argument("--max-bulk-segments", type=int, default=MAX_BULK_SEGMENTS,
                        help="longest TLS transfer in segments (more connections when lower: "
                             "60 gives about twice as many as the default)")
    parser.add_argument("--kaspersky-share", type=float, default=KASPERSKY_SHARE,
                        help="share of the names looked up or sent that are Kaspersky's (default "
                             f"{KASPERSKY_SHARE}; 0.10 gives about five times the alerts)")
    args = parser.parse_args(argv)
    if args.max_bulk_segments < 21:
        parser.error("--max-bulk-segments must be at least 21")
    if not 0.0 <= args.kaspersky_share <= 1.0:
        parser.error("--kaspersky-share must be between 0 and 1")
    truth = write_mix(args.out, args.packets, args.seed, args.max_bulk_segments, args.kaspersky_share)
    print(f"{args.out}: {truth['packets']:,} packets, {truth['frame_bytes'] / 1e6:,.0f} MB of frames, "
          f"Kaspersky names: {', '.join(truth['kaspersky_names'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
