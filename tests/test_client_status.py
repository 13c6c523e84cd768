"""
Tests for L{anyproxy.client.status}: which rule refused (L{refusing_rule}),
the bounded ring of refusals, and the client's status page end to end (a
gateway and client in this process; the JSON with curl; the page in Debian's
headless Chromium driven by Playwright, as in L{tests.test_e2e_status}).
"""

import json
import re
import socket
import time

from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyproxy.access_policy import AccessPolicy, HostRule, LimitRule
from anyproxy.client.status.page import CONTENT_SECURITY_POLICY
from anyproxy.client.status.refusals import RefusalLog, refusing_rule
from anyproxy.config.load import load_config
from anyproxy.errors import ConfigError
from tests.support import Deployment, SecretWatch, basic_token, run_curl
from tests.test_e2e_status import SKIP_WITHOUT_CHROMIUM, chromium_page
from tests.test_e2e_tcp import socks_error

STATUS_USER = "client-operator"
STATUS_PASSWORD = "s3cret-client-status-pw"


class RefusingRuleTests(SynchronousTestCase):
    """The rule named for each kind of refusal."""

    def test_forbidden(self):
        policy = AccessPolicy(forbidden=(HostRule.parse("192.168.1."),
                                         HostRule.parse("*.blocked.test")))
        self.assertEqual(refusing_rule(policy, "a.blocked.test", 80, "tcp"),
                         "forbidden_hosts: *.blocked.test")
        self.assertEqual(refusing_rule(policy, "192.168.1.9", 80, "tcp"),
                         "forbidden_hosts: 192.168.1.")
        self.assertEqual(refusing_rule(policy, "nas.test", 80, "tcp", ["192.168.1.5"]),
                         "forbidden_hosts: 192.168.1. (matches 192.168.1.5, which nas.test "
                         "resolves to)")

    def test_allow_lists(self):
        policy = AccessPolicy(allowed_hosts=(HostRule.parse("*.ok.test"),))
        self.assertEqual(refusing_rule(policy, "other.test", 80, "tcp"),
                         "allowed_hosts: no entry admits it")
        limit = AccessPolicy(allowed=(LimitRule.parse("db:5432", "udp", name="db"),))
        self.assertEqual(refusing_rule(limit, "db", 5432, "tcp"), "limit: db admits only udp")
        self.assertEqual(refusing_rule(limit, "web", 80, "tcp"), "limit: no entry admits it")
        self.assertEqual(refusing_rule(AccessPolicy(allow_udp=False), "x", 53, "udp"),
                         "allow_udp: false")

    def test_ring_is_bounded(self):
        clock = task.Clock()
        refusals = RefusalLog(clock, size=3)
        policy = AccessPolicy(forbidden=(HostRule.parse("*"),))
        for port in range(5):
            refusals.record(policy, "h", port, "tcp")
        self.assertEqual([entry["port"] for entry in refusals.entries()], [2, 3, 4])
        self.assertEqual(refusals.total, 5)


class ConfigTests(SynchronousTestCase):
    """C{client.status_addr} needs its login."""

    def test_login_required(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('client: {gateway_addr: "gw:8443", status_addr: "127.0.0.1:9091"}\n')
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertIn("client.status_username: required when status_addr is set", str(error))

    def test_hash_checked(self):
        """A status password that looks like a hash but is not one fails at load, unshown."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('client: {gateway_addr: "gw:8443", status_addr: "127.0.0.1:9091",\n'
                    '         status_username: op, status_password: "$2b$12$cut-secretvalue"}\n')
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertIn("client.status_password: not a valid bcrypt hash", str(error))
        self.assertNotIn("secretvalue", str(error))

    def test_auth_throttle(self):
        """client.auth_throttle is read as the gateway's; absent, the same defaults."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('client: {gateway_addr: "gw:8443", auth_throttle: {failures: 3, block: 9}}\n')
        throttle = load_config(path).client.auth_throttle
        self.assertEqual((throttle.failures, throttle.window, throttle.block), (3, 60.0, 9.0))
        with open(path, "w") as f:
            f.write('client: {gateway_addr: "gw:8443"}\n')
        throttle = load_config(path).client.auth_throttle
        self.assertEqual((throttle.failures, throttle.window, throttle.block), (5, 60.0, 300.0))


class ClientStatusTests(TestCase):
    """The page and its JSON, served by a running client."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        SecretWatch(self, secrets=[STATUS_PASSWORD, basic_token(STATUS_USER, STATUS_PASSWORD)])
        yield self.deployment.start_gateway(gateway={"open_ports_allowed": ["1-65535"]})
        self.forwarded = self.unused_port()
        self.client = yield self.deployment.start_client(client={
            "status_addr": "127.0.0.1:0", "status_username": STATUS_USER,
            "status_password": STATUS_PASSWORD, "ping_interval": 1,
            "metrics_addr": "127.0.0.1:0", "metrics_username": STATUS_USER,
            "metrics_password": STATUS_PASSWORD,
            "forbidden_hosts": ["192.168.1.", "*.blocked.test"],
            "open_ports": [{"remote_port": self.forwarded, "local_port": 22}]})
        port = self.client.status_listener.port.getHost().port
        self.url = "http://127.0.0.1:%d/" % (port,)

    def unused_port(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    @defer.inlineCallbacks
    def api(self):
        out, err, code = yield run_curl("--fail", "-u", "%s:%s" % (STATUS_USER, STATUS_PASSWORD),
                                        self.url + "api/status")
        self.assertEqual(code, 0, err)
        return json.loads(out)

    @defer.inlineCallbacks
    def wait_for_api(self, predicate, timeout=15.0):
        deadline = time.monotonic() + timeout
        while True:
            snapshot = yield self.api()
            if predicate(snapshot) or time.monotonic() > deadline:
                return snapshot
            yield task.deferLater(reactor, 0.1, lambda: None)

    def refuse(self):
        return deferToThread(socks_error, self.deployment.socks_port, "www.blocked.test", 443)

    @defer.inlineCallbacks
    def test_api(self):
        """Tunnel (connected, RTT measured), a refusal with its rule, the forwarded port."""
        error = yield self.refuse()
        self.assertIsNotNone(error)
        snapshot = yield self.wait_for_api(
            lambda s: s["tunnels"][0]["rtt_ms"] is not None and s["refusals"]
            and s["open_ports"][0]["state"] == "open")
        [tunnel] = snapshot["tunnels"]
        self.assertEqual((tunnel["gateway"], tunnel["state"], tunnel["active_streams"]),
                         ("127.0.0.1:%d" % (self.deployment.gateway_port,), "connected", 0))
        self.assertGreaterEqual(tunnel["rtt_ms"], 0)
        self.assertGreaterEqual(tunnel["connected_for"], 0)
        [refusal] = snapshot["refusals"]
        self.assertEqual((refusal["host"], refusal["port"], refusal["protocol"], refusal["rule"]),
                         ("www.blocked.test", 443, "tcp", "forbidden_hosts: *.blocked.test"))
        [port] = snapshot["open_ports"]
        self.assertEqual((port["remote_port"], port["target"], port["state"]),
                         (self.forwarded, "localhost:22", "open"))
        self.assertEqual(snapshot["client"]["client_id"], "client-1")

    @defer.inlineCallbacks
    def test_login(self):
        """Without the login: 401 and a Basic challenge; the page carries its CSP."""
        out, err, code = yield run_curl("-i", self.url + "api/status")
        self.assertIn("401", out.decode().splitlines()[0])
        self.assertIn("www-authenticate: basic", out.decode().lower())
        out, err, code = yield run_curl("-i", "-u", "%s:%s" % (STATUS_USER, STATUS_PASSWORD),
                                        self.url)
        self.assertIn(CONTENT_SECURITY_POLICY.decode(), out.decode())

    @defer.inlineCallbacks
    def test_reload_sets_deadline_and_login(self):
        """A reload's connect_timeout is the page's request deadline from then on, with its login."""
        data = self.deployment.client_config(client={
            "status_addr": "127.0.0.1:0", "status_username": STATUS_USER,
            "status_password": "an0ther-status-pw", "connect_timeout": 2,
            "open_ports": [{"remote_port": self.forwarded, "local_port": 22}]})
        yield self.client.reconfigure(load_config(self.deployment.write_config(data)))
        site = self.client.status_listener.factory
        self.assertEqual(site.request_timeout, 2)
        out, _, _ = yield run_curl("-o", "/dev/null", "-w", "%{http_code}", "-u",
                                   "%s:%s" % (STATUS_USER, STATUS_PASSWORD), self.url + "api/status")
        self.assertEqual(out, b"401")

    @defer.inlineCallbacks
    def test_logins_throttled(self):
        """
        Wrong logins to the status page and the metrics from one address
        count together: 401 until blocked, then 429 with Retry-After (the
        right login too); another address is served.
        """
        metrics_url = "http://127.0.0.1:%d/metrics" % (
            self.client.metrics_listener.port.getHost().port,)

        def fetch(url, password, source):
            return run_curl("--interface", source, "-o", "/dev/null", "-D", "-",
                            "-w", "%{http_code}", "-u", "%s:%s" % (STATUS_USER, password), url)

        codes = []
        for number in range(6):
            out, _, _ = yield fetch((self.url + "api/status", metrics_url)[number % 2],
                                    "wrong-%d" % (number,), "127.0.0.2")
            codes.append(out[-3:])
        self.assertEqual(codes, [b"401"] * 5 + [b"429"])
        for url in (self.url + "api/status", metrics_url):
            out, _, _ = yield fetch(url, STATUS_PASSWORD, "127.0.0.2")
            self.assertTrue(out.endswith(b"429"), out)
            self.assertIn(b"retry-after", out.lower())
            out, _, _ = yield fetch(url, STATUS_PASSWORD, "127.0.0.1")
            self.assertTrue(out.endswith(b"200"), out)

    @defer.inlineCallbacks
    def test_browser(self):
        """Headless Chromium shows the tunnel, its RTT, a refusal and the forwarded port."""
        if SKIP_WITHOUT_CHROMIUM:
            raise self.skipTest(SKIP_WITHOUT_CHROMIUM)
        yield self.refuse()
        seen = yield deferToThread(drive_page, self.url, self.deployment.gateway_port,
                                   self.forwarded)
        self.assertEqual(seen["status"], 200)
        self.assertEqual(seen["errors"], [])
        self.assertEqual(seen["wrong_status"], 401)


def drive_page(url, gateway_port, forwarded):
    """Open the page in Chromium and wait for what it must show; a dict of what was seen."""
    from playwright.sync_api import expect

    seen = {}
    with chromium_page(STATUS_USER, STATUS_PASSWORD) as (browser, page, errors):
        seen["status"] = page.goto(url).status
        expect(page.locator("#state")).to_have_text("live")
        expect(page.locator("#client-id")).to_have_text("client-1")
        row = page.locator('#tunnels-body tr[data-gateway="127.0.0.1:%d"]' % (gateway_port,))
        expect(row.locator("td.state")).to_have_text("connected")
        expect(row.locator("td.rtt")).to_have_text(re.compile(r"^\d+\.\d ms$"))
        refusal = page.locator("#refusals-body tr").first
        expect(refusal.locator("td.target")).to_have_text("www.blocked.test:443")
        expect(refusal.locator("td.rule")).to_have_text("forbidden_hosts: *.blocked.test")
        port = page.locator("#ports-body tr").first
        expect(port.locator("td.port")).to_have_text("%d/tcp" % (forwarded,))
        expect(port.locator("td.port-state")).to_have_text("open")
        seen["errors"] = errors
        wrong = browser.new_context(
            http_credentials={"username": STATUS_USER, "password": "wrong"})
        seen["wrong_status"] = wrong.new_page().goto(url).status
        wrong.close()
    return seen
