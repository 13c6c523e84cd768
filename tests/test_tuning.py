"""Tests for L{anyproxy.tuning}."""

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
