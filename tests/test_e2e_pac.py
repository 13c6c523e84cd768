# -*- test-case-name: tests.test_e2e_pac -*-
"""
C{/proxy.pac} and C{/clash.yaml} end to end: the routes a client announces
become a PAC file, and headless Chromium started with C{--proxy-pac-url}
loads a private page through the proxy and a "public" page (another
loopback server) directly; the gateway's access log shows which went
through it.  Chromium resolves no name itself (C{--host-resolver-rules}).
"""

import json
import os
import time

import yaml
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import Deployment, listen_tcp, run_curl, web_site
from tests.test_e2e_status import (
    CHROMIUM, CHROMIUM_ARGS, SKIP_WITHOUT_CHROMIUM, STATUS_PASSWORD, STATUS_USER,
    status_overrides)


class ProfileTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.access_log = os.path.join(directory, "access.jsonl")
        overrides = status_overrides()
        overrides["gateway"].update({"access_log": self.access_log,
                                     "pac_extra_routes": ["10.9.0.0/16"]})
        # An open HTTP proxy on loopback: a browser fed a PAC file has no way
        # to answer a 407 in a headless test.
        overrides["proxy"] = {"http": {"listen_addr": "127.0.0.1:0", "auth_username": "",
                                       "auth_password": ""}}
        yield self.deployment.start_gateway(**overrides)
        self.status_port = self.deployment._port("status page")
        self.private_port = listen_tcp(self, web_site()).getHost().port
        self.public_port = listen_tcp(self, web_site(), interface="127.0.0.3").getHost().port
        self.deployment.resolver.table["intranet.private.test"] = ["127.0.0.1"]
        yield self.deployment.start_client(client={"routes": ["*.private.test"]})

    def profile_url(self, path, credentials=True):
        login = "%s:%s@" % (STATUS_USER, STATUS_PASSWORD) if credentials else ""
        return "http://%s127.0.0.1:%d%s" % (login, self.status_port, path)

    @defer.inlineCallbacks
    def test_pac_and_clash_need_the_login(self):
        for path in ("/proxy.pac", "/clash.yaml"):
            out, _, _ = yield run_curl("-o", "/dev/null", "-w", "%{http_code}",
                                       self.profile_url(path, credentials=False))
            self.assertEqual(out, b"401")
        pac, _, code = yield run_curl(self.profile_url("/proxy.pac"))
        self.assertEqual(code, 0)
        self.assertIn(b'var PROXY = "PROXY 127.0.0.1:%d";' % (self.deployment.http_port,), pac)
        self.assertIn(b'"private.test"', pac)
        self.assertIn(b'"10.9.0.0"', pac)
        # The capability URLs (for browsers, which cannot log in for a PAC
        # file): the right token opens them, a wrong one does not.
        urls, _, _ = yield run_curl(self.profile_url("/api/profiles"))
        urls = json.loads(urls)
        self.assertTrue(urls["pac"].startswith("/proxy.pac?token="))
        anonymous_pac, _, _ = yield run_curl(self.profile_url(urls["pac"], credentials=False))
        self.assertEqual(anonymous_pac, pac)
        out, _, _ = yield run_curl("-o", "/dev/null", "-w", "%{http_code}", self.profile_url(
            urls["pac"][:-1] + ("0" if urls["pac"][-1] != "0" else "1"), credentials=False))
        self.assertEqual(out, b"401")
        self.assertNotIn(STATUS_PASSWORD, json.dumps(urls))
        clash, _, _ = yield run_curl(self.profile_url(urls["clash"], credentials=False))
        profile = yaml.safe_load(clash)
        self.assertEqual(profile["rules"], [
            "DOMAIN-SUFFIX,private.test,AnyProxy", "IP-CIDR,10.9.0.0/16,AnyProxy,no-resolve",
            "MATCH,DIRECT"])
        self.assertEqual(profile["proxies"][0]["port"], self.deployment.http_port)

    @defer.inlineCallbacks
    def test_browser_follows_the_pac(self):
        if SKIP_WITHOUT_CHROMIUM:
            raise unittest.SkipTest(SKIP_WITHOUT_CHROMIUM)
        urls, _, _ = yield run_curl(self.profile_url("/api/profiles"))
        pages = yield deferToThread(
            browse, self.profile_url(json.loads(urls)["pac"], credentials=False),
            ["http://intranet.private.test:%d/hello" % (self.private_port,),
             "http://public.example:%d/hello" % (self.public_port,)])
        self.assertEqual(pages, ["hello from the target", "hello from the target"])
        # The gateway's records of what went through it: the streams still
        # open (the HTTP proxy keeps its upstream connection for reuse) and
        # the access log of those that ended.
        out, _, _ = yield run_curl(self.profile_url("/api/streams"))
        targets = [stream["target"] for stream in json.loads(out)["streams"]]
        yield task.deferLater(reactor, 1.5, lambda: None)  # the access log flushes each second
        if os.path.exists(self.access_log):
            with open(self.access_log) as f:
                targets += [json.loads(line)["target"] for line in f]
        self.assertIn("intranet.private.test:%d" % (self.private_port,), targets)
        self.assertFalse([t for t in targets if "public.example" in t], targets)


def browse(pac_url, urls):
    """Load each of C{urls} in headless Chromium configured by C{pac_url}; their texts."""
    from playwright.sync_api import sync_playwright

    args = CHROMIUM_ARGS + [
        "--proxy-pac-url=" + pac_url,
        # The browser resolves public.example itself (the PAC sends it DIRECT)
        # and nothing else: a proxied name is resolved by the proxy.
        "--host-resolver-rules=MAP public.example 127.0.0.3, MAP * ~NOTFOUND, "
        "EXCLUDE 127.0.0.1, EXCLUDE 127.0.0.3"]
    texts = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page()
            for url in urls:
                deadline = time.monotonic() + 15
                while True:
                    try:
                        page.goto(url, timeout=10000)
                        texts.append(page.inner_text("body").strip())
                        break
                    except Exception:
                        # The PAC fetch races the first load.
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
        finally:
            browser.close()
    return texts


class GroupProfileTests(unittest.TestCase):
    """Each group's own profile URLs name only that group's routes."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        overrides = status_overrides()
        overrides["gateway"].update({"pac_extra_routes": ["10.9.0.0/16"],
                                     "auth_groups": ["default", "ops"]})
        yield self.deployment.start_gateway(**overrides)
        self.status_port = self.deployment._port("status page")
        yield self.deployment.start_client(client={"routes": ["*.private.test"]})
        # group: the one whose tunnel start_client waits for.
        yield self.deployment.start_client(group="ops", client={
            "client_id": "ops-1", "group_id": "ops",
            "routes": ["*.ops-secret.test", "172.31.7.0/24"]})

    def url(self, path, credentials=False):
        login = "%s:%s@" % (STATUS_USER, STATUS_PASSWORD) if credentials else ""
        return "http://%s127.0.0.1:%d%s" % (login, self.status_port, path)

    @defer.inlineCallbacks
    def test_group_urls(self):
        """A group's token opens its group's profile only; the other group's routes are not in it."""
        urls, _, _ = yield run_curl(self.url("/api/profiles", credentials=True))
        urls = json.loads(urls)
        self.assertEqual(sorted(urls["groups"]), ["default", "ops"])
        default_pac, _, _ = yield run_curl(self.url(urls["groups"]["default"]["pac"]))
        self.assertIn(b'"private.test"', default_pac)
        self.assertIn(b'"10.9.0.0"', default_pac)
        self.assertNotIn(b"ops-secret", default_pac)
        self.assertNotIn(b"172.31.7.0", default_pac)
        ops_clash, _, _ = yield run_curl(self.url(urls["groups"]["ops"]["clash"]))
        self.assertIn("DOMAIN-SUFFIX,ops-secret.test,AnyProxy", yaml.safe_load(ops_clash)["rules"])
        self.assertNotIn(b"private.test", ops_clash)
        # The operator's URL has every group's; one group's token does not open another's.
        everything, _, _ = yield run_curl(self.url(urls["pac"]))
        self.assertIn(b"ops-secret", everything)
        self.assertIn(b"private.test", everything)
        default_token = urls["groups"]["default"]["pac"].rpartition("token=")[2]
        for path in ("/proxy.pac?group=ops&token=" + default_token,
                     "/proxy.pac?token=" + default_token,
                     "/proxy.pac?group=nobody&token=" + default_token):
            out, _, _ = yield run_curl("-o", "/dev/null", "-w", "%{http_code}", self.url(path))
            self.assertEqual(out, b"401", path)


class TokenTests(unittest.SynchronousTestCase):
    """The capability token costs a guesser an scrypt per password tried, and us one per password."""

    def test_scrypt_of_the_status_password(self):
        import hashlib
        from types import SimpleNamespace
        from anyproxy.gateway.status.profiles import ProxyProfiles
        config = SimpleNamespace(gateway=SimpleNamespace(status_username="operator",
                                                         status_password="status-pw"))
        profiles = ProxyProfiles(None, lambda: config)
        expected = hashlib.scrypt(b"status-pw", salt=b"anyproxy profile token v3\0\0\0\0\x08operator",
                                  n=2 ** 14, r=8, p=1, maxmem=64 * 1024 * 1024, dklen=16).hex()
        self.assertEqual(profiles.token(), expected)
        self.assertIs(profiles.token(), profiles.token())  # derived once
        # Another install's login name: another token for the same password.
        config.gateway.status_username = "admin"
        other = profiles.token()
        self.assertNotEqual(other, expected)
        config.gateway.status_password = "new-pw"
        self.assertNotIn(profiles.token(), (expected, other))


class TokenCacheTests(unittest.TestCase):
    """Group tokens: derived off the reactor for /api/profiles, kept in a bounded cache."""

    @defer.inlineCallbacks
    def test_urls_and_cache(self):
        from types import SimpleNamespace
        from anyproxy.gateway.status import profiles as module
        self.patch(module, "MAX_GROUP_TOKENS", 3)
        tunnels = [SimpleNamespace(group=name, routes=None) for name in ("a", "b", "c", "d")]
        pool = SimpleNamespace(tunnels=lambda group=None: [t for t in tunnels
                                                           if group in (None, t.group)])
        config = SimpleNamespace(gateway=SimpleNamespace(status_username="op",
                                                         status_password="pw"))
        profiles = module.ProxyProfiles(pool, lambda: config)
        urls = yield profiles.urls()
        self.assertEqual(sorted(urls["groups"]), ["a", "b", "c", "d"])
        self.assertIn("token=" + module.profile_token("op", "pw", group="b"),
                      urls["groups"]["b"]["pac"])
        self.assertTrue(urls["pac"].endswith(module.profile_token("op", "pw")))
        # At most 3 kept, the operator's among them.
        self.assertEqual(len(profiles._tokens), 3)
        self.assertIn(None, profiles._tokens)
