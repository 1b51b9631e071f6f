#!/usr/bin/env python3
"""Wrap a classic Ethernet pcap's frames in a tunnel, as a span port arrives from afar:
VXLAN as cloud traffic mirroring (AWS VPC Traffic Mirroring, Azure vTAP) sends it (UDP to
port 4789, VNI 100), or ERSPAN type II or III as a remote span session does (GRE with a
sequence number, session 100; type III with its timestamp and no platform subheader);
outer untagged IPv4 from a mirror source to a collector.

    python3 bench/wrap_tunnel.py bench/out/mix.pcap /tmp/vxlan.pcap --share 1.0 --packets 300000
    python3 bench/run.py --no-tshark --no-plain --mix /tmp/vxlan.pcap
"""

from __future__ import annotations

import argparse
import random
import struct
import sys

import classic_pcap

_OUTER_MACS = bytes.fromhex("020000000001020000000002")
_MIRROR, _COLLECTOR = bytes([192, 168, 200, 1]), bytes([192, 168, 200, 2])


def _outer(protocol: int, payload: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, protocol, 0, _MIRROR, _COLLECTOR)
    return _OUTER_MACS + b"\x08\x00" + ip + payload


def vxlan(frame: bytes, number: int) -> bytes:
    udp = struct.pack("!HHHH", 49152 + number % 16384, 4789, 16 + len(frame), 0)
    return _outer(17, udp + struct.pack("!II", 0x08000000, 100 << 8) + frame)


def erspan2(frame: bytes, number: int) -> bytes:
    gre = struct.pack("!HHI", 0x1000, 0x88BE, number & 0xFFFFFFFF)
    return _outer(47, gre + struct.pack("!HHI", 0x1000, 100, 0) + frame)


def erspan3(frame: bytes, number: int) -> bytes:
    gre = struct.pack("!HHI", 0x1000, 0x22EB, number & 0xFFFFFFFF)
    return _outer(47, gre + struct.pack("!HHIHBB", 0x2000, 100, number & 0xFFFFFFFF, 0, 0, 0) + frame)


TUNNELS = {"vxlan": vxlan, "erspan2": erspan2, "erspan3": erspan3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a classic pcap, little-endian microsecond, Ethernet")
    parser.add_argument("output")
    parser.add_argument("--share", type=float, default=1.0, help="fraction of frames wrapped (default 1.0)")
    parser.add_argument("--packets", type=int, default=0, help="stop after this many (default: all)")
    parser.add_argument("--tunnel", choices=sorted(TUNNELS), default="vxlan")
    args = parser.parse_args(argv)
    chooser = random.Random(1)
    with open(args.source, "rb") as source, open(args.output, "wb") as output:
        if not classic_pcap.read_ethernet_header(source):
            print(f"wrap_tunnel: {args.source}: not a little-endian microsecond Ethernet pcap", file=sys.stderr)
            return 2
        output.write(classic_pcap.header())
        wrap = TUNNELS[args.tunnel]
        for count, (sec, usec, frame) in enumerate(classic_pcap.records(source)):
            if args.packets and count >= args.packets:
                break
            if chooser.random() < args.share:
                frame = wrap(frame, count)
            output.write(classic_pcap.RECORD.pack(sec, usec, len(frame), len(frame)) + frame)
    return 0


if __name__ == "__main__":
    sys.exit(main())
