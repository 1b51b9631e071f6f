#!/usr/bin/env python3
"""Which way into the kernel's packet ring costs Python less: libpcap through pcapy-ng's
``next_batch``, or an AF_PACKET socket with a TPACKET_V3 ring mapped and walked in Python?

Both read the same ring kind (libpcap uses TPACKET_V3 on Linux), with the same size, block
timeout and kernel BPF program, and do the same work per packet: take the frame out as
bytes, and see whether it is 802.1Q-tagged.  The mix (a slice of it, 30% VLAN-tagged) is
replayed at tcpreplay's top speed into a veth pair between two private namespaces, once
with the sensor's filter and once with none (every frame reaches user space).  Reported
per method: packets, tagged frames as delivered, kernel drops, and the CPU time of the
capturing process per packet from the moment its ring is ready.  Needs root; run
``sudo python3 bench/capture_api.py``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RING_BYTES = 64 << 20
BLOCK_BYTES = 1 << 20
BLOCK_TIMEOUT_MS = 100
SNAPLEN = 65535
BATCH = 1024

# linux/if_packet.h and linux/filter.h
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
TP_STATUS_USER = 1
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003
_BLOCK_HEADER = struct.Struct("=III")  # at offset 8: block_status, num_pkts, offset_to_first_pkt
_PACKET_HEADER = struct.Struct("=IIIIIIH")  # next_offset, sec, nsec, snaplen, len, status, mac
_STATUS = struct.Struct("=I")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def kernel_program(interface: str, expression: str):
    """The classic BPF program libpcap builds for this live interface (``tcpdump -ddd``),
    as the array SO_ATTACH_FILTER takes: the same program pcapy-ng's setfilter installs."""
    out = subprocess.run(["tcpdump", "-i", interface, "-ddd", expression], capture_output=True,
                         text=True, check=True).stdout.split("\n")
    count = int(out[0])
    program = (_SockFilter * count)()
    for i, line in enumerate(out[1:count + 1]):
        code, jt, jf, k = (int(x) for x in line.split())
        program[i] = _SockFilter(code, jt, jf, k)
    return program


READY: list = []


def ready() -> None:
    READY.append(time.process_time())
    print("ready", flush=True)


def capture_tpacket_v3(interface: str, expression: str, stop) -> tuple[int, int, int]:
    """(packets, 802.1Q-tagged frames, kernel drops).  The kernel hands a VLAN tag over in
    the ring header (tp_vlan_tci), not in the frame; this walker, like a naive one, does
    not put it back."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
    if expression:
        program = kernel_program(interface, expression)
        fprog = _SockFprog(len(program), ctypes.cast(program, ctypes.POINTER(_SockFilter)))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
    blocks = RING_BYTES // BLOCK_BYTES
    sock.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack(
        "=7I", BLOCK_BYTES, blocks, 2048, RING_BYTES // 2048, BLOCK_TIMEOUT_MS, 0, 0))
    ring = mmap.mmap(sock.fileno(), RING_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    sock.bind((interface, ETH_P_ALL))
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    ready()
    packets = tagged = 0
    index = 0
    header_at = _PACKET_HEADER.unpack_from
    while True:
        base = index * BLOCK_BYTES
        status, count, first = _BLOCK_HEADER.unpack_from(ring, base + 8)
        if not status & TP_STATUS_USER:
            if stop():
                break
            poller.poll(BLOCK_TIMEOUT_MS)
            continue
        pos = base + first
        for _ in range(count):
            step, _sec, _nsec, snaplen, _len, _status, mac = header_at(ring, pos)
            frame = ring[pos + mac:pos + mac + snaplen]
            packets += 1
            tagged += frame[12:14] == b"\x81\x00"
            pos += step
        _STATUS.pack_into(ring, base + 8, 0)
        index = (index + 1) % blocks
    _received, dropped, _ = struct.unpack("=III", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12))
    return packets, tagged, dropped


def capture_pcapy(interface: str, expression: str, stop) -> tuple[int, int, int]:
    """(packets, 802.1Q-tagged frames, kernel drops); libpcap puts VLAN tags back."""
    import pcapy

    handle = pcapy.create(interface)
    handle.set_snaplen(SNAPLEN)
    handle.set_promisc(True)
    handle.set_timeout(BLOCK_TIMEOUT_MS)
    handle.set_buffer_size(RING_BYTES)
    handle.activate()
    if expression:
        handle.setfilter(expression)
    handle.setnonblock(1)
    poller = select.poll()
    poller.register(handle.getfd(), select.POLLIN)
    ready()
    meta_at = struct.Struct("=IIII").iter_unpack
    next_batch = handle.next_batch
    packets = tagged = 0
    while True:
        buf, meta = next_batch(BATCH)
        if not meta:
            if stop():
                break
            poller.poll(BLOCK_TIMEOUT_MS)
            continue
        for _sec, _usec, off, caplen in meta_at(meta):
            frame = buf[off:off + caplen]
            packets += 1
            tagged += frame[12:14] == b"\x81\x00"
    _received, dropped, _ = handle.stats()
    return packets, tagged, dropped


METHODS = {"pcapy-ng next_batch": capture_pcapy, "TPACKET_V3 ring in Python": capture_tpacket_v3}


def child(method: str, interface: str, expression: str) -> None:
    """Capture until SIGTERM; CPU time counts from the moment the ring is ready, so
    interpreter start-up and imports are not charged to the packets."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    packets, tagged, dropped = METHODS[method](interface, expression, lambda: bool(stopping))
    print(json.dumps({"packets": packets, "tagged": tagged, "dropped": dropped,
                      "cpu": time.process_time() - READY[0]}), flush=True)


def measure(veth_mod, capture: Path, method: str, expression: str) -> dict:
    with veth_mod.veth_pair(f"a{os.getpid() % 10000}") as (tx_ns, tx_if, rx_ns, rx_if):
        proc = subprocess.Popen(veth_mod.in_netns(rx_ns, [
            sys.executable, __file__, "--child", method, "--interface", rx_if, "--filter", expression]),
            stdout=subprocess.PIPE, text=True)
        try:
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"{method}: the capture did not start")
            replayed = subprocess.run(veth_mod.in_netns(tx_ns, [
                "tcpreplay", f"--intf1={tx_if}", "--topspeed", str(capture)]),
                capture_output=True, text=True, check=True).stdout
            time.sleep(2 * BLOCK_TIMEOUT_MS / 1000 + 0.5)
            proc.send_signal(signal.SIGTERM)
            result = json.loads(proc.stdout.readline())
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rate = next((part.strip() for line in replayed.splitlines() if "Rated:" in line
                 for part in line.split(",") if part.strip().endswith("pps")), "?")
    return dict(result, replayed=rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mix", type=Path, default=ROOT / "bench" / "out" / "mix.pcap")
    parser.add_argument("--packets", type=int, default=300_000, help="packets of the mix to replay")
    parser.add_argument("--repeat", type=int, default=3, help="replays per method and filter, least CPU kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--interface", help=argparse.SUPPRESS)
    parser.add_argument("--filter", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.interface, args.filter)
        return 0
    import veth as veth_mod
    from sensor.capture.bpf import build_filter

    why = veth_mod.available()
    if why:
        print(f"capture_api: {why}", file=sys.stderr)
        return 2
    if not args.mix.exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_mix.py")], check=True)
    with tempfile.TemporaryDirectory(prefix="purge-capture-api-") as tmp:
        capture = Path(tmp) / "slice.pcap"
        subprocess.run(["tcpdump", "-r", str(args.mix), "-c", str(args.packets), "-w", str(capture)],
                       check=True, capture_output=True)
        print(f"{args.packets:,} packets of {args.mix.name} at tcpreplay --topspeed; best of {args.repeat}")
        print(f"{'method':<28} {'filter':<14} {'replayed':>14} {'packets':>9} {'tagged':>8} {'drops':>6} "
              f"{'CPU s':>6} {'CPU us/packet':>14}")
        for label, expression in (("sensor filter", build_filter()), ("none", "")):
            for method in METHODS:
                runs = [measure(veth_mod, capture, method, expression) for _ in range(args.repeat)]
                best = min(runs, key=lambda r: r["cpu"])
                print(f"{method:<28} {label:<14} {best['replayed']:>14} {best['packets']:>9,} "
                      f"{best['tagged']:>8,} {best['dropped']:>6,} {best['cpu']:>6.2f} "
                      f"{best['cpu'] / max(best['packets'], 1) * 1e6:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
