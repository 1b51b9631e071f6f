"""Readers the tests share: a strict CEF parser, the sample-capture generator module, a
``read`` whose detections and inventory can be compared, and libpcap's BPF interpreter."""

import importlib.util
import json
import re
import struct
import sys
from collections import Counter
from pathlib import Path

PCAPS = Path(__file__).resolve().parents[1] / "pcaps"


def parse_cef(line: str) -> tuple[list[str], dict]:
    """A strict reader: 7 header fields split on unescaped pipes, then ``key=value``
    pairs where a value runs until the next unescaped `` key=``."""
    fields, current, i = [], [], 0
    while len(fields) < 7:
        char = line[i]
        if char == "\\":
            current.append(line[i + 1])
            i += 2
            continue
        if char == "|":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    extension, rest = {}, line[i:]
    pairs = re.split(r"(?:^| )([A-Za-z0-9_]+)=", rest)
    assert pairs[0] == ""
    for key, raw in zip(pairs[1::2], pairs[2::2]):
        assert key not in extension
        extension[key] = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), raw)
    return fields, extension


def load_make_samples():
    """``pcaps/make_samples.py`` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("make_samples", PCAPS / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_samples", module)
    spec.loader.exec_module(module)
    return module


def in_vxlan(data: bytes, n: int = 0) -> bytes:
    """``data`` as VXLAN's inner frame, the outer headers varied with ``n``: IPv4, IPv4
    behind an 802.1Q tag or IPv6; source port 53 now and then (a tunnel port wins over
    DNS's); every seventh without the I flag, which the full decoder rejects."""
    vxlan = struct.pack("!BxxxI", 0x00 if n % 7 == 6 else 0x08, (100 + n % 3) << 8)
    udp_payload = vxlan + data
    sport = 53 if n % 5 == 4 else 49152 + n % 1000
    udp = struct.pack("!HHHH", sport, 4789, 8 + len(udp_payload), 0) + udp_payload
    macs = bytes.fromhex("020000000001020000000002")
    if n % 3 == 2:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01",
                         b"\x20\x01\x0d\xb8" + bytes(11) + b"\x02")
        return macs + b"\x86\xdd" + ip + udp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n & 0xFFFF, 0, 64, 17, 0,
                     bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    tag = b"\x81\x00\x00\x1e" if n % 3 == 1 else b""
    return macs + tag + b"\x08\x00" + ip + udp


def in_erspan3(data: bytes, n: int = 0, subheader: bool = False, frame_type: int = 0) -> bytes:
    """``data`` as ERSPAN type III's inner frame: untagged IPv4, GRE with a sequence number,
    the 12-byte type III header (session ``n``, a timestamp, the frame type and the O flag)
    and, with ``subheader``, the 8-byte platform subheader the O flag announces."""
    gre = struct.pack("!HHI", 0x1000, 0x22EB, n)
    erspan = struct.pack("!HHIHBB", 0x2000, n & 0x3FF, 0x12345678, 0, (frame_type & 0x1F) << 2,
                         0x01 if subheader else 0x00) + (bytes(8) if subheader else b"")
    payload = gre + erspan + data
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), n & 0xFFFF, 0, 64, 47, 0,
                     bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    return bytes.fromhex("020000000001020000000002") + b"\x08\x00" + ip + payload


def in_erspan2(data: bytes, n: int = 0) -> bytes:
    """``data`` as ERSPAN type II's inner frame (Cisco's remote span): untagged IPv4, GRE
    with a sequence number, ERSPAN II's 8-byte header; session ``n``."""
    gre = struct.pack("!HHI", 0x1000, 0x88BE, n)
    erspan = struct.pack("!HHI", 0x1000, n & 0x3FF, 0)
    payload = gre + erspan + data
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), n & 0xFFFF, 0, 64, 47, 0,
                     bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    return bytes.fromhex("020000000001020000000002") + b"\x08\x00" + ip + payload


def read_detections(run: Path, capture: Path, capsys, *extra: str) -> tuple[Counter, list, int, str]:
    """``purge-sensor read`` of ``capture`` with its state and alerts in ``run`` (created):
    the alerts counted by (action, host, domain), the whole inventory, the exit status and
    what went to stderr."""
    from sensor.cli import main

    run.mkdir()
    alerts = run / "alerts.json"
    state = run / "state.sqlite"
    status = main(["read", "--state", str(state), "-o", f"file:{alerts}", *extra, str(capture)])
    summary = capsys.readouterr().err
    keys = Counter()
    for line in alerts.read_text().splitlines():
        doc = json.loads(line)
        keys[(doc["event"]["action"], doc.get("host", {}).get("ip"),
              doc.get("destination", {}).get("domain"))] += 1
    assert main(["hosts", "--state", str(state), "--format", "json", "--all"]) == 0
    return keys, json.loads(capsys.readouterr().out), status, summary


def libpcap_bpf():
    """The libpcap mapped into this process (pcapy-ng's, once pcapy is imported) with its
    ``bpf_filter`` and ``bpf_validate`` declared, or None when there is not exactly one."""
    import ctypes

    from sensor.capture.libpcap import _loaded_libpcap

    path = _loaded_libpcap()
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    lib.bpf_filter.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint]
    lib.bpf_validate.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return lib


def capture_filter_program(linktype: int = 1, user_filter: str | None = None) -> bytes:
    """The sensor's capture filter for ``linktype`` (narrowed by ``user_filter``) as libpcap
    compiles it for a capture of whole frames, as instruction bytes: what a ShuntTable is
    built on."""
    import pcapy

    from sensor.capture.bpf import build_filter

    compiled = pcapy.compile(linktype, 262144, build_filter(user_filter, linktype), 1, 0)
    return b"".join(struct.pack("=HBBI", *insn) for insn in compiled.get_bpf())
