"""
13. TCP ping-pong: one 100-byte message at a time through an established
SOCKS5 connection to the echo target, the next sent when the echo is back,
for ``--seconds`` per run; round trips per second.  It is what an
interactive session (a shell, a chatty protocol, a page's requests on a kept
connection) feels: the time each relayed message costs, with no connection
setup in it.  Directly, through AnyProxy, pproxy and OpenSSH ``ssh -R``;
the same blocking client on each path, paths in turn each round.

Also the CPU time per round trip (user + system) of the processes that
serve AnyProxy's path and pproxy's, as for CONNECT.
"""

import contextlib
import socket
import time
import typing

import attr

from harness import LOOPBACK, BenchError, log
from harness.chart import ANYPROXY, PEER, Panel, Series
from harness.clients import recv_exact, socks_connect
from harness.cpu_time import cpu_now, serving_processes
from harness.measurement import Measurement
from harness.report import Row, median, num, ratio

DIRECT = "direct (no proxy)"
SSH = "OpenSSH -R"
PATHS = (DIRECT, "AnyProxy", "pproxy", SSH)
SIZE = 100
LABEL = "13 TCP ping-pong %d B through SOCKS5, round trips/s" % SIZE
CPU_LABEL = "13 TCP ping-pong, CPU µs per round trip (user + system)"
# The processes serving each path, by the harness's names for them.
SERVING = {"AnyProxy": ("gateway", "client"), "pproxy": ("pproxy",)}
# A round trip slower than this is a failure, not a figure.
TIMEOUT = 5.0


@attr.s(frozen=True, auto_attribs=True)
class PingPongRun:
    rate: float  # round trips/s
    # CPU µs per round trip of each process serving the path (SERVING); empty
    # where there is none or it could not be read.
    cpu_us: typing.Dict[str, float] = attr.Factory(dict)


@attr.s(frozen=True, auto_attribs=True)
class PingPongResult:
    runs: typing.Dict[str, typing.List[typing.Optional[PingPongRun]]]  # path -> per round; None: failed

    def rate(self, path):
        return median([x.rate for x in self.runs.get(path, []) if x is not None])

    def failed(self, path):
        return sum(x is None for x in self.runs.get(path, []))

    def cpu_total(self, path):
        """The median over rounds of the CPU µs per round trip of all of C{path}'s processes, or None."""
        values = [sum(x.cpu_us.values()) for x in self.runs.get(path, [])
                  if x is not None and x.cpu_us and len(x.cpu_us) == len(SERVING[path])]
        return median(values) if values else None


def ping_pong(sock, seconds):
    """Round trips per second of SIZE-byte messages on C{sock} for C{seconds}."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = bytes(range(SIZE))
    count = 0
    started = time.perf_counter()
    end = started + seconds
    while True:
        sock.sendall(message)
        if recv_exact(sock, SIZE) != message:
            raise BenchError("the echo came back altered")
        count += 1
        if count % 64 == 0 and time.perf_counter() >= end:
            break
    return count / (time.perf_counter() - started), count


def _connect(services, path, echo):
    if path == DIRECT:
        return socket.create_connection((LOOPBACK, echo), timeout=TIMEOUT)
    return socks_connect(services.socks[path], LOOPBACK, echo, timeout=TIMEOUT)


def run(env):
    services, args = env.services, env.args
    serving = serving_processes(env.processes, SERVING)
    echo = services.ports["echo"]
    runs = {path: [] for path in PATHS}
    for r in range(args.rounds):
        log("TCP ping-pong round %d/%d (%d B, %ds per path)", r + 1, args.rounds, SIZE, args.seconds)
        for path in PATHS:
            watched = serving.get(path, {})
            try:
                with contextlib.closing(_connect(services, path, echo)) as sock:
                    ping_pong(sock, 0.2)  # warm-up: the stream is open and the path is hot
                    before = cpu_now(watched)
                    rate, count = ping_pong(sock, args.seconds)
                    after = cpu_now(watched)
            except (OSError, BenchError) as e:
                log("  %-18s failed: %s", path, e)
                runs[path].append(None)
                continue
            cpu_us = {name: (after[name] - before[name]) * 1e6 / count for name in before if name in after}
            log("  %-18s %8.0f round trips/s%s", path, rate,
                "; CPU per round trip: " + ", ".join("%s %.1f µs" % item for item in cpu_us.items())
                if cpu_us else "")
            runs[path].append(PingPongRun(rate=rate, cpu_us=cpu_us))
    return PingPongResult(runs=runs)


def _path_text(result, path):
    failed = result.failed(path)
    text = "**AnyProxy** (SOCKS5 → gateway → wss → client)" if path == "AnyProxy" else path
    if path != "AnyProxy":
        text += "; ratio: AnyProxy / this"
    return text + ("; %d failed" % failed if failed else "")


def rows(result):
    ours = result.rate("AnyProxy")
    table = [Row(LABEL, _path_text(result, path), num(result.rate(path)),
                 "" if path == "AnyProxy" else num(ratio(ours, result.rate(path)), "{:.2f}"))
             for path in PATHS if path in result.runs]
    peer = result.cpu_total("pproxy")
    for path in SERVING:
        spent = result.cpu_total(path)
        if spent is None:
            continue
        if path == "AnyProxy":
            table.append(Row(CPU_LABEL, "AnyProxy gateway + client; ratio: / pproxy", num(spent, "{:.1f}"),
                             "" if peer is None else num(ratio(spent, peer), "{:.2f}")))
        else:
            table.append(Row(CPU_LABEL, "pproxy (one process, the whole path)", num(spent, "{:.1f}")))
    return table


def raw(result):
    return ["TCP ping-pong %d B, round trips/s per round (CPU µs per round trip):" % SIZE, ""] + [
        "- %s: %s" % (path, ", ".join(
            "failed" if x is None else "%.0f%s" % (x.rate, " (%s)" % ", ".join(
                "%s %.1f" % item for item in x.cpu_us.items()) if x.cpu_us else "")
            for x in runs))
        for path, runs in result.runs.items()]


def panels(result):
    names = [p for p in PATHS if p in result.runs]
    values = [result.rate(n) for n in names]
    return [Panel(
        title="13. TCP ping-pong %d B through SOCKS5 (interactive)" % SIZE,
        ylabel="round trips/s (median)",
        categories=names,
        series=[Series(label="", values=values, texts=["%s/s" % num(v) for v in values],
                       colors=[ANYPROXY if n == "AnyProxy" else PEER for n in names])],
        margin=0.15)]


def settings(args):
    return "TCP ping-pong %d B, %ds per path and round" % (SIZE, args.seconds)


EXAMPLE = PingPongResult(runs={
    DIRECT: [PingPongRun(rate=21000.0), PingPongRun(rate=20500.0)],
    "AnyProxy": [PingPongRun(rate=5600.0, cpu_us={"gateway": 70.0, "client": 75.0}), None],
    "pproxy": [PingPongRun(rate=9700.0, cpu_us={"pproxy": 50.0}),
               PingPongRun(rate=9500.0, cpu_us={"pproxy": 52.0})],
    SSH: [PingPongRun(rate=6100.0), PingPongRun(rate=6000.0)]})

MEASUREMENT = Measurement(
    name="tcp_ping_pong", number=13,
    summary="100-byte messages echoed one at a time through each SOCKS5 proxy: round trips/s",
    result=PingPongResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    needs=frozenset({"pproxy", "openssh"}), aliases=("ping_pong",))
