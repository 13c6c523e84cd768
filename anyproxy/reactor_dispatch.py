# -*- test-case-name: tests.test_reactor_dispatch -*-
"""
The reactor's socket events handed out without a log context each, and
calls run when a turn's events are handled.

Twisted's epoll reactor runs every ready socket's C{doRead}/C{doWrite}
inside C{twisted.python.log.callWithLogger}: it asks the socket for its
C{logPrefix}, copies the legacy log context with C{system} set to it, pushes
that on a thread-local stack and pops it afterwards.  The prefix reaches only
messages logged through the legacy C{twisted.python.log}; AnyProxy logs
through C{twisted.logger}, whose events carry their own namespace.  A new
CONNECT tunnel is a dozen socket events across the gateway and the client,
and the context cost about 5% of the gateway's CPU per tunnel and 7% of the
client's (benchmarks/results/open-profile.md).

L{dispatch_directly} gives the reactor a C{doIteration} that polls as
Twisted's does and calls its C{_doReadOrWrite} directly.  What stays as it
was: a socket error or an exception in C{doRead}/C{doWrite} still disconnects
that socket and is logged by Twisted, and an exception escaping the handling
(a protocol's C{connectionLost}) is logged as an unhandled error under the
socket's log prefix, as C{callWithLogger} logs it.  What changes: legacy
messages logged while handling an event, Twisted's own unhandled-error
report from C{doRead} among them, show C{-} as their system instead of the
socket's prefix; the traceback is unchanged.

The patched reactor also runs I{turn-end calls}: L{turn_end_clock} gives a
clock whose C{callLater(0, f)} runs C{f} once the socket events of the
current turn are handled, before the reactor waits again.  Twisted's TLS
layer gathers one turn's small writes that way (a C{callLater(0)}), so that
they leave as one record; through the reactor's timers that cost a
C{DelayedCall}, two heap operations and a pass of C{runUntilCurrent} per
gathered write, about a tenth of the Python work of relaying a small message
through the tunnel.  A turn-end call is an entry in a list.  One made outside
the handling of events (from a timer) runs before the next poll, which then
does not block, since what it did may have started timers.  An exception in
one is logged, and the others still run.

Only Twisted's epoll reactor (twistd's default on Linux) is changed; for any
other, L{turn_end_clock} returns the reactor itself.
"""

import errno
import types

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.python import log as legacy_log

__all__ = ["dispatch_directly", "turn_end_clock"]

log = Logger()


def dispatch_directly(reactor):
    """
    Make C{reactor} hand out socket events without a log context each.

    @return: C{True} if it did; C{False} for a reactor other than Twisted's
        epoll reactor, which is left as it is.
    """
    if not isinstance(reactor, EPollReactor):
        return False
    if not hasattr(reactor, "_turn_end_calls"):
        reactor._turn_end_calls = []
        reactor._turn_end_clock = _TurnEndClock(reactor)
    reactor.doIteration = types.MethodType(_poll_and_dispatch, reactor)
    return True


def turn_end_clock(reactor):
    """
    A clock for C{reactor} whose C{callLater(0, f)} is a turn-end call (see
    the module docstring) and whose other methods are the reactor's; the
    reactor itself if L{dispatch_directly} did not patch it.
    """
    return getattr(reactor, "_turn_end_clock", reactor)


class _TurnEndCall:
    """What L{_TurnEndClock.callLater} returns: C{cancel} and C{active} as a C{DelayedCall}'s."""

    __slots__ = ("call",)

    def __init__(self, call):
        self.call = call

    def cancel(self):
        self.call = None

    def active(self):
        return self.call is not None


class _TurnEndClock:
    """
    C{IReactorTime} over a patched reactor: C{callLater} with a delay of 0
    and no arguments is a turn-end call; everything else is the reactor's.
    C{getDelayedCalls} lists the reactor's timers only.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._calls = reactor._turn_end_calls
        # The reactor's own methods: streams read the time once per DATA frame.
        self.seconds = reactor.seconds
        self.getDelayedCalls = reactor.getDelayedCalls

    def callLater(self, delay, call, *args, **kwargs):
        if delay or args or kwargs:
            return self._reactor.callLater(delay, call, *args, **kwargs)
        pending = _TurnEndCall(call)
        self._calls.append(pending)
        return pending


def _end_turn(calls):
    """Run the turn-end calls in C{calls}, and those they add, emptying it."""
    while calls:
        batch = calls[:]
        del calls[:]
        for index, pending in enumerate(batch):
            call = pending.call
            if call is None:
                continue  # cancelled
            pending.call = None
            try:
                call()
            except KeyboardInterrupt:
                calls[:0] = batch[index + 1:]  # the rest still runs, if the reactor goes on
                raise
            except BaseException:
                log.failure("Unhandled error in a turn-end call {call!r}", call=call)


def _poll_and_dispatch(reactor, timeout):
    """C{EPollReactor.doPoll}, calling C{_doReadOrWrite} without C{callWithLogger}."""
    ending = reactor._turn_end_calls
    if ending:
        # Made since the last poll (by a timer): they may start timers that
        # the timeout given did not count, so the poll does not wait.
        _end_turn(ending)
        timeout = 0
    if timeout is None:
        timeout = -1
    try:
        events = reactor._poller.poll(timeout, len(reactor._selectables))
    except OSError as error:
        if error.errno == errno.EINTR:
            return
        raise
    handle = reactor._doReadOrWrite
    selectable_of = reactor._selectables.get
    for fd, event in events:
        selectable = selectable_of(fd)
        if selectable is None:
            continue
        try:
            handle(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            legacy_log.err(system=_log_prefix(selectable))
    if ending:
        _end_turn(ending)


_BUGGY_PREFIX = "(buggy logPrefix method)"  # what callWithLogger says too


def _log_prefix(selectable):
    try:
        return selectable.logPrefix()
    except KeyboardInterrupt:
        raise
    except BaseException:
        legacy_log.err(system=_BUGGY_PREFIX)
        return _BUGGY_PREFIX
