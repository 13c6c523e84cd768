# -*- test-case-name: tests.test_fleet_relay -*-
"""
The accepting gateway's side of a relayed stream: each OPEN arriving on a
peer link (L{anyproxy.fleet.peer_link}) is opened again on a tunnel of this
gateway's own pool, then the two streams are spliced.

At most one hop: L{Relay} is given the B{local}
L{anyproxy.gateway.tunnel_pool.TunnelPool}, never the fleet's pool, so a
stream that arrived from a peer can only go to a client connected here; a
group with no tunnel here is refused NO_TUNNEL at once, and the user's
gateway chooses again among its own tunnels and the other nodes (never this
gateway: the choice is made where the user is, so still one hop at most).  The link plays the client's part of a tunnel, so the answer is the
client's: OPEN_OK once the local stream is open, or OPEN_ERROR with the
L{anyproxy.errors.Reason} the client gave (access denied, refused, timed
out...), which the user's gateway maps through its error table unchanged.

TCP streams are joined by two L{RelayEnd}s, L{anyproxy.splice.SpliceEnd}s
over the two streams: each stream is the other's push producer, so a
stalled reader at either end stops credit on the other stream (one window
of memory per side, as for any stream), and a FIN either way is a half-close
the other way.  A reset stays a reset: when one stream is reset (or its
tunnel or link lost), the other is reset too rather than closed cleanly, so
neither user nor target mistakes a cut stream for a finished one.  UDP
streams are joined by two L{DatagramEnd}s that pass each datagram, with its
address, to the other stream.
"""

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from anyproxy.errors import Reason, StreamOpenError, reason_for_failure
from anyproxy.splice import SpliceEnd
from anyproxy.tunnel.endpoint import DEFAULT_OPEN_TIMEOUT, bound_open

log = Logger()


class RelayEnd(SpliceEnd):
    """One end of a relayed TCP stream: a splice end that passes resets on."""

    def connectionLost(self, reason):
        other = self.other
        if other is not None and not other.lost and not reason.check(error.ConnectionDone):
            abort = getattr(other.transport, "abortConnection", None)
            if abort is not None:
                other._release_producer()
                abort()
        super().connectionLost(reason)


class DatagramEnd(Protocol):
    """
    One end of a relayed UDP stream: datagrams it receives go out on the
    other end's stream, with their address; when one stream ends the other
    is closed.
    """

    other = None

    def datagram_received(self, host, port, payload):
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.send_datagram(host, port, payload)

    def connectionLost(self, reason):
        other, self.other = self.other, None
        if other is not None:
            other.other = None
            other.transport.loseConnection()


class Relay:
    """
    Serves the OPENs of peer links from this gateway's own tunnels.

    @param local_pool: the gateway's local
        L{anyproxy.gateway.tunnel_pool.TunnelPool} (never a fleet pool: see
        the module docstring).
    @param metrics: an L{anyproxy.fleet.relay_metrics.RelayMetrics}, or C{None}.
    @ivar served: streams relayed (opened) so far.
    """

    served = 0

    def __init__(self, local_pool, clock, open_timeout=DEFAULT_OPEN_TIMEOUT, metrics=None):
        self._local_pool = local_pool
        self._clock = clock
        self.open_timeout = open_timeout
        self.metrics = metrics

    def open_requested(self, group, incoming):
        """
        A peer asked, on its link for C{group}, for the stream C{incoming}
        (an L{anyproxy.tunnel.stream.Stream} waiting for an answer).
        """
        if incoming.kind not in ("tcp", "udp"):
            incoming.reject(Reason.PROTOCOL_NOT_ALLOWED, "only tcp and udp streams are relayed")
            return
        # client.routes: only a local client routing the target (else NO_TUNNEL: choose again).
        tunnel = self._local_pool.pick(group, incoming.host if incoming.kind == "tcp" else None)
        if tunnel is None:
            # No waiting here: the user's gateway knows the fleet and chooses
            # again (anyproxy.fleet.pool), within its own no_tunnel_wait.
            # Waiting would spend that whole wait on a node whose client has
            # just moved on (detached, or reconnecting elsewhere).
            opening = defer.fail(StreamOpenError(
                Reason.NO_TUNNEL, "no tunnel of group %s on this gateway" % (group,)))
        else:
            opening = tunnel.mux.open_stream(incoming.kind, incoming.host, incoming.port)
            opening = bound_open(opening, self.open_timeout, self._clock)
        if self.metrics is not None:
            opening = self.metrics.track_open(opening, "served", incoming)
        # The peer giving up (RESET before our answer) cancels the local open.
        incoming.set_cancel_hook(opening.cancel)
        opening.addCallbacks(lambda local: self._opened(incoming, local),
                             lambda failure: self._failed(incoming, failure))

    def _opened(self, incoming, local):
        if incoming.closed:
            local.reset(Reason.GENERAL_FAILURE)
            return
        self.served += 1
        if incoming.kind == "udp":
            link_end, local_end = DatagramEnd(), DatagramEnd()
            link_end.other, local_end.other = local_end, link_end
            incoming.accept(link_end)
            local.attach(local_end)
            return
        link_end, local_end = RelayEnd(), RelayEnd()
        incoming.accept(link_end, local.dialed)  # what the client dialed, for the user's gateway
        local.attach(local_end)
        if link_end.lost or local_end.lost:
            # One side was reset while the other attached (early RESET): so is the other.
            incoming.reset(Reason.GENERAL_FAILURE)
            local.reset(Reason.GENERAL_FAILURE)
            return
        link_end.join(local_end)

    def _failed(self, incoming, failure):
        if incoming.closed or failure.check(defer.CancelledError):
            return None
        reason = reason_for_failure(failure)
        detail = (failure.value.detail if isinstance(failure.value, StreamOpenError)
                  else failure.getErrorMessage())
        log.info("relayed stream to {host}:{port} failed: {reason}", host=incoming.host,
                 port=incoming.port, reason=reason.name)
        incoming.reject(reason, detail)
        return None
