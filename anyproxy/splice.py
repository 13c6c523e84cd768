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
"""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from anyproxy.tuning import tune_for_bulk, set_no_delay


@implementer(IHalfCloseableProtocol)
class SpliceEnd(Protocol):
    """
    One end of a splice.  Use L{splice} or L{SpliceEnd.join} to pair two ends.

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

    def __init__(self, initial_data=b""):
        # Bytes that arrived before the splice existed (e.g. sent right after a
        # SOCKS request): forwarded as soon as the other end is connected.
        self._pending = initial_data

    def join(self, other):
        """Pair this end with C{other}; both must be connected (have transports)."""
        self.other = other
        other.other = self
        for end in (self, other):
            # Bulk reads; and no Nagle delay: we forward what we read at once,
            # as Go's net package (the original project) does by default.
            tune_for_bulk(end.transport)
            set_no_delay(end.transport)
        self.transport.registerProducer(other.transport, True)
        other.transport.registerProducer(self.transport, True)
        self._has_producer = other._has_producer = True
        for end in (self, other):
            if end._pending:
                data, end._pending = end._pending, b""
                end.other.transport.write(data)

    def dataReceived(self, data):
        if self.other is None:
            self._pending += data
        else:
            self.other.transport.write(data)

    def readConnectionLost(self):
        # Our peer sent EOF: pass the half-close on.
        self._read_closed = True
        if self.other is not None and not self.other._lost:
            self.other._shut_down_write()
        self._close_if_done()

    def writeConnectionLost(self):
        self._write_closed = True
        self._close_if_done()

    def _shut_down_write(self):
        self._write_closed = True
        self._release_producer()
        try:
            self.transport.loseWriteConnection()
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

    def connectionLost(self, reason):
        self._lost = True
        if self.other is not None and not self.other._lost:
            self.other._release_producer()
            self.other.transport.loseConnection()
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close(self, reason)


def splice(a, b):
    """Join two connected L{SpliceEnd}s; returns C{(a, b)}."""
    a.join(b)
    return a, b
