# -*- test-case-name: tests.test_splice -*-
"""
Tests for L{anyproxy.splice}: two L{SpliceEnd}s over fake transports.
"""

from twisted.internet import error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.splice import SpliceEnd, splice


# -- fakes ----------------------------------------------------------------------

class HalfCloseTransport(StringTransport):
    """A L{StringTransport} that records half-close and close calls in order."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def loseWriteConnection(self):
        self.calls.append("loseWriteConnection")

    def loseConnection(self):
        self.calls.append("loseConnection")
        super().loseConnection()


class PlainTransport(StringTransport):
    """A L{StringTransport} without half-close that records closes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def loseConnection(self):
        self.calls.append("loseConnection")
        super().loseConnection()


def connected_end(transport=None, initial_data=b""):
    """A L{SpliceEnd} connected to C{transport} (a new L{HalfCloseTransport} by default)."""
    end = SpliceEnd(initial_data)
    end.makeConnection(transport if transport is not None else HalfCloseTransport())
    return end


def lost():
    return failure.Failure(error.ConnectionDone("closed"))


# -- tests ----------------------------------------------------------------------

class DataTests(SynchronousTestCase):
    """Bytes flow both ways, including bytes that arrived before the splice."""

    def test_interface(self):
        """A L{SpliceEnd} takes half-close notifications."""
        self.assertTrue(IHalfCloseableProtocol.providedBy(SpliceEnd()))

    def test_both_ways(self):
        """Data received on one end is written to the other end's transport, both ways."""
        left, right = splice(connected_end(), connected_end())
        left.dataReceived(b"from the left")
        right.dataReceived(b"from the right")
        left.dataReceived(b", again")
        self.assertEqual(right.transport.value(), b"from the left, again")
        self.assertEqual(left.transport.value(), b"from the right")

    def test_splice_returns_ends(self):
        """L{splice} returns the two ends and links them to each other."""
        left, right = connected_end(), connected_end()
        self.assertEqual(splice(left, right), (left, right))
        self.assertIs(left.other, right)
        self.assertIs(right.other, left)

    def test_data_before_join(self):
        """Data received before the join is forwarded at the join, in order."""
        left, right = connected_end(), connected_end()
        left.dataReceived(b"early ")
        left.dataReceived(b"bytes")
        right.dataReceived(b"reply")
        self.assertEqual(left.transport.value(), b"")
        self.assertEqual(right.transport.value(), b"")
        left.join(right)
        self.assertEqual(right.transport.value(), b"early bytes")
        self.assertEqual(left.transport.value(), b"reply")
        left.dataReceived(b" later")
        self.assertEqual(right.transport.value(), b"early bytes later")

    def test_initial_data(self):
        """Bytes given to the constructor are forwarded at the join."""
        left = connected_end(initial_data=b"GET / HTTP/1.1\r\n")
        right = connected_end()
        left.join(right)
        self.assertEqual(right.transport.value(), b"GET / HTTP/1.1\r\n")

    def test_initial_data_then_early_data(self):
        """Constructor bytes come before bytes received before the join."""
        left = connected_end(initial_data=b"first ")
        left.dataReceived(b"second")
        right = connected_end()
        left.join(right)
        self.assertEqual(right.transport.value(), b"first second")

    def test_pending_forwarded_once(self):
        """Early data is forwarded only once, not again on later data."""
        left, right = connected_end(), connected_end()
        left.dataReceived(b"x")
        left.join(right)
        left.dataReceived(b"y")
        self.assertEqual(right.transport.value(), b"xy")


class ProducerTests(SynchronousTestCase):
    """Each transport is the streaming producer of the other."""

    def test_registered_both_ways(self):
        """After the join each transport has the other as a streaming producer."""
        left, right = splice(connected_end(), connected_end())
        self.assertIs(left.transport.producer, right.transport)
        self.assertIs(right.transport.producer, left.transport)
        self.assertTrue(left.transport.streaming)
        self.assertTrue(right.transport.streaming)

    def test_not_registered_before_join(self):
        """No producer is registered until the join."""
        left = connected_end()
        left.dataReceived(b"x")
        self.assertIsNone(left.transport.producer)


class HalfCloseTests(SynchronousTestCase):
    """EOF on one side half-closes the other; a connection closes when both directions end."""

    def test_eof_half_closes_other(self):
        """readConnectionLost on one end calls loseWriteConnection on the other only."""
        left, right = splice(connected_end(), connected_end())
        left.readConnectionLost()
        self.assertEqual(right.transport.calls, ["loseWriteConnection"])
        self.assertEqual(left.transport.calls, [])

    def test_other_direction_still_flows(self):
        """After EOF one way, data still flows the other way."""
        left, right = splice(connected_end(), connected_end())
        left.readConnectionLost()
        right.dataReceived(b"answer")
        self.assertEqual(left.transport.value(), b"answer")

    def test_both_directions_done_closes(self):
        """Once both sides sent EOF, both connections are closed."""
        left, right = splice(connected_end(), connected_end())
        left.readConnectionLost()
        right.readConnectionLost()
        self.assertEqual(left.transport.calls, ["loseWriteConnection", "loseConnection"])
        self.assertEqual(right.transport.calls, ["loseWriteConnection", "loseConnection"])

    def test_write_connection_lost_completes(self):
        """An end whose read side closed is closed once its transport reports the write side closed."""
        left, right = splice(connected_end(), connected_end())
        left.readConnectionLost()
        left.writeConnectionLost()
        self.assertEqual(left.transport.calls, ["loseConnection"])
        self.assertEqual(right.transport.calls, ["loseWriteConnection"])

    def test_only_read_closed_stays_open(self):
        """An end whose read side closed but which can still write is not closed."""
        left, right = splice(connected_end(), connected_end())
        left.readConnectionLost()
        self.assertNotIn("loseConnection", left.transport.calls)
        self.assertFalse(left.transport.disconnecting)

    def test_transport_without_half_close(self):
        """When the other transport cannot half-close, it is closed instead."""
        left = connected_end()
        right = connected_end(PlainTransport())
        splice(left, right)
        left.readConnectionLost()
        self.assertEqual(right.transport.calls, ["loseConnection"])

    def test_eof_before_join(self):
        """EOF before the join does not fail and leaves the other side alone."""
        left = connected_end()
        left.readConnectionLost()
        self.assertEqual(left.transport.calls, [])


class CloseTests(SynchronousTestCase):
    """Losing one connection closes the other and reports once."""

    def test_connection_lost_closes_other(self):
        """connectionLost on one end closes the other end's transport."""
        left, right = splice(connected_end(), connected_end())
        left.connectionLost(lost())
        self.assertEqual(right.transport.calls, ["loseConnection"])
        self.assertEqual(left.transport.calls, [])

    def test_other_already_lost(self):
        """When the other end is already lost, it is not closed again."""
        left, right = splice(connected_end(), connected_end())
        left.connectionLost(lost())
        right.connectionLost(lost())
        self.assertEqual(left.transport.calls, [])
        self.assertEqual(right.transport.calls, ["loseConnection"])

    def test_eof_after_other_lost(self):
        """EOF after the other end is lost does not half-close a dead transport."""
        left, right = splice(connected_end(), connected_end())
        right.connectionLost(lost())
        left.readConnectionLost()
        self.assertEqual(right.transport.calls, [])

    def test_connection_lost_before_join(self):
        """connectionLost before any join does not fail."""
        results = []
        end = connected_end()
        end.on_close = lambda end, reason: results.append(reason)
        end.connectionLost(lost())
        self.assertEqual(len(results), 1)

    def test_on_close_once(self):
        """on_close is called once, with the end and the reason, even if lost twice."""
        calls = []
        left, right = splice(connected_end(), connected_end())
        left.on_close = lambda end, reason: calls.append((end, reason))
        reason = lost()
        left.connectionLost(reason)
        left.connectionLost(lost())
        self.assertEqual(calls, [(left, reason)])

    def test_on_close_each_end(self):
        """Each end reports its own close."""
        calls = []
        left, right = splice(connected_end(), connected_end())
        left.on_close = lambda end, reason: calls.append(end)
        right.on_close = lambda end, reason: calls.append(end)
        left.connectionLost(lost())
        right.connectionLost(lost())
        self.assertEqual(calls, [left, right])


class OrderRecordingTransport(HalfCloseTransport):
    """Also records unregisterProducer, to check its place among the closes."""

    def unregisterProducer(self):
        self.calls.append("unregisterProducer")
        super().unregisterProducer()


class ProducerReleaseTests(SynchronousTestCase):
    """A transport is closed only after the producer feeding it is unregistered."""

    def test_half_close_unregisters_first(self):
        """Twisted resumes a paused producer instead of finishing a half-close, so it goes first."""
        left = connected_end(OrderRecordingTransport())
        right = connected_end(OrderRecordingTransport())
        splice(left, right)
        left.readConnectionLost()
        self.assertEqual(right.transport.calls, ["unregisterProducer", "loseWriteConnection"])
        self.assertIsNone(right.transport.producer)

    def test_close_unregisters_first(self):
        """connectionLost on one side unregisters, then closes, the other."""
        left = connected_end(OrderRecordingTransport())
        right = connected_end(OrderRecordingTransport())
        splice(left, right)
        left.connectionLost(lost())
        self.assertEqual(right.transport.calls, ["unregisterProducer", "loseConnection"])
