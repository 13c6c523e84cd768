# -*- test-case-name: tests.test_mux -*-
"""
One multiplexed stream: an ordinary Twisted transport over a tunnel.

A L{Stream} is an C{ITransport} + C{IPushProducer} + C{IConsumer}, so any
Twisted protocol runs over it unchanged.  It keeps the per-stream state of
docs/PROTOCOL.md: the send window and its queue, the receive window and the
credit still owed, and the half-close flags.  L{anyproxy.tunnel.mux.Mux}
creates streams and feeds them frames.
"""

import collections
import time

from twisted.internet import error
from twisted.internet.interfaces import (
    IAddress, IConsumer, IHalfCloseableProtocol, IPushProducer, ITransport)
from twisted.python import failure
from zope.interface import implementer

import attr

from anyproxy.errors import Reason
from anyproxy.tunnel import frames

# A stream's receive window (the default; a Mux may use another).  Big enough to keep a loopback or LAN path busy
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
# The clock of the connection records (created, last_active): one call per
# write or DATA frame, no timer, so an idle check is a cheap periodic sweep.
_now = time.time


class MuxProtocolError(Exception):
    """The peer broke the tunnel protocol; the tunnel must be closed."""


@implementer(IAddress)
@attr.s(frozen=True, slots=True)
class TunnelAddress:
    """The address of a stream's far end, as seen through a tunnel."""

    host = attr.ib()
    port = attr.ib()
    tunnel = attr.ib(default="")


@implementer(ITransport, IPushProducer, IConsumer)
class Stream:
    """
    One multiplexed byte stream.  Created by L{Mux}; do not build directly.

    @ivar kind: C{'tcp'} or C{'udp'}.
    @ivar host: the target asked for when the stream was opened.
    @ivar port: the target port.
    @ivar bytes_sent: DATA payload bytes sent on this stream, or datagram
        payload bytes on a udp stream (metrics, records).
    @ivar bytes_received: the same, received.
    @ivar last_active: when it last carried a byte or a datagram.
    """

    disconnecting = False
    protocol = None
    bytes_sent = bytes_received = 0  # plain ints: one add per DATA or DATAGRAM frame

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
        # Connection records (status page, idle timeout): wall-clock seconds.
        self.created = self.last_active = _now()
        self._close_hooks = None
        self.ended_cleanly = None  # True: closed by FINs; False: reset or lost

    @property
    def closed(self):
        """C{True} once the stream is finished (closed, reset or rejected)."""
        return self._closed

    @property
    def queued_bytes(self):
        """Bytes written but not yet sent (waiting for credit)."""
        return self._queued

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
        self._mux._send_reply(frames.OpenOk(self.stream_id, self._mux.window))
        self._mux.streams_opened += 1
        self.attach(protocol)

    def reject(self, reason, text=""):
        """Refuse an incoming open request with a L{Reason}."""
        if self._closed:
            return
        self._mux._send_reply(frames.OpenError(self.stream_id, int(reason), text))
        self._forget()

    def set_cancel_hook(self, hook):
        """Call C{hook()} if the opener gives up before accept/reject."""
        self._cancel_hook = hook

    # -- ITransport -----------------------------------------------------

    def write(self, data):
        if self._close_requested or self._fin_pending or self._closed or not data:
            return
        self.last_active = _now()
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

    # -- datagrams (udp streams) ----------------------------------------

    def send_datagram(self, host, port, payload):
        """
        Send one UDP datagram to (or from) C{host:port} on this udp stream.

        Datagrams are not flow controlled: while the tunnel is congested
        (its WebSocket send buffer is above the high-water mark) they are
        dropped, as a congested UDP path would.

        @return: C{True} if sent, C{False} if dropped.
        """
        if self._closed or self._close_requested or self._mux.paused:
            self._mux.datagrams_dropped += 1
            return False
        self._mux._send(frames.Datagram(self.stream_id, host, port, payload))
        self.last_active = _now()
        self.bytes_sent += len(payload)
        self._mux.bytes_sent += len(payload)
        return True

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
        if self._reading_paused:
            self._reading_paused = False
            # What arrived while paused is granted back in one CREDIT.
            self._grant_credit(force=True)

    def stopProducing(self):
        self.loseConnection()

    # -- sending --------------------------------------------------------

    def _flush(self):
        queue = self._queue
        send_data = self._mux._send_data
        sid = self.stream_id
        while queue and self._send_window > 0 and not self._closed:
            chunk = queue.popleft()
            room = min(self._send_window, MAX_DATA_PAYLOAD)
            if len(chunk) > room:
                # Views, not copies: the frame is joined from them in one copy.
                chunk = memoryview(chunk)
                queue.appendleft(chunk[room:])
                chunk = chunk[:room]
            size = len(chunk)
            self._send_window -= size
            self._queued -= size
            self.bytes_sent += size
            self._mux.bytes_sent += size
            send_data(frames.HEADER.pack(frames.T_DATA, sid), chunk)
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
        self.bytes_received += len(payload)
        self._mux.bytes_received += len(payload)
        self.last_active = _now()
        if self._close_requested:
            # We no longer read; keep the sender going until it sees our FIN.
            self._grant_credit(force=True)
            return
        if self.protocol is None:
            self._early.append(payload)
            return
        self.protocol.dataReceived(payload)
        self._grant_credit()

    def _datagram_received(self, host, port, payload):
        if self.kind != "udp":
            raise MuxProtocolError("DATAGRAM on tcp stream %d" % (self.stream_id,))
        if self.protocol is None or self._closed or self._close_requested:
            self._mux.datagrams_dropped += 1
            return
        self.last_active = _now()
        self.bytes_received += len(payload)
        self._mux.bytes_received += len(payload)
        self.protocol.datagram_received(host, port, payload)

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
        self.ended_cleanly = isinstance(reason, error.ConnectionDone)
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
        hooks, self._close_hooks = self._close_hooks, None
        for hook in hooks or ():
            hook(self)

    def notify_closed(self, hook):
        """
        Call C{hook(stream)} once when the stream is finished (closed, reset,
        rejected or its tunnel lost); at once if it already is.
        """
        if self._closed:
            hook(self)
        elif self._close_hooks is None:
            self._close_hooks = [hook]
        else:
            self._close_hooks.append(hook)


