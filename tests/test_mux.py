"""
Tests for L{anyproxy.tunnel.mux}: two muxes wired back to back with plain
functions, so each test decides when (and in which order) messages move.
"""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from anyproxy.errors import Reason, StreamOpenError
from anyproxy.splice import SpliceEnd
from anyproxy.tunnel import frames
from anyproxy.tunnel import stream_state
from anyproxy.tunnel.mux import (
    CREDIT_FRACTION,
    DEFAULT_MAX_WINDOW,
    DEFAULT_WINDOW,
    EARLY_DATA,
    MAX_DATA_PAYLOAD,
    STREAM_HIGH_WATER,
    Mux,
    MuxProtocolError,
    TunnelAddress,
)

SMALL_WINDOW = 4096


# -- fakes ----------------------------------------------------------------------

class Recorder(Protocol):
    """A protocol that records what its transport does to it."""

    def __init__(self):
        self.events = []
        self.chunks = []

    @property
    def received(self):
        return b"".join(self.chunks)

    @property
    def lost_reason(self):
        for event in self.events:
            if event[0] == "lost":
                return event[1]
        return None

    def connectionMade(self):
        self.events.append(("made",))

    def dataReceived(self, data):
        self.chunks.append(data)
        self.events.append(("data", data))

    def connectionLost(self, reason):
        self.events.append(("lost", reason.type))


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    """A recorder that takes half-close notifications."""

    def readConnectionLost(self):
        self.events.append(("read-closed",))

    def writeConnectionLost(self):
        self.events.append(("write-closed",))


@implementer(IPushProducer)
class FakeProducer:
    """A push producer that records pause/resume."""

    def __init__(self):
        self.events = []
        self.paused = False

    def pauseProducing(self):
        self.paused = True
        self.events.append("pause")

    def resumeProducing(self):
        self.paused = False
        self.events.append("resume")

    def stopProducing(self):
        self.events.append("stop")


class HalfCloseTransport(StringTransport):
    """A L{StringTransport} that also records C{loseWriteConnection}."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class MuxPair:
    """
    A client mux (initiator, odd ids) and a gateway mux (even ids) joined
    back to back.  Messages wait in a queue per direction until delivered, so
    tests control ordering; every message is also logged as a decoded frame.
    Both muxes read C{clock} (a L{Clock}), and record the peer's GOAWAYs.
    """

    def __init__(self, client_window=DEFAULT_WINDOW, gateway_window=DEFAULT_WINDOW,
                 max_window=DEFAULT_MAX_WINDOW, round_trip=None):
        self.clock = Clock()
        self.client_go_aways = []
        self.gateway_go_aways = []
        self.to_gateway = []
        self.to_client = []
        self.sent_by_client = []
        self.sent_by_gateway = []
        self.client_requests = []
        self.gateway_requests = []
        self.client_errors = []
        self.gateway_errors = []
        self.client = Mux(self._client_sends, initiator=True,
                          on_open_request=self.client_requests.append,
                          on_protocol_error=self.client_errors.append,
                          window=client_window, name="client", clock=self.clock,
                          on_go_away=self.client_go_aways.append, max_window=max_window,
                          round_trip=round_trip)
        self.gateway = Mux(self._gateway_sends, initiator=False,
                           on_open_request=self.gateway_requests.append,
                           on_protocol_error=self.gateway_errors.append,
                           window=gateway_window, name="gateway", clock=self.clock,
                           on_go_away=self.gateway_go_aways.append, max_window=max_window)

    def _client_sends(self, message):
        self.sent_by_client.append(frames.decode(message))
        self.to_gateway.append(message)

    def _gateway_sends(self, message):
        self.sent_by_gateway.append(frames.decode(message))
        self.to_client.append(message)

    def deliver_to_gateway(self):
        """Deliver the oldest message queued for the gateway."""
        self.gateway.message_received(self.to_gateway.pop(0))

    def deliver_to_client(self):
        """Deliver the oldest message queued for the client."""
        self.client.message_received(self.to_client.pop(0))

    def pump(self):
        """Deliver messages both ways, alternating, until both queues are empty."""
        for _ in range(100000):
            if not (self.to_gateway or self.to_client):
                return
            if self.to_gateway:
                self.deliver_to_gateway()
            if self.to_client:
                self.deliver_to_client()
        raise AssertionError("the muxes never went quiet")

    def open_unattached(self):
        """
        The gateway opens a stream and the client accepts it with a
        L{HalfCloseRecorder}; the opener has no protocol yet.

        @return: C{(the opener's Deferred, the acceptor stream)}.
        """
        d = self.gateway.open_stream("tcp", "h", 1)
        self.pump()
        acceptor = self.client_requests[-1]
        acceptor.accept(HalfCloseRecorder())
        return d, acceptor

    def open(self, opener_protocol=None, acceptor_protocol=None, kind="tcp",
             host="target.example", port=22):
        """
        The gateway opens a stream, the client accepts it, both get protocols.

        @return: C{(opener stream, opener protocol, acceptor stream,
            acceptor protocol)}.
        """
        d = self.gateway.open_stream(kind, host, port)
        self.pump()
        acceptor = self.client_requests.pop()
        acceptor_protocol = acceptor_protocol if acceptor_protocol is not None else Recorder()
        acceptor.accept(acceptor_protocol)
        self.pump()
        results = []
        d.addCallback(results.append)
        opener = results[0]
        opener_protocol = opener_protocol if opener_protocol is not None else Recorder()
        opener.attach(opener_protocol)
        return opener, opener_protocol, acceptor, acceptor_protocol


def of_type(sent, kind):
    """The frames of one type in a list of sent frames."""
    return [frame for frame in sent if type(frame) is kind]


def pattern(size, offset=0):
    """C{size} recognisable bytes (a counter), so order mistakes show."""
    return bytes((offset + i) % 251 for i in range(size))


# -- tests ----------------------------------------------------------------------

class OpenTests(SynchronousTestCase):
    """
    Opening a stream: OPEN, then OPEN_OK or OPEN_ERROR, or a cancel.
    """

    def test_open_ok(self):
        """OPEN reaches the peer's open hook, and OPEN_OK fires the Deferred with the Stream."""
        pair = MuxPair()
        d = pair.gateway.open_stream("tcp", "example.com", 443)
        self.assertNoResult(d)
        self.assertEqual(pair.sent_by_gateway, [frames.Open(2, "tcp", "example.com", 443, DEFAULT_WINDOW)])
        pair.pump()
        [request] = pair.client_requests
        self.assertEqual((request.stream_id, request.kind, request.host, request.port),
                         (2, "tcp", "example.com", 443))
        self.assertNoResult(d)
        protocol = Recorder()
        request.accept(protocol)
        self.assertEqual(pair.sent_by_client, [frames.OpenOk(2, DEFAULT_WINDOW)])
        self.assertEqual(protocol.events, [("made",)])
        pair.pump()
        stream = self.successResultOf(d)
        self.assertEqual(stream.stream_id, 2)
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (1, 1))
        self.assertEqual(pair.gateway.streams(), [stream])
        self.assertFalse(stream.closed)

    def test_streams_opened(self):
        """Each side counts the streams opened on the tunnel, either way; refused ones do not count."""
        pair = MuxPair()
        pair.open()
        pair.open()
        d = pair.gateway.open_stream("tcp", "example.com", 25)
        pair.pump()
        pair.client_requests[-1].reject(Reason.CONNECTION_REFUSED)
        pair.pump()
        self.failureResultOf(d, StreamOpenError)
        pair.client.open_stream("tcp", "h", 1)
        pair.pump()
        pair.gateway_requests[-1].accept(Recorder())
        pair.pump()
        self.assertEqual((pair.gateway.streams_opened, pair.client.streams_opened), (3, 3))

    def test_addresses(self):
        """A stream's peer is the target it was opened to, named after the tunnel."""
        pair = MuxPair()
        opener, _, acceptor, _ = pair.open(host="db.internal", port=5432)
        self.assertEqual(opener.getPeer(), TunnelAddress("db.internal", 5432, "gateway"))
        self.assertEqual(acceptor.getPeer(), TunnelAddress("db.internal", 5432, "client"))
        self.assertEqual(opener.getHost(), TunnelAddress("tunnel", opener.stream_id, "gateway"))

    def test_stream_id_parity(self):
        """The client opens odd stream ids and the gateway even ones, each increasing."""
        pair = MuxPair()
        for _ in range(3):
            pair.client.open_stream("tcp", "h", 1)
            pair.gateway.open_stream("udp", "h", 1)
        pair.pump()
        self.assertEqual([s.stream_id for s in pair.gateway_requests], [1, 3, 5])
        self.assertEqual([s.stream_id for s in pair.client_requests], [2, 4, 6])
        self.assertEqual([s.kind for s in pair.client_requests], ["udp"] * 3)
        self.assertEqual(pair.client_errors + pair.gateway_errors, [])

    def test_open_error(self):
        """OPEN_ERROR fails the Deferred with StreamOpenError carrying the reason and text."""
        pair = MuxPair()
        d = pair.gateway.open_stream("tcp", "example.com", 25)
        pair.pump()
        pair.client_requests[0].reject(Reason.CONNECTION_REFUSED, "connection refused by target")
        self.assertEqual(pair.sent_by_client,
                         [frames.OpenError(2, Reason.CONNECTION_REFUSED, "connection refused by target")])
        pair.pump()
        refused = self.failureResultOf(d, StreamOpenError)
        self.assertIs(refused.value.reason, Reason.CONNECTION_REFUSED)
        self.assertEqual(refused.value.detail, "connection refused by target")
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (0, 0))
        self.assertTrue(pair.client_requests[0].closed)

    def test_open_error_unknown_reason(self):
        """An unknown OPEN_ERROR reason code becomes GENERAL_FAILURE."""
        pair = MuxPair()
        d = pair.gateway.open_stream("tcp", "example.com", 25)
        pair.pump()
        pair.client_requests[0].reject(0xEE)
        pair.pump()
        self.assertIs(self.failureResultOf(d, StreamOpenError).value.reason, Reason.GENERAL_FAILURE)

    def test_no_open_hook(self):
        """A mux without an open hook rejects every OPEN with NOT_ALLOWED."""
        sent = []
        mux = Mux(sent.append, initiator=True)
        mux.message_received(frames.encode(frames.Open(2, "tcp", "h", 1, 100)))
        self.assertEqual([frames.decode(m) for m in sent],
                         [frames.OpenError(2, Reason.NOT_ALLOWED, "this side accepts no streams")])
        self.assertEqual(mux.stream_count, 0)

    def test_cancel_while_opening(self):
        """Cancelling a pending open sends RESET and runs the accept side's cancel hook."""
        pair = MuxPair()
        d = pair.gateway.open_stream("tcp", "slow.example", 80)
        pair.pump()
        [request] = pair.client_requests
        hook_calls = []
        request.set_cancel_hook(lambda: hook_calls.append("cancelled"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(pair.sent_by_gateway[-1], frames.Reset(2, Reason.GENERAL_FAILURE))
        self.assertEqual(pair.gateway.stream_count, 0)
        pair.pump()
        self.assertEqual(hook_calls, ["cancelled"])
        self.assertTrue(request.closed)
        self.assertEqual(pair.client.stream_count, 0)
        # A late reject (the dial failing because it was cancelled) sends nothing.
        request.reject(Reason.TIMED_OUT)
        self.assertEqual(pair.to_gateway, [])

    def test_cancel_crosses_open_ok(self):
        """An OPEN_OK that crosses the opener's RESET is ignored and the acceptor sees the reset."""
        pair = MuxPair()
        d = pair.gateway.open_stream("tcp", "example.com", 80)
        pair.pump()
        acceptor_protocol = Recorder()
        pair.client_requests[0].accept(acceptor_protocol)  # OPEN_OK in flight ...
        d.cancel()  # ... while RESET goes the other way
        self.failureResultOf(d, defer.CancelledError)
        pair.pump()
        self.assertEqual(pair.gateway_errors + pair.client_errors, [])
        self.assertIs(acceptor_protocol.lost_reason, error.ConnectionLost)
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (0, 0))

    def test_reset_while_opening(self):
        """A RESET answering an OPEN fails the open with StreamOpenError."""
        pair = MuxPair()
        d = pair.gateway.open_stream("tcp", "example.com", 80)
        pair.pump()
        pair.client_requests[0].reset(Reason.OVERLOADED)
        pair.pump()
        self.failureResultOf(d, StreamOpenError)
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (0, 0))

    def test_open_after_connection_lost(self):
        """Opening on a lost tunnel fails at once with NO_TUNNEL."""
        pair = MuxPair()
        pair.gateway.connection_lost()
        d = pair.gateway.open_stream("tcp", "example.com", 80)
        self.assertIs(self.failureResultOf(d, StreamOpenError).value.reason, Reason.NO_TUNNEL)
        self.assertEqual(pair.to_client, [])


class DataTests(SynchronousTestCase):
    """
    DATA frames carry stream bytes both ways, in order.
    """

    def test_both_ways_in_order(self):
        """Writes on either side arrive at the other side's protocol in order."""
        pair = MuxPair()
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open()
        opener.write(b"GET / HTTP/1.1\r\n")
        opener.writeSequence([b"Host: x\r\n", b"\r\n"])
        acceptor.write(b"HTTP/1.1 200 OK\r\n")
        opener.write(b"more")
        pair.pump()
        self.assertEqual(acceptor_protocol.received, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nmore")
        self.assertEqual(opener_protocol.received, b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(pair.client_errors + pair.gateway_errors, [])

    def test_empty_write(self):
        """Writing no bytes sends no frame."""
        pair = MuxPair()
        opener, _, _, _ = pair.open()
        opener.write(b"")
        self.assertEqual(pair.to_client, [])

    def test_large_write_split(self):
        """A large write goes out as DATA frames of at most MAX_DATA_PAYLOAD bytes."""
        pair = MuxPair()
        opener, _, _, acceptor_protocol = pair.open()
        data = pattern(2 * MAX_DATA_PAYLOAD + 1000)
        opener.write(data)
        sizes = [len(f.payload) for f in of_type(pair.sent_by_gateway, frames.Data)]
        self.assertEqual(sizes, [MAX_DATA_PAYLOAD, MAX_DATA_PAYLOAD, 1000])
        pair.pump()
        self.assertEqual(acceptor_protocol.received, data)

    def test_data_before_attach(self):
        """DATA that arrives before the opener attaches a protocol is delivered on attach, then credited."""
        pair = MuxPair(gateway_window=SMALL_WINDOW)
        d = pair.gateway.open_stream("tcp", "ssh.example", 22)
        pair.pump()
        acceptor = pair.client_requests[0]
        acceptor.accept(Recorder())
        data = pattern(3 * SMALL_WINDOW)
        acceptor.write(data)  # a server banner larger than the window
        pair.pump()
        opener = self.successResultOf(d)
        protocol = Recorder()
        opener.attach(protocol)
        pair.pump()
        self.assertEqual(protocol.received, data)
        self.assertEqual(protocol.events[0], ("made",))
        self.assertEqual(pair.client_errors + pair.gateway_errors, [])


class DatagramRecorder(Recorder):
    """A udp stream's protocol: records the datagrams it is given."""

    def __init__(self):
        super().__init__()
        self.datagrams = []

    def datagram_received(self, host, port, payload):
        self.datagrams.append((host, port, payload))


class DatagramTests(SynchronousTestCase):
    """
    DATAGRAM frames on udp streams: delivered as they are, counted in the
    stream's records like DATA.
    """

    def test_both_ways_and_records(self):
        """Datagrams arrive with their address; bytes and last activity are recorded."""
        pair = MuxPair()
        pair.clock.advance(1000)
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
            DatagramRecorder(), DatagramRecorder(), kind="udp")
        pair.clock.advance(5)
        self.assertTrue(opener.send_datagram("10.0.0.1", 53, b"query"))
        pair.pump()
        pair.clock.advance(2)
        self.assertTrue(acceptor.send_datagram("10.0.0.1", 53, b"answer!"))
        pair.pump()
        self.assertEqual(acceptor_protocol.datagrams, [("10.0.0.1", 53, b"query")])
        self.assertEqual(opener_protocol.datagrams, [("10.0.0.1", 53, b"answer!")])
        self.assertEqual((opener.bytes_sent, opener.bytes_received, opener.last_active),
                         (5, 7, 1007.0))
        self.assertEqual((acceptor.bytes_sent, acceptor.bytes_received), (7, 5))
        self.assertEqual((pair.gateway.bytes_sent, pair.client.bytes_sent), (5, 7))

    def test_dropped_while_congested(self):
        """While the tunnel is paused a datagram is dropped, counted, not recorded as sent."""
        pair = MuxPair()
        opener, _, _, _ = pair.open(DatagramRecorder(), DatagramRecorder(), kind="udp")
        pair.gateway.pauseProducing()
        self.assertFalse(opener.send_datagram("h", 1, b"x"))
        self.assertEqual((pair.gateway.datagrams_dropped, opener.bytes_sent), (1, 0))


class FlowControlTests(SynchronousTestCase):
    """
    Credit windows: a sender never has more than one window unacknowledged.
    """

    def test_paused_receiver_grants_no_credit(self):
        """A receiver whose consumer paused it grants no credit, so the sender stops at one window."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, acceptor, acceptor_protocol = pair.open()
        producer = FakeProducer()
        opener.registerProducer(producer, True)
        acceptor.pauseProducing()
        data = pattern(SMALL_WINDOW + STREAM_HIGH_WATER)
        opener.write(data)
        pair.pump()
        self.assertEqual(len(acceptor_protocol.received), SMALL_WINDOW)
        self.assertEqual(of_type(pair.sent_by_client, frames.Credit), [])
        self.assertEqual(producer.events, ["pause"])
        # The consumer drains: credit flows again, and the producer resumes.
        acceptor.resumeProducing()
        self.assertEqual(of_type(pair.sent_by_client, frames.Credit),
                         [frames.Credit(opener.stream_id, SMALL_WINDOW)])
        pair.pump()
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(acceptor_protocol.received, data)
        self.assertEqual(pair.client_errors + pair.gateway_errors, [])

    def test_resume_without_pause_sends_nothing(self):
        """resumeProducing on a stream that was not paused sends no CREDIT (a pooled HTTP
        connection is resumed after every exchange)."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, acceptor, acceptor_protocol = pair.open()
        opener.write(b"small")
        pair.pump()
        acceptor.resumeProducing()
        pair.pump()
        self.assertEqual(acceptor_protocol.received, b"small")
        self.assertEqual(of_type(pair.sent_by_client, frames.Credit), [])

    def test_exactly_one_window_in_flight(self):
        """Without credit the sender sends exactly one window of DATA and queues the rest."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, acceptor, _ = pair.open()
        acceptor.pauseProducing()
        opener.write(pattern(SMALL_WINDOW - 1))
        opener.write(pattern(10))
        sent = sum(len(f.payload) for f in of_type(pair.sent_by_gateway, frames.Data))
        self.assertEqual(sent, SMALL_WINDOW)
        sizes = [len(f.payload) for f in of_type(pair.sent_by_gateway, frames.Data)]
        self.assertEqual(sizes, [SMALL_WINDOW - 1, 1])

    def test_producer_paused_above_high_water(self):
        """The registered producer is paused only once queued bytes reach STREAM_HIGH_WATER."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, acceptor, _ = pair.open()
        acceptor.pauseProducing()
        producer = FakeProducer()
        opener.registerProducer(producer, True)
        opener.write(pattern(SMALL_WINDOW + STREAM_HIGH_WATER - 1))
        self.assertEqual(producer.events, [])
        opener.write(b"x")
        self.assertEqual(producer.events, ["pause"])

    def test_credit_batching(self):
        """The receiver sends one CREDIT per quarter window consumed, not one per DATA frame."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, _, _ = pair.open()
        quarter = SMALL_WINDOW // CREDIT_FRACTION
        for _ in range(quarter - 1):
            opener.write(b"x")
        pair.pump()
        self.assertEqual(of_type(pair.sent_by_client, frames.Credit), [])
        opener.write(b"x")
        pair.pump()
        self.assertEqual(of_type(pair.sent_by_client, frames.Credit),
                         [frames.Credit(opener.stream_id, quarter)])
        for _ in range(8):
            opener.write(pattern(quarter // 2))
            pair.pump()
        self.assertEqual(of_type(pair.sent_by_client, frames.Credit),
                         [frames.Credit(opener.stream_id, quarter)] * 5)

    def test_credit_counts_only_data(self):
        """Only DATA payload bytes use the window: FIN and a full-window write still fit."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, acceptor, acceptor_protocol = pair.open()
        acceptor.pauseProducing()
        opener.write(pattern(SMALL_WINDOW))
        opener.loseWriteConnection()
        self.assertEqual(type(pair.sent_by_gateway[-1]), frames.Fin)
        pair.pump()
        self.assertEqual(len(acceptor_protocol.received), SMALL_WINDOW)

    def test_window_overrun(self):
        """A peer that sends more than the window is a protocol error."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, _, _ = pair.open()
        pair.to_client.append(frames.encode(frames.Data(opener.stream_id, b"x" * (SMALL_WINDOW + 1))))
        pair.pump()
        [exc] = pair.client_errors
        self.assertIsInstance(exc, MuxProtocolError)

    def test_window_overrun_cumulative(self):
        """The window is counted across frames, not per frame."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, acceptor, _ = pair.open()
        acceptor.pauseProducing()
        opener.write(pattern(SMALL_WINDOW))
        pair.to_client.append(frames.encode(frames.Data(opener.stream_id, b"x")))
        pair.pump()
        self.assertEqual(len(pair.client_errors), 1)

    def test_credit_overflow(self):
        """Credit that pushes a window past 2**31 - 1 is a protocol error."""
        pair = MuxPair()
        opener, _, acceptor, _ = pair.open()
        pair.to_gateway.append(frames.encode(frames.Credit(opener.stream_id, 0x7FFFFFFF)))
        pair.pump()
        [exc] = pair.gateway_errors
        self.assertIsInstance(exc, MuxProtocolError)

    def test_different_windows(self):
        """Each side's sender is bound by the window its peer advertised."""
        pair = MuxPair(client_window=SMALL_WINDOW, gateway_window=2 * SMALL_WINDOW)
        opener, _, acceptor, _ = pair.open()
        self.assertEqual(pair.sent_by_gateway[0].window, SMALL_WINDOW * 2)
        self.assertEqual(pair.sent_by_client[0].window, SMALL_WINDOW)
        opener.pauseProducing()
        acceptor.pauseProducing()
        opener.write(pattern(10 * SMALL_WINDOW))
        acceptor.write(pattern(10 * SMALL_WINDOW))
        pair.pump()
        self.assertEqual(sum(len(f.payload) for f in of_type(pair.sent_by_gateway, frames.Data)),
                         SMALL_WINDOW)
        self.assertEqual(sum(len(f.payload) for f in of_type(pair.sent_by_client, frames.Data)),
                         2 * SMALL_WINDOW)

    def test_stalled_stream_does_not_block_others(self):
        """A stream whose receiver is stalled does not slow another stream on the same tunnel."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        stalled, _, stalled_acceptor, _ = pair.open()
        busy, _, _, busy_protocol = pair.open()
        stalled_acceptor.pauseProducing()
        stalled.write(pattern(5 * SMALL_WINDOW))
        data = pattern(20 * SMALL_WINDOW)
        for offset in range(0, len(data), 1000):
            busy.write(data[offset:offset + 1000])
            pair.pump()
        self.assertEqual(busy_protocol.received, data)


class WindowTuningTests(SynchronousTestCase):
    """
    Receive-window auto-tuning: over a path with delay, a window doubles each
    credit round trip in which the sender waited for credit while the reader
    kept up, up to the bound; a paused reader never grows it.  The gateway
    sends, the client receives; messages cross in C{ONE_WAY} seconds of the
    pair's clock.
    """

    WINDOW = 64 * 1024
    ONE_WAY = 0.025

    def make(self, bound=4 * WINDOW):
        self.pair = pair = MuxPair(client_window=self.WINDOW, max_window=bound)
        self.sender, _, self.receiver, self.received = pair.open()
        return pair

    def round_trip(self):
        """
        Data in flight reaches the receiver after ONE_WAY, the credit it
        grants reaches the sender ONE_WAY later (which sends at once).

        @return: DATA payload bytes the receiver got in this round trip.
        """
        pair = self.pair
        before = len(self.received.received)
        pair.clock.advance(self.ONE_WAY)
        while pair.to_client:
            pair.deliver_to_client()
        pair.clock.advance(self.ONE_WAY)
        while pair.to_gateway:
            pair.deliver_to_gateway()
        return len(self.received.received) - before

    @staticmethod
    def data(size):
        """pattern(size), built fast: these tests move megabytes."""
        return (pattern(251) * (size // 251 + 1))[:size]

    def credits(self):
        return sum(f.increment for f in of_type(self.pair.sent_by_client, frames.Credit))

    def test_grows_while_reader_keeps_up(self):
        """A sender held back by the window: it doubles every round trip, then stops at the bound."""
        self.make(bound=8 * self.WINDOW)
        data = self.data(64 * self.WINDOW)
        self.sender.write(data)
        windows, per_trip = [], []
        for _ in range(8):
            per_trip.append(self.round_trip())
            windows.append(self.receiver.receive_window)
        w = self.WINDOW
        # The first round trip only times the credit; from the second on, each one doubles.
        self.assertEqual(windows, [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w, 8 * w, 8 * w])
        # What arrives per round trip is the window the sender had: the throughput follows it.
        self.assertEqual(per_trip, [w, w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w, 8 * w])
        for _ in range(30):
            self.round_trip()
        self.assertEqual(self.received.received, data)
        # The sender never had more than the bound unacknowledged.
        self.assertLessEqual(len(data) - self.credits(), 8 * w)
        self.assertEqual(self.pair.client_errors + self.pair.gateway_errors, [])

    def paced(self, bandwidth, seconds):
        """
        Run the pair over a link of C{bandwidth} bytes/s each way and ONE_WAY
        of delay, with a queue in front of it: a message leaves once the link
        has sent the ones before it, and arrives ONE_WAY later.  Runs
        C{seconds} of the clock; returns C{(time, bytes received)} per message.
        """
        pair, clock = self.pair, self.pair.clock
        pending = []  # (arrival, order, deliver, message)
        free = {"to_client": 0.0, "to_gateway": 0.0}
        order = itertools.count()

        def schedule():
            for queue, deliver in (("to_client", pair.client.message_received),
                                   ("to_gateway", pair.gateway.message_received)):
                messages = getattr(pair, queue)
                while messages:
                    message = messages.pop(0)
                    free[queue] = max(clock.seconds(), free[queue]) + len(message) / bandwidth
                    pending.append((free[queue] + self.ONE_WAY, next(order), deliver, message))
        schedule()
        end = clock.seconds() + seconds
        received = []
        while pending:
            pending.sort(key=lambda item: item[:2])
            arrival, _, deliver, message = pending.pop(0)
            if arrival > end:
                break
            clock.advance(arrival - clock.seconds())
            deliver(message)
            received.append((clock.seconds(), len(self.received.received)))
            schedule()
        return received

    def test_growth_stops_where_the_path_sets_the_pace(self):
        """
        Over a link of 6 windows of bandwidth x delay with a queue in front, the
        window grows until the link is full, then stops short of its bound:
        more would only fill the queue (the round trip stretches with it), and
        the measured rate no longer rises.  (It overshoots by a doubling or
        two while the queue fills: the rate lags the window.)
        """
        self.make(bound=256 * self.WINDOW)
        bandwidth = 6 * self.WINDOW / (2 * self.ONE_WAY)
        self.sender.write(self.data(int(bandwidth * 6)))
        received = self.paced(bandwidth, 5.0)
        start = received[-1][0] - 2.0
        before = [total for at, total in received if at <= start][-1]
        rate = (received[-1][1] - before) / (received[-1][0] - start)
        self.assertGreaterEqual(rate, 0.9 * bandwidth)
        self.assertLess(self.receiver.receive_window, 256 * self.WINDOW)
        self.assertEqual(self.pair.client_errors + self.pair.gateway_errors, [])

    def test_bound_is_the_mux_window(self):
        """max_window equal to the window turns auto-tuning off."""
        self.make(bound=self.WINDOW)
        self.sender.write(self.data(16 * self.WINDOW))
        self.assertEqual([self.round_trip() for _ in range(4)], [self.WINDOW] * 4)
        self.assertEqual(self.receiver.receive_window, self.WINDOW)

    def test_no_growth_without_delay(self):
        """Credit that comes back at once (no time passes) never starves the sender: no growth."""
        pair = self.make()
        data = self.data(16 * self.WINDOW)
        self.sender.write(data)
        pair.pump()
        self.assertEqual(self.received.received, data)
        self.assertEqual(self.receiver.receive_window, self.WINDOW)

    def test_no_growth_when_sender_is_the_limit(self):
        """A sender that writes less than a window per round trip is not held back: no growth."""
        self.make()
        size = self.WINDOW // 2 - 1000  # what a socket read gives: not cut at the credit's edge
        for _ in range(10):
            self.sender.write(self.data(size))
            self.assertEqual(self.round_trip(), size)
        self.assertEqual(self.receiver.receive_window, self.WINDOW)

    def paused_round_trips(self, count, paused):
        """Round trips in which the reader's socket is full after every frame for C{paused} s."""
        pair = self.pair
        for _ in range(count):
            pair.clock.advance(self.ONE_WAY)
            while pair.to_client:
                pair.deliver_to_client()
                self.receiver.pauseProducing()  # the local socket is full after every frame
            pair.clock.advance(paused)
            self.receiver.resumeProducing()
            pair.clock.advance(self.ONE_WAY - paused)
            while pair.to_gateway:
                pair.deliver_to_gateway()

    def test_no_growth_while_paused(self):
        """A reader paused for a real part of each round trip gets no growth, and costs one window."""
        self.make()
        self.sender.write(self.data(64 * self.WINDOW))
        self.paused_round_trips(5, paused=self.ONE_WAY)
        self.assertEqual(self.receiver.receive_window, self.WINDOW)
        # Stalled for good: the sender stops after what it may still send, one window at most.
        self.receiver.pauseProducing()
        before = len(self.received.received)
        for _ in range(5):
            self.round_trip()
        self.assertLessEqual(len(self.received.received) - before, self.WINDOW)
        self.assertEqual(self.receiver.receive_window, self.WINDOW)

    def test_brief_pauses_still_grow(self):
        """
        A socket full for a moment after each burst (a tenth of the round trip)
        is a reader that keeps up: the window still grows.
        """
        self.make()
        self.sender.write(self.data(64 * self.WINDOW))
        self.paused_round_trips(5, paused=self.ONE_WAY / 5)
        self.assertGreater(self.receiver.receive_window, self.WINDOW)

    def test_stalled_reader_costs_the_current_window(self):
        """After growing, a reader that stalls pins the window it has now, never the bound."""
        self.make(bound=64 * self.WINDOW)
        self.sender.write(self.data(256 * self.WINDOW))
        for _ in range(3):
            self.round_trip()
        current = self.receiver.receive_window
        self.assertEqual(current, 4 * self.WINDOW)
        self.receiver.pauseProducing()
        before = len(self.received.received)
        for _ in range(10):
            self.round_trip()
        self.assertEqual(self.receiver.receive_window, current)
        stalled = len(self.received.received) - before
        self.assertLessEqual(stalled, current)
        self.assertGreater(stalled, current // 2)  # it did take a window's worth while stalled
        # Reading again: the stream carries on, and grows again while the reader keeps up.
        self.receiver.resumeProducing()
        for _ in range(3):
            self.round_trip()
        self.assertGreater(self.receiver.receive_window, current)
        self.assertEqual(self.pair.client_errors + self.pair.gateway_errors, [])


class CloseRequestedCreditTests(SynchronousTestCase):
    """A stream closing (its FIN waiting behind queued data) still credits the peer, in batches."""

    def test_tiny_frames_get_no_credit_each(self):
        pair = MuxPair()
        opener, _, acceptor, _ = pair.open()
        acceptor._send_window = 0  # the peer gives no credit: our FIN waits behind the data
        acceptor.write(b"queued")
        acceptor.loseConnection()
        pair.pump()
        before = len(of_type(pair.sent_by_client, frames.Credit))
        for _ in range(1000):
            pair.gateway.send_data(opener.stream_id, b"x")
        pair.pump()
        self.assertEqual(len(of_type(pair.sent_by_client, frames.Credit)), before)
        # A window's worth still gets credit: the sender is never stuck.
        pair.gateway.send_data(opener.stream_id, b"y" * (DEFAULT_WINDOW // 2))
        pair.pump()
        self.assertGreater(len(of_type(pair.sent_by_client, frames.Credit)), before)
        self.assertEqual((pair.client_errors, pair.gateway_errors), ([], []))


class ProtocolErrorTests(SynchronousTestCase):
    """
    A peer that breaks the protocol is reported to the owner, who closes the tunnel.
    """

    def test_frame_error(self):
        """An undecodable message is reported as a FrameError."""
        pair = MuxPair()
        pair.gateway.message_received(b"\x04\x00")
        [exc] = pair.gateway_errors
        self.assertIsInstance(exc, frames.FrameError)

    def test_no_callback_raises(self):
        """Without an error callback the error propagates to the caller."""
        mux = Mux(lambda message: None, initiator=False)
        self.assertRaises(frames.FrameError, mux.message_received, b"\xff\x00\x00\x00\x00")

    def test_data_after_fin(self):
        """DATA after the peer's FIN on the same stream is a protocol error."""
        pair = MuxPair()
        opener, _, acceptor, _ = pair.open(acceptor_protocol=HalfCloseRecorder())
        opener.loseWriteConnection()
        pair.pump()
        pair.to_client.append(frames.encode(frames.Data(opener.stream_id, b"late")))
        pair.pump()
        self.assertEqual(len(pair.client_errors), 1)

    def test_wrong_parity(self):
        """An OPEN with this side's own parity is a protocol error."""
        pair = MuxPair()
        pair.to_client.append(frames.encode(frames.Open(1, "tcp", "h", 1, 100)))
        pair.to_gateway.append(frames.encode(frames.Open(2, "tcp", "h", 1, 100)))
        pair.pump()
        self.assertEqual(len(pair.client_errors), 1)
        self.assertEqual(len(pair.gateway_errors), 1)
        self.assertEqual(pair.client_requests + pair.gateway_requests, [])

    def test_stream_zero(self):
        """An OPEN on stream 0 (the session) is a protocol error."""
        pair = MuxPair()
        pair.to_client.append(frames.encode(frames.Open(0, "tcp", "h", 1, 100)))
        pair.pump()
        self.assertEqual(len(pair.client_errors), 1)

    def test_reused_id(self):
        """An OPEN reusing a stream id, even of a finished stream, is a protocol error."""
        pair = MuxPair()
        d = pair.gateway.open_stream("tcp", "h", 1)
        pair.pump()
        pair.client_requests[0].reject(Reason.NOT_ALLOWED)
        pair.pump()
        self.failureResultOf(d, StreamOpenError)
        pair.to_client.append(frames.encode(frames.Open(2, "tcp", "h", 1, 100)))
        pair.pump()
        self.assertEqual(len(pair.client_errors), 1)
        self.assertEqual(len(pair.client_requests), 1)

    def test_decreasing_id(self):
        """An OPEN whose id is lower than an earlier one is a protocol error."""
        pair = MuxPair()
        pair.to_client.append(frames.encode(frames.Open(6, "tcp", "h", 1, 100)))
        pair.to_client.append(frames.encode(frames.Open(4, "tcp", "h", 1, 100)))
        pair.pump()
        self.assertEqual(len(pair.client_errors), 1)
        self.assertEqual([s.stream_id for s in pair.client_requests], [6])

    def test_hello(self):
        """A HELLO goes to the hello hook."""
        infos = []
        sent = []
        mux = Mux(sent.append, initiator=False, on_hello=infos.append)
        mux.message_received(frames.encode(frames.Hello({"version": 1})))
        self.assertEqual(infos, [{"version": 1}])
        mux.send_hello({"version": 1, "software": "x"})
        self.assertEqual(frames.decode(sent[0]), frames.Hello(
            {"version": 1, "software": "x", frames.HELLO_DATAGRAMS: True,
             frames.HELLO_DIALED: True, frames.HELLO_EARLY_DATA: EARLY_DATA}))  # the mux's own keys


class HalfCloseTests(SynchronousTestCase):
    """
    FIN is a half-close; a stream is finished once both sides sent FIN.
    """

    def test_fin_both_ways(self):
        """Each FIN is a readConnectionLost on the other side; both FINs close both ends with ConnectionDone."""
        pair = MuxPair()
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
            HalfCloseRecorder(), HalfCloseRecorder())
        opener.write(b"request")
        opener.loseWriteConnection()
        self.assertEqual(opener_protocol.events[-1], ("write-closed",))
        pair.pump()
        self.assertEqual(acceptor_protocol.events[-2:], [("data", b"request"), ("read-closed",)])
        # The other direction is still open.
        acceptor.write(b"response")
        pair.pump()
        self.assertEqual(opener_protocol.received, b"response")
        self.assertFalse(opener.closed)
        acceptor.loseWriteConnection()
        self.assertEqual(acceptor_protocol.events[-2:], [("write-closed",), ("lost", error.ConnectionDone)])
        pair.pump()
        self.assertEqual(opener_protocol.events[-1], ("lost", error.ConnectionDone))
        self.assertEqual(opener_protocol.events.count(("read-closed",)), 0)
        self.assertTrue(opener.closed and acceptor.closed)
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (0, 0))

    def test_fin_to_plain_protocol(self):
        """A protocol without half-close support answers FIN by closing, which sends FIN back."""
        pair = MuxPair()
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open(HalfCloseRecorder(), Recorder())
        opener.loseWriteConnection()
        pair.pump()
        self.assertEqual(acceptor_protocol.events[-1], ("lost", error.ConnectionDone))
        self.assertEqual(opener_protocol.events[-1], ("lost", error.ConnectionDone))
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (0, 0))

    def test_fin_waits_for_queued_data(self):
        """FIN follows queued DATA that is still waiting for credit."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, acceptor, acceptor_protocol = pair.open(HalfCloseRecorder(), HalfCloseRecorder())
        acceptor.pauseProducing()
        data = pattern(3 * SMALL_WINDOW)
        opener.write(data)
        opener.loseWriteConnection()
        opener.write(b"ignored after half-close")
        pair.pump()
        self.assertNotIn(("read-closed",), acceptor_protocol.events)
        acceptor.resumeProducing()
        pair.pump()
        acceptor.resumeProducing()
        pair.pump()
        self.assertEqual(acceptor_protocol.received, data)
        self.assertEqual(acceptor_protocol.events[-1], ("read-closed",))

    def test_fin_before_attach(self):
        """A FIN that arrives before the opener attaches its protocol is delivered after the data."""
        pair = MuxPair()
        d, acceptor = pair.open_unattached()
        acceptor.write(b"banner")
        acceptor.loseWriteConnection()
        pair.pump()
        protocol = HalfCloseRecorder()
        self.successResultOf(d).attach(protocol)
        self.assertEqual(protocol.events, [("made",), ("data", b"banner"), ("read-closed",)])

    def test_finished_before_attach(self):
        """A stream that finishes before its protocol is attached hands over its data, then its end."""
        pair = MuxPair()
        d, acceptor = pair.open_unattached()
        pair.pump()
        opener = self.successResultOf(d)
        opener.loseWriteConnection()
        acceptor.write(b"last words")
        acceptor.loseWriteConnection()
        pair.pump()
        self.assertTrue(opener.closed)
        protocol = HalfCloseRecorder()
        opener.attach(protocol)
        self.assertEqual(protocol.events, [("made",), ("data", b"last words"),
                                           ("lost", error.ConnectionDone)])

    def test_lose_connection_flushes_then_fin(self):
        """loseConnection sends every queued byte, then FIN, then forgets the stream."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
            Recorder(), HalfCloseRecorder())
        data = pattern(5 * SMALL_WINDOW)
        opener.write(data)
        opener.loseConnection()
        self.assertTrue(opener.disconnecting)
        self.assertFalse(opener.closed)
        opener.write(b"ignored")
        pair.pump()
        self.assertEqual(acceptor_protocol.received, data)
        self.assertEqual(acceptor_protocol.events[-1], ("read-closed",))
        self.assertEqual(type(pair.sent_by_gateway[-1]), frames.Fin)
        self.assertEqual(opener_protocol.events[-1], ("lost", error.ConnectionDone))
        self.assertEqual(pair.gateway.stream_count, 0)

    def test_data_after_lose_connection_reset(self):
        """DATA that arrives after a full close was sent is answered with one RESET."""
        pair = MuxPair()
        opener, _, acceptor, acceptor_protocol = pair.open(Recorder(), HalfCloseRecorder())
        opener.loseConnection()
        acceptor.write(b"still talking")  # crosses the FIN
        acceptor.write(b"and more")
        pair.pump()
        self.assertEqual(of_type(pair.sent_by_gateway, frames.Reset),
                         [frames.Reset(opener.stream_id, Reason.GENERAL_FAILURE)])
        self.assertIs(acceptor_protocol.lost_reason, error.ConnectionLost)
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (0, 0))

    def test_lose_connection_after_fin_sent(self):
        """loseConnection after the FIN already went out finishes the stream at once."""
        pair = MuxPair()
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
            HalfCloseRecorder(), HalfCloseRecorder())
        opener.loseWriteConnection()
        pair.pump()
        opener.loseConnection()
        self.assertEqual(opener_protocol.events[-1], ("lost", error.ConnectionDone))
        self.assertEqual(pair.gateway.stream_count, 0)
        # The peer, still writing, learns the stream is gone.
        acceptor.write(b"nobody reads this")
        pair.pump()
        self.assertIs(acceptor_protocol.lost_reason, error.ConnectionLost)
        self.assertEqual(pair.client.stream_count, 0)

    def test_stop_producing_closes(self):
        """stopProducing on a stream closes it like loseConnection."""
        pair = MuxPair()
        opener, opener_protocol, _, _ = pair.open()
        opener.stopProducing()
        self.assertEqual(opener_protocol.events[-1], ("lost", error.ConnectionDone))


class ResetTests(SynchronousTestCase):
    """
    RESET aborts a stream at once, and answers DATA for streams that do not exist.
    """

    def test_reset_by_peer(self):
        """A RESET from the peer ends the stream with ConnectionLost and drops queued data."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open()
        acceptor.pauseProducing()
        opener.write(pattern(3 * SMALL_WINDOW))
        pair.pump()
        acceptor.reset(Reason.GENERAL_FAILURE)
        self.assertIs(acceptor_protocol.lost_reason, error.ConnectionLost)
        pair.pump()
        self.assertIs(opener_protocol.lost_reason, error.ConnectionLost)
        self.assertEqual(len(of_type(pair.sent_by_gateway, frames.Data)), 1)
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (0, 0))
        # Nothing further happens on either side.
        opener.write(b"x")
        self.assertEqual(pair.to_client, [])

    def test_an_error_in_a_protocol_ends_only_its_stream(self):
        """
        A stream's protocol raising while handling DATA, FIN or a datagram
        resets that stream (logged); the tunnel and its other streams go on.
        """
        class Raising(HalfCloseRecorder):
            def dataReceived(self, data):
                raise ValueError("broken protocol")

            def readConnectionLost(self):
                raise ValueError("broken protocol")

            def datagram_received(self, host, port, payload):
                raise ValueError("broken protocol")

        pair = MuxPair()
        _, _, healthy, healthy_protocol = pair.open()
        for send in (lambda opener: opener.write(b"x"), lambda opener: opener.loseWriteConnection()):
            opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
                acceptor_protocol=Raising())
            send(opener)
            pair.pump()
            self.assertIs(acceptor_protocol.lost_reason, error.ConnectionLost)
            self.assertIs(opener_protocol.lost_reason, error.ConnectionLost)
            self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
            DatagramRecorder(), Raising(), kind="udp")
        opener.send_datagram("10.0.0.1", 53, b"query")
        pair.pump()
        self.assertIs(opener_protocol.lost_reason, error.ConnectionLost)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual((pair.client_errors, pair.gateway_errors), ([], []))
        healthy.write(b"still here")
        pair.pump()
        self.assertEqual(pair.gateway.streams()[0].protocol.received, b"still here")

    def test_an_error_in_the_open_handler_ends_only_its_stream(self):
        """The side answering OPENs raising: that stream is reset, the tunnel goes on."""
        pair = MuxPair()

        def broken(stream):
            raise OSError("bad zone in an IPv6 literal")

        pair.client.on_open_request = broken
        d = pair.gateway.open_stream("tcp", "fe80::1%zzz", 22)
        pair.pump()
        self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason,
                         Reason.GENERAL_FAILURE)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual((pair.client_errors, pair.client.stream_count), ([], 0))

    def test_reset_reason_on_wire(self):
        """reset() sends the reason code given."""
        pair = MuxPair()
        opener, _, _, _ = pair.open()
        opener.reset(Reason.TIMED_OUT)
        self.assertEqual(pair.sent_by_gateway[-1], frames.Reset(opener.stream_id, Reason.TIMED_OUT))

    def test_abort_connection(self):
        """abortConnection resets the stream with GENERAL_FAILURE."""
        pair = MuxPair()
        opener, opener_protocol, _, acceptor_protocol = pair.open()
        opener.abortConnection()
        self.assertEqual(pair.sent_by_gateway[-1], frames.Reset(opener.stream_id, Reason.GENERAL_FAILURE))
        self.assertIs(opener_protocol.lost_reason, error.ConnectionLost)
        pair.pump()
        self.assertIs(acceptor_protocol.lost_reason, error.ConnectionLost)

    def test_data_for_unknown_stream(self):
        """DATA for a stream that never existed is answered with exactly one RESET."""
        pair = MuxPair()
        for _ in range(3):
            pair.to_gateway.append(frames.encode(frames.Data(99, b"?")))
        pair.pump()
        self.assertEqual(pair.sent_by_gateway, [frames.Reset(99, Reason.GENERAL_FAILURE)])
        self.assertEqual(pair.gateway_errors, [])

    def test_other_frames_for_unknown_stream(self):
        """CREDIT, FIN, RESET, OPEN_OK and OPEN_ERROR for unknown streams are ignored."""
        pair = MuxPair()
        for frame in (frames.Credit(9, 10), frames.Fin(9), frames.Reset(9, 1),
                      frames.OpenOk(9, 100), frames.OpenError(9, 1), frames.GoAway(0)):
            pair.to_gateway.append(frames.encode(frame))
        pair.pump()
        self.assertEqual(pair.sent_by_gateway, [])
        self.assertEqual(pair.gateway_errors, [])


class MuxProducerTests(SynchronousTestCase):
    """
    The mux is the WebSocket transport's producer: pausing it pauses every stream.
    """

    def test_pause_and_resume_every_stream(self):
        """Mux.pauseProducing pauses every stream's producer, and resumeProducing resumes them."""
        pair = MuxPair()
        producers = []
        for _ in range(3):
            opener, _, _, _ = pair.open()
            producer = FakeProducer()
            opener.registerProducer(producer, True)
            producers.append(producer)
        pair.gateway.pauseProducing()
        self.assertEqual([p.events for p in producers], [["pause"]] * 3)
        pair.gateway.resumeProducing()
        self.assertEqual([p.events for p in producers], [["pause", "resume"]] * 3)

    def test_register_while_paused(self):
        """A producer registered while the mux is paused is paused at once."""
        pair = MuxPair()
        opener, _, _, _ = pair.open()
        pair.gateway.pauseProducing()
        producer = FakeProducer()
        opener.registerProducer(producer, True)
        self.assertEqual(producer.events, ["pause"])

    def test_stays_paused_above_high_water(self):
        """A stream still above its high-water mark stays paused when the mux resumes."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, acceptor, _ = pair.open()
        acceptor.pauseProducing()
        producer = FakeProducer()
        opener.registerProducer(producer, True)
        opener.write(pattern(SMALL_WINDOW + STREAM_HIGH_WATER))
        pair.gateway.pauseProducing()
        pair.gateway.resumeProducing()
        self.assertEqual(producer.events, ["pause"])

    def test_non_streaming_producer_refused(self):
        """Streams take only push producers."""
        pair = MuxPair()
        opener, _, _, _ = pair.open()
        self.assertRaises(ValueError, opener.registerProducer, FakeProducer(), False)

    def test_unregister(self):
        """After unregisterProducer the producer hears nothing more."""
        pair = MuxPair()
        opener, _, _, _ = pair.open()
        producer = FakeProducer()
        opener.registerProducer(producer, True)
        opener.unregisterProducer()
        pair.gateway.pauseProducing()
        self.assertEqual(producer.events, [])

    def test_stop_producing(self):
        """stopProducing on the mux loses the tunnel."""
        pair = MuxPair()
        _, opener_protocol, _, _ = pair.open()
        pair.gateway.stopProducing()
        self.assertIs(opener_protocol.lost_reason, error.ConnectionLost)


class ConnectionLostTests(SynchronousTestCase):
    """
    When the tunnel goes, every stream goes with it.
    """

    def test_every_stream_reset(self):
        """connection_lost ends every stream with ConnectionLost and fails pending opens with NO_TUNNEL."""
        pair = MuxPair()
        streams = [pair.open() for _ in range(3)]
        pending = pair.gateway.open_stream("tcp", "h", 1)
        pair.pump()
        unanswered = pair.client_requests[-1]
        hook_calls = []
        unanswered.set_cancel_hook(lambda: hook_calls.append("cancelled"))
        outgoing_before = len(pair.to_client)
        pair.gateway.connection_lost()
        pair.client.connection_lost()
        for _, opener_protocol, _, acceptor_protocol in streams:
            self.assertIs(opener_protocol.lost_reason, error.ConnectionLost)
            self.assertIs(acceptor_protocol.lost_reason, error.ConnectionLost)
        self.assertIs(self.failureResultOf(pending, StreamOpenError).value.reason, Reason.NO_TUNNEL)
        self.assertEqual(hook_calls, ["cancelled"])
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (0, 0))
        self.assertEqual(len(pair.to_client), outgoing_before)
        self.assertEqual(pair.to_gateway, [])

    def test_idempotent(self):
        """A second connection_lost does nothing."""
        pair = MuxPair()
        _, opener_protocol, _, _ = pair.open()
        pair.gateway.connection_lost()
        pair.gateway.connection_lost()
        self.assertEqual([e for e in opener_protocol.events if e[0] == "lost"],
                         [("lost", error.ConnectionLost)])

    def test_writes_after_loss_send_nothing(self):
        """A stream written after the tunnel is gone sends nothing."""
        pair = MuxPair()
        opener, _, _, _ = pair.open()
        pair.gateway.connection_lost()
        opener.write(b"x")
        opener.loseConnection()
        pair.gateway.send_hello({})
        self.assertEqual(pair.to_client, [])


class SpliceOverStreamTests(SynchronousTestCase):
    """
    L{SpliceEnd}s run over streams unchanged, half-close included.

    The chain is: user transport - user end | gateway stream == client stream |
    target end - target transport.
    """

    def setUp(self):
        self.pair = MuxPair(client_window=SMALL_WINDOW, gateway_window=SMALL_WINDOW)
        self.user_end = SpliceEnd()
        self.user_transport = HalfCloseTransport()
        self.user_end.makeConnection(self.user_transport)
        self.target_end = SpliceEnd()
        self.target_transport = HalfCloseTransport()
        self.target_end.makeConnection(self.target_transport)
        self.gateway_end = SpliceEnd()
        self.client_end = SpliceEnd()
        self.closed = []
        for end in (self.user_end, self.target_end, self.gateway_end, self.client_end):
            end.on_close = lambda end, reason: self.closed.append((end, reason.type))
        self.gateway_stream, _, self.client_stream, _ = self.pair.open(self.gateway_end, self.client_end)
        self.user_end.join(self.gateway_end)
        self.client_end.join(self.target_end)

    def test_bytes_both_ways(self):
        """Bytes from the user reach the target and back, in order."""
        self.user_end.dataReceived(b"ping")
        self.pair.pump()
        self.assertEqual(self.target_transport.value(), b"ping")
        self.target_end.dataReceived(b"pong")
        self.pair.pump()
        self.assertEqual(self.user_transport.value(), b"pong")

    def test_half_close_both_ways(self):
        """The user's EOF reaches the target as a write shutdown, the reply still flows, then all closes."""
        self.user_end.dataReceived(b"request")
        self.user_end.readConnectionLost()
        self.pair.pump()
        self.assertTrue(self.target_transport.write_closed)
        self.assertFalse(self.target_transport.disconnecting)
        self.target_end.dataReceived(b"reply")
        self.pair.pump()
        self.assertEqual(self.user_transport.value(), b"reply")
        self.assertFalse(self.gateway_stream.closed)
        self.target_end.readConnectionLost()
        self.pair.pump()
        # Both directions are done, so the user's connection is closed outright.
        self.assertTrue(self.target_transport.disconnecting)
        self.assertTrue(self.user_transport.disconnecting)
        self.assertTrue(self.gateway_stream.closed and self.client_stream.closed)
        self.assertEqual((self.pair.gateway.stream_count, self.pair.client.stream_count), (0, 0))
        self.assertIn((self.gateway_end, error.ConnectionDone), self.closed)
        self.assertIn((self.client_end, error.ConnectionDone), self.closed)
        self.assertEqual(self.target_transport.value(), b"request")
        self.assertEqual(self.pair.client_errors + self.pair.gateway_errors, [])

    def test_user_connection_lost(self):
        """The user's connection dropping reaches the target as EOF, and a reply after it as a reset, like TCP."""
        self.user_end.dataReceived(b"partial")
        self.user_end.connectionLost(failure.Failure(error.ConnectionLost()))
        self.pair.pump()
        self.assertEqual(self.target_transport.value(), b"partial")
        self.assertTrue(self.target_transport.write_closed)
        self.assertEqual(self.pair.gateway.stream_count, 0)
        self.target_end.dataReceived(b"too late")
        self.pair.pump()
        self.assertTrue(self.target_transport.disconnecting)
        self.assertIn((self.client_end, error.ConnectionLost), self.closed)
        self.assertEqual((self.pair.gateway.stream_count, self.pair.client.stream_count), (0, 0))

    def test_backpressure(self):
        """A target that stops reading pauses the user's connection after one window plus the high-water mark."""
        self.target_transport.producer.pauseProducing()  # the target's send buffer is full
        self.assertIs(self.target_transport.producer, self.client_stream)
        chunk = pattern(1024)
        sent = 0
        while self.user_transport.producerState != "paused":
            self.user_end.dataReceived(chunk)
            sent += len(chunk)
            self.pair.pump()
            self.assertLess(sent, 2 * (SMALL_WINDOW + STREAM_HIGH_WATER))
        self.assertEqual(len(self.target_transport.value()), SMALL_WINDOW)
        self.assertEqual(sent, SMALL_WINDOW + STREAM_HIGH_WATER)
        self.target_transport.producer.resumeProducing()
        self.pair.pump()
        while self.target_transport.producer is not None and len(self.target_transport.value()) < sent:
            self.target_transport.producer.resumeProducing()
            self.pair.pump()
        self.assertEqual(self.user_transport.producerState, "producing")
        self.assertEqual(len(self.target_transport.value()), sent)


# -- properties -------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.booleans(), st.integers(min_value=1, max_value=3 * SMALL_WINDOW)),
        st.tuples(st.just("pause"), st.booleans()),
        st.tuples(st.just("resume"), st.booleans()),
        st.tuples(st.just("deliver"), st.booleans(), st.integers(min_value=1, max_value=5)),
        st.tuples(st.just("pump"),),
    ),
    max_size=60)


class InterleavingTests(SynchronousTestCase):
    """
    Random interleavings of writes, pauses, resumes and deliveries.
    """

    @given(operations)
    @settings(max_examples=200, deadline=None)
    def test_exact_bytes_in_order_within_window(self, ops):
        """Whatever the interleaving, each side gets exactly the bytes written, in order, never over a window."""
        pair = MuxPair(client_window=SMALL_WINDOW, gateway_window=SMALL_WINDOW)
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
            HalfCloseRecorder(), HalfCloseRecorder())
        # Index True: gateway -> client; False: client -> gateway.
        senders = {True: opener, False: acceptor}
        receivers = {True: acceptor, False: opener}
        received = {True: acceptor_protocol, False: opener_protocol}
        written = {True: b"", False: b""}

        def in_flight(direction):
            data_sent = pair.sent_by_gateway if direction else pair.sent_by_client
            credit_sent = pair.sent_by_client if direction else pair.sent_by_gateway
            # Credit still queued towards the sender has not reached it yet.
            credit_pending = [frames.decode(m) for m in (pair.to_gateway if direction else pair.to_client)]
            data = sum(len(f.payload) for f in of_type(data_sent, frames.Data))
            credit = sum(f.increment for f in of_type(credit_sent, frames.Credit))
            pending = sum(f.increment for f in of_type(credit_pending, frames.Credit))
            return data - (credit - pending)

        for op in ops:
            if op[0] == "write":
                _, direction, size = op
                data = pattern(size, len(written[direction]))
                written[direction] += data
                senders[direction].write(data)
            elif op[0] == "pause":
                receivers[op[1]].pauseProducing()
            elif op[0] == "resume":
                receivers[op[1]].resumeProducing()
            elif op[0] == "deliver":
                _, direction, count = op
                queue = pair.to_client if direction else pair.to_gateway
                deliver = pair.deliver_to_client if direction else pair.deliver_to_gateway
                for _ in range(min(count, len(queue))):
                    deliver()
            else:
                pair.pump()
            for direction in (True, False):
                self.assertLessEqual(in_flight(direction), SMALL_WINDOW)
                self.assertTrue(written[direction].startswith(received[direction].received))
            self.assertEqual(pair.client_errors + pair.gateway_errors, [])

        # Let everything drain, then close both halves.
        for _ in range(100):
            for direction in (True, False):
                receivers[direction].resumeProducing()
            pair.pump()
            if all(received[d].received == written[d] for d in (True, False)):
                break
        for direction in (True, False):
            self.assertEqual(received[direction].received, written[direction])
        opener.loseWriteConnection()
        acceptor.loseWriteConnection()
        pair.pump()
        self.assertIs(opener_protocol.lost_reason, error.ConnectionDone)
        self.assertIs(acceptor_protocol.lost_reason, error.ConnectionDone)
        self.assertEqual((pair.gateway.stream_count, pair.client.stream_count), (0, 0))
        self.assertEqual(pair.client_errors + pair.gateway_errors, [])


class MessagePartsTests(SynchronousTestCase):
    """A message handed over in pieces (as Autobahn collects it) means the same as whole."""

    def test_data_in_pieces(self):
        """A DATA message split anywhere after its header delivers the whole payload once."""
        pair = MuxPair()
        _, _, acceptor, protocol = pair.open()
        message = frames.encode(frames.Data(acceptor.stream_id, b"0123456789" * 10))
        pair.client.message_parts_received([message[:7], message[7:50], message[50:]])
        self.assertEqual(protocol.received, b"0123456789" * 10)
        self.assertEqual(len(protocol.chunks), 1)

    def test_header_split(self):
        """A first piece shorter than the frame header still decodes (joined whole)."""
        pair = MuxPair()
        _, _, acceptor, protocol = pair.open()
        message = frames.encode(frames.Data(acceptor.stream_id, b"payload"))
        pair.client.message_parts_received([message[:3], message[3:]])
        self.assertEqual(protocol.received, b"payload")

    def test_other_frames_in_pieces(self):
        """Non-DATA messages in pieces are joined and decoded as usual."""
        pair = MuxPair()
        opener, _, acceptor, _ = pair.open(HalfCloseRecorder())
        message = frames.encode(frames.Fin(opener.stream_id))
        pair.gateway.message_parts_received([message[:2], message[2:]])
        self.assertIs(opener.state, stream_state.HALF_CLOSED_REMOTE)

    def test_empty_data_in_pieces(self):
        """An empty DATA split after its header is still a protocol error."""
        pair = MuxPair()
        _, _, acceptor, _ = pair.open()
        message = frames.encode(frames.Fin(acceptor.stream_id))
        message = bytes([frames.T_DATA]) + message[1:]
        pair.client.message_parts_received([message, b""])
        self.assertEqual(len(pair.client_errors), 1)
        self.assertIsInstance(pair.client_errors[0], frames.FrameError)


class GoAwayTests(SynchronousTestCase):
    """
    GOAWAY: the tunnel takes no new streams either way; open ones finish.
    """

    def assert_no_new_streams(self, mux):
        failure = self.failureResultOf(mux.open_stream("tcp", "h", 1), StreamOpenError)
        self.assertIs(failure.value.reason, Reason.NO_TUNNEL)
        self.assertEqual(failure.value.detail, "tunnel going away")

    def test_gateway_goes_away(self):
        """The gateway's GOAWAY reaches the client's hook; neither side opens new streams."""
        pair = MuxPair()
        pair.gateway.go_away()
        self.assertEqual(pair.sent_by_gateway, [frames.GoAway(Reason.NO_TUNNEL)])
        self.assertEqual((pair.gateway.draining, pair.gateway.go_away_sent), (True, True))
        self.assertFalse(pair.client.draining)
        pair.pump()
        self.assertEqual(pair.client_go_aways, [Reason.NO_TUNNEL])
        self.assertIs(pair.client.go_away_received, Reason.NO_TUNNEL)
        self.assertTrue(pair.client.draining)
        self.assert_no_new_streams(pair.gateway)
        self.assert_no_new_streams(pair.client)
        self.assertEqual(pair.to_client + pair.to_gateway, [])
        self.assertEqual(pair.client_errors + pair.gateway_errors + pair.gateway_go_aways, [])

    def test_client_goes_away(self):
        """The client's GOAWAY, with its reason, stops the gateway opening streams on the tunnel."""
        pair = MuxPair()
        pair.client.go_away(Reason.OVERLOADED)
        pair.pump()
        self.assertEqual(pair.gateway_go_aways, [Reason.OVERLOADED])
        self.assertTrue(pair.gateway.draining)
        self.assert_no_new_streams(pair.gateway)
        self.assertEqual(pair.client_requests, [])

    def test_open_streams_finish(self):
        """Streams open when GOAWAY is sent still carry data both ways and close cleanly."""
        pair = MuxPair()
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
            HalfCloseRecorder(), HalfCloseRecorder())
        pair.gateway.go_away()
        pair.pump()
        opener.write(b"request")
        acceptor.write(b"response")
        opener.loseWriteConnection()
        acceptor.loseWriteConnection()
        pair.pump()
        self.assertEqual((acceptor_protocol.received, opener_protocol.received),
                         (b"request", b"response"))
        self.assertIs(opener_protocol.lost_reason, error.ConnectionDone)
        self.assertIs(acceptor_protocol.lost_reason, error.ConnectionDone)
        self.assertEqual(pair.client_errors + pair.gateway_errors, [])

    def test_when_drained(self):
        """when_drained fires on each side once it is draining and its last stream has ended."""
        pair = MuxPair()
        opener, _, acceptor, _ = pair.open()
        early = pair.gateway.when_drained()
        pair.gateway.go_away()
        pair.pump()
        drained = [pair.gateway.when_drained(), pair.client.when_drained()]
        self.assertNoResult(early)
        self.assertNoResult(drained[1])
        opener.loseConnection()
        pair.pump()
        self.assertEqual([self.successResultOf(d) for d in [early] + drained], [None] * 3)

    def test_when_drained_without_streams(self):
        """A draining tunnel without streams is drained at once; a tunnel not draining is not."""
        pair = MuxPair()
        waiting = pair.gateway.when_drained()
        self.assertNoResult(waiting)
        pair.gateway.go_away()
        self.successResultOf(waiting)
        self.successResultOf(pair.gateway.when_drained())

    def test_when_drained_tunnel_lost(self):
        """Losing the tunnel ends the wait for it to drain."""
        pair = MuxPair()
        pair.open()
        pair.gateway.go_away()
        waiting = pair.gateway.when_drained()
        self.assertNoResult(waiting)
        pair.gateway.connection_lost()
        self.successResultOf(waiting)

    def test_open_crossing_go_away_served(self):
        """An OPEN that crossed our GOAWAY is still answered: the peer had not heard it yet."""
        pair = MuxPair()
        d = pair.gateway.open_stream("tcp", "h", 1)
        pair.client.go_away()
        pair.pump()
        pair.client_requests[0].accept(Recorder())
        pair.pump()
        self.successResultOf(d)
        self.assertEqual(pair.client_errors + pair.gateway_errors, [])

    def test_when_drained_waits_for_crossing_opens(self):
        """
        After our GOAWAY, when_drained waits for the round trip: an OPEN the
        peer sent before reading the GOAWAY is served, and drained holds
        until its stream ends.
        """
        round_trips = []

        def round_trip():
            round_trips.append(defer.Deferred())
            return round_trips[-1]

        pair = MuxPair(round_trip=round_trip)
        crossing = pair.gateway.open_stream("tcp", "h", 1)
        pair.client.go_away()
        drained = pair.client.when_drained()
        self.assertEqual(len(round_trips), 1)
        self.assertNoResult(drained)
        pair.pump()
        acceptor = pair.client_requests[0]
        acceptor.accept(Recorder())
        pair.pump()
        round_trips[0].callback(None)  # the pong: nothing more crossed
        self.assertNoResult(drained)
        self.successResultOf(crossing).loseConnection()
        acceptor.loseConnection()
        pair.pump()
        self.successResultOf(drained)
        self.assertEqual(pair.client_errors + pair.gateway_errors, [])

    def test_when_drained_round_trip_without_crossing(self):
        """With no OPEN crossing, the round trip alone holds when_drained."""
        round_trips = []
        pair = MuxPair(round_trip=lambda: round_trips.append(defer.Deferred()) or round_trips[-1])
        pair.client.go_away()
        drained = pair.client.when_drained()
        self.assertNoResult(drained)
        round_trips[0].callback(None)
        self.successResultOf(drained)

    def test_no_round_trip_after_peer_go_away(self):
        """GOAWAY sent after the peer's: nothing can cross it, so no round trip."""
        round_trips = []
        pair = MuxPair(round_trip=lambda: round_trips.append(defer.Deferred()) or round_trips[-1])
        pair.gateway.go_away()
        pair.pump()
        round_trips.clear()  # the gateway's own
        pair.client.go_away()
        self.assertEqual(round_trips, [])
        self.successResultOf(pair.client.when_drained())

    def test_open_after_peer_go_away(self):
        """An OPEN from a peer that has sent GOAWAY is a protocol error."""
        pair = MuxPair()
        pair.to_client.append(frames.encode(frames.GoAway(Reason.NO_TUNNEL)))
        pair.to_client.append(frames.encode(frames.Open(2, "tcp", "h", 1, 100)))
        pair.pump()
        [exc] = pair.client_errors
        self.assertIsInstance(exc, MuxProtocolError)
        self.assertEqual(pair.client_requests, [])

    def test_stream_ids_used_up(self):
        """Past the last 32-bit id an open fails NO_TUNNEL and GOAWAY goes out, once."""
        pair = MuxPair()
        pair.gateway._next_id = 0xFFFFFFFE  # the gateway's last even id
        pair.gateway.open_stream("tcp", "h", 1)
        for _ in range(2):
            with self.assertRaises(StreamOpenError) as caught:
                pair.gateway.start_stream("tcp", "h", 1)
            self.assertEqual(caught.exception.reason, Reason.NO_TUNNEL)
        self.assertTrue(pair.gateway.draining)
        pair.pump()
        self.assertEqual(pair.client_go_aways, [Reason.NO_TUNNEL])

    def test_sent_once(self):
        """go_away sends GOAWAY once; a repeated GOAWAY from the peer calls the hook once."""
        pair = MuxPair()
        pair.gateway.go_away()
        pair.gateway.go_away(Reason.OVERLOADED)
        self.assertEqual(len(pair.to_client), 1)
        pair.to_client.append(frames.encode(frames.GoAway(Reason.OVERLOADED)))
        pair.pump()
        self.assertEqual(pair.client_go_aways, [Reason.NO_TUNNEL])

    def test_unknown_reason(self):
        """An unknown GOAWAY reason code is read as GENERAL_FAILURE."""
        pair = MuxPair()
        pair.to_gateway.append(frames.encode(frames.GoAway(0xEE)))
        pair.pump()
        self.assertEqual(pair.gateway_go_aways, [Reason.GENERAL_FAILURE])

    def test_not_sent_after_loss(self):
        """go_away on a lost tunnel sends nothing."""
        pair = MuxPair()
        pair.gateway.connection_lost()
        pair.gateway.go_away()
        self.assertEqual(pair.to_client, [])
        self.assertFalse(pair.gateway.go_away_sent)


class ClockTests(SynchronousTestCase):
    """
    Streams date their records with the mux's injected clock.
    """

    def test_created_and_last_active(self):
        """created is the clock's time at the open; last_active moves with writes and DATA."""
        pair = MuxPair()
        pair.clock.advance(100)
        opener, _, acceptor, _ = pair.open()
        self.assertEqual((opener.created, opener.last_active, acceptor.created), (100, 100, 100))
        pair.clock.advance(3)
        opener.write(b"x")
        self.assertEqual((opener.last_active, acceptor.last_active), (103, 100))
        pair.clock.advance(4)
        pair.pump()
        self.assertEqual((opener.last_active, acceptor.last_active), (103, 107))
        self.assertEqual(opener.created, 100)

    def test_default_is_the_reactor(self):
        """Without a clock a mux reads the global reactor's."""
        from twisted.internet import reactor
        self.assertIs(Mux(lambda message: None, initiator=True).clock, reactor)


class DialedAddressTests(SynchronousTestCase):
    """OPEN_OK carries the dialed address only to a peer whose HELLO asks for it."""

    def pair(self, opener_hello=True):
        a_sent, b_sent = [], []
        a = Mux(a_sent.append, initiator=True)
        opened = []
        b = Mux(b_sent.append, initiator=False, on_open_request=opened.append)
        if opener_hello:
            a.send_hello({"version": 1})
        else:
            a_sent.append(frames.encode(frames.Hello({"version": 1})))
        for message in a_sent:
            b.message_received(message)
        del a_sent[:]
        return a, b, a_sent, b_sent, opened

    def open_and_accept(self, a, b, a_sent, b_sent, opened):
        d = a.open_stream("tcp", "db.internal", 5432)
        for message in a_sent:
            b.message_received(message)
        opened[0].accept(Protocol(), ("10.0.0.7", 5432))
        for message in b_sent:
            a.message_received(message)
        return self.successResultOf(d)

    def test_told_to_a_peer_that_reads_it(self):
        a, b, a_sent, b_sent, opened = self.pair()
        stream = self.open_and_accept(a, b, a_sent, b_sent, opened)
        self.assertEqual(stream.dialed, ("10.0.0.7", 5432))

    def test_not_sent_to_an_older_peer(self):
        a, b, a_sent, b_sent, opened = self.pair(opener_hello=False)
        stream = self.open_and_accept(a, b, a_sent, b_sent, opened)
        self.assertIsNone(stream.dialed)
        ok = [frames.decode(m) for m in b_sent if m[0] == frames.T_OPEN_OK]
        self.assertEqual(ok[0].dialed, None)


class EarlyDataTests(SynchronousTestCase):
    """
    open_stream's first_data: DATA that crosses with the OPEN, up to what the
    acceptor's HELLO offered (early_data), held by the acceptor until it
    answers; the rest waits for OPEN_OK.
    """

    def pair(self, client_window=DEFAULT_WINDOW, offered=True):
        pair = MuxPair(client_window=client_window)
        if offered:
            pair.client.send_hello({"version": 1})
        else:
            pair.to_gateway.append(frames.encode(frames.Hello({"version": 1})))
        pair.deliver_to_gateway()
        return pair

    def sent_types(self, frames_sent):
        return [type(frame).__name__ for frame in frames_sent]

    @staticmethod
    def early_bytes(pair):
        """DATA payload bytes the gateway has sent so far."""
        return sum(len(f.payload) for f in pair.sent_by_gateway if type(f) is frames.Data)

    def accepted(self, pair, d):
        """Deliver, accept the newest OPEN with a Recorder, deliver again; the Recorder."""
        pair.pump()
        protocol = Recorder()
        pair.client_requests[-1].accept(protocol)
        pair.pump()
        self.successResultOf(d)
        return protocol

    def test_first_data_goes_with_the_open(self):
        pair = self.pair()
        request = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
        d = pair.gateway.open_stream("tcp", "h", 80, first_data=request)
        self.assertEqual(self.sent_types(pair.sent_by_gateway), ["Open", "Data"])
        pair.deliver_to_client()
        pair.deliver_to_client()
        [acceptor] = pair.client_requests
        self.assertEqual(pair.client_errors, [])
        protocol = Recorder()
        acceptor.accept(protocol)
        self.assertEqual(protocol.received, request)
        pair.pump()
        opener = self.successResultOf(d)
        self.assertEqual(opener._send_window, DEFAULT_WINDOW - len(request))
        self.assertEqual(self.sent_types(pair.sent_by_gateway), ["Open", "Data"])

    def test_waits_for_open_ok_without_the_offer(self):
        """A peer whose HELLO offered nothing (an older version) gets DATA only after OPEN_OK."""
        pair = self.pair(offered=False)
        d = pair.gateway.open_stream("tcp", "h", 80, first_data=b"hello")
        self.assertEqual(self.sent_types(pair.sent_by_gateway), ["Open"])
        protocol = self.accepted(pair, d)
        self.assertEqual(self.sent_types(pair.sent_by_gateway), ["Open", "Data"])
        self.assertEqual(protocol.received, b"hello")
        self.assertEqual(pair.client_errors, [])

    def test_beyond_the_offer_after_open_ok(self):
        """Bytes past the offered early data go once OPEN_OK comes, in order."""
        pair = self.pair()
        data = bytes(range(256)) * ((EARLY_DATA + 5000) // 256)
        d = pair.gateway.open_stream("tcp", "h", 80, first_data=data)
        self.assertEqual(self.early_bytes(pair), EARLY_DATA)
        self.assertEqual(self.accepted(pair, d).received, data)
        self.assertEqual(pair.client_errors, [])

    def test_window_counts_the_early_data(self):
        """
        With a window smaller than the early data a side takes, it offers its
        window; what the opener sent early counts against the window of the
        OPEN_OK, and the rest flows as the acceptor gives credit.
        """
        pair = self.pair(client_window=SMALL_WINDOW)
        data = b"x" * (3 * SMALL_WINDOW + 100)
        d = pair.gateway.open_stream("tcp", "h", 80, first_data=data)
        self.assertEqual(self.early_bytes(pair), SMALL_WINDOW)
        self.assertEqual(self.accepted(pair, d).received, data)
        self.assertEqual((pair.client_errors, pair.gateway_errors), ([], []))

    def test_refused_open_drops_it(self):
        """An OPEN refused: its early data is dropped unread, and the opener fails."""
        pair = self.pair()
        d = pair.gateway.open_stream("tcp", "h", 80, first_data=b"secret request")
        pair.pump()
        acceptor = pair.client_requests[0]
        acceptor.reject(Reason.NOT_ALLOWED, "no")
        self.assertEqual(acceptor._early, [])
        pair.pump()
        failure = self.failureResultOf(d, StreamOpenError)
        self.assertEqual(failure.value.reason, Reason.NOT_ALLOWED)

    def test_more_than_offered_is_a_protocol_error(self):
        """DATA past the offer before the answer breaks the protocol; within it, it does not."""
        pair = MuxPair()
        pair.client.message_received(frames.encode(frames.Open(2, "tcp", "h", 80, DEFAULT_WINDOW)))
        pair.client.message_received(frames.encode(frames.Data(2, b"x" * EARLY_DATA)))
        self.assertEqual(pair.client_errors, [])
        pair.client.message_received(frames.encode(frames.Data(2, b"x")))
        [error] = pair.client_errors
        self.assertIsInstance(error, MuxProtocolError)
        self.assertIn("before its OPEN was answered", str(error))

    def test_odd_offers_are_none(self):
        """An early_data that is not a count (or a negative one) offers nothing; a big one is capped."""
        for value, expected in [("lots", 0), (True, 0), (-5, 0), (1.5, 0), (None, 0),
                                (100, 100), (10 ** 12, EARLY_DATA)]:
            pair = MuxPair()
            pair.to_gateway.append(frames.encode(frames.Hello({"version": 1,
                                                               frames.HELLO_EARLY_DATA: value})))
            pair.deliver_to_gateway()
            pair.gateway.open_stream("tcp", "h", 80, first_data=b"y" * 200)
            self.assertEqual(self.early_bytes(pair), min(expected, 200), value)

    def test_fin_asked_for_while_opening(self):
        """A FIN asked for while the OPEN waits goes once it is answered, after the early data."""
        pair = self.pair()
        d = pair.gateway.open_stream("tcp", "h", 80, first_data=b"hi")
        [opener] = pair.gateway.streams()
        opener.loseWriteConnection()
        self.assertEqual(self.sent_types(pair.sent_by_gateway), ["Open", "Data"])
        pair.pump()
        protocol = HalfCloseRecorder()
        pair.client_requests[0].accept(protocol)
        pair.pump()
        self.successResultOf(d)
        self.assertEqual(self.sent_types(pair.sent_by_gateway), ["Open", "Data", "Fin"])
        self.assertEqual(protocol.events, [("made",), ("data", b"hi"), ("read-closed",)])

    def test_start_stream_takes_writes_while_opening(self):
        """
        start_stream gives the stream at once: what is written before the
        answer goes as first_data does, and its opened fires with it.
        """
        pair = self.pair()
        stream = pair.gateway.start_stream("tcp", "h", 22)
        self.assertIs(stream.state, stream_state.OPENING)
        stream.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        stream.write(b"kex offer")
        self.assertEqual(self.sent_types(pair.sent_by_gateway), ["Open", "Data", "Data"])
        answered = []
        stream.opened.addCallback(lambda opened: answered.append(opened) or opened)
        protocol = self.accepted(pair, stream.opened)
        self.assertEqual(answered, [stream])
        self.assertEqual(protocol.received, b"SSH-2.0-OpenSSH_9.6\r\nkex offer")

    def test_start_stream_on_a_draining_tunnel(self):
        """No stream starts on a tunnel going away or lost: NO_TUNNEL at once."""
        pair = self.pair()
        pair.gateway.go_away()
        with self.assertRaises(StreamOpenError) as caught:
            pair.gateway.start_stream("tcp", "h", 22)
        self.assertEqual(caught.exception.reason, Reason.NO_TUNNEL)
        self.assertEqual(self.failureResultOf(pair.gateway.open_stream("tcp", "h", 22),
                                              StreamOpenError).value.reason, Reason.NO_TUNNEL)

    def test_a_target_no_open_can_carry(self):
        """A name too long for an OPEN fails the open and leaves no stream behind."""
        pair = self.pair()
        name = ".".join(["é"] * 85)  # 679 bytes once IDNA-encoded
        failure = self.failureResultOf(pair.gateway.open_stream("tcp", name, 80), StreamOpenError)
        self.assertEqual(failure.value.reason, Reason.GENERAL_FAILURE)
        self.assertEqual(pair.gateway.streams(), [])
        self.assertEqual(self.sent_types(pair.sent_by_gateway), [])
        ok = pair.gateway.open_stream("tcp", "example.com", 80)
        self.assertNoResult(ok)
        self.assertEqual([s.stream_id for s in pair.gateway.streams()], [2])

    def test_start_stream_on_a_lost_tunnel(self):
        pair = self.pair()
        pair.gateway.connection_lost()
        with self.assertRaises(StreamOpenError) as caught:
            pair.gateway.start_stream("tcp", "h", 22)
        self.assertEqual(caught.exception.reason, Reason.NO_TUNNEL)

    def test_early_data_dropped_when_the_opener_gives_up(self):
        """RESET or a lost tunnel before the answer: the held early data is let go at once."""
        for end in ("reset", "tunnel lost"):
            pair = self.pair()
            stream = pair.gateway.start_stream("tcp", "h", 22)
            stream.write(b"early")
            pair.pump()
            [acceptor] = pair.client_requests
            self.assertEqual(acceptor._early, [b"early"])
            if end == "reset":
                stream.opened.cancel()
                pair.pump()
                self.failureResultOf(stream.opened)
            else:
                pair.client.connection_lost()
            self.assertEqual(acceptor._early, [], end)
            self.assertTrue(acceptor.closed, end)

    def test_not_on_udp_streams(self):
        """A udp stream carries datagrams, never DATA: first_data is not sent."""
        pair = self.pair()
        pair.gateway.open_stream("udp", "h", 53, first_data=b"x")
        self.assertEqual(self.sent_types(pair.sent_by_gateway), ["Open"])
