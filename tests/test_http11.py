# -*- test-case-name: tests.test_http11 -*-
"""
Tests for L{anyproxy.frontends.http.connection}: bytes in, events out, no I/O.

h11, an independent implementation, plays the other side: it writes the
requests and responses we parse, and parses the ones we write.
"""

import h11
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.frontends.http import connection as http11

from anyproxy.frontends.http import parse as http11_parse
from anyproxy.frontends.http.connection import (
    DONE,
    IDLE,
    MUST_CLOSE,
    NEED_DATA,
    PAUSED,
    SEND_BODY,
    ClientConnection,
    ConnectionClosed,
    Data,
    EndOfMessage,
    InformationalResponse,
    RemoteProtocolError,
    Request,
    Response,
    ServerConnection,
)

GET = b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nX-Case: 1\r\n\r\n"


def drain(connection):
    """Every event until NEED_DATA or PAUSED (which ends the list)."""
    found = []
    while True:
        event = connection.next_event()
        found.append(event)
        if event is NEED_DATA or event is PAUSED or type(event) is ConnectionClosed:
            return found


def body_of(events):
    return b"".join(event.data for event in events if type(event) is Data)


def split(data, cuts):
    """C{data} in pieces at the (sorted, deduplicated) offsets C{cuts}."""
    points = sorted(set(cut % (len(data) + 1) for cut in cuts))
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [piece for piece in pieces if piece]


class RequestTests(SynchronousTestCase):
    """ServerConnection reading requests."""

    def setUp(self):
        self.server = ServerConnection()

    def test_get(self):
        """A request head becomes a Request and an EndOfMessage; names keep their spelling."""
        self.server.receive_data(GET)
        request, end, need = drain(self.server)
        self.assertEqual((request.method, request.target, request.http_version),
                         (b"GET", b"http://a.example/x", b"1.1"))
        self.assertEqual(list(request.headers), [(b"host", b"a.example"), (b"x-case", b"1")])
        self.assertEqual(request.headers.raw_names, [b"Host", b"X-Case"])
        self.assertIs(type(end), EndOfMessage)
        self.assertIs(need, NEED_DATA)
        self.assertEqual((self.server.their_state, self.server.our_state), (DONE, http11.SEND_RESPONSE))

    def test_value_whitespace(self):
        """Whitespace around a header value is not part of it."""
        self.server.receive_data(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX:  \t a b \t \r\nY:\r\n\r\n")
        request = self.server.next_event()
        self.assertEqual(list(request.headers), [(b"host", b"a"), (b"x", b"a b"), (b"y", b"")])

    def test_bodies(self):
        """Content-Length and chunked bodies arrive as Data, chunk framing and trailers removed."""
        self.server.receive_data(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
        self.server.receive_data(b"cde")
        events = drain(self.server)
        self.assertEqual(body_of(events), b"abcde")
        server = ServerConnection()
        server.receive_data(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
        events = drain(server)
        self.assertEqual(body_of(events), b"abcde")
        self.assertEqual(list(events[0].headers), [(b"host", b"a"), (b"transfer-encoding", b"chunked")])
        self.assertIs(type(events[-2]), EndOfMessage)

    def test_pipelined(self):
        """A second request waits (PAUSED) until the first exchange is over."""
        self.server.receive_data(GET + GET.replace(b"/x", b"/y"))
        self.assertEqual(drain(self.server)[-1], PAUSED)
        self.assertTrue(self.server.has_pending_input)
        self.server.send(Response(204, b"No Content", []))
        self.server.send(EndOfMessage())
        self.server.start_next_cycle()
        self.assertEqual(drain(self.server)[0].target, b"http://a.example/y")

    def test_partial_pipelined_head(self):
        """The start of a next head counts as pending input."""
        self.server.receive_data(GET + b"GET http://b/ HTTP/1.1\r\n")
        self.assertEqual(drain(self.server)[-1], PAUSED)
        self.assertTrue(self.server.has_pending_input)

    def test_connection_close(self):
        """After a request with Connection: close nothing more is read, and no error follows."""
        self.server.receive_data(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                                 b"garbage\r\n\r\n")
        request, end, need = drain(self.server)
        self.assertEqual((self.server.their_state, need), (MUST_CLOSE, NEED_DATA))
        head = self.server.send(Response(200, b"OK", [(b"Content-Length", b"0")]))
        self.assertIn(b"Connection: close\r\n", head)
        self.server.send(EndOfMessage())
        self.assertIs(self.server.our_state, MUST_CLOSE)

    def test_http10(self):
        """An HTTP/1.0 user gets a close-delimited body and Connection: close."""
        self.server.receive_data(b"GET http://a/ HTTP/1.0\r\n\r\n")
        drain(self.server)
        head = self.server.send(Response(200, b"OK", [(b"X", b"1")]))
        self.assertEqual(head, b"HTTP/1.1 200 OK\r\nX: 1\r\nConnection: close\r\n\r\n")
        self.assertEqual(self.server.send(Data(b"raw")), b"raw")
        self.assertEqual(self.server.send(EndOfMessage()), b"")
        self.assertIs(self.server.our_state, MUST_CLOSE)

    def test_connect(self):
        """Bytes after CONNECT are not parsed; they wait for the tunnel."""
        self.server.receive_data(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01")
        self.server.receive_data(b"more")
        request, end, paused = drain(self.server)
        self.assertEqual((request.method, request.target, paused), (b"CONNECT", b"a:443", PAUSED))
        self.server.receive_data(b"")
        self.assertEqual(self.server.take_upgraded_data(), (b"\x16\x03\x01more", True))

    def test_connect_http10(self):
        """An HTTP/1.0 CONNECT (the connection's last request) keeps the bytes after it too."""
        self.server.receive_data(b"CONNECT a:443 HTTP/1.0\r\n\r\n\x16\x03\x01")
        self.server.receive_data(b"hello")
        self.assertEqual(drain(self.server)[-1], PAUSED)
        self.assertEqual(self.server.take_upgraded_data(), (b"\x16\x03\x01hello", False))

    def test_refused_connect_then_http(self):
        """After a refused CONNECT, what followed it is read as HTTP."""
        self.server.receive_data(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n" + GET)
        drain(self.server)
        self.server.send(Response(403, b"Forbidden", [(b"Content-Length", b"0")]))
        self.server.send(EndOfMessage())
        self.server.start_next_cycle()
        self.assertEqual(drain(self.server)[0].target, b"http://a.example/x")

    def test_pipelined_connect(self):
        """A CONNECT behind a GET is not mistaken for a refused one."""
        self.server.receive_data(GET + b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\ntls")
        drain(self.server)
        self.server.send(Response(204, b"No Content", []))
        self.server.send(EndOfMessage())
        self.server.start_next_cycle()
        self.assertEqual(drain(self.server)[0].method, b"CONNECT")
        self.assertEqual(self.server.take_upgraded_data(), (b"tls", False))

    def test_upgrade_without_body(self):
        """An Upgrade we never grant leaves the connection plain HTTP."""
        self.server.receive_data(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n"
                                 b"Upgrade: websocket\r\n\r\n" + GET)
        self.assertEqual(drain(self.server)[-1], PAUSED)
        self.server.send(Response(200, b"OK", [(b"Content-Length", b"0")]))
        self.server.send(EndOfMessage())
        self.server.start_next_cycle()
        self.assertEqual(drain(self.server)[0].target, b"http://a.example/x")

    def assert_error(self, data, status):
        server = ServerConnection()
        for piece in data if isinstance(data, list) else [data]:
            server.receive_data(piece)
        with self.assertRaises(RemoteProtocolError) as caught:
            drain(server)
        self.assertEqual(caught.exception.error_status_hint, status)
        # And again: a broken connection stays broken.
        self.assertRaises(RemoteProtocolError, server.next_event)

    def test_errors(self):
        """Malformed requests raise with the status to answer."""
        self.assert_error(b"\x16\x03\x01 hello\r\n\r\n", 400)
        self.assert_error(b"GET http://a/ HTTP/1.1\r\n\r\n", 400)  # no Host
        self.assert_error(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)
        self.assert_error(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", 400)
        self.assert_error(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400)
        self.assert_error(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n", 400)
        self.assert_error(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                          501)
        self.assert_error(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n"
                          b"Upgrade: h2c\r\nContent-Length: 3\r\n\r\nabc", 400)
        self.assert_error(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                          400)
        # llhttp reads "chunked<TAB>" as no chunking: refused before the head is taken.
        self.assert_error(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n"
                          b"3\r\nabc\r\n0\r\n\r\n", 501)

    def test_broken_request_behind_a_good_one(self):
        """A malformed pipelined request waits until the good one before it is answered."""
        self.server.receive_data(GET + b"GET http://a/ HTTP/1.1\r\nBad Header: x\r\n\r\n")
        self.assertEqual(drain(self.server)[-1], PAUSED)
        self.server.send(Response(204, b"No Content", []))
        self.server.send(EndOfMessage())
        self.server.start_next_cycle()
        self.assertRaises(RemoteProtocolError, self.server.next_event)

    def test_pipelining_is_bounded(self):
        """Requests parsed ahead are capped; the one past the cap is an error after the others."""
        self.server.receive_data(GET * (http11_parse.MAX_PIPELINED + 5))
        served = 0
        with self.assertRaises(RemoteProtocolError):
            while True:
                events = drain(self.server)
                self.assertIs(type(events[0]), Request)
                served += 1
                self.server.send(Response(204, b"No Content", []))
                self.server.send(EndOfMessage())
                self.server.start_next_cycle()
        self.assertEqual(served, http11_parse.MAX_PIPELINED)

    def test_unknown_method(self):
        """A well-formed method llhttp does not know is 501; garbage stays 400."""
        self.assert_error(b"BAN http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 501)
        self.assert_error(b"get http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 501)
        self.assert_error(b"\x00\x01 http://a/ HTTP/1.1\r\n\r\n", 400)

    def test_trailers_size(self):
        """Trailers that never end are cut off like a head that never ends."""
        chunked = b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.assert_error([chunked + b"2\r\nhi\r\n0\r\nX-T: "] + [b"a" * 4096] * 5, 431)
        # A body that trickles in a byte at a time is progress, not a stall.
        server = ServerConnection()
        for byte in chunked + b"5\r\nhello\r\n" + b"3\r\nabc\r\n" * 3000 + b"0\r\n\r\n":
            server.receive_data(bytes([byte]))
        self.assertEqual(len(body_of(drain(server))), 5 + 3 * 3000)
        # Nor is a long body whose chunk framing comes in reads of its own.
        server = ServerConnection()
        server.receive_data(chunked)
        for _ in range(20000):
            server.receive_data(b"1\r\n")
            server.receive_data(b"x\r\n")
        server.receive_data(b"0\r\n\r\n")
        self.assertEqual(len(body_of(drain(server))), 20000)

    def test_head_size(self):
        """Heads past the limit are answered 431, whether complete or still arriving."""
        self.assert_error(b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * 20000, 431)
        self.assert_error([b"GET http://a/ HTTP/1.1\r\n"] + [b"X: " + b"a" * 1000 + b"\r\n"] * 17, 431)
        self.assert_error(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431)

    def test_large_body_then_next_head(self):
        """A large body followed by the start of the next head in one read is not 'a large head'."""
        body = b"b" * 100000
        self.server.receive_data(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
                                 + body + b"GET http://a/ HTTP/1.1\r\n")
        events = drain(self.server)
        self.assertEqual((body_of(events), events[-1]), (body, PAUSED))

    def test_eof(self):
        """EOF between requests is ConnectionClosed; in the middle of one, an error."""
        self.server.receive_data(b"")
        self.assertIs(type(self.server.next_event()), ConnectionClosed)
        self.assert_error([b"GET http://a/ HTTP/1.1\r\nHo", b""], 400)
        self.assert_error([b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab", b""],
                          400)

    def test_expect_continue(self):
        """100-continue is awaited until an answer or the body moves; a 103 is no answer to it."""
        self.server.receive_data(b"PUT http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
                                 b"Expect: 100-continue\r\n\r\n")
        drain(self.server)
        self.assertTrue(self.server.they_are_waiting_for_100_continue)
        self.server.send(InformationalResponse(103, b"Early Hints", [(b"Link", b"</s>")]))
        self.assertTrue(self.server.they_are_waiting_for_100_continue)
        self.assertEqual(self.server.send(InformationalResponse(100, b"Continue", [])),
                         b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertFalse(self.server.they_are_waiting_for_100_continue)


class ResponseWritingTests(SynchronousTestCase):
    """ServerConnection framing the responses we send."""

    def respond(self, request, response, body):
        server = ServerConnection()
        server.receive_data(request)
        drain(server)
        data = server.send(response) + server.send(Data(body)) + server.send(EndOfMessage())
        return server, data

    def test_length_kept(self):
        """A Content-Length response is sent as it is, and the connection stays open."""
        server, data = self.respond(GET, Response(200, b"OK", [(b"Content-Length", b"2")]), b"ok")
        self.assertEqual(data, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        server.start_next_cycle()
        self.assertEqual((server.our_state, server.their_state), (IDLE, IDLE))

    def test_chunked(self):
        """Without a length, an HTTP/1.1 user gets chunks."""
        _, data = self.respond(GET, Response(200, b"OK", []), b"abc")
        self.assertEqual(data, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")

    def test_no_body(self):
        """HEAD, 204 and 304 answers carry no body, whatever is offered."""
        _, data = self.respond(GET.replace(b"GET", b"HEAD"),
                               Response(200, b"OK", [(b"Content-Length", b"9")]), b"dropped")
        self.assertEqual(data, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
        _, data = self.respond(GET, Response(304, b"Not Modified", []), b"dropped")
        self.assertEqual(data, b"HTTP/1.1 304 Not Modified\r\n\r\n")

    def test_wrong_length(self):
        """Sending more or less than the declared length is our bug, and refused."""
        server = ServerConnection()
        server.receive_data(GET)
        drain(server)
        server.send(Response(200, b"OK", [(b"Content-Length", b"2")]))
        self.assertRaises(http11.LocalProtocolError, server.send, Data(b"abc"))
        server = ServerConnection()
        server.receive_data(GET)
        drain(server)
        server.send(Response(200, b"OK", [(b"Content-Length", b"2")]))
        self.assertRaises(http11.LocalProtocolError, server.send, EndOfMessage())

    @settings(max_examples=150, deadline=None)
    @given(
        status=st.sampled_from([200, 201, 204, 206, 304, 400, 404, 500]),
        body=st.binary(max_size=300),
        framing=st.sampled_from(["length", "none"]),
        method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
        version=st.sampled_from([b"1.0", b"1.1"]),
        pieces=st.integers(min_value=1, max_value=4),
    )
    def test_h11_reads_what_we_write(self, status, body, framing, method, version, pieces):
        """h11, as the user, reads our responses back intact."""
        server = ServerConnection()
        user = h11.Connection(h11.CLIENT)
        # h11 writes only HTTP/1.1 requests; it reads 1.0 answers fine.
        raw = b"%s http://a/ HTTP/%s\r\nHost: a\r\nContent-Length: 0\r\n\r\n" % (method, version)
        user.send(h11.Request(method=method, target=b"http://a/", headers=[(b"Host", b"a")]))
        user.send(h11.EndOfMessage())
        server.receive_data(raw)
        drain(server)
        no_body = status in (204, 304) or method == b"HEAD"
        response_headers = [(b"X-Status", b"%d" % status)]
        if framing == "length":
            response_headers.append((b"Content-Length", b"%d" % (0 if no_body else len(body))))
        data = server.send(Response(status, b"Reason", response_headers))
        step = max(1, len(body) // pieces)
        for start in range(0, len(body), step):
            data += server.send(Data(body[start:start + step]))
        data += server.send(EndOfMessage())
        user.receive_data(data)
        if server.our_state is MUST_CLOSE:
            user.receive_data(b"")
        events = []
        while True:
            event = user.next_event()
            if event is h11.NEED_DATA or type(event) is h11.ConnectionClosed:
                break
            events.append(event)
        self.assertEqual(events[0].status_code, status)
        self.assertEqual(dict(events[0].headers)[b"x-status"], b"%d" % status)
        received = b"".join(event.data for event in events if type(event) is h11.Data)
        self.assertEqual(received, b"" if no_body else body)
        self.assertIs(type(events[-1]), h11.EndOfMessage)


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
_value = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ;=/,.", max_size=30).map(
    lambda text: text.strip().encode())
_framing_names = {b"host", b"content-length", b"transfer-encoding", b"connection", b"expect",
                  b"upgrade"}
_extra_headers = st.lists(
    st.tuples(_token.filter(lambda name: name not in _framing_names), _value), max_size=8)


class RequestPropertyTests(SynchronousTestCase):
    """Whatever h11 writes, split however the network likes, we read the same."""

    @settings(max_examples=200, deadline=None)
    @given(
        method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS"]),
        path=st.text(alphabet="abcxyz/?=&%09", max_size=20).map(str.encode),
        headers=_extra_headers,
        body=st.binary(max_size=500),
        chunked=st.booleans(),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
        repeat=st.integers(min_value=1, max_value=3),
    )
    def test_requests(self, method, path, headers, body, chunked, cuts, repeat):
        user = h11.Connection(h11.CLIENT)
        all_headers = [(b"Host", b"a.example")] + headers
        all_headers.append((b"Transfer-Encoding", b"chunked") if chunked
                           else (b"Content-Length", b"%d" % len(body)))
        target = b"http://a.example/" + path
        raw = b""
        for _ in range(repeat):
            raw += user.send(h11.Request(method=method, target=target, headers=all_headers))
            if body:
                raw += user.send(h11.Data(data=body[:7])) + user.send(h11.Data(data=body[7:]))
            raw += user.send(h11.EndOfMessage())
            user.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
            while user.next_event() is not h11.NEED_DATA:
                pass
            user.start_next_cycle()
        server = ServerConnection()
        for piece in split(raw, cuts):
            server.receive_data(piece)
        for _ in range(repeat):
            events = drain(server)
            request = events[0]
            self.assertIs(type(request), Request)
            self.assertEqual((request.method, request.target), (method, target))
            expected = [(name.lower(), value) for name, value in all_headers]
            self.assertEqual(list(request.headers), expected)
            self.assertEqual(body_of(events), body)
            self.assertIs(type(events[-2]), EndOfMessage)
            server.send(Response(204, b"No Content", []))
            server.send(EndOfMessage())
            server.start_next_cycle()
        self.assertEqual(drain(server), [NEED_DATA])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=400), max_size=4))
    def test_garbage(self, data, cuts):
        """Arbitrary bytes give events or a RemoteProtocolError, never anything else."""
        server = ServerConnection()
        for piece in split(data, cuts):
            server.receive_data(piece)
        try:
            for _ in range(50):
                event = server.next_event()
                if event is NEED_DATA or event is PAUSED or type(event) is ConnectionClosed:
                    break
        except RemoteProtocolError as error:
            self.assertIn(error.error_status_hint, (400, 431, 501))


class ClientTests(SynchronousTestCase):
    """ClientConnection: requests out, responses in."""

    def setUp(self):
        self.client = ClientConnection()

    def send(self, method=b"GET", headers=((b"Host", b"a"),), body=b""):
        data = self.client.send(Request(method, b"/", list(headers)))
        if body:
            data += self.client.send(Data(body))
        return data + self.client.send(EndOfMessage())

    def test_request_framing(self):
        """Requests are written as given; a chunked body is chunked again."""
        data = self.send(b"POST", [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], b"abc")
        self.assertEqual(data, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"3\r\nabc\r\n0\r\n\r\n")

    def test_reuse(self):
        """A clean keep-alive exchange leaves the connection reusable for the next one."""
        self.send()
        self.client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        response, data, end, need = drain(self.client)
        self.assertEqual((response.status_code, response.reason, data.data), (200, b"OK", b"ok"))
        self.assertTrue(self.client.reusable)
        self.client.start_next_cycle()
        self.send()
        self.client.receive_data(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(drain(self.client)[0].status_code, 404)

    def test_not_reusable(self):
        """Close, HTTP/1.0, a close-delimited body, HEAD or bytes past the response end reuse."""
        for method, reply in [
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            (b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n"),
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        ]:
            client = ClientConnection()
            client.send(Request(method, b"/", [(b"Host", b"a")]))
            client.send(EndOfMessage())
            client.receive_data(reply)
            events = drain(client)
            self.assertIs(type(events[-2]), EndOfMessage, reply)
            self.assertFalse(client.reusable, reply)

    def test_close_delimited(self):
        """A response without length ends at EOF."""
        self.send()
        self.client.receive_data(b"HTTP/1.1 200 OK\r\n\r\nabc")
        self.client.receive_data(b"def")
        events = drain(self.client)
        self.assertEqual(body_of(events), b"abcdef")
        self.client.receive_data(b"")
        self.assertIs(type(self.client.next_event()), EndOfMessage)
        self.assertIs(self.client.their_state, MUST_CLOSE)

    def test_informational(self):
        """1xx responses come first, then the final one."""
        self.send()
        self.client.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                                 b"Link: </s>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        events = drain(self.client)
        self.assertEqual([type(event) for event in events[:3]],
                         [InformationalResponse, InformationalResponse, Response])
        self.assertEqual(events[1].headers.raw_items(), [(b"Link", b"</s>")])
        self.assertTrue(self.client.reusable)

    def test_tab_after_chunked(self):
        """A response's "chunked<TAB>" (which llhttp reads unchunked) is an error, not a body."""
        client = ClientConnection()
        client.send(Request(b"GET", b"/", [(b"Host", b"a")]))
        client.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\t\r\n\r\n"
                            b"3\r\nabc\r\n0\r\n\r\n")
        self.assertRaises(RemoteProtocolError, drain, client)
        client = ClientConnection()
        client.send(Request(b"GET", b"/", [(b"Host", b"a")]))
        client.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked  \r\n\r\n"
                            b"3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(body_of(drain(client)), b"abc")

    def test_informational_with_a_body(self):
        """A 1xx announcing a body is a broken origin: an error, not data before the response."""
        for head in (b"HTTP/1.1 150 X\r\nContent-Length: 5\r\n\r\nhello",
                     b"HTTP/1.1 199 X\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"):
            client = ClientConnection()
            client.send(Request(b"GET", b"/", [(b"Host", b"a")]))
            client.receive_data(head + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            self.assertRaises(RemoteProtocolError, drain, client)
        client = ClientConnection()
        client.send(Request(b"GET", b"/", [(b"Host", b"a")]))
        client.receive_data(b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual([type(event) for event in drain(client)][:2], [InformationalResponse, Response])

    def test_eof(self):
        """EOF before any answer is ConnectionClosed; in a head or a framed body, an error."""
        self.send()
        self.client.receive_data(b"")
        self.assertIs(type(self.client.next_event()), ConnectionClosed)
        for partial in [b"HTTP/1.1 200 OK\r\nContent-", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"]:
            client = ClientConnection()
            client.send(Request(b"GET", b"/", [(b"Host", b"a")]))
            client.receive_data(partial)
            client.receive_data(b"")
            self.assertRaises(RemoteProtocolError, drain, client)

    def test_bare_lf(self):
        """Bare LF line ends from an origin are read (we write every head anew)."""
        self.send()
        self.client.receive_data(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")
        response, data, end, need = drain(self.client)
        self.assertEqual((response.status_code, data.data), (200, b"ok"))

    def test_endless_trailers(self):
        """An origin's trailers are limited too."""
        self.send()
        self.client.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: ")
        for _ in range(20):
            self.client.receive_data(b"a" * 4096)
        self.assertRaises(RemoteProtocolError, drain, self.client)

    def test_errors(self):
        """Garbage, a 101, an unknown coding and a huge head are errors."""
        for reply in [b"SSH-2.0-OpenSSH\r\n\r\n",
                      b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
                      b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                      b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n"]:
            client = ClientConnection()
            client.send(Request(b"GET", b"/", [(b"Host", b"a")]))
            client.receive_data(reply)
            self.assertRaises(RemoteProtocolError, drain, client)

    @settings(max_examples=200, deadline=None)
    @given(
        status=st.sampled_from([200, 201, 204, 304, 404, 500]),
        headers=_extra_headers,
        body=st.binary(max_size=500),
        framing=st.sampled_from(["length", "chunked", "close"]),
        informational=st.booleans(),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    )
    def test_responses(self, status, headers, body, framing, informational, cuts):
        """Whatever h11 answers, split anywhere, we read the same."""
        self.client = ClientConnection()
        origin = h11.Connection(h11.SERVER)
        origin.receive_data(self.send())
        origin.next_event()
        origin.next_event()
        no_body = status in (204, 304)
        if no_body:
            body = b""
        all_headers = list(headers)
        if framing == "length":
            all_headers.append((b"Content-Length", b"%d" % len(body)))
        elif framing == "chunked" and not no_body:
            all_headers.append((b"Transfer-Encoding", b"chunked"))
        elif not no_body:
            all_headers.append((b"Connection", b"close"))
        raw = b""
        if informational:
            raw += origin.send(h11.InformationalResponse(status_code=100, headers=[]))
        raw += origin.send(h11.Response(status_code=status, headers=all_headers))
        if body:
            raw += origin.send(h11.Data(data=body))
        raw += origin.send(h11.EndOfMessage())
        for piece in split(raw, cuts):
            self.client.receive_data(piece)
        if framing == "close" and not no_body:
            self.client.receive_data(b"")
        events = []
        while True:
            event = self.client.next_event()
            if event is NEED_DATA or type(event) is ConnectionClosed:
                break
            events.append(event)
        final = [event for event in events if type(event) is Response]
        self.assertEqual(len(final), 1)
        self.assertEqual(final[0].status_code, status)
        self.assertEqual(final[0].headers.raw_items()[:len(headers)], headers)
        self.assertEqual(body_of(events), body)
        self.assertIs(type(events[-1]), EndOfMessage)
        self.assertEqual(self.client.reusable, framing != "close" or no_body)


class StateTests(SynchronousTestCase):
    """Sending out of turn is refused."""

    def test_out_of_turn(self):
        server = ServerConnection()
        self.assertRaises(http11.LocalProtocolError, server.send, Data(b"x"))
        client = ClientConnection()
        self.assertRaises(http11.LocalProtocolError, client.send, EndOfMessage())
        client.send(Request(b"GET", b"/", [(b"Host", b"a")]))
        self.assertIs(client.our_state, SEND_BODY)
        self.assertRaises(http11.LocalProtocolError, client.send, Request(b"GET", b"/", []))
        self.assertRaises(http11.LocalProtocolError, client.start_next_cycle)


class UserResponseTests(SynchronousTestCase):
    """What of an origin's response head goes on to the user (anyproxy.frontends.http.messages)."""

    def test_no_length_on_204(self):
        """RFC 9110 8.6: a 204 carries no Content-Length, even when the origin sent one."""
        from anyproxy.frontends.http.messages import user_response
        from anyproxy.frontends.http.parse import Headers
        response = Response(204, b"No Content", Headers([(b"content-length", b"6"),
                                                         (b"x-kept", b"1")]))
        names = [name.lower() for name, _ in user_response(response).headers.raw_items()]
        self.assertEqual(names, [b"x-kept"])
        response = Response(200, b"OK", Headers([(b"content-length", b"6")]))
        self.assertEqual(user_response(response).headers.get_all(b"content-length"), [b"6"])
