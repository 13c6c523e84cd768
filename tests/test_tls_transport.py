"""
L{anyproxy.tunnel.tls_transport}: encrypted bytes sent at once, in order and
whole, over real TLS connections on loopback in both of the layouts Twisted
builds (TLS started on the TCP transport by a server endpoint, and
C{wrapClientTLS}); and the Twisted internals the module relies on.
"""

import tempfile

from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial import unittest

from anyproxy.tls import client_tls_options, server_tls_options
from OpenSSL._util import lib as _lib

from anyproxy.tunnel.tls_transport import (
    release_buffers, send_ciphertext_at_once, tls_layers, write_alone)
from tests.support import TestPKI


class Collect(Protocol):
    """Keeps what it receives; C{got(n)} fires once C{n} bytes are in."""

    def __init__(self):
        self.received = []
        self.size = 0
        self._waiting = []
        self.connected_d = defer.Deferred()

    def connectionMade(self):
        self.connected_d.callback(self)

    def dataReceived(self, data):
        self.received.append(data)
        self.size += len(data)
        for wanted, d in list(self._waiting):
            if self.size >= wanted:
                self._waiting.remove((wanted, d))
                d.callback(b"".join(self.received))

    def got(self, size):
        d = defer.Deferred()
        self._waiting.append((size, d))
        self.dataReceived(b"")
        return d


class ConnectedPair:
    """A TLS server endpoint's connection and a wrapClientTLS one, on loopback."""

    @defer.inlineCallbacks
    def setUp(self):
        pki = TestPKI(tempfile.mkdtemp(dir=self.mktemp().rsplit("/", 1)[0] or "."))
        self.servers = []
        factory = Factory.forProtocol(Collect)
        original = factory.buildProtocol

        def build(address):
            protocol = original(address)
            self.servers.append(protocol)
            return protocol

        factory.buildProtocol = build
        endpoint = SSL4ServerEndpoint(reactor, 0, server_tls_options(pki.cert_path, pki.key_path),
                                      interface="127.0.0.1")
        self.port = yield endpoint.listen(factory)
        self.addCleanup(self.port.stopListening)
        client_endpoint = wrapClientTLS(
            client_tls_options("localhost", pki.ca_path),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port))
        self.client = yield client_endpoint.connect(Factory.forProtocol(Collect))
        yield self.client.connected_d
        while not self.servers:
            yield defer.succeed(None)
        self.server = self.servers[0]
        yield self.server.connected_d
        self.addCleanup(self._close)

    def _close(self):
        closing = []
        for end in (self.client, self.server):
            if end.transport is not None and end.transport.connected:
                end.transport.abortConnection()
        return defer.DeferredList(closing)


class TLSWritesTests(ConnectedPair, unittest.TestCase):

    def test_both_layouts_found(self):
        """A TLS server endpoint's and wrapClientTLS's transports are Twisted's TLS
        protocol over a TCP transport, with the attributes tls_transport.py uses."""
        for end in (self.server, self.client):
            tls, tcp = tls_layers(end.transport)
            self.assertIs(tls, end.transport)
            self.assertIsInstance(tls, TLSMemoryBIOProtocol)
            self.assertIs(tcp, end.transport.transport)
        for tcp in (self.server.transport.transport, self.client.transport.transport):
            for name in ("socket", "connected", "disconnecting", "_writeDisconnected",
                         "dataBuffer", "_tempDataLen"):
                self.assertTrue(hasattr(tcp, name), name)
        for end in (self.server, self.client):
            self.assertEqual(end.transport._aggregator._buffer, [])

    def test_not_tls(self):
        """Anything else is left alone."""
        from twisted.internet.testing import StringTransport
        self.assertIsNone(tls_layers(StringTransport()))
        self.assertFalse(send_ciphertext_at_once(StringTransport()))

    @defer.inlineCallbacks
    def test_in_order_and_whole_both_ways(self):
        """Small writes, 8 MiB while the reader is paused (the socket takes part, the
        rest waits in Twisted's buffer), then small writes again: all of it arrives, in
        order, both ways."""
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
            self.assertTrue(send_ciphertext_at_once(sender.transport))
            receiver.transport.pauseProducing()
            pieces = [b"a%d," % i for i in range(50)]
            pieces.append(bytes(range(256)) * (8 * 4096))
            pieces.extend(b"z%d," % i for i in range(50))
            for piece in pieces:
                sender.transport.write(piece)
            yield defer.succeed(None)
            reactor.callLater(0.2, receiver.transport.resumeProducing)
            got = yield receiver.got(sum(map(len, pieces)))
            self.assertEqual(got, b"".join(pieces))
            del receiver.received[:]
            receiver.size = 0

    def test_write_alone_encrypts_at_once(self):
        """On an idle connection a lone small write is encrypted (and, with
        send_ciphertext_at_once, sent) at once: nothing waits for the next turn."""
        send_ciphertext_at_once(self.server.transport)
        tls, tcp = tls_layers(self.server.transport)
        write_alone(self.server.transport, b"pong")
        self.assertEqual(tls._aggregator._buffer, [])
        self.assertIsNone(tls._aggregator._scheduled)
        self.assertEqual((tcp.dataBuffer, tcp._tempDataLen), (b"", 0))
        return self.client.got(4).addCallback(self.assertEqual, b"pong")

    def test_write_alone_keeps_order_in_a_busy_turn(self):
        """When the TLS layer gathers writes of this turn, a lone write joins them after
        what came first."""
        self.client.transport.write(b"first,")
        write_alone(self.client.transport, b"second")
        self.assertEqual(self.client.transport._aggregator._buffer, [b"first,", b"second"])
        return self.server.got(12).addCallback(self.assertEqual, b"first,second")


class ReleaseBuffersTests(ConnectedPair, unittest.TestCase):
    """An idle connection's TLS memory BIOs replaced by fresh ones: nothing lost, both
    ways; and the internals release_buffers uses are there."""

    def test_internals(self):
        for end in (self.server, self.client):
            connection = end.transport._tlsConnection
            for name in ("_ssl", "_into_ssl", "_from_ssl"):
                self.assertTrue(hasattr(connection, name), name)
        for name in ("BIO_new", "BIO_s_mem", "BIO_read", "BIO_write", "BIO_free", "SSL_set_bio"):
            self.assertTrue(hasattr(_lib, name), name)

    @defer.inlineCallbacks
    def test_released_and_still_working(self):
        """After bulk both ways, each end's BIOs are replaced and the connection carries
        data on, both ways."""
        big = bytes(range(256)) * 1024
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
            sender.transport.write(big)
            self.assertEqual((yield receiver.got(len(big))), big)
            del receiver.received[:]
            receiver.size = 0
        for end in (self.server, self.client):
            before = end.transport._tlsConnection._into_ssl
            self.assertTrue(release_buffers(end.transport))
            self.assertNotEqual(end.transport._tlsConnection._into_ssl, before)
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
            sender.transport.write(b"after")
            self.assertEqual((yield receiver.got(5)), b"after")
            del receiver.received[:]
            receiver.size = 0

    @defer.inlineCallbacks
    def test_bytes_waiting_are_moved(self):
        """Ciphertext still in the old BIOs (a record in the receive BIO that OpenSSL has
        not read yet) is in the new ones after the swap."""
        self.client.transport.write(b"handshake done?")
        yield self.server.got(15)  # it is, both ways
        del self.server.received[:]
        self.server.size = 0
        sender = self.client.transport._tlsConnection
        sender.send(b"waiting")
        record = sender.bio_read(65536)  # the client's record, kept from its socket
        receiving = self.server.transport
        receiving._tlsConnection.bio_write(record)
        self.assertTrue(release_buffers(receiving))
        # The client's next record arrives the usual way; OpenSSL reads the
        # waiting one first, from the new BIO.
        self.client.transport.write(b"!")
        self.assertEqual((yield self.server.got(8)), b"waiting!")

    def test_not_tls(self):
        from twisted.internet.testing import StringTransport
        self.assertFalse(release_buffers(StringTransport()))
