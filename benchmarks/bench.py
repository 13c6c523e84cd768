#!/usr/bin/env python3
"""
AnyProxy benchmark suite: AnyProxy against its peers, in one run.

Run it through ``benchmarks/run`` (which installs what it needs first), or
directly with the venv's Python once the tools are installed:

    benchmarks/run                    # full run: 3 interleaved rounds
    benchmarks/run --quick            # smoke test: 1 round, short runs, fewer streams
    benchmarks/run --only bulk        # one measurement (see --help for the names)

Everything listens on loopback with free ports; every file lives in one
temporary directory.  Processes are killed and the directory is removed at the
end, also on Ctrl-C or failure (``--keep`` keeps the directory for debugging).

This file is the command line and the run; the harness (processes, AnyProxy
and the peers, report, chart) is in ``harness/``, and every measurement is a
module in ``measurements/`` (see benchmarks/README.md for how to read them
and how to add one).  ``selfcheck.py`` checks the plumbing without running
anything.
"""

import argparse
import datetime
import os
import signal
import socket
import sys

from harness import RESULTS, BenchError, log
from harness import chart
from harness.measurement import Env, Option
from harness.memory import Rss
from harness.processes import Processes, raise_nofile
from harness.report import chart_panels, write_report
from harness.services import Services, default_window, missing
from measurements import ALL, names, select

# Options more than one measurement uses.
COMMON = [
    Option(flag="--rounds", help="interleaved rounds", default=3, quick=1, minimum=1),
    Option(flag="--seconds", help="iperf3 and UDP run length", default=5, quick=2),
    Option(flag="--omit", help="iperf3 warm-up seconds left out", default=1, quick=0),
    Option(flag="--requests", help="hey requests per run (CONNECT: half as many tunnels)", default=5000,
           quick=1000),
    Option(flag="--concurrency", help="hey and CONNECT concurrency", default=20),
]


def build_parser():
    epilog = "measurements (--only), in run order:\n" + "\n".join(
        "  %-9s %d. %s%s" % (m.name, m.number, m.summary, "" if not m.aliases else
                              " (also --only %s)" % ", ".join(m.aliases))
        for m in ALL)
    parser = argparse.ArgumentParser(description="AnyProxy benchmarks against OpenSSH, pproxy and microsocks.",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, short runs, fewer streams")
    parser.add_argument("--only", default="", help="comma-separated measurements to run: " + ", ".join(names()))
    for option in COMMON + [o for m in ALL for o in m.options]:
        option.add_to(parser)
    parser.add_argument("--anyproxy-log-level", default="warn", choices=("debug", "info", "warn", "error"),
                        help="log.level for the gateway and client (default warn: no per-stream log lines)")
    parser.add_argument("--out", help="results directory (default benchmarks/results for full runs, "
                                      "benchmarks/results/scratch for --quick and --only)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--profile", metavar="DIR",
                        help="run the gateway and client under cProfile (twistd --profiler=cprofile) "
                             "and save DIR/gateway.pstats and DIR/client.pstats when they stop; "
                             "figures measured this way are slower than without it")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in COMMON + [o for m in ALL for o in m.options]:
        option.resolve(args)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    for name in only:
        if name not in names():
            parser.error("--only: unknown measurement %r (choose from %s)" % (name, ", ".join(names())))
    args.selected = select(only)
    if args.out is None:
        args.out = RESULTS if not args.quick and not only else os.path.join(RESULTS, "scratch")
    return args


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    # Explicitly: a shell starts background jobs with SIGINT ignored, and
    # Python would then never raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = datetime.datetime.now()
    window = default_window()
    selected = args.selected
    max_streams = max([m.open_streams(args) for m in selected] + [0])
    raise_nofile(max_streams * 2 + 2000)
    needs = frozenset().union(*(m.needs for m in selected))
    lacking = missing(needs, [t for m in selected for t in m.tools])
    if lacking:
        raise SystemExit("missing: %s (benchmarks/run installs them)" % ", ".join(lacking))
    if not chart.available():
        log("matplotlib is missing: no chart this time (benchmarks/run installs it)")
    processes = Processes(keep=args.keep)
    failed = True
    try:
        services = Services(processes, args, needs, max_streams)
        log("starting AnyProxy and peers in %s", processes.work)
        services.start()
        env = Env(services=services, args=args, rss=Rss({"gateway": services.gateway.pid,
                                                         "client": services.client.pid}), window=window)
        results = {}
        for measurement in selected:
            processes.check_alive("gateway", "client")
            results[measurement.name] = measurement.run(env)
        processes.check_alive("gateway", "client")
        os.makedirs(args.out, exist_ok=True)
        chart_path = None
        if chart.available():
            chart_path = os.path.join(args.out, "latest.png")
            chart.render(chart_panels(selected, results), chart_path, "AnyProxy benchmarks, %s, %s" % (
                started.strftime("%Y-%m-%d %H:%M"), socket.gethostname()))
        write_report(selected, results, args, window, started, args.out, sys.argv[1:] if argv is None else argv,
                     chart_path)
        if chart_path:
            print("wrote %s" % os.path.relpath(chart_path))
        failed = False
    except BenchError as e:
        print("benchmark failed: %s" % e, file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        failed = False  # no log tails: nothing went wrong
        print("interrupted: stopping everything", file=sys.stderr)
        raise
    finally:
        processes.close(failed=failed)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
