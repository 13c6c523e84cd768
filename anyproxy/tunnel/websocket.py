# -*- test-case-name: tests.test_e2e_tcp -*-
"""
Autobahn protocols that bind a L{Mux} to a WebSocket.  No parsing here: every
binary message goes to the mux, every mux message goes out as one binary
WebSocket message.  Authentication of the client happens in the opening
handshake (L{GatewayTunnelProtocol.onConnect}), before the upgrade.
"""

import base64
import struct

from autobahn.twisted.websocket import WebSocketClientProtocol, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.python import failure
from twisted.logger import Logger

from anyproxy.errors import HelloRefused
from anyproxy.logs import library_logger
from anyproxy.tls import openssl_reason
from anyproxy.tuning import tune_for_bulk, set_no_delay
from anyproxy.tunnel import frames
from anyproxy.tunnel.mux import Mux

# Module level, not a class attribute: Autobahn's protocols log through their
# own (txaio) `self.log`, whose debug calls are no-ops below the configured
# level; shadowing it made every frame format a debug event.
log = Logger()

# Autobahn internals.  Beyond Autobahn's documented interfaces
# (IWebSocketChannel and its frame API, the factories' setProtocolOptions),
# AnyProxy relies on these parts of Autobahn's classes.  setup.cfg bounds
# Autobahn to the release series tested, and tests/test_autobahn_contract.py
# fails if any of them moves or changes shape; list a new one here first.
#
#   _dataReceived       WebSocketProtocol._dataReceived(data): the receive path
#                       that Autobahn's Twisted dataReceived calls after its
#                       per-read debug line; our dataReceived calls it directly.
#   onMessageEnd        called once a message's frames are in; Autobahn's own
#                       joins message_data and calls onMessage.  Ours replaces
#                       it and hands the pieces on.
#   message_data        the list of a message's payload pieces (onMessageBegin
#                       makes it, each frame extends it); reset to None after.
#   message_is_binary   set by onMessageBegin.
#   failedByMe          true once Autobahn has failed the connection (a frame
#                       too large, say): the message is then dropped.
#   state, STATE_OPEN   we write frames ourselves only while the state is open.
#   transport.write     the unmasked sending path writes whole binary frames
#                       (FIN, opcode 2) on the transport: Autobahn writes each
#                       of its own frames whole too, so they never interleave,
#                       and a gateway with requireMaskedClientFrames=False
#                       takes them.
#   maskClientFrames    the client's option, copied onto its protocol.
#   isServer            which side a factory (self.factory.isServer) is.
#   onPing              Autobahn answers a ping only from its default onPing,
#                       so overriding it can hold the pong.
#   log                 Autobahn's classes log through a class attribute (never
#                       set on the instance), so ours replaces it.
#   peer                the peer's address, as a string.
#   dropConnection      dropConnection(abort=True) closes without a handshake.
#   reactor             the factory's reactor attribute, which Autobahn's
#                       constructor sets (reactor=) and our factories replace;
#                       this module schedules on it.
#   headers             the client factory's opening-handshake headers, read at
#                       each handshake: ClientTunnelFactory.configure replaces
#                       them (anyproxy.client.app).
#   openHandshakeTimeout  setProtocolOptions' options are factory attributes
#                       of the same name: the client's reload reads this back.

_WS_LEN16 = struct.Struct("!BBH")
_WS_LEN64 = struct.Struct("!BBQ")

HTTP_UNAUTHORIZED = 401  # autobahn's ConnectionDeny names no constant for these
HTTP_TOO_MANY_REQUESTS = 429
# A close frame's payload is at most 125 bytes: 2 of code, then the reason.
MAX_CLOSE_REASON = 120

# Autobahn limits: one frame per message, the largest being a DATA frame.
MAX_MESSAGE = frames.HEADER_SIZE + 256 * 1024 + 1024


def tune_factory(factory, ping_interval, handshake_timeout):
    """Autobahn options for a binary tunnel: no compression, bounded sizes, pings."""
    factory.setProtocolOptions(
        maxFramePayloadSize=MAX_MESSAGE,
        maxMessagePayloadSize=MAX_MESSAGE,
        utf8validateIncoming=False,
        openHandshakeTimeout=handshake_timeout,
        closeHandshakeTimeout=5,
        autoPingInterval=ping_interval,
        # A tunnel silent for three intervals is dead.
        autoPingTimeout=2 * ping_interval,
        autoPingRestartOnAnyTraffic=True,
        failByDrop=True,
    )
    # Client-to-server masking (RFC 6455 section 5.3) protects HTTP caches
    # that would misread WebSocket bytes as requests.  Our tunnel runs only
    # inside TLS between two AnyProxy ends, so no intermediary sees the
    # frames; unmasked, the client's sending direction (user downloads) is
    # about a third faster.  See docs/PROTOCOL.md.
    if factory.isServer:
        factory.setProtocolOptions(requireMaskedClientFrames=False)
    else:
        factory.setProtocolOptions(maskClientFrames=False)


def basic_authorization(username, password):
    """The C{Authorization} header value a client sends."""
    token = base64.b64encode(("%s:%s" % (username, password)).encode("utf-8"))
    return "Basic " + token.decode("ascii")


def parse_basic(header):
    """C{(username, password)} from a Basic C{Authorization} value, or C{None}."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


class TunnelNotEstablished(ConnectionError):
    """
    The tunnel closed before the gateway's HELLO.  C{code} is the WebSocket
    close code: 4000-4999 when the gateway refused the HELLO
    (L{anyproxy.tunnel.frames} C{CLOSE_*}).
    """

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class _TunnelProtocol:
    """What both ends share: a mux wired to the WebSocket."""

    # Autobahn's own self.log, replaced by the same kind of txaio logger
    # (no-ops below the level) whose events are redacted as they are made:
    # at debug Autobahn dumps the opening handshake, Authorization included
    # (anyproxy.logs.library_logger).  Our own lines use the module's `log`.
    log = library_logger("autobahn.websocket")
    mux = None
    _unanswered_ping = None  # the latest ping's payload, held while we are congested

    def _start_mux(self, initiator, on_open_request, name):
        unmasked = self.factory.isServer or not self.maskClientFrames
        send = self._send_tunnel_frame if unmasked else self._send_tunnel_message
        self.mux = Mux(send, initiator=initiator,
                       on_open_request=on_open_request, on_hello=self.hello_received,
                       on_protocol_error=self._protocol_error, name=name,
                       send_parts=self._send_tunnel_parts if unmasked else None,
                       clock=self.factory.reactor, on_go_away=self._peer_going_away)
        # WebSocket send-buffer backpressure pauses every stream's producer.
        # Register on the TCP transport under TLS: Twisted's TLS wrapper will
        # not close while a producer is registered on it, and TLS passes our
        # writes straight down, so the TCP buffer is the one that fills.
        lowest = getattr(self.transport, "transport", None) or self.transport
        lowest.registerProducer(self.mux, True)
        self.mux.lowest_transport = lowest
        self.mux.on_resume = self._answer_held_ping
        tune_for_bulk(lowest)
        # Small frames (OPEN, CREDIT, FIN) must not wait for Nagle + delayed
        # ACK: without this each stream open or close could stall ~40 ms.
        set_no_delay(lowest)

    def onPing(self, payload):
        # Autobahn answers every ping at once.  A peer that pings and never
        # reads would then grow our send buffer without bound (measured: 200
        # MB in 30 s).  While the buffer is above its high-water mark (the
        # mux is paused), keep only the latest ping and answer it once the
        # buffer drains: RFC 6455 5.5.3 allows answering only the most
        # recent ping.  Our own pings (liveness) are unaffected.
        if self.mux is not None and self.mux.paused:
            self._unanswered_ping = payload
            return
        self.sendPong(payload)

    def _answer_held_ping(self):
        payload, self._unanswered_ping = self._unanswered_ping, None
        if payload is not None:
            self.sendPong(payload)

    def _send_tunnel_message(self, message):
        self.sendMessage(message, isBinary=True)

    def _send_tunnel_frame(self, message):
        # Small frames (OPEN, CREDIT, FIN, DATAGRAM...) framed the same way:
        # Autobahn's sendMessage would also format a debug line per frame.
        self._send_tunnel_parts(message, b"")

    def _send_tunnel_parts(self, header, payload):
        # The bulk path: one unmasked binary WebSocket frame (FIN, opcode 2)
        # built with a single join, where sendMessage would copy the payload
        # twice (our header + payload, then its frame header + that).  Frames
        # are written whole, so they never interleave with Autobahn's pings.
        if self.state != self.STATE_OPEN:
            return
        length = len(header) + len(payload)
        if length < 126:
            prefix = bytes((0x82, length))
        elif length < 0x10000:
            prefix = _WS_LEN16.pack(0x82, 126, length)
        else:
            prefix = _WS_LEN64.pack(0x82, 127, length)
        self.transport.write(b"".join((prefix, header, payload)))

    def dataReceived(self, data):
        # Autobahn's version formats the arguments of a debug line (type
        # names, the peer) for every read, logged or not: once per TLS
        # record (16 KiB) here, a few percent of the receiving process.
        self._dataReceived(data)

    def onMessage(self, payload, isBinary):
        if not isBinary:
            self._protocol_error(frames.FrameError("text message on a binary tunnel"))
            return
        self.mux.message_received(payload)

    def onMessageEnd(self):
        # Autobahn's version joins the message's pieces, which we would then
        # slice the frame header off (two copies of every DATA byte), and
        # fires an observer event (a Deferred) per message that nobody here
        # listens to.  The mux joins the pieces once, without the header.
        if not self.failedByMe:
            if not self.message_is_binary:
                self._protocol_error(frames.FrameError("text message on a binary tunnel"))
            else:
                self.mux.message_parts_received(self.message_data)
        self.message_data = None

    def _peer_going_away(self, reason):
        # The mux now opens nothing more here (mux.draining, which the
        # gateway's tunnel pool reads); the peer closes the tunnel itself.
        log.info("tunnel {name}: peer is going away ({reason}); no new streams on it",
                 name=self.mux.name, reason=reason.name)

    def _protocol_error(self, exc):
        log.warn("tunnel {name}: protocol error: {error}; closing", name=self.mux.name, error=exc)
        self._lose_mux()
        self.dropConnection(abort=True)

    def hello_received(self, info):
        raise NotImplementedError

    def _lose_mux(self):
        if self.mux is not None:
            self.mux.connection_lost()


class GatewayTunnelProtocol(_TunnelProtocol, WebSocketServerProtocol):
    """The gateway's end of a tunnel; the factory is a L{anyproxy.gateway.tunnel_server.TunnelServerFactory}."""

    tunnel = None
    _hello_timer = None

    grant = None  # the ClientGrant of the credential the client presented

    def connectionLost(self, reason=failure.Failure(error.ConnectionDone())):
        # Autobahn logs a failed TLS handshake at error level: anyone who
        # sends the public tunnel port plain text or noise would fill the
        # error log.  It is the peer's failure, not ours: one info line.
        if isinstance(reason.value, SSL.Error):
            log.info("tunnel from {peer}: TLS failed: {why}", peer=self.peer,
                     why=openssl_reason(reason.value))
            reason = failure.Failure(error.ConnectionLost("TLS failed"))
        self._handshake_over()
        super().connectionLost(reason)

    def onConnect(self, request):
        if frames.SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "subprotocol %s required" % frames.SUBPROTOCOL)
        credentials = parse_basic(request.headers.get("authorization"))
        grant = self.factory.grant_for(self.transport, credentials)
        if grant is None:
            log.warn("tunnel from {peer}: client authentication failed", peer=request.peer)
            raise ConnectionDeny(HTTP_UNAUTHORIZED, "client authentication failed")
        waiting = self.factory.waiting_for_hello
        if waiting.full(grant):
            log.warn("tunnel from {peer}: credential {credential} already has {count} "
                     "connections waiting to send their HELLO", peer=request.peer,
                     credential=grant.name, count=waiting.get(grant.name))
            raise ConnectionDeny(HTTP_TOO_MANY_REQUESTS, "too many connections for this credential")
        waiting.add(grant.name)
        self.grant = grant
        return frames.SUBPROTOCOL

    holds_handshake_place = False  # set by the factory (HandshakeCappedFactory)

    def _handshake_over(self):
        # Once per connection: at its HELLO, or when it closes before one.
        if self.holds_handshake_place:
            self.holds_handshake_place = False
            self.factory.handshakes.leave()
        if self.grant is not None and not getattr(self, "_hello_counted", False):
            self._hello_counted = True
            self.factory.waiting_for_hello.remove(self.grant.name)

    def onOpen(self):
        self._start_mux(False, None, self.peer)
        self._hello_timer = self.factory.reactor.callLater(
            self.factory.handshake_timeout, self._no_hello)

    def _no_hello(self):
        self._hello_timer = None
        log.warn("tunnel {peer}: no HELLO in time; closing", peer=self.peer)
        self.dropConnection(abort=True)

    def hello_received(self, info):
        if self.tunnel is not None:
            return
        self._handshake_over()
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        try:
            self.tunnel = self.factory.tunnel_connected(self, info)
        except HelloRefused as refused:
            log.warn("tunnel {peer}: HELLO refused: {reason}", peer=self.peer,
                     reason=refused.reason)
            reason = refused.reason.encode("utf-8")[:MAX_CLOSE_REASON].decode("utf-8", "ignore")
            self.sendClose(code=refused.code, reason=reason)

    def onClose(self, wasClean, code, reason):
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._lose_mux()
        if self.tunnel is not None:
            self.factory.tunnel_disconnected(self.tunnel)


class ClientTunnelProtocol(_TunnelProtocol, WebSocketClientProtocol):
    """
    The client's end of a tunnel.  C{ready} fires with this protocol once
    the gateway has answered our HELLO, or fails if the tunnel closes first;
    cancelling it drops the connection.  C{handle}, once set, is told when
    the tunnel is lost (see L{anyproxy.client.app.ReadyTunnelEndpoint}).
    """

    handle = None

    def __init__(self):
        super().__init__()
        self.ready = defer.Deferred(lambda d: self.dropConnection(abort=True))

    def onOpen(self):
        self._start_mux(True, self.factory.open_requested, self.peer)
        self.mux.send_hello(self.factory.hello_info())

    def hello_received(self, info):
        if not self.ready.called:
            self.factory.tunnel_ready(self, info)
            self.ready.callback(self)
        else:
            # A later HELLO updates what the first announced (a port granted).
            self.factory.hello_updated(self, info)

    def onClose(self, wasClean, code, reason):
        self._lose_mux()
        if not self.ready.called:
            if code is not None and 4000 <= code <= 4999:
                # The gateway's own refusal (frames.CLOSE_*): say what it said.
                why = "gateway refused the tunnel (%d): %s" % (code, reason or "no reason given")
                log.error("tunnel to {gateway}: {why}", gateway=self.factory.gateway, why=why)
            else:
                why = "not established: %s" % (reason or "code %s" % (code,),)
                log.warn("tunnel to {gateway} {why}", gateway=self.factory.gateway, why=why)
            self.ready.errback(TunnelNotEstablished(code, "tunnel %s" % (why,)))
            return
        self.factory.tunnel_lost(self, reason)
        if self.handle is not None:
            handle, self.handle = self.handle, None
            handle.connectionLost(failure.Failure(error.ConnectionLost(reason or "tunnel closed")))
