# -*- test-case-name: tests.test_gateway_app,tests.test_reload -*-
"""
The gateway program: a L{Gateway} made of explicit parts, built by
L{make_gateway_service} from a validated config.

Who owns what:

  - the B{tunnel pool} (L{anyproxy.interfaces.ITunnelPool}; in memory,
    L{anyproxy.gateway.tunnel_pool.TunnelPool}): the connected client
    tunnels and the choice of one for each stream;
  - the B{tunnel server} (L{anyproxy.gateway.tunnel_server.TunnelServer}):
    the TLS WebSocket listener clients connect to, their credentials, and
    the closing of tunnels on reload and shutdown;
  - the B{limits} (L{Limits}): C{max_conns_per_user} and each listener's
    C{max_conns};
  - the B{user endpoints} (L{UserEndpoints}): the endpoint each frontend
    stream is opened with, which waits on the pool and takes the limits;
  - the B{frontends} (L{anyproxy.gateway.frontend_listeners.Frontends}):
    the user-facing listeners (SOCKS5, HTTP and any other frontend plugin,
    see C{docs/FRONTENDS.md});
  - B{port forwarding}
    (L{anyproxy.gateway.port_forwarding.forwarder.PortForwarding}): the
    ports clients ask for in their HELLO (C{open_ports});
  - the B{status page} and the B{metrics} listener (L{OperatorPage}), and
    the metrics themselves (L{anyproxy.metrics.GatewayMetrics}).

Each part applies a reloaded config to itself, first building aside what
can fail, then swapping it in (L{anyproxy.gateway.reconfigure});
L{Gateway.reconfigure} runs them together, so a reload applies whole or not
at all.  The parts that listen are child services of the gateway, and each
listener is a child of its part.
"""

import functools

import attr
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.auth import GroupLogins, Logins
from anyproxy.bandwidth import BandwidthLimits
from anyproxy.errors import ConfigError, Reason, StreamOpenError
from anyproxy.gateway.drain import Drain, serve_readiness
from anyproxy.gateway.frontend_listeners import Frontends
from anyproxy.gateway.port_forwarding.forwarder import PortForwarding
from anyproxy.gateway.port_forwarding.forwarder import log_policy as log_port_policy
from anyproxy.gateway.reconfigure import follow_address, reconfigure_all, restart_note
from anyproxy.gateway.status.api import status_site
from anyproxy.gateway.status.management import Management
from anyproxy.gateway.stream_table import StreamTable
from anyproxy.gateway.tunnel_pool import TunnelPool
from anyproxy.gateway.tunnel_server import TunnelServer
from anyproxy.interfaces import IReconfigurable, ITunnelPool
from anyproxy.limits import Limiter, acquire_all
from anyproxy.listeners import Listener
from anyproxy.metrics import GatewayMetrics, metrics_site
from anyproxy.tunnel.endpoint import TunnelEndpoint

log = Logger()


def _provides(interface):
    """An attrs validator: the value provides C{interface}."""

    def check(instance, attribute, value):
        if not interface.providedBy(value):
            raise TypeError("%s must provide %s, not %r" % (attribute.name, interface.__name__,
                                                           value))

    return check


def _applied():
    """What C{apply} returns when it has nothing to wait for and nothing to say."""
    return defer.succeed([])


@implementer(IReconfigurable)
@attr.s(eq=False)
class Limits:
    """
    The gateway's stream limits: a stream beyond C{gateway.max_conns_per_user}
    or its listener's C{max_conns} waits in a bounded queue
    (C{gateway.queue_size}/C{queue_timeout}) for a slot, then fails
    OVERLOADED (L{anyproxy.limits}).  The user's slot is taken first, so a
    user waiting on their own limit never holds a slot of the listener that
    others need.

    A C{gateway.users} entry's C{max_streams} takes the place of
    C{max_conns_per_user} for that user, and answers the same way: a stream
    beyond it waits in the same bounded queue, then fails OVERLOADED (SOCKS5
    0x01, HTTP 503), as a limit the user may soon be under again (a quota of
    open streams, not a ban).

    A reload configures the limiters in place (streams holding a slot keep
    it), adds those of new listeners and users and drops those of removed
    ones: the connections a removed listener leaves open are limited per
    user only.

    @ivar per_user: the L{Limiter} of C{max_conns_per_user}, by user name;
        a user with C{max_streams} has that as its own limit there, so a
        reload that sets, changes or lifts it keeps counting the streams the
        user holds.
    @ivar per_listener: C{{listener name: Limiter}} of each C{max_conns}.
    """

    _reactor = attr.ib()
    per_user = attr.ib()
    per_listener = attr.ib(factory=dict)
    _capped = attr.ib(factory=set)  # users with a max_streams of their own

    @classmethod
    def from_config(cls, config, reactor):
        gateway = config.gateway
        limits = cls(reactor, Limiter(reactor, gateway.max_conns_per_user, gateway.queue_size,
                                      gateway.queue_timeout, what="max_conns_per_user"))
        limits._set_listeners(config)
        limits._set_user_caps(config)
        return limits

    def admit(self, user_name, listener):
        """
        Slots for one stream of user C{user_name} on listener C{listener}:
        see L{anyproxy.limits.acquire_all}.
        """
        # Anonymous users (an open listener, a fixed-forward port) cannot be
        # told apart, so max_conns_per_user does not count them: sharing one
        # key they would all fit in one user's allowance.  Their listener's
        # max_conns bounds them (etc/gateway.yaml).
        requests = [(self.per_user, user_name)] if user_name else []
        limiter = self.per_listener.get(listener)
        if limiter is not None:
            requests.append((limiter, None))
        return acquire_all(requests)

    def prepare(self, config):
        """See L{anyproxy.interfaces.IReconfigurable} and the class docstring."""

        def apply():
            gateway = config.gateway
            self.per_user.configure(limit=gateway.max_conns_per_user,
                                    queue_size=gateway.queue_size,
                                    queue_timeout=gateway.queue_timeout)
            self._set_listeners(config)
            self._set_user_caps(config)
            return _applied()

        return apply

    def _set_user_caps(self, config):
        wanted = {user.username: user.max_streams for user in config.gateway.users
                  if user.max_streams}
        for name in self._capped - set(wanted):
            self.per_user.set_key_limit(name, None)
        for name, max_streams in wanted.items():
            self.per_user.set_key_limit(name, max_streams, what="max_streams of user %s" % (name,))
        self._capped = set(wanted)

    def _set_listeners(self, config):
        gateway = config.gateway
        queue = dict(queue_size=gateway.queue_size, queue_timeout=gateway.queue_timeout)
        wanted = {each.name: each.listener.max_conns for each in config.proxy.all_frontends()}
        for name in [each for each in self.per_listener if each not in wanted]:
            del self.per_listener[name]
        for name, max_conns in wanted.items():
            limiter = self.per_listener.get(name)
            if limiter is None:
                self.per_listener[name] = Limiter(self._reactor, max_conns,
                                                  what="max_conns of %s" % (name,), **queue)
            else:
                limiter.configure(limit=max_conns, **queue)




@implementer(IReconfigurable)
@attr.s(eq=False)
class UserEndpoints:
    """
    The endpoint for each stream a user asks a frontend for: a
    L{TunnelEndpoint} that waits up to C{gateway.no_tunnel_wait} seconds on
    the pool for a tunnel of the user's group, takes its slots from the
    L{Limits}, and is counted by the metrics.  L{endpoint_for} is what each
    L{anyproxy.interfaces.FrontendContext} carries.

    A user of C{gateway.users} carries its L{anyproxy.auth.UserPolicy}
    (L{anyproxy.auth.User.policy}): its groups, destination rules and
    protocols are checked here, before any stream opens, and a refusal is
    the error table's NOT_ALLOWED (SOCKS5 0x02, HTTP 403); its
    C{max_streams} is in the L{Limits} and its C{bandwidth} in
    L{anyproxy.bandwidth.BandwidthLimits}.  A reload applies to new streams
    at once, and closes the open streams of a user it removes or whose new
    rules refuse their target (L{revoke}).
    """

    tunnel_pool = attr.ib(validator=_provides(ITunnelPool))
    _reactor = attr.ib()
    _limits = attr.ib()
    _metrics = attr.ib()
    no_tunnel_wait = attr.ib()
    # The open streams (management API) and the access log:
    # anyproxy.gateway.stream_table.
    stream_table = attr.ib(default=None)
    bandwidth = attr.ib(default=None)  # BandwidthLimits; None: made at once
    # user name -> UserPolicy of each gateway.users entry (the config's)
    _policies = attr.ib(factory=dict)

    def __attrs_post_init__(self):
        if self.bandwidth is None:
            self.bandwidth = BandwidthLimits(self._reactor)

    @classmethod
    def from_config(cls, config, tunnel_pool, reactor, limits, metrics, stream_table=None):
        """The user endpoints of a loaded config (its users' policies and caps)."""
        endpoints = cls(tunnel_pool, reactor, limits, metrics, config.gateway.no_tunnel_wait,
                        stream_table=stream_table)
        endpoints._set_users(config.gateway.users)
        return endpoints

    def endpoint_for(self, user, host, port, kind="tcp", frontend=None, source=""):
        """
        See L{anyproxy.interfaces.FrontendContext}; C{frontend} names the
        listener, C{source} is the user's address (C{host:port}).

        @raise StreamOpenError: NOT_ALLOWED or PROTOCOL_NOT_ALLOWED when the
            user's policy refuses the stream (the frontends answer it as
            they answer a failed open).
        """
        policy, shape, recheck = user.policy, None, None
        if policy is not None:
            # A gateway.users entry: the rules in force now, not those of its
            # login (a connection that logged in before a reload keeps
            # asking), checked again once a slot and a tunnel are found.
            policy = self._policies.get(user.name)
            recheck = functools.partial(self._refusal, user.name, user.group, host, port, kind)
            refusal = recheck()
            if refusal is not None:
                error = StreamOpenError(*refusal)
                if self.stream_table is not None:  # its access-log line
                    self.stream_table.record_refusal(user.name, source, frontend, kind, host,
                                                     port, user.group, error)
                raise error
            if policy.bandwidth and kind == "tcp":
                shape = functools.partial(self.bandwidth.shape, user.name)
            elif kind == "udp":
                # An association names no target: each datagram's is checked,
                # against the user's rules in force (a reload changes them).
                shape = functools.partial(self._filter_datagrams, user.name)
        return TunnelEndpoint(self.tunnel_pool, self._reactor, user.group, host, port, kind=kind,
                              wait=self.no_tunnel_wait,
                              admit=functools.partial(self._limits.admit, user.name, frontend),
                              frontend=frontend, metrics=self._metrics, user=user.name,
                              source=source, streams=self.stream_table, policy=policy,
                              shape=shape, recheck=recheck)

    def _refusal(self, name, group, host, port, kind):
        """Why the rules in force refuse user C{name} this stream, or C{None}."""
        policy = self._policies.get(name)
        if policy is None:
            return Reason.NOT_ALLOWED, "user %r is no longer configured" % (name,)
        return policy.refusal(group, host, port, kind)

    def prepare(self, config):
        """
        See L{anyproxy.interfaces.IReconfigurable}: C{no_tunnel_wait}, the
        users' policies and bandwidth caps, and the stream table's
        C{access_log}.
        """
        wait = config.gateway.no_tunnel_wait
        users = config.gateway.users
        table_apply = self.stream_table.prepare(config) if self.stream_table else _applied

        def apply():
            self.no_tunnel_wait = wait
            self._set_users(users)
            self.revoke()
            return table_apply()

        return apply

    def _filter_datagrams(self, name, stream):
        def admits(host, port):
            policy = self._policies.get(name)  # None: the user is gone (revoke closes it)
            return policy is not None and policy.admits_datagram(host, port)

        stream.filter_datagrams(admits)

    def _set_users(self, users):
        self._policies = {user.username: user.policy for user in users}
        self.bandwidth.configure({user.username: user.bandwidth for user in users})
        if self.stream_table is not None:
            # A cap new to a user holds the streams it has open too.
            for entry in list(self.stream_table.streams.values()):
                endpoint = entry.endpoint
                if getattr(endpoint, "policy", None) is None or endpoint.kind != "tcp":
                    continue  # not a gateway.users entry's: never capped
                if self.bandwidth.rate(endpoint.user):
                    self.bandwidth.shape(endpoint.user, entry.stream)

    def revoke(self):
        """
        Close the open streams the users' policies no longer allow: those of
        a C{gateway.users} entry that is gone, or whose rules now refuse the
        stream's group, protocol or target (RESET to the client, the user's
        connection closed; the access log says C{kicked}).

        @return: how many were closed.
        """
        if self.stream_table is None:
            return 0
        closed = 0
        for stream_id, entry in self.stream_table.streams.items():
            endpoint = entry.endpoint
            if getattr(endpoint, "policy", None) is None:
                continue  # not a gateway.users entry's: no policy to revoke
            policy = self._policies.get(endpoint.user)
            if policy is None or policy.refusal(endpoint.group, endpoint.host, endpoint.port,
                                                endpoint.kind) is not None:
                log.info("user {user!r}: revoked by the reload, closing its stream to {target}",
                         event="stream_revoked", user=endpoint.user,
                         target="%s:%s" % (endpoint.host, endpoint.port))
                closed += self.stream_table.kick(stream_id)
        return closed


@implementer(IReconfigurable)
@attr.s(eq=False)
class OperatorPage(MultiService):
    """
    The status page or the metrics listener: an
    L{anyproxy.operator_site.OperatorSite} listening on C{gateway.<addr_key>},
    if that was set at start.

    A reload sets its login and request deadline (C{handshake_timeout}) at
    once and moves it to a new address; switching it on or off takes a
    restart, which the reload notes.

    @ivar what: its listener's name (C{"status page"}, C{"metrics"}).
    @ivar addr_key: its address key in the gateway section, for the note.
    @ivar settings: C{settings(gateway_config)} returns its C{(endpoint,
        username, password)}.
    @ivar site: the site, or C{None} when it is off.
    @ivar listener: the L{Listener}, or C{None} when it is off.
    """

    _reactor = attr.ib()
    what = attr.ib()
    addr_key = attr.ib()
    settings = attr.ib()
    site = attr.ib(default=None)
    listener = attr.ib(default=None)

    def __attrs_post_init__(self):
        MultiService.__init__(self)

    @classmethod
    def from_config(cls, gateway, reactor, what, addr_key, settings, make_site):
        """
        @param make_site: C{make_site(username, password)} builds the site
            (called only when the page is on).
        """
        page = cls(reactor, what, addr_key, settings)
        endpoint, username, password = settings(gateway)
        if endpoint is not None:
            page.site = make_site(username, password)
            page.listener = Listener(reactor, endpoint, page.site, what)
            page.listener.setServiceParent(page)
        return page

    def listeners(self):
        """C{{name: Listener}}: its listener, if it is on."""
        return {self.what: self.listener} if self.listener is not None else {}

    def prepare(self, config):
        """See L{anyproxy.interfaces.IReconfigurable} and the class docstring."""
        gateway = config.gateway
        endpoint, username, password = self.settings(gateway)

        def apply():
            if self.site is not None:
                self.site.request_timeout = gateway.handshake_timeout
            if (self.listener is None) != (endpoint is None):
                return defer.succeed([restart_note(self.addr_key, self.what)])
            if self.listener is None:
                return _applied()
            if endpoint == self.listener.description:
                self.site.set_login(username, password)
                return _applied()

            # The login goes with its address: a page that cannot move keeps
            # the login of the address it stays on (a public one may need it).
            def moved(notes):
                if self.listener.description == endpoint:
                    self.site.set_login(username, password)
                return notes

            return follow_address(self._reactor, self, endpoint, self.what).addCallback(moved)

        return apply


def _status_settings(gateway):
    return gateway.status_endpoint, gateway.status_username, gateway.status_password


def _metrics_settings(gateway):
    return gateway.metrics_endpoint, gateway.metrics_username, gateway.metrics_password


@attr.s(eq=False, repr=False)
class Gateway(MultiService):
    """
    Everything the gateway runs (see the module docstring); build it with
    L{make_gateway_service}.

    @ivar reactor: the reactor everything runs on.
    @ivar config: the L{anyproxy.config.model.Config} in force; a reload
        replaces it.
    @ivar tunnel_pool: the L{anyproxy.interfaces.ITunnelPool}.
    @ivar limits: the L{Limits}.
    @ivar user_endpoints: the L{UserEndpoints}.
    @ivar port_forwarding: the
        L{anyproxy.gateway.port_forwarding.forwarder.PortForwarding}.
    @ivar tunnel_server: the L{anyproxy.gateway.tunnel_server.TunnelServer}.
    @ivar frontends: the L{anyproxy.gateway.frontend_listeners.Frontends}.
    @ivar status_page: the status page's L{OperatorPage}.
    @ivar metrics: the L{anyproxy.metrics.GatewayMetrics}, always counted.
    @ivar metrics_page: the metrics listener's L{OperatorPage}.
    @ivar group_logins: the L{anyproxy.auth.GroupLogins} the tunnel server
        fills (C{group_password} in a HELLO) and the frontends' users check.
    @ivar draining: the L{anyproxy.gateway.drain.Drain} once a drain has
        begun, else C{None}.
    """

    reactor = attr.ib()
    config = attr.ib()
    tunnel_pool = attr.ib(validator=_provides(ITunnelPool))
    limits = attr.ib()
    user_endpoints = attr.ib()
    port_forwarding = attr.ib()
    tunnel_server = attr.ib()
    frontends = attr.ib()
    status_page = attr.ib()
    metrics = attr.ib()
    metrics_page = attr.ib()
    group_logins = attr.ib()
    fleet = attr.ib(default=None)  # the anyproxy.fleet.node.FleetNode, with gateway.fleet
    draining = attr.ib(default=None, init=False)
    # The management API's actions (anyproxy.gateway.status.management).
    management = attr.ib(default=None)
    # anyproxy.auth.Logins: password checks and the login throttle of every listener.
    logins = attr.ib(default=None)

    def __attrs_post_init__(self):
        MultiService.__init__(self)
        # Started in this order and stopped in the reverse one: the tunnels
        # are closed last, after the listeners that would use them.
        for part in self._listening_parts():
            part.setServiceParent(self)

    def _listening_parts(self):
        # The fleet node last: it registers once the rest can serve, and
        # leaves the fleet first when the gateway stops.
        fleet = [self.fleet] if self.fleet is not None else []
        return [self.tunnel_server, self.frontends, self.status_page, self.metrics_page] + fleet

    def parts(self):
        """The L{anyproxy.interfaces.IReconfigurable} parts, in the order a reload applies them."""
        fleet = [self.fleet] if self.fleet is not None else []
        logins = [self.logins] if self.logins is not None else []
        return logins + [self.tunnel_pool, self.limits, self.user_endpoints, self.tunnel_server,
                         self.port_forwarding, self.frontends, self.status_page,
                         self.metrics_page] + fleet

    @property
    def listeners(self):
        """C{{name: Listener}} of every listener of every part (a new dict)."""
        found = {}
        for part in self._listening_parts():
            found.update(part.listeners())
        return found

    def reconfigure(self, config):
        """
        Apply a reloaded L{anyproxy.config.model.Config}
        (L{anyproxy.twistd.reload}) to new connections; established ones are
        kept.  See L{anyproxy.gateway.reconfigure}.

        @return: a Deferred firing with a list of notes for the log
            (listeners that could not be re-bound, listeners switched on or
            off).
        @raise anyproxy.errors.ConfigError: with nothing changed; also while
            the gateway drains (a reload could listen again on addresses the
            drain closed, while C{/ready} says not ready).
        """
        config.require_gateway()
        if self.draining is not None:
            raise ConfigError("%s: the gateway is draining; the reload is refused (restart it "
                              "with the new config instead)" % (config.path,))
        applied = reconfigure_all(self.parts(), config)
        self.config = config
        return applied

    @property
    def ready(self):
        """
        Whether balancers should send this gateway new connections (C{GET
        /ready}, L{anyproxy.gateway.drain.ReadinessPage}): running, and no
        drain begun.
        """
        return bool(self.running) and self.draining is None

    @property
    def in_fleet(self):
        """Whether this gateway is a node of a fleet (C{gateway.fleet})."""
        return self.fleet is not None

    def leave_fleet(self):
        """
        Leave the fleet, if in one: the registry
        (L{anyproxy.fleet.interfaces.IFleetRegistry}) deregisters this node
        (its record, group entries and port claims deleted, the change
        published), so peers stop relaying to it and clients stop attaching
        to it.  The fleet node's own stop, later, finds it done.

        @return: a Deferred firing once done; at once without a fleet.
        """
        if self.fleet is None:
            return defer.succeed(None)
        # The forwarded ports close first: once the claims are gone another
        # gateway may open the same port, for another client.
        closed = self.port_forwarding.stop_accepting()
        return closed.addCallback(lambda _: self.fleet.registry.stop())

    def stop_accepting(self):
        """
        Stop taking users and tunnels: the proxy listeners and the tunnel
        listener close (a balancer's next connect is refused and tried on
        another server); connections already accepted go on.  The status
        and metrics pages stay up to watch the drain.

        @return: a Deferred firing once the listeners are closed.
        """
        return defer.gatherResults([
            self.frontends.stop_accepting(),
            defer.maybeDeferred(self.tunnel_server.listener.stopService),
        ]).addCallback(lambda _: None)

    def stop_keeping_upstreams(self):
        """
        Close the frontends' idle kept upstream connections (the HTTP
        proxy's C{upstream_keepalive}) and keep none from now on: a drain
        would otherwise wait for them as open streams (and a peer gateway
        they are relayed to, for its own), as if they were in flight.
        """
        self.frontends.stop_keeping_upstreams()

    def drain(self, timeout, clock=None):
        """
        Drain the gateway (L{anyproxy.gateway.drain}): fail C{/ready}, let
        idle kept upstream connections go, leave the fleet, keep accepting
        for C{gateway.drain_delay} seconds, stop accepting, send GOAWAY on
        every tunnel and let open streams finish; all within C{timeout}
        seconds.  Only the first call starts it.

        @param clock: the C{IReactorTime} for its deadline (the reactor by
            default).
        @return: a Deferred firing with the drain's outcome when it ends.
        """
        if self.draining is None:
            self.draining = Drain(self, clock if clock is not None else self.reactor, timeout,
                                  delay=self.config.gateway.drain_delay)
            return self.draining.start()
        return self.draining.when_ended()

    def cut_drain(self):
        """End a drain in progress now (a second SIGTERM or SIGINT); nothing otherwise."""
        if self.draining is not None:
            self.draining.cut()

    def stopService(self):
        # With gateway.drain_timeout, open streams may finish first
        # (anyproxy.gateway.drain).  Then the parts stop their listeners; the
        # tunnel server closes every tunnel (GOAWAY first), and forwarded
        # ports are released.
        timeout = self.config.gateway.drain_timeout
        if self.running and timeout > 0:
            drained = self.drain(timeout).addCallback(self._listeners_closed)
        else:
            drained = defer.succeed(None)
        return drained.addCallback(lambda _: self._stop_parts())

    def _listeners_closed(self, _):
        # The drain stopped them; their sockets' closing is waited for here,
        # since the parts' own stop finds them stopped already.
        closed = self.draining.listeners_closed
        return closed if closed is not None else None

    def _stop_parts(self):
        if self.logins is not None:
            self.logins.stop()  # failed logins still being delayed are answered now
        stopped = defer.maybeDeferred(super().stopService)
        released = self.port_forwarding.stop()
        stopped.addBoth(self._close_stream_table)
        return stopped.addCallback(lambda result: released.addCallback(lambda _: result))

    def _close_stream_table(self, result):
        # Last: the streams the tunnels' close reset are in the access log.
        if self.user_endpoints.stream_table is not None:
            self.user_endpoints.stream_table.close()
        return result


def make_gateway_service(config, reactor, make_fleet_registry=None):
    """
    The L{Gateway} for a validated L{anyproxy.config.model.Config}, not started.

    @param make_fleet_registry: with C{gateway.fleet}, C{make(node)} -> the
        node's L{anyproxy.fleet.interfaces.IFleetRegistry}; C{None} for the
        Redis one (see L{anyproxy.fleet.node.FleetNode.from_config}).
    """
    gateway = config.require_gateway()
    tunnel_pool = TunnelPool(reactor, balance=gateway.balance)
    # Prometheus metrics (anyproxy.metrics): always counted, served at metrics_addr.
    metrics = GatewayMetrics(tunnel_pool, reactor)
    fleet = None
    if gateway.fleet is not None:
        # A fleet (anyproxy.fleet): the other parts use its pool, which relays
        # to other gateways when this one holds no tunnel of a group.
        from anyproxy.fleet.node import FleetNode
        fleet = FleetNode.from_config(config, reactor, tunnel_pool, metrics.registry,
                                      make_registry=make_fleet_registry)
        tunnel_pool = fleet.tunnel_pool
    # Every configured password is checked through one Logins: hashes in its
    # thread pool, good pairs remembered, failures counted per source address
    # (gateway.auth_throttle) on the proxies, the tunnel port and the operator pages.
    logins = Logins.from_config(config, reactor)
    metrics.logins = logins
    # group_id:group_password logins, valid while such a client is connected.
    group_logins = GroupLogins()
    if fleet is not None:
        fleet.share_group_logins(group_logins)  # valid on every gateway of the fleet
    # client.open_ports (docs/PORT_FORWARDING.md): on gateway.open_ports_interface,
    # loopback unless the config opts in to another.
    port_forwarding = PortForwarding(reactor, gateway.port_allowed,
                                     interface=gateway.open_ports_interface,
                                     credential_port_allowed=gateway.credential_port_allowed)
    if fleet is not None:
        fleet.share_forwarded_ports(port_forwarding)  # a port is claimed fleet-wide first
    log_port_policy(config)
    limits = Limits.from_config(config, reactor)
    stream_table = StreamTable.from_config(
        config, reactor, node=(gateway.fleet.node_id or None) if gateway.fleet is not None else None)
    user_endpoints = UserEndpoints.from_config(config, tunnel_pool, reactor, limits, metrics,
                                               stream_table=stream_table)
    tunnel_server = TunnelServer.from_config(gateway, reactor, tunnel_pool,
                                             group_logins=group_logins,
                                             port_forwarding=port_forwarding, logins=logins)
    if fleet is not None:
        fleet.tunnel_listener = tunnel_server.listener  # the tunnel address it publishes
        fleet.tunnel_server = tunnel_server  # its HELLO lists the fleet
    frontends = Frontends.from_config(config, reactor, user_endpoints.endpoint_for,
                                      group_logins, metrics, logins=logins)
    # Listeners rebuilt by a reload are what metrics report.
    metrics.frontend_factories = frontends.factories
    # A client going away (stopping, or moving to another gateway) sends
    # GOAWAY on its tunnels, as a draining peer does on our links to it: the
    # idle upstream connections the frontends keep there go at once, rather
    # than at upstream_idle_timeout.
    tunnel_server.factory.on_tunnel_going_away = frontends.tunnel_going_away
    if fleet is not None:
        fleet.links.on_link_going_away = frontends.tunnel_going_away
    # The status page and management API (anyproxy.gateway.status): clients,
    # totals, streams, behind Basic auth.  Each request's head must arrive
    # within handshake_timeout (anyproxy.operator_site).
    management = Management(reactor, tunnel_pool, stream_table)
    status_page = OperatorPage.from_config(
        gateway, reactor, "status page", "status_addr", _status_settings,
        lambda username, password: status_site(
            tunnel_pool, username, password, reactor=reactor,
            request_timeout=gateway.handshake_timeout, management=management))
    # Basic auth when metrics_username is set (required off loopback, unless
    # metrics_allow_anonymous).
    metrics_page = OperatorPage.from_config(
        gateway, reactor, "metrics", "metrics_addr", _metrics_settings,
        lambda username, password: metrics_site(
            metrics.registry, reactor, username, password,
            request_timeout=gateway.handshake_timeout))
    service = Gateway(reactor=reactor, config=config, tunnel_pool=tunnel_pool, limits=limits,
                      user_endpoints=user_endpoints, port_forwarding=port_forwarding,
                      tunnel_server=tunnel_server, frontends=frontends, status_page=status_page,
                      metrics=metrics, metrics_page=metrics_page, group_logins=group_logins,
                      fleet=fleet, management=management, logins=logins)
    for page in (status_page, metrics_page):
        if page.site is not None:
            page.site.use_logins(logins)
            # GET /ready without the login: balancers' health checks see a drain begin.
            serve_readiness(page.site, lambda: service.ready)
    management.gateway = service  # drain, reload, config: the whole gateway
    return service
