"""
A real browser through the gateway's HTTP proxy.

Headless Chromium (Debian's C{/usr/bin/chromium}, driven by Playwright in a
thread) opens a web app that exists only inside the private network: its
name, C{app.internal}, is known to the client's resolver alone, so the only
way the browser can reach it is the whole path: browser -> HTTP proxy (Basic
auth) -> tunnel -> client -> target.  The page fetches JSON, posts a body and
downloads a large asset over plain HTTP (absolute-URI requests, kept-alive
proxy connections), and the same app is loaded over https (CONNECT).
"""

import hashlib
import json

from twisted.internet import defer, reactor
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web import resource, server

from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment
from tests.test_e2e_status import CHROMIUM, CHROMIUM_ARGS, EXPECT_MS, SKIP_WITHOUT_CHROMIUM

APP_HOST = "app.internal"
ASSET_SIZE = (1 << 20) + 321
UPLOAD_SIZE = 300000

PAGE = b"""<!doctype html>
<meta charset="utf-8"><title>inside</title>
<div id="out">loading</div>
<script>
(async () => {
  const data = await (await fetch('/data.json')).json();
  const upload = await (await fetch('/upload', {method: 'POST', body: 'x'.repeat(%d)})).text();
  const asset = new Uint8Array(await (await fetch('/asset')).arrayBuffer());
  let sum = 0;
  for (const byte of asset) { sum = (sum + byte) %% 65521; }
  document.getElementById('out').textContent = [data.answer, upload, asset.length, sum].join(' ');
})().catch(error => { document.getElementById('out').textContent = 'error ' + error; });
</script>
""" % (UPLOAD_SIZE,)


def asset():
    return (hashlib.sha256(b"asset").digest() * (ASSET_SIZE // 32 + 1))[:ASSET_SIZE]


class App(resource.Resource):
    """The private web app: a page, JSON, an upload counter and a large asset."""

    isLeaf = True

    def render_GET(self, request):
        if request.path == b"/data.json":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"answer": 42}).encode()
        if request.path == b"/asset":
            request.setHeader(b"content-type", b"application/octet-stream")
            return asset()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return PAGE

    def render_POST(self, request):
        return b"%d" % (len(request.content.read()),)


def browse(proxy_port, urls):
    """Load each URL in Chromium through the proxy; the page's final text for each."""
    from playwright.sync_api import expect, sync_playwright

    proxy = {"server": "http://127.0.0.1:%d" % (proxy_port,),
             "username": PROXY_USER, "password": PROXY_PASSWORD}
    texts = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             proxy=proxy)
        try:
            # The https app's certificate comes from the test CA.
            context = browser.new_context(ignore_https_errors=True)
            context.set_default_timeout(EXPECT_MS)
            for url in urls:
                page = context.new_page()
                response = page.goto(url)
                out = page.locator("#out")
                expect(out).not_to_have_text("loading", timeout=EXPECT_MS)
                texts.append((response.status, out.text_content()))
                page.close()
            context.close()
        finally:
            browser.close()
    return texts


class BrowserThroughProxyTests(unittest.TestCase):
    """Chromium reaches a private web app through the HTTP proxy, over http and https."""

    timeout = 120
    skip = SKIP_WITHOUT_CHROMIUM

    @defer.inlineCallbacks
    def test_private_app(self):
        """The page's scripts fetch, upload and download through the tunnel, http and https."""
        deployment = Deployment(self)
        site = server.Site(App())
        plain = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        cert = deployment.pki.ca.issue_cert(APP_HOST)
        pem = cert.private_key_pem.bytes() + b"".join(b.bytes() for b in cert.cert_chain_pems)
        tls = reactor.listenSSL(0, site, PrivateCertificate.loadPEM(pem).options(),
                                interface="127.0.0.1")
        self.addCleanup(tls.stopListening)
        deployment.resolver.table[APP_HOST] = ["127.0.0.1"]
        gateway = yield deployment.start_gateway()
        yield deployment.start_client()

        urls = ["http://%s:%d/" % (APP_HOST, plain.getHost().port),
                "https://%s:%d/" % (APP_HOST, tls.getHost().port)]
        texts = yield deferToThread(browse, deployment.http_port, urls)

        checksum = sum(asset()) % 65521
        expected = "42 %d %d %d" % (UPLOAD_SIZE, ASSET_SIZE, checksum)
        self.assertEqual(texts, [(200, expected), (200, expected)])
        self.assertIn(APP_HOST, deployment.resolver.asked)  # resolved by the client only
        opened = gateway.metrics.registry.get_sample_value(
            "anyproxy_gateway_streams_opened_total", {"frontend": "http proxy", "outcome": "ok"})
        self.assertGreaterEqual(opened, 2)  # at least one for http and the CONNECT
