"""
Reload on SIGHUP through real twistd processes: the operator edits the
config file and sends the gateway SIGHUP.
"""

import os

import yaml
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import run_curl
from tests.test_e2e_tcp import socks_connect
from tests import test_e2e_twistd
from tests.test_e2e_reload import roundtrip
from tests.test_e2e_twistd import ROOT, spawn_twistd, wait_until

NEW_PASSWORD = "fresh-secret-9"


class ReloadTwistdTests(unittest.TestCase):
    """SIGHUP makes a running twistd gateway read its edited config."""

    timeout = 120
    # The process fixtures of the twistd end-to-end tests, without their tests
    # (the class is not imported by name, so trial does not run it twice).
    setUp = test_e2e_twistd.TwistdTests.setUp
    start_gateway = test_e2e_twistd.TwistdTests.start_gateway
    start_client = test_e2e_twistd.TwistdTests.start_client

    @defer.inlineCallbacks
    def status(self, password):
        out, _, _ = yield run_curl(
            "-x", "http://user:%s@127.0.0.1:%d" % (password, self.ports["http"]),
            "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
            "http://127.0.0.1:%d/hello" % (self.target,))
        return out.decode()

    def edit(self, change):
        with open(self.config) as f:
            data = yaml.safe_load(f)
        change(data)
        with open(self.config, "w") as f:
            yaml.safe_dump(data, f)

    @defer.inlineCallbacks
    def test_sighup_applies_new_password(self):
        """After SIGHUP the new password works, the old gets 407, and an open stream flows."""
        gateway = self.start_gateway()
        self.start_client()
        yield wait_until(lambda: self.status("proxy-pw").addCallback(lambda s: s == "200"))
        sock = yield deferToThread(socks_connect, self.ports["socks"], "127.0.0.1", self.echo,
                                   username="user", password="proxy-pw")
        self.addCleanup(sock.close)
        self.assertEqual((yield deferToThread(roundtrip, sock, b"before")), b"before")

        # A broken file first: refused, the old password still works.
        self.edit(lambda data: data["gateway"].update(balance="fastest"))
        gateway.transport.signalProcess("HUP")
        yield wait_until(lambda: "reload refused" in gateway.text())
        self.assertIn("%s: gateway.balance" % (self.config,), gateway.text())
        self.assertEqual((yield self.status("proxy-pw")), "200")

        def new_password(data):
            data["gateway"]["balance"] = "least_streams"
            for name in ("socks5", "http"):
                data["proxy"][name]["auth_password"] = NEW_PASSWORD

        self.edit(new_password)
        gateway.transport.signalProcess("HUP")
        yield wait_until(lambda: "reload applied" in gateway.text())
        self.assertEqual((yield self.status(NEW_PASSWORD)), "200")
        self.assertEqual((yield self.status("proxy-pw")), "407")
        self.assertEqual((yield deferToThread(roundtrip, sock, b"after")), b"after")
        self.assertFalse(gateway.ended.called)
        for secret in ("proxy-pw", NEW_PASSWORD, "tunnel-pw"):
            self.assertNotIn(secret, gateway.text())

    @defer.inlineCallbacks
    def test_sighup_after_rundir(self):
        """
        A relative --config with twistd's --rundir (which changes directory
        before the gateway runs): SIGHUP still reads the same file.
        """
        rundir = os.path.abspath(self.mktemp())
        os.makedirs(rundir)
        gateway = spawn_twistd(self, "--rundir=" + rundir, "anyproxy-gateway",
                               "--config=" + os.path.relpath(self.config, ROOT))
        self.start_client()
        yield wait_until(lambda: self.status("proxy-pw").addCallback(lambda s: s == "200"))
        self.edit(lambda data: data["proxy"]["http"].update(auth_password=NEW_PASSWORD))
        gateway.transport.signalProcess("HUP")
        yield wait_until(lambda: "reload applied" in gateway.text()
                         or "reload refused" in gateway.text())
        self.assertNotIn("reload refused", gateway.text())
        self.assertEqual((yield self.status(NEW_PASSWORD)), "200")
