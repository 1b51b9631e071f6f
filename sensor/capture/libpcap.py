"""libpcap's own calls on the ``pcap_t`` behind a pcapy-ng savefile reader, for two things
pcapy does not offer.

* A wider stdio buffer (widen_read_buffer).  libpcap reads a savefile through C stdio,
  which glibc buffers by the file's block size: 4 KiB, so a 1 GB capture costs a quarter
  of a million ``read`` calls.  Reading through READ_BUFFER bytes takes about a quarter
  off libpcap's own time, which sets a ``read``'s wall time where the filter passes
  little (806 MB of frames it rejects: 0.44 s before, 0.36 s after, at best of ten), and
  a tenth off a whole read's CPU time where the decoder's thread is the longer one
  (bench/run.py's mix).
* A capture filter whose program is freed, and compiled once for many files
  (set_filter).  pcapy-ng 2.1's ``setfilter`` never frees the program it compiles: 8-16
  KB for every capture opened, 17 MB over 2,000 opens, which a ``read`` of a directory
  of rotated captures would hold to the end.

pcapy hands out no ``pcap_t``: it is the first field of pcapy-ng's reader object, and is
used only where every assumption is checked first (_savefile_pcap): glibc on Linux, a
reader object of the known size, one libpcap mapped into the process, and a pointer
whose ``pcap_file`` stream has the handle's own descriptor (a live capture has none).
Anywhere else pcapy's own calls do the work, as before.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
from collections import OrderedDict

READ_BUFFER = 256 * 1024
# Below this size the buffer would save a thousand read calls at most: not worth 256 KiB.
MIN_CAPTURE_SIZE = 16 * READ_BUFFER
# pcapy-ng 2's reader object (tp_basicsize): its pcap_t pointer follows the object header.
_KNOWN_READER_SIZES = frozenset({104})
_POINTER_OFFSET = 16
_IOFBF = 0
MAX_COMPILED = 8


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


@functools.cache
def _libraries():
    """(ctypes, libpcap, libc, the bpf_program structure) with the calls' signatures
    declared, or None where they are not to be used."""
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
    libpcap.pcap_geterr.restype = ctypes.c_char_p
    libpcap.pcap_geterr.argtypes = [ctypes.c_void_p]
    libc.fileno.argtypes = [ctypes.c_void_p]
    libc.setvbuf.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    return ctypes, libpcap, libc, BpfProgram


def _savefile_pcap(handle, regular_file: bool):
    """(libraries, pcap_t, FILE *) of a pcapy-ng reader of a savefile (with
    ``regular_file``, of a regular file: not a pipe), or None."""
    if type(handle).__basicsize__ not in _KNOWN_READER_SIZES:
        return None
    libraries = _libraries()
    if libraries is None:
        return None
    ctypes, libpcap, libc, _ = libraries
    try:
        fd = handle.getfd()
        if fd < 0 or regular_file and not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    pcap = ctypes.c_void_p.from_address(id(handle) + _POINTER_OFFSET).value
    if not pcap:
        return None
    stream = libpcap.pcap_file(pcap)
    if not stream or libc.fileno(stream) != fd:
        return None
    return libraries, pcap, stream


def widen_read_buffer(handle, size: int = READ_BUFFER):
    """Give the stream libpcap reads ``handle``'s savefile through a buffer of ``size``
    bytes; returns the buffer, which must outlive the handle, or None where this is not
    done.  glibc's ``setvbuf`` after reading first moves the file back to where the
    stream stands (elsewhere the bytes already buffered could be lost), which a pipe
    cannot do."""
    found = _savefile_pcap(handle, regular_file=True)
    if found is None:
        return None
    (ctypes, _, libc, _), _, stream = found
    buffer = ctypes.create_string_buffer(size)
    if libc.setvbuf(stream, buffer, _IOFBF, size) != 0:
        return None
    return buffer


class _CompiledFilters:
    """The last MAX_COMPILED programs compiled, by expression and link type: a ``read`` of
    a directory of rotated captures compiles its filter once instead of once a file (9-25
    ms each).  libpcap copies a program into the handle it is set on, and judges a
    savefile's packet by whether the program accepts it, not by the length it returns
    (which holds the first file's snap length), so one program serves every file of that
    link type.  A program dropped from the table is freed."""

    def __init__(self):
        self.programs: OrderedDict[tuple[str, int], object] = OrderedDict()

    def get(self, libraries, pcap, expression: str, linktype: int):
        ctypes, libpcap, _, program_type = libraries
        key = (expression, linktype)
        program = self.programs.get(key)
        if program is not None:
            self.programs.move_to_end(key)
            return program
        program = program_type()
        # With the netmask pcapy gives a savefile's reader (0.0.0.0), as its setfilter does.
        if libpcap.pcap_compile(pcap, ctypes.byref(program), expression.encode(), 1, 0) != 0:
            import pcapy

            raise pcapy.PcapError(libpcap.pcap_geterr(pcap).decode("utf-8", "replace"))
        self.programs[key] = program
        if len(self.programs) > MAX_COMPILED:
            libpcap.pcap_freecode(ctypes.byref(self.programs.popitem(last=False)[1]))
        return program


_COMPILED = _CompiledFilters()


def set_filter(handle, expression: str) -> None:
    """``handle.setfilter(expression)``, by libpcap's own calls where _savefile_pcap allows,
    with the program compiled once for every capture of the link type (_CompiledFilters),
    else by pcapy's.  Raises pcapy.PcapError with libpcap's message, as pcapy does, when
    the expression does not compile.  Capture files are opened one at a time, on one
    thread."""
    found = _savefile_pcap(handle, regular_file=False)
    if found is None:
        handle.setfilter(expression)
        return
    libraries, pcap, _ = found
    ctypes, libpcap = libraries[:2]
    program = _COMPILED.get(libraries, pcap, expression, handle.datalink())
    if libpcap.pcap_setfilter(pcap, ctypes.byref(program)) != 0:
        import pcapy

        raise pcapy.PcapError(libpcap.pcap_geterr(pcap).decode("utf-8", "replace"))
