# -*- test-case-name: tests.test_e2e_tcp -*-
"""
The client program: for each gateway, C{replicas} WebSocket tunnels, each kept
up by its own C{ClientService} (reconnect with exponential backoff and
jitter), all answering OPEN requests through one shared L{Dialer}.
"""

import random

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy import __version__
from anyproxy.client.dialer import Dialer
from anyproxy.tls import client_tls_options
from anyproxy.tunnel import frames
from anyproxy.tunnel.websocket import ClientTunnelProtocol, basic_authorization, tune_factory

log = Logger()


class ClientTunnelFactory(WebSocketClientFactory):
    """
    Builds the client's tunnel protocols for one gateway.

    @param weight: this client's share of its group's new streams, announced
        in the HELLO.
    @param group_password: announced in the HELLO when set: the gateway then
        accepts the proxy login C{group:group_password} while we are
        connected.  The tunnel is TLS-protected and we have authenticated.
    @param open_ports: L{anyproxy.config.OpenPortConfig}s the gateway is
        asked (HELLO C{open_ports}) to listen on and forward to us.
    @ivar open_ports_answer: the gateway's last C{open_ports} answer.
    """

    protocol = ClientTunnelProtocol
    open_ports_answer = None

    def __init__(self, url, dialer, client_id, group, username, password,
                 ping_interval=10.0, handshake_timeout=10.0, weight=1.0, group_password="",
                 open_ports=()):
        headers = {"Authorization": basic_authorization(username, password)} if username else {}
        super().__init__(url=url, protocols=[frames.SUBPROTOCOL], headers=headers,
                         useragent="AnyProxy/" + __version__)
        self.dialer = dialer
        self.client_id = client_id
        self.group = group
        self.gateway = url
        self.weight = weight
        self._group_password = group_password
        self.open_ports = tuple(open_ports)
        self.connected = set()
        tune_factory(self, ping_interval, handshake_timeout)

    def __repr__(self):
        # The headers hold the client's password: never show them.
        return "<ClientTunnelFactory %s>" % (self.gateway,)

    def open_requested(self, stream):
        self.dialer.handle_open(stream)

    def hello_info(self):
        info = {"version": frames.PROTOCOL_VERSION, "client_id": self.client_id,
                "group": self.group, "software": "anyproxy/" + __version__}
        info["weight"] = int(self.weight) if self.weight == int(self.weight) else self.weight
        if self._group_password:
            info["group_password"] = self._group_password
        if self.open_ports:
            info["open_ports"] = [
                {"remote_port": p.remote_port, "local_host": p.local_host,
                 "local_port": p.local_port, "protocol": p.protocol} for p in self.open_ports]
        return info

    def tunnel_ready(self, protocol, info):
        self.connected.add(protocol)
        log.info("tunnel to {gateway} up (gateway {software})", gateway=self.gateway,
                 software=info.get("software", "?"))
        if self.open_ports:
            self.open_ports_answer = info.get("open_ports")
            _log_open_ports(self.gateway, self.open_ports, self.open_ports_answer)

    def tunnel_lost(self, protocol, reason):
        self.connected.discard(protocol)
        log.warn("tunnel to {gateway} lost: {reason}; reconnecting", gateway=self.gateway,
                 reason=reason or "connection closed")


def _log_open_ports(gateway, asked, answered):
    """Log the gateway's answer to our C{open_ports}: a refusal is a warning."""
    if not isinstance(answered, list):
        log.warn("gateway {gateway} did not answer open_ports: it does not forward ports",
                 gateway=gateway)
        return
    wanted = {(p.remote_port, p.protocol): p for p in asked}
    for entry in answered:
        entry = entry if isinstance(entry, dict) else {}
        key = (entry.get("remote_port"), entry.get("protocol"))
        port = wanted.get(key)
        target = "%s:%d" % (port.local_host, port.local_port) if port is not None else "?"
        if entry.get("ok") is True:
            log.info("gateway {gateway} forwards port {port}/{protocol} to {target}",
                     gateway=gateway, port=key[0], protocol=key[1], target=target)
        else:
            log.warn("gateway {gateway} refused to forward port {port}/{protocol} to {target}: "
                     "{error}", gateway=gateway, port=key[0], protocol=key[1], target=target,
                     error=entry.get("error") or "no reason given")


@implementer(IStreamClientEndpoint)
class ReadyTunnelEndpoint:
    """
    Connects one tunnel and succeeds only once the gateway has answered our
    HELLO (TLS verified, WebSocket upgraded, credentials accepted).

    C{ClientService} then counts a refused or failed handshake as a failed
    connection attempt, so its backoff grows, instead of as a connection that
    was made and then lost (which resets the backoff and, on Twisted's
    machine, cannot be signalled before the connection is established).  The
    service's own protocol is a stand-in handle sharing the tunnel's
    transport: closing it closes the tunnel, and it is told when the tunnel
    is lost.
    """

    def __init__(self, endpoint, tunnel_factory):
        self._endpoint = endpoint
        self._tunnel_factory = tunnel_factory

    def connect(self, protocol_factory):
        d = self._endpoint.connect(self._tunnel_factory)

        def opened(tunnel):
            return tunnel.ready

        def ready(tunnel):
            handle = protocol_factory.buildProtocol(tunnel.transport.getPeer())
            handle.makeConnection(tunnel.transport)
            tunnel.handle = handle
            return handle

        return d.addCallback(opened).addCallback(ready)


def make_client_service(config, reactor, resolver=None):
    """
    The client's L{MultiService} for a validated L{anyproxy.config.Config}.

    @param resolver: an C{IHostnameResolver} for target names (default: the
        reactor's, i.e. the system's getaddrinfo).

    @return: C{(service, factories)}; C{factories} maps each gateway
        C{(host, port)} to its L{ClientTunnelFactory} (tests watch them).
    """
    client = config.require_client()
    dialer = Dialer(client.policy, reactor, connect_timeout=client.connect_timeout,
                    max_streams=client.max_concurrent_conns, resolver=resolver,
                    idle_timeout=client.idle_timeout)
    top = MultiService()
    factories = {}
    retry = backoffPolicy(initialDelay=client.reconnect_initial_delay,
                          maxDelay=client.reconnect_max_delay, factor=2.0,
                          jitter=random.random)
    for host, port in client.gateway_addrs:
        server_name = client.gateway_server_name or host
        tls = client_tls_options(server_name, client.gateway_tls_cert,
                                 client_cert_path=client.tls_cert or None,
                                 client_key_path=client.tls_key or None,
                                 insecure=client.insecure_skip_verify)
        url_host = "[%s]" % host if ":" in host else host
        factory = ClientTunnelFactory(
            "wss://%s:%d/anyproxy" % (url_host, port), dialer, client.client_id,
            client.group_id, client.auth_username, client.auth_password,
            ping_interval=client.ping_interval, weight=client.weight,
            group_password=client.group_password, open_ports=client.open_ports)
        factories[(host, port)] = factory
        for replica in range(client.replicas):
            endpoint = wrapClientTLS(tls, HostnameEndpoint(reactor, host, port,
                                                           timeout=client.connect_timeout))
            service = ClientService(ReadyTunnelEndpoint(endpoint, factory),
                                    Factory.forProtocol(Protocol), retryPolicy=retry,
                                    clock=reactor)
            service.setName("tunnel %s:%d #%d" % (host, port, replica + 1))
            service.setServiceParent(top)
    top.dialer = dialer
    return top, factories
