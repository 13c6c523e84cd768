# -*- test-case-name: tests.test_limits -*-
"""
Connection limits with a bounded waiting queue.

Theory of operation
-------------------
A L{Limiter} is a set of counting semaphores, one per key (a user name, a
listener, or a single key for the whole client).  C{acquire(key)} returns a
Deferred that fires with a L{Release} callable once one of the key's
C{limit} slots is free; calling it gives the slot back.

When every slot is taken the request waits in the key's FIFO queue, which is
bounded twice:

  - in length (C{queue_size}): a request that finds the queue full fails at
    once;
  - in time (C{queue_timeout}): a request still waiting after that long
    fails.

Either way it fails with L{StreamOpenError} C{OVERLOADED}, which the
frontends show as SOCKS5 REP 0x01 / HTTP 503 (L{anyproxy.errors}).  A
waiter that gives up (its Deferred is cancelled, e.g. because the user
disconnected) leaves the queue at once.  Slots freed by a release go to the
head of the queue first, so waiters are served in arrival order and a newcomer
never overtakes them.

Nothing grows without bound: a key's entry exists only while it holds a slot
or has a waiter, each key has at most C{limit} holders and C{queue_size}
waiters, and every waiter has one timer on the injected clock.

There is no I/O here, only Deferreds and the clock, so the tests drive it on
a L{twisted.internet.task.Clock}.  The limits may be changed while running
(L{Limiter.configure}, for a config reload): a raised limit admits waiters at
once, a lowered one lets holders finish and admits nobody until they have.
"""

import collections

from twisted.internet import defer

from anyproxy.errors import Reason, StreamOpenError

# Defaults for gateway.queue_size / gateway.queue_timeout and the client's
# keys of the same names (the config model takes them from here): enough to
# ride out a burst, short enough that a user waiting in the queue still gets
# an answer before giving up.
DEFAULT_QUEUE_SIZE = 100
DEFAULT_QUEUE_TIMEOUT = 5.0
# Defaults for client.max_concurrent_conns and gateway.max_conns_per_user,
# sized for a small office.  A stream costs a client about 10 KiB, so 1024 of
# them are cheap; a browser opens up to 6 connections per host, so a few
# people browsing reach the hundreds.  The per-user limit is a quarter of a
# client's capacity: no single user can take all of it, and the others of the
# group keep getting slots (their streams never wait behind that user's).
# Keep DEFAULT_MAX_CONNS_PER_USER below DEFAULT_MAX_CONCURRENT_CONNS
# (tests.test_limits checks it).
DEFAULT_MAX_CONCURRENT_CONNS = 1024
DEFAULT_MAX_CONNS_PER_USER = 256


class Release:
    """
    Gives one slot back when called.  Calling it again does nothing, so every
    path that may end a stream can call it without bookkeeping.
    """

    __slots__ = ("_release",)

    def __init__(self, release):
        self._release = release

    def __call__(self):
        release, self._release = self._release, None
        if release is not None:
            release()

    @property
    def released(self):
        """C{True} once the slot has been given back."""
        return self._release is None


class _Key:
    """The slots and the queue of one key."""

    __slots__ = ("active", "queue")

    def __init__(self):
        self.active = 0
        self.queue = collections.deque()  # of _Waiter


class _Waiter:
    __slots__ = ("deferred", "timer")

    def __init__(self):
        self.deferred = None
        self.timer = None


class Limiter:
    """
    Counting semaphores by key, each with a bounded FIFO queue.

    @param clock: an C{IReactorTime} for the queue timeouts.
    @param limit: slots per key; C{0} means unlimited (C{acquire} always
        succeeds at once, and slots are still counted).
    @param queue_size: waiters per key at most; C{0} means no queue (a
        request finding every slot taken fails at once).  The defaults of
        both are the config's (C{queue_size}, C{queue_timeout}).
    @param queue_timeout: seconds a waiter may wait; C{0} means no queue.
    @param what: names the limit in the error text (e.g.
        C{"max_conns_per_user"}); shown to users and logs, so never a secret.
    """

    def __init__(self, clock, limit=0, queue_size=DEFAULT_QUEUE_SIZE,
                 queue_timeout=DEFAULT_QUEUE_TIMEOUT, what="limit"):
        self._clock = clock
        self.limit = limit
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.what = what
        self._keys = {}
        self._key_limits = {}  # key -> (its own limit, what names it): see set_key_limit
        self.refused = 0  # requests failed OVERLOADED (queue full or timed out)

    # -- the public API ---------------------------------------------------

    def acquire(self, key=None):
        """
        A slot for C{key}.

        @return: a Deferred firing with a L{Release} once a slot is held, or
            failing with L{StreamOpenError} C{OVERLOADED} if the queue is
            full or the wait reaches C{queue_timeout}.  Cancelling it while
            it waits takes the request out of the queue.
        """
        release = self.try_acquire(key)
        if release is not None:
            return defer.succeed(release)
        entry = self._keys[key]
        if (self.queue_size <= 0 or self.queue_timeout <= 0
                or len(entry.queue) >= self.queue_size):
            self.refused += 1
            return defer.fail(StreamOpenError(
                Reason.OVERLOADED, "%s reached and its queue is full" % (self._what(key),)))
        waiter = _Waiter()
        waiter.deferred = defer.Deferred(lambda d: self._cancelled(key, entry, waiter))
        waiter.timer = self._clock.callLater(
            self.queue_timeout, self._expired, key, entry, waiter)
        entry.queue.append(waiter)
        return waiter.deferred

    def try_acquire(self, key=None):
        """A L{Release} for a slot of C{key} if one is free now (nobody waiting), else C{None}."""
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key()
        elif entry.queue or not self._has_room(key, entry):
            return None
        entry.active += 1
        return self._release_for(key, entry)

    def active(self, key=None):
        """How many slots C{key} holds now."""
        entry = self._keys.get(key)
        return entry.active if entry is not None else 0

    def waiting(self, key=None):
        """How many requests for C{key} are queued now."""
        entry = self._keys.get(key)
        return len(entry.queue) if entry is not None else 0

    def keys(self):
        """The keys holding a slot or waiting (a snapshot list)."""
        return list(self._keys)

    def totals(self):
        """C{(slots held, requests waiting)} over every key."""
        active = waiting = 0
        for entry in self._keys.values():
            active += entry.active
            waiting += len(entry.queue)
        return active, waiting

    def set_key_limit(self, key, limit, what=None):
        """
        Give C{key} a limit of its own instead of L{limit} (C{None}: the
        shared one again), named C{what} in refusals.  The slots it holds
        are kept and counted against the new limit; a raised one admits
        its waiters now.
        """
        if limit is None:
            self._key_limits.pop(key, None)
        else:
            self._key_limits[key] = (limit, what or self.what)
        entry = self._keys.get(key)
        if entry is not None:
            self._admit(key, entry)

    def configure(self, limit=None, queue_size=None, queue_timeout=None):
        """
        Change the limits while running (a reload).  Holders keep their
        slots; a raised limit admits waiters now.  Waiters keep the timeout
        they started with.
        """
        if limit is not None:
            self.limit = limit
        if queue_size is not None:
            self.queue_size = queue_size
        if queue_timeout is not None:
            self.queue_timeout = queue_timeout
        for key, entry in list(self._keys.items()):
            self._admit(key, entry)

    # -- inside -----------------------------------------------------------

    def _has_room(self, key, entry):
        own = self._key_limits.get(key) if self._key_limits else None
        limit = self.limit if own is None else own[0]
        return not limit or entry.active < limit

    def _what(self, key):
        own = self._key_limits.get(key) if self._key_limits else None
        return self.what if own is None else own[1]

    def _release_for(self, key, entry):
        return Release(lambda: self._released(key, entry))

    def _released(self, key, entry):
        entry.active -= 1
        self._admit(key, entry)

    def _admit(self, key, entry):
        # Hand free slots to the head of the queue.  The count is taken
        # before the waiter's callbacks run, so one that releases (or
        # acquires) at once from inside its callback sees a consistent state.
        while entry.queue and self._has_room(key, entry):
            waiter = entry.queue.popleft()
            if waiter.timer.active():
                waiter.timer.cancel()
            entry.active += 1
            waiter.deferred.callback(self._release_for(key, entry))
        self._forget_if_idle(key, entry)

    def _expired(self, key, entry, waiter):
        if waiter in entry.queue:
            entry.queue.remove(waiter)
        self._forget_if_idle(key, entry)
        self.refused += 1
        waiter.deferred.errback(StreamOpenError(
            Reason.OVERLOADED, "%s reached; no slot within %gs" % (self._what(key), self.queue_timeout)))

    def _cancelled(self, key, entry, waiter):
        # The Deferred then fails with CancelledError (Deferred.cancel does it).
        if waiter in entry.queue:
            entry.queue.remove(waiter)
        if waiter.timer.active():
            waiter.timer.cancel()
        self._forget_if_idle(key, entry)

    def _forget_if_idle(self, key, entry):
        if not entry.active and not entry.queue and self._keys.get(key) is entry:
            del self._keys[key]


def acquire_all(requests):
    """
    Slots from several limiters, taken in the order given (for example the
    user's, then the listener's).

    @param requests: C{[(limiter, key)]}.
    @return: a Deferred firing with one L{Release} for them all, or failing
        as the first refusal does (slots already taken are given back).
        Cancelling it cancels the wait in progress and gives back the rest.
    """
    held = []

    def release_all():
        while held:
            held.pop()()

    # The usual case, every slot free now, needs no Deferred chain.
    requests = list(requests)
    while requests:
        limiter, key = requests[0]
        release = limiter.try_acquire(key)
        if release is None:
            break
        held.append(release)
        requests.pop(0)
    if not requests:
        return defer.succeed(Release(release_all))

    d = defer.succeed(None)
    for limiter, key in requests:
        d.addCallback(lambda _, limiter=limiter, key=key: limiter.acquire(key))
        d.addCallback(held.append)

    def failed(failure):
        release_all()
        return failure

    d.addCallbacks(lambda _: Release(release_all), failed)
    return d

