"""bench/run.py's interpreter options: what it says of an interpreter, and how it refuses one
it cannot use before it spends minutes generating the mix; the empty capture it times the
sensor's fixed cost with."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import run as bench_run  # noqa: E402


def test_describe_python_reports_version_and_how_libpython_is_linked():
    linkage = "shared" if "libpython" in Path("/proc/self/maps").read_text() else "static"
    assert bench_run.describe_python(sys.executable) == \
        f"Python {platform.python_version()}, {linkage} libpython"


@pytest.mark.parametrize("interpreter, problem", [
    ("/nonexistent/python3", "no such interpreter"),
    ("/bin/true", "not a Python interpreter"),
])
def test_an_unusable_interpreter_is_refused_before_the_mix_is_made(tmp_path, interpreter, problem):
    missing_mix = tmp_path / "mix.pcap"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--python", interpreter,
                             "--mix", str(missing_mix)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"--python {interpreter}: {problem}" in result.stderr
    assert not missing_mix.exists()


@pytest.mark.parametrize("sample, linktype", [
    ("demo.pcap", 1), ("linux_sll.pcap", 113), ("nanosecond_be.pcap", 1), ("multi_if.pcapng", 1),
])
def test_the_empty_capture_has_the_mixs_link_type_and_no_packets(tmp_path, sample, linktype):
    from sensor.capture.pcapfile import open_capture

    empty = bench_run.empty_capture(ROOT / "pcaps" / sample, str(tmp_path))
    assert int.from_bytes(empty.read_bytes()[20:24], "little") == linktype
    with open_capture(str(empty)) as cap:
        assert list(cap) == []
    result = subprocess.run([sys.executable, "-m", "sensor.cli", "read", "--no-state", str(empty)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "packets 0" in result.stderr
