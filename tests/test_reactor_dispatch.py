"""Tests for L{anyproxy.reactor_dispatch}."""

import socket
import time

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import context, log as legacy_log
from twisted.trial import unittest

from anyproxy.reactor_dispatch import dispatch_directly, turn_end_clock


class _Reader:
    """A readable socket end for the reactor, recording what it is told."""

    prefix = "Reader,7,127.0.0.1"

    def __init__(self, sock, read=None, lost=None):
        self._sock = sock
        self._read = read
        self._lost = lost
        self.systems_seen = []
        self.lost_with = []

    def fileno(self):
        return self._sock.fileno()

    def logPrefix(self):
        return self.prefix

    def doRead(self):
        self.systems_seen.append(context.get(legacy_log.ILogContext)["system"])
        self._sock.recv(100)
        if self._read is not None:
            return self._read()

    def connectionLost(self, reason):
        self.lost_with.append(reason)
        if self._lost is not None:
            self._lost()


def _close_reactor(reactor):
    reactor.removeAll()
    reactor.removeReader(reactor.waker)
    reactor.waker.connectionLost(None)
    reactor._poller.close()


def _raise(exception):
    def go():
        raise exception
    return go


class DispatchDirectlyTests(unittest.TestCase):
    """A private epoll reactor, patched, handles a socket pair's events."""

    def setUp(self):
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.reactor = EPollReactor()
        self.addCleanup(_close_reactor, self.reactor)  # before the sockets close
        self.assertTrue(dispatch_directly(self.reactor))
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def _ready(self, reader):
        self.reactor.addReader(reader)
        self.theirs.send(b"x")
        self.reactor.doIteration(0)

    def test_read_without_log_context(self):
        """
        A ready socket's doRead runs, without the legacy log context
        Twisted's own loop pushes for it (its system would be the prefix).
        """
        reader = _Reader(self.ours)
        self._ready(reader)
        self.assertEqual(reader.systems_seen, ["-"])
        self.assertEqual(reader.lost_with, [])

    def test_read_error_disconnects_and_is_logged(self):
        """An exception in doRead disconnects the socket and is logged, as before."""
        reader = _Reader(self.ours, read=_raise(RuntimeError("bug in doRead")))
        self._ready(reader)
        self.assertEqual(len(reader.lost_with), 1)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_error_after_read_logged_with_prefix(self):
        """
        An exception escaping the handling (here from connectionLost) is
        logged as an unhandled error under the socket's log prefix, and the
        loop goes on.
        """
        reader = _Reader(self.ours, read=_raise(RuntimeError("bug in doRead")),
                         lost=_raise(ValueError("bug in connectionLost")))
        self._ready(reader)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        systems = [event.get("log_system") for event in self.events
                   if event.get("failure") and event["failure"].check(ValueError)]
        self.assertEqual(systems, [_Reader.prefix])

    def test_keyboard_interrupt_goes_up(self):
        """
        Ctrl-C while a socket is disconnected stops the loop, as under
        Twisted's own (which logs it instead when it comes from doRead).
        """
        reader = _Reader(self.ours, read=_raise(RuntimeError("bug in doRead")),
                         lost=_raise(KeyboardInterrupt()))
        self.reactor.addReader(reader)
        self.theirs.send(b"x")
        self.assertRaises(KeyboardInterrupt, self.reactor.doIteration, 0)
        self.flushLoggedErrors(RuntimeError)

    def test_unknown_descriptor_skipped(self):
        """An event for a descriptor no longer watched is ignored."""
        reader = _Reader(self.ours)
        self.reactor.addReader(reader)
        self.theirs.send(b"x")
        self.reactor._selectables.pop(self.ours.fileno())
        self.reactor.doIteration(0)
        self.assertEqual(reader.systems_seen, [])
        self.reactor._selectables[self.ours.fileno()] = reader


class OtherReactorTests(unittest.TestCase):

    def test_other_reactors_left_alone(self):
        """A reactor other than epoll is not changed."""
        reactor = MemoryReactorClock()
        before = reactor.__dict__.copy()
        self.assertFalse(dispatch_directly(reactor))
        self.assertEqual(reactor.__dict__, before)


class TurnEndCallTests(unittest.TestCase):
    """
    turn_end_clock: callLater(0, f) on a patched reactor runs f once the
    turn's socket events are handled, before the reactor waits again.
    """

    def setUp(self):
        self.pairs = [socket.socketpair() for _ in range(2)]
        for pair in self.pairs:
            for end in pair:
                self.addCleanup(end.close)
        self.reactor = EPollReactor()
        self.addCleanup(_close_reactor, self.reactor)
        self.assertTrue(dispatch_directly(self.reactor))
        self.clock = turn_end_clock(self.reactor)
        self.order = []

    def _ready_both(self, first_read):
        readers = [_Reader(self.pairs[0][0], read=first_read),
                   _Reader(self.pairs[1][0], read=lambda: self.order.append("second read"))]
        for reader in readers:
            self.reactor.addReader(reader)
        for pair in self.pairs:
            pair[1].send(b"x")
        return readers

    def test_after_every_event_of_the_turn(self):
        """A call made while handling one socket's event runs after the turn's other events."""
        def first():
            self.order.append("first read")
            self.clock.callLater(0, self.order.append, "unused")  # arguments: a reactor timer
            self.clock.callLater(0, lambda: self.order.append("turn end"))
        # Which socket epoll reports first is its business: record both orders.
        self._ready_both(first)
        self.reactor.doIteration(0)
        self.assertEqual(sorted(self.order[:2]), ["first read", "second read"])
        self.assertEqual(self.order[2:], ["turn end"])
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)

    def test_made_outside_a_turn_runs_before_the_poll(self):
        """A call made outside event handling (as from a timer) runs at the next
        iteration, and that iteration's poll does not wait."""
        self.clock.callLater(0, lambda: self.order.append("ran"))
        started = time.monotonic()
        self.reactor.doIteration(30)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(self.order, ["ran"])

    def test_cancelled_not_run(self):
        call = self.clock.callLater(0, lambda: self.order.append("ran"))
        self.assertTrue(call.active())
        call.cancel()
        self.assertFalse(call.active())
        self.reactor.doIteration(0)
        self.assertEqual(self.order, [])

    def test_added_while_running_run_in_the_same_turn(self):
        self.clock.callLater(0, lambda: self.clock.callLater(0, lambda: self.order.append("added")))
        self.reactor.doIteration(0)
        self.assertEqual(self.order, ["added"])

    def test_error_logged_and_others_run(self):
        """An exception in one call is logged; the calls after it still run."""
        self.clock.callLater(0, _raise(RuntimeError("bug in a turn-end call")))
        call = self.clock.callLater(0, lambda: self.order.append("after"))
        self.reactor.doIteration(0)
        self.assertEqual(self.order, ["after"])
        self.assertFalse(call.active())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_delays_are_the_reactors(self):
        """A delay other than 0 is an ordinary reactor timer; seconds() is the reactor's."""
        timer = self.clock.callLater(1, self.order.append, "later")
        self.assertEqual(self.reactor.getDelayedCalls(), [timer])
        self.assertEqual(self.clock.getDelayedCalls(), [timer])
        timer.cancel()
        self.assertLess(abs(self.clock.seconds() - self.reactor.seconds()), 1)

    def test_unpatched_reactor_is_its_own_clock(self):
        """For a reactor dispatch_directly did not patch, the clock is the reactor."""
        reactor = MemoryReactorClock()
        self.assertIs(turn_end_clock(reactor), reactor)

    def test_interrupt_keeps_the_rest(self):
        """Ctrl-C in one call goes up; the calls after it wait for the next turn, not lost."""
        self.clock.callLater(0, _raise(KeyboardInterrupt()))
        self.clock.callLater(0, lambda: self.order.append("after"))
        self.assertRaises(KeyboardInterrupt, self.reactor.doIteration, 0)
        self.assertEqual(self.order, [])
        self.reactor.doIteration(0)
        self.assertEqual(self.order, ["after"])
