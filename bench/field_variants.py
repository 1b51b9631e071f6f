#!/usr/bin/env python3
"""Rewrite a classic Ethernet pcap (microsecond, little-endian, as make_mix.py writes) the
way captures from the field differ from a generator's, to check that the sensor's speed
and its detections with and without the filter hold on them:

* ``--tcp-timestamps``: every TCP segment carries a 12-byte timestamp option, as Linux and
  macOS send on every segment (data offset 8, not 5);
* ``--trailer``: every frame padded to Ethernet's 60-byte minimum and followed by a 4-byte
  frame check sequence, as some span ports and TAPs deliver;
* ``--reorder SHARE``: that share of frames swapped with the next one;
* ``--retransmit SHARE``: that share of frames with a payload sent again 300 ms later;
* ``--stretch FACTOR``: time between packets multiplied (a slower link: tables expire as
  they go, DNS answers age before their flows start);
* ``--link sll|sll2|raw``: the frames as another link type writes them: Linux cooked v1
  and v2 (``tcpdump -i any`` on older and current libpcap: the sender's address kept, a
  VLAN tag after the protocol field as libpcap reinserts it), or bare IP packets
  (LINKTYPE_RAW, as a tun or WireGuard interface gives them; tags dropped, non-IP frames
  left out).

    python3 bench/field_variants.py bench/out/mix.pcap /tmp/field.pcap --trailer --reorder 0.01 --retransmit 0.005
    python3 bench/run.py --no-tshark --mix /tmp/field.pcap      # read, and the filter's detections
"""

from __future__ import annotations

import argparse
import heapq
import random
import struct
import sys

import classic_pcap

TIMESTAMP_OPTION = b"\x01\x01\x08\x0a" + struct.pack("!II", 0x00012345, 0x00067890)
FRAME_CHECK_SEQUENCE = b"\xde\xad\xbe\xef"
LINKTYPES = {"ethernet": classic_pcap.LINKTYPE_ETHERNET, "sll": 113, "sll2": 276, "raw": 101}
VLAN_TPIDS = (b"\x81\x00", b"\x88\xa8", b"\x91\x00")
IP_TYPES = (b"\x08\x00", b"\x86\xdd")
RETRANSMIT_DELAY_US = 300_000


def with_tcp_timestamps(frame: bytes) -> bytes:
    """The frame with a timestamp option in its TCP header, if it is untagged or
    single-tagged IPv4 (no options) or IPv6 carrying TCP without options; else as it is."""
    ip = 18 if frame[12:14] == b"\x81\x00" else 14
    etype = frame[ip - 2:ip]
    if etype == b"\x08\x00" and len(frame) >= ip + 40 and frame[ip] == 0x45 and frame[ip + 9] == 6:
        l4, length_at = ip + 20, ip + 2
    elif etype == b"\x86\xdd" and len(frame) >= ip + 60 and frame[ip + 6] == 6:
        l4, length_at = ip + 40, ip + 4
    else:
        return frame
    if frame[l4 + 12] >> 4 != 5:
        return frame
    out = bytearray(frame)
    struct.pack_into("!H", out, length_at, struct.unpack_from("!H", out, length_at)[0] + len(TIMESTAMP_OPTION))
    out[l4 + 12] = 0x80 | out[l4 + 12] & 0x0F
    out[l4 + 20:l4 + 20] = TIMESTAMP_OPTION
    return bytes(out)


def as_link(frame: bytes, link: str) -> bytes | None:
    """The Ethernet frame as ``link`` carries it (see the module's description); None for a
    frame that link type would not carry (raw: not IP)."""
    if link == "ethernet":
        return frame
    # struct pads the 8-byte address field; a frame cut short still gets whole headers.
    if link == "sll":
        return struct.pack("!HHH8s", 0, 1, 6, frame[6:12]) + frame[12:]
    if link == "sll2":
        return frame[12:14].ljust(2, b"\0") + struct.pack("!HIHBB8s", 0, 2, 1, 0, 6, frame[6:12]) + frame[14:]
    pos = 12
    while frame[pos:pos + 2] in VLAN_TPIDS:
        pos += 4
    return frame[pos + 2:] if frame[pos:pos + 2] in IP_TYPES else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--tcp-timestamps", action="store_true", help="a timestamp option on every TCP segment")
    parser.add_argument("--trailer", action="store_true", help="pad to 60 bytes, then a 4-byte FCS")
    parser.add_argument("--reorder", type=float, default=0.0, metavar="SHARE",
                        help="share of frames swapped with the next one")
    parser.add_argument("--retransmit", type=float, default=0.0, metavar="SHARE",
                        help="share of frames longer than 60 bytes sent again 300 ms later")
    parser.add_argument("--stretch", type=float, default=1.0, metavar="FACTOR",
                        help="multiply the time between packets")
    parser.add_argument("--link", choices=sorted(LINKTYPES), default="ethernet",
                        help="write the frames as this link type does")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 <= args.reorder <= 1 or not 0 <= args.retransmit <= 1 or args.stretch <= 0:
        parser.error("--reorder and --retransmit take a share from 0 to 1, --stretch a positive factor")
    rnd = random.Random(args.seed)
    with open(args.source, "rb") as source, open(args.destination, "wb") as out:
        if not classic_pcap.read_ethernet_header(source):
            print(f"{args.source}: not a little-endian microsecond Ethernet pcap", file=sys.stderr)
            return 2
        out.write(classic_pcap.header(LINKTYPES[args.link]))
        first = None

        def write(us: int, frame: bytes) -> None:
            if args.trailer:
                frame = frame.ljust(60, b"\0") + FRAME_CHECK_SEQUENCE
            if args.link != "ethernet":
                frame = as_link(frame, args.link)
                if frame is None:
                    return
            out.write(classic_pcap.RECORD.pack(us // 1_000_000, us % 1_000_000, len(frame), len(frame)))
            out.write(frame)

        later: list[tuple[int, int, bytes]] = []
        held = None
        for number, (sec, usec, frame) in enumerate(classic_pcap.records(source)):
            us = sec * 1_000_000 + usec
            first = us if first is None else first
            us = first + int((us - first) * args.stretch)
            if args.tcp_timestamps:
                frame = with_tcp_timestamps(frame)
            while later and later[0][0] <= us:
                again_us, _, again = heapq.heappop(later)
                write(again_us, again)
            if len(frame) > 60 and rnd.random() < args.retransmit:
                heapq.heappush(later, (us + RETRANSMIT_DELAY_US, number, frame))
            if held is None and rnd.random() < args.reorder:
                held = (us, frame)
                continue
            write(us, frame)
            if held is not None:
                write(us, held[1])
                held = None
        if held is not None:
            write(*held)
        for again_us, _, again in sorted(later):
            write(again_us, again)
    return 0


if __name__ == "__main__":
    sys.exit(main())
