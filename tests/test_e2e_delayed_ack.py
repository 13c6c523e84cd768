"""
No delayed-ACK stalls (issue "Interactive speed", part 1), end to end through
a gateway and client in this process.

A peer with Nagle on that writes twice (Python's C{http.server} sends a
response's head, then its body) holds the second write until its first is
ACKed.  On a connection that carries requests and answers (a reused upstream
connection, a kept-alive user), Linux delays that ACK by 40 ms or more unless
the reader re-arms C{TCP_QUICKACK} (L{anyproxy.tuning.quick_acker}); without
it every such request took about 44 ms here, with it about 2 ms.

The users run in threads with blocking sockets and time themselves, so the
reactor (gateway and client) is free meanwhile.  The checks are medians of 20
requests against a bound of half a delayed-ACK period (20 ms, where the stall
is at least 40 ms): a loaded machine slows some requests, not half of them by
20 ms.
"""

import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment, basic_token

REQUESTS = 20
BOUND = 0.020  # seconds; a delayed ACK on Linux is at least 40 ms
BODY = b"hello from a two-send origin\n"


class TwoSendHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: the head and the body in two sends, Nagle on."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()  # the first send
        self.wfile.write(BODY)  # the second

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.do_GET()

    def log_message(self, *args):
        pass


def read_response(sock):
    """Read one answer with BODY from a blocking socket."""
    data = b""
    while not data.endswith(BODY):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed after %r" % (data,))
        data += chunk
    if not data.startswith(b"HTTP/1.1 200 "):
        raise AssertionError(data)


class DelayedAckTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        if not hasattr(socket, "TCP_QUICKACK"):
            raise unittest.SkipTest("TCP_QUICKACK is Linux-only")
        self.origin = ThreadingHTTPServer(("127.0.0.1", 0), TwoSendHandler)
        self.origin.daemon_threads = True
        thread = threading.Thread(target=self.origin.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(self.origin.server_close)
        self.addCleanup(self.origin.shutdown)
        self.target = "127.0.0.1:%d" % (self.origin.server_address[1],)
        self.deployment = Deployment(self)
        self.gateway = yield self.deployment.start_gateway()
        yield self.deployment.start_client()
        self.head = ("%%s http://%s/ HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n"
                     % (self.target, self.target, basic_token(PROXY_USER, PROXY_PASSWORD)))

    def proxy(self):
        return socket.create_connection(("127.0.0.1", self.deployment.http_port), timeout=10)

    def assertNotStalled(self, seconds):
        median = statistics.median(seconds)
        self.assertLess(median, BOUND, "median %.1f ms of %s" % (
            median * 1000, ["%.1f" % (s * 1000,) for s in seconds]))

    def reused_upstream(self):
        # A new user connection per request (hey -disable-keepalive): the
        # upstream connection is the one the pool keeps.
        head = (self.head % ("GET",) + "Connection: close\r\n\r\n").encode("ascii")
        seconds = []
        for _ in range(REQUESTS + 1):
            start = time.perf_counter()
            with self.proxy() as sock:
                sock.sendall(head)
                read_response(sock)
            seconds.append(time.perf_counter() - start)
        return seconds[1:]  # the first opens the upstream connection

    @defer.inlineCallbacks
    def test_reused_upstream_connection(self):
        """A request on a reused upstream connection does not wait for a delayed ACK."""
        seconds = yield threads.deferToThread(self.reused_upstream)
        metric = self.gateway.metrics.registry.get_sample_value
        self.assertEqual(metric("anyproxy_gateway_http_upstream_reuses_total",
                                {"frontend": "http proxy"}), REQUESTS)
        self.assertNotStalled(seconds)

    def kept_alive_user(self):
        # One user connection, Nagle on, each POST's head and body in two sends.
        head = (self.head % ("POST",) + "Content-Length: 5\r\n\r\n").encode("ascii")
        seconds = []
        with self.proxy() as sock:
            for _ in range(REQUESTS + 1):
                start = time.perf_counter()
                sock.sendall(head)
                sock.sendall(b"hello")
                read_response(sock)
                seconds.append(time.perf_counter() - start)
        return seconds[1:]

    @defer.inlineCallbacks
    def test_kept_alive_user(self):
        """A kept-alive user's second send does not wait for the gateway's delayed ACK."""
        seconds = yield threads.deferToThread(self.kept_alive_user)
        self.assertNotStalled(seconds)
