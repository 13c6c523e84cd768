# -*- test-case-name: tests.test_splice -*-
"""
Tests for L{anyproxy.splice}: two L{SpliceEnd}s over fake transports, and
L{open_and_splice} against a fake endpoint.
"""

from twisted.internet import error, tcp
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from anyproxy.errors import Reason, StreamOpenError
from anyproxy.interfaces import IEarlyDataEndpoint
from anyproxy.splice import (
    WRITE_NOW_BELOW, SpliceEnd, half_close_now, open_and_splice, splice, write_now)
from anyproxy.tuning import tune_for_bulk


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


class PublicStateTests(SynchronousTestCase):
    """What a frontend may read and call on an end."""

    def test_lost_and_read_closed(self):
        """C{lost} and C{read_closed} follow the connection's events."""
        end = connected_end()
        self.assertEqual((end.lost, end.read_closed), (False, False))
        end.readConnectionLost()
        self.assertEqual((end.lost, end.read_closed), (False, True))
        end.connectionLost(lost())
        self.assertEqual((end.lost, end.read_closed), (True, True))

    def test_shut_down_write(self):
        """shut_down_write half-closes the transport, releasing its producer first."""
        left = connected_end(OrderRecordingTransport())
        right = connected_end(OrderRecordingTransport())
        splice(left, right)
        left.shut_down_write()
        self.assertEqual(left.transport.calls, ["unregisterProducer", "loseWriteConnection"])

    def test_eof_before_join_passed_on(self):
        """An EOF either end received before the join half-closes the other, after its bytes."""
        left, right = connected_end(OrderRecordingTransport()), connected_end()
        right.dataReceived(b"last words")
        right.readConnectionLost()
        left.join(right)
        self.assertEqual(left.transport.value(), b"last words")
        self.assertEqual(left.transport.calls, ["unregisterProducer", "loseWriteConnection"])
        self.assertEqual(right.transport.calls, [])


class FakeEndpoint:
    """An endpoint whose connects the test completes: C{succeed}, C{fail}."""

    def __init__(self):
        self.factory = self.connecting = None
        self.cancelled = False

    def connect(self, factory):
        self.factory = factory
        self.connecting = Deferred(self._cancel)
        return self.connecting

    def _cancel(self, connecting):
        self.cancelled = True

    def succeed(self, transport=None):
        """Connect the protocol to C{transport}; returns it."""
        target = self.factory.buildProtocol(None)
        target.makeConnection(transport if transport is not None else HalfCloseTransport())
        self.connecting.callback(target)
        return target

    def fail(self, exception):
        self.connecting.errback(exception)


class OpenAndSpliceTests(SynchronousTestCase):
    """L{open_and_splice} opens the target, then splices, as every frontend does."""

    def setUp(self):
        self.endpoint = FakeEndpoint()
        self.user = connected_end()

    def open(self, **kwargs):
        self.results = []
        opening = open_and_splice(self.user, self.endpoint, **kwargs)
        opening.addBoth(self.results.append)
        return opening

    def test_reading_paused_until_spliced(self):
        """By default reading pauses at once, and resumes at the splice."""
        self.open()
        self.assertEqual(self.user.transport.producerState, "paused")
        target = self.endpoint.succeed()
        self.assertEqual(self.user.transport.producerState, "producing")
        self.assertEqual(self.results, [target])
        self.assertIs(self.user.other, target)

    def test_producers_both_ways(self):
        """The spliced transports are each other's streaming producers."""
        self.open()
        target = self.endpoint.succeed()
        self.assertIs(self.user.transport.producer, target.transport)
        self.assertIs(target.transport.producer, self.user.transport)

    def test_early_bytes_and_eof_delivered(self):
        """Bytes and an EOF the user sent while the target opened reach it, in order."""
        self.user.dataReceived(b"before ")
        self.open()
        self.user.dataReceived(b"during")
        self.user.readConnectionLost()
        target = self.endpoint.succeed()
        self.assertEqual(target.transport.value(), b"before during")
        self.assertEqual(target.transport.calls, ["loseWriteConnection"])
        target.dataReceived(b"answer")
        self.assertEqual(self.user.transport.value(), b"answer")

    def test_read_while_opening(self):
        """A positive read_while_opening keeps reading until more than that is held."""
        self.open(read_while_opening=10)
        self.user.dataReceived(b"x" * 10)
        self.assertEqual(self.user.transport.producerState, "producing")
        self.user.dataReceived(b"y")
        self.assertEqual(self.user.transport.producerState, "paused")
        target = self.endpoint.succeed()
        self.assertEqual(self.user.transport.producerState, "producing")
        self.assertEqual(target.transport.value(), b"x" * 10 + b"y")

    def test_reading_left_to_caller(self):
        """read_while_opening=None never pauses nor resumes the user's transport."""
        self.open(read_while_opening=None)
        self.user.dataReceived(b"x" * 100000)
        self.assertEqual(self.user.transport.producerState, "producing")
        self.user.transport.pauseProducing()
        self.endpoint.succeed()
        self.assertEqual(self.user.transport.producerState, "paused")

    def test_on_open_before_any_byte(self):
        """on_open gets the target before the held bytes flow: the place for a reply."""
        seen = []

        def on_open(target):
            seen.append((target.transport.value(), self.user.other))
            self.user.transport.write(b"reply ")

        self.user.dataReceived(b"early")
        self.open(on_open=on_open)
        target = self.endpoint.succeed()
        target.dataReceived(b"data")
        self.assertEqual(seen, [(b"", None)])
        self.assertEqual(self.user.transport.value(), b"reply data")
        self.assertEqual(target.transport.value(), b"early")

    def test_on_open_raises(self):
        """If on_open raises, the target is closed and the open fails with that error."""
        def on_open(target):
            raise RuntimeError("no reply")

        self.open(on_open=on_open)
        target = self.endpoint.succeed()
        self.assertTrue(target.transport.disconnecting)
        [failure] = self.results
        failure.trap(RuntimeError)

    def test_open_fails(self):
        """An open failure is the caller's to answer: the user's connection is left open."""
        self.open()
        self.endpoint.fail(StreamOpenError(Reason.NOT_ALLOWED, "forbidden"))
        [failure] = self.results
        self.assertEqual(failure.trap(StreamOpenError), StreamOpenError)
        self.assertEqual(failure.value.reason, Reason.NOT_ALLOWED)
        self.assertFalse(self.user.transport.disconnecting)

    def test_endpoint_callable_raises(self):
        """A callable giving the endpoint may refuse by raising: the open fails with that."""
        def endpoint_for():
            raise StreamOpenError(Reason.NO_TUNNEL)

        opening = open_and_splice(self.user, endpoint_for)
        self.assertEqual(self.failureResultOf(opening, StreamOpenError).value.reason,
                         Reason.NO_TUNNEL)

    def test_endpoint_callable(self):
        """A callable is called once, at once, for the endpoint."""
        self.results = []
        open_and_splice(self.user, lambda: self.endpoint).addBoth(self.results.append)
        target = self.endpoint.succeed()
        self.assertEqual(self.results, [target])

    def test_target_closed_before_splice(self):
        """A target lost before the splice fails the open with GENERAL_FAILURE."""
        self.open()
        transport = HalfCloseTransport()
        target = self.endpoint.factory.buildProtocol(None)
        target.makeConnection(transport)
        target.connectionLost(lost())
        self.endpoint.connecting.callback(target)
        [failure] = self.results
        failure.trap(StreamOpenError)
        self.assertEqual(failure.value.reason, Reason.GENERAL_FAILURE)
        self.assertIsNone(self.user.other)

    def test_user_leaves_while_opening(self):
        """A user who leaves cancels the open; the result is None, not a failure."""
        self.open()
        self.user.connectionLost(lost())
        self.assertTrue(self.endpoint.cancelled)
        self.assertEqual(self.results, [None])

    def test_target_arrives_after_user_left(self):
        """A target that opens although the user left (cancel too late) is closed."""
        late = HalfCloseTransport()
        self.endpoint._cancel = lambda connecting: self.endpoint.succeed(late)
        self.open()
        self.user.connectionLost(lost())
        self.assertEqual(self.results, [None])
        self.assertTrue(late.disconnecting)

    def test_cancel(self):
        """Cancelling the returned Deferred cancels the open."""
        opening = self.open()
        opening.cancel()
        self.assertTrue(self.endpoint.cancelled)
        [failure] = self.results
        failure.trap(CancelledError)

    def test_half_close_after_splice(self):
        """Half-close and close carry through a splice made by the helper."""
        self.open()
        target = self.endpoint.succeed()
        target.readConnectionLost()
        self.assertEqual(self.user.transport.calls, ["loseWriteConnection"])
        self.user.connectionLost(lost())
        self.assertEqual(target.transport.calls, ["loseConnection"])


@implementer(IEarlyDataEndpoint)
class FakeEarlyEndpoint(FakeEndpoint):
    """A L{FakeEndpoint} whose connection takes bytes before it is open: C{early} records them."""

    def connect_early(self, factory, opening):
        self.early = HalfCloseTransport()
        connecting = self.connect(factory)
        opening(self.early)
        return connecting

    def succeed(self, transport=None):
        return super().succeed(transport if transport is not None else self.early)


class EarlyDataSpliceTests(SynchronousTestCase):
    """open_and_splice(early_data=True): bytes go to the opening connection at once."""

    def setUp(self):
        self.user = connected_end()

    def test_held_and_later_bytes_go_at_once(self):
        """Bytes held before the open and those during it are written at once, once, in order."""
        endpoint = FakeEarlyEndpoint()
        self.user.dataReceived(b"before ")
        open_and_splice(self.user, endpoint, read_while_opening=100, early_data=True)
        self.assertEqual(endpoint.early.value(), b"before ")
        self.user.dataReceived(b"during")
        self.user.readConnectionLost()
        self.assertEqual(endpoint.early.value(), b"before during")
        self.assertEqual(endpoint.early.calls, [])  # no EOF before the open
        target = endpoint.succeed()
        self.assertEqual(target.transport.value(), b"before during")
        self.assertEqual(target.transport.calls, ["loseWriteConnection"])
        self.user.dataReceived(b", spliced")
        self.assertEqual(target.transport.value(), b"before during, spliced")

    def test_at_most_read_while_opening_go_early(self):
        """
        read_while_opening bytes at most go to the opening connection; the
        rest is held, reading pauses, and the join passes it on in order.
        """
        endpoint = FakeEarlyEndpoint()
        self.user.dataReceived(b"0123456")
        open_and_splice(self.user, endpoint, read_while_opening=10, early_data=True)
        self.assertEqual(endpoint.early.value(), b"0123456")
        self.user.dataReceived(b"789")
        self.assertEqual(self.user.transport.producerState, "producing")
        self.user.dataReceived(b"abc")
        self.assertEqual(self.user.transport.producerState, "paused")
        self.assertEqual(endpoint.early.value(), b"0123456789")
        target = endpoint.succeed()
        self.assertEqual(self.user.transport.producerState, "producing")
        self.assertEqual(target.transport.value(), b"0123456789abc")

    def test_held_past_the_limit_before_the_open(self):
        """Bytes held past the limit before the connection exists: the first go early, the rest wait."""
        endpoint = FakeEarlyEndpoint()
        self.user.dataReceived(b"0123456789abc")
        open_and_splice(self.user, endpoint, read_while_opening=10, early_data=True)
        self.assertEqual(self.user.transport.producerState, "paused")
        self.assertEqual(endpoint.early.value(), b"0123456789")
        self.user.dataReceived(b"def")
        self.assertEqual(endpoint.early.value(), b"0123456789")
        target = endpoint.succeed()
        self.assertEqual(target.transport.value(), b"0123456789abcdef")

    def test_needs_a_bound(self):
        """early_data without read_while_opening is a programming error."""
        self.assertRaises(ValueError, open_and_splice, self.user, FakeEarlyEndpoint(),
                          read_while_opening=None, early_data=True)

    def test_failed_open_stops_sending(self):
        """After a failed open nothing more is written to the connection that failed."""
        endpoint = FakeEarlyEndpoint()
        results = []
        open_and_splice(self.user, endpoint, read_while_opening=100,
                        early_data=True).addBoth(results.append)
        self.user.dataReceived(b"first")
        endpoint.fail(StreamOpenError(Reason.CONNECTION_REFUSED, "refused"))
        results[0].trap(StreamOpenError)
        self.user.dataReceived(b"second")
        self.assertEqual(endpoint.early.value(), b"first")

    def test_other_endpoints_hold(self):
        """An endpoint without early data: the bytes are held until the join, as without the flag."""
        endpoint = FakeEndpoint()
        open_and_splice(self.user, endpoint, read_while_opening=100, early_data=True)
        self.user.dataReceived(b"held")
        target = endpoint.succeed()
        self.assertEqual(target.transport.value(), b"held")


class _Collect(Protocol):
    """Gathers what it receives; C{made} fires with itself once connected."""

    def __init__(self):
        self.received = b""
        self.made = Deferred()
        self.lost = Deferred()
        self.got = None

    def connectionMade(self):
        self.made.callback(self)

    def connectionLost(self, reason):
        self.lost.callback(None)

    def dataReceived(self, data):
        self.received += data
        if self.got is not None and len(self.received) >= self.got[0]:
            got, self.got = self.got[1], None
            got.callback(self.received)

    def wait_for(self, size):
        """A Deferred firing once C{size} bytes have arrived."""
        if len(self.received) >= size:
            return succeed(self.received)
        self.got = (size, Deferred())
        return self.got[1]


class WriteNowTests(TestCase):
    """write_now sends at once on an idle plain TCP transport, and otherwise writes as usual."""

    def test_other_transport(self):
        """A transport that is not plain TCP gets an ordinary write."""
        transport = StringTransport()
        write_now(transport, b"hello")
        self.assertEqual(transport.value(), b"hello")

    @inlineCallbacks
    def connected_pair(self):
        server = _Collect()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Collect()
        reactor.connectTCP("127.0.0.1", port.getHost().port,
                           ClientFactory.forProtocol(lambda: client))
        yield client.made
        yield server.made

        def close():
            client.transport.loseConnection()
            server.transport.loseConnection()
            return gatherResults([client.lost, server.lost])
        self.addCleanup(close)
        return client, server

    @inlineCallbacks
    def test_sent_at_once(self):
        """On an idle TCP transport the bytes leave in the call: nothing is buffered."""
        client, server = yield self.connected_pair()
        write_now(client.transport, b"hello")
        self.assertEqual((client.transport.dataBuffer, client.transport._tempDataLen), (b"", 0))
        received = yield server.wait_for(5)
        self.assertEqual(received, b"hello")

    @inlineCallbacks
    def test_sent_at_once_when_tuned_for_bulk(self):
        """
        A splice end's transport, which tune_for_bulk gives a class of its own
        (GatherWrites), is still plain TCP: the bytes leave in the call.
        """
        client, server = yield self.connected_pair()
        tune_for_bulk(client.transport)
        self.assertNotIn(type(client.transport), (tcp.Server, tcp.Client))
        write_now(client.transport, b"hello")
        self.assertEqual((client.transport.dataBuffer, client.transport._tempDataLen), (b"", 0))
        received = yield server.wait_for(5)
        self.assertEqual(received, b"hello")

    @inlineCallbacks
    def test_keeps_order_behind_buffered(self):
        """With bytes already buffered, write_now queues behind them."""
        client, server = yield self.connected_pair()
        client.transport.write(b"first ")
        write_now(client.transport, b"second")
        self.assertEqual(client.transport._tempDataBuffer, [b"first ", b"second"])
        received = yield server.wait_for(12)
        self.assertEqual(received, b"first second")

    @inlineCallbacks
    def test_not_after_close(self):
        """After loseConnection it leaves the bytes to Twisted's own write."""
        client, server = yield self.connected_pair()
        client.transport.loseConnection()
        write_now(client.transport, b"late")
        self.assertEqual(client.transport._tempDataBuffer, [b"late"])

    @inlineCallbacks
    def test_bulk_goes_through_twisted(self):
        """A write of WRITE_NOW_BELOW bytes or more is left to Twisted's buffer."""
        client, server = yield self.connected_pair()
        data = b"x" * WRITE_NOW_BELOW
        write_now(client.transport, data)
        self.assertEqual(client.transport._tempDataBuffer, [data])
        received = yield server.wait_for(len(data))
        self.assertEqual(received, data)


class HalfCloseNowTests(TestCase):
    """half_close_now shuts an idle plain TCP transport's write side in the call."""

    connected_pair = WriteNowTests.connected_pair

    def test_other_transport(self):
        """A transport that is not plain TCP gets its own loseWriteConnection."""
        transport = HalfCloseTransport()
        half_close_now(transport)
        self.assertEqual(transport.calls, ["loseWriteConnection"])

    @inlineCallbacks
    def test_shut_at_once(self):
        """
        On an idle TCP transport the socket's write side is shut in the
        call; the peer sees EOF, and a later loseConnection closes at once.
        """
        client, server = yield self.connected_pair()
        half_close_now(client.transport)
        self.assertRaises(BrokenPipeError, client.transport.socket.send, b"x")
        self.assertTrue(client.transport._writeDisconnected)
        client.transport.write(b"late")  # ignored, as after Twisted's half-close
        self.assertEqual(client.transport._tempDataBuffer, [])
        yield server.lost
        self.assertEqual(server.received, b"")
        client.transport.loseConnection()
        self.assertTrue(client.lost.called)

    @inlineCallbacks
    def test_buffered_goes_through_twisted(self):
        """With bytes buffered, the half-close waits behind them, as Twisted's does."""
        client, server = yield self.connected_pair()
        client.transport.write(b"first")
        half_close_now(client.transport)
        self.assertFalse(client.transport._writeDisconnected)
        yield server.lost
        self.assertEqual(server.received, b"first")

    @inlineCallbacks
    def test_splice_end(self):
        """A splice end passing EOF on shuts its TCP side at once and records it."""
        client, server = yield self.connected_pair()
        end = SpliceEnd()
        end.makeConnection(client.transport)
        end.shut_down_write()
        self.assertTrue(end._write_closed)
        self.assertRaises(BrokenPipeError, client.transport.socket.send, b"x")
        yield server.lost
