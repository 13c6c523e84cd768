# -*- test-case-name: tests.test_e2e_tcp -*-
"""
L{TunnelEndpoint}: an C{IStreamClientEndpoint} whose connections are streams
through a client tunnel.  Frontends (SOCKS5, HTTP) use it exactly like a TCP
endpoint, so any Twisted protocol runs over the tunnel unchanged.

It finds its tunnel through an L{anyproxy.interfaces.ITunnelPool} (only
C{wait_for}), so the gateway's in-memory pool and a fleet registry serve it
alike.
"""

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from anyproxy.errors import Reason, StreamOpenError
from anyproxy.interfaces import IAdmittingEndpoint
from anyproxy.limits import Release
from anyproxy.logs import emits

# A client answers OPEN within its own connect timeout; this bounds the wait if
# it never does (a wedged client whose pings still flow).
DEFAULT_OPEN_TIMEOUT = 60.0

log = Logger()


@implementer(IStreamClientEndpoint, IAdmittingEndpoint)
class TunnelEndpoint:
    """
    Connect to C{host:port} through a tunnel of C{group}.

    @param tunnel_pool: the L{anyproxy.interfaces.ITunnelPool} to wait on.
    @param wait: seconds to wait for a tunnel of the group to connect when
        none is (then the connection fails with NO_TUNNEL).
    @param admit: C{None}, or a callable returning a Deferred that fires
        with a release callable once the stream may be opened (a slot of
        the user's and the listener's limits, L{anyproxy.limits}) or fails
        (OVERLOADED).  The slot is held until the stream is finished.
    @param frontend: the name of the listener the stream is for (metrics).
    @param metrics: an L{anyproxy.metrics.GatewayMetrics} counting opens,
        their latency and the stream's bytes for C{frontend}, or C{None}.
    @param user: the user's name, for the stream's end-of-stream log event.
    """

    def __init__(self, tunnel_pool, clock, group, host, port, kind="tcp", wait=3.0,
                 open_timeout=DEFAULT_OPEN_TIMEOUT, admit=None, frontend=None, metrics=None,
                 user=""):
        self._tunnel_pool = tunnel_pool
        self._clock = clock
        self.group = group
        self.host = host
        self.port = port
        self.kind = kind
        self._wait = wait
        self._open_timeout = open_timeout
        self._admit = admit
        self.frontend = frontend
        self._metrics = metrics
        self.user = user

    def open_stream(self, admitted=False):
        """
        A Deferred firing with an accepted L{anyproxy.tunnel.mux.Stream}.

        @param admitted: C{True} when the caller holds a slot from L{admit}
            for this stream and gives it back itself; otherwise the stream
            takes one and holds it until it ends.
        """
        if self._admit is None or admitted:
            d = self._open_stream()
        else:
            d = self._admit().addCallback(self._open_admitted)
        if self._metrics is not None:
            d = self._metrics.track_open(d, self.frontend)
        return d

    def admit(self):
        """See L{IAdmittingEndpoint.admit}."""
        if self._admit is None:
            return defer.succeed(Release(None))
        return self._admit()

    def _open_admitted(self, release):
        # Queue time is not open time: the open timeout starts here.
        def opened(stream):
            # Slots go back one turn later: a stream lost with its tunnel must
            # not hand its slot to a waiter that would pick the same, dying
            # tunnel before the pool has dropped it.
            stream.notify_closed(lambda _: self._clock.callLater(0, release))
            return stream

        def failed(failure):
            self._clock.callLater(0, release)
            return failure

        return self._open_stream().addCallbacks(opened, failed)

    def _open_stream(self):
        d = self._tunnel_pool.wait_for(self.group, self._wait)

        def chosen(tunnel):
            started = self._clock.seconds()
            opening = tunnel.mux.open_stream(self.kind, self.host, self.port)
            return opening.addCallback(self._record_end, tunnel, started)

        d.addCallback(chosen)
        return bound_open(d, self._open_timeout, self._clock)

    def _record_end(self, stream, tunnel, started):
        # One event per stream when it ends, with what a log shipper wants
        # (log.format: json turns each field into a JSON key).
        def ended(stream):
            if not emits(LogLevel.info):
                return
            log.info(
                "stream {stream_id} {kind} {user!r} -> {target} via {client_id}: "
                "{outcome} after {duration:.3f}s, {bytes_in} B in, {bytes_out} B out",
                event="stream_end", stream_id=stream.stream_id, kind=self.kind,
                user=self.user, frontend=self.frontend, target="%s:%s" % (self.host, self.port),
                client_id=tunnel.client_id, group=tunnel.group,
                outcome="closed" if stream.ended_cleanly else "reset",
                duration=self._clock.seconds() - started,
                bytes_in=stream.bytes_sent, bytes_out=stream.bytes_received)

        stream.notify_closed(ended)
        return stream

    def connect(self, protocol_factory):
        return self.open_stream().addCallback(attach_protocol, protocol_factory)

    def connect_admitted(self, protocol_factory):
        """See L{IAdmittingEndpoint.connect_admitted}."""
        return self.open_stream(admitted=True).addCallback(attach_protocol, protocol_factory)


def bound_open(opening, timeout, clock):
    """Fail a pending stream open with TIMED_OUT after C{timeout} seconds."""

    def timed_out(failure):
        failure.trap(defer.TimeoutError)
        raise StreamOpenError(Reason.TIMED_OUT, "client did not answer in time")

    opening.addTimeout(timeout, clock)
    return opening.addErrback(timed_out)


def attach_protocol(stream, protocol_factory):
    """Connect a protocol from C{protocol_factory} to an opened stream."""
    protocol = protocol_factory.buildProtocol(stream.getPeer())
    if protocol is None:
        stream.reset(Reason.GENERAL_FAILURE)
        raise StreamOpenError(Reason.GENERAL_FAILURE, "no protocol for the stream")
    stream.attach(protocol)
    return protocol
