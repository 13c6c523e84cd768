"""Tests for L{anyproxy.tuning}."""

import errno

from hypothesis import given, strategies as st
from twisted.internet import main
from twisted.trial import unittest

from anyproxy import tuning


class FakeLibc:
    """Records mallopt calls."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


class FakeTCP:
    bufferSize = 65536
    SEND_LIMIT = 128 * 1024


class FakeTLS:
    def __init__(self, below):
        self.transport = below


class TuningTests(unittest.TestCase):
    """Bulk read and send sizes and the malloc thresholds."""

    def test_tune_for_bulk(self):
        """
        A TCP transport reads READ_SIZE and sends up to WRITE_SIZE at a time;
        under TLS the TCP transport is tuned.  Other transports keep theirs.
        """
        tcp = FakeTCP()
        tuning.tune_for_bulk(tcp)
        self.assertEqual((tcp.bufferSize, tcp.SEND_LIMIT), (tuning.READ_SIZE, tuning.WRITE_SIZE))
        below = FakeTCP()
        tuning.tune_for_bulk(FakeTLS(below))
        self.assertEqual((below.bufferSize, below.SEND_LIMIT),
                         (tuning.READ_SIZE, tuning.WRITE_SIZE))
        self.assertEqual(FakeTCP.SEND_LIMIT, 128 * 1024)

    def test_read_size_within_window(self):
        """
        A stalled user costs a window plus up to one read size (the write
        high-water mark): reads stay well under a window, so that this is
        about one window and one read never takes a whole window's credit.
        """
        from anyproxy.tunnel.stream import DEFAULT_WINDOW
        self.assertLessEqual(tuning.READ_SIZE, 3 * DEFAULT_WINDOW // 8)

    def test_real_tcp_transport(self):
        """Twisted's TCP transports take both settings per connection."""
        from twisted.internet import tcp
        self.assertTrue(hasattr(tcp.Connection, "SEND_LIMIT"))
        self.assertTrue(hasattr(tcp.Connection, "bufferSize"))

    def test_no_buffer_size(self):
        """A transport without a read size (a tunnel stream) is left alone."""
        transport = object()
        tuning.tune_for_bulk(transport)

    def test_tune_malloc(self):
        """
        Both glibc thresholds are raised: the mmap threshold alone would make
        every freed large buffer trim the heap, and the next read fault its
        pages back in (about 20,000 page faults per GB relayed, measured).
        """
        libc = FakeLibc()
        self.patch(tuning, "_tuned", False)
        self.patch(tuning.ctypes, "CDLL", lambda name: libc)
        self.assertTrue(tuning.tune_malloc())
        self.assertEqual(libc.calls, [(-3, tuning.MMAP_THRESHOLD), (-1, tuning.TRIM_THRESHOLD)])
        self.assertTrue(tuning.tune_malloc())  # once is enough
        self.assertEqual(len(libc.calls), 2)


class NoDelayTests(unittest.TestCase):
    """Nagle's algorithm is turned off where we ask."""

    def test_set_no_delay(self):
        """setTcpNoDelay(True) is called on the TCP transport, also under TLS."""
        calls = []

        class TCP:
            def setTcpNoDelay(self, enabled):
                calls.append(enabled)

        tuning.set_no_delay(TCP())
        tuning.set_no_delay(FakeTLS(TCP()))
        tuning.set_no_delay(object())  # no such option: ignored
        self.assertEqual(calls, [True, True])

    def test_quick_acker(self):
        """
        A TCP socket gets a callable re-arming TCP_QUICKACK (Linux); a
        transport without a socket (a tunnel stream) gets None.
        """
        import socket
        self.assertIsNone(tuning.quick_acker(FakeTCP()))
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sock = socket.create_connection(listener.getsockname())
        self.addCleanup(sock.close)

        class Transport:
            def getHandle(self):
                return sock

        rearm = tuning.quick_acker(Transport())
        if not hasattr(socket, "TCP_QUICKACK"):
            self.assertIsNone(rearm)
            return
        rearm()
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK), 1)
        sock.close()
        rearm()  # a closed socket: no error


class _FullSocket:
    """
    A socket whose sendmsg and send take what C{takes} allows, one figure
    per call (0: the buffer is full), and everything once they are used up.
    """

    def __init__(self, takes):
        self._takes = iter(takes)
        self.sent = bytearray()
        self.calls = []

    def sendmsg(self, buffers):
        self.calls.append(len(buffers))
        data = b"".join(bytes(each) for each in buffers)
        take = next(self._takes, len(data))
        if take == 0 and data:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.sent += data[:take]
        return min(take, len(data))

    def send(self, data):
        take = next(self._takes, len(data))
        if take == 0 and data:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.sent += data[:take]
        return min(take, len(data))


def _gathering_transport(sock, send_limit=tuning.WRITE_SIZE):
    from twisted.internet import abstract
    from twisted.internet.testing import MemoryReactor

    class Transport(abstract.FileDescriptor):
        SEND_LIMIT = send_limit

        def writeSomeData(self, data):  # as Twisted's TCP transport does
            try:
                return sock.send(data)
            except BlockingIOError:
                return 0

    transport = Transport(reactor=MemoryReactor())
    transport.socket = sock
    transport.connected = True
    tuning.mix_in(transport, tuning.GatherWrites, "Gather")
    return transport


class GatherWritesTests(unittest.TestCase):
    """What waits in a TCP transport's buffer goes out with one sendmsg, in order."""

    def test_installed_on_tcp(self):
        """tune_for_bulk gives a real TCP transport the gathering doWrite, once."""
        import socket
        from twisted.internet import tcp
        a, b = socket.socketpair()
        self.addCleanup(b.close)

        class Server(tcp.Connection):
            pass

        from twisted.internet import reactor
        transport = Server(a, None, reactor)
        self.addCleanup(a.close)
        tuning.tune_for_bulk(transport)
        tuning.tune_for_bulk(transport)
        self.assertIsInstance(transport, tuning.GatherWrites)
        self.assertIs(type(transport).__mro__[1], tuning.GatherWrites)
        self.assertIs(type(transport).__mro__[2], Server)

    @given(pieces=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=40),
           takes=st.lists(st.integers(min_value=0, max_value=64) | st.integers(min_value=0, max_value=9000),
                          max_size=30),
           send_limit=st.sampled_from([1, 2048, tuning.WRITE_SIZE]))
    def test_sends_everything_in_order(self, pieces, takes, send_limit):
        """
        Whatever the socket takes each time, the bytes go out in the order
        written, what waits is counted as Twisted counts it (dataBuffer from
        offset, then _tempDataLen), and once all is out the transport stops
        watching for writes.
        """
        sock = _FullSocket(takes)
        transport = _gathering_transport(sock, send_limit)
        expected = b"".join(pieces)
        for piece in pieces:
            transport.write(piece)
        for _ in range(len(takes) + len(pieces) + 2):
            if transport not in transport.reactor.getWriters():
                break
            self.assertIsNone(transport.doWrite())
            waiting = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            self.assertEqual(waiting, len(expected) - len(sock.sent))
            self.assertLessEqual(max(sock.calls, default=0), tuning.GATHER_MAX)
        self.assertEqual(bytes(sock.sent), expected)
        self.assertNotIn(transport, transport.reactor.getWriters())
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer, transport._tempDataLen),
                         (b"", [], 0))

    def test_head_taken_in_parts(self):
        """
        A piece the socket took part of, then less than its rest: the next
        send starts where the socket stopped.
        """
        sock = _FullSocket([150, 20, 0])
        transport = _gathering_transport(sock)
        for piece in (b"a" * 100, b"b" * 100, b"c" * 100):
            transport.write(piece)
        for _ in range(4):
            transport.doWrite()
        self.assertEqual(bytes(sock.sent), b"a" * 100 + b"b" * 100 + b"c" * 100)
        self.assertEqual(sock.calls, [3, 2, 2, 2])

    def test_one_piece_sent_by_twisted(self):
        """A lone waiting piece goes out as Twisted sends it: one send, no sendmsg."""
        sock = _FullSocket([])
        transport = _gathering_transport(sock)
        transport.write(b"one")
        self.assertIsNone(transport.doWrite())
        self.assertEqual((sock.calls, bytes(sock.sent)), ([], b"one"))
        self.assertNotIn(transport, transport.reactor.getWriters())

    def test_one_sendmsg_for_many_pieces(self):
        """Pieces that waited go out in one call, not joined first."""
        sock = _FullSocket([])
        transport = _gathering_transport(sock)
        for index in range(10):
            transport.write(b"%d" % index * 100)
        transport.doWrite()
        self.assertEqual(sock.calls, [10])

    def test_producer_resumed_and_close_after_drain(self):
        """
        A producer paused by a full buffer is resumed once all is out, and a
        loseConnection asked meanwhile happens then: Twisted's doWrite still
        does what follows the last send.
        """
        from twisted.internet.interfaces import IPushProducer
        from zope.interface import implementer

        @implementer(IPushProducer)
        class Producer:
            paused = False

            def pauseProducing(self):
                self.paused = True

            def resumeProducing(self):
                self.paused = False

            def stopProducing(self):
                pass

        sock = _FullSocket([0, 10])
        transport = _gathering_transport(sock)
        transport.bufferSize = 100
        producer = Producer()
        transport.registerProducer(producer, True)
        transport.write(b"x" * 150)
        self.assertTrue(producer.paused)
        transport.doWrite()  # full
        transport.doWrite()  # 10 bytes
        self.assertTrue(producer.paused)
        transport.doWrite()  # the rest
        self.assertFalse(producer.paused)
        self.assertEqual(bytes(sock.sent), b"x" * 150)
        transport.unregisterProducer()
        closed = []
        transport._postLoseConnection = lambda: closed.append(True) or main.CONNECTION_DONE
        transport.write(b"a")
        transport.write(b"b")
        transport.loseConnection()
        self.assertIs(transport.doWrite(), main.CONNECTION_DONE)
        self.assertEqual(closed, [True])
        self.assertEqual(bytes(sock.sent), b"x" * 150 + b"ab")

    def test_error_is_connection_lost(self):
        """A send error other than a full buffer loses the connection, as in Twisted."""
        class Broken:
            def sendmsg(self, buffers):
                raise ConnectionResetError(errno.ECONNRESET, "reset")

        transport = _gathering_transport(Broken())
        transport.write(b"a")
        transport.write(b"b")
        self.assertIs(transport.doWrite(), main.CONNECTION_LOST)
