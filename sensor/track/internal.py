"""Internal-network membership for IP text as the decoder renders it.

The tracker asks this for every flow start and detection, so the answer is memoised
per address (bounded, oldest entry dropped first) and computed with integer masks
rather than ``ipaddress`` objects.
"""

from __future__ import annotations

import ipaddress

from ..inet import AF_INET, AF_INET6, inet_pton

DEFAULT_INTERNAL = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")

_V4_MAPPED_PREFIX = 0xFFFF


def _parse(ip: str) -> tuple[int, int] | None:
    """(family bits, integer value), or None for text that is not an address."""
    try:
        if ":" in ip:
            return 128, int.from_bytes(inet_pton(AF_INET6, ip), "big")
        return 32, int.from_bytes(inet_pton(AF_INET, ip), "big")
    except (OSError, ValueError, TypeError):
        return None


class InternalNetworks:
    """``ip in networks``: True when the address lies in one of the configured CIDRs."""

    def __init__(self, cidrs, cache_size: int = 65536):
        self.cidrs = []
        self._v4: list[tuple[int, int]] = []
        self._v6: list[tuple[int, int]] = []
        for text in cidrs:
            try:
                net = ipaddress.ip_network(str(text).strip(), strict=False)
            except ValueError as err:
                raise ValueError(f"--internal {text!r}: {err}") from None
            self.cidrs.append(str(net))
            mask = int(net.netmask)
            (self._v4 if net.version == 4 else self._v6).append((int(net.network_address), mask))
        self._cache: dict[str, bool] = {}
        self._cache_size = cache_size

    def __contains__(self, ip: str) -> bool:
        hit = self._cache.get(ip)
        if hit is not None:
            return hit
        result = self._lookup(ip)
        cache = self._cache
        if len(cache) >= self._cache_size:
            del cache[next(iter(cache))]
        cache[ip] = result
        return result

    def _lookup(self, ip: str) -> bool:
        parsed = _parse(ip)
        if parsed is None:
            return False
        bits, value = parsed
        if bits == 128 and value >> 32 == _V4_MAPPED_PREFIX:
            bits, value = 32, value & 0xFFFFFFFF
        for network, mask in (self._v4 if bits == 32 else self._v6):
            if value & mask == network:
                return True
        return False


def is_group_address(ip: str) -> bool:
    """Multicast or broadcast destinations name no single host (a /24-style ``.255`` counts)."""
    parsed = _parse(ip)
    if parsed is None:
        return False
    bits, value = parsed
    if bits == 32:
        return value >> 28 == 0xE or value & 0xFF == 0xFF
    return value >> 120 == 0xFF


def canonical_ip(text: str) -> str:
    """The decoder's rendering of an address (``inet_ntop``), for user-given IPs."""
    try:
        return str(ipaddress.ip_address(str(text).strip()))
    except ValueError:
        raise ValueError(f"--resolver {text!r}: not an IP address") from None


def host_port(ip: str, port: int, transport: str) -> str:
    """``10.0.0.5:13000/tcp`` or ``[fd00::5]:13000/tcp``, as Zeek and Suricata users write it."""
    return f"[{ip}]:{port}/{transport}" if ":" in ip else f"{ip}:{port}/{transport}"
