# -*- test-case-name: tests.test_e2e_logins -*-
"""
End to end with curl, on loopback: the logins of the original Go AnyProxy.

  - C{username.group_id} (the listener's user, or a C{gateway.users} entry,
    a dot, a group) on both proxies: routed to that group's client, and only
    for a group the user may reach (the listener's user: C{auth_groups}; a
    C{gateway.users} entry: its own group); any other suffix gets 407 / a
    SOCKS5 authentication failure;
  - an open listener (no C{auth_username}, on loopback) beside
    C{gateway.users} stays open, while the authenticated ones still demand
    credentials, and a listener's C{users} picks the entries it takes;
  - a SOCKS4 or SOCKS4a request gets the SOCKS4 rejection, which curl
    reports.
"""

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment, listen_tcp, run_curl, web_site

BOB = {"username": "bob", "password": "bob-pw", "group": "lab"}
HELLO = b"hello from the target\n"


class _Base(unittest.TestCase):
    timeout = 60

    def http(self, credentials=None, port=None):
        port = port or self.deployment.http_port
        return "http://%s127.0.0.1:%d" % (credentials + "@" if credentials else "", port)

    def socks(self, credentials=None, port=None):
        port = port or self.deployment.socks_port
        return "socks5h://%s127.0.0.1:%d" % (credentials + "@" if credentials else "", port)

    def url(self):
        return "http://target.test:%d/hello" % (self.web_port,)

    @defer.inlineCallbacks
    def fetch(self, proxy, *args):
        """curl through C{proxy}: C{(body, stderr as text, exit code)}."""
        out, err, code = yield run_curl("-x", proxy, *(args + (self.url(),)))
        return out, err.decode("utf-8", "replace"), code

    @defer.inlineCallbacks
    def status(self, proxy):
        out, err, code = yield self.fetch(proxy, "-o", "/dev/null", "-w", "%{http_code}")
        return out.decode(), err, code


class DottedGroupLoginTests(_Base):
    """
    The original's C{user.group}: a default client that refuses target.test
    and a lab client that reaches it, so where a login is routed shows.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        self.web_port = listen_tcp(self, web_site()).getHost().port
        yield self.deployment.start_gateway(gateway={
            "auth_groups": ["default", "lab"], "users": [BOB],
            # Many refused logins from loopback: no 429 from the login throttle.
            "auth_throttle": {"failures": 0}})
        yield self.deployment.start_client(client={
            "client_id": "default-1", "forbidden_hosts": ["target.test"]})
        yield self.deployment.start_client(group="lab", client={
            "client_id": "lab-1", "group_id": "lab"})

    def credentials(self, user, password=PROXY_PASSWORD):
        return "%s:%s" % (user, password)

    @defer.inlineCallbacks
    def test_listener_user_with_allowed_group(self):
        """
        alice.lab (the listener's user, a group of auth_groups) reaches the
        lab client on both proxies; plain alice stays in default, whose
        client refuses the target.
        """
        for proxy in (self.http, self.socks):
            out, err, code = yield self.fetch(proxy(self.credentials(PROXY_USER + ".lab")))
            self.assertEqual((code, out), (0, HELLO), (proxy, err))
        http, _, _ = yield self.status(self.http(self.credentials(PROXY_USER)))
        self.assertEqual(http, "403")
        out, err, code = yield self.fetch(self.socks(self.credentials(PROXY_USER + ".default")))
        self.assertNotEqual(code, 0)
        self.assertIn("connection to target.test. (2)", err)  # REP 0x02: not allowed
        [lab] = self.deployment.gateway.tunnel_pool.tunnels("lab")
        self.assertEqual(lab.client_id, "lab-1")

    @defer.inlineCallbacks
    def test_group_not_allowed(self):
        """
        A suffix naming a group outside auth_groups gets 407 on the HTTP
        proxy and an authentication failure on SOCKS5, like a wrong password.
        """
        for user in (PROXY_USER + ".ops", PROXY_USER + ".", "mallory.lab"):
            http, _, _ = yield self.status(self.http(self.credentials(user)))
            self.assertEqual(http, "407", user)
            out, err, code = yield self.fetch(self.socks(self.credentials(user)))
            self.assertNotEqual(code, 0, user)
            self.assertIn("rejected by the socks5 server", err.lower(), user)
        http, _, _ = yield self.status(self.http(self.credentials(PROXY_USER + ".lab", "nope")))
        self.assertEqual(http, "407")

    @defer.inlineCallbacks
    def test_gateway_user_own_group_only(self):
        """
        A gateway.users entry may name its own group; another, with the right
        password, is refused by its policy (403, SOCKS5 0x02: docs/USERS.md).
        """
        for proxy in (self.http, self.socks):
            out, err, code = yield self.fetch(proxy(self.credentials("bob.lab", "bob-pw")))
            self.assertEqual((code, out), (0, HELLO), (proxy, err))
        http, _, _ = yield self.status(self.http(self.credentials("bob.default", "bob-pw")))
        self.assertEqual(http, "403")
        out, err, code = yield self.fetch(self.socks(self.credentials("bob.default", "bob-pw")))
        self.assertNotEqual(code, 0)
        self.assertIn("(2)", err)  # REP 0x02: not allowed


class OpenListenerBesideUsersTests(_Base):
    """gateway.users does not close a listener configured without credentials."""

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        self.web_port = listen_tcp(self, web_site()).getHost().port
        yield self.deployment.start_gateway(
            gateway={"users": [dict(BOB, group="default")]},
            proxy={"http": {"auth_username": "", "auth_password": ""},
                   "frontends": [
                       {"type": "socks5", "listen_addr": "127.0.0.1:0"},
                       {"type": "socks5", "listen_addr": "127.0.0.1:0", "users": ["bob"]}]})
        yield self.deployment.start_client()
        listeners = self.deployment.gateway.listeners
        self.open_socks, self.bob_socks = [
            listeners["socks5 frontend #%d" % (n,)].port.getHost().port for n in (1, 2)]

    @defer.inlineCallbacks
    def test_open_socks5_beside_authenticated(self):
        """
        curl without credentials works on the open SOCKS5 listener; the
        authenticated one still demands them, and takes alice and bob.
        """
        out, err, code = yield self.fetch(self.socks(port=self.open_socks))
        self.assertEqual((code, out), (0, HELLO), err)
        out, err, code = yield self.fetch(self.socks())
        self.assertNotEqual(code, 0)
        self.assertIn("no authentication method was acceptable", err.lower())
        for credentials in ("%s:%s" % (PROXY_USER, PROXY_PASSWORD), "bob:bob-pw"):
            out, err, code = yield self.fetch(self.socks(credentials))
            self.assertEqual((code, out), (0, HELLO), (credentials, err))

    @defer.inlineCallbacks
    def test_open_http_beside_users(self):
        """The HTTP proxy without auth_username stays open too."""
        out, err, code = yield self.fetch(self.http())
        self.assertEqual((code, out), (0, HELLO), err)

    @defer.inlineCallbacks
    def test_users_names(self):
        """users: [bob] makes a loopback listener take bob, and demand a login."""
        out, err, code = yield self.fetch(self.socks(port=self.bob_socks))
        self.assertIn("no authentication method was acceptable", err.lower())
        out, err, code = yield self.fetch(self.socks("bob:bob-pw", port=self.bob_socks))
        self.assertEqual((code, out), (0, HELLO), err)
        out, err, code = yield self.fetch(
            self.socks("%s:%s" % (PROXY_USER, PROXY_PASSWORD), port=self.bob_socks))
        self.assertIn("rejected by the socks5 server", err.lower())


class Socks4RefusalTests(_Base):
    """curl --socks4 / --socks4a hear the SOCKS4 rejection, not a silent close."""

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        self.web_port = listen_tcp(self, web_site()).getHost().port
        yield self.deployment.start_gateway()

    @defer.inlineCallbacks
    def test_socks4(self):
        """curl --socks4 reports the request rejected (CD 91)."""
        out, err, code = yield run_curl(
            "--socks4", "127.0.0.1:%d" % (self.deployment.socks_port,),
            "http://127.0.0.1:%d/hello" % (self.web_port,))
        self.assertEqual((out, code), (b"", 97), err)
        self.assertIn(b"request rejected or failed", err)
        self.assertIn(b"(91)", err)

    @defer.inlineCallbacks
    def test_socks4a(self):
        """curl --socks4a reports the request rejected as well."""
        out, err, code = yield run_curl(
            "--socks4a", "127.0.0.1:%d" % (self.deployment.socks_port,), self.url())
        self.assertEqual((out, code), (b"", 97), err)
        self.assertIn(b"request rejected or failed", err)
