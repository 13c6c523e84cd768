# -*- test-case-name: tests.test_e2e_tcp -*-
"""
The gateway's WebSocket server for client tunnels: finds the client's
credential in the opening handshake (L{anyproxy.gateway.client_access}),
registers each tunnel once its HELLO arrives, well formed
(L{anyproxy.tunnel.hello}), and the credential allows what the HELLO asks,
and removes it (resetting its streams) when it goes away.

L{TunnelServer} is that factory as a part of the gateway
(L{anyproxy.gateway.app.Gateway}): it owns the tunnel listener, its TLS
options and the client credentials, applies a reload to them, and closes
the tunnels (GOAWAY first) when the gateway stops.
"""

import attr
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from anyproxy.auth import DEFAULT_GROUP
from anyproxy.connection_cap import DEFAULT_MAX_HANDSHAKES, ConnectionCap, HandshakeCappedFactory
from anyproxy.errors import HelloRefused, Reason
from anyproxy.gateway.client_access import (
    SHARED_NAMES, ClientCredentials, ClientGrant, TunnelCounts, certificate_subjects,
    log_client_grants)
from anyproxy.gateway.reconfigure import ReloadableServerTLS, relisten
from anyproxy.gateway.tunnel_pool import Tunnel
from anyproxy.interfaces import IReconfigurable
from anyproxy.listeners import Listener
from anyproxy.tls import server_tls_options
from anyproxy.tunnel import frames
from anyproxy.tunnel.hello import gateway_hello, read_client_hello, refuse_all
from anyproxy.tunnel.websocket import GatewayTunnelProtocol, tune_factory

log = Logger()


@implementer(IProtocolNegotiationFactory)
class TunnelServerFactory(HandshakeCappedFactory, WebSocketServerFactory):
    """
    Accepts client tunnels into C{tunnel_pool}.

    @param credentials: the L{ClientCredentials} clients may present; a
        reload replaces the attribute.
    @param group_logins: an L{anyproxy.auth.GroupLogins} that learns each
        tunnel's C{group_password} (HELLO) while it is connected, or C{None}
        to ignore group passwords.
    @param forwarding: the L{anyproxy.gateway.port_forwarding.forwarder.PortForwarding}
        that opens the ports a HELLO asks for (C{open_ports}), or C{None} to
        refuse them all.
    """

    protocol = GatewayTunnelProtocol

    def __init__(self, tunnel_pool, credentials, reactor, ping_interval=10.0,
                 handshake_timeout=10.0, url="wss://localhost/anyproxy", group_logins=None,
                 forwarding=None, max_handshakes=DEFAULT_MAX_HANDSHAKES):
        super().__init__(url=url, protocols=[frames.SUBPROTOCOL], server="AnyProxy")
        self.tunnel_pool = tunnel_pool
        self.credentials = credentials
        self.group_logins = group_logins
        self.forwarding = forwarding
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.tunnel_counts = TunnelCounts()
        # Connections before their HELLO: at most max_handshakes in all (TLS
        # and WebSocket handshakes included), and per credential at most its
        # max_tunnels (waiting_for_hello).
        self.handshakes = ConnectionCap(max_handshakes, "tunnel server (connections before "
                                        "their HELLO)", reactor)
        self.waiting_for_hello = TunnelCounts()
        tune_factory(self, ping_interval, handshake_timeout)

    @classmethod
    def for_credentials(cls, tunnel_pool, username, password, reactor, groups=(DEFAULT_GROUP,),
                        **kwargs):
        """A factory whose clients must present C{username}/C{password}, serving C{groups}."""
        grant = ClientGrant(username, groups, (), 1024)
        credentials = ClientCredentials(passwords={username.encode("utf-8"): (
            ClientCredentials.digest(password), grant)}, shared=grant)
        return cls(tunnel_pool, credentials, reactor, **kwargs)

    def acceptableProtocols(self):
        # WebSocket upgrades happen over HTTP/1.1.  Naming it matters: Twisted
        # always installs an ALPN callback, and with an empty list OpenSSL
        # aborts every handshake from a client that offers ALPN (e.g. curl).
        return [b"http/1.1"]

    def grant_for(self, transport, credentials):
        """
        The L{ClientGrant} of a connecting client, or C{None} (see
        L{ClientCredentials}).

        @param transport: the client's TLS transport, whose peer certificate
            TLS verified against C{client_ca}, if that is set.
        @param credentials: C{(username, password)} from its handshake, or C{None}.
        """
        get_certificate = getattr(transport, "getPeerCertificate", None)
        subjects = certificate_subjects(get_certificate() if get_certificate else None)
        return self.credentials.grant_for(subjects, credentials)

    def tunnel_connected(self, protocol, info):
        """
        Register the tunnel behind C{protocol}, whose credential's grant is
        C{protocol.grant}.

        @param info: the client's HELLO, a dict (L{anyproxy.tunnel.hello}).
        @raise HelloRefused: the HELLO is malformed, or asks for what the
            credential may not serve.
        """
        hello = read_client_hello(info)
        client_id, group, weight = hello.client_id, hello.group, hello.weight
        group_password = hello.group_password
        # The grant as configured now: a reload between the handshake and
        # this HELLO may have narrowed or removed the credential.
        grant = self.credentials.grant_named(protocol.grant.name)
        if grant is None:
            raise HelloRefused(frames.CLOSE_NOT_ALLOWED, "credential %r is no longer "
                               "configured" % (protocol.grant.name,))
        if not grant.allows_group(group):
            # For the shared credential the fix is one key: name it.
            fix = "; add it to gateway.auth_groups" if grant.name in SHARED_NAMES else ""
            raise HelloRefused(frames.CLOSE_NOT_ALLOWED, "credential %r may not serve group %r "
                               "(it may serve: %s)%s" % (grant.name, group, grant.describe(), fix))
        if not grant.allows_client_id(client_id):
            raise HelloRefused(frames.CLOSE_NOT_ALLOWED, "credential %r may not announce "
                               "client_id %r" % (grant.name, client_id))
        if self.tunnel_counts.full(grant):
            raise HelloRefused(frames.CLOSE_TOO_MANY_TUNNELS, "credential %r holds its "
                               "max_tunnels (%d) already" % (grant.name, grant.max_tunnels))
        tunnel = Tunnel(client_id=client_id, group=group, mux=protocol.mux,
                        address=protocol.peer, version=hello.software,
                        close=lambda: protocol.dropConnection(abort=True), weight=weight,
                        credential=grant.name)
        protocol.mux.name = "%s@%s" % (client_id, protocol.peer)
        if hello.open_ports_not_a_list:
            log.warn("client {client_id}: open_ports in HELLO is not a list; ignored",
                     client_id=client_id)
        if self.forwarding is not None:
            open_ports = self.forwarding.tunnel_connected(tunnel, hello.open_ports)
        else:
            open_ports = refuse_all(hello.open_ports, "port forwarding is not enabled")
        protocol.mux.send_hello(gateway_hello(open_ports))
        if self.group_logins is not None and group_password:
            if self.group_logins.add(tunnel, group, group_password):
                log.warn("group {group}: client {client_id} announced a group_password other "
                         "than the connected clients of the group; each is a valid login "
                         "while a client announcing it is connected", group=group,
                         client_id=client_id)
        self.tunnel_counts.add(grant.name)
        self.tunnel_pool.add(tunnel)
        log.info("tunnel up: client {client_id} group {group} weight {weight:g}{login} from "
                 "{peer} (credential {credential})", client_id=client_id, group=group,
                 weight=weight, peer=protocol.peer, credential=grant.name,
                 login=" (group login)" if group_password else "")
        return tunnel

    def still_allowed(self, tunnel):
        """Whether C{tunnel}'s credential, as configured now, still allows it (reload)."""
        grant = self.credentials.grant_named(tunnel.credential)
        return (grant is not None and grant.allows_group(tunnel.group)
                and grant.allows_client_id(tunnel.client_id))

    def tunnel_disconnected(self, tunnel):
        if self.forwarding is not None:
            self.forwarding.tunnel_disconnected(tunnel)
        if self.group_logins is not None:
            self.group_logins.remove(tunnel)
        self.tunnel_counts.remove(tunnel.credential)
        self.tunnel_pool.remove(tunnel)
        log.info("tunnel down: client {client_id} group {group} from {peer}",
                 client_id=tunnel.client_id, group=tunnel.group, peer=tunnel.address)


@implementer(IReconfigurable)
@attr.s(eq=False)
class TunnelServer(MultiService):
    """
    The gateway's part that clients connect to: the L{TunnelServerFactory},
    its client credentials and TLS options, listening on
    C{gateway.listen_addr}.  Build it with L{from_config}.

    A reload (L{prepare}) re-reads the certificate files, replaces the
    credentials and closes, with a GOAWAY first, the tunnels they no longer
    allow; the handshake timeout and ping interval apply to the next tunnel,
    and a new address is listened on before the old one is let go.
    Stopping it stops the listener and closes every tunnel of the pool the
    same way, so that clients reconnect elsewhere (or to our successor) at
    once instead of waiting for a ping timeout.

    @ivar tunnel_pool: the L{anyproxy.interfaces.ITunnelPool} tunnels join.
    @ivar factory: the L{TunnelServerFactory}.
    @ivar tls: the L{ReloadableServerTLS} the listener's TLS asks.
    @ivar listener: the L{Listener} named L{NAME}.
    """

    NAME = "tunnel server"

    _reactor = attr.ib()
    tunnel_pool = attr.ib()
    factory = attr.ib()
    tls = attr.ib()
    listener = attr.ib(default=None)

    def __attrs_post_init__(self):
        MultiService.__init__(self)

    @classmethod
    def from_config(cls, gateway, reactor, tunnel_pool, group_logins=None, port_forwarding=None):
        """
        The tunnel server of a L{anyproxy.config.model.GatewayConfig}.

        @param group_logins: see L{TunnelServerFactory}.
        @param port_forwarding: see L{TunnelServerFactory} (C{forwarding}).
        """
        credentials = ClientCredentials.from_config(gateway)
        log_client_grants(credentials)
        factory = TunnelServerFactory(
            tunnel_pool, credentials, reactor, ping_interval=gateway.ping_interval,
            handshake_timeout=gateway.handshake_timeout, group_logins=group_logins,
            forwarding=port_forwarding)
        server = cls(reactor, tunnel_pool, factory, ReloadableServerTLS(_tls_options(gateway)))
        server.listener = Listener(reactor, gateway.endpoint,
                                   TLSMemoryBIOFactory(server.tls, False, factory), cls.NAME)
        server.listener.setServiceParent(server)
        return server

    def listeners(self):
        """C{{name: Listener}}: the one listener."""
        return {self.NAME: self.listener}

    def prepare(self, config):
        """See L{anyproxy.interfaces.IReconfigurable} and the class docstring."""
        gateway = config.gateway
        tls = _tls_options(gateway)
        credentials = ClientCredentials.from_config(gateway)

        def apply():
            self.tls.options = tls
            factory = self.factory
            factory.credentials = credentials
            log_client_grants(credentials)
            for tunnel in self.tunnel_pool.tunnels():
                if not factory.still_allowed(tunnel):
                    log.warn("closing tunnel of client {client_id} (group {group}): its "
                             "credential {credential} no longer allows it",
                             client_id=tunnel.client_id, group=tunnel.group,
                             credential=tunnel.credential)
                    tunnel.go_away(self._reactor, Reason.NOT_ALLOWED)
            factory.handshake_timeout = gateway.handshake_timeout
            tune_factory(factory, gateway.ping_interval, gateway.handshake_timeout)
            if gateway.endpoint == self.listener.description:
                return defer.succeed([])
            return relisten(self._reactor, self, self.listener, gateway.endpoint,
                            self.listener.factory, self.NAME).addCallback(self._moved)

        return apply

    def _moved(self, result):
        self.listener, note = result
        return [note] if note else []

    def stopService(self):
        stopped = defer.maybeDeferred(super().stopService)
        closed = [tunnel.go_away(self._reactor) for tunnel in self.tunnel_pool.tunnels()]
        return defer.gatherResults([stopped] + closed).addCallback(lambda _: None)


def _tls_options(gateway):
    """The tunnel listener's TLS options; reads the files now (L{ConfigError} if unusable)."""
    return server_tls_options(gateway.tls_cert, gateway.tls_key,
                              client_ca_path=gateway.client_ca or None)
