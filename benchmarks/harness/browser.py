"""
Headless Chromium (Debian's ``/usr/bin/chromium``), driven by Playwright
as the tests drive it (tests/test_e2e_browser.py), for timing page loads.

One browser serves a whole measurement; every load gets a browser context
of its own (Playwright's ``new_context``: an incognito-like profile with its
own HTTP cache, socket pools and TLS session cache), so each load opens new
connections and fetches everything, as a first visit does.  A context may
have its own proxy: Playwright gives it to Chromium's per-context proxy
settings with ``<-loopback>`` in the bypass list, so that 127.0.0.1 is
proxied too (Chromium bypasses loopback by default).

The browser never reaches out on its own: background networking, component
updates, sync, pings and QUIC are off, and ``--host-resolver-rules`` answers
every name with NOTFOUND (the page names its origins by address, and so does
every proxy setting), so the browser resolves nothing.  The test site's
certificate is trusted by its public key (``--ignore-certificate-errors-spki-list``,
honoured because Playwright always gives Chromium a ``--user-data-dir``):
only that certificate is let through; any other error still fails the load.
"""

import os

import attr

from harness import LOOPBACK, BenchError

CHROMIUM = "/usr/bin/chromium"
# One load must finish within this; a slower one counts as failed.
LOAD_TIMEOUT_MS = 30000

COMMON_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
    "--disable-client-side-phishing-detection", "--metrics-recording-only",
    # Every name is unknown; IP literals (the site, the proxies) need no lookup.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE %s" % LOOPBACK,
)

# After the load event: the browser's own figures (Navigation Timing, Resource
# Timing), how many images decoded, and how many connections were opened
# (entries whose connection was set up for them; a reused one has
# connectStart == connectEnd).
FIGURES_JS = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const resources = performance.getEntriesByType('resource');
  const entries = [nav].concat(resources);
  const images = Array.from(document.images);
  return {
    load_ms: nav.loadEventStart,
    dom_ms: nav.domContentLoadedEventStart,
    images: images.length,
    decoded: images.filter(image => image.complete && image.naturalWidth > 0).length,
    connections: entries.filter(entry => entry.connectEnd > entry.connectStart).length,
    protocols: Array.from(new Set(entries.map(entry => entry.nextHopProtocol))).join(','),
  };
}"""


@attr.s(frozen=True, auto_attribs=True)
class Load:
    """One page load, as the browser timed it."""
    load_ms: float       # navigation start to the load event
    dom_ms: float        # navigation start to DOMContentLoaded
    images: int          # on the page
    decoded: int         # of them, fetched and decoded
    connections: int     # opened for the load
    protocols: str       # ALPN of the responses ("http/1.1")


def chromium_args(spki_hashes):
    """Chromium's flags: no traffic of its own, and these certificates' keys trusted."""
    return list(COMMON_ARGS) + ["--ignore-certificate-errors-spki-list=" + ",".join(spki_hashes)]


class Browser:
    """One headless Chromium for a measurement; a context manager (the browser is closed at the end)."""

    def __init__(self, spki_hashes):
        self.args = chromium_args(spki_hashes)
        self._playwright = self._manager = self._browser = None

    def __enter__(self):
        if not os.access(CHROMIUM, os.X_OK):
            raise BenchError("%s is not installed (apt-get install chromium; benchmarks/run installs it)"
                             % CHROMIUM)
        from playwright.sync_api import sync_playwright
        self._manager = sync_playwright()
        self._playwright = self._manager.__enter__()
        try:
            self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=self.args)
        except Exception:
            self._manager.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self._browser.close()
        finally:
            self._manager.__exit__(*exc)

    def _context(self, proxy):
        return self._browser.new_context(proxy={"server": proxy} if proxy else None)

    def load(self, url, proxy=None):
        """
        Load C{url} in a new context, through C{proxy} (``http://...``,
        ``socks5://...``, or None for none), until its load event; a
        L{Load}.  Raises L{BenchError} if the load fails or an image is missing.
        """
        from playwright.sync_api import Error
        context = self._context(proxy)
        try:
            page = context.new_page()
            try:
                response = page.goto(url, wait_until="load", timeout=LOAD_TIMEOUT_MS)
            except Error as e:
                raise BenchError(str(e).splitlines()[0])
            if response is None or response.status != 200:
                raise BenchError("the page answered %s" % (response and response.status,))
            figures = Load(**page.evaluate(FIGURES_JS))
        finally:
            context.close()
        if figures.decoded != figures.images:
            raise BenchError("%d of %d images loaded" % (figures.decoded, figures.images))
        return figures

    def servers_seen(self, url, proxy=None):
        """
        Load C{url} once more and return the set of (address, port) the
        browser says it got every response from: through a proxy, Chromium
        reports the proxy's address, so this shows which way the load went.
        """
        from playwright.sync_api import Error
        context = self._context(proxy)
        responses = []
        try:
            page = context.new_page()
            page.on("response", lambda response: responses.append(response))
            try:
                page.goto(url, wait_until="load", timeout=LOAD_TIMEOUT_MS)
            except Error as e:
                raise BenchError(str(e).splitlines()[0])
            seen = set()
            for response in responses:
                address = response.server_addr()
                seen.add(None if address is None else (address["ipAddress"], address["port"]))
            return seen, len(responses)
        finally:
            context.close()
