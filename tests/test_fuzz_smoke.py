"""A short, bounded coverage-guided pass over every decoder entry point (the long runs are
`python3 fuzz/fuzz_decoders.py all -max_total_time=N`)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("frame", "batch", "dns_screen", "capture", "prefiltered", "pipeline", "dns", "dns_tcp", "http", "tls", "quic",
           "dhcp")
# prefiltered writes each input to a file and reads it twice through libpcap (a forked
# feed for some): about 40 runs a second, against thousands for the others.
RUNS = {"prefiltered": 500}


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_clean(target):
    runs = RUNS.get(target, 3000)
    proc = subprocess.run([sys.executable, str(ROOT / "fuzz" / "fuzz_decoders.py"), target,
                           f"-runs={runs}", "-seed=1"], capture_output=True, timeout=300, cwd=ROOT)
    log = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    # libFuzzer first runs every input of the target's corpus, which local runs grow past
    # the count asked for (fuzz/corpus is not committed): then it stops after that first pass.
    done = re.search(r"^Done (\d+) runs", log, re.MULTILINE)
    assert done and int(done.group(1)) >= runs, log[-3000:]
