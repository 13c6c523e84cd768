# -*- test-case-name: tests.test_stream_state -*-
"""
The lifecycle of one tunnel stream, as a table.

Theory of operation
-------------------
A stream's state is what has crossed the wire for it: who opened it, whether
the open was answered, and which side has sent FIN or RESET.  Every frame the
peer sends for a stream, and every frame this side sends that changes the
stream, is an event; L{TRANSITIONS} maps C{(state, event)} to the next state.
A pair that is not in the table is not allowed: L{next_state} raises
L{StreamStateError}, naming the event and the state.  The receive path turns
that into a protocol error (the peer broke the rules and the tunnel is
dropped); raised by a local call, it is a bug in the caller.

The table is the same as the one in docs/PROTOCOL.md (Message flow), where
each state is explained.  States and events are sentinels compared with
C{is}, as in h11's C{_state.py}, so a lookup costs one dict probe; that runs
once per DATA frame.

What the table does not hold: a local C{loseWriteConnection} or
C{loseConnection} whose FIN still waits for queued DATA (the FIN is an event
when it is sent, not when it is asked for), and whether a protocol is
attached.  L{anyproxy.tunnel.stream.Stream} keeps those as flags.
"""

from anyproxy.sentinels import sentinel

# -- states ---------------------------------------------------------------

# This side sent OPEN and waits for OPEN_OK or OPEN_ERROR.
OPENING = sentinel("OPENING")
# The peer's OPEN arrived; this side has not answered it yet.
ACCEPTING = sentinel("ACCEPTING")
# Answered with OPEN_OK: DATA may flow both ways.
OPEN = sentinel("OPEN")
# This side sent FIN; the peer may still send DATA.
HALF_CLOSED_LOCAL = sentinel("HALF_CLOSED_LOCAL")
# The peer sent FIN; this side may still send DATA.
HALF_CLOSED_REMOTE = sentinel("HALF_CLOSED_REMOTE")
# Finished cleanly: both sides sent FIN, or this side closed after its FIN.
CLOSED = sentinel("CLOSED")
# Aborted: a RESET either way, or the tunnel was lost.
RESET = sentinel("RESET")
# The open failed: OPEN_ERROR either way.
REFUSED = sentinel("REFUSED")

#: States in which the stream is finished and forgotten by its mux.
FINISHED = frozenset([CLOSED, RESET, REFUSED])

# -- events ---------------------------------------------------------------

# Frames from the peer.
RECV_OPEN_OK = sentinel("RECV_OPEN_OK")
RECV_OPEN_ERROR = sentinel("RECV_OPEN_ERROR")
RECV_DATA = sentinel("RECV_DATA")
RECV_DATAGRAM = sentinel("RECV_DATAGRAM")
RECV_CREDIT = sentinel("RECV_CREDIT")
RECV_FIN = sentinel("RECV_FIN")
RECV_RESET = sentinel("RECV_RESET")

# What this side does.
SEND_OPEN_OK = sentinel("SEND_OPEN_OK")  # accept()
SEND_OPEN_ERROR = sentinel("SEND_OPEN_ERROR")  # reject()
SEND_FIN = sentinel("SEND_FIN")  # the FIN goes out, after every queued byte
SEND_RESET = sentinel("SEND_RESET")  # reset(), abortConnection(), a cancelled open
# loseConnection() after this side's FIN: stop reading; DATA that still
# comes is answered with RESET, as a closed TCP socket does.
CLOSE = sentinel("CLOSE")
# The tunnel under the stream is gone.
TUNNEL_LOST = sentinel("TUNNEL_LOST")

#: Events that are frames from the peer (an illegal one is a protocol error).
PEER_EVENTS = frozenset([RECV_OPEN_OK, RECV_OPEN_ERROR, RECV_DATA, RECV_DATAGRAM,
                         RECV_CREDIT, RECV_FIN, RECV_RESET])


def _aborts(state):
    # RESET either way and the loss of the tunnel end a stream from any live state.
    return {(state, RECV_RESET): RESET, (state, SEND_RESET): RESET, (state, TUNNEL_LOST): RESET}


#: C{(state, event) -> next state}.  Nothing else is allowed.
TRANSITIONS = {
    (OPENING, RECV_OPEN_OK): OPEN,
    (OPENING, RECV_OPEN_ERROR): REFUSED,
    **_aborts(OPENING),

    (ACCEPTING, SEND_OPEN_OK): OPEN,
    (ACCEPTING, SEND_OPEN_ERROR): REFUSED,
    # Early data: allowed up to the limit this side's HELLO offered, which
    # the stream checks (a count the table cannot hold).
    (ACCEPTING, RECV_DATA): ACCEPTING,
    **_aborts(ACCEPTING),

    (OPEN, RECV_DATA): OPEN,
    (OPEN, RECV_DATAGRAM): OPEN,
    (OPEN, RECV_CREDIT): OPEN,
    (OPEN, RECV_FIN): HALF_CLOSED_REMOTE,
    (OPEN, SEND_FIN): HALF_CLOSED_LOCAL,
    **_aborts(OPEN),

    (HALF_CLOSED_LOCAL, RECV_DATA): HALF_CLOSED_LOCAL,
    (HALF_CLOSED_LOCAL, RECV_DATAGRAM): HALF_CLOSED_LOCAL,
    (HALF_CLOSED_LOCAL, RECV_CREDIT): HALF_CLOSED_LOCAL,
    (HALF_CLOSED_LOCAL, RECV_FIN): CLOSED,
    (HALF_CLOSED_LOCAL, CLOSE): CLOSED,
    **_aborts(HALF_CLOSED_LOCAL),

    (HALF_CLOSED_REMOTE, RECV_DATAGRAM): HALF_CLOSED_REMOTE,
    (HALF_CLOSED_REMOTE, RECV_CREDIT): HALF_CLOSED_REMOTE,
    (HALF_CLOSED_REMOTE, SEND_FIN): CLOSED,
    **_aborts(HALF_CLOSED_REMOTE),
}


class StreamStateError(Exception):
    """
    An event that the stream's state does not allow.

    @ivar stream_id: the stream's id.
    @ivar state: the state it was in.
    @ivar event: the event that was refused.
    """

    def __init__(self, stream_id, state, event):
        super().__init__("stream %d: %r is not allowed in state %r" % (stream_id, event, state))
        self.stream_id = stream_id
        self.state = state
        self.event = event


def next_state(stream_id, state, event):
    """
    The state a stream in C{state} moves to on C{event}.

    @raise StreamStateError: if the table does not allow C{event} in C{state}.
    """
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise StreamStateError(stream_id, state, event) from None
