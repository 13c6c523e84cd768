"""
10. page load: a real page as a first visit sees it.  Headless Chromium
(Playwright) loads a page with 100 images from 4 https origins, served by
nginx on loopback (harness/page_site.py), in a new browser context each time
(no cache, new connections, as a first visit), and the browser's own
figure is taken: navigation start to the load event.  Directly, through
AnyProxy's HTTP proxy (CONNECT per connection) and SOCKS5 proxy, through
pproxy's two, and through OpenSSH ``ssh -R`` (SOCKS5).  Paths take turns
load by load (the order rotates), ``--page-loads`` loads per path and round;
a round's figure is the median of its loads, the table's the median of the
rounds.
"""

import typing

import attr

from harness import BenchError, log
from harness.browser import Browser
from harness.chart import ANYPROXY, PEER, Panel, Series
from harness.measurement import Measurement, Option
from harness.page_site import IMAGES, ORIGINS, start_page_site
from harness.report import Row, check, fmt, median, num, ratio

DIRECT = "direct (no proxy)"
ANY_HTTP = "AnyProxy HTTP proxy"
ANY_SOCKS = "AnyProxy SOCKS5"
PPROXY_HTTP = "pproxy HTTP proxy"
PPROXY_SOCKS = "pproxy SOCKS5"
SSH = "OpenSSH -R (SOCKS5)"
PATHS = (DIRECT, ANY_HTTP, ANY_SOCKS, PPROXY_HTTP, PPROXY_SOCKS, SSH)
LABEL = "10 page load, %d images from %d https origins, ms to load event" % (IMAGES, ORIGINS)
# Issue "Interactive speed": AnyProxy at most 1.2x pproxy's time (the same
# kind of proxy), and at most ssh -R's.
PPROXY_TARGET = 1.2
SSH_TARGET = 1.0


@attr.s(frozen=True, auto_attribs=True)
class PageRound:
    """One path's loads in one round."""
    load_ms: typing.List[float]       # navigation start to the load event, per successful load
    dom_ms: typing.List[float]        # to DOMContentLoaded
    connections: typing.List[int]     # opened per load
    failed: int = 0


@attr.s(frozen=True, auto_attribs=True)
class PageLoadResult:
    runs: typing.Dict[str, typing.List[PageRound]]  # path -> one per round
    page_bytes: int                                  # the page and its images
    protocols: str                                   # ALPN the browser saw ("http/1.1")

    def load_ms(self, path):
        """The median over the rounds of each round's median load time."""
        return median([median(r.load_ms) for r in self.runs.get(path, [])])

    def failed(self, path):
        return sum(r.failed for r in self.runs.get(path, []))


def proxies(services):
    """Each path's proxy setting for Chromium (None: direct)."""
    return {DIRECT: None,
            ANY_HTTP: "http://127.0.0.1:%d" % services.http["AnyProxy"],
            ANY_SOCKS: "socks5://127.0.0.1:%d" % services.socks["AnyProxy"],
            PPROXY_HTTP: "http://127.0.0.1:%d" % services.http["pproxy"],
            PPROXY_SOCKS: "socks5://127.0.0.1:%d" % services.socks["pproxy"],
            SSH: "socks5://127.0.0.1:%d" % services.socks["OpenSSH -R"]}


def check_route(browser, site, path, proxy):
    """
    A warm-up load that also proves the way: through a proxy, every
    response must come from the proxy's port (what Chromium reports as the
    server's address), directly from the origins' ports.
    """
    seen, responses = browser.servers_seen(site.url, proxy)
    wanted = {("127.0.0.1", int(proxy.rsplit(":", 1)[1]))} if proxy else {("127.0.0.1", p) for p in site.ports}
    if responses != IMAGES + 1 or not seen <= wanted:
        raise BenchError("page load via %s: %d responses from %s, expected %d from %s"
                         % (path, responses, sorted(seen, key=str), IMAGES + 1, sorted(wanted)))


def run(env):
    services, args = env.services, env.args
    site = start_page_site(env.processes)
    settings = proxies(services)
    log("page load: %s, %d images from %d origins, %.1f MiB; %d loads per path and round",
        site.url, IMAGES, ORIGINS, site.total_bytes / 2 ** 20, args.page_loads)
    protocols = set()
    with Browser([site.spki]) as browser:
        for path in PATHS:
            check_route(browser, site, path, settings[path])
        runs = {path: [] for path in PATHS}
        for r in range(args.rounds):
            log("page load round %d/%d", r + 1, args.rounds)
            loads = {path: PageRound(load_ms=[], dom_ms=[], connections=[]) for path in PATHS}
            failed = dict.fromkeys(PATHS, 0)
            for k in range(args.page_loads):
                # Rotate the order, so that no path always follows the same one.
                for path in PATHS[k % len(PATHS):] + PATHS[:k % len(PATHS)]:
                    try:
                        load = browser.load(site.url, settings[path])
                    except BenchError as e:
                        log("  %-22s failed: %s", path, e)
                        failed[path] += 1
                        continue
                    loads[path].load_ms.append(load.load_ms)
                    loads[path].dom_ms.append(load.dom_ms)
                    loads[path].connections.append(load.connections)
                    protocols.update(load.protocols.split(","))
            for path in PATHS:
                done = attr.evolve(loads[path], failed=failed[path])
                log("  %-22s median %6.0f ms to load (%s), %s connections a load%s", path,
                    median(done.load_ms) or 0, ", ".join("%.0f" % x for x in done.load_ms),
                    fmt(median(done.connections)), "; %d failed" % done.failed if done.failed else "")
                runs[path].append(done)
    if all(not r.load_ms for rounds in runs.values() for r in rounds):
        raise BenchError("page load: every load failed")
    return PageLoadResult(runs=runs, page_bytes=site.total_bytes,
                          protocols=",".join(sorted(p for p in protocols if p)))


def _figure(result, path, text):
    failed = result.failed(path)
    return text + ("; %d failed" % failed if failed else "")


def rows(result):
    def ms(path):
        return result.load_ms(path)

    out = [Row(LABEL, _figure(result, DIRECT, DIRECT), num(ms(DIRECT))),
           Row(LABEL, _figure(result, ANY_HTTP, "**AnyProxy** HTTP proxy (CONNECT → gateway → wss → client)"),
               num(ms(ANY_HTTP))),
           Row(LABEL, _figure(result, ANY_SOCKS, "**AnyProxy** SOCKS5 (→ gateway → wss → client)"),
               num(ms(ANY_SOCKS)))]
    for peer, ours in ((PPROXY_HTTP, ANY_HTTP), (PPROXY_SOCKS, ANY_SOCKS)):
        r = ratio(ms(ours), ms(peer))
        out.append(Row(LABEL, _figure(result, peer, "%s; ratio: %s / this" % (peer, ours)), num(ms(peer)),
                       num(r, "{:.2f}"), "≤ %.1f" % PPROXY_TARGET, check(r, PPROXY_TARGET, higher=False)))
    both = [ratio(ms(ours), ms(SSH)) for ours in (ANY_HTTP, ANY_SOCKS)]
    met = "n/a" if None in both else check(max(both), SSH_TARGET, higher=False)
    out.append(Row(LABEL, _figure(result, SSH, "%s; ratios: %s / this, %s / this" % (SSH, ANY_HTTP, ANY_SOCKS)),
                   num(ms(SSH)), ", ".join(num(x, "{:.2f}") for x in both),
                   "≤ %.1f each" % SSH_TARGET, met))
    return out


def raw(result):
    lines = ["Page load (%d images, %d origins, %.1f MiB, %s), ms to the load event per load, by round "
             "(DOMContentLoaded medians; connections opened per load):" % (
                 IMAGES, ORIGINS, result.page_bytes / 2 ** 20, result.protocols or "?"), ""]
    for path, rounds in result.runs.items():
        lines.append("- %s: %s" % (path, "; ".join(
            "%s (DOM %s; %s connections%s)" % (", ".join("%.0f" % x for x in r.load_ms) or "none",
                                               fmt(median(r.dom_ms)), fmt(median(r.connections)),
                                               "; %d failed" % r.failed if r.failed else "")
            for r in rounds)))
    return lines


def panels(result):
    values = [result.load_ms(p) for p in PATHS]
    return [Panel(
        title="10. page load: %d images from %d https origins,\nnew browser context each (first visit)"
              % (IMAGES, ORIGINS),
        ylabel="ms to the load event (median; lower is better)",
        categories=[p.replace(" (", "\n(").replace(" HTTP", "\nHTTP").replace(" SOCKS5", "\nSOCKS5")
                    for p in PATHS],
        series=[Series(label="", values=values, texts=["%s ms" % fmt(v) for v in values],
                       colors=[ANYPROXY if p.startswith("AnyProxy") else PEER for p in PATHS])],
        fontsize=7, margin=0.15)]


def settings(args):
    return "page load %d loads per path and round, a new Chromium context each" % (args.page_loads,)


def _example(*loads):
    return [PageRound(load_ms=list(loads), dom_ms=[x / 3 for x in loads], connections=[22] * len(loads))]


EXAMPLE = PageLoadResult(runs={
    DIRECT: _example(281.0, 300.5, 265.0), ANY_HTTP: _example(350.0, 362.0, 334.0),
    ANY_SOCKS: _example(340.0, 355.0, 401.0), PPROXY_HTTP: _example(361.0, 365.0, 368.0),
    PPROXY_SOCKS: _example(352.0, 360.0, 371.0),
    SSH: [PageRound(load_ms=[436.0, 490.0], dom_ms=[150.0, 160.0], connections=[22, 23], failed=1)]},
    page_bytes=2097881, protocols="http/1.1")

MEASUREMENT = Measurement(
    name="page_load", number=10,
    summary="Chromium loads a page of 100 images from 4 https origins (nginx): ms to the load event",
    result=PageLoadResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    options=(Option(flag="--page-loads", help="page loads per path and round", default=5, quick=2,
                    minimum=1),),
    needs=frozenset({"pproxy", "openssh"}), tools=("nginx", "chromium", "python:playwright"))
