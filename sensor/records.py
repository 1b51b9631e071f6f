"""Typed records that flow between the pipeline stages.

capture  -> (ts, linktype, data, wire_len) tuples (no objects on the hot path)
decode   -> PacketContext + DnsMessage / ClientHello / HttpRequest / FlowStart / DhcpLease
detect   -> Detection
track    -> HostUpdate (and the Detection, enriched with host identity)
output   -> formats Detections / host events

Records are only built for packets that can carry evidence, so they may be
comfortable (dataclasses with slots) rather than minimal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union


# Capture hands decode a libpcap batch (``next_batch``) rather than a tuple per packet: one
# buffer, and per frame one record of native words (sec, fraction, offset, caplen).
BATCH_RECORD = struct.Struct("=IIII")


class DecodeError(Exception):
    """A malformed input; ``reason`` is a short stable token used as a metric label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# Bytes that render as themselves: ``translate`` deleting them leaves nothing of a label or
# text that needs no escaping, which is nearly every one, at C speed.  The matcher uses the
# label set too, to join plain labels without escaping them.
PLAIN_LABEL_BYTES = bytes(b for b in range(0x21, 0x7F) if b not in (0x2E, 0x5C, 0x22))
_PLAIN_TEXT_BYTES = bytes(b for b in range(0x20, 0x7F) if b != 0x5C)


def escape_label_bytes(label: bytes) -> str:
    """Presentation form of one DNS label (RFC 1035 master-file style, as ECS asks).

    Printable ASCII is kept, ``.`` ``\\`` and ``"`` are backslash-escaped, every
    other byte (controls, space, >126) becomes ``\\DDD``.  A name built from
    attacker-chosen bytes therefore always renders as one unambiguous line.
    """
    if isinstance(label, (bytes, bytearray)) and not label.translate(None, PLAIN_LABEL_BYTES):
        return label.decode("ascii")
    out = []
    for b in label:
        if b in (0x2E, 0x5C, 0x22):
            out.append("\\" + chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append("\\%03d" % b)
    return "".join(out)


def labels_text(labels) -> str:
    """DNS labels in presentation form, joined by dots.  Nearly every name needs no escaping,
    which one ``translate`` of the joined name tells when the only bytes it leaves are the
    separators: a quarter of the time of escaping label by label."""
    joined = b".".join(labels)
    if len(joined.translate(None, PLAIN_LABEL_BYTES)) == len(labels) - 1:
        return joined.decode("ascii")
    return ".".join([escape_label_bytes(label) for label in labels])


def escape_text_bytes(raw: bytes) -> str:
    """Display form of free text from the wire (HTTP path, User-Agent): ``\\DDD`` for
    every byte outside printable ASCII (space allowed) and for ``\\`` itself."""
    if isinstance(raw, (bytes, bytearray)) and not raw.translate(None, _PLAIN_TEXT_BYTES):
        return raw.decode("ascii")
    out = []
    for b in raw:
        if 0x20 <= b <= 0x7E and b != 0x5C:
            out.append(chr(b))
        else:
            out.append("\\%03d" % b)
    return "".join(out)


@dataclass(slots=True, frozen=True)
class DomainName:
    """A domain name as its wire labels, so a label holding ``.`` never merges with its neighbour."""

    labels: tuple[bytes, ...]

    @classmethod
    def from_text_bytes(cls, raw: bytes) -> "DomainName":
        """SNI and Host carry names as dotted text: split on dots, drop one trailing dot."""
        if raw.endswith(b"."):
            raw = raw[:-1]
        if not raw:
            return cls(())
        return cls(tuple(raw.split(b".")))

    @property
    def text(self) -> str:
        """Escaped presentation form without trailing dot (``\\DDD`` for non-printables)."""
        return labels_text(self.labels)

    @property
    def key(self) -> tuple[bytes, ...]:
        """Lower-cased labels: what signatures are matched against."""
        return tuple(label.lower() for label in self.labels)


@dataclass(slots=True)
class PacketContext:
    """Where a record came from: the packet's own direction, link details and tunnel path."""

    ts: float
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    transport: str  # "udp" | "tcp"
    ip_version: int = 4
    src_mac: str | None = None
    dst_mac: str | None = None
    vlan: tuple[int, ...] = ()
    tunnel: tuple[str, ...] = ()  # outermost first, e.g. ("vxlan vni=42",)
    interface: int = 0


@dataclass(slots=True)
class DnsQuestion:
    name: DomainName
    qtype: int
    qclass: int


@dataclass(slots=True)
class DnsAnswer:
    name: DomainName
    rtype: int
    ttl: int
    data: str  # IP text for A/AAAA, presentation name for CNAME, "" otherwise


@dataclass(slots=True)
class DnsMessage:
    ctx: PacketContext
    id: int
    is_response: bool
    opcode: int
    rcode: int
    questions: list[DnsQuestion]
    answers: list[DnsAnswer]


@dataclass(slots=True)
class ClientHello:
    ctx: PacketContext
    server_name: DomainName | None
    alpn: tuple[str, ...] = ()
    legacy_version: int = 0
    supported_versions: tuple[int, ...] = ()
    cipher_suites: tuple[int, ...] = ()
    extensions: tuple[int, ...] = ()  # in wire order, GREASE included
    supported_groups: tuple[int, ...] = ()
    ec_point_formats: tuple[int, ...] = ()
    signature_algorithms: tuple[int, ...] = ()
    ech_offered: bool = False
    ja3: str = ""  # the JA3 string; the md5 hash is derived when formatting
    ja4: str = ""
    over: str = "tcp"  # "tcp" | "quic"


@dataclass(slots=True)
class HttpRequest:
    ctx: PacketContext
    method: str
    path: str  # escaped for display
    version: str
    host: DomainName | None
    host_port: int | None = None
    user_agent: str | None = None  # escaped for display


@dataclass(slots=True)
class FlowStart:
    """First packet of a TCP connection (SYN) or a UDP flow: used for answer and port attribution."""

    ctx: PacketContext


@dataclass(slots=True)
class DhcpLease:
    ctx: PacketContext
    mac: str
    ip: str | None
    hostname: str | None


AppRecord = Union[DnsMessage, ClientHello, HttpRequest, FlowStart, DhcpLease]


@dataclass(slots=True, frozen=True)
class Signature:
    """One indicator from signatures/*.yaml."""

    id: str
    category: str  # update, telemetry, activation, management, web_injection, pki, downloads, website, oem
    strength: str  # strong | medium | weak | none
    kind: str  # exact | suffix | pattern | ja3 | ja4 | path
    value: str
    source: str
    description: str = ""
    vendor: str = ""  # OEM vendor when the indicator is shared with one
    file: str = ""
    line: int = 0


@dataclass(slots=True)
class Detection:
    """A record that matched a signature, attributed to the internal host that produced it."""

    ts: float
    action: str  # dns_query, dns_answer, dns_answer_flow, tls_sni, quic_sni, http_host, ksc_port
    host_ip: str
    indicator: str  # the matched name, escaped presentation form
    signature: Signature
    ctx: PacketContext
    record: AppRecord | None = None
    host_mac: str | None = None
    host_hostname: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(slots=True)
class HostEvent:
    """A host-level event from the tracker: ``host_detected`` when a host first reaches an
    install-type verdict, ``inventory`` for the periodic full list."""

    ts: float
    kind: str  # "host_detected" | "inventory"
    host: dict  # ip, mac, hostname, verdict, state, first_seen, last_seen, evidence, categories, indicators
