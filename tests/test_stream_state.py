"""
Tests for L{anyproxy.tunnel.stream_state}: the stream lifecycle table, alone
and as a L{Stream} on a L{Mux} follows it, one transition at a time.
"""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from anyproxy.errors import Reason
from anyproxy.tunnel import frames
from anyproxy.tunnel.interfaces import IStreamEvents, IStreamMux
from anyproxy.tunnel.mux import Mux, MuxProtocolError
from anyproxy.tunnel.stream_state import (
    ACCEPTING, CLOSE, CLOSED, FINISHED, HALF_CLOSED_LOCAL, HALF_CLOSED_REMOTE, OPEN, OPENING,
    PEER_EVENTS, RECV_CREDIT, RECV_DATA, RECV_DATAGRAM, RECV_FIN, RECV_OPEN_ERROR, RECV_OPEN_OK,
    RECV_RESET, REFUSED, RESET, SEND_FIN, SEND_OPEN_ERROR, SEND_OPEN_OK, SEND_RESET, TRANSITIONS,
    TUNNEL_LOST, StreamStateError, next_state)

LIVE = [OPENING, ACCEPTING, OPEN, HALF_CLOSED_LOCAL, HALF_CLOSED_REMOTE]
EVENTS = [RECV_OPEN_OK, RECV_OPEN_ERROR, RECV_DATA, RECV_DATAGRAM, RECV_CREDIT, RECV_FIN,
          RECV_RESET, SEND_OPEN_OK, SEND_OPEN_ERROR, SEND_FIN, SEND_RESET, CLOSE, TUNNEL_LOST]

# The table of docs/PROTOCOL.md (Message flow), written out again: a change
# to one that is not made to the other fails here.
EXPECTED = {
    OPENING: {RECV_OPEN_OK: OPEN, RECV_OPEN_ERROR: REFUSED},
    ACCEPTING: {SEND_OPEN_OK: OPEN, SEND_OPEN_ERROR: REFUSED, RECV_DATA: ACCEPTING},
    OPEN: {RECV_DATA: OPEN, RECV_DATAGRAM: OPEN, RECV_CREDIT: OPEN,
           RECV_FIN: HALF_CLOSED_REMOTE, SEND_FIN: HALF_CLOSED_LOCAL},
    HALF_CLOSED_LOCAL: {RECV_DATA: HALF_CLOSED_LOCAL, RECV_DATAGRAM: HALF_CLOSED_LOCAL,
                        RECV_CREDIT: HALF_CLOSED_LOCAL, RECV_FIN: CLOSED, CLOSE: CLOSED},
    HALF_CLOSED_REMOTE: {RECV_DATAGRAM: HALF_CLOSED_REMOTE, RECV_CREDIT: HALF_CLOSED_REMOTE,
                         SEND_FIN: CLOSED},
}
for _state in LIVE:
    EXPECTED[_state].update({RECV_RESET: RESET, SEND_RESET: RESET, TUNNEL_LOST: RESET})


class TableTests(SynchronousTestCase):
    """
    The table itself: every allowed move, and a clear error for the rest.
    """

    def test_table_is_the_documented_one(self):
        """TRANSITIONS holds exactly the documented moves."""
        flattened = {(state, event): after for state, moves in EXPECTED.items()
                     for event, after in moves.items()}
        self.assertEqual(TRANSITIONS, flattened)

    def test_every_transition(self):
        """next_state follows each allowed move."""
        for state, moves in EXPECTED.items():
            for event, after in moves.items():
                self.assertIs(next_state(1, state, event), after, (state, event))

    def test_every_illegal_move_raises(self):
        """Every other (state, event), finished states included, raises StreamStateError."""
        refused = 0
        for state in LIVE + sorted(FINISHED, key=repr):
            for event in EVENTS:
                if event in EXPECTED.get(state, {}):
                    continue
                with self.assertRaises(StreamStateError) as caught:
                    next_state(7, state, event)
                self.assertEqual((caught.exception.stream_id, caught.exception.state,
                                  caught.exception.event), (7, state, event))
                refused += 1
        self.assertEqual(refused, 8 * len(EVENTS) - len(TRANSITIONS))

    def test_error_names_event_and_state(self):
        """The error's message names the stream, the event and the state."""
        error = self.assertRaises(StreamStateError, next_state, 5, HALF_CLOSED_REMOTE, RECV_DATA)
        self.assertEqual(str(error),
                         "stream 5: RECV_DATA is not allowed in state HALF_CLOSED_REMOTE")

    def test_finished_states_are_final(self):
        """No event leaves CLOSED, RESET or REFUSED."""
        self.assertEqual([key for key in TRANSITIONS if key[0] in FINISHED], [])


@implementer(IHalfCloseableProtocol)
class StreamProtocol(Protocol):
    """A half-closeable protocol that also takes datagrams, recording nothing."""

    def readConnectionLost(self):
        pass

    def writeConnectionLost(self):
        pass

    def datagram_received(self, host, port, payload):
        pass


class Fixture:
    """
    One L{Mux} with a udp stream in a chosen state, and the means to make
    each event of the table happen to it: frames from the peer are fed to
    the mux, local events are the stream's own API.
    """

    def __init__(self, state):
        self.sent = []
        self.errors = []
        self.requests = []
        self.mux = Mux(self.sent.append, initiator=(state is ACCEPTING),
                       on_open_request=self.requests.append,
                       on_protocol_error=self.errors.append, clock=Clock())
        if state is ACCEPTING:
            self.receive(frames.Open(2, "udp", "h", 1, 65536))
            [self.stream] = self.requests
            return
        self.open_failures = []
        self.mux.open_stream("udp", "h", 1).addErrback(self.open_failures.append)
        [self.stream] = self.mux.streams()
        if state is OPENING:
            return
        self.receive(frames.OpenOk(self.stream.stream_id, 65536))
        self.stream.attach(StreamProtocol())
        if state is HALF_CLOSED_LOCAL:
            self.stream.loseWriteConnection()
        elif state is HALF_CLOSED_REMOTE:
            self.receive(frames.Fin(self.stream.stream_id))
        assert self.stream.state is state and not self.errors, (state, self.stream.state)

    def receive(self, frame):
        self.mux.message_received(frames.encode(frame))

    def happen(self, event):
        sid = self.stream.stream_id
        peer_frames = {
            RECV_OPEN_OK: frames.OpenOk(sid, 65536),
            RECV_OPEN_ERROR: frames.OpenError(sid, int(Reason.CONNECTION_REFUSED), ""),
            RECV_DATA: frames.Data(sid, b"x"),
            RECV_DATAGRAM: frames.Datagram(sid, "10.0.0.1", 53, b"x"),
            RECV_CREDIT: frames.Credit(sid, 1),
            RECV_FIN: frames.Fin(sid),
            RECV_RESET: frames.Reset(sid, int(Reason.GENERAL_FAILURE)),
        }
        if event in peer_frames:
            self.receive(peer_frames[event])
        elif event is SEND_OPEN_OK:
            self.stream.accept(StreamProtocol())
        elif event is SEND_OPEN_ERROR:
            self.stream.reject(Reason.NOT_ALLOWED)
        elif event is SEND_FIN:
            self.stream.loseWriteConnection()
        elif event is SEND_RESET:
            self.stream.reset()
        elif event is CLOSE:
            self.stream.loseConnection()
        elif event is TUNNEL_LOST:
            self.mux.connection_lost()
        else:
            raise AssertionError(event)


class StreamFollowsTableTests(SynchronousTestCase):
    """
    A L{Stream} driven by real frames and its own API moves as the table says.
    """

    def test_every_transition(self):
        """Each allowed event takes a stream to the state the table names, with no error."""
        wrong = []
        for state, moves in EXPECTED.items():
            for event, after in moves.items():
                fixture = Fixture(state)
                fixture.happen(event)
                if fixture.stream.state is not after or fixture.errors:
                    wrong.append((state, event, fixture.stream.state, fixture.errors))
        self.assertEqual(wrong, [])

    def test_finished_streams_leave_the_table(self):
        """A stream that reaches CLOSED, RESET or REFUSED is no longer in its mux."""
        for state, moves in EXPECTED.items():
            for event, after in moves.items():
                fixture = Fixture(state)
                fixture.happen(event)
                self.assertEqual(fixture.mux.stream_count, 0 if after in FINISHED else 1,
                                 (state, event))
                self.assertEqual(fixture.stream.closed, after in FINISHED)

    def test_illegal_peer_frames_are_protocol_errors(self):
        """Every frame the table refuses in a live state is a protocol error naming it."""
        missed = []
        for state in LIVE:
            for event in sorted(PEER_EVENTS - set(EXPECTED[state]), key=repr):
                fixture = Fixture(state)
                fixture.happen(event)
                [error] = fixture.errors or [None]
                if not (isinstance(error, MuxProtocolError) and repr(event) in str(error)
                        and repr(state) in str(error)):
                    missed.append((state, event, error))
        self.assertEqual(missed, [])

    def test_data_before_open_ok(self):
        """DATA for a stream still waiting for OPEN_OK breaks the protocol."""
        fixture = Fixture(OPENING)
        fixture.happen(RECV_DATA)
        [error] = fixture.errors
        self.assertEqual(str(error), "stream 2: RECV_DATA is not allowed in state OPENING")

    def test_answer_twice(self):
        """accept or reject on a stream already answered raises StreamStateError."""
        for state in (OPENING, OPEN, HALF_CLOSED_LOCAL, HALF_CLOSED_REMOTE):
            stream = Fixture(state).stream
            self.assertRaises(StreamStateError, stream.accept, StreamProtocol())
            self.assertRaises(StreamStateError, stream.reject, Reason.NOT_ALLOWED)

    def test_local_calls_on_finished_stream(self):
        """Writes, closes, resets and a reject on a finished stream do nothing, like a closed socket."""
        fixture = Fixture(OPEN)
        fixture.happen(SEND_RESET)
        del fixture.sent[:]
        stream = fixture.stream
        stream.write(b"x")
        stream.loseWriteConnection()
        stream.loseConnection()
        stream.reset()
        stream.reject(Reason.NOT_ALLOWED)
        self.assertFalse(stream.send_datagram("h", 1, b"x"))
        self.assertEqual((fixture.sent, stream.state), ([], RESET))

    def test_ended_cleanly(self):
        """ended_cleanly is None while a stream lives, then says whether it ended by FINs."""
        ends = {}
        for state, event in [(OPEN, RECV_DATA), (HALF_CLOSED_LOCAL, RECV_FIN),
                             (OPEN, RECV_RESET), (ACCEPTING, SEND_OPEN_ERROR)]:
            fixture = Fixture(state)
            fixture.happen(event)
            ends[fixture.stream.state] = fixture.stream.ended_cleanly
        self.assertEqual(ends, {OPEN: None, CLOSED: True, RESET: False, REFUSED: False})


class InterfaceTests(SynchronousTestCase):
    """
    The mux and its streams provide the interfaces each uses of the other.
    """

    def test_mux_provides_stream_mux(self):
        """A Mux provides IStreamMux."""
        fixture = Fixture(OPEN)
        verifyObject(IStreamMux, fixture.mux)

    def test_stream_provides_stream_events(self):
        """A Stream provides IStreamEvents."""
        fixture = Fixture(OPEN)
        verifyObject(IStreamEvents, fixture.stream)
