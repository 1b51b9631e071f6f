"""The default capture filter: everything that can carry evidence, nothing else.

libpcap's ``tcp[]``/``udp[]`` accessors only work over IPv4, so IPv6 uses ``ip6[]``
offsets (direct TCP/UDP after the fixed header; IPv6 with extension headers passes
whole).  ``vlan`` shifts every later offset in libpcap, so tagged variants come last.
TCP segments with payload all pass: the ClientHello's later segments look like any other
data to BPF; the user-space flow bypass drops the rest of each flow after its start.
"""

from __future__ import annotations

_PORTS = ("udp port 53 or tcp port 53 or udp port 5353 or udp port 5355 or udp portrange 67-68 "
          "or udp portrange 546-547 or udp port 4789 or udp port 6081 or udp portrange 15000-15001")

_IPV4 = ("(ip and (" + _PORTS +
         " or (udp and udp[8] & 0xc0 == 0xc0)"
         " or (tcp and tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0)"
         " or (tcp and ip[2:2] - ((ip[0] & 0xf) << 2) - ((tcp[12] & 0xf0) >> 2) > 0)"
         " or ip proto 47 or ip proto 4 or ip proto 41 or ip[6:2] & 0x3fff != 0))")

_IPV6 = ("(ip6 and (" + _PORTS +
         " or (ip6[6] == 17 and ip6[48] & 0xc0 == 0xc0)"
         " or (ip6[6] == 6 and ip6[53] & 0x07 != 0)"
         " or (ip6[6] == 6 and ip6[4:2] - ((ip6[52] & 0xf0) >> 2) > 0)"
         " or ip6[6] == 0 or ip6[6] == 43 or ip6[6] == 44 or ip6[6] == 60 or ip6[6] == 47"
         " or ip6[6] == 4 or ip6[6] == 41))")

_CORE = f"({_IPV4} or {_IPV6})"

_ETHERNET = ("ether[12:2] == 0x8847 or ether[12:2] == 0x8848 or ether[12:2] == 0x8864 or "
             f"{_CORE} or (vlan and ({_CORE} or (vlan and ({_CORE} or (vlan and {_CORE})))))")

DLT_EN10MB = 1


def build_filter(user_filter: str | None, linktype: int = DLT_EN10MB) -> str:
    """The sensor's filter for this link type, narrowed by the operator's own (tcpdump syntax).

    Untagged MPLS and PPPoE session frames pass whole: once libpcap's ``mpls``/``pppoes``
    keywords shift the offsets they cannot be undone for the rest of the expression.
    """
    base = _ETHERNET if linktype == DLT_EN10MB else _CORE
    if user_filter:
        return f"({base}) and ({user_filter})"
    return base
