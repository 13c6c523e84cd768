# -*- test-case-name: tests.test_http_proxy -*-
"""
Relay one absolute-URI request to its origin server, and the response back.

Each request gets its own stream and its own h11 client connection, and asks
the origin for C{Connection: close}.  That costs a stream open per request but
means a stream never outlives the exchange that opened it, so no state from
one user request (a half-read body, a confused origin) can leak into the next.

Bodies stream both ways without buffering beyond the transports' own buffers:
the user transport is registered as producer of the upstream transport and
vice versa (through the proxy's read gate, which also pauses reading for its
own reasons).  Only while the stream is still opening do we hold request body
bytes ourselves, up to L{HIGH_WATER}, after which reading from the user pauses.
"""

import h11
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.errors import StreamOpenError, http_status
from anyproxy.frontends.http_messages import (
    MAX_RESPONSE_HEAD_SIZE,
    upstream_request,
    user_informational,
    user_response,
)

_log = Logger()

# Request body bytes we hold while the stream opens before pausing the user.
HIGH_WATER = 64 * 1024


def describe_open_failure(failure):
    """
    The HTTP status and user-facing text for a failed stream open.

    A L{StreamOpenError} maps through L{http_status}; anything else is a
    general failure (502) and is logged, since it means a bug or an
    unexpected network error.

    @return: C{(status, text)}.
    """
    if failure.check(StreamOpenError):
        error = failure.value
        return http_status(error.reason), error.detail
    _log.warn(
        "opening a stream failed unexpectedly: {error}",
        error=failure.getErrorMessage(),
    )
    return 502, "bad gateway"


@implementer(IPushProducer)
class GateProducer:
    """Lets a transport pause user reads under one L{ReadGate} reason."""

    def __init__(self, gate, reason):
        self._gate = gate
        self._reason = reason

    def pauseProducing(self):
        self._gate.pause(self._reason)

    def resumeProducing(self):
        self._gate.resume(self._reason)

    def stopProducing(self):
        # The consumer went away; our own cleanup handles the user side.
        self._gate.resume(self._reason)


class ReadGate:
    """Reading from the user is paused while any reason holds."""

    def __init__(self, transport):
        self._transport = transport
        self._reasons = set()
        self.closed = False

    def pause(self, reason):
        if not self._reasons and not self.closed:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason):
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons and not self.closed:
            self._transport.resumeProducing()

    def producer(self, reason):
        """An C{IPushProducer} that pauses reading under C{reason}."""
        return GateProducer(self, reason)


class _UpstreamProtocol(Protocol):
    """The origin side of a L{ForwardExchange}: passes everything to it."""

    def __init__(self, exchange):
        self._exchange = exchange

    def dataReceived(self, data):
        self._exchange.upstream_data(data)

    def connectionLost(self, reason):
        self._exchange.upstream_lost()


class ForwardExchange:
    """
    One user request relayed over one stream.

    The proxy protocol feeds it the user's request body (L{request_data},
    L{request_done}) and tells it when the user is gone (L{user_lost}).  It
    uses the proxy's C{open_stream(host, port, protocol)}, its C{read_gate}
    and C{transport} for backpressure, and answers through C{respond(event)}
    (the user's h11 connection), then exactly one of C{forward_done(exchange)}
    or C{forward_failed(exchange, status, text)}.

    @ivar status: the origin's status code once its response head arrived.
    @ivar response_started: C{True} once a response head went to the user;
        after that a failure can only be signalled by closing the connection.
    """

    status = None
    response_started = False

    def __init__(self, proxy, request, target):
        """
        @param proxy: the L{anyproxy.frontends.http.HttpProxyProtocol}.
        @param request: the user's L{h11.Request}.
        @param target: its L{anyproxy.frontends.http_messages.ForwardTarget}.
        """
        self._proxy = proxy
        self._request = request
        self._target = target
        self._client = h11.Connection(
            h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_SIZE
        )
        self._upstream = None
        self._opening = None
        self._held = []
        self._held_size = 0
        self._request_complete = False
        self._finished = False

    def start(self):
        """Open the stream to the target."""
        self._opening = self._proxy.open_stream(
            self._target.host, self._target.port, _UpstreamProtocol(self)
        )
        self._opening.addCallbacks(self._opened, self._open_failed)

    # -- the user side --------------------------------------------------------

    def request_data(self, data):
        """A piece of the user's request body."""
        if self._finished:
            return
        if self._upstream is None:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > HIGH_WATER:
                self._proxy.read_gate.pause("opening")
        else:
            self._send_upstream(h11.Data(data=data))

    def request_done(self):
        """The user's request body is complete."""
        self._request_complete = True
        if self._upstream is not None and not self._finished:
            self._send_upstream(h11.EndOfMessage())

    def user_lost(self):
        """The user's connection is gone: drop the stream, whatever its state."""
        self._finished = True
        if self._opening is not None:
            opening, self._opening = self._opening, None
            opening.cancel()
        self._close_upstream()

    # -- the upstream side ----------------------------------------------------

    def _opened(self, upstream):
        self._opening = None
        if self._finished:
            # The user left and the endpoint could not cancel in time.
            upstream.transport.loseConnection()
            return
        self._upstream = upstream
        transport = upstream.transport
        transport.registerProducer(self._proxy.read_gate.producer("upstream"), True)
        self._proxy.transport.registerProducer(transport, True)
        self._send_upstream(upstream_request(self._request, self._target))
        held, self._held, self._held_size = self._held, [], 0
        for data in held:
            if self._finished:
                return
            self._send_upstream(h11.Data(data=data))
        self._proxy.read_gate.resume("opening")
        if self._request_complete and not self._finished:
            self._send_upstream(h11.EndOfMessage())
        # The origin may have answered while we were still writing.
        self._relay()

    def _open_failed(self, failure):
        self._opening = None
        if self._finished:
            # Cancelled because the user left: nothing to answer.
            return
        status, text = describe_open_failure(failure)
        self._fail(status, text)

    def _send_upstream(self, event):
        try:
            data = self._client.send(event)
        except h11.LocalProtocolError:
            # Our h11 client refuses: the origin already ended the exchange
            # in a way that makes this message impossible to finish.
            self._fail(502, "the upstream server ended the exchange early")
            return
        if data:
            self._upstream.transport.write(data)

    def upstream_data(self, data):
        """Bytes from the origin server."""
        if self._finished:
            return
        self._client.receive_data(data)
        if self._upstream is not None:
            self._relay()

    def upstream_lost(self):
        """The stream to the origin closed."""
        if self._finished:
            return
        self._client.receive_data(b"")
        self._relay()
        if not self._finished:
            self._fail(502, "the upstream server closed the connection")

    def _relay(self):
        while not self._finished:
            try:
                event = self._client.next_event()
            except h11.RemoteProtocolError:
                self._fail(502, "the upstream server sent a malformed response")
                return
            if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(
                event, h11.ConnectionClosed
            ):
                return
            if isinstance(event, h11.InformationalResponse):
                # 1xx is HTTP/1.1 only; 101 cannot occur (we strip Upgrade
                # and h11 rejects an unsolicited one as a protocol error).
                if self._proxy.user_http_version >= b"1.1":
                    self._proxy.respond(user_informational(event))
            elif isinstance(event, h11.Response):
                self.status = event.status_code
                self.response_started = True
                self._proxy.respond(user_response(event))
            elif isinstance(event, h11.Data):
                self._proxy.respond(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                # Trailers are dropped: we strip the Trailer header too.
                self._proxy.respond(h11.EndOfMessage())
                self._finished = True
                self._close_upstream()
                self._proxy.forward_done(self)

    def _fail(self, status, text):
        if self._finished:
            return
        self._finished = True
        self._close_upstream()
        self._proxy.forward_failed(self, status, text)

    def _close_upstream(self):
        upstream, self._upstream = self._upstream, None
        if upstream is None:
            return
        # Unregister before closing: a transport with a paused producer
        # registered waits for that producer instead of closing.
        self._proxy.transport.unregisterProducer()
        self._proxy.read_gate.resume("upstream")
        upstream.transport.unregisterProducer()
        upstream.transport.loseConnection()
