"""
End to end on loopback: every row of the error table (anyproxy.errors)
through both proxies, and malformed input answered correctly.
"""

import base64
import socket

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment, Echo, listen_tcp, run_curl
from tests.test_e2e_tcp import socks_connect, socks_echo, socks_error


class CountingEcho(protocol.Factory):
    protocol = Echo

    def __init__(self):
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)


def silent_port(testcase):
    """
    A loopback port whose accept queue is full, so new SYNs are dropped and a
    connect attempt times out (deterministic on Linux, no other host needed).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    testcase.addCleanup(listener.close)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
        testcase.addCleanup(s.close)
    return port


def raw_exchange(port, data, read=1024, timeout=10):
    """Send raw bytes to a proxy; return everything it answers before closing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(read)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


def socks_request(command, atyp_and_addr):
    """Greeting + user/pass + a raw request, as one byte string."""
    user, password = PROXY_USER.encode(), PROXY_PASSWORD.encode()
    return (b"\x05\x01\x02" + b"\x01" + bytes([len(user)]) + user + bytes([len(password)])
            + password + b"\x05" + bytes([command]) + b"\x00" + atyp_and_addr)


class ErrorTableTests(unittest.TestCase):
    """Each failure reaches the user as the SOCKS5 REP code and HTTP status of the table."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway()
        self.echo = CountingEcho()
        self.echo_port = listen_tcp(self, self.echo).getHost().port
        self.deployment.resolver.table["forbidden.test"] = ["127.0.0.1"]
        yield self.deployment.start_client(client={
            "forbidden_hosts": ["forbidden.test", "127.0.0.1:%d" % (self.echo_port,)],
            "connect_timeout": 1})

    def credentials(self):
        return base64.b64encode(("%s:%s" % (PROXY_USER, PROXY_PASSWORD)).encode())

    def http(self, url):
        proxy = "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                               self.deployment.http_port)
        return run_curl("-x", proxy, "-o", "/dev/null", "-w", "%{http_code}", url)

    @defer.inlineCallbacks
    def check(self, host, port, socks_code, http_status, connect=False):
        msg = yield deferToThread(socks_error, self.deployment.socks_port, host, port)
        self.assertIn("0x%02x" % (socks_code,), msg or "")
        if connect:
            out, _, _ = yield run_curl(
                "-p", "-x", "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                                          self.deployment.http_port),
                "-o", "/dev/null", "-w", "%{http_connect}", "http://%s:%d/" % (host, port))
        else:
            out, _, _ = yield self.http("http://%s:%d/" % (host, port))
        self.assertEqual(out, str(http_status).encode())

    @defer.inlineCallbacks
    def test_forbidden_by_name(self):
        """A target named in forbidden_hosts: REP 0x02 / 403, and no packet reaches it."""
        yield self.check("forbidden.test", 9, 0x02, 403)
        yield self.check("forbidden.test", 9, 0x02, 403, connect=True)

    @defer.inlineCallbacks
    def test_forbidden_by_resolved_address(self):
        """A harmless name resolving to a forbidden address:port is refused too."""
        yield self.check("target.test", self.echo_port, 0x02, 403)
        yield self.check("127.0.0.1", self.echo_port, 0x02, 403)
        self.assertEqual(self.echo.connections, 0)

    @defer.inlineCallbacks
    def test_refused(self):
        """A closed port: REP 0x05 / 502."""
        closed = listen_tcp(self, protocol.Factory.forProtocol(Echo))
        port = closed.getHost().port
        yield closed.stopListening()
        yield self.check("127.0.0.1", port, 0x05, 502)

    @defer.inlineCallbacks
    def test_unresolvable(self):
        """A name that does not resolve: REP 0x04 / 502."""
        yield self.check("nowhere.test", 80, 0x04, 502)

    @defer.inlineCallbacks
    def test_timeout(self):
        """A target that never answers the SYN: REP 0x06 / 504 after connect_timeout."""
        port = silent_port(self)
        yield self.check("127.0.0.1", port, 0x06, 504)

    @defer.inlineCallbacks
    def test_unsupported_command(self):
        """BIND gets REP 0x07, an unknown address type gets 0x08."""
        answer = yield deferToThread(raw_exchange, self.deployment.socks_port,
                                     socks_request(0x02, b"\x01\x7f\x00\x00\x01\x00\x50"))
        self.assertEqual(answer[:2], b"\x05\x02")  # method choice: user/pass
        self.assertEqual(answer[2:4], b"\x01\x00")  # auth ok
        self.assertEqual(answer[4:6], b"\x05\x07")
        answer = yield deferToThread(raw_exchange, self.deployment.socks_port,
                                     socks_request(0x01, b"\x09\x00\x50"))
        self.assertEqual(answer[4:6], b"\x05\x08")

    @defer.inlineCallbacks
    def test_malformed_socks(self):
        """Garbage instead of a SOCKS5 greeting is closed without a traceback or hang."""
        answer = yield deferToThread(raw_exchange, self.deployment.socks_port,
                                     b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(answer, b"")
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_malformed_http(self):
        """A malformed request line gets 400 and a close; origin-form gets 400."""
        answer = yield deferToThread(raw_exchange, self.deployment.http_port,
                                     b"\x00\x01garbage\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)
        answer = yield deferToThread(raw_exchange, self.deployment.http_port,
                                     b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                     b"Proxy-Authorization: Basic " + self.credentials()
                                     + b"\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_bodies_without_os_text(self):
        """A 502's body is the error table's text, for http and CONNECT: never the OS error
        the client met (e.g. '111: Connection refused'), which the gateway logs instead."""
        logged = []
        observer = lambda event: logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        closed = listen_tcp(self, protocol.Factory.forProtocol(Echo))
        port = closed.getHost().port
        yield closed.stopListening()
        proxy = "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                               self.deployment.http_port)
        for target, text in [("127.0.0.1:%d" % (port,), b"connection refused\n"),
                             ("nowhere.test:80", b"name not resolved\n")]:
            body, _, _ = yield run_curl("-x", proxy, "http://%s/" % (target,))
            self.assertEqual(body, text)
            # curl prints a CONNECT answer's head and body with --proxytunnel -v only;
            # ask the proxy directly.
            answer = yield deferToThread(
                raw_exchange, self.deployment.http_port,
                b"CONNECT " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Proxy-Authorization: Basic " + self.credentials() + b"\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 502 "), answer)
            self.assertEqual(answer.split(b"\r\n\r\n", 1)[1], text)
        self.assertTrue(any("127.0.0.1:%d" % (port,) in line and "111" in line
                            for line in logged), "the gateway logs the client's detail")

    @defer.inlineCallbacks
    def test_still_serving_after_errors(self):
        """After all the failures the same proxies still carry a good stream."""
        yield self.check("nowhere.test", 80, 0x04, 502)
        port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        got = yield deferToThread(socks_echo, self.deployment.socks_port, "localhost", port, b"ok")
        self.assertEqual(got, b"ok")


class NoTunnelTests(unittest.TestCase):
    """With no client connected, users get 'no tunnel' after a bounded wait."""

    timeout = 30

    @defer.inlineCallbacks
    def test_no_tunnel(self):
        """SOCKS5 REP 0x01 and HTTP 503 when no client serves the user's group."""
        deployment = Deployment(self)
        yield deployment.start_gateway()
        msg = yield deferToThread(socks_error, deployment.socks_port, "127.0.0.1", 80)
        self.assertIn("0x01", msg)
        proxy = "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD, deployment.http_port)
        out, _, _ = yield run_curl("-x", proxy, "-o", "/dev/null", "-w", "%{http_code}",
                                   "http://127.0.0.1:80/")
        self.assertEqual(out, b"503")


class OverloadTests(unittest.TestCase):
    """A client at max_concurrent_conns refuses further streams with 'overloaded' once its
    queue_timeout has passed."""

    timeout = 30

    @defer.inlineCallbacks
    def test_max_concurrent_conns(self):
        """Beyond the limit and its short queue wait: SOCKS5 REP 0x01 and HTTP 503; below it
        again, service resumes."""
        deployment = Deployment(self)
        yield deployment.start_gateway()
        yield deployment.start_client(client={"max_concurrent_conns": 2, "queue_timeout": 0.3})
        port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        held = yield deferToThread(lambda: [
            socks_connect(deployment.socks_port, "127.0.0.1", port) for _ in range(2)])
        msg = yield deferToThread(socks_error, deployment.socks_port, "127.0.0.1", port)
        self.assertIn("0x01", msg)
        proxy = "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD, deployment.http_port)
        out, _, _ = yield run_curl("-x", proxy, "-o", "/dev/null", "-w", "%{http_code}",
                                   "http://127.0.0.1:%d/" % (port,))
        self.assertEqual(out, b"503")
        for sock in held:
            sock.close()
        for _ in range(100):
            if deployment.clients[0].dialer.active == 0:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        got = yield deferToThread(socks_echo, deployment.socks_port, "127.0.0.1", port, b"again")
        self.assertEqual(got, b"again")
