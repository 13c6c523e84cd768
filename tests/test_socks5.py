"""
Tests for L{anyproxy.frontends.socks5.protocol}: the protocol on fakes, then loopback
with real SOCKS clients (PySocks, python-socks) on the real reactor.
"""

import hashlib
import socket
import threading

import socks
from python_socks import ProxyError as PythonSocksProxyError
from python_socks.sync import Proxy
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from anyproxy.auth import ANONYMOUS, User, UserDatabase
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.frontends.socks5.protocol import OPENING_HIGH_WATER, Socks5Factory
from tests.test_operator_site import connect_raw, wait_until

CONNECT_IPV4 = b"\x05\x01\x00\x01\xcb\x00\x71\x05\x00\x50"  # 203.0.113.5:80
CONNECT_DOMAIN = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"  # example.com:443
USERS = UserDatabase([("alice", "hunter2", "lab")])

# The error table, written out independently of anyproxy.errors.
EXPECTED_REP = {
    Reason.GENERAL_FAILURE: 0x01,
    Reason.NOT_ALLOWED: 0x02,
    Reason.PROTOCOL_NOT_ALLOWED: 0x02,
    Reason.NETWORK_UNREACHABLE: 0x03,
    Reason.HOST_UNREACHABLE: 0x04,
    Reason.NAME_NOT_RESOLVED: 0x04,
    Reason.CONNECTION_REFUSED: 0x05,
    Reason.TIMED_OUT: 0x06,
    Reason.NO_TUNNEL: 0x01,
    Reason.OVERLOADED: 0x01,
}


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """An endpoint whose connection attempts the test completes by hand."""

    def __init__(self):
        self.attempts = []
        self.cancelled = []

    def connect(self, factory):
        opening = Deferred(self.cancelled.append)
        self.attempts.append((factory, opening))
        return opening

    def succeed(self):
        """Connect the last attempt to a StringTransport; returns (protocol, transport)."""
        factory, opening = self.attempts[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "203.0.113.5", 80))
        transport = StringTransport()
        protocol.makeConnection(transport)
        opening.callback(protocol)
        return protocol, transport

    def fail(self, exception):
        self.attempts[-1][1].errback(exception)


class Socks5ProtocolTests(SynchronousTestCase):
    """The protocol against StringTransport, Clock and a fake endpoint."""

    def connect_user(self, users=UserDatabase(), host_address=None):
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.asked = []

        def endpoint_for(user, host, port, source=""):
            self.asked.append((user, host, port))
            return self.endpoint

        factory = Socks5Factory(users, endpoint_for, self.clock, handshake_timeout=5.0)
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
        self.transport = StringTransport(hostAddress=host_address)
        self.protocol.makeConnection(self.transport)
        return self.transport

    def send(self, data):
        """Deliver C{data} from the user; returns what the proxy wrote back."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value()

    def open_request(self, request=CONNECT_IPV4):
        self.connect_user()
        self.assertEqual(self.send(b"\x05\x01\x00"), b"\x05\x00")
        self.assertEqual(self.send(request), b"")

    def test_connect_success(self):
        """CONNECT replies 0 with our address once open, and splices; the user is read
        meanwhile, so that one who leaves is noticed."""
        self.open_request()
        self.assertEqual(self.asked, [(ANONYMOUS, "203.0.113.5", 80)])
        self.assertEqual(self.transport.producerState, "producing")
        target, target_transport = self.endpoint.succeed()
        self.assertEqual(self.transport.value(), b"\x05\x00\x00\x01\x0a\x00\x00\x01\x30\x39")
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"ping")
        self.assertEqual(target_transport.value(), b"ping")
        self.transport.clear()
        target.dataReceived(b"pong")
        self.assertEqual(self.transport.value(), b"pong")
        self.assertIs(self.transport.producer, target_transport)
        self.assertFalse(self.transport.disconnecting)

    def test_ipv6_bind_address(self):
        """When the user came in over IPv6 the reply carries an IPv6 BND.ADDR."""
        self.connect_user(host_address=IPv6Address("TCP", "::1", 1080))
        self.send(b"\x05\x01\x00")
        self.send(CONNECT_DOMAIN)
        self.endpoint.succeed()
        self.assertEqual(
            self.transport.value(), b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x04\x38"
        )

    def test_early_data_forwarded(self):
        """Bytes sent with and after the request reach the target once it is open."""
        self.connect_user()
        self.send(b"\x05\x01\x00")
        self.send(CONNECT_DOMAIN + b"early ")
        self.assertEqual(self.asked, [(ANONYMOUS, "example.com", 443)])
        self.send(b"later")
        _, target_transport = self.endpoint.succeed()
        self.assertEqual(target_transport.value(), b"early later")

    def test_early_data_bounded(self):
        """Past OPENING_HIGH_WATER early bytes the user is paused until the stream opens."""
        self.open_request()
        self.send(b"x" * OPENING_HIGH_WATER)
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"y")
        self.assertEqual(self.transport.producerState, "paused")
        _, target_transport = self.endpoint.succeed()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(len(target_transport.value()), OPENING_HIGH_WATER + 1)

    def test_half_close_while_opening(self):
        """A user EOF while the target is opening is passed on once spliced."""
        self.open_request()
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        _, target_transport = self.endpoint.succeed()
        self.assertTrue(target_transport.disconnecting)

    def test_userpass_success(self):
        """With users configured, user/pass is chosen and the user reaches endpoint_for."""
        self.connect_user(users=USERS)
        self.assertEqual(self.send(b"\x05\x02\x00\x02"), b"\x05\x02")
        self.assertEqual(self.send(b"\x01\x05alice\x07hunter2"), b"\x01\x00")
        self.send(CONNECT_IPV4)
        self.assertEqual(self.asked, [(User(name="alice", group="lab"), "203.0.113.5", 80)])

    def test_userpass_failure(self):
        """A wrong password gets status 1 and a close; nothing is opened."""
        self.connect_user(users=USERS)
        self.send(b"\x05\x01\x02")
        self.assertEqual(self.send(b"\x01\x05alice\x05wrong" + CONNECT_IPV4), b"\x01\x01")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.asked, [])

    def test_auth_required_but_not_offered(self):
        """A user offering only no-auth to a protected listener gets 0xFF and a close."""
        self.connect_user(users=USERS)
        self.assertEqual(self.send(b"\x05\x01\x00"), b"\x05\xff")
        self.assertTrue(self.transport.disconnecting)

    def test_open_listener_accepts_userpass(self):
        """An open listener takes user/pass when that is all the user offers."""
        self.connect_user()
        self.assertEqual(self.send(b"\x05\x01\x02"), b"\x05\x02")
        self.assertEqual(self.send(b"\x01\x01x\x01y"), b"\x01\x00")
        self.send(CONNECT_IPV4)
        self.assertEqual(self.asked, [(ANONYMOUS, "203.0.113.5", 80)])

    def test_no_acceptable_method(self):
        """A user offering only GSSAPI gets 0xFF and a close."""
        self.connect_user()
        self.assertEqual(self.send(b"\x05\x01\x01"), b"\x05\xff")
        self.assertTrue(self.transport.disconnecting)

    def test_each_reason_gives_its_reply_code(self):
        """Every StreamOpenError reason maps to the REP code of DESIGN section 5."""
        for reason, code in EXPECTED_REP.items():
            self.open_request()
            self.endpoint.fail(StreamOpenError(reason))
            self.assertEqual(self.transport.value()[:2], bytes([5, code]), reason)
            self.assertTrue(self.transport.disconnecting)

    def test_unknown_failure_is_general(self):
        """A failure that is not a StreamOpenError gives general failure."""
        self.open_request()
        self.endpoint.fail(RuntimeError("boom"))
        self.assertEqual(self.transport.value(), b"\x05\x01\x00\x01" + b"\x00" * 6)
        self.assertTrue(self.transport.disconnecting)

    def test_endpoint_for_raises(self):
        """endpoint_for may refuse at once by raising StreamOpenError."""
        self.connect_user()

        def refuse(user, host, port, source=""):
            raise StreamOpenError(Reason.NOT_ALLOWED, "forbidden host")

        self.protocol.factory.endpoint_for = refuse
        self.send(b"\x05\x01\x00")
        self.assertEqual(self.send(CONNECT_IPV4)[:2], b"\x05\x02")
        self.assertTrue(self.transport.disconnecting)

    def test_pending_open_cancelled_on_disconnect(self):
        """If the user leaves while the target is opening, the open is cancelled."""
        self.open_request()
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.endpoint.cancelled), 1)
        self.assertEqual(self.transport.value(), b"")

    def test_unsupported_commands(self):
        """BIND gets 0x07 and a close (UDP ASSOCIATE: tests.test_socks5_udp)."""
        self.connect_user()
        self.send(b"\x05\x01\x00")
        reply = self.send(b"\x05\x02" + CONNECT_IPV4[2:])
        self.assertEqual(reply[:2], b"\x05\x07")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.asked, [])

    def test_malformed_greeting(self):
        """A greeting that is not SOCKS5 is closed without a reply."""
        self.connect_user()
        self.assertEqual(self.send(b"GET / HTTP/1.1\r\n\r\n"), b"")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_malformed_request(self):
        """An unknown address type gets 0x08, an empty domain 0x01, then a close."""
        for request, code in ((b"\x05\x01\x00\x09", 0x08), (b"\x05\x01\x00\x03\x00\x00\x50", 0x01)):
            self.connect_user()
            self.send(b"\x05\x01\x00")
            self.assertEqual(self.send(request)[:2], bytes([5, code]))
            self.assertTrue(self.transport.disconnecting)

    def test_data_after_close_ignored(self):
        """Bytes arriving after we decided to close are dropped quietly."""
        self.connect_user()
        self.send(b"\x06\x01")
        self.assertEqual(self.send(b"\x05\x01\x00"), b"")

    def test_socks4_refused(self):
        """
        A SOCKS4 request gets the SOCKS4 rejection (VN 0, CD 91) and a close,
        not a silent one; nothing is opened.
        """
        self.connect_user()
        self.assertEqual(self.send(b"\x04\x01\x00"), b"")  # not whole yet
        reply = self.send(b"\x50\x7f\x00\x00\x01me\x00")
        self.assertEqual(reply, b"\x00\x5b\x00\x50\x7f\x00\x00\x01")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.asked, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eof_during_handshake(self):
        """A user closing its side mid-handshake is closed."""
        self.connect_user()
        self.send(b"\x05\x02")
        self.protocol.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)

    def test_handshake_timeout(self):
        """A user that does not finish the handshake in time is closed."""
        self.connect_user()
        self.send(b"\x05\x01\x00")
        self.clock.advance(4.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)

    def test_timeout_cancelled_by_request(self):
        """The handshake timeout stops once the request has arrived."""
        self.open_request()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_cancelled_on_disconnect(self):
        """The handshake timeout stops when the user leaves."""
        self.connect_user()
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_passwords_never_logged(self):
        """Neither a right nor a wrong password appears in any log event."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for password in (b"hunter2", b"s3cr3t-wrong"):
            self.connect_user(users=USERS)
            self.send(b"\x05\x01\x02")
            self.send(b"\x01\x05alice" + bytes([len(password)]) + password)
            self.send(CONNECT_IPV4)
            if self.endpoint.attempts:
                self.endpoint.fail(StreamOpenError(Reason.CONNECTION_REFUSED))
        text = "\n".join(formatEvent(event) + repr(event) for event in events)
        self.assertIn("alice", text)
        self.assertNotIn("hunter2", text)
        self.assertNotIn("s3cr3t", text)


# Loopback tests on the real reactor.


class ConnectionTracker:
    """Collects a Deferred per connection so cleanup can wait for all to close."""

    def __init__(self):
        self.closed = []

    def watch_splice_end(self, end):
        closed = Deferred()
        self.closed.append(closed)
        end.on_close = lambda end, reason: closed.callback(None)
        return end

    def all_closed(self):
        return gatherResults(self.closed)


class EchoTarget(Protocol):
    def connectionMade(self):
        self.closed = Deferred()
        self.factory.tracker.closed.append(self.closed)

    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason):
        self.closed.callback(None)


@implementer(IHalfCloseableProtocol)
class ReplyAfterEofTarget(EchoTarget):
    """Says nothing until the user's EOF, then sends everything back and closes."""

    def connectionMade(self):
        super().connectionMade()
        self.received = []

    def dataReceived(self, data):
        self.received.append(data)

    def readConnectionLost(self):
        self.transport.write(b"".join(self.received))
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


@implementer(IStreamClientEndpoint)
class DirectEndpoint:
    """Connects straight to the target, mapping refusal to StreamOpenError."""

    def __init__(self, host, port, tracker):
        self._wrapped = HostnameEndpoint(reactor, host, port, timeout=5)
        self._tracker = tracker

    def connect(self, factory):
        def refused(failure):
            failure.trap(ConnectionRefusedError)
            raise StreamOpenError(Reason.CONNECTION_REFUSED, "connection refused")

        return self._wrapped.connect(factory).addCallbacks(self._tracker.watch_splice_end, refused)


def socks_exchange(proxy_port, target_port, payload, username=None, password=None, half_close=False):
    """In a thread: connect with PySocks, send C{payload}, return all bytes read back."""
    sock = socks.socksocket()
    sock.settimeout(10)
    try:
        sock.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, username=username, password=password)
        sock.connect(("127.0.0.1", target_port))
        if half_close:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sender = None
        else:
            # Send and read at once, or a large echo deadlocks on full buffers.
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
        received = bytearray()
        while half_close or len(received) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        if sender is not None:
            sender.join()
        return bytes(received)
    finally:
        sock.close()


def python_socks_exchange(proxy_url, host, port, payload):
    """In a thread: connect with python-socks, send C{payload}, read its echo."""
    # rdns: a name is sent as such (ATYP 0x03), never resolved by the client.
    proxy = Proxy.from_url(proxy_url, rdns=True)
    sock = proxy.connect(dest_host=host, dest_port=port, timeout=10)
    try:
        sock.settimeout(10)
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received
    finally:
        sock.close()


def unused_port():
    """A loopback port with nothing listening (bound and released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


class Socks5LoopbackTests(TestCase):
    """Real SOCKS clients through the listener to a real target, all on 127.0.0.1."""

    timeout = 30

    def start(self, users=UserDatabase(), target=EchoTarget, target_interface="127.0.0.1"):
        self.tracker = tracker = ConnectionTracker()
        self.addCleanup(tracker.all_closed)
        target_factory = Factory.forProtocol(target)
        target_factory.tracker = tracker
        target_port = reactor.listenTCP(0, target_factory, interface=target_interface)
        self.addCleanup(target_port.stopListening)

        def endpoint_for(user, host, port, source=""):
            return DirectEndpoint(host, port, tracker)

        factory = Socks5Factory(users, endpoint_for, reactor, handshake_timeout=10.0)
        build = factory.buildProtocol
        factory.buildProtocol = lambda addr: tracker.watch_splice_end(build(addr))
        proxy_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(proxy_port.stopListening)
        return proxy_port.getHost().port, target_port.getHost().port

    @inlineCallbacks
    def test_echo_one_megabyte(self):
        """One megabyte goes through PySocks and comes back intact."""
        proxy, target = self.start()
        payload = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)
        received = yield deferToThread(socks_exchange, proxy, target, payload)
        self.assertEqual(len(received), len(payload))
        self.assertEqual(received, payload)

    @inlineCallbacks
    def test_python_socks_credentials(self):
        """python-socks with the right username and password gets through."""
        proxy, target = self.start(users=USERS)
        url = "socks5://alice:hunter2@127.0.0.1:%d" % (proxy,)
        received = yield deferToThread(python_socks_exchange, url, "127.0.0.1", target, b"hi")
        self.assertEqual(received, b"hi")

    @inlineCallbacks
    def test_pysocks_credentials(self):
        """PySocks with the right username and password gets through."""
        proxy, target = self.start(users=USERS)
        received = yield deferToThread(socks_exchange, proxy, target, b"abc", "alice", "hunter2")
        self.assertEqual(received, b"abc")

    @inlineCallbacks
    def test_wrong_password(self):
        """A wrong password is an authentication failure for PySocks."""
        proxy, target = self.start(users=USERS)
        error = yield self.assertFailure(
            deferToThread(socks_exchange, proxy, target, b"x", "alice", "nope"),
            socks.GeneralProxyError,
        )
        # PySocks wraps its SOCKS errors in GeneralProxyError.
        self.assertIsInstance(error.socket_err, socks.SOCKS5AuthError)

    @inlineCallbacks
    def test_wrong_password_python_socks(self):
        """A wrong password is an authentication failure for python-socks."""
        proxy, target = self.start(users=USERS)
        url = "socks5://alice:nope@127.0.0.1:%d" % (proxy,)
        error = yield self.assertFailure(
            deferToThread(python_socks_exchange, url, "127.0.0.1", target, b"x"),
            PythonSocksProxyError,
        )
        self.assertIn("authentication", str(error).lower())

    @inlineCallbacks
    def test_refused_target(self):
        """A refused target gives REP 0x05 (connection refused)."""
        proxy, _ = self.start()
        url = "socks5://127.0.0.1:%d" % (proxy,)
        error = yield self.assertFailure(
            deferToThread(python_socks_exchange, url, "127.0.0.1", unused_port(), b"x"),
            PythonSocksProxyError,
        )
        self.assertEqual(error.error_code, 0x05)

    @inlineCallbacks
    def test_refused_target_pysocks(self):
        """PySocks also sees 0x05 for a refused target."""
        proxy, _ = self.start()
        error = yield self.assertFailure(
            deferToThread(socks_exchange, proxy, unused_port(), b"x"), socks.GeneralProxyError
        )
        self.assertIsInstance(error.socket_err, socks.SOCKS5Error)
        self.assertTrue(str(error.socket_err).startswith("0x05"), str(error))

    @inlineCallbacks
    def test_domain_target(self):
        """A domain name request is passed on unresolved and reaches the target."""
        proxy, target = self.start()
        url = "socks5://127.0.0.1:%d" % (proxy,)
        received = yield deferToThread(python_socks_exchange, url, "localhost", target, b"name")
        self.assertEqual(received, b"name")

    @inlineCallbacks
    def test_ipv6_target(self):
        """An IPv6 address request (ATYP 0x04) reaches a target on ::1."""
        if not ipv6_loopback_available():
            raise SkipTest("no IPv6 loopback")
        proxy, target = self.start(target_interface="::1")
        url = "socks5://127.0.0.1:%d" % (proxy,)
        received = yield deferToThread(python_socks_exchange, url, "::1", target, b"six")
        self.assertEqual(received, b"six")

    @inlineCallbacks
    def test_half_close(self):
        """A user's shutdown(SHUT_WR) reaches the target, whose late answer is read in full."""
        proxy, target = self.start(target=ReplyAfterEofTarget)
        payload = b"0123456789abcdef" * 8192
        received = yield deferToThread(socks_exchange, proxy, target, payload, half_close=True)
        self.assertEqual(received, payload)



class HandshakeCapTests(SynchronousTestCase):
    """A listener keeps at most max_handshakes connections in their handshake."""

    def setUp(self):
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.factory = Socks5Factory(UserDatabase(), lambda user, host, port, source="": self.endpoint,
                                     self.clock, handshake_timeout=5.0, max_handshakes=2)

    def connect(self):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_cap(self):
        """Beyond the cap a new connection is closed at once, without a byte."""
        self.connect()
        self.connect()
        _, transport = self.connect()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual((self.factory.handshakes.count, self.factory.handshakes.refused), (2, 1))

    def test_request_leaves(self):
        """A connection whose request has arrived no longer counts: a new one is let in."""
        first, _ = self.connect()
        self.connect()
        first.dataReceived(b"\x05\x01\x00" + CONNECT_IPV4)
        self.assertEqual(self.factory.handshakes.count, 1)
        _, transport = self.connect()
        self.assertFalse(transport.disconnecting)
        first.connectionLost(Failure(ConnectionDone()))  # counted once only
        self.assertEqual(self.factory.handshakes.count, 2)

    def test_close_leaves(self):
        """A connection closed in its handshake (by the user or the timeout) frees its place."""
        first, _ = self.connect()
        second, second_transport = self.connect()
        first.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(5)
        self.assertTrue(second_transport.disconnecting)
        second.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.handshakes.count, 0)

    def test_timeout_is_a_deadline(self):
        """Bytes arriving do not extend the handshake timeout."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"\x05")
        self.clock.advance(2.5)
        protocol.dataReceived(b"\x01")
        self.clock.advance(2.4)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"\x00")  # greeting done; the request still missing
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)


class HandshakeCapLoopbackTests(TestCase):
    """Over loopback: idle connections fill the cap, the next is closed, a freed place is
    taken again."""

    timeout = 30

    @inlineCallbacks
    def test_cap(self):
        factory = Socks5Factory(UserDatabase(), lambda user, host, port, source="": FakeEndpoint(),
                                reactor, handshake_timeout=10.0, max_handshakes=2)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        first = yield connect_raw(self, number)
        yield connect_raw(self, number)
        yield wait_until(lambda: factory.handshakes.count == 2)
        refused = yield connect_raw(self, number)
        refused.transport.write(b"\x05\x01\x00")
        yield refused.closed
        self.assertEqual(refused.data, b"")
        first.transport.loseConnection()
        yield wait_until(lambda: factory.handshakes.count == 1)
        client = yield connect_raw(self, number)
        client.transport.write(b"\x05\x01\x00")
        yield wait_until(lambda: client.data)
        self.assertEqual(client.data, b"\x05\x00")
