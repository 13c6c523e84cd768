# -*- test-case-name: tests.test_auth -*-
"""
Proxy users: who may use a proxy listener, and which client group serves them.

Passwords are compared in constant time (L{hmac.compare_digest}) and an unknown
user costs the same comparison as a known one, so timing does not reveal which
usernames exist.

L{GroupLogins} adds group logins: a client that sets
C{group_password} announces it in its HELLO, and while it is connected the
proxy login C{group_id:group_password} is valid and routed to that group.
Static users (the listeners' own and C{gateway.users}) take precedence for
the same username.

A static user may also log in as C{username.group} (the original Go
AnyProxy's form) with its own password, and is then routed to that group,
but only to a group the entry allows (its C{groups}, C{"*"} meaning any);
any other suffix fails like a wrong password.  As in the original, the
first dot splits: the group id may hold dots, a username that holds one
can log in only by its full name.
"""

import hashlib
import hmac
import os

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


_UNKNOWN = b"\0" * 32  # what an unknown name is compared against


class GroupLogins:
    """
    Proxy logins C{group_id:group_password} announced by connected clients.

    Each holder (a tunnel) registers one C{(group, password)}; the login is
    valid while at least one holder of that exact pair is registered.  Only
    a keyed digest of each password is kept (HMAC-SHA256 under a key made
    at start), so the plaintext is not held, and every comparison is of two
    32-byte digests in constant time.  An unknown group costs one
    comparison against a placeholder, like an unknown static user.
    """

    def __init__(self, key=None):
        self._key = key if key is not None else os.urandom(32)
        self._holders = {}  # holder -> (group as bytes, digest)
        self._groups = {}  # group as bytes -> (group, {digest: holder count})

    def _digest(self, password):
        return hmac.new(self._key, _to_bytes(password), hashlib.sha256).digest()

    def add(self, holder, group, password):
        """
        Make C{group:password} a valid login while C{holder} is registered.
        An empty password registers nothing; a holder registered before is
        replaced.

        Holders of one group may announce different passwords (a password
        being rolled out client by client): each is valid while a holder of
        it is registered.

        @return: C{True} when the group now has more than one valid password.
        """
        self.remove(holder)
        if not password:
            return False
        name, digest = _to_bytes(group), self._digest(password)
        self._holders[holder] = (name, digest)
        digests = self._groups.setdefault(name, (group, {}))[1]
        digests[digest] = digests.get(digest, 0) + 1
        return len(digests) > 1

    def remove(self, holder):
        """Forget C{holder}'s login (harmless if it has none)."""
        entry = self._holders.pop(holder, None)
        if entry is None:
            return
        name, digest = entry
        digests = self._groups[name][1]
        digests[digest] -= 1
        if not digests[digest]:
            del digests[digest]
        if not digests:
            del self._groups[name]

    def groups(self):
        """The groups that have a login now, sorted."""
        return sorted(group for group, _ in self._groups.values())

    def authenticate(self, username, password):
        """
        Check C{username} (a group id) and C{password}.

        @return: a L{User} named after the group and routed to it, or
            C{None}.
        """
        name = _to_bytes(username)
        offered = self._digest(password)
        group, digests = self._groups.get(name, (None, {_UNKNOWN: 0}))
        ok = False
        for stored in list(digests):
            ok |= hmac.compare_digest(stored, offered)
        if ok and group is not None:
            return User(name=group, group=group)
        return None

    def __repr__(self):
        # Digests only, but still: never show them.
        return "<GroupLogins %d groups>" % (len(self._groups),)


def _allowed_group(groups, suffix):
    """The group C{suffix} names if C{groups} allows it (C{"*"}: any), else C{None}."""
    try:
        group = suffix.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if group and (group in groups or "*" in groups):
        return group
    return None


class UserDatabase:
    """
    A set of C{username -> (password, group, groups)} entries.

    @ivar required: C{False} when no users are configured and no login is
        required: the listener is open and every connection is L{ANONYMOUS}.
    """

    def __init__(self, entries=(), group_logins=None, require_login=False):
        """
        @param entries: iterable of C{(username, password, group)} or
            C{(username, password, group, groups)}: C{group} is where a login
            by the bare name goes, C{groups} the groups a C{username.group}
            login may name (C{"*"}: any; absent: only C{group}).
        @param group_logins: a L{GroupLogins} consulted for names that are
            not in C{entries}, or C{None}.  It makes no listener require
            authentication: an open listener stays open.
        @param require_login: require a login even with no C{entries}, so
            that only group logins let users in (the listener's
            C{require_login}).
        """
        self._group_logins = group_logins
        self._require_login = require_login
        self.replace(entries)

    def replace(self, entries, require_login=None):
        """
        Put C{entries} in place of the current users (config reload): every
        later check uses them; a user already let in stays in.
        C{require_login}, unless C{None}, replaces the one given before.
        """
        if require_login is not None:
            self._require_login = require_login
        users = {}
        for entry in entries:
            name, password, group = entry[:3]
            group = group or DEFAULT_GROUP
            groups = frozenset(entry[3]) if len(entry) > 3 else frozenset((group,))
            users[_to_bytes(name)] = (_to_bytes(password), group, groups)
        self._users = users
        self.required = bool(users) or self._require_login

    def authenticate(self, username, password):
        """
        Check a username/password pair: a static user by its name, then
        C{user.group} for a static user and a group the entry allows, then a
        group login.

        @return: the L{User}, or C{None} when the pair is wrong.
        """
        if not self.required:
            return ANONYMOUS
        name, password = _to_bytes(username), _to_bytes(password)
        stored, group, _ = self._users.get(name, (_UNKNOWN, None, None))
        ok = hmac.compare_digest(stored, password)
        # The original's "user.group": the first dot splits.  Compared every
        # time (an unknown or undotted name against the placeholder), so the
        # cost never depends on which names exist.
        base, dot, suffix = name.partition(b".")
        base_stored, _, base_groups = self._users.get(base, (_UNKNOWN, None, None)) \
            if dot else (_UNKNOWN, None, None)
        base_ok = hmac.compare_digest(base_stored, password)
        # Asked every time, so a static user costs the same as any other name.
        by_group = (self._group_logins.authenticate(name, password)
                    if self._group_logins is not None else None)
        if group is not None:
            if ok:
                return User(name=name.decode("utf-8", "replace"), group=group)
            return None
        if base_ok and base_groups is not None:
            chosen = _allowed_group(base_groups, suffix)
            if chosen is not None:
                return User(name=base.decode("utf-8", "replace"), group=chosen)
        return by_group

    def __repr__(self):
        # Never show passwords, even in a debugger or a traceback.
        extra = " + group logins" if self._group_logins is not None else ""
        return "<UserDatabase %d users%s>" % (len(self._users), extra)
