"""
Dual-stack listeners (L{anyproxy.dual_stack}): C{listen_addr: ":port"}
answers on IPv4 and IPv6, with real sockets on 127.0.0.1 and ::1; the
fallback to IPv4 where the host has no IPv6.
"""

import errno
import socket
import struct

from twisted.internet import address, defer, protocol, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from anyproxy import dual_stack
from anyproxy.dual_stack import (
    DualStackPort, DualStackServerEndpoint, listen_tcp, listen_udp, server_endpoint, unmapped)
from anyproxy.listeners import Listener
from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment, Echo, listen_tcp as target_tcp
from tests.support import recv_exactly, run_curl, web_site


def _ipv6_loopback():
    """Whether this host can listen on ::1 (else the real-socket tests skip)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


NO_IPV6_LOOPBACK = None if _ipv6_loopback() else "this host has no IPv6 loopback (::1)"


class UnmappedTests(unittest.SynchronousTestCase):
    """L{unmapped}: IPv4 users of an IPv6 socket show as IPv4."""

    def test_mapped(self):
        self.assertEqual(unmapped(address.IPv6Address("TCP", "::ffff:127.0.0.1", 5)),
                         address.IPv4Address("TCP", "127.0.0.1", 5))

    def test_others_unchanged(self):
        for addr in [address.IPv6Address("TCP", "::1", 5), address.IPv4Address("TCP", "10.0.0.1", 5),
                     address.IPv6Address("TCP", "fe80::1%lo", 5), address.UNIXAddress(b"/s"),
                     address.IPv6Address("UDP", "not-an-ip", 5)]:
            self.assertIs(unmapped(addr), addr)


class Recorder(protocol.Protocol):
    """Writes its peer's host back and closes."""

    def connectionMade(self):
        self.transport.write(self.transport.getPeer().host.encode("ascii") + b"\n")
        self.transport.loseConnection()


def ask_peer(host, port):
    """Connect to C{host:port}; the line it sends back (our address, as it saw it)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        data = b""
        while True:
            chunk = sock.recv(100)
            if not chunk:
                return data.decode("ascii").strip()
            data += chunk


class ListenTests(unittest.TestCase):
    """Real sockets: a C{dualstack:0} listener on both families."""

    timeout = 30

    @defer.inlineCallbacks
    def listen(self, description="dualstack:0"):
        listener = Listener(reactor, description, protocol.Factory.forProtocol(Recorder), "test")
        listener.startService()
        self.addCleanup(listener.stopService)
        port = yield listener.when_listening()
        return port

    @defer.inlineCallbacks
    def test_both_families(self):
        """127.0.0.1 and ::1 both connect; each peer shows as the address it used."""
        port = yield self.listen()
        self.assertIsInstance(port, DualStackPort)
        self.assertEqual(port.getHost().host, "::")
        number = port.getHost().port
        self.assertEqual((yield deferToThread(ask_peer, "127.0.0.1", number)), "127.0.0.1")
        self.assertEqual((yield deferToThread(ask_peer, "::1", number)), "::1")

    test_both_families.skip = NO_IPV6_LOOPBACK

    @defer.inlineCallbacks
    def test_v6only_off(self):
        """IPV6_V6ONLY is off whatever net.ipv6.bindv6only says."""
        port = yield self.listen()
        self.assertEqual(
            port.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 0)

    test_v6only_off.skip = NO_IPV6_LOOPBACK

    @defer.inlineCallbacks
    def test_no_ipv6_at_all(self):
        """Without IPv6 support, plain IPv4 on every interface."""
        self.patch(dual_stack.socket, "has_ipv6", False)
        port = yield self.listen()
        self.assertNotIsInstance(port, DualStackPort)
        self.assertEqual(port.getHost().host, "0.0.0.0")
        self.assertEqual((yield deferToThread(ask_peer, "127.0.0.1", port.getHost().port)),
                         "127.0.0.1")

    @defer.inlineCallbacks
    def test_ipv6_socket_refused(self):
        """An IPv6 socket the kernel refuses (EAFNOSUPPORT, EADDRNOTAVAIL): IPv4 instead."""
        for code in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            def refuse(self, code=code):
                raise OSError(code, "no IPv6 here")
            self.patch(DualStackPort, "createInternetSocket", refuse)
            port = yield self.listen()
            self.assertEqual(port.getHost().host, "0.0.0.0")

    def test_other_errors_raised(self):
        """Any other listen error (the port is taken) is the caller's, not a fallback."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            listener = Listener(reactor, "dualstack:%d" % (port,), protocol.Factory(), "test")
            self.assertRaises(CannotListenError, listener.startService)
        self.flushLoggedErrors(CannotListenError)

    def test_endpoints(self):
        """C{dualstack:PORT} is ours; other strings are Twisted's."""
        endpoint = server_endpoint(reactor, "dualstack:1080")
        self.assertIsInstance(endpoint, DualStackServerEndpoint)
        self.assertNotIsInstance(server_endpoint(reactor, "tcp:1080"), DualStackServerEndpoint)

    def test_fake_reactor(self):
        """A reactor without file descriptors (a test fake) gets plain listenTCP on every IPv4."""
        fake = MemoryReactor()
        listen_tcp(fake, 1080, protocol.Factory(), interface="::")
        listen_tcp(fake, 1081, protocol.Factory(), interface="127.0.0.1")
        self.assertEqual([(p[0], p[3]) for p in fake.tcpServers], [(1080, ""), (1081, "127.0.0.1")])


class UdpEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


def udp_echo(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(b"hello " + host.encode(), (host, port))
        return sock.recvfrom(100)[0]


class UdpTests(unittest.TestCase):
    """A forwarded UDP port on C{::} takes both families, too."""

    timeout = 30

    @defer.inlineCallbacks
    def test_both_families(self):
        port = listen_udp(reactor, 0, UdpEcho(), interface="::")
        self.addCleanup(port.stopListening)
        self.assertEqual(
            port.getHandle().getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 0)
        number = port.getHost().port
        self.assertEqual((yield deferToThread(udp_echo, "127.0.0.1", number)), b"hello 127.0.0.1")
        self.assertEqual((yield deferToThread(udp_echo, "::1", number)), b"hello ::1")

    test_both_families.skip = NO_IPV6_LOOPBACK

    def test_no_ipv6(self):
        self.patch(dual_stack.socket, "has_ipv6", False)
        port = listen_udp(reactor, 0, UdpEcho(), interface="::")
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().host, "0.0.0.0")


# -- the proxy on ":0", end to end ---------------------------------------------------

def _socks_handshake(sock, command, host, port):
    """Greeting, RFC 1929 login and a request; the reply's C{(ATYP, BND.ADDR, BND.PORT)}."""
    user, password = PROXY_USER.encode(), PROXY_PASSWORD.encode()
    sock.sendall(b"\x05\x01\x02")
    assert recv_exactly(sock, 2) == b"\x05\x02"
    sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
    assert recv_exactly(sock, 2) == b"\x01\x00"
    sock.sendall(b"\x05" + bytes([command]) + b"\x00\x01" + socket.inet_aton(host)
                 + struct.pack("!H", port))
    head = recv_exactly(sock, 4)
    assert head[:2] == b"\x05\x00", head
    family = {1: socket.AF_INET, 4: socket.AF_INET6}[head[3]]
    bound = socket.inet_ntop(family, recv_exactly(sock, 4 if head[3] == 1 else 16))
    return head[3], bound, struct.unpack("!H", recv_exactly(sock, 2))[0]


def socks_echo_over(proxy_host, proxy_port, echo_port):
    """SOCKS5 CONNECT to the echo server via the proxy at C{proxy_host}."""
    with socket.create_connection((proxy_host, proxy_port), timeout=20) as sock:
        atyp, bound, _ = _socks_handshake(sock, 1, "127.0.0.1", echo_port)
        sock.sendall(b"ping over " + proxy_host.encode())
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = sock.recv(1000)
            if not chunk:
                return atyp, bound, data
            data += chunk


def socks_udp_over(proxy_host, proxy_port, echo_port):
    """SOCKS5 UDP ASSOCIATE via the proxy at C{proxy_host}: the relay and one echo."""
    family = socket.AF_INET6 if ":" in proxy_host else socket.AF_INET
    with socket.create_connection((proxy_host, proxy_port), timeout=20) as control, \
            socket.socket(family, socket.SOCK_DGRAM) as udp:
        udp.bind((proxy_host, 0))
        udp.settimeout(20)
        atyp, relay_host, relay_port = _socks_handshake(control, 3, "0.0.0.0", 0)
        header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port)
        udp.sendto(header + b"datagram", (relay_host, relay_port))
        answer = udp.recvfrom(1000)[0]
        return atyp, relay_host, answer[len(header):]


class ProxyOnAnyAddressTests(unittest.TestCase):
    """C{listen_addr: ":0"}: the SOCKS5 and HTTP proxies answer on 127.0.0.1 and ::1."""

    timeout = 60
    skip = NO_IPV6_LOOPBACK

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway(proxy={"socks5": {"listen_addr": ":0"},
                                                   "http": {"listen_addr": ":0"}})
        yield self.deployment.start_client()
        self.echo_port = target_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    @defer.inlineCallbacks
    def test_socks5_connect_both_families(self):
        """CONNECT works over both; BND.ADDR is the address the user connected to."""
        port = self.deployment.socks_port
        self.assertEqual((yield deferToThread(socks_echo_over, "127.0.0.1", port, self.echo_port)),
                         (1, "127.0.0.1", b"ping over 127.0.0.1"))
        self.assertEqual((yield deferToThread(socks_echo_over, "::1", port, self.echo_port)),
                         (4, "::1", b"ping over ::1"))

    @defer.inlineCallbacks
    def test_socks5_udp_both_families(self):
        """The UDP relay opens on the family (and address) the user came in on."""
        echo = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        port, echo_port = self.deployment.socks_port, echo.getHost().port
        self.assertEqual((yield deferToThread(socks_udp_over, "127.0.0.1", port, echo_port)),
                         (1, "127.0.0.1", b"datagram"))
        self.assertEqual((yield deferToThread(socks_udp_over, "::1", port, echo_port)),
                         (4, "::1", b"datagram"))

    @defer.inlineCallbacks
    def test_curl_both_families(self):
        """curl through SOCKS5 (--socks5-hostname) and HTTP, proxy at 127.0.0.1 and at [::1]."""
        site = target_tcp(self, web_site()).getHost().port
        url = "http://127.0.0.1:%d/blob/5" % (site,)
        login = "%s:%s" % (PROXY_USER, PROXY_PASSWORD)
        for host in ("127.0.0.1", "[::1]"):
            for option, scheme, port in [("--socks5-hostname", "", self.deployment.socks_port),
                                         ("--proxy", "http://", self.deployment.http_port)]:
                out, err, code = yield run_curl(
                    option, "%s%s:%d" % (scheme, host, port), "--proxy-user", login, url)
                self.assertEqual((code, err), (0, b""), (host, option))
                self.assertEqual(len(out), 5, (host, option))
