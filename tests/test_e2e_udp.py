"""
End to end on loopback: SOCKS5 UDP ASSOCIATE through gateway, tunnel and
client, driven by PySocks as the UDP client.
"""

import os
import socket

import socks
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.names import common, dns, server
from twisted.trial import unittest

from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment

DNS_NAME = b"intranet.private.example"
DNS_ANSWER = "10.20.30.40"


class UdpEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class PrivateZone(common.ResolverBase):
    """A DNS server that only the client can reach, for one private name."""

    def _lookup(self, name, cls, type, timeout):
        if name == DNS_NAME and type == dns.A:
            answer = dns.RRHeader(name, dns.A, dns.IN, 60, dns.Record_A(DNS_ANSWER))
            return defer.succeed(([answer], [], []))
        return defer.fail(dns.DomainError(name))


def listen_udp(testcase, proto, interface="127.0.0.1"):
    port = reactor.listenUDP(0, proto, interface=interface, maxPacketSize=65535)
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


def udp_socket(proxy_port, timeout=10):
    """A PySocks UDP socket with its association made (the bind does it)."""
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, rdns=True,
                   username=PROXY_USER, password=PROXY_PASSWORD)
    sock.settimeout(timeout)
    sock.bind(("127.0.0.1", 0))
    return sock


def exchange(sock, payload, destination):
    sock.sendto(payload, destination)
    return sock.recvfrom(70000)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class UdpAssociateTests(unittest.TestCase):
    """Datagrams go through the tunnel and the client's network, both ways."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway()
        self.echo_port = listen_udp(self, UdpEcho())
        self.blocked_port = listen_udp(self, UdpEcho())
        yield self.deployment.start_client(client={
            "forbidden_hosts": ["127.0.0.1:%d" % (self.blocked_port,)],
            "max_concurrent_conns": 1000})

    def socks_udp(self):
        sock = udp_socket(self.deployment.socks_port)
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def test_sizes_echo_intact(self):
        """100 datagrams from 1 B to 60 KB come back intact, from the target's address."""
        sock = yield deferToThread(self.socks_udp)
        sizes = [1 + (60000 * i) // 99 for i in range(100)]

        def run():
            for i, size in enumerate(sizes):
                payload = bytes([i % 251]) * size
                data, source = exchange(sock, payload, ("127.0.0.1", self.echo_port))
                if data != payload or source != ("127.0.0.1", self.echo_port):
                    return (size, len(data), source)
            return None

        self.assertIsNone((yield deferToThread(run)))

    @defer.inlineCallbacks
    def test_domain_destination(self):
        """A domain-name destination is resolved at the client."""
        sock = yield deferToThread(self.socks_udp)
        data, source = yield deferToThread(exchange, sock, b"by name",
                                           ("target.test", self.echo_port))
        self.assertEqual((data, source), (b"by name", ("127.0.0.1", self.echo_port)))
        self.assertIn("target.test", self.deployment.resolver.asked)

    @defer.inlineCallbacks
    def test_forbidden_dropped_association_survives(self):
        """A datagram to a forbidden target is dropped; the association keeps working."""
        sock = yield deferToThread(self.socks_udp)

        def run():
            sock.settimeout(0.5)
            sock.sendto(b"forbidden", ("127.0.0.1", self.blocked_port))
            try:
                sock.recvfrom(100)
                return "answered"
            except socket.timeout:
                pass
            sock.settimeout(10)
            return exchange(sock, b"allowed", ("127.0.0.1", self.echo_port))[0]

        self.assertEqual((yield deferToThread(run)), b"allowed")

    @defer.inlineCallbacks
    def test_many_concurrent_associations(self):
        """200 associations at once each get their own answers."""
        count = 200

        def run():
            sockets = [self.socks_udp() for _ in range(count)]
            for i, sock in enumerate(sockets):
                sock.sendto(b"assoc %d" % i, ("127.0.0.1", self.echo_port))
            return [sock.recvfrom(100)[0] for sock in sockets]

        got = yield deferToThread(run)
        self.assertEqual(got, [b"assoc %d" % i for i in range(count)])

    @defer.inlineCallbacks
    def test_dns_lookup_through_association(self):
        """A DNS query to a server only the client reaches is answered correctly."""
        factory = server.DNSServerFactory(clients=[PrivateZone()])
        dns_port = listen_udp(self, dns.DNSDatagramProtocol(controller=factory))
        query = dns.Message(id=4242, recDes=1)
        query.queries = [dns.Query(DNS_NAME, dns.A, dns.IN)]
        sock = yield deferToThread(self.socks_udp)
        data, _ = yield deferToThread(exchange, sock, query.toStr(), ("127.0.0.1", dns_port))
        answer = dns.Message()
        answer.fromStr(data)
        self.assertEqual(answer.id, 4242)
        self.assertEqual([a.payload.dottedQuad() for a in answer.answers], [DNS_ANSWER])

    @defer.inlineCallbacks
    def test_association_ends_with_tcp_connection(self):
        """Closing the control connection releases the relay port; no descriptors leak."""
        before = open_fds()
        sock = yield deferToThread(udp_socket, self.deployment.socks_port)
        yield deferToThread(exchange, sock, b"warm up", ("127.0.0.1", self.echo_port))
        relay_port = socket.socket.getpeername(sock)[1]  # PySocks hides the relay

        def churn():
            for _ in range(30):
                s = udp_socket(self.deployment.socks_port)
                exchange(s, b"x", ("127.0.0.1", self.echo_port))
                s.close()

        yield deferToThread(churn)
        sock.close()
        for _ in range(100):
            if open_fds() == before:
                break
            yield sleep(0.05)
        self.assertEqual(open_fds(), before)
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(probe.close)
        probe.bind(("127.0.0.1", relay_port))  # released: nobody holds it any more

    @defer.inlineCallbacks
    def test_tunnel_loss_closes_control_connection(self):
        """If the tunnel dies, the association's TCP connection is closed."""
        sock = yield deferToThread(self.socks_udp)
        yield deferToThread(exchange, sock, b"hi", ("127.0.0.1", self.echo_port))
        yield self.deployment.clients[0].stopService()
        control = sock._proxyconn
        control.settimeout(10)
        self.assertEqual((yield deferToThread(control.recv, 10)), b"")


class UdpRefusedTests(unittest.TestCase):
    """A client configured without UDP refuses associations with 'not allowed'."""

    timeout = 30

    @defer.inlineCallbacks
    def test_allow_udp_false(self):
        """UDP ASSOCIATE gets REP 0x02 when the client has allow_udp: false."""
        deployment = Deployment(self)
        yield deployment.start_gateway()
        yield deployment.start_client(client={"allow_udp": False})

        def attempt():
            try:
                udp_socket(deployment.socks_port).close()
            except socks.ProxyError as e:
                return e.msg
            return None

        self.assertIn("0x02", (yield deferToThread(attempt)) or "")
