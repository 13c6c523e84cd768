# -*- test-case-name: tests.test_e2e_allowed_hosts -*-
"""
End to end with curl, on loopback: C{client.allowed_hosts} and the Go rule
forms (C{*.domain:*}, C{*:port}, a regex) in a real gateway and client.

Names resolve through the test's static resolver (L{tests.support}), all to
127.0.0.1, where the targets listen.  A refused target gets HTTP 403 from
the HTTP proxy and REP 0x02 (connection not allowed by ruleset) on SOCKS5,
and no connection reaches it.
"""

from twisted.internet import defer
from twisted.trial import unittest
from twisted.web import resource, server

from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment, listen_tcp, run_curl

HELLO = b"hello from the target\n"


class Counting(resource.Resource):
    """Answers every GET with HELLO, counting the requests."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        return HELLO


class AllowedHostsTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway()
        self.web = Counting()
        self.web_port = listen_tcp(self, server.Site(self.web)).getHost().port
        self.other = Counting()  # a second port, forbidden by address
        self.other_port = listen_tcp(self, server.Site(self.other)).getHost().port
        self.third = Counting()  # a port any host may be reached on
        self.third_port = listen_tcp(self, server.Site(self.third)).getHost().port
        for name in ("www.allowed.test", "bad.allowed.test", "regex.test", "notregex.test",
                     "other.test"):
            self.deployment.resolver.table[name] = ["127.0.0.1"]
        yield self.deployment.start_client(client={
            # forbidden beats allowed: by name (a regex), and by the address a name resolves to.
            "forbidden_hosts": [r"^bad\.allowed\.test$", "127.0.0.1:%d" % (self.other_port,)],
            "allowed_hosts": [
                "*.allowed.test:*",                          # subdomains, any port
                r"regex\.test:%d" % (self.web_port,),        # a regex with the port
                "*:%d" % (self.third_port,),                 # any host, one port
            ],
        })

    def curl(self, proxy, host, port):
        """C{(stdout, stderr, exit code)} of a GET through C{proxy} ("http" or "socks")."""
        if proxy == "http":
            via = ("-x", "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                                         self.deployment.http_port))
        else:
            via = ("--socks5-hostname", "%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                                                self.deployment.socks_port))
        return run_curl(*via, "-w", "%{http_code}", "http://%s:%d/" % (host, port))

    @defer.inlineCallbacks
    def assertAllowed(self, host, port):
        for proxy in ("http", "socks"):
            out, err, code = yield self.curl(proxy, host, port)
            self.assertEqual((out, code), (HELLO + b"200", 0), (proxy, host, port, err))

    @defer.inlineCallbacks
    def assertRefused(self, host, port):
        out, err, code = yield self.curl("http", host, port)
        self.assertEqual(out, b"target not allowed\n403", (host, port, err))
        out, err, code = yield self.curl("socks", host, port)
        # curl: "Can't complete SOCKS5 connection to ... (2)", exit 97 (proxy handshake).
        self.assertEqual(code, 97, err)
        self.assertIn(b"Can't complete SOCKS5 connection to %s. (2)" % (host.encode(),), err)

    @defer.inlineCallbacks
    def test_allowed(self):
        """A subdomain wildcard with :*, and a regex with its port, admit their targets."""
        yield self.assertAllowed("www.allowed.test", self.web_port)
        yield self.assertAllowed("regex.test", self.web_port)
        self.assertEqual(self.web.requests, 4)

    @defer.inlineCallbacks
    def test_not_in_allowed_hosts(self):
        """A name, literal IP or port no rule admits: 403 / 0x02, and nothing reaches the target."""
        yield self.assertRefused("other.test", self.web_port)
        yield self.assertRefused("127.0.0.1", self.web_port)
        yield self.assertRefused("regex.test", self.other_port)
        yield self.assertRefused("notregex.test", self.web_port)
        self.assertEqual((self.web.requests, self.other.requests), (0, 0))

    @defer.inlineCallbacks
    def test_forbidden_beats_allowed(self):
        """
        A name allowed_hosts admits is refused when a forbidden rule matches
        the name, or the address it resolves to (no DNS-rebinding way around).
        """
        yield self.assertRefused("bad.allowed.test", self.web_port)
        yield self.assertRefused("www.allowed.test", self.other_port)
        self.assertEqual((self.web.requests, self.other.requests), (0, 0))

    @defer.inlineCallbacks
    def test_any_host_one_port(self):
        """C{*:port} admits any name or address, on that port only."""
        yield self.assertAllowed("other.test", self.third_port)
        yield self.assertAllowed("127.0.0.1", self.third_port)
        self.assertEqual(self.third.requests, 4)
        yield self.assertRefused("other.test", self.web_port)

    @defer.inlineCallbacks
    def test_unspecified_address_refused(self):
        """
        0.0.0.0, which Linux dials as this host, is no target even on a port
        any host may reach: refused, and nothing reaches the local listener.
        """
        yield self.assertRefused("0.0.0.0", self.third_port)
        self.assertEqual(self.third.requests, 0)
