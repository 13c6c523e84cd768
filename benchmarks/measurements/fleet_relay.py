"""
11. fleet relay (only with ``--only fleet_relay``): what the hop between two
gateways of a fleet costs.  Its own redis-server (Debian) and two gateway
processes, A and B, one fleet (``gateway.fleet``, a fleet CA from trustme);
one client process attached to B only (``gateways_per_client: 1``, and a
client id that rendezvous hashing ranks B first for).  A user on B's ports
is served by B's own tunnel ("local"); a user on A's ports is relayed by A
over a peer link to B ("relayed": one more TLS WebSocket hop and one more
mux splice).  In interleaved rounds, the order flipped each round:

  - bulk: a SOCKS5 download from the endless source for ``--seconds``
    (after a half-second warm-up), Mbit/s;
  - CONNECT: tunnels per second through the HTTP proxy, a new one each
    (as measurement 2), ``--requests``/4 per run.

Target: relayed bulk at least 70% of local (the hop costs at most 30%).
Here every process shares the machine's cores, so a stream's speed follows
the CPU of all its processes together: the relayed path has one process
more.  Between separate machines it follows the busiest process; so the bulk
download is measured again with each process (the user's, A, B, the client
and the source) on a CPU budget of its own (harness/cpu_budget.py: a cgroup
quota of cores / 5 each), where the machine allows it (root, cgroup cpu).
Then, with both gateways and the one tunnel idle, the Redis traffic over
``--fleet-idle`` seconds (INFO commandstats and the network byte counters,
before and after) and the keys the fleet keeps.
"""

import os
import subprocess
import time
import typing

import attr
import yaml

try:
    import psutil
except ImportError:  # selfcheck.py still imports this module
    psutil = None

from harness import LOOPBACK, BenchError, log
from harness.chart import ANYPROXY, PEER, Panel, Series
from harness import cpu_budget
from harness.clients import echo_check, socks_connect
from harness.cpu_time import cpu_seconds
from harness.measurement import Measurement, Option
from harness.processes import free_port, retry, wait_port
from harness.report import Row, check, median, num, ratio
from measurements.connect import connect_rate

LABEL_BULK = "11 fleet relay: bulk download, Mbit/s"
LABEL_CONNECT = "11 fleet relay: CONNECT, a new tunnel each, per s"
LABEL_CPU = "11 fleet relay: CPU during the bulk download, s per GB"
LABEL_BUDGET = ("11 fleet relay: bulk download, each process on a CPU budget of its own "
                "(as on separate machines), Mbit/s")
BUDGETED = 5  # the processes of a relayed download: the user's, A, B, the client, the source
NODES = ("fleet-gateway-A", "fleet-gateway-B", "fleet-client")
LOCAL = "local (user on B, B's tunnel)"
RELAYED = "relayed (user on A, relayed to B)"
PATHS = (LOCAL, RELAYED)
TARGET_RELAYED_SHARE = 0.70  # relayed bulk / local bulk: the hop costs at most 30%
REDIS_SERVER = "/usr/bin/redis-server"
REDIS_CLI = "/usr/bin/redis-cli"
HEARTBEAT = 2.0  # gateway.fleet.heartbeat's default


@attr.s(frozen=True, auto_attribs=True)
class FleetRelayRun:
    bulk_mbit: float
    connect_rate: float
    connect_failed: int
    # CPU seconds per GB downloaded during the bulk run, per process (NODES)
    bulk_cpu: typing.Dict[str, float] = attr.Factory(dict)


@attr.s(frozen=True, auto_attribs=True)
class FleetRelayResult:
    runs: typing.Dict[str, typing.List[FleetRelayRun]]  # path -> one run per round
    redis_keys: typing.List[str]
    redis_seconds: float                  # the idle window
    redis_calls: typing.Dict[str, int]    # command -> calls in the window (both nodes)
    redis_bytes_in: int                   # bytes Redis received in the window
    redis_bytes_out: int                  # bytes Redis sent in the window
    # The bulk download again with each process on a CPU budget: path -> Mbit/s per round;
    # empty where the machine has no cgroup cpu controller we may write.
    budget_runs: typing.Dict[str, typing.List[float]] = attr.Factory(dict)
    budget_fraction: typing.Optional[float] = None  # of a core, each process

    def bulk(self, path):
        return median([x.bulk_mbit for x in self.runs[path]])

    def connect(self, path):
        return median([x.connect_rate for x in self.runs[path]])

    def failed(self, path):
        return sum(x.connect_failed for x in self.runs[path])

    def cpu(self, path, name):
        """Median CPU seconds per GB of process C{name} during C{path}'s bulk runs."""
        return median([x.bulk_cpu[name] for x in self.runs[path] if name in x.bulk_cpu])

    @property
    def bulk_share(self):
        """Relayed bulk over local, the median of the per-round ratios."""
        return median([ratio(relayed.bulk_mbit, local.bulk_mbit)
                       for local, relayed in zip(self.runs[LOCAL], self.runs[RELAYED])])

    @property
    def budget_share(self):
        """Relayed over local bulk on CPU budgets, the median of the per-round ratios."""
        if not self.budget_runs:
            return None
        return median([ratio(relayed, local) for local, relayed
                       in zip(self.budget_runs[LOCAL], self.budget_runs[RELAYED])])

    @property
    def connect_share(self):
        return median([ratio(relayed.connect_rate, local.connect_rate)
                       for local, relayed in zip(self.runs[LOCAL], self.runs[RELAYED])])


# -- the fleet ------------------------------------------------------------------------


def _client_id_ranking_first(node):
    """A client id that rendezvous hashing ranks C{node} first for, among A and B."""
    from anyproxy.client.attachment import rank  # the venv runs the tree's code
    for index in range(100):
        client_id = "bench-fleet-%d" % (index,)
        if rank(["A", "B"], client_id)[0] == node:
            return client_id
    raise BenchError("no client id ranks %s first" % (node,))


def _fleet_pki(directory):
    """The fleet CA and a peer certificate per node (both TLS usages, for 127.0.0.1)."""
    try:
        import trustme
    except ImportError:
        raise BenchError("fleet_relay needs trustme in the venv (scripts/setup-venv installs it)")
    os.makedirs(directory, exist_ok=True)
    ca = trustme.CA()
    files = {"ca": os.path.join(directory, "fleet-ca.crt")}
    ca.cert_pem.write_to_path(files["ca"])
    for node in ("A", "B"):
        cert = ca.issue_cert(LOOPBACK, common_name="node " + node)
        files[node] = (os.path.join(directory, node + ".crt"), os.path.join(directory, node + ".key"))
        cert.cert_chain_pems[0].write_to_path(files[node][0])
        cert.private_key_pem.write_to_path(files[node][1])
    return files


def _gateway_config(env, node, ports, redis_port, pki):
    certs = env.processes.path("certs")
    return {
        "log": {"level": env.args.anyproxy_log_level},
        "proxy": {"socks5": {"listen_addr": "%s:%d" % (LOOPBACK, ports["socks"])},
                  "http": {"listen_addr": "%s:%d" % (LOOPBACK, ports["http"])}},
        "gateway": {"listen_addr": "%s:%d" % (LOOPBACK, ports["tunnel"]),
                    "tls_cert": os.path.join(certs, "server.crt"),
                    "tls_key": os.path.join(certs, "server.key"),
                    "auth_username": "bench", "auth_password": "bench-password",
                    "max_conns_per_user": 0,
                    "fleet": {"redis": "redis://%s:%d/0" % (LOOPBACK, redis_port),
                              "node_id": node, "peer_addr": "%s:%d" % (LOOPBACK, ports["peer"]),
                              "peer_ca": pki["ca"], "peer_cert": pki[node][0],
                              "peer_key": pki[node][1], "heartbeat": HEARTBEAT}},
    }


def _client_config(env, tunnel_port):
    return {"log": {"level": env.args.anyproxy_log_level},
            "client": {"gateway_addr": "%s:%d" % (LOOPBACK, tunnel_port),
                       "gateway_tls_cert": os.path.join(env.processes.path("certs"), "ca.crt"),
                       "client_id": _client_id_ranking_first("B"), "gateways_per_client": 1,
                       "auth_username": "bench", "auth_password": "bench-password",
                       "max_concurrent_conns": 5000, "reconnect_initial_delay": 0.2}}


def _redis(port, *args):
    out = subprocess.run([REDIS_CLI, "-h", LOOPBACK, "-p", str(port)] + list(args),
                         capture_output=True, timeout=10, check=True)
    return out.stdout.decode()


def _redis_counters(port):
    """C{({command: calls}, bytes in, bytes out)} from INFO."""
    calls, net = {}, {}
    for line in _redis(port, "INFO", "all").splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_"):].partition(":")
            calls[name] = int(dict(f.split("=") for f in fields.split(","))["calls"])
        elif line.startswith("total_net_"):
            key, _, value = line.partition(":")
            net[key] = int(value)
    return calls, net["total_net_input_bytes"], net["total_net_output_bytes"]


# -- the figures ----------------------------------------------------------------------


def bulk_download(socks_port, source_port, seconds, warmup=0.5):
    """Mbit/s of a SOCKS5 download from the endless source, after C{warmup} seconds."""
    sock = socks_connect(socks_port, LOOPBACK, source_port, timeout=10)
    buffer = bytearray(256 * 1024)
    try:
        started = time.perf_counter()
        while time.perf_counter() - started < warmup:
            if not sock.recv_into(buffer):
                raise BenchError("the source closed during the warm-up")
        count, started = 0, time.perf_counter()
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return count * 8 / elapsed / 1e6
            got = sock.recv_into(buffer)
            if not got:
                raise BenchError("the source closed the download")
            count += got
    finally:
        sock.close()


def bulk_with_cpu(processes, socks_port, source_port, seconds):
    """C{(Mbit/s, {process: CPU s per GB})} of one L{bulk_download}."""
    watched = {name: psutil.Process(processes.procs[name].pid) for name in NODES}
    before = {name: cpu_seconds(p) for name, p in watched.items()}
    mbit = bulk_download(socks_port, source_port, seconds)
    gigabytes = max(mbit * 1e6 / 8 * seconds / 1e9, 1e-9)  # the warm-up is left out
    return mbit, {name: (cpu_seconds(p) - before[name]) / gigabytes
                  for name, p in watched.items()}


def run(env):
    args, processes, services = env.args, env.processes, env.services
    for tool in (REDIS_SERVER, REDIS_CLI):
        if not os.path.exists(tool):
            raise BenchError("fleet_relay needs %s (Debian package redis-server)" % (tool,))
    redis_port = free_port()
    processes.spawn("fleet-redis", [REDIS_SERVER, "--port", str(redis_port), "--bind", LOOPBACK,
                                    "--save", "", "--appendonly", "no",
                                    "--dir", processes.path()])
    wait_port(redis_port, processes=processes, names=("fleet-redis",))
    pki = _fleet_pki(processes.path("fleet-pki"))
    ports = {node: {kind: free_port() for kind in ("tunnel", "socks", "http", "peer")}
             for node in ("A", "B")}
    names = []
    for node in ("B", "A"):
        path = processes.path("fleet-%s.yaml" % (node,))
        with open(path, "w") as f:
            yaml.safe_dump(_gateway_config(env, node, ports[node], redis_port, pki), f)
        services.twistd("fleet-gateway-" + node, "anyproxy-gateway", "--config=" + path)
        names.append("fleet-gateway-" + node)
    for node in ("A", "B"):
        wait_port(ports[node]["socks"], timeout=30, processes=processes, names=names)
    path = processes.path("fleet-client.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(_client_config(env, ports["B"]["tunnel"]), f)
    services.twistd("fleet-client", "anyproxy-client", "--config=" + path)
    names.append("fleet-client")
    echo, source = services.ports["echo"], services.ports["source"]
    for node in ("B", "A"):
        retry("fleet: a stream through gateway %s" % (node,),
              lambda node=node: echo_check(ports[node]["socks"], echo),
              processes=processes, names=names)
    paths = {LOCAL: ports["B"], RELAYED: ports["A"]}

    runs = {path: [] for path in PATHS}
    count = max(100, args.requests // 4)
    for r in range(args.rounds):
        order = PATHS if r % 2 == 0 else PATHS[::-1]
        log("fleet relay round %d/%d (bulk %d s, %d CONNECTs, %d concurrent)", r + 1, args.rounds,
            args.seconds, count, args.concurrency)
        bulk = {path: bulk_with_cpu(processes, paths[path]["socks"], source, args.seconds)
                for path in order}
        connect = {path: connect_rate(paths[path]["http"], echo, count, args.concurrency)
                   for path in order}
        for path in PATHS:
            mbit, cpu = bulk[path]
            runs[path].append(FleetRelayRun(bulk_mbit=mbit, connect_rate=connect[path].rate,
                                            connect_failed=connect[path].failed, bulk_cpu=cpu))
            log("  %-36s %8.0f Mbit/s %8.0f CONNECT/s (%d failed); CPU s/GB %s", path, mbit,
                connect[path].rate, connect[path].failed,
                " ".join("%s %.2f" % (name, cpu[name]) for name in NODES))
        processes.check_alive(*names)

    budget_runs, fraction = {}, None
    if cpu_budget.available():
        fraction = (os.cpu_count() or 1) / BUDGETED
        pids = {name: processes.procs[name].pid for name in NODES}
        pids.update(source=processes.procs["targets"].pid, user=os.getpid())
        budget_runs = cpu_budget.budgeted_rounds(
            args.rounds, PATHS, lambda path: pids, fraction,
            lambda path: bulk_download(paths[path]["socks"], source, args.seconds))
        log("fleet relay on CPU budgets (%.2f of a core each), Mbit/s per round: %s", fraction,
            "; ".join("%s %s" % (path, ", ".join("%.0f" % x for x in budget_runs[path]))
                      for path in PATHS))
        processes.check_alive(*names)
    else:
        log("fleet relay: no CPU budgets on this machine (needs root and the cgroup cpu controller)")

    # Redis with the fleet idle: heartbeats and view reads only.
    time.sleep(1.0)
    calls0, in0, out0 = _redis_counters(redis_port)
    started = time.monotonic()
    time.sleep(args.fleet_idle)
    calls1, in1, out1 = _redis_counters(redis_port)
    seconds = time.monotonic() - started
    keys = sorted(_redis(redis_port, "--scan", "--pattern", "anyproxy:*").split())
    calls = {name: calls1[name] - calls0.get(name, 0) for name in calls1
             if name != "info" and calls1[name] - calls0.get(name, 0) > 0}
    log("fleet relay: Redis over %.1f s idle (2 nodes, 1 tunnel): %s; %d B in, %d B out; keys: %s",
        seconds, ", ".join("%s %d" % item for item in sorted(calls.items())),
        in1 - in0, out1 - out0, ", ".join(keys))
    for name in reversed(names + ["fleet-redis"]):
        processes.stop(name)
    return FleetRelayResult(runs=runs, redis_keys=keys, redis_seconds=seconds, redis_calls=calls,
                            redis_bytes_in=in1 - in0, redis_bytes_out=out1 - out0,
                            budget_runs=budget_runs, budget_fraction=fraction)


def rows(result):
    share = result.bulk_share
    return [
        Row(LABEL_BULK, LOCAL, num(result.bulk(LOCAL))),
        Row(LABEL_BULK, RELAYED, num(result.bulk(RELAYED)), num(share, "{:.2f}"),
            "≥ %.2f of local" % TARGET_RELAYED_SHARE, check(share, TARGET_RELAYED_SHARE)),
        Row(LABEL_CONNECT, "%s (failed: %d)" % (LOCAL, result.failed(LOCAL)),
            num(result.connect(LOCAL))),
        Row(LABEL_CONNECT, "%s (failed: %d)" % (RELAYED, result.failed(RELAYED)),
            num(result.connect(RELAYED)), num(result.connect_share, "{:.2f}")),
    ] + [
        Row(LABEL_CPU, "%s: gateway A / gateway B / client" % (path,),
            " / ".join("%.2f" % (result.cpu(path, name) or 0) for name in NODES))
        for path in PATHS if all(result.cpu(path, name) is not None for name in NODES)
    ] + ([
        Row(LABEL_BUDGET, "%s, %.2f of a core each" % (LOCAL, result.budget_fraction),
            num(median(result.budget_runs[LOCAL]))),
        Row(LABEL_BUDGET, "%s, %.2f of a core each" % (RELAYED, result.budget_fraction),
            num(median(result.budget_runs[RELAYED])), num(result.budget_share, "{:.2f}"),
            "≥ %.2f of local" % TARGET_RELAYED_SHARE,
            check(result.budget_share, TARGET_RELAYED_SHARE)),
    ] if result.budget_runs else [])


def raw(result):
    per_second = sum(result.redis_calls.values()) / max(result.redis_seconds, 1e-9)
    return ["Fleet relay, per round (relayed / local in the ratio column of the table):", ""] + [
        "- %s: bulk Mbit/s %s; CONNECT/s %s" % (
            path, ", ".join("%.0f" % x.bulk_mbit for x in runs),
            ", ".join("%.0f (%d failed)" % (x.connect_rate, x.connect_failed) for x in runs))
        for path, runs in result.runs.items()] + [
        "- %s, each process on %.2f of a core: bulk Mbit/s %s" % (
            path, result.budget_fraction, ", ".join("%.0f" % x for x in runs))
        for path, runs in result.budget_runs.items()] + [
        "- Redis, both gateways idle with one tunnel, over %.1f s: %.1f commands/s (%s), "
        "%.0f B/s in, %.0f B/s out" % (
            result.redis_seconds, per_second,
            ", ".join("%s %d" % item for item in sorted(result.redis_calls.items())),
            result.redis_bytes_in / result.redis_seconds,
            result.redis_bytes_out / result.redis_seconds),
        "- Redis keys: %s" % (", ".join(result.redis_keys),), ""]


def panels(result):
    return [Panel(
        title="11. Fleet relay: bulk download, local vs relayed",
        ylabel="Mbit/s (median)",
        categories=list(PATHS),
        series=[Series(label="", values=[result.bulk(p) for p in PATHS],
                       texts=["%.0f" % (result.bulk(p) or 0) for p in PATHS],
                       colors=[ANYPROXY if p == LOCAL else PEER for p in PATHS])],
        margin=0.15)]


def settings(args):
    return "fleet relay: bulk %d s per path, %d CONNECTs per run, Redis idle window %d s" % (
        args.seconds, max(100, args.requests // 4), args.fleet_idle)


EXAMPLE = FleetRelayResult(
    runs={LOCAL: [FleetRelayRun(bulk_mbit=4000.0, connect_rate=900.0, connect_failed=0,
                                bulk_cpu={"fleet-gateway-A": 0.0, "fleet-gateway-B": 1.5,
                                          "fleet-client": 1.6})],
          RELAYED: [FleetRelayRun(bulk_mbit=3000.0, connect_rate=600.0, connect_failed=0,
                                  bulk_cpu={"fleet-gateway-A": 1.7, "fleet-gateway-B": 2.5,
                                            "fleet-client": 1.6})]},
    redis_keys=["anyproxy:group:default", "anyproxy:node:A", "anyproxy:node:B", "anyproxy:nodes"],
    redis_seconds=10.0, redis_calls={"evalsha": 10, "get": 20}, redis_bytes_in=4000,
    redis_bytes_out=6000, budget_runs={LOCAL: [2400.0], RELAYED: [1700.0]}, budget_fraction=0.4)

MEASUREMENT = Measurement(
    name="fleet_relay", number=11,
    summary="two fleet gateways: bulk and CONNECT relayed through one vs local (only when named)",
    result=FleetRelayResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings,
    example=EXAMPLE, tools=("redis-server", "redis-cli", "python:trustme"), by_default=False,
    aliases=("fleet",),
    options=[Option(flag="--fleet-idle", help="seconds of the idle window for Redis traffic",
                    default=10, quick=6, minimum=1)])
