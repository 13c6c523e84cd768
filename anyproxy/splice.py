# -*- test-case-name: tests.test_splice -*-
"""
Join two connections so bytes flow both ways, with backpressure and half-close.

This is Twisted's C{portforward} pattern extended with TCP half-close: each
side is a L{SpliceEnd}; when one side's peer shuts down its write half we shut
down the write half of the other side, and a connection is closed only once
both directions are finished.  Each end's transport is registered as the
streaming producer of the other end's transport, so a slow reader on one side
pauses reading on the other (standard IPushProducer backpressure).

The ends work over any transport: TCP, TLS, or a tunnel stream
(L{anyproxy.tunnel.mux.Stream}).

Every frontend that carries a byte stream (SOCKS5 CONNECT, the HTTP proxy's
CONNECT, forwarded TCP ports, the C{fixed-forward} example plugin) reaches its
target through L{open_and_splice}: open the target through an endpoint, then
splice.  Before the join an end holds what it receives, and its EOF; the join
passes both on, so nothing a user sent while the target was opening is lost.
Where the target's connection takes bytes before it is open (a tunnel stream's
early data), an end may give them to it at once instead of holding them.
Only the success reply (L{open_and_splice}'s C{on_open}) and the error answer
differ between frontends.
"""

import socket

from twisted.internet import tcp
from twisted.internet.defer import fail
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from anyproxy.connect_protocol import OneProtocolFactory, connect_protocol
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.interfaces import IEarlyDataEndpoint
from anyproxy.tuning import (
    QUICKACK_BELOW, nothing_buffered, quick_acker, send_then_buffer, set_no_delay, tune_for_bulk)
from anyproxy.tunnel.stream import Stream


# Plain TCP transports, whose buffer write_now may bypass (not TLS: startTLS
# replaces their write path).  Subclasses count: tune_for_bulk gives a splice
# end's transport a class of its own (tuning.GatherWrites).
_PLAIN_TCP = (tcp.Server, tcp.Client)
# Writes below this size are sent at once by write_now; bulk writes keep
# Twisted's path, which sends what the socket refuses without copying it.
WRITE_NOW_BELOW = 64 * 1024


def write_now(transport, data):
    """
    Write C{data} to C{transport}, sending it at once when it is small
    (L{WRITE_NOW_BELOW}) and the transport a plain TCP one with nothing
    buffered.

    Twisted's C{write} always buffers and sends on the reactor's next turn:
    two C{epoll_ctl} calls, a wake-up and its dispatch per write.  On the
    short exchanges of a new stream (a CONNECT's 200, an echoed line) that was
    a few percent of the process.  Whatever the socket does not take at once
    (or any error, which Twisted's own write then meets) goes the usual way,
    so ordering, backpressure and close are Twisted's.  Relies on Twisted's
    C{FileDescriptor} buffer attributes (C{dataBuffer}, C{_tempDataLen}),
    checked by tests.test_splice.
    """
    if (data and len(data) < WRITE_NOW_BELOW and isinstance(transport, _PLAIN_TCP)
            and not transport.TLS and nothing_buffered(transport)):
        send_then_buffer(transport.socket, data, transport.write)
        return
    transport.write(data)


def half_close_now(transport):
    """
    C{transport.loseWriteConnection()}, done at once when the transport is a
    plain TCP one with nothing buffered and no producer: the socket's write
    side is shut down in the call.

    Twisted's shuts it down on the reactor's next turn, from C{doWrite}:
    two C{epoll_ctl} calls, an empty send, a wake-up and its dispatch, on
    every stream's end.  Done here, the transport is left as Twisted's
    C{doWrite} leaves it (C{_writeDisconnected}), so a later
    C{loseConnection} closes at once, as Twisted's does then.  The
    protocol's C{writeConnectionLost} is not called: only for L{SpliceEnd},
    which records the half-close itself (L{SpliceEnd.shut_down_write}).
    """
    if (isinstance(transport, _PLAIN_TCP) and not transport.TLS
            and transport.producer is None and nothing_buffered(transport)):
        try:
            transport.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone: reading meets it, as after Twisted's shutdown
        transport.stopWriting()
        transport._writeDisconnected = True
        return
    transport.loseWriteConnection()


@implementer(IHalfCloseableProtocol)
class SpliceEnd(Protocol):
    """
    One end of a splice.  Use L{open_and_splice}, L{splice} or
    L{SpliceEnd.join} to pair two ends.

    Before the join an end holds the bytes it receives, and its peer's EOF,
    and the join passes them on.  A frontend protocol may subclass it and
    call its methods only once its handshake is over.

    @ivar other: the L{SpliceEnd} on the other connection.
    @ivar on_close: called with C{(end, reason)} once, when this end's
        connection is lost.
    """

    other = None
    on_close = None
    _read_closed = False
    _write_closed = False
    _lost = False
    _has_producer = False
    # Set by open_and_splice while the target opens: the open (cancelled if
    # this end's connection is lost first), and how many held bytes pause
    # reading (None: reading is left alone).
    _target_opening = None
    _hold_limit = None
    _reading_paused = False
    # Set while the target opens, when it takes early data
    # (IEarlyDataEndpoint): its transport, written at once instead of
    # holding, and how many bytes it was given so far.
    _early_target = None
    _early_sent = 0
    # Re-arms TCP_QUICKACK on this end's socket after small reads
    # (anyproxy.tuning.quick_acker); None for tunnel streams.
    _quick_ack = None
    _tuned = False  # see transport_tuned

    def __init__(self, initial_data=b""):
        # Bytes that arrived before the splice existed (e.g. sent right after a
        # SOCKS request): forwarded as soon as the other end is connected.
        self._pending = initial_data

    def transport_tuned(self, quick_ack):
        """
        Say that this end's transport is already set for bulk reads and
        without Nagle's delay (L{anyproxy.tuning}), as a frontend does when
        the connection is made, so that L{join} does not set it again (system
        calls per stream).  C{quick_ack} is its L{anyproxy.tuning.quick_acker}.
        """
        self._tuned = True
        self._quick_ack = quick_ack

    @property
    def lost(self):
        """Whether this end's connection is lost."""
        return self._lost

    @property
    def read_closed(self):
        """Whether this end's peer has sent EOF (shut down its write side)."""
        return self._read_closed

    def join(self, other):
        """
        Pair this end with C{other}; both must be connected (have transports).

        Each transport becomes the streaming producer of the other.  What
        either end received before the join is written to the other, and an
        EOF either end received shuts down the other's write side.
        """
        self.other = other
        other.other = self
        for end in (self, other):
            if not end._tuned:
                end.transport_tuned(_tune(end.transport))
            # Resume before registering, so a pause the other side asks for wins.
            end._stop_holding()
        self.transport.registerProducer(other.transport, True)
        other.transport.registerProducer(self.transport, True)
        self._has_producer = other._has_producer = True
        for end in (self, other):
            if end._pending:
                data, end._pending = end._pending, b""
                write_now(end.other.transport, data)
        for end in (self, other):
            if end._read_closed and not end.other._lost:
                end.other.shut_down_write()

    def dataReceived(self, data):
        if self._quick_ack is not None and len(data) < QUICKACK_BELOW:
            self._quick_ack()
        if self.other is not None:
            write_now(self.other.transport, data)
            return
        if self._early_target is not None and not self._pending:
            data = self._send_early(data)
            if not data:
                return
        self._pending += data
        if self._hold_limit is not None and self._early_sent + len(self._pending) > self._hold_limit:
            self._pause_reading()

    def readConnectionLost(self):
        # Our peer sent EOF: pass the half-close on (at the join, if not joined yet).
        self._read_closed = True
        if self.other is not None and not self.other._lost:
            self.other.shut_down_write()
        self._close_if_done()

    def writeConnectionLost(self):
        self._write_closed = True
        self._close_if_done()

    def shut_down_write(self):
        """
        Shut down the write side of this end's connection (send EOF), as when
        the other end's peer did; the connection closes once both directions
        are done.  A transport without half-close is closed instead.
        """
        self._write_closed = True
        self._release_producer()
        try:
            half_close_now(self.transport)
        except (AttributeError, NotImplementedError):
            # A transport without half-close: closing it is the best we can do.
            self.transport.loseConnection()
        self._close_if_done()

    def _close_if_done(self):
        if self._read_closed and self._write_closed:
            self._release_producer()
            self.transport.loseConnection()

    def _release_producer(self):
        # Nothing more will be written to our transport, so the producer
        # feeding it must go first: Twisted resumes a paused producer instead
        # of completing a pending (half-)close, which would then never happen.
        if self._has_producer:
            self._has_producer = False
            self.transport.unregisterProducer()

    def _hold(self, limit):
        # Hold what arrives until the join; past `limit` bytes (at once for
        # 0) stop reading.
        self._hold_limit = limit
        if limit == 0 or len(self._pending) > limit:
            self._pause_reading()

    def _send_early_to(self, transport):
        # The target's connection exists but is not open yet, and takes
        # early data: what was held and what arrives go to it at once, up to
        # the hold limit; past it, bytes are held (and reading pauses) as
        # without early data.
        if self._lost or self.other is not None:
            return
        self._early_target = transport
        if self._pending:
            data, self._pending = self._pending, b""
            self._pending = self._send_early(data)

    def _send_early(self, data):
        # What fits under the hold limit goes to the opening target; the
        # rest is returned, to be held.
        room = max(self._hold_limit - self._early_sent, 0)
        if len(data) > room:
            data, rest = data[:room], data[room:]
        else:
            rest = b""
        if data:
            self._early_sent += len(data)
            self._early_target.write(data)
        return rest

    def _pause_reading(self):
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _stop_holding(self):
        self._hold_limit = None
        self._early_target = None
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def connectionLost(self, reason):
        self._lost = True
        opening, self._target_opening = self._target_opening, None
        if opening is not None:
            opening.cancel()  # the user left while the target was opening
        other = self.other
        if other is not None:
            if not other._lost:
                other._release_producer()
                other.transport.loseConnection()
            else:
                # Both ends are gone: let go of each other, so that refcounting
                # frees them (a cycle waits for the garbage collector).
                self.other = other.other = None
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close(self, reason)


def _tune(transport):
    """
    Bulk reads, and no Nagle delay: a splice forwards what it reads at once.
    Returns the transport's quick-acker: no delayed ACK holding a peer's
    Nagle-delayed second send.  Nothing to do for a tunnel stream.
    """
    if isinstance(transport, Stream):
        return None
    tune_for_bulk(transport)
    set_no_delay(transport)
    return quick_acker(transport)


def splice(a, b):
    """Join two connected L{SpliceEnd}s; returns C{(a, b)}."""
    a.join(b)
    return a, b


def open_and_splice(user_end, endpoint, on_open=None, read_while_opening=0, early_data=False):
    """
    Open a connection to the target through C{endpoint}, then splice
    C{user_end} to it: Twisted's C{portforward} with half-close.

    While the target opens, C{user_end} holds what it receives and its peer's
    EOF, and the join passes them on.  If C{user_end}'s connection is lost
    first, the open is cancelled.  The caller answers a failure in its own
    protocol (a SOCKS5 reply code, an HTTP status, a plain close).

    @param user_end: a connected L{SpliceEnd}: the user's protocol itself, or
        a L{SpliceEnd} over its transport that the protocol gives what it
        receives once spliced.
    @param endpoint: the C{IStreamClientEndpoint} of the target, e.g. from
        C{FrontendContext.endpoint_for}; or a callable with no arguments
        returning one, whose exceptions fail the open as the connect's do.
    @param on_open: C{None}, or called with the target's L{SpliceEnd} once it
        is open, before any byte flows: the place for a protocol's success
        reply.  If it raises, the target is closed and the open fails.
    @param read_while_opening: bytes C{user_end} may receive while the target
        opens before reading from it pauses.  0 pauses at once (as
        C{portforward} does); more keeps reading, so that a user who leaves
        is noticed and the open cancelled at once; C{None} leaves reading to
        the caller (which then holds early bytes itself).  Reading resumes at
        the join.
    @param early_data: where C{endpoint} provides
        L{anyproxy.interfaces.IEarlyDataEndpoint}, the first
        C{read_while_opening} bytes C{user_end} receives while the target
        opens go to it at once (they cross with the open) instead of being
        held; what comes past them is held, and pauses reading, as without
        it.  Only for a protocol without a success reply, whose user may
        speak first: C{on_open} cannot hold bytes already sent.

    @return: a L{Deferred} that fires with the target's L{SpliceEnd} once
        spliced, or with C{None} if C{user_end}'s connection was lost first.
        It fails with the open's failure: typically
        L{anyproxy.errors.StreamOpenError}, whose C{reason} the caller maps
        (L{anyproxy.errors.socks_reply_code}, L{anyproxy.errors.http_status}),
        also for a target that closed before the splice (C{GENERAL_FAILURE}).
        Cancelling it cancels the open.
    """
    if early_data and read_while_opening is None:
        raise ValueError("early_data needs read_while_opening: the bytes that may go early")
    if read_while_opening is not None:
        user_end._hold(read_while_opening)
    try:
        if not hasattr(endpoint, "connect"):
            endpoint = endpoint()
        if early_data and IEarlyDataEndpoint.providedBy(endpoint):
            opening = endpoint.connect_early(OneProtocolFactory(SpliceEnd()), user_end._send_early_to)
        else:
            opening = connect_protocol(endpoint, SpliceEnd())
    except Exception:
        opening = fail()
    user_end._target_opening = opening

    def opened(target):
        user_end._target_opening = None
        user_end._early_target = None
        if user_end._lost:
            # The user left and the endpoint could not cancel in time.
            target.transport.loseConnection()
            return None
        if target._lost:
            raise StreamOpenError(Reason.GENERAL_FAILURE, "target closed at once")
        if on_open is not None:
            try:
                on_open(target)
            except Exception:
                target.transport.loseConnection()
                raise
        user_end.join(target)
        return target

    def failed(failure):
        user_end._target_opening = None
        user_end._early_target = None
        if user_end._lost:
            return None  # the user left first and the open was cancelled
        return failure

    return opening.addCallbacks(opened, failed)
