"""
End to end on loopback: at C{log.level: debug}, with the programs' own log
observers (text and JSON) and Autobahn logging its handshakes, no tunnel or
proxy credential reaches any log observer, wrong passwords included.
"""

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support import (
    CLIENT_PASSWORD, CLIENT_USER, PROXY_PASSWORD, PROXY_USER, Deployment, ProgramLogs,
    basic_token, listen_tcp, run_curl, web_site)

WRONG_PASSWORD = "wr0ng-tunnel-pw"


@defer.inlineCallbacks
def wait_until(check, timeout=10, interval=0.05):
    for _ in range(int(timeout / interval)):
        if check():
            return
        yield task.deferLater(reactor, interval, lambda: None)
    raise AssertionError("condition not met in %s seconds" % (timeout,))


class DebugLogSecretTests(unittest.TestCase):
    """The credential in the tunnel handshake never reaches a log."""

    timeout = 30

    def secrets(self):
        return [CLIENT_PASSWORD, basic_token(CLIENT_USER, CLIENT_PASSWORD),
                WRONG_PASSWORD, basic_token(CLIENT_USER, WRONG_PASSWORD),
                PROXY_PASSWORD, basic_token(PROXY_USER, PROXY_PASSWORD)]

    @defer.inlineCallbacks
    def test_handshakes_at_debug(self):
        """
        A client with the right password and one with a wrong password
        connect; Autobahn dumps both opening handshakes at debug (so a leak
        would show), yet neither the password nor its Basic token is in the
        text or JSON log, nor in any event on the global publisher.
        """
        logs = ProgramLogs(self, level="debug", secrets=self.secrets())
        deployment = Deployment(self)
        yield deployment.start_gateway()
        yield deployment.start_client()
        yield deployment.start_client(wait=False, client={
            "client_id": "client-bad", "auth_password": WRONG_PASSWORD})
        yield wait_until(lambda: "client authentication failed" in logs.text())
        # The proxy credential too, in a Proxy-Authorization header.
        target = listen_tcp(self, web_site()).getHost().port
        out, err, code = yield run_curl(
            "-x", "http://127.0.0.1:%d" % (deployment.http_port,),
            "--proxy-user", "%s:%s" % (PROXY_USER, PROXY_PASSWORD),
            "http://target.test:%d/" % (target,))
        self.assertEqual((out, code), (b"hello from the target\n", 0), err)
        written = logs.text()
        # Autobahn's handshake dumps were logged: the test would see a leak.
        self.assertIn("received HTTP request", written)
        self.assertIn("sent HTTP request", written)
        self.assertIn("<redacted>", written)
        logs.assert_clean()
