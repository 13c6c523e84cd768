"""Tests for L{anyproxy.client.tcp_connect}: connects on loopback, and a fake reactor for time."""

import errno
import select
import socket

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from anyproxy.client.tcp_connect import connect_tcp


class Recorder(protocol.ClientFactory):
    """Records what a connect attempt tells its factory."""

    noisy = False

    def __init__(self, protocol=None):
        self.protocol_instance = protocol
        self.built = []
        self.failed = defer.Deferred()

    def buildProtocol(self, addr):
        self.built.append(addr)
        return self.protocol_instance

    def clientConnectionFailed(self, connector, reason):
        self.failed.callback((connector, reason))


class Echoed(protocol.Protocol):
    def __init__(self):
        self.made = defer.Deferred()
        self.received = b""
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.made.callback(self.transport)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(reason.value)


def _listener(testcase, family=socket.AF_INET, host="127.0.0.1", listen=True):
    """A loopback socket bound to a free port (listening unless told not to); its port."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    testcase.addCleanup(sock.close)
    sock.bind((host, 0))
    if listen:
        sock.listen(8)
    return sock, sock.getsockname()[1]


class FakeReactor(Clock):
    """Time from a Clock; the watched writers are recorded, never called."""

    def __init__(self):
        super().__init__()
        self.writers = []

    def addWriter(self, writer):
        self.writers.append(writer)

    def removeWriter(self, writer):
        self.writers.remove(writer)


class ConnectTests(unittest.TestCase):
    """Real connects on loopback through the running reactor."""

    @defer.inlineCallbacks
    def test_connects(self):
        """
        The factory builds the protocol with the peer's address; the
        transport carries bytes both ways, reports both ends, and closes.
        """
        accepted = []

        class Echo(protocol.Protocol):
            def connectionMade(self):
                accepted.append(self.transport)

            def dataReceived(self, data):
                self.transport.write(data.upper())
                self.transport.loseConnection()

        listener = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo),
                                     interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        port = listener.getHost().port
        made = Echoed()
        factory = Recorder(made)
        attempt = connect_tcp(reactor, "127.0.0.1", port, factory, timeout=5)
        self.assertEqual(attempt.getDestination(), IPv4Address("TCP", "127.0.0.1", port))
        transport = yield made.made
        self.assertEqual(factory.built, [IPv4Address("TCP", "127.0.0.1", port)])
        self.assertEqual(transport.getPeer(), IPv4Address("TCP", "127.0.0.1", port))
        self.assertIn(str(port), repr(transport))
        local = transport.getHost()
        transport.write(b"ping")
        yield made.lost
        self.assertEqual(made.received, b"PING")
        self.assertEqual(local.port, accepted[0].getPeer().port)
        self.assertRaises(error.NotConnectingError, attempt.stopConnecting)
        self.assertEqual(_timers_of(attempt), [])

    @defer.inlineCallbacks
    def test_ipv6(self):
        """An IPv6 literal connects over IPv6, with IPv6 addresses."""
        try:
            listener, port = _listener(self, socket.AF_INET6, "::1")
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback here")
        made = Echoed()
        connect_tcp(reactor, "::1", port, Recorder(made))
        transport = yield made.made
        self.assertEqual(transport.getPeer(), IPv6Address("TCP", "::1", port))
        transport.loseConnection()
        yield made.lost

    @defer.inlineCallbacks
    def test_refused(self):
        """A port nobody listens on: ConnectionRefusedError, nothing built or left watched."""
        _, port = _listener(self, listen=False)
        factory = Recorder(Echoed())
        attempt = connect_tcp(reactor, "127.0.0.1", port, factory, timeout=5)
        connector, reason = yield factory.failed
        self.assertIs(connector, attempt)
        reason.trap(error.ConnectionRefusedError)
        self.assertEqual(factory.built, [])
        self.assertFalse(reactor.getWriters())
        self.assertEqual(attempt.fileno(), -1)
        self.assertEqual(_timers_of(attempt), [])

    @defer.inlineCallbacks
    def test_stop_connecting(self):
        """
        Stopped before the reactor saw it connect: the factory hears
        UserError at once, and the connection is never built.
        """
        _, port = _listener(self)
        factory = Recorder(Echoed())
        attempt = connect_tcp(reactor, "127.0.0.1", port, factory, timeout=5)
        attempt.stopConnecting()
        _, reason = yield factory.failed
        reason.trap(error.UserError)
        self.assertRaises(error.NotConnectingError, attempt.stopConnecting)
        self.assertEqual(attempt.fileno(), -1)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(factory.built, [])
        self.assertFalse(reactor.getWriters())

    def test_protocol_none(self):
        """A factory that builds no protocol: the connected socket is closed."""
        listener, port = _listener(self)
        fake = FakeReactor()
        factory = Recorder(None)
        attempt = connect_tcp(fake, "127.0.0.1", port, factory)
        _wait_writable(attempt)
        attempt.doWrite()
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        accepted.settimeout(5)
        self.assertEqual(accepted.recv(1), b"")
        self.assertEqual(len(factory.built), 1)
        self.assertEqual(fake.writers, [])

    def test_bad_zone_raises(self):
        """An IPv6 zone naming no interface raises in the call, as connectTCP does."""
        self.assertRaises(socket.gaierror, connect_tcp, FakeReactor(), "fe80::1%nosuchif0", 22,
                          Recorder())


class TimeTests(unittest.SynchronousTestCase):
    """Deadlines, errors found on the socket, and a reactor letting go, on a fake reactor."""

    def test_timeout(self):
        """No answer within C{timeout}: TimeoutError, the socket closed and unwatched."""
        _, port = _listener(self)
        fake = FakeReactor()
        factory = Recorder()
        attempt = connect_tcp(fake, "127.0.0.1", port, factory, timeout=3)
        self.assertEqual(fake.writers, [attempt])
        fake.advance(2.9)
        self.assertNoResult(factory.failed)
        fake.advance(0.1)
        _, reason = self.successResultOf(factory.failed)
        reason.trap(error.TimeoutError)
        self.assertEqual(fake.writers, [])
        self.assertEqual(attempt.fileno(), -1)

    def test_error_found_when_writable(self):
        """The socket turning writable with an error in SO_ERROR fails the attempt with it."""
        _, port = _listener(self, listen=False)
        fake = FakeReactor()
        factory = Recorder()
        attempt = connect_tcp(fake, "127.0.0.1", port, factory, timeout=3)
        _wait_writable(attempt)
        attempt.doWrite()
        _, reason = self.successResultOf(factory.failed)
        reason.trap(error.ConnectionRefusedError)
        self.assertEqual((fake.writers, fake.getDelayedCalls()), ([], []))

    def test_reactor_lets_go(self):
        """
        The reactor dropping the socket (a hang-up, or its shutdown) with no
        error on it fails the attempt with ConnectError.
        """
        _, port = _listener(self)
        fake = FakeReactor()
        factory = Recorder()
        attempt = connect_tcp(fake, "127.0.0.1", port, factory, timeout=3)
        fake.writers.remove(attempt)  # as the reactor does before telling it
        attempt.connectionLost(Failure(error.ConnectionLost()))
        _, reason = self.successResultOf(factory.failed)
        reason.trap(error.ConnectError)
        self.assertEqual(fake.getDelayedCalls(), [])
        self.assertEqual(attempt.fileno(), -1)


def _timers_of(attempt):
    """The running reactor's delayed calls that would call C{attempt} (its deadline)."""
    return [call for call in reactor.getDelayedCalls()
            if getattr(call.func, "__self__", None) is attempt]


def _wait_writable(attempt, timeout=5):
    """Block until the attempt's socket is writable (connected or failed)."""
    _, writable, _ = select.select([], [attempt.fileno()], [], timeout)
    assert writable, "not writable within %ss" % (timeout,)


class _Unreachable(socket.socket):
    """A socket whose connect fails at once with ENETUNREACH (no packet leaves)."""

    def connect_ex(self, address):
        return errno.ENETUNREACH


class EdgeTests(unittest.SynchronousTestCase):
    """Failures found in the call, events meant for another socket, a factory that raises."""

    def test_failure_in_the_call_told_next_turn(self):
        """
        A connect refused in the call is told on the next turn, as Twisted's
        connector does: a caller trying address after address never recurses.
        """
        self.patch(socket, "socket", _Unreachable)
        fake = FakeReactor()
        factory = Recorder()
        attempt = connect_tcp(fake, "192.0.2.1", 80, factory, timeout=3)
        self.assertNoResult(factory.failed)
        self.assertEqual(fake.writers, [])
        fake.advance(0)
        connector, reason = self.successResultOf(factory.failed)
        self.assertIs(connector, attempt)
        self.assertEqual(reason.value.osError, errno.ENETUNREACH)
        self.assertEqual(fake.getDelayedCalls(), [])
        self.assertRaises(error.NotConnectingError, attempt.stopConnecting)

    def test_stopped_before_failure_told(self):
        """Stopped while its failure waits to be told: UserError instead, told once."""
        self.patch(socket, "socket", _Unreachable)
        fake = FakeReactor()
        factory = Recorder()
        attempt = connect_tcp(fake, "192.0.2.1", 80, factory)
        attempt.stopConnecting()
        _, reason = self.successResultOf(factory.failed)
        reason.trap(error.UserError)
        self.assertEqual(fake.getDelayedCalls(), [])

    def test_event_for_an_earlier_socket(self):
        """
        A writable or readable event while the connect is still going on
        (meant for a socket closed this turn whose number was reused) is
        not taken for the connect's end: the attempt keeps waiting.
        """
        listener, port = _listener(self)
        listener.listen(0)
        waiting = []
        for _ in range(16):  # fill the accept queue: later connects stay in progress
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            self.addCleanup(sock.close)
            sock.connect_ex(("127.0.0.1", port))
            waiting.append(sock)
        fake = FakeReactor()
        factory = Recorder(Echoed())
        attempt = connect_tcp(fake, "127.0.0.1", port, factory, timeout=3)
        _, writable, _ = select.select([], [attempt.fileno()], [], 0.2)
        if writable:
            raise unittest.SkipTest("the connect was not held in progress here")
        attempt.doRead()
        attempt.doWrite()
        self.assertEqual(factory.built, [])
        self.assertEqual(fake.writers, [attempt])
        self.assertNoResult(factory.failed)
        # A hang-up meant for that earlier socket: the reactor drops this
        # one (removeWriter, then connectionLost); it is watched again.
        fake.running = True
        fake.removeWriter(attempt)
        attempt.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(fake.writers, [attempt])
        self.assertNoResult(factory.failed)
        # At the reactor's shutdown the same hang-up fails it.
        fake.running = False
        fake.removeWriter(attempt)
        attempt.connectionLost(Failure(error.ConnectionLost()))
        self.successResultOf(factory.failed)

    def test_build_protocol_raises(self):
        """A factory raising in buildProtocol hears the failure; the socket is closed."""
        listener, port = _listener(self)

        class Raising(Recorder):
            def buildProtocol(self, addr):
                raise ValueError("no")

        fake = FakeReactor()
        factory = Raising()
        attempt = connect_tcp(fake, "127.0.0.1", port, factory)
        _wait_writable(attempt)
        attempt.doWrite()
        _, reason = self.successResultOf(factory.failed)
        reason.trap(ValueError)
        self.assertEqual((fake.writers, attempt.fileno()), ([], -1))
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        accepted.settimeout(5)
        self.assertEqual(accepted.recv(1), b"")
