"""The decoder's DNS name screen as a stage of a ``read``'s filter program: a known DNS
server's messages that name nothing the signatures know are dropped by libpcap.

DNS is a span port's most numerous evidence-bearing packet (a third to a half of what the
capture filter passes on the benchmark mixes), and nearly all of it names nothing of
Kaspersky's.  The decoder drops such a message unless its server was not reported to the
tracker in the last minute (decode.packet's Interest: a header-only DnsMessage goes out once
per server, direction and RESOLVER_REPORT_INTERVAL), and that report can only ever change
the tracker when the server is an internal address it does not yet know as a resolver
(Tracker.report_redundant).  For every other server (an external one, or a known resolver)
the decoder asks for the stage (ShuntTable.list_dns_server) and libpcap drops the messages
to or from it that hold none of the screen's labels.

The stage runs on the frames the capture filter accepts, before the shunted flows' tests.
It reads what the decoder's batch loop reads, where it reads it: untagged or single-tagged
Ethernet, Linux cooked frames and bare IP; IPv4 without options or fragments, IPv6 without
extension headers; a UDP datagram whose IP length the frame holds and which has room for a
DNS header.  A query (QR clear) goes to port 53 and its server is the destination; a
response (QR set) comes from port 53, not towards a tunnel's port, and its server is the
source.  A listed server's message then passes only when one of the screen's labels may be
in its names: the program searches its first SCAN_BYTES bytes past the DNS header (whose
twelve bytes hold no name: a label the decoder's screen finds there makes it parse a
message that names nothing) for each label's first four bytes (the length byte, then three
characters with the ASCII case bit set on both sides, so that it passes whatever the
case-insensitive screen matches and some more), and a longer message passes whole.  A load past the captured bytes ends the search with a reject, which is why
the stage is only used on captures whose snap length keeps every DNS message whole
(MIN_SNAPLEN): there, a frame shorter than its IP length has already been passed on to the
decoder, which counts it.

Nothing the decoder would have kept is dropped: it drops exactly these messages itself,
whenever its own per-minute report of the server is not due, and the reports it no longer
makes could not have changed anything but the order of the tracker's resolver table.
"""

from __future__ import annotations

import functools
import struct

from ..decode.tunnels import GENEVE_PORT, VXLAN_PORT
from .bpf_code import (ADD_K, ADD_X, AND_K, INSN, JA, JEQ, JGE, JGE_X, JGT, JSET, LD_IND, LD_LEN, LDB_ABS,
                       LDB_IND, LDH_ABS, LDH_IND, LDX_IMM, LDX_MEM, OR_K, RET, STX, SUB_X, TAX, TXA)

SCAN_BYTES = 512  # of a DNS message searched for the labels; a longer message passes whole
MAX_PREFIXES = 16  # distinct label openings the search compares at every byte
MAX_SERVERS = 24  # (server, direction) pairs, each list's jumps in reach; others stay the decoder's
MIN_SNAPLEN = 65535  # every DNS message over UDP is whole
CASE_BITS = 0x00202020  # the ASCII case bit of a label opening's three characters
_DNS_PORT = 53
DNS_HEADER = 12  # bytes before the first name: a label found in them names nothing
_QR = 0x80
QUERY, RESPONSE = b"q", b"r"  # a pair's last byte, as the decoder's resolver reports key it

_WORDS = {4: struct.Struct("!I"), 16: struct.Struct("!4I")}
_SAVED_X = 0  # the scratch word holding the network header's offset


def label_prefixes(labels) -> tuple[int, ...] | None:
    """The words the search compares with (a label's length byte and first three
    characters, case bits set), or None when the screen cannot be searched so: a label
    shorter than three characters, or too many openings to compare at every byte."""
    prefixes = set()
    for label in labels:
        if not 3 <= len(label) <= 63:
            return None
        prefixes.add(int.from_bytes(bytes((len(label),)) + label[:3], "big") | CASE_BITS)
    if not prefixes or len(prefixes) > MAX_PREFIXES:
        return None
    return tuple(sorted(prefixes))


class _Assembler:
    """Instructions with jumps to named places, resolved once the stage is complete."""

    def __init__(self) -> None:
        self.code: list[tuple] = []
        self.places: dict[str, int] = {}

    def op(self, code: int, k: int = 0, jt: str | None = None, jf: str | None = None) -> None:
        self.code.append((code, k, jt, jf))

    def jump(self, place: str) -> None:
        self.code.append((JA, place, None, None))

    def place(self, name: str) -> None:
        self.places[name] = len(self.code)

    def assemble(self) -> bytes:
        out = []
        for index, (code, k, jt, jf) in enumerate(self.code):
            if isinstance(k, str):
                k = self.places[k] - index - 1
            true = self.places[jt] - index - 1 if jt else 0
            false = self.places[jf] - index - 1 if jf else 0
            if not (0 <= true <= 255 and 0 <= false <= 255 and k >= 0):
                raise ValueError(f"DNS stage: a jump from instruction {index} out of range")
            out.append(INSN.pack(code, true, false, k))
        return b"".join(out)


def build_stage(type_at: int | None, network_at: int, servers, prefixes: tuple[int, ...],
                accept: int) -> bytes:
    """The stage for frames holding their type field at ``type_at`` (None: bare IP, told by
    its version) and their network header at ``network_at``; ``servers`` are (address,
    direction) pairs as the decoder keys them, ``accept`` the snap length the filter
    accepts with.  A frame it does not judge falls through past its end."""
    by_kind: dict[tuple[int, bytes], list[bytes]] = {}
    for pair in servers:
        by_kind.setdefault((len(pair) - 1, pair[-1:]), []).append(pair[:-1])
    asm = _Assembler()
    if type_at is None:
        asm.op(LDX_IMM, network_at)
        asm.op(LDB_ABS, network_at)
        asm.op(AND_K, 0xF0)
        asm.op(JEQ, 0x40, jt="v4")
        asm.op(JEQ, 0x60, jt="v6", jf="out")
    else:
        asm.op(LDX_IMM, network_at)
        asm.op(LD_LEN)
        asm.op(JGE, network_at + 4, jf="out")
        asm.op(LDH_ABS, type_at)
        asm.op(JEQ, 0x8100, jf="typed")
        asm.op(LDX_IMM, network_at + 4)
        asm.op(LDH_ABS, network_at + 2)
        asm.place("typed")
        asm.op(JEQ, 0x0800, jt="v4")
        asm.op(JEQ, 0x86DD, jt="v6", jf="out")
    # Conditional jumps reach 255 instructions: each part leaves through a jump of its own.
    asm.place("out")
    asm.jump("next")
    _family(asm, "v4", by_kind, 4, header=20)
    _family(asm, "v6", by_kind, 16, header=40)
    search = _search(prefixes, accept)
    asm.place("search")
    asm.places["next"] = len(asm.code) + len(search) // INSN.size
    return asm.assemble() + search


def _family(asm: _Assembler, name: str, by_kind: dict, width: int, header: int) -> None:
    """IPv4 (``width`` 4) or IPv6 (16): from ``name``, with the network header's offset in
    X, a message to or from a listed server goes to the search with its offset in X; any
    other frame goes ``next``."""
    udp = header
    message = udp + 8
    out = f"{name}-out"
    asm.place(name)
    asm.op(LD_LEN)
    asm.op(SUB_X)
    asm.op(JGE, message + DNS_HEADER, jf=out)
    if width == 4:
        asm.op(LDB_IND, 0)
        asm.op(JEQ, 0x45, jf=out)
        asm.op(LDB_IND, 9)
        asm.op(JEQ, 17, jf=out)
        asm.op(LDH_IND, 6)
        asm.op(JSET, 0x3FFF, jt=out)
        length_at, length_adds = 2, 0  # the total length counts the header
    else:
        asm.op(LDB_IND, 0)
        asm.op(AND_K, 0xF0)
        asm.op(JEQ, 0x60, jf=out)
        asm.op(LDB_IND, 6)
        asm.op(JEQ, 17, jf=out)
        length_at, length_adds = 4, header  # the payload length does not
    # Room for the UDP and DNS headers, and all of the datagram in the frame.
    asm.op(LDH_IND, length_at)
    asm.op(JGE, message + DNS_HEADER - length_adds, jf=out)
    asm.op(STX, _SAVED_X)
    asm.op(ADD_X)
    if length_adds:
        asm.op(ADD_K, length_adds)
    asm.op(TAX)
    asm.op(LD_LEN)
    asm.op(JGE_X, jf=out)
    asm.op(LDX_MEM, _SAVED_X)
    # A query to port 53 is its destination's; a response from port 53, not towards a
    # tunnel's port, its source's (the batch loop's order of tests).
    asm.op(LDB_IND, message + 2)
    asm.op(JSET, _QR, jt=f"{name}-response")
    asm.op(LDH_IND, udp + 2)
    asm.op(JEQ, _DNS_PORT, jt=f"{name}-query", jf=out)
    asm.place(f"{name}-response")
    asm.op(LDH_IND, udp)
    asm.op(JEQ, _DNS_PORT, jf=out)
    asm.op(LDH_IND, udp + 2)
    asm.op(JEQ, VXLAN_PORT, jt=out)
    asm.op(JEQ, GENEVE_PORT, jt=out)
    source_at = header - 2 * width
    _servers(asm, f"{name}-source", by_kind.get((width, RESPONSE), []), source_at, name)
    asm.place(f"{name}-query")
    _servers(asm, f"{name}-destination", by_kind.get((width, QUERY), []), source_at + width, name)
    asm.place(f"{name}-listed")
    asm.op(TXA)
    asm.op(ADD_K, message)
    asm.op(TAX)
    asm.jump("search")
    asm.place(out)
    asm.jump("next")


def _servers(asm: _Assembler, name: str, addresses: list[bytes], at: int, family: str) -> None:
    """Whether the address at ``at`` (from X) is one of ``addresses``: on to the family's
    search if so, ``next`` if not."""
    for index, address in enumerate(addresses):
        words = _WORDS[len(address)].unpack(address)
        for offset, word in enumerate(words):
            asm.op(LD_IND, at + 4 * offset)
            asm.op(JEQ, word, jt=f"{name}-hit" if offset == len(words) - 1 else None,
                   jf=f"{name}-{index + 1}")
        asm.place(f"{name}-{index + 1}")
    asm.jump("next")
    asm.place(f"{name}-hit")
    asm.jump(f"{family}-listed")


@functools.lru_cache(maxsize=4)
def _search(prefixes: tuple[int, ...], accept: int) -> bytes:
    """With a message's offset in X: accept it when one of ``prefixes`` may start at one of
    its first SCAN_BYTES bytes past the DNS header, or when it is longer; the load past its
    end rejects it.  Most bytes of a message are not a screened label's length and are let
    go after one load and two compares.  An accepting return follows every run of positions
    that the jumps can reach.  The same for every list of servers: written out once, at
    thousands of instructions, not through _Assembler."""
    lengths = sorted({prefix >> 24 for prefix in prefixes})
    shortest, longest = lengths[0], lengths[-1]
    per_position = 5 + len(prefixes)
    run = 250 // per_position
    positions = range(DNS_HEADER, SCAN_BYTES - 3)
    pack = INSN.pack
    out = []
    for start in positions[::run]:
        count = min(run, positions.stop - start)
        for index, position in enumerate(range(start, start + count)):
            # From this position's first instruction to the run's accepting return, which
            # follows the jump over it.
            to_accept = (count - index) * per_position + 1
            out.append(pack(LDB_IND, 0, 0, position))
            out.append(pack(JGE, 0, per_position - 2, shortest))
            out.append(pack(JGT, per_position - 3, 0, longest))
            out.append(pack(LD_IND, 0, 0, position))
            out.append(pack(OR_K, 0, 0, CASE_BITS))
            for number, prefix in enumerate(prefixes):
                out.append(pack(JEQ, to_accept - 5 - number - 1, 0, prefix))
        out.append(pack(JA, 0, 0, 1))
        out.append(pack(RET, 0, 0, accept))
    out.append(pack(RET, 0, 0, accept))
    return b"".join(out)
