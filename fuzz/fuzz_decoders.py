"""Coverage-guided fuzzing of every decoder entry point with atheris (libFuzzer).

    python3 fuzz/fuzz_decoders.py TARGET [libFuzzer options]
    python3 fuzz/fuzz_decoders.py frame -runs=1000000          # one target
    python3 fuzz/fuzz_decoders.py all -runs=20000              # every target in turn

Targets: frame (whole frames through PacketDecoder, every link type), batch (a libpcap
batch of Ethernet frames, and of the same as Linux cooked v1 and v2 frames and as bare IP,
through the buffer fast path, which must give exactly what decoding each frame gives, and as
each of these again with flows shunted (capture.shunt): the same records, and a valid
filter program), dns_screen (a frame through the capture filter with a DNS screen listing
the frame's own server, capture.dns_screen: whatever the screen drops, the decoder's batch
loop, knowing that server, drops too without a record or a malformed count), capture
(pcap/pcapng files), prefiltered (a capture file read through libpcap with the sensor's
filter, by iteration and by batches, which must give the Python reader's filtered frames,
timestamps and interfaces), pipeline (a capture file through every stage: decoder,
detector, tracker, ECS and JSON alerts, inventory snapshots), dns, dns_tcp, http, tls,
quic, dhcp.  Seeds come from the sample captures in pcaps/, for capture, prefiltered and
pipeline as pcap and as pcapng too (written to fuzz/corpus/TARGET on first use).  A crash
is any exception other than the decoder's own DecodeError / CaptureError, or a state table
above its cap.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import atheris  # noqa: E402
from field_variants import as_link  # noqa: E402

with atheris.instrument_imports():
    from sensor.capture import bpf, shunt
    from sensor.capture.pcapfile import CaptureError, CaptureFile
    from sensor.decode import dhcp, dns, http, tls
    from sensor.decode.link import LINK_DECODERS
    from sensor.decode.packet import DecoderConfig, PacketDecoder
    from sensor.detect.signatures import default_signature_paths, load_signatures
    from sensor.output.ecs import host_event_to_ecs, to_json_line
    from sensor.pipeline import Sensor, decoder_interest
    from sensor.records import HostEvent
    from sensor.decode.quic import QuicInitialTable
    from sensor.records import DecodeError, PacketContext
    from sensor.stats import Stats

TARGETS = ("frame", "batch", "dns_screen", "capture", "prefiltered", "pipeline", "dns", "dns_tcp", "http", "tls",
           "quic", "dhcp")
LINKTYPES = sorted(LINK_DECODERS)
CTX = PacketContext(1.0, "10.0.0.1", "10.0.0.2", 50000, 443, "udp")
STATS = Stats()
DECODER = PacketDecoder(STATS, DecoderConfig(dedup_window=0.0))
QUIC = QuicInitialTable(STATS, max_connections=64)


def one_frame(data: bytes) -> None:
    if not data:
        return
    DECODER.decode(1.0, LINKTYPES[data[0] % len(LINKTYPES)], data[1:])
    assert len(DECODER.streams.streams) <= DECODER.streams.max_streams
    assert len(DECODER.fragments.pending) <= DECODER.fragments.max_datagrams
    assert len(DECODER.udp_flows) <= DECODER.config.udp_flow_table


SIGNATURES = load_signatures(default_signature_paths())


def _libpcap():
    """The libpcap mapped into this process with ``bpf_filter`` and ``bpf_validate``
    declared, or None where there is not exactly one."""
    try:
        import pcapy  # noqa: F401 - maps the libpcap its wheel brings
    except ImportError:
        return None
    from tests.helpers import libpcap_bpf

    return libpcap_bpf()


LIBPCAP = _libpcap()
VALIDATE = LIBPCAP.bpf_validate if LIBPCAP is not None else None
BATCH_META = struct.Struct("=IIII")


def _split_frames(data: bytes) -> list[bytes]:
    """Frames behind 2-byte big-endian length prefixes."""
    frames, pos = [], 0
    while pos + 2 <= len(data) and len(frames) < 64:
        size = int.from_bytes(data[pos:pos + 2], "big")
        frames.append(data[pos + 2:pos + 2 + size])
        pos += 2 + size
    return frames


def _outcome(decoder, records) -> tuple:
    """As tests/test_batch_path.py compares them: records, counters, the stream table with
    what decides how each stream's later segments are read, the QUIC Initial table."""
    s = decoder.stats
    streams = sorted((key, st.kind, st.items, st.consumed, bytes(st.buf), sorted(st.pending))
                     for key, st in decoder.streams.streams.items())
    quic = [(key, conn.done, bytes(conn.prefix)) for key, conn in decoder.quic.connections.items()]
    return ([repr(r) for r in records], s.packets, s.decoded, dict(s.malformed), dict(s.capture_loss),
            sorted(decoder.streams.bypass), streams, quic)


def one_batch(data: bytes) -> None:
    """The frames as Ethernet, then as Linux cooked v1 (SLL) and v2 (SLL2) frames and as
    bare IP (what follows the Ethernet header) made from them: the fast path reads the
    first two on the buffer and the others behind pseudo Ethernet headers."""
    frames = _split_frames(data)
    _batch_agrees(frames, 1)
    _batch_agrees([as_link(f, "sll") for f in frames], 113)
    _batch_agrees([as_link(f, "sll2") for f in frames], 276)
    _batch_agrees([f[14:] for f in frames], 101)


def _batch_agrees(frames: list, linktype: int) -> None:
    stamps = [1_700_000_000 + i * 0.013 for i in range(len(frames))]
    single, batched = (PacketDecoder(Stats(), DecoderConfig(dedup_window=0.0)) for _ in range(2))
    single.interest = decoder_interest(SIGNATURES, set())
    batched.interest = decoder_interest(SIGNATURES, set())
    one_by_one = []
    for ts, frame in zip(stamps, frames):
        single.stats.packets += 1
        one_by_one += single.decode(ts, linktype, frame)
    buf, meta = bytearray(), bytearray()
    for ts, frame in zip(stamps, frames):
        sec = int(ts)
        meta += BATCH_META.pack(sec, round((ts - sec) * 1e6), len(buf), len(frame))
        buf += frame
    fast = []
    for ts, frame, _ in batched.batch(linktype, bytes(buf), bytes(meta)):
        batched.stats.packets += 1
        fast += batched.decode(ts, linktype, frame)
    assert _outcome(batched, fast) == _outcome(single, one_by_one)
    if linktype in bpf.SHUNTED_LINKTYPES:
        _shunting_agrees(bytes(buf), bytes(meta), one_by_one, linktype)


_ACCEPT = struct.pack("=HBBI", 0x06, 0, 0, 262144)  # ret #262144: the capture filter's stand-in


def _shunting_agrees(buf: bytes, meta: bytes, records: list, linktype: int = 1) -> None:
    """Shunting drops later packets in libpcap only, so the batch's records stay the same;
    the program built from the flows it shunted is valid and within MAX_PROGRAM."""
    decoder = PacketDecoder(Stats(), DecoderConfig(dedup_window=0.0))
    decoder.interest = decoder_interest(SIGNATURES, set())
    table = decoder.shunts = shunt.ShuntTable(_ACCEPT, bpf.SHUNTED_LINKTYPES[linktype])
    found = []
    for ts, frame, _ in decoder.batch(linktype, buf, meta):
        decoder.stats.packets += 1
        found += decoder.decode(ts, linktype, frame)
    assert [repr(r) for r in found] == [repr(r) for r in records]
    table.finished(0)
    assert len(table.program) // 8 <= shunt.MAX_PROGRAM
    if VALIDATE is not None:
        assert VALIDATE(table.program, len(table.program) // 8)


def _capture_filter() -> bytes | None:
    """The sensor's filter for Ethernet, where libpcap's interpreter is at hand to run it."""
    if LIBPCAP is None:
        return None
    from tests.helpers import capture_filter_program

    return capture_filter_program()


CAPTURE_FILTER = _capture_filter()
INTEREST = decoder_interest(SIGNATURES, set())
_SCREEN_TIME = 1_700_000_000


def _dns_server(frame: bytes) -> bytes | None:
    """The (server address, b"q" or b"r") pair of a UDP/53 datagram in an untagged or
    single-tagged Ethernet frame, read where the batch loop reads it; None for anything else."""
    network = 14
    etype = frame[12:14]
    if etype == b"\x81\x00":
        network, etype = 18, frame[16:18]
    if etype == b"\x08\x00" and frame[network:network + 1] == b"\x45":
        width, l4, proto = 4, network + 20, frame[network + 9:network + 10]
    elif etype == b"\x86\xdd":
        width, l4, proto = 16, network + 40, frame[network + 6:network + 7]
    else:
        return None
    if proto != b"\x11" or len(frame) < l4 + 8:
        return None
    if frame[l4 + 2:l4 + 4] == b"\x00\x35":
        return frame[l4 - width:l4] + b"q"
    if frame[l4:l4 + 2] == b"\x00\x35":
        return frame[l4 - 2 * width:l4 - width] + b"r"
    return None


def one_dns_screen(data: bytes) -> None:
    """A frame the capture filter passes and the DNS screen (listing the frame's own server)
    drops must be one the batch loop drops too, as a known server's message naming nothing,
    without a record or a malformed count."""
    if CAPTURE_FILTER is None:
        return
    server = _dns_server(data)
    if server is None or LIBPCAP.bpf_filter(CAPTURE_FILTER, data, len(data), len(data)) == 0:
        return
    table = shunt.ShuntTable(CAPTURE_FILTER, shunt.ETHERNET, dns=True)
    table.screen_dns(INTEREST.dns_labels)
    assert table.list_dns_server(server)
    table.finished(shunt.UNSHUNTED_BATCHES)
    program = table.program
    assert VALIDATE(program, len(program) // 8)  # a read's program, which may pass MAX_PROGRAM
    if LIBPCAP.bpf_filter(program, data, len(data), len(data)) != 0:
        return
    decoder = PacketDecoder(Stats(), DecoderConfig(dedup_window=0.0))
    decoder.interest = INTEREST
    decoder.resolver_reports[server] = float(_SCREEN_TIME)
    decoder.expire(float(_SCREEN_TIME))  # else the first frame takes the full path, which runs it
    meta = BATCH_META.pack(_SCREEN_TIME, 0, 0, len(data))
    assert not list(decoder.batch(1, data, meta)), "the screen dropped what the decoder reads"
    assert not decoder.stats.malformed, dict(decoder.stats.malformed)


def one_capture(data: bytes) -> None:
    try:
        capture = CaptureFile("fuzz", io.BytesIO(data), len(data))
    except CaptureError:
        return
    for _ in capture:
        pass


_SCRATCH = Path(tempfile.mkdtemp(prefix="fuzz-prefiltered-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def one_prefiltered(data: bytes) -> None:
    """What libpcap gives through PrefilteredCapture (PrologueFeed, MillisecondClock,
    InterfaceClock and the hand-over to Python included) against the Python reader with
    the same filter, per frame: time, link type, bytes and interface."""
    path = _SCRATCH / "capture"
    path.write_bytes(data)
    try:
        capture = CaptureFile("fuzz", io.BytesIO(data), len(data))
        frames = list(capture)
    except CaptureError:
        return
    if any(linktype in (0, 108) for _, linktype, _, _, _ in frames):
        return  # BSD loopback: libpcap swaps the family before filtering, the Python path passes it whole
    if capture.skipped or any(not 0 <= ts < 2 ** 32 for ts, _, _, _, _ in frames):
        return  # a pcapng time past 2106 (or 9999) reaches next_batch's 32-bit seconds wrapped
    admits = bpf.LinktypeFilters(None, bpf.file_tunnels(str(path))).admits
    expected = [(ts, linktype, frame, interface) for ts, linktype, frame, _, interface in frames
                if admits(linktype, frame)]
    try:
        with bpf.open_prefiltered(str(path)) as cap:
            by_iteration = [(r[0], r[1], r[2], r[4]) for r in cap]
        with bpf.open_prefiltered(str(path)) as cap:
            by_batches = []
            for item in cap.batches():
                if type(item) is not bpf.Batch:
                    by_batches.append((item[0], item[1], item[2], item[4]))
                    continue
                others = item.others or {}
                for sec, fraction, off, caplen in BATCH_META.iter_unpack(item.meta):
                    by_batches.append(((sec * cap.units + fraction) / cap.units, item.linktype,
                                       item.buf[off:off + caplen], others.get(off, item.interface)))
    except CaptureError:
        return
    assert by_iteration == expected, "iteration differs from the Python reader"
    assert by_batches == expected, "batches differ from the Python reader"


_PIPELINE: list = []


def _pipeline_sensor():
    """One sensor for every run, as a long read has: no state store, alerts through the
    JSON sink into /dev/null.  Its tables are capped, so runs cannot grow it unbounded."""
    if not _PIPELINE:
        from sensor import cli

        args = cli.build_parser().parse_args(["read", "-q", "--no-state", "-o", "file:/dev/null", "fuzz"])
        _PIPELINE.append(Sensor(cli._settings(args)))
    return _PIPELINE[0]


def one_pipeline(data: bytes) -> None:
    sensor = _pipeline_sensor()
    try:
        capture = CaptureFile("fuzz", io.BytesIO(data), len(data))
    except CaptureError:
        return
    last = None
    for ts, linktype, frame, wire_len, interface in capture:
        sensor.handle(ts, linktype, frame, wire_len, interface)
        last = ts
    if last is not None:
        sensor.tick(last)
        for host in sensor.tracker.inventory(last):
            to_json_line(host_event_to_ecs(HostEvent(last, "inventory", host), observer="fuzz"))


def one_dns(data: bytes) -> None:
    dns.parse_dns(data, CTX)


def one_dns_tcp(data: bytes) -> None:
    messages, used = dns.split_tcp_dns(data)
    assert used <= len(data)


def one_http(data: bytes) -> None:
    if http.http_request_status(data) != http.NOT_HTTP:
        http.parse_http_request(data, CTX)


def one_tls(data: bytes) -> None:
    if tls.client_hello_status(data) == tls.COMPLETE:
        tls.parse_client_hello_stream(data, CTX)
    if data[:1] == b"\x01":
        tls.parse_client_hello_message(data, CTX, "quic")


# The batch path's settling of client Initials against feeding them: two tables fed the
# same datagrams, one through QuicInitialTable.settle_initial first, must stay alike.
FED, SETTLED = (QuicInitialTable(Stats(), max_connections=16, max_total_bytes=1 << 16) for _ in range(2))
_CONNECTION_KEY = (CTX.src_ip, CTX.src_port, CTX.dst_ip, CTX.dst_port)


def _may_match(message: bytes) -> bool:
    return b"kaspersky" in message


def _fed(table: QuicInitialTable, data: bytes):
    try:
        hello = table.feed(data, CTX, _may_match)
    except DecodeError as err:
        table.stats.bad(err.reason)
        return None
    return None if hello is None else repr(hello)


def _quic_table(table: QuicInitialTable) -> tuple:
    return ([(key, conn.done, bytes(conn.prefix), dict(conn.pending)) for key, conn in table.connections.items()],
            table.total_bytes, list(table.keys), dict(table.stats.malformed), dict(table.stats.evictions))


def one_quic(data: bytes) -> None:
    expected = _fed(FED, data)
    if SETTLED.settle_initial(data, _CONNECTION_KEY, CTX.ts, _may_match):
        assert expected is None
    else:
        assert _fed(SETTLED, data) == expected
    assert _quic_table(SETTLED) == _quic_table(FED)
    QUIC.feed(data, CTX)


def one_dhcp(data: bytes) -> None:
    dhcp.parse_dhcp(data, CTX)


HANDLERS = {"frame": one_frame, "batch": one_batch, "dns_screen": one_dns_screen, "capture": one_capture,
            "prefiltered": one_prefiltered, "pipeline": one_pipeline,
            "dns": one_dns, "dns_tcp": one_dns_tcp,
            "http": one_http, "tls": one_tls, "quic": one_quic, "dhcp": one_dhcp}


def _as_pcapng(records, resolution: int = 9, spread: int = 1) -> bytes:
    """The records as pcapng with ``spread`` interfaces per link type, the records taking
    them in turn, on clocks of 10**-``resolution`` seconds, written by the sample
    generator's pcapng writer."""
    sys.path.insert(0, str(ROOT / "pcaps"))
    from make_samples import pcapng_file

    interfaces: dict[tuple[int, int], int] = {}
    for i, (_, linktype, _, _, _) in enumerate(records):
        interfaces.setdefault((linktype, i % spread), len(interfaces))
    return pcapng_file([(linktype, resolution, b"fuzz") for linktype, _ in interfaces],
                       [(round(ts * 10 ** resolution) * 10 ** (9 - resolution), frame,
                         interfaces[(linktype, i % spread)])
                        for i, (ts, linktype, frame, _, _) in enumerate(records)])


def _upload_frames() -> list[bytes]:
    """A connection the batch path bypasses (its first segment opens no stream it reads),
    then a segment past decode.packet.SHUNT_AFTER: it is shunted, and stays so."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    def frame(flags, seq, payload=b""):
        return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                     / IP(src="10.0.0.1", dst="198.51.100.7")
                     / TCP(sport=50000, dport=443, flags=flags, seq=seq) / payload)

    return [frame("S", 1000), frame("PA", 1001, b"\x17\x03\x03" + b"x" * 200),
            frame("PA", 1001 + 20000, b"x" * 200)]


def _http3_frames() -> list[bytes]:
    """Client Initials naming no watched host, which the batch path settles on the buffer:
    a ClientHello in one datagram, and a post-quantum one over two."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    sys.path.insert(0, str(ROOT / "pcaps"))
    from make_quic_samples import QUIC_V1, client_hello, client_initial, crypto_frame

    def frame(port: int, datagram: bytes) -> bytes:
        return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                     / IP(src="10.0.0.1", dst="198.51.100.8") / UDP(sport=port, dport=443) / datagram)

    whole = client_hello("www.example.org", "fuzz", post_quantum=False)
    large = client_hello("cdn.example.net", "fuzz", post_quantum=True)
    return [frame(50001, client_initial(QUIC_V1, b"\x01" * 8, b"", 0, crypto_frame(0, whole))),
            frame(50002, client_initial(QUIC_V1, b"\x02" * 8, b"", 0, crypto_frame(0, large[:1000]))),
            frame(50002, client_initial(QUIC_V1, b"\x02" * 8, b"", 1, crypto_frame(1000, large[1000:])))]


def seeds(target: str) -> list[bytes]:
    """Inputs for ``target`` taken from the sample captures (dpkt is fine off the hot path)."""
    import dpkt

    out: list[bytes] = []
    for path in sorted((ROOT / "pcaps").glob("*.pcap*")):
        data = path.read_bytes()
        if target in ("capture", "pipeline", "prefiltered"):
            out.append(data[:65536])
            try:
                records = list(CaptureFile(str(path), io.BytesIO(data), len(data)))[:64]
                out.append(_as_pcapng(records))
                if target == "prefiltered":
                    out.append(_as_pcapng(records, resolution=6, spread=2))
            except CaptureError:
                pass
            continue
        try:
            frames = list(CaptureFile(str(path), io.BytesIO(data), len(data)))
        except CaptureError:
            continue
        if target == "batch":
            ethernet = [frame for _, linktype, frame, _, _ in frames if linktype == 1]
            for start in range(0, len(ethernet), 8):
                out.append(b"".join(len(f).to_bytes(2, "big") + f for f in ethernet[start:start + 8]))
            out.append(b"".join(len(f).to_bytes(2, "big") + f for f in _upload_frames()))
            out.append(b"".join(len(f).to_bytes(2, "big") + f for f in _http3_frames()))
            continue
        for _, linktype, frame, _, _ in frames:
            if target == "frame":
                out.append(bytes([LINKTYPES.index(linktype) if linktype in LINKTYPES else 0]) + frame)
                continue
            if linktype != 1:
                continue
            try:
                ip = dpkt.ethernet.Ethernet(frame).data
                l4 = ip.data
            except Exception:
                continue
            payload = bytes(getattr(l4, "data", b""))
            if not payload or not hasattr(l4, "sport"):
                continue
            is_udp = isinstance(l4, dpkt.udp.UDP)
            ports = {l4.sport, l4.dport}
            if target == "dns" and is_udp and 53 in ports:
                out.append(payload)
            elif target == "dns_screen" and is_udp and 53 in ports:
                out.append(frame)
            elif target == "dns_tcp" and not is_udp and 53 in ports:
                out.append(payload)
            elif target == "http" and not is_udp and payload[:1] in b"GHPDCO":
                out.append(payload)
            elif target == "tls" and not is_udp and payload[:1] == b"\x16":
                out.append(payload)
            elif target == "quic" and is_udp and payload[0] & 0xC0 == 0xC0:
                out.append(payload)
            elif target == "dhcp" and is_udp and ports & {67, 68, 546, 547}:
                out.append(payload)
    return out[:500]


def corpus_dir(target: str) -> Path:
    directory = ROOT / "fuzz" / "corpus" / target
    if not directory.is_dir() or not any(directory.iterdir()):
        directory.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds(target)):
            (directory / f"seed-{i:04d}").write_bytes(seed)
    return directory


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS + ("all",):
        print(__doc__, file=sys.stderr)
        return 2
    target, options = sys.argv[1], sys.argv[2:]
    if target == "all":
        failed = 0
        for name in TARGETS:
            print(f"== {name}", file=sys.stderr, flush=True)
            failed |= subprocess.call([sys.executable, __file__, name, *options])
        return 1 if failed else 0
    handler = HANDLERS[target]

    def test_one_input(data: bytes) -> None:
        try:
            handler(data)
        except DecodeError:
            pass

    corpus = corpus_dir(target)
    atheris.Setup([sys.argv[0], *options, str(corpus)], test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
