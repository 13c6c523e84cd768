# -*- test-case-name: tests.test_e2e_tcp -*-
"""
The gateway program: the TLS WebSocket listener for client tunnels and the
user-facing listeners (SOCKS5, HTTP and any other frontend plugin, see
docs/FRONTENDS.md), composed in one C{MultiService}
around a shared L{TunnelPool}.
"""

import functools

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from anyproxy.auth import GroupLogins, UserDatabase
from anyproxy.frontends.lookup import find_frontend
from anyproxy.gateway.client_access import ClientCredentials, log_client_grants
from anyproxy.tunnel.endpoint import TunnelEndpoint
from anyproxy.gateway.port_forwarding.forwarder import PortForwarding
from anyproxy.gateway.reconfigure import FrontendRecord, ReloadableServerTLS, reconfigure_gateway
from anyproxy.gateway.tunnel_pool import TunnelPool
from anyproxy.gateway.status.api import status_site
from anyproxy.gateway.tunnel_server import TunnelServerFactory
from anyproxy.interfaces import FrontendContext
from anyproxy.limits import Limiter, acquire_all
from anyproxy.metrics import GatewayMetrics, metrics_site
from anyproxy.listeners import Listener, rebind, remove_child
from anyproxy.tls import server_tls_options

log = Logger()


class GatewayService(MultiService):
    """Everything the gateway runs; build with L{make_gateway_service}."""

    forwarding = None  # the PortForwarding (client.open_ports), if any

    def __init__(self, reactor, registry):
        super().__init__()
        self.reactor = reactor
        self.registry = registry
        self.listeners = {}
        self.frontends = {}  # listener name -> FrontendRecord
        # Callables given each new Config after a reload, once the rest applies.
        self.reload_hooks = []

    def stopService(self):
        # Stop listening, then drop every tunnel so clients reconnect elsewhere
        # (or to our successor) at once instead of waiting for a ping timeout.
        d = defer.maybeDeferred(super().stopService)
        if self.forwarding is not None:
            released = self.forwarding.stop()
            d.addCallback(lambda result: released.addCallback(lambda _: result))
        for tunnel in self.registry.tunnels():
            if tunnel.close is not None:
                tunnel.close()
        return d

    def add_listener(self, name, description, factory):
        listener = Listener(self.reactor, description, factory, name)
        listener.setServiceParent(self)
        self.listeners[name] = listener
        return listener

    def reconfigure(self, config):
        """
        Apply a reloaded L{anyproxy.config.model.Config} (L{anyproxy.twistd.reload}) to
        new connections; established ones are kept.  See
        L{anyproxy.gateway.reconfigure}.

        @return: a Deferred firing with a list of notes (listeners that could
            not be re-bound).
        @raise anyproxy.errors.ConfigError: with nothing changed.
        """
        return reconfigure_gateway(self, config)

    def move_listener(self, name, description, factory):
        """
        Listen as C{name} on C{description}: start the new listener and,
        once it listens, stop the old one (its connections stay up).

        @return: a Deferred firing with C{None}, or with a note when the new
            address could not be bound (the old listener is kept then).
        """
        new = Listener(self.reactor, description, factory, name)

        def moved(note):
            if note is None:
                self.listeners[name] = new
            return note

        return rebind(self, self.listeners.get(name), new).addCallback(moved)

    def remove_listener(self, name):
        """Stop listener C{name}; connections it accepted stay up.  A Deferred."""
        return remove_child(self, self.listeners.pop(name, None))


def make_gateway_service(config, reactor):
    """The gateway's service tree for a validated L{anyproxy.config.model.Config}."""
    gateway = config.require_gateway()
    registry = TunnelPool(reactor, balance=gateway.balance)
    service = GatewayService(reactor, registry)
    # Prometheus metrics (anyproxy.metrics): always counted, served at metrics_addr.
    service.metrics = GatewayMetrics(registry, reactor)
    service.metrics.frontend_factories = lambda: {
        name: record.factory for name, record in service.frontends.items()}
    # group_id:group_password logins, valid while such a client is connected.
    service.group_logins = group_logins = GroupLogins()
    # client.open_ports (docs/PROTOCOL.md, HELLO): on gateway.open_ports_interface,
    # loopback unless the config opts in to another.
    service.forwarding = PortForwarding(
        reactor, lambda port: service.config.gateway.port_allowed(port),
        interface=gateway.open_ports_interface)
    service.config = config  # the config in force; a reload replaces it (reconfigure)

    credentials = ClientCredentials.from_config(gateway)
    log_client_grants(credentials)
    tunnels = TunnelServerFactory(
        registry, credentials, reactor,
        ping_interval=gateway.ping_interval, handshake_timeout=gateway.handshake_timeout,
        group_logins=group_logins, forwarding=service.forwarding)
    service.tunnels = tunnels
    # Asked for each new connection, so a reload can swap the certificate.
    service.tunnel_tls = ReloadableServerTLS(server_tls_options(
        gateway.tls_cert, gateway.tls_key, client_ca_path=gateway.client_ca or None))
    service.add_listener("tunnel server", gateway.endpoint,
                         TLSMemoryBIOFactory(service.tunnel_tls, False, tunnels))

    # Limits: a stream beyond gateway.max_conns_per_user or its listener's
    # max_conns waits in a bounded queue (gateway.queue_size/queue_timeout)
    # for a slot, then fails OVERLOADED (anyproxy.limits).  The user's slot is
    # taken first, so a user waiting on their own limit never holds a slot of
    # the listener that others need.  Kept on the service for reload/metrics.
    service.user_limits = Limiter(reactor, gateway.max_conns_per_user, gateway.queue_size,
                                  gateway.queue_timeout, what="max_conns_per_user")
    service.listener_limits = {}

    def endpoint_for(user, host, port, kind="tcp", listener_limits=None, frontend=None):
        # Anonymous users (an open listener, a fixed-forward port) cannot be
        # told apart, so max_conns_per_user does not count them: sharing one
        # key they would all fit in one user's allowance.  Their listener's
        # max_conns bounds them (etc/gateway.yaml).
        requests = [(service.user_limits, user.name)] if user.name else []
        if listener_limits is not None:
            requests.append((listener_limits, None))
        return TunnelEndpoint(registry, reactor, user.group, host, port, kind=kind,
                              wait=service.config.gateway.no_tunnel_wait,
                              admit=functools.partial(acquire_all, requests),
                              frontend=frontend, metrics=service.metrics, user=user.name)

    # Every user-facing listener comes from a frontend plugin (docs/FRONTENDS.md):
    # proxy.socks5/proxy.http from the built-in ones, then proxy.frontends.
    # A reload builds a changed frontend with this too (service.build_frontend).
    def build_frontend(frontend, config):
        gateway = config.gateway
        listener_limits = Limiter(
            reactor, frontend.listener.max_conns, gateway.queue_size, gateway.queue_timeout,
            what="max_conns of %s" % (frontend.name,))
        users = UserDatabase(config.gateway_users_for(frontend.listener),
                             group_logins=group_logins)
        context = FrontendContext(
            name=frontend.name, reactor=reactor,
            endpoint_for=functools.partial(endpoint_for, listener_limits=listener_limits,
                                           frontend=frontend.name),
            users=users, handshake_timeout=gateway.handshake_timeout)
        factory = find_frontend(frontend.type).build(frontend.options, context)
        service.metrics.add_frontend(frontend.name)
        return FrontendRecord(frontend, factory, users, listener_limits)

    service.build_frontend = build_frontend
    for frontend in config.proxy.all_frontends():
        record = service.frontends[frontend.name] = build_frontend(frontend, config)
        service.listener_limits[frontend.name] = record.limits
        service.add_listener(frontend.name, frontend.listener.endpoint, record.factory)
    if gateway.status_endpoint is not None:
        # The status page (anyproxy.gateway.status.api): clients and totals, behind Basic auth.
        # Each request's head must arrive within handshake_timeout (anyproxy.operator_site).
        site = status_site(registry, gateway.status_username, gateway.status_password,
                           reactor=reactor, request_timeout=gateway.handshake_timeout)
        service.add_listener("status page", gateway.status_endpoint, site)

        def new_status_login(config, site=site):
            site.request_timeout = config.gateway.handshake_timeout
            if config.gateway.status_endpoint is not None:
                site.set_login(config.gateway.status_username, config.gateway.status_password)

        service.reload_hooks.append(new_status_login)
    if gateway.metrics_endpoint is not None:
        # Basic auth when metrics_username is set (required off loopback, unless
        # metrics_allow_anonymous); a reload changes it for the next scrape.
        site = metrics_site(service.metrics.registry, reactor, gateway.metrics_username,
                            gateway.metrics_password, request_timeout=gateway.handshake_timeout)
        service.add_listener("metrics", gateway.metrics_endpoint, site)

        def new_metrics_login(config, site=site):
            site.request_timeout = config.gateway.handshake_timeout
            if config.gateway.metrics_endpoint is not None:  # else it stops at the restart
                site.set_login(config.gateway.metrics_username, config.gateway.metrics_password)

        service.reload_hooks.append(new_metrics_login)
    return service
