# -*- test-case-name: tests.test_registry -*-
"""
The gateway's pool of connected client tunnels, grouped by client group, and
the choice of a tunnel for each new stream.
"""

import random
import time

import attr
from twisted.internet import defer

from anyproxy.errors import Reason, StreamOpenError


@attr.s(eq=False)
class Tunnel:
    """One connected client WebSocket, as the gateway sees it."""

    client_id = attr.ib()
    group = attr.ib()
    mux = attr.ib()
    address = attr.ib(default="")
    version = attr.ib(default="")
    connected_at = attr.ib(factory=time.time)
    close = attr.ib(default=None, repr=False)  # callable: drop the connection

    @property
    def active_streams(self):
        return self.mux.stream_count


class TunnelRegistry:
    """
    Connected tunnels by group.  L{pick} chooses by the configured strategy:
    C{least_streams} (fewest open streams, ties in turn), C{round_robin} or
    C{random}.
    """

    STRATEGIES = ("least_streams", "round_robin", "random")

    def __init__(self, clock, balance="least_streams", rng=random):
        if balance not in self.STRATEGIES:
            raise ValueError("unknown balance strategy %r" % (balance,))
        self._clock = clock
        self.balance = balance
        self._rng = rng
        self._groups = {}
        self._turn = 0
        self._waiters = {}

    def add(self, tunnel):
        """Make C{tunnel} available for new streams and wake waiting users."""
        self._groups.setdefault(tunnel.group, []).append(tunnel)
        for waiter in self._waiters.pop(tunnel.group, []):
            if not waiter.called:
                waiter.callback(None)

    def remove(self, tunnel):
        """Take C{tunnel} out of the pool (its streams are reset by its mux)."""
        tunnels = self._groups.get(tunnel.group, [])
        if tunnel in tunnels:
            tunnels.remove(tunnel)
        if not tunnels:
            self._groups.pop(tunnel.group, None)

    def tunnels(self, group=None):
        """The connected tunnels, of one group or of all."""
        if group is not None:
            return list(self._groups.get(group, ()))
        return [t for tunnels in self._groups.values() for t in tunnels]

    def pick(self, group):
        """A tunnel of C{group} for a new stream, or C{None}."""
        tunnels = self._groups.get(group)
        if not tunnels:
            return None
        self._turn += 1
        if self.balance == "random":
            return self._rng.choice(tunnels)
        if self.balance == "round_robin":
            return tunnels[self._turn % len(tunnels)]
        fewest = min(t.active_streams for t in tunnels)
        ties = [t for t in tunnels if t.active_streams == fewest]
        return ties[self._turn % len(ties)]

    def wait_for(self, group, timeout):
        """
        A Deferred firing with a tunnel of C{group}, waiting up to C{timeout}
        seconds for one to connect; fails with L{StreamOpenError} NO_TUNNEL.
        """
        tunnel = self.pick(group)
        if tunnel is not None:
            return defer.succeed(tunnel)
        if timeout <= 0:
            return defer.fail(StreamOpenError(Reason.NO_TUNNEL, "no client connected for this user"))
        waiter = defer.Deferred()
        waiters = self._waiters.setdefault(group, [])
        waiters.append(waiter)
        timer = self._clock.callLater(timeout, waiter.cancel)

        def arrived(_):
            if timer.active():
                timer.cancel()
            found = self.pick(group)
            if found is None:
                raise StreamOpenError(Reason.NO_TUNNEL, "no client connected for this user")
            return found

        def gave_up(failure):
            failure.trap(defer.CancelledError)
            if waiter in waiters:
                waiters.remove(waiter)
            if timer.active():
                timer.cancel()
                return failure  # cancelled by the caller
            raise StreamOpenError(Reason.NO_TUNNEL, "no client connected for this user")

        return waiter.addCallbacks(arrived, gave_up)
