# -*- test-case-name: tests.test_http_proxy -*-
"""
The HTTP proxy frontend: CONNECT tunnels and absolute-URI forwarding.

L{anyproxy.frontends.http.connection} does all HTTP/1.1 parsing and framing on the
user's connection; this module only decides what each request means.  The
protocol is a small event pump over one server connection:

  - a request head is authenticated (every request, when users are
    configured), then its target parsed; while a password hash is checked
    (or a failure's answer delayed by the login throttle) reading pauses and
    the request waits in the parser; a source the throttle blocks gets 429
    with C{Retry-After} and the connection closed (RFC 6585), not 407;
  - CONNECT opens a stream and splices a L{SpliceEnd} over the same
    transport to it (L{anyproxy.splice.open_and_splice}), answering 200 just
    before; whatever the user sent after the CONNECT head goes through;
  - an absolute-URI request is handed to a L{ForwardExchange}, which relays
    it over a new stream or one kept from the user's earlier request to the
    same origin (L{anyproxy.frontends.http.pool}), and answers through
    L{respond};
  - any answer we make ourselves (407, 400, 502...) is followed by reading
    and dropping the rest of the request body, so the connection stays usable
    for the next request (curl retries a 407 on the same connection).

Reading from the user is paused through one L{ReadGate} that ORs
independent reasons (upstream backpressure, a stream still opening, a
pipelined request waiting for our answer), so one reason's resume never undoes
another's pause.  A handshake timer closes users that do not finish a request
head in time, including idle keep-alive connections: a deadline, which bytes
arriving do not extend.  Until its first request is let in (authenticated),
a connection counts in C{factory.handshakes}; beyond that cap a new
connection is closed at once (L{anyproxy.connection_cap}).
"""

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolNegotiationFactory
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from anyproxy.auth import ANONYMOUS, BLOCKED
from anyproxy.connection_cap import (
    DEFAULT_MAX_HANDSHAKES, ConnectionCap, HandshakeCappedFactory)
from anyproxy.frontends.http import connection as http11
from anyproxy.login_throttle import source_address
from anyproxy.logs import emits
from anyproxy.tuning import QUICKACK_BELOW, quick_acker, set_no_delay, tune_for_bulk
from anyproxy.frontends.http.exchange import (
    ForwardExchange,
    ReadGate,
    tunnel_draining,
    describe_open_failure,
)
from anyproxy.frontends.http.pool import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_IDLE, UpstreamPool
from anyproxy.frontends.http.messages import (
    MAX_HEAD_SIZE,
    BadTarget,
    error_response,
    format_authority,
    parse_absolute_uri,
    parse_authority,
    parse_basic_credentials,
)
from anyproxy.splice import WRITE_NOW_BELOW, SpliceEnd, open_and_splice, write_now

_log = Logger()

# Bytes a user may send after CONNECT before the tunnel is open; past this we
# stop reading until it opens or fails.
CONNECT_HIGH_WATER = 64 * 1024

# 407 answers on one connection, the last with "Connection: close": a browser
# asks without credentials first, then with them, then maybe with a retyped
# password.  Bounds how long a connection that never logs in is kept.
MAX_LOGIN_ATTEMPTS = 4

# Request body we read and throw away after answering early (407, 502...):
# reading it keeps the connection usable; past this, closing is cheaper.
DISCARD_LIMIT = 1024 * 1024


@implementer(IHalfCloseableProtocol)
class HttpProxyProtocol(Protocol):
    """One user connection of the HTTP proxy.  Configuration is on C{factory}."""

    _exchange = None
    _connect_target = None
    _opening = None
    # A CONNECT's side of the splice, over our transport, from its open on;
    # once spliced it is also _tunnel, and gets what the user sends.
    _user_end = None
    _tunnel = None
    _timer = None
    _closing = False
    _closed = False
    _pumping = False
    # A login being checked (a password hash, or a failure's delay): the
    # request's events wait in the parser until it is answered.
    _checking_login = False
    # Whether this connection counts in factory.handshakes (until a request is let in).
    holds_handshake_place = False
    _failed_logins = 0
    _quick_ack = None  # anyproxy.tuning.quick_acker on the user's socket

    def __init__(self):
        self._server = http11.ServerConnection(MAX_HEAD_SIZE)
        self._user = None
        self._method = None
        self._target_for_log = None
        self._discarded = 0
        self._connect_backlog = 0

    @property
    def user_http_version(self):
        """The HTTP version of the user's current request (bytes)."""
        return self._server.their_http_version or b"1.0"

    # -- Twisted protocol ---------------------------------------------------

    def connectionMade(self):
        # Responses go out as several writes (head, body pieces); with Nagle
        # on, each would wait for the user's delayed ACK (~40 ms a request).
        set_no_delay(self.transport)
        tune_for_bulk(self.transport)  # forwarded bodies can be large
        # A kept-alive user with Nagle on sends a request's body only once
        # we ACK its head: no delayed ACK (anyproxy.tuning.quick_acker).
        self._quick_ack = quick_acker(self.transport)
        # Public: a ForwardExchange pauses user reads through it too.
        self.read_gate = ReadGate(self.transport)
        self._arm_timer()

    @property
    def _peer(self):
        # For log lines only: formatted when one is written, not per connection.
        peer = self.transport.getPeer()
        return "%s:%s" % (getattr(peer, "host", "?"), getattr(peer, "port", "?"))

    def dataReceived(self, data):
        if self._tunnel is not None:
            self._tunnel.dataReceived(data)  # a SpliceEnd: re-arms itself
            return
        if self._quick_ack is not None and len(data) < QUICKACK_BELOW:
            self._quick_ack()
        if self._closing:
            return
        self._server.receive_data(data)
        if self._opening is not None and self._connect_target is not None:
            # The connection holds these bytes until we answer CONNECT.
            self._connect_backlog += len(data)
            if self._connect_backlog > CONNECT_HIGH_WATER:
                self.read_gate.pause("connect")
        self._pump()

    def readConnectionLost(self):
        if self._tunnel is not None:
            self._tunnel.readConnectionLost()
            return
        # A user may half-close after its request and still read the answer.
        self._server.receive_data(b"")
        self._pump()

    def writeConnectionLost(self):
        if self._tunnel is not None:
            self._tunnel.writeConnectionLost()
        else:
            self._close()

    def connectionLost(self, reason):
        self._closed = self._closing = True
        self._server.close()
        self.read_gate.closed = True
        self._cancel_timer()
        self._handshake_over()
        if self._user_end is not None:
            # Closes the upstream, or cancels its open.
            self._user_end.connectionLost(reason)
        if self._exchange is not None:
            exchange, self._exchange = self._exchange, None
            exchange.user_lost()

    # -- what ForwardExchange uses ------------------------------------------

    def endpoint_to(self, host, port):
        """The endpoint reaching C{host:port} for this connection's user."""
        return self.factory.endpoint_for(self._user, host, port, source=self._peer)

    def respond(self, event, at_once=False):
        """
        Send an L{http11} event to the user; C{at_once} sends it now if
        nothing is buffered (L{write_now}) rather than on the reactor's next
        turn: for an answer that is all there is to send.
        """
        self.respond_all((event,), at_once)

    def respond_all(self, events, at_once=False):
        """
        Send L{http11} events to the user in one write (see L{respond}): a
        response's head, body and end that arrived together leave together.
        """
        parts = []
        try:
            for event in events:
                if (type(event) is http11.Response
                        and self._server.they_are_waiting_for_100_continue):
                    # A final answer instead of 100 Continue: the user may never
                    # send the body, so the framing of this connection is lost.
                    headers = event.headers.raw_items()
                    if not event.headers.get_all(b"connection"):
                        headers.append((b"Connection", b"close"))
                    event = http11.Response(event.status_code, event.reason, headers)
                data = self._server.send(event)
                if data:
                    parts.append(data)
        finally:
            # What was framed before an event the framing refused still goes.
            if parts and not self._closed:
                self._write_parts(parts, at_once)

    def _write_parts(self, parts, at_once):
        if len(parts) == 1:
            data = parts[0]
        elif sum(len(part) for part in parts) < WRITE_NOW_BELOW:
            data = b"".join(parts)  # small: one send, the copy costs less
        else:
            # A large body is not copied to be joined: Twisted's buffer
            # sends the pieces together.
            self.transport.writeSequence(parts)
            return
        if at_once:
            write_now(self.transport, data)
        else:
            self.transport.write(data)

    def forward_done(self, exchange):
        """C{exchange} relayed a whole response."""
        self._exchange = None
        self.read_gate.resume("opening")
        self._log_request(exchange.status)
        self._after_response()

    def forward_failed(self, exchange, status, text, detail=None):
        """
        C{exchange} failed; answer C{status} with C{text} unless its response
        already began.  C{detail}, if given, is logged instead of C{text}.
        """
        self._exchange = None
        self.read_gate.resume("opening")
        if exchange.response_started or self._server.our_state is not http11.SEND_RESPONSE:
            _log.info(
                "{user} {method} {target}: upstream failed mid-response ({text})",
                user=self._user_name(), method=self._method,
                target=self._target_for_log, text=detail or text,
            )
            self._close()
        else:
            self._reject(status, text, detail=detail)

    # -- the event pump -----------------------------------------------------

    def _pump(self):
        # Re-entrant calls (an answer sent from inside an event handler) are
        # absorbed: the loop below polls the connection after every event anyway.
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._closing and self._tunnel is None and not self._checking_login:
                try:
                    event = self._server.next_event()
                except http11.RemoteProtocolError as error:
                    self._bad_request(error.error_status_hint)
                    return
                if event is http11.NEED_DATA:
                    return
                if event is http11.PAUSED:
                    if self._connect_target is None and self._server.has_pending_input:
                        # A pipelined request (or bytes after a proposed
                        # Upgrade): hold the rest in the kernel until we
                        # answered.  Only once such bytes arrive: pausing
                        # costs system calls on every plain request.  A
                        # pending CONNECT keeps reading, to see the user leave.
                        self.read_gate.pause("pipeline")
                    return
                self._handle(event)
                if isinstance(event, http11.ConnectionClosed):
                    # ConnectionClosed repeats forever: nothing more to read.
                    return
        finally:
            self._pumping = False

    def _handle(self, event):
        if isinstance(event, http11.Request):
            self._cancel_timer()
            self._handle_request(event)
        elif isinstance(event, http11.Data):
            if self._exchange is not None:
                self._exchange.request_data(event.data)
            else:
                self._discard(len(event.data))
        elif isinstance(event, http11.EndOfMessage):
            if self._exchange is not None:
                self._exchange.request_done()
            elif self._connect_target is not None:
                self._open_tunnel()
            else:
                self._after_response()
        elif isinstance(event, http11.ConnectionClosed):
            if self._exchange is None and self._opening is None:
                self._close()
            # Otherwise an answer is on its way, and we close after it.

    def _handle_request(self, request):
        self._method = request.method.decode("ascii", "replace")
        self._target_for_log = "-"
        target = bad_target = None
        try:
            if request.method == b"CONNECT":
                target = parse_authority(request.target)
                self._target_for_log = format_authority(*target).decode("ascii")
            else:
                target = parse_absolute_uri(request.target)
                self._target_for_log = target.for_log()
        except BadTarget as error:
            bad_target = str(error)
        answer = self._authenticate(request)
        if isinstance(answer, Deferred):
            # Read nothing more until it is answered; the request's deadline
            # runs on meanwhile.
            self._checking_login = True
            self.read_gate.pause("login")
            self._arm_timer()
            answer.addCallback(self._login_answered, request, target, bad_target)
            answer.addErrback(self._login_error)
            return
        self._let_in_or_refuse(answer, request, target, bad_target)

    def _login_answered(self, answer, request, target, bad_target):
        self._checking_login = False
        if self._closing:
            return  # the user left, or the deadline passed, meanwhile
        self._cancel_timer()
        self.read_gate.resume("login")
        self._let_in_or_refuse(answer, request, target, bad_target)
        self._pump()  # the rest of this request (and what follows) waited

    def _login_error(self, failure):
        _log.failure("{peer}: checking a login failed", failure, peer=self._peer)
        self._close()

    def _let_in_or_refuse(self, answer, request, target, bad_target):
        if answer is BLOCKED:
            # RFC 6585's answer to too many attempts: a client that would
            # retry a 407 with other credentials sees it is not worth it.
            self._user = None
            retry = self.factory.users.logins.throttle.blocked_for(source_address(self.transport))
            self._reject(429, "too many failed logins; try again later",
                         [(b"Retry-After", b"%d" % (max(1, round(retry)),))], close=True)
            return
        self._user = answer
        if self._user is not None:
            self._handshake_over()  # let in: no longer counts in factory.handshakes
        if self._user is None:
            realm = self.factory.realm.replace("\\", "\\\\").replace('"', '\\"')
            challenge = ('Basic realm="%s"' % (realm,)).encode("utf-8")
            # Each 407 re-arms the request timer, so without a count a client
            # failing to log in could hold its handshake place for ever.
            self._failed_logins += 1
            self._reject(407, "proxy authentication required",
                         [(b"Proxy-Authenticate", challenge)],
                         close=self._failed_logins >= MAX_LOGIN_ATTEMPTS)
        elif bad_target is not None:
            self._reject(400, bad_target)
        elif request.method == b"CONNECT":
            # The stream opens once the end of the request arrived.
            self._connect_target = target
        else:
            user = self._user
            factory = self.factory
            self._exchange = ForwardExchange(
                self, request, target, factory.upstream_pool,
                (user.name, user.group, target.host, target.port), factory.reactor)
            self._exchange.start()

    def _authenticate(self, request):
        users = self.factory.users
        if not users.required:
            return ANONYMOUS
        credentials = parse_basic_credentials(request.headers)
        if credentials is None:
            return None  # asking without credentials first is no failed login
        return users.login(source_address(self.transport), *credentials)

    # -- CONNECT --------------------------------------------------------------

    def _open_tunnel(self):
        host, port = self._connect_target
        self._connect_backlog = 0
        self._user_end = SpliceEnd()
        self._user_end.makeConnection(self.transport)
        self._user_end.transport_tuned(self._quick_ack)  # in connectionMade
        # Until the answer the parser holds what the user sends (read_gate
        # pauses past CONNECT_HIGH_WATER): after a failure it is the next request.
        self._opening = open_and_splice(
            self._user_end, lambda: self.endpoint_to(host, port),
            on_open=self._tunnel_opened, read_while_opening=None)
        self._opening.addCallbacks(self._tunnel_spliced, self._tunnel_failed)

    def _tunnel_opened(self, upstream):
        # Open, and nothing has flowed yet: answer 200, then what the user
        # sent after the CONNECT head (and its EOF) goes up the tunnel.
        self._connect_target = None
        self.respond(http11.Response(200, b"Connection established", []), at_once=True)
        self._log_request(200)
        self.read_gate.resume("connect")
        self._cancel_timer()
        data, user_eof = self._server.take_upgraded_data()
        self._tunnel = self._user_end
        self._tunnel.dataReceived(data)
        if user_eof:
            self._tunnel.readConnectionLost()

    def _tunnel_spliced(self, upstream):
        self._opening = None

    def _tunnel_failed(self, failure):
        self._opening = None
        self._connect_target = None
        self._user_end = None
        if self._closing:
            return
        self.read_gate.resume("connect")
        status, text, detail = describe_open_failure(failure)
        # Whatever the user sent after CONNECT is now parsed as HTTP.
        self._reject(status, text, detail=detail)

    # -- answers of our own ---------------------------------------------------

    def _reject(self, status, text, headers=(), detail=None, close=False):
        """
        Answer the current request ourselves, keeping the connection if we
        can (and not C{close}).  The log gets C{detail} if given (what users
        must not see), else C{text}.
        """
        response, body = error_response(status, text, headers, close=close)
        self.respond(response)
        self.respond(http11.Data(data=body))
        self.respond(http11.EndOfMessage())
        self._discarded = 0
        self._log_request(status, detail or text)
        self._after_response()

    def _bad_request(self, status):
        # Never log the parser's message: it could quote the request (credentials).
        _log.info("{peer}: malformed request, answering {status}", peer=self._peer, status=status)
        if self._exchange is not None:
            exchange, self._exchange = self._exchange, None
            exchange.user_lost()
            if exchange.response_started:
                self._close()
                return
        if self._server.our_state in (http11.IDLE, http11.SEND_RESPONSE):
            response, body = error_response(status, "malformed request", close=True)
            try:
                self.respond(response)
                self.respond(http11.Data(data=body))
                self.respond(http11.EndOfMessage())
            except http11.LocalProtocolError:
                pass  # No way to answer in this state: just close.
        self._close()

    def _discard(self, size):
        self._discarded += size
        if self._discarded > DISCARD_LIMIT:
            self._close()

    def _after_response(self):
        """Our answer is complete: close, start the next cycle, or drain the body."""
        server = self._server
        if server.our_state is not http11.DONE and server.our_state is not http11.MUST_CLOSE:
            return
        if server.our_state is http11.MUST_CLOSE or server.their_state in (
            http11.MUST_CLOSE,
            http11.CLOSED,
            http11.ERROR,
        ):
            self._close()
        elif server.their_state is http11.DONE:
            server.start_next_cycle()
            self.read_gate.resume("pipeline")
            self._arm_timer()
            self._pump()
        else:
            # The request body is still arriving: _handle discards it and its
            # EndOfMessage brings us back here, unless the timer fires first.
            self._arm_timer()

    def _close(self):
        if not self._closing:
            self._closing = True
            self._cancel_timer()
            self.transport.loseConnection()

    # -- timer and logging ----------------------------------------------------

    def _handshake_over(self):
        if self.holds_handshake_place:
            self.holds_handshake_place = False
            self.factory.handshakes.leave()

    def _arm_timer(self):
        self._cancel_timer()
        self._timer = self.factory.reactor.callLater(
            self.factory.handshake_timeout, self._timed_out
        )

    def _cancel_timer(self):
        if self._timer is not None:
            timer, self._timer = self._timer, None
            if timer.active():
                timer.cancel()

    def _timed_out(self):
        self._timer = None
        _log.info(
            "{peer}: no complete request within {timeout}s, closing",
            peer=self._peer, timeout=self.factory.handshake_timeout,
        )
        self._close()

    def _user_name(self):
        if self._user is None:
            return "-"
        return self._user.name or "anonymous"

    def _log_request(self, status, detail=""):
        if not emits(LogLevel.info):
            return
        _log.info(
            "{peer} {user} {method} {target} {status} {detail}",
            peer=self._peer, user=self._user_name(), method=self._method,
            target=self._target_for_log, status=status, detail=detail,
        )


@implementer(IProtocolNegotiationFactory)
class HttpProxyFactory(HandshakeCappedFactory, ServerFactory):
    """
    The HTTP proxy listener: CONNECT tunnels and absolute-URI http forwarding,
    every stream opened through C{endpoint_for}.
    """

    protocol = HttpProxyProtocol

    def __init__(self, users, endpoint_for, reactor, handshake_timeout=30.0, realm="anyproxy",
                 upstream_keepalive=DEFAULT_MAX_IDLE, upstream_idle_timeout=DEFAULT_IDLE_TIMEOUT,
                 max_handshakes=DEFAULT_MAX_HANDSHAKES, name="http proxy"):
        """
        @param users: a L{anyproxy.auth.UserDatabase}; when it has no users
            the proxy is open and everyone is L{ANONYMOUS}.
        @param endpoint_for: C{(user, host, port) -> IStreamClientEndpoint};
            its C{connect} fails with L{anyproxy.errors.StreamOpenError} for
            the known reasons, anything else answers 502.
        @param reactor: provides C{callLater} (a C{Clock} in tests).
        @param handshake_timeout: seconds a user has to send a complete
            request head, at the start and between keep-alive requests.
        @param realm: the realm in C{Proxy-Authenticate}.
        @param upstream_keepalive: idle upstream connections kept for reuse
            by forwarded requests, at most (L{UpstreamPool}); 0 = none.
        @param upstream_idle_timeout: seconds an idle one is kept.
        @param max_handshakes: connections with no request let in yet, at
            most (C{handshakes}, a L{ConnectionCap}); beyond, a new
            connection is closed at once.  0 = no cap.
        @param name: the listener's name, for logs.
        """
        self.users = users
        self.endpoint_for = endpoint_for
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.realm = realm
        self.upstream_pool = UpstreamPool(reactor, upstream_keepalive, upstream_idle_timeout)
        self.handshakes = ConnectionCap(max_handshakes, "%s (connections not logged in yet)"
                                        % (name,), reactor)


    def stopFactory(self):
        # The listener stopped (shutdown, or a reload replaced it).
        self.upstream_pool.clear()

    def stop_keeping_upstreams(self):
        """
        The gateway drains (L{anyproxy.gateway.drain}): close the idle
        upstream connections now, since each is an open stream the drain
        would wait for, and keep none from now on (an exchange that ends
        closes its own).
        """
        self.upstream_pool.clear()

    def tunnel_going_away(self):
        """
        A tunnel's far end sent GOAWAY (a peer gateway draining, for a
        stream relayed through a fleet peer link): close the idle upstream
        connections on such tunnels, which would otherwise hold them open
        until C{upstream_idle_timeout}.  The others stay kept.
        """
        self.upstream_pool.close_idle(tunnel_draining)

    def acceptableProtocols(self):
        # Behind an ssl: listener (an HTTPS proxy) Twisted always installs an
        # ALPN callback; with no protocol named, OpenSSL aborts the handshake
        # of every client that offers ALPN, curl included.
        return [b"http/1.1"]
