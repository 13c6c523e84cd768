"""
1. bulk: iperf3 through proxychains4 (SOCKS5), upload and download, Mbit/s,
for AnyProxy, OpenSSH reverse dynamic forwarding (default cipher and
aes128-gcm), pproxy and microsocks, in interleaved rounds; "direct (no
proxy)" is iperf3 without proxychains, the loopback ceiling.
"""

import typing

import attr

from harness import log
from harness.chart import ANYPROXY, PEER, PEER_LIGHT, Panel, Series
from harness.measurement import Measurement
from harness.report import Row, check, fmt, median, num, ratio

DIRECT = "direct (no proxy)"
DIRECTIONS = ("upload", "download")
# Issue 5's targets: AnyProxy / peer, per path; the aes128-gcm one is a stretch goal.
TARGETS = {"OpenSSH -R": 1.0, "microsocks": 1.5, "pproxy": 0.45, "OpenSSH -R aes128-gcm": 0.8}
STRETCH = {"OpenSSH -R aes128-gcm"}


@attr.s(frozen=True, auto_attribs=True)
class BulkResult:
    # (path, "upload" or "download") -> Mbit/s per round; None: the run failed
    runs: typing.Dict[typing.Tuple[str, str], typing.List[typing.Optional[float]]]
    paths: typing.List[str]  # DIRECT first, then every SOCKS5 path, AnyProxy first

    def median(self, path, direction):
        return median(self.runs.get((path, direction), []))


def run(env):
    services, args = env.services, env.args
    paths = {DIRECT: None}
    for name, port in services.socks.items():
        paths[name] = services.write_proxychains(name, port)
    runs = {(name, d): [] for name in paths for d in DIRECTIONS}
    for r in range(args.rounds):
        log("bulk round %d/%d (%ds per run)", r + 1, args.rounds, args.seconds)
        for name, conf in paths.items():
            for direction in DIRECTIONS:
                mbps = services.iperf(conf, args.seconds, direction == "download", args.omit)
                log("  %-24s %-8s %s", name, direction, "failed" if mbps is None else "%.0f Mbit/s" % mbps)
                runs[(name, direction)].append(mbps)
    return BulkResult(runs=runs, paths=list(paths))


def rows(result):
    out = []
    for direction in DIRECTIONS:
        label = "1 bulk %s, Mbit/s" % direction
        ours = result.median("AnyProxy", direction)
        for name in result.paths:
            value = result.median(name, direction)
            if name == "AnyProxy":
                out.append(Row(label, "**AnyProxy** (SOCKS5 → gateway → wss → client)", num(value)))
                continue
            r = ratio(ours, value)
            target = TARGETS.get(name)
            out.append(Row(label, name, num(value), num(r, "{:.2f}"),
                           "" if target is None else ("≥ %.2g" % target) + (" (stretch)" if name in STRETCH else ""),
                           "" if target is None else check(r, target)))
    return out


def raw(result):
    return ["Bulk, Mbit/s per round:", ""] + [
        "- %s %s: %s" % (name, direction, ", ".join(fmt(v) for v in values))
        for (name, direction), values in result.runs.items()]


def panels(result):
    # The direct (no proxy) reference would dwarf every bar: it goes in the title.
    names = [n for n in result.paths if n != DIRECT]
    direct = [result.median(DIRECT, d) for d in DIRECTIONS]
    return [Panel(
        title="1. bulk TCP, iperf3 through proxychains4 (SOCKS5)\n"
              "direct, no proxy: %s / %s Mbit/s" % (fmt(direct[0]), fmt(direct[1])),
        ylabel="Mbit/s (median)",
        categories=[n.replace(" aes", "\naes") for n in names],
        series=[Series(label=direction, values=[result.median(n, direction) for n in names],
                       colors=[ANYPROXY if n == "AnyProxy" else color for n in names])
                for direction, color in zip(DIRECTIONS, (PEER, PEER_LIGHT))],
        fontsize=7,
        legend=[(PEER, "upload (left)"), (PEER_LIGHT, "download (right)"), (ANYPROXY, "AnyProxy")])]


def settings(args):
    return "iperf3 %ds per run (+%ds omitted)" % (args.seconds, args.omit)


EXAMPLE = BulkResult(
    runs={(name, d): [v * (1 if d == "upload" else 0.95), None if name == "microsocks" else v]
          for name, v in ((DIRECT, 34000.0), ("AnyProxy", 7800.0), ("pproxy", 6000.0), ("microsocks", 3500.0),
                          ("OpenSSH -R", 6300.0), ("OpenSSH -R aes128-gcm", 10000.0))
          for d in DIRECTIONS},
    paths=[DIRECT, "AnyProxy", "pproxy", "microsocks", "OpenSSH -R", "OpenSSH -R aes128-gcm"])

MEASUREMENT = Measurement(
    name="bulk", number=1, summary="iperf3 through each SOCKS5 proxy (proxychains4): Mbit/s up and down",
    result=BulkResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    needs=frozenset({"iperf3", "pproxy", "microsocks", "openssh"}), tools=("proxychains4",))
