# -*- test-case-name: tests.test_auth -*-
"""
Tests for L{anyproxy.auth}.
"""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.auth import ANONYMOUS, DEFAULT_GROUP, GroupLogins, User, UserDatabase

PASSWORD = "correct horse battery staple"
OTHER_PASSWORD = "hunter2-other-secret"


def database():
    """A database with two users in different groups and one without a group."""
    return UserDatabase([
        ("alice", PASSWORD, "red"),
        ("bob", OTHER_PASSWORD, "blue"),
        ("carol", "pw-carol-secret", None),
    ])


class UserDatabaseTests(SynchronousTestCase):
    """L{UserDatabase.authenticate} admits exactly the configured pairs."""

    def test_right_password(self):
        """The right password returns the user with its name and group."""
        self.assertEqual(database().authenticate("alice", PASSWORD), User("alice", "red"))

    def test_wrong_password(self):
        """A wrong password returns None."""
        self.assertIsNone(database().authenticate("alice", OTHER_PASSWORD))

    def test_empty_password(self):
        """An empty password returns None."""
        self.assertIsNone(database().authenticate("alice", ""))

    def test_password_prefix(self):
        """A prefix of the right password returns None."""
        self.assertIsNone(database().authenticate("alice", PASSWORD[:-1]))

    def test_other_users_password(self):
        """Another user's password does not work for this user."""
        self.assertIsNone(database().authenticate("alice", OTHER_PASSWORD))
        self.assertEqual(database().authenticate("bob", OTHER_PASSWORD), User("bob", "blue"))

    def test_unknown_user(self):
        """An unknown user returns None, whatever the password."""
        users = database()
        self.assertIsNone(users.authenticate("mallory", PASSWORD))
        self.assertIsNone(users.authenticate("mallory", ""))

    def test_unknown_user_with_placeholder_password(self):
        """An unknown user with the internal placeholder password is still refused."""
        self.assertIsNone(database().authenticate("mallory", b"\0" * 32))

    def test_username_is_case_sensitive(self):
        """Usernames are compared exactly, not case-folded."""
        self.assertIsNone(database().authenticate("Alice", PASSWORD))

    def test_group_returned(self):
        """Each user's configured group comes back with it."""
        users = database()
        self.assertEqual(users.authenticate("alice", PASSWORD).group, "red")
        self.assertEqual(users.authenticate("bob", OTHER_PASSWORD).group, "blue")

    def test_missing_group_is_default(self):
        """A user configured without a group is in the default group."""
        self.assertEqual(database().authenticate("carol", "pw-carol-secret").group, DEFAULT_GROUP)

    def test_bytes_inputs(self):
        """Username and password may be bytes (as SOCKS5 delivers them)."""
        user = database().authenticate(b"alice", PASSWORD.encode("ascii"))
        self.assertEqual(user, User("alice", "red"))
        self.assertIsInstance(user.name, str)

    def test_bytes_configuration(self):
        """Entries configured as bytes match str inputs and the reverse."""
        users = UserDatabase([(b"dave", b"pw-dave", "green")])
        self.assertEqual(users.authenticate("dave", "pw-dave"), User("dave", "green"))
        self.assertEqual(users.authenticate(b"dave", b"pw-dave"), User("dave", "green"))

    def test_non_ascii_password(self):
        """A non-ASCII password matches as str and as its UTF-8 bytes."""
        users = UserDatabase([("eve", "pässwörd-日本", "g")])
        self.assertEqual(users.authenticate("eve", "pässwörd-日本"), User("eve", "g"))
        self.assertEqual(users.authenticate(b"eve", "pässwörd-日本".encode("utf-8")),
                         User("eve", "g"))
        self.assertIsNone(users.authenticate("eve", "passwort-日本"))
        self.assertIsNone(users.authenticate(b"eve", "pässwörd-日本".encode("latin-1", "replace")))

    def test_non_ascii_username(self):
        """A non-ASCII username authenticates and comes back as text."""
        users = UserDatabase([("zoë", "pw-zoe", "g")])
        self.assertEqual(users.authenticate("zoë".encode("utf-8"), "pw-zoe"), User("zoë", "g"))

    def test_required_with_users(self):
        """A database with users requires authentication."""
        self.assertTrue(database().required)


class AnonymousTests(SynchronousTestCase):
    """A database without users lets everyone in as L{ANONYMOUS}."""

    def test_not_required(self):
        """No users means authentication is not required."""
        self.assertFalse(UserDatabase().required)

    def test_anything_is_anonymous(self):
        """Any username and password, str or bytes, returns L{ANONYMOUS}."""
        users = UserDatabase([])
        for username, password in [("alice", PASSWORD), ("", ""), (b"x", b"y"), ("ü", "ß")]:
            self.assertIs(users.authenticate(username, password), ANONYMOUS)

    def test_anonymous_group(self):
        """L{ANONYMOUS} has an empty name and the default group."""
        self.assertEqual((ANONYMOUS.name, ANONYMOUS.group), ("", DEFAULT_GROUP))


class ReprTests(SynchronousTestCase):
    """Passwords never appear in representations."""

    def test_database_repr(self):
        """The database repr counts users and shows no password."""
        text = repr(database())
        self.assertEqual(text, "<UserDatabase 3 users>")
        for secret in (PASSWORD, OTHER_PASSWORD, "pw-carol-secret"):
            self.assertNotIn(secret, text)

    def test_database_str(self):
        """The database str shows no password either."""
        text = str(database())
        for secret in (PASSWORD, OTHER_PASSWORD, "pw-carol-secret"):
            self.assertNotIn(secret, text)

    def test_user_repr(self):
        """An authenticated user's repr holds its name and group, not its password."""
        text = repr(database().authenticate("alice", PASSWORD))
        self.assertIn("alice", text)
        self.assertIn("red", text)
        self.assertNotIn(PASSWORD, text)


# -- group logins ---------------------------------------------------------------


class Holder:
    """Stands in for a tunnel: any hashable object holds a login."""

    def __init__(self, name):
        self.name = name


class GroupLoginsTests(SynchronousTestCase):
    """L{GroupLogins} admits C{group:password} while a holder of that pair is registered."""

    def test_login_while_held(self):
        """A registered pair authenticates as a user named after the group and routed to it."""
        logins = GroupLogins()
        lab = Holder("lab-1")
        logins.add(lab, "lab", "lab-pw")
        self.assertEqual(logins.authenticate("lab", "lab-pw"), User("lab", "lab"))
        self.assertEqual(logins.authenticate(b"lab", b"lab-pw"), User("lab", "lab"))
        logins.remove(lab)
        self.assertIsNone(logins.authenticate("lab", "lab-pw"))

    def test_wrong_password_and_unknown_group(self):
        """A wrong password, a prefix, an empty one or an unknown group is refused."""
        logins = GroupLogins()
        logins.add(Holder("a"), "lab", "lab-pw")
        for username, password in [("lab", "lab-pw2"), ("lab", "lab-p"), ("lab", ""),
                                   ("LAB", "lab-pw"), ("other", "lab-pw"), ("", "")]:
            self.assertIsNone(logins.authenticate(username, password), (username, password))

    def test_last_holder_counts(self):
        """Two clients with the same pair: the login lasts until both are gone."""
        logins = GroupLogins()
        first, second = Holder("1"), Holder("2")
        logins.add(first, "lab", "lab-pw")
        logins.add(second, "lab", "lab-pw")
        logins.remove(first)
        self.assertEqual(logins.authenticate("lab", "lab-pw"), User("lab", "lab"))
        logins.remove(second)
        self.assertIsNone(logins.authenticate("lab", "lab-pw"))
        self.assertEqual(logins.groups(), [])

    def test_different_passwords_in_one_group(self):
        """Clients of one group with different passwords each make their own valid."""
        logins = GroupLogins()
        old, new = Holder("old"), Holder("new")
        logins.add(old, "lab", "old-pw")
        logins.add(new, "lab", "new-pw")
        self.assertIsNotNone(logins.authenticate("lab", "old-pw"))
        self.assertIsNotNone(logins.authenticate("lab", "new-pw"))
        logins.remove(old)
        self.assertIsNone(logins.authenticate("lab", "old-pw"))
        self.assertIsNotNone(logins.authenticate("lab", "new-pw"))

    def test_groups_isolated(self):
        """One group's password does not open another group."""
        logins = GroupLogins()
        logins.add(Holder("a"), "lab", "lab-pw")
        logins.add(Holder("b"), "ops", "ops-pw")
        self.assertIsNone(logins.authenticate("ops", "lab-pw"))
        self.assertEqual(logins.authenticate("ops", "ops-pw").group, "ops")
        self.assertEqual(logins.groups(), ["lab", "ops"])

    def test_empty_password_registers_nothing(self):
        """A client without a group password adds no login."""
        logins = GroupLogins()
        logins.add(Holder("a"), "lab", "")
        self.assertIsNone(logins.authenticate("lab", ""))
        self.assertEqual(logins.groups(), [])

    def test_readd_replaces(self):
        """Adding the same holder again replaces its pair."""
        logins = GroupLogins()
        holder = Holder("a")
        logins.add(holder, "lab", "one-pw")
        logins.add(holder, "lab", "two-pw")
        self.assertIsNone(logins.authenticate("lab", "one-pw"))
        self.assertIsNotNone(logins.authenticate("lab", "two-pw"))
        logins.remove(holder)
        logins.remove(holder)  # harmless
        self.assertEqual(logins.groups(), [])

    def test_non_ascii(self):
        """Non-ASCII group ids and passwords work as text or UTF-8 bytes."""
        logins = GroupLogins()
        logins.add(Holder("a"), "läb", "pässwört")
        self.assertEqual(logins.authenticate("läb".encode("utf-8"), "pässwört".encode("utf-8")),
                         User("läb", "läb"))

    def test_plaintext_not_kept(self):
        """Only digests are stored, and the repr shows neither."""
        logins = GroupLogins()
        logins.add(Holder("a"), "lab", "lab-secret-pw")
        self.assertNotIn(b"lab-secret-pw", repr(vars(logins)).encode("utf-8"))
        self.assertEqual(repr(logins), "<GroupLogins 1 groups>")

    def test_constant_time_comparison(self):
        """Passwords are compared with hmac.compare_digest, also for an unknown group."""
        import hmac as hmac_module
        calls = []
        real = hmac_module.compare_digest

        def spy(a, b):
            calls.append((len(a), len(b)))
            return real(a, b)

        self.patch(hmac_module, "compare_digest", spy)
        logins = GroupLogins()
        logins.add(Holder("a"), "lab", "lab-pw")
        logins.authenticate("lab", "nope")
        logins.authenticate("nobody", "nope")
        self.assertEqual(calls, [(32, 32), (32, 32)])


class UserDatabaseGroupLoginTests(SynchronousTestCase):
    """A L{UserDatabase} with group logins consults them after its static users."""

    def setUp(self):
        self.logins = GroupLogins()
        self.logins.add(Holder("lab-1"), "lab", "lab-pw")
        self.logins.add(Holder("x"), "alice", "group-alice-pw")

    def test_group_login(self):
        """group:password works through the database."""
        users = UserDatabase([("alice", PASSWORD, "red")], group_logins=self.logins)
        self.assertEqual(users.authenticate("lab", "lab-pw"), User("lab", "lab"))
        self.assertIsNone(users.authenticate("lab", "wrong"))

    def test_static_user_wins(self):
        """A static user with the group's name shadows the group login."""
        users = UserDatabase([("alice", PASSWORD, "red")], group_logins=self.logins)
        self.assertEqual(users.authenticate("alice", PASSWORD), User("alice", "red"))
        self.assertIsNone(users.authenticate("alice", "group-alice-pw"))

    def test_static_users_still_work(self):
        """Static users authenticate as before."""
        users = UserDatabase([("bob", OTHER_PASSWORD, "blue")], group_logins=self.logins)
        self.assertEqual(users.authenticate("bob", OTHER_PASSWORD), User("bob", "blue"))
        self.assertIsNone(users.authenticate("mallory", OTHER_PASSWORD))

    def test_open_listener_stays_open(self):
        """Group logins do not make an open listener require authentication."""
        users = UserDatabase([], group_logins=self.logins)
        self.assertFalse(users.required)
        self.assertIs(users.authenticate("anyone", "anything"), ANONYMOUS)

    def test_repr(self):
        """The repr says group logins are consulted and shows no password."""
        users = UserDatabase([("alice", PASSWORD, "red")], group_logins=self.logins)
        self.assertEqual(repr(users), "<UserDatabase 1 users + group logins>")


class DottedLoginTests(SynchronousTestCase):
    """
    The original Go AnyProxy's C{username.group} login: a static user's own
    password, routed to a group the entry allows, and to no other.
    """

    def setUp(self):
        self.logins = GroupLogins()
        self.logins.add(Holder("ops-1"), "alice.ops", "ops-group-pw")
        self.users = UserDatabase([
            ("alice", PASSWORD, "default", ("default", "lab", "lab.eu")),
            ("bob", OTHER_PASSWORD, "blue"),
            ("carol.smith", "pw-carol", "red"),
        ], group_logins=self.logins)

    def test_allowed_group(self):
        """user.group with the user's password is that user, routed to the group."""
        self.assertEqual(self.users.authenticate("alice.lab", PASSWORD), User("alice", "lab"))
        self.assertEqual(self.users.authenticate(b"alice.default", PASSWORD.encode()),
                         User("alice", "default"))
        self.assertEqual(self.users.authenticate("alice", PASSWORD), User("alice", "default"))

    def test_group_not_allowed(self):
        """A suffix naming a group the entry does not allow fails like a wrong password."""
        for name in ("alice.blue", "alice.red", "alice.", "alice.LAB", "alice.lab.us"):
            self.assertIsNone(self.users.authenticate(name, PASSWORD), name)

    def test_wrong_password(self):
        """The right suffix with a wrong password, or another user's, fails."""
        self.assertIsNone(self.users.authenticate("alice.lab", OTHER_PASSWORD))
        self.assertIsNone(self.users.authenticate("alice.lab", ""))
        self.assertIsNone(self.users.authenticate("mallory.lab", PASSWORD))

    def test_entry_without_groups_allows_its_own(self):
        """A (name, password, group) entry may name only its own group."""
        self.assertEqual(self.users.authenticate("bob.blue", OTHER_PASSWORD), User("bob", "blue"))
        self.assertIsNone(self.users.authenticate("bob.default", OTHER_PASSWORD))

    def test_first_dot_splits(self):
        """As in the original, the first dot splits: the group id may hold dots."""
        self.assertEqual(self.users.authenticate("alice.lab.eu", PASSWORD),
                         User("alice", "lab.eu"))
        # A dotted username logs in by its full name only.
        self.assertEqual(self.users.authenticate("carol.smith", "pw-carol"),
                         User("carol.smith", "red"))
        self.assertIsNone(self.users.authenticate("carol.smith.red", "pw-carol"))

    def test_any_group(self):
        """C{"*"} (auth_groups: ["*"]) lets the suffix name any group."""
        users = UserDatabase([("al", "pw-al", "default", ("*",))])
        self.assertEqual(users.authenticate("al.anything", "pw-al"), User("al", "anything"))
        self.assertIsNone(users.authenticate("al.", "pw-al"))
        self.assertIsNone(users.authenticate(b"al.\xff", b"pw-al"))

    def test_exact_name_wins(self):
        """A static user whose name has the dotted form decides by its own password."""
        users = UserDatabase([("al", "pw-al", "default", ("lab",)),
                              ("al.lab", "pw-other", "ops")])
        self.assertEqual(users.authenticate("al.lab", "pw-other"), User("al.lab", "ops"))
        self.assertIsNone(users.authenticate("al.lab", "pw-al"))

    def test_group_login_with_a_dotted_id(self):
        """A group login whose id looks dotted still works, with its own password."""
        self.assertEqual(self.users.authenticate("alice.ops", "ops-group-pw"),
                         User("alice.ops", "alice.ops"))
        self.assertIsNone(self.users.authenticate("alice.ops", PASSWORD))

    def test_open_listener(self):
        """An open listener stays open: a dotted name is anonymous there too."""
        self.assertIs(UserDatabase([]).authenticate("alice.lab", PASSWORD), ANONYMOUS)

    def test_same_cost_for_every_name(self):
        """
        Every login makes the same comparisons (the entry's password, or a
        decoy's, and one group login), whether the name, its base or its
        group exist or not.
        """
        import hmac as hmac_module
        calls = []
        real = hmac_module.compare_digest

        def spy(a, b):
            calls.append(len(a))
            return real(a, b)

        self.patch(hmac_module, "compare_digest", spy)
        counts = []
        for name in ("alice", "mallory", "alice.lab", "alice.blue", "mallory.lab", "x.y.z"):
            del calls[:]
            self.users.authenticate(name, "a wrong password")
            counts.append(len(calls))
        self.assertEqual(set(counts), {2})


# -- hashed passwords, rotation and the login throttle --------------------------

import argon2  # noqa: E402
import bcrypt  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.trial.unittest import TestCase  # noqa: E402

from anyproxy.auth import BLOCKED, PENDING, Logins, plain_password_keys  # noqa: E402
from anyproxy.config.load import load_config  # noqa: E402
from anyproxy.errors import ConfigError  # noqa: E402
from anyproxy.login_throttle import LoginThrottle  # noqa: E402
from anyproxy.passwords import PasswordChecker  # noqa: E402

_CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def argon2_hash(password):
    return _CHEAP.hash(password)


def bcrypt_hash(password):
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(4)).decode("ascii")


class HashedUserTests(TestCase):
    """Hashed and rotated passwords: answered at once when known, else through the pool."""

    def setUp(self):
        self.logins = Logins()
        self.addCleanup(self.logins.checker.stop)
        self.users = UserDatabase([
            ("argon", argon2_hash("a-pw"), "red"),
            ("bcrypt", bcrypt_hash("b-pw"), "blue"),
            ("roller", (argon2_hash("old-pw"), "new-plain-pw"), "green"),
        ], logins=self.logins)

    @defer.inlineCallbacks
    def test_hash_pending_then_remembered(self):
        """A hash is PENDING at first, right later, then known at once (the cache)."""
        self.assertIs(self.users.authenticate("argon", "a-pw"), PENDING)
        user = yield self.users.authenticate_later("argon", "a-pw")
        self.assertEqual(user, User("argon", "red"))
        self.assertEqual(self.users.authenticate("argon", "a-pw"), User("argon", "red"))
        self.assertIs(self.users.authenticate("argon", "a-pw!"), PENDING)

    @defer.inlineCallbacks
    def test_wrong_against_hash(self):
        """A wrong password against a hash (either scheme) answers None."""
        for name in ("argon", "bcrypt"):
            user = yield self.users.authenticate_later(name, "nope")
            self.assertIsNone(user, name)
        user = yield self.users.authenticate_later("bcrypt", b"b-pw")
        self.assertEqual(user, User("bcrypt", "blue"))

    @defer.inlineCallbacks
    def test_rotation(self):
        """Either password of a rotation logs in: a plain one at once, a hash later."""
        self.assertEqual(self.users.authenticate("roller", "new-plain-pw"), User("roller", "green"))
        user = yield self.users.authenticate_later("roller", "old-pw")
        self.assertEqual(user, User("roller", "green"))
        user = yield self.users.authenticate_later("roller", "other")
        self.assertIsNone(user)

    @defer.inlineCallbacks
    def test_unknown_name_costs_a_hash(self):
        """An unknown name is checked against a decoy hash, and never let in."""
        self.assertIs(self.users.authenticate("mallory", "a-pw"), PENDING)
        checks = self.logins.checker.hash_checks
        user = yield self.users.authenticate_later("mallory", "a-pw")
        self.assertIsNone(user)
        self.assertEqual(self.logins.checker.hash_checks, checks + 1)

    @defer.inlineCallbacks
    def test_wrong_plain_password_costs_a_hash(self):
        """
        With hashes configured, a wrong plain password costs the hash check an
        unknown name does (PENDING, one check), so the answer's delay does
        not tell names apart; the right plain password is still answered at once.
        """
        users = UserDatabase([("alice", argon2_hash("a-pw"), "red"), ("bob", "plain-pw", "red")],
                             logins=self.logins)
        self.assertIs(users.authenticate("mallory", "guess"), PENDING)
        self.assertIs(users.authenticate("bob", "guess"), PENDING)
        self.assertEqual(users.authenticate("bob", "plain-pw"), User("bob", "red"))
        checks = self.logins.checker.hash_checks
        self.assertIsNone((yield users.authenticate_later("bob", "guess")))
        self.assertIsNone((yield users.authenticate_later("bob", "a-pw")))  # alice's: no matter
        self.assertEqual(self.logins.checker.hash_checks, checks + 2)
        self.assertEqual((yield users.authenticate_later("bob", "plain-pw")), User("bob", "red"))
        # With plain passwords only, no hash anywhere: failures answered at once.
        plain = UserDatabase([("bob", "plain-pw", "red")], logins=self.logins)
        self.assertIsNone(plain.authenticate("bob", "guess"))
        self.assertIsNone(plain.authenticate("mallory", "guess"))

    def test_sentinels_are_false(self):
        """PENDING and BLOCKED are no users: a careless truth test refuses."""
        self.assertFalse(PENDING)
        self.assertFalse(BLOCKED)


class LoginsTests(SynchronousTestCase):
    """L{Logins.attempt}: blocked sources refused unchecked, failures delayed, successes not."""

    def setUp(self):
        self.clock = Clock()
        self.logins = Logins(self.clock, PasswordChecker(), LoginThrottle(
            failures=3, window=60, block=300, clock=self.clock.seconds))
        self.users = UserDatabase([("alice", PASSWORD, "red")], logins=self.logins)

    def test_success_at_once(self):
        """A correct plain login is answered at once, even after failures of its name."""
        self.users.login("10.0.0.9", "alice", "x")
        self.assertEqual(self.users.login("10.0.0.1", "alice", PASSWORD), User("alice", "red"))

    def test_failures_delayed_then_blocked(self):
        """The first failure is answered at once, the next ones later; then BLOCKED, unchecked."""
        self.assertIsNone(self.users.login("10.0.0.9", "alice", "x"))
        delayed = self.users.login("10.0.0.9", "alice", "y")
        self.assertNoResult(delayed)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(delayed))
        third = self.users.login("10.0.0.9", "alice", "z")
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(third))
        checked = []
        self.assertIs(self.logins.attempt("10.0.0.9", b"alice", lambda: checked.append(1),
                                          None), BLOCKED)
        self.assertEqual(checked, [])
        self.assertIs(self.users.login("10.0.0.9", "alice", PASSWORD), BLOCKED)
        self.assertEqual(self.logins.stats(), {"blocks": 1, "refused_blocked": 2, "delayed": 2})
        self.assertEqual(self.users.login("10.0.0.1", "alice", PASSWORD), User("alice", "red"))
        self.clock.advance(300)
        self.assertEqual(self.users.login("10.0.0.9", "alice", PASSWORD), User("alice", "red"))

    def test_guesses_sent_at_once(self):
        """
        Slow checks in flight count against the source like failures: of
        many guesses sent at once only C{failures} are checked; the right
        one among the rest is refused unchecked.
        """
        checks = []
        guesses = iter(range(1000))

        def attempt(right=False):
            def check():
                d = defer.Deferred()
                checks.append((d, right))
                return d
            return self.logins.attempt("10.0.0.9", b"alice", lambda: PENDING, check,
                                       guess=b"guess %d" % (next(guesses),))

        answers = [attempt() for _ in range(30)] + [attempt(right=True)] + [attempt() for _ in range(29)]
        self.assertEqual(len(checks), 3)
        self.assertTrue(all(answer is BLOCKED for answer in answers[3:]))
        for d, _ in checks:
            d.callback(None)
        self.clock.advance(10)
        self.assertEqual([self.successResultOf(answer) for answer in answers[:3]], [None] * 3)
        self.assertEqual(self.logins.throttle._checking, {})
        self.assertIs(self.users.login("10.0.0.9", "alice", PASSWORD), BLOCKED)
        # Another source is not affected.
        self.assertEqual(self.users.login("10.0.0.1", "alice", PASSWORD), User("alice", "red"))

    def test_same_password_at_once_is_one_guess(self):
        """A browser's parallel connections with one password are one guess, all checked."""
        checks = []

        def check():
            d = defer.Deferred()
            checks.append(d)
            return d

        answers = [self.logins.attempt("10.0.0.9", b"alice", lambda: PENDING, check,
                                       guess=PASSWORD.encode()) for _ in range(10)]
        self.assertEqual(len(checks), 10)
        for d in checks:
            d.callback(User("alice", "red"))
        self.assertEqual([self.successResultOf(answer) for answer in answers],
                         [User("alice", "red")] * 10)
        self.assertEqual(self.logins.throttle._checking, {})

    def test_stop_answers_delayed_failures(self):
        """Stopping answers a failed login still being delayed at once (as a failure),
        and leaves no timer behind."""
        self.assertIsNone(self.users.login("10.0.0.9", "alice", "x"))
        delayed = self.users.login("10.0.0.9", "alice", "y")
        self.assertNoResult(delayed)
        self.logins.stop()
        self.assertIsNone(self.successResultOf(delayed))
        self.assertEqual(self.clock.getDelayedCalls(), [])


GATEWAY_YAML = """
proxy:
  socks5: {listen_addr: "127.0.0.1:0", auth_username: alice, auth_password: "%(listener)s"}
gateway:
  listen_addr: "127.0.0.1:0"
  tls_cert: c.pem
  tls_key: k.pem
  auth_username: tunnel
  auth_password: "%(tunnel)s"
  users: [%(users)s]
  clients: [%(clients)s]
"""


class ConfiguredPasswordTests(SynchronousTestCase):
    """Passwords in the config: hashes checked at load, rotation lists, the plain-text list."""

    def load(self, listener="pw", tunnel="pw2", users="", clients=""):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(GATEWAY_YAML % dict(listener=listener, tunnel=tunnel, users=users,
                                        clients=clients))
        return load_config(path, check_files=False)

    def test_truncated_hash_names_the_key(self):
        """A hash cut short fails at load, naming the key and never showing the value."""
        good = argon2_hash("x")
        cases = [
            (dict(tunnel=good[:40]), "gateway.auth_password"),
            (dict(listener=bcrypt_hash("x")[:-2]), "proxy.socks5.auth_password"),
            (dict(users='{username: bob, password: "%s"}' % (good[:30],)),
             "gateway.users[0].password"),
            (dict(users='{username: bob, passwords: [pw, "%s"]}' % (good[:55],)),
             "gateway.users[0].passwords[1]"),
            (dict(clients='{username: s, passwords: ["%s"]}' % (good[:45],)),
             "gateway.clients[0].passwords[0]"),
        ]
        for arguments, key in cases:
            error = self.assertRaises(ConfigError, self.load, **arguments)
            self.assertIn(key + ":", str(error))
            self.assertIn("not a valid", str(error))
            self.assertNotIn(good[:30], str(error))

    def test_password_or_passwords(self):
        """An entry takes password or passwords, not both and not neither."""
        error = self.assertRaises(ConfigError, self.load,
                                  users="{username: bob, password: a, passwords: [b]}")
        self.assertIn("gateway.users[0].passwords: set password or passwords", str(error))
        error = self.assertRaises(ConfigError, self.load, users="{username: bob}")
        self.assertIn("gateway.users[0].password: required", str(error))
        error = self.assertRaises(ConfigError, self.load, users="{username: bob, passwords: []}")
        self.assertIn("must not be empty", str(error))

    def test_rotation_entries(self):
        """passwords lists reach the users' entries and the clients' credentials."""
        good = argon2_hash("new")
        config = self.load(users='{username: bob, passwords: [old, "%s"]}' % (good,),
                           clients='{username: s, passwords: [a, b]}')
        self.assertEqual(config.gateway.users[0].secrets, ("old", good))
        self.assertEqual(config.gateway.clients[0].secrets, ("a", "b"))
        [entry] = [e for e in config.gateway_users_for(config.proxy.socks5) if e[0] == "bob"]
        self.assertEqual(tuple(entry[1]), ("old", good))

    def test_one_file_for_both_programs(self):
        """In a file holding both sections, the client reads its own throttle and passwords."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(GATEWAY_YAML % dict(listener="pw", tunnel="pw2", users="", clients="")
                    + 'client:\n  gateway_addr: "127.0.0.1:8443"\n'
                      '  status_addr: "127.0.0.1:0"\n  status_username: op\n'
                      '  status_password: plain-status\n  auth_throttle: {failures: 3}\n')
        config = load_config(path, check_files=False)
        from twisted.internet.task import Clock
        logins = Logins.from_config(config, Clock(), role="client")
        self.assertEqual(logins.throttle.failures, 3)
        self.assertEqual(plain_password_keys(config, "client"), ["client.status_password"])
        self.assertIn("gateway.auth_password", plain_password_keys(config))

    def test_plain_password_keys(self):
        """The plain-text list names keys and entries, not hashed ones."""
        config = self.load(tunnel=argon2_hash("t"),
                           users='{username: bob, password: "%s"}, {username: eve, '
                                 'passwords: [plain, "%s"]}' % (bcrypt_hash("b"), argon2_hash("e")))
        self.assertEqual(plain_password_keys(config),
                         ["proxy.socks5.auth_password", "gateway.users[eve]"])
