# -*- test-case-name: tests.test_memory -*-
"""
Giving freed memory back to the system after a burst of handshakes.

A TLS + WebSocket handshake allocates far more than the tunnel keeps; after
thousands of clients reconnect at once (a gateway restart), glibc's
allocator holds on to the freed pages, about 5 KiB per tunnel measured
(benchmarks/README.md, many_tunnels).  So do the TLS buffers quiet tunnels
give back (L{anyproxy.tunnel.tls_transport.release_buffers}).  L{ReleaseAfterBursts} asks glibc
(C{malloc_trim(0)}) to return them once a burst is over: at most once per
C{quiet} seconds, only after C{burst} handshakes since the last time, so a
steady trickle of reconnects costs nothing.  On a C library without
C{malloc_trim} (musl, macOS) it does nothing.
"""

import ctypes
import ctypes.util

from twisted.logger import Logger

log = Logger()


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


MALLOC_TRIM = _malloc_trim()


class ReleaseAfterBursts:
    """
    Call L{handshake_done} for each completed handshake, and L{buffers_freed}
    each time a connection lets go of buffers (a quiet tunnel's TLS BIOs); the
    memory freed by a burst of either is released C{quiet} seconds after the
    burst's last.

    @param trim: the release function (C{malloc_trim}; tests pass their own).
    @ivar releases: times memory was released (tests, metrics).
    """

    def __init__(self, clock, burst=100, quiet=5.0, trim=MALLOC_TRIM):
        self._clock = clock
        self.burst = burst
        self.quiet = quiet
        self._trim = trim
        self._count = 0
        self._timer = None
        self.releases = 0

    def handshake_done(self):
        self.buffers_freed()

    def buffers_freed(self):
        if self._trim is None:
            return
        self._count += 1
        if self._count < self.burst:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.quiet)
        else:
            self._timer = self._clock.callLater(self.quiet, self._release)

    def _release(self):
        self._timer = None
        self._count = 0
        self.releases += 1
        self._trim(0)

    def stop(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
