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
from zope.interface import implementer

from anyproxy.auth import GroupLogins
from anyproxy.gateway.frontend_listeners import Frontends
from anyproxy.gateway.port_forwarding.forwarder import PortForwarding
from anyproxy.gateway.port_forwarding.forwarder import log_policy as log_port_policy
from anyproxy.gateway.reconfigure import reconfigure_all, relisten, restart_note
from anyproxy.gateway.status.api import status_site
from anyproxy.gateway.tunnel_pool import TunnelPool
from anyproxy.gateway.tunnel_server import TunnelServer
from anyproxy.interfaces import IReconfigurable, ITunnelPool
from anyproxy.limits import Limiter, acquire_all
from anyproxy.listeners import Listener
from anyproxy.metrics import GatewayMetrics, metrics_site
from anyproxy.tunnel.endpoint import TunnelEndpoint


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

    A reload configures the limiters in place (streams holding a slot keep
    it), adds those of new listeners and drops those of removed ones: the
    connections a removed listener leaves open are limited per user only.

    @ivar per_user: the L{Limiter} of C{max_conns_per_user}, by user name.
    @ivar per_listener: C{{listener name: Limiter}} of each C{max_conns}.
    """

    _reactor = attr.ib()
    per_user = attr.ib()
    per_listener = attr.ib(factory=dict)

    @classmethod
    def from_config(cls, config, reactor):
        gateway = config.gateway
        limits = cls(reactor, Limiter(reactor, gateway.max_conns_per_user, gateway.queue_size,
                                      gateway.queue_timeout, what="max_conns_per_user"))
        limits._set_listeners(config)
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
            return _applied()

        return apply

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
    """

    tunnel_pool = attr.ib(validator=_provides(ITunnelPool))
    _reactor = attr.ib()
    _limits = attr.ib()
    _metrics = attr.ib()
    no_tunnel_wait = attr.ib()

    def endpoint_for(self, user, host, port, kind="tcp", frontend=None):
        """See L{anyproxy.interfaces.FrontendContext}; C{frontend} names the listener."""
        return TunnelEndpoint(self.tunnel_pool, self._reactor, user.group, host, port, kind=kind,
                              wait=self.no_tunnel_wait,
                              admit=functools.partial(self._limits.admit, user.name, frontend),
                              frontend=frontend, metrics=self._metrics, user=user.name)

    def prepare(self, config):
        """See L{anyproxy.interfaces.IReconfigurable}: C{no_tunnel_wait}."""
        wait = config.gateway.no_tunnel_wait

        def apply():
            self.no_tunnel_wait = wait
            return _applied()

        return apply


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
                if endpoint is not None:  # else it stops at the restart
                    self.site.set_login(username, password)
            if (self.listener is None) != (endpoint is None):
                return defer.succeed([restart_note(self.addr_key, self.what)])
            if self.listener is None or endpoint == self.listener.description:
                return _applied()
            return relisten(self._reactor, self, self.listener, endpoint, self.site,
                            self.what).addCallback(self._moved)

        return apply

    def _moved(self, result):
        self.listener, note = result
        return [note] if note else []


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

    def __attrs_post_init__(self):
        MultiService.__init__(self)
        # Started in this order and stopped in the reverse one: the tunnels
        # are closed last, after the listeners that would use them.
        for part in self._listening_parts():
            part.setServiceParent(self)

    def _listening_parts(self):
        return [self.tunnel_server, self.frontends, self.status_page, self.metrics_page]

    def parts(self):
        """The L{anyproxy.interfaces.IReconfigurable} parts, in the order a reload applies them."""
        return [self.tunnel_pool, self.limits, self.user_endpoints, self.tunnel_server,
                self.port_forwarding, self.frontends, self.status_page, self.metrics_page]

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
        @raise anyproxy.errors.ConfigError: with nothing changed.
        """
        config.require_gateway()
        applied = reconfigure_all(self.parts(), config)
        self.config = config
        return applied

    def stopService(self):
        # The parts stop their listeners; the tunnel server then closes every
        # tunnel (GOAWAY first), and forwarded ports are released.
        stopped = defer.maybeDeferred(super().stopService)
        released = self.port_forwarding.stop()
        return stopped.addCallback(lambda result: released.addCallback(lambda _: result))


def make_gateway_service(config, reactor):
    """The L{Gateway} for a validated L{anyproxy.config.model.Config}, not started."""
    gateway = config.require_gateway()
    tunnel_pool = TunnelPool(reactor, balance=gateway.balance)
    # Prometheus metrics (anyproxy.metrics): always counted, served at metrics_addr.
    metrics = GatewayMetrics(tunnel_pool, reactor)
    # group_id:group_password logins, valid while such a client is connected.
    group_logins = GroupLogins()
    # client.open_ports (docs/PORT_FORWARDING.md): on gateway.open_ports_interface,
    # loopback unless the config opts in to another.
    port_forwarding = PortForwarding(reactor, gateway.port_allowed,
                                     interface=gateway.open_ports_interface)
    log_port_policy(config)
    limits = Limits.from_config(config, reactor)
    user_endpoints = UserEndpoints(tunnel_pool, reactor, limits, metrics, gateway.no_tunnel_wait)
    tunnel_server = TunnelServer.from_config(gateway, reactor, tunnel_pool,
                                             group_logins=group_logins,
                                             port_forwarding=port_forwarding)
    frontends = Frontends.from_config(config, reactor, user_endpoints.endpoint_for,
                                      group_logins, metrics)
    # Listeners rebuilt by a reload are what metrics report.
    metrics.frontend_factories = frontends.factories
    # The status page (anyproxy.gateway.status.api): clients and totals, behind
    # Basic auth.  Each request's head must arrive within handshake_timeout
    # (anyproxy.operator_site).
    status_page = OperatorPage.from_config(
        gateway, reactor, "status page", "status_addr", _status_settings,
        lambda username, password: status_site(
            tunnel_pool, username, password, reactor=reactor,
            request_timeout=gateway.handshake_timeout))
    # Basic auth when metrics_username is set (required off loopback, unless
    # metrics_allow_anonymous).
    metrics_page = OperatorPage.from_config(
        gateway, reactor, "metrics", "metrics_addr", _metrics_settings,
        lambda username, password: metrics_site(
            metrics.registry, reactor, username, password,
            request_timeout=gateway.handshake_timeout))
    return Gateway(reactor=reactor, config=config, tunnel_pool=tunnel_pool, limits=limits,
                   user_endpoints=user_endpoints, port_forwarding=port_forwarding,
                   tunnel_server=tunnel_server, frontends=frontends, status_page=status_page,
                   metrics=metrics, metrics_page=metrics_page, group_logins=group_logins)
