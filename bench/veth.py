"""A veth pair whose two ends live in two private network namespaces.

Replayed captures go in one end and are captured on the other; neither end has an IP
address, IPv6 is disabled on both (no router solicitations or DAD in the capture), and
no namespace has a route anywhere, so nothing replayed can leave the pair.  Used by
bench/run.py --live and tests/test_live_veth.py; needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from contextlib import contextmanager

# veth's largest.  A capture taken on a host with GRO/TSO holds frames of up to 64 KB (an
# HTTP request head and its body in one frame, say); tcpreplay cannot send a frame above the
# MTU and reports it only in its statistics (failed_packets), with exit status 0.
MTU = 65535


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


def failed_packets(tcpreplay_stdout: str) -> int:
    """Packets tcpreplay could not send, from its statistics; -1 when it printed none."""
    match = re.search(r"Failed packets:\s+(\d+)", tcpreplay_stdout)
    return int(match.group(1)) if match else -1
