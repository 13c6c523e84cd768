# -*- test-case-name: tests.test_idle_tunnels -*-
"""
Which tunnels have gone silent, and what to do about it (docs/PROTOCOL.md,
Liveness): one timer per tunnel factory, not one per tunnel.

The client pings first: on an idle tunnel its ping and the gateway's pong
are all the traffic, so a gateway with thousands of tunnels sends no pings
of its own.  The gateway pings only a client it has not heard for two
intervals (one whose ping_interval is longer than the gateway's).

A sweep touches only the tunnels heard since the last one and those whose
silence reaches a step (a ping, giving back TLS buffers, being dropped).
The rest stay in per-silence sets that move along a queue: a gateway's
thousands of idle tunnels are not visited every sweep (on a gateway with
2,000 tunnels, visiting each cost about an eighth of its idle CPU, in
profiles: cold objects, a cache miss or more per tunnel).
"""

import collections

from twisted.internet.task import LoopingCall

# How often the silence of each tunnel is looked at, per ping interval.  A
# dead peer is found at most interval / 5 late.
SWEEPS_PER_INTERVAL = 5
# Silence, in ping intervals, after which each end pings, and after which a
# tunnel is dead.
CLIENT_PING_AFTER = 1
GATEWAY_PING_AFTER = 2
DEAD_AFTER = 3
# Silence, in sweeps, after which a tunnel may give back its TLS buffers
# (the tunnel decides: only after bulk data; see
# anyproxy.tunnel.websocket.RELEASE_AFTER_BYTES).
RELEASE_AFTER_SWEEPS = 2


class Liveness:
    """
    The open tunnels of one factory and their silence.  One timer sweeps
    them every C{interval / SWEEPS_PER_INTERVAL} seconds; a tunnel's silence
    is the number of sweeps since it was last L{heard}.

    A tunnel silent for more than C{ping_after} sweeps is pinged (and again
    every interval while it stays silent); one silent for more than
    C{dead_after} is dead, dropped within C{interval / 5} after that, its
    streams reset.  One quiet for L{RELEASE_AFTER_SWEEPS} sweeps is asked to
    give back its TLS buffers.

    What a watched tunnel must have: C{sendPing()}, C{release_idle_buffers()},
    C{silence_timed_out(seconds)}, and an attribute C{silence_set} that only
    this class sets (C{None} while heard since the last sweep; the tunnel's
    own read path calls L{heard} when it is not C{None}).

    @ivar interval: the ping interval, seconds.
    @ivar ping_after: the silence, in sweeps, after which a tunnel is pinged.
    @ivar dead_after: the silence, in sweeps, after which a tunnel is dropped.
    """

    def __init__(self, clock, interval, is_gateway):
        self._clock = clock
        self._sweeper = None
        self._heard = set()  # heard since the last sweep
        # _silent[i]: the tunnels silent for i + 1 sweeps.
        self._silent = collections.deque()
        self.interval = interval
        self.ping_after = SWEEPS_PER_INTERVAL * (GATEWAY_PING_AFTER if is_gateway
                                                 else CLIENT_PING_AFTER)
        self.dead_after = SWEEPS_PER_INTERVAL * DEAD_AFTER

    def _watching(self):
        return bool(self._heard) or any(self._silent)

    @property
    def watched(self):
        """The tunnels watched now (a frozenset)."""
        return frozenset(self._heard).union(*self._silent)

    def silence(self, protocol):
        """How many sweeps C{protocol} has been silent (0: heard since the last)."""
        if protocol.silence_set is None:
            return 0
        for index, tunnels in enumerate(self._silent):
            if tunnels is protocol.silence_set:
                return index + 1
        raise KeyError(protocol)

    def heard(self, protocol):
        """C{protocol} received something: its silence is over."""
        protocol.silence_set.discard(protocol)
        protocol.silence_set = None
        self._heard.add(protocol)

    def configure(self, interval):
        """A new ping interval, for every tunnel: their silence counts from now."""
        if interval == self.interval:
            return
        self.interval = interval
        while self._silent:
            for protocol in self._silent.pop():
                protocol.silence_set = None
                self._heard.add(protocol)
        if self._sweeper is not None:
            self._sweeper.stop()
            self._start()

    def add(self, protocol):
        """Watch C{protocol}, an open tunnel."""
        self._forget(protocol)
        self._heard.add(protocol)
        if self._sweeper is None:
            self._start()

    def discard(self, protocol):
        """Stop watching C{protocol} (closed); the timer stops with the last one."""
        self._forget(protocol)
        self._stop_if_idle()

    def _forget(self, protocol):
        (self._heard if protocol.silence_set is None else protocol.silence_set).discard(protocol)
        protocol.silence_set = None

    def _stop_if_idle(self):
        if self._sweeper is not None and not self._watching():
            self._sweeper.stop()
            self._sweeper = None

    def _start(self):
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self._clock
        self._sweeper.start(self.interval / SWEEPS_PER_INTERVAL, now=False)

    def sweep(self):
        """One sweep: count silence, free the newly quiet's TLS buffers, ping the silent, drop the dead."""
        heard, self._heard = self._heard, set()
        for protocol in heard:
            protocol.silence_set = heard
        silent = self._silent
        silent.appendleft(heard)
        dead = silent.pop() if len(silent) > self.dead_after else ()
        # Copies: a ping's write may lose a connection, which leaves its set.
        if len(silent) >= RELEASE_AFTER_SWEEPS:  # before any ping: ping_after >= 5
            for protocol in list(silent[RELEASE_AFTER_SWEEPS - 1]):
                protocol.release_idle_buffers()
        for sweeps in range(self.ping_after + 1, min(len(silent), self.dead_after) + 1,
                            SWEEPS_PER_INTERVAL):
            for protocol in list(silent[sweeps - 1]):
                protocol.sendPing()
        # Taken from the set itself: dropping one may discard another of them.
        while dead:
            protocol = dead.pop()
            protocol.silence_set = None
            protocol.silence_timed_out(self.interval * DEAD_AFTER)
        self._stop_if_idle()
