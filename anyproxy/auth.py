# -*- test-case-name: tests.test_auth -*-
"""
Proxy users: who may use a proxy listener, and which client group serves them.

A configured password is an argon2id or bcrypt hash, or plain text
(L{anyproxy.passwords}); an entry may hold several at once (rotation).
Plain passwords are compared in constant time; a hash is checked in
L{anyproxy.passwords.PasswordChecker}'s thread pool, unless the pair was
checked good a moment ago.  An unknown user costs the same check as a known
one (against a decoy: one of the configured hashes, the answer thrown away),
and so does a wrong plain password once any entry has a hash, so timing does
not reveal which usernames exist.

So a login is answered at once (plain, remembered) or later (a hash):
L{UserDatabase.authenticate} says which (L{PENDING}: a hash to check),
L{UserDatabase.authenticate_later} always answers with a Deferred, and L{UserDatabase.login} adds the
gateway's brute-force defence (L{Logins}, one per gateway, shared by every
listener that checks a password: the proxies, the tunnel port and the
operator pages).

L{GroupLogins} adds group logins: a client that sets
C{group_password} announces it in its HELLO, and while it is connected the
proxy login C{group_id:group_password} is valid and routed to that group.
Static users (the listeners' own and C{gateway.users}) take precedence for
the same username.

A static user may also log in as C{username.group} (the original Go
AnyProxy's form) with its own password, and is then routed to that group,
but only to a group the entry allows (its C{groups}, C{"*"} meaning any);
any other suffix fails like a wrong password (but a C{gateway.users} entry,
which carries a L{UserPolicy}, is let in and refused NOT_ALLOWED when it
asks for a stream: the error table's answer).  As in the original, the
first dot splits: the group id may hold dots, a username that holds one
can log in only by its full name.
"""

import hashlib
import hmac
import os

import attr
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.errors import Reason
from anyproxy.interfaces import IReconfigurable
from anyproxy.login_throttle import LoginThrottle
from anyproxy.passwords import PasswordChecker, scheme_of

log = Logger()

DEFAULT_GROUP = "default"


class _Sentinel:
    def __init__(self, name):
        self._name = name

    def __repr__(self):
        return self._name

    def __bool__(self):
        # Neither is a user: a careless "if result:" must not let anyone in.
        return False


PENDING = _Sentinel("PENDING")  # a hash must be checked: ask again with a Deferred
BLOCKED = _Sentinel("BLOCKED")  # the source is blocked (L{Logins}): refuse unchecked


@attr.s(frozen=True, slots=True)
class UserPolicy:
    """
    What one C{gateway.users} entry may do, checked at the gateway where its
    streams' endpoints are made (L{anyproxy.gateway.app.UserEndpoints}), on
    the name asked for: the client still checks every resolved address.

    @ivar groups: the groups it may reach (C{"*"}: any); the first is where
        a login by the bare name goes.
    @ivar access: an L{anyproxy.access_policy.AccessPolicy} of its C{deny}
        (forbidden) and C{allow} (limit) rules, or C{None} when it has none.
    @ivar protocols: C{"tcp"} and/or C{"udp"}.
    @ivar max_streams: streams open at once at most; 0: only the gateway's
        C{max_conns_per_user} applies.
    @ivar bandwidth: bytes per second each way (L{anyproxy.bandwidth}); 0:
        unlimited.
    """

    groups = attr.ib(converter=tuple)
    access = attr.ib(default=None)
    protocols = attr.ib(default=("tcp", "udp"), converter=frozenset)
    max_streams = attr.ib(default=0)
    bandwidth = attr.ib(default=0)

    def refusal(self, group, host, port, kind):
        """
        Why a stream of C{kind} to C{host:port} through C{group} is refused,
        or C{None} when it may open.  Destination rules apply to tcp streams
        (a UDP association names no target; its datagrams are checked one by
        one, L{admits_datagram}).

        @return: C{None}, or C{(reason, text)} with an
            L{anyproxy.errors.Reason} and a message for the logs.
        """
        if group not in self.groups and "*" not in self.groups:
            return Reason.NOT_ALLOWED, "group %r is not one of this user's" % (group,)
        if kind not in self.protocols:
            return Reason.PROTOCOL_NOT_ALLOWED, "%s is not allowed for this user" % (kind,)
        if kind == "tcp" and self.access is not None:
            # No addresses: the gateway never resolves; the rules see the name.
            reason = self.access.check_resolved(host, port, kind, ())
            if reason is not None:
                return reason, "target not allowed for this user"
        return None

    def admits_datagram(self, host, port):
        """Whether this user's rules let a UDP datagram go to C{host:port}."""
        return self.access is None or self.access.check_resolved(host, port, "udp", ()) is None


@attr.s(frozen=True, slots=True)
class User:
    """
    An authenticated proxy user (or the anonymous user of an open listener).

    @ivar policy: the L{UserPolicy} of a C{gateway.users} entry, or C{None}
        (the listener's own user, a group login, anonymous): only the
        gateway-wide limits apply.
    """

    name = attr.ib(type=str)
    group = attr.ib(type=str, default=DEFAULT_GROUP)
    policy = attr.ib(default=None, eq=False)


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

    # In a fleet (anyproxy.fleet.node): a callable (group, password) -> bool
    # saying whether a client of that group on another gateway announced it.
    remote = None

    def __init__(self, key=None):
        self._key = key if key is not None else os.urandom(32)
        self._holders = {}  # holder -> (group as bytes, digest)
        self._groups = {}  # group as bytes -> (group, {digest: holder count})
        # Called with (holder, group, password) as a login is added and with
        # (holder, None, None) as it goes: a fleet publishes verifiers.
        self.observers = []

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
        for observer in self.observers:
            observer(holder, group, password)
        return len(digests) > 1

    def remove(self, holder):
        """Forget C{holder}'s login (harmless if it has none)."""
        entry = self._holders.pop(holder, None)
        if entry is None:
            return
        for observer in self.observers:
            observer(holder, None, None)
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
        if self.remote is not None:
            try:
                group = username.decode("utf-8") if isinstance(username, bytes) else username
                offered = password.decode("utf-8") if isinstance(password, bytes) else password
            except UnicodeDecodeError:
                return None
            if self.remote(group, offered):
                return User(name=group, group=group)
        return None

    def __repr__(self):
        # Digests only, but still: never show them.
        return "<GroupLogins %d groups>" % (len(self._groups),)


def _group_named(suffix):
    """The group C{suffix} (bytes) names, or C{None} when it names none."""
    try:
        return suffix.decode("utf-8") or None
    except UnicodeDecodeError:
        return None


def _allowed_group(groups, suffix):
    """The group C{suffix} names if C{groups} allows it (C{"*"}: any), else C{None}."""
    group = _group_named(suffix)
    if group is not None and (group in groups or "*" in groups):
        return group
    return None


def _secrets(password):
    """A configured entry's secrets as a tuple of texts (one, or a rotation's several)."""
    if isinstance(password, (list, tuple)):
        items = password
    else:
        items = (password,)
    return tuple(item.decode("utf-8") if isinstance(item, bytes) else item for item in items)


_DECOY_NAME = b"\0unknown"  # never a configured name (names are text)
_PLAIN_DECOY = ("\0" * 32,)  # what an unknown name is compared against with no hash configured


@attr.s(frozen=True, slots=True)
class _Check:
    """
    One password check a login needs: C{password} against C{secrets}
    (entry C{key}'s), then C{decide(ok)} -> the L{User} or C{None}.
    """

    key = attr.ib()
    secrets = attr.ib()
    decide = attr.ib()


class UserDatabase:
    """
    A set of C{username -> (passwords, group, groups)} entries.

    @ivar required: C{False} when no users are configured and no login is
        required: the listener is open and every connection is L{ANONYMOUS}.
    @ivar logins: the gateway's L{Logins} (password checks and the login
        throttle), shared by its listeners.
    """

    def __init__(self, entries=(), group_logins=None, require_login=False, logins=None):
        """
        @param entries: iterable of C{(username, password, group)},
            C{(username, password, group, groups)} or C{(username,
            password, group, groups, policy)}: C{password} is one
            configured secret (a hash or plain text) or a tuple of them
            (rotation: any logs in); C{group} is where a login by the bare
            name goes, C{groups} the groups a C{username.group} login may
            name (C{"*"}: any; absent: only C{group}), C{policy} a
            L{UserPolicy} (or C{None}) its L{User}s carry; a user with one
            who names another group with the right password is let in and
            refused by the policy (NOT_ALLOWED) instead.
        @param group_logins: a L{GroupLogins} consulted for names that are
            not in C{entries}, or C{None}.  It makes no listener require
            authentication: an open listener stays open.
        @param require_login: require a login even with no C{entries}, so
            that only group logins let users in (the listener's
            C{require_login}).
        @param logins: the gateway's L{Logins}; C{None} for one of its own
            (no throttle).
        """
        self._group_logins = group_logins
        self._require_login = require_login
        self.logins = logins if logins is not None else Logins()
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
        policies = {}  # name -> the UserPolicy of a gateway.users entry
        decoy = None
        for entry in entries:
            name, password, group = entry[:3]
            group = group or DEFAULT_GROUP
            groups = frozenset(entry[3]) if len(entry) > 3 else frozenset((group,))
            secrets = _secrets(password)
            users[_to_bytes(name)] = (secrets, group, groups)
            if len(entry) > 4 and entry[4] is not None:
                policies[_to_bytes(name)] = entry[4]
            if decoy is None:
                decoy = next((s for s in secrets if scheme_of(s) != "plain"), None)
        self._users = users
        self._policies = policies
        # An unknown name costs a check like a known one's: against a
        # configured hash (same scheme, same cost), its answer thrown away.
        self._decoy = (decoy,) if decoy is not None else _PLAIN_DECOY
        self.required = bool(users) or self._require_login

    def _plan(self, username, password):
        """
        The L{_Check} a login needs, or its answer when it needs none (an
        open listener, a group login).  As in the original Go AnyProxy, a
        static user by its name comes first; then C{user.group} for a
        static user and a group the entry allows (the first dot splits);
        then a group login.
        """
        if not self.required:
            return ANONYMOUS
        name = _to_bytes(username)
        # Asked every time, so a static user costs the same as any other name.
        by_group = self._group_login(name, password)
        found = self._users.get(name)
        if found is not None:
            secrets, group, _ = found
            user = User(name=name.decode("utf-8", "replace"), group=group,
                        policy=self._policies.get(name))
            return _Check(name, secrets, lambda ok: user if ok else None)
        base, dot, suffix = name.partition(b".")
        found = self._users.get(base) if dot else None
        if found is not None:
            secrets, _, groups = found
            chosen = _allowed_group(groups, suffix)
            policy = self._policies.get(base)
            if chosen is None and policy is not None:
                # A gateway.users entry with its own password but another
                # group: let in, and refused NOT_ALLOWED (SOCKS5 0x02, HTTP
                # 403) by its policy when it asks for a stream.
                chosen = _group_named(suffix)
            user = (User(name=base.decode("utf-8", "replace"), group=chosen, policy=policy)
                    if chosen is not None else None)
            # A wrong password or group may still be a group login's.
            return _Check(base, secrets, lambda ok: user if ok and user is not None
                          else by_group)
        if by_group is not None:
            return by_group
        return _Check(_DECOY_NAME, self._decoy, lambda ok: None)

    def _group_login(self, name, password):
        if self._group_logins is None:
            return None
        return self._group_logins.authenticate(name, _to_bytes(password))

    def authenticate(self, username, password):
        """
        Check a username/password pair, if that needs no hash check.

        @return: the L{User}; C{None} when the pair is wrong; L{PENDING}
            (false, and not C{None}) when a hash must be checked: then use
            L{authenticate_later}.
        """
        plan = self._plan(username, password)
        if type(plan) is not _Check:
            return plan
        ok = self.logins.checker.check_now(plan.key, _to_bytes(password), plan.secrets)
        if ok is None:
            return PENDING
        answer = plan.decide(ok)
        if answer is None and self._decoy is not _PLAIN_DECOY:
            return PENDING  # a failure costs a hash check (authenticate_later)
        return answer

    def authenticate_later(self, username, password):
        """
        Check a username/password pair.

        @return: a Deferred firing with the L{User}, or C{None} when the
            pair is wrong; at once unless a hash must be checked.
        """
        plan = self._plan(username, password)
        if type(plan) is not _Check:
            return defer.succeed(plan)
        password = _to_bytes(password)
        checker = self.logins.checker
        known = checker.check_now(plan.key, password, plan.secrets)
        if known is None:
            return checker.check(plan.key, password, plan.secrets).addCallback(plan.decide)
        answer = plan.decide(known)
        if answer is None and self._decoy is not _PLAIN_DECOY:
            # A wrong plain password, where an unknown name or a wrong hashed
            # password costs a hash check: the same check, its answer thrown
            # away, or the delay would tell which names exist.
            return checker.check(_DECOY_NAME, password, self._decoy).addCallback(lambda _: None)
        return defer.succeed(answer)

    def login(self, source, username, password):
        """
        A login from C{source} (the peer's IP address) through the
        gateway's throttle (L{Logins.attempt}).

        @return: the L{User}, C{None} (wrong) or L{BLOCKED} when known at
            once and no delay is due; else a Deferred firing with the
            L{User} or C{None}.
        """
        if not self.required:
            return ANONYMOUS
        return self.logins.attempt(
            source, _to_bytes(username),
            lambda: self.authenticate(username, password),
            lambda: self.authenticate_later(username, password), guess=password)

    def __repr__(self):
        # Never show passwords, even in a debugger or a traceback.
        extra = " + group logins" if self._group_logins is not None else ""
        return "<UserDatabase %d users%s>" % (len(self._users), extra)


@implementer(IReconfigurable)
class Logins:
    """
    The gateway's password checks and brute-force defence, one for all its
    listeners: the proxies (L{UserDatabase.login}), the tunnel port
    (L{anyproxy.gateway.client_access}) and the operator pages
    (L{anyproxy.operator_site}).

    @ivar checker: the L{PasswordChecker} (hash checks in a thread pool,
        good pairs remembered).
    @ivar throttle: the L{LoginThrottle} (C{gateway.auth_throttle}; off
        with C{failures: 0}).
    """

    def __init__(self, reactor=None, checker=None, throttle=None):
        self._reactor = reactor
        self._delayed = {}  # Deferred of a delayed failed answer -> (its DelayedCall, the answer)
        self.checker = checker if checker is not None else PasswordChecker(reactor)
        self.throttle = throttle if throttle is not None else LoginThrottle(failures=0)

    role = "gateway"  # whose section of the config (one file may hold both)

    @classmethod
    def from_config(cls, config, reactor, role="gateway"):
        """
        The L{Logins} of the gateway or the client (C{role}) of a
        L{anyproxy.config.model.Config}: its section's C{auth_throttle};
        warns of that program's plain passwords.
        """
        logins = cls(reactor, throttle=LoginThrottle(failures=0))
        logins.role = role
        logins.set_limits(_section(config, role).auth_throttle)
        warn_plain_passwords(config, role)
        return logins

    def set_limits(self, settings):
        """Take the throttle's limits from a L{anyproxy.config.model.ThrottleConfig}; counts stay."""
        throttle = self.throttle
        throttle.failures, throttle.window, throttle.block = (
            settings.failures, settings.window, settings.block)

    def prepare(self, config):
        """
        See L{anyproxy.interfaces.IReconfigurable}: a reload sets the
        throttle's limits (its counts are kept) and warns again of plain
        passwords.
        """
        settings = _section(config, self.role).auth_throttle

        def apply():
            self.set_limits(settings)
            warn_plain_passwords(config, self.role)
            return defer.succeed([])

        return apply

    def attempt(self, source, name, check_now, check, guess=b""):
        """
        Run one login from C{source} (the peer's IP address) for C{name}:

          - a blocked source is refused at once, its password unchecked
            (L{BLOCKED});
          - otherwise C{check_now()} answers (a result, or L{PENDING} when
            C{check()}, a Deferred, must);
          - a correct answer (anything true) forgives the source's earlier
            failures and goes back at once; a wrong one (C{None} or
            C{False}) is counted and delayed by what the throttle says.

        @param guess: the password tried (text or bytes), so that the same
            password on parallel connections counts as one guess in flight.
        @return: the answer, or L{BLOCKED}, when it is known at once and due
            now; else a Deferred firing with the answer.
        """
        throttle = self.throttle
        guess = _to_bytes(guess)
        if throttle.check(source, guess).blocked:
            return BLOCKED
        answer = check_now()
        if answer is PENDING:
            throttle.checking(source, guess)
            checking = check()
            checking.addBoth(self._checked, source, guess)
            return checking.addCallback(self._settle, source, name)
        return self._settle(answer, source, name)

    def _checked(self, result, source, guess):
        self.throttle.checked(source, guess)
        return result

    def _settle(self, answer, source, name):
        if answer:
            if self.throttle.blocked_for(source):
                # Blocked while this one was checked (guesses sent at once):
                # a correct guess among them is refused like the others.
                return BLOCKED
            self.throttle.succeeded(source, name)
            return answer
        delay = self.throttle.failed(source, name)
        if delay > 0:
            answered = defer.Deferred()
            call = self._reactor_or_global().callLater(delay, self._answer, answered, answer)
            self._delayed[answered] = (call, answer)
            return answered
        return answer

    def _answer(self, answered, answer):
        self._delayed.pop(answered, None)
        answered.callback(answer)

    def stop(self):
        """
        Give every failed answer still being delayed now (the gateway is
        stopping: nothing should wait on a timer past it).
        """
        for answered, (call, answer) in list(self._delayed.items()):
            if call.active():
                call.cancel()
                self._answer(answered, answer)

    def _reactor_or_global(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def stats(self):
        """C{{event: count}} of the throttle (metrics): blocks, refused_blocked, delayed."""
        throttle = self.throttle
        return {"blocks": throttle.blocks, "refused_blocked": throttle.refused_blocked,
                "delayed": throttle.delayed}


def _section(config, role):
    """The section of C{role} ("gateway" or "client") of C{config}."""
    return config.require_gateway() if role == "gateway" else config.require_client()


def plain_password_keys(config, role="gateway"):
    """
    The key paths of the passwords the gateway's or the client's (C{role})
    part of a config holds as plain text (not an argon2id or bcrypt hash)
    where a hash would do, for the start-up warning: names only.
    (C{client.auth_password} is sent to the gateway, so it cannot be a hash.)
    """
    found = []

    def note(path, secrets):
        if any(scheme_of(secret) == "plain" for secret in secrets if secret):
            found.append(path)

    if role == "client":
        client = config.require_client()
        note("client.status_password", (client.status_password,))
        note("client.metrics_password", (client.metrics_password,))
        return found
    for frontend in config.proxy.all_frontends():
        note("%s.auth_password" % (frontend.path,), (frontend.listener.auth_password,))
    gateway = config.gateway
    note("gateway.auth_password", (gateway.auth_password,))
    for user in gateway.users:
        note("gateway.users[%s]" % (user.username,), user.secrets)
    for client in gateway.clients:
        note("gateway.clients[%s]" % (client.name,), client.secrets)
    note("gateway.status_password", (gateway.status_password,))
    note("gateway.metrics_password", (gateway.metrics_password,))
    return found


def warn_plain_passwords(config, role="gateway"):
    """One warning naming every password still held as plain text (never the passwords)."""
    keys = plain_password_keys(config, role)
    if keys:
        log.warn("{count} password(s) held as plain text: {keys}; store hashes instead "
                 "(anyproxy-passwd prints one; docs/SECURITY.md)",
                 event="plain_passwords", count=len(keys), keys=", ".join(keys))
