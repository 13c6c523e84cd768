# -*- test-case-name: tests.test_connection_cap -*-
"""
A cap on how many connections a listener keeps in some state; beyond it a
new connection is refused at once.

Every listener of a program shares the process's file descriptors.  Without
a cap, a crowd of connections that never get anywhere (idle, trickling a byte
a second, stuck in a handshake) would use them all, and then the proxy's own
C{accept()} fails with C{EMFILE} for everybody.  So:

  - the status page and the C{/metrics} pages cap their open connections
    (L{anyproxy.operator_site}): a new one beyond the cap gets 503 and is
    closed;
  - the proxy listeners cap the connections that have not finished their
    handshake (SOCKS5: not yet sent their request; HTTP: no request let in
    yet): a new one beyond the cap is closed at once (L{Refused}).  Users who
    logged in are not counted: the stream limits (L{anyproxy.limits}) are
    for them.

Unlike L{anyproxy.limits.Limiter}, nothing waits for a place: the cap is for
floods, where queueing would only hold more sockets.  Refusals come in bursts
(a flood, a scan, a scraper gone wrong), so they are logged once per burst,
not once per connection: the first refusal at once, then at most one line
per L{LOG_INTERVAL} seconds saying how many more were refused.
"""

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

log = Logger()

# Connections a proxy listener keeps in their handshake (not yet logged in),
# at most.  Generous: a real user spends milliseconds there, and each
# handshake is also bounded in time (gateway.handshake_timeout).
DEFAULT_MAX_HANDSHAKES = 1024

# Seconds between two log lines about refusals of the same cap.
LOG_INTERVAL = 60.0


class ConnectionCap:
    """
    Counts connections in one state of one listener, up to C{limit}.

    @ivar limit: the most connections admitted at once; 0 = no cap.
    @ivar what: names the listener and the connections counted, for logs,
        e.g. C{"status page (open connections)"}.
    @ivar count: connections admitted and not yet left.
    @ivar refused: connections refused so far, in all.
    """

    def __init__(self, limit, what, clock):
        """
        @param clock: an C{IReactorTime}, to log once per burst.
        """
        self.limit = limit
        self.what = what
        self.count = 0
        self.refused = 0
        self._clock = clock
        self._unreported = 0
        self._reported_at = None

    def enter(self):
        """
        Admit one more connection if there is room.

        @return: C{True} if admitted (call L{leave} once when it leaves the
            state), C{False} if refused (it was counted and maybe logged).
        """
        if self.limit and self.count >= self.limit:
            self._refuse()
            return False
        self.count += 1
        return True

    def leave(self):
        """An admitted connection left the state (closed, or logged in)."""
        if self.count > 0:
            self.count -= 1

    def _refuse(self):
        self.refused += 1
        self._unreported += 1
        now = self._clock.seconds()
        if self._reported_at is not None and now - self._reported_at < LOG_INTERVAL:
            return
        log.warn("{what}: at the cap of {limit}, refused {refused} new connection(s) "
                 "(logged at most once a minute)",
                 what=self.what, limit=self.limit, refused=self._unreported)
        self._reported_at = now
        self._unreported = 0


class Refused(Protocol):
    """
    What a listener over its cap builds instead of its protocol: closes the
    connection as soon as it is made.  (Returning C{None} from
    C{buildProtocol} would do for plain TCP, but not under a TLS wrapper.)
    """

    def connectionMade(self):
        self.transport.loseConnection()


class HandshakeCappedFactory:
    """
    Mixin for a proxy listener's factory: each new connection takes a place
    in C{self.handshakes} (a L{ConnectionCap}) and its protocol gets
    C{holds_handshake_place = True}; the protocol gives the place back
    (C{handshakes.leave()}) once it logs in or closes.  Over the cap the
    connection is L{Refused}.
    """

    def buildProtocol(self, addr):
        if not self.handshakes.enter():
            return Refused()
        protocol = super().buildProtocol(addr)
        protocol.holds_handshake_place = True
        return protocol
