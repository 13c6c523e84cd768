# -*- test-case-name: tests.test_dual_stack -*-
"""
Dual-stack listening, for C{listen_addr: ":port"} and C{"[::]:port"} (and
a forwarded port on C{open_ports_interface: "::"}): one IPv6 socket on
C{::} with C{IPV6_V6ONLY} off, so IPv4 users arrive on it too, as with Go's
C{net.Listen("tcp", ":1080")}.  The option is set explicitly, so this does
not depend on the host's C{net.ipv6.bindv6only}.  A host without IPv6 gets
a plain IPv4 socket on every interface instead.

IPv4 users show as IPv4 (C{127.0.0.1}, not C{::ffff:127.0.0.1}) in a TCP
connection's C{getPeer()} / C{getHost()}, so logs, the SOCKS5 BND.ADDR and
the UDP relay see the address the user used.  (A UDP port keeps the mapped
form: it is what its IPv6 socket can send to.)

The config layer writes C{dualstack:PORT} for these listeners (see
L{anyproxy.addresses.listen_endpoint}); L{server_endpoint} turns that, or
any Twisted endpoint string, into an endpoint.
"""

import errno
import ipaddress
import socket

from twisted.internet import address, defer, tcp, udp
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import implementer

from anyproxy.addresses import PROXY_HEADER_PREFIX
from anyproxy.proxy_header import ProxyHeaderEndpoint

PREFIX = "dualstack:"

# bind/socket errors meaning "this host has no IPv6": listen on IPv4 instead.
NO_IPV6_ERRORS = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


def unmapped(addr):
    """A Twisted C{IPv6Address} of an IPv4-mapped address as C{IPv4Address}; others as given."""
    if not isinstance(addr, address.IPv6Address):
        return addr
    try:
        ip = ipaddress.IPv6Address(addr.host.split("%", 1)[0])
    except ValueError:
        return addr
    if ip.ipv4_mapped is None:
        return addr
    return address.IPv4Address(addr.type, str(ip.ipv4_mapped), addr.port)


def _dual_stack_socket(sock):
    """Turn C{IPV6_V6ONLY} off on the IPv6 socket C{sock}."""
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


def _no_ipv6(error):
    """Whether the C{CannotListenError} C{error} says the host has no IPv6."""
    return getattr(error.socketError, "errno", None) in NO_IPV6_ERRORS


class DualStackServer(tcp.Server):
    """An accepted connection whose addresses show IPv4 users as IPv4."""

    def getHost(self):
        return unmapped(super().getHost())

    def getPeer(self):
        return unmapped(super().getPeer())


class DualStackPort(tcp.Port):
    """A TCP port on C{::} taking IPv6 and IPv4 connections."""

    transport = DualStackServer

    def __init__(self, port, factory, backlog=50, reactor=None):
        super().__init__(port, factory, backlog, "::", reactor)

    def createInternetSocket(self):
        return _dual_stack_socket(super().createInternetSocket())

    def _buildAddr(self, addr):
        return unmapped(super()._buildAddr(addr))


class DualStackUDPPort(udp.Port):
    """A UDP port on C{::} taking IPv6 and IPv4 datagrams."""

    def __init__(self, port, protocol, maxPacketSize=8192, reactor=None):
        super().__init__(port, protocol, "::", maxPacketSize, reactor)

    def createInternetSocket(self):
        return _dual_stack_socket(super().createInternetSocket())


def _real(reactor):
    """Whether C{reactor} is a POSIX reactor our port classes fit (not a test fake)."""
    return isinstance(reactor, PosixReactorBase)


def listen_tcp(reactor, port, factory, backlog=50, interface=""):
    """
    C{reactor.listenTCP}, but C{interface="::"} listens dual-stack (and
    on IPv4 only where the host has no IPv6).

    @raise CannotListenError: as C{listenTCP}.
    """
    return _listen(reactor, interface,
                   lambda **where: reactor.listenTCP(port, factory, backlog, **where),
                   lambda: DualStackPort(port, factory, backlog, reactor))


def listen_udp(reactor, port, protocol, interface="", maxPacketSize=8192):
    """C{reactor.listenUDP}, but C{interface="::"} listens dual-stack (as L{listen_tcp})."""
    return _listen(reactor, interface,
                   lambda **where: reactor.listenUDP(port, protocol, maxPacketSize=maxPacketSize,
                                                     **where),
                   lambda: DualStackUDPPort(port, protocol, maxPacketSize, reactor))


def _listen(reactor, interface, listen_plain, dual_port):
    """
    C{listen_plain(interface=...)} unless C{interface} is C{"::"}; then the
    dual-stack port C{dual_port()}, or C{listen_plain()} (IPv4, every
    interface) where the host has no IPv6.
    """
    if interface != "::":
        return listen_plain(interface=interface)
    if not (socket.has_ipv6 and _real(reactor)):
        return listen_plain()
    listening = dual_port()
    try:
        listening.startListening()
    except CannotListenError as e:
        if not _no_ipv6(e):
            raise
        return listen_plain()
    return listening


@implementer(IStreamServerEndpoint)
class DualStackServerEndpoint:
    """Listen dual-stack on a TCP port (see L{listen_tcp})."""

    def __init__(self, reactor, port, backlog=50):
        self._reactor = reactor
        self._port = port
        self._backlog = backlog

    def listen(self, protocolFactory):
        return defer.execute(listen_tcp, self._reactor, self._port, protocolFactory,
                             self._backlog, "::")


def server_endpoint(reactor, description):
    """
    The server endpoint for C{description}: C{dualstack:PORT} (written by
    the config for C{:port} and C{[::]:port}), C{haproxy:} before any of
    these (L{anyproxy.proxy_header}), else any Twisted endpoint string
    (C{serverFromString}).
    """
    if description.startswith(PROXY_HEADER_PREFIX):
        return ProxyHeaderEndpoint(server_endpoint(reactor, description[len(PROXY_HEADER_PREFIX):]))
    if description.startswith(PREFIX):
        return DualStackServerEndpoint(reactor, int(description[len(PREFIX):]))
    return serverFromString(reactor, description)
