# -*- test-case-name: tests.test_e2e_tcp -*-
"""
Autobahn protocols that bind a L{Mux} to a WebSocket.  No parsing here: every
binary message goes to the mux, every mux message goes out as one binary
WebSocket message.  Authentication of the client happens in the opening
handshake (L{GatewayTunnelProtocol.onConnect}), before the upgrade.
"""

import base64
import collections
import struct
import types
import weakref

from autobahn.twisted.websocket import WebSocketClientProtocol, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.python import failure
from twisted.logger import Logger

from anyproxy.auth import BLOCKED
from anyproxy.errors import HelloRefused
from anyproxy.logs import library_logger
from anyproxy.reactor_dispatch import turn_end_clock
from anyproxy.tls import openssl_reason
from anyproxy.tuning import tune_for_bulk, set_no_delay
from anyproxy.tunnel import frames
from anyproxy.tunnel.frame_reader import BinaryFrameReader, FrameTooLarge
from anyproxy.tunnel.tls_transport import (
    batch_records, release_buffers, send_ciphertext_at_once, write_alone)
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
#   inside_message     true while a fragmented message is being read: our
#                       frame reader then leaves the bytes to Autobahn.
#   failedByMe          true once Autobahn has failed the connection (a frame
#                       too large, say): the message is then dropped.
#   state, STATE_OPEN   we write frames ourselves only while the state is open.
#   STATE_CONNECTING    the opening handshake, while data holds its head so far
#                       (bounded by MAX_HANDSHAKE_HEAD).
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
#   data, current_frame  the bytes Autobahn has not parsed yet (b"" when none)
#                       and the frame being read (None between frames): an
#                       idle tunnel's empty ping is answered here, without
#                       the frame parser, only between frames.
#   CONFIG_ATTRS        the options a connection copies from its factory when
#                       it is made, each only if the protocol lacks it
#                       (hasattr): ours move to a class made for one factory's
#                       options (tune_factory, _share_unset_flags).
#   sendData, send_queue  Autobahn queues a write in send_queue only for
#                       sendData(sync=True) or (chopsize=n): until then an
#                       open tunnel shares one empty queue.
#   websocket_version, websocket_protocol_in_use  immutable values, alike
#                       on every open tunnel and changed only by assignment
#                       (as are state, data and Twisted's connected): read
#                       from the class until then.
#   send_state, autoPingPendingSeq  the same.

# A payload this long is encrypted apart from its frame header rather than
# copied behind it (one short TLS record more, against a copy of the payload).
_ENCRYPT_APART = 16 * 1024

# An idle tunnel's traffic: the client's ping (Liveness; an 8-byte counter
# for its RTT figure, or empty), which comes alone in its TLS record, and the
# gateway's pong.  Unmasked, as both ends send every frame (tune_factory).
_PING = 0x89  # FIN, opcode 9 (ping); the next byte, below 126, is an unmasked length
_PONG = 0x8A  # FIN, opcode 10 (pong)

_WS_LEN16 = struct.Struct("!BBH")
_WS_LEN64 = struct.Struct("!BBQ")

HTTP_UNAUTHORIZED = 401  # autobahn's ConnectionDeny names no constant for these
HTTP_TOO_MANY_REQUESTS = 429
# A close frame's payload is at most 125 bytes: 2 of code, then the reason.
MAX_CLOSE_REASON = 120

# Autobahn limits: one frame per message, the largest being a DATA frame.
MAX_MESSAGE = frames.HEADER_SIZE + 256 * 1024 + 1024
# The opening handshake's head (the gateway's request, the client's answer)
# at most: Autobahn keeps every byte until the blank line and scans them all
# again at each read, so a peer that never ends its head (before any login)
# cost 30 MiB a connection in ten seconds.  Ours are a few hundred bytes.
MAX_HANDSHAKE_HEAD = 16 * 1024


def tune_factory(factory, ping_interval, handshake_timeout):
    """
    Autobahn options for a binary tunnel: no compression, bounded sizes, no
    Autobahn auto-ping.  The tunnel factories keep a L{Liveness} as
    C{factory.liveness} instead, whose ping interval this sets: called again
    on reload, the new interval applies to the tunnels already open too.
    """
    if factory not in _options_watched:
        # Connections made after any change of options (this function's, or
        # anyone's) get a class of their own for them.
        set_options = factory.setProtocolOptions

        def set_options_then_fresh_class(**options):
            set_options(**options)
            _fresh_options_class(factory)

        factory.setProtocolOptions = set_options_then_fresh_class
        _options_watched.add(factory)
    # Client-to-server masking (RFC 6455 section 5.3) protects HTTP caches
    # that would misread WebSocket bytes as requests.  Our tunnel runs only
    # inside TLS between two AnyProxy ends, so no intermediary sees the
    # frames; unmasked, the client's sending direction (user downloads) is
    # about a third faster.  See docs/PROTOCOL.md.
    unmasked = ({"requireMaskedClientFrames": False} if factory.isServer
                else {"maskClientFrames": False})
    factory.setProtocolOptions(
        maxFramePayloadSize=MAX_MESSAGE,
        maxMessagePayloadSize=MAX_MESSAGE,
        utf8validateIncoming=False,
        openHandshakeTimeout=handshake_timeout,
        closeHandshakeTimeout=5,
        # Off: Autobahn pings from both ends, each on its own timer, busy or
        # not; Liveness pings only silent tunnels, mostly from one end.
        autoPingInterval=0,
        autoPingTimeout=0,
        failByDrop=True,
        **unmasked,
    )
    liveness = getattr(factory, "liveness", None)
    if liveness is not None:
        liveness.configure(ping_interval)


_options_watched = weakref.WeakSet()  # the factories tune_factory has seen


def _fresh_options_class(factory):
    # Connections made from now on get a class of their own for the
    # factory's options as they are now (_TunnelProtocol._share_unset_flags);
    # those already open keep theirs.
    base = getattr(factory.protocol, "options_base", None) or factory.protocol
    factory.protocol = type(base.__name__, (base,), {"options_base": base,
                                                     "__module__": base.__module__})


# After bulk data a tunnel's TLS buffers hold 64 KiB and more: once quiet
# (liveness.RELEASE_AFTER_SWEEPS), a tunnel that has moved this much stream
# data since it last gave them back does so again (tls_transport.release_buffers).
# The handshake grows them to a few KiB as well (key shares, certificates);
# those are given back one reactor turn after the tunnel opens, so that the
# next tunnel's handshake reuses the memory.  Given back later, at the first
# quiet period, the freed pieces lay between other tunnels' objects and the
# gateway's RSS did not fall; given back at once, it fell from 39.0 to
# 34.8 KiB per idle tunnel (1,024 tunnels, measured).
RELEASE_AFTER_BYTES = 64 * 1024


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


# The send queue of every open tunnel that never queued a write (sendData);
# never appended to.
_NO_SEND_QUEUE = collections.deque(maxlen=0)


class _TunnelProtocol:
    """What both ends share: a mux wired to the WebSocket."""

    # Autobahn's own self.log, replaced by the same kind of txaio logger
    # (no-ops below the level) whose events are redacted as they are made:
    # at debug Autobahn dumps the opening handshake, Authorization included
    # (anyproxy.logs.library_logger).  Our own lines use the module's `log`.
    log = library_logger("autobahn.websocket")
    mux = None
    _unanswered_ping = None  # the latest ping's payload, held while we are congested
    _frame_reader = None  # our frames' reader, once the mux is up
    silence_set = None  # set by anyproxy.tunnel.liveness.Liveness only

    # Autobahn's opening-handshake state (the request, its headers, our
    # response, the transport's details it hands onConnecting), which nothing
    # reads once the WebSocket is open: about 2.5 KiB a tunnel.  Not Autobahn
    # API: only attributes present are cleared, and tests/test_idle_tunnels.py
    # checks that Autobahn still sets them.
    _HANDSHAKE_REMNANTS = (
        "http_headers", "http_request_data", "http_response_data", "http_status_line",
        "http_request_params", "http_request_uri", "http_request_path", "http_request_host",
        "websocket_extensions", "websocket_protocols", "websocket_origin",
        "http_response_body", "_wskey", "_transport_details",
    )

    # Names Autobahn reads with hasattr() to decide whether to set them: its
    # factory's options, copied into each connection unless the protocol
    # already has them.  They are shared only through a class made for one
    # factory's options (options_base, tune_factory); the rest stay per tunnel.
    _OPTIONS = frozenset(WebSocketServerProtocol.CONFIG_ATTRS) | frozenset(
        WebSocketClientProtocol.CONFIG_ATTRS)
    _NOT_SHARED = _OPTIONS | {"trackTimings"}
    # Immutable values Autobahn and Twisted give every open tunnel alike
    # (the protocol version, states, counters), read from the class the
    # same way until one is assigned.
    _SAME_ON_EVERY_TUNNEL = frozenset((
        "websocket_version", "websocket_protocol_in_use", "state", "send_state", "data",
        "connected", "autoPingPendingSeq"))
    # The class tune_factory made this one from, for one factory's options
    # as they were then; None on a class it did not make.
    options_base = None

    def _share_unset_flags(self):
        # Autobahn starts some fifty state flags of every connection at None
        # or False, and copies some thirty factory options into it: an
        # instance dict of 93 entries (3.3 KiB) on each gateway tunnel.
        # While a flag is None or False it reads the same from the class;
        # assigning it (Autobahn and we only ever assign these) puts the
        # tunnel's own value back.  An option the connection has from its
        # factory moves to the class tune_factory made for that factory, so
        # the next connections find it there and do not copy it: the same
        # value, until a reload, which makes a new class for new connections
        # (what Autobahn's copying does too).  A dict of what is left is a
        # quarter of the size (measured in tests/test_idle_tunnels.py).
        cls = type(self)
        factory = self.factory if cls.options_base is not None else None
        kept = {}
        for name, value in self.__dict__.items():
            if name in self._OPTIONS:
                # Not a function: from the class it would read as a method.
                if (factory is not None and getattr(factory, name, kept) is value
                        and not isinstance(value, types.FunctionType)
                        and self._class_holds(name, value)):
                    continue
            elif name in self._SAME_ON_EVERY_TUNNEL:
                if self._class_holds(name, value):
                    continue
            elif (value is None or value is False) and name not in self._NOT_SHARED:
                if not hasattr(cls, name):
                    setattr(cls, name, value)
                if getattr(cls, name) is value:
                    continue
            kept[name] = value
        self.__dict__ = kept
        if not self.send_queue:
            self.send_queue = _NO_SEND_QUEUE

    def _class_holds(self, name, value):
        # Whether this tunnel's class (the first tunnel of it sets it) holds
        # the same immutable value, so that the tunnel can read it there.
        cls = type(self)
        if name not in cls.__dict__:
            setattr(cls, name, value)
        shared = cls.__dict__[name]
        return shared == value and type(shared) is type(value)

    def sendData(self, data, sync=False, chopsize=None):
        # Autobahn queues a write in send_queue only when asked to (sync or
        # chopsize, which we never do): an idle tunnel shares one empty
        # queue instead of its own 0.7 KiB deque.
        if (sync or chopsize) and self.send_queue is _NO_SEND_QUEUE:
            self.send_queue = collections.deque()
        super().sendData(data, sync=sync, chopsize=chopsize)

    def _watch_liveness(self):
        # Called from onOpen.  The handshake's leftovers go too: with
        # thousands of idle tunnels on a gateway, they are memory per tunnel.
        for name in self._HANDSHAKE_REMNANTS:
            if name in self.__dict__:
                setattr(self, name, None)
        self._share_unset_flags()
        liveness = getattr(self.factory, "liveness", None)
        if liveness is not None:
            liveness.add(self)
        # Not from inside this connection's I/O (release_buffers).
        self.factory.reactor.callLater(0, self._release_handshake_buffers)

    _released_at = 0  # the mux's byte count when the TLS buffers were last given back

    def _release_handshake_buffers(self):
        # The gateway's ReleaseAfterBursts already counts the handshake.
        if self.state == self.STATE_OPEN:
            self._replace_tls_buffers()

    def release_idle_buffers(self):
        """Called by L{Liveness} once a tunnel is quiet: free the TLS buffers it grew."""
        mux = self.mux
        moved = mux.bytes_sent + mux.bytes_received if mux is not None else 0
        if moved - self._released_at < RELEASE_AFTER_BYTES:
            return
        self._released_at = moved
        if self._replace_tls_buffers():
            memory = getattr(self.factory, "memory", None)  # the gateway's ReleaseAfterBursts
            if memory is not None:
                memory.buffers_freed()

    def _replace_tls_buffers(self):
        try:
            return release_buffers(self.transport)
        except MemoryError:
            mux = self.mux
            log.error("tunnel {name}: out of memory for its TLS buffers; closing",
                      name=mux.name if mux is not None else self.peer)
            self.dropConnection(abort=True)
            return False

    def abort(self):
        """Close at once, without the closing handshake."""
        self.dropConnection(abort=True)

    def silence_timed_out(self, seconds):
        """Called by L{Liveness}: nothing received for C{seconds}; drop the tunnel."""
        log.warn("tunnel {name}: nothing received for {seconds:g} s; closing",
                 name=self.mux.name if self.mux is not None else self.peer, seconds=seconds)
        self.dropConnection(abort=True)

    def connectionLost(self, reason=failure.Failure(error.ConnectionDone())):
        liveness = getattr(self.factory, "liveness", None)
        if liveness is not None:
            liveness.discard(self)
        super().connectionLost(reason)
        self._round_trip_over()

    def _start_mux(self, initiator, on_open_request, name):
        unmasked = self.factory.isServer or not self.maskClientFrames
        send = self._send_tunnel_frame if unmasked else self._send_tunnel_message
        self.mux = Mux(send, initiator=initiator,
                       on_open_request=on_open_request, on_hello=self.hello_received,
                       on_protocol_error=self._protocol_error, name=name,
                       send_parts=self._send_tunnel_parts if unmasked else None,
                       clock=turn_end_clock(self.factory.reactor), on_go_away=self._peer_going_away,
                       round_trip=self._round_trip)
        # WebSocket send-buffer backpressure pauses every stream's producer.
        # Register on the TCP transport under TLS: Twisted's TLS wrapper will
        # not close while a producer is registered on it, and TLS passes our
        # writes straight down, so the TCP buffer is the one that fills.
        lowest = getattr(self.transport, "transport", None) or self.transport
        lowest.registerProducer(self.mux, True)
        self.mux.lowest_transport = lowest
        self._frame_reader = BinaryFrameReader(MAX_MESSAGE)
        send_ciphertext_at_once(self.transport)
        batch_records(self.transport)
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
        self._pong(payload)

    def _pong(self, payload):
        if not (self.factory.isServer or not self.maskClientFrames):
            self.sendPong(payload)
        elif self.state == self.STATE_OPEN:
            # What sendPong writes (payload at most 125 bytes), without its
            # work, and sent at once on an idle tunnel (tls_transport.py).
            write_alone(self.transport, bytes((_PONG, len(payload))) + payload)

    _GOAWAY_PING = b"goaway"  # not 8 bytes: never one of the RTT pings (client/status)
    _after_go_away = None  # the Deferred of _round_trip, until its pong

    def _round_trip(self):
        # For the mux, once after its GOAWAY: the pong to a ping sent now
        # comes behind everything the peer sent before it read our GOAWAY
        # (RFC 6455 keeps control frames in order with the rest).  Fires on
        # that pong, or when the connection is lost.
        done = self._after_go_away = defer.Deferred()
        if self.state == self.STATE_OPEN:
            self.sendPing(self._GOAWAY_PING)
        return done

    def sendPing(self, payload=None):
        # A congested peer answers only its latest ping (onPing): until the
        # round trip is over, every ping we send is that one, so that a
        # liveness or RTT ping cannot take its place.
        if self._after_go_away is not None:
            payload = self._GOAWAY_PING
        super().sendPing(payload)

    def onPong(self, payload):
        if payload == self._GOAWAY_PING:
            self._round_trip_over()

    def _round_trip_over(self):
        done, self._after_go_away = self._after_go_away, None
        if done is not None:
            done.callback(None)

    def _answer_held_ping(self):
        payload, self._unanswered_ping = self._unanswered_ping, None
        if payload is not None:
            self._pong(payload)

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
        write_joined = getattr(self.transport, "write_joined", None)  # tls_transport.batch_records
        if write_joined is not None and len(payload) >= _ENCRYPT_APART:
            write_joined(prefix + header, payload)
        else:
            self.transport.write(b"".join((prefix, header, payload)))

    def dataReceived(self, data):
        # Autobahn's version formats the arguments of a debug line (type
        # names, the peer) for every read, logged or not: once per TLS
        # read here, a few percent of the receiving process.
        # Anything received proves the peer alive (Liveness).
        if self.silence_set is not None:
            self.factory.liveness.heard(self)
        reader = self._frame_reader
        while True:
            if reader is not None and (
                    not reader.between_frames or self.current_frame is None and not self.data
                    and not self.inside_message and self.state == self.STATE_OPEN):
                # Our own frames skip Autobahn's parser (frame_reader.py).
                try:
                    data = reader.feed(data, self._message_read)
                except FrameTooLarge as e:
                    self._protocol_error(e)
                    return
                if not data:
                    return
            if (len(data) > 1 and data[0] == _PING and data[1] < 126 and len(data) >= 2 + data[1]
                    and self.current_frame is None and not self.data
                    and self.state == self.STATE_OPEN):
                # A whole ping between frames (data[1] < 126 rules out the
                # mask bit and the longer length forms), answered without
                # Autobahn's parser and sender: about 1 us instead of 26
                # (measured), most of what an idle gateway's Python does per
                # tunnel.  The frames after it go on to our reader, not to
                # Autobahn's parser (which copies its buffer at each frame):
                # a read is up to a TCP read's worth of records.
                end = 2 + data[1]
                self.onPing(data[2:end])
                data = data[end:]
                if not data:
                    return
                continue
            self._dataReceived(data)
            if getattr(self, "state", None) == self.STATE_CONNECTING \
                    and len(self.data) > MAX_HANDSHAKE_HEAD:
                log.info("tunnel {peer}: opening handshake longer than {limit} bytes; closing",
                         peer=self.peer, limit=MAX_HANDSHAKE_HEAD)
                self.data = b""
                self.transport.abortConnection()
            return

    def _message_read(self, parts):
        # From our frame reader: true (stop reading) once the mux has closed
        # the connection or begun its closing handshake.
        self.mux.message_parts_received(parts)
        return self.state != self.STATE_OPEN

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
        # The factory's owner may let go of what it keeps on this tunnel
        # (the gateway's idle kept upstream connections).
        hook = getattr(self.factory, "on_tunnel_going_away", None)
        if hook is not None:
            hook()

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
    connection_gone = False  # lost (a handshake answered late must count nothing)

    def connectionMade(self):
        # One handshake deadline, from here to the HELLO (onOpen).
        self._made_at = self.factory.reactor.seconds()
        super().connectionMade()

    def connectionLost(self, reason=failure.Failure(error.ConnectionDone())):
        self.connection_gone = True
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
        if isinstance(grant, defer.Deferred):  # a password hash checked, or a failure delayed
            return grant.addCallback(self._granted, request)
        return self._granted(grant, request)

    def _granted(self, grant, request):
        if self.connection_gone:
            # Gone while its password was checked: count nothing for it.
            raise ConnectionDeny(HTTP_UNAUTHORIZED, "connection lost")
        if grant is BLOCKED:
            # Its source was blocked while its password was checked.
            raise ConnectionDeny(HTTP_TOO_MANY_REQUESTS, "too many failed logins; try again later")
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
            del self.holds_handshake_place  # False, from the class
            self.factory.handshakes.leave()
        if self.grant is not None and not getattr(self, "_hello_counted", False):
            self._hello_counted = True
            self.factory.waiting_for_hello.remove(self.grant.name)

    _hello_refused = False

    def onOpen(self):
        self._start_mux(False, None, self.peer)
        self._watch_liveness()
        # What is left of handshake_timeout since the connection was made:
        # an upgrade finished late must not get a whole timeout more.
        reactor = self.factory.reactor
        made_at = getattr(self, "_made_at", None)
        spent = 0.0 if made_at is None else reactor.seconds() - made_at
        self._hello_timer = reactor.callLater(
            max(0.0, self.factory.handshake_timeout - spent), self._no_hello)

    def _no_hello(self):
        self._hello_timer = None
        log.warn("tunnel {peer}: no HELLO in time; closing", peer=self.peer)
        self.dropConnection(abort=True)

    def hello_received(self, info):
        if self.tunnel is not None or self._hello_refused:
            # A HELLO after a refusal (in the same read, before the close
            # completes) must not register a tunnel on a closing connection.
            return
        self._handshake_over()
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            del self._hello_timer  # None, from the class
        try:
            self.tunnel = self.factory.tunnel_connected(self, info)
        except HelloRefused as refused:
            self._hello_refused = True
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
        self._watch_liveness()
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
