"""A veth pair whose two ends live in two private network namespaces.

Replayed captures go in one end and are captured on the other; neither end has an IP
address, IPv6 is disabled on both (no router solicitations or DAD in the capture), and
no namespace has a route anywhere, so nothing replayed can leave the pair.  Used by
bench/run.py --live and tests/test_live_veth.py; needs root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager

MTU = 9000  # tagged frames of a 1500-byte MTU capture are 1518 bytes; veth must carry them


def available() -> str | None:
    """Why a veth test cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, raw capture)"
    for tool in ("ip", "tcpreplay"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(("ip",) + args, check=True, capture_output=True, text=True)


@contextmanager
def veth_pair(tag: str):
    """Yield (tx_ns, tx_if, rx_ns, rx_if); everything is removed on exit, even after errors."""
    tag = tag[:6]
    tx_ns, rx_ns = f"pstx-{tag}", f"psrx-{tag}"
    tx_if, rx_if = f"pstx{tag}", f"psrx{tag}"
    created = []
    try:
        for ns in (tx_ns, rx_ns):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", tx_if, "mtu", str(MTU), "type", "veth", "peer", "name", rx_if, "mtu", str(MTU))
        for ns, ifname in ((tx_ns, tx_if), (rx_ns, rx_if)):
            _ip("link", "set", ifname, "netns", ns)
            for key in ("disable_ipv6",):
                subprocess.run(("ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                                f"net.ipv6.conf.{ifname}.{key}=1"), check=False, capture_output=True)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", ifname, "up")
        yield tx_ns, tx_if, rx_ns, rx_if
    finally:
        for ns in reversed(created):
            subprocess.run(("ip", "netns", "del", ns), check=False, capture_output=True)


def in_netns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns] + list(argv)
