# -*- test-case-name: tests.test_http_proxy,tests.test_http_pool -*-
"""
Relay one absolute-URI request to its origin server, and the response back.

An exchange runs over an L{UpstreamConnection}: a stream to the origin and
its own L{http11.ClientConnection}.  When the exchange ends cleanly (the request
and the response both complete, and neither side asked to close) the
connection goes to the proxy's L{UpstreamPool} and the user's next request to
that origin reuses it, as squid and nginx reuse server connections.  Any other
ending closes it, so no state from one request (a half-read body, a confused
origin) can reach the next.  With the pool disabled each request gets its own
stream and asks the origin for C{Connection: close}.

Limits (C{max_conns_per_user}, a listener's C{max_conns}) count connections in
use: an exchange takes a slot before it takes or opens a connection and gives
it back when it ends, so idle pooled connections hold none.

A reused connection may have been closed by the origin just as we sent on it.
A request that lost its connection that way before any response byte, and that
is safe to send again (an idempotent method without a body), is retried once
on a new connection (RFC 9110 9.2.2).

Bodies stream both ways without buffering beyond the transports' own buffers:
the user transport is registered as producer of the upstream transport and
vice versa (through the proxy's read gate, which also pauses reading for its
own reasons).  Only while the stream is still opening do we hold request body
bytes ourselves, up to L{HIGH_WATER}, after which reading from the user pauses.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from anyproxy.connect_protocol import OneProtocolFactory
from anyproxy.errors import StreamOpenError, http_status, user_text
from anyproxy.frontends.http import connection as http11
from anyproxy.interfaces import IAdmittingEndpoint
from anyproxy.frontends.http.messages import (
    MAX_RESPONSE_HEAD_SIZE,
    binds_connection,
    upstream_request,
    user_informational,
    user_response,
)

_log = Logger()

# Request body bytes we hold while the stream opens before pausing the user.
HIGH_WATER = 64 * 1024

# Methods a request may be sent again with, when it carries no body (RFC 9110 9.2.2).
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])


def describe_open_failure(failure):
    """
    The HTTP status, the user-facing text and the detail for the log of a
    failed stream open.

    A L{StreamOpenError} maps through L{http_status} and L{user_text}: users
    see the reason's generic text, never its detail (which may quote an OS
    error from the client, e.g. C{111: Connection refused}).  Anything else
    is a general failure (502) and is logged, since it means a bug or an
    unexpected network error.

    @return: C{(status, text, detail)}.
    """
    if failure.check(StreamOpenError):
        error = failure.value
        return http_status(error.reason), user_text(error.reason), error.detail
    _log.warn(
        "opening a stream failed unexpectedly: {error}",
        error=failure.getErrorMessage(),
    )
    return 502, "bad gateway", "bad gateway"


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


def tunnel_draining(upstream):
    """Whether C{upstream}'s stream is on a tunnel that takes no new streams."""
    return getattr(upstream.transport, "tunnel_draining", False)


def _closing_client(failure, upstream):
    """An open that failed: its connection's parser, made for the early head, is let go."""
    upstream.client.close()
    return failure


class UpstreamConnection(Protocol):
    """
    The origin side of forwarded requests: one stream and its client connection.

    Serves one L{ForwardExchange} at a time (C{exchange}); between exchanges
    it waits in an L{UpstreamPool}, where anything it receives or its loss
    takes it out.
    """

    exchange = None
    client = None  # its http11.ClientConnection, once the stream is open

    def __init__(self, pool):
        self._pool = pool
        self.exchanges = 0  # how many exchanges used it (tests, logs)

    def connectionMade(self):
        # Made here, not in __init__: a stream that never opens (a refused
        # target: a 502) then never has a parser, which refers back to its
        # reader and would be a reference cycle left with no connectionLost.
        # One whose request head went with the OPEN has it already
        # (ForwardExchange._connect, which closes it if the open fails).
        if self.client is None:
            self.client = http11.ClientConnection(MAX_RESPONSE_HEAD_SIZE)

    def dataReceived(self, data):
        if self.exchange is None:
            # Nothing may arrive between exchanges (an origin's 408, junk):
            # the connection's framing can no longer be trusted.
            self._pool.discard(self)
            self.close()
            return
        self.exchange.upstream_data(data)

    def connectionLost(self, reason):
        if self.exchange is None:
            self._pool.discard(self)
        else:
            # A reset stream, a lost tunnel or the client's idle timeout is
            # no end of a response that runs until the connection closes.
            self.exchange.upstream_lost(clean=reason.check(ConnectionDone) is not None)
        if self.client is not None:
            self.client.close()

    def close(self):
        self.transport.loseConnection()


class ForwardExchange:
    """
    One user request relayed over one upstream connection.

    The proxy protocol feeds it the user's request body (L{request_data},
    L{request_done}) and tells it when the user is gone (L{user_lost}).  It
    uses the proxy's C{endpoint_to(host, port)}, its C{read_gate} and
    C{transport} for backpressure, and answers through C{respond(event)}
    (the user's connection), then exactly one of C{forward_done(exchange)}
    or C{forward_failed(exchange, status, text)}.

    @ivar status: the origin's status code once its response head arrived.
    @ivar response_started: C{True} once a response head went to the user;
        after that a failure can only be signalled by closing the connection.
    @ivar reused: C{True} if the connection came from the pool.
    """

    status = None
    response_started = False
    reused = False

    def __init__(self, proxy, request, target, pool, key, clock):
        """
        @param proxy: the L{anyproxy.frontends.http.proxy.HttpProxyProtocol}.
        @param request: the user's L{http11.Request}.
        @param target: its L{anyproxy.frontends.http.messages.ForwardTarget}.
        @param pool: the listener's L{UpstreamPool}.
        @param key: this request's pool key (user, group, host, port).
        @param clock: for giving limit slots back a turn later.
        """
        self._proxy = proxy
        self._request = request
        self._target = target
        self._pool = pool
        self._key = key
        self._clock = clock
        self._endpoint = None
        self._release = None
        self._upstream = None
        self._opening = None
        self._held = []
        self._held_size = 0
        self._request_complete = False
        self._body_sent = False
        self._retried = False
        self._head_sent = False  # the request head went with the OPEN (_connect)
        self._answered = False  # any byte from the origin on this exchange
        self._finished = False
        # NTLM and Negotiate authenticate the connection, not the request:
        # such a connection must never serve anyone else's next request.
        self._connection_authenticated = binds_connection(request.headers, b"authorization")
        # A request that waits for 100-continue: if the origin answers
        # finally without one, it may not have read the body, whose bytes
        # would then begin the connection's next exchange.
        self._unread_body_risk = any(name == b"expect" for name, _ in request.headers)

    def start(self):
        """Take a limits slot, then a pooled connection or a new stream."""
        try:
            self._endpoint = self._proxy.endpoint_to(self._target.host, self._target.port)
        except Exception:
            self._open_failed(Failure())
            return
        if not IAdmittingEndpoint.providedBy(self._endpoint):
            self._admitted(None)
            return
        self._opening = self._endpoint.admit()
        self._opening.addCallbacks(self._admitted, self._open_failed)

    def _admitted(self, release):
        self._opening = None
        self._release = release
        if self._finished:
            self._give_back_slot()
            return
        upstream = self._pool.take(self._key)
        still_routed = getattr(self._endpoint, "still_routed", None)
        while upstream is not None and (
                upstream.transport.disconnecting or tunnel_draining(upstream)
                or (still_routed is not None and not still_routed(upstream.transport))):
            # Closing already (the origin's FIN arrived while it had bytes
            # queued), or on a tunnel going away: reusing it would keep that
            # tunnel from ever draining (a fleet client moving on, a drain).
            # Or a client announced a better route to the target since
            # (client.routes): the name may mean another machine there.
            upstream.close()
            upstream = self._pool.take(self._key)
        if upstream is not None:
            self.reused = True
            self._opened(upstream)
        else:
            self._connect()

    def _connect(self):
        upstream = UpstreamConnection(self._pool)
        head = b""
        if IAdmittingEndpoint.providedBy(self._endpoint) and self._bodiless_idempotent():
            # The request head goes with the OPEN (early data, as far as the
            # client takes it): the origin has it a tunnel round trip sooner.
            # Only for a request that may be sent twice: the client may have
            # delivered it when the user leaves or the open times out (as
            # TLS 0-RTT, RFC 8470).
            upstream.client = http11.ClientConnection(MAX_RESPONSE_HEAD_SIZE)
            head = upstream.client.send(upstream_request(self._request, self._target,
                                                         keep_alive=self._pool.enabled))
            self._head_sent = True
        if self._release is not None:
            # We hold the slot ourselves, so the stream may outlive this exchange.
            opening = self._endpoint.connect_admitted(OneProtocolFactory(upstream), first_data=head)
        elif head:
            opening = self._endpoint.connect(OneProtocolFactory(upstream), first_data=head)
        else:
            opening = self._endpoint.connect(OneProtocolFactory(upstream))
        self._opening = opening
        if head:
            opening.addErrback(_closing_client, upstream)
        opening.addCallbacks(self._opened, self._open_failed)

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
            self._send_upstream(http11.Data(data))

    def request_done(self):
        """The user's request body is complete."""
        self._request_complete = True
        if self._upstream is not None and not self._finished:
            self._send_upstream(http11.EndOfMessage())

    def user_lost(self):
        """The user's connection is gone: drop the connection, whatever its state."""
        self._finished = True
        if self._opening is not None:
            opening, self._opening = self._opening, None
            opening.cancel()
        self._close_upstream()
        self._give_back_slot()

    # -- the upstream side ----------------------------------------------------

    def _opened(self, upstream):
        self._opening = None
        if self._finished:
            # The user left and the endpoint could not cancel in time.
            upstream.close()
            self._give_back_slot()
            return
        self._upstream = upstream
        upstream.exchange = self
        upstream.exchanges += 1
        transport = upstream.transport
        transport.registerProducer(self._proxy.read_gate.producer("upstream"), True)
        self._proxy.transport.registerProducer(transport, True)
        if not self._head_sent:
            self._send_upstream(upstream_request(self._request, self._target,
                                                 keep_alive=self._pool.enabled))
        held, self._held, self._held_size = self._held, [], 0
        if held:
            self._body_sent = True
        for data in held:
            if self._finished:
                return
            self._send_upstream(http11.Data(data))
        self._proxy.read_gate.resume("opening")
        if self._request_complete and not self._finished:
            self._send_upstream(http11.EndOfMessage())
        if not self._finished:
            # The origin may have answered while we were still writing.
            self._relay()

    def _open_failed(self, failure):
        self._opening = None
        if self._finished:
            # Cancelled because the user left: nothing to answer.
            return
        self._give_back_slot()
        status, text, detail = describe_open_failure(failure)
        self._fail(status, text, detail)

    def _send_upstream(self, event):
        if type(event) is http11.Data:
            self._body_sent = True
        try:
            data = self._upstream.client.send(event)
        except http11.LocalProtocolError:
            # The body does not match its declared length: the exchange
            # cannot be finished correctly.
            self._fail(502, "the upstream server ended the exchange early")
            return
        if data:
            self._upstream.transport.write(data)

    def upstream_data(self, data):
        """Bytes from the origin server."""
        if self._finished:
            return
        self._answered = True
        self._upstream.client.receive_data(data)
        self._relay()

    def upstream_lost(self, clean=True):
        """
        The stream to the origin closed: with its end of data (C{clean}), or
        cut (reset, the tunnel lost), when what came is all there is.
        """
        if self._finished:
            return
        if self._may_retry():
            self._retried = True
            self.reused = False
            self._detach()
            self._connect()
            return
        if clean:
            self._upstream.client.receive_data(b"")
        self._relay()
        if not self._finished:
            # Mid-response, the user's connection closes without the end of
            # the message (no last chunk), so it is not taken as whole.
            self._fail(502, "the upstream server closed the connection" if clean
                       else "the stream to the upstream server was cut")

    def _may_retry(self):
        # Only a pooled connection that died before answering anything: the
        # origin closed it while idle.  A new one failing means what it says.
        if not self.reused or self._retried or self._answered or self._body_sent:
            return False
        return self._bodiless_idempotent()

    def _bodiless_idempotent(self):
        """Whether the request may reach the origin twice: an idempotent method, no body."""
        if self._request.method not in IDEMPOTENT:
            return False
        headers = self._request.headers
        lengths = [value for name, value in headers if name == b"content-length"]
        chunked = any(name == b"transfer-encoding" for name, _ in headers)
        return not chunked and lengths in ([], [b"0"])

    def _relay(self):
        if self._finished:
            return
        client = self._upstream.client
        # What one read of the origin's bytes holds (often a whole response:
        # head, body, end) goes to the user in one send, at once.
        batch = []
        while not self._finished:
            try:
                event = client.next_event()
            except http11.RemoteProtocolError:
                self._proxy.respond_all(batch, at_once=True)
                self._fail(502, "the upstream server sent a malformed response")
                return
            if event is http11.NEED_DATA or type(event) is http11.ConnectionClosed:
                self._proxy.respond_all(batch, at_once=True)
                return
            event_type = type(event)
            if event_type is http11.Data:
                batch.append(event)
            elif event_type is http11.Response:
                self.status = event.status_code
                self.response_started = True
                if binds_connection(event.headers, b"www-authenticate"):
                    self._connection_authenticated = True
                batch.append(user_response(event))
            elif event_type is http11.InformationalResponse:
                # 1xx is HTTP/1.1 only; 101 cannot occur (we strip Upgrade
                # and an unsolicited one is a protocol error).
                self.status = event.status_code
                if event.status_code == 100:
                    self._unread_body_risk = False
                if self._proxy.user_http_version >= b"1.1":
                    batch.append(user_informational(event))
            elif event_type is http11.EndOfMessage:
                # Trailers are dropped: we strip the Trailer header too.
                batch.append(event)
                self._proxy.respond_all(batch, at_once=True)
                batch = []
                self._finished = True
                self._keep_or_close()
                self._proxy.forward_done(self)
        if batch:  # finished meanwhile: what was framed still goes
            self._proxy.respond_all(batch, at_once=True)

    def _keep_or_close(self):
        upstream = self._detach()
        client = upstream.client
        # Not reusable (client.reusable) after bytes past the response (a
        # second response, a body after 204): they would answer the next
        # request.  Nor after a HEAD, whose end llhttp cannot tell.
        if (client.reusable and not self._connection_authenticated and not self._unread_body_risk
                and not tunnel_draining(upstream)):
            client.start_next_cycle()
            # The user may have paused it; an idle connection must not stay paused.
            upstream.transport.resumeProducing()
            if self._pool.put(self._key, upstream):
                self._give_back_slot(now=True)
                return
        upstream.close()
        self._give_back_slot()

    def _fail(self, status, text, detail=None):
        if self._finished:
            return
        self._finished = True
        self._close_upstream()
        self._give_back_slot()
        self._proxy.forward_failed(self, status, text, detail)

    def _detach(self):
        upstream, self._upstream = self._upstream, None
        upstream.exchange = None
        # Unregister before closing or pooling: a transport with a paused
        # producer registered waits for that producer instead of closing.
        self._proxy.transport.unregisterProducer()
        self._proxy.read_gate.resume("upstream")
        upstream.transport.unregisterProducer()
        return upstream

    def _close_upstream(self):
        if self._upstream is not None:
            self._detach().close()

    def _give_back_slot(self, now=False):
        release, self._release = self._release, None
        if release is None:
            return
        if now:
            release()
        else:
            # A turn later, as TunnelEndpoint does: a waiter must not pick a
            # tunnel that is dying with this connection.
            self._clock.callLater(0, release)
