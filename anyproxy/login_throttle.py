# -*- test-case-name: tests.test_login_throttle -*-
"""
Brute-force defence for every login the gateway checks (SOCKS5, the HTTP
proxy, the tunnel port, the status/API port): L{LoginThrottle}, without I/O.

Failed logins are counted per source address and per user name, each over
a sliding C{window} (the count forgets a failure C{window} seconds after
it).  Then:

  - Each failed answer is delayed once its source or its name has failed
    before in the window: 0.1 s, doubling per further failure, at most
    C{max_delay}.  Only failures wait: a correct password is answered at
    once, so a user is never slowed by someone guessing at their name.
  - A source with C{failures} failures in the window is blocked for
    C{block} seconds: its logins are refused without checking the
    password (so a storm costs no hashing), and one log line says so.
  - The different passwords from one source still being checked (a slow
    hash) count as failures would (L{LoginThrottle.checking}), so guesses
    sent all at once cannot all be checked first.
  - A user name is never blocked, only its failures delayed: blocking
    names would let anyone lock a user out.  A shared source address (a
    NAT) that fails too often is blocked for everyone behind it; raise
    C{failures} where that matters.

Memory is bounded: at most C{max_tracked} sources and as many names are
tracked, the least recently failed forgotten first.
"""

import hashlib
import hmac
import ipaddress
import os
import time
from collections import OrderedDict, deque

import attr
from twisted.logger import Logger

log = Logger()

FIRST_DELAY = 0.1  # seconds, the first delayed failure
TRACKED_NAME = 256  # characters (or bytes) of a user name the failures are counted under


@attr.s(frozen=True, slots=True)
class Verdict:
    """
    What to do with a login attempt before its password is checked.

    @ivar blocked: refuse it without checking (the source is blocked).
    @ivar retry_after: seconds until the block ends (when blocked).
    """

    blocked = attr.ib()
    retry_after = attr.ib(default=0.0)


ALLOWED = Verdict(blocked=False)


class _Failures:
    """The failure times of one source or name, within the window."""

    __slots__ = ("times", "blocked_until")

    def __init__(self):
        self.times = deque()
        self.blocked_until = 0.0

    def count(self, now, window):
        times = self.times
        while times and times[0] <= now - window:
            times.popleft()
        return len(times)


class LoginThrottle:
    """
    Counts failed logins; see the module docstring.

    @param failures: failed logins from one source within C{window} that
        block it; 0 turns the throttle off.
    @param window: seconds a failure is counted.
    @param block: seconds a blocked source stays blocked.
    @param max_delay: the longest a failed answer is delayed.
    @param clock: a callable returning seconds; default C{time.monotonic}.
    @param max_tracked: sources (and names) tracked at most.

    @ivar blocks: sources blocked so far (metrics).
    @ivar refused_blocked: attempts refused because their source was blocked.
    @ivar delayed: failed answers delayed.
    """

    def __init__(self, failures=5, window=60.0, block=300.0, max_delay=2.0,
                 clock=time.monotonic, max_tracked=100000):
        self.failures = failures
        self.window = window
        self.block = block
        self.max_delay = max_delay
        self._clock = clock
        self.max_tracked = max_tracked
        self._sources = OrderedDict()
        self._names = OrderedDict()
        self._checking = {}  # source -> {guess: logins of it being checked now}
        # Guesses are kept as keyed digests, never as the passwords.
        self._guess_key = os.urandom(16)
        self.blocks = 0
        self.refused_blocked = 0
        self.delayed = 0

    @property
    def enabled(self):
        return self.failures > 0

    def check(self, source, guess=None):
        """
        The L{Verdict} for an attempt from C{source} with password C{guess}
        (bytes, or C{None} if not known), before its password is checked.
        """
        if not self.enabled:
            return ALLOWED
        entry = self._sources.get(source)
        now = self._clock()
        if entry is not None:
            remaining = entry.blocked_until - now
            if remaining > 0:
                self.refused_blocked += 1
                return Verdict(blocked=True, retry_after=remaining)
        guesses = self._checking.get(source)
        if guesses and (guess is None or self._digest(guess) not in guesses):
            # The different passwords still being checked count as failures
            # would: guesses sent all at once must not all be checked before
            # the first failure is counted.  The same password again (a
            # browser's parallel connections) is not another guess.
            failed = entry.count(now, self.window) if entry is not None else 0
            if failed + len(guesses) >= self.failures:
                self.refused_blocked += 1
                return Verdict(blocked=True, retry_after=self.max_delay)
        return ALLOWED

    def checking(self, source, guess):
        """
        A login from C{source} passed L{check} and its password C{guess}
        (bytes) is being checked (a slow hash); call L{checked} with the
        same once it is answered.
        """
        if self.enabled:
            guesses = self._checking.setdefault(source, {})
            digest = self._digest(guess)
            guesses[digest] = guesses.get(digest, 0) + 1

    def checked(self, source, guess):
        """The login of L{checking} is answered (before L{failed} or L{succeeded})."""
        guesses = self._checking.get(source)
        if guesses is None:
            return
        digest = self._digest(guess)
        count = guesses.get(digest, 0) - 1
        if count > 0:
            guesses[digest] = count
        else:
            guesses.pop(digest, None)
            if not guesses:
                del self._checking[source]

    def _digest(self, guess):
        return hmac.new(self._guess_key, guess, hashlib.sha256).digest()

    def blocked_for(self, source):
        """Seconds until C{source}'s block ends (0 when not blocked); counts nothing."""
        entry = self._sources.get(source)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - self._clock())

    def failed(self, source, name):
        """
        Record a failed login of C{name} from C{source}.

        @return: seconds to delay the failed answer (0 for none).
        """
        if not self.enabled:
            return 0.0
        now = self._clock()
        by_source = self._record(self._sources, source, now)
        # A name is the attacker's choice (up to a header's length): what is
        # kept of it is bounded.
        by_name = self._record(self._names, name[:TRACKED_NAME], now)
        if by_source >= self.failures:
            entry = self._sources[source]
            if entry.blocked_until <= now:
                entry.blocked_until = now + self.block
                entry.times.clear()
                self.blocks += 1
                log.warn("login throttle: blocking {source} for {block:.0f} s after "
                         "{failures} failed logins within {window:.0f} s",
                         event="login_blocked", source=source, block=self.block,
                         failures=by_source, window=self.window)
        repeats = max(by_source, by_name) - 1
        if repeats <= 0:
            return 0.0
        self.delayed += 1
        return min(self.max_delay, FIRST_DELAY * 2 ** min(repeats - 1, 32))

    def succeeded(self, source, name):
        """
        Record a correct login: the source's failures are forgiven (not a
        block in force), the name's are not (the guesser may be elsewhere).
        """
        entry = self._sources.get(source)
        if entry is not None and entry.blocked_until <= self._clock():
            del self._sources[source]

    def _record(self, table, key, now):
        entry = table.pop(key, None)
        if entry is None:
            entry = _Failures()
        table[key] = entry  # most recent last: eviction takes the front
        count = entry.count(now, self.window)
        entry.times.append(now)
        while len(table) > self.max_tracked:
            table.popitem(last=False)
        return count + 1

    def tracked(self):
        """C{(sources, names)} tracked now (bounded by C{max_tracked})."""
        return len(self._sources), len(self._names)


def source_address(transport):
    """
    The source a connection's logins are counted under (L{source_key} of
    its peer's IP address), or C{""} for a peer without one (a UNIX socket).
    """
    host = getattr(transport.getPeer(), "host", "")
    return source_key(host) if isinstance(host, str) else ""


def source_key(host):
    """
    What logins (and handshakes) from the IP address C{host} are counted
    under: an IPv4 address as itself, also when it comes IPv4-mapped
    (C{::ffff:192.0.2.1}, from a dual-stack listener); an IPv6 address as
    its /64, which one host or site normally holds whole, so it cannot
    start afresh from each of its addresses.  Other text as it is.
    """
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))
