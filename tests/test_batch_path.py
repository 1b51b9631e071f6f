"""The batch fast path (PacketDecoder.ethernet_batch) is an optimisation, never a filter
of its own: fed the same frames, it must yield exactly the records and counters that
decoding every frame one by one gives.  Frames come from the sample captures, cut and
mutated by hypothesis, so the fast path's hand-rolled header checks meet hostile input."""

from __future__ import annotations

import itertools
import socket
import struct
import sys
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from sensor.capture.pcapfile import open_capture
from sensor.decode.link import (LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL,
                                LINKTYPE_LINUX_SLL2, LINKTYPE_RAW)
from sensor.decode.packet import DecoderConfig, PacketDecoder, _tunnel_inner
from sensor.records import ClientHello, HttpRequest
from sensor.detect.signatures import default_signature_paths, load_signatures
from sensor.pipeline import decoder_interest
from sensor.stats import Stats
from tests.helpers import in_erspan2, in_erspan3, in_vxlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from field_variants import as_link  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
META = struct.Struct("=IIII")
SIGNATURES = load_signatures(default_signature_paths())


def _ethernet_frames() -> list[tuple[float, bytes]]:
    frames = []
    for path in sorted((ROOT / "pcaps").glob("*.pcap*")):
        with open_capture(str(path)) as cap:
            frames += [(ts, data) for ts, linktype, data, _, _ in cap if linktype == 1]
    return frames


FRAMES = _ethernet_frames()


# Every fourth frame in ERSPAN II or III (with and without a platform subheader), the rest
# in VXLAN's variations.
WRAPPED = [(ts, in_erspan2(data, n) if n % 8 == 3 else in_erspan3(data, n, subheader=n % 16 == 15)
            if n % 8 == 7 else in_vxlan(data, n))
           for n, (ts, data) in enumerate(FRAMES)]


def _decoder(answered: frozenset = frozenset()) -> PacketDecoder:
    decoder = PacketDecoder(Stats(), DecoderConfig(dedup_window=0.0))
    decoder.interest = decoder_interest(SIGNATURES, set(answered))
    return decoder


def _batch(frames) -> tuple[bytes, bytes]:
    buf = bytearray()
    meta = bytearray()
    for ts, data in frames:
        sec = int(ts)
        meta += META.pack(sec, round((ts - sec) * 1e6), len(buf), len(data))
        buf += data
    return bytes(buf), bytes(meta)


def _outcome(decoder: PacketDecoder, records: list) -> tuple:
    """Records, counters and the stream table, each stream with what decides how its later
    segments are read (kind, requests handed out, bytes consumed and buffered), and the
    QUIC Initial table's connections in their order."""
    s = decoder.stats
    streams = sorted((key, st.kind, st.items, st.consumed, bytes(st.buf), sorted(st.pending))
                     for key, st in decoder.streams.streams.items())
    quic = [(key, conn.done, bytes(conn.prefix)) for key, conn in decoder.quic.connections.items()]
    return ([repr(r) for r in records], s.packets, s.bytes, s.decoded, dict(s.malformed),
            dict(s.capture_loss), sorted(decoder.streams.bypass), streams, quic)


def _one_by_one(frames, linktype: int = LINKTYPE_ETHERNET, answered: frozenset = frozenset()) -> tuple:
    decoder = _decoder(answered)
    records = []
    for ts, data in frames:
        decoder.stats.packets += 1
        decoder.stats.bytes += len(data)
        records += decoder.decode(ts, linktype, data)
    return _outcome(decoder, records)


def _batched(frames, linktype: int = LINKTYPE_ETHERNET, answered: frozenset = frozenset()) -> tuple:
    decoder = _decoder(answered)
    records = []
    buf, meta = _batch(frames)
    for ts, frame, caplen in decoder.batch(linktype, buf, meta):
        decoder.stats.packets += 1
        decoder.stats.bytes += caplen
        records += decoder.decode(ts, linktype, frame)
    return _outcome(decoder, records)


def _handed_over(frames, linktype: int = LINKTYPE_ETHERNET, counted=lambda frame: True) -> int:
    """How many of the frames (those ``counted`` picks) the fast path hands to the full
    decoder, each decoded as it comes so that the tables fill as in a read."""
    decoder = _decoder()
    buf, meta = _batch(frames)
    handed = 0
    for ts, frame, _ in decoder.batch(linktype, buf, meta):
        handed += bool(counted(frame))
        decoder.decode(ts, linktype, frame)
    return handed


# The Ethernet frame as ``tcpdump -i any`` writes it: Linux cooked (SLL), or cooked v2 with
# libpcap 1.10 and later, the sender's address and the type field (a tag's too) kept.
_cooked = partial(as_link, link="sll")
_cooked_v2 = partial(as_link, link="sll2")


def _bare(frame: bytes) -> bytes:
    """What follows the Ethernet frame's type field and tags: the IP packet, as a tun or
    WireGuard interface gives it (anything else as it comes, for the decoder to refuse)."""
    pos = 12
    while frame[pos:pos + 2] in (b"\x81\x00", b"\x88\xa8", b"\x91\x00"):
        pos += 4
    return frame[pos + 2:]


def _times(frames):
    """Re-stamp the frames 13 ms apart, in order, so table expiry (every second) and the
    screened-DNS report interval (a minute) fall between frames now and then."""
    return [(1_700_000_000 + i * 0.013, data) for i, (_, data) in enumerate(frames)]


def test_every_sample_capture_frame_in_order():
    frames = _times(FRAMES)
    assert _batched(frames) == _one_by_one(frames)


def test_flows_towards_answered_addresses_leave_the_buffer():
    """A SYN towards an address a Kaspersky name resolved to is evidence (dns_answer_flow):
    the fast path hands it over by its destination address, IPv4 and IPv6, tagged or not,
    and settles the SYNs towards every other address itself."""
    answered = {IP: "198.51.100.7", IPv6: "2001:db8::7"}
    frames = []
    for port, (network, tagged, towards) in enumerate(
            (n, t, a) for n in (IP, IPv6) for t in (False, True) for a in (True, False)):
        client, server = ("10.0.0.5", "198.51.100.9") if network is IP else ("2001:db8::5", "2001:db8::9")
        link = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        if tagged:
            link = link / Dot1Q(vlan=30)
        # The other address is the client's, so a fast path reading the source would err.
        frame = link / network(src=answered[network] if not towards else client,
                               dst=answered[network] if towards else server) \
            / TCP(sport=40000 + port, dport=443, flags="S")
        frames.append((0.0, bytes(frame)))
    keys = frozenset(socket.inet_pton(socket.AF_INET if n is IP else socket.AF_INET6, a)
                     for n, a in answered.items())
    frames = _times(frames)
    batched = _batched(frames, answered=keys)
    assert batched == _one_by_one(frames, answered=keys)
    assert len(batched[0]) == 4  # a FlowStart for each SYN towards an answered address


def _service_tagged(frame: bytes, tpid: bytes = b"\x88\xa8") -> bytes:
    """The frame behind a provider's service tag: QinQ when it had a tag already."""
    return frame[:12] + tpid + b"\x00\x64" + frame[12:]


SERVICE_TAGGED = [(ts, _service_tagged(data, tpid)) for (ts, data), tpid in
                  zip(FRAMES, itertools.cycle([b"\x88\xa8", b"\x81\x00", b"\x91\x00"]))]


@pytest.mark.parametrize("lead", [[], FRAMES[:3]], ids=["tagged-batch", "mixed-batch"])
def test_every_sample_capture_frame_in_order_behind_a_service_tag(lead):
    """QinQ and 802.1ad (provider networks mirror so): a batch with a frame behind a tag
    the loop does not read among its first is read behind such tags (_past_outer_tag), and
    what the fast path settles is what decoding each frame settles."""
    frames = _times(lead + [SERVICE_TAGGED[n] if n % 4 != 3 else FRAMES[n]
                            for n in range(len(FRAMES))] * 2)
    assert _batched(frames) == _one_by_one(frames)
    assert _handed_over(frames) < len(frames) * 0.6


def test_every_sample_capture_frame_in_order_cooked():
    """Linux cooked frames (``tcpdump -i any``) are read on the buffer as Ethernet from two
    bytes in, and what the fast path settles is what decoding them one by one settles."""
    frames = _times([(ts, _cooked(data)) for ts, data in FRAMES * 2])
    assert _batched(frames, LINKTYPE_LINUX_SLL) == _one_by_one(frames, LINKTYPE_LINUX_SLL)
    assert _handed_over(frames, LINKTYPE_LINUX_SLL) < len(frames) * 0.6


def _bare_of(version: int):
    """_bare, for the packets of one IP version (LINKTYPE_IPV4, LINKTYPE_IPV6)."""
    return lambda frame: _bare(frame) if _bare(frame)[:1] and _bare(frame)[0] >> 4 == version else None


LAID_OUT = [(LINKTYPE_LINUX_SLL2, _cooked_v2), (LINKTYPE_RAW, _bare), (LINKTYPE_IPV4, _bare_of(4)),
            (LINKTYPE_IPV6, _bare_of(6))]


@pytest.mark.parametrize("linktype,rewrite", LAID_OUT, ids=["sll2", "raw", "ipv4", "ipv6"])
def test_every_sample_capture_frame_in_order_laid_out_as_ethernet(linktype, rewrite):
    """Linux cooked v2 and bare IP batches are copied out behind pseudo Ethernet headers
    (_cooked_as_ethernet, _bare_ip_as_ethernet) and read by the same loop: what it settles is what decoding each
    frame as captured settles, frames it hands over are the captured ones (the records'
    source addresses come from the SLL2 header), and most are settled on the buffer.  On
    the IPv4 and IPv6 link types, that family's packets."""
    frames = _times([(ts, rewrite(data)) for ts, data in FRAMES * 2 if rewrite(data) is not None])
    assert _batched(frames, linktype) == _one_by_one(frames, linktype)
    if linktype in (LINKTYPE_LINUX_SLL2, LINKTYPE_RAW):  # the samples' few IPv6 packets are special
        assert _handed_over(frames, linktype) < len(frames) * 0.6


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(LAID_OUT))
def test_mutated_frames_laid_out_as_ethernet_give_the_same_records_and_counters(data, laid_out):
    """Mutated frames, cut short at random, as those link types carry them (on the IPv4
    and IPv6 link types a packet of the other version is the full path's to refuse)."""
    linktype, rewrite = laid_out
    frames = data.draw(mutated_frames())
    cut = data.draw(st.integers(0, 24))
    stamped = _times([(0.0, (rewrite(frame) or _bare(frame))[:max(len(frame) - cut, 0)]) for frame in frames])
    assert _batched(stamped, linktype) == _one_by_one(stamped, linktype)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_cooked_frames_give_the_same_records_and_counters(data):
    frames = data.draw(mutated_frames())
    stamped = _times([(0.0, _cooked(frame)[:len(frame) + 2]) for frame in frames])
    assert _batched(stamped, LINKTYPE_LINUX_SLL) == _one_by_one(stamped, LINKTYPE_LINUX_SLL)


@pytest.mark.parametrize("linktype,rewrite", [(LINKTYPE_LINUX_SLL, _cooked), (LINKTYPE_LINUX_SLL2, _cooked_v2)],
                         ids=["sll", "sll2"])
def test_an_empty_cooked_frame_is_not_taken_for_the_frame_after_it(linktype, rewrite):
    """An empty record's frame starts where the next one does: read past a cooked header,
    both would start at one place, and the empty one was handed over as the next."""
    frames = _times([(0.0, rewrite(data)) for _, data in FRAMES])
    for at in range(0, len(frames), 3):
        frames.insert(at, (frames[at][0], b""))
    assert _batched(frames, linktype) == _one_by_one(frames, linktype)


@pytest.mark.parametrize("snaplen", [54, 66, 74, 120, 300])
def test_every_sample_capture_frame_snapped(snaplen):
    """A capture taken with a snap length: frames cut short, their IP lengths whole.  The
    batch path settles what the headers alone settle (a bypassed flow's segments, a
    segment whose payload was cut off whole) as the full path does, counting each."""
    frames = _times([(ts, data[:snaplen]) for ts, data in FRAMES * 2])
    batched = _batched(frames)
    assert batched == _one_by_one(frames)
    malformed = batched[4]
    assert malformed.get("ipv4_snapped", 0) + malformed.get("ipv6_snapped", 0) > 0
    snapped = sum(_snapped_segment(data) for _, data in frames)
    assert snapped and _handed_over(frames, counted=_snapped_segment) < snapped


def _with_trailer(frame: bytes) -> bytes:
    """The frame as a span port or TAP may record it: padded to Ethernet's 60-byte minimum
    and followed by the 4-byte frame check sequence, bytes past the end of the IP packet."""
    return frame.ljust(60, b"\0") + b"\xde\xad\xbe\xef"


def test_every_sample_capture_frame_with_padding_and_a_frame_check_sequence():
    """Bytes behind the IP packet belong to no layer: the batch path reads each packet to
    its IP length, as the full path does, and still settles frames on the buffer."""
    frames = _times([(ts, _with_trailer(data)) for ts, data in FRAMES * 2])
    assert _batched(frames) == _one_by_one(frames)
    assert _handed_over(frames) < len(frames) * 0.6


def _snapped_segment(frame: bytes) -> bool:
    """An untagged or single-tagged TCP segment, not a SYN, whose headers are all there
    and whose payload the snap length cut short."""
    ip = 18 if frame[12:14] == b"\x81\x00" else 14
    etype = frame[ip - 2:ip]
    if etype == b"\x08\x00" and len(frame) >= ip + 20 and frame[ip] == 0x45 and frame[ip + 9] == 6:
        l4, wire_end = ip + 20, ip + int.from_bytes(frame[ip + 2:ip + 4], "big")
    elif etype == b"\x86\xdd" and len(frame) >= ip + 40 and frame[ip + 6] == 6:
        l4, wire_end = ip + 40, ip + 40 + int.from_bytes(frame[ip + 4:ip + 6], "big")
    else:
        return False
    if len(frame) < l4 + 20 or frame[l4 + 13] & 0x02:
        return False
    return l4 + (frame[l4 + 12] >> 4) * 4 <= len(frame) < wire_end


# A batch that opens with a tunnel frame is read at the inner frames all at once
# (_relocated_view); behind another frame, VXLAN frames are read again one by one.
LEADS = pytest.mark.parametrize("lead", [[], FRAMES[:1]], ids=["vxlan-batch", "mixed-batch"])


@LEADS
def test_every_sample_capture_frame_in_order_inside_vxlan(lead, monkeypatch):
    """Cloud traffic mirroring delivers a span port in VXLAN, which the capture filter
    passes whole: the batch path judges the inner frame by the same rules."""
    from sensor.decode import packet

    views = []
    view = packet._relocated_view
    monkeypatch.setattr(packet, "_relocated_view", lambda *args: views.append(1) or view(*args))
    frames = _times(lead + WRAPPED)
    assert _batched(frames) == _one_by_one(frames)
    assert bool(views) is not bool(lead)


@LEADS
def test_the_batch_path_skips_inside_vxlan(lead):
    """Inner frames the capture filter would have dropped (pure ACKs, a server's data,
    media, QUIC short headers) and repeated flows stay on the buffer too."""
    frames = _times(lead + WRAPPED * 3)
    assert _handed_over(frames) < len(frames) * 0.6


def test_the_batch_path_really_skips_something():
    """Repeated sample traffic: later copies of flows and DNS are dropped on the buffer."""
    frames = _times(FRAMES * 3)
    assert _handed_over(frames) < len(frames) * 0.9


def _one_ms_apart(frames: dict[str, bytes]) -> list[tuple[float, bytes]]:
    return [(1_700_000_000 + i * 0.001, data) for i, data in enumerate(frames.values())]


def _through_the_fast_path(frames: dict[str, bytes]) -> tuple[PacketDecoder, list[str], list]:
    """One connection's frames through the batch path, what it yields decoded in full:
    (the decoder, the names of the frames that reached the full decoder, their records)."""
    decoder = _decoder()
    decoder.expire(1_700_000_000)  # else the first frame takes the full path to run expiry
    buf, meta = _batch(_one_ms_apart(frames))
    names = list(frames)
    yielded = []
    records = []
    for ts, frame, _ in decoder.ethernet_batch(buf, meta):
        yielded.append(names[list(frames.values()).index(frame)])
        records += decoder.decode(ts, 1, frame)
    return decoder, yielded, records


def _flow_frames(network, tagged: bool, server_name: bytes, post_quantum: bool = False) -> dict[str, bytes]:
    """One TLS connection, frame by frame: the client's hello (in two segments when
    ``post_quantum``, its SNI in the second), then what the fast path must keep out of
    the full decoder once the hello is parsed."""
    import random

    from tests.helpers import load_make_samples

    hello = load_make_samples().client_hello(random.Random(7), server_name,
                                             post_quantum=post_quantum, sni_last=post_quantum)
    client, server = (("192.0.2.10", "198.51.100.20") if network is IP
                      else ("2001:db8::10", "2001:db8:1::20"))
    link = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if tagged:
        link = link / Dot1Q(vlan=30)
    up = link / network(src=client, dst=server)
    down = link / network(src=server, dst=client)
    seq = 1000
    frames = {
        "syn": up / TCP(sport=50000, dport=443, flags="S", seq=seq - 1),
        "syn_ack": down / TCP(sport=443, dport=50000, flags="SA", seq=77, ack=seq),
    }
    pieces = [hello[:1200], hello[1200:]] if post_quantum else [hello]
    for n, piece in enumerate(pieces):
        frames[f"hello{n}" if post_quantum else "hello"] = up / TCP(
            sport=50000, dport=443, flags="PA", seq=seq, ack=78) / piece
        seq += len(piece)
    flight = load_make_samples().server_flight(random.Random(8))[:1200]
    frames["server_flight"] = down / TCP(sport=443, dport=50000, flags="PA", seq=78, ack=seq) / flight
    for n in range(3):
        frames[f"bulk{n}"] = up / TCP(sport=50000, dport=443, flags="PA", seq=seq, ack=78) / (b"\x17" * 1200)
        seq += 1200
    frames["fin"] = up / TCP(sport=50000, dport=443, flags="FA", seq=seq, ack=78)
    frames["server_fin"] = down / TCP(sport=443, dport=50000, flags="FA", seq=78 + len(flight), ack=seq + 1)
    return {name: bytes(frame) for name, frame in frames.items()}


@pytest.mark.parametrize("server_name, post_quantum, kept", [
    (b"www.example.org", False, []),
    (b"dnl-03.geo.kaspersky.com", False, ["hello"]),
    (b"www.example.org", True, []),
    (b"dnl-03.geo.kaspersky.com", True, ["hello1"]),
], ids=["hello-ruled-out", "hello-may-match", "two-segment-hello-ruled-out",
        "two-segment-hello-may-match"])
@pytest.mark.parametrize("tagged", [False, True], ids=["untagged", "vlan"])
@pytest.mark.parametrize("network", [IP, IPv6], ids=["ipv4", "ipv6"])
def test_what_the_fast_path_keeps_from_the_full_decoder(network, tagged, server_name,
                                                         post_quantum, kept):
    """The point of the fast path: a SYN towards an unwatched address and port, the
    server's SYN-ACK, a hello that names no indicator (whole, or in two segments: the
    first is held in the stream table), the server's TLS flight, the client's bulk after
    it and bare FINs are judged on the buffer, never sliced out and decoded.  The segment
    that completes a hello that may name one goes to the full decoder, which parses it."""
    frames = _flow_frames(network, tagged, server_name, post_quantum)
    decoder, yielded, records = _through_the_fast_path(frames)
    hellos = [r.server_name.text for r in records if isinstance(r, ClientHello)]
    assert yielded == kept
    assert hellos == ([server_name.decode()] if kept else [])
    assert decoder.stats.packets == len(frames) - len(kept)
    assert sorted(decoder.streams.bypass) == [], "the FINs closed the settled streams"
    assert decoder.stats.decoded == len(frames)


def _quic_frames(network, tagged: bool, server: str | None = None) -> dict[str, bytes]:
    """Client Initials of six HTTP/3 connections, each on a DCID of its own: a whole
    ClientHello naming nothing watched and its retransmission, one naming a Kaspersky host,
    an Initial holding only a PING, and post-quantum hellos over two datagrams naming
    nothing watched and a Kaspersky host."""
    quic_samples = _quic_samples()
    client, default_server = (("192.0.2.10", "198.51.100.20") if network is IP
                              else ("2001:db8::10", "2001:db8:1::20"))
    link = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if tagged:
        link = link / Dot1Q(vlan=30)
    up = link / network(src=client, dst=server or default_server)

    def initial(frames: bytes, dcid: bytes, pn: int = 0) -> bytes:
        return quic_samples.client_initial(quic_samples.QUIC_V1, dcid, b"", pn, frames)

    def hello(name: str, post_quantum: bool = False) -> bytes:
        return quic_samples.client_hello(name, "batch", post_quantum=post_quantum)

    ordinary = quic_samples.crypto_frame(0, hello("www.example.org"))
    large = hello("www.example.org", post_quantum=True)
    watched_large = hello("dnl-03.geo.kaspersky.com", post_quantum=True)
    datagrams = {  # name: (client port, datagram)
        "ordinary": (50001, initial(ordinary, b"\x01" * 8)),
        "ordinary_again": (50001, initial(ordinary, b"\x01" * 8, pn=1)),
        "watched": (50002, initial(quic_samples.crypto_frame(0, hello("s07.upd.kaspersky.com")), b"\x02" * 8)),
        "large0": (50003, initial(quic_samples.crypto_frame(0, large[:1000]), b"\x03" * 8)),
        "large1": (50003, initial(quic_samples.crypto_frame(1000, large[1000:]), b"\x03" * 8, pn=1)),
        "ping": (50004, initial(b"\x01", b"\x04" * 8)),
        "watched_large0": (50005, initial(quic_samples.crypto_frame(0, watched_large[:1000]), b"\x05" * 8)),
        "watched_large1": (50005, initial(quic_samples.crypto_frame(1000, watched_large[1000:]), b"\x05" * 8,
                                          pn=1)),
    }
    return {name: bytes(up / UDP(sport=port, dport=443) / datagram)
            for name, (port, datagram) in datagrams.items()}


def _quic_samples():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_quic_samples", ROOT / "pcaps" / "make_quic_samples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_quic_samples", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tagged", [False, True], ids=["untagged", "vlan"])
@pytest.mark.parametrize("network", [IP, IPv6], ids=["ipv4", "ipv6"])
def test_what_the_fast_path_keeps_of_quic_initials(network, tagged):
    """A client Initial is decrypted on the buffer.  A ClientHello naming nothing watched
    is settled there, whole or over two datagrams (the first held in the Initial table), as
    are a retransmission and an Initial with no CRYPTO frame; only the datagram that
    completes a hello that may name a Kaspersky host reaches the full decoder.  Towards an
    address a Kaspersky name resolved to, every Initial goes to the full decoder."""
    frames = _quic_frames(network, tagged)
    decoder, yielded, records = _through_the_fast_path(frames)
    assert yielded == ["watched", "watched_large1"]
    assert [r.server_name.text for r in records if isinstance(r, ClientHello)] == [
        "s07.upd.kaspersky.com", "dnl-03.geo.kaspersky.com"]
    assert decoder.stats.decoded == len(frames)
    assert [conn.done for conn in decoder.quic.connections.values()] == [True] * 4
    stamped = _one_ms_apart(frames)
    assert _batched(stamped) == _one_by_one(stamped)
    server = "198.51.100.7" if network is IP else "2001:db8::7"
    answered = frozenset([socket.inet_pton(socket.AF_INET if network is IP else socket.AF_INET6, server)])
    towards = _one_ms_apart(_quic_frames(network, tagged, server))
    outcome = _batched(towards, answered=answered)
    assert outcome == _one_by_one(towards, answered=answered)
    assert sum(record.startswith("FlowStart") for record in outcome[0]) == 5, "one per connection"


@LEADS
def test_a_connection_inside_vxlan_stays_on_the_buffer(lead):
    """Inside a tunnel the capture filter cannot drop a server's pure ACK, a media datagram
    or QUIC's short and server-sent long headers: the batch path judges them as the full
    decoder would (the ACK for capture loss) without decoding them."""
    frames = _flow_frames(IP, False, b"www.example.org")
    down = Ether() / IP(src="198.51.100.20", dst="192.0.2.10")
    # The server's ACK of bytes past the hello, before its flight: no stream of its own yet.
    ack = bytes(down / TCP(sport=443, dport=50000, flags="A", seq=78, ack=1000 + 5000))
    names = list(frames)
    frames = {name: frames[name] for name in names[:names.index("hello") + 1]} | {"server_ack": ack} \
        | {name: frames[name] for name in names[names.index("hello") + 1:]}
    frames["rtp"] = bytes(Ether() / IP(src="192.0.2.10", dst="198.51.100.30")
                          / UDP(sport=16384, dport=16386) / (b"\x80\x00" + bytes(170)))
    frames["quic_short"] = bytes(Ether() / IP(src="192.0.2.10", dst="198.51.100.40")
                                 / UDP(sport=50001, dport=443) / (b"\x41" + bytes(60)))
    frames["quic_server"] = bytes(Ether() / IP(src="198.51.100.40", dst="192.0.2.10")
                                  / UDP(sport=443, dport=50001) / (b"\xc3" + bytes(60)))
    wrapped = {name: in_vxlan(frame, 0) for name, frame in frames.items()}
    if lead:
        wrapped = {"lead": bytes(Ether() / IP(src="192.0.2.99", dst="192.0.2.98")
                                 / UDP(sport=16384, dport=16386) / bytes(40)), **wrapped}
    decoder, yielded, _ = _through_the_fast_path(wrapped)
    assert yielded == []
    if not lead:  # remote span's ERSPAN II and III, read at their inner frames as a batch
        assert _through_the_fast_path({name: in_erspan2(frame) for name, frame in frames.items()})[1] == []
        assert _through_the_fast_path({name: in_erspan3(frame) for name, frame in frames.items()})[1] == []
    stamped = _one_ms_apart(wrapped)
    outcome = _batched(stamped)
    assert outcome == _one_by_one(stamped)
    assert outcome[5]["acks"] > 0, "the server's ACK was judged"


def test_udp_to_a_tunnel_port_never_meets_the_dns_screen():
    """From port 53 to VXLAN's, with the bit DNS calls a response set in VXLAN's reserved
    byte and no I flag: the full decoder reads a tunnel and counts it malformed, so the
    batch path must not drop it as DNS from a resolver it already reported."""
    from scapy.layers.dns import DNS, DNSQR

    resolver, client = "192.0.2.1", "10.0.0.5"
    answer = bytes(Ether() / IP(src=resolver, dst=client) / UDP(sport=53, dport=40000)
                   / DNS(id=1, qr=1, qd=DNSQR(qname="www.example.org")))
    query = bytes(Ether() / IP(src=client, dst="10.0.0.53") / UDP(sport=40001, dport=53)
                  / DNS(id=2, qd=DNSQR(qname="www.example.net")))
    tunnel = bytearray(in_vxlan(query, 69))  # untagged IPv4, from port 53, no I flag
    tunnel[26:30] = bytes(map(int, resolver.split(".")))
    tunnel[44] = 0x80  # VXLAN's second reserved byte, where a DNS header's QR bit sits
    stamped = _one_ms_apart({"answer": answer, "tunnel": bytes(tunnel)})
    outcome = _batched(stamped)
    assert outcome == _one_by_one(stamped)
    assert outcome[4] == {"vxlan_no_vni": 1}


def _http_frames(network, requests: list[bytes]) -> dict[str, bytes]:
    """One HTTP connection: SYN, SYN-ACK, ``requests`` one segment each (keep-alive), FINs."""
    client, server = (("192.0.2.10", "198.51.100.20") if network is IP
                      else ("2001:db8::10", "2001:db8:1::20"))
    up = Ether() / network(src=client, dst=server)
    down = Ether() / network(src=server, dst=client)
    seq = 5000
    frames = {
        "syn": up / TCP(sport=50001, dport=80, flags="S", seq=seq - 1),
        "syn_ack": down / TCP(sport=80, dport=50001, flags="SA", seq=900, ack=seq),
    }
    for n, request in enumerate(requests):
        frames[f"request{n}"] = up / TCP(sport=50001, dport=80, flags="PA", seq=seq, ack=901) / request
        seq += len(request)
    frames["fin"] = up / TCP(sport=50001, dport=80, flags="FA", seq=seq, ack=901)
    frames["server_fin"] = down / TCP(sport=80, dport=50001, flags="FA", seq=901, ack=seq + 1)
    return {name: bytes(frame) for name, frame in frames.items()}


def _get(host: bytes, path: bytes = b"/files/a.bin", extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nAccept: */*\r\n" + extra + b"\r\n"


@pytest.mark.parametrize("requests, kept, hosts", [
    ([_get(b"www.example.org")], [], []),
    ([_get(b"S07.UPD.Kaspersky.com")], ["request0"], ["S07.UPD.Kaspersky.com"]),
    ([_get(b"10.0.0.5:8060", b"/Updates/index/u0607g.xml")], ["request0"], ["10.0.0.5"]),
    ([_get(b"[fd00::5]", b"/Updates/index/u0607g.xml")], ["request0"], ["fd00::5"]),
    ([_get(b"www.example.org"), _get(b"dnl-03.geo.kaspersky.com")], ["request1"],
     ["dnl-03.geo.kaspersky.com"]),
    ([_get(b"www.example.org", extra=b"Content-Length: 4\r\n") + b"body"], ["request0"], []),
], ids=["ruled-out", "kaspersky-host", "ip-literal-host", "ipv6-literal-host",
        "second-request-on-the-connection", "request-with-body"])
@pytest.mark.parametrize("network", [IP, IPv6], ids=["ipv4", "ipv6"])
def test_what_the_fast_path_keeps_of_http_requests(network, requests, kept, hosts):
    """A request head that fills its segment and names no indicator (nor an IP-literal
    host, on which a URL path alone can match) is read into the stream on the buffer and
    dropped unparsed, as the full decoder drops it; the stream stays open, so a later
    request on the same connection is still read.  A segment carrying more than the head
    takes the full path.  Either way the outcome equals decoding frame by frame."""
    frames = _http_frames(network, requests)
    _, yielded, records = _through_the_fast_path(frames)
    assert yielded == kept
    assert [r.host.text for r in records if isinstance(r, HttpRequest)] == hosts
    stamped = _one_ms_apart(frames)
    assert _batched(stamped) == _one_by_one(stamped)


_HOSTS = [b"s07.upd.kaspersky.com", b"DNL-03.GEO.Kaspersky.COM", b"activation-v2.kaspersky.com",
          b"10.0.0.5", b"192.168.1.20:8060", b"[fd00::5]", b"[fd00::5]:8080", b"fd00::5",
          b"www.example.org", b"update.example.com:8080", b"kaspersky.example", b"1password.com"]
_PATHS = [b"/Updates/index/u0607g.xml", b"/diffs/bases/av/kdb/i386/kdb.kdc",
          b"/activationservice/activationservice.svc", b"/index.html", b"/"]


@st.composite
def request_heads(draw):
    host, path = draw(st.sampled_from(_HOSTS)), draw(st.sampled_from(_PATHS))
    form = draw(st.sampled_from(["origin", "absolute", "connect", "folded", "spaced"]))
    if form == "absolute":
        return b"GET http://" + host + path + b" HTTP/1.1\r\nAccept: */*\r\n\r\n"
    if form == "connect":
        return b"CONNECT " + host + b":443 HTTP/1.1\r\n\r\n"
    if form == "folded":
        return b"GET " + path + b" HTTP/1.1\r\nHost:\r\n " + host + b"\r\n\r\n"
    name = b"  HOST  " if form == "spaced" else b"Host"
    return b"GET " + path + b" HTTP/1.1\r\n" + name + b": " + host + b"\r\nUser-Agent: x/1.0\r\n\r\n"


@settings(max_examples=400, deadline=None)
@given(request_heads())
def test_the_request_screen_passes_every_request_that_can_match(head):
    """request_may_match may pass requests that cannot match (they are parsed, that is
    all), never the reverse: any request the full decoder and detector would report is
    let through, whether by its host's labels or as an IP-literal host with a URL path."""
    from sensor.decode.http import parse_http_request
    from sensor.detect.engine import Detector
    from sensor.records import DecodeError, PacketContext

    ctx = PacketContext(1.0, "192.0.2.10", "198.51.100.20", 50001, 80, "tcp", 4, "", "")
    try:
        request = parse_http_request(head, ctx)
    except DecodeError:
        return
    if Detector(SIGNATURES, Stats()).detect(request):
        assert _decoder().interest.request_may_match(head)


def test_the_request_screen_rules_out_ordinary_requests():
    interest = _decoder().interest
    assert not interest.request_may_match(_get(b"www.example.org"))
    assert not interest.request_may_match(_get(b"cdn2.example.net", b"/10.0.0.5/index/u0607g.xml"))
    assert interest.request_may_match(_get(b"10.0.0.5:8060", b"/Updates/index/u0607g.xml"))


@st.composite
def mutated_frames(draw):
    pool = FRAMES + WRAPPED + SERVICE_TAGGED
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=40))
    out = []
    for index in picks:
        data = bytearray(pool[index][1])
        for _ in range(draw(st.integers(0, 3))):
            if not data:
                break
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            data = data[:draw(st.integers(0, len(data)))]
        out.append(bytes(data))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_frames())
def test_mutated_frames_give_the_same_records_and_counters(frames):
    stamped = _times([(0.0, data) for data in frames])
    assert _batched(stamped) == _one_by_one(stamped)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(-1.5, 0.5), st.floats(57.5, 61.0)), min_size=1, max_size=12),
       st.sampled_from([IP, IPv6]))
def test_screened_dns_reports_agree_at_the_ends_of_the_report_interval(steps, network):
    """A resolver's screened-out DNS is skipped on the buffer only within
    RESOLVER_REPORT_INTERVAL of its last report, judged from the whole second where that
    settles it: at times just inside, at and past the interval's end (and a clock that
    steps back), the buffer reports exactly what decoding each frame does."""
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import UDP

    client, server = ("192.0.2.10", "198.51.100.53") if network is IP else ("2001:db8::10", "2001:db8::53")
    link = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    query = bytes(link / network(src=client, dst=server) / UDP(sport=40000, dport=53)
                  / DNS(id=7, qd=DNSQR(qname="www.example.org")))
    answer = bytes(link / network(src=server, dst=client) / UDP(sport=53, dport=40000)
                   / DNS(id=7, qr=1, qd=DNSQR(qname="www.example.org")))
    ts = 1_700_000_000.25
    frames = []
    for step in steps:
        ts += step
        frames += [(round(ts, 6), query), (round(ts + 0.0004, 6), answer)]
    assert _batched(frames) == _one_by_one(frames)


def test_screened_dns_within_the_report_interval_stays_on_the_buffer():
    """The point of the DNS screen on the buffer: after a resolver's report, its queries
    and answers that hold no signature label are not sliced out again until the interval
    has passed (only the frame that runs the table expiry, once a second, takes the full
    path), in either direction and for both address families."""
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import UDP

    from sensor.records import DnsMessage

    for network, client, server in ((IP, "192.0.2.10", "198.51.100.53"),
                                     (IPv6, "2001:db8::10", "2001:db8::53")):
        link = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        query = bytes(link / network(src=client, dst=server) / UDP(sport=40000, dport=53)
                      / DNS(id=7, qd=DNSQR(qname="www.example.org")))
        answer = bytes(link / network(src=server, dst=client) / UDP(sport=53, dport=40000)
                       / DNS(id=7, qr=1, qd=DNSQR(qname="www.example.org")))
        decoder = _decoder()
        frames = [(1_700_000_000 + n * 0.25 + part * 0.001, data)
                  for n in range(260) for part, data in enumerate((query, answer))]
        buf, meta = _batch(frames)
        yielded = 0
        reports = []
        for ts, frame, _ in decoder.ethernet_batch(buf, meta):
            yielded += 1
            reports += [r.ctx.ts for r in decoder.decode(ts, 1, frame) if isinstance(r, DnsMessage)]
        assert yielded <= 70, "about one frame a second, for the table expiry"
        assert [round(ts - 1_700_000_000) for ts in reports] == [0, 0, 60, 60]


@pytest.mark.parametrize("n", range(5))
def test_a_tunnel_frame_cut_anywhere_at_the_end_of_a_batch(n):
    """The tunnel test reads a frame's headers up to VXLAN's flags (_tunnel_inner): a frame
    cut short, last in its batch, has nothing after it to read.  Found by the batch fuzz
    target (an IPv6 frame 62 bytes from its tag)."""
    whole = in_erspan2(FRAMES[0][1], n) if n == 3 else in_erspan3(FRAMES[0][1], n) if n == 4 \
        else in_vxlan(FRAMES[0][1], n)
    assert _tunnel_inner(whole, 0, len(whole)) is not None
    for cut in range(len(whole)):
        assert _tunnel_inner(whole[:cut], 0, cut) is None
        for lead in ([], FRAMES[:1]):
            buf, meta = _batch([*lead, (FRAMES[0][0], whole[:cut])])
            handed = [frame for _, frame, _ in _decoder().ethernet_batch(buf, meta)]
            assert handed[-1] == whole[:cut]  # the full path counts what is cut short
