# -*- test-case-name: tests.test_mux -*-
"""
Many streams over one tunnel, each an ordinary Twisted transport.

Theory of operation
-------------------
A L{Mux} owns the stream table of one tunnel.  It is fed whole WebSocket
messages (L{Mux.message_received}) and writes whole messages through the
C{send_message} callable it was given; it never touches a socket, so tests
wire two muxes back to back with plain functions.

Each L{Stream} is an C{ITransport} + C{IPushProducer} + C{IConsumer}, so any
Twisted protocol runs over it unchanged (see L{anyproxy.splice}).

Flow control is per stream and credit based, as in yamux and HTTP/2: a sender
may have at most C{window} bytes of DATA unacknowledged.  The receiver grants
CREDIT only while its own consumer (the local socket the stream is spliced to)
is not paused, so a stalled reader costs at most one window of memory on each
side and never blocks the other streams.  Writes beyond the window are queued
in the stream and its producer is paused until credit arrives.

The tunnel as a whole has backpressure too: the mux is registered as the
streaming producer of the WebSocket transport, and while that transport's send
buffer is above its high-water mark every stream's producer is paused.

Closing follows TCP: FIN is a half-close (C{loseWriteConnection}); after a
full C{loseConnection} the stream is forgotten once its FIN is sent, and DATA
that still arrives for it is answered with RESET.  RESET aborts the stream at
once and its protocol sees C{ConnectionLost}.
"""

import collections

from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IAddress, IConsumer, IHalfCloseableProtocol, IPushProducer, ITransport)
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import implementer

import attr

from anyproxy.errors import Reason, StreamOpenError
from anyproxy.tunnel import frames

# A stream's receive window.  Big enough to keep a loopback or LAN path busy
# (bandwidth x delay), small enough that 10,000 stalled streams stay bounded.
DEFAULT_WINDOW = 1024 * 1024
# DATA payloads are cut to this size: large frames keep per-frame overhead
# (Python calls, WebSocket framing) low on bulk transfers.
MAX_DATA_PAYLOAD = 256 * 1024
# Queued-but-unsent bytes above which the stream pauses its producer.
STREAM_HIGH_WATER = 64 * 1024
# Credit is granted once this fraction of the window has been consumed, so a
# busy stream sends one CREDIT per quarter window, not one per DATA frame.
CREDIT_FRACTION = 4

log = Logger()


@implementer(IAddress)
@attr.s(frozen=True, slots=True)
class TunnelAddress:
    """The address of a stream's far end, as seen through a tunnel."""

    host = attr.ib()
    port = attr.ib()
    tunnel = attr.ib(default="")


class MuxProtocolError(Exception):
    """The peer broke the tunnel protocol; the tunnel must be closed."""


@implementer(ITransport, IPushProducer, IConsumer)
class Stream:
    """
    One multiplexed byte stream.  Created by L{Mux}; do not build directly.

    @ivar kind: C{'tcp'} or C{'udp'}.
    @ivar host: the target asked for when the stream was opened.
    @ivar port: the target port.
    """

    disconnecting = False
    protocol = None

    def __init__(self, mux, stream_id, kind, host, port, send_window=0):
        self._mux = mux
        self.stream_id = stream_id
        self.kind = kind
        self.host = host
        self.port = port
        self._send_window = send_window
        self._recv_window = mux.window
        self._unacked = 0
        self._queue = collections.deque()
        self._queued = 0
        self._early = []  # DATA that arrived before a protocol was attached
        self._producer = None
        self._producer_paused = False
        self._reading_paused = False
        self._fin_pending = False
        self._fin_sent = False
        self._fin_received = False
        self._close_requested = False
        self._closed = False
        self._cancel_hook = None
        self._opening = None  # Deferred of a stream this side is opening

    @property
    def closed(self):
        """C{True} once the stream is finished (closed, reset or rejected)."""
        return self._closed

    def __repr__(self):
        return "<Stream %d %s %s:%s>" % (self.stream_id, self.kind, self.host, self.port)

    # -- attaching a protocol -------------------------------------------

    def attach(self, protocol):
        """Connect C{protocol} to this stream (calls its C{makeConnection})."""
        self.protocol = protocol
        protocol.makeConnection(self)
        early, self._early = self._early, []
        for data in early:
            if self._closed:
                return
            protocol.dataReceived(data)
        if self._fin_received and not self._closed:
            self._deliver_fin()
        # Early DATA was never credited; without this a full window of it stalls the sender.
        self._grant_credit()

    def accept(self, protocol):
        """Accept an incoming open request and connect C{protocol} to it."""
        self._mux._send(frames.OpenOk(self.stream_id, self._mux.window))
        self.attach(protocol)

    def reject(self, reason, text=""):
        """Refuse an incoming open request with a L{Reason}."""
        if self._closed:
            return
        self._mux._send(frames.OpenError(self.stream_id, int(reason), text))
        self._forget()

    def set_cancel_hook(self, hook):
        """Call C{hook()} if the opener gives up before accept/reject."""
        self._cancel_hook = hook

    # -- ITransport -----------------------------------------------------

    def write(self, data):
        if self._close_requested or self._fin_pending or self._closed or not data:
            return
        self._queue.append(data)
        self._queued += len(data)
        self._flush()

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def loseWriteConnection(self):
        """Half-close: send FIN once queued data is sent."""
        if self._closed or self._fin_pending:
            return
        self._fin_pending = True
        self._flush()

    def loseConnection(self):
        """Close after queued data is sent; incoming data is then refused."""
        if self._closed or self._close_requested:
            return
        self._close_requested = True
        self.disconnecting = True
        if self._fin_sent:
            # Already half-closed: nothing left to send, so finish now.
            self._lose(error.ConnectionDone("stream closed"))
            return
        self._fin_pending = True
        self._flush()

    def abortConnection(self):
        """Drop queued data and reset the stream now."""
        self.reset(Reason.GENERAL_FAILURE)

    def reset(self, reason=Reason.GENERAL_FAILURE):
        """Send RESET with C{reason} and close the stream at once."""
        if self._closed:
            return
        self._mux._send(frames.Reset(self.stream_id, int(reason)))
        self._lose(error.ConnectionLost("stream reset locally"))

    def getPeer(self):
        return TunnelAddress(self.host, self.port, self._mux.name)

    def getHost(self):
        return TunnelAddress("tunnel", self.stream_id, self._mux.name)

    # -- IConsumer ------------------------------------------------------

    def registerProducer(self, producer, streaming):
        if not streaming:
            raise ValueError("streams only take push producers")
        self._producer = producer
        self._producer_paused = False
        self._update_producer()

    def unregisterProducer(self):
        self._producer = None

    # -- IPushProducer: our consumer (the local socket) drives credit ---

    def pauseProducing(self):
        self._reading_paused = True

    def resumeProducing(self):
        self._reading_paused = False
        self._grant_credit(force=True)

    def stopProducing(self):
        self.loseConnection()

    # -- sending --------------------------------------------------------

    def _flush(self):
        queue = self._queue
        send = self._mux._send_raw
        sid = self.stream_id
        while queue and self._send_window > 0 and not self._closed:
            chunk = queue.popleft()
            room = min(self._send_window, MAX_DATA_PAYLOAD)
            if len(chunk) > room:
                queue.appendleft(chunk[room:])
                chunk = chunk[:room]
            self._send_window -= len(chunk)
            self._queued -= len(chunk)
            send(frames.HEADER.pack(frames.T_DATA, sid) + chunk)
        if self._closed:
            return
        if not queue and self._fin_pending and not self._fin_sent:
            self._fin_sent = True
            self._mux._send(frames.Fin(sid))
            if self._close_requested:
                self._lose(error.ConnectionDone("stream closed"))
                return
            if IHalfCloseableProtocol.providedBy(self.protocol):
                self.protocol.writeConnectionLost()
            if self._fin_received:
                self._lose(error.ConnectionDone("stream closed"))
                return
        self._update_producer()

    def _update_producer(self):
        if self._producer is None:
            return
        should_pause = self._queued >= STREAM_HIGH_WATER or self._mux.paused
        if should_pause and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()
        elif not should_pause and self._producer_paused:
            self._producer_paused = False
            self._producer.resumeProducing()

    def _grant_credit(self, force=False):
        unacked = self._unacked
        if self._closed or self._reading_paused or not unacked:
            return
        if force or unacked >= self._mux.window // CREDIT_FRACTION:
            self._unacked = 0
            self._recv_window += unacked
            self._mux._send(frames.Credit(self.stream_id, unacked))

    # -- receiving (called by the Mux) ----------------------------------

    def _data_received(self, payload):
        if self._fin_received:
            raise MuxProtocolError("DATA after FIN on stream %d" % (self.stream_id,))
        self._recv_window -= len(payload)
        if self._recv_window < 0:
            raise MuxProtocolError("stream %d overran its window" % (self.stream_id,))
        self._unacked += len(payload)
        if self._close_requested:
            # We no longer read; keep the sender going until it sees our FIN.
            self._grant_credit(force=True)
            return
        if self.protocol is None:
            self._early.append(payload)
            return
        self.protocol.dataReceived(payload)
        self._grant_credit()

    def _credit_received(self, increment):
        self._send_window += increment
        if self._send_window > 0x7FFFFFFF:
            raise MuxProtocolError("stream %d window overflow" % (self.stream_id,))
        self._flush()

    def _fin_frame_received(self):
        if self._fin_received:
            return
        self._fin_received = True
        if self.protocol is None:
            return  # delivered by attach()
        self._deliver_fin()

    def _deliver_fin(self):
        if self._fin_sent:
            self._lose(error.ConnectionDone("stream closed"))
        elif IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
        else:
            self.loseConnection()

    def _reset_received(self, reason):
        self._lose(error.ConnectionLost("stream reset by peer (%s)" % (reason,)))

    def _lose(self, reason):
        """The stream is finished: forget it and tell the protocol."""
        if self._closed:
            return
        self._forget()
        self._queue.clear()
        self._queued = 0
        if self._cancel_hook is not None:
            hook, self._cancel_hook = self._cancel_hook, None
            if self.protocol is None:
                hook()
        self._producer = None
        if self.protocol is not None:
            self.protocol.connectionLost(failure.Failure(reason))

    def _forget(self):
        self._closed = True
        self.disconnecting = True
        self._mux._streams.pop(self.stream_id, None)


@implementer(IPushProducer)
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
    """

    paused = False

    def __init__(self, send_message, initiator, on_open_request=None, on_hello=None,
                 on_protocol_error=None, window=DEFAULT_WINDOW, name=""):
        self._send_message = send_message
        self._next_id = 1 if initiator else 2
        self._peer_parity = 0 if initiator else 1
        self.on_open_request = on_open_request
        self.on_hello = on_hello
        self.on_protocol_error = on_protocol_error
        self.window = window
        self.name = name
        self._streams = {}
        self._lost = False
        self._last_peer_id = 0
        self._refused = set()

    @property
    def stream_count(self):
        """How many streams are open (or opening) now."""
        return len(self._streams)

    def streams(self):
        """The open streams (a snapshot list)."""
        return list(self._streams.values())

    # -- sending --------------------------------------------------------

    def _send(self, frame):
        self._send_raw(frames.encode(frame))

    def _send_raw(self, message):
        if not self._lost:
            self._send_message(message)

    def send_hello(self, info):
        """Send this side's HELLO (a JSON-able dict)."""
        self._send(frames.Hello(info))

    # -- opening --------------------------------------------------------

    def open_stream(self, kind, host, port):
        """
        Ask the peer to connect to C{host:port}.

        @return: a Deferred firing with the L{Stream} once the peer answers
            OPEN_OK (attach a protocol with L{Stream.attach}), or failing with
            L{StreamOpenError}.  Cancelling it resets the stream.
        """
        if self._lost:
            return defer.fail(StreamOpenError(Reason.NO_TUNNEL, "tunnel closed"))
        stream_id = self._next_id
        self._next_id += 2
        stream = Stream(self, stream_id, kind, host, port)

        def cancel(d):
            if not stream._closed:
                stream.reset(Reason.GENERAL_FAILURE)

        stream._opening = defer.Deferred(cancel)
        self._streams[stream_id] = stream
        self._send(frames.Open(stream_id, kind, host, port, self.window))
        return stream._opening

    # -- receiving ------------------------------------------------------

    def message_received(self, message):
        """Handle one WebSocket message from the peer."""
        try:
            frame = frames.decode(message)
            self._dispatch(frame)
        except (frames.FrameError, MuxProtocolError) as e:
            if self.on_protocol_error is not None:
                self.on_protocol_error(e)
            else:
                raise

    def _dispatch(self, frame):
        kind = type(frame)
        stream = self._streams.get(frame.stream_id)
        if kind is frames.Data:
            if stream is None:
                self._unknown_stream_data(frame.stream_id)
            else:
                stream._data_received(frame.payload)
        elif kind is frames.Credit:
            if stream is not None:
                stream._credit_received(frame.increment)
        elif kind is frames.Fin:
            if stream is not None:
                stream._fin_frame_received()
        elif kind is frames.Reset:
            if stream is not None:
                opening = stream._opening
                if opening is not None and not opening.called:
                    stream._forget()
                    opening.errback(StreamOpenError(frame.reason, "reset by peer"))
                else:
                    stream._reset_received(frame.reason)
        elif kind is frames.Open:
            self._open_received(frame)
        elif kind is frames.OpenOk:
            self._open_answer(stream, frame)
        elif kind is frames.OpenError:
            self._open_answer(stream, frame)
        elif kind is frames.Hello:
            if self.on_hello is not None:
                self.on_hello(frame.info)
        elif kind is frames.GoAway:
            pass  # the owner learns of the end from the WebSocket close
        else:
            raise MuxProtocolError("unexpected %s frame" % (kind.__name__,))

    def _unknown_stream_data(self, stream_id):
        # Data for a stream we closed (or never had): refuse it once, like TCP.
        if stream_id not in self._refused:
            if len(self._refused) > 1024:
                self._refused.clear()
            self._refused.add(stream_id)
            self._send(frames.Reset(stream_id, int(Reason.GENERAL_FAILURE)))

    def _open_received(self, frame):
        sid = frame.stream_id
        if sid % 2 != self._peer_parity or sid <= self._last_peer_id:
            raise MuxProtocolError("bad stream id %d in OPEN" % (sid,))
        self._last_peer_id = sid
        stream = Stream(self, sid, frame.kind, frame.host, frame.port, send_window=frame.window)
        self._streams[sid] = stream
        if self.on_open_request is None:
            stream.reject(Reason.NOT_ALLOWED, "this side accepts no streams")
        else:
            self.on_open_request(stream)

    def _open_answer(self, stream, frame):
        if stream is None:
            return  # answer to a stream we already cancelled and forgot
        opening = stream._opening
        if opening is None or opening.called:
            return  # answer to a stream we already cancelled
        if type(frame) is frames.OpenOk:
            stream._send_window = frame.window
            opening.callback(stream)
        else:
            stream._forget()
            opening.errback(StreamOpenError(frame.reason, frame.text))

    # -- IPushProducer: the WebSocket transport's backpressure ----------

    def pauseProducing(self):
        self.paused = True
        for stream in list(self._streams.values()):
            stream._update_producer()

    def resumeProducing(self):
        self.paused = False
        for stream in list(self._streams.values()):
            stream._update_producer()

    def stopProducing(self):
        self.connection_lost(error.ConnectionLost("tunnel transport stopped"))

    # -- the end --------------------------------------------------------

    def connection_lost(self, reason=None):
        """The tunnel is gone: every stream is reset and pending opens fail."""
        if self._lost:
            return
        self._lost = True
        lost = error.ConnectionLost("tunnel lost")
        for stream in list(self._streams.values()):
            opening = stream._opening
            if opening is not None and not opening.called:
                stream._forget()
                opening.errback(StreamOpenError(Reason.NO_TUNNEL, "tunnel lost"))
            else:
                stream._lose(lost)
        self._streams.clear()
