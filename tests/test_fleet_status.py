# -*- test-case-name: tests.test_fleet_status -*-
"""
The fleet on the status page and in C{/api/status} (the C{fleet} key,
L{anyproxy.fleet.node.FleetNode.status}): two gateways of one in-memory
fleet in this process, a client on B, a user relayed through A; the API read
with curl and checked against the OpenAPI schema, and the page driven in
headless Chromium.  Without a fleet the key is absent (tests.test_e2e_status
covers that page).
"""

import json
import os
import re
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from anyproxy.gateway.status.openapi import SCHEMAS
from tests.fleet_support import FleetDeployment, MemoryFleet
from tests.support import Deployment, Echo, listen_tcp, run_curl
from tests.test_e2e_status import (CHROMIUM, CHROMIUM_ARGS, EXPECT_MS, SKIP_WITHOUT_CHROMIUM,
                                   STATUS_PASSWORD, STATUS_USER, echo_through_socks,
                                   status_overrides, status_page_in_chromium)
from tests.test_e2e_tcp import socks_connect, socks_echo


def status_validator():
    """
    A JSON Schema validator of C{/api/status} answers, from the OpenAPI
    description (jsonschema_rs: schemathesis's own validator, a test extra).
    """
    try:
        import jsonschema_rs
    except ImportError:
        raise unittest.SkipTest("no jsonschema_rs (pip install -e .[test])") from None
    schema = {"$ref": "#/components/schemas/Status", "components": {"schemas": SCHEMAS}}
    return jsonschema_rs.Draft202012Validator(schema)


def status_url(deployment):
    listener = deployment.gateway.listeners["status page"]
    return "http://127.0.0.1:%d/" % (listener.port.getHost().port,)


@defer.inlineCallbacks
def read_status(testcase, deployment):
    out, err, code = yield run_curl("-u", "%s:%s" % (STATUS_USER, STATUS_PASSWORD), "--fail",
                                    status_url(deployment) + "api/status")
    testcase.assertEqual(code, 0, err)
    return json.loads(out)


@defer.inlineCallbacks
def wait_for_status(testcase, deployment, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        snapshot = yield read_status(testcase, deployment)
        if predicate(snapshot):
            return snapshot
        if time.monotonic() > deadline:
            raise AssertionError("the status never matched: %r" % (snapshot,))
        yield task.deferLater(reactor, 0.05, lambda: None)


class _FleetStatusBase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        store = MemoryFleet()
        self.a = FleetDeployment(self, store, "node-a")
        self.b = FleetDeployment(self, store, "node-b", pki=self.a.pki)
        for node in (self.a, self.b):
            yield node.start_gateway(**status_overrides())
        yield self.b.start_client()
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield wait_for_status(self, self.a, lambda snapshot: any(
            node["node_id"] == "node-b" and node["groups"] == ["default"]
            for node in snapshot["fleet"]["nodes"]))


class FleetStatusAPITests(_FleetStatusBase):
    """C{/api/status} with a fleet."""

    @defer.inlineCallbacks
    def test_nodes_registry_and_relayed_streams(self):
        """A lists both nodes with their groups, a healthy registry and the relayed stream."""
        self.assertEqual((yield deferToThread(socks_echo, self.a.socks_port, "127.0.0.1",
                                              self.echo_port, b"x" * 5000)), b"x" * 5000)
        snapshot = yield wait_for_status(
            self, self.a, lambda s: s["fleet"]["relayed"]["sent"]["bytes_out"] == 5000
            and s["fleet"]["relayed"]["sent"]["active"] == 0)
        status_validator().validate(snapshot)
        fleet = snapshot["fleet"]
        self.assertEqual(fleet["node"], "node-a")
        own, other = fleet["nodes"]
        self.assertEqual((own["node_id"], own["self"], own["groups"], own["tunnels"],
                          own["draining"]), ("node-a", True, [], 0, False))
        self.assertEqual(own["peer_addr"], self.a.node.peer_address())
        self.assertEqual((other["node_id"], other["self"], other["groups"], other["tunnels"]),
                         ("node-b", False, ["default"], 1))
        self.assertEqual(other["peer_addr"], self.b.node.peer_address())
        self.assertEqual(fleet["registry"]["healthy"], True)
        self.assertEqual(fleet["relayed"]["sent"], {"active": 0, "opened": 1, "failed": 0,
                                                    "bytes_in": 5000, "bytes_out": 5000})
        self.assertEqual(fleet["relayed"]["served"]["opened"], 0)
        self.assertEqual(fleet["links"]["dialed"], 1)
        self.assertEqual(snapshot["totals"]["tunnels"], 0)  # the relay lists no local tunnel

        served = yield wait_for_status(
            self, self.b, lambda s: s["fleet"]["relayed"]["served"]["bytes_in"] == 5000)
        status_validator().validate(served)
        self.assertEqual(served["fleet"]["relayed"]["served"]["opened"], 1)
        self.assertEqual(served["fleet"]["links"]["accepted"], 1)
        self.assertEqual([node["node_id"] for node in served["fleet"]["nodes"]],
                         ["node-b", "node-a"])

    @defer.inlineCallbacks
    def test_registry_unhealthy_and_draining_shown(self):
        """An unreachable registry shows as unhealthy; a draining gateway says so of itself."""
        self.a.node.registry.healthy = False
        snapshot = yield read_status(self, self.a)
        self.assertFalse(snapshot["fleet"]["registry"]["healthy"])
        self.a.node.registry.healthy = True
        # What the status API reads of a drain (anyproxy.gateway.drain) is the
        # gateway's draining attribute: set it as a drain does, without stopping.
        self.a.gateway.draining = object()
        self.addCleanup(setattr, self.a.gateway, "draining", None)
        snapshot = yield read_status(self, self.a)
        self.assertTrue(snapshot["fleet"]["nodes"][0]["draining"])

    @defer.inlineCallbacks
    def test_no_fleet_no_key(self):
        """A gateway without gateway.fleet answers without a fleet key."""
        alone = Deployment(self)
        yield alone.start_gateway(**status_overrides())
        snapshot = yield read_status(self, alone)
        self.assertNotIn("fleet", snapshot)
        status_validator().validate(snapshot)


def fleet_browser_session(url, socks_port, echo_port, screenshot_path):
    """
    Drive A's status page in headless Chromium (runs in a thread): the fleet
    section appears with both nodes and B's group, and the relayed counter
    follows a stream held open through A.
    """
    from playwright.sync_api import expect

    seen = {}
    with status_page_in_chromium() as (page, errors):
        page.goto(url)
        expect(page.locator("#fleet")).to_be_visible()
        expect(page.locator("#fleet-node")).to_have_text("node-a")
        expect(page.locator("#fleet-registry")).to_have_text("healthy")
        own = page.locator('#fleet-nodes-body tr[data-node-id="node-a"]')
        other = page.locator('#fleet-nodes-body tr[data-node-id="node-b"]')
        expect(own.locator("td.node-id")).to_have_text("node-a (this node)")
        expect(other.locator("td.groups")).to_have_text("default")
        expect(other.locator("td.tunnels")).to_have_text("1")
        expect(other.locator("td.node-state")).to_have_text("serving")
        expect(page.locator("#fleet-sent")).to_have_text("0 open")
        sock = socks_connect(socks_port, "127.0.0.1", echo_port)
        try:
            echo_through_socks(sock, 64 * 1024)
            expect(page.locator("#fleet-sent")).to_have_text("1 open")
            expect(page.locator("#fleet-sent-detail")).to_have_text(
                re.compile(r"^1 opened, 0 failed; 64\.0 KiB in, 64\.0 KiB out$"))
            expect(other.locator("td.streams")).to_have_text(re.compile(r"^\d+$"))
            page.screenshot(path=screenshot_path, full_page=True)
        finally:
            sock.close()
        expect(page.locator("#fleet-sent")).to_have_text("0 open")
        seen["errors"] = errors
    return seen


class FleetStatusBrowserTests(_FleetStatusBase):
    """The fleet section of the status page in headless Chromium."""

    timeout = 120
    skip = SKIP_WITHOUT_CHROMIUM

    @defer.inlineCallbacks
    def test_page_shows_fleet(self):
        """Nodes, groups, registry health and live relayed streams appear, with no script error."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        screenshot = os.path.join(directory, "fleet-status.png")
        seen = yield deferToThread(fleet_browser_session, status_url(self.a), self.a.socks_port,
                                   self.echo_port, screenshot)
        self.assertEqual(seen["errors"], [])
        self.assertGreater(os.path.getsize(screenshot), 1000)


class NoFleetBrowserTests(unittest.TestCase):
    """Without a fleet the section stays hidden."""

    timeout = 120
    skip = SKIP_WITHOUT_CHROMIUM

    @defer.inlineCallbacks
    def test_fleet_section_hidden(self):
        """The page of a gateway in no fleet shows no fleet section."""
        alone = Deployment(self)
        yield alone.start_gateway(**status_overrides())

        def session(url):
            from playwright.sync_api import expect, sync_playwright
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                     args=CHROMIUM_ARGS)
                try:
                    context = browser.new_context(http_credentials={
                        "username": STATUS_USER, "password": STATUS_PASSWORD})
                    page = context.new_page()
                    page.goto(url)
                    expect(page.locator("#state")).to_have_text(
                        re.compile("^live, updated "), timeout=EXPECT_MS)
                    return page.locator("#fleet").is_visible()
                finally:
                    browser.close()

        self.assertFalse((yield deferToThread(session, status_url(alone))))
