# -*- test-case-name: tests.test_tunnel_pool -*-
"""
The gateway's pool of connected client tunnels (L{TunnelPool}, an
L{anyproxy.interfaces.ITunnelPool} kept in memory), grouped by client group,
and the choice of a tunnel for each new stream.

The tunnel server (L{anyproxy.gateway.tunnel_server}) adds and removes
tunnels; endpoints (L{anyproxy.tunnel.endpoint.TunnelEndpoint}) wait for one;
metrics and the status page read it.  Each of them knows only the interface,
so a fleet registry shared by several gateways can take this one's place.
A tunnel whose mux is draining (a GOAWAY sent or received) is not picked for
new streams; its open streams go on until it closes.

Routing by destination (C{client.routes}, L{anyproxy.gateway.routing}): a
tunnel may carry the routes its client announced.  When a group has any,
L{TunnelPool.pick} keeps the group's tunnels whose routes match the target
most specifically, then balances among those; a target no tunnel of the
group routes is refused at once (L{TunnelPool.wait_for}, HOST_UNREACHABLE),
and a dial that failed at one client is tried once at another that routes
the target (L{TunnelPool.retry_choice}).  A group without routes takes the
path it always took, with one dictionary test more.
"""

import random
import time

import attr
from twisted.internet import defer, task
from zope.interface import implementer

from twisted.logger import Logger

from anyproxy.errors import ConfigError, Reason, StreamOpenError
from anyproxy.gateway.routing import Target, matcher_for, most_specific
from anyproxy.routes import route_texts
from anyproxy.interfaces import ITunnelPool

log = Logger()

# The failures of an OPEN that another client of the group may not share:
# the target is unreachable, refused or silent from where this client is.
# The stream is tried once elsewhere (TunnelPool.retry_choice).
RETRIED_REASONS = frozenset((Reason.NETWORK_UNREACHABLE, Reason.HOST_UNREACHABLE,
                             Reason.CONNECTION_REFUSED, Reason.TIMED_OUT))


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
    weight = attr.ib(default=1.0)  # the client's share of new streams (HELLO "weight")
    credential = attr.ib(default="")  # the name of the client credential it logged in with
    # What the client can reach (HELLO "routes"): a pac.Routes, or None
    # when it announced none and serves anything.
    routes = attr.ib(default=None)
    route_matcher = attr.ib(init=False, default=None, repr=False)

    def __attrs_post_init__(self):
        self.route_matcher = matcher_for(self.routes)

    @property
    def route_texts(self):
        """The announced routes as texts (status page), empty when it serves anything."""
        return list(route_texts(self.routes)) if self.route_matcher is not None else []

    @property
    def active_streams(self):
        return self.mux.stream_count

    @property
    def draining(self):
        """
        Whether the tunnel takes no new streams: GOAWAY sent or received, or
        its connection already lost (the pool drops it a turn later, on the
        close).
        """
        mux = self.mux
        return bool(getattr(mux, "draining", False) or getattr(mux, "lost", False))

    def go_away(self, clock, reason=Reason.NO_TUNNEL):
        """
        Close the tunnel, telling the client first: a GOAWAY frame (no new
        streams on this tunnel; the client may reconnect at once) if the mux
        can send one, then the connection is dropped two reactor turns
        later.  The frame waits in the TCP transport's buffer until the
        reactor's next pass over its sockets, and a call scheduled while the
        reactor handles I/O runs before that pass: the second turn lets the
        frame out before the abort (which would discard it).  Streams still
        open are reset by the close: the gateway goes away on shutdown, and
        a revoked credential keeps nothing open.

        @param clock: the C{IReactorTime} to wait the turns on.
        @param reason: the L{Reason} the GOAWAY gives, for the client's log.
        @return: a Deferred firing once the connection has been dropped.
        """
        go_away = getattr(self.mux, "go_away", None)
        if go_away is None:
            if self.close is not None:
                self.close()
            return defer.succeed(None)
        go_away(reason)
        close = self.close if self.close is not None else (lambda: None)
        return task.deferLater(clock, 0, lambda: None).addCallback(
            lambda _: task.deferLater(clock, 0, close))


@implementer(ITunnelPool)
class TunnelPool:
    """
    Connected tunnels by group.  L{pick} chooses by the configured strategy,
    each weighted by L{Tunnel.weight}:

      - C{least_streams}: the fewest open streams per unit of weight
        (C{active_streams / weight}); ties are broken by smooth weighted
        round robin, so equal tunnels are picked strictly in turn.
      - C{round_robin}: smooth weighted round robin (as nginx does it): each
        pick adds every tunnel's weight to its running score, takes the
        highest score and charges it the group's total weight.  Over any
        run of C{total} picks each tunnel gets exactly its share, and the
        picks of a heavy tunnel are interleaved, not bunched.
      - C{random}: a random tunnel, with probability proportional to weight.

    Draining tunnels (L{Tunnel.draining}) are left out of every strategy.
    A reload changes the strategy for the next pick (L{prepare}).

    Given a target host, a group whose tunnels announced routes is first
    narrowed to the tunnels matching it most specifically
    (L{anyproxy.gateway.routing.most_specific}); the strategy then chooses
    among those equals.
    """

    STRATEGIES = ("least_streams", "round_robin", "random")

    def __init__(self, clock, balance="least_streams", rng=random):
        if balance not in self.STRATEGIES:
            raise ValueError("unknown balance strategy %r" % (balance,))
        self._clock = clock
        self.balance = balance
        self._rng = rng
        self._groups = {}
        self._scores = {}  # tunnel -> its smooth weighted round robin score
        self._waiters = {}
        self._routed = {}  # group -> how many of its tunnels announced routes
        # Called with each tunnel taken out of the pool (metrics keep its totals).
        self.removal_observers = []

    def prepare(self, config):
        """See L{anyproxy.interfaces.IReconfigurable}: C{gateway.balance}."""
        balance = config.gateway.balance
        if balance not in self.STRATEGIES:
            raise ConfigError("%s: gateway.balance: unknown strategy %r" % (config.path, balance))

        def apply():
            self.balance = balance
            return defer.succeed([])

        return apply

    def add(self, tunnel):
        """Make C{tunnel} available for new streams and wake waiting users."""
        self._groups.setdefault(tunnel.group, []).append(tunnel)
        if tunnel.route_matcher is not None:
            self._routed[tunnel.group] = self._routed.get(tunnel.group, 0) + 1
        for waiter in self._waiters.pop(tunnel.group, []):
            if not waiter.called:
                waiter.callback(None)

    def remove(self, tunnel):
        """Take C{tunnel} out of the pool (its streams are reset by its mux)."""
        tunnels = self._groups.get(tunnel.group, [])
        if tunnel in tunnels:
            tunnels.remove(tunnel)
            if tunnel.route_matcher is not None:
                left = self._routed.pop(tunnel.group) - 1
                if left:
                    self._routed[tunnel.group] = left
            for observer in self.removal_observers:
                observer(tunnel)
        self._scores.pop(tunnel, None)
        if not tunnels:
            self._groups.pop(tunnel.group, None)

    def tunnels(self, group=None):
        """The connected tunnels, of one group or of all."""
        if group is not None:
            return list(self._groups.get(group, ()))
        return [t for tunnels in self._groups.values() for t in tunnels]

    def routed_best(self, group, host, mux):
        """
        Whether the tunnel of C{mux} is still one that L{pick} would choose
        from for C{host} in C{group} (its routes among the most specific):
        a connection kept on it for reuse must not outlive a client that
        announced a better route since.  Always true without routes.
        """
        if not (self._routed and host is not None and group in self._routed):
            return True
        return any(each.mux is mux for each in most_specific(self._groups[group],
                                                              Target.of(host)))

    def pick(self, group, host=None, avoid=None):
        """
        A tunnel of C{group} for a new stream, or C{None}.

        @param host: the stream's target host, or C{None} to ignore routes
            (a UDP association has no single target).  When some tunnel of
            the group announced routes, only the tunnels matching C{host}
            most specifically are chosen from.
        @param avoid: a client id whose tunnels are not chosen (a retry).
        """
        # An empty _routed (no routes anywhere: the usual case) costs one test.
        if self._routed and host is not None and group in self._routed:
            tunnels = most_specific(self._groups[group], Target.of(host), avoid)
        elif avoid is None:
            tunnels = [each for each in self._groups.get(group, ()) if not each.draining]
        else:
            tunnels = [each for each in self._groups.get(group, ())
                       if not each.draining and each.client_id != avoid]
        if not tunnels:
            return None
        if self.balance == "random":
            return self._weighted_random(tunnels)
        if self.balance == "round_robin":
            return self._smooth_round_robin(tunnels)
        load = [(t.active_streams / t.weight, t) for t in tunnels]
        fewest = min(each for each, _ in load)
        return self._smooth_round_robin([t for each, t in load if each == fewest])

    def _smooth_round_robin(self, tunnels):
        total = 0.0
        best = best_score = None
        for each in tunnels:
            score = self._scores.get(each, 0.0) + each.weight
            self._scores[each] = score
            total += each.weight
            if best is None or score > best_score:
                best, best_score = each, score
        self._scores[best] = best_score - total
        return best

    def _weighted_random(self, tunnels):
        first = tunnels[0].weight
        if all(each.weight == first for each in tunnels):
            return self._rng.choice(tunnels)
        point = self._rng.random() * sum(each.weight for each in tunnels)
        for each in tunnels:
            point -= each.weight
            if point < 0:
                return each
        return tunnels[-1]  # rounding left a sliver past the last one

    def routes_nowhere(self, group, host):
        """
        Whether C{group} has tunnels taking new streams, every one with
        routes, and none of them routes C{host}: the stream is refused at
        once (L{unroutable}) instead of waiting.
        """
        if host is None or group not in self._routed:
            return False
        tunnels = [each for each in self._groups[group] if not each.draining]
        return bool(tunnels) and not most_specific(tunnels, Target.of(host))

    def retry_choice(self, group, host, failed, failure):
        """
        Another tunnel for a stream whose OPEN failed on C{failed} (no byte
        has crossed), or C{None}: only when C{failed} announced routes (it
        is a site's client: a group without routes keeps its old answer),
        only when the failure is one another site may not share
        (L{RETRIED_REASONS}), and only a tunnel of another client that
        matches C{host} (the most specific of those, a client without
        routes included).  The caller retries once.

        @param failure: the OPEN's L{Failure}.
        """
        if host is None or failed.route_matcher is None or group not in self._routed \
                or not failure.check(StreamOpenError) \
                or failure.value.reason not in RETRIED_REASONS:
            return None
        other = self.pick(group, host, avoid=failed.client_id)
        if other is not None:
            log.info("stream to {host}: {reason} via {failed}; trying {other} once",
                     host=host, reason=failure.value.reason.name, failed=failed.client_id,
                     other=other.client_id)
        return other

    def wait_for(self, group, timeout, host=None):
        """
        A Deferred firing with a tunnel of C{group}, waiting up to C{timeout}
        seconds for one to connect; fails with L{StreamOpenError} NO_TUNNEL,
        or at once with HOST_UNREACHABLE when the group's tunnels all have
        routes and none routes C{host} (L{routes_nowhere}).

        @param host: the target host, or C{None} to ignore routes (see L{pick}).
        """
        tunnel = self.pick(group, host)
        if tunnel is not None:
            return defer.succeed(tunnel)
        if self.routes_nowhere(group, host):
            return defer.fail(unroutable(group, host))
        if timeout <= 0:
            return defer.fail(StreamOpenError(Reason.NO_TUNNEL, "no client connected for this user"))
        waiter = defer.Deferred()
        waiters = self._waiters.setdefault(group, [])
        waiters.append(waiter)
        timer = self._clock.callLater(timeout, waiter.cancel)

        def arrived(_):
            if timer.active():
                timer.cancel()
            found = self.pick(group, host)
            if found is None:
                if self.routes_nowhere(group, host):
                    raise unroutable(group, host)
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


def unroutable(group, host):
    """The L{StreamOpenError} for a target no client of C{group} routes (SOCKS 0x04, HTTP 502)."""
    return StreamOpenError(Reason.HOST_UNREACHABLE,
                           "no client of group %s routes %s (client.routes)" % (group, host))
