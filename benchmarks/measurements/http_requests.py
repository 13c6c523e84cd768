"""
2. http: hey, one new connection per request (``-disable-keepalive``), 20
concurrent, through the HTTP proxy of AnyProxy and of pproxy, rounds
interleaved: requests/s and the share of 200 answers.  AnyProxy's HTTP proxy
keeps the stream and target connection of a finished exchange for the user's
next request to the same origin (``upstream_keepalive``); a second AnyProxy
listener with ``upstream_keepalive: 0`` is measured beside it for comparison.
(wrk cannot use an HTTP proxy, so hey.)

Then the rounds again with each process of a path (hey, the target, and the
gateway and the client, or pproxy) on a CPU budget of its own, as in
measurement 2's CONNECT rounds (cores / 4 each), where the machine allows it.
"""

import os
import re
import subprocess
import typing

import attr

from harness import LOOPBACK, BenchError, cpu_budget, log
from harness.chart import ANYPROXY, ANYPROXY_LIGHT, PEER, Panel, Series
from harness.measurement import Measurement
from harness.report import Row, check, median, num, ratio, yes_no
from harness.services import NO_REUSE

PATHS = ("AnyProxy", "pproxy", NO_REUSE)
TARGET_VS_PPROXY = 1.0
TARGET_NO_REUSE = 0.8  # issue 15: a new stream and target connection per request, / pproxy
LABEL = "2 HTTP new conn/request, req/s"
BUDGET_LABEL = ("2 HTTP new conn/request, each process on a CPU budget of its own "
                "(as on separate machines), req/s")
# The processes serving each path, by the harness's names for them.
SERVING = {"AnyProxy": ("gateway", "client"), "pproxy": ("pproxy",), NO_REUSE: ("gateway", "client")}
# The most processes of a path: hey, the target, the gateway, the client.
BUDGETED = 4


@attr.s(frozen=True, auto_attribs=True)
class HeyRun:
    rps: float                          # requests/s
    ok: float                           # share of 200 answers
    codes: typing.Dict[int, int]        # status -> answers
    errors: typing.List[typing.Tuple[int, str]]  # (count, hey's error text)


@attr.s(frozen=True, auto_attribs=True)
class HttpResult:
    runs: typing.Dict[str, typing.List[HeyRun]]  # path (PATHS) -> one run per round
    # The rounds again with each process on a CPU budget: path -> one run per
    # round; empty where the machine has no cgroup cpu controller we may write.
    budget_runs: typing.Dict[str, typing.List[HeyRun]] = attr.Factory(dict)
    budget_fraction: typing.Optional[float] = None  # of a core, each process

    def rps(self, path):
        return median([x.rps for x in self.runs.get(path, [])])

    def lowest_ok(self, path):
        return min(x.ok for x in self.runs[path])


def hey(proxy_port, url, requests, concurrency):
    argv = ["hey", "-n", str(requests), "-c", str(concurrency), "-disable-keepalive", "-t", "10",
            "-x", "http://%s:%d" % (LOOPBACK, proxy_port), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if not m:
        raise BenchError("no result from hey:\n" + out[-2000:])
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = re.findall(r"^\s+\[(\d+)\]\s+(.+)$", out.split("Error distribution:")[1], re.M) \
        if "Error distribution:" in out else []
    return HeyRun(rps=float(m.group(1)), ok=codes.get(200, 0) / requests, codes=codes,
                  errors=[(int(n), text[:120]) for n, text in errors])


def run(env):
    services, args = env.services, env.args
    url = "http://%s:%d/" % (LOOPBACK, services.ports["http_target"])
    runs = {name: [] for name in PATHS}
    for r in range(args.rounds):
        log("http round %d/%d (%d requests, %d concurrent, no keep-alive)", r + 1, args.rounds,
            args.requests, args.concurrency)
        for name in runs:
            result = hey(services.http[name], url, args.requests, args.concurrency)
            log("  %-10s %8.0f req/s  %.2f%% 200%s", name, result.rps, 100 * result.ok,
                "  errors: %s" % result.errors[:3] if result.errors else "")
            runs[name].append(result)
    budget_runs, fraction = {}, None
    if cpu_budget.available():
        fraction = (os.cpu_count() or 1) / BUDGETED
        processes = env.processes

        def pids_of(name):
            # hey, a child of this process, starts in this process's budget.
            pids = {"load": os.getpid(), "target": processes.procs["targets"].pid}
            pids.update((process, processes.procs[process].pid) for process in SERVING[name])
            return pids
        budget_runs = cpu_budget.budgeted_rounds(
            args.rounds, PATHS, pids_of, fraction,
            lambda name: hey(services.http[name], url, args.requests, args.concurrency))
        log("http on CPU budgets (%.2f of a core each), req/s per round: %s", fraction,
            "; ".join("%s %s" % (name, ", ".join("%.0f" % x.rps for x in budget_runs[name]))
                      for name in PATHS))
        processes.check_alive(*{process for names in SERVING.values() for process in names})
    else:
        log("http: no CPU budgets on this machine (needs root and the cgroup cpu controller)")
    return HttpResult(runs=runs, budget_runs=budget_runs, budget_fraction=fraction)


def rows(result):
    ours, theirs = result.rps("AnyProxy"), result.rps("pproxy")
    out = []
    for name, value in (("AnyProxy", ours), ("pproxy", theirs)):
        ok = result.lowest_ok(name)
        figure = "%s (lowest share of 200s: %.2f%%)" % (name, 100 * ok)
        if name == "AnyProxy":
            out.append(Row(LABEL, figure, num(value), "", "all 200", yes_no(ok == 1.0)))
        else:
            r = ratio(ours, theirs)
            out.append(Row(LABEL, figure, num(value), num(r, "{:.2f}"), "≥ 1.0, all 200",
                           check(r, TARGET_VS_PPROXY)))
    if result.runs.get(NO_REUSE):
        value = result.rps(NO_REUSE)
        r = ratio(value, theirs)
        out.append(Row(LABEL, "%s, for comparison (lowest share of 200s: %.2f%%); ratio: / pproxy"
                       % (NO_REUSE, 100 * result.lowest_ok(NO_REUSE)), num(value),
                       num(r, "{:.2f}"), "≥ %.1f" % TARGET_NO_REUSE, check(r, TARGET_NO_REUSE)))
    if result.budget_runs:
        def rate(name):
            return median([x.rps for x in result.budget_runs[name]])
        peer = rate("pproxy")
        for name in PATHS:
            figure = "%s, %.2f of a core each process (lowest share of 200s: %.2f%%)" % (
                name, result.budget_fraction, 100 * min(x.ok for x in result.budget_runs[name]))
            if name == "AnyProxy":
                out.append(Row(BUDGET_LABEL, figure, num(rate(name))))
            elif name == "pproxy":
                r = ratio(rate("AnyProxy"), peer)
                out.append(Row(BUDGET_LABEL, figure, num(peer), num(r, "{:.2f}"), "≥ 1.0",
                               check(r, TARGET_VS_PPROXY)))
            else:
                r = ratio(rate(name), peer)
                out.append(Row(BUDGET_LABEL, figure + "; ratio: / pproxy", num(rate(name)),
                               num(r, "{:.2f}"), "≥ %.1f" % TARGET_NO_REUSE, check(r, TARGET_NO_REUSE)))
    return out


def raw(result):
    lines = ["HTTP, req/s per round (share of 200s; errors reported by hey):", ""]
    for name, runs in result.runs.items():
        lines.append("- %s: %s" % (name, ", ".join("%.0f (%.2f%%)" % (x.rps, 100 * x.ok) for x in runs)))
        errors = [e for x in runs for e in x.errors]
        if errors:
            lines.append("  - errors: %s" % "; ".join("%d× %s" % e for e in errors[:5]))
    for name, runs in result.budget_runs.items():
        lines.append("- %s, each process on %.2f of a core: %s" % (
            name, result.budget_fraction, ", ".join("%.0f (%.2f%%)" % (x.rps, 100 * x.ok) for x in runs)))
    return lines


def panels(result):
    names = list(result.runs)
    values = [result.rps(n) for n in names]
    return [Panel(
        title="2. HTTP proxy, new connection per request",
        ylabel="requests/s (median)",
        categories=[n.replace(", ", ",\n") for n in names],
        series=[Series(label="", values=values,
                       texts=["%.0f req/s\n%.2f%% 200" % (v or 0, 100 * result.lowest_ok(n))
                              for n, v in zip(names, values)],
                       colors=[ANYPROXY if n == "AnyProxy" else ANYPROXY_LIGHT if n == NO_REUSE else PEER
                               for n in names])],
        margin=0.15)]


def settings(args):
    return "hey %d requests, %d concurrent, no keep-alive" % (args.requests, args.concurrency)


EXAMPLE = HttpResult(runs={
    "AnyProxy": [HeyRun(rps=5038.5, ok=1.0, codes={200: 5000}, errors=[])],
    "pproxy": [HeyRun(rps=4042.8, ok=0.999, codes={200: 4995, 502: 5}, errors=[(5, "Get: EOF")])],
    NO_REUSE: [HeyRun(rps=2167.3, ok=1.0, codes={200: 5000}, errors=[])]},
    budget_runs={"AnyProxy": [HeyRun(rps=2610.0, ok=1.0, codes={200: 5000}, errors=[])],
                 "pproxy": [HeyRun(rps=1702.4, ok=1.0, codes={200: 5000}, errors=[])],
                 NO_REUSE: [HeyRun(rps=1811.9, ok=1.0, codes={200: 5000}, errors=[])]},
    budget_fraction=0.5)

MEASUREMENT = Measurement(
    name="http", number=2, summary="hey through the HTTP proxies, a new connection per request: requests/s",
    result=HttpResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    needs=frozenset({"pproxy"}), tools=("hey",))
