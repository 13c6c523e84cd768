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
from autobahn.websocket.types import ConnectionDeny
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from anyproxy.memory import ReleaseAfterBursts
from anyproxy.auth import BLOCKED, DEFAULT_GROUP, Logins
from anyproxy.connection_cap import DEFAULT_MAX_HANDSHAKES, ConnectionCap, HandshakeCappedFactory
from anyproxy.errors import HelloRefused, Reason
from anyproxy.gateway.client_access import (
    SHARED_NAMES, ClientCredentials, ClientGrant, TunnelCounts, certificate_subjects,
    log_client_grants)
from anyproxy.gateway.reconfigure import ReloadableServerTLS, follow_address
from anyproxy.gateway.tunnel_pool import Tunnel
from anyproxy.interfaces import IReconfigurable
from anyproxy.listeners import Listener
from anyproxy.login_throttle import source_address
from anyproxy.tls import server_tls_options
from anyproxy.tunnel import frames
from anyproxy.tunnel.hello import (
    fleet_list, gateway_hello, gateway_hellos, read_client_hello, refuse_all)
from anyproxy.tunnel.liveness import Liveness
from anyproxy.tunnel.websocket import HTTP_TOO_MANY_REQUESTS, GatewayTunnelProtocol, tune_factory

log = Logger()


class FleetAnnouncer:
    """
    The fleet list of the gateway's HELLO (docs/PROTOCOL.md, C{fleet}): this
    node, then the live, non-draining others of the registry's view, each
    with the tunnel address clients should dial.  When that list changes
    (the registry's observer call), every connected client tunnel that is
    not draining gets a HELLO update carrying the new list, so clients
    attach to a joining node and let a leaving one go within moments.

    It reads only the registry's cached view: a slow or absent store never
    delays a tunnel's HELLO.

    @ivar registry: the L{anyproxy.fleet.interfaces.IFleetRegistry}.
    @ivar tunnel_addr: this node's advertised tunnel address (C{host:port}).
    """

    def __init__(self, registry, tunnel_addr):
        self.registry = registry
        self.tunnel_addr = tunnel_addr
        self._tunnels = set()
        self._announced = self.entries()
        registry.add_observer(self.view_changed)

    def entries(self):
        """The fleet list now (L{anyproxy.tunnel.hello.fleet_list})."""
        others = [(node.node_id, node.tunnel_addr) for node in self.registry.nodes()
                  if not node.draining and node.tunnel_addr]
        return fleet_list(self.registry.node_id, self.tunnel_addr, others)

    def hello_fields(self):
        """The C{node} and C{fleet} arguments of L{gateway_hello}."""
        return {"node": self.registry.node_id, "fleet": self.entries()}

    def stop(self):
        """Stop following the registry (the tunnel server stops)."""
        self.registry.remove_observer(self.view_changed)

    def tunnel_added(self, tunnel):
        """C{tunnel} (HELLO answered) hears of later changes."""
        self._tunnels.add(tunnel)

    def tunnel_removed(self, tunnel):
        self._tunnels.discard(tunnel)

    def view_changed(self):
        """The registry's view changed: send the list again if it differs."""
        entries = self.entries()
        if entries == self._announced:
            return
        self._announced = entries
        told = [tunnel for tunnel in self._tunnels if not tunnel.draining]
        log.info("fleet list now {nodes}; telling {count} client tunnel(s)",
                 nodes=", ".join(entry["node"] for entry in entries), count=len(told))
        hello = gateway_hello(software=None, node=self.registry.node_id, fleet=entries)
        for tunnel in told:
            tunnel.mux.send_hello(hello)


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
    @param logins: the gateway's L{anyproxy.auth.Logins}: a password's
        failures count in its throttle; C{None} for one of its own (no
        throttle).
    @ivar fleet: the L{FleetAnnouncer} whose list our HELLO carries, or
        C{None} (no fleet: no C{fleet} key).
    """

    protocol = GatewayTunnelProtocol
    fleet = None

    def __init__(self, tunnel_pool, credentials, reactor, ping_interval=10.0,
                 handshake_timeout=10.0, url="wss://localhost/anyproxy", group_logins=None,
                 forwarding=None, max_handshakes=DEFAULT_MAX_HANDSHAKES, logins=None):
        super().__init__(url=url, protocols=[frames.SUBPROTOCOL], server="AnyProxy")
        self.tunnel_pool = tunnel_pool
        self.credentials = credentials
        self.logins = logins if logins is not None else Logins(reactor)
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
        # Pings only a client silent for two intervals: the clients ping.
        self.liveness = Liveness(reactor, ping_interval, is_gateway=True)
        # After a reconnect storm, the handshakes' freed memory goes back.
        self.memory = ReleaseAfterBursts(reactor)
        tune_factory(self, ping_interval, handshake_timeout)

    @classmethod
    def for_credentials(cls, tunnel_pool, username, password, reactor, groups=(DEFAULT_GROUP,),
                        **kwargs):
        """A factory whose clients must present C{username}/C{password}, serving C{groups}."""
        grant = ClientGrant(username, groups, (), 1024)
        credentials = ClientCredentials(passwords={username.encode("utf-8"): (
            password, grant)}, shared=grant)
        return cls(tunnel_pool, credentials, reactor, **kwargs)

    def acceptableProtocols(self):
        # WebSocket upgrades happen over HTTP/1.1.  Naming it matters: Twisted
        # always installs an ALPN callback, and with an empty list OpenSSL
        # aborts every handshake from a client that offers ALPN (e.g. curl).
        return [b"http/1.1"]

    def grant_for(self, transport, credentials):
        """
        The L{ClientGrant} of a connecting client, or C{None} (see
        L{ClientCredentials}), when known at once; else a Deferred firing
        with it (a password hash checked, or a wrong password's answer
        delayed by the gateway's login throttle).

        @param transport: the client's TLS transport, whose peer certificate
            TLS verified against C{client_ca}, if that is set.
        @param credentials: C{(username, password)} from its handshake, or C{None}.
        @raise ConnectionDeny: 429, before any password is checked, when
            the client's address is blocked after repeated failures.
        """
        get_certificate = getattr(transport, "getPeerCertificate", None)
        subjects = certificate_subjects(get_certificate() if get_certificate else None)
        credentials_now = self.credentials  # a reload meanwhile must not mix two sets
        if credentials is None:
            return credentials_now.grant_for(subjects, None)  # a certificate: nothing guessed
        answer = self.logins.attempt(
            source_address(transport) if transport is not None else "",
            credentials[0],
            lambda: credentials_now.grant_for(subjects, credentials),
            lambda: credentials_now.check_grant(subjects, credentials),
            guess=credentials[1])
        if answer is BLOCKED:
            raise ConnectionDeny(HTTP_TOO_MANY_REQUESTS, "too many failed logins; try again later")
        return answer

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
                        close=protocol.abort, weight=weight,
                        credential=grant.name, routes=hello.routes)
        protocol.mux.name = "%s@%s" % (client_id, protocol.peer)
        if hello.open_ports_not_a_list:
            log.warn("client {client_id}: open_ports in HELLO is not a list; ignored",
                     client_id=client_id)
        if self.forwarding is not None:
            open_ports = self.forwarding.tunnel_connected(tunnel, hello.open_ports)
        else:
            open_ports = refuse_all(hello.open_ports, "port forwarding is not enabled")
        fleet = self.fleet.hello_fields() if self.fleet is not None else {}
        for hello_frame in gateway_hellos(open_ports, **fleet):
            protocol.mux.send_hello(hello_frame)
        if self.fleet is not None:
            self.fleet.tunnel_added(tunnel)
        if self.group_logins is not None and group_password:
            if self.group_logins.add(tunnel, group, group_password):
                log.warn("group {group}: client {client_id} announced a group_password other "
                         "than the connected clients of the group; each is a valid login "
                         "while a client announcing it is connected", group=group,
                         client_id=client_id)
        self.tunnel_counts.add(grant.name)
        self.tunnel_pool.add(tunnel)
        self.memory.handshake_done()
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
        if self.fleet is not None:
            self.fleet.tunnel_removed(tunnel)
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
    allow; the handshake timeout applies to the next tunnel, the ping
    interval to every tunnel at once, and a new address is listened on before the old one is let go.
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
    def from_config(cls, gateway, reactor, tunnel_pool, group_logins=None, port_forwarding=None,
                    logins=None):
        """
        The tunnel server of a L{anyproxy.config.model.GatewayConfig}.

        @param group_logins: see L{TunnelServerFactory}.
        @param port_forwarding: see L{TunnelServerFactory} (C{forwarding}).
        @param logins: see L{TunnelServerFactory}.
        """
        logins = logins if logins is not None else Logins(reactor)
        credentials = ClientCredentials.from_config(gateway, logins.checker)
        log_client_grants(credentials)
        factory = TunnelServerFactory(
            tunnel_pool, credentials, reactor, ping_interval=gateway.ping_interval,
            handshake_timeout=gateway.handshake_timeout, group_logins=group_logins,
            forwarding=port_forwarding, logins=logins)
        server = cls(reactor, tunnel_pool, factory, ReloadableServerTLS(_tls_options(gateway)))
        server.listener = Listener(reactor, gateway.endpoint,
                                   TLSMemoryBIOFactory(server.tls, False, factory), cls.NAME)
        server.listener.setServiceParent(server)
        return server

    def listeners(self):
        """C{{name: Listener}}: the one listener."""
        return {self.NAME: self.listener}

    def announce_fleet(self, registry, tunnel_addr):
        """
        Make our HELLO list the fleet of C{registry} (an
        L{anyproxy.fleet.interfaces.IFleetRegistry}) from now on, with
        C{tunnel_addr} (C{host:port}) as this node's advertised address
        (L{FleetAnnouncer}).  Without this call the HELLO has no fleet list.
        """
        self.factory.fleet = FleetAnnouncer(registry, tunnel_addr)

    def prepare(self, config):
        """See L{anyproxy.interfaces.IReconfigurable} and the class docstring."""
        gateway = config.gateway
        tls = _tls_options(gateway)
        credentials = ClientCredentials.from_config(gateway, self.factory.logins.checker)

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
            return follow_address(self._reactor, self, gateway.endpoint, self.NAME)

        return apply

    def stopService(self):
        if self.factory.fleet is not None:
            self.factory.fleet.stop()
        self.factory.memory.stop()
        stopped = defer.maybeDeferred(super().stopService)
        closed = [tunnel.go_away(self._reactor) for tunnel in self.tunnel_pool.tunnels()]
        return defer.gatherResults([stopped] + closed).addCallback(lambda _: None)


def _tls_options(gateway):
    """The tunnel listener's TLS options; reads the files now (L{ConfigError} if unusable)."""
    return server_tls_options(gateway.tls_cert, gateway.tls_key,
                              client_ca_path=gateway.client_ca or None)
