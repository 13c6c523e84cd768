# -*- test-case-name: tests.test_memory -*-
"""
The process's memory: freed memory given back to the system after a burst
of handshakes (L{ReleaseAfterBursts}), and the garbage collector kept off
the objects of start-up (L{FreezeAfterStartup}).

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
import gc

from twisted.application.service import Service
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


class FreezeAfterStartup(Service):
    """
    Once the program has started, move every object it holds into the
    garbage collector's permanent generation (C{gc.freeze}), after one
    collection.

    Why: a full collection walks every tracked object of the process, and
    the modules, classes and functions of start-up are most of them (about
    70,000 in a gateway).  Streams promote their objects often enough that
    full collections came every second or two under load, each 25-40 ms,
    during which every stream in flight waited (the CONNECT benchmark's p99
    was 45 ms against 15 ms without them).  Frozen objects are still freed
    by reference counting; only a frozen object that later becomes part of
    cyclic garbage (an old configuration's, after a reload) is never
    collected, a bounded cost.
    """

    frozen = None  # how many objects were frozen, once done

    def __init__(self, clock):
        self._clock = clock
        self._call = None

    def startService(self):
        super().startService()
        # On the reactor's first turn: after every service has started.
        self._call = self._clock.callLater(0, self._freeze)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _freeze(self):
        self._call = None
        gc.collect()
        gc.freeze()
        self.frozen = gc.get_freeze_count()
        log.debug("{count} objects of start-up frozen (kept out of garbage collections)",
                  count=self.frozen)
