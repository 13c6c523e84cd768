# -*- test-case-name: tests.test_http_pool -*-
"""
Idle upstream connections of the HTTP proxy, kept for the next request.

Opening a stream costs a round trip through the tunnel and a new TCP
connection at the client; for small requests that is most of the work.  So,
like squid's and nginx's persistent server connections, a forwarded request
whose exchange ended cleanly (both sides of its HTTP/1.1 connection DONE)
leaves its stream here, and the next request of the same user to the same
origin takes it back instead of opening one.

  - A key is C{(user name, group, host, port)}: a connection is only ever
    reused for the user (and so the routing group) it was opened for.
  - The most recently idle connection of a key is taken first: it is the
    least likely to have been closed by the origin meanwhile.
  - At most C{max_idle} connections wait in all; one more closes the one
    idle longest.  Each closes after C{idle_timeout} seconds unused, short
    of usual origin keep-alive timeouts (nginx 75 s) and of the client's
    C{idle_timeout}.
  - A waiting connection that the origin closes, or that receives anything
    (nothing may arrive between exchanges), leaves at once (L{discard}).

Entries are opaque here: anything with a C{close()} method.  The pool does no
I/O beyond calling it, and keeps time with the injected clock.
"""

import collections

# Defaults of the http frontend's upstream_keepalive / upstream_idle_timeout.
DEFAULT_MAX_IDLE = 32
DEFAULT_IDLE_TIMEOUT = 15.0


class UpstreamPool:
    """Idle connections by key; see the module docstring."""

    def __init__(self, clock, max_idle=DEFAULT_MAX_IDLE, idle_timeout=DEFAULT_IDLE_TIMEOUT):
        self._clock = clock
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # Every idle entry -> (key, timer), oldest first; and entries per key.
        self._idle = collections.OrderedDict()
        self._by_key = {}
        self._closed = False
        self.reuses = 0  # idle connections taken back for a request (metrics)

    def __len__(self):
        return len(self._idle)

    @property
    def enabled(self):
        """Whether connections are kept at all (C{max_idle} > 0)."""
        return self.max_idle > 0

    def take(self, key):
        """The most recently idle entry of C{key}, removed from the pool, or C{None}."""
        entries = self._by_key.get(key)
        if not entries:
            return None
        entry = entries.pop()
        if not entries:
            del self._by_key[key]
        _, timer = self._idle.pop(entry)
        timer.cancel()
        self.reuses += 1
        return entry

    def put(self, key, entry):
        """
        Keep C{entry} for C{key}.  When the pool is full, the entry idle
        longest is closed to make room.

        @return: C{False} (and nothing kept) when the pool is disabled or
            was cleared for good.
        """
        if not self.enabled or self._closed:
            return False
        timer = self._clock.callLater(self.idle_timeout, self._expired, entry)
        self._idle[entry] = (key, timer)
        self._by_key.setdefault(key, []).append(entry)
        while len(self._idle) > self.max_idle:
            oldest = next(iter(self._idle))
            self.discard(oldest)
            oldest.close()
        return True

    def discard(self, entry):
        """Forget C{entry} (it closed or misbehaved); nothing if it is not idle here."""
        found = self._idle.pop(entry, None)
        if found is None:
            return
        key, timer = found
        if timer.active():
            timer.cancel()
        entries = self._by_key[key]
        entries.remove(entry)
        if not entries:
            del self._by_key[key]

    def clear(self):
        """
        Close every idle entry and keep none from now on (the listener
        stopped, a reload replaced it, or the gateway drains; its
        connections may still finish exchanges, then close theirs).
        """
        self._closed = True
        self.close_idle()

    def close_idle(self, which=None):
        """
        Close the idle entries (those for which C{which(entry)} is true, if
        given); later ones are kept as before.
        """
        for entry in [each for each in self._idle if which is None or which(each)]:
            self.discard(entry)
            entry.close()

    def _expired(self, entry):
        self.discard(entry)
        entry.close()
