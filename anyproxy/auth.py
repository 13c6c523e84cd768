# -*- test-case-name: tests.test_auth -*-
"""
Proxy users: who may use a proxy listener, and which client group serves them.

Passwords are compared in constant time (L{hmac.compare_digest}) and an unknown
user costs the same comparison as a known one, so timing does not reveal which
usernames exist.
"""

import hmac

import attr

DEFAULT_GROUP = "default"


@attr.s(frozen=True, slots=True)
class User:
    """An authenticated proxy user (or the anonymous user of an open listener)."""

    name = attr.ib(type=str)
    group = attr.ib(type=str, default=DEFAULT_GROUP)


ANONYMOUS = User(name="", group=DEFAULT_GROUP)


def _to_bytes(text):
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


class UserDatabase:
    """
    A set of C{username -> (password, group)} entries.

    @ivar required: C{False} when no users are configured: the listener is
        open and every connection is L{ANONYMOUS}.
    """

    def __init__(self, entries=()):
        """
        @param entries: iterable of C{(username, password, group)}.
        """
        self._users = {}
        for name, password, group in entries:
            self._users[_to_bytes(name)] = (_to_bytes(password), group or DEFAULT_GROUP)
        self.required = bool(self._users)

    def authenticate(self, username, password):
        """
        Check a username/password pair.

        @return: the L{User}, or C{None} when the pair is wrong.
        """
        if not self.required:
            return ANONYMOUS
        name = _to_bytes(username)
        stored, group = self._users.get(name, (b"\0" * 32, None))
        ok = hmac.compare_digest(stored, _to_bytes(password))
        if ok and group is not None:
            return User(name=name.decode("utf-8", "replace"), group=group)
        return None

    def __repr__(self):
        # Never show passwords, even in a debugger or a traceback.
        return "<UserDatabase %d users>" % (len(self._users),)
