"""Tests for L{anyproxy.client.egress}: the handshakes, and the endpoint over loopback."""

import base64

from hypothesis import given, strategies as st
from twisted.internet import defer, protocol, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyproxy.client.egress import (
    EgressProxyEndpoint, EgressProxyError, HttpConnectHandshake, ProxyURL, Socks5Handshake,
    no_proxy_matches, proxy_from_environment)
from tests.support import Echo, listen_tcp


class ProxyURLTests(SynchronousTestCase):
    def test_forms(self):
        url = ProxyURL.parse("http://alice:p%40ss@proxy.corp:3128")
        self.assertEqual((url.scheme, url.host, url.port, url.username, url.password),
                         ("http", "proxy.corp", 3128, "alice", "p@ss"))
        self.assertEqual(ProxyURL.parse("socks5://[::1]").port, 1080)
        self.assertEqual(ProxyURL.parse("http://proxy").port, 3128)

    def test_credentials_never_shown(self):
        url = ProxyURL.parse("http://alice:topsecret@proxy:3128")
        self.assertEqual(str(url), "http://proxy:3128")
        self.assertNotIn("topsecret", repr(url))

    def test_bad(self):
        for text in ["ftp://proxy:21", "proxy:3128", "http://", "http://p:99999",
                     "http://p:3128/path", "https://p:443", "http://p:0"]:
            with self.assertRaises(ValueError) as caught:
                ProxyURL.parse(text)
            self.assertNotIn("secret", str(caught.exception))

    def test_environment(self):
        env = {"HTTPS_PROXY": "http://u:pw@proxy:3128", "NO_PROXY": "internal.example,.lan"}
        self.assertEqual(str(proxy_from_environment("gw.example.com", env)), "http://proxy:3128")
        self.assertIsNone(proxy_from_environment("internal.example", env))
        self.assertIsNone(proxy_from_environment("gw.lan", env))
        self.assertIsNone(proxy_from_environment("gw.example.com", {}))
        self.assertEqual(str(proxy_from_environment("gw", {"https_proxy": "socks5://s:1"})),
                         "socks5://s:1")
        self.assertIsNone(proxy_from_environment("gw", {"https_proxy": "http://p:1",
                                                        "no_proxy": "*"}))


class EnvironmentTests(SynchronousTestCase):
    """The standard proxy variables, read as curl (and Go) read them."""

    def test_fixed_order_and_empty_is_unset(self):
        """Lower case first, whatever the environment's order; an empty value counts as unset."""
        for env in ({"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1"},
                    {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:1"}):
            self.assertEqual(str(proxy_from_environment("gw", env)), "http://lower:1")
        self.assertEqual(str(proxy_from_environment("gw", {"HTTPS_PROXY": "http://upper:1",
                                                           "https_proxy": ""})),
                         "http://upper:1")
        self.assertEqual(str(proxy_from_environment("gw", {"https_proxy": " ",
                                                           "ALL_PROXY": "socks5://all:1"})),
                         "socks5://all:1")

    def test_no_scheme_is_http(self):
        """A value without a scheme is http://, credentials kept and never shown."""
        url = proxy_from_environment("gw", {"HTTPS_PROXY": "alice:s3cret@proxy.corp:3128"})
        self.assertEqual((str(url), url.username, url.password),
                         ("http://proxy.corp:3128", "alice", "s3cret"))

    def test_no_proxy(self):
        """Domains with or without a leading dot or *., IPs, CIDRs, ports, * anywhere."""
        cases = [
            ("gw.corp", None, "corp", True), ("gw.corp", None, ".corp", True),
            ("gw.corp", None, "*.corp", True), ("corp", None, ".corp", True),
            ("gwcorp", None, "corp", False), ("GW.Corp.", None, "gw.corp", True),
            ("10.1.2.3", None, "10.0.0.0/8", True), ("10.1.2.3", None, "2.3", False),
            ("10.1.2.3", None, "10.1.2.3", True), ("::1", None, "[::1]", True),
            ("fd00::5", None, "fd00::/8", True), ("[fd00::5]", 443, "[fd00::/8]:443", True),
            ("gw.corp", 8443, "gw.corp:8443", True), ("gw.corp", 443, "gw.corp:8443", False),
            ("gw.example", None, "a.test, *", True), ("gw.example", None, "a.test b.test", False),
            ("gw.b.test", None, "a.test b.test", True),
        ]
        for host, port, no_proxy, exempt in cases:
            self.assertEqual(no_proxy_matches(host, port, no_proxy), exempt,
                             (host, port, no_proxy))
        env = {"https_proxy": "http://p:1", "NO_PROXY": "10.0.0.0/8"}
        self.assertIsNone(proxy_from_environment("10.9.9.9", env))
        self.assertIsNotNone(proxy_from_environment("192.0.2.1", env))


class HttpConnectHandshakeTests(SynchronousTestCase):
    def handshake(self, url="http://alice:pw@proxy:3128"):
        return HttpConnectHandshake(ProxyURL.parse(url), "gw.example.com", 8443)

    def test_request(self):
        request = self.handshake().request()
        token = base64.b64encode(b"alice:pw")
        self.assertEqual(request, b"CONNECT gw.example.com:8443 HTTP/1.1\r\n"
                                  b"Host: gw.example.com:8443\r\nUser-Agent: anyproxy-client\r\n"
                                  b"Proxy-Authorization: Basic " + token + b"\r\n\r\n")
        self.assertNotIn(b"Proxy-Authorization", self.handshake("http://proxy:1").request())

    def test_success_in_pieces_keeps_the_rest(self):
        handshake = self.handshake()
        self.assertIsNone(handshake.receive(b"HTTP/1.1 200 Connection est"))
        self.assertIsNone(handshake.receive(b"ablished\r\nVia: squid\r\n\r"))
        self.assertEqual(handshake.receive(b"\n\x16\x03"), b"\x16\x03")

    def test_interim_answers_skipped(self):
        """1xx answers before the 200 are read past (RFC 9110, 15.2), within one bound for all."""
        handshake = self.handshake()
        self.assertIsNone(handshake.receive(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 P"))
        self.assertEqual(handshake.receive(b"rocessing\r\n\r\nHTTP/1.1 200 OK\r\n\r\n\x16"),
                         b"\x16")
        # 101 would end HTTP on the connection: not an answer to CONNECT.
        self.assertRaises(EgressProxyError, self.handshake().receive,
                          b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        endless = self.handshake()
        with self.assertRaises(EgressProxyError):
            for _ in range(1000):
                endless.receive(b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_refusals_name_the_hop_and_status(self):
        with self.assertRaises(EgressProxyError) as caught:
            self.handshake().receive(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        self.assertIn("egress proxy http://proxy:3128 refused CONNECT gw.example.com:8443: 407",
                      str(caught.exception))
        self.assertNotIn("pw", str(caught.exception).replace("credentials", ""))
        self.assertRaises(EgressProxyError, self.handshake().receive, b"SSH-2.0-x\r\n\r\n")
        self.assertRaises(EgressProxyError, self.handshake().receive, b"x" * 20000)

    @given(st.binary(max_size=300))
    def test_garbage_never_crashes(self, data):
        try:
            self.handshake().receive(data)
        except EgressProxyError:
            pass


class Socks5HandshakeTests(SynchronousTestCase):
    def test_no_auth(self):
        handshake = Socks5Handshake(ProxyURL.parse("socks5://s:1080"), "gw.example.com", 8443)
        self.assertEqual(handshake.first(), b"\x05\x01\x00")
        out, done, _ = handshake.receive(b"\x05\x00")
        self.assertEqual(out, b"\x05\x01\x00\x03\x0egw.example.com\x20\xfb")
        self.assertFalse(done)
        out, done, rest = handshake.receive(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50extra")
        self.assertEqual((out, done, rest), (b"", True, b"extra"))

    def test_user_password(self):
        handshake = Socks5Handshake(ProxyURL.parse("socks5://bob:pw@s:1080"), "10.0.0.1", 443)
        self.assertEqual(handshake.first(), b"\x05\x02\x00\x02")
        out, _, _ = handshake.receive(b"\x05\x02")
        self.assertEqual(out, b"\x01\x03bob\x02pw")
        out, _, _ = handshake.receive(b"\x01\x00")
        self.assertEqual(out, b"\x05\x01\x00\x01\x0a\x00\x00\x01\x01\xbb")

    def test_name_idna_cannot_encode(self):
        """A gateway name with an empty or over-long label: an EgressProxyError, not a crash."""
        for name in ("a..b.example", "x" * 64 + ".example"):
            handshake = Socks5Handshake(ProxyURL.parse("socks5://s:1080"), name, 8443)
            handshake.first()
            with self.assertRaises(EgressProxyError) as caught:
                handshake.receive(b"\x05\x00")
            self.assertIn("not a valid DNS name", str(caught.exception))

    def test_refusals(self):
        def run(url, *answers):
            handshake = Socks5Handshake(ProxyURL.parse(url), "gw", 1)
            for answer in answers:
                handshake.receive(answer)

        self.assertRaises(EgressProxyError, run, "socks5://s:1", b"\x05\xff")
        self.assertRaises(EgressProxyError, run, "socks5://s:1", b"\x05\x02")
        self.assertRaises(EgressProxyError, run, "socks5://u:p@s:1", b"\x05\x02", b"\x01\x01")
        with self.assertRaises(EgressProxyError) as caught:
            run("socks5://s:1", b"\x05\x00", b"\x05\x05\x00\x01" + b"\0" * 6)
        self.assertIn("connection refused", str(caught.exception))
        self.assertRaises(EgressProxyError, run, "socks5://s:1", b"HTTP/1.1 400")

    @given(st.lists(st.binary(max_size=40), max_size=5))
    def test_garbage_never_crashes(self, chunks):
        handshake = Socks5Handshake(ProxyURL.parse("socks5://u:p@s:1"), "gw", 1)
        try:
            for chunk in chunks:
                handshake.receive(chunk)
        except EgressProxyError:
            pass


class ConnectProxy(protocol.Protocol):
    """A minimal CONNECT proxy for the endpoint test: answers, then relays to echo."""

    def connectionMade(self):
        self.buffer = b""
        self.peer = None

    def dataReceived(self, data):
        if self.peer is not None:
            self.peer.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        self.factory.heads.append(head)
        if self.factory.status != 200:
            self.transport.write(b"HTTP/1.1 %d No\r\n\r\n" % (self.factory.status,))
            self.transport.loseConnection()
            return
        target = head.split(b" ")[1].decode()
        port = int(target.rsplit(":", 1)[1])
        relay = protocol.ClientCreator(reactor, Relay, self)
        relay.connectTCP("127.0.0.1", port).addCallback(self._connected, rest)

    def _connected(self, peer, rest):
        self.peer = peer
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            peer.transport.write(rest)

    def connectionLost(self, reason):
        if self.peer is not None:
            self.peer.transport.loseConnection()


class Relay(protocol.Protocol):
    def __init__(self, back):
        self.back = back

    def dataReceived(self, data):
        self.back.transport.write(data)

    def connectionLost(self, reason):
        self.back.transport.loseConnection()


class Collect(protocol.Protocol):
    def connectionMade(self):
        self.received = b""
        self.transport.write(b"ping through the proxy")

    def dataReceived(self, data):
        self.received += data


class EndpointTests(TestCase):
    def setUp(self):
        self.echo = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.proxy_factory = protocol.Factory.forProtocol(ConnectProxy)
        self.proxy_factory.heads, self.proxy_factory.status = [], 200
        self.proxy_port = listen_tcp(self, self.proxy_factory).getHost().port

    @defer.inlineCallbacks
    def test_through_connect(self):
        url = ProxyURL.parse("http://alice:pw@127.0.0.1:%d" % (self.proxy_port,))
        endpoint = EgressProxyEndpoint(reactor, url, "127.0.0.1", self.echo, timeout=5)
        client = yield endpoint.connect(protocol.Factory.forProtocol(Collect))
        self.addCleanup(client.transport.loseConnection)
        for _ in range(100):
            if client.received:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(client.received, b"ping through the proxy")
        self.assertIn(b"Proxy-Authorization: Basic", self.proxy_factory.heads[0])

    @defer.inlineCallbacks
    def test_refused(self):
        self.proxy_factory.status = 403
        url = ProxyURL.parse("http://127.0.0.1:%d" % (self.proxy_port,))
        endpoint = EgressProxyEndpoint(reactor, url, "127.0.0.1", self.echo, timeout=5)
        with self.assertRaises(EgressProxyError) as caught:
            yield endpoint.connect(protocol.Factory.forProtocol(Collect))
        self.assertIn("refused CONNECT 127.0.0.1:%d: 403" % (self.echo,), str(caught.exception))

    @defer.inlineCallbacks
    def test_unreachable(self):
        port = listen_tcp(self, protocol.Factory.forProtocol(Echo))
        number = port.getHost().port
        yield port.stopListening()
        url = ProxyURL.parse("http://u:secret@127.0.0.1:%d" % (number,))
        endpoint = EgressProxyEndpoint(reactor, url, "127.0.0.1", self.echo, timeout=5)
        with self.assertRaises(EgressProxyError) as caught:
            yield endpoint.connect(protocol.Factory.forProtocol(Collect))
        self.assertIn("could not reach egress proxy http://127.0.0.1:%d" % (number,),
                      str(caught.exception))
        self.assertNotIn("secret", str(caught.exception))

    @defer.inlineCallbacks
    def test_cancelled_during_the_handshake(self):
        """
        Cancelled while the proxy has not answered (a tunnel stopped): the
        connection to the proxy is dropped, and an answer that comes later
        builds nothing.
        """
        class Slow(protocol.Protocol):
            def connectionMade(self):
                self.factory.connections.append(self)

        slow = protocol.Factory.forProtocol(Slow)
        slow.connections = []
        port = listen_tcp(self, slow).getHost().port
        url = ProxyURL.parse("http://127.0.0.1:%d" % (port,))
        built = []

        class Built(Collect):
            def connectionMade(self):
                built.append(self)

        endpoint = EgressProxyEndpoint(reactor, url, "127.0.0.1", self.echo, timeout=5)
        connecting = endpoint.connect(protocol.Factory.forProtocol(Built))
        for _ in range(200):
            if slow.connections:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        [proxy_side] = slow.connections
        lost = defer.Deferred()
        proxy_side.connectionLost = lambda reason: lost.callback(None)
        connecting.cancel()
        self.failureResultOf(connecting, defer.CancelledError)
        yield lost.addTimeout(5, reactor)  # the endpoint dropped its connection to the proxy
        self.assertEqual(built, [])
