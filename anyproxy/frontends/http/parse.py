# -*- test-case-name: tests.test_http11 -*-
"""
HTTP/1.1 messages as events: the vocabulary of L{anyproxy.frontends.http.connection}
and the readers that turn llhttp's callbacks into it.

llhttp (Node's parser, through httptools) parses and validates in C and
calls back per message part; a reader queues the events those calls make
(L{Request} or L{Response}, L{Data}, L{EndOfMessage}) and, where the message
breaks the rules, a L{RemoteProtocolError} at the point it happened, carrying
the status to answer with.  Besides llhttp's checks, the readers apply the
ones a proxy needs: one Host per request, C{chunked} as the only transfer
coding, no body with an Upgrade, and limits on heads and trailers.

Limits: a head (or trailers) that stays incomplete past C{max_head_size} is
an error with status 431.  A read in which one message ended and the next
began is not counted, so the slack is one read.  At most L{MAX_PIPELINED}
requests wait parsed; one more is an error (400).

Where llhttp is stricter than h11 was (RFC 9112 allows each): methods it does
not know are refused (501), and so are obs-fold line continuations, repeated
C{Content-Length} headers, control characters in values and versions other
than 1.0 and 1.1.  Responses may end lines with a bare LF.
llhttp cannot be told that a response to HEAD has no body, so the response
reader stops after that head (what follows is unknown to it).
"""

import re
from collections import deque

import attr
import httptools


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


# Events without fields: one instance each serves every message.
END = EndOfMessage()
CLOSED_EVENT = ConnectionClosed()


def header_tokens(headers, name):
    """The lower-case comma-separated tokens of header C{name}."""
    found = []
    for header, value in headers:
        if header == name:
            found.extend(token.strip().lower() for token in value.split(b","))
    return found


def keeps_alive(http_version, headers):
    """Whether a message lets its connection carry another exchange (as h11: 1.1 only)."""
    return http_version == b"1.1" and b"close" not in header_tokens(headers, b"connection")


# Requests parsed ahead of the one being answered, at most.  llhttp parses a
# whole read at once, and a read of tiny pipelined requests would otherwise
# become thousands of queued events: past this the connection is refused.
MAX_PIPELINED = 32

# A method token (RFC 9110 5.6.2) and the space after it, at a message's start.
_METHOD = re.compile(rb"(?:\r\n)*[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp at that point."""


class _Reader:
    """
    llhttp's callbacks as a queue of events, for one direction of a connection.

    Subclasses build the head event (C{_head}).  Parse errors become a
    L{RemoteProtocolError} queued where they happened.
    """

    _parser_class = None
    _closed = False  # see close

    def __init__(self, max_head_size):
        self._max_head_size = max_head_size
        self.events = deque()
        self._new_parser()

    def _new_parser(self):
        if self._closed:
            return
        self._parser = self._parser_class(self)
        self._in_head = False
        self._in_message = False
        self._stalled = 0  # bytes fed since the message last produced an event
        self._progress = False  # an event was produced in the current feed
        self.stopped = False

    def close(self):
        """
        Stop parsing for good.  The parser holds this reader's callbacks, so
        dropping it ends the reference cycle between them.
        """
        self._closed = self.stopped = True
        self._parser = None

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
        elif self._progress:
            # Only bytes since the last event count: a long body whose chunk
            # framing arrives in reads of its own is not a head.
            self._stalled = 0
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
        lower = name.lower()
        self._names.append(lower)
        # llhttp drops the whitespace before a value but keeps what trails
        # it; neither is part of the value (RFC 9110 5.5).  But a tab after
        # a Transfer-Encoding stays: llhttp does not read "chunked<TAB>" as
        # chunked, and neither may we (_is_chunked).
        self._values.append(value.rstrip(b" ") if lower == b"transfer-encoding"
                            else value.rstrip(b" \t"))

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
        self.events.append(END)


def _is_chunked(value):
    """
    Whether a Transfer-Encoding value is C{chunked} as llhttp reads it: spaces
    around it are fine, a tab is not (llhttp then reads no chunks, so the
    proxy and the parser would frame the body differently).
    """
    return value.strip(b" ").lower() == b"chunked"


class RequestReader(_Reader):
    _parser_class = httptools.HttpRequestParser
    _keep_alive = True  # of the request being read

    def on_url(self, url):
        self._first += url

    def _head(self, headers, version):
        if version not in (b"1.0", b"1.1"):
            # llhttp takes 0.9 (a line without a version) and 2.0 as well.
            self.events.append(RemoteProtocolError("HTTP/%s is not supported"
                                                   % (version.decode("ascii", "replace"),), 505))
            raise _Stop()
        # h11's checks beyond llhttp's: the rules of RFC 9112 3.2 and 6.1.
        hosts = 0
        for name, value in headers:
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding" and not _is_chunked(value):
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
        if sum(type(event) is Request for event in self.events) >= MAX_PIPELINED:
            self.events.append(RemoteProtocolError("too many pipelined requests"))
            raise _Stop()
        self._keep_alive = keeps_alive(version, headers)
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


class ResponseReader(_Reader):
    _parser_class = httptools.HttpResponseParser
    method = None  # of the request being answered
    final = False  # the final response head arrived
    trailing = False  # bytes came after the response ended

    def _new_parser(self):
        _Reader._new_parser(self)
        # Bare LF line ends are common in small embedded servers; we write
        # every head anew, so reading them costs no framing ambiguity.
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)

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
        if status < 100:
            # llhttp reads "HTTP/1.1 099" as a response with a body until close.
            self.events.append(RemoteProtocolError("status %d is no HTTP status" % (status,)))
            raise _Stop()
        if status < 200:
            if status == 101:
                self.events.append(RemoteProtocolError("an unrequested protocol switch"))
                raise _Stop()
            if any(name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
                   for name, value in headers):
                # A 1xx ends at its head (RFC 9112 6.3), but llhttp would read
                # a body after one that announces it: a broken origin.
                self.events.append(RemoteProtocolError("an informational response with a body"))
                raise _Stop()
            self.events.append(InformationalResponse(status, self._first, headers, version))
            return
        self.final = True
        for name, value in headers:
            if name == b"transfer-encoding" and not _is_chunked(value):
                self.events.append(RemoteProtocolError("an unsupported Transfer-Encoding"))
                raise _Stop()
        self.events.append(Response(status, self._first, headers, version))
        if self.method == b"HEAD":
            # llhttp cannot be told a body will not follow; stop it here.
            # What came after the head is unknown, so the connection is
            # not used again (see ClientConnection.reusable).
            self.events.append(END)
            raise _Stop()

    def on_message_complete(self):
        self._in_message = False
        self._progress = True
        if self.final:
            self.events.append(END)

    def _describe(self, error, data):
        return "malformed response: %s" % (error,), 400


