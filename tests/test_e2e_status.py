"""
The gateway's status page end to end: a real gateway and client in this
process, the page and its JSON API fetched with curl, and the page driven in
a real headless Chromium (Debian's C{/usr/bin/chromium}) by Playwright.

The browser tests run Playwright's sync API in a thread (C{deferToThread})
while the reactor keeps serving in the main thread; the SOCKS5 traffic they
watch the page react to is sent from that same thread with PySocks.
"""

import base64
import contextlib
import json
import os
import re
import socket
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from anyproxy.config.load import load_config
from anyproxy.gateway.app import make_gateway_service
from tests.support import Deployment, Echo, SecretWatch, listen_tcp, run_curl
from tests.test_e2e_tcp import socks_connect

STATUS_USER = "operator"
STATUS_PASSWORD = "s3cret-status-pw"

CHROMIUM = "/usr/bin/chromium"
# A browser test class's skip: None when Chromium is there.
SKIP_WITHOUT_CHROMIUM = (None if os.path.exists(CHROMIUM) else
                         "%s is not installed (apt-get install chromium; .ci/run installs it)"
                         % (CHROMIUM,))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Playwright's own wait for each expected text; the page polls once a second.
EXPECT_MS = 15000


@contextlib.contextmanager
def chromium_page(username=STATUS_USER, password=STATUS_PASSWORD):
    """
    C{(browser, page, errors)}: a headless Chromium browser, a page of it
    logged in with C{username}/C{password} (C{EXPECT_MS} default timeout),
    and the list its script errors and console errors go to.  The browser
    is closed on leaving; more contexts may be opened on it meanwhile.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary profile (user-data-dir).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                http_credentials={"username": username, "password": password})
            context.set_default_timeout(EXPECT_MS)
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: message.type == "error" and
                    errors.append(message.text))
            yield browser, page, errors
            context.close()
        finally:
            browser.close()


@contextlib.contextmanager
def status_page_in_chromium():
    """C{(page, errors)} of L{chromium_page} with the gateway's status login."""
    with chromium_page() as (_, page, errors):
        yield page, errors


def status_overrides():
    return {"gateway": {"status_addr": "127.0.0.1:0", "status_username": STATUS_USER,
                        "status_password": STATUS_PASSWORD}}


def status_secrets():
    token = base64.b64encode(("%s:%s" % (STATUS_USER, STATUS_PASSWORD)).encode()).decode()
    return [STATUS_PASSWORD, token]


def echo_through_socks(sock, size):
    """Send C{size} bytes on an open SOCKS5 socket to an echo server and read them back."""
    payload = os.urandom(size)
    sock.sendall(payload)
    got = b""
    while len(got) < size:
        data = sock.recv(65536)
        if not data:
            break
        got += data
    if got != payload:
        raise AssertionError("the echo came back as %d bytes, not %d" % (len(got), size))


class _StatusBase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        SecretWatch(self, secrets=status_secrets())
        yield self.deployment.start_gateway(**status_overrides())
        yield self.deployment.start_client()
        listener = self.deployment.gateway.listeners["status page"]
        self.url = "http://127.0.0.1:%d/" % (listener.port.getHost().port,)
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    def curl(self, path, *args, user=STATUS_USER, password=STATUS_PASSWORD):
        login = () if user is None else ("-u", "%s:%s" % (user, password))
        return run_curl(*(login + args + (self.url + path,)))

    @defer.inlineCallbacks
    def api(self):
        out, err, code = yield self.curl("api/status", "--fail")
        self.assertEqual(code, 0, err)
        return json.loads(out)

    @defer.inlineCallbacks
    def wait_for_api(self, predicate, timeout=10.0):
        """Poll C{/api/status} until C{predicate(snapshot)}; returns that snapshot."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = yield self.api()
            if predicate(snapshot) or time.monotonic() > deadline:
                return snapshot
            yield task.deferLater(reactor, 0.05, lambda: None)


class StatusAPITests(_StatusBase):
    """C{/api/status} and the page over plain HTTP (curl), with and without credentials."""

    @defer.inlineCallbacks
    def test_api_lists_connected_client(self):
        """The JSON names the connected client with its group, address and stream count."""
        snapshot = yield self.api()
        self.assertEqual(snapshot["totals"]["tunnels"], 1)
        self.assertEqual(snapshot["totals"]["clients"], 1)
        self.assertEqual(snapshot["totals"]["active_streams"], 0)
        [client] = snapshot["clients"]
        self.assertEqual((client["client_id"], client["group"], client["credential"]),
                         ("client-1", "default", "gateway.auth_username"))
        self.assertIn("127.0.0.1", client["address"])
        self.assertEqual(client["active_streams"], 0)
        self.assertGreaterEqual(client["connected_for"], 0)
        self.assertTrue(snapshot["gateway"]["software"].startswith("anyproxy/"))
        for key in ("bytes_in", "bytes_out", "streams_opened"):
            self.assertIn(key, client)  # a number, or null while the mux has no counter

    @defer.inlineCallbacks
    def test_api_counts_active_stream(self):
        """A SOCKS5 stream held open shows as active, and is gone once closed."""
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port)
        try:
            yield deferToThread(echo_through_socks, sock, 4096)
            snapshot = yield self.api()
            self.assertEqual(snapshot["totals"]["active_streams"], 1)
            self.assertEqual(snapshot["clients"][0]["active_streams"], 1)
            for key in ("bytes_in", "bytes_out"):
                self.assertGreaterEqual(snapshot["totals"][key], 4096, key)
            self.assertEqual(snapshot["clients"][0]["streams_opened"], 1)
            self.assertEqual(snapshot["totals"]["streams_opened"], 1)
        finally:
            sock.close()
        snapshot = yield self.wait_for_api(lambda s: s["totals"]["active_streams"] == 0)
        self.assertEqual(snapshot["totals"]["active_streams"], 0)

    @defer.inlineCallbacks
    def test_wrong_or_missing_credentials(self):
        """A wrong password, a wrong username or none at all get 401 with a Basic challenge."""
        for user, password in [(STATUS_USER, "wrong"), ("someone", STATUS_PASSWORD),
                               (None, None)]:
            for path in ("", "api/status"):
                out, err, code = yield self.curl(path, "-o", "/dev/null", "-D", "-",
                                                 user=user, password=password)
                self.assertEqual(code, 0, err)
                head = out.decode("latin-1")
                self.assertTrue(head.startswith("HTTP/1.1 401"), head)
                self.assertIn('www-authenticate: basic realm="anyproxy status"', head.lower())

    @defer.inlineCallbacks
    def test_page_is_self_contained(self):
        """The page is HTML with its script and style inline, pinned by a CSP, not cached."""
        out, err, code = yield self.curl("", "--fail", "-D", "-")
        self.assertEqual(code, 0, err)
        head, body = out.split(b"\r\n\r\n", 1)
        head = head.decode("latin-1").lower()
        self.assertIn("content-type: text/html; charset=utf-8", head)
        self.assertIn("content-security-policy: default-src 'none'; script-src 'sha256-", head)
        self.assertIn("cache-control: no-store", head)
        self.assertIn(b"<title>AnyProxy gateway status</title>", body)
        self.assertNotIn(b"src=", body)
        self.assertNotIn(b"http://", body)
        self.assertNotIn(b"https://", body)

    @defer.inlineCallbacks
    def test_unknown_path(self):
        """Other paths are 404 (after authentication)."""
        out, err, code = yield self.curl("nothing-here", "-o", "/dev/null",
                                         "-w", "%{http_code}")
        self.assertEqual((code, out), (0, b"404"), err)


class StatusOffTests(unittest.TestCase):
    """Without C{status_addr} there is no status listener."""

    def test_off_by_default(self):
        """A gateway config without status_addr builds no status page listener."""
        deployment = Deployment(self)
        config = load_config(deployment.write_config(deployment.gateway_config()))
        service = make_gateway_service(config, reactor)
        self.assertNotIn("status page", service.listeners)


def trickle(port, interval, give_up):
    """
    Send a request head to C{port} one byte every C{interval} seconds, as a
    slow-loris client does, reading meanwhile (runs in a thread).

    @return: C{(seconds until the server closed or None if it had not after
        C{give_up} seconds, bytes received)}.
    """
    head = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 200
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    started = time.monotonic()
    received = b""
    try:
        sock.settimeout(interval)
        for byte in head:
            if time.monotonic() - started > give_up:
                return None, received
            try:
                sock.sendall(bytes([byte]))
                data = sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:  # reset: closed
                return time.monotonic() - started, received
            if not data:
                return time.monotonic() - started, received
            received += data
        return None, received
    finally:
        sock.close()


class StatusDeadlineTests(unittest.TestCase):
    """A client trickling a request head is cut off at gateway.handshake_timeout."""

    timeout = 60

    @defer.inlineCallbacks
    def test_slow_head_cut_off(self):
        """One byte every 0.2 s: 408 and closed about handshake_timeout (2 s) after connecting."""
        deployment = Deployment(self)
        overrides = status_overrides()
        overrides["gateway"]["handshake_timeout"] = 2
        yield deployment.start_gateway(**overrides)
        port = deployment.gateway.listeners["status page"].port.getHost().port
        closed_after, received = yield deferToThread(trickle, port, 0.2, 8.0)
        self.assertIsNotNone(closed_after, "still open after 8 s")
        self.assertTrue(1.5 <= closed_after < 6.0, closed_after)
        self.assertTrue(received.startswith(b"HTTP/1.1 408 "), received)


def browser_session(url, socks_port, echo_port, screenshot_path):
    """
    Drive the status page in headless Chromium (runs in a thread).

    Loads the page with the right credentials, waits for the client's row,
    opens a SOCKS5 stream and waits for the live totals to show it (taking
    the screenshot then), closes it and waits for them to drop back; reads
    the JSON API from the page; loads the page again with a wrong password.

    @return: a dict of what was seen, for the test to check.
    """
    from playwright.sync_api import expect

    seen = {}
    started = time.monotonic()
    with chromium_page() as (browser, page, errors):
        seen["launch_seconds"] = time.monotonic() - started
        response = page.goto(url)
        seen["status"] = response.status
        seen["title"] = page.title()

        row = page.locator('#clients-body tr[data-client-id="client-1"]')
        active = page.locator("#total-active-streams")
        expect(row).to_be_visible(timeout=EXPECT_MS)
        expect(row.locator("td.client-id")).to_have_text("client-1")
        expect(row.locator("td.group")).to_have_text("default")
        expect(row.locator("td.routes")).to_have_text("anything")  # no client.routes
        expect(page.locator("#total-tunnels")).to_have_text("1")
        expect(active).to_have_text("0", timeout=EXPECT_MS)
        expect(page.locator("#state")).to_have_text(
            re.compile("^live, updated "), timeout=EXPECT_MS)
        traffic_ids = ("#total-bytes-in", "#total-bytes-out", "#total-streams-opened")
        seen["before"] = {each: page.text_content(each) for each in traffic_ids}

        sock = socks_connect(socks_port, "127.0.0.1", echo_port)
        try:
            echo_through_socks(sock, 256 * 1024)
            expect(active).to_have_text("1", timeout=EXPECT_MS)
            expect(row.locator("td.active-streams")).to_have_text("1")
            for each in traffic_ids:  # counters that exist must move
                if seen["before"][each] != "n/a":
                    expect(page.locator(each)).not_to_have_text(
                        seen["before"][each], timeout=EXPECT_MS)
            page.screenshot(path=screenshot_path, full_page=True)
            seen["during"] = {each: page.text_content(each) for each in traffic_ids}
        finally:
            sock.close()
        expect(active).to_have_text("0", timeout=EXPECT_MS)
        expect(row.locator("td.active-streams")).to_have_text("0")

        seen["api"] = page.evaluate(
            "() => fetch('api/status', {cache: 'no-store'}).then(r => r.json())")
        seen["errors"] = errors

        # Opened with the login in the address: the page's own fetches
        # must not carry it (fetch refuses such URLs), and still work.
        in_url = browser.new_context()
        in_url.set_default_timeout(EXPECT_MS)
        page = in_url.new_page()
        page.goto(url.replace("http://", "http://%s:%s@" % (STATUS_USER, STATUS_PASSWORD), 1))
        expect(page.locator("#state")).to_have_text(
            re.compile("^live, updated "), timeout=EXPECT_MS)
        seen["login_in_url"] = page.text_content("#state")
        in_url.close()

        wrong = browser.new_context(
            http_credentials={"username": STATUS_USER, "password": "wrong"})
        seen["wrong_status"] = wrong.new_page().goto(url).status
        wrong.close()
    seen["seconds"] = time.monotonic() - started
    return seen


class StatusBrowserTests(_StatusBase):
    """The status page in a real headless browser (Debian chromium + Playwright)."""

    timeout = 120
    skip = SKIP_WITHOUT_CHROMIUM

    @defer.inlineCallbacks
    def test_page_shows_client_and_live_totals(self):
        """The page loads with credentials, lists the client and follows live traffic."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        screenshot = os.path.join(directory, "status-page.png")
        seen = yield deferToThread(browser_session, self.url, self.deployment.socks_port,
                                   self.echo_port, screenshot)
        self.assertEqual(seen["status"], 200)
        self.assertEqual(seen["title"], "AnyProxy gateway status")
        self.assertEqual(seen["errors"], [])
        self.assertEqual(seen["wrong_status"], 401)
        self.assertTrue(seen["login_in_url"].startswith("live, updated "))
        self.assertEqual(seen["api"]["totals"]["tunnels"], 1)
        self.assertEqual(seen["api"]["clients"][0]["client_id"], "client-1")
        self.assertGreater(os.path.getsize(screenshot), 1000)
        for key, before in seen["before"].items():
            if before != "n/a":
                self.assertNotEqual(seen["during"][key], before, key)
        if os.environ.get("ANYPROXY_STATUS_REPORT"):
            print("\nstatus page browser test: %.1fs (launch %.1fs), screenshot %s, traffic %r -> %r"
                  % (seen["seconds"], seen["launch_seconds"], screenshot, seen["before"],
                     seen["during"]))


def actions_session(url, socks_port, echo_port, gated_port, release, download_size):
    """
    Drive the status page's buttons in headless Chromium (runs in a thread):
    close a stream, drain the client during a download through it (which
    must complete), then disconnect the client once it is back.

    @param release: called (from this thread) to let the download finish.
    @return: a dict of what was seen, for the test to check.
    """
    from playwright.sync_api import expect

    from tests.test_e2e_tcp import recv_all

    seen = {"dialogs": []}
    with status_page_in_chromium() as (page, errors):

        def accept(dialog):
            seen["dialogs"].append(dialog.message)
            dialog.accept()

        page.on("dialog", accept)
        page.goto(url)
        clients = page.locator('#clients-body tr[data-client-id="client-1"]')
        result = page.locator("#action-result")
        expect(clients).to_have_count(1)

        # Close one stream.
        sock = socks_connect(socks_port, "127.0.0.1", echo_port)
        try:
            echo_through_socks(sock, 1024)
            stream_row = page.locator("#streams-body tr[data-stream-id]")
            expect(stream_row).to_have_count(1)
            seen["stream_user"] = stream_row.locator("td.user").text_content()
            seen["stream_id"] = stream_row.get_attribute("data-stream-id")
            stream_row.locator('button[data-action="close"]').click()
            expect(result).to_have_text("Stream %s closed." % (seen["stream_id"],))
            expect(page.locator("#streams-body td.empty")).to_have_text("No open streams.")
            sock.settimeout(10)
            seen["closed_stream_rest"] = recv_all(sock)
        finally:
            sock.close()

        # Drain the client while a download runs through it.
        sock = socks_connect(socks_port, "127.0.0.1", gated_port)
        try:
            first = sock.recv(65536)
            clients.locator('button[data-action="drain"]').click()
            expect(result).to_have_text("Client client-1 (group default) draining.")
            expect(page.locator('#clients-body tr.draining[data-client-id="client-1"]')
                   ).to_have_count(1)
            release()
            sock.settimeout(20)
            seen["downloaded"] = len(first) + len(recv_all(sock))
        finally:
            sock.close()

        # The client comes back on a new tunnel: disconnect it.
        expect(clients).to_have_count(1, timeout=EXPECT_MS)
        expect(clients.locator('button[data-action="drain"]')).to_have_text("drain")
        clients.locator('button[data-action="disconnect"]').click()
        expect(result).to_have_text("Client client-1 (group default) disconnected.")
        seen["errors"] = errors
    return seen


class StatusActionsBrowserTests(_StatusBase):
    """The status page's close, drain and disconnect buttons in headless Chromium."""

    timeout = 120
    skip = SKIP_WITHOUT_CHROMIUM

    @defer.inlineCallbacks
    def test_close_drain_disconnect(self):
        """Each button calls the API; a drained client's download completes."""
        from tests.test_management_api import gated_factory

        first, rest = 256 * 1024, 4 * 1024 * 1024
        target = gated_factory(first, rest)
        gated_port = listen_tcp(self, target).getHost().port
        pool = self.deployment.gateway.tunnel_pool
        [original] = pool.tunnels()

        def release():
            reactor.callFromThread(target.release.callback, None)

        seen = yield deferToThread(actions_session, self.url, self.deployment.socks_port,
                                   self.echo_port, gated_port, release, first + rest)
        self.assertEqual(seen["errors"], [])
        self.assertEqual(seen["stream_user"], "alice")
        self.assertEqual(seen["closed_stream_rest"], b"")
        self.assertEqual(seen["downloaded"], first + rest)
        self.assertEqual(len(seen["dialogs"]), 3)
        self.assertNotIn(original, pool.tunnels())
        self.assertEqual(self.deployment.gateway.user_endpoints.stream_table.streams, {})
