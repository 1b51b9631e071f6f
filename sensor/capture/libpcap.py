"""libpcap's own calls on the ``pcap_t`` behind a pcapy-ng savefile reader, for two things
pcapy does not offer.

* A wider stdio buffer (widen_read_buffer).  libpcap reads a savefile through C stdio,
  which glibc buffers by the file's block size: 4 KiB, so a 1 GB capture costs a quarter
  of a million ``read`` calls.  Reading through READ_BUFFER bytes takes about a quarter
  off libpcap's own time, which sets a ``read``'s wall time where the filter passes
  little (806 MB of frames it rejects: 0.44 s before, 0.36 s after, at best of ten), and
  a tenth off a whole read's CPU time where the decoder's thread is the longer one
  (bench/run.py's mix).
* A capture filter whose program is freed, and compiled once for many files and many
  starts (set_filter).  pcapy-ng 2.1's ``setfilter`` never frees the program it compiles:
  8-16 KB for every capture opened, 17 MB over 2,000 opens, which a ``read`` of a
  directory of rotated captures would hold to the end.  libpcap's optimizer takes 8-11 ms
  over the sensor's filter, a fiftieth of a ``read`` of the benchmark mix: the program is
  kept in sensor.cache, keyed by libpcap's version, the link type, the snap length and
  the expression, and libpcap validates a cached program as it installs it.

pcapy hands out no ``pcap_t``: it is the first field of pcapy-ng's reader object, and is
used only where every assumption is checked first (_savefile_pcap): glibc on Linux, a
reader object of the known size, one libpcap mapped into the process, and a pointer
whose ``pcap_file`` stream has the handle's own descriptor (a live capture has none).
Anywhere else pcapy's own calls do the work, as before.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import sys
from collections import OrderedDict
from typing import NamedTuple

from .. import cache

READ_BUFFER = 256 * 1024
# Below this size the buffer would save a thousand read calls at most: not worth 256 KiB.
MIN_CAPTURE_SIZE = 16 * READ_BUFFER
# pcapy-ng 2's reader object (tp_basicsize): its pcap_t pointer follows the object header.
_KNOWN_READER_SIZES = frozenset({104})
_POINTER_OFFSET = 16
_IOFBF = 0
MAX_COMPILED = 8
PROGRAM_FORMAT = 1
PROGRAM_PREFIX = "bpf-"
KEEP_PROGRAMS = 16  # cached programs: a filter per link type, and --bpf variations
MAX_PROGRAM_BYTES = 8 << 16  # 65,536 instructions, far past any filter the sensor builds


def _loaded_libpcap() -> str | None:
    """The one libpcap mapped into this process (pcapy-ng's wheel bundles its own copy),
    or None when there is none or more than one to choose from."""
    paths = set()
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and os.path.basename(path).startswith("libpcap"):
                    paths.add("/" + path)
    except OSError:
        return None
    return paths.pop() if len(paths) == 1 else None


class _Libraries(NamedTuple):
    """ctypes, and the two libraries with the calls' signatures declared."""

    ctypes: object
    libpcap: object
    libc: object
    program: type  # struct bpf_program


@functools.cache
def _libraries() -> _Libraries | None:
    """The libraries, or None where they are not to be used."""
    if sys.platform != "linux":
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (OSError, ValueError):
        return None
    library = _loaded_libpcap()
    if library is None:
        return None
    import ctypes

    try:
        libpcap = ctypes.CDLL(library)
        libc = ctypes.CDLL(None)
    except OSError:
        return None

    class BpfProgram(ctypes.Structure):
        _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]

    program = ctypes.POINTER(BpfProgram)
    libpcap.pcap_file.restype = ctypes.c_void_p
    libpcap.pcap_file.argtypes = [ctypes.c_void_p]
    libpcap.pcap_compile.argtypes = [ctypes.c_void_p, program, ctypes.c_char_p, ctypes.c_int,
                                     ctypes.c_uint32]
    libpcap.pcap_setfilter.argtypes = [ctypes.c_void_p, program]
    libpcap.pcap_freecode.argtypes = [program]
    libpcap.pcap_snapshot.argtypes = [ctypes.c_void_p]
    libpcap.pcap_geterr.restype = ctypes.c_char_p
    libpcap.pcap_geterr.argtypes = [ctypes.c_void_p]
    libpcap.pcap_lib_version.restype = ctypes.c_char_p
    libpcap.pcap_lib_version.argtypes = []
    libc.fileno.argtypes = [ctypes.c_void_p]
    libc.setvbuf.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    return _Libraries(ctypes, libpcap, libc, BpfProgram)


class _Savefile(NamedTuple):
    libraries: _Libraries
    pcap: int  # the pcap_t
    stream: int  # its FILE *
    info: os.stat_result  # of the file libpcap reads


def _savefile_pcap(handle) -> _Savefile | None:
    """The pcap_t of a pcapy-ng reader of a savefile (a file or a pipe), or None."""
    if type(handle).__basicsize__ not in _KNOWN_READER_SIZES:
        return None
    libraries = _libraries()
    if libraries is None:
        return None
    try:
        fd = handle.getfd()
        info = os.fstat(fd)
    except (OSError, ValueError, AttributeError):
        return None
    pcap = libraries.ctypes.c_void_p.from_address(id(handle) + _POINTER_OFFSET).value
    if not pcap:
        return None
    stream = libraries.libpcap.pcap_file(pcap)
    if not stream or libraries.libc.fileno(stream) != fd:
        return None
    return _Savefile(libraries, pcap, stream, info)


def widen_read_buffer(handle, size: int = READ_BUFFER):
    """Give the stream libpcap reads ``handle``'s savefile through a buffer of ``size``
    bytes; returns the buffer, which must outlive the handle, or None where this is not
    done: a capture under MIN_CAPTURE_SIZE, or not a regular file.  glibc's ``setvbuf``
    after reading first moves the file back to where the stream stands (elsewhere the
    bytes already buffered could be lost), which a pipe cannot do."""
    found = _savefile_pcap(handle)
    if found is None or not stat.S_ISREG(found.info.st_mode) \
            or found.info.st_size < MIN_CAPTURE_SIZE:
        return None
    buffer = found.libraries.ctypes.create_string_buffer(size)
    if found.libraries.libc.setvbuf(found.stream, buffer, _IOFBF, size) != 0:
        return None
    return buffer


# The last MAX_COMPILED programs (their instructions), by expression and link type: a
# ``read`` of a directory of rotated captures sets its filter once a file, and compiles it
# once.  libpcap copies a program into the handle it is set on, and judges a savefile's
# packet by whether the program accepts it, not by the length it returns (which holds the
# first file's snap length), so one program serves every file of that link type.
_COMPILED: OrderedDict[tuple[str, int], bytes] = OrderedDict()


def _libpcap_error(found: _Savefile):
    import pcapy

    return pcapy.PcapError(found.libraries.libpcap.pcap_geterr(found.pcap).decode("utf-8", "replace"))


def set_filter(handle, expression: str) -> None:
    """``handle.setfilter(expression)``, by libpcap's own calls where _savefile_pcap allows,
    with the program compiled once (_COMPILED, sensor.cache), else by pcapy's.  Raises
    pcapy.PcapError with libpcap's message, as pcapy does, when the expression does not
    compile.  Capture files are opened one at a time, on one thread."""
    found = _savefile_pcap(handle)
    if found is None:
        handle.setfilter(expression)
        return
    key = (expression, handle.datalink())
    code = _COMPILED.get(key)
    if code is not None:
        _COMPILED.move_to_end(key)
        if not _install(found, code):
            raise _libpcap_error(found)
        return
    name = _program_name(found, expression, key[1])
    code = cache.read(name, MAX_PROGRAM_BYTES)
    if not code or len(code) % 8 or not _install(found, code):
        code = _compile(found, expression)
        if not _install(found, code):
            raise _libpcap_error(found)
        cache.write(PROGRAM_PREFIX, name, code, KEEP_PROGRAMS)
    _COMPILED[key] = code
    if len(_COMPILED) > MAX_COMPILED:
        _COMPILED.popitem(last=False)


def _program_name(found: _Savefile, expression: str, linktype: int) -> str:
    libpcap = found.libraries.libpcap
    digest = hashlib.sha256(b"%d\0%s\0%d\0%d\0" % (
        PROGRAM_FORMAT, libpcap.pcap_lib_version(), linktype, libpcap.pcap_snapshot(found.pcap)))
    digest.update(expression.encode())
    return PROGRAM_PREFIX + digest.hexdigest()


def _compile(found: _Savefile, expression: str) -> bytes:
    """The instructions libpcap compiles ``expression`` to for this savefile, optimized and
    with the netmask pcapy gives a savefile's reader (0.0.0.0), as its setfilter does."""
    ctypes, libpcap = found.libraries.ctypes, found.libraries.libpcap
    program = found.libraries.program()
    if libpcap.pcap_compile(found.pcap, ctypes.byref(program), expression.encode(), 1, 0) != 0:
        raise _libpcap_error(found)
    try:
        return ctypes.string_at(program.bf_insns, program.bf_len * 8)
    finally:
        libpcap.pcap_freecode(ctypes.byref(program))


def _install(found: _Savefile, code: bytes) -> bool:
    """Filter the savefile's packets read from now on with ``code`` (instructions); False,
    with the filter unchanged, when libpcap refuses the program.  libpcap validates and
    copies it."""
    ctypes, libraries = found.libraries.ctypes, found.libraries
    instructions = ctypes.create_string_buffer(code, len(code))
    program = libraries.program()
    program.bf_len = len(code) // 8
    program.bf_insns = ctypes.addressof(instructions)
    return libraries.libpcap.pcap_setfilter(found.pcap, ctypes.byref(program)) == 0


class FilterSlot:
    """The filter of one savefile reader, replaceable by programs built in Python
    (capture.shunt): ``main`` holds the instructions of the filter set_filter compiled."""

    def __init__(self, found: _Savefile, main: bytes, snaplen: int):
        self._found = found
        self.main = main
        self.snaplen = snaplen

    def install(self, code: bytes) -> bool:
        """Filter the packets read from now on with ``code`` (see _install)."""
        return _install(self._found, code)


def filter_slot(handle, expression: str, min_snaplen: int) -> FilterSlot | None:
    """The FilterSlot of a reader whose filter set_filter set from ``expression``, where
    its capture's snap length is at least ``min_snaplen``; else None."""
    found = _savefile_pcap(handle)
    if found is None:
        return None
    code = _COMPILED.get((expression, handle.datalink()))
    snaplen = found.libraries.libpcap.pcap_snapshot(found.pcap)
    if code is None or snaplen < min_snaplen:
        return None
    return FilterSlot(found, code, snaplen)
