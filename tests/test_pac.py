"""Tests for L{anyproxy.gateway.pac}: routes, the PAC file (run in node when present), Clash."""

import json
import shutil
import subprocess

import yaml
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.gateway.pac import clash_profile, pac_file
from anyproxy.routes import Routes

# The PAC helpers a browser provides, as the PAC spec defines them (no DNS).
PAC_RUNTIME = r"""
function dnsDomainIs(host, domain) {
  return host.length >= domain.length && host.substring(host.length - domain.length) == domain;
}
function ip4(a) { return a.split(".").reduce(function (n, o) { return n * 256 + (+o); }, 0); }
function isInNet(host, net, mask) {
  return (ip4(host) & ip4(mask)) >>> 0 == (ip4(net) & ip4(mask)) >>> 0;
}
"""


class RoutesTests(SynchronousTestCase):
    def test_forms(self):
        routes = Routes.of(["*.Corp.Example.", "db.lan", "10.1.0.0/16", "10.1.2.3/16", "fd00::/8"])
        self.assertEqual(routes.suffixes, ("corp.example",))
        self.assertEqual(routes.names, ("db.lan",))
        self.assertEqual([str(n) for n in routes.networks], ["10.1.0.0/16", "fd00::/8"])

    def test_bad(self):
        for bad in ["", "*.", "a..b", "http://x", "10.0.0.0/33x", "bad name"]:
            self.assertRaises(ValueError, Routes.of, [bad])

    def test_sum(self):
        both = Routes.of(["*.a.example"]) + Routes.of(["10.0.0.0/8", "*.a.example"])
        self.assertEqual((both.suffixes, len(both.networks)), (("a.example",), 1))


class PacTests(SynchronousTestCase):
    def setUp(self):
        if shutil.which("node") is None:
            raise self.skipTest("node is not installed (the Chromium test runs the PAC too)")

    def decide(self, routes, hosts):
        script = PAC_RUNTIME + pac_file(routes, "PROXY gw:8080") + (
            "console.log(JSON.stringify(%s.map(function (h) { return FindProxyForURL("
            "'http://' + h + '/', h); })));" % (json.dumps(hosts),))
        done = subprocess.run(["node", "-e", script], capture_output=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        return dict(zip(hosts, json.loads(done.stdout)))

    def test_decisions(self):
        routes = Routes.of(["*.corp.example", "db.lan", "10.1.0.0/16"])
        decisions = self.decide(routes, [
            "corp.example", "wiki.corp.example", "a.b.corp.example", "notcorp.example",
            "db.lan", "x.db.lan", "10.1.200.3", "10.2.0.1", "example.com", "WIKI.CORP.EXAMPLE"])
        proxied = {h for h, d in decisions.items() if d == "PROXY gw:8080"}
        self.assertEqual(proxied, {"corp.example", "wiki.corp.example", "a.b.corp.example",
                                   "db.lan", "10.1.200.3", "WIKI.CORP.EXAMPLE"})
        self.assertEqual(set(decisions.values()), {"PROXY gw:8080", "DIRECT"})

    def test_empty_routes_all_direct(self):
        self.assertEqual(set(self.decide(Routes(), ["a.example", "10.0.0.1"]).values()),
                         {"DIRECT"})


class ClashTests(SynchronousTestCase):
    def test_profile(self):
        text = clash_profile(Routes.of(["*.corp.example", "10.1.0.0/16", "fd00::/8"]), "socks5",
                             "gw.example.com", 1080)
        profile = yaml.safe_load(text)
        self.assertEqual(profile["proxies"], [{"name": "anyproxy", "type": "socks5",
                                               "server": "gw.example.com", "port": 1080}])
        self.assertEqual(profile["rules"], [
            "DOMAIN-SUFFIX,corp.example,AnyProxy", "IP-CIDR,10.1.0.0/16,AnyProxy,no-resolve",
            "IP-CIDR6,fd00::/8,AnyProxy,no-resolve", "MATCH,DIRECT"])
