# -*- test-case-name: tests.test_proxy_header -*-
"""
Listeners behind a load balancer that sends the PROXY protocol header
(HAProxy's C{send-proxy} / C{send-proxy-v2}, nginx's C{proxy_protocol on},
cloud balancers' "proxy protocol v2"): C{listen_addr: "haproxy:HOST:PORT"}
(or C{haproxy:} before any other listen address but an C{ssl:} endpoint, whose
TLS would read the header).

Behind a plain TCP balancer every connection comes from the balancer's
address, so what counts per source (the login throttle, the access log's
C{source}, a UDP relay's source check) would see one source for all users.
The header carries the user's address, and the connection's C{getPeer()}
answers it from then on (C{getHost()} stays the socket's own address: the
header's destination is the balancer's).  A connection without a valid
header is closed: such a listener must be reachable from the balancer only.

Twisted's L{twisted.protocols.haproxy} parsers read the header (its
private C{_v1parser.V1Parser} and C{_v2parser.V2Parser}, whose C{feed}
tests.test_proxy_header checks against real headers and HAProxy).  Its
wrapper is not used: it closes a connection whose first read is shorter
than a signature, lets a v1 header's bad port escape as an exception,
takes any text for a v1 address, and ends a connection at the user's EOF
where SOCKS5 and HTTP CONNECT streams need a half-close.
"""

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamServerEndpoint
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

# The bytes that tell a v2 header (16) from a v1 one (8) from neither.
_SIGNATURE = 16
# Longest header: v1 is at most 107 bytes; v2 is 16 plus a 16-bit length.
MAX_HEADER = 16 + 0xFFFF


def _is_source(peer):
    if not isinstance(peer, (IPv4Address, IPv6Address)):
        return False  # a UNIX socket's address: no source a throttle could count
    try:
        ipaddress.ip_address(peer.host)
    except ValueError:
        return False
    return 0 <= peer.port <= 0xFFFF


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(ProtocolWrapper):
    """A connection that starts with a PROXY header, then is its wrapped protocol's."""

    _info = None     # the header, once read (a ProxyInfo)
    _parser = None   # V1Parser or V2Parser, once the signature told which
    _early = b""     # the first bytes, until there are enough to tell the version
    _header_bytes = 0

    def dataReceived(self, data):
        if self._info is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            data, self._early = self._early + data, b""
            if len(data) < _SIGNATURE:
                self._early = data
                return
            if data[:12] == V2Parser.PREFIX and data[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif data[:6] == V1Parser.PROXYSTR + b" ":
                self._parser = V1Parser()
            else:
                self.loseConnection()  # not through the balancer
                return
        self._header_bytes += len(data)
        try:
            info, rest = self._parser.feed(data)
        except (InvalidProxyHeader, ValueError):
            # ValueError: a v1 port that is not a number.
            self.loseConnection()
            return
        if info is None:
            if self._header_bytes > MAX_HEADER:
                self.loseConnection()
            return
        if info.source is not None and not _is_source(info.source):
            # v1 takes any text for an address and any number for a port.
            self.loseConnection()
            return
        self._info = info
        self._parser = None
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self):
        info = self._info
        if info is not None and info.source is not None:
            peer = info.source
            # Twisted's v2 parser writes IPv6 uncompressed; a socket's peer is compressed.
            if isinstance(peer, IPv6Address):
                peer = IPv6Address(peer.type, str(ipaddress.IPv6Address(peer.host)), peer.port)
            return peer
        return self.transport.getPeer()

    def getHost(self):
        # The socket's own address, not the balancer's that the header names
        # as the destination: a SOCKS5 UDP relay binds on it.
        return self.transport.getHost()

    def readConnectionLost(self):
        if self._info is not None and IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.readConnectionLost()
        else:
            # Without the header the connection never began; a protocol
            # that cannot half-close gets what TCP would give it.
            self.transport.loseConnection()

    def writeConnectionLost(self):
        if IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.writeConnectionLost()

    def loseWriteConnection(self):
        self.transport.loseWriteConnection()


class ProxyHeaderFactory(WrappingFactory):
    protocol = ProxyHeaderProtocol


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """C{endpoint}, its connections reading a PROXY header first (L{ProxyHeaderProtocol})."""

    def __init__(self, endpoint):
        self._endpoint = endpoint

    def listen(self, factory):
        return self._endpoint.listen(ProxyHeaderFactory(factory))
