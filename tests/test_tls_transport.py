"""
L{anyproxy.tunnel.tls_transport}: encrypted bytes sent at once, in order and
whole, over real TLS connections on loopback in both of the layouts Twisted
builds (TLS started on the TCP transport by a server endpoint, and
C{wrapClientTLS}); and the Twisted internals the module relies on.
"""

import tempfile

from OpenSSL import SSL
from twisted.internet import defer, error, reactor
from twisted.internet.task import deferLater
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial import unittest

from anyproxy.reactor_dispatch import dispatch_directly, turn_end_clock
from anyproxy.tls import client_tls_options, server_tls_options
from OpenSSL._util import ffi as _ffi, lib as _lib

from anyproxy.tunnel.tls_transport import (
    batch_records, release_buffers, send_ciphertext_at_once, tls_layers, write_alone)
from tests.support import TestPKI


class Collect(Protocol):
    """Keeps what it receives; C{got(n)} fires once C{n} bytes are in."""

    def __init__(self):
        self.received = []
        self.size = 0
        self._waiting = []
        self.connected_d = defer.Deferred()
        self.lost_d = defer.Deferred()

    def connectionMade(self):
        self.connected_d.callback(self)

    def connectionLost(self, reason):
        self.lost_d.callback([reason])  # a Failure as the result would be an error

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

    @defer.inlineCallbacks
    def carried(self, sender, receiver, data):
        """Write C{data} from C{sender}, check that C{receiver} gets it all, and forget it."""
        sender.transport.write(data)
        self.assertEqual((yield receiver.got(len(data))), data)
        del receiver.received[:]
        receiver.size = 0

    @defer.inlineCallbacks
    def paused_bulk_both_ways(self):
        """Each way: small writes, 8 MiB while the reader is paused, small writes again;
        check that all of it arrives, in order."""
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
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

    def test_in_order_and_whole_both_ways(self):
        """Small writes, 8 MiB while the reader is paused (the socket takes part, the
        rest waits in Twisted's buffer), then small writes again: all of it arrives, in
        order, both ways."""
        for end in (self.client, self.server):
            self.assertTrue(send_ciphertext_at_once(end.transport))
        return self.paused_bulk_both_ways()

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


class BatchRecordsTests(ConnectedPair, unittest.TestCase):
    """
    batch_records: records encrypted and decrypted in batches, bytes whole and
    in order both ways, and the TLS layer's own handling of what is not data
    (a close_notify, a forged record) unchanged.
    """

    def test_internals(self):
        for end in (self.server, self.client):
            for name in ("_write", "_flushSendBIO", "_flushReceiveBIO", "_handshakeDone",
                         "_lostTLSConnection", "_aborted", "_tlsConnection"):
                self.assertTrue(hasattr(end.transport, name), name)
        for name in ("SSL_read", "SSL_write", "SSL_get_error", "SSL_ERROR_WANT_READ",
                     "BIO_get_mem_data", "BIO_read"):
            self.assertTrue(hasattr(_lib, name), name)

    def test_not_tls(self):
        from twisted.internet.testing import StringTransport
        self.assertFalse(batch_records(StringTransport()))

    def test_nothing_per_connection(self):
        """The TLS protocol's class is swapped for a batched subclass, made once per
        class; nothing is added to the connection itself, and twice is once."""
        tls = self.server.transport
        original, attributes = type(tls), set(vars(tls))
        self.assertTrue(batch_records(tls))
        batched = type(tls)
        self.assertTrue(issubclass(batched, original))
        self.assertTrue(batch_records(tls))
        self.assertIs(type(tls), batched)
        self.assertEqual(set(vars(tls)), attributes)
        if type(self.client.transport) is original:
            batch_records(self.client.transport)
            self.assertIs(type(self.client.transport), batched)

    def test_turn_gathered_by_a_turn_end_call(self):
        """
        Under a reactor dispatch_directly patched, the TLS layer's gathering of
        a turn's writes is scheduled as a turn-end call, not a reactor timer;
        under any other its clock stays the reactor.
        """
        tls = self.server.transport
        self.assertTrue(batch_records(tls))
        self.assertIs(tls._aggregator._clock, reactor)  # trial's reactor is not patched
        patched = EPollReactor()
        self.addCleanup(patched._poller.close)
        self.addCleanup(patched.waker.connectionLost, None)
        self.assertTrue(dispatch_directly(patched))
        tls._aggregator._clock = patched
        self.assertTrue(batch_records(tls))
        self.assertIs(tls._aggregator._clock, turn_end_clock(patched))
        self.assertIsNot(turn_end_clock(patched), patched)
        tls._aggregator._clock = reactor

    def _batch_both(self):
        for end in (self.server, self.client):
            self.assertTrue(send_ciphertext_at_once(end.transport))
            self.assertTrue(batch_records(end.transport))

    def test_in_order_and_whole_both_ways(self):
        """Small writes, 8 MiB while the reader is paused, then small writes again:
        all of it arrives, in order, both ways."""
        self._batch_both()
        return self.paused_bulk_both_ways()

    @defer.inlineCallbacks
    def test_records_of_a_read_delivered_once(self):
        """256 KiB written while the reader is paused is 16 records; the reader gets
        them in a few deliveries (one a TCP read), not one per record."""
        self._batch_both()
        self.server.transport.pauseProducing()
        big = bytes(range(256)) * 1024
        self.client.transport.write(big)
        yield deferLater(reactor, 0.2, lambda: None)
        self.server.transport.resumeProducing()
        self.assertEqual((yield self.server.got(len(big))), big)
        self.assertLess(len(self.server.received), len(big) // (16 * 1024) // 2,
                        [len(piece) for piece in self.server.received])

    @defer.inlineCallbacks
    def test_write_sends_each_step_at_once(self):
        """A large write leaves nothing in the TLS layer: its ciphertext is in the
        socket or the TCP transport's buffer when the write returns."""
        self._batch_both()
        tls, tcp = tls_layers(self.client.transport)
        yield self.server.got(0)
        tls._write(bytes(300 * 1024))
        self.assertEqual(_lib.BIO_get_mem_data(tls._tlsConnection._from_ssl,
                                               _ffi.new("char **")), 0)
        yield self.server.got(300 * 1024)

    @defer.inlineCallbacks
    def test_write_joined(self):
        """A header and a payload written apart arrive as one run of bytes; behind a
        small write of this turn (waiting in Twisted's aggregator) they keep their
        place."""
        self._batch_both()
        tls = self.client.transport
        body = bytes(range(256)) * 400
        tls.write_joined(b"head1", body)
        self.assertEqual(tls._aggregator._buffer, [])
        tls.write(b"small")
        tls.write_joined(b"head2", body[:1000])
        self.assertEqual(tls._aggregator._buffer, [b"small", b"head2" + body[:1000]])
        tls.write_joined(b"head3", body)  # joined behind them: the aggregator flushes
        self.assertEqual(tls._aggregator._buffer, [])
        expected = b"head1" + body + b"small" + b"head2" + body[:1000] + b"head3" + body
        self.assertEqual((yield self.server.got(len(expected))), expected)

    @defer.inlineCallbacks
    def test_close_notify_is_a_clean_close(self):
        """Data then the peer's close_notify: the data arrives whole and the
        connection ends cleanly (Twisted's handling of the closing alert)."""
        self._batch_both()
        self.client.transport.write(b"last words" * 1000)
        self.client.transport.loseConnection()
        [reason] = yield self.server.lost_d
        self.assertEqual(b"".join(self.server.received), b"last words" * 1000)
        self.assertTrue(reason.check(error.ConnectionDone), reason)

    @defer.inlineCallbacks
    def test_forged_record_fails_the_connection(self):
        """A record that does not decrypt (garbage in the application-data
        framing): data before it is delivered, then the connection is lost
        with OpenSSL's error; nothing is raised into the reactor."""
        self._batch_both()
        self.client.transport.write(b"before")
        yield self.server.got(6)
        self.server.transport.dataReceived(b"\x17\x03\x03\x00\x40" + bytes(range(64)))
        [reason] = yield self.server.lost_d
        self.assertTrue(reason.check(SSL.Error), reason)
        self.assertEqual(b"".join(self.server.received), b"before")

    @defer.inlineCallbacks
    def test_error_queue_empty_while_data_goes_up(self):
        """Data and a forged record in one read: while the data is handed up, this
        thread's OpenSSL error queue is already empty (the failure is taken out of it
        first), and the connection is lost with that failure."""
        self._batch_both()
        self.client.transport.write(b"x")
        yield self.server.got(1)
        queue_seen = []
        collect = self.server.dataReceived
        self.server.dataReceived = lambda data: (queue_seen.append(_lib.ERR_peek_error()),
                                                 collect(data))
        sender = self.client.transport._tlsConnection
        sender.send(b"before")
        record = sender.bio_read(65536)
        self.server.transport.dataReceived(record + b"\x17\x03\x03\x00\x40" + bytes(range(64)))
        [reason] = yield self.server.lost_d
        self.assertEqual(queue_seen, [0])
        self.assertTrue(reason.check(SSL.Error), reason)
        self.assertEqual(b"".join(self.server.received), b"xbefore")

    @defer.inlineCallbacks
    def test_released_buffers_still_used(self):
        """After release_buffers replaced the BIOs, batched reads and writes use the new
        ones."""
        self._batch_both()
        big = bytes(range(256)) * 1024
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
            yield self.carried(sender, receiver, big)
            self.assertTrue(release_buffers(sender.transport))
            self.assertTrue(release_buffers(receiver.transport))
            yield self.carried(sender, receiver, big)


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
            yield self.carried(sender, receiver, big)
        for end in (self.server, self.client):
            before = end.transport._tlsConnection._into_ssl
            self.assertTrue(release_buffers(end.transport))
            self.assertNotEqual(end.transport._tlsConnection._into_ssl, before)
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
            yield self.carried(sender, receiver, b"after")

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
