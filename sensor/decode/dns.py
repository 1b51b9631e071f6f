"""DNS message decoder (RFC 1035) for UDP payloads and DNS-over-TCP streams (RFC 7766).

Names are kept as raw wire labels: a label may hold any octet (RFC 2181 section 11), so
joining or decoding here would let ``a.b`` inside one label pass for two labels, or
crash on non-UTF-8.  Compression pointers may only point strictly backwards from the
segment being read, which makes every name walk terminate without a visited set; the jump
cap only bounds the work a long legitimate-looking chain can cost.
"""

from __future__ import annotations

import struct

from ..inet import AF_INET, AF_INET6, inet_ntop
from ..records import DecodeError, DnsAnswer, DnsMessage, DnsQuestion, DomainName, PacketContext

HEADER = struct.Struct(">HHHHHH")
QUESTION_FIXED = struct.Struct(">HH")
RECORD_FIXED = struct.Struct(">HHIH")
TCP_LENGTH = struct.Struct(">H")

HEADER_LEN = HEADER.size
MAX_QUESTIONS = 32
MAX_ANSWERS = 64
MAX_POINTER_JUMPS = 32
MAX_LABEL_LEN = 63
MAX_NAME_WIRE_LEN = 255

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
CLASS_IN = 1
CLASS_MASK = 0x7FFF  # mDNS (RFC 6762) borrows the top bit for cache-flush / unicast-response

FLAG_QR = 0x8000


def parse_dns(buf: bytes, ctx: PacketContext) -> DnsMessage:
    """Decode one DNS message; every malformation surfaces as ``DecodeError``.

    Only the first ``MAX_QUESTIONS`` questions and ``MAX_ANSWERS`` answers are returned.
    Records past those caps and the authority / additional sections are still walked, so
    a message whose framing is broken anywhere is counted as malformed as a whole.
    """
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    size = len(buf)
    if size < HEADER_LEN:
        raise DecodeError("dns_truncated")
    ident, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(buf, 0)
    pos = HEADER_LEN

    questions = []
    for index in range(qdcount):
        if index < MAX_QUESTIONS:
            name, pos = read_name(buf, pos)
        else:
            pos = skip_name(buf, pos)
        if pos + 4 > size:
            raise DecodeError("dns_truncated")
        if index < MAX_QUESTIONS:
            qtype, qclass = QUESTION_FIXED.unpack_from(buf, pos)
            questions.append(DnsQuestion(name, qtype, qclass))
        pos += 4

    answers = []
    for index in range(ancount):
        if index >= MAX_ANSWERS:
            pos = _skip_record(buf, pos)
            continue
        name, pos = read_name(buf, pos)
        if pos + 10 > size:
            raise DecodeError("dns_truncated")
        rtype, rclass, ttl, rdlength = RECORD_FIXED.unpack_from(buf, pos)
        pos += 10
        rdata_end = pos + rdlength
        if rdata_end > size:
            raise DecodeError("dns_truncated")
        answers.append(DnsAnswer(name, rtype, ttl, _rdata_text(buf, pos, rdata_end, rtype, rclass)))
        pos = rdata_end

    for _ in range(nscount + arcount):
        pos = _skip_record(buf, pos)

    return DnsMessage(ctx=ctx, id=ident, is_response=bool(flags & FLAG_QR),
                      opcode=(flags >> 11) & 0xF, rcode=flags & 0xF,
                      questions=questions, answers=answers)


def read_name(buf: bytes, pos: int) -> tuple[DomainName, int]:
    """Decode the name at ``pos``; returns it and the offset just past its in-place bytes."""
    size = len(buf)
    labels = []
    wire_len = 1  # the root label
    segment_start = pos
    resume = -1
    jumps = 0
    while True:
        if pos >= size:
            raise DecodeError("dns_truncated")
        length = buf[pos]
        if length == 0:
            pos += 1
            break
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= size:
                raise DecodeError("dns_truncated")
            target = ((length & 0x3F) << 8) | buf[pos + 1]
            if target < HEADER_LEN or target >= segment_start:
                raise DecodeError("dns_bad_pointer")
            jumps += 1
            if jumps > MAX_POINTER_JUMPS:
                raise DecodeError("dns_pointer_loop")
            if resume < 0:
                resume = pos + 2
            pos = segment_start = target
            continue
        if kind:
            raise DecodeError("dns_bad_label")
        end = pos + 1 + length
        if end > size:
            raise DecodeError("dns_truncated")
        wire_len += length + 1
        if wire_len > MAX_NAME_WIRE_LEN:
            raise DecodeError("dns_name_too_long")
        labels.append(buf[pos + 1:end])
        pos = end
    return DomainName(tuple(labels)), (resume if resume >= 0 else pos)


def skip_name(buf: bytes, pos: int) -> int:
    """Step over a name without following pointers: for records nobody will read."""
    size = len(buf)
    while True:
        if pos >= size:
            raise DecodeError("dns_truncated")
        length = buf[pos]
        if length == 0:
            return pos + 1
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 2 > size:
                raise DecodeError("dns_truncated")
            return pos + 2
        if kind:
            raise DecodeError("dns_bad_label")
        pos += 1 + length


def _skip_record(buf: bytes, pos: int) -> int:
    pos = skip_name(buf, pos)
    if pos + 10 > len(buf):
        raise DecodeError("dns_truncated")
    rdlength = RECORD_FIXED.unpack_from(buf, pos)[3]
    end = pos + 10 + rdlength
    if end > len(buf):
        raise DecodeError("dns_truncated")
    return end


def _rdata_text(buf: bytes, start: int, end: int, rtype: int, rclass: int) -> str:
    """Only A, AAAA and CNAME carry what the answer cache and the matcher need."""
    if rtype == TYPE_A and rclass & CLASS_MASK == CLASS_IN:
        if end - start != 4:
            raise DecodeError("dns_bad_rdata")
        return inet_ntop(AF_INET, buf[start:end])
    if rtype == TYPE_AAAA and rclass & CLASS_MASK == CLASS_IN:
        if end - start != 16:
            raise DecodeError("dns_bad_rdata")
        return inet_ntop(AF_INET6, buf[start:end])
    if rtype == TYPE_CNAME:
        target, name_end = read_name(buf, start)
        if name_end != end:
            raise DecodeError("dns_bad_rdata")
        return target.text
    return ""


def split_tcp_dns(stream: bytes) -> tuple[list[bytes], int]:
    """Cut a DNS-over-TCP byte stream into its complete length-prefixed messages.

    Returns the messages and how many bytes they used; a partial trailing message is left
    for the caller to complete.  A zero length prefix has no meaning in RFC 7766 and means
    the stream is desynchronised or not DNS, so it is an error rather than skipped.  The
    list is bounded by the input, which the stream table caps.
    """
    messages = []
    size = len(stream)
    pos = 0
    while pos + 2 <= size:
        length = TCP_LENGTH.unpack_from(stream, pos)[0]
        if length == 0:
            raise DecodeError("dns_tcp_zero_length")
        end = pos + 2 + length
        if end > size:
            break
        messages.append(bytes(stream[pos + 2:end]))
        pos = end
    return messages, pos
