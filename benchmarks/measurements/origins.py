"""
9. origins: real-world origin servers behind the HTTP proxies, a new user
connection per request (as ``hey -disable-keepalive``), ``--concurrency``
at once: median latency and requests/s, directly, through AnyProxy (upstream
reuse on, and off) and through pproxy, rounds interleaved.

The origins:

- ``http.server``: Python's ``BaseHTTPRequestHandler`` speaking HTTP/1.1
  (keep-alive), which writes a response's head and body in two sends with
  Nagle on, as many application servers do.  On a reused upstream connection
  the body waits for the ACK of the head, which Linux delays by 40 ms unless
  the reader re-arms TCP_QUICKACK (anyproxy/tuning.py ``quick_acker``): the
  "40 ms stalls" of issue "Interactive speed".  It is always measured.
- ``nginx``: Debian's nginx (``return 200``), if installed; else left out.

The load generator is the benchmark's own (asyncio, in this process), not
hey: the same client for every path, and per-request latencies.

With ``--concurrency`` requests always in flight (a closed loop), the origin
is saturated (http.server answers about 1,600 requests/s directly on the
reference machine) and the median mostly measures its queue: a path that
carries more requests per second waits longer in it.  So each path also
runs ``--origin-rate`` requests per second for a few seconds (an open loop,
below every path's capacity), whose median is the path's own latency, shown
beside the others.  Issue 15's targets stay on the closed loop, as the issue
states them: a median at most 2× direct (or 1.2× pproxy's where pproxy is
above 2× direct), and at least pproxy's requests per second.
"""

import asyncio
import os
import shutil
import statistics
import sys
import time
import typing

import attr

from harness import LOOPBACK, BenchError, log
from harness.chart import ANYPROXY, ANYPROXY_LIGHT, PEER, Panel, Series
from harness.measurement import Measurement, Option
from harness.processes import free_port, wait_port
from harness.report import Row, check, fmt, median, num, ratio
from harness.services import NO_REUSE

DIRECT = "direct (no proxy)"
PATHS = (DIRECT, "AnyProxy", NO_REUSE, "pproxy")
# A request that waits out a delayed ACK takes at least 40 ms.
STALL_MS = 40.0
PACED_SECONDS = 3
BODY = b"hello from the origin\n"

TWO_SEND_ORIGIN = r'''
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODY = %r
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()       # the first send: the head
        self.wfile.write(BODY)   # the second: the body
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
server.daemon_threads = True
server.serve_forever()
''' % (BODY,)

NGINX_CONF = '''
daemon off;
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    server {
        listen %(host)s:%(port)d;
        keepalive_requests 1000000;
        location / { default_type text/plain; return 200 "%(body)s"; }
    }
}
'''


@attr.s(frozen=True, auto_attribs=True)
class OriginRun:
    rps: float             # requests/s
    median_ms: float       # median latency of one request (connect to last byte)
    p90_ms: float
    failed: int
    # The same requests at a fixed rate every path carries (open loop,
    # --origin-rate): latency without queueing at the origin.
    paced_median_ms: typing.Optional[float] = None
    paced_failed: int = 0


@attr.s(frozen=True, auto_attribs=True)
class OriginsResult:
    # origin -> path (PATHS) -> one run per round
    runs: typing.Dict[str, typing.Dict[str, typing.List[OriginRun]]]

    def rps(self, origin, path):
        return median([x.rps for x in self.runs[origin].get(path, [])])

    def latency(self, origin, path):
        return median([x.median_ms for x in self.runs[origin].get(path, [])])

    def failed(self, origin, path):
        return sum(x.failed + x.paced_failed for x in self.runs[origin].get(path, []))

    def paced_latency(self, origin, path):
        return median([x.paced_median_ms for x in self.runs[origin].get(path, [])])


def nginx_path():
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def start_origins(env):
    """Start the origins; {name: port}."""
    processes = env.processes
    ports = {"http.server": free_port()}
    processes.spawn("origin-http-server", [sys.executable, "-c", TWO_SEND_ORIGIN, LOOPBACK,
                                           str(ports["http.server"])])
    wait_port(ports["http.server"], processes=processes, names=("origin-http-server",))
    nginx = nginx_path()
    if nginx is None:
        log("origins: nginx is not installed; measuring http.server only")
        return ports
    directory = processes.path("nginx")
    os.makedirs(directory, exist_ok=True)
    port = free_port()
    conf = os.path.join(directory, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF % {"dir": directory, "host": LOOPBACK, "port": port,
                              "body": BODY.decode().replace("\n", "\\n")})
    processes.spawn("origin-nginx", [nginx, "-p", directory, "-e", os.path.join(directory, "error.log"),
                                     "-c", conf])
    wait_port(port, processes=processes, names=("origin-nginx",))
    ports["nginx"] = port
    return ports


async def _request(proxy_port, origin_port):
    start = time.perf_counter()
    if proxy_port is None:
        reader, writer = await asyncio.open_connection(LOOPBACK, origin_port)
        target = b"/"
    else:
        reader, writer = await asyncio.open_connection(LOOPBACK, proxy_port)
        target = b"http://%s:%d/" % (LOOPBACK.encode(), origin_port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
                     % (target, LOOPBACK.encode(), origin_port))
        head = await reader.readuntil(b"\r\n\r\n")
        if head.split(b" ", 2)[1:2] != [b"200"]:
            return None
        length = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        body = await reader.readexactly(length[0]) if length else await reader.read()
        if body != BODY:
            return None
    finally:
        writer.close()
    return time.perf_counter() - start


async def _timed(proxy_port, origin_port):
    """One request's seconds, or None if it failed (an error, a wrong answer, 10 s)."""
    try:
        return await asyncio.wait_for(_request(proxy_port, origin_port), 10)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError, ValueError):
        return None


def _split(results):
    """C{(sorted latencies, failures)} of L{_timed} results (C{None}: failed)."""
    latencies = sorted(each for each in results if each is not None)
    return latencies, len(results) - len(latencies)


def load(proxy_port, origin_port, requests, concurrency):
    """C{requests} GETs, C{concurrency} at a time, each on a new connection: an L{OriginRun}."""
    async def main():
        results = []
        left = iter(range(requests))

        async def worker():
            for _ in left:
                results.append(await _timed(proxy_port, origin_port))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        latencies, failed = _split(results)
        if not latencies:
            raise BenchError("origins: every request failed (port %s)" % (proxy_port,))
        return OriginRun(rps=len(latencies) / elapsed, median_ms=1000 * statistics.median(latencies),
                         p90_ms=1000 * latencies[len(latencies) * 9 // 10], failed=failed)
    return asyncio.run(main())


def paced(proxy_port, origin_port, rate, seconds):
    """
    GETs started at a fixed C{rate} for C{seconds} (open loop: a request
    does not wait for the one before): C{(median ms, failed)}.  Below every
    path's capacity, the median is the path's own latency, where the
    closed loop of L{load} also measures the queue at a saturated origin.
    """
    async def main():
        loop = asyncio.get_running_loop()
        started, tasks = loop.time(), []
        for index in range(max(1, int(rate * seconds))):
            delay = started + index / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_timed(proxy_port, origin_port)))
        latencies, failed = _split(await asyncio.gather(*tasks))
        if not latencies:
            raise BenchError("origins: every paced request failed (port %s)" % (proxy_port,))
        return 1000 * statistics.median(latencies), failed
    return asyncio.run(main())


def run(env):
    services, args = env.services, env.args
    origins = start_origins(env)
    proxies = {DIRECT: None, "AnyProxy": services.http["AnyProxy"],
               NO_REUSE: services.http[NO_REUSE], "pproxy": services.http["pproxy"]}
    runs = {origin: {path: [] for path in PATHS} for origin in origins}
    for r in range(args.rounds):
        log("origins round %d/%d (%d requests, %d concurrent, a new connection each)", r + 1,
            args.rounds, args.origin_requests, args.concurrency)
        for origin, port in origins.items():
            for path in PATHS:
                result = load(proxies[path], port, args.origin_requests, args.concurrency)
                paced_ms, paced_failed = paced(proxies[path], port, args.origin_rate, PACED_SECONDS)
                result = attr.evolve(result, paced_median_ms=paced_ms, paced_failed=paced_failed)
                log("  %-11s %-34s %6.0f req/s  median %6.1f ms  p90 %6.1f ms; "
                    "at %d req/s: median %6.1f ms%s", origin, path,
                    result.rps, result.median_ms, result.p90_ms, args.origin_rate, paced_ms,
                    "  %d failed" % (result.failed + paced_failed)
                    if result.failed + paced_failed else "")
                runs[origin][path].append(result)
    return OriginsResult(runs=runs)


def rows(result):
    out = []
    for origin in result.runs:
        label_ms = "9 origin %s, median ms" % (origin,)
        label_rps = "9 origin %s, req/s" % (origin,)
        pproxy_ms, pproxy_rps = result.latency(origin, "pproxy"), result.rps(origin, "pproxy")
        for path in PATHS:
            ms, rps = result.latency(origin, path), result.rps(origin, path)
            figure = path + (" (%d failed)" % result.failed(origin, path)
                             if result.failed(origin, path) else "")
            if path == "AnyProxy":
                # Issue 15's bound; and never the delayed-ACK stall (40 ms a request).
                bound = _latency_bound(result.latency(origin, DIRECT), pproxy_ms)
                met = (None if bound is None else
                       check(ms, min(bound, STALL_MS), higher=False))
                out.append(Row(label_ms, figure, num(ms, "{:.1f}"), num(ratio(ms, pproxy_ms), "{:.2f}"),
                               "≤ 2× direct (1.2× pproxy where pproxy > 2× direct), < %.0f"
                               % STALL_MS, met))
                out.append(Row(label_rps, figure, num(rps), num(ratio(rps, pproxy_rps), "{:.2f}"),
                               "≥ 1.0", check(ratio(rps, pproxy_rps), 1.0)))
            else:
                out.append(Row(label_ms, figure, num(ms, "{:.1f}")))
                out.append(Row(label_rps, figure, num(rps)))
        out.extend(_paced_rows(result, origin))
    return out


def _latency_bound(direct, pproxy):
    """Issue 15's bound on the median: 2x direct, or 1.2x pproxy's where pproxy is above 2x direct."""
    if direct is None or pproxy is None:
        return None
    return 2 * direct if pproxy <= 2 * direct else 1.2 * pproxy


def _paced_rows(result, origin):
    """The paced medians: each path's own latency, without the origin's queue."""
    figures = {path: result.paced_latency(origin, path) for path in PATHS}
    if any(value is None for value in figures.values()):
        return []
    label = "9 origin %s, median ms at a fixed rate" % (origin,)
    out = []
    for path in PATHS:
        if path == "AnyProxy":
            out.append(Row(label, path + "; ratios: / direct, / pproxy",
                           num(figures[path], "{:.1f}"),
                           "%s, %s" % (num(ratio(figures[path], figures[DIRECT]), "{:.2f}"),
                                       num(ratio(figures[path], figures["pproxy"]), "{:.2f}"))))
        else:
            out.append(Row(label, path, num(figures[path], "{:.1f}")))
    return out


def raw(result):
    lines = ["Origins, per round: req/s, median ms (failed requests):", ""]
    for origin, paths in result.runs.items():
        for path, runs in paths.items():
            lines.append("- %s, %s: %s" % (origin, path, ", ".join(
                "%.0f req/s %.1f ms%s" % (x.rps, x.median_ms, " (%d failed)" % x.failed if x.failed else "")
                for x in runs)))
    return lines


def panels(result):
    colors = {"AnyProxy": ANYPROXY, NO_REUSE: ANYPROXY_LIGHT}
    out = []
    for origin in result.runs:
        values = [result.latency(origin, p) for p in PATHS]
        out.append(Panel(
            title="9. origin %s, new connection per request" % (origin,),
            ylabel="median latency, ms",
            categories=[p.replace(", ", ",\n") for p in PATHS],
            series=[Series(label="", values=values,
                           texts=["%s ms\n%s req/s" % (fmt(v, "%.1f"), fmt(result.rps(origin, p)))
                                  for p, v in zip(PATHS, values)],
                           colors=[colors.get(p, PEER) for p in PATHS])],
            margin=0.15))
    return out


def settings(args):
    return ("origins: %d requests, %d concurrent, a new connection each (asyncio client); "
            "then %d req/s for %d s, paced" % (args.origin_requests, args.concurrency,
                                               args.origin_rate, PACED_SECONDS))


def _example(rps, ms):
    return [OriginRun(rps=rps, median_ms=ms, p90_ms=ms * 1.5, failed=0, paced_median_ms=ms / 2)]


EXAMPLE = OriginsResult(runs={
    "http.server": {DIRECT: _example(1450.0, 2.8), "AnyProxy": _example(520.0, 6.1),
                    NO_REUSE: _example(330.0, 9.0), "pproxy": _example(440.0, 4.8)},
    "nginx": {DIRECT: _example(5200.0, 1.2), "AnyProxy": _example(560.0, 5.5),
              NO_REUSE: _example(350.0, 8.1), "pproxy": _example(900.0, 3.9)}})

MEASUREMENT = Measurement(
    name="origins", number=9,
    summary="real origins (http.server two-send, nginx if installed) behind the HTTP proxies: latency, req/s",
    result=OriginsResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    options=(Option(flag="--origin-requests", help="requests per origin run", default=2000, quick=500),
             Option(flag="--origin-rate", help="requests/s of the paced runs (below every path's "
                    "capacity)", default=250, quick=250, minimum=1)),
    needs=frozenset({"pproxy"}))
