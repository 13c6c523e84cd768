"""
7. download (only with ``--only download``): one file of ``--download-mb``
MiB served by ``twistd web``, downloaded with curl directly, through
AnyProxy's SOCKS5 proxy and through its HTTP proxy, in interleaved rounds:
MB/s per path and the ratio to the direct download.  The same job as bulk,
with an HTTP client and server instead of iperf3; it needs only curl.
"""

import os
import subprocess
import typing

import attr

from harness import LOOPBACK, BenchError, log
from harness.chart import ANYPROXY, ANYPROXY_LIGHT, PEER, Panel, Series
from harness.measurement import Measurement, Option
from harness.processes import retry, wait_port
from harness.report import Row, fmt, median, num, ratio

DIRECT = "direct (no proxy)"
SOCKS = "AnyProxy SOCKS5"
HTTP = "AnyProxy HTTP proxy"
PATHS = (DIRECT, SOCKS, HTTP)


@attr.s(frozen=True, auto_attribs=True)
class DownloadResult:
    mib: int                                   # the file's size
    runs: typing.Dict[str, typing.List[float]]  # path -> MB/s per round

    def speed(self, path):
        return median(self.runs[path])


def curl_speed(url, *proxy):
    """MB/s of one download with curl (through C{proxy}, curl's options for it)."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download} %{http_code}"]
                         + list(proxy) + [url], capture_output=True, text=True, timeout=600)
    answer = out.stdout.split()
    if out.returncode != 0 or len(answer) != 2 or answer[1] != "200":
        raise BenchError("curl %s: exit status %d, %r" % (url, out.returncode, out.stdout[-200:]))
    return float(answer[0]) / 1e6


def run(env):
    services, args = env.services, env.args
    www = env.processes.path("www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "blob"), "wb") as f:
        for _ in range(args.download_mb):
            f.write(os.urandom(1024 * 1024))
    port = services.port("web")
    services.twistd("web", "web", "--listen", "tcp:%d:interface=%s" % (port, LOOPBACK), "--path", www)
    wait_port(port, processes=env.processes, names=("web",))
    url = "http://%s:%d/blob" % (LOOPBACK, port)
    proxies = {DIRECT: (),
               SOCKS: ("--socks5-hostname", "%s:%d" % (LOOPBACK, services.socks["AnyProxy"])),
               HTTP: ("-x", "http://%s:%d" % (LOOPBACK, services.http["AnyProxy"]))}
    retry("twistd web via AnyProxy", lambda: curl_speed("http://%s:%d/" % (LOOPBACK, port), *proxies[HTTP]),
          timeout=15, processes=env.processes, names=("web",))
    runs = {name: [] for name in PATHS}
    for r in range(args.rounds):
        log("download round %d/%d (%d MiB with curl)", r + 1, args.rounds, args.download_mb)
        for name in PATHS:
            runs[name].append(curl_speed(url, *proxies[name]))
            log("  %-20s %8.1f MB/s", name, runs[name][-1])
    env.processes.stop("web")
    return DownloadResult(mib=args.download_mb, runs=runs)


def rows(result):
    label = "7 download %d MiB with curl, MB/s" % result.mib
    direct = result.speed(DIRECT)
    return [Row(label, DIRECT, num(direct, "{:,.1f}"))] + [
        Row(label, "**%s** (ratio: / direct)" % name, num(result.speed(name), "{:,.1f}"),
            num(ratio(result.speed(name), direct), "{:.2f}"))
        for name in (SOCKS, HTTP)]


def raw(result):
    return ["Download, MB/s per round:", ""] + [
        "- %s: %s" % (name, ", ".join(fmt(v, "%.1f") for v in values)) for name, values in result.runs.items()]


def panels(result):
    names = list(result.runs)
    return [Panel(
        title="7. download %d MiB with curl" % result.mib,
        ylabel="MB/s (median)",
        categories=names,
        series=[Series(label="", values=[result.speed(n) for n in names],
                       colors=[PEER if n == DIRECT else ANYPROXY if n == SOCKS else ANYPROXY_LIGHT
                               for n in names])],
        fmt="%.1f")]


def settings(args):
    return "download %d MiB with curl" % args.download_mb


EXAMPLE = DownloadResult(mib=100, runs={DIRECT: [1510.2, 1490.0], SOCKS: [640.5, 655.1], HTTP: [600.0, 610.3]})

MEASUREMENT = Measurement(
    name="download", number=7, summary="curl downloads a file directly and through AnyProxy (only when named)",
    result=DownloadResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    options=[Option(flag="--download-mb", help="MiB the download measurement fetches", default=100, quick=20,
                    minimum=1)],
    tools=("curl",), by_default=False)
