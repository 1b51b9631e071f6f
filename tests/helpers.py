"""Readers the tests share: a strict CEF parser and the sample-capture generator module."""

import importlib.util
import re
import sys
from pathlib import Path

PCAPS = Path(__file__).resolve().parents[1] / "pcaps"


def parse_cef(line: str) -> tuple[list[str], dict]:
    """A strict reader: 7 header fields split on unescaped pipes, then ``key=value``
    pairs where a value runs until the next unescaped `` key=``."""
    fields, current, i = [], [], 0
    while len(fields) < 7:
        char = line[i]
        if char == "\\":
            current.append(line[i + 1])
            i += 2
            continue
        if char == "|":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    extension, rest = {}, line[i:]
    pairs = re.split(r"(?:^| )([A-Za-z0-9_]+)=", rest)
    assert pairs[0] == ""
    for key, raw in zip(pairs[1::2], pairs[2::2]):
        assert key not in extension
        extension[key] = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), raw)
    return fields, extension


def load_make_samples():
    """``pcaps/make_samples.py`` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("make_samples", PCAPS / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_samples", module)
    spec.loader.exec_module(module)
    return module
