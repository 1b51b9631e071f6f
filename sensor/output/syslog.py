"""RFC 5424 syslog messages and the three transports (UDP, TCP, TLS).

Message: ``<PRI>1 TIMESTAMP HOSTNAME purge-sensor PROCID MSGID [SD] MSG``.

* TIMESTAMP is the event's own time (packet time), so a pcap read keeps its chronology.
* HOSTNAME is ``observer.name``; MSGID is ``event.action``; both cleaned to PRINTUSASCII.
* SD is ``[<sd_id> action=".." host=".." indicator=".." category=".." rule=".." count=".."]``
  with values escaped per §6.3.3; ``sd_id`` defaults to ``purge_sensor@32473`` (32473 is
  the documentation PEN from RFC 5612: put your own enterprise number there).
* MSG is the payload (ECS JSON or CEF) as UTF-8 without BOM (RFC 5424 ``MSG-ANY``).

Framing: UDP carries one message per datagram (RFC 5426), cut at a character boundary to
fit 64 KiB; TCP and TLS use octet counting, ``LEN SP MSG`` (RFC 6587 §3.4.1, RFC 5425 §4.3),
which an embedded newline cannot break.

Delivery confirmation: syslog has no acknowledgements.  The transports therefore report
what TCP itself knows (``unacknowledged_bytes`` via the SIOCOUTQ ioctl) and whether the
receiver has closed its side (``peer_closed``); the sink combines those with a hold time to
decide when a message is safely delivered (see sinks.py).
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import sys
import termios
from typing import TYPE_CHECKING

from _socket import IPPROTO_TCP, SO_ERROR, SOL_SOCKET, TCP_NODELAY  # socket.py: see connect()

from .ecs import to_json_line
from .escape import (APP_NAME_MAX, HOSTNAME_MAX, MSGID_MAX, PROCID_MAX, header_field,
                     is_sd_name, sd_param_value)

if TYPE_CHECKING:
    import socket
    import ssl

DEFAULT_SD_ID = "purge_sensor@32473"
APP_NAME = "purge-sensor"
FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
              "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12,
              "security": 13, "console": 14, "solaris-cron": 15,
              **{f"local{n}": 16 + n for n in range(8)}}
DEFAULT_FACILITY = FACILITIES["local0"]
SEVERITY_WARNING, SEVERITY_NOTICE, SEVERITY_INFO = 4, 5, 6
MAX_UDP_PAYLOAD = 65507  # IPv4 limit; the smaller of the two address families
CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 5.0
_OUTQ = struct.Struct("i")


def facility_number(value: str | int) -> int:
    """Facility by name (``local0``) or number (0-23)."""
    text = str(value).strip().lower()
    if text in FACILITIES:
        return FACILITIES[text]
    if text.isdigit() and int(text) <= 23:
        return int(text)
    raise ValueError(f"unknown syslog facility '{value}' (use a name such as local0, or 0-23)")


def validate_sd_id(sd_id: str) -> str:
    """An SD-ID without ``@`` is reserved to IANA (RFC 5424 §7), so require ``name@PEN``."""
    name, at, pen = sd_id.partition("@")
    if not is_sd_name(sd_id) or not at or not name or not pen.isdigit():
        raise ValueError(f"invalid structured-data id '{sd_id}': expected name@<enterprise number>")
    return sd_id


def syslog_severity(doc: dict) -> int:
    event = doc.get("event", {})
    severity = event.get("severity", 0) or 0
    if severity >= 73:
        return SEVERITY_WARNING
    if severity >= 47:
        return SEVERITY_NOTICE
    return SEVERITY_INFO


def _first(value):
    if isinstance(value, list):
        return value[0] if value else None
    return value


def structured_params(doc: dict) -> list[tuple[str, str]]:
    """The key fields a syslog-only consumer can filter on without parsing MSG."""
    event = doc.get("event", {})
    rule = doc.get("rule", {})
    custom = doc.get("purge_sensor", {})
    host = doc.get("host", {})
    params = [("action", event.get("action")),
              ("host", _first(host.get("ip"))),
              ("indicator", custom.get("indicator")),
              ("category", rule.get("category") or custom.get("host", {}).get("verdict")),
              ("rule", rule.get("id")),
              ("count", custom.get("summary", {}).get("count"))]
    return [(name, str(value)) for name, value in params if value is not None and value != ""]


def format_rfc5424(doc: dict, msg: str, *, sd_id: str = DEFAULT_SD_ID,
                   facility: int = DEFAULT_FACILITY, hostname: str | None = None,
                   procid: str | None = None) -> bytes:
    pri = facility * 8 + syslog_severity(doc)
    host_field = header_field(hostname or doc.get("observer", {}).get("name"), HOSTNAME_MAX)
    header = " ".join((
        f"<{pri}>1",
        header_field(doc.get("@timestamp"), 64),
        host_field,
        header_field(APP_NAME, APP_NAME_MAX),
        header_field(procid or str(os.getpid()), PROCID_MAX),
        header_field(doc.get("event", {}).get("action"), MSGID_MAX),
    ))
    params = "".join(f' {name}="{sd_param_value(value)}"'
                     for name, value in structured_params(doc))
    line = f"{header} [{sd_id}{params}] {msg}"
    return line.encode("utf-8", "backslashreplace")


def ecs_syslog_message(doc: dict, *, sd_id: str = DEFAULT_SD_ID, facility: int = DEFAULT_FACILITY,
                       hostname: str | None = None) -> bytes:
    return format_rfc5424(doc, to_json_line(doc), sd_id=sd_id, facility=facility, hostname=hostname)


class UdpTransport:
    """One datagram per message.  Nothing acknowledges a datagram, but a closed port or an
    unreachable host answers with ICMP, which the kernel keeps on the connected socket:
    ``peer_closed`` reads it, so what was sent within the sink's ``hold`` is sent again."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._sock: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        import socket  # here: its import costs every read ~2 ms, and most send no syslog

        family, kind, proto, _, addr = socket.getaddrinfo(
            self.host, self.port, 0, socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def send(self, message: bytes) -> None:
        if len(message) > MAX_UDP_PAYLOAD:
            message = _cut_utf8(message, MAX_UDP_PAYLOAD)
        self._sock.send(message)

    def unacknowledged_bytes(self) -> int:
        return 0

    def peer_closed(self) -> str | None:
        """Why an earlier datagram was refused (port or host unreachable), or None."""
        error = self._sock.getsockopt(SOL_SOCKET, SO_ERROR) if self._sock else 0
        return f"datagram refused: {os.strerror(error)}" if error else None

    def close(self, graceful: bool = False) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _cut_utf8(data: bytes, limit: int) -> bytes:
    """Truncate without splitting a UTF-8 sequence (continuation bytes are 10xxxxxx)."""
    end = limit
    while end > 0 and (data[end] & 0xC0) == 0x80:
        end -= 1
    return data[:end]


class TcpTransport:
    """Octet-counted syslog over TCP, or over TLS when given an ``ssl.SSLContext``."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                 server_name: str | None = None):
        self.host, self.port = host, port
        self.tls = tls
        self.server_name = server_name or host
        self._sock: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        import socket  # see UdpTransport.connect

        sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        try:
            sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)
            sock.settimeout(SEND_TIMEOUT)
        except OSError:  # ssl.SSLError included
            sock.close()
            raise
        self._sock = sock

    def send(self, message: bytes) -> None:
        self._sock.sendall(b"%d %s" % (len(message), message))

    def unacknowledged_bytes(self) -> int:
        """Bytes the peer's TCP has not acknowledged yet (Linux SIOCOUTQ; 0 elsewhere)."""
        try:
            raw = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0" * _OUTQ.size)
        except (OSError, AttributeError):
            return 0
        return _OUTQ.unpack(raw)[0]

    def peer_closed(self) -> str | None:
        """Why the receiver is gone, or None."""
        return "receiver closed the connection" if self._peer_gone() else None

    def _peer_gone(self) -> bool:
        """A syslog receiver never talks back, so readable means EOF or reset (or, on TLS,
        a post-handshake message such as a session ticket, which is consumed here)."""
        sock = self._sock
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        sock.settimeout(0)
        try:
            return sock.recv(4096) == b""
        except BlockingIOError:
            return False
        except OSError as exc:
            # A TLS record not yet whole is not an end either.  ssl is imported lazily
            # (start-up time); a TLS socket means it is loaded.
            ssl = sys.modules.get("ssl")
            return ssl is None or not isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError))
        finally:
            sock.settimeout(SEND_TIMEOUT)

    def close(self, graceful: bool = False) -> None:
        """``graceful`` sends TLS close_notify first, so the receiver logs no truncation error."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        try:
            if graceful and hasattr(sock, "unwrap"):  # an ssl.SSLSocket
                sock.settimeout(1.0)
                sock = sock.unwrap()
        except (OSError, ValueError):
            pass
        try:
            sock.close()
        except OSError:
            pass


def tls_context(ca: str | None, cert: str | None, key: str | None, verify: bool) -> ssl.SSLContext:
    """RFC 5425 client context: TLS 1.2+, server certificate verified unless told not to."""
    import ssl

    context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key)
    return context
