#!/usr/bin/env python3
"""Wrap a classic Ethernet pcap's frames in VXLAN, as cloud traffic mirroring (AWS VPC
Traffic Mirroring, Azure vTAP) delivers a span port: outer untagged IPv4 from a mirror
source to a collector, UDP to port 4789, VNI 100, the original frame inside.

    python3 bench/wrap_vxlan.py bench/out/mix.pcap /tmp/vxlan.pcap --share 1.0 --packets 300000
    python3 bench/run.py --no-tshark --no-plain --mix /tmp/vxlan.pcap
"""

from __future__ import annotations

import argparse
import random
import struct
import sys

_OUTER_MACS = bytes.fromhex("020000000001020000000002")
_MIRROR, _COLLECTOR = bytes([192, 168, 200, 1]), bytes([192, 168, 200, 2])


def wrap(frame: bytes, source_port: int) -> bytes:
    udp_length = 16 + len(frame)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_length, 0, 0, 64, 17, 0, _MIRROR, _COLLECTOR)
    udp = struct.pack("!HHHH", source_port, 4789, udp_length, 0)
    return _OUTER_MACS + b"\x08\x00" + ip + udp + struct.pack("!II", 0x08000000, 100 << 8) + frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a classic pcap, little-endian microsecond, Ethernet")
    parser.add_argument("output")
    parser.add_argument("--share", type=float, default=1.0, help="fraction of frames wrapped (default 1.0)")
    parser.add_argument("--packets", type=int, default=0, help="stop after this many (default: all)")
    args = parser.parse_args(argv)
    chooser = random.Random(1)
    with open(args.source, "rb") as source, open(args.output, "wb") as output:
        header = source.read(24)
        if len(header) < 24 or header[:4] != b"\xd4\xc3\xb2\xa1" or struct.unpack_from("<I", header, 20)[0] != 1:
            print(f"wrap_vxlan: {args.source}: not a little-endian microsecond Ethernet pcap", file=sys.stderr)
            return 2
        output.write(header[:16] + struct.pack("<I", 262144) + header[20:])
        count = 0
        while not args.packets or count < args.packets:
            record = source.read(16)
            if len(record) < 16:
                break
            sec, usec, caplen, _ = struct.unpack("<IIII", record)
            frame = source.read(caplen)
            if chooser.random() < args.share:
                frame = wrap(frame, 49152 + count % 16384)
            output.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame)
            count += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
