"""
Micro-benchmark: what routing by destination (client.routes) costs on the
stream-open path when no tunnel has routes, against its peer without the
feature, interleaved in one run (medians of the rounds, and their ratio).

  - pick: TunnelPool.pick of the last commit (git HEAD) against this tree's,
    called as the endpoint now calls it (with the target host);
  - open: TunnelEndpoint's open path (choose a tunnel, open, record) without
    the retry errback and the host argument, against this tree's;
  - control: HEAD's pick against itself, for the noise of the machine;
  - routed: this tree's pick in a group whose tunnels all have routes, for
    scale (no peer: the feature is new).

  .venv/bin/python benchmarks/pick_routes.py [--rounds 5]

Needs git (reads HEAD's tunnel_pool.py); changes nothing.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import timeit
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from anyproxy.gateway import tunnel_pool as current  # noqa: E402
from anyproxy.routes import Routes  # noqa: E402
from anyproxy.tunnel import endpoint as endpoint_module  # noqa: E402


def head_pool_module():
    """HEAD's tunnel_pool.py as a module (the peer)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", "HEAD:anyproxy/gateway/tunnel_pool.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("head_tunnel_pool")
    exec(compile(source, "HEAD:tunnel_pool.py", "exec"), module.__dict__)
    return module


class FakeStream:
    def notify_closed(self, callback):
        pass


class FakeMux:
    stream_count = 0
    draining = False

    def open_stream(self, kind, host, port):
        return defer.succeed(FakeStream())


class PlainEndpoint(endpoint_module.TunnelEndpoint):
    """The open path as it was before routes: no host to the pool, no retry errback."""

    def _open_stream(self):
        d = endpoint_module._then(self._tunnel_pool.wait_for(self.group, self._wait),
                                  self._open_on)
        return endpoint_module.bound_open(d, self._open_timeout, self._clock)

    def _open_on(self, tunnel):
        started = self._clock.seconds()
        opening = tunnel.mux.open_stream(self.kind, self.host, self.port)
        return opening.addCallback(self._record_end, tunnel, started)


def pool(module, count, routes=None):
    result = module.TunnelPool(Clock())
    for index in range(count):
        kwargs = {} if routes is None else {"routes": Routes.of(routes(index))}
        result.add(module.Tunnel(client_id="c%d" % (index,), group="default", mux=FakeMux(),
                                 **kwargs))
    return result


def per_call(statement, number):
    """
    CPU nanoseconds per call of C{statement}, the best of 3 repeats (CPU
    time, not wall time: the cores are shared with other work).
    """
    return min(timeit.repeat(statement, number=number, repeat=3,
                             timer=time.process_time)) / number * 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=100000)
    args = parser.parse_args()
    head = head_pool_module()
    cases = {}
    for count in (1, 8):
        old, new = pool(head, count), pool(current, count)
        cases["pick, %d tunnel(s), no routes" % (count,)] = (
            lambda old=old: old.pick("default"),
            lambda new=new: new.pick("default", "db.corp.example"))
    control = pool(head, 1)
    cases["control: HEAD's pick against itself"] = (
        lambda: control.pick("default"), lambda: control.pick("default"))
    clock = Clock()
    plain_pool, new_pool = pool(current, 2), pool(current, 2)
    plain = PlainEndpoint(plain_pool, clock, "default", "db.corp.example", 443)
    routed_endpoint = endpoint_module.TunnelEndpoint(new_pool, clock, "default",
                                                     "db.corp.example", 443)
    cases["endpoint open path, 2 tunnels, no routes"] = (
        plain._open_stream, routed_endpoint._open_stream)
    routed = pool(current, 8, routes=lambda i: ["10.%d.0.0/16" % (i,),
                                                 "*.site%d.corp.example" % (i,),
                                                 "db%d.corp.example" % (i,)])
    figures = {name: ([], []) for name in cases}
    routed_figures = []
    for round_number in range(args.rounds):
        for name, (peer, ours) in cases.items():
            # Interleaved, the order swapped every round (ABBA): neither
            # side always runs first, after a warm or a cold cache.
            runs = [(0, peer), (1, ours)]
            for side, statement in runs if round_number % 2 == 0 else runs[::-1]:
                figures[name][side].append(per_call(statement, args.number))
        routed_figures.append(per_call(lambda: routed.pick("default", "x.site3.corp.example"),
                                       args.number // 4))
    print("%-44s %12s %12s %8s" % ("case (ns per call, median of %d rounds)" % (args.rounds,),
                                   "before", "routes", "ratio"))
    for name, (peer, ours) in figures.items():
        before, after = statistics.median(peer), statistics.median(ours)
        print("%-44s %12.0f %12.0f %8.3f" % (name, before, after, after / before))
    print("%-44s %12s %12.0f" % ("pick, 8 tunnels, all routed (name target)", "-",
                                 statistics.median(routed_figures)))


if __name__ == "__main__":
    main()
