"""
Tests for L{anyproxy.operator_site}, the site under the status page and the
C{/metrics} pages: real loopback connections (raw bytes, as a slow or
hostile client sends them) against sites whose timers run on a C{Clock}, so
the deadlines are exact and nothing waits for real time.
"""

import base64

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from anyproxy.gateway.tunnel_pool import TunnelPool
from anyproxy.gateway.status.api import status_site
from anyproxy import metrics
from anyproxy.metrics import GatewayMetrics, metrics_site
from anyproxy.operator_site import ABORT_GRACE, MAX_BODY, OperatorSite, local_host_header
from tests.support import run_curl

USER = "operator"
PASSWORD = "s3cret-operator-pw"


def basic(username, password):
    return b"Basic " + base64.b64encode(("%s:%s" % (username, password)).encode())


class RawClient(Protocol):
    """A client that writes what the test says and keeps all it receives."""

    def __init__(self):
        self.data = b""
        self.lost = False
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True
        self.closed.callback(None)

    @property
    def status(self):
        """The status code of the first answer received, or C{None}."""
        parts = self.data.split(b" ", 2)
        return int(parts[1]) if len(parts) > 2 and parts[0].startswith(b"HTTP/") else None


@defer.inlineCallbacks
def connect_raw(testcase, port):
    """A L{RawClient} connected to loopback C{port}; aborted at cleanup if still open."""
    client = RawClient()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)

    def cleanup():
        if not client.lost:
            client.transport.abortConnection()
        return client.closed

    testcase.addCleanup(cleanup)
    return client


@defer.inlineCallbacks
def wait_until(predicate, timeout=10.0):
    """Let the reactor run until C{predicate()} (real time, bounded)."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        yield task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not met in %ss" % (timeout,))


class _SiteTestCase(unittest.TestCase):
    """Listens with a site on 127.0.0.1:0 and records the channels it builds."""

    timeout = 30

    def listen(self, site):
        self.site = site
        self.channels = []
        build = site.buildProtocol

        def record(addr):
            protocol = build(addr)
            self.channels.append(protocol)
            return protocol

        site.buildProtocol = record
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def connect(self):
        return connect_raw(self, self.port)

    @defer.inlineCallbacks
    def request(self, head, auth=(USER, PASSWORD)):
        """Send one request with C{Connection: close}; the client once the server closed."""
        client = yield self.connect()
        lines = [head, b"Host: 127.0.0.1", b"Connection: close"]
        if auth is not None:
            lines.append(b"Authorization: " + basic(*auth))
        client.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        yield client.closed
        return client


class DeadlineTests(_SiteTestCase):
    """A request must arrive whole by a deadline that bytes trickling in do not extend."""

    def setUp(self):
        self.clock = Clock()
        self.listen(status_site(TunnelPool(self.clock), USER, PASSWORD, reactor=self.clock,
                                request_timeout=10))

    @defer.inlineCallbacks
    def test_trickled_head(self):
        """One byte a second keeps no connection past the deadline: 408, then closed."""
        client = yield self.connect()
        yield wait_until(lambda: self.channels)
        channel = self.channels[0]
        head = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        for sent in range(1, 10):
            client.transport.write(head[sent - 1:sent])
            yield wait_until(lambda: channel.request_bytes == sent)
            self.clock.advance(1)
        self.assertFalse(client.lost)
        self.clock.advance(1)  # 10 s since the connection was made
        yield client.closed
        self.assertEqual(client.status, 408)

    @defer.inlineCallbacks
    def test_idle_keep_alive(self):
        """After an answer the next request has the same deadline; an idle connection is
        then closed without a 408."""
        client = yield self.connect()
        client.transport.write(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Authorization: " + basic(USER, PASSWORD) + b"\r\n\r\n")
        yield wait_until(lambda: client.data.endswith(b"}"))
        self.assertEqual(client.status, 200)
        self.clock.advance(9.9)
        self.assertFalse(client.lost)
        answered = client.data
        self.clock.advance(0.2)
        yield client.closed
        self.assertEqual(client.data, answered)

    @defer.inlineCallbacks
    def test_slow_body(self):
        """A body gets the deadline again from the end of its head, not more."""
        client = yield self.connect()
        yield wait_until(lambda: self.channels)
        self.clock.advance(5)
        client.transport.write(b"POST /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Length: 10\r\n\r\n12345")
        yield wait_until(lambda: self.channels[0].request_bytes > 50)
        self.clock.advance(9.9)
        self.assertFalse(client.lost)
        self.clock.advance(0.2)
        yield client.closed
        self.assertEqual(client.status, 408)

    @defer.inlineCallbacks
    def test_body_too_large(self):
        """A body declared larger than MAX_BODY gets 413 at once."""
        client = yield self.request(b"POST /api/status HTTP/1.1\r\nContent-Length: %d"
                                    % (MAX_BODY + 1,))
        self.assertEqual(client.status, 413)

    @defer.inlineCallbacks
    def test_chunked_body_too_large(self):
        """A chunked body is cut off with 413 once past MAX_BODY."""
        client = yield self.connect()
        client.transport.write(b"POST /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (4096, b"x" * 4096)
        for _ in range(MAX_BODY // 4096 + 2):
            if client.lost:
                break
            client.transport.write(chunk)
        yield client.closed
        self.assertEqual(client.status, 413)

    def test_not_reading_is_aborted(self):
        """A client that does not read what we last wrote is cut off ABORT_GRACE later."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertFalse(transport.disconnected)
        self.clock.advance(ABORT_GRACE)
        self.assertTrue(transport.disconnected)  # StringTransport's mark of abortConnection


class SiteCapTests(_SiteTestCase):
    """Beyond its cap a site answers 503 and closes, and logs that once per burst."""

    def setUp(self):
        self.clock = Clock()
        gateway_metrics = GatewayMetrics(TunnelPool(self.clock), self.clock)
        self.listen(metrics_site(gateway_metrics.registry, self.clock, max_connections=2))
        self.warnings = []

        def observe(event):
            if event.get("log_level") is LogLevel.warn and event.get("what") == \
                    "metrics (open connections)":
                self.warnings.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    @defer.inlineCallbacks
    def test_cap(self):
        """Two idle connections fill the cap; the next get 503; a freed place is taken again."""
        first = yield self.connect()
        yield self.connect()
        yield wait_until(lambda: self.site.connections.count == 2)
        for _ in range(3):
            refused = yield self.connect()
            yield refused.closed
            self.assertEqual(refused.status, 503)
        self.assertEqual(len(self.warnings), 1)
        first.transport.loseConnection()
        yield wait_until(lambda: self.site.connections.count == 1)
        client = yield self.request(b"GET /metrics HTTP/1.1")
        self.assertEqual(client.status, 200)
        self.assertIn(b"process_open_fds", client.data)
        self.assertEqual(self.site.connections.refused, 3)


class LoginTests(_SiteTestCase):
    """The optional Basic login, replaced while running."""

    @defer.inlineCallbacks
    def test_metrics_login(self):
        """With a login a scrape needs it; set_login changes or removes it at once."""
        clock = Clock()
        site = metrics_site(GatewayMetrics(TunnelPool(clock), clock).registry, clock,
                            USER, PASSWORD)
        self.listen(site)
        statuses = []
        for auth in (None, (USER, "wrong"), (USER, PASSWORD)):
            client = yield self.request(b"GET /metrics HTTP/1.1", auth=auth)
            statuses.append(client.status)
        self.assertEqual(statuses, [401, 401, 200])
        site.set_login(USER, "new-pw")
        client = yield self.request(b"GET /metrics HTTP/1.1")
        self.assertEqual(client.status, 401)
        site.set_login("", "")
        client = yield self.request(b"GET /metrics HTTP/1.1", auth=None)
        self.assertEqual(client.status, 200)

    def test_defaults(self):
        """Both pages are OperatorSites with their own caps and the default deadline."""
        clock = Clock()
        status = status_site(TunnelPool(clock), USER, PASSWORD, reactor=clock)
        scrape = metrics_site(GatewayMetrics(TunnelPool(clock), clock).registry, clock)
        self.assertIsInstance(status, OperatorSite)
        self.assertIsInstance(scrape, OperatorSite)
        self.assertEqual((status.connections.limit, scrape.connections.limit),
                         (64, metrics.MAX_CONNECTIONS))
        self.assertEqual((status.request_timeout, scrape.request_timeout), (10.0, 10.0))
        self.assertIs(scrape.resource, scrape.tree)  # no login: no guard


class HostTests(_SiteTestCase):
    """
    A site without a login answers only to an IP address or localhost in
    Host (DNS rebinding); every answer keeps private and names no server.
    """

    def setUp(self):
        clock = Clock()
        self.listen(metrics_site(GatewayMetrics(TunnelPool(clock), clock).registry, clock))

    def curl(self, *args):
        return run_curl("-o", "/dev/null", "-D", "-", *args)

    @defer.inlineCallbacks
    def test_rebinding_name_refused(self):
        """curl with a borrowed name in Host: 421; with an address or localhost: 200."""
        url = "http://127.0.0.1:%d/metrics" % (self.port,)
        answers = {}
        for host in ("rebind.attacker.example:%d" % (self.port,), "attacker.example",
                     "127.0.0.1:%d" % (self.port,), "localhost:%d" % (self.port,), "[::1]",
                     "metrics.localhost"):
            out, err, code = yield self.curl("-H", "Host: " + host, url)
            self.assertEqual(code, 0, err)
            answers[host] = int(out.split(b" ", 2)[1])
        self.assertEqual(list(answers.values()), [421, 421, 200, 200, 200, 200], answers)

    @defer.inlineCallbacks
    def test_no_host_served(self):
        """HTTP/1.0 without Host (a health checker's): served."""
        client = yield self.connect()
        client.transport.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        yield client.closed
        self.assertEqual(client.status, 200)

    @defer.inlineCallbacks
    def test_login_serves_any_host(self):
        """With a login the name does not matter: the login protects the page."""
        self.site.set_login(USER, PASSWORD)
        out, err, code = yield self.curl("-H", "Host: metrics.example", "-u",
                                         "%s:%s" % (USER, PASSWORD),
                                         "http://127.0.0.1:%d/metrics" % (self.port,))
        self.assertEqual(int(out.split(b" ", 2)[1]), 200, out)

    @defer.inlineCallbacks
    def test_private_headers(self):
        """/metrics, its 401 and the 421 are not cached or sniffed and name no server."""
        url = "http://127.0.0.1:%d/metrics" % (self.port,)
        heads = [(yield self.curl(url))[0]]
        heads.append((yield self.curl("-H", "Host: attacker.example", url))[0])
        # Twisted's own answers: no such page, a method no page takes.
        heads.append((yield self.curl("http://127.0.0.1:%d/nothing-here" % (self.port,)))[0])
        heads.append((yield self.curl("-X", "BREW", url))[0])
        self.site.set_login(USER, PASSWORD)
        heads.append((yield self.curl(url))[0])
        for head in heads:
            lower = head.lower()
            self.assertIn(b"cache-control: no-store", lower)
            self.assertIn(b"x-content-type-options: nosniff", lower)
            self.assertIn(b"x-frame-options: deny", lower)
            self.assertNotIn(b"server:", lower)
            self.assertNotIn(b"twisted", lower)

    def test_local_host_header(self):
        """Which Host values name an address or localhost."""
        for value, local in ((None, True), (b"127.0.0.1", True), (b"127.0.0.1:9100", True),
                             (b"[::1]:9100", True), (b"[::1]", True), (b"LOCALHOST.", True),
                             (b"a.localhost:1", True), (b"10.1.2.3", True), (b"[fe80::1", False),
                             (b"example.com", False), (b"localhost.example", False),
                             (b"127.0.0.1.nip.io", False), (b"", False), (b"::1", False)):
            self.assertEqual(local_host_header(value), local, value)


class UnauthorizedTests(_SiteTestCase):
    """A connection that never logs in cannot keep its place by asking again and again."""

    def setUp(self):
        self.clock = Clock()
        self.listen(status_site(TunnelPool(self.clock), USER, PASSWORD, reactor=self.clock,
                                request_timeout=10))

    @defer.inlineCallbacks
    def test_third_401_closes(self):
        """Keep-alive requests without the login: the third 401 says Connection: close, and closes."""
        client = yield self.connect()
        request = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for answers in (1, 2):
            client.transport.write(request)
            yield wait_until(lambda: client.data.count(b"HTTP/1.1 401") == answers)
            self.assertFalse(client.lost)
        client.transport.write(request)
        yield client.closed
        self.assertEqual(client.data.count(b"HTTP/1.1 401"), 3)
        self.assertIn(b"connection: close", client.data.split(b"HTTP/1.1 401")[3].lower())

    def test_answer_after_the_peer_left(self):
        """A delayed 401 rendered once the peer has gone (no channel) is no error."""
        from twisted.web.test.requesthelper import DummyRequest
        from anyproxy.operator_site import _Unauthorized, _SourcedBasicCredentials
        request = DummyRequest([b"api", b"status"])
        request.path = b"/api/status"
        request.channel = None
        _Unauthorized([_SourcedBasicCredentials("realm")]).render(request)
        self.assertEqual(request.responseCode, 401)
