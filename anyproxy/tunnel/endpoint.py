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
from twisted.python.failure import Failure
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
    @param source: the user's address (C{host:port}), for the stream table.
    @param streams: the gateway's L{anyproxy.gateway.stream_table.StreamTable}
        (open streams for the management API, the access log), or C{None}.
    @param policy: the user's L{anyproxy.auth.UserPolicy}, or C{None}: a
        reload that revokes it closes the stream
        (L{anyproxy.gateway.app.UserEndpoints}).
    @param shape: C{None}, or called with each opened stream (the user's
        bandwidth cap, L{anyproxy.bandwidth.BandwidthLimits.shape}).
    @param recheck: C{None}, or a callable returning C{None} or C{(reason,
        text)}: the user's rules in force, asked again before the OPEN is
        sent and once the stream is open, so that a reload while the stream
        waited for a slot or a tunnel, or while it opened (before the
        reload could see it to revoke it), still refuses it.
    """

    def __init__(self, tunnel_pool, clock, group, host, port, kind="tcp", wait=3.0,
                 open_timeout=DEFAULT_OPEN_TIMEOUT, admit=None, frontend=None, metrics=None,
                 user="", source="", streams=None, policy=None, shape=None, recheck=None):
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
        self.source = source
        # The host the group's routes are matched on (client.routes); a UDP
        # association has no single target.
        self._route_host = host if kind == "tcp" else None
        self._streams = streams
        self.policy = policy
        self._shape = shape
        self._recheck = recheck

    def open_stream(self, admitted=False, first_data=b""):
        """
        A Deferred firing with an accepted L{anyproxy.tunnel.mux.Stream}.

        @param admitted: C{True} when the caller holds a slot from L{admit}
            for this stream and gives it back itself; otherwise the stream
            takes one and holds it until it ends.
        @param first_data: bytes for the target, sent with the OPEN as far
            as the client takes early data (L{anyproxy.tunnel.mux.Mux.open_stream});
            on a stream opened on another client after a failed OPEN, too.
        """
        if self._admit is None or admitted:
            d = self._open_stream(first_data)
        else:
            d = _then(self._admit(), lambda release: self._open_admitted(release, first_data))
        if self._metrics is not None:
            d = self._metrics.track_open(d, self.frontend)
        if self._streams is not None:
            d = self._streams.watch_refusals(d, self)
        return d

    def still_routed(self, stream):
        """
        Whether C{stream} (opened earlier to this target, kept for reuse) is
        on a tunnel the group's routes would still choose for it.
        """
        mux = getattr(stream, "_mux", None)
        return mux is None or self._tunnel_pool.routed_best(self.group, self._route_host, mux)

    def admit(self):
        """See L{IAdmittingEndpoint.admit}."""
        if self._admit is None:
            return defer.succeed(Release(None))
        return self._admit()

    def _open_admitted(self, release, first_data):
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

        return self._open_stream(first_data).addCallbacks(opened, failed)

    def _open_stream(self, first_data=b""):
        d = _then(self._tunnel_pool.wait_for(self.group, self._wait, self._route_host),
                  lambda tunnel: self._open_on(tunnel, first_data))
        return bound_open(d, self._open_timeout, self._clock)

    def _refused_now(self):
        refusal = self._recheck() if self._recheck is not None else None
        return None if refusal is None else StreamOpenError(*refusal)

    def _open_on(self, tunnel, first_data, retried=False):
        refused = self._refused_now()
        if refused is not None:
            return defer.fail(refused)
        started = self._clock.seconds()
        opening = open_on(tunnel.mux, self.kind, self.host, self.port, first_data)
        opening.addCallback(self._record_end, tunnel, started)
        if tunnel.route_matcher is not None and not retried:
            # A site's client (client.routes): if the OPEN fails, no byte
            # has reached a target (early data is dropped unread), and
            # another client routing the target may reach it; tried once
            # (the pool's retry_choice says when).
            opening.addErrback(self._open_elsewhere, tunnel, first_data)
        return opening

    def _open_elsewhere(self, failure, tunnel, first_data):
        other = self._tunnel_pool.retry_choice(self.group, self._route_host, tunnel, failure)
        return failure if other is None else self._open_on(other, first_data, retried=True)

    def _record_end(self, stream, tunnel, started):
        refused = self._refused_now()
        if refused is not None:
            stream.reset(refused.reason)
            raise refused
        # One event per stream when it ends, with what a log shipper wants
        # (log.format: json turns each field into a JSON key).
        if self._streams is not None:
            self._streams.opened(stream, tunnel, self, started)
        if self._shape is not None:
            self._shape(stream)

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

    def connect(self, protocol_factory, first_data=b""):
        """
        C{IStreamClientEndpoint.connect}; C{first_data} as for L{open_stream}:
        the protocol must not write them again.
        """
        return self.open_stream(first_data=first_data).addCallback(attach_protocol, protocol_factory)

    def connect_admitted(self, protocol_factory, first_data=b""):
        """See L{IAdmittingEndpoint.connect_admitted}."""
        return self.open_stream(admitted=True, first_data=first_data).addCallback(
            attach_protocol, protocol_factory)


def open_on(mux, kind, host, port, first_data=b""):
    """
    C{mux.open_stream(kind, host, port)}, passing C{first_data} only when
    there are some, as L{anyproxy.interfaces.ITunnelPool} has it.
    """
    if first_data:
        return mux.open_stream(kind, host, port, first_data=first_data)
    return mux.open_stream(kind, host, port)


def _then(d, proceed):
    """
    C{d.addCallback(proceed)}, where C{proceed} returns a Deferred; but if
    C{d} has already fired (a free slot, a connected tunnel: the usual case),
    C{proceed} runs now and its Deferred is the answer, so the opener's
    callbacks sit on the stream's own Deferred instead of on a chain of
    Deferreds waiting on each other (measured: a few percent of the
    gateway's CPU per stream).  Cancelling the answer cancels what it waits
    on, as with a chain.
    """
    outcome = []
    d.addBoth(outcome.append)
    if not outcome:
        def later(_):
            value = outcome[0]
            return value if isinstance(value, Failure) else proceed(value)
        return d.addCallback(later)
    value = outcome[0]
    if isinstance(value, Failure):
        return defer.fail(value)
    try:
        return proceed(value)
    except Exception:
        return defer.fail()


def bound_open(opening, timeout, clock):
    """Fail a pending stream open with TIMED_OUT after C{timeout} seconds."""

    def timed_out(failure):
        # check, not trap: trap raises the other failures again from this
        # frame, which the failure's traceback then holds (a reference
        # cycle, for every refused open).
        if failure.check(defer.TimeoutError) is None:
            return failure
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
