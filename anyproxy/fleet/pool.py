# -*- test-case-name: tests.test_fleet_relay -*-
"""
L{FleetTunnelPool}: the gateway's L{anyproxy.interfaces.ITunnelPool} in a
fleet.  It keeps this gateway's own tunnels in the in-memory
L{anyproxy.gateway.tunnel_pool.TunnelPool} it wraps, and when a user's group
has none here it hands out a link to a node that has one
(L{anyproxy.fleet.peer_link}), whose far end opens the stream there
(L{anyproxy.fleet.relay}).

The choice, for each new stream:

  1. a local tunnel of the group, if any (local first: no extra hop);
  2. else the nodes the registry lists for the group
     (L{anyproxy.fleet.interfaces.IFleetRegistry.nodes_for_group}: live, not
     draining, this node excluded), ranked by C{gateway.balance} with the
     load each publishes, plus the streams we have on links to it now (the
     published figure is up to a heartbeat old); a node whose link could not
     be made, or was lost under us, is passed over for L{NODE_RETRY}
     seconds, so new streams go elsewhere at once while the registry still
     lists it;
  3. else wait, up to the endpoint's C{no_tunnel_wait}, for a local tunnel
     or a change in the registry's view, and choose again.

A node that answers a relayed OPEN with NO_TUNNEL (its client has just
detached or moved on, and its record is a moment old) has not tried the
target, so the stream is opened on the next choice, within the same wait;
that node is not chosen for the group for L{LACKING_RETRY} seconds.

Only the registry's cached view is read, never the store: while Redis is
away the registry keeps serving its last view for C{keep_peers} seconds and
then lists no node, so the pool falls back to local tunnels by itself.

What L{tunnels} lists, and what the removal observers (metrics, status) see,
are the local tunnels only: the relayed "tunnels" this pool hands out are
records made for one stream each (C{client_id} C{relay:NODE}).
"""

import random

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.errors import ConfigError, Reason, StreamOpenError
from anyproxy.gateway.tunnel_pool import Tunnel, TunnelPool, unroutable
from anyproxy.interfaces import ITunnelPool
from anyproxy.tunnel.endpoint import open_on

log = Logger()

# Seconds a node whose link failed is passed over.  Short: a node that came
# back is used again soon, and its registry entry expires within three
# heartbeats anyway if it is gone for good.
NODE_RETRY = 5.0
# Seconds a node that answered NO_TUNNEL for a group is not chosen again for
# that group.  Its record was a moment out of date (its client had just
# detached or moved on); longer than a record change takes to spread, well
# within no_tunnel_wait so a client reconnecting there is used again.
LACKING_RETRY = 1.0


class RelayedOpens:
    """
    The C{mux} of a relayed tunnel record: opens streams on a link's mux,
    counted and timed by the relay metrics.

    @param elsewhere: C{elsewhere(failure, kind, host, port, first_data)}, called when
        an open fails: a Deferred opening the stream elsewhere, or the
        failure (see L{FleetTunnelPool}); C{None}: the failure stands.
    """

    def __init__(self, mux, clock, metrics=None, elsewhere=None):
        self._mux = mux
        self._clock = clock
        self._metrics = metrics
        self._elsewhere = elsewhere

    @property
    def stream_count(self):
        return self._mux.stream_count

    @property
    def draining(self):
        return self._mux.draining

    def streams(self):
        return self._mux.streams()

    def open_stream(self, kind, host, port, first_data=b""):
        """
        See L{anyproxy.tunnel.mux.Mux.open_stream}; C{first_data} is written
        once the open is answered, not as early data: an open whose link is
        lost is opened again elsewhere (C{NO_TUNNEL}), and early data might
        then reach the target twice.
        """
        opening = self._mux.open_stream(kind, host, port)
        if first_data:
            opening.addCallback(_written, first_data)
        if self._metrics is not None:
            opening = self._metrics.track_open(opening, "sent")
        if self._elsewhere is not None:
            opening.addErrback(self._elsewhere, kind, host, port, first_data)
        return opening


def _written(stream, data):
    stream.write(data)
    return stream


@implementer(ITunnelPool)
class FleetTunnelPool:
    """
    Local tunnels first, then links to the nodes of the fleet that hold the
    group (see the module docstring).

    @param local: this gateway's L{TunnelPool}.
    @param registry: the L{anyproxy.fleet.interfaces.IFleetRegistry}.
    @param links: the L{anyproxy.fleet.peer_link.PeerLinks} that dials peers.
    @param metrics: an L{anyproxy.fleet.relay_metrics.RelayMetrics}, or C{None}.
    """

    def __init__(self, local, registry, links, clock, balance="least_streams", rng=random,
                 metrics=None):
        if balance not in TunnelPool.STRATEGIES:
            raise ValueError("unknown balance strategy %r" % (balance,))
        self.local = local
        self.registry = registry
        self.links = links
        self._clock = clock
        self.balance = balance
        self._rng = rng
        self._metrics = metrics
        self._turn = 0  # rotates the choice among equally ranked nodes
        self._passed_over = {}  # node_id -> until when (the clock's seconds)
        self._lacking = {}  # (node_id, group) -> until when: it answered NO_TUNNEL
        self._view_waiters = []
        registry.add_observer(self._view_changed)

    # -- the local pool ---------------------------------------------------

    @property
    def removal_observers(self):
        return self.local.removal_observers

    def add(self, tunnel):
        """Add a local tunnel; the registry publishes the groups we hold."""
        self.local.add(tunnel)
        self.registry.local_changed()

    def remove(self, tunnel):
        """Remove a local tunnel; the registry publishes the groups we hold."""
        self.local.remove(tunnel)
        self.registry.local_changed()

    def routed_best(self, group, host, mux):
        """See L{anyproxy.gateway.tunnel_pool.TunnelPool.routed_best}; a relayed stream's is the peer's to judge."""
        if self.local.routed_best(group, host, mux):
            return True  # also the fast answer without routes
        # A peer link's stream: where it goes is the peer's choice.
        return not any(tunnel.mux is mux for tunnel in self.local.tunnels(group))

    def tunnels(self, group=None):
        """The tunnels connected to this gateway (never the relayed ones)."""
        return self.local.tunnels(group)

    def prepare(self, config):
        """See L{anyproxy.interfaces.IReconfigurable}: C{gateway.balance}."""
        balance = config.gateway.balance
        if balance not in TunnelPool.STRATEGIES:
            raise ConfigError("%s: gateway.balance: unknown strategy %r" % (config.path, balance))
        local_apply = self.local.prepare(config)

        def apply():
            self.balance = balance
            return local_apply()

        return apply

    # -- choosing ---------------------------------------------------------

    def pick(self, group, host=None, avoid=None):
        """
        A local tunnel of C{group} (routed to C{host}, see
        L{TunnelPool.pick}), else an open link to a node holding the group,
        or C{None}.  A retry (C{avoid}) chooses among local tunnels only.
        """
        tunnel = self.local.pick(group, host, avoid)
        if tunnel is not None or avoid is not None:
            return tunnel
        for node in self._ranked(group):
            link = self.links.usable_link(node.node_id, group)
            if link is not None:
                link.last_used = self._clock.seconds()
                return self._relayed(node, group, link, deadline=None)
        return None

    def wait_for(self, group, timeout, host=None):
        """
        A Deferred firing with a local tunnel of C{group} or a relayed one;
        see the module docstring.  It fails with L{StreamOpenError}
        NO_TUNNEL after C{timeout} seconds without either.  Cancelling it
        stops the wait.

        @param host: the target, for the local tunnels' routes
            (L{TunnelPool.pick}).  The registry's records carry no routes:
            a relayed stream goes to a node holding the group, whose own
            pool routes it there.  With no such node and local tunnels that
            all route elsewhere, the stream fails at once (HOST_UNREACHABLE).
        """
        tunnel = self.local.pick(group, host)
        if tunnel is not None:
            return defer.succeed(tunnel)
        return self._wait(group, self._clock.seconds() + timeout, host)

    def retry_choice(self, group, host, failed, failure):
        """See L{TunnelPool.retry_choice}: a local tunnel of another client, or C{None}."""
        return self.local.retry_choice(group, host, failed, failure)

    @defer.inlineCallbacks
    def _wait(self, group, deadline, host=None):
        while True:
            tunnel = self.local.pick(group, host)
            if tunnel is not None:
                return tunnel
            ranked = self._ranked(group)
            if not ranked and self.local.routes_nowhere(group, host):
                raise unroutable(group, host)
            for node in ranked:
                try:
                    link = yield self.links.link_for(node, group)
                except defer.CancelledError:
                    raise
                except Exception as e:
                    self.pass_over(node.node_id, str(e))
                    continue
                return self._relayed(node, group, link, deadline)
            now = self._clock.seconds()
            remaining = deadline - now
            if remaining <= 0:
                raise StreamOpenError(Reason.NO_TUNNEL, "no client of this group is connected "
                                      "to any gateway of the fleet")
            # Look again when a node passed over for this group may be chosen.
            marks = [until - now for (_, lacking), until in self._lacking.items()
                     if lacking == group and until > now]
            yield self._next_change(group, min([remaining] + marks))

    def _relayed(self, node, group, link, deadline):
        """
        The tunnel record of one stream relayed to C{node} on C{link}.  If
        the peer answers NO_TUNNEL (it no longer holds the group: its record
        was a moment old; or the link went away before the open), the
        target was never tried, so the stream is opened on another choice
        until C{deadline} (C{None}: no second choice).
        """
        def elsewhere(failure, kind, host, port, first_data):
            return self._open_elsewhere(failure, node.node_id, group, deadline,
                                        kind, host, port, first_data)

        return Tunnel(client_id="relay:%s" % (node.node_id,), group=group,
                      mux=RelayedOpens(link.mux, self._clock, self._metrics,
                                       elsewhere if deadline is not None else None),
                      address=node.peer_addr)

    def _open_elsewhere(self, failure, node_id, group, deadline, kind, host, port, first_data):
        failure.trap(StreamOpenError)
        now = self._clock.seconds()
        if failure.value.reason != Reason.NO_TUNNEL or now >= deadline:
            return failure
        log.info("fleet: node {node} has no tunnel of group {group} now ({why}); choosing "
                 "again", node=node_id, group=group, why=failure.value.detail)
        self._lacking[(node_id, group)] = now + LACKING_RETRY
        choosing = self._wait(group, deadline, host if kind == "tcp" else None)
        return choosing.addCallback(lambda tunnel: open_on(tunnel.mux, kind, host, port, first_data))

    def _ranked(self, group):
        """The nodes holding C{group}, best first, without those passed over."""
        now = self._clock.seconds()
        own = self.registry.node_id
        nodes = [node for node in self.registry.nodes_for_group(group)
                 if node.node_id != own and self._passed_over.get(node.node_id, 0) <= now
                 and self._lacking.get((node.node_id, group), 0) <= now]
        if len(nodes) < 2:
            return nodes
        nodes.sort(key=lambda node: node.node_id)
        if self.balance == "random":
            self._rng.shuffle(nodes)
            return nodes
        self._turn += 1
        start = self._turn % len(nodes)
        nodes = nodes[start:] + nodes[:start]
        if self.balance == "round_robin":
            return nodes
        ours = {}
        for link in self.links.links():
            ours[link.node_id] = ours.get(link.node_id, 0) + link.mux.stream_count
        # A stable sort: equally loaded nodes keep the rotated order.
        return sorted(nodes, key=lambda node: (node.streams or 0) + ours.get(node.node_id, 0))

    def pass_over(self, node_id, why=""):
        """Choose C{node_id} for no new stream for L{NODE_RETRY} seconds."""
        if self._passed_over.get(node_id, 0) <= self._clock.seconds():
            log.info("fleet: passing over node {node} for {seconds:g}s{why}", node=node_id,
                     seconds=NODE_RETRY, why=": " + why if why else "")
        self._passed_over[node_id] = self._clock.seconds() + NODE_RETRY

    def link_lost(self, node_id, group):
        """A link to C{node_id} was lost under us (see L{anyproxy.fleet.peer_link.PeerLinks})."""
        self.pass_over(node_id, "its link for group %s was lost" % (group,))

    # -- waiting ----------------------------------------------------------

    def _view_changed(self):
        waiters, self._view_waiters = self._view_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)
        now = self._clock.seconds()
        for node_id in [each for each, until in self._passed_over.items() if until <= now]:
            del self._passed_over[node_id]
        for key in [each for each, until in self._lacking.items() if until <= now]:
            del self._lacking[key]

    def _next_change(self, group, timeout):
        """A Deferred firing with C{None} when a local tunnel of C{group}
        arrives, the registry's view changes, or C{timeout} passes."""
        local = self.local.wait_for(group, timeout).addErrback(_timed_out)
        view = defer.Deferred()
        self._view_waiters.append(view)

        def forget(result):
            if view in self._view_waiters:
                self._view_waiters.remove(view)
            return result

        view.addBoth(forget)
        return defer.race([local, view]).addCallbacks(lambda _: None, _cancelled)


def _timed_out(failure):
    """The local wait ended without a tunnel (NO_TUNNEL): choose again; a cancel goes on."""
    failure.trap(StreamOpenError)
    return None


def _cancelled(failure):
    # Both waits fail only when the race is cancelled: say so as a cancel.
    failure.trap(defer.FailureGroup)
    raise defer.CancelledError()
