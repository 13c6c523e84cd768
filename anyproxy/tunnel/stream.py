# -*- test-case-name: tests.test_mux -*-
"""
One multiplexed stream: an ordinary Twisted transport over a tunnel.

A L{Stream} is an C{ITransport} + C{IPushProducer} + C{IConsumer}, so any
Twisted protocol runs over it unchanged.  It keeps the per-stream state of
docs/PROTOCOL.md: its lifecycle state (L{anyproxy.tunnel.stream_state}), the
send window and its queue, the receive window and the credit still owed.

Its mux creates it and tells it what the peer sent (L{IStreamEvents}); it
asks the mux to send its frames (L{IStreamMux}).  Neither touches the
other's attributes beyond those two interfaces.
"""

import collections

from twisted.internet import error
from twisted.internet.interfaces import (
    IAddress, IConsumer, IHalfCloseableProtocol, IPushProducer, ITransport)
from twisted.python import failure
from zope.interface import implementer

import attr

from anyproxy.errors import Reason, StreamOpenError
from anyproxy.tunnel.interfaces import IStreamEvents
from anyproxy.tunnel.stream_state import (
    ACCEPTING, CLOSE, CLOSED, FINISHED, HALF_CLOSED_LOCAL, HALF_CLOSED_REMOTE, OPEN, OPENING,
    RECV_CREDIT, RECV_DATA, RECV_DATAGRAM, RECV_FIN, RECV_OPEN_ERROR, RECV_OPEN_OK, RECV_RESET,
    RESET, SEND_FIN, SEND_OPEN_ERROR, SEND_OPEN_OK, SEND_RESET, TRANSITIONS, TUNNEL_LOST,
    StreamStateError, next_state)

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
# The largest a send window may grow (docs/PROTOCOL.md, Flow control).
MAX_WINDOW = 0x7FFFFFFF
# Receive-window auto-tuning (docs/PROTOCOL.md, Flow control): a stream's
# receive window starts at the mux's window and doubles, up to this bound (the
# default; a Mux may use another), each credit round trip in which the sender
# was seen starved for credit while the local reader kept up and the rate still
# rose (Stream._check_probe).  16 MiB keeps one
# stream at about 1.3 Gbit/s over 100 ms of round trip; only a stream that grew
# pins more than DEFAULT_WINDOW when its reader stalls.
DEFAULT_MAX_WINDOW = 16 * 1024 * 1024
# A window grows only over credit round trips at least this long (seconds):
# on loopback or a LAN, where one DEFAULT_WINDOW is plenty, it never does.
MIN_GROWTH_ROUND_TRIP = 0.004
# ... and only while the rate a probe measures rises by this factor over the
# best before it: once the path, not the window, sets the pace (a queue on the
# path stretches the round trip with the window), the window stays.
GROWTH_GAIN = 1.25

# DATA a side takes on a stream the peer opened, before it answers the OPEN
# (docs/PROTOCOL.md, early data): enough for a request's head and a small
# body, or a TLS ClientHello, so that they cross with the OPEN instead of a
# round trip later.  Held while the target is dialed: the memory is bounded
# by the streams being opened (client.max_concurrent_conns and its queue).
EARLY_DATA = 64 * 1024

# The states in which this side may still send DATA (and its FIN).
_SENDING = frozenset([OPEN, HALF_CLOSED_REMOTE])
# DATA, but not FIN, may also go while the OPEN waits for its answer, within
# the early data the peer offered (the send window until OPEN_OK).
_SENDING_DATA = _SENDING | {OPENING}


class MuxProtocolError(Exception):
    """The peer broke the tunnel protocol; the tunnel must be closed."""


@implementer(IAddress)
@attr.s(frozen=True, slots=True)
class TunnelAddress:
    """The address of a stream's far end, as seen through a tunnel."""

    host = attr.ib()
    port = attr.ib()
    tunnel = attr.ib(default="")


@implementer(ITransport, IPushProducer, IConsumer, IStreamEvents)
class Stream:
    """
    One multiplexed byte stream.  Created by L{anyproxy.tunnel.mux.Mux}; do
    not build directly.

    @ivar kind: C{'tcp'} or C{'udp'}.
    @ivar host: the target asked for when the stream was opened.
    @ivar port: the target port.
    @ivar state: where the stream is in its lifecycle, a sentinel of
        L{anyproxy.tunnel.stream_state} (C{OPENING} ... C{REFUSED}).
    @ivar bytes_sent: DATA payload bytes sent on this stream, or datagram
        payload bytes on a udp stream (metrics, records).
    @ivar bytes_received: the same, received.
    @ivar created: when the stream was created, in seconds of the mux's clock
        (the reactor's: seconds since the epoch).
    @ivar last_active: when it last carried a byte or a datagram, likewise.
    """

    disconnecting = False
    protocol = None
    bytes_sent = bytes_received = 0  # plain ints: one add per DATA or DATAGRAM frame
    # (host, port) the other side connected to, when its OPEN_OK said (access log).
    dialed = None
    # A user's bandwidth cap (shape): anyproxy.bandwidth.ShapedFlow each way,
    # None (no cap, no cost) unless set.
    _upload_flow = _download_flow = None
    # A user's destination rules for a udp stream's datagrams (filter_datagrams).
    _datagram_filter = None

    def __init__(self, mux, stream_id, kind, host, port, send_window=None, opening=None,
                 early=0):
        """
        @param mux: the L{anyproxy.tunnel.interfaces.IStreamMux} carrying it.
        @param send_window: for a stream the peer opened, the window of its
            OPEN (the stream starts C{ACCEPTING}); C{None} for one this side
            opens (it starts C{OPENING}, the window comes with OPEN_OK).
        @param opening: for a stream this side opens, the Deferred to fire
            with the stream on OPEN_OK or fail with L{StreamOpenError}.
        @param early: for a stream this side opens, the DATA bytes it may
            send before OPEN_OK (the peer's HELLO C{early_data}; 0: none).
        """
        self._mux = mux
        self.stream_id = stream_id
        self.kind = kind
        self.host = host
        self.port = port
        self.state = OPENING if send_window is None else ACCEPTING
        self._opening = opening
        self._send_window = early if send_window is None else send_window
        self._recv_window = mux.window
        self._window_size = mux.window  # the receive window now (auto-tuned: it may grow)
        self._max_window = max(mux.window, getattr(mux, "max_window", mux.window))
        self._credit_batch = mux.window // CREDIT_FRACTION
        # The growth probe: the receive limit (bytes_received + _recv_window)
        # before our latest credit, when we sent it and bytes_received then;
        # None: no probe.  _probe_paused: seconds the reader was paused since.
        self._probe_limit = None
        self._probe_time = 0.0
        self._probe_bytes = 0
        self._probe_paused = 0.0
        self._paused_at = None  # when the reader paused, while it is
        self._best_rate = 0.0  # the highest bytes/s a probe measured
        self._unacked = 0
        self._queue = collections.deque()
        self._queued = 0
        self._early = []  # DATA that arrived before a protocol was attached
        self._producer = None
        self._producer_paused = False
        self._reading_paused = False
        self._fin_pending = False  # FIN asked for; it goes once the queue is sent
        self._close_requested = False  # loseConnection: stop reading after our FIN
        self._cancel_hook = None
        self._end_reason = None  # why it finished (told to a protocol attached later)
        self._told_lost = False  # the protocol has had its connectionLost
        self._close_hooks = None
        # Connection records (status page, idle timeout): one clock read per
        # write or DATA frame and no timer, so an idle check is a periodic sweep.
        self._seconds = mux.clock.seconds
        self.created = self.last_active = self._seconds()

    @property
    def closed(self):
        """C{True} once the stream is finished (closed, reset or refused)."""
        return self.state in FINISHED

    @property
    def ended_cleanly(self):
        """C{None} while the stream lives; then C{True} if closed by FINs, C{False} if not."""
        if self.state in FINISHED:
            return self.state is CLOSED
        return None

    @property
    def receive_window(self):
        """The receive window this side grants the stream now (it grows by auto-tuning)."""
        return self._window_size

    @property
    def queued_bytes(self):
        """Bytes written but not yet sent (waiting for credit)."""
        return self._queued

    def __repr__(self):
        return "<Stream %d %s %s:%s %r>" % (self.stream_id, self.kind, self.host, self.port,
                                            self.state)

    # -- state ----------------------------------------------------------

    def _move(self, event):
        """Take a local event: an illegal one raises L{StreamStateError}."""
        self.state = next_state(self.stream_id, self.state, event)

    def _peer_move(self, event):
        """Take an event from the peer: an illegal one is a protocol error."""
        try:
            self.state = next_state(self.stream_id, self.state, event)
        except StreamStateError as e:
            raise MuxProtocolError(str(e)) from e

    @property
    def _closed_but_delivering(self):
        # Closed both ways, but not finished: a bandwidth cap still delivers
        # what it held before the peer's FIN (_deliver_fin waits for it).
        return self.state is CLOSED and self._end_reason is None

    @property
    def opened(self):
        """
        For a stream this side opens: the open's Deferred, for whoever opened
        it (L{Mux.start_stream}) to add its callbacks to.  It fires with this
        stream once the peer answers OPEN_OK, or fails with
        L{StreamOpenError}; cancelling it resets the stream.
        """
        return self._opening

    # -- attaching a protocol -------------------------------------------

    def attach(self, protocol):
        """Connect C{protocol} to this stream (calls its C{makeConnection})."""
        self.protocol = protocol
        protocol.makeConnection(self)
        early, self._early = self._early, []
        for data in early:
            if self._told_lost:
                return
            protocol.dataReceived(data)
        if self.state in FINISHED:
            if not self._told_lost:
                self._tell_lost()  # it finished before it had a protocol
            return
        if self.state is HALF_CLOSED_REMOTE:
            self._deliver_fin()  # a FIN that came before the protocol
        # Early DATA was never credited; without this a full window of it stalls the sender.
        self._grant_credit()

    def accept(self, protocol, dialed=None):
        """
        Accept an incoming open request and connect C{protocol} to it.

        @param dialed: C{(host, port)} we connected to, told to the peer.
        @raise StreamStateError: if the stream is not waiting for an answer.
        """
        self._move(SEND_OPEN_OK)
        self._mux.send_open_ok(self.stream_id, dialed)
        self.attach(protocol)

    def reject(self, reason, text=""):
        """Refuse an incoming open request with a L{Reason} (nothing, if it has finished)."""
        if self.state in FINISHED:
            return
        self._move(SEND_OPEN_ERROR)
        self._mux.send_open_error(self.stream_id, reason, text)
        self._early = []  # early data for a target never reached: dropped unread
        self._finished(error.ConnectionRefusedError("stream refused"))

    def set_cancel_hook(self, hook):
        """Call C{hook()} if the opener gives up before accept/reject."""
        self._cancel_hook = hook

    # -- ITransport -----------------------------------------------------

    def write(self, data):
        if self._close_requested or self._fin_pending or self.state in FINISHED or not data:
            return
        self.last_active = self._seconds()
        self._queued += len(data)
        if self._upload_flow is not None:
            # Counted as queued: the producer pauses at the high-water mark.
            self._upload_flow.push(data)
            self._update_producer()
            return
        self._queue.append(data)
        self._flush()

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def loseWriteConnection(self):
        """Half-close: send FIN once queued data is sent."""
        if self.state in FINISHED or self._fin_pending:
            return
        self._fin_pending = True
        self._flush()

    def loseConnection(self):
        """Close after queued data is sent; incoming data is then refused."""
        if self.state in FINISHED or self._close_requested:
            return
        self._close_requested = True
        self.disconnecting = True
        if self.state is HALF_CLOSED_LOCAL:
            # Already half-closed: nothing left to send, so finish now.
            self._move(CLOSE)
            self._finished(error.ConnectionDone("stream closed"))
            return
        self._fin_pending = True
        self._flush()

    def abortConnection(self):
        """Drop queued data and reset the stream now."""
        self.reset(Reason.GENERAL_FAILURE)

    def reset(self, reason=Reason.GENERAL_FAILURE):
        """Send RESET with C{reason} and close the stream at once."""
        if self.state in FINISHED:
            if self._closed_but_delivering:
                # The peer is done, so nothing to send; the rest is dropped.
                self._finished(error.ConnectionLost("stream reset"))
            return
        self._move(SEND_RESET)
        self._mux.send_reset(self.stream_id, reason)
        self._finished(error.ConnectionLost("stream reset locally"))

    @property
    def tunnel_draining(self):
        """
        Whether this stream's tunnel takes no new streams (GOAWAY sent or
        received): the stream goes on, but a connection kept for reuse
        should let it go, so the tunnel can close.
        """
        return bool(getattr(self._mux, "draining", False))

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
        if (self.state in FINISHED or self._close_requested
                or (self._datagram_filter is not None and not self._datagram_filter(host, port))):
            self._mux.datagram_dropped()
            return False
        if not self._mux.send_datagram(self.stream_id, host, port, payload):
            return False
        self.last_active = self._seconds()
        self.bytes_sent += len(payload)
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
        if not self._reading_paused:
            self._reading_paused = True
            self._paused_at = self._seconds()  # counted against the growth probe

    def resumeProducing(self):
        if self._reading_paused:
            self._reading_paused = False
            self._probe_paused += self._seconds() - self._paused_at
            # What arrived while paused is granted back in one CREDIT.
            self._grant_credit(force=True)

    def stopProducing(self):
        self.loseConnection()

    # -- sending --------------------------------------------------------

    def _flush(self):
        queue = self._queue
        send_data = self._mux.send_data
        sid = self.stream_id
        while queue and self._send_window > 0 and self.state in _SENDING_DATA:
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
            send_data(sid, chunk)
        if self.state in FINISHED:
            return
        # _queued, not the queue: bytes a bandwidth cap holds go before the FIN.
        if not self._queued and self._fin_pending and self.state in _SENDING:
            self._move(SEND_FIN)
            self._mux.send_fin(sid)
            if self._close_requested:
                if self.state is HALF_CLOSED_LOCAL:
                    self._move(CLOSE)
                self._finished(error.ConnectionDone("stream closed"))
                return
            if IHalfCloseableProtocol.providedBy(self.protocol):
                self.protocol.writeConnectionLost()
            if self.state is CLOSED:
                # The peer's FIN came first: both directions are done.
                self._finished(error.ConnectionDone("stream closed"))
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
        if self.state in FINISHED or self._reading_paused or not unacked:
            return
        if force or unacked >= self._credit_batch:
            if not force and self._probe_limit is None and self._window_size < self._max_window:
                # Time this credit's round trip: the first DATA beyond today's limit
                # can only have been sent once the peer had it (see _check_probe).
                self._start_probe(self._seconds())
            self._unacked = 0
            self._recv_window += unacked
            self._mux.send_credit(self.stream_id, unacked)

    def _start_probe(self, now):
        self._probe_limit = self.bytes_received + self._recv_window
        self._probe_time = now
        self._probe_bytes = self.bytes_received
        self._probe_paused = 0.0

    def _check_probe(self, before, now):
        """
        DATA from C{before} (bytes received before this frame) has just gone
        past the probe's limit, at C{now}, a credit round trip after the probe
        began.  The window doubles (up to its bound; the increase goes out as
        CREDIT) if all of these hold:

          - the frame starts exactly at the limit: the sender had used all
            its credit and waited for ours (from a sender with credit to
            spare, a frame runs across the limit);
          - the round trip took L{MIN_GROWTH_ROUND_TRIP} or more;
          - the reader is not paused, and was paused for less than a
            quarter of the round trip (a socket briefly full from a burst is
            a reader that keeps up; one that stalls is not);
          - the rate the probe measured (bytes received over the round trip)
            is at least L{GROWTH_GAIN} times the best one before it: the
            window, not the path, still sets the pace.
        """
        limit, self._probe_limit = self._probe_limit, None
        round_trip = now - self._probe_time
        if (before != limit or round_trip < MIN_GROWTH_ROUND_TRIP or self._close_requested
                or self._reading_paused or 4 * self._probe_paused > round_trip):
            return
        rate = (before - self._probe_bytes) / round_trip
        if rate < GROWTH_GAIN * self._best_rate:
            return
        self._best_rate = rate
        grow = min(self._window_size, self._max_window - self._window_size)
        self._window_size += grow
        self._credit_batch = self._window_size // CREDIT_FRACTION
        if self._window_size < self._max_window:
            # This credit starts the next probe: the sender's limit now is its edge.
            self._start_probe(now)
        self._recv_window += grow
        self._mux.send_credit(self.stream_id, grow)

    # -- IStreamEvents: what the mux tells us ---------------------------

    def open_succeeded(self, send_window):
        self._peer_move(RECV_OPEN_OK)
        # The window counts from the OPEN: early data has used part of it.
        self._send_window = max(0, send_window - self.bytes_sent)
        if self._queue or self._fin_pending:
            self._flush()  # what was written beyond the early data the peer offered, a FIN
        self._opening.callback(self)

    def open_failed(self, reason, text):
        self._peer_move(RECV_OPEN_ERROR)
        self._finished(error.ConnectionRefusedError("stream refused"))
        self._opening.errback(StreamOpenError(reason, text))

    def data_received(self, payload):
        # The table lookup of _peer_move, inlined: this runs once per DATA frame.
        try:
            self.state = TRANSITIONS[self.state, RECV_DATA]
        except KeyError:
            self._peer_move(RECV_DATA)  # raises, naming the state
        size = len(payload)
        if self.state is ACCEPTING and self.bytes_received + size > self._mux.early_data:
            raise MuxProtocolError("stream %d sent %d bytes before its OPEN was answered; %d are allowed"
                                   % (self.stream_id, self.bytes_received + size, self._mux.early_data))
        self._recv_window -= size
        if self._recv_window < 0:
            raise MuxProtocolError("stream %d overran its window" % (self.stream_id,))
        self._unacked += size
        before = self.bytes_received
        self.bytes_received = before + size
        now = self._seconds()
        if self._probe_limit is not None and before + size > self._probe_limit:
            self._check_probe(before, now)
        self.last_active = now
        if self._close_requested:
            # We no longer read; keep the sender going until it sees our FIN,
            # with credit in the usual batches: one CREDIT per tiny DATA
            # frame would let a peer make us send more than it does.
            self._grant_credit()
            return
        if self.protocol is None:
            self._early.append(payload)
            return
        if self._download_flow is not None:
            self._unacked -= size  # credited as the cap delivers it: the sender waits
            self._download_flow.push(payload)
            return
        self.protocol.dataReceived(payload)
        self._grant_credit()

    def datagram_received(self, host, port, payload):
        if self.kind != "udp":
            raise MuxProtocolError("DATAGRAM on tcp stream %d" % (self.stream_id,))
        self._peer_move(RECV_DATAGRAM)
        if self.protocol is None or self._close_requested:
            return False
        self.last_active = self._seconds()
        self.bytes_received += len(payload)
        self.protocol.datagram_received(host, port, payload)
        return True

    def credit_received(self, increment):
        if self.state is CLOSED:
            # Closed both ways, still delivering what a bandwidth cap holds
            # (_deliver_fin): a CREDIT that crossed our FIN, as for a stream
            # already forgotten, is ignored.
            return
        self._peer_move(RECV_CREDIT)
        self._send_window += increment
        if self._send_window > MAX_WINDOW:
            raise MuxProtocolError("stream %d window overflow" % (self.stream_id,))
        self._flush()

    def fin_received(self):
        self._peer_move(RECV_FIN)
        if self.protocol is not None:
            self._deliver_fin()
        elif self.state is CLOSED:
            self._finished(error.ConnectionDone("stream closed"))
        # Otherwise attach() delivers it after the early data.

    def _deliver_fin(self):
        flow = self._download_flow
        if flow is not None and flow.held:
            flow.when_empty(self._deliver_fin)  # after the data the cap still holds
            return
        if self.state is CLOSED:
            self._finished(error.ConnectionDone("stream closed"))
        elif IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
        else:
            self.loseConnection()

    def reset_received(self, reason):
        if self._closed_but_delivering:  # the rest is lost
            self._finished(error.ConnectionLost("stream reset by peer (%s)" % (reason,)))
            return
        opening = self.state is OPENING
        if self.state is ACCEPTING:
            self._early = []  # the opener gave up before we answered: dropped unread
        self._peer_move(RECV_RESET)
        self._finished(error.ConnectionLost("stream reset by peer (%s)" % (reason,)))
        if opening:
            self._opening.errback(StreamOpenError(reason, "reset by peer"))

    def tunnel_lost(self):
        if self._closed_but_delivering:  # the rest is lost
            self._finished(error.ConnectionLost("tunnel lost"))
            return
        if self.state in FINISHED:
            return
        opening = self.state is OPENING
        if self.state is ACCEPTING:
            self._early = []
        self._move(TUNNEL_LOST)
        self._finished(error.ConnectionLost("tunnel lost"))
        if opening:
            self._opening.errback(StreamOpenError(Reason.NO_TUNNEL, "tunnel lost"))

    def tunnel_pause_changed(self):
        self._update_producer()

    # -- the end --------------------------------------------------------

    def _finished(self, reason):
        """The stream has reached a finished state: forget it and tell everyone."""
        self.disconnecting = True
        self._end_reason = reason
        self._mux.stream_ended(self)
        hooks, self._close_hooks = self._close_hooks, None
        for hook in hooks or ():
            hook(self)
        self._queue.clear()
        self._queued = 0
        if self._cancel_hook is not None:
            hook, self._cancel_hook = self._cancel_hook, None
            if self.protocol is None and self.state is RESET:
                hook()  # the opener gave up (or the tunnel went) before we answered
        self._producer = None
        if self.protocol is not None:
            self._tell_lost()

    def _tell_lost(self):
        # The protocol refers to us as its transport: let go of it, as
        # Twisted's TCP transports do, so that no reference cycle is left.
        self._told_lost = True
        protocol, self.protocol = self.protocol, None
        protocol.connectionLost(failure.Failure(self._end_reason))

    # -- a bandwidth cap (anyproxy.bandwidth) -----------------------------

    @property
    def shaped(self):
        """Whether L{shape} has put the stream under a bandwidth cap."""
        return self._upload_flow is not None

    def shape(self, upload, download):
        """
        Hold this stream to a bandwidth cap: what it sends goes through
        C{upload}, what it receives through C{download} (each an
        L{anyproxy.bandwidth.ShapedFlow}).  Nothing is dropped: bytes the
        cap holds count as queued (the producer pauses at the high-water
        mark) or are credited only once delivered (the peer's window stops
        it), and a FIN waits for them.  The receive window stops growing:
        the cap, not the round trip, sets the pace.
        """
        self._upload_flow, self._download_flow = upload, download
        upload.attach(self._send_shaped)
        download.attach(self._deliver_shaped)
        self._max_window = self._window_size
        self._probe_limit = None
        self.notify_closed(lambda _: (upload.cancel(), download.cancel()))

    def filter_datagrams(self, admits):
        """Send only the datagrams C{admits(host, port)} lets go (a user's rules); drop the rest."""
        self._datagram_filter = admits

    def _send_shaped(self, chunks):
        self._queue.extend(chunks)
        self._flush()

    def _deliver_shaped(self, chunks):
        for chunk in chunks:
            # Not the state: closed both ways, the stream still delivers what
            # the cap held before the FIN (_deliver_fin waits for it).
            if self._end_reason is not None or self.protocol is None:
                return
            self._unacked += len(chunk)
            if not self._close_requested:  # else, as in data_received: credit, drop
                self.protocol.dataReceived(bytes(chunk) if type(chunk) is memoryview else chunk)
        self._grant_credit()

    def notify_closed(self, hook):
        """
        Call C{hook(stream)} once when the stream is finished (closed, reset,
        refused or its tunnel lost); at once if it already is.
        """
        if self.state in FINISHED:
            hook(self)
        elif self._close_hooks is None:
            self._close_hooks = [hook]
        else:
            self._close_hooks.append(hook)
