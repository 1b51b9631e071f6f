"""Flow shunting: the bulk of a TCP connection the decoder is done with is dropped by
libpcap's filter program, before it costs Python anything.

The capture filter has to pass a client's data segments, because it cannot tell the second
segment of a large ClientHello from an upload's (capture.bpf).  The decoder then drops an
upload's segments one by one in its stream bypass, at about 12,000 instructions each:
on the benchmark mix these 74,000 segments were a third of the decoder's work.  Suricata
and Zeek shed such flows in the capture layer ("bypass", "shunting"); a file read through
libpcap has no flow table in C, but its filter program can be replaced between two batches.

A flow is shunted once it is ``decode.packet.SHUNT_AFTER`` bytes past the start of a stream
the decoder bypasses; from then on the capture-loss estimate stops judging it, as its later
bytes are not seen by design.  A flow already under way when the capture started (no SYN
seen) is shunted too: on a span port these are the uploads running when the sensor starts.
ShuntTable keeps the flows, at most MAX_FLOWS, the oldest evicted first, and builds the
program: the capture filter's own instructions, each accepting return turned into a jump to
the flows' tests, which drop a shunted flow's segments without SYN, FIN or RST whose sequence
number lies within SEQ_WINDOW bytes of where it was shunted, and accept every other frame.
The window is what keeps a new connection on the same ports, started before the program
without the old flow takes effect, from losing its hello.  The filter rejects most of a
span port's frames, so the tests run on the few it accepts.  FIN and RST still reach the decoder, which closes the stream and
discards the flow here.

The tests read untagged or single-tagged Ethernet frames, Linux cooked frames (SLL and
SLL2, which ``tcpdump -i any`` writes) and bare IP, each where its FrameLayout says: IPv4
without options or fragments, and IPv6 without extension headers, as the decoder's batch
loop does.  They find a flow by its TCP port word (client port and server port), scanning
runs of flows sorted by it, then compare the addresses and the flags.  Every load they make
is inside the frame whatever the frame holds: frames with under MIN_PACKET bytes from the network
header on skip them, and libpcap is only given them for captures whose snap length is at
least MIN_SNAPLEN, where such frames were kept whole.  A load past the captured bytes
would reject the packet.

Only ``read`` shunts, through PrefilteredCapture: the reader thread installs a new program
between batches (pcap handles are not thread-safe), LAG_BATCHES batches after the one the
decoder asked in.  Live capture keeps the per-flow bypass in Python.
"""

from __future__ import annotations

import struct
import threading
from typing import NamedTuple

from .bpf_code import (AND_K, INSN, JA, JEQ, JGE, JSET, LD_IND, LD_LEN, LDB_IND, LDH_ABS, LDH_IND, LDX_IMM,
                       RET, SUB_K, SUB_X, insn)
from .dns_screen import MAX_SERVERS as MAX_DNS_SERVERS
from .dns_screen import build_stage as build_dns_stage
from .dns_screen import label_prefixes

MAX_FLOWS = 128
# Batches between the one a flow is shunted in and the first read without it: the reader
# keeps this many batches ahead of the consumer.
LAG_BATCHES = 3
# The first batches (of capture.bpf.SHUNTING_BATCH frames) are read with the capture filter
# alone, without waiting for the consumer: libpcap reads them while the sensor starts up.
# Few: the decoder, not libpcap, sets the pace, and every frame read before the first program
# is a frame the decoder drops itself.  64 (when start-up took longer) let 7,800 more of an
# upload's segments reach the decoder on the benchmark mix, for no measurable gain in time.
UNSHUNTED_BATCHES = 8
MIN_SNAPLEN = 128
# Bytes from the network header on (behind a tag, if any): frames shorter skip the tests.
MIN_PACKET = 50  # the IPv4 tests read at most 38 bytes in, behind a tag (TCP flags at 33)
MIN_IPV6_PACKET = 58  # TCP flags at 53
MAX_PROGRAM = 4096  # instructions, the kernel's BPF_MAXINSNS: libpcap's own limit for a live filter
LEAF = 8  # flows compared one after another in a run of the search
# A flow's segments are dropped from the sequence number it was shunted at up to this many
# bytes on: a new connection on the same ports (its own initial sequence number, random)
# lands there once in 64.  The decoder shunts an upload anew once it is past the window.
SEQ_WINDOW = 1 << 26
IPV4_KEY = 12  # source and destination address, then the port word: decoder's flow key
IPV6_KEY = 36
# Where the tests read a packet's addresses, port word and TCP flags, from its network header.
IPV4_ADDRESSES, IPV4_PORTS, IPV4_FLAGS = 12, 20, 33
IPV6_ADDRESSES, IPV6_PORTS, IPV6_FLAGS = 8, 40, 53


class FrameLayout(NamedTuple):
    """Where a link type's frames hold what the tests read: the offset of their Ethernet
    type field (None for bare IP, told by its version) and of the network header behind
    it.  A type of 0x8100 puts a tag's four bytes before the network header, its inner
    type two bytes in, as Ethernet's does."""

    type_at: int | None
    network_at: int


ETHERNET = FrameLayout(12, 14)

_TCP_SYN_FIN_RST = 0x07


def _block_template(key_length: int) -> tuple[bytes, tuple[int, ...]]:
    """The test of one flow (see _entry_block) with its compared words zero, and where each
    word goes: the address words' compares, the port word's (the first), then the sequence
    number the window starts at."""
    v4 = key_length == IPV4_KEY
    address_at = IPV4_ADDRESSES if v4 else IPV6_ADDRESSES  # from the network header, in X
    ports_at = IPV4_PORTS if v4 else IPV6_PORTS
    flags_at = IPV4_FLAGS if v4 else IPV6_FLAGS
    addresses = key_length // 4 - 1
    # i0 ports, then per address word (load, compare), flags (load, jset), the sequence
    # number's distance from the window's start (load, subtract, compare), ret, reload.
    size = 1 + 2 * addresses + 2 + 3 + 1 + 1
    reload = size - 1
    body = [insn(JEQ, 0, 0, size - 1)]
    places = []
    for index in range(addresses):
        position = 1 + 2 * index
        body.append(insn(LD_IND, address_at + 4 * index))
        places.append((position + 1) * INSN.size + 4)
        body.append(insn(JEQ, 0, 0, reload - (position + 1) - 1))
    body.append(insn(LDB_IND, flags_at))
    body.append(insn(JSET, _TCP_SYN_FIN_RST, 4, 0))
    body.append(insn(LD_IND, ports_at + 4))
    window_start = len(body) * INSN.size + 4
    body.append(insn(SUB_K, 0))
    body.append(insn(JGE, SEQ_WINDOW, 1, 0))
    body.append(insn(RET, 0))
    body.append(insn(LD_IND, ports_at))
    return b"".join(body), (*places, 4, window_start)


_TEMPLATES = {length: (struct.Struct(f"!{length // 4}I"), *_block_template(length))
              for length in (IPV4_KEY, IPV6_KEY)}
_WORD = struct.Struct("=I")


def _entry_block(key: bytes, seq: int) -> tuple[int, bytes, int]:
    """The port word, the position-independent test of one flow and ``seq``: with the port
    word in A and the network header's offset in X, drop the frame if it is this flow's,
    carries no SYN, FIN or RST and its sequence number lies in the SEQ_WINDOW bytes from
    ``seq``; otherwise reload the port word and fall through to the next test."""
    words_of, template, places = _TEMPLATES[len(key)]
    words = (*words_of.unpack(key), seq & 0xFFFFFFFF)
    block = bytearray(template)
    for place, word in zip(places, words):
        _WORD.pack_into(block, place, word)
    return words[-2], bytes(block), seq


def _family(entries: list) -> bytes:
    """A search over ``entries`` ((port word, block, sequence number) triples) on the port
    word in A: the entries sorted and cut into runs of LEAF flows (longer where a port word
    would straddle two runs), each run behind a test that skips it when A is at least the
    next run's first port word, its flows compared one after another; every way out of it
    leads to its end.  The program is rebuilt after nearly every batch of a shunting read
    (176 of 178 on the 858 MB mix): with 100 flows it now takes 45 us, against 116 us when
    the search was a binary tree, for a few more instructions in libpcap per frame the
    capture filter accepts (at most MAX_FLOWS / LEAF runs to skip)."""
    entries.sort()
    count = len(entries)
    runs = []  # (the run's blocks, their instructions, the next run's first port word)
    start = 0
    while start < count:
        end = min(start + LEAF, count)
        while end < count and entries[end][0] == entries[end - 1][0]:
            end += 1
        blocks = b"".join([entry[1] for entry in entries[start:end]])
        runs.append((blocks, len(blocks) // INSN.size, entries[end][0] if end < count else None))
        start = end
    total = sum(size + (1 if following is None else 3) for _, size, following in runs)
    parts = []
    position = 0
    for blocks, size, following in runs:
        if following is not None:
            # A >= the next run's first port word: over this run and its way out.
            parts.append(insn(JGE, following, 0, 1))
            parts.append(insn(JA, size + 1))
            position += 2
        parts.append(blocks)
        position += size + 1
        parts.append(insn(JA, total - position))
    return b"".join(parts)


def build_program(flows, main: bytes, layout: FrameLayout = ETHERNET) -> bytes | None:
    """The tests for ``flows`` ((key, sequence number) pairs; a key is the decoder's flow
    key: IPv4 or IPv6 source and destination address, then the port word) behind the filter
    program ``main`` (libpcap's instructions), for frames laid out as ``layout`` says, or
    ``main`` alone when there are none; None for a program that does
    not accept by a constant (_leading)."""
    leading = _leading(main)
    if leading is None:
        return None
    return _program([_entry_block(key, seq) for key, seq in flows], main, _tests(layout), *leading)


def _leading(main: bytes) -> tuple[bytes, int] | None:
    """``main`` with every accepting return turned into a jump past its end, where the
    flows' tests follow, and the length it accepts with; None when it returns A or accepts
    with more than one length (libpcap's programs return the snap length or 0)."""
    code = bytearray(main)
    count = len(main) // INSN.size
    accepted = set()
    for index in range(count):
        op, _, _, k = INSN.unpack_from(code, index * INSN.size)
        if op & 0x07 == RET:
            if op != RET:
                return None
            if k:
                accepted.add(k)
                INSN.pack_into(code, index * INSN.size, JA, 0, 0, count - index - 1)
    if len(accepted) != 1:
        return None
    return bytes(code), accepted.pop()


_IPV4_BLOCK = 12 * INSN.size
_OUT = 27


def _tests(layout: FrameLayout) -> bytes:
    """The tests before the flows' searches, the same in every program of a capture whose
    frames hold their type and network header where ``layout`` says: 0-7 the frame's type
    behind at most one tag; IPv4 8-15; IPv6 16-25, with the port word loaded in A and the
    network header's offset in X.  26 jumps to the IPv6 search and 27, the way out, to the
    accepting return.  Bare IP frames (no type field) have tests of their own (_ip_tests)."""
    if layout.type_at is None:
        return _ip_tests()
    network_at = layout.network_at
    return b"".join([
        insn(LD_LEN),                                   # 0
        insn(JGE, MIN_PACKET + network_at, 0, _OUT - 2),  # 1
        insn(LDX_IMM, network_at),                      # 2
        insn(LDH_ABS, layout.type_at),                  # 3
        insn(JEQ, 0x8100, 0, 2),                        # 4
        insn(LDX_IMM, network_at + 4),                  # 5
        insn(LDH_ABS, network_at + 2),                  # 6
        insn(JEQ, 0x0800, 0, 8),                        # 7: to 16
        *_ipv4_tests(8, _OUT, _OUT),                      # 8-15
        insn(JEQ, 0x86DD, 0, _OUT - 17),                # 16
        *_ipv6_tests(17, _OUT),                           # 17-25
    ])


def _ipv4_tests(at: int, out: int, otherwise: int) -> list[bytes]:
    """Eight instructions from ``at``, the network header's offset in X: an IPv4 packet
    without options or fragments that carries TCP gets its port word loaded in A and goes
    on to the IPv4 search, just past the way ``out``; a first byte other than 0x45 goes to
    ``otherwise`` (A still holds it), any other packet out."""
    return [
        insn(LDB_IND, 0),
        insn(JEQ, 0x45, 0, otherwise - (at + 2)),
        insn(LDB_IND, 9),
        insn(JEQ, 6, 0, out - (at + 4)),
        insn(LDH_IND, 6),
        insn(JSET, 0x3FFF, out - (at + 6), 0),
        insn(LD_IND, IPV4_PORTS),
        insn(JA, out + 1 - (at + 8)),
    ]


def _ipv6_tests(at: int, out: int) -> list[bytes]:
    """Nine instructions from ``at``, the network header's offset in X: an IPv6 packet long
    enough for the tests whose next header is TCP gets its port word loaded in A and falls
    through (to the jump to the IPv6 search); any other packet goes ``out``."""
    return [
        insn(LD_LEN),
        insn(SUB_X),
        insn(JGE, MIN_IPV6_PACKET, 0, out - (at + 3)),
        insn(LDB_IND, 6),
        insn(JEQ, 6, 0, out - (at + 5)),
        insn(LDB_IND, 0),
        insn(AND_K, 0xF0),
        insn(JEQ, 0x60, 0, out - (at + 8)),
        insn(LD_IND, IPV6_PORTS),
    ]


def _ip_tests() -> bytes:
    """_tests for bare IP frames (raw IP, tun and WireGuard interfaces), told apart by their
    version: the network header at 0 (in X), the way out at 21."""
    out = 21
    return b"".join([
        insn(LD_LEN),                                   # 0
        insn(JGE, MIN_PACKET, 0, out - 2),              # 1
        insn(LDX_IMM, 0),                               # 2
        *_ipv4_tests(3, out, 11),                         # 3-10, to 11 if not IPv4
        *_ipv6_tests(11, out),                            # 11-19
    ])

# The tests and the way out; and the most one flow can add: an IPv6 flow's test, its share
# of the search (a run's test, its jump over the run and its way out).
_TESTS_FIXED = 30
_IPV6_FLOW_COST = 24 + 3


def _program(blocks: list, main: bytes, tests: bytes, leading: bytes, accept: int,
             dns_stage: bytes = b"") -> bytes:
    """build_program from the flows' _entry_block, _tests and _leading's result: the capture
    filter runs first, and only a frame it accepts meets the flows' tests (most frames on a
    span port are rejected by it), after ``dns_stage`` (capture.dns_screen), if any."""
    if not blocks:
        return leading + dns_stage + insn(RET, accept) if dns_stage else main
    v4 = [entry for entry in blocks if len(entry[1]) == _IPV4_BLOCK]
    v6 = [entry for entry in blocks if len(entry[1]) != _IPV4_BLOCK]
    ipv6 = _family(v6)
    n6 = len(ipv6) // INSN.size
    # The IPv4 search ends in a jump over the IPv6 one, to the accepting return.
    ipv4 = _family(v4) + insn(JA, n6)
    n4 = len(ipv4) // INSN.size
    # The way out (27) follows the tests, then the IPv4 search (from 28), then the IPv6 one.
    return b"".join((leading, dns_stage, tests, insn(JA, 1 + n4), insn(JA, n4 + n6), ipv4, ipv6,
                     insn(RET, accept)))


class ShuntTable:
    """The flows shunted in one capture, and the filter programs that drop them.

    The consumer's thread adds and discards flows while it decodes a batch; once it is done
    with batch ``i`` (``finished``), the program for the flows then shunted is the one for
    batch ``i + LAG_BATCHES``, which the reader thread installs before reading that batch
    (``program_for``), waiting for it if need be.  What a flow's packets meet therefore
    depends on the capture alone, not on how far ahead the reader happened to be: a read
    counts the same packets and judges the same capture loss every time.  Before it decodes
    a batch the consumer learns which flows it is the first read without (``entering``,
    ``take_started``): only from there on is a flow shunted, for the capture-loss estimate and
    the counters.  ``main`` is the capture filter's program, which runs first."""

    renew_after = SEQ_WINDOW // 2

    def __init__(self, main: bytes, layout: FrameLayout = ETHERNET, dns: bool = False):
        """``dns``: the capture keeps every DNS message whole (capture.dns_screen), so the
        program may also drop known servers' messages that name nothing."""
        self.main = main
        self._layout = layout
        self._tests = _tests(layout)
        # As many flows as keep the program within MAX_PROGRAM: a user's --bpf lengthens it.
        room = MAX_PROGRAM - len(main) // INSN.size - _TESTS_FIXED
        self._leading = _leading(main)
        self.max_flows = max(0, min(MAX_FLOWS, room // _IPV6_FLOW_COST)) if self._leading else 0
        self.lag = LAG_BATCHES
        self.unshunted = max(UNSHUNTED_BATCHES, LAG_BATCHES)
        self.flows: dict[bytes, tuple[int, bytes, int]] = {}  # key: its _entry_block
        self.changed = False
        self.program = main
        self.evicted = 0
        # Cleared when libpcap refuses a program: flows are then bypassed in Python only.
        self.enabled = True
        self._decided = threading.Condition()
        self._programs: dict[int, bytes] = {}  # by the batch they are for
        self._finished = -1
        self._program_keys: frozenset = frozenset()  # the flows ``program`` drops
        self._keys: frozenset = frozenset()  # those of the program for the last batch decided
        self._starting: dict[int, tuple] = {}  # the flows each batch is the first to drop
        # The flows the batch being decoded is the first read without (``entering``).
        self._started: tuple = ()
        # Flows discarded since the last program, and those of them shunted again.
        self._discarded: set[bytes] = set()
        self._reopened: set[bytes] = set()
        # DNS servers whose messages naming no screened label the program drops.
        self._dns_possible = dns and self._leading is not None
        self._dns_prefixes: tuple[int, ...] | None = None
        self.dns_servers: dict[bytes, None] = {}
        self._dns_stage = b""

    @property
    def dns_enabled(self) -> bool:
        return self.enabled and self._dns_prefixes is not None

    def screen_dns(self, labels) -> None:
        """Search DNS messages for ``labels`` (the decoder's screen, in wire format without
        their length bytes); None, or labels the program cannot search, leaves every DNS
        message to the decoder."""
        prefixes = label_prefixes(labels) if labels and self._dns_possible else None
        if prefixes != self._dns_prefixes:
            self._dns_prefixes = prefixes
            self.dns_servers.clear()
            self._build_dns_stage()

    def list_dns_server(self, pair: bytes) -> bool:
        """Drop the messages of ``pair`` (a server's address and b"q" for the queries to it
        or b"r" for its responses, as the decoder's resolver reports key them) that hold
        none of the labels; False when the stage is off or full."""
        if not self.dns_enabled or pair in self.dns_servers or len(self.dns_servers) >= MAX_DNS_SERVERS:
            return False
        self.dns_servers[pair] = None
        self._build_dns_stage()
        return True

    def unlist_dns_server(self, pair: bytes) -> None:
        if self.dns_servers.pop(pair, False) is None:
            self._build_dns_stage()

    def _build_dns_stage(self) -> None:
        if self.dns_servers and self._dns_prefixes is not None:
            self._dns_stage = build_dns_stage(self._layout.type_at, self._layout.network_at,
                                              list(self.dns_servers), self._dns_prefixes,
                                              self._leading[1])
        else:
            self._dns_stage = b""
        self.changed = True

    def add(self, key: bytes, seq: int) -> None:
        """Shunt ``key``'s segments from ``seq`` on, anew if it is shunted already: the
        decoder does so once a shunted flow's segment is ``renew_after`` bytes past the
        start of its window, as they reach it again once they pass the window's end."""
        if not self.enabled or not self.max_flows or len(key) not in (IPV4_KEY, IPV6_KEY):
            return
        if self.flows.pop(key, None) is None and len(self.flows) >= self.max_flows:
            del self.flows[next(iter(self.flows))]
            self.evicted += 1
        self.flows[key] = _entry_block(key, seq)
        self.changed = True
        if key in self._discarded:
            self._reopened.add(key)

    def discard(self, key: bytes) -> None:
        if self.flows.pop(key, None) is not None:
            self.changed = True
            self._discarded.add(key)

    def disable(self) -> None:
        """The reader's thread, when libpcap refused a program."""
        self.enabled = False

    def finished(self, index: int) -> None:
        """The consumer is done with batch ``index`` (counted from 0)."""
        reopened = frozenset()
        if self.changed and self.enabled:
            self.changed = False
            self.program = _program(list(self.flows.values()), self.main, self._tests, *self._leading,
                                    self._dns_stage)
            self._program_keys = frozenset(self.flows)
            # A flow discarded and shunted again since the last program is a new connection
            # on the same ports, though both programs hold its key.
            reopened = self._program_keys & self._reopened
            self._discarded.clear()
            self._reopened.clear()
        target = index + self.lag
        with self._decided:
            # Once disabled no reader pops these: they would grow by one a batch.
            if target >= self.unshunted and self.enabled:
                self._programs[target] = self.program
                started = (self._program_keys - self._keys) | reopened
                if started:
                    self._starting[target] = tuple(started)
                self._keys = self._program_keys
            self._finished = index
            self._decided.notify()

    def entering(self, index: int) -> None:
        """The consumer is about to decode batch ``index``."""
        self._started = self._starting.pop(index, ()) if self.enabled else ()

    def take_started(self) -> tuple:
        """The flows whose segments the batch being decoded is the first read without,
        once."""
        started, self._started = self._started, ()
        return started

    def program_for(self, index: int, stop: threading.Event) -> bytes | None:
        """The program to read batch ``index`` with, once the consumer has finished batch
        ``index - lag``; None once ``stop`` is set."""
        if index < self.unshunted:
            return self.main
        with self._decided:
            while self._finished < index - self.lag:
                if stop.is_set():
                    return None
                self._decided.wait(0.05)
            return self._programs.pop(index)
