"""Capture-loss estimator: acknowledgements of client bytes the sensor never saw.

Unit cases for each rule, hypothesis properties over random segmentations (full
delivery never gaps; drops are counted byte for byte), and a pcap-level check with a
small header-parsing driver standing in for the decoder's TCP path."""

import re
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, Ether, Raw, wrpcap

from sensor.capture.pcapfile import open_capture
from sensor.decode.capture_loss import MAX_HOLES, MAX_SEQ_JUMP, CaptureLoss, reverse_key
from sensor.stats import Stats

ROOT = Path(__file__).resolve().parents[1]

MOD = 1 << 32


def flow_key(src="10.0.0.7", dst="192.0.2.80", sport=50000, dport=443) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    return (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
            + struct.pack("!HH", sport, dport))


KEY = flow_key()


def estimator(**kwargs) -> CaptureLoss:
    return CaptureLoss(Stats(), **kwargs)


def send(loss, isn, pieces, key=KEY):
    """Feed ``(offset, length)`` pieces of a stream whose SYN carried ``isn``."""
    for offset, length in pieces:
        loss.client_segment(key, (isn + 1 + offset) % MOD, length)


def counters(loss):
    return loss.acks, loss.gap_events, loss.acked_bytes, loss.gap_bytes


def cut(total, sizes):
    pieces, pos = [], 0
    for size in sizes:
        pieces.append((pos, size))
        pos += size
    assert pos == total
    return pieces


# -- unit cases ------------------------------------------------------------------------
def test_in_order_stream_acknowledged_has_no_gap():
    loss, isn = estimator(), 1000
    loss.syn(KEY, isn)
    loss.server_ack(KEY, isn + 1)  # the SYN-ACK judges nothing yet
    send(loss, isn, cut(3000, [1000, 1000, 1000]))
    loss.server_ack(KEY, isn + 1 + 3000)
    assert counters(loss) == (1, 0, 3000, 0)
    assert loss.flows[KEY].expect == isn + 1 + 3000 and loss.flows[KEY].holes is None


def test_dropped_middle_segment_acknowledged_by_server_fin_is_one_gap():
    loss, isn = estimator(), 5000
    loss.syn(KEY, isn)
    pieces = cut(1700, [500, 300, 900])
    send(loss, isn, [pieces[0], pieces[2]])
    loss.server_ack(KEY, isn + 1 + 1700)
    assert counters(loss) == (1, 1, 1700, 300)
    assert loss.holes == 1


def test_retransmission_and_reordering_are_not_gaps():
    loss, isn = estimator(), 77
    loss.syn(KEY, isn)
    a, b, c, d = cut(1000, [100, 200, 300, 400])
    send(loss, isn, [a, c, a, d, b, c, (50, 400)])  # b arrives last; overlaps too
    loss.server_ack(KEY, isn + 1 + 1000)
    assert counters(loss) == (1, 0, 1000, 0)
    assert loss.flows[KEY].expect == isn + 1 + 1000 and loss.flows[KEY].holes is None


def test_hole_filled_after_an_earlier_ack_is_not_a_gap():
    loss, isn = estimator(), 9
    loss.syn(KEY, isn)
    a, b, c = cut(300, [100, 100, 100])
    send(loss, isn, [a, c])
    loss.server_ack(KEY, isn + 1 + 100)  # covers only a: seen
    send(loss, isn, [b])
    loss.server_ack(KEY, isn + 1 + 300)
    assert counters(loss) == (2, 0, 300, 0)


def test_ack_inside_a_hole_counts_only_the_covered_part():
    loss, isn = estimator(), 20
    loss.syn(KEY, isn)
    send(loss, isn, [(0, 100), (200, 100)])
    loss.server_ack(KEY, isn + 1 + 150)
    assert counters(loss) == (1, 1, 150, 50)
    loss.server_ack(KEY, isn + 1 + 180)
    assert counters(loss) == (2, 2, 180, 80)
    send(loss, isn, [(100, 100)])  # the retransmission fills the rest of the hole
    loss.server_ack(KEY, isn + 1 + 300)
    assert counters(loss) == (3, 2, 300, 80)


def test_duplicate_and_old_acks_are_not_events():
    loss, isn = estimator(), 0
    loss.syn(KEY, isn)
    send(loss, isn, [(0, 100)])
    for ack in (101, 101, 50, 1):
        loss.server_ack(KEY, isn + ack)
    assert counters(loss) == (1, 0, 100, 0)


def test_sequence_wrap_around():
    loss, isn = estimator(), MOD - 250
    loss.syn(KEY, isn)
    pieces = cut(1000, [200, 200, 200, 400])  # the second piece straddles 2**32
    send(loss, isn, pieces[:2])
    assert loss.flows[KEY].expect == (isn + 1 + 400) % MOD
    send(loss, isn, pieces[3:])
    loss.server_ack(KEY, (isn + 1 + 600) % MOD)
    assert counters(loss) == (1, 1, 600, 200)
    loss.server_ack(KEY, (isn + 1 + 1000) % MOD)
    assert counters(loss) == (2, 1, 1000, 200)


def test_missed_syn_starts_at_first_seen_byte():
    loss, first = estimator(), MOD - 10
    loss.client_segment(KEY, first, 500)
    loss.client_segment(KEY, (first - 300) % MOD, 300)  # older data from before we started
    loss.server_ack(KEY, (first - 100) % MOD)  # below the start: never judged
    loss.client_segment(KEY, (first + 500) % MOD, 500)
    loss.server_ack(KEY, (first + 1000) % MOD)
    assert counters(loss) == (1, 0, 1000, 0)
    loss.client_segment(KEY, (first + 1200) % MOD, 100)  # 200 bytes never seen
    loss.server_ack(KEY, (first + 1300) % MOD)
    assert counters(loss) == (2, 1, 1300, 200)


def test_client_fin_judges_the_end_of_the_data_and_clamps_server_acks():
    loss, isn = estimator(), 400
    loss.syn(KEY, isn)
    send(loss, isn, [(0, 100)])  # bytes 100..149 are lost
    loss.client_fin(KEY, isn + 1 + 150)
    assert counters(loss) == (1, 1, 150, 50)
    loss.server_ack(KEY, isn + 1 + 151)  # acknowledges the FIN itself
    loss.server_ack(KEY, isn + 1 + 151)
    assert counters(loss) == (1, 1, 150, 50)


def test_acknowledgement_of_lost_data_moves_the_stream_on():
    loss, isn = estimator(), 3
    loss.syn(KEY, isn)
    send(loss, isn, [(0, 100)])
    loss.server_ack(KEY, isn + 1 + 300)  # 200 bytes never seen
    send(loss, isn, [(150, 100), (300, 100)])  # the late copy is already judged
    loss.server_ack(KEY, isn + 1 + 400)
    assert counters(loss) == (2, 1, 400, 200)


def test_take_interval_reports_deltas_and_ratio():
    loss, isn = estimator(), 0
    loss.syn(KEY, isn)
    send(loss, isn, [(0, 100), (200, 100)])
    loss.server_ack(KEY, isn + 1 + 100)
    loss.server_ack(KEY, isn + 1 + 300)
    first = loss.take_interval()
    assert (first.acks, first.gap_events, first.acked_bytes, first.gap_bytes) == (2, 1, 300, 100)
    assert first.loss_ratio == 0.5
    idle = loss.take_interval()
    assert tuple(idle) == (0, 0, 0, 0) and idle.loss_ratio == 0.0
    send(loss, isn, [(300, 100)])
    loss.server_ack(KEY, isn + 1 + 400)
    assert loss.take_interval().loss_ratio == 0.0


def test_flow_table_cap_evicts_oldest_and_counts():
    stats = Stats()
    loss = CaptureLoss(stats, max_flows=2)
    keys = [flow_key(sport=port) for port in (40001, 40002, 40003)]
    for key in keys:
        loss.syn(key, 0)
        loss.client_segment(key, 1, 10)
    assert list(loss.flows) == keys[1:]
    assert stats.evictions["capture_loss"] == 1
    assert stats.table_sizes["capture_loss"] == 2
    loss.server_ack(keys[0], 500)  # evicted: nothing to judge against
    assert loss.acks == 0
    loss.close(keys[1])
    assert list(loss.flows) == keys[2:] and stats.table_sizes["capture_loss"] == 1


def test_expire_drops_idle_flows_only():
    loss = estimator(idle_timeout=60.0)
    busy, idle = flow_key(sport=1111), flow_key(sport=2222)
    loss.expire(1000.0)
    loss.syn(busy, 0)
    loss.syn(idle, 0)
    loss.expire(1050.0)
    loss.client_segment(busy, 1, 10)
    loss.expire(1100.0)
    assert list(loss.flows) == [busy]


def test_far_segment_restarts_the_flow_and_far_ack_is_ignored():
    loss, isn = estimator(), 0
    loss.syn(KEY, isn)
    send(loss, isn, [(0, 100)])
    loss.server_ack(KEY, isn + 1 + 100 + MAX_SEQ_JUMP + 1)
    assert loss.ignored_acks == 1 and loss.acks == 0
    far = (isn + 1 + (MAX_SEQ_JUMP << 2)) % MOD
    loss.client_segment(KEY, far, 100)
    assert loss.resyncs == 1
    loss.server_ack(KEY, (far + 100) % MOD)
    assert counters(loss) == (1, 0, 100, 0)


def test_too_many_holes_are_merged_without_losing_the_gap_event():
    loss, isn = estimator(), 0
    loss.syn(KEY, isn)
    send(loss, isn, [(i * 20, 10) for i in range(MAX_HOLES + 3)])  # 10 of every 20 lost
    assert len(loss.flows[KEY].holes) == MAX_HOLES and loss.merged_holes == 2
    end = (MAX_HOLES + 2) * 20 + 10
    loss.server_ack(KEY, isn + 1 + end)
    assert loss.gap_events == 1
    assert (MAX_HOLES + 2) * 10 <= loss.gap_bytes <= (MAX_HOLES + 2) * 10 + 2 * 10


def test_reverse_key_swaps_addresses_and_ports():
    assert reverse_key(flow_key("10.0.0.7", "192.0.2.80", 50000, 443)) == \
        flow_key("192.0.2.80", "10.0.0.7", 443, 50000)
    assert reverse_key(flow_key("fd00::7", "2001:db8::80", 50000, 443)) == \
        flow_key("2001:db8::80", "fd00::7", 443, 50000)


# -- properties ------------------------------------------------------------------------
@st.composite
def segmented_stream(draw):
    """A stream cut into at most MAX_HOLES pieces (so no hole merging), with an ISN
    anywhere in sequence space."""
    total = draw(st.integers(1, 6000))
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=MAX_HOLES - 1))
                  if total > 1 else set())
    bounds = [0, *cuts, total]
    pieces = [(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:])]
    isn = draw(st.integers(0, MOD - 1))
    return isn, total, pieces


@settings(max_examples=300, deadline=None)
@given(segmented_stream(), st.randoms(use_true_random=False))
def test_full_delivery_in_any_order_never_gaps(stream, rng):
    isn, total, pieces = stream
    arrivals = pieces + rng.sample(pieces, rng.randint(0, len(pieces)))  # retransmissions
    rng.shuffle(arrivals)
    loss = estimator()
    loss.syn(KEY, isn)
    delivered = bytearray(total)
    for offset, length in arrivals:
        loss.client_segment(KEY, (isn + 1 + offset) % MOD, length)
        delivered[offset:offset + length] = b"\x01" * length
        if rng.random() < 0.3:  # the server acknowledges the contiguous prefix it has
            prefix = delivered.find(0)
            loss.server_ack(KEY, (isn + 1 + (total if prefix < 0 else prefix)) % MOD)
    loss.client_fin(KEY, (isn + 1 + total) % MOD)
    loss.server_ack(KEY, (isn + 2 + total) % MOD)
    assert loss.gap_events == 0 and loss.gap_bytes == 0
    assert loss.acked_bytes == total and loss.flows[KEY].holes is None


@settings(max_examples=300, deadline=None)
@given(segmented_stream(), st.randoms(use_true_random=False), st.booleans())
def test_dropped_bytes_are_exactly_the_gap_bytes(stream, rng, reorder):
    isn, total, pieces = stream
    dropped = [p for p in pieces if rng.random() < 0.4]
    arrivals = [p for p in pieces if p not in dropped]
    loss = estimator()
    loss.syn(KEY, isn)
    if reorder:  # reordered capture, one acknowledgement at the end
        arrivals += rng.sample(arrivals, rng.randint(0, len(arrivals)))
        rng.shuffle(arrivals)
        send(loss, isn, arrivals)
    else:  # in sending order, the server acknowledging what was sent so far
        for piece in pieces:
            if piece not in dropped:
                send(loss, isn, [piece])
            if rng.random() < 0.3:
                loss.server_ack(KEY, (isn + 1 + piece[0] + piece[1]) % MOD)
    loss.server_ack(KEY, (isn + 1 + total) % MOD)
    assert loss.gap_bytes == sum(length for _, length in dropped)
    assert (loss.gap_events > 0) == bool(dropped)
    assert loss.acked_bytes == total


# -- pcap fixture through a header-parsing driver --------------------------------------
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10


def drive(path, loss):
    """What the decoder's TCP path will do, for Ethernet/IPv4 frames: the side that sent
    a bare SYN is the client; its data and FIN feed the estimator, and the other side's
    acknowledgement numbers judge them."""
    clients = set()
    with open_capture(str(path)) as capture:
        for _ts, _linktype, frame, _wire_len, _interface in capture:
            if struct.unpack_from("!H", frame, 12)[0] != 0x0800:
                continue
            ip = 14
            ihl = (frame[ip] & 0x0F) * 4
            ip_end = ip + struct.unpack_from("!H", frame, ip + 2)[0]
            if frame[ip + 9] != 6:
                continue
            tcp = ip + ihl
            seq, ack = struct.unpack_from("!II", frame, tcp + 4)
            payload = ip_end - tcp - (frame[tcp + 12] >> 4) * 4
            flags = frame[tcp + 13]
            key = frame[ip + 12:ip + 20] + frame[tcp:tcp + 4]
            if flags & (SYN | ACK) == SYN:
                clients.add(key)
                loss.syn(key, seq)
            elif key in clients:
                if payload:
                    loss.client_segment(key, seq, payload)
                if flags & FIN:
                    loss.client_fin(key, seq + payload)
            elif reverse_key(key) in clients and flags & ACK:
                loss.server_ack(reverse_key(key), ack)
            if flags & RST:
                loss.close(key if key in clients else reverse_key(key))


def test_pcap_flow_missing_one_client_segment(tmp_path):
    client, server, sport, isn, server_isn = "10.1.2.3", "198.51.100.9", 51234, 4_000_000_000, 77

    def frame(src, dst, sp, dp, seq, ack, flags, payload=b""):
        return (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                / IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, seq=seq % MOD, ack=ack % MOD,
                                             flags=flags) / Raw(payload))

    sizes = [517, 1200, 1448, 333, 90]
    data = [bytes([i + 65]) * size for i, size in enumerate(sizes)]
    total = sum(sizes)
    packets = [frame(client, server, sport, 443, isn, 0, "S"),
               frame(server, client, 443, sport, server_isn, isn + 1, "SA")]
    offset = 0
    for chunk in data:
        packets.append(frame(client, server, sport, 443, isn + 1 + offset, server_isn + 1, "PA",
                             chunk))
        offset += len(chunk)
    packets.append(frame(server, client, 443, sport, server_isn + 1, isn + 1 + total, "FA"))
    missing = 2 + 2  # SYN, SYN-ACK, then the third client segment
    assert len(packets[missing][Raw].load) == sizes[2]
    del packets[missing]
    path = tmp_path / "lossy.pcap"
    wrpcap(str(path), packets)

    loss = estimator()
    drive(path, loss)
    assert counters(loss) == (1, 1, total, sizes[2])
    assert loss.take_interval().loss_ratio == 1.0

    complete = tmp_path / "complete.pcap"
    packets.insert(missing, frame(client, server, sport, 443, isn + 1 + sum(sizes[:2]),
                                  server_isn + 1, "PA", data[2]))
    wrpcap(str(complete), packets)
    clean = estimator()
    drive(complete, clean)
    assert counters(clean) == (1, 0, total, 0)


# -- end to end: the read pipeline on a span mix with client segments removed ----------

def _loss_of_read(capture, capsys):
    from sensor.cli import main

    assert main(["read", "--no-state", "-o", "file:/dev/null", str(capture)]) == 0
    err = capsys.readouterr().err
    line = next((ln for ln in err.splitlines() if ln.startswith("capture loss:")), None)
    assert line is not None, err
    gaps, acks, gap_bytes, acked = (int(n.replace(",", "")) for n in
                                    re.findall(r"[\d,]+(?=\s(?:of|acks|bytes))", line)[:4])
    return gaps, acks, gap_bytes, acked


def test_read_reports_no_loss_on_a_whole_mix_and_the_removed_bytes_on_a_thinned_one(tmp_path, capsys):
    """Every 40th client data segment of the mix is removed: the pipeline (prefilter, batch
    bypass and full path alike) must report gaps, and never more gap bytes than removed."""
    import dpkt
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from make_mix import write_mix

    whole = tmp_path / "mix.pcap"
    write_mix(whole, 30_000)
    gaps, acks, gap_bytes, _ = _loss_of_read(whole, capsys)
    assert acks > 20 and gaps == 0 and gap_bytes == 0

    thinned = tmp_path / "thinned.pcap"
    removed_bytes = client_segments = 0
    with open(whole, "rb") as src, open(thinned, "wb") as dst:
        writer = dpkt.pcap.Writer(dst, snaplen=262144)
        for ts, frame in dpkt.pcap.Reader(src):
            eth = dpkt.ethernet.Ethernet(frame)
            ip = eth.data
            tcp = getattr(ip, "data", None)
            if isinstance(tcp, dpkt.tcp.TCP) and tcp.data and tcp.dport < tcp.sport \
                    and not tcp.flags & (dpkt.tcp.TH_SYN | dpkt.tcp.TH_FIN | dpkt.tcp.TH_RST):
                client_segments += 1
                if client_segments % 40 == 0:
                    removed_bytes += len(tcp.data)
                    continue
            writer.writepkt(frame, ts)
    gaps, acks, gap_bytes, acked = _loss_of_read(thinned, capsys)
    assert gaps > 0 and 0 < gap_bytes <= removed_bytes
    assert gaps <= acks and gap_bytes <= acked


def _snapped_copy(source: Path, target: Path, snaplen: int) -> int:
    """``source`` (a classic little-endian pcap) as captured with ``snaplen``: each record
    keeps its frame's first bytes and its wire length.  Returns the frames cut."""
    data = source.read_bytes()
    header = bytearray(data[:24])
    struct.pack_into("<I", header, 16, snaplen)
    out = [bytes(header)]
    pos, cut_frames = 24, 0
    while pos + 16 <= len(data):
        sec, usec, caplen, wire = struct.unpack_from("<IIII", data, pos)
        kept = min(caplen, snaplen)
        cut_frames += kept < caplen
        out.append(struct.pack("<IIII", sec, usec, kept, wire) + data[pos + 16:pos + 16 + kept])
        pos += 16 + caplen
    target.write_bytes(b"".join(out))
    return cut_frames


@pytest.mark.parametrize("snaplen", [74, 160])
def test_a_short_snap_length_is_not_capture_loss(tmp_path, capsys, snaplen):
    """Bytes the snap length cut off crossed the wire and reached the capture: the estimate
    counts them as seen, on the batch path and the full path alike (74 bytes keeps no TCP
    payload at all, 160 part of most).  Streams the cut leaves a hole in are given up, not
    left waiting for the missing bytes."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from make_mix import write_mix

    whole = tmp_path / "mix.pcap"
    write_mix(whole, 20_000)
    snapped = tmp_path / "snapped.pcap"
    assert _snapped_copy(whole, snapped, snaplen) > 1000
    from sensor.cli import main

    for extra in ([], ["--no-bpf-prefilter"]):
        assert main(["read", "--no-state", "-o", "file:/dev/null", *extra, str(snapped)]) == 0
        err = capsys.readouterr().err
        loss = next(ln for ln in err.splitlines() if ln.startswith("capture loss:"))
        gaps, acks = (int(n.replace(",", "")) for n in re.findall(r"[\d,]+", loss)[:2])
        assert acks > 20 and gaps == 0, (extra, loss)
        assert "ipv4_snapped=" in err and "tcp_too_many_pending" not in err, (extra, err)


_OPS = st.lists(st.tuples(st.sampled_from(["syn", "data", "server", "server_rst", "close", "expire"]),
                          st.integers(0, 5), st.booleans()), max_size=60)


@given(_OPS)
@settings(max_examples=300)
def test_server_index_always_mirrors_the_client_flows(ops):
    """``servers`` holds every tracked flow under its server key and nothing else, whatever
    inserts, evictions (a 3-flow table), resyncs, RSTs, closes and idle sweeps did; a
    server segment judges the flow its reversed key names and no other."""
    loss = estimator(max_flows=3, idle_timeout=10.0)
    keys = [flow_key(sport=50000 + i) for i in range(3)]
    keys += [reverse_key(keys[0]), flow_key("fd00::7", "2001:db8::80"), flow_key("10.0.0.9")]
    clock = 0.0
    for op, which, flag in ops:
        key = keys[which]
        if op == "syn":
            loss.syn(key, 1000)
        elif op == "data":
            loss.client_segment(key, 1001 if flag else 1001 + MAX_SEQ_JUMP * 2, 100)
        elif op in ("server", "server_rst"):
            tracked = set(loss.flows)
            flow = loss.flows.get(reverse_key(key))
            acks = loss.acks
            ack = (flow.expect + 50) % MOD if flow is not None else 1101
            loss.server_segment(key, ack, op == "server_rst")
            if op == "server_rst":
                tracked.discard(reverse_key(key))
            assert set(loss.flows) == tracked
            if flow is None:
                assert loss.acks == acks
            else:
                assert flow.judged == ack
        elif op == "close":
            loss.close(key)
        else:
            clock += 6.0 if flag else 1.0
            loss.expire(clock)
        assert loss.servers == {reverse_key(k): f for k, f in loss.flows.items()}
