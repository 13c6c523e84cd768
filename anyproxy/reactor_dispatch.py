# -*- test-case-name: tests.test_reactor_dispatch -*-
"""
The reactor's socket events handed out without a log context each.

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

Only Twisted's epoll reactor (twistd's default on Linux) is changed.
"""

import errno
import types

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log as legacy_log

__all__ = ["dispatch_directly"]


def dispatch_directly(reactor):
    """
    Make C{reactor} hand out socket events without a log context each.

    @return: C{True} if it did; C{False} for a reactor other than Twisted's
        epoll reactor, which is left as it is.
    """
    if not isinstance(reactor, EPollReactor):
        return False
    reactor.doIteration = types.MethodType(_poll_and_dispatch, reactor)
    return True


def _poll_and_dispatch(reactor, timeout):
    """C{EPollReactor.doPoll}, calling C{_doReadOrWrite} without C{callWithLogger}."""
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


_BUGGY_PREFIX = "(buggy logPrefix method)"  # what callWithLogger says too


def _log_prefix(selectable):
    try:
        return selectable.logPrefix()
    except KeyboardInterrupt:
        raise
    except BaseException:
        legacy_log.err(system=_BUGGY_PREFIX)
        return _BUGGY_PREFIX
