# -*- test-case-name: tests.test_mux -*-
"""
Many streams over one tunnel, each an ordinary Twisted transport.

Theory of operation
-------------------
A L{Mux} owns the stream table of one tunnel.  It is fed whole WebSocket
messages (L{Mux.message_received}) and writes whole messages through the
C{send_message} callable it was given; it never touches a socket, so tests
wire two muxes back to back with plain functions.  It is not sans-I/O in
h11's sense, though: it calls the streams' protocols directly, answers with
Deferreds, and its streams read the clock it is given (an C{IReactorTime}).

Each L{Stream} is an C{ITransport} + C{IPushProducer} + C{IConsumer}, so any
Twisted protocol runs over it unchanged (see L{anyproxy.splice}).  The mux
and its streams talk only through two named interfaces
(L{anyproxy.tunnel.interfaces}): L{IStreamMux}, what a stream may ask of its
mux, and L{IStreamEvents}, what the mux tells a stream.  A stream's
lifecycle is the table of L{anyproxy.tunnel.stream_state}.

Flow control is per stream and credit based, as in yamux and HTTP/2: a sender
may have at most C{window} bytes of DATA unacknowledged.  The receiver grants
CREDIT only while its own consumer (the local socket the stream is spliced to)
is not paused, so a stalled reader costs at most one window of memory on each
side and never blocks the other streams.  Writes beyond the window are queued
in the stream and its producer is paused until credit arrives.  A stream's
receive window starts at C{window} and doubles (up to C{max_window}) each
credit round trip in which its sender was starved for credit while its
reader kept up: auto-tuning, for paths whose bandwidth x delay is above one
window.

The tunnel as a whole has backpressure too: the mux is registered as the
streaming producer of the WebSocket transport, and while that transport's send
buffer is above its high-water mark every stream's producer is paused.

Answers the peer asks for (OPEN_OK or OPEN_ERROR for its OPEN, RESET for DATA
on a stream we do not have) are written whether or not that buffer drains, so
a peer that keeps asking and never reads could make us buffer without bound.
While the buffer is above its mark, the bytes of such answers are counted
(C{reply_backlog}, reset when it drains); a request that arrives with more
than L{MAX_REPLY_BACKLOG} of them unread is a protocol error and the tunnel
is closed.  Legitimate answers are a few bytes per stream opened or closed,
so only a peer that does not read reaches it.  We never stop reading the
peer instead: both ends doing that while their buffers are full would
deadlock.  WebSocket pings are answered in the same spirit by the binding
(L{anyproxy.tunnel.websocket}): while congested, only the latest is kept, and
answered once the buffer drains (C{on_resume}).

Closing follows TCP: FIN is a half-close (C{loseWriteConnection}); after a
full C{loseConnection} the stream is forgotten once its FIN is sent, and DATA
that still arrives for it is answered with RESET.  RESET aborts the stream at
once and its protocol sees C{ConnectionLost}.

GOAWAY drains a tunnel: once either side has sent it (L{Mux.go_away}), the
tunnel takes no new streams in either direction (L{Mux.draining}; an OPEN
from a peer that sent GOAWAY is a protocol error, while OPENs that crossed
our own GOAWAY are served) and the streams it carries go on to their end.
The side that sent GOAWAY closes the tunnel when it sees fit, typically once
L{Mux.when_drained} fires or a deadline passes.  An OPEN the peer sent
before it read our GOAWAY may still be on its way: given a C{round_trip}
(the WebSocket binding's ping, whose pong comes behind anything the peer
sent before it read our GOAWAY), the sender counts as drained only after
that round trip, so closing at L{Mux.when_drained} cuts no such stream.
"""

import struct

from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.errors import Reason, StreamOpenError, coerce_reason
from anyproxy.tunnel import frames
from anyproxy.tunnel.interfaces import IStreamMux
from anyproxy.tunnel.stream import (
    CREDIT_FRACTION, DEFAULT_MAX_WINDOW, DEFAULT_WINDOW, EARLY_DATA, MAX_DATA_PAYLOAD,
    STREAM_HIGH_WATER, MuxProtocolError, Stream, TunnelAddress)

# The stream names are re-exported: callers deal with one module.
__all__ = ["Mux", "Stream", "TunnelAddress", "MuxProtocolError", "DEFAULT_WINDOW",
           "DEFAULT_MAX_WINDOW", "EARLY_DATA", "MAX_DATA_PAYLOAD", "STREAM_HIGH_WATER",
           "CREDIT_FRACTION"]

log = Logger()

# Bytes of answers to the peer's requests written while our send buffer is
# above its high-water mark, beyond which the peer is taken as not reading
# (module docstring).  An OPEN_OK is 9 bytes, an OPEN_ERROR with its text some
# 40: answering a burst of 10,000 opens while congested stays under 400 KiB.
MAX_REPLY_BACKLOG = 1024 * 1024
# DATAGRAM frames: the encoded header (type, stream id, port, host length,
# host) is remembered per (stream, host, port), a few at a time per tunnel;
# and the fixed part of one frame, header and address, is read with one unpack.
MAX_DATAGRAM_ADDRESSES = 256
_DATAGRAM_START = struct.Struct(">BIHB")  # type, stream id, port, host length
_T_DATAGRAM = bytes((frames.T_DATAGRAM,))
# OPEN_OK and CREDIT: the header (type, stream id) and a 32-bit window or increment.
_OPEN_OK = _CREDIT = struct.Struct(">BII")
_T_DATAGRAMS = bytes((frames.T_DATAGRAMS,))
_DATAGRAM_LENGTH = struct.Struct(">H")
# A DATAGRAMS frame is sent once it holds this many bytes (well below the
# WebSocket's message limit), without waiting for the end of the turn.
MAX_DATAGRAMS_FRAME = 64 * 1024


def _early_data_offered(value):
    """A peer's HELLO C{early_data}: bytes, 0 when absent or not a count we can use."""
    if type(value) is not int or value < 0:
        return 0
    return min(value, EARLY_DATA)


# Stream ids are 32 bits, each side's of one parity.
_MAX_STREAM_ID = 0xFFFFFFFF


@implementer(IPushProducer, IStreamMux)
class Mux:
    """
    The stream table of one tunnel.

    @param send_message: called with the bytes of each outgoing WebSocket
        message, in order.
    @param initiator: C{True} on the side that opened the tunnel (the
        AnyProxy client; odd stream ids), C{False} on the gateway (even ids).
    @param on_open_request: called with a new incoming L{Stream} (which has
        C{kind}, C{host}, C{port}); the callee must later C{accept} or
        C{reject} it.  C{None} refuses every incoming open.
    @param on_hello: called with the peer's HELLO dict.
    @param on_protocol_error: called with a L{MuxProtocolError} or
        L{frames.FrameError}; the owner must close the tunnel.
    @param send_parts: optional; called with C{(header, payload)} for each
        DATA message, so the transport can frame both in one copy instead of
        this side joining them first (the bulk data path).
    @param clock: the C{IReactorTime} whose C{seconds()} dates the streams'
        records (C{created}, C{last_active}); the global reactor if C{None}.
    @param on_go_away: called with the L{Reason} of the peer's GOAWAY, once.
    @param max_window: the bound of a stream's auto-tuned receive window
        (C{window} turns auto-tuning off).
    @param round_trip: optional; called with no arguments when this side
        sends GOAWAY, returns a Deferred firing once everything the peer
        sent before reading that GOAWAY has arrived (see the module
        docstring).  Without it L{when_drained} does not wait for OPENs
        crossing our GOAWAY.
    @ivar draining: C{True} once GOAWAY was sent or received: the tunnel
        takes no new streams (pick another tunnel for them); the streams it
        has go on.  Read by the gateway's tunnel pool.
    @ivar go_away_sent: C{True} once this side sent GOAWAY (L{go_away}).
    @ivar go_away_received: the L{Reason} of the peer's GOAWAY, or C{None}.
    @ivar bytes_sent: DATA and DATAGRAM payload bytes sent on all streams (metrics).
    @ivar bytes_received: the same, received.
    @ivar streams_opened: streams opened on this tunnel, by either side
        (an OPEN answered OPEN_OK); the status page shows it.
    @ivar lowest_transport: the socket transport under TLS and WebSocket,
        whose send buffer metrics report; set by the WebSocket binding.
    @ivar reply_backlog: bytes of answers to the peer's requests sent since
        the send buffer went above its high-water mark (0 while below it).
    @ivar on_resume: C{None}, or called with no arguments each time the send
        buffer drains below its high-water mark (the WebSocket binding
        answers a ping it held back).
    """

    # A gateway keeps a Mux per tunnel, thousands of them: slots instead of
    # an instance dict (which grew to 1.5 KiB a tunnel as attributes were
    # added after __init__).  The dict slot stays for what tests and
    # callers hang on one (it is made only then).
    __slots__ = (
        "_send_message", "_send_parts", "_next_id", "_peer_parity", "on_open_request", "on_hello",
        "on_protocol_error", "on_go_away", "window", "max_window", "name", "clock", "_streams",
        "_lost", "_last_peer_id", "_refused", "_drain_waiters", "_round_trip", "_crossing",
        "paused", "datagrams_dropped", "bytes_sent", "bytes_received", "streams_opened",
        "lowest_transport", "reply_backlog", "on_resume", "go_away_sent", "go_away_received",
        "_peer_takes_dialed", "_peer_takes_batches", "_datagram_headers", "_batch_turn",
        "_datagram_batches", "early_data", "_peer_early_data", "__dict__")

    def __init__(self, send_message, initiator, on_open_request=None, on_hello=None,
                 on_protocol_error=None, window=DEFAULT_WINDOW, name="", send_parts=None,
                 clock=None, on_go_away=None, max_window=DEFAULT_MAX_WINDOW,
                 round_trip=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self._send_message = send_message
        self._send_parts = send_parts
        self._next_id = 1 if initiator else 2
        self._peer_parity = 0 if initiator else 1
        self.on_open_request = on_open_request
        self.on_hello = on_hello
        self.on_protocol_error = on_protocol_error
        self.on_go_away = on_go_away
        self.window = window
        self.max_window = max_window
        self.name = name
        self.clock = clock
        self._streams = {}
        self._lost = False
        self._last_peer_id = 0
        self._refused = None  # ids of streams we refused (a set, once there is one)
        self._drain_waiters = None  # Deferreds of when_drained (a list, once there is one)
        self._round_trip = round_trip
        self._crossing = False  # our GOAWAY sent, the peer's OPENs sent before it may be on their way
        self.paused = False
        self.datagrams_dropped = 0
        self.bytes_sent = self.bytes_received = 0
        self.streams_opened = 0
        self.lowest_transport = None
        self.reply_backlog = 0
        self.on_resume = None
        self.go_away_sent = False
        self.go_away_received = None
        self._peer_takes_dialed = False  # the peer's HELLO had frames.HELLO_DIALED
        self._peer_takes_batches = False  # the peer's HELLO had frames.HELLO_DATAGRAMS
        self._datagram_headers = None  # (stream id, host, port) -> (DATAGRAM frame header, address)
        self._batch_turn = None  # the DelayedCall ending this turn's batching, while one is open
        self._datagram_batches = None  # stream id -> [pieces of a DATAGRAMS payload], bytes so far
        # Early data (docs/PROTOCOL.md): what we take on a stream the peer
        # opens before we answer (our HELLO says so), and what the peer takes
        # (its HELLO; 0 until one says more).
        self.early_data = min(EARLY_DATA, window)
        self._peer_early_data = 0

    @property
    def stream_count(self):
        """How many streams are open (or opening) now."""
        return len(self._streams)

    def streams(self):
        """The open streams (a snapshot list)."""
        return list(self._streams.values())

    @property
    def draining(self):
        """See the class docstring."""
        return self.go_away_sent or self.go_away_received is not None

    @property
    def lost(self):
        """Whether the tunnel is gone (L{connection_lost}): it opens no stream."""
        return self._lost

    # -- sending --------------------------------------------------------

    def _send(self, frame):
        self._send_raw(frames.encode(frame))

    def _send_raw(self, message):
        if self._datagram_batches:
            self._send_datagram_batches()  # a FIN or RESET must not overtake them
        if not self._lost:
            self._send_message(message)

    def _send_reply(self, message):
        """Send an answer the peer asked for (encoded), counted while we are congested."""
        if self.paused:
            self.reply_backlog += len(message)
        self._send_raw(message)

    def _check_reply_backlog(self):
        # Called when the peer asks for an answer: see the module docstring.
        if self.paused and self.reply_backlog > MAX_REPLY_BACKLOG:
            raise MuxProtocolError("the peer does not read: %d bytes of answers to it are "
                                   "waiting" % (self.reply_backlog,))

    def send_hello(self, info):
        """
        Send this side's HELLO (a JSON-able dict), with the mux's own key
        saying that it takes DATAGRAMS frames.
        """
        self._send(frames.Hello(dict(info, **{frames.HELLO_DATAGRAMS: True,
                                              frames.HELLO_DIALED: True,
                                              frames.HELLO_EARLY_DATA: self.early_data})))

    # -- IStreamMux: what a stream may ask of us ------------------------

    # OPEN_OK, CREDIT and FIN are packed here without a frame object (and
    # frames.encode's dispatch): they go out once or more per stream.

    def send_open_ok(self, stream_id, dialed=None):
        """
        Answer an OPEN: connected.  C{dialed}, C{(host, port)} we connected
        to, goes with it to a peer that reads it (its access log).
        """
        message = _OPEN_OK.pack(frames.T_OPEN_OK, stream_id, self.window)
        if dialed is not None and self._peer_takes_dialed:
            message += frames.encode_address(*dialed)
        self._send_reply(message)
        self.streams_opened += 1

    def send_open_error(self, stream_id, reason, text):
        self._send_reply(frames.encode(frames.OpenError(stream_id, int(reason), text)))

    def send_data(self, stream_id, payload):
        if self._lost:
            return
        self.bytes_sent += len(payload)
        header = frames.HEADER.pack(frames.T_DATA, stream_id)
        if self._send_parts is not None:
            self._send_parts(header, payload)
        else:
            self._send_message(header + payload)

    def send_credit(self, stream_id, increment):
        self._send_raw(_CREDIT.pack(frames.T_CREDIT, stream_id, increment))

    def send_fin(self, stream_id):
        self._send_raw(frames.HEADER.pack(frames.T_FIN, stream_id))

    def send_reset(self, stream_id, reason):
        self._send(frames.Reset(stream_id, int(reason)))

    # -- datagrams ------------------------------------------------------
    #
    # A burst of datagrams read in one reactor turn travels in DATAGRAMS
    # frames (docs/PROTOCOL.md), one per stream, if the peer's HELLO said it
    # takes them: one WebSocket frame to write and for the peer to parse
    # instead of one per datagram.  The first datagram of a turn goes out at
    # once as a DATAGRAM frame, so a lone datagram (a request and its answer)
    # waits for nothing; the ones after it in the same turn are batched until
    # the turn ends (a callLater(0): a turn-end call under twistd,
    # anyproxy.reactor_dispatch), a batch fills (MAX_DATAGRAMS_FRAME) or
    # another frame is sent (_send_raw), so none is overtaken by its stream's
    # FIN or RESET.


    def send_datagram(self, stream_id, host, port, payload):
        if self.paused or self._lost:
            self.datagrams_dropped += 1
            return False
        # frames.encode(frames.Datagram(...)) without the frame object, the
        # host encoding and one copy of the payload, once per datagram: the
        # header (type, stream id, address) is remembered.
        headers = self._datagram_headers
        if headers is None:
            headers = self._datagram_headers = {}
        key = (stream_id, host, port)
        cached = headers.get(key)
        if cached is None:
            address = frames.encode_address(host, port)
            cached = (frames.HEADER.pack(frames.T_DATAGRAM, stream_id) + address, address)
            if len(headers) >= MAX_DATAGRAM_ADDRESSES:
                headers.clear()
            headers[key] = cached
        if self._batch_turn is not None and len(payload) <= frames.MAX_BATCHED_DATAGRAM:
            self._batch_datagram(stream_id, cached[1], payload)
        else:
            if self._datagram_batches:
                self._send_datagram_batches()  # in order
            elif self._peer_takes_batches and self._batch_turn is None:
                self._batch_turn = self.clock.callLater(0, self._end_of_batch_turn)
            if self._send_parts is not None:
                self._send_parts(cached[0], payload)
            else:
                self._send_message(cached[0] + payload)
        self.bytes_sent += len(payload)
        return True

    def _batch_datagram(self, stream_id, address, payload):
        batches = self._datagram_batches
        if batches is None:
            batches = self._datagram_batches = {}
        batch = batches.get(stream_id)
        if batch is None:
            batch = batches[stream_id] = [[], 0]
        pieces = batch[0]
        pieces.append(address)
        pieces.append(_DATAGRAM_LENGTH.pack(len(payload)))
        pieces.append(payload)
        batch[1] += len(address) + 2 + len(payload)
        if batch[1] >= MAX_DATAGRAMS_FRAME:
            del batches[stream_id]
            self._send_datagram_batch(stream_id, pieces)

    def _send_datagram_batch(self, stream_id, pieces):
        header = frames.HEADER.pack(frames.T_DATAGRAMS, stream_id)
        if self._send_parts is not None:
            self._send_parts(header, b"".join(pieces))
        else:
            self._send_message(header + b"".join(pieces))

    def _send_datagram_batches(self):
        batches, self._datagram_batches = self._datagram_batches, None
        if batches and not self._lost:
            for stream_id, (pieces, _) in batches.items():
                self._send_datagram_batch(stream_id, pieces)

    def _end_of_batch_turn(self):
        self._batch_turn = None
        self._send_datagram_batches()

    def _end_datagram_batching(self):
        # The tunnel is lost: what waits is dropped, like datagrams in flight.
        turn, self._batch_turn = self._batch_turn, None
        if turn is not None and turn.active():
            turn.cancel()
        self._datagram_batches = None

    def datagram_dropped(self):
        self.datagrams_dropped += 1

    def stream_ended(self, stream):
        self._streams.pop(stream.stream_id, None)
        if not self._streams:
            self._check_drained()

    # -- opening --------------------------------------------------------

    def open_stream(self, kind, host, port, first_data=b""):
        """
        Ask the peer to connect to C{host:port}.

        @param first_data: bytes for the target, written to the stream at
            once: up to the early data the peer's HELLO offered they go with
            the OPEN, the rest once it is answered (tcp streams only).  If
            the open fails, the peer drops them unread.
        @return: a Deferred firing with the L{Stream} once the peer answers
            OPEN_OK (attach a protocol with L{Stream.attach}), or failing with
            L{StreamOpenError}: NO_TUNNEL at once if the tunnel is lost or
            draining.  Cancelling it resets the stream.
        """
        try:
            stream = self.start_stream(kind, host, port)
        except StreamOpenError:
            return defer.fail()
        if first_data and kind == "tcp":
            stream.write(first_data)
        return stream.opened

    def start_stream(self, kind, host, port):
        """
        Ask the peer to connect to C{host:port}, and return the new L{Stream}
        at once, while its OPEN waits for an answer: what is written to it
        until then goes as L{open_stream}'s C{first_data} does.  Its
        L{Stream.opened} is L{open_stream}'s answer.

        @raise StreamOpenError: NO_TUNNEL if the tunnel is lost or draining;
            GENERAL_FAILURE for a target an OPEN cannot carry.
        """
        if self._lost:
            raise StreamOpenError(Reason.NO_TUNNEL, "tunnel closed")
        if self.draining:
            raise StreamOpenError(Reason.NO_TUNNEL, "tunnel going away")
        stream_id = self._next_id
        if stream_id > _MAX_STREAM_ID:
            # The ids of this tunnel are used up (2^31 opens from one side):
            # the peer moves to a new tunnel, as after a drain.
            self.go_away()
            raise StreamOpenError(Reason.NO_TUNNEL, "stream ids used up; tunnel going away")
        try:
            # Encoded before the stream exists: a target the frame cannot
            # carry (a name longer than 255 bytes once IDNA-encoded) must
            # leave nothing behind.
            message = frames.encode(frames.Open(stream_id, kind, host, port, self.window))
        except frames.FrameError as e:
            raise StreamOpenError(Reason.GENERAL_FAILURE, str(e)) from None
        self._next_id += 2

        def cancel(_):
            stream.reset(Reason.GENERAL_FAILURE)  # nothing if it has finished

        opening = defer.Deferred(cancel)
        stream = Stream(self, stream_id, kind, host, port, opening=opening,
                        early=self._peer_early_data if kind == "tcp" else 0)
        self._streams[stream_id] = stream
        self._send_raw(message)
        return stream

    # -- going away -----------------------------------------------------

    def go_away(self, reason=Reason.NO_TUNNEL):
        """
        Send GOAWAY: the peer opens no new streams on this tunnel, and
        neither do we (L{draining}).  Streams already open go on; closing
        the tunnel is up to the caller (see L{when_drained}).  Only the
        first call sends; nothing is sent once the tunnel is lost.

        @param reason: a L{Reason} for the peer's log.
        """
        if self.go_away_sent or self._lost:
            return
        self.go_away_sent = True
        self._send(frames.GoAway(int(reason)))
        if self._round_trip is not None and self.go_away_received is None:
            self._crossing = True
            self._round_trip().addBoth(self._crossing_over)
        self._check_drained()

    def _crossing_over(self, _):
        self._crossing = False
        self._check_drained()

    def when_drained(self):
        """
        A Deferred firing with C{None} once the tunnel is draining and has
        no stream left (nor any OPEN crossing our GOAWAY: see C{round_trip}),
        or is lost; at once if it already is.
        """
        d = defer.Deferred()
        if self._drain_waiters is None:
            self._drain_waiters = []
        self._drain_waiters.append(d)
        self._check_drained()
        return d

    def _check_drained(self):
        if self._drain_waiters and (self._lost or (self.draining and not self._streams
                                                   and not self._crossing)):
            waiters, self._drain_waiters = self._drain_waiters, None
            for waiter in waiters:
                waiter.callback(None)

    def _go_away_received(self, code):
        if self.go_away_received is not None:
            return  # a repeat says nothing new
        self.go_away_received = coerce_reason(code)
        if self.on_go_away is not None:
            self.on_go_away(self.go_away_received)
        self._check_drained()

    # -- receiving ------------------------------------------------------

    def message_received(self, message):
        """Handle one WebSocket message from the peer."""
        try:
            frame = frames.decode(message)
            self._deliver(frame)
        except (frames.FrameError, MuxProtocolError) as e:
            if self.on_protocol_error is not None:
                self.on_protocol_error(e)
            else:
                raise

    def _deliver(self, frame):
        """
        C{_dispatch}, where an error raised by what a stream's frame reached
        (its protocol, the open handler) ends that stream, as Twisted ends a
        TCP connection whose protocol raised, and not the tunnel and every
        other stream on it.
        """
        try:
            self._dispatch(frame)
        except (frames.FrameError, MuxProtocolError):
            raise
        except Exception:
            if not self._handler_failed(frame.stream_id):
                raise

    def _handler_failed(self, stream_id):
        """
        In an C{except} block: log the error raised while stream
        C{stream_id}'s frame was handled and reset that stream.  C{False}
        (nothing done) if there is no such stream: the caller raises.
        """
        stream = self._streams.get(stream_id) if stream_id else None
        if stream is None:
            return False
        log.failure("{name}: stream {sid} {target}: error in what handles it; resetting the "
                    "stream", name=self.name, sid=stream_id,
                    target="%s:%s" % (stream.host, stream.port))
        stream.reset(Reason.GENERAL_FAILURE)
        return True

    def message_parts_received(self, parts):
        """
        Handle one WebSocket message that arrived as several byte strings
        (bytes or memoryviews: L{anyproxy.tunnel.frame_reader}).

        The bulk path: a DATA payload is joined once, without its header,
        instead of joining the message and then slicing the header off.
        """
        first = parts[0] if parts else b""
        if first[:1] == _T_DATAGRAM:
            self._datagram_message(b"".join(parts))
            return
        if first[:1] == _T_DATAGRAMS:
            self._datagrams_message(b"".join(parts))
            return
        if len(first) < frames.HEADER_SIZE or first[0] != frames.T_DATA:
            self.message_received(b"".join(parts))
            return
        _, stream_id = frames.HEADER.unpack_from(first)
        payload = b"".join([first[frames.HEADER_SIZE:]] + parts[1:])
        if not payload:
            self.message_received(bytes(first))  # an empty DATA: decode reports it
            return
        try:
            self._deliver(frames.Data(stream_id, payload))
        except MuxProtocolError as e:
            if self.on_protocol_error is not None:
                self.on_protocol_error(e)
            else:
                raise

    def _datagram_message(self, message):
        # The DATAGRAM path of message_received, without the frame object;
        # anything unusual (truncated, not ASCII) goes the general way, which
        # reports it.
        if len(message) >= _DATAGRAM_START.size:
            _, stream_id, port, host_length = _DATAGRAM_START.unpack_from(message)
            end = _DATAGRAM_START.size + host_length
            host = message[_DATAGRAM_START.size:end]
            if host_length and len(message) >= end and host.isascii():
                stream = self._streams.get(stream_id)
                payload = message[end:]
                try:
                    if stream is not None and stream.datagram_received(
                            host.decode("ascii"), port, payload):
                        self.bytes_received += len(payload)
                    else:
                        self.datagrams_dropped += 1
                except MuxProtocolError as e:
                    if self.on_protocol_error is not None:
                        self.on_protocol_error(e)
                    else:
                        raise
                except Exception:
                    if not self._handler_failed(stream_id):
                        raise
                return
        self.message_received(message)

    def _datagrams_message(self, message):
        # A DATAGRAMS frame: frames.decode's checks, without the frame object.
        try:
            if len(message) < frames.HEADER_SIZE:
                raise frames.FrameError("message shorter than the frame header")
            _, stream_id = frames.HEADER.unpack_from(message)
            datagrams = frames.decode_datagram_records(message[frames.HEADER_SIZE:])
            self._datagrams_received(self._streams.get(stream_id), datagrams)
        except (frames.FrameError, MuxProtocolError) as e:
            if self.on_protocol_error is not None:
                self.on_protocol_error(e)
            else:
                raise
        except Exception:
            if not self._handler_failed(stream_id):
                raise

    def _datagrams_received(self, stream, datagrams):
        for host, port, payload in datagrams:
            if stream is not None and stream.datagram_received(host, port, payload):
                self.bytes_received += len(payload)
            else:
                self.datagrams_dropped += 1

    def _dispatch(self, frame):
        # Frames for a stream we do not have: DATA gets one RESET (_unknown_stream_data),
        # a DATAGRAM is dropped, the rest is ignored (the stream was just closed).
        kind = type(frame)
        stream = self._streams.get(frame.stream_id)
        if kind is frames.Data:
            if stream is None:
                self._unknown_stream_data(frame.stream_id)
            else:
                self.bytes_received += len(frame.payload)
                stream.data_received(frame.payload)
        elif kind is frames.Datagram:
            if stream is not None and stream.datagram_received(frame.host, frame.port,
                                                               frame.payload):
                self.bytes_received += len(frame.payload)
            else:
                self.datagrams_dropped += 1
        elif kind is frames.Credit:
            if stream is not None:
                stream.credit_received(frame.increment)
        elif kind is frames.Fin:
            if stream is not None:
                stream.fin_received()
        elif kind is frames.Reset:
            if stream is not None:
                stream.reset_received(frame.reason)
        elif kind is frames.Open:
            self._open_received(frame)
        elif kind is frames.OpenOk:
            if stream is not None:
                self.streams_opened += 1
                if frame.dialed is not None:
                    stream.dialed = frame.dialed
                stream.open_succeeded(frame.window)
        elif kind is frames.OpenError:
            if stream is not None:
                stream.open_failed(frame.reason, frame.text)
        elif kind is frames.Datagrams:
            self._datagrams_received(stream, frame.datagrams)
        elif kind is frames.Hello:
            self._peer_takes_batches = frame.info.get(frames.HELLO_DATAGRAMS) is True
            self._peer_takes_dialed = frame.info.get(frames.HELLO_DIALED) is True
            self._peer_early_data = _early_data_offered(frame.info.get(frames.HELLO_EARLY_DATA))
            if self.on_hello is not None:
                self.on_hello(frame.info)
        elif kind is frames.GoAway:
            self._go_away_received(frame.reason)
        else:
            raise MuxProtocolError("unexpected %s frame" % (kind.__name__,))

    def _unknown_stream_data(self, stream_id):
        # Data for a stream we closed (or never had): refuse it once, like TCP.
        refused = self._refused
        if refused is None:
            refused = self._refused = set()
        if stream_id not in refused:
            self._check_reply_backlog()
            if len(refused) > 1024:
                refused.clear()
            refused.add(stream_id)
            self._send_reply(frames.encode(frames.Reset(stream_id, int(Reason.GENERAL_FAILURE))))

    def _open_received(self, frame):
        sid = frame.stream_id
        if sid % 2 != self._peer_parity or sid <= self._last_peer_id:
            raise MuxProtocolError("bad stream id %d in OPEN" % (sid,))
        if self.go_away_received is not None:
            raise MuxProtocolError("OPEN of stream %d after the peer's GOAWAY" % (sid,))
        self._check_reply_backlog()
        self._last_peer_id = sid
        stream = Stream(self, sid, frame.kind, frame.host, frame.port, send_window=frame.window)
        self._streams[sid] = stream
        if self.on_open_request is None:
            stream.reject(Reason.NOT_ALLOWED, "this side accepts no streams")
        else:
            self.on_open_request(stream)

    # -- IPushProducer: the WebSocket transport's backpressure ----------

    def pauseProducing(self):
        self.paused = True
        for stream in list(self._streams.values()):
            stream.tunnel_pause_changed()

    def resumeProducing(self):
        self.paused = False
        self.reply_backlog = 0
        if self.on_resume is not None:
            self.on_resume()
        for stream in list(self._streams.values()):
            stream.tunnel_pause_changed()

    def stopProducing(self):
        self.connection_lost(error.ConnectionLost("tunnel transport stopped"))

    # -- the end --------------------------------------------------------

    def connection_lost(self, reason=None):
        """The tunnel is gone: every stream is reset and pending opens fail."""
        if self._lost:
            return
        self._lost = True
        self._end_datagram_batching()
        for stream in list(self._streams.values()):
            stream.tunnel_lost()
        self._streams.clear()
        self._check_drained()
