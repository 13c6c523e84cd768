# -*- test-case-name: tests.test_drain -*-
"""
The graceful drain of a stopping gateway (SIGTERM under twistd, with
C{gateway.drain_timeout} > 0): L{Drain}, run by
L{anyproxy.gateway.app.Gateway.stopService}, and the readiness page
balancers check (L{ReadinessPage}, C{GET /ready}).

Theory of operation
-------------------
A gateway that stops at once resets every stream it carries.  Behind a
balancer, with a fleet or with clients that reconnect, the users and clients
have somewhere else to go; what they must not lose is the work in flight.
So the drain moves everything new elsewhere first and only then waits:

  0. I{Fail readiness}: from the drain's first moment C{GET /ready} on the
     metrics and status listeners (L{ReadinessPage}) answers 503.  A
     balancer's health check (HAProxy's C{option httpchk GET /ready}, a
     Kubernetes readinessProbe) takes this gateway out of rotation while it
     still serves everything as before.  And the frontends let go of the
     idle upstream connections they keep for reuse (the HTTP proxy's
     C{upstream_keepalive}) and keep none from now on
     (L{anyproxy.gateway.app.Gateway.stop_keeping_upstreams}): each is an
     open stream, here or on the peer it is relayed to, that step 5 would
     wait for to its deadline.  (A peer's drain sends GOAWAY on our links
     to it, and we let go of those kept there, L{anyproxy.fleet.peer_link}.)
  1. I{Leave the fleet} (L{anyproxy.gateway.app.Gateway.leave_fleet}, a
     no-op without one): the forwarded ports stop taking users (their
     claims are about to go, and another gateway may then open them), and
     the registry deregisters this node, so other gateways stop relaying to
     it and clients are no longer told to attach to it.  Other nodes hear of it through pub/sub in well under a second,
     so this node keeps serving for L{FLEET_SETTLE} seconds more: a stream a
     peer relays in that window still finds the local tunnels usable.
  2. I{Wait for the balancer}: the listeners stay open until
     C{gateway.drain_delay} seconds after the start (and the fleet's settle
     after leaving, whichever is later).  A connection the balancer sends
     before its check has noticed is served here.  Closing a listening
     socket resets the connections still in its accept backlog, after the
     balancer's connect to them succeeded; HAProxy cannot retry those
     (C{retries} and C{redispatch} cover failed connects only), so the
     delay must outlast the balancer's detection time (docs/FLEET.md).
  3. I{Stop accepting}: the proxy listeners and the tunnel listener close.
     A balancer's next connect is refused and goes to another server
     (HAProxy's C{option redispatch}); a client reconnecting through it
     lands elsewhere.  Connections already accepted go on: those still in
     their handshake, or opening their stream, are waited for (polled every
     L{ARRIVING_POLL} s), so that they get their stream before step 4.
  4. I{GOAWAY} on every client tunnel, and on the links peers dialed to
     us: the client (or peer) opens no stream on it and neither do we
     (L{anyproxy.tunnel.mux.Mux.go_away}); its open streams go on.  Each
     tunnel is closed as soon as it carries no stream
     (L{anyproxy.tunnel.mux.Mux.when_drained}), so its client reconnects
     (within its backoff) to another gateway while others still finish.
  5. I{Wait} for the open streams, up to the timeout: the streams of every
     local tunnel (users', forwarded ports', those relayed in from peers)
     and the frontend streams opened through peer links (relayed out).
     Waiting is event-driven (each stream's C{notify_closed}); once they
     are all done the set is taken again, since a connection accepted
     before step 3 may have opened one since.  A tunnel told in step 4 is
     waited for too until its C{when_drained}: that includes a round trip
     after the GOAWAY, behind which any OPEN the peer sent before it read
     the GOAWAY has arrived (a peer relaying a stream here at that moment).

C{drain_timeout} bounds the whole drain, the delay included (it is what a
service manager's stop timeout must cover).  The drain ends when no stream
is left after step 3, at the deadline, or when L{Drain.cut} is called (a
second SIGTERM or SIGINT, L{anyproxy.twistd.gateway}); a drain that ends
before step 3 closes the listeners then.  The gateway then stops as it
always did, resetting whatever is still open.  One log line says when it
starts and one how it ended.
"""

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource

from anyproxy.errors import Reason

log = Logger()

# Seconds between looks at the connections still arriving once no stream is
# open (L{Drain.connections_arriving}).
ARRIVING_POLL = 0.05

# Seconds a node that left the fleet keeps serving as before: its peers
# learn of the departure through Redis pub/sub, "in well under a second"
# (docs/FLEET.md), and until then may still relay streams to it.
FLEET_SETTLE = 1.0

# Seconds the fleet registry may take to deregister (it is bounded itself;
# this keeps a stuck store from holding the drain back).
LEAVE_TIMEOUT = 5.0

FINISHED = "finished"
TIMED_OUT = "timed out"
CUT = "cut"


def first_of(clock, deferred, seconds):
    """
    A Deferred firing with C{None} when C{deferred} fires (either way) or
    C{seconds} have passed, whichever comes first; C{deferred} itself is
    left running, its failure consumed.
    """
    either = defer.Deferred()

    def done(_):
        if timer.active():
            timer.cancel()
        if not either.called:
            either.callback(None)

    timer = clock.callLater(seconds, done, None)
    either.timer = timer  # cancelled by whoever gives up waiting first
    deferred.addErrback(lambda failure: log.failure("leaving the fleet failed", failure))
    deferred.addBoth(done)
    return either


@attr.s(eq=False)
class Drain:
    """
    One drain of one gateway; see the module docstring.  Build it and call
    L{start} once.

    @ivar gateway: the L{anyproxy.gateway.app.Gateway} draining.
    @ivar clock: the C{IReactorTime} the deadline and the settle run on.
    @ivar timeout: seconds the whole drain may take, from L{start}.
    @ivar delay: seconds from L{start} during which the listeners still
        accept (C{gateway.drain_delay}): the balancer's time to see
        C{/ready} fail.
    @ivar outcome: C{None} while running, then L{FINISHED}, L{TIMED_OUT}
        or L{CUT}.
    @ivar listeners_closed: C{None} until the drain stops accepting, then a
        Deferred firing once the listening sockets are closed.
    """

    gateway = attr.ib()
    clock = attr.ib()
    timeout = attr.ib()
    delay = attr.ib(default=0.0)
    outcome = attr.ib(default=None)
    listeners_closed = attr.ib(default=None)
    _started = attr.ib(default=None)
    _waiters = attr.ib(factory=list)
    _timers = attr.ib(factory=list)  # the deadline and the steps' delayed calls
    _watched = attr.ib(factory=set)  # every tunnel told (or found) draining by this drain
    _told = attr.ib(factory=set)  # those of them whose when_drained has not fired yet
    _waiting = attr.ib(default=False)  # a wait for the open streams is under way

    def start(self):
        """Begin the drain; a Deferred firing with the L{outcome} when it ends."""
        gateway = self.gateway
        self._started = self.clock.seconds()
        tunnels = gateway.tunnel_pool.tunnels()
        log.info("drain started: {streams} streams open on {tunnels} client tunnels; they "
                 "may finish within {timeout:g}s (drain_timeout)",
                 streams=len(self.open_streams()), tunnels=len(tunnels), timeout=self.timeout)
        self._timers.append(self.clock.callLater(self.timeout, self._end, TIMED_OUT))
        gateway.stop_keeping_upstreams()
        # The listeners close once both waits are over: the balancer's (from
        # now, as /ready fails from now) and the fleet's (after leaving it).
        waits = []
        if self.delay > 0:
            log.info("drain: /ready answers 503; the proxy and tunnel listeners keep "
                     "accepting for {delay:g}s (drain_delay) while balancers notice",
                     delay=self.delay)
            waits.append(self._sleep(self.delay))
        if gateway.in_fleet:
            leaving = first_of(self.clock, gateway.leave_fleet(), LEAVE_TIMEOUT)
            self._timers.append(leaving.timer)
            leaving.addCallback(lambda _: self._sleep(FLEET_SETTLE))
            waits.append(leaving)
        waited = defer.gatherResults(waits) if waits else defer.succeed(None)
        waited.addCallback(lambda _: self._move_on())
        return self.when_ended()

    def when_ended(self):
        """A Deferred firing with the L{outcome} once the drain has ended."""
        if self.outcome is not None:
            return defer.succeed(self.outcome)
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def cut(self):
        """End the drain now (the streams left are reset by the stop that follows)."""
        self._end(CUT)

    def open_streams(self):
        """
        Every stream still open: those of each local tunnel and the frontend
        streams (which include those relayed to peers), without duplicates.
        """
        gateway = self.gateway
        streams = {stream for tunnel in gateway.tunnel_pool.tunnels()
                   for stream in tunnel.mux.streams()}
        streams.update(gateway.metrics.live_streams())
        return streams

    def connections_arriving(self):
        """
        How many users' connections are on their way to a stream: still in
        their handshake (a SOCKS5 greeting, an HTTP head) or opening one.
        """
        gateway = self.gateway
        frontends = getattr(gateway, "frontends", None)
        metrics = getattr(gateway, "metrics", None)
        return ((frontends.connections_in_handshake() if frontends is not None else 0)
                + (metrics.opening if metrics is not None else 0))

    def _sleep(self, seconds):
        d = defer.Deferred()
        if self.outcome is None:  # else the next step will not run anyway
            self._timers.append(self.clock.callLater(seconds, d.callback, None))
        return d

    def _move_on(self):
        if self.outcome is not None:
            return
        self.listeners_closed = self.gateway.stop_accepting()
        self._after_arrivals()

    def _after_arrivals(self):
        # Connections accepted before the listeners closed and not a stream
        # yet (a balancer's last hand-over) get theirs on a local tunnel
        # before GOAWAY: after it they could open none, and the stop would
        # reset them.  Bounded by the handshake and open deadlines, and the
        # drain by its own.
        if self.outcome is not None:
            return
        if self.connections_arriving():
            self._sleep(ARRIVING_POLL).addCallback(lambda _: self._after_arrivals())
            return
        self._go_away()
        self._wait_for_streams()

    def _go_away(self):
        # Every tunnel not told yet (a HELLO may have completed since the
        # last pass): no new streams, and closed once it carries none.  The
        # links peers dialed to us too: a peer would otherwise keep reusing
        # a stream relayed here (its HTTP proxy's kept upstream connection)
        # and hold the drain to its deadline; told, it closes those idle now.
        tunnels = list(self.gateway.tunnel_pool.tunnels())
        fleet = getattr(self.gateway, "fleet", None)
        if fleet is not None:
            tunnels.extend(fleet.server.factory.links)
        for tunnel in tunnels:
            if tunnel in self._watched:
                continue
            # One draining already (the management API's client drain, or
            # its client's own GOAWAY) is waited for and closed the same way.
            self._watched.add(tunnel)
            if not tunnel.draining:
                tunnel.mux.go_away(Reason.NO_TUNNEL)
            self._told.add(tunnel)
            tunnel.mux.when_drained().addCallback(self._tunnel_drained, tunnel)

    def _tunnel_drained(self, _, tunnel):
        self._told.discard(tunnel)
        tunnel.go_away(self.clock)
        if self.outcome is None and not self._told and not self._waiting:
            # Their last OPENs may have arrived (and finished) meanwhile.
            self._timers.append(self.clock.callLater(0, self._wait_for_streams))

    def _wait_for_streams(self):
        if self.outcome is not None:
            return
        self._waiting = True  # tunnels drained during this pass need no other
        self._go_away()
        streams = self.open_streams()
        if not streams:
            self._waiting = False
            if not self._told:  # else _tunnel_drained starts the next pass
                self._end(FINISHED)
            return
        remaining = [len(streams)]

        def closed(_):
            remaining[0] -= 1
            if remaining[0] == 0:
                self._waiting = False
                # Next turn: a stream's close hooks run before it leaves its
                # mux's table, and the splice may still be ending its peer.
                self._timers.append(self.clock.callLater(0, self._wait_for_streams))

        for stream in streams:
            stream.notify_closed(closed)

    def _end(self, outcome):
        if self.outcome is not None:
            return
        self.outcome = outcome
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        if self.listeners_closed is None:
            # Ended within drain_delay (a deadline shorter than the delay, or
            # a second signal): whatever follows, take no more connections.
            self.listeners_closed = self.gateway.stop_accepting()
        elapsed = self.clock.seconds() - self._started
        if outcome == FINISHED:
            log.info("drain finished: every stream ended, after {elapsed:.1f}s",
                     elapsed=elapsed)
        else:
            why = ("after the {timeout:g}s drain_timeout" if outcome == TIMED_OUT
                   else "by a second signal")
            log.warn("drain cut " + why + " ({elapsed:.1f}s): {streams} streams still open "
                     "are reset", timeout=self.timeout, elapsed=elapsed,
                     streams=len(self.open_streams()))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(outcome)


class ReadinessPage(resource.Resource):
    """
    C{GET /ready} (and C{HEAD}): 200 C{ready} while the gateway takes new
    users and tunnels, 503 C{draining} from the moment a drain begins (see
    the module docstring), and nothing else: it is served without the
    listener's login (L{serve_readiness}), so it tells no more than a
    connect would.  HAProxy's C{option httpchk GET /ready}
    (deploy/haproxy/anyproxy.cfg) and a Kubernetes C{readinessProbe}
    (deploy/kubernetes/anyproxy.yaml) check it.
    """

    isLeaf = True

    def __init__(self, ready):
        """
        @param ready: C{ready()} -> whether the gateway is ready (not
            draining); read at each request.
        """
        super().__init__()
        self._ready = ready

    def render_GET(self, request):
        ready = self._ready()
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ready\n" if ready else b"draining\n"


def serve_readiness(site, ready):
    """
    Serve a L{ReadinessPage} at C{/ready} on C{site} (an
    L{anyproxy.operator_site.OperatorSite}) to every request, without its
    login; the site's request deadline and connection cap still apply.

    @param ready: as L{ReadinessPage}'s.
    """
    site.add_capability(b"ready", ReadinessPage(ready), lambda request: True)
