"""Tests for L{anyproxy.passwords} and the C{anyproxy-passwd} command."""

import io
import os
import subprocess
import sys

import argon2
import bcrypt
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyproxy import passwd_command
from anyproxy.passwords import (
    PasswordChecker, check_hash_format, hash_password, scheme_of)

# Cheap parameters: the checks read them from the hash, so tests stay fast.
_CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def argon2_hash(password):
    return _CHEAP.hash(password)


def bcrypt_hash(password):
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(4)).decode("ascii")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class SchemeTests(SynchronousTestCase):
    def test_schemes(self):
        self.assertEqual(scheme_of(argon2_hash("x")), "argon2id")
        self.assertEqual(scheme_of(bcrypt_hash("x")), "bcrypt")
        self.assertEqual(scheme_of("hunter2"), "plain")

    def test_truncated_hashes_refused(self):
        for good in (argon2_hash("x"), bcrypt_hash("x")):
            check_hash_format(good)
            self.assertRaises(ValueError, check_hash_format, good.rsplit("$", 1)[0])
            self.assertRaises(ValueError, check_hash_format, good[:25])
            self.assertRaises(ValueError, check_hash_format, good + "$")

    def test_hash_password_forms(self):
        self.assertTrue(hash_password("pw").startswith("$argon2id$v=19$"))
        self.assertTrue(hash_password("pw", "bcrypt").startswith("$2b$12$"))
        self.assertRaises(ValueError, hash_password, "x" * 73, "bcrypt")
        self.assertRaises(ValueError, hash_password, "pw", "md5")


class CheckNowTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.checker = PasswordChecker(clock=self.clock, cache_ttl=60)

    def test_plain(self):
        self.assertTrue(self.checker.check_now("bob", "pw", ["pw"]))
        self.assertFalse(self.checker.check_now("bob", "pX", ["pw"]))
        self.assertFalse(self.checker.check_now("bob", "", ["pw"]))

    def test_rotation_plain(self):
        self.assertTrue(self.checker.check_now("bob", "old", ["old", "new"]))
        self.assertTrue(self.checker.check_now("bob", "new", ["old", "new"]))
        self.assertFalse(self.checker.check_now("bob", "old", ["new"]))

    def test_hash_unknown_until_checked(self):
        self.assertIsNone(self.checker.check_now("bob", "pw", [argon2_hash("pw")]))


class CheckTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.checker = PasswordChecker(clock=self.clock, cache_ttl=60, cache_size=3)
        self.addCleanup(self.checker.stop)

    @defer.inlineCallbacks
    def test_argon2(self):
        secret = argon2_hash("correct horse")
        self.assertTrue((yield self.checker.check("bob", "correct horse", [secret])))
        self.assertFalse((yield self.checker.check("bob", "wrong", [secret])))

    @defer.inlineCallbacks
    def test_bcrypt(self):
        secret = bcrypt_hash("correct horse")
        self.assertTrue((yield self.checker.check("bob", "correct horse", [secret])))
        self.assertFalse((yield self.checker.check("bob", "correct hors", [secret])))
        self.assertFalse((yield self.checker.check("bob", "x" * 100, [secret])))

    @defer.inlineCallbacks
    def test_rotation_hashed(self):
        secrets = [argon2_hash("old"), bcrypt_hash("new")]
        self.assertTrue((yield self.checker.check("bob", "old", secrets)))
        self.assertTrue((yield self.checker.check("bob", "new", secrets)))
        self.assertFalse((yield self.checker.check("bob", "old", secrets[1:])))

    @defer.inlineCallbacks
    def test_good_pair_remembered_until_expiry(self):
        secrets = [argon2_hash("pw")]
        self.assertTrue((yield self.checker.check("bob", "pw", secrets)))
        self.assertEqual(self.checker.hash_checks, 1)
        self.assertTrue(self.checker.check_now("bob", "pw", secrets))
        d = self.checker.check("bob", "pw", secrets)
        self.assertTrue(d.called)
        self.assertTrue((yield d))
        self.assertEqual(self.checker.hash_checks, 1)
        self.clock.now += 61
        self.assertIsNone(self.checker.check_now("bob", "pw", secrets))

    @defer.inlineCallbacks
    def test_failure_never_remembered(self):
        secrets = [argon2_hash("pw")]
        for _ in range(2):
            self.assertFalse((yield self.checker.check("bob", "nope", secrets)))
        self.assertEqual(self.checker.hash_checks, 2)

    @defer.inlineCallbacks
    def test_remembered_only_for_the_same_secrets(self):
        """A reload that changes the entry's secrets forgets its good pairs."""
        old = [argon2_hash("pw")]
        self.assertTrue((yield self.checker.check("bob", "pw", old)))
        self.assertIsNone(self.checker.check_now("bob", "pw", [argon2_hash("other")]))
        self.assertIsNone(self.checker.check_now("alice", "pw", old))

    @defer.inlineCallbacks
    def test_memory_bounded_and_holds_no_password(self):
        secrets = [argon2_hash("pw%d" % (i,)) for i in range(5)]
        for i in range(5):
            self.assertTrue((yield self.checker.check("u", "pw%d" % (i,), [secrets[i]])))
        self.assertEqual(len(self.checker._good), 3)
        for key in self.checker._good:
            self.assertEqual(len(key), 32)
            self.assertNotIn(b"pw", key)
        # the oldest went first
        self.assertIsNone(self.checker.check_now("u", "pw0", [secrets[0]]))
        self.assertTrue(self.checker.check_now("u", "pw4", [secrets[4]]))


class PasswdCommandTests(SynchronousTestCase):
    def run_main(self, text, *argv):
        out, err = io.StringIO(), io.StringIO()
        code = passwd_command.main(list(argv), stdin=io.StringIO(text), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def test_argon2(self):
        code, out, err = self.run_main("s3cret pass\n")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(argon2.PasswordHasher().verify(out.strip(), "s3cret pass"))

    def test_bcrypt(self):
        code, out, _ = self.run_main("s3cret\n", "--bcrypt")
        self.assertEqual(code, 0)
        self.assertTrue(bcrypt.checkpw(b"s3cret", out.strip().encode()))

    def test_refusals(self):
        self.assertEqual(self.run_main("\n")[0], 1)
        self.assertEqual(self.run_main("")[0], 1)
        code, out, err = self.run_main("x" * 80 + "\n", "--bcrypt")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("72 bytes", err)

    def test_bad_usage(self):
        self.assertRaises(SystemExit, self.run_main, "pw\n", "--md5")

    def test_as_a_command(self):
        """The installed console script (or the module) prints a hash that checks."""
        script = os.path.join(os.path.dirname(sys.executable), "anyproxy-passwd")
        command = [script] if os.path.exists(script) else [
            sys.executable, "-m", "anyproxy.passwd_command"]
        done = subprocess.run(command, input=b"from stdin\n", capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertTrue(argon2.PasswordHasher().verify(done.stdout.decode().strip(), "from stdin"))
        self.assertNotIn(b"from stdin", done.stdout + done.stderr)
