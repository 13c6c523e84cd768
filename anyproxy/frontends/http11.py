# -*- test-case-name: tests.test_http11 -*-
"""
HTTP/1.1 connections for the proxy, without I/O: bytes in, events out.

llhttp (Node's parser, through httptools) parses and validates messages in
C; this module turns its callbacks into events and keeps the per-connection
rules a proxy needs, in the shape h11 gave them: a L{ServerConnection} for a
user's connection and a L{ClientConnection} for a connection to an origin,
each with C{receive_data}, C{next_event}, C{send}, an C{our_state} and a
C{their_state}.  h11 did this before, in pure Python, and it was half of the
gateway's time per forwarded request; the tests still use h11 as the peer.

One exchange at a time (one cycle):

  - the request's sender goes IDLE -> SEND_BODY -> DONE, or MUST_CLOSE when
    the connection ends with this exchange (C{Connection: close}, HTTP/1.0);
  - the response's sender goes (SEND_RESPONSE ->) SEND_BODY -> DONE or
    MUST_CLOSE, the same way;
  - C{start_next_cycle} starts the next exchange once both are DONE.

What each side may send:

  - A request body is framed as its headers say (C{Content-Length} or
    C{Transfer-Encoding: chunked}, the only coding accepted, as h11 did).
  - A response we send with neither header gets a chunked body for an
    HTTP/1.1 user, or C{Connection: close} and a close-delimited body for an
    HTTP/1.0 one.  C{Connection: close} is added whenever the exchange is the
    connection's last.
  - Responses to C{HEAD} and 204/304 responses carry no body.

Bytes after a request that upgrades the connection (CONNECT) are not parsed:
they wait in C{trailing_data} for the tunnel, or are parsed as HTTP if the
CONNECT is refused.  A pipelined request waits (C{next_event} returns
L{PAUSED}) until the current exchange is over; so does a malformed one, whose
error is raised only then.

Limits: a head (or trailers) that stays incomplete past C{max_head_size} is
an error with status 431.  A read in which one message ended and the next
began is not counted, so the slack is one read.

Where llhttp is stricter than h11 was (RFC 9112 allows each): methods it does
not know are refused (501), and so are obs-fold line continuations and
repeated C{Content-Length} headers.  Responses may end lines with a bare LF.
A connection that carried a HEAD is not reused: llhttp cannot be told that no
body follows, so we stop it after the head and cannot see what came next.
"""

import re
from collections import deque

import attr
import httptools

__all__ = [
    "NEED_DATA", "PAUSED",
    "IDLE", "SEND_RESPONSE", "SEND_BODY", "DONE", "MUST_CLOSE", "CLOSED", "ERROR",
    "ProtocolError", "RemoteProtocolError", "LocalProtocolError",
    "Headers", "Request", "Response", "InformationalResponse", "Data", "EndOfMessage",
    "ConnectionClosed", "ServerConnection", "ClientConnection",
]


class _Sentinel:
    def __init__(self, name):
        self._name = name

    def __repr__(self):
        return self._name


# What next_event returns when it has no event to give.
NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes
PAUSED = _Sentinel("PAUSED")  # the next request waits for start_next_cycle

# Connection states, per side.
IDLE = _Sentinel("IDLE")
SEND_RESPONSE = _Sentinel("SEND_RESPONSE")
SEND_BODY = _Sentinel("SEND_BODY")
DONE = _Sentinel("DONE")
MUST_CLOSE = _Sentinel("MUST_CLOSE")
CLOSED = _Sentinel("CLOSED")
ERROR = _Sentinel("ERROR")


class ProtocolError(Exception):
    """
    A message broke HTTP/1.1.

    @ivar error_status_hint: the status to answer with, when we answer.
    """

    def __init__(self, message, error_status_hint=400):
        super().__init__(message)
        self.error_status_hint = error_status_hint


class RemoteProtocolError(ProtocolError):
    """The peer sent something we cannot accept."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the connection's state forbids."""


class Headers(list):
    """
    Header fields as received: C{(lower-case name, value)} pairs, in order.

    C{raw_names} keeps each name as the sender spelled it, for forwarding.
    """

    __slots__ = ("raw_names",)

    def __init__(self, pairs=(), raw_names=None):
        super().__init__(pairs)
        self.raw_names = raw_names if raw_names is not None else [name for name, _ in self]

    def raw_items(self):
        """C{(name as received, value)} pairs."""
        return [(raw, value) for raw, (_, value) in zip(self.raw_names, self)]

    def get_all(self, name):
        """Every value of lower-case header C{name}."""
        return [value for header, value in self if header == name]


def _headers(pairs):
    if type(pairs) is Headers:
        return pairs
    return Headers([(name.lower(), value) for name, value in pairs],
                   [name for name, _ in pairs])


@attr.s(slots=True, eq=False)
class Request:
    """
    A request head.  C{headers} is a L{Headers} when received; to send one,
    any C{(name, value)} pairs (names sent as spelled).
    """

    method = attr.ib()
    target = attr.ib()
    headers = attr.ib(converter=_headers)
    http_version = attr.ib(default=b"1.1")


@attr.s(slots=True, eq=False)
class Response:
    """A final (2xx-5xx) response head."""

    status_code = attr.ib()
    reason = attr.ib(default=b"")
    headers = attr.ib(default=(), converter=_headers)
    http_version = attr.ib(default=b"1.1")


@attr.s(slots=True, eq=False)
class InformationalResponse(Response):
    """A 1xx response head (100 Continue, 103 Early Hints)."""


@attr.s(slots=True, eq=False)
class Data:
    """A piece of a body (chunked framing already removed)."""

    data = attr.ib()


@attr.s(slots=True, eq=False)
class EndOfMessage:
    """The body ended (trailers are dropped: we never forward them)."""


@attr.s(slots=True, eq=False)
class ConnectionClosed:
    """The peer closed its side cleanly, between messages."""


_END = EndOfMessage()
_CLOSED = ConnectionClosed()


def _tokens(headers, name):
    """The lower-case comma-separated tokens of header C{name}."""
    found = []
    for header, value in headers:
        if header == name:
            found.extend(token.strip().lower() for token in value.split(b","))
    return found


def _keep_alive(http_version, headers):
    """Whether a message lets its connection carry another exchange (as h11: 1.1 only)."""
    return http_version == b"1.1" and b"close" not in _tokens(headers, b"connection")


def _write_head(first_line, headers, extra):
    parts = [first_line]
    for name, value in headers:
        parts.append(b"%s: %s\r\n" % (name, value))
    for name, value in extra:
        parts.append(b"%s: %s\r\n" % (name, value))
    parts.append(b"\r\n")
    return b"".join(parts)


# A method token (RFC 9110 5.6.2) and the space after it, at a message's start.
_METHOD = re.compile(rb"(?:\r\n)*[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp at that point."""


class _BodyWriter:
    """Frames the body of the message we send; C{None} length = close-delimited."""

    __slots__ = ("chunked", "remaining")

    def __init__(self, chunked=False, length=None):
        self.chunked = chunked
        self.remaining = length

    def data(self, data):
        if self.chunked:
            if not data:
                return b""
            return b"%x\r\n%s\r\n" % (len(data), data)
        if self.remaining is not None:
            self.remaining -= len(data)
            if self.remaining < 0:
                raise LocalProtocolError("more body than the declared Content-Length")
        return data

    def end(self):
        if self.chunked:
            return b"0\r\n\r\n"
        if self.remaining:
            raise LocalProtocolError("less body than the declared Content-Length")
        return b""


class _NoBody:
    """Responses to HEAD, 204 and 304: any body offered is dropped (RFC 9110 9.3.2)."""

    chunked = False

    def data(self, data):
        return b""

    def end(self):
        return b""


_NO_BODY = _NoBody()


class _Reader:
    """
    llhttp's callbacks as a queue of events, for one direction of a connection.

    Subclasses build the head event (C{_head}).  Parse errors become a
    L{RemoteProtocolError} queued where they happened.
    """

    _parser_class = None

    def __init__(self, max_head_size):
        self._max_head_size = max_head_size
        self.events = deque()
        self._new_parser()

    def _new_parser(self):
        self._parser = self._parser_class(self)
        self._in_head = False
        self._in_message = False
        self._stalled = 0  # bytes fed since the message last produced an event
        self._progress = False  # an event was produced in the current feed
        self.stopped = False

    def feed(self, data):
        """Parse C{data}; returns the offset where an upgrade stopped parsing, or C{None}."""
        if self.stopped:
            return None
        self._progress = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            return upgrade.args[0]
        except _Stop:
            self.stopped = True
        except httptools.HttpParserError as error:
            self.stopped = True
            if not isinstance(error.__context__, _Stop):
                self.events.append(RemoteProtocolError(*self._describe(error, data)))
            return None
        if self._in_message and not self._progress:
            # llhttp holds nothing, but httptools gathers a header (or a
            # trailer) until it ends, and we the head: a head or trailers
            # that never end must cost at most about the limit.  A read in
            # which an event came is not counted: the slack is one read.
            self._stalled += len(data)
            if self._stalled > self._max_head_size:
                self.stopped = True
                self.events.append(RemoteProtocolError("message head or trailers too large", 431))
        return None

    def _describe(self, error, data):
        """The message and status for llhttp's C{error}."""
        return "malformed message: %s" % (error,), 400

    def on_message_begin(self):
        self._in_head = self._in_message = True
        self._stalled = 0
        self._size = 0
        self._names = []
        self._raw_names = []
        self._values = []
        self._first = b""

    def on_header(self, name, value):
        if not self._in_head:
            return  # a chunked body's trailer: dropped
        self._size += len(name) + len(value) + 4
        self._raw_names.append(name)
        self._names.append(name.lower())
        self._values.append(value)

    def on_headers_complete(self):
        self._in_head = False
        self._progress = True
        if self._size + len(self._first) > self._max_head_size:
            self.events.append(RemoteProtocolError("message head too large", 431))
            raise _Stop()
        headers = Headers(zip(self._names, self._values), self._raw_names)
        self._head(headers, self._parser.get_http_version().encode("ascii"))

    def on_body(self, body):
        self._progress = True
        self.events.append(Data(body))

    def on_message_complete(self):
        self._in_message = False
        self._progress = True
        self.events.append(_END)


class _RequestReader(_Reader):
    _parser_class = httptools.HttpRequestParser
    _keep_alive = True  # of the request being read

    def on_url(self, url):
        self._first += url

    def _head(self, headers, version):
        # h11's checks beyond llhttp's: the rules of RFC 9112 3.2 and 6.1.
        hosts = 0
        for name, value in headers:
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
                self.events.append(RemoteProtocolError(
                    "only Transfer-Encoding: chunked is supported", 501))
                raise _Stop()
        if hosts > 1 or (hosts == 0 and version == b"1.1"):
            self.events.append(RemoteProtocolError("a request needs exactly one Host header"))
            raise _Stop()
        method = self._parser.get_method()
        if method != b"CONNECT" and self._parser.should_upgrade() and (
            headers.get_all(b"content-length") not in ([], [b"0"])
            or headers.get_all(b"transfer-encoding")
        ):
            # llhttp would take the body for the upgraded protocol's bytes
            # and we would parse it as requests: refuse rather than guess.
            self.events.append(RemoteProtocolError("a body with Upgrade is not supported"))
            raise _Stop()
        self._keep_alive = _keep_alive(version, headers)
        self.events.append(Request(method, self._first, headers, version))

    def on_message_complete(self):
        _Reader.on_message_complete(self)
        if not self._keep_alive and self._parser.get_method() != b"CONNECT":
            # The connection ends with this request: whatever follows is
            # never read (llhttp would call it an error).  After a CONNECT
            # it is the tunnel's: llhttp hands it over as an upgrade.
            raise _Stop()

    def _describe(self, error, data):
        if isinstance(error, httptools.HttpParserInvalidMethodError) and _METHOD.match(data):
            # A well-formed method llhttp does not know (BAN, lower-case
            # get...): not implemented, rather than malformed (RFC 9110 9.1).
            return "method not supported", 501
        return _Reader._describe(self, error, data)


class _ResponseReader(_Reader):
    _parser_class = httptools.HttpResponseParser

    def _new_parser(self):
        _Reader._new_parser(self)
        # Bare LF line ends are common in small embedded servers; we write
        # every head anew, so reading them costs no framing ambiguity.
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)

    method = None  # of the request being answered
    final = False  # the final response head arrived
    trailing = False  # bytes came after the response ended

    def on_message_begin(self):
        if self.final:
            # A second response, or junk: nothing may follow the answer.
            self.trailing = True
            raise _Stop()
        _Reader.on_message_begin(self)

    def on_status(self, status):
        self._first += status

    def _head(self, headers, version):
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                self.events.append(RemoteProtocolError("an unrequested protocol switch"))
                raise _Stop()
            self.events.append(InformationalResponse(status, self._first, headers, version))
            return
        self.final = True
        for name, value in headers:
            if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
                self.events.append(RemoteProtocolError("an unsupported Transfer-Encoding"))
                raise _Stop()
        self.events.append(Response(status, self._first, headers, version))
        if self.method == b"HEAD":
            # llhttp cannot be told a body will not follow; stop it here.
            # What came after the head is unknown, so the connection is
            # not used again (see ClientConnection.reusable).
            self.events.append(_END)
            raise _Stop()

    def on_message_complete(self):
        self._in_message = False
        self._progress = True
        if self.final:
            self.events.append(_END)

    def _describe(self, error, data):
        return "malformed response: %s" % (error,), 400


class _Connection:
    """What both sides share: the two states and the body writer."""

    their_http_version = None

    def __init__(self):
        self.our_state = IDLE
        self.their_state = IDLE
        self._writer = None
        self._eof = False

    def _send_data(self, data):
        if self.our_state is not SEND_BODY:
            raise LocalProtocolError("no message body is being sent")
        return self._writer.data(data)

    def _send_end(self, keep_alive):
        if self.our_state is not SEND_BODY:
            raise LocalProtocolError("no message body is being sent")
        data = self._writer.end()
        self._writer = None
        self.our_state = DONE if keep_alive else MUST_CLOSE
        return data

    def _take_error(self, error):
        self.their_state = ERROR
        self._keep_alive = False
        self._error = error
        raise error


class ServerConnection(_Connection):
    """
    The proxy's side of a user's connection: requests in, responses out.

    @ivar their_http_version: the current request's version (C{b"1.0"}...).
    @ivar they_are_waiting_for_100_continue: the request asked for
        C{100 Continue} and neither its body nor any answer has moved since.
    """

    they_are_waiting_for_100_continue = False

    def __init__(self, max_head_size=16 * 1024):
        _Connection.__init__(self)
        self._reader = _RequestReader(max_head_size)
        self._method = None
        self._keep_alive = True
        self._upgraded = False  # after CONNECT: bytes wait unparsed
        self._backlog = []
        self._error = None

    # -- receiving ------------------------------------------------------------

    def receive_data(self, data):
        """Bytes from the user; C{b""} when it closed its side."""
        if not data:
            self._eof = True
            return
        if self._upgraded:
            self._backlog.append(data)
            return
        offset = self._reader.feed(data)
        if offset is not None:
            self._upgrade_at(data[offset:])

    def _upgrade_at(self, rest):
        if self._reader.events and self._last_request_method() == b"CONNECT":
            self._upgraded = True
            if rest:
                self._backlog.append(rest)
            return
        # Another kind of upgrade (Upgrade: websocket...): we never grant
        # those (Upgrade is not forwarded), so the rest is just HTTP.
        reader = self._reader
        events = reader.events
        reader._new_parser()
        reader.events = events
        if rest:
            self.receive_data(rest)

    def _last_request_method(self):
        for event in reversed(self._reader.events):
            if type(event) is Request:
                return event.method
        return self._method

    @property
    def has_pending_input(self):
        """Whether the user sent anything past the events handed out so far."""
        return bool(self._reader.events or self._reader._in_head or self._backlog)

    def take_upgraded_data(self):
        """After a granted CONNECT: the bytes that followed it, and whether the user closed."""
        data, self._backlog = b"".join(self._backlog), []
        return data, self._eof

    def next_event(self):
        """
        The next event from the user, L{NEED_DATA} or L{PAUSED}.

        @raise RemoteProtocolError: the user broke HTTP/1.1 (again on every
            call after the first).
        """
        if self.their_state is ERROR:
            raise self._error
        events = self._reader.events
        if events:
            event = events[0]
            event_type = type(event)
            if event_type is Request:
                if self.their_state is not IDLE:
                    return PAUSED
                events.popleft()
                self._start_request(event)
                return event
            if event_type is Data:
                events.popleft()
                self.they_are_waiting_for_100_continue = False
                return event
            if event_type is EndOfMessage:
                events.popleft()
                self.they_are_waiting_for_100_continue = False
                self.their_state = DONE if self._keep_alive else MUST_CLOSE
                return event
            if self.their_state is DONE or self.their_state is MUST_CLOSE:
                # A broken request behind a good one: answer the good one first.
                return PAUSED
            events.popleft()
            self._take_error(event)
        if self.their_state is DONE or self.their_state is MUST_CLOSE:
            if self._upgraded or self.has_pending_input:
                return PAUSED
        if self._eof:
            if self.their_state is IDLE and not self._reader._in_head:
                self.their_state = CLOSED
                return _CLOSED
            if self.their_state in (DONE, MUST_CLOSE, CLOSED):
                self.their_state = CLOSED
                return _CLOSED
            self._take_error(RemoteProtocolError("the user closed in the middle of a request"))
        return NEED_DATA

    def _start_request(self, request):
        self.their_state = SEND_BODY
        self.our_state = SEND_RESPONSE
        self.their_http_version = request.http_version
        self._method = request.method
        self._keep_alive = _keep_alive(request.http_version, request.headers)
        self.they_are_waiting_for_100_continue = (
            request.http_version == b"1.1"
            and b"100-continue" in _tokens(request.headers, b"expect")
        )

    # -- sending --------------------------------------------------------------

    def send(self, event):
        """The bytes that send C{event} to the user."""
        event_type = type(event)
        if event_type is Data:
            return self._send_data(event.data)
        if event_type is EndOfMessage:
            return self._send_end(self._keep_alive)
        if event_type is Response:
            return self._send_response(event)
        if event_type is InformationalResponse:
            if self.our_state is not SEND_RESPONSE:
                raise LocalProtocolError("no request is waiting for an answer")
            self.they_are_waiting_for_100_continue = False
            return _write_head(b"HTTP/1.1 %d %s\r\n" % (event.status_code, event.reason),
                               event.headers.raw_items(), ())
        raise LocalProtocolError("cannot send %r" % (event,))

    def _send_response(self, response):
        if self.our_state is not SEND_RESPONSE and self.our_state is not IDLE:
            raise LocalProtocolError("a response was already sent")
        headers = response.headers
        lengths = headers.get_all(b"content-length")
        chunked = bool(headers.get_all(b"transfer-encoding"))
        status = response.status_code
        extra = []
        drop = ()
        if status in (204, 304) or self._method == b"HEAD":
            writer = _NO_BODY
        elif self._method == b"CONNECT" and 200 <= status < 300:
            writer = _NO_BODY
        elif lengths and not chunked:
            writer = _BodyWriter(length=int(lengths[0]))
        elif self.their_http_version == b"1.1":
            writer = _BodyWriter(chunked=True)
            drop = (b"content-length", b"transfer-encoding")
            extra.append((b"Transfer-Encoding", b"chunked"))
        else:
            # An HTTP/1.0 user (or none yet): the body ends with the connection.
            writer = _BodyWriter()
            drop = (b"content-length", b"transfer-encoding")
            self._keep_alive = False
        if self.their_http_version != b"1.1" or b"close" in _tokens(headers, b"connection"):
            self._keep_alive = False
        if not self._keep_alive:
            if b"close" not in _tokens(headers, b"connection"):
                extra.append((b"Connection", b"close"))
        pairs = headers.raw_items()
        if drop:
            pairs = [(raw, value) for (name, value), raw in zip(headers, headers.raw_names)
                     if name not in drop]
        self.our_state = SEND_BODY
        self.they_are_waiting_for_100_continue = False
        self._writer = writer
        return _write_head(b"HTTP/1.1 %d %s\r\n" % (status, response.reason), pairs, extra)

    def send_failed(self):
        """Nothing more can be sent (we will close)."""
        self.our_state = ERROR

    def start_next_cycle(self):
        """Both sides are DONE: the connection waits for the next request."""
        if self.our_state is not DONE or self.their_state is not DONE:
            raise LocalProtocolError("the exchange is not over")
        self.our_state = self.their_state = IDLE
        self._method = None
        if self._upgraded and not self._reader.events:
            # A refused CONNECT: what the user sent after it is HTTP after all.
            self._upgraded = False
            backlog, self._backlog = self._backlog, []
            self._reader._new_parser()
            for data in backlog:
                self.receive_data(data)


class ClientConnection(_Connection):
    """
    The proxy's side of a connection to an origin: requests out, responses in.

    One response per request; 1xx responses come before it as
    L{InformationalResponse}.
    """

    def __init__(self, max_head_size=64 * 1024):
        _Connection.__init__(self)
        self.their_state = SEND_RESPONSE
        self._max_head_size = max_head_size
        self._reader = _ResponseReader(max_head_size)
        self._keep_alive = True
        self._their_keep_alive = True
        self._until_close = False  # the response body ends with the connection
        self._error = None

    @property
    def reusable(self):
        """Whether the exchange ended cleanly and the connection may carry another."""
        return (self.our_state is DONE and self.their_state is DONE
                and not self._reader.trailing and self._reader.method != b"HEAD")

    # -- sending --------------------------------------------------------------

    def send(self, event):
        """The bytes that send C{event} to the origin."""
        event_type = type(event)
        if event_type is Data:
            return self._send_data(event.data)
        if event_type is EndOfMessage:
            return self._send_end(self._keep_alive)
        if event_type is Request:
            return self._send_request(event)
        raise LocalProtocolError("cannot send %r" % (event,))

    def _send_request(self, request):
        if self.our_state is not IDLE:
            raise LocalProtocolError("a request was already sent")
        headers = request.headers
        if headers.get_all(b"transfer-encoding"):
            self._writer = _BodyWriter(chunked=True)
        else:
            lengths = headers.get_all(b"content-length")
            self._writer = _BodyWriter(length=int(lengths[0]) if lengths else 0)
        self._keep_alive = _keep_alive(b"1.1", headers)
        self._reader.method = request.method
        self.our_state = SEND_BODY
        return _write_head(b"%s %s HTTP/1.1\r\n" % (request.method, request.target),
                           headers.raw_items(), ())

    # -- receiving ------------------------------------------------------------

    def receive_data(self, data):
        """Bytes from the origin; C{b""} when it closed."""
        if not data:
            self._eof = True
            return
        if self._reader.feed(data) is not None:
            self._reader.events.append(RemoteProtocolError("an unrequested protocol switch"))

    def next_event(self):
        """
        The next event from the origin, or L{NEED_DATA}.

        @raise RemoteProtocolError: the origin broke HTTP/1.1.
        """
        if self.their_state is ERROR:
            raise self._error
        events = self._reader.events
        if events:
            event = events.popleft()
            event_type = type(event)
            if event_type is Data:
                return event
            if event_type is Response:
                self._start_response(event)
                return event
            if event_type is EndOfMessage:
                ok = self._keep_alive and self._their_keep_alive and not self._until_close
                self.their_state = DONE if ok else MUST_CLOSE
                return event
            if event_type is InformationalResponse:
                return event
            self._take_error(event)
        if self._eof:
            if self.their_state is SEND_BODY and self._until_close:
                self._until_close = False
                self.their_state = MUST_CLOSE
                return _END
            if self.their_state in (DONE, MUST_CLOSE, CLOSED) or (
                    self.their_state is SEND_RESPONSE and not self._reader._in_head):
                # Closed between messages (or before answering: the caller
                # tells that apart from a broken response).
                self.their_state = CLOSED
                return _CLOSED
            self._take_error(RemoteProtocolError("the origin closed before its response ended"))
        return NEED_DATA

    def _start_response(self, response):
        self.their_state = SEND_BODY
        self.their_http_version = response.http_version
        self._their_keep_alive = _keep_alive(response.http_version, response.headers)
        headers = response.headers
        status = response.status_code
        self._until_close = not (
            status in (204, 304) or self._reader.method == b"HEAD"
            or headers.get_all(b"transfer-encoding") or headers.get_all(b"content-length")
        )

    def start_next_cycle(self):
        """The exchange ended cleanly (L{reusable}): ready for the next request."""
        if not self.reusable:
            raise LocalProtocolError("the connection cannot carry another exchange")
        self.our_state = IDLE
        self.their_state = SEND_RESPONSE
        self._their_keep_alive = True
        self._until_close = False
        self._reader._new_parser()
        self._reader.final = False
        self._reader.method = None
