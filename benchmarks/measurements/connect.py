"""
2. CONNECT tunnels per second through the HTTP proxy of AnyProxy and of
pproxy, each a new one as a browser opens for https: 20 concurrent asyncio
clients send CONNECT to the echo target, wait for the 200, echo 4 bytes and
close, ``--requests``/2 times per round.  Nothing can be reused: every
tunnel is a new stream and a new target connection at the client, the cost
AnyProxy's two hops add over pproxy's one.  No target.

Also the CPU time per tunnel (user + system, psutil) of the processes that
serve each path: AnyProxy's gateway and client, and pproxy.  The rate is
that of one machine whose 2 cores the load, the echo target and every proxy
process share; the CPU per tunnel tells what each process would need on a
machine of its own, as a gateway and its clients run.

A gateway and its client never share a machine in use: the client is inside
the private network.  So the rounds run again with each process of a path
(the load, the echo target, and the gateway and the client, or pproxy) on a
CPU budget of its own (harness/cpu_budget.py: cores / 4 each, the same for
both paths), where the machine allows it (root, cgroup cpu).  There a path's
rate follows its busiest process instead of the sum of them all.
"""

import os

import asyncio
import time
import typing

import attr

from harness import LOOPBACK, cpu_budget, log
from harness.chart import ANYPROXY, PEER, Panel, Series
from harness.cpu_time import cpu_now, serving_processes
from harness.measurement import Measurement
from harness.report import Row, check, median, num, ratio

PATHS = ("AnyProxy", "pproxy")
LABEL = "2 CONNECT, a new tunnel each (as for https), per s"
CPU_LABEL = "2 CONNECT, CPU µs per tunnel (user + system)"
BUDGET_LABEL = ("2 CONNECT, a new tunnel each, each process on a CPU budget of its own "
                "(as on separate machines), per s")
TARGET_VS_PPROXY = 1.0  # issue 15: new tunnels at least as fast as pproxy
# The most processes of a path: the load, the echo target, the gateway, the client.
BUDGETED = 4
# The processes serving each path, by the harness's names for them.
SERVING = {"AnyProxy": ("gateway", "client"), "pproxy": ("pproxy",)}


@attr.s(frozen=True, auto_attribs=True)
class ConnectRun:
    rate: float   # tunnels/s
    failed: int
    # CPU µs per tunnel of each process serving the path (SERVING); empty
    # where it could not be read.
    cpu_us: typing.Dict[str, float] = attr.Factory(dict)


@attr.s(frozen=True, auto_attribs=True)
class ConnectResult:
    runs: typing.Dict[str, typing.List[ConnectRun]]  # path -> one run per round
    # The rounds again with each process on a CPU budget: path -> tunnels/s per
    # round; empty where the machine has no cgroup cpu controller we may write.
    budget_runs: typing.Dict[str, typing.List[float]] = attr.Factory(dict)
    budget_fraction: typing.Optional[float] = None  # of a core, each process

    @property
    def budget_share(self):
        """AnyProxy's rate over pproxy's on CPU budgets, the median of the per-round ratios."""
        if not self.budget_runs:
            return None
        return median([ratio(ours, peer) for ours, peer
                       in zip(self.budget_runs["AnyProxy"], self.budget_runs["pproxy"])])

    def rate(self, path):
        return median([x.rate for x in self.runs[path]])

    def failed(self, path):
        return sum(x.failed for x in self.runs[path])

    def cpu(self, path, name):
        """The median CPU µs per tunnel of process C{name} on C{path}, or None."""
        values = [x.cpu_us[name] for x in self.runs[path] if name in x.cpu_us]
        return median(values) if values else None

    def cpu_total(self, path):
        """The median over rounds of the CPU µs per tunnel of all of C{path}'s processes, or None."""
        values = [sum(x.cpu_us.values()) for x in self.runs[path]
                  if x.cpu_us and len(x.cpu_us) == len(SERVING[path])]
        return median(values) if values else None


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
    serving = serving_processes(env.processes, SERVING)
    runs = {name: [] for name in PATHS}
    count = args.requests // 2
    for r in range(args.rounds):
        log("CONNECT round %d/%d (%d tunnels, %d concurrent)", r + 1, args.rounds, count,
            args.concurrency)
        for name in PATHS:
            before = cpu_now(serving[name])
            result = connect_rate(services.http[name], services.ports["echo"], count, args.concurrency)
            after = cpu_now(serving[name])
            # A process that exited meanwhile has no figure for this run.
            cpu_us = {process: (after[process] - before[process]) * 1e6 / count
                      for process in before if process in after}
            result = attr.evolve(result, cpu_us=cpu_us)
            log("  %-10s %8.0f CONNECT/s  %d failed; CPU per tunnel: %s", name, result.rate, result.failed,
                ", ".join("%s %.0f µs" % item for item in cpu_us.items()) or "not read")
            runs[name].append(result)
    budget_runs, fraction = _budget_rounds(env, count)
    return ConnectResult(runs=runs, budget_runs=budget_runs, budget_fraction=fraction)


def _budget_rounds(env, count):
    """The rounds with each process on a CPU budget of its own: ({path: [tunnels/s]}, fraction)."""
    if not cpu_budget.available():
        log("CONNECT: no CPU budgets on this machine (needs root and the cgroup cpu controller)")
        return {}, None
    services, args, processes = env.services, env.args, env.processes
    fraction = (os.cpu_count() or 1) / BUDGETED

    def pids_of(name):
        # The load is this process's asyncio clients.
        pids = {"load": os.getpid(), "echo": processes.procs["targets"].pid}
        pids.update((process, processes.procs[process].pid) for process in SERVING[name])
        return pids

    def measure(name):
        return connect_rate(services.http[name], services.ports["echo"], count, args.concurrency).rate
    budget_runs = cpu_budget.budgeted_rounds(args.rounds, PATHS, pids_of, fraction, measure)
    log("CONNECT on CPU budgets (%.2f of a core each), per round: %s", fraction,
        "; ".join("%s %s" % (name, ", ".join("%.0f/s" % x for x in budget_runs[name]))
                  for name in PATHS))
    processes.check_alive(*[process for name in PATHS for process in SERVING[name]])
    return budget_runs, fraction


def rows(result):
    ours = result.rate("AnyProxy")
    share = ratio(ours, result.rate("pproxy"))
    table = [Row(LABEL, "AnyProxy (failed: %d)" % (result.failed("AnyProxy"),), num(ours)),
             Row(LABEL, "pproxy (failed: %d)" % (result.failed("pproxy"),), num(result.rate("pproxy")),
                 num(share, "{:.2f}"), "≥ %.1f" % TARGET_VS_PPROXY, check(share, TARGET_VS_PPROXY))]
    peer = result.cpu_total("pproxy")

    def against_peer(spent):
        return "" if peer is None else num(ratio(spent, peer), "{:.2f}")
    for name in SERVING["AnyProxy"]:
        spent = result.cpu("AnyProxy", name)
        if spent is not None:
            table.append(Row(CPU_LABEL, "AnyProxy %s; ratio: / pproxy" % name, num(spent),
                             against_peer(spent)))
    both = result.cpu_total("AnyProxy")
    if both is not None:
        table.append(Row(CPU_LABEL, "AnyProxy gateway + client; ratio: / pproxy", num(both),
                         against_peer(both)))
    if peer is not None:
        table.append(Row(CPU_LABEL, "pproxy (one process, the whole path)", num(peer)))
    if result.budget_runs:
        share = result.budget_share
        table += [
            Row(BUDGET_LABEL, "AnyProxy, %.2f of a core each process" % (result.budget_fraction,),
                num(median(result.budget_runs["AnyProxy"]))),
            Row(BUDGET_LABEL, "pproxy, %.2f of a core each process" % (result.budget_fraction,),
                num(median(result.budget_runs["pproxy"])), num(share, "{:.2f}"),
                "≥ %.1f" % TARGET_VS_PPROXY, check(share, TARGET_VS_PPROXY))]
    return table


def raw(result):
    return ["CONNECT tunnels per second, per round (failed; CPU µs per tunnel):", ""] + [
        "- CONNECT via %s, per s: %s" % (name, ", ".join(
            "%.0f (%d failed; %s)" % (x.rate, x.failed,
                                      ", ".join("%s %.0f" % item for item in x.cpu_us.items()) or "CPU not read")
            for x in runs))
        for name, runs in result.runs.items()] + [
        "- CONNECT via %s, each process on %.2f of a core, per s: %s" % (
            name, result.budget_fraction, ", ".join("%.0f" % x for x in runs))
        for name, runs in result.budget_runs.items()]


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


EXAMPLE = ConnectResult(runs={
    "AnyProxy": [ConnectRun(rate=1779.0, failed=0, cpu_us={"gateway": 230.0, "client": 170.0}),
                 ConnectRun(rate=1726.2, failed=1, cpu_us={"gateway": 226.0, "client": 175.0})],
    "pproxy": [ConnectRun(rate=3536.2, failed=0, cpu_us={"pproxy": 280.0}),
               ConnectRun(rate=3384.3, failed=0, cpu_us={"pproxy": 270.0})]},
    budget_runs={"AnyProxy": [1420.0, 1390.5], "pproxy": [1302.0, 1288.7]}, budget_fraction=0.5)

MEASUREMENT = Measurement(
    name="connect", number=2, summary="CONNECT tunnels per second through the HTTP proxies, a new one each",
    result=ConnectResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    needs=frozenset({"pproxy"}),
    # Before it had a module of its own, --only http ran these rounds too.
    aliases=("http",))
