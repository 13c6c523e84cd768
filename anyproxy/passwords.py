# -*- test-case-name: tests.test_passwords -*-
"""
Configured passwords: argon2id or bcrypt hashes, or (warned at start-up)
plain text, and their checking without slowing the reactor.

A configured secret is one of:

  - an argon2id hash, C{$argon2id$v=19$m=...,t=...,p=...$salt$hash}
    (argon2-cffi; what C{anyproxy-passwd} prints);
  - a bcrypt hash, C{$2b$12$...} (also C{$2a$}/C{$2y$});
  - anything else: a plain password, compared in constant time.

An entry may hold several (C{passwords:}), any of which logs in: a secret
is rolled by adding the new one, moving every user over, then removing the
old one (docs/SECURITY.md).

A hash costs tens to hundreds of milliseconds of CPU to check, on purpose.
Two things keep that off the users' path:

  - L{PasswordChecker} runs hash checks in a small thread pool of its own,
    so the reactor keeps serving while one runs, and at most C{threads}
    run at once (a storm of wrong passwords queues, it does not multiply).
  - It remembers, for C{cache_ttl} seconds, that a (name, password) pair
    was checked good, as an HMAC under a key made at start (never the
    password, nor a plain digest of it).  A correct login then costs one
    HMAC.  Failures are never remembered as successes; a reload (new
    secrets) starts a new memory.
"""

import hashlib
import hmac
import os
import re
import time
from collections import OrderedDict

import argon2
import bcrypt
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

ARGON2_PREFIX = "$argon2id$"
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
# Unpadded base64 of a salt of at least 8 bytes and a hash of at least 16.
_ARGON2_FORM = re.compile(
    r"^\$argon2id\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{22,}$")
BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; longer passwords cannot be checked

# argon2-cffi's defaults are RFC 9106's second recommendation (64 MiB, t=3, p=4).
_ARGON2 = argon2.PasswordHasher()


def hash_password(password, scheme="argon2id"):
    """
    The configured form of C{password}: an argon2id hash (default) or a
    bcrypt hash (C{scheme="bcrypt"}, cost 12).

    @raise ValueError: a bcrypt password longer than 72 bytes (bcrypt would
        silently ignore the rest).
    """
    if scheme == "argon2id":
        return _ARGON2.hash(password)
    if scheme == "bcrypt":
        data = password.encode("utf-8")
        if len(data) > BCRYPT_MAX_BYTES:
            raise ValueError("bcrypt takes at most %d bytes of password; use argon2id"
                             % (BCRYPT_MAX_BYTES,))
        return bcrypt.hashpw(data, bcrypt.gensalt(12)).decode("ascii")
    raise ValueError("unknown scheme %r (argon2id or bcrypt)" % (scheme,))


def scheme_of(secret):
    """C{"argon2id"}, C{"bcrypt"} or C{"plain"}: how a configured secret is checked."""
    if secret.startswith(ARGON2_PREFIX):
        return "argon2id"
    if secret.startswith(BCRYPT_PREFIXES):
        return "bcrypt"
    return "plain"


def check_hash_format(secret):
    """
    Raise L{ValueError} with a one-line reason if C{secret} looks like a
    hash (argon2id or bcrypt prefix) but is not a valid one, so a truncated
    paste fails at load time instead of refusing every login.
    """
    scheme = scheme_of(secret)
    if scheme == "argon2id":
        if not _ARGON2_FORM.match(secret):
            raise ValueError("not a valid argon2id hash (a truncated copy?)")
        try:
            argon2.extract_parameters(secret)
        except argon2.exceptions.InvalidHashError:
            raise ValueError("not a valid argon2id hash (a truncated copy?)") from None
    elif scheme == "bcrypt":
        parts = secret.split("$")
        if len(parts) != 4 or not parts[2].isdigit() or len(parts[3]) != 53:
            raise ValueError("not a valid bcrypt hash (a truncated copy?)")


def _as_bytes(text):
    # Offered passwords may be bytes (SOCKS5 sends no encoding), or text.
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _matches_hash(secret, password):
    """Whether C{password} matches the hash C{secret} (slow: run in a thread)."""
    scheme = scheme_of(secret)
    if scheme == "argon2id":
        try:
            return _ARGON2.verify(secret, _as_bytes(password))
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    data = _as_bytes(password)
    if len(data) > BCRYPT_MAX_BYTES:
        return False
    try:
        return bcrypt.checkpw(data, secret.encode("ascii"))
    except ValueError:
        return False


def _matches_plain(secrets, password):
    """Constant-time comparison with every plain secret (no early exit)."""
    data = _as_bytes(password)
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(hashlib.sha256(secret.encode("utf-8")).digest(),
                                     hashlib.sha256(data).digest())
    return found


class PasswordChecker:
    """
    Checks a password against an entry's configured secrets (see the
    module docstring), remembering good pairs for a short while.

    @param threads: hash checks run at once at most (its own thread pool,
        started on first use, stopped by L{stop}).
    @param cache_ttl: seconds a good (name, password) pair is remembered.
    @param cache_size: pairs remembered at most (the oldest go first).
    @param clock: a callable returning seconds (tests); default C{time.monotonic}.
    """

    def __init__(self, reactor=None, threads=2, cache_ttl=60.0, cache_size=10000,
                 clock=time.monotonic):
        self._reactor = reactor
        self._threads = threads
        self._pool = None
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._clock = clock
        self._key = os.urandom(32)
        self._good = OrderedDict()  # keyed digest -> expiry
        self.hash_checks = 0  # slow checks run (metrics, benchmarks)

    def _digest(self, name, password, secrets):
        # The secrets are part of the key, so a reload that changes them
        # cannot keep an old password valid.
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (name, password) + tuple(secrets):
            data = _as_bytes(part)
            mac.update(len(data).to_bytes(4, "big") + data)
        return mac.digest()

    def check_now(self, name, password, secrets):
        """
        C{True} or C{False} when that is known without a hash check (plain
        secrets, or a pair remembered good); C{None} when a hash must be
        checked (then call L{check}).  C{name} and C{password} may be text
        or bytes (UTF-8); C{secrets} are the configured texts.
        """
        secrets = tuple(secrets)
        hashed = [s for s in secrets if scheme_of(s) != "plain"]
        plain = [s for s in secrets if scheme_of(s) == "plain"]
        if plain and _matches_plain(plain, password):
            return True
        if not hashed:
            return False
        digest = self._digest(name, password, secrets)
        expiry = self._good.get(digest)
        if expiry is not None:
            if expiry > self._clock():
                return True
            del self._good[digest]
        return None

    def check(self, name, password, secrets):
        """
        A Deferred firing with whether C{password} matches one of
        C{secrets} (the entry C{name}'s).  Fires at once when L{check_now}
        knows; otherwise after the hash checks ran in the pool.
        """
        secrets = tuple(secrets)
        known = self.check_now(name, password, secrets)
        if known is not None:
            return defer.succeed(known)
        hashed = [s for s in secrets if scheme_of(s) != "plain"]

        def slow():
            return any([_matches_hash(secret, password) for secret in hashed])

        self.hash_checks += 1
        d = threads.deferToThreadPool(self._reactor_or_global(), self._thread_pool(), slow)
        d.addCallback(self._remember, self._digest(name, password, secrets))
        return d

    def _remember(self, good, digest):
        if good:
            self._good[digest] = self._clock() + self.cache_ttl
            self._good.move_to_end(digest)
            while len(self._good) > self.cache_size:
                self._good.popitem(last=False)
        return good

    def _reactor_or_global(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def _thread_pool(self):
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self._threads,
                                    name="anyproxy-password-checks")
            self._pool.start()
            self._reactor_or_global().addSystemEventTrigger(
                "during", "shutdown", self.stop)
        return self._pool

    def stop(self):
        """Stop the thread pool (waits for a check in progress)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
