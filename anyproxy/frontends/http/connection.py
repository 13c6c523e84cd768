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

The events, the parsing and its limits are in L{anyproxy.frontends.http.parse}
(imported from here).  A connection that carried a HEAD is not reused: its
reader stops after the head, so what came next is unknown.
"""

from anyproxy.frontends.http.parse import (
    CLOSED_EVENT,
    END,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Headers,
    InformationalResponse,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Request,
    RequestReader,
    Response,
    ResponseReader,
    header_tokens,
    keeps_alive,
)
from anyproxy.sentinels import sentinel

__all__ = [
    "NEED_DATA", "PAUSED",
    "IDLE", "SEND_RESPONSE", "SEND_BODY", "DONE", "MUST_CLOSE", "CLOSED", "ERROR",
    "ProtocolError", "RemoteProtocolError", "LocalProtocolError",
    "Headers", "Request", "Response", "InformationalResponse", "Data", "EndOfMessage",
    "ConnectionClosed", "ServerConnection", "ClientConnection",
]


# What next_event returns when it has no event to give.
NEED_DATA = sentinel("NEED_DATA")  # feed more bytes
PAUSED = sentinel("PAUSED")  # the next request waits for start_next_cycle

# Connection states, per side.
IDLE = sentinel("IDLE")
SEND_RESPONSE = sentinel("SEND_RESPONSE")
SEND_BODY = sentinel("SEND_BODY")
DONE = sentinel("DONE")
MUST_CLOSE = sentinel("MUST_CLOSE")
CLOSED = sentinel("CLOSED")
ERROR = sentinel("ERROR")


def _write_head(first_line, headers, extra):
    parts = [first_line]
    for name, value in headers:
        parts.append(b"%s: %s\r\n" % (name, value))
    for name, value in extra:
        parts.append(b"%s: %s\r\n" % (name, value))
    parts.append(b"\r\n")
    return b"".join(parts)


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

    def data(self, data):
        return b""

    def end(self):
        return b""


_NO_BODY = _NoBody()


class _Connection:
    """What both sides share: the two states and the body writer."""

    their_http_version = None

    def __init__(self):
        self.our_state = IDLE
        self.their_state = IDLE
        self._writer = None
        self._keep_alive = True  # this exchange may be followed by another
        self._eof = False
        self._error = None

    def send(self, event):
        """The bytes that send C{event} to the peer."""
        event_type = type(event)
        if event_type is Data:
            if self.our_state is not SEND_BODY:
                raise LocalProtocolError("no message body is being sent")
            return self._writer.data(event.data)
        if event_type is EndOfMessage:
            if self.our_state is not SEND_BODY:
                raise LocalProtocolError("no message body is being sent")
            data = self._writer.end()
            self._writer = None
            self.our_state = DONE if self._keep_alive else MUST_CLOSE
            return data
        return self._send_head(event)

    def _take_error(self, error):
        self.their_state = ERROR
        self._keep_alive = False
        self._error = error
        self._raise_error()

    def _raise_error(self):
        # A new exception each time: a raised one holds its traceback, whose
        # frames hold this connection, so keeping a raised one here would be
        # a reference cycle that only the garbage collector frees.
        error = self._error
        raise type(error)(str(error), error.error_status_hint)

    def close(self):
        """The connection is over: let go of the parser (it refers back to its reader)."""
        self._reader.close()


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
        self._reader = RequestReader(max_head_size)
        self._method = None
        self._upgraded = False  # after CONNECT: bytes wait unparsed
        self._backlog = []

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
            self._raise_error()
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
            if self.their_state in (DONE, MUST_CLOSE, CLOSED) or (
                    self.their_state is IDLE and not self._reader._in_head):
                self.their_state = CLOSED
                return CLOSED_EVENT
            self._take_error(RemoteProtocolError("the user closed in the middle of a request"))
        return NEED_DATA

    def _start_request(self, request):
        self.their_state = SEND_BODY
        self.our_state = SEND_RESPONSE
        self.their_http_version = request.http_version
        self._method = request.method
        self._keep_alive = keeps_alive(request.http_version, request.headers)
        self.they_are_waiting_for_100_continue = (
            request.http_version == b"1.1"
            and b"100-continue" in header_tokens(request.headers, b"expect")
        )

    # -- sending --------------------------------------------------------------

    def _send_head(self, event):
        event_type = type(event)
        if event_type is Response:
            return self._send_response(event)
        if event_type is InformationalResponse:
            if self.our_state is not SEND_RESPONSE:
                raise LocalProtocolError("no request is waiting for an answer")
            if event.status_code == 100:
                # Only 100 answers the expectation; a 103 (early hints) does
                # not, and the body still waits to be asked for.
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
        if self.their_http_version != b"1.1" or b"close" in header_tokens(headers, b"connection"):
            self._keep_alive = False
        if not self._keep_alive:
            if b"close" not in header_tokens(headers, b"connection"):
                extra.append((b"Connection", b"close"))
        pairs = headers.raw_items()
        if drop:
            pairs = [(raw, value) for (name, value), raw in zip(headers, headers.raw_names)
                     if name not in drop]
        self.our_state = SEND_BODY
        self.they_are_waiting_for_100_continue = False
        self._writer = writer
        return _write_head(b"HTTP/1.1 %d %s\r\n" % (status, response.reason), pairs, extra)

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
        self._reader = ResponseReader(max_head_size)
        self._their_keep_alive = True
        self._until_close = False  # the response body ends with the connection

    @property
    def reusable(self):
        """Whether the exchange ended cleanly and the connection may carry another."""
        return (self.our_state is DONE and self.their_state is DONE
                and not self._reader.trailing and self._reader.method != b"HEAD")

    # -- sending --------------------------------------------------------------

    def _send_head(self, event):
        if type(event) is Request:
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
        self._keep_alive = keeps_alive(b"1.1", headers)
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
            self._raise_error()
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
                return END
            if self.their_state in (DONE, MUST_CLOSE, CLOSED) or (
                    self.their_state is SEND_RESPONSE and not self._reader._in_head):
                # Closed between messages (or before answering: the caller
                # tells that apart from a broken response).
                self.their_state = CLOSED
                return CLOSED_EVENT
            self._take_error(RemoteProtocolError("the origin closed before its response ended"))
        return NEED_DATA

    def _start_response(self, response):
        self.their_state = SEND_BODY
        self.their_http_version = response.http_version
        self._their_keep_alive = keeps_alive(response.http_version, response.headers)
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
