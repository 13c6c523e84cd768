# -*- test-case-name: tests.test_bandwidth -*-
"""
Per-user bandwidth caps (C{gateway.users[].bandwidth}): a token bucket each
way, shared by all of the user's streams.

Theory of operation
-------------------
A L{TokenBucket} holds up to C{burst} tokens, one per byte, and gains
C{rate} tokens a second.  It starts full, so a user's first second of
traffic goes at full speed (the burst: one second's worth, L{default_burst})
and from then on at most C{rate} bytes a second: by time M{t} after it was
made, no more than M{rate * t + burst} bytes have been let through.

A L{Shaper} is one direction of one stream: bytes go in (L{Shaper.push}),
and come out (L{Shaper.pull}) in order, whole or split, as far as the bucket
allows; L{Shaper.wait} says when more can.  Nothing is dropped: what the
bucket does not allow yet is held.  It releases at least L{Shaper.quantum}
bytes at a time (or all it holds), so a capped stream wakes up some tens of
times a second, not once per byte.

Both are sans-I/O: they take the time as an argument.  L{ShapedFlow} is the
thin adapter on a clock (C{IReactorTime.callLater}) that a
L{anyproxy.tunnel.stream.Stream} uses (L{anyproxy.tunnel.stream.Stream.shape}).
Held bytes are the backpressure, never a loss: an upload held counts as the
stream's queued bytes, so the user's connection is paused at the stream's
high-water mark; a download held is not credited to the client, whose
window then stops the sender (and, at the client, the target's reads).  A
stream without a cap has no L{ShapedFlow} and costs nothing.

L{BandwidthLimits} keeps the buckets by user name; a reload changes the
rates in place, so open streams follow the new cap (0: unlimited) at once.
"""

import collections

# The fewest bytes a shaped flow releases at a time (unless it holds fewer),
# and the most: about fifty wake-ups a second at any rate above 3 MB/s.
MIN_QUANTUM = 1024
MAX_QUANTUM = 64 * 1024
# Timers shorter than this are rounded up: a clock's resolution, no busy loop.
MIN_WAIT = 0.001


def default_burst(rate):
    """The burst of a cap of C{rate} bytes a second: one second's worth."""
    return rate


class TokenBucket:
    """
    A token bucket: C{rate} tokens (bytes) a second, up to C{burst}.

    @ivar rate: bytes per second; C{0} means unlimited (every L{take} is
        granted in full).
    @ivar burst: the most tokens it holds, and what it starts with.
    """

    def __init__(self, rate, now, burst=None):
        """
        @param rate: bytes per second (0: unlimited).
        @param now: the time, in seconds, of the clock later calls use.
        @param burst: the bucket's size; C{None}: L{default_burst}.
        """
        self.rate = rate
        self.burst = default_burst(rate) if burst is None else burst
        self._tokens = float(self.burst)
        self._stamp = now

    def _refill(self, now):
        if now > self._stamp:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def configure(self, rate, now, burst=None):
        """
        Change the rate (a reload): tokens earned so far are kept, up to
        the new burst; a new limit on an unlimited bucket starts full.
        """
        if self.rate:
            self._refill(now)
        else:
            self._tokens, self._stamp = float("inf"), now
        self.rate = rate
        self.burst = default_burst(rate) if burst is None else burst
        self._tokens = min(self._tokens, float(self.burst))

    def available(self, now):
        """The whole tokens there are at C{now} (a large number when unlimited)."""
        if not self.rate:
            return MAX_QUANTUM << 20
        self._refill(now)
        return int(self._tokens)

    def take(self, wanted, now):
        """
        Take up to C{wanted} tokens at C{now}.

        @return: how many were taken (0 to C{wanted}).
        """
        if not self.rate:
            return wanted
        self._refill(now)
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted

    def wait(self, wanted, now):
        """
        Seconds from C{now} until C{wanted} tokens (at most C{burst}) are
        there, if nobody else takes any; 0 when they are now.
        """
        if not self.rate:
            return 0.0
        self._refill(now)
        missing = min(wanted, self.burst) - self._tokens
        return max(0.0, missing / self.rate)


class Shaper:
    """
    One direction of one stream, held to a L{TokenBucket}: bytes in, the
    same bytes out in order, as fast as the bucket allows.

    @ivar held: bytes pushed and not yet pulled.
    """

    def __init__(self, bucket):
        self._bucket = bucket
        self._queue = collections.deque()
        self.held = 0

    @property
    def quantum(self):
        """The fewest bytes one L{pull} releases (unless fewer are held)."""
        bucket = self._bucket
        if not bucket.rate:
            return 1
        quantum = min(MAX_QUANTUM, max(MIN_QUANTUM, int(bucket.rate) // 50))
        return max(1, min(quantum, int(bucket.burst)))  # never more than the bucket holds

    def push(self, data):
        """Hold C{data} (bytes or a memoryview) until L{pull} releases it."""
        if data:
            self._queue.append(data)
            self.held += len(data)

    def pull(self, now):
        """
        Release what the bucket allows at C{now}, oldest first: whole
        chunks, and the head of the next one (a memoryview) if the tokens
        end inside it; nothing unless at least L{quantum} bytes (or all
        that is held) can go.

        @return: a list of chunks, possibly empty.
        """
        queue, bucket = self._queue, self._bucket
        released = []
        if not queue or bucket.available(now) < min(self.held, self.quantum):
            return released
        while queue:
            chunk = queue[0]
            size = len(chunk)
            granted = bucket.take(size, now)
            if not granted:
                break
            self.held -= granted
            if granted == size:
                queue.popleft()
                released.append(chunk)
            else:
                view = memoryview(chunk)
                queue[0] = view[granted:]
                released.append(view[:granted])
                break
        return released

    def wait(self, now):
        """Seconds from C{now} until L{pull} can release more; C{None} when nothing is held."""
        if not self.held:
            return None
        return self._bucket.wait(min(self.held, self.quantum), now)

    def clear(self):
        """Drop what is held (the stream was reset: nobody will read it)."""
        self._queue.clear()
        self.held = 0


class ShapedFlow:
    """
    A L{Shaper} on a clock: what is pushed is handed to C{deliver} (a list of
    chunks at a time) as the bucket allows, from a timer when it must wait.

    @param clock: an C{IReactorTime}.
    """

    def __init__(self, clock, bucket):
        self._clock = clock
        self._shaper = Shaper(bucket)
        self._deliver = None
        self._timer = None
        self._when_empty = []
        self._cancelled = False

    def attach(self, deliver):
        """Hand released chunks to C{deliver(chunks)}, in order."""
        self._deliver = deliver

    @property
    def held(self):
        """Bytes pushed and not yet delivered."""
        return self._shaper.held

    def push(self, data):
        """Take C{data}; it is delivered now if the bucket allows, else later."""
        self._shaper.push(data)
        if self._timer is None:  # else the timer comes first: order is kept
            self._release()

    def when_empty(self, hook):
        """Call C{hook()} once everything pushed so far has been delivered (now if it has)."""
        if not self._shaper.held:
            hook()
        else:
            self._when_empty.append(hook)

    def cancel(self):
        """Stop: drop what is held and its timer (the stream has ended)."""
        self._cancelled = True
        self._shaper.clear()
        self._when_empty = []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _release(self):
        self._timer = None
        now = self._clock.seconds()
        chunks = self._shaper.pull(now)
        if chunks:
            self._deliver(chunks)
        if self._cancelled:
            return
        wait = self._shaper.wait(self._clock.seconds())
        if wait is None:
            hooks, self._when_empty = self._when_empty, []
            for hook in hooks:
                hook()
        elif self._timer is None:
            self._timer = self._clock.callLater(max(wait, MIN_WAIT), self._release)


class BandwidthLimits:
    """
    The users' buckets, by name: one for uploads (user to target) and one
    for downloads, shared by all of a user's streams.

    @param clock: an C{IReactorTime}.
    """

    def __init__(self, clock):
        self._clock = clock
        self._rates = {}
        self._buckets = {}  # name -> (upload, download)

    def configure(self, rates):
        """
        Set the caps: C{rates} maps user names to bytes per second (0:
        none).  Buckets in use take the new rate at once, also 0 (the
        user's open streams go unlimited, and a later cap holds them again);
        those of users no longer configured are forgotten.
        """
        self._rates = {name: rate for name, rate in rates.items() if rate}
        for name, buckets in list(self._buckets.items()):
            if name not in rates:
                del self._buckets[name]
                continue
            for bucket in buckets:
                bucket.configure(rates[name], self._clock.seconds())

    def rate(self, name):
        """User C{name}'s cap in bytes per second; 0 when there is none."""
        return self._rates.get(name, 0)

    def shape(self, name, stream):
        """
        Hold C{stream} (an L{anyproxy.tunnel.stream.Stream} of user C{name})
        to the user's cap, if the user has one or had one (the buckets a
        reload set to 0 are kept: a later cap holds the stream then); a
        stream already held is left as it is.
        """
        if stream.shaped:
            return
        buckets = self._buckets.get(name)
        if buckets is None:
            rate = self._rates.get(name)
            if not rate:
                return
            now = self._clock.seconds()
            buckets = self._buckets[name] = (TokenBucket(rate, now), TokenBucket(rate, now))
        upload, download = buckets
        stream.shape(ShapedFlow(self._clock, upload), ShapedFlow(self._clock, download))
