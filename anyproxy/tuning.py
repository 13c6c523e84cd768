# -*- test-case-name: tests.test_tuning -*-
"""
Process and socket settings for bulk throughput, measured in benchmarks/.

Reading large chunks is the biggest single gain on the data path (fewer
system calls and fewer Python calls per byte), but only if glibc's malloc
keeps buffers that large on its heap: by default each allocation over 128 KiB
gets a fresh mmap and is unmapped on free, which costs more than the larger
reads save.  Raising the mmap threshold fixes that.
"""

import ctypes
import ctypes.util

# Bytes read per doRead on bulk connections (user, target and tunnel sockets).
READ_SIZE = 256 * 1024
# glibc: allocations below this stay on the heap and are reused.
MMAP_THRESHOLD = 4 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # from <malloc.h>

_tuned = False


def tune_malloc():
    """Raise glibc's mmap threshold (no-op elsewhere); C{True} if it was set."""
    global _tuned
    if _tuned:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _tuned


def read_in_bulk(transport):
    """Make a TCP transport read up to L{READ_SIZE} bytes at a time."""
    transport = getattr(transport, "transport", None) or transport  # under TLS
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = READ_SIZE


def set_no_delay(transport):
    """Turn off Nagle's algorithm on a TCP transport (best effort)."""
    transport = getattr(transport, "transport", None) or transport
    set_option = getattr(transport, "setTcpNoDelay", None)
    if set_option is not None:
        try:
            set_option(True)
        except OSError:
            pass  # not a TCP socket (e.g. a UNIX socket)
