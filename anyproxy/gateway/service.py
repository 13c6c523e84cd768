# -*- test-case-name: tests.test_e2e_tcp -*-
"""
The gateway program: the TLS WebSocket listener for client tunnels and the
user-facing listeners (SOCKS5, HTTP and any other frontend plugin, see
docs/FRONTENDS.md), composed in one C{MultiService}
around a shared L{TunnelRegistry}.
"""

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.tls import TLSMemoryBIOFactory

from anyproxy.auth import GroupLogins, UserDatabase
from anyproxy.frontends.registry import find_frontend
from anyproxy.gateway.endpoint import TunnelEndpoint
from anyproxy.gateway.forwarding import PortForwarding, listen_interface
from anyproxy.gateway.registry import TunnelRegistry
from anyproxy.gateway.tunnels import TunnelServerFactory
from anyproxy.interfaces import FrontendContext
from anyproxy.tls import server_tls_options

log = Logger()


class Listener(Service):
    """
    Listen on a Twisted server endpoint string while running.

    A listen error that happens at once (address in use, bad interface) is
    raised from C{startService}, so twistd stops with it instead of running
    without the listener.

    @ivar port: the C{IListeningPort} once listening (tests read the port
        number from it when the config asked for port 0).
    """

    port = None
    _listening = None

    def __init__(self, reactor, description, factory, what):
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.what = what
        self._observers = []

    def privilegedStartService(self):
        super().privilegedStartService()
        if self._listening is not None:
            return
        endpoint = serverFromString(self._reactor, self.description)
        self._listening = endpoint.listen(self.factory)
        self._listening.addBoth(self._listen_result)
        if isinstance(self._listening.result if self._listening.called else None, Failure):
            failure, self._listening = self._listening.result, None
            failure.raiseException()

    def _listen_result(self, result):
        if isinstance(result, Failure):
            log.failure("{what} could not listen on {address}", result,
                        what=self.what, address=self.description)
        else:
            self.port = result
            log.info("{what} listening on {address}", what=self.what, address=result.getHost())
        observers, self._observers = self._observers, []
        for observer in observers:
            observer.callback(result)
        return result

    def when_listening(self):
        """A Deferred firing with the C{IListeningPort} (or the listen failure)."""
        if self.port is not None:
            return defer.succeed(self.port)
        d = defer.Deferred()
        self._observers.append(d)
        return d

    def startService(self):
        self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        listening, self._listening = self._listening, None
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        if listening is not None:
            listening.cancel()
        return None


class GatewayService(MultiService):
    """Everything the gateway runs; build with L{make_gateway_service}."""

    forwarding = None  # the PortForwarding (client.open_ports), if any

    def __init__(self, reactor, registry):
        super().__init__()
        self.reactor = reactor
        self.registry = registry
        self.listeners = {}

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


def make_gateway_service(config, reactor):
    """The gateway's service tree for a validated L{anyproxy.config.Config}."""
    gateway = config.require_gateway()
    registry = TunnelRegistry(reactor, balance=gateway.balance)
    service = GatewayService(reactor, registry)
    # group_id:group_password logins, valid while such a client is connected.
    service.group_logins = group_logins = GroupLogins()
    # client.open_ports: on the tunnel listener's interface (docs/PROTOCOL.md, HELLO).
    service.forwarding = PortForwarding(reactor, gateway.port_allowed,
                                        interface=listen_interface(gateway.endpoint))

    tunnels = TunnelServerFactory.for_credentials(
        registry, gateway.auth_username, gateway.auth_password, reactor,
        ping_interval=gateway.ping_interval, handshake_timeout=gateway.handshake_timeout,
        group_logins=group_logins, forwarding=service.forwarding)
    tls = server_tls_options(gateway.tls_cert, gateway.tls_key,
                             client_ca_path=gateway.client_ca or None)
    service.add_listener("tunnel server", gateway.endpoint, TLSMemoryBIOFactory(tls, False, tunnels))

    def endpoint_for(user, host, port, kind="tcp"):
        return TunnelEndpoint(registry, reactor, user.group, host, port, kind=kind,
                              wait=gateway.no_tunnel_wait)

    # Every user-facing listener comes from a frontend plugin (docs/FRONTENDS.md):
    # proxy.socks5/proxy.http from the built-in ones, then proxy.frontends.
    for frontend in config.proxy.all_frontends():
        context = FrontendContext(
            name=frontend.name, reactor=reactor, endpoint_for=endpoint_for,
            users=UserDatabase(config.gateway_users_for(frontend.listener),
                               group_logins=group_logins),
            handshake_timeout=gateway.handshake_timeout)
        factory = find_frontend(frontend.type).build(frontend.options, context)
        service.add_listener(frontend.name, frontend.listener.endpoint, factory)
    return service
