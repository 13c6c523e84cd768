# -*- test-case-name: tests.test_e2e_multigateway -*-
"""
End to end on loopback: one client serving two gateways at once (its
C{gateway_addr} is a list), failover when one gateway goes away, the client
coming back to it by itself, and C{replicas} tunnels per gateway.

The failover figures are printed (not asserted tightly): they depend on the
machine and on the client's reconnect backoff (0.1 s initial, 0.5 s at most
in these tests, plus jitter).
"""

import socket
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import Deployment, Echo, listen_tcp
from tests.test_e2e_tcp import socks_connect, socks_echo


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class GatewayPair:
    """
    Two in-process gateways, A and B, sharing one test PKI (so one client
    trusts both), and a client whose C{gateway_addr} lists both.
    """

    def __init__(self, testcase):
        self.testcase = testcase
        self.a = Deployment(testcase)
        self.b = Deployment(testcase)
        self.b.pki = self.a.pki  # one CA: the client's gateway_tls_cert covers both

    @defer.inlineCallbacks
    def start(self, **client):
        yield self.a.start_gateway()
        yield self.b.start_gateway()
        overrides = {"gateway_addr": ["127.0.0.1:%d" % (self.a.gateway_port,),
                                      "127.0.0.1:%d" % (self.b.gateway_port,)]}
        overrides.update(client)
        self.client = yield self.a.start_client(wait=False, client=overrides)
        replicas = client.get("replicas", 1)
        yield wait_for_tunnels(self.a, replicas)
        yield wait_for_tunnels(self.b, replicas)
        return self.client

    def ports(self, deployment):
        """The listen addresses that start C{deployment}'s gateway again on its ports."""
        return dict(
            gateway={"listen_addr": "127.0.0.1:%d" % (deployment.gateway_port,)},
            proxy={"socks5": {"listen_addr": "127.0.0.1:%d" % (deployment.socks_port,)},
                   "http": {"listen_addr": "127.0.0.1:%d" % (deployment.http_port,)}})

    def factory_for(self, deployment):
        """The client's tunnel factory for C{deployment}'s gateway."""
        return self.client.factories[("127.0.0.1", deployment.gateway_port)]


@defer.inlineCallbacks
def wait_for_tunnels(deployment, count, timeout=10):
    """Wait until C{deployment}'s gateway has exactly C{count} tunnels."""
    for _ in range(int(timeout / 0.02)):
        if len(deployment.gateway.tunnel_pool.tunnels()) == count:
            return
        yield sleep(0.02)
    raise AssertionError("expected %d tunnels, have %d"
                         % (count, len(deployment.gateway.tunnel_pool.tunnels())))


def try_echo(socks_port, echo_port, payload=b"ping"):
    """One SOCKS5 echo round trip; the echoed bytes, or the exception."""
    try:
        return socks_echo(socks_port, "127.0.0.1", echo_port, payload)
    except Exception as e:  # refused, reset, SOCKS error: all "not yet"
        return e


@defer.inlineCallbacks
def first_success(socks_port, echo_port, timeout=15):
    """Retry an echo through C{socks_port} until it works; the C{time.monotonic()} then."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        got = yield deferToThread(try_echo, socks_port, echo_port)
        if got == b"ping":
            return time.monotonic(), attempts
        if time.monotonic() > deadline:
            raise AssertionError("no successful stream through port %d in %ss (last: %r)"
                                 % (socks_port, timeout, got))
        yield sleep(0.01)


def read_until_closed(sock, timeout=10):
    """Read until EOF or reset; C{True} if the socket was closed within C{timeout}."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class TwoGatewaysTests(unittest.TestCase):
    """One client, two gateways: both serve, and losing one leaves the other serving."""

    timeout = 90

    def setUp(self):
        self.pair = GatewayPair(self)
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    def echo(self, deployment, payload=b"ping"):
        return deferToThread(socks_echo, deployment.socks_port, "127.0.0.1", self.echo_port,
                             payload)

    @defer.inlineCallbacks
    def test_both_gateways_serve(self):
        """With gateway_addr listing A and B, users of either gateway reach the client."""
        yield self.pair.start()
        a, b = self.pair.a, self.pair.b
        self.assertEqual((yield self.echo(a, b"via A")), b"via A")
        self.assertEqual((yield self.echo(b, b"via B")), b"via B")
        for deployment in (a, b):
            (tunnel,) = deployment.gateway.tunnel_pool.tunnels()
            self.assertEqual(tunnel.client_id, "client-1")

    @defer.inlineCallbacks
    def test_failover_and_return(self):
        """Stop A: B's open stream keeps flowing and B serves; start A again: the client returns to A."""
        yield self.pair.start()
        a, b = self.pair.a, self.pair.b
        on_b = yield deferToThread(socks_connect, b.socks_port, "127.0.0.1", self.echo_port)
        self.addCleanup(on_b.close)
        on_a = yield deferToThread(socks_connect, a.socks_port, "127.0.0.1", self.echo_port)
        self.addCleanup(on_a.close)
        for sock in (on_b, on_a):
            yield deferToThread(sock.sendall, b"before")
            self.assertEqual((yield deferToThread(sock.recv, 6)), b"before")
        ports = self.pair.ports(a)

        killed = time.monotonic()
        yield a.gateway.stopService()
        failed_over, attempts = yield first_success(b.socks_port, self.echo_port)

        # The open stream on B never noticed; the one on A was closed, not left hanging.
        yield deferToThread(on_b.sendall, b"during")
        self.assertEqual((yield deferToThread(on_b.recv, 6)), b"during")
        self.assertTrue((yield deferToThread(read_until_closed, on_a)))
        a_closed = time.monotonic()
        self.assertEqual(self.pair.factory_for(a).connected, set())
        yield sleep(1.0)  # A stays down a while; the client keeps retrying it with backoff
        yield deferToThread(on_b.sendall, b"still")
        self.assertEqual((yield deferToThread(on_b.recv, 5)), b"still")

        restarted = time.monotonic()
        yield a.start_gateway(**ports)
        yield wait_for_tunnels(a, 1)
        registered = time.monotonic()
        serving, _ = yield first_success(a.socks_port, self.echo_port)
        self.assertEqual(len(self.pair.factory_for(a).connected), 1)
        yield deferToThread(on_b.sendall, b"after")
        self.assertEqual((yield deferToThread(on_b.recv, 5)), b"after")
        self.assertEqual((yield self.echo(b)), b"ping")

        print("\nfailover figures (loopback, in-process, reconnect backoff 0.1-0.5 s):")
        print("  A stopped -> first new stream through B: %.1f ms (%d attempt(s))"
              % ((failed_over - killed) * 1000, attempts))
        print("  A stopped -> user's open stream on A closed: %.1f ms"
              % ((a_closed - killed) * 1000,))
        print("  A restarted -> client's tunnel registered at A: %.1f ms"
              % ((registered - restarted) * 1000,))
        print("  A restarted -> first new stream through A: %.1f ms"
              % ((serving - restarted) * 1000,))
        print("  A down -> A serving again: %.1f ms (of which %.1f ms deliberately down)"
              % ((serving - killed) * 1000, (restarted - killed) * 1000))

    @defer.inlineCallbacks
    def test_b_stops_a_unaffected(self):
        """The same holds the other way round: losing B leaves A's users alone."""
        yield self.pair.start()
        a, b = self.pair.a, self.pair.b
        on_a = yield deferToThread(socks_connect, a.socks_port, "127.0.0.1", self.echo_port)
        self.addCleanup(on_a.close)
        yield b.gateway.stopService()
        yield deferToThread(on_a.sendall, b"flowing")
        self.assertEqual((yield deferToThread(on_a.recv, 7)), b"flowing")
        self.assertEqual((yield self.echo(a)), b"ping")
        self.assertEqual([t.client_id for t in a.gateway.tunnel_pool.tunnels()], ["client-1"])


class ReplicaTests(unittest.TestCase):
    """C{replicas: 2} gives each gateway two tunnels from the client, and streams use both."""

    timeout = 60

    @defer.inlineCallbacks
    def test_two_replicas_per_gateway(self):
        """Each gateway sees two tunnels of the client and spreads ten streams five and five."""
        pair = GatewayPair(self)
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield pair.start(replicas=2)
        for deployment in (pair.a, pair.b):
            tunnels = deployment.gateway.tunnel_pool.tunnels()
            self.assertEqual([t.client_id for t in tunnels], ["client-1", "client-1"])
            self.assertEqual(len(set(t.address for t in tunnels)), 2)  # two connections
            socks = yield deferToThread(lambda: [
                socks_connect(deployment.socks_port, "127.0.0.1", echo_port)
                for _ in range(10)])
            self.addCleanup(lambda socks=socks: [s.close() for s in socks])
            self.assertEqual([t.active_streams for t in tunnels], [5, 5])
            self.assertEqual(len(pair.factory_for(deployment).connected), 2)

    @defer.inlineCallbacks
    def test_replica_loss_fails_over(self):
        """When one replica's connection drops, new streams go to the other at once and it comes back."""
        pair = GatewayPair(self)
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield pair.start(replicas=2)
        registry = pair.a.gateway.tunnel_pool
        first, second = registry.tunnels()
        first.close()
        got = yield deferToThread(socks_echo, pair.a.socks_port, "127.0.0.1", echo_port, b"x")
        self.assertEqual(got, b"x")
        yield wait_for_tunnels(pair.a, 2)
        self.assertIn(second, registry.tunnels())
        self.assertNotIn(first, registry.tunnels())
