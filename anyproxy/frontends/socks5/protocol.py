# -*- test-case-name: tests.test_socks5 -*-
"""
The SOCKS5 proxy listener: a thin Twisted adapter over the sans-I/O
L{anyproxy.frontends.socks5.parser.Socks5Server}.

A connection goes through three phases:

 - negotiating: bytes feed the parser; greeting, RFC 1929 authentication and
   the request are answered as they come.  A handshake timeout runs from
   C{connectionMade} until the request has been read: a deadline, which
   bytes arriving do not extend.  At most C{factory.handshakes.limit}
   connections of a listener are in this phase at once; beyond that a new
   connection is closed at once (L{anyproxy.connection_cap}).  A login whose
   password hash must be checked, or whose failure's answer the login
   throttle delays (L{anyproxy.auth.UserDatabase.login}), pauses reading
   until it is answered; a request sent before the answer waits in the
   parser, and is handled right after it.
 - opening: C{factory.endpoint_for(user, host, port)} connects (in
   production a tunnel stream, which may first wait for a slot of the
   gateway's limits).  Reading from the user goes on, so that a user who
   leaves (a connection reset) is noticed and the pending connect, or its
   place in a limits queue, is cancelled.  Bytes the user sent early are kept
   and forwarded later; past C{OPENING_HIGH_WATER} of them reading pauses.
 - spliced: the reply has been sent and the connection is a plain
   L{SpliceEnd} joined to the target: backpressure and half-close both ways.

UDP ASSOCIATE opens a udp tunnel stream the same way (C{endpoint_for(user,
"0.0.0.0", 0, kind="udp")}: the association has no single target), so a
refusal gets its proper REP code.  Only then is the relay port opened, on the
local IP the control connection came in on (never 0.0.0.0), and the reply
carries it as BND.ADDR/BND.PORT.  The connection then stays open as the
association's control connection (phase "associated"): bytes on it are
discarded, and its EOF or close ends the association, which in turn closes it
when the stream is lost.  See L{anyproxy.frontends.socks5.relay}.

BIND gets REP 0x07, and a SOCKS4/4a request the SOCKS4 rejection (CD 91)
before the close.  Reasons become REP codes only through
L{anyproxy.errors.socks_reply_code}.  Logs name the peer, the user and the
target, never a password.
"""

import ipaddress

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel

from anyproxy.addresses import address_text, host_port
from anyproxy.auth import ANONYMOUS, BLOCKED
from anyproxy.connection_cap import (
    DEFAULT_MAX_HANDSHAKES, ConnectionCap, HandshakeCappedFactory)
from anyproxy.connect_protocol import connect_protocol
from anyproxy.errors import StreamOpenError, socks_reply_code
from anyproxy.frontends.socks5.parser import (
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    METHOD_NO_AUTH,
    METHOD_NONE_ACCEPTABLE,
    METHOD_USERPASS,
    NEED_DATA,
    PAUSED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_GENERAL_FAILURE,
    REP_SUCCEEDED,
    Greeting,
    Socks4Request,
    Socks5Server,
    SocksError,
    SocksStateError,
    UserPassAuth,
)
from anyproxy.frontends.socks5.relay import Socks5Association
from anyproxy.login_throttle import source_address
from anyproxy.logs import emits
from anyproxy.splice import SpliceEnd, open_and_splice, write_now
from anyproxy.tuning import set_no_delay

_NEGOTIATING = "negotiating"
_AUTHENTICATING = "authenticating"  # a password hash being checked, or a failure's delay
_OPENING = "opening"
_SPLICED = "spliced"
_ASSOCIATED = "associated"  # a UDP association's control connection
_CLOSING = "closing"

# Bytes a user may send after its CONNECT request before the stream is open;
# past this we stop reading until it opens or fails.
OPENING_HIGH_WATER = 64 * 1024



def _bind_address(address):
    """BND.ADDR and BND.PORT for our local address (0.0.0.0:0 if not IP)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", 0)
    if not isinstance(host, str):
        return "0.0.0.0", 0
    host = host.split("%", 1)[0]  # drop an IPv6 scope id
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0", 0
    return host, port


def _printable_username(username):
    return username.decode("utf-8", "backslashreplace")


class Socks5Protocol(SpliceEnd):
    """
    One SOCKS5 user connection.  Reads its configuration from
    C{self.factory} (a L{Socks5Factory}).
    """

    _log = Logger()
    # Whether this connection counts in factory.handshakes (until its request).
    holds_handshake_place = False

    def __init__(self):
        super().__init__()
        self._parser = Socks5Server()
        self._phase = _NEGOTIATING
        self._user = ANONYMOUS
        self._user_label = "-"
        self._target = "?"
        self._timeout_call = None
        self._opening = None
        self._udp = False
        self._association = None

    @property
    def _peer(self):
        # Read when used: behind a balancer's PROXY header (anyproxy.proxy_header)
        # the user's address is known only once the header has been read.
        transport = self.transport
        return address_text(transport.getPeer()) if transport is not None else "?"

    def connectionMade(self):
        set_no_delay(self.transport)  # replies must not wait for delayed ACKs
        self._timeout_call = self.factory.reactor.callLater(
            self.factory.handshake_timeout, self._handshake_timed_out
        )

    def dataReceived(self, data):
        if self._phase is _NEGOTIATING:
            self._parser.receive_data(data)
            self._process_events()
        elif self._phase is _AUTHENTICATING:
            # Read before the pause took hold (a request sent early): the
            # parser keeps it until the login is answered.
            self._parser.receive_data(data)
        elif self._udp:
            pass  # RFC 1928: the control connection carries no payload
        elif self._phase is not _CLOSING:
            # Opening: SpliceEnd holds it until joined (reading pauses past
            # OPENING_HIGH_WATER).  Spliced: forwarded.
            SpliceEnd.dataReceived(self, data)

    def readConnectionLost(self):
        if self._association is not None:
            self._association.end("user closed the control connection")
        elif self._udp and self._phase is _OPENING:
            self._close()  # the user gave up: cancels the open
        elif self._phase is _SPLICED or self._phase is _OPENING:
            SpliceEnd.readConnectionLost(self)  # while opening: passed on at the join
        else:
            self._log.debug("SOCKS5 {peer}: closed during the handshake", peer=self._peer)
            self._close()

    def connectionLost(self, reason):
        self._cancel_timeout()
        self._handshake_over()
        opening, self._opening = self._opening, None
        association, self._association = self._association, None
        # Marks this end lost, and cancels a CONNECT's open in progress.
        SpliceEnd.connectionLost(self, reason)
        if opening is not None:
            self._log.info(
                "SOCKS5 {peer} user {user!r} -> {target}: user left, open cancelled",
                peer=self._peer,
                user=self._user_label,
                target=self._target,
            )
            opening.cancel()  # a UDP ASSOCIATE's open (a CONNECT's is already cancelled)
        if association is not None:
            association.end("control connection closed")

    # negotiation

    def _process_events(self):
        while self._phase is _NEGOTIATING:
            try:
                event = self._parser.next_event()
            except SocksError as error:
                self._refuse_malformed(error)
                return
            if event is NEED_DATA or event is PAUSED:
                return
            if isinstance(event, Greeting):
                self._on_greeting(event)
            elif isinstance(event, Socks4Request):
                self._refuse_socks4(event)
            elif isinstance(event, UserPassAuth):
                self._on_userpass(event)
            else:
                self._on_request(event)

    def _refuse_malformed(self, error):
        self._log.info("SOCKS5 {peer}: bad handshake: {error}", peer=self._peer, error=str(error))
        if error.reply_code is not None:
            try:
                self.transport.write(self._parser.reply(error.reply_code))
            except SocksStateError:
                pass  # no reply is owed in this phase: just close
        self._close()

    def _refuse_socks4(self, request):
        # The SOCKS4 rejection (CD 91), as dante answers: the client reports
        # "request rejected" instead of a connection closed without a word.
        self._log.info(
            "SOCKS5 {peer}: SOCKS{version} request for {target} refused (only SOCKS5 is served)",
            peer=self._peer,
            version="4a" if request.socks4a else "4",
            target=host_port(request.host, request.port),
        )
        self.transport.write(self._parser.refuse_socks4())
        self._close()

    def _on_greeting(self, greeting):
        if self.factory.users.required:
            acceptable = (METHOD_USERPASS,)
        else:
            # An open listener also takes user/pass: any credentials are accepted.
            acceptable = (METHOD_NO_AUTH, METHOD_USERPASS)
        for method in acceptable:
            if method in greeting.methods:
                write_now(self.transport, self._parser.choose_method(method))
                return
        self._log.info(
            "SOCKS5 {peer}: no acceptable method in {methods}",
            peer=self._peer,
            methods=list(greeting.methods),
        )
        self.transport.write(self._parser.choose_method(METHOD_NONE_ACCEPTABLE))
        self._close()

    def _on_userpass(self, credentials):
        self._user_label = _printable_username(credentials.username)
        answer = self.factory.users.login(source_address(self.transport),
                                          credentials.username, credentials.password)
        if isinstance(answer, Deferred):
            # A hash is being checked (or a failure's answer is delayed):
            # read no more meanwhile; a request sent early waits in the parser.
            self._phase = _AUTHENTICATING
            self.transport.pauseProducing()
            answer.addCallback(self._login_answered).addErrback(self._internal_error)
            return
        self._login_answered(answer)

    def _login_answered(self, answer):
        if self.lost or self._phase is _CLOSING:
            return  # the user left, or the handshake timed out, meanwhile
        checked = self._phase is _AUTHENTICATING
        if checked:
            self._phase = _NEGOTIATING
            self.transport.resumeProducing()
        if answer is None or answer is BLOCKED:
            # While blocked, no line per attempt: the block had its own.
            (self._log.debug if answer is BLOCKED else self._log.info)(
                "SOCKS5 {peer}: authentication failed for user {user!r}{why}",
                peer=self._peer,
                user=self._user_label,
                why=" (source blocked after repeated failures)" if answer is BLOCKED else "",
            )
            self.transport.write(self._parser.auth_reply(False))
            self._close()
            return
        self._user = answer
        write_now(self.transport, self._parser.auth_reply(True))
        if checked:
            self._process_events()  # a request that came before the answer

    def _on_request(self, request):
        self._cancel_timeout()
        self._handshake_over()
        self._phase = _OPENING
        self._target = host_port(request.host, request.port)
        if request.command == CMD_UDP_ASSOCIATE:
            self._open_udp(request)
            return
        if request.command != CMD_CONNECT:
            self._log.info(
                "SOCKS5 {peer} user {user!r}: command {command:#04x} not supported",
                peer=self._peer,
                user=self._user_label,
                command=request.command,
            )
            self._reply_and_close(REP_COMMAND_NOT_SUPPORTED)
            return
        # Bytes sent right after the request are the first payload.
        SpliceEnd.dataReceived(self, self._parser.trailing_data[0])
        opening = open_and_splice(
            self, lambda: self.factory.endpoint_for(self._user, request.host, request.port,
                                                    source=self._peer),
            on_open=self._reply_succeeded, read_while_opening=OPENING_HIGH_WATER)
        self._opening = opening
        opening.addCallbacks(self._spliced, self._open_failed)
        opening.addErrback(self._internal_error)

    def _open_udp(self, request):
        self._udp = True
        self._target = "UDP relay (user port %d)" % (request.port,)
        try:
            association = Socks5Association(
                getattr(self.transport.getPeer(), "host", None),
                request.port,
                on_end=self._association_ended,
            )
        except ValueError:
            self._log.warn("SOCKS5 {peer}: UDP ASSOCIATE over a non-IP connection", peer=self._peer)
            self._reply_and_close(REP_GENERAL_FAILURE)
            return
        try:
            endpoint = self.factory.endpoint_for(self._user, "0.0.0.0", 0, kind="udp",
                                                 source=self._peer)
            opening = connect_protocol(endpoint, association)
        except Exception:
            opening = fail()
        self._opening = opening
        opening.addCallbacks(self._udp_open_succeeded, self._open_failed)
        opening.addErrback(self._internal_error)

    # opening

    def _reply_succeeded(self, target):
        # The target is open and nothing has flowed yet: the reply goes first.
        self._phase = _SPLICED
        bind_host, bind_port = _bind_address(self.transport.getHost())
        write_now(self.transport, self._parser.reply(REP_SUCCEEDED, bind_host, bind_port))

    def _spliced(self, target):
        self._opening = None
        if target is not None and emits(LogLevel.info):  # target None: the user left first
            self._log.info(
                "SOCKS5 {peer} user {user!r} -> {target}: connected",
                peer=self._peer,
                user=self._user_label,
                target=self._target,
            )

    def _udp_open_succeeded(self, association):
        self._opening = None
        if self.lost or self._phase is not _OPENING:
            association.end("user left")
            return
        if association.ended:
            self._log.info("SOCKS5 {peer}: udp stream closed at once", peer=self._peer)
            self._reply_and_close(REP_GENERAL_FAILURE)
            return
        try:
            relay_host, relay_port = association.listen(
                self.factory.reactor, getattr(self.transport.getHost(), "host", None)
            )
        except CannotListenError as e:
            self._log.warn(
                "SOCKS5 {peer}: cannot open a UDP relay port: {error}", peer=self._peer, error=str(e)
            )
            association.end("no relay port")
            self._reply_and_close(REP_GENERAL_FAILURE)
            return
        self._association = association
        self._phase = _ASSOCIATED
        self.transport.write(self._parser.reply(REP_SUCCEEDED, relay_host, relay_port))
        self._log.info(
            "SOCKS5 {peer} user {user!r}: UDP associated, relay port {relay}",
            peer=self._peer,
            user=self._user_label,
            relay=relay_port,
        )
        # Keep reading: only so that the user's EOF or close is seen.
        self.transport.resumeProducing()

    def _association_ended(self, association, why):
        self._association = None
        self._log.info(
            "SOCKS5 {peer} user {user!r}: UDP association ended ({why}); {counters}",
            peer=self._peer,
            user=self._user_label,
            why=why,
            counters=association.relay.counters(),
        )
        if not self.lost and self._phase is _ASSOCIATED:
            self._close()  # the user must notice that its relay is gone

    def _open_failed(self, failure):
        self._opening = None
        if self.lost or self._phase is not _OPENING:
            return None  # the user left and the open was cancelled
        if failure.check(StreamOpenError):
            code = socks_reply_code(failure.value.reason)
            self._log.info(
                "SOCKS5 {peer} user {user!r} -> {target}: {error}",
                peer=self._peer,
                user=self._user_label,
                target=self._target,
                error=str(failure.value),
            )
        else:
            code = REP_GENERAL_FAILURE
            self._log.warn(
                "SOCKS5 {peer} user {user!r} -> {target}: failed: {error_type}: {error}",
                peer=self._peer,
                user=self._user_label,
                target=self._target,
                error_type=failure.type.__name__,
                error=str(failure.value),
            )
        self._reply_and_close(code)
        return None

    def _internal_error(self, failure):
        self._log.failure("SOCKS5 {peer}: internal error", failure, peer=self._peer)
        self._close()

    # helpers

    def _reply_and_close(self, code):
        self.transport.write(self._parser.reply(code))
        self._close()

    def _close(self):
        self._phase = _CLOSING
        self._cancel_timeout()
        self.transport.loseConnection()

    def _handshake_over(self):
        if self.holds_handshake_place:
            self.holds_handshake_place = False
            self.factory.handshakes.leave()

    def _cancel_timeout(self):
        call, self._timeout_call = self._timeout_call, None
        if call is not None and call.active():
            call.cancel()

    def _handshake_timed_out(self):
        self._timeout_call = None
        self._log.info("SOCKS5 {peer}: handshake timed out", peer=self._peer)
        self._close()


class Socks5Factory(HandshakeCappedFactory, Factory):
    """
    Builds L{Socks5Protocol}s for one SOCKS5 listener.

    @ivar users: the L{anyproxy.auth.UserDatabase}; when C{users.required} is
        false the listener is open and every user is C{ANONYMOUS}.
    @ivar endpoint_for: C{endpoint_for(user, host, port)} returns an
        C{IStreamClientEndpoint} for the target; its C{connect} fails with
        L{StreamOpenError} for known reasons, anything else is a general
        failure.  It may also raise L{StreamOpenError} itself.  UDP
        ASSOCIATE calls it as C{endpoint_for(user, "0.0.0.0", 0,
        kind="udp")} and expects a udp tunnel stream.
    @ivar reactor: the clock for the handshake timeout, and the
        C{IReactorUDP} for relay ports.
    @ivar handshake_timeout: seconds from connect to a complete request.
    @ivar handshakes: the L{ConnectionCap} on connections still in their
        handshake (C{max_handshakes}, 0 = no cap); beyond it a new
        connection is closed at once.
    """

    protocol = Socks5Protocol

    def __init__(self, users, endpoint_for, reactor, handshake_timeout=10.0,
                 max_handshakes=DEFAULT_MAX_HANDSHAKES, name="socks5 proxy"):
        self.users = users
        self.endpoint_for = endpoint_for
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.handshakes = ConnectionCap(max_handshakes, "%s (connections in their handshake)"
                                        % (name,), reactor)

