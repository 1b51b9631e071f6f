"""A larger stdio buffer for the capture file libpcap reads.

libpcap reads a savefile through C stdio, which glibc buffers by the file's block size:
4 KiB, so a 1 GB capture costs a quarter of a million ``read`` calls.  Reading through a
buffer of READ_BUFFER bytes takes about a quarter off libpcap's own time, which sets a
``read``'s wall time where the filter passes little (806 MB of frames it rejects: 0.44 s
before, 0.36 s after, at best of ten), and a tenth off a whole read's CPU time where the
decoder's thread is the longer one (bench/run.py's mix).  pcapy hands out no ``FILE *``:
it is reached through libpcap's own ``pcap_file`` on the ``pcap_t`` that pcapy-ng's reader
object holds first, and only where every assumption is checked (widen_read_buffer);
anywhere else libpcap reads as it always has, only slower.
"""

from __future__ import annotations

import os
import stat
import sys

READ_BUFFER = 256 * 1024
# Below this size the buffer saves fewer calls than loading ctypes costs.
MIN_CAPTURE_SIZE = 16 * READ_BUFFER
# pcapy-ng 2's reader object (tp_basicsize): its pcap_t pointer follows the object header.
_KNOWN_READER_SIZES = frozenset({104})
_POINTER_OFFSET = 16
_IOFBF = 0


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


def widen_read_buffer(handle, size: int = READ_BUFFER):
    """Give the stream libpcap reads ``handle``'s savefile through a buffer of ``size``
    bytes; returns the buffer, which must outlive the handle, or None where this is not
    done: not glibc (whose ``setvbuf`` after reading first moves the file back to where
    the stream stands; elsewhere the bytes already buffered could be lost), not a regular
    file (a pipe cannot move back), a reader object of another layout, a libpcap that
    cannot be told apart, or a stream that turns out not to be the handle's file."""
    if sys.platform != "linux":
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        fd = handle.getfd()
        if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    if type(handle).__basicsize__ not in _KNOWN_READER_SIZES:
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
    libpcap.pcap_file.restype = ctypes.c_void_p
    libpcap.pcap_file.argtypes = [ctypes.c_void_p]
    libc.fileno.argtypes = [ctypes.c_void_p]
    libc.setvbuf.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    pcap = ctypes.c_void_p.from_address(id(handle) + _POINTER_OFFSET).value
    if not pcap:
        return None
    stream = libpcap.pcap_file(pcap)
    if not stream or libc.fileno(stream) != fd:
        return None
    buffer = ctypes.create_string_buffer(size)
    if libc.setvbuf(stream, buffer, _IOFBF, size) != 0:
        return None
    return buffer
