"""Tests for L{anyproxy.reactor_dispatch}."""

import socket

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import context, log as legacy_log
from twisted.trial import unittest

from anyproxy.reactor_dispatch import dispatch_directly


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
        self.addCleanup(self._close_reactor)  # before the sockets close
        self.assertTrue(dispatch_directly(self.reactor))
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def _close_reactor(self):
        self.reactor.removeAll()
        self.reactor.removeReader(self.reactor.waker)
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

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
