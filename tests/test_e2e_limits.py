"""
End to end on loopback: connection limits with their bounded queues (the
gateway's per-user and per-listener limits, the client's
max_concurrent_conns), the client's idle timeout per stream, and slowloris
users holding half-sent handshakes.
"""

import socket
import struct
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment, Echo, listen_tcp, run_curl
from tests.test_e2e_tcp import recv_all, socks_connect, socks_echo, socks_error

OTHER_USER = "bob"
OTHER_PASSWORD = "bob-limits-pw"


@defer.inlineCallbacks
def wait_until(predicate, timeout=10.0, step=0.02):
    """Poll C{predicate} on the reactor until it is true; fail after C{timeout}."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in %gs" % (timeout,))
        yield task.deferLater(reactor, step, lambda: None)


def echo_through(sock, payload=b"ping"):
    """Send C{payload} on a connected SOCKS socket and read the echo back."""
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


class TrackedEcho(Echo):
    """An echo that counts its open connections on its factory."""

    def connectionMade(self):
        self.factory.open += 1

    def connectionLost(self, reason):
        self.factory.open -= 1


def close_all(socks):
    for sock in socks:
        sock.close()


def abort(sock):
    """Close C{sock} with a reset, as a user who gives up abruptly does.  (A
    plain close sends FIN, which a SOCKS5 proxy must take for a half-close.)"""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def send_connect(proxy_port, target_port):
    """A raw SOCKS5 CONNECT to 127.0.0.1:C{target_port}, not waiting for the reply."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    user, password = PROXY_USER.encode(), PROXY_PASSWORD.encode()
    sock.sendall(b"\x05\x01\x02" + b"\x01" + bytes([len(user)]) + user
                 + bytes([len(password)]) + password
                 + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target_port.to_bytes(2, "big"))
    return sock


class _LimitsBase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, gateway=None, proxy=None, client=None):
        self.deployment = Deployment(self)
        overrides = {"gateway": dict(gateway or {})}
        overrides["gateway"].setdefault("users", [
            {"username": OTHER_USER, "password": OTHER_PASSWORD, "group": "default"}])
        if proxy:
            overrides["proxy"] = proxy
        yield self.deployment.start_gateway(**overrides)
        yield self.deployment.start_client(client=client or {})
        self.targets = protocol.Factory.forProtocol(TrackedEcho)
        self.targets.open = 0
        self.echo_port = listen_tcp(self, self.targets).getHost().port
        self.held = []
        self.addCleanup(lambda: close_all(self.held))

    @property
    def gateway(self):
        return self.deployment.gateway

    @property
    def dialer(self):
        return self.deployment.clients[0].dialer

    @defer.inlineCallbacks
    def hold(self, count, **kwargs):
        """Open C{count} SOCKS streams to the echo server and keep them open."""
        socks = yield deferToThread(lambda: [
            socks_connect(self.deployment.socks_port, "127.0.0.1", self.echo_port, **kwargs)
            for _ in range(count)])
        self.held.extend(socks)
        return socks

    def curl(self, user=PROXY_USER, password=PROXY_PASSWORD):
        proxy = "http://%s:%s@127.0.0.1:%d" % (user, password, self.deployment.http_port)
        return run_curl("-x", proxy, "-p", "-o", "/dev/null", "-w", "%{http_connect}",
                        "http://127.0.0.1:%d/" % (self.echo_port,))


class GatewayUserLimitTests(_LimitsBase):
    """gateway.max_conns_per_user: excess streams wait in the queue, then proceed or fail."""

    @defer.inlineCallbacks
    def test_third_waits_and_proceeds(self):
        """With a limit of 2 the third stream waits, and is served when one of the two closes."""
        yield self.start(gateway={"max_conns_per_user": 2, "queue_timeout": 20})
        first, _ = yield self.hold(2)
        third = deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                              self.echo_port)
        yield wait_until(lambda: self.gateway.limits.per_user.waiting(PROXY_USER) == 1)
        self.assertFalse(third.called)
        first.close()
        sock = yield third
        self.held.append(sock)
        got = yield deferToThread(echo_through, sock, b"third")
        self.assertEqual(got, b"third")
        self.assertEqual(self.gateway.limits.per_user.active(PROXY_USER), 2)
        self.assertEqual(self.gateway.limits.per_user.waiting(PROXY_USER), 0)

    @defer.inlineCallbacks
    def test_other_user_not_held_up(self):
        """A user at their limit, with streams queued, does not slow another user down."""
        yield self.start(gateway={"max_conns_per_user": 1, "queue_timeout": 20})
        yield self.hold(1)
        queued = deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1",
                               self.echo_port)
        yield wait_until(lambda: self.gateway.limits.per_user.waiting(PROXY_USER) == 1)
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port, username=OTHER_USER, password=OTHER_PASSWORD)
        self.held.append(sock)
        got = yield deferToThread(echo_through, sock, b"bob")
        self.assertEqual(got, b"bob")
        close_all(self.held)
        msg = yield queued
        self.assertIsNone(msg)  # served once alice's first stream closed

    @defer.inlineCallbacks
    def test_queue_timeout(self):
        """Still waiting after queue_timeout: SOCKS5 REP 0x01 and HTTP 503."""
        yield self.start(gateway={"max_conns_per_user": 1, "queue_timeout": 0.3})
        yield self.hold(1)
        started = time.monotonic()
        msg = yield deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1",
                                  self.echo_port)
        self.assertIn("0x01", msg)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        out, _, _ = yield self.curl()
        self.assertEqual(out, b"503")
        self.assertEqual(self.gateway.limits.per_user.waiting(PROXY_USER), 0)
        self.assertEqual(self.gateway.limits.per_user.active(PROXY_USER), 1)

    @defer.inlineCallbacks
    def test_queue_full(self):
        """With queue_size 0 the stream beyond the limit is refused at once."""
        yield self.start(gateway={"max_conns_per_user": 1, "queue_size": 0,
                                  "queue_timeout": 20})
        yield self.hold(1)
        started = time.monotonic()
        msg = yield deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1",
                                  self.echo_port)
        self.assertIn("0x01", msg)
        self.assertLess(time.monotonic() - started, 5)

    @defer.inlineCallbacks
    def test_user_leaves_queue(self):
        """A user who disconnects while queued leaves the queue at once."""
        yield self.start(gateway={"max_conns_per_user": 1, "queue_timeout": 20})
        yield self.hold(1)
        sock = yield deferToThread(send_connect, self.deployment.socks_port, self.echo_port)
        yield wait_until(lambda: self.gateway.limits.per_user.waiting(PROXY_USER) == 1)
        abort(sock)
        yield wait_until(lambda: self.gateway.limits.per_user.waiting(PROXY_USER) == 0)
        self.assertEqual(self.gateway.limits.per_user.active(PROXY_USER), 1)


class ListenerLimitTests(_LimitsBase):
    """proxy.<listener>.max_conns bounds the streams of one listener, whoever the user."""

    @defer.inlineCallbacks
    def test_listener_full(self):
        """At the SOCKS listener's max_conns another user waits then fails; HTTP still serves."""
        socks5 = {"listen_addr": "127.0.0.1:0", "auth_username": PROXY_USER,
                  "auth_password": PROXY_PASSWORD, "max_conns": 1}
        yield self.start(gateway={"queue_timeout": 0.3}, proxy={"socks5": socks5})
        yield self.hold(1)
        msg = yield deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1",
                                  self.echo_port, username=OTHER_USER, password=OTHER_PASSWORD)
        self.assertIn("0x01", msg)
        out, _, _ = yield self.curl(OTHER_USER, OTHER_PASSWORD)
        self.assertEqual(out, b"200")
        self.assertEqual(self.gateway.limits.per_listener["socks5 proxy"].active(), 1)


class ClientQueueTests(_LimitsBase):
    """client.max_concurrent_conns: excess OPENs wait at the client, then proceed or fail."""

    @defer.inlineCallbacks
    def test_waits_and_proceeds(self):
        """At max_concurrent_conns the next stream waits and opens when one closes."""
        yield self.start(client={"max_concurrent_conns": 1, "queue_timeout": 20})
        first, = yield self.hold(1)
        second = deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                               self.echo_port)
        yield wait_until(lambda: self.dialer.slots.waiting() == 1)
        self.assertFalse(second.called)
        first.close()
        sock = yield second
        self.held.append(sock)
        got = yield deferToThread(echo_through, sock, b"second")
        self.assertEqual(got, b"second")
        self.assertEqual((self.dialer.active, self.dialer.slots.waiting()), (1, 0))

    @defer.inlineCallbacks
    def test_queue_timeout(self):
        """Still waiting at the client after its queue_timeout: REP 0x01."""
        yield self.start(client={"max_concurrent_conns": 1, "queue_timeout": 0.3})
        yield self.hold(1)
        msg = yield deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1",
                                  self.echo_port)
        self.assertIn("0x01", msg)
        self.assertEqual(self.dialer.slots.waiting(), 0)

    @defer.inlineCallbacks
    def test_gateway_gives_up(self):
        """A user leaving while its OPEN waits at the client takes it out of that queue."""
        yield self.start(client={"max_concurrent_conns": 1, "queue_timeout": 20})
        yield self.hold(1)
        sock = yield deferToThread(send_connect, self.deployment.socks_port, self.echo_port)
        yield wait_until(lambda: self.dialer.slots.waiting() == 1)
        abort(sock)
        yield wait_until(lambda: self.dialer.slots.waiting() == 0)
        self.assertEqual(self.dialer.active, 1)


class FairShareTests(_LimitsBase):
    """
    gateway.max_conns_per_user below a client's max_concurrent_conns: one user
    opening more than their share waits in their own queue at the gateway,
    and another user of the same group still gets the client's free slots.
    """

    @defer.inlineCallbacks
    def test_one_user_cannot_starve_another(self):
        """Alice holds her 4 streams and queues 3 more; Bob's 2 streams open at once."""
        yield self.start(gateway={"max_conns_per_user": 4, "queue_timeout": 20},
                         client={"max_concurrent_conns": 6, "queue_timeout": 0.3})
        yield self.hold(4)
        queued = [deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                self.echo_port) for _ in range(3)]
        yield wait_until(lambda: self.gateway.limits.per_user.waiting(PROXY_USER) == 3)
        # Alice's extra streams wait at the gateway, holding no slot of the client.
        self.assertEqual(self.dialer.active, 4)
        bob = yield self.hold(2, username=OTHER_USER, password=OTHER_PASSWORD)
        for sock in bob:
            got = yield deferToThread(echo_through, sock, b"bob")
            self.assertEqual(got, b"bob")
        self.assertEqual((self.dialer.active, self.gateway.limits.per_user.active(OTHER_USER)),
                         (6, 2))
        close_all(self.held)  # then Alice's queued streams get their turn
        for waiting in queued:
            sock = yield waiting
            self.held.append(sock)
            self.assertEqual((yield deferToThread(echo_through, sock, b"alice")), b"alice")

    @defer.inlineCallbacks
    def test_anonymous_not_counted(self):
        """Users of a listener without credentials are not one user: max_conns_per_user
        leaves them to the listener's max_conns."""
        socks5 = {"listen_addr": "127.0.0.1:0", "auth_username": "", "auth_password": ""}
        yield self.start(gateway={"max_conns_per_user": 1, "queue_size": 0, "users": []},
                         proxy={"socks5": socks5})
        yield self.hold(3, username=None, password=None)
        self.assertEqual(self.dialer.active, 3)
        self.assertEqual(self.gateway.limits.per_user.keys(), [])


class IdleTimeoutTests(_LimitsBase):
    """client.idle_timeout closes a TCP stream that carried no byte for that long."""

    @defer.inlineCallbacks
    def test_idle_stream_closed(self):
        """A stream silent for idle_timeout is closed at both ends; a busy one is not."""
        yield self.start(client={"idle_timeout": 0.5})
        idle, busy = yield self.hold(2)
        started = time.monotonic()  # before the idle stream's last byte
        got = yield deferToThread(echo_through, idle, b"hello")
        self.assertEqual(got, b"hello")
        self.assertEqual(len(self.dialer.records()), 2)

        def keep_busy():
            for _ in range(10):
                if echo_through(busy, b"b") != b"b":
                    return False
                time.sleep(0.1)
            return True

        busy_ok = deferToThread(keep_busy)
        rest = yield deferToThread(recv_all, idle)  # EOF once the client closed the stream
        elapsed = time.monotonic() - started
        self.assertEqual(rest, b"")
        self.assertGreaterEqual(elapsed, 0.5)
        self.assertLess(elapsed, 5)
        self.assertTrue((yield busy_ok))
        yield wait_until(lambda: self.targets.open == 1)  # the target side was closed too
        records = self.dialer.records()
        self.assertEqual(len(records), 1)
        self.assertGreater(records[0].bytes_sent, 0)
        self.assertGreaterEqual(records[0].last_active, records[0].created)

    @defer.inlineCallbacks
    def test_sweep_stops(self):
        """With no stream left the idle sweep stops (no timer while idle)."""
        yield self.start(client={"idle_timeout": 0.3})
        sock, = yield self.hold(1)
        yield deferToThread(recv_all, sock)
        yield wait_until(lambda: self.dialer.active == 0)
        self.assertIsNone(self.dialer._sweeper)


    @defer.inlineCallbacks
    def test_changed_while_streams_are_open(self):
        """
        idle_timeout set to 0 (never) by a reload stops the sweep: an open
        stream quiet for longer than the old timeout stays; set again, it
        sweeps at the new pace.
        """
        yield self.start(client={"idle_timeout": 30})
        sock, = yield self.hold(1)
        self.assertIsNotNone(self.dialer._sweeper)
        self.dialer.idle_timeout = 0
        self.assertIsNone(self.dialer._sweeper)
        for _ in range(20):  # the old sweep compared silence with 0: it reset at its next run
            self.dialer._sweep_idle()
        self.assertEqual(self.dialer.active, 1)
        self.assertEqual((yield deferToThread(echo_through, sock, b"still")), b"still")
        self.dialer.idle_timeout = 0.3
        rest = yield deferToThread(recv_all, sock)  # closed once quiet for 0.3 s
        self.assertEqual(rest, b"")


class Stalled(protocol.Protocol):
    """A user that sends half a handshake and then nothing; records when it is closed."""

    def __init__(self, partial):
        self.partial = partial
        self.connected_at = self.lost_at = None
        self.received = b""
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.connected_at = time.monotonic()
        self.transport.write(self.partial)

    def dataReceived(self, data):
        self.received += data  # the HTTP proxy may answer 408 before closing

    def connectionLost(self, reason):
        self.lost_at = time.monotonic()
        self.lost.callback(None)


class SlowlorisTests(_LimitsBase):
    """Users holding half-sent handshakes neither block others nor stay forever."""

    STALLED = 200  # per proxy
    # Long enough that opening 400 connections and serving the normal user
    # surely ends before the first stalled one times out, even on a busy CI.
    HANDSHAKE_TIMEOUT = 8.0

    @defer.inlineCallbacks
    def stall(self, port, partial):
        """C{STALLED} connections to C{port}, each having sent C{partial}."""
        stalled = []
        connecting = []
        for _ in range(self.STALLED):
            user = Stalled(partial)
            stalled.append(user)
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
            connecting.append(connectProtocol(endpoint, user))
        yield defer.gatherResults(connecting, consumeErrors=True)

        def cleanup():
            for user in stalled:
                if user.lost_at is None:
                    user.transport.abortConnection()
            return defer.gatherResults([user.lost for user in stalled])

        self.addCleanup(cleanup)
        return stalled

    @defer.inlineCallbacks
    def test_slowloris(self):
        """200 stalled SOCKS5 and 200 stalled HTTP handshakes: a normal user is served
        promptly, and the stalled ones are closed after handshake_timeout."""
        yield self.start(gateway={"handshake_timeout": self.HANDSHAKE_TIMEOUT})
        socks_users = yield self.stall(self.deployment.socks_port, b"\x05\x02")
        http_users = yield self.stall(
            self.deployment.http_port, b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n")
        stalled = socks_users + http_users
        first = min(user.connected_at for user in stalled)

        got = yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1",
                                  self.echo_port, b"normal user")
        self.assertEqual(got, b"normal user")
        out, _, _ = yield self.curl()
        self.assertEqual(out, b"200")
        now = time.monotonic()
        # Served while every stalled one was still connected: nothing was
        # dropped to make room.
        self.assertLess(now - first, self.HANDSHAKE_TIMEOUT, "stalling took too long")
        self.assertEqual([user for user in stalled if user.lost_at is not None], [])

        yield defer.gatherResults([user.lost for user in stalled])
        waited = sorted(user.lost_at - user.connected_at for user in stalled)
        # (measured from the user's side: the proxy's timer may start a little later)
        self.assertGreaterEqual(waited[0], self.HANDSHAKE_TIMEOUT - 0.5)
        self.assertLess(waited[-1], self.HANDSHAKE_TIMEOUT + 5)
