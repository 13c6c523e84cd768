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
from twisted.logger import Logger

from anyproxy import __version__
from anyproxy.client.dialer import Dialer
from anyproxy.tls import client_tls_options
from anyproxy.tunnel import frames
from anyproxy.tunnel.websocket import ClientTunnelProtocol, basic_authorization, tune_factory

log = Logger()


class ClientTunnelFactory(WebSocketClientFactory):
    """Builds the client's tunnel protocols for one gateway."""

    protocol = ClientTunnelProtocol

    def __init__(self, url, dialer, client_id, group, username, password,
                 ping_interval=10.0, handshake_timeout=10.0):
        headers = {"Authorization": basic_authorization(username, password)} if username else {}
        super().__init__(url=url, protocols=[frames.SUBPROTOCOL], headers=headers,
                         useragent="AnyProxy/" + __version__)
        self.dialer = dialer
        self.client_id = client_id
        self.group = group
        self.gateway = url
        self.connected = set()
        tune_factory(self, ping_interval, handshake_timeout)

    def __repr__(self):
        # The headers hold the client's password: never show them.
        return "<ClientTunnelFactory %s>" % (self.gateway,)

    def open_requested(self, stream):
        self.dialer.handle_open(stream)

    def hello_info(self):
        return {"version": frames.PROTOCOL_VERSION, "client_id": self.client_id,
                "group": self.group, "software": "anyproxy/" + __version__}

    def tunnel_ready(self, protocol, info):
        self.connected.add(protocol)
        log.info("tunnel to {gateway} up (gateway {software})", gateway=self.gateway,
                 software=info.get("software", "?"))

    def tunnel_lost(self, protocol, reason):
        self.connected.discard(protocol)
        log.warn("tunnel to {gateway} lost: {reason}; reconnecting", gateway=self.gateway,
                 reason=reason or "connection closed")


def _prepare(protocol):
    # ClientService counts the connection as made only once the gateway has
    # answered our HELLO, so refused credentials or TLS back off properly.
    return protocol.ready


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
                    max_streams=client.max_concurrent_conns, resolver=resolver)
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
            ping_interval=client.ping_interval)
        factories[(host, port)] = factory
        for replica in range(client.replicas):
            endpoint = wrapClientTLS(tls, HostnameEndpoint(reactor, host, port,
                                                           timeout=client.connect_timeout))
            service = ClientService(endpoint, factory, retryPolicy=retry, clock=reactor,
                                    prepareConnection=_prepare)
            service.setName("tunnel %s:%d #%d" % (host, port, replica + 1))
            service.setServiceParent(top)
    top.dialer = dialer
    return top, factories
