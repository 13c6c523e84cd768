"""
Tests for L{anyproxy.proxy_header}: listeners behind a balancer that sends
the PROXY protocol header, unit by unit on a C{StringTransport}, then with
HAProxy (C{send-proxy-v2}) in front of a gateway's SOCKS5 listener and curl
as the user from two loopback addresses.
"""

import json
import os
import socket
import struct

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from anyproxy.addresses import listen_endpoint
from anyproxy.proxy_header import ProxyHeaderFactory
from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment, listen_tcp, run_curl, web_site
from tests.test_deploy import need
from tests.test_e2e_twistd import ProcessWatcher, port_open, wait_until

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source, source_port, destination, destination_port):
    """A PROXY v2 header for a TCP over IPv4 connection."""
    addresses = (socket.inet_aton(source) + socket.inet_aton(destination)
                 + struct.pack("!HH", source_port, destination_port))
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


@implementer(IHalfCloseableProtocol)
class Recorder(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.events = []

    def connectionMade(self):
        self.events.append("made")

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.events.append("read lost")

    def writeConnectionLost(self):
        self.events.append("write lost")

    def connectionLost(self, reason):
        self.events.append("lost")


class HalfClosingTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class ProxyHeaderUnitTests(unittest.SynchronousTestCase):
    """The wrapper on a C{StringTransport}: the header read, the peer replaced, EOFs passed on."""

    def connect(self):
        self.recorder = Recorder()
        factory = ProxyHeaderFactory(protocol.Factory.forProtocol(lambda: self.recorder))
        self.transport = HalfClosingTransport(hostAddress=IPv4Address("TCP", "10.0.0.2", 1080),
                                         peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
        self.wrapper = factory.buildProtocol(self.transport.getPeer())
        self.wrapper.makeConnection(self.transport)
        return self.wrapper

    def test_v1_in_pieces(self):
        """A v1 header cut anywhere, even before its signature, then the user's bytes."""
        wrapper = self.connect()
        for piece in (b"PRO", b"XY TCP4 192.0.2.7 ", b"10.0.0.2 5555 1080\r", b"\n\x05\x01\x00"):
            wrapper.dataReceived(piece)
        self.assertEqual(self.recorder.data, b"\x05\x01\x00")
        self.assertEqual(self.recorder.transport.getPeer(), IPv4Address("TCP", "192.0.2.7", 5555))
        # The socket's own address, not the destination the header names.
        self.assertEqual(self.recorder.transport.getHost(), IPv4Address("TCP", "10.0.0.2", 1080))
        self.assertFalse(self.transport.disconnecting)

    def test_v1_waits_for_a_signature(self):
        """Fewer bytes than a v2 signature: neither kept as the user's nor refused, yet."""
        wrapper = self.connect()
        wrapper.dataReceived(b"PROXY TCP4 1")
        self.assertFalse(self.transport.disconnecting)
        wrapper.dataReceived(b"92.0.2.7 10.0.0.2 5555 1080\r\nhello")
        self.assertEqual(self.recorder.data, b"hello")

    def test_v2(self):
        """A v2 header (HAProxy's send-proxy-v2), IPv4 and IPv6."""
        wrapper = self.connect()
        wrapper.dataReceived(v2_header("198.51.100.9", 6000, "10.0.0.2", 1080)[:10])
        wrapper.dataReceived(v2_header("198.51.100.9", 6000, "10.0.0.2", 1080)[10:] + b"x")
        self.assertEqual(self.recorder.data, b"x")
        self.assertEqual(self.recorder.transport.getPeer(),
                         IPv4Address("TCP", "198.51.100.9", 6000))
        wrapper = self.connect()
        addresses = (socket.inet_pton(socket.AF_INET6, "2001:db8::7")
                     + socket.inet_pton(socket.AF_INET6, "2001:db8::2") + struct.pack("!HH", 7, 8))
        wrapper.dataReceived(V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(addresses))
                             + addresses)
        self.assertEqual(self.recorder.transport.getPeer(), IPv6Address("TCP", "2001:db8::7", 7))

    def test_unix_source_closed(self):
        """A v2 header naming UNIX sockets names no source a throttle could count: closed."""
        wrapper = self.connect()
        addresses = b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")
        wrapper.dataReceived(V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", len(addresses))
                             + addresses + b"x")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.recorder.data, b"")

    def test_no_header_closed(self):
        """A connection that does not start with a header (a user come around the balancer)."""
        for first in (b"\x05\x01\x00" + b"\x00" * 13, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                      b"PROXY TCP4 not an address at all here\r\n",
                      b"PROXY TCP4 evil.example 10.0.0.2 5555 1080\r\n",
                      b"PROXY TCP6 ::1 ::1 99999999999999999999999999 1080\r\n"):
            wrapper = self.connect()
            wrapper.dataReceived(first)
            self.assertTrue(self.transport.disconnecting, first)
            self.assertEqual(self.recorder.data, b"")

    def test_endless_header_closed(self):
        """A v1 header that never ends is cut off, not buffered without bound."""
        wrapper = self.connect()
        wrapper.dataReceived(b"PROXY TCP4 ")
        for _ in range(100):
            if self.transport.disconnecting:
                break
            wrapper.dataReceived(b"1" * 1000)
        self.assertTrue(self.transport.disconnecting)

    def test_half_close_passes(self):
        """The user's EOF reaches the protocol as a half-close; its own half-close goes out."""
        wrapper = self.connect()
        wrapper.dataReceived(b"PROXY TCP4 192.0.2.7 10.0.0.2 5555 1080\r\n")
        wrapper.readConnectionLost()
        self.assertEqual(self.recorder.events, ["made", "read lost"])
        self.assertFalse(self.transport.disconnecting)
        self.recorder.transport.loseWriteConnection()
        self.assertTrue(self.transport.write_closed)
        self.assertFalse(self.transport.disconnecting)
        wrapper.writeConnectionLost()
        self.assertEqual(self.recorder.events[-1], "write lost")

    def test_eof_before_header_closes(self):
        wrapper = self.connect()
        wrapper.dataReceived(b"PROX")
        wrapper.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)

    def test_listen_addr(self):
        """haproxy: before any listen address; never local-only (its users come from outside)."""
        self.assertEqual(listen_endpoint("haproxy:127.0.0.1:1080"),
                         ("haproxy:tcp:1080:interface=127.0.0.1", False))
        self.assertEqual(listen_endpoint("haproxy::1080"), ("haproxy:dualstack:1080", False))
        for bad in ("haproxy:", "haproxy:haproxy:127.0.0.1:1", "haproxy:nowhere",
                    # TLS would read the header as its handshake.
                    "haproxy:ssl:8443:privateKey=k.pem"):
            self.assertRaises(ValueError, listen_endpoint, bad)


HAPROXY_CONFIG = """
global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend socks
    bind 127.0.0.1:%(front)d
    default_backend gateway
backend gateway
    server g1 127.0.0.1:%(socks)d send-proxy-v2
"""


class BehindHAProxyTests(unittest.TestCase):
    """HAProxy with send-proxy-v2 in front of the SOCKS5 listener: the gateway sees the users."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        haproxy = need("haproxy")
        self.deployment = Deployment(self)
        self.access_log = os.path.abspath(self.mktemp())
        yield self.deployment.start_gateway(
            proxy={"socks5": {"listen_addr": "haproxy:127.0.0.1:0"}},
            gateway={"auth_throttle": {"failures": 3, "window": 60, "block": 300},
                     "access_log": self.access_log})
        yield self.deployment.start_client()
        self.web_port = listen_tcp(self, web_site()).getHost().port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.front = probe.getsockname()[1]
        probe.close()
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write(HAPROXY_CONFIG % {"front": self.front, "socks": self.deployment.socks_port})
        watcher = ProcessWatcher()
        process = reactor.spawnProcess(watcher, haproxy, (haproxy, "-db", "-f", config),
                                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})

        def stop():
            if not watcher.ended.called:
                process.signalProcess("KILL")
            return watcher.ended
        self.addCleanup(stop)
        yield wait_until(lambda: port_open(self.front), 10)

    def curl(self, source, password):
        """curl from the loopback address C{source} through HAProxy's SOCKS5 port."""
        return run_curl("--interface", source, "-x", "socks5h://%s:%s@127.0.0.1:%d" % (
            PROXY_USER, password, self.front), "http://127.0.0.1:%d/hello" % (self.web_port,))

    @defer.inlineCallbacks
    def test_throttle_sees_each_user(self):
        """
        Wrong passwords from 127.0.0.5 block that address, not HAProxy's:
        127.0.0.6 still logs in through the same balancer, and its stream
        works; 127.0.0.5 is refused even with the right password.
        """
        out, err, code = yield self.curl("127.0.0.6", PROXY_PASSWORD)
        self.assertEqual(code, 0, err)
        for _ in range(4):
            out, err, code = yield self.curl("127.0.0.5", "wrong")
            self.assertNotEqual(code, 0)
        out, err, code = yield self.curl("127.0.0.5", PROXY_PASSWORD)
        self.assertNotEqual(code, 0, "127.0.0.5 should be blocked")
        out, err, code = yield self.curl("127.0.0.6", PROXY_PASSWORD)
        self.assertEqual(code, 0, err)
        self.assertIn(b"hello", out)
        # The access log names the user, not HAProxy, as the stream's source.
        self.deployment.gateway.user_endpoints.stream_table.access_log.flush()
        with open(self.access_log) as f:
            sources = [json.loads(line)["source"] for line in f]
        self.assertTrue(sources and all(source.startswith("127.0.0.6:") for source in sources),
                        sources)
        throttle = self.deployment.gateway.logins.throttle
        self.assertGreater(throttle.blocked_for("127.0.0.5"), 0)
        self.assertEqual(throttle.blocked_for("127.0.0.1"), 0)

    @defer.inlineCallbacks
    def test_around_the_balancer_closed(self):
        """A user who reaches the listener itself, with no header, is closed at once."""
        out, err, code = yield run_curl(
            "-x", "socks5h://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                                    self.deployment.socks_port),
            "http://127.0.0.1:%d/hello" % (self.web_port,))
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"hello", out)
