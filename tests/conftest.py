import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PURGE_SENSOR_STATE", str(ROOT / "tests" / ".state-unused.sqlite"))
# Signature sets the tests load are cached in a directory of the run's own, never the user's.
_SIGNATURE_CACHE = tempfile.TemporaryDirectory(prefix="purge-sensor-cache-")
os.environ["PURGE_SENSOR_CACHE_DIR"] = _SIGNATURE_CACHE.name

# scapy fills a missing Ether().dst by ARP/ND lookups on the real network. Tests build
# frames only; they must never emit traffic, so address resolution is switched off.
from scapy.config import conf as _scapy_conf  # noqa: E402
import scapy.layers.l2  # noqa: E402,F401
import scapy.layers.inet  # noqa: E402,F401
import scapy.layers.inet6  # noqa: E402,F401

_scapy_conf.neighbor.resolvers.clear()
_scapy_conf.verb = 0
