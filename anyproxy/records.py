# -*- test-case-name: tests.test_limits -*-
"""
Connection records: a snapshot of each open stream (id, target, tunnel,
created, last active, bytes each way), read by the client's dialer and the
tests; the management API's stream list is meant to be built on them.

A record is a snapshot read off a L{anyproxy.tunnel.stream.Stream}; nothing is
kept per stream beyond the stream's own attributes, so taking records costs
nothing until someone asks for them.
"""

import attr


@attr.s(frozen=True, slots=True)
class StreamRecord:
    """
    One open stream.

    @ivar stream_id: the stream's id within its tunnel.
    @ivar tunnel: the tunnel's name (C{client_id@address} at the gateway).
    @ivar kind: C{"tcp"} or C{"udp"}.
    @ivar host: the target asked for.
    @ivar port: the target port.
    @ivar created: when the stream was opened (seconds since the epoch).
    @ivar last_active: when it last carried a byte (seconds since the epoch).
    @ivar bytes_sent: DATA bytes this side sent on the stream.
    @ivar bytes_received: DATA bytes this side received on it.
    """

    stream_id = attr.ib()
    tunnel = attr.ib()
    kind = attr.ib()
    host = attr.ib()
    port = attr.ib()
    created = attr.ib()
    last_active = attr.ib()
    bytes_sent = attr.ib(default=0)
    bytes_received = attr.ib(default=0)

    def as_dict(self):
        """A JSON-able dict (for the status page's API)."""
        return attr.asdict(self)


def record_of(stream):
    """The L{StreamRecord} of one stream, now."""
    return StreamRecord(
        stream_id=stream.stream_id, tunnel=stream.getHost().tunnel, kind=stream.kind,
        host=stream.host, port=stream.port, created=stream.created,
        last_active=stream.last_active,
        bytes_sent=stream.bytes_sent, bytes_received=stream.bytes_received)


def gateway_records(tunnel_pool):
    """
    The records of every open stream of every tunnel of an
    L{anyproxy.interfaces.ITunnelPool}.
    """
    return [record_of(stream) for tunnel in tunnel_pool.tunnels() for stream in tunnel.mux.streams()]
