# -*- test-case-name: tests.test_auth -*-
"""
Tests for L{anyproxy.auth}.
"""

from twisted.trial.unittest import SynchronousTestCase

from anyproxy.auth import ANONYMOUS, DEFAULT_GROUP, User, UserDatabase

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
