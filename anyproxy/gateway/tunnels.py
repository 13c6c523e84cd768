# -*- test-case-name: tests.test_e2e_tcp -*-
"""
The gateway's WebSocket server for client tunnels: checks client credentials
in the opening handshake, registers each tunnel once its HELLO arrives, and
removes it (resetting its streams) when it goes away.
"""

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy import __version__
from anyproxy.auth import DEFAULT_GROUP, UserDatabase
from anyproxy.config import MAX_GROUP_PASSWORD, MAX_WEIGHT
from anyproxy.gateway.forwarding import refuse_all
from anyproxy.gateway.registry import Tunnel
from anyproxy.tunnel import frames
from anyproxy.tunnel.websocket import GatewayTunnelProtocol, tune_factory

MAX_ID_LENGTH = 128

log = Logger()


def _hello_text(info, key, default):
    value = info.get(key, default)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise ValueError("HELLO field %r must be a string of 1..%d characters" % (key, MAX_ID_LENGTH))
    return value


def _hello_weight(info):
    value = info.get("weight", 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_WEIGHT:
        raise ValueError("HELLO field 'weight' must be a number > 0 and at most %d" % (MAX_WEIGHT,))
    return float(value)


def _hello_group_password(info):
    # The error never quotes the value: it is a password.
    value = info.get("group_password", "")
    if not isinstance(value, str) or len(value) > MAX_GROUP_PASSWORD:
        raise ValueError("HELLO field 'group_password' must be a string of at most %d "
                         "characters" % (MAX_GROUP_PASSWORD,))
    return value


@implementer(IProtocolNegotiationFactory)
class TunnelServerFactory(WebSocketServerFactory):
    """
    Accepts client tunnels into C{registry}.

    @param client_users: a L{UserDatabase} of the credentials clients present.
    @param group_logins: an L{anyproxy.auth.GroupLogins} that learns each
        tunnel's C{group_password} (HELLO) while it is connected, or C{None}
        to ignore group passwords.
    @param forwarding: the L{anyproxy.gateway.forwarding.PortForwarding}
        that opens the ports a HELLO asks for (C{open_ports}), or C{None} to
        refuse them all.
    """

    protocol = GatewayTunnelProtocol

    def __init__(self, registry, client_users, reactor, ping_interval=10.0,
                 handshake_timeout=10.0, url="wss://localhost/anyproxy", group_logins=None,
                 forwarding=None):
        super().__init__(url=url, protocols=[frames.SUBPROTOCOL], server="AnyProxy")
        self.registry = registry
        self.client_users = client_users
        self.group_logins = group_logins
        self.forwarding = forwarding
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        tune_factory(self, ping_interval, handshake_timeout)

    @classmethod
    def for_credentials(cls, registry, username, password, reactor, **kwargs):
        """A factory whose clients must present C{username}/C{password}."""
        users = UserDatabase([(username, password, DEFAULT_GROUP)] if username else [])
        return cls(registry, users, reactor, **kwargs)

    def acceptableProtocols(self):
        # WebSocket upgrades happen over HTTP/1.1.  Naming it matters: Twisted
        # always installs an ALPN callback, and with an empty list OpenSSL
        # aborts every handshake from a client that offers ALPN (e.g. curl).
        return [b"http/1.1"]

    def check_client(self, username, password):
        if not self.client_users.required:
            return True
        return self.client_users.authenticate(username, password) is not None

    def tunnel_connected(self, protocol, info):
        """Register the tunnel behind C{protocol}; C{None} refuses it."""
        try:
            if info.get("version") != frames.PROTOCOL_VERSION:
                raise ValueError("protocol version %r not supported" % (info.get("version"),))
            client_id = _hello_text(info, "client_id", None)
            group = _hello_text(info, "group", DEFAULT_GROUP)
            weight = _hello_weight(info)
            group_password = _hello_group_password(info)
        except ValueError as e:
            log.warn("tunnel {peer}: bad HELLO: {error}", peer=protocol.peer, error=e)
            return None
        tunnel = Tunnel(client_id=client_id, group=group, mux=protocol.mux,
                        address=protocol.peer, version=str(info.get("software", "")),
                        close=lambda: protocol.dropConnection(abort=True), weight=weight)
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
            self.group_logins.add(tunnel, group, group_password)
        self.registry.add(tunnel)
        log.info("tunnel up: client {client_id} group {group} weight {weight:g}{login} from {peer}",
                 client_id=client_id, group=group, weight=weight, peer=protocol.peer,
                 login=" (group login)" if group_password else "")
        return tunnel

    def tunnel_disconnected(self, tunnel):
        if self.forwarding is not None:
            self.forwarding.tunnel_disconnected(tunnel)
        if self.group_logins is not None:
            self.group_logins.remove(tunnel)
        self.registry.remove(tunnel)
        log.info("tunnel down: client {client_id} group {group} from {peer}",
                 client_id=tunnel.client_id, group=tunnel.group, peer=tunnel.address)
