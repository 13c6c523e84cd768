"""
2. CONNECT tunnels per second through the HTTP proxy of AnyProxy and of
pproxy, each a new one as a browser opens for https: 20 concurrent asyncio
clients send CONNECT to the echo target, wait for the 200, echo 4 bytes and
close, ``--requests``/2 times per round.  Nothing can be reused: every
tunnel is a new stream and a new target connection at the client, the cost
AnyProxy's two hops add over pproxy's one.  No target.
"""

import asyncio
import time
import typing

import attr

from harness import LOOPBACK, log
from harness.chart import ANYPROXY, PEER, Panel, Series
from harness.measurement import Measurement
from harness.report import Row, median, num, ratio

PATHS = ("AnyProxy", "pproxy")
LABEL = "2 CONNECT, a new tunnel each (as for https), per s"


@attr.s(frozen=True, auto_attribs=True)
class ConnectRun:
    rate: float   # tunnels/s
    failed: int


@attr.s(frozen=True, auto_attribs=True)
class ConnectResult:
    runs: typing.Dict[str, typing.List[ConnectRun]]  # path -> one run per round

    def rate(self, path):
        return median([x.rate for x in self.runs[path]])

    def failed(self, path):
        return sum(x.failed for x in self.runs[path])


async def _connect_once(proxy_port, echo_port):
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy_port)
    try:
        writer.write(b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n"
                     % (LOOPBACK.encode(), echo_port, LOOPBACK.encode(), echo_port))
        head = await reader.readuntil(b"\r\n\r\n")
        if head.split(b" ", 2)[1:2] != [b"200"]:
            return False
        writer.write(b"ping")
        return await reader.readexactly(4) == b"ping"
    finally:
        writer.close()
        await writer.wait_closed()


def connect_rate(proxy_port, echo_port, count, concurrency):
    """
    CONNECT tunnels per second through an HTTP proxy, a new one each time (as
    browsers open for https): CONNECT, the 200, one echoed round trip, close.
    """
    async def go():
        left, failed = [count], [0]

        async def worker():
            while left[0] > 0:
                left[0] -= 1
                try:
                    ok = await asyncio.wait_for(_connect_once(proxy_port, echo_port), 10)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                    ok = False
                failed[0] += not ok
        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return ConnectRun(rate=count / (time.perf_counter() - started), failed=failed[0])
    return asyncio.run(go())


def run(env):
    services, args = env.services, env.args
    runs = {name: [] for name in PATHS}
    for r in range(args.rounds):
        log("CONNECT round %d/%d (%d tunnels, %d concurrent)", r + 1, args.rounds, args.requests // 2,
            args.concurrency)
        for name in PATHS:
            result = connect_rate(services.http[name], services.ports["echo"], args.requests // 2,
                                  args.concurrency)
            log("  %-10s %8.0f CONNECT/s  %d failed", name, result.rate, result.failed)
            runs[name].append(result)
    return ConnectResult(runs=runs)


def rows(result):
    ours = result.rate("AnyProxy")
    return [Row(LABEL, "%s (failed: %d)" % (name, result.failed(name)), num(result.rate(name)),
                "" if name == "AnyProxy" else num(ratio(ours, result.rate(name)), "{:.2f}"))
            for name in PATHS]


def raw(result):
    return ["CONNECT tunnels per second, per round (failed):", ""] + [
        "- CONNECT via %s, per s: %s" % (name, ", ".join("%.0f (%d failed)" % (x.rate, x.failed) for x in runs))
        for name, runs in result.runs.items()]


def panels(result):
    names = list(result.runs)
    return [Panel(
        title="2. CONNECT, a new tunnel each (as for https)",
        ylabel="tunnels/s (median)",
        categories=names,
        series=[Series(label="", values=[result.rate(n) for n in names],
                       texts=["%.0f/s\n%d failed" % (result.rate(n) or 0, result.failed(n)) for n in names],
                       colors=[ANYPROXY if n == "AnyProxy" else PEER for n in names])],
        margin=0.15)]


def settings(args):
    return "CONNECT %d tunnels per run, %d concurrent" % (args.requests // 2, args.concurrency)


EXAMPLE = ConnectResult(runs={"AnyProxy": [ConnectRun(rate=1779.0, failed=0), ConnectRun(rate=1726.2, failed=1)],
                              "pproxy": [ConnectRun(rate=3536.2, failed=0), ConnectRun(rate=3384.3, failed=0)]})

MEASUREMENT = Measurement(
    name="connect", number=2, summary="CONNECT tunnels per second through the HTTP proxies, a new one each",
    result=ConnectResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    needs=frozenset({"pproxy"}),
    # Before it had a module of its own, --only http ran these rounds too.
    aliases=("http",))
