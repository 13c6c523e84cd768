# -*- test-case-name: tests.test_forwarding -*-
"""
The UDP half of port forwarding (L{anyproxy.gateway.port_forwarding.forwarder}).

Why it is built this way
------------------------
UDP has no connections, but the tunnel's udp streams are associations
(docs/PROTOCOL.md, Datagrams): each keeps one socket at the client, so
replies come back on the stream that asked.  So each user source address
(IP and port) gets its own association, opened on that source's first
datagram, and every reply on it is sent back to that source from the
forwarded port.  Two users of one port never see each other's replies, and
the target sees one client socket per user, as with a plain UDP NAT.

Sessions end after C{idle_timeout} seconds without a datagram either way
(the client's own C{idle_timeout} may end them first), when their stream is
lost (the tunnel went away, or the client refused: UDP not allowed) or when
the port is released.  The next datagram from that source opens a new one.

Nothing grows without bound: at most L{MAX_SESSIONS} sources per port and
L{MAX_SESSIONS_PER_IP} per source address, and while a source's stream is
opening at most L{MAX_PENDING} of its datagrams wait, and at most
L{MAX_PENDING_BYTES} for all sources of the port together; beyond that
datagrams are dropped and counted, as UDP may.  A new source past a bound
takes the place of the one that sent least recently, as a NAT's table does:
each session holds a stream at the client (one of its
C{max_concurrent_conns}), so sources that send once (or forged ones) must
not hold the port, or the client, for a whole idle timeout.
"""

from collections import OrderedDict

from twisted.internet import defer, error
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger

from anyproxy.connect_protocol import connect_protocol

log = Logger()

# Read whole datagrams: Twisted's default (8 KiB) would truncate larger ones.
MAX_DATAGRAM = 65535
# A source silent this long (both ways) loses its association; typical of
# NAT UDP mappings, and long enough for request/response protocols.
UDP_IDLE_TIMEOUT = 60.0
# Sources (associations) per forwarded port: a quarter of a client's default
# max_concurrent_conns, each holding one...
MAX_SESSIONS = 256
# ... and per source IP address.
MAX_SESSIONS_PER_IP = 64
# Datagrams held per source while its stream opens...
MAX_PENDING = 16
# ... and bytes held for all sources of a port (a flood of large datagrams
# from many source ports would otherwise hold MAX_SESSIONS x MAX_PENDING x 64 KiB).
MAX_PENDING_BYTES = 1024 * 1024


class UdpForwarder(DatagramProtocol):
    """
    The protocol of a forwarded UDP port: one L{UdpSession} per source.

    @ivar forward: the L{anyproxy.gateway.port_forwarding.forwarder.ForwardedPort}.
    @ivar sessions: C{{(host, port): UdpSession}}, the source that sent
        least recently first.
    @ivar dropped: datagrams dropped (no client, queue full, stream not
        opened, tunnel congested, reply not sendable).
    @ivar evicted: sessions ended to make room for a new source.
    """

    noisy = False
    dropped = 0
    evicted = 0

    def __init__(self, forward, clock, idle_timeout=UDP_IDLE_TIMEOUT, max_sessions=MAX_SESSIONS,
                 max_sessions_per_ip=MAX_SESSIONS_PER_IP):
        self.forward = forward
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.max_sessions_per_ip = max_sessions_per_ip
        self.sessions = OrderedDict()
        self._per_ip = {}  # source IP -> its sessions
        self.pending_bytes = 0  # held by sessions whose stream is opening (MAX_PENDING_BYTES)

    def datagramReceived(self, data, addr):
        source = tuple(addr[:2])
        session = self.sessions.get(source)
        if session is None:
            route = self.forward.pick_route()
            if route is None:
                self.dropped += 1
                return
            self._make_room(source[0])
            session = UdpSession(self, addr, route)
            self.sessions[source] = session
            self._per_ip[source[0]] = self._per_ip.get(source[0], 0) + 1
            session.open()
        else:
            self.sessions.move_to_end(source)
        session.send(data)

    def _make_room(self, ip):
        """End the least recent sessions (of C{ip}, or of any source) past the bounds."""
        if self._per_ip.get(ip, 0) >= self.max_sessions_per_ip:
            oldest = next(session for session in self.sessions.values() if session.source[0] == ip)
            self._evict(oldest)
        while len(self.sessions) >= self.max_sessions:
            self._evict(next(iter(self.sessions.values())))

    def _evict(self, session):
        self.evicted += 1
        log.debug("forwarded port {port}: udp from {source} ended for a new source",
                  port=self.forward.label, source="%s:%s" % session.source)
        session.end()

    def reply(self, address, payload):
        """Send C{payload} to the user at C{address} from the forwarded port."""
        if self.transport is None:
            self.dropped += 1
            return
        try:
            self.transport.write(payload, address)
        except (OSError, error.MessageLengthError) as e:
            # A full socket buffer is congestion: UDP drops, so do we.
            self.dropped += 1
            log.debug("forwarded port {port}: reply dropped: {error}",
                      port=self.forward.label, error=str(e))

    def session_ended(self, session):
        if self.sessions.get(session.source) is session:
            del self.sessions[session.source]
            ip = session.source[0]
            left = self._per_ip[ip] - 1
            if left:
                self._per_ip[ip] = left
            else:
                del self._per_ip[ip]

    def end_all(self):
        """End every association (the port is being released)."""
        for session in list(self.sessions.values()):
            session.end()


class UdpSession(Protocol):
    """One source's association: the protocol of its udp tunnel stream."""

    def __init__(self, forwarder, address, route):
        self.forwarder = forwarder
        self.address = address
        self.source = tuple(address[:2])
        self.route = route
        self.ended = False
        self._clock = forwarder.clock
        self._last = self._clock.seconds()
        self._pending = []
        self._opening = None
        self._idle_call = None

    def open(self):
        forward = self.forwarder.forward
        opening = connect_protocol(self.route.endpoint(forward.clock, forward.open_timeout), self)
        self._opening = opening
        if self.forwarder.idle_timeout:
            self._idle_call = self._clock.callLater(self.forwarder.idle_timeout, self._idle_check)
        opening.addCallbacks(self._opened, self._failed)

    def _opened(self, _):
        self._opening = None
        pending = self._take_pending()
        for payload in pending:
            self._send_now(payload)

    def _failed(self, failure):
        self._opening = None
        if not failure.check(defer.CancelledError):
            log.info("forwarded port {port} (client {client_id}) udp from {source} -> {target}: {why}",
                     port=self.forwarder.forward.label, client_id=self.route.tunnel.client_id,
                     source="%s:%s" % self.source, target=self.route.request.target,
                     why=failure.getErrorMessage())
        self._finish()

    # datagrams

    def send(self, payload):
        """A datagram from the user: to the target, or held until the stream is open."""
        self._last = self._clock.seconds()
        if self.ended:
            self.forwarder.dropped += 1
        elif self.transport is None:
            forwarder = self.forwarder
            if (len(self._pending) < MAX_PENDING
                    and forwarder.pending_bytes + len(payload) <= MAX_PENDING_BYTES):
                self._pending.append(payload)
                forwarder.pending_bytes += len(payload)
            else:
                forwarder.dropped += 1
        else:
            self._send_now(payload)

    def _send_now(self, payload):
        request = self.route.request
        if not self.transport.send_datagram(request.local_host, request.local_port, payload):
            self.forwarder.dropped += 1

    def dataReceived(self, data):
        pass  # udp streams carry datagrams only

    def datagram_received(self, host, port, payload):
        """A reply from the target came through the tunnel."""
        if not self.ended:
            self._last = self._clock.seconds()
            self.forwarder.reply(self.address, payload)

    # the end

    def _idle_check(self):
        self._idle_call = None
        idle_for = self._clock.seconds() - self._last
        if idle_for >= self.forwarder.idle_timeout:
            log.debug("forwarded port {port}: udp from {source} idle; closing",
                      port=self.forwarder.forward.label, source="%s:%s" % self.source)
            self.end()
            return
        self._idle_call = self._clock.callLater(self.forwarder.idle_timeout - idle_for,
                                                self._idle_check)

    def end(self):
        """Close the stream (or stop opening it) and forget this source."""
        if self.ended:
            return
        if self._opening is not None:
            opening, self._opening = self._opening, None
            opening.cancel()
        elif self.transport is not None:
            self.transport.loseConnection()
        self._finish()

    def connectionLost(self, reason):
        self._finish()

    def _take_pending(self):
        pending, self._pending = self._pending, []
        self.forwarder.pending_bytes -= sum(map(len, pending))
        return pending

    def _finish(self):
        self.ended = True
        self.forwarder.dropped += len(self._take_pending())  # never sent
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self.forwarder.session_ended(self)
