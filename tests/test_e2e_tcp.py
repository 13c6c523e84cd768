"""
End to end on loopback: real gateway and client services in this process,
real proxy clients (PySocks, curl), real target servers.
"""

import hashlib
import json
import socket

import socks
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.threads import deferToThread
from twisted.logger import eventAsJSON, globalLogPublisher
from twisted.trial import unittest
from twisted.web import server

from tests.support import (
    CLIENT_PASSWORD, PROXY_PASSWORD, PROXY_USER, AnswerAfterEOF, BlobResource, Deployment,
    Echo, blob, listen_tcp, run_curl, web_site)

MB = 1024 * 1024


def socks_connect(proxy_port, host, port, username=PROXY_USER, password=PROXY_PASSWORD,
                  timeout=20):
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, rdns=True,
                   username=username, password=password)
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def recv_all(sock):
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def socks_echo(proxy_port, host, port, payload):
    """Send C{payload} through SOCKS5 to an echo server, half-close, read it back."""
    sock = socks_connect(proxy_port, host, port)
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)
    finally:
        sock.close()


def socks_error(proxy_port, host, port, **kwargs):
    """The SOCKS5 error a CONNECT gets, as PySocks reports it (or None)."""
    try:
        socks_connect(proxy_port, host, port, **kwargs).close()
    except socks.ProxyError as e:
        return e.msg
    return None


class _Base(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway()
        yield self.deployment.start_client()
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.web_port = listen_tcp(self, web_site()).getHost().port


class SocksEndToEndTests(_Base):
    """SOCKS5 CONNECT through gateway, tunnel and client."""

    @defer.inlineCallbacks
    def test_echo_megabytes_by_ip(self):
        """Four megabytes sent to an echo server by IPv4 address come back intact."""
        payload = blob(4 * MB)
        got = yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1",
                                  self.echo_port, payload)
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(payload).hexdigest())

    @defer.inlineCallbacks
    def test_domain_name_resolved_at_client(self):
        """A domain-name target is resolved by the client's resolver, not the gateway."""
        got = yield deferToThread(socks_echo, self.deployment.socks_port, "target.test",
                                  self.echo_port, b"hello")
        self.assertEqual(got, b"hello")
        self.assertIn("target.test", self.deployment.resolver.asked)

    @defer.inlineCallbacks
    def test_half_close(self):
        """The user shuts down its write side and still reads the target's whole answer."""
        port = listen_tcp(self, protocol.Factory.forProtocol(AnswerAfterEOF)).getHost().port
        payload = blob(3 * MB + 17)
        got = yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1", port,
                                  payload)
        expected = b"%d %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())
        self.assertEqual(got, expected)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong SOCKS5 password is refused in the RFC 1929 sub-negotiation."""
        msg = yield deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1",
                                  self.echo_port, password="wrong")
        self.assertIn("authentication failed", msg.lower())

    @defer.inlineCallbacks
    def test_refused_target(self):
        """A closed target port is reported as REP 0x05, connection refused."""
        closed = listen_tcp(self, protocol.Factory.forProtocol(Echo))
        port = closed.getHost().port
        yield closed.stopListening()
        msg = yield deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1", port)
        self.assertIn("0x05", msg)


class HttpEndToEndTests(_Base):
    """The HTTP proxy (absolute-URI and CONNECT) through the tunnel, driven by curl."""

    def proxy(self, user=PROXY_USER, password=PROXY_PASSWORD):
        return "http://%s:%s@127.0.0.1:%d" % (user, password, self.deployment.http_port)

    @defer.inlineCallbacks
    def test_get_megabytes(self):
        """A multi-megabyte GET through the proxy arrives intact."""
        size = 5 * MB + 3
        out, err, code = yield run_curl("-x", self.proxy(),
                                        "http://127.0.0.1:%d/blob/%d" % (self.web_port, size))
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(hashlib.sha256(out).digest(), hashlib.sha256(blob(size)).digest())

    @defer.inlineCallbacks
    def test_post_body(self):
        """A POST body reaches the target intact."""
        body_path = self.mktemp()
        body = blob(2 * MB + 5)
        with open(body_path, "wb") as f:
            f.write(body)
        out, err, code = yield run_curl("-x", self.proxy(), "--data-binary", "@" + body_path,
                                        "http://target.test:%d/upload" % (self.web_port,))
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode()))

    @defer.inlineCallbacks
    def test_keep_alive(self):
        """Two requests on one proxy connection both succeed."""
        url = "http://127.0.0.1:%d/hello" % (self.web_port,)
        out, err, code = yield run_curl("-x", self.proxy(), url, url, "-w", "[%{num_connects}]")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.count(b"hello from the target"), 2)
        self.assertIn(b"[0]", out)  # the second request reused the connection

    @defer.inlineCallbacks
    def test_connect_to_tls_target(self):
        """CONNECT carries a TLS session to an HTTPS target; its certificate verifies."""
        pki = self.deployment.pki
        options = ssl.PrivateCertificate.loadPEM(
            open(pki.cert_path).read() + open(pki.key_path).read()).options()
        port = reactor.listenSSL(0, server.Site(BlobResource()), options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        size = 3 * MB
        out, err, code = yield run_curl(
            "-x", self.proxy(), "--cacert", pki.ca_path,
            "https://localhost:%d/blob/%d" % (port.getHost().port, size))
        self.assertEqual(code, 0, err)
        self.assertEqual(hashlib.sha256(out).digest(), hashlib.sha256(blob(size)).digest())

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """Wrong proxy credentials get 407 with a Basic challenge."""
        out, err, code = yield run_curl("-x", self.proxy(password="nope"), "-i",
                                        "http://127.0.0.1:%d/hello" % (self.web_port,))
        self.assertIn(b"407", out.split(b"\r\n")[0])
        self.assertIn(b"proxy-authenticate: basic", out.lower())
        self.assertNotIn(CLIENT_PASSWORD.encode(), out)


class HttpsProxyListenerTests(unittest.TestCase):
    """An ssl: endpoint string makes the HTTP proxy an HTTPS proxy."""

    timeout = 60

    @defer.inlineCallbacks
    def test_https_proxy(self):
        """curl talks TLS to the proxy itself, then fetches through the tunnel."""
        deployment = Deployment(self)
        pki = deployment.pki
        listen = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (pki.key_path, pki.cert_path)
        yield deployment.start_gateway(proxy={"http": {"listen_addr": listen}})
        yield deployment.start_client()
        web_port = listen_tcp(self, web_site()).getHost().port
        out, err, code = yield run_curl(
            "--proxy", "https://%s:%s@localhost:%d" % (PROXY_USER, PROXY_PASSWORD,
                                                       deployment.http_port),
            "--proxy-cacert", pki.ca_path, "http://127.0.0.1:%d/blob/%d" % (web_port, MB))
        self.assertEqual(code, 0, err)
        self.assertEqual(out, blob(MB))


class StreamLogTests(_Base):
    """Each stream ends with one structured log event (for JSON log shippers)."""

    @defer.inlineCallbacks
    def test_stream_end_event(self):
        """The event carries ids, user, client, target, bytes, duration and outcome."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        payload = blob(300000)
        yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1",
                            self.echo_port, payload)
        for _ in range(100):
            ends = [e for e in events if e.get("event") == "stream_end"]
            if ends:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        (end,) = ends
        self.assertEqual(
            (end["user"], end["client_id"], end["target"], end["bytes_in"], end["bytes_out"],
             end["outcome"], end["frontend"]),
            (PROXY_USER, "client-1", "127.0.0.1:%d" % (self.echo_port,), len(payload),
             len(payload), "closed", "socks5 proxy"))
        self.assertGreaterEqual(end["duration"], 0)
        record = json.loads(eventAsJSON(end))
        self.assertEqual(record["stream_id"], end["stream_id"])
