# -*- test-case-name: tests.test_e2e_tcp -*-
"""
The gateway's WebSocket server for client tunnels: finds the client's
credential in the opening handshake (L{anyproxy.gateway.client_access}),
registers each tunnel once its HELLO arrives and the credential allows what
the HELLO asks, and removes it (resetting its streams) when it goes away.
"""

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy import __version__
from anyproxy.auth import DEFAULT_GROUP
from anyproxy.config.model import MAX_GROUP_PASSWORD, MAX_WEIGHT, MIN_WEIGHT
from anyproxy.errors import HelloRefused
from anyproxy.gateway.client_access import (
    ClientCredentials, ClientGrant, TunnelCounts, certificate_subjects)
from anyproxy.gateway.port_forwarding.forwarder import refuse_all
from anyproxy.gateway.tunnel_pool import Tunnel
from anyproxy.tunnel import frames
from anyproxy.tunnel.websocket import GatewayTunnelProtocol, tune_factory

MAX_ID_LENGTH = 128

log = Logger()


def _hello_text(info, key, default):
    value = info.get(key, default)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise HelloRefused(frames.CLOSE_BAD_HELLO, "HELLO field %r must be a string of 1..%d "
                                                   "characters" % (key, MAX_ID_LENGTH))
    return value


def _hello_weight(info):
    value = info.get("weight", 1)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not MIN_WEIGHT <= value <= MAX_WEIGHT):
        raise HelloRefused(frames.CLOSE_BAD_HELLO, "HELLO field 'weight' must be a number from "
                                                   "%g to %d" % (MIN_WEIGHT, MAX_WEIGHT))
    return float(value)


def _hello_group_password(info):
    # The error never quotes the value: it is a password.
    value = info.get("group_password", "")
    if not isinstance(value, str) or len(value) > MAX_GROUP_PASSWORD:
        raise HelloRefused(frames.CLOSE_BAD_HELLO, "HELLO field 'group_password' must be a "
                           "string of at most %d characters" % (MAX_GROUP_PASSWORD,))
    return value


@implementer(IProtocolNegotiationFactory)
class TunnelServerFactory(WebSocketServerFactory):
    """
    Accepts client tunnels into C{registry}.

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

    def __init__(self, registry, credentials, reactor, ping_interval=10.0,
                 handshake_timeout=10.0, url="wss://localhost/anyproxy", group_logins=None,
                 forwarding=None):
        super().__init__(url=url, protocols=[frames.SUBPROTOCOL], server="AnyProxy")
        self.registry = registry
        self.credentials = credentials
        self.group_logins = group_logins
        self.forwarding = forwarding
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.tunnel_counts = TunnelCounts()
        tune_factory(self, ping_interval, handshake_timeout)

    @classmethod
    def for_credentials(cls, registry, username, password, reactor, groups=(DEFAULT_GROUP,),
                        **kwargs):
        """A factory whose clients must present C{username}/C{password}, serving C{groups}."""
        grant = ClientGrant(username, groups, (), 1024)
        credentials = ClientCredentials(passwords={username.encode("utf-8"): (
            ClientCredentials.digest(password), grant)}, shared=grant)
        return cls(registry, credentials, reactor, **kwargs)

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

        @raise HelloRefused: the HELLO is malformed, or asks for what the
            credential may not serve.
        """
        if info.get("version") != frames.PROTOCOL_VERSION:
            raise HelloRefused(frames.CLOSE_BAD_HELLO, "protocol version %r not supported"
                               % (info.get("version"),))
        client_id = _hello_text(info, "client_id", None)
        group = _hello_text(info, "group", DEFAULT_GROUP)
        weight = _hello_weight(info)
        group_password = _hello_group_password(info)
        grant = protocol.grant
        if not grant.allows_group(group):
            raise HelloRefused(frames.CLOSE_NOT_ALLOWED, "credential %r may not serve group %r "
                               "(it may serve: %s)" % (grant.name, group, grant.describe()))
        if not grant.allows_client_id(client_id):
            raise HelloRefused(frames.CLOSE_NOT_ALLOWED, "credential %r may not announce "
                               "client_id %r" % (grant.name, client_id))
        if self.tunnel_counts.full(grant):
            raise HelloRefused(frames.CLOSE_TOO_MANY_TUNNELS, "credential %r holds its "
                               "max_tunnels (%d) already" % (grant.name, grant.max_tunnels))
        tunnel = Tunnel(client_id=client_id, group=group, mux=protocol.mux,
                        address=protocol.peer, version=str(info.get("software", "")),
                        close=lambda: protocol.dropConnection(abort=True), weight=weight,
                        credential=grant.name)
        protocol.mux.name = "%s@%s" % (client_id, protocol.peer)
        hello = {"version": frames.PROTOCOL_VERSION, "software": "anyproxy/" + __version__}
        if self.forwarding is not None:
            open_ports = self.forwarding.tunnel_connected(tunnel, info.get("open_ports"))
        else:
            open_ports = refuse_all(info.get("open_ports"), "port forwarding is not enabled")
        if open_ports is not None:
            hello["open_ports"] = open_ports
        protocol.mux.send_hello(hello)
        if self.group_logins is not None and group_password:
            if self.group_logins.add(tunnel, group, group_password):
                log.warn("group {group}: client {client_id} announced a group_password other "
                         "than the connected clients of the group; each is a valid login "
                         "while a client announcing it is connected", group=group,
                         client_id=client_id)
        self.tunnel_counts.add(grant.name)
        self.registry.add(tunnel)
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
        self.registry.remove(tunnel)
        log.info("tunnel down: client {client_id} group {group} from {peer}",
                 client_id=tunnel.client_id, group=tunnel.group, peer=tunnel.address)
