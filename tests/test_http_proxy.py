# -*- test-case-name: tests.test_http_proxy -*-
"""
Tests for L{anyproxy.frontends.http.proxy}: unit tests on C{StringTransport} and
C{Clock} with fake stream endpoints, then loopback tests driven by real curl.
"""

import base64
import hashlib
import os

import h11
import trustme
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from zope.interface import implementer

from anyproxy.auth import User, UserDatabase
from anyproxy.errors import Reason, StreamOpenError, http_status, user_text
from anyproxy.frontends.http import proxy as http_module
from anyproxy.frontends.http import exchange as http_forward
from anyproxy.frontends.http.proxy import HttpProxyFactory
from anyproxy.interfaces import IAdmittingEndpoint
from tests.test_operator_site import connect_raw, wait_until
from anyproxy.frontends.http.messages import (
    binds_connection,
    BadTarget,
    parse_absolute_uri,
    parse_authority,
    parse_basic_credentials,
)

CURL = "/usr/bin/curl"
PASSWORD = "s3cret-pw"


def _basic(username, password):
    token = base64.b64encode(("%s:%s" % (username, password)).encode())
    return b"Basic " + token


# What a client's OPEN_ERROR text or a local exception can say (OS error
# strings); users must see none of it.
OS_DETAILS = [
    (Reason.CONNECTION_REFUSED,
     "Connection was refused by other side: 111: Connection refused."),
    (Reason.NAME_NOT_RESOLVED, "DNS lookup failed: [Errno -2] Name or service not known."),
    (Reason.HOST_UNREACHABLE, "No route to host: 113: No route to host."),
    (Reason.NETWORK_UNREACHABLE, "[Errno 101] Network is unreachable"),
    (Reason.TIMED_OUT, "TCP connection timed out: 110: Connection timed out."),
    (Reason.GENERAL_FAILURE, "[Errno 24] Too many open files"),
]


def assert_no_os_text(testcase, body):
    """No errno numbers or OS error phrases in a body users see."""
    for marker in (b"Errno", b"111", b"113", b"-2", b"Name or service", b"No route",
                   b"Connection was refused", b"Too many open files", b"by other side"):
        testcase.assertNotIn(marker, body)


def capture_log(testcase):
    """Formatted log lines emitted while the test runs."""
    lines = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


# -- fakes ----------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class _FakeStream:
    """One stream the proxy asked for; the test decides how it opens."""

    def __init__(self, user, host, port):
        self.user, self.host, self.port = user, host, port
        self.cancelled = False
        self.protocol = self.transport = None

    def connect(self, factory):
        self._factory = factory
        self.deferred = Deferred(lambda d: setattr(self, "cancelled", True))
        return self.deferred

    def succeed(self):
        self.protocol = self._factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.deferred.callback(self.protocol)

    def request(self):
        """The request the origin received, as (h11.Request, body bytes)."""
        origin = h11.Connection(h11.SERVER)
        origin.receive_data(self.transport.value())
        request, body = origin.next_event(), b""
        event = origin.next_event()
        while isinstance(event, h11.Data):
            body += event.data
            event = origin.next_event()
        return request, body

    def lose(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint, IAdmittingEndpoint)
class _FakeTunnelStream(_FakeStream):
    """
    A stream through a tunnel (an admitting endpoint, as TunnelEndpoint): the
    proxy may hand it the request's first bytes with the open (early data),
    which the origin then has before anything written once it is open.
    """

    first_data = None

    def admit(self):
        return succeed(lambda: None)

    def connect(self, factory, first_data=b""):
        self.first_data = first_data
        return _FakeStream.connect(self, factory)

    connect_admitted = connect

    def request(self):
        value, self.transport = self.transport, StringTransport()
        self.transport.write(self.first_data + value.value())
        try:
            return _FakeStream.request(self)
        finally:
            self.transport = value


class _User:
    """A proxy connection driven like an HTTP client, with fake streams behind it."""

    def __init__(self, testcase, users=None, timeout=30.0, realm="anyproxy", stream_class=_FakeStream,
                 **options):
        self.clock = Clock()
        self.streams = []
        self._stream_class = stream_class
        self.factory = HttpProxyFactory(
            users or UserDatabase(), self._endpoint_for, self.clock,
            handshake_timeout=timeout, realm=realm, **options
        )
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.client = h11.Connection(h11.CLIENT)

    def _endpoint_for(self, user, host, port, source=""):
        stream = self._stream_class(user, host, port)
        self.streams.append(stream)
        return stream

    def send(self, *events):
        self.protocol.dataReceived(b"".join(self.client.send(e) for e in events))

    def request(self, method, target, headers=(), body=None, host=b"example.com"):
        headers = [(b"Host", host)] + list(headers)
        if body is not None and not any(n.lower() == b"transfer-encoding" for n, _ in headers):
            headers.append((b"Content-Length", b"%d" % len(body)))
        events = [h11.Request(method=method, target=target, headers=headers)]
        if body is not None:
            events.append(h11.Data(data=body))
        self.send(*events + [h11.EndOfMessage()])

    def events(self):
        self.client.receive_data(self.transport.value())
        self.transport.clear()
        found = []
        while True:
            event = self.client.next_event()
            if event in (h11.NEED_DATA, h11.PAUSED):
                return found
            found.append(event)

    def response(self):
        """(status, {header: value}, body) of a complete answer; starts the next cycle."""
        events = self.events()
        head = [e for e in events if isinstance(e, h11.Response)][0]
        body = b"".join(e.data for e in events if isinstance(e, h11.Data))
        assert isinstance(events[-1], h11.EndOfMessage), events
        if self.client.our_state is h11.DONE and self.client.their_state is h11.DONE:
            self.client.start_next_cycle()
        return head.status_code, dict(head.headers), body

    @property
    def closed(self):
        return self.transport.disconnecting


def _raw_status(transport):
    return int(transport.value().split(b" ", 2)[1])


# -- unit tests -----------------------------------------------------------------


class AuthenticationTests(SynchronousTestCase):
    """Proxy-Authorization is checked on every request."""

    def setUp(self):
        self.user = _User(self, users=UserDatabase([("alice", PASSWORD, "lab")]))

    def assert_407(self):
        status, headers, body = self.user.response()
        self.assertEqual(status, 407)
        self.assertEqual(headers[b"proxy-authenticate"], b'Basic realm="anyproxy"')
        self.assertEqual(self.user.streams, [])
        self.assertFalse(self.user.closed)

    def test_missing(self):
        """A request without credentials is answered 407 and opens no stream."""
        self.user.request(b"GET", b"http://example.com/")
        self.assert_407()

    def test_wrong_password(self):
        """A wrong password is answered 407."""
        self.user.request(b"CONNECT", b"example.com:443",
                          [(b"Proxy-Authorization", _basic("alice", "nope"))])
        self.assert_407()

    def test_malformed(self):
        """Bad base64, a missing colon and a foreign scheme are each answered 407."""
        for value in [b"Basic !!!", b"Basic " + base64.b64encode(b"alice"), b"Digest x=1"]:
            self.user.request(b"GET", b"http://example.com/", [(b"Proxy-Authorization", value)])
            self.assert_407()

    def test_retry_on_same_connection(self):
        """After a 407 the same connection carries an authenticated request."""
        self.user.request(b"GET", b"http://example.com/", body=b"x" * 10)
        self.assert_407()
        self.user.request(b"GET", b"http://example.com/",
                          [(b"Proxy-Authorization", _basic("alice", PASSWORD))])
        [stream] = self.user.streams
        self.assertEqual(stream.user, User(name="alice", group="lab"))

    def test_login_attempts_bounded(self):
        """
        The fourth 407 on one connection closes it: a client that never logs
        in cannot keep its handshake place by retrying.
        """
        for attempt in range(3):
            self.user.request(b"GET", b"http://example.com/",
                              [(b"Proxy-Authorization", _basic("alice", "nope%d" % attempt))])
            self.assert_407()
        self.user.request(b"GET", b"http://example.com/",
                          [(b"Proxy-Authorization", _basic("alice", "nope"))])
        status, headers, _ = self.user.response()
        self.assertEqual((status, headers[b"connection"]), (407, b"close"))
        self.assertTrue(self.user.closed)

    def test_realm(self):
        """The realm comes from the factory."""
        user = _User(self, users=UserDatabase([("a", "b", "")]), realm="lab")
        user.request(b"GET", b"http://example.com/")
        self.assertEqual(user.response()[1][b"proxy-authenticate"], b'Basic realm="lab"')

    def test_waiting_for_continue_closes(self):
        """A 407 to a client waiting for 100 Continue closes, since the body never comes."""
        self.user.send(h11.Request(method=b"POST", target=b"http://example.com/", headers=[
            (b"Host", b"example.com"), (b"Content-Length", b"5"), (b"Expect", b"100-continue")]))
        self.assertEqual(self.user.events()[0].status_code, 407)
        self.assertTrue(self.user.closed)

    def test_secrets_not_forwarded_or_logged(self):
        """Proxy-Authorization reaches neither the origin nor the logs."""
        logged = []
        for module in (http_module, http_forward):
            self.patch(module, "_log", Logger(observer=logged.append))
        header = _basic("alice", PASSWORD)
        self.user.request(b"GET", b"http://example.com/", [(b"Proxy-Authorization", header)])
        self.user.streams[0].succeed()
        request, _ = self.user.streams[0].request()
        self.assertNotIn(b"proxy-authorization", dict(request.headers))
        _User(self, users=UserDatabase([("alice", PASSWORD, "")])).request(
            b"GET", b"http://example.com/", [(b"Proxy-Authorization", header + b"x")])
        _User(self).protocol.dataReceived(
            b"GET / HTTP/1.1\r\nProxy-Authorization: " + header + b"\x01\r\n\r\n")
        self.assertTrue(logged)
        text = "".join(formatEvent(e) + repr(e) for e in logged)
        for secret in (PASSWORD, header.decode()[6:]):
            self.assertNotIn(secret, text)


class ConnectTests(SynchronousTestCase):
    """CONNECT opens a stream, answers 200 and splices."""

    def setUp(self):
        self.user = _User(self)

    def test_tunnel(self):
        """Bytes flow both ways, including those sent right after the CONNECT head."""
        self.user.protocol.dataReceived(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nhello")
        [stream] = self.user.streams
        self.assertEqual((stream.host, stream.port), ("example.com", 443))
        stream.succeed()
        self.assertTrue(self.user.transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(stream.transport.value(), b"hello")
        self.user.protocol.dataReceived(b" world")
        self.assertEqual(stream.transport.value(), b"hello world")
        self.user.transport.clear()
        stream.protocol.dataReceived(b"answer")
        self.assertEqual(self.user.transport.value(), b"answer")
        stream.lose()
        self.assertTrue(self.user.closed)

    def test_http10_tunnel(self):
        """An HTTP/1.0 CONNECT tunnels the bytes sent before it opened too."""
        self.user.protocol.dataReceived(b"CONNECT example.com:443 HTTP/1.0\r\n\r\n\x16\x03\x01")
        self.user.protocol.dataReceived(b"hello")
        [stream] = self.user.streams
        stream.succeed()
        self.assertEqual(stream.transport.value(), b"\x16\x03\x01hello")

    def test_ipv6(self):
        """A bracketed IPv6 target opens a stream to the bare address."""
        self.user.request(b"CONNECT", b"[::1]:8443")
        self.assertEqual((self.user.streams[0].host, self.user.streams[0].port), ("::1", 8443))

    def test_failure_statuses(self):
        """Each open failure reason is answered with its status, keeping the connection."""
        for reason in Reason:
            self.user.request(b"CONNECT", b"example.com:443")
            self.user.streams[-1].deferred.errback(StreamOpenError(reason))
            status, headers, body = self.user.response()
            self.assertEqual(status, http_status(reason))
            self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
            self.assertFalse(self.user.closed)
        self.assertEqual(http_status(Reason.NOT_ALLOWED), 403)

    def test_failure_body_has_no_os_text(self):
        """The body is the reason's generic text; the detail (an OS error from the client)
        goes to the log only."""
        logged = capture_log(self)
        for reason, detail in OS_DETAILS:
            self.user.request(b"CONNECT", b"example.com:443")
            self.user.streams[-1].deferred.errback(StreamOpenError(reason, detail))
            status, _, body = self.user.response()
            self.assertEqual(body, user_text(reason).encode() + b"\n")
            assert_no_os_text(self, body)
            self.assertTrue(any(detail in line for line in logged), (detail, logged))

    def test_unexpected_failure(self):
        """A failure that is not a StreamOpenError is answered 502."""
        self.user.request(b"CONNECT", b"example.com:443")
        self.user.streams[0].deferred.errback(RuntimeError("boom"))
        self.assertEqual(self.user.response()[0], 502)

    def test_user_leaves_while_opening(self):
        """A user that disconnects while the stream opens cancels the open."""
        self.user.request(b"CONNECT", b"example.com:443")
        self.user.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.user.streams[0].cancelled)

    def test_user_leaves_tunnel(self):
        """A user that disconnects closes the upstream stream."""
        self.user.request(b"CONNECT", b"example.com:443")
        self.user.streams[0].succeed()
        self.user.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.user.streams[0].transport.disconnecting)

    def test_missing_port(self):
        """A CONNECT target without a port is answered 400."""
        self.user.request(b"CONNECT", b"example.com")
        self.assertEqual(self.user.response()[0], 400)
        self.assertEqual(self.user.streams, [])


class ForwardTests(SynchronousTestCase):
    """Absolute-URI requests are relayed in origin form, one stream each (no pool)."""

    def setUp(self):
        self.user = _User(self, upstream_keepalive=0)

    def open(self, method=b"GET", target=b"http://example.com:8080/a?b=1", headers=(), body=None):
        self.user.request(method, target, headers, body)
        stream = self.user.streams[-1]
        stream.succeed()
        return stream

    def test_request_rewritten(self):
        """The origin gets origin form, its Host, Connection: close and no hop-by-hop headers."""
        stream = self.open(headers=[
            (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"5"),
            (b"Proxy-Connection", b"keep-alive"), (b"Proxy-Foo", b"1"), (b"TE", b"trailers"),
            (b"Upgrade", b"h2c"), (b"X-Kept", b"yes")])
        self.assertEqual((stream.host, stream.port), ("example.com", 8080))
        request, _ = stream.request()
        self.assertEqual(request.target, b"/a?b=1")
        self.assertEqual(dict(request.headers), {
            b"host": b"example.com:8080", b"x-kept": b"yes", b"connection": b"close"})

    def test_response_and_keep_alive(self):
        """The response is relayed without hop-by-hop headers and the next request works."""
        stream = self.open()
        stream.protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n"
            b"Keep-Alive: 1\r\nX-Origin: 1\r\n\r\nhello")
        status, headers, body = self.user.response()
        self.assertEqual((status, body), (200, b"hello"))
        self.assertEqual(headers, {b"content-length": b"5", b"x-origin": b"1"})
        self.assertTrue(stream.transport.disconnecting)
        second = self.open(target=b"http://other.example/")
        self.assertEqual((second.host, second.port), ("other.example", 80))
        self.assertEqual(second.request()[0].target, b"/")
        self.assertFalse(self.user.closed)

    def test_response_read_at_once_leaves_at_once(self):
        """
        A response that arrived in one read (head, body, end) reaches the
        user in one write; one that arrives in pieces, piece by piece.
        """
        writes = []
        write = self.user.transport.write
        self.user.transport.write = lambda data: (writes.append(data), write(data))
        stream = self.open()
        stream.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(len(writes), 1)
        self.assertEqual(self.user.response()[::2], (200, b"hello"))
        del writes[:]
        stream = self.open()
        stream.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
        stream.protocol.dataReceived(b"llo")
        self.assertEqual(len(writes), 2)
        self.assertEqual(self.user.response()[::2], (200, b"hello"))
        # A large body is handed over in pieces, not copied into one.
        sequences = []
        write_sequence = self.user.transport.writeSequence
        self.user.transport.writeSequence = lambda parts: (
            sequences.append(list(parts)), write_sequence(parts))
        body = b"x" * (256 * 1024)
        stream = self.open()
        stream.protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertEqual([len(parts) for parts in sequences], [2])
        self.assertEqual(self.user.response()[::2], (200, body))

    def test_close_delimited_rechunked(self):
        """A close-delimited response reaches an HTTP/1.1 user chunked."""
        stream = self.open()
        stream.protocol.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nabc")
        raw = self.user.transport.value()
        self.assertIn(b"transfer-encoding: chunked", raw.lower())
        stream.protocol.dataReceived(b"def")
        stream.lose()
        self.assertEqual(self.user.response()[2], b"abcdef")
        self.assertFalse(self.user.closed)

    def test_head_and_304(self):
        """HEAD and 304 responses carry no body and end the exchange."""
        stream = self.open(method=b"HEAD")
        stream.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(self.user.response(), (200, {b"content-length": b"100"}, b""))
        stream = self.open()
        stream.protocol.dataReceived(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
        self.assertEqual(self.user.response()[:2], (304, {b"etag": b"x"}))

    def test_bodies(self):
        """Content-Length and chunked request bodies reach the origin intact."""
        stream = self.open(method=b"POST", headers=[(b"Content-Length", b"4")], body=b"data")
        self.assertEqual(stream.request()[1], b"data")
        stream.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.user.response()[0], 204)
        stream = self.open(method=b"PUT", headers=[(b"Transfer-Encoding", b"chunked")],
                           body=b"chunky")
        request, body = stream.request()
        self.assertEqual((dict(request.headers)[b"transfer-encoding"], body),
                         (b"chunked", b"chunky"))

    def test_continue(self):
        """A 100 Continue from the origin is relayed, then the body flows."""
        self.user.send(h11.Request(method=b"POST", target=b"http://example.com/", headers=[
            (b"Host", b"example.com"), (b"Content-Length", b"4"), (b"Expect", b"100-continue")]))
        stream = self.user.streams[0]
        stream.succeed()
        stream.protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(self.user.events()[0].status_code, 100)
        self.user.send(h11.Data(data=b"body"), h11.EndOfMessage())
        self.assertEqual(stream.request()[1], b"body")

    def test_held_body_and_backpressure(self):
        """Body bytes wait for the stream, and a full stream or backlog pauses the user."""
        self.user.send(h11.Request(method=b"POST", target=b"http://example.com/", headers=[
            (b"Host", b"example.com"), (b"Content-Length", b"200000")]))
        self.user.send(h11.Data(data=b"x" * 100000))
        self.assertEqual(self.user.transport.producerState, "paused")
        stream = self.user.streams[0]
        stream.succeed()
        self.assertEqual(self.user.transport.producerState, "producing")
        self.assertIs(self.user.transport.producer, stream.transport)
        stream.transport.producer.pauseProducing()
        self.assertEqual(self.user.transport.producerState, "paused")
        stream.transport.producer.resumeProducing()
        self.user.send(h11.Data(data=b"y" * 100000), h11.EndOfMessage())
        self.assertEqual(stream.request()[1], b"x" * 100000 + b"y" * 100000)

    def test_failure_statuses(self):
        """Open failures are answered with the status of their reason."""
        for reason in (Reason.CONNECTION_REFUSED, Reason.TIMED_OUT, Reason.NOT_ALLOWED):
            self.user.request(b"GET", b"http://example.com/")
            self.user.streams[-1].deferred.errback(StreamOpenError(reason))
            self.assertEqual(self.user.response()[0], http_status(reason))

    def test_failure_body_has_no_os_text(self):
        """A forwarded request's open failure shows the generic text, logs the detail."""
        logged = capture_log(self)
        for reason, detail in OS_DETAILS:
            self.user.request(b"GET", b"http://example.com/")
            self.user.streams[-1].deferred.errback(StreamOpenError(reason, detail))
            status, _, body = self.user.response()
            self.assertEqual((status, body), (http_status(reason),
                                              user_text(reason).encode() + b"\n"))
            assert_no_os_text(self, body)
            self.assertTrue(any(detail in line for line in logged), (detail, logged))

    def test_bad_origin(self):
        """Garbage or an early close from the origin is answered 502."""
        for reply in [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-"]:
            stream = self.open()
            stream.protocol.dataReceived(reply)
            stream.lose()
            self.assertEqual(self.user.response()[0], 502)
            self.assertTrue(stream.transport.disconnecting)

    def test_origin_dies_mid_body(self):
        """An origin that dies mid-body makes the proxy close the user connection."""
        stream = self.open()
        stream.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        stream.lose()
        self.assertTrue(self.user.closed)

    def test_user_leaves(self):
        """A user that disconnects closes the stream, or cancels it while opening."""
        stream = self.open()
        self.user.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(stream.transport.disconnecting)
        user = _User(self, upstream_keepalive=0)
        user.request(b"GET", b"http://example.com/")
        user.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(user.streams[0].cancelled)

    def test_user_half_closes(self):
        """A user that half-closes after its request still gets the answer, then a close."""
        self.user.request(b"GET", b"http://example.com/")
        self.user.protocol.readConnectionLost()
        stream = self.user.streams[0]
        stream.succeed()
        stream.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.user.response()[2], b"ok")
        self.assertTrue(self.user.closed)

    def test_early_answer_to_expect(self):
        """An origin's final answer to a user awaiting 100 Continue closes the connection."""
        self.user.send(h11.Request(method=b"PUT", target=b"http://example.com/", headers=[
            (b"Host", b"example.com"), (b"Content-Length", b"4"), (b"Expect", b"100-continue")]))
        stream = self.user.streams[0]
        stream.succeed()
        stream.protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        [response, _] = self.user.events()
        self.assertEqual((response.status_code, dict(response.headers)[b"connection"]),
                         (403, b"close"))
        self.assertTrue(self.user.closed)

    def test_pipelined(self):
        """A pipelined second request waits for the first answer."""
        self.user.protocol.dataReceived(
            b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n"
            b"GET http://b.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n")
        [first] = self.user.streams
        self.assertEqual(self.user.transport.producerState, "paused")
        first.succeed()
        first.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        self.assertEqual([s.host for s in self.user.streams], ["a.example", "b.example"])
        self.assertEqual(self.user.transport.producerState, "producing")

    def test_pipelined_later(self):
        """Reading goes on during a plain request, and pauses once a pipelined one arrives."""
        self.user.protocol.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.assertEqual(self.user.transport.producerState, "producing")
        self.user.protocol.dataReceived(b"GET http://b.example/ HTTP/1.1\r\n")
        self.assertEqual(self.user.transport.producerState, "paused")
        [first] = self.user.streams
        first.succeed()
        first.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        self.assertEqual(self.user.transport.producerState, "producing")
        self.user.protocol.dataReceived(b"Host: b.example\r\n\r\n")
        self.assertEqual([s.host for s in self.user.streams], ["a.example", "b.example"])


class EarlyHeadTests(SynchronousTestCase):
    """
    Through a tunnel, a forwarded request's head goes with the stream's OPEN
    (first_data), so the origin has it a tunnel round trip sooner; it is
    never written twice, and a body follows once the stream is open.
    """

    def setUp(self):
        self.user = _User(self, upstream_keepalive=0, stream_class=_FakeTunnelStream)

    def test_head_with_the_open(self):
        self.user.request(b"GET", b"http://example.com:8080/a?b=1")
        [stream] = self.user.streams
        self.assertTrue(stream.first_data.startswith(b"GET /a?b=1 HTTP/1.1\r\n"), stream.first_data)
        self.assertTrue(stream.first_data.endswith(b"\r\n\r\n"))
        stream.succeed()
        self.assertEqual(stream.transport.value(), b"")  # not written again
        request, body = stream.request()
        self.assertEqual((request.method, request.target, body), (b"GET", b"/a?b=1", b""))
        stream.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.user.response()[::2], (200, b"ok"))

    def test_only_requests_that_may_be_sent_twice(self):
        """
        A request that is not idempotent, or has a body, waits for the open,
        head and all: once the head has gone early, the client may deliver it
        although the gateway gives up (the user leaves, the open times out).
        """
        for method, body in [(b"POST", b"a=1&b=2"), (b"POST", None), (b"PUT", b"x"), (b"PATCH", None)]:
            user = _User(self, upstream_keepalive=0, stream_class=_FakeTunnelStream)
            user.request(method, b"http://example.com/form", body=body)
            [stream] = user.streams
            self.assertEqual(stream.first_data, b"", method)
            stream.succeed()
            request, received = stream.request()
            self.assertEqual((request.method, received), (method, body or b""))
        user = _User(self, upstream_keepalive=0, stream_class=_FakeTunnelStream)
        user.request(b"DELETE", b"http://example.com/item/1")
        self.assertTrue(user.streams[0].first_data.startswith(b"DELETE /item/1 "))

    def test_refused_open(self):
        """An open refused after the head went early is answered as any refused open."""
        self.user.request(b"GET", b"http://example.com/")
        [stream] = self.user.streams
        stream.deferred.errback(StreamOpenError(Reason.CONNECTION_REFUSED, "refused"))
        status, _, _ = self.user.response()
        self.assertEqual(status, http_status(Reason.CONNECTION_REFUSED))

    def test_not_for_other_endpoints(self):
        """An endpoint that is not a tunnel's (it takes no first data) gets the head once open."""
        user = _User(self, upstream_keepalive=0)
        user.request(b"GET", b"http://example.com/")
        [stream] = user.streams
        stream.succeed()
        self.assertTrue(stream.transport.value().startswith(b"GET / HTTP/1.1\r\n"))


class MalformedTests(SynchronousTestCase):
    """Bad input gets a protocol-correct error and never opens a stream."""

    def assert_rejected(self, data, status, closed):
        user = _User(self)
        user.protocol.dataReceived(data)
        self.assertEqual(_raw_status(user.transport), status)
        self.assertEqual(user.closed, closed)
        self.assertEqual(user.streams, [])

    def test_garbage(self):
        """A garbage request line is answered 400 and closed."""
        self.assert_rejected(b"\x16\x03\x01 hello\r\n\r\n", 400, True)

    def test_unknown_method(self):
        """A method the parser does not know is answered 501 and closed."""
        self.assert_rejected(b"BAN http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 501, True)

    def test_broken_pipelined_request(self):
        """A malformed request behind a good one: the good one is answered, then 400."""
        user = _User(self, upstream_keepalive=0)
        user.protocol.dataReceived(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"
                                   b"GET http://a/ HTTP/1.1\r\nBad Header: x\r\n\r\n")
        [stream] = user.streams
        stream.succeed()
        self.assertFalse(user.closed)
        stream.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        answers = user.transport.value()
        self.assertTrue(answers.startswith(b"HTTP/1.1 200 OK\r\n"), answers)
        self.assertIn(b"\r\n\r\nokHTTP/1.1 400 ", answers)
        self.assertTrue(user.closed)

    def test_oversized_head(self):
        """A request head past the size limit is answered 431 and closed."""
        self.assert_rejected(b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * 20000, 431, True)

    def test_bad_targets(self):
        """Origin-form, https, other schemes, userinfo and bad ports are answered 400."""
        for target in [b"/", b"https://a/", b"ftp://a/", b"http://u:p@a/", b"http://a:0/",
                       b"http://a:99999/", b"http://[::1/", b"*"]:
            self.assert_rejected(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target, 400, False)

    def test_other_versions(self):
        """HTTP/0.9 (no version) and HTTP/2.0 request lines: 505 or 400, no stream."""
        self.assert_rejected(b"GET http://a/ HTTP/2.0\r\nHost: a\r\n\r\n", 505, True)
        for line in (b"GET http://a/\r\n\r\n", b"GET http://a/ HTTP/1.2\r\nHost: a\r\n\r\n"):
            user = _User(self)
            user.protocol.dataReceived(line)
            self.assertEqual(user.streams, [])
            self.assertIn(_raw_status(user.transport), (400, 505))
            self.assertTrue(user.closed)

    def test_status_below_100(self):
        """An origin's status of 000-099 is a malformed response: 502, nothing raised."""
        user = _User(self)
        user.request(b"GET", b"http://example.com/")
        stream = user.streams[0]
        stream.succeed()
        stream.protocol.dataReceived(b"HTTP/1.1 099 X\r\n\r\n"
                                     b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(user.transport.value().startswith(b"HTTP/1.1 502 "),
                        user.transport.value())
        self.assertTrue(stream.transport.disconnecting)

    def test_cut_response_not_whole(self):
        """
        A response that runs until the origin closes, cut by a reset stream
        or a lost tunnel: the user's connection closes without the last
        chunk, so the body is not taken as whole; a clean end completes it.
        """
        for reason, whole in ((ConnectionLost("stream reset by peer"), False),
                              (ConnectionDone("stream closed"), True)):
            user = _User(self)
            user.request(b"GET", b"http://example.com/")
            stream = user.streams[0]
            stream.succeed()
            stream.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npartial")
            stream.protocol.connectionLost(Failure(reason))
            raw = user.transport.value()
            self.assertIn(b"partial", raw)
            self.assertEqual(raw.endswith(b"\r\n0\r\n\r\n"), whole, raw)
            self.assertEqual(user.closed, not whole)

    def test_bad_chunked_body(self):
        """A broken chunked body closes the connection and the stream."""
        user = _User(self)
        user.protocol.dataReceived(b"POST http://a/ HTTP/1.1\r\nHost: a\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n")
        user.streams[0].succeed()
        user.protocol.dataReceived(b"zz\r\n")
        self.assertEqual(_raw_status(user.transport), 400)
        self.assertTrue(user.closed)
        self.assertTrue(user.streams[0].transport.disconnecting)


class TimeoutTests(SynchronousTestCase):
    """The handshake timeout closes users that do not send a request head."""

    def test_silent(self):
        """A user that sends nothing is closed after the timeout."""
        user = _User(self, timeout=5)
        user.clock.advance(4.9)
        self.assertFalse(user.closed)
        user.clock.advance(0.2)
        self.assertTrue(user.closed)

    def test_partial_head(self):
        """A user stuck in the middle of a head is closed after the timeout."""
        user = _User(self)
        user.protocol.dataReceived(b"GET http://a/ HTTP/1.1\r\n")
        user.clock.advance(30)
        self.assertTrue(user.closed)

    def test_unfinished_body_after_answer(self):
        """A user that stops sending a body we already answered is closed after the timeout."""
        user = _User(self, users=UserDatabase([("a", "b", "")]))
        user.send(h11.Request(method=b"POST", target=b"http://a/", headers=[
            (b"Host", b"a"), (b"Content-Length", b"10")]), h11.Data(data=b"12345"))
        self.assertEqual(_raw_status(user.transport), 407)
        user.clock.advance(29)
        self.assertFalse(user.closed)
        user.clock.advance(1)
        self.assertTrue(user.closed)

    def test_head_stops_timer_until_idle(self):
        """A complete head stops the timer, which restarts once the answer is sent."""
        user = _User(self)
        user.request(b"GET", b"http://a/")
        user.clock.advance(100)
        self.assertFalse(user.closed)
        user.streams[0].deferred.errback(StreamOpenError(Reason.TIMED_OUT))
        user.clock.advance(30)
        self.assertTrue(user.closed)
        self.assertEqual(user.clock.getDelayedCalls(), [])

    def test_deadline_not_extended_by_bytes(self):
        """A head trickling in is closed at the timeout however recently a byte came."""
        user = _User(self, timeout=5)
        for byte in b"GET http://a/ HTTP/1.1\r\n":
            if user.clock.seconds() >= 4.9:
                break
            user.protocol.dataReceived(bytes([byte]))
            user.clock.advance(0.2)
        self.assertFalse(user.closed)
        user.clock.advance(0.2)
        self.assertTrue(user.closed)


class HandshakeCapTests(SynchronousTestCase):
    """At most max_handshakes connections wait for their first request to be let in."""

    def setUp(self):
        self.user = _User(self, users=UserDatabase([("alice", PASSWORD, "lab")]),
                          max_handshakes=1)

    def another(self):
        protocol = self.user.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_cap(self):
        """Beyond the cap a new connection is closed at once, without a byte."""
        _, transport = self.another()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.user.factory.handshakes.refused, 1)

    def test_wrong_login_still_counts(self):
        """A request refused with 407 leaves the connection counted."""
        self.user.request(b"GET", b"http://example.com/")
        self.assertEqual(self.user.response()[0], 407)
        self.assertTrue(self.another()[1].disconnecting)

    def test_login_leaves(self):
        """A request let in frees the place for the next connection."""
        self.user.request(b"GET", b"http://example.com/",
                          headers=[(b"Proxy-Authorization", _basic("alice", PASSWORD))])
        self.assertEqual(self.user.factory.handshakes.count, 0)
        protocol, transport = self.another()
        self.assertFalse(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.user.protocol.connectionLost(Failure(ConnectionDone()))  # counted once only
        self.assertEqual(self.user.factory.handshakes.count, 0)


class MessageTests(SynchronousTestCase):
    """The pure parsing helpers."""

    def test_authorities(self):
        """Host names, IPv4 and bracketed IPv6 parse; defaults apply only when allowed."""
        self.assertEqual(parse_authority(b"example.com:80"), ("example.com", 80))
        self.assertEqual(parse_authority(b"[::1]:443"), ("::1", 443))
        self.assertEqual(parse_authority(b"[::1]", 80), ("::1", 80))
        for bad in [b"a", b"a:b", b"[::1]:", b"[zz]:1", b"a b:1", b":1", b"a:1:2"]:
            self.assertRaises(BadTarget, parse_authority, bad)

    def test_absolute_uri(self):
        """Absolute URIs split into host, port and origin-form path."""
        target = parse_absolute_uri(b"HTTP://[::1]:8080?q#frag")
        self.assertEqual((target.host, target.port, target.path), ("::1", 8080, b"/?q"))
        self.assertEqual(target.authority, b"[::1]:8080")
        self.assertEqual(parse_absolute_uri(b"http://a").origin_form(b"OPTIONS"), b"*")

    def test_credentials(self):
        """Basic credentials decode; anything else is None."""
        headers = [(b"proxy-authorization", _basic("a", "b:c"))]
        self.assertEqual(parse_basic_credentials(headers), (b"a", b"b:c"))
        self.assertIsNone(parse_basic_credentials(headers * 2))

    def test_binds_connection(self):
        """NTLM and Negotiate, in any case, bind a connection; other schemes do not."""
        def headers(*pairs):
            return h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x")] + list(pairs)).headers
        for value in (b"NTLM TlRMTQ==", b"negotiate abc", b"Negotiate"):
            self.assertTrue(binds_connection(headers((b"Authorization", value)), b"authorization"))
        for value in (b"Basic dTpw", b"Bearer x", b""):
            self.assertFalse(binds_connection(headers((b"Authorization", value)), b"authorization"))
        self.assertFalse(binds_connection(headers((b"X-NTLM", b"NTLM")), b"authorization"))

    @given(st.binary(max_size=40))
    def test_authority_fuzz(self, data):
        """Arbitrary bytes either parse to a valid port or raise BadTarget."""
        try:
            host, port = parse_authority(data, 80)
        except BadTarget:
            return
        self.assertTrue(host and 1 <= port <= 65535)


# -- loopback tests with curl ---------------------------------------------------


def _blob(size):
    block = hashlib.sha256(b"http-proxy").digest() * 2048
    return (block * (size // len(block) + 1))[:size]


class _Target(resource.Resource):
    """
    GET /blob/N returns N bytes (with a length), /stream/N the same bytes
    without one (chunked); POST returns the SHA-256 of the body.
    """

    isLeaf = True

    def render_GET(self, request):
        parts = request.path.decode().strip("/").split("/")
        if parts[0] == "blob":
            return _blob(int(parts[1]))
        if parts[0] == "stream":
            data = _blob(int(parts[1]))
            for start in range(0, len(data), 65536):
                request.write(data[start:start + 65536])
            request.finish()
            return server.NOT_DONE_YET
        return b"hello " + request.getHeader(b"host") + b"\n"

    def render_POST(self, request):
        return hashlib.sha256(request.content.read()).hexdigest().encode()


class _TrackingProxyFactory(HttpProxyFactory):
    """Counts the connections made and the ones still open."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made = 0
        self.live = set()

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.made += 1
        self.live.add(protocol)
        lost = protocol.connectionLost

        def connectionLost(reason):
            self.live.discard(protocol)
            lost(reason)

        protocol.connectionLost = connectionLost
        return protocol


class CurlLoopbackTests(TestCase):
    """Real curl through the proxy to twisted.web targets on loopback."""

    timeout = 60

    def setUp(self):
        self.upstreams = []
        self.sites = []
        self.ports = []
        self.addCleanup(self._settle)
        users = UserDatabase([("alice", PASSWORD, "")])
        self.proxy = _TrackingProxyFactory(users, self._endpoint_for, reactor)
        self.proxy_port = self._listen(self.proxy, wrap=False)
        self.web_port = self._listen(server.Site(_Target()))

    def _listen(self, factory, wrap=True, interface="127.0.0.1"):
        if wrap:
            factory = WrappingFactory(factory)
            self.sites.append(factory)
        port = reactor.listenTCP(0, factory, interface=interface)
        self.ports.append(port)
        return port.getHost().port

    def _endpoint_for(self, user, host, port, source=""):
        self.assertEqual(user.name, "alice")
        endpoint_class = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = endpoint_class(reactor, host, port, timeout=5)
        tracked = self.upstreams

        @implementer(IStreamClientEndpoint)
        class Direct:
            def connect(self, factory):
                def refused(failure):
                    failure.trap(ConnectionRefusedError)
                    raise StreamOpenError(Reason.CONNECTION_REFUSED)

                def opened(protocol):
                    tracked.append(protocol.transport)
                    return protocol

                return endpoint.connect(factory).addCallbacks(opened, refused)

        return Direct()

    @inlineCallbacks
    def _settle(self):
        # Wait for every connection to close, so trial sees a clean reactor.
        # Kept upstream connections would wait for their idle timeout.
        self.proxy.upstream_pool.clear()
        for _ in range(500):
            if not self.proxy.live and not any(s.protocols for s in self.sites) and all(
                t.disconnected for t in self.upstreams
            ):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        for port in self.ports:
            yield port.stopListening()

    def curl(self, *args, credentials="alice:" + PASSWORD):
        argv = ["-q", "-sS", "--max-time", "20",
                "--proxy", "http://127.0.0.1:%d" % (self.proxy_port,)]
        if credentials:
            argv += ["--proxy-user", credentials]
        return getProcessOutputAndValue(CURL, argv + list(args), env={}, reactor=reactor)

    def url(self, path, port=None):
        return "http://127.0.0.1:%d%s" % (port or self.web_port, path)

    def write_file(self, data):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    @inlineCallbacks
    def test_handshake_cap(self):
        """Idle connections that fill max_handshakes make curl's connection close at once;
        once one leaves, curl gets through."""
        self.proxy.handshakes.limit = 1
        idle = yield connect_raw(self, self.proxy_port)
        yield wait_until(lambda: self.proxy.handshakes.count == 1)
        out, err, code = yield self.curl(self.url("/"))
        self.assertNotEqual(code, 0)
        self.assertEqual(out, b"")
        idle.transport.loseConnection()
        yield wait_until(lambda: self.proxy.handshakes.count == 0)
        out, err, code = yield self.curl(self.url("/blob/1000"))
        self.assertEqual((code, err, len(out)), (0, b"", 1000))

    @inlineCallbacks
    def test_large_get(self):
        """A 3 MiB download arrives intact."""
        out, err, code = yield self.curl(self.url("/blob/%d" % (3 << 20)))
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(hashlib.sha256(out).digest(), hashlib.sha256(_blob(3 << 20)).digest())

    @inlineCallbacks
    def test_uploads(self):
        """POST bodies with Content-Length and chunked arrive intact."""
        data = os.urandom(1536 * 1024)
        path = self.write_file(data)
        expected = hashlib.sha256(data).hexdigest().encode()
        out, err, code = yield self.curl("--data-binary", "@" + path, self.url("/upload"))
        self.assertEqual((code, out), (0, expected))
        out, err, code = yield self.curl("-H", "Transfer-Encoding: chunked",
                                         "--data-binary", "@" + path, self.url("/upload"))
        self.assertEqual((code, out), (0, expected))

    @inlineCallbacks
    def test_unknown_length(self):
        """A chunked response arrives intact, re-chunked for HTTP/1.1, close-delimited for 1.0."""
        size = (1 << 20) + 12345
        for version in ["--http1.1", "--http1.0"]:
            out, err, code = yield self.curl(version, self.url("/stream/%d" % (size,)))
            self.assertEqual(code, 0, err)
            self.assertEqual(hashlib.sha256(out).digest(), hashlib.sha256(_blob(size)).digest())

    @inlineCallbacks
    def test_head_then_get(self):
        """A HEAD is answered without a body and the same proxy connection serves a GET next."""
        out, err, code = yield self.curl("-sS", "-I", self.url("/blob/1000"), "--next",
                                         "--proxy", "http://127.0.0.1:%d" % (self.proxy_port,),
                                         "--proxy-user", "alice:" + PASSWORD, self.url("/a"))
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b"\r\ncontent-length: 1000\r\n", out.lower())
        self.assertTrue(out.endswith(b"\r\n\r\nhello 127.0.0.1:%d\n" % (self.web_port,)), out)
        self.assertEqual(self.proxy.made, 1)

    @inlineCallbacks
    def test_keep_alive(self):
        """Two URLs on two targets in one curl run share one proxy connection."""
        other = self._listen(server.Site(_Target()))
        out, err, code = yield self.curl(self.url("/a"), self.url("/b", port=other))
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"hello 127.0.0.1:%d\nhello 127.0.0.1:%d\n" % (self.web_port, other))
        self.assertEqual(self.proxy.made, 1)

    @inlineCallbacks
    def test_connect_tls(self):
        """An https download goes through CONNECT and verifies the target certificate."""
        ca = trustme.CA()
        ca_path = self.write_file(ca.cert_pem.bytes())
        cert = ca.issue_cert("127.0.0.1")
        pem = cert.private_key_pem.bytes() + b"".join(b.bytes() for b in cert.cert_chain_pems)
        options = PrivateCertificate.loadPEM(pem).options()
        # TLS inside the tracking wrapper: a WrappingFactory inside TLS breaks handshakes.
        port = self._listen(TLSMemoryBIOFactory(options, False, server.Site(_Target())))
        url = "https://127.0.0.1:%d/blob/%d" % (port, 1 << 20)
        out, err, code = yield self.curl("--cacert", ca_path, url)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, _blob(1 << 20))

    @inlineCallbacks
    def test_connect_ipv6(self):
        """curl's proxytunnel to a bracketed IPv6 target works."""
        port = self._listen(server.Site(_Target()), interface="::1")
        out, err, code = yield self.curl("-p", "http://[::1]:%d/x" % (port,))
        self.assertEqual((code, out), (0, b"hello [::1]:%d\n" % (port,)), err)

    @inlineCallbacks
    def test_credentials(self):
        """Wrong and missing credentials get 407, for http and for CONNECT."""
        for credentials in ["alice:wrong", None]:
            out, err, code = yield self.curl("-o", "/dev/null", "-w", "%{http_code}",
                                             self.url("/"), credentials=credentials)
            self.assertEqual(out, b"407")
            out, err, code = yield self.curl("-o", "/dev/null", "-w", "%{http_connect}",
                                             "https://127.0.0.1:1/", credentials=credentials)
            self.assertEqual(out, b"407")

    @inlineCallbacks
    def test_refused(self):
        """A target that refuses the connection gets 502."""
        port = reactor.listenTCP(0, server.Site(_Target()), interface="127.0.0.1")
        closed = port.getHost().port
        yield port.stopListening()
        out, err, code = yield self.curl("-o", "/dev/null", "-w", "%{http_code}",
                                         self.url("/", port=closed))
        self.assertEqual(out, b"502")
