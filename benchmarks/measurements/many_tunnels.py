"""
8. many tunnels: a gateway of its own (twistd, default ping interval) and
C{--tunnels} client tunnels from a few client processes (twistd, up to 64
C{replicas} each, the config's bound).  Gateway RSS per tunnel (RSS with the
tunnels, settled, minus RSS before the first client, over the tunnels) and
the gateway's CPU while they sit idle for C{--idle-seconds} (share of one
core).  Then the reconnect storm: the gateway is stopped (SIGTERM: GOAWAY,
tunnels closed) and started again; the time until every tunnel is back, the
handshake rate (tunnels established per second, overall and the busiest
second) and, for a user doing SOCKS5 CONNECT + echo in a loop from the
moment the gateway listens again, the slowest request and the failures.

Tunnels are counted as the gateway's established TCP connections on its
tunnel port (psutil, from outside, costing the gateway nothing); the status
API confirms the count once at the end.
"""

import asyncio
import base64
import contextlib
import http.client
import json
import math
import os
import time
import typing

import attr
import yaml

try:
    import psutil
except ImportError:  # selfcheck.py still imports this module
    psutil = None

from harness import KiB, LOOPBACK, MiB, BenchError, log
from harness.clients import socks_open
from harness.cpu_time import cpu_seconds
from harness.measurement import Measurement, Option
from harness.processes import free_port, nofile_limit, wait_port
from harness.report import Row, check, num, yes_no

LABEL = "8 many tunnels"
TARGET_KIB_PER_TUNNEL = 40
TARGET_IDLE_CPU = 1.0      # percent of one core
TARGET_RECONNECT = 30.0    # seconds
MAX_REPLICAS = 64          # anyproxy/config/load.py bounds client.replicas
STATUS = ("status", "status-pw")


@attr.s(frozen=True, auto_attribs=True)
class ManyTunnelsResult:
    asked: int                    # tunnels asked for
    tunnels: int                  # established (status API)
    client_processes: int
    rss_before: int               # gateway RSS, bytes, before the first client
    rss_after: int                # with every tunnel up, settled
    idle_seconds: float
    idle_cpu_percent: float       # gateway CPU over the idle window, % of one core
    client_cpu_percent: float     # all client processes together, % of one core
    storm_tunnels: int            # back after the restart
    storm_seconds: typing.Optional[float]   # restart -> all back (None: not all came back)
    storm_listen_seconds: float   # restart -> the gateway listens again
    handshake_rate: float         # tunnels/s from listening to all back
    peak_rate: float              # the busiest second
    user_requests: int
    user_failures: int
    user_slowest_ms: float        # slowest successful request
    user_median_ms: float

    @property
    def kib_per_tunnel(self):
        return (self.rss_after - self.rss_before) / max(1, self.tunnels) / KiB


def _config(env, port, socks_port, status_port, count):
    certs = env.processes.path("certs")
    return {
        "log": {"level": env.args.anyproxy_log_level},
        "proxy": {"socks5": {"listen_addr": "%s:%d" % (LOOPBACK, socks_port)}},
        "gateway": {"listen_addr": "%s:%d" % (LOOPBACK, port),
                    "tls_cert": os.path.join(certs, "server.crt"),
                    "tls_key": os.path.join(certs, "server.key"),
                    "auth_username": "many", "auth_password": "many-password",
                    "auth_max_tunnels": count + 100,
                    "status_addr": "%s:%d" % (LOOPBACK, status_port),
                    "status_username": STATUS[0], "status_password": STATUS[1]},
    }


def _client_config(env, port, index, replicas):
    return {"log": {"level": env.args.anyproxy_log_level},
            "client": {"gateway_addr": "%s:%d" % (LOOPBACK, port),
                       "gateway_tls_cert": os.path.join(env.processes.path("certs"), "ca.crt"),
                       "client_id": "many-%d" % index, "replicas": replicas,
                       "auth_username": "many", "auth_password": "many-password"}}


def _established(proc, port):
    try:
        return sum(1 for c in proc.connections(kind="tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)
    except psutil.Error:
        return 0


def _status_tunnels(port):
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    token = base64.b64encode(("%s:%s" % STATUS).encode()).decode()
    conn.request("GET", "/api/status", headers={"Authorization": "Basic " + token})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if resp.status != 200:
        raise BenchError("status API: HTTP %d" % resp.status)
    return json.loads(body)["totals"]["tunnels"]


def _wait_for(proc, port, count, timeout, processes, names):
    """Poll the established count until C{count}; (seconds, [(t, n)]) or (None, ...)."""
    t0 = time.time()
    trace = []
    while time.time() - t0 < timeout:
        n = _established(proc, port)
        trace.append((time.time() - t0, n))
        if n >= count:
            return time.time() - t0, trace
        processes.check_alive(*names)
        time.sleep(0.25)
    return None, trace


def _settle(proc, quiet=0.2 * MiB, interval=1.0, limit=15.0):
    last = proc.memory_info().rss
    deadline = time.time() + limit
    while time.time() < deadline:
        time.sleep(interval)
        now = proc.memory_info().rss
        if abs(now - last) < quiet:
            return now
        last = now
    return last


async def _user(socks_port, echo_port, stop, out):
    """SOCKS5 CONNECT + one echo + close, again and again until C{stop}: (ok, seconds) each."""
    i = 0
    while not stop.is_set():
        i += 1
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(socks_open(socks_port, LOOPBACK, echo_port), 30)
            try:
                message = b"user %d\n" % i
                writer.write(message)
                ok = await asyncio.wait_for(reader.readexactly(len(message)), 30) == message
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, BenchError):
            ok = False
        out.append((ok, time.monotonic() - t0))
        await asyncio.sleep(0.05)


def _storm(env, start_gateway, port, socks_port, count):
    """Restart the gateway; (gateway, back, seconds, listen_seconds, trace, user results)."""
    processes = env.processes
    log("many tunnels: restarting the gateway (SIGTERM, then start again)")
    processes.stop("many-gateway")
    t0 = time.time()
    gateway = start_gateway()
    wait_port(socks_port, timeout=30, processes=processes, names=("many-gateway",))
    listen = time.time() - t0
    proc = psutil.Process(gateway.pid)
    user = []

    async def go():
        stop = asyncio.Event()
        task = asyncio.ensure_future(_user(socks_port, env.services.ports["echo"], stop, user))
        try:
            seconds, trace = await asyncio.to_thread(
                _wait_for, proc, port, count, 120, processes, ("many-gateway",))
            await asyncio.sleep(2)  # the user a little after the storm as well
        finally:
            stop.set()
            await task
        return seconds, trace

    seconds, trace = asyncio.run(go())
    back = trace[-1][1] if trace else 0
    return gateway, back, (None if seconds is None else seconds + listen), listen, trace, user


def run(env):
    args, processes = env.args, env.processes
    count = args.tunnels
    limit = nofile_limit()
    if limit < count + 500:
        log("RLIMIT_NOFILE is %d: lowering --tunnels from %d to %d", limit, count, limit - 500)
        count = limit - 500
    n_clients = max(1, math.ceil(count / MAX_REPLICAS))
    per = [count // n_clients + (1 if i < count % n_clients else 0) for i in range(n_clients)]
    port, socks_port, status_port = free_port(), free_port(), free_port()
    config = processes.path("many-gateway.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(_config(env, port, socks_port, status_port, count), f)

    def start_gateway():
        proc = env.services.twistd("many-gateway", "anyproxy-gateway", "--config=" + config)
        wait_port(port, timeout=30, processes=processes, names=("many-gateway",))
        return proc

    gateway = start_gateway()
    gproc = psutil.Process(gateway.pid)
    time.sleep(1)
    rss_before = _settle(gproc)
    log("many tunnels: gateway RSS %.1f MiB; starting %d client processes (%s replicas)",
        rss_before / MiB, n_clients, "/".join(str(x) for x in sorted(set(per))))
    clients = []
    for i, replicas in enumerate(per):
        path = processes.path("many-client-%d.yaml" % i)
        with open(path, "w") as f:
            yaml.safe_dump(_client_config(env, port, i, replicas), f)
        clients.append(env.services.twistd("many-client-%d" % i, "anyproxy-client", "--config=" + path))
    names = ["many-gateway"] + ["many-client-%d" % i for i in range(n_clients)]
    seconds, _ = _wait_for(gproc, port, count, 180, processes, names)
    if seconds is None:
        raise BenchError("many tunnels: only %d of %d tunnels after 180 s" % (_established(gproc, port), count))
    log("many tunnels: %d tunnels up in %.1f s", count, seconds)
    time.sleep(3)
    rss_after = _settle(gproc)
    tunnels = _status_tunnels(status_port)
    log("many tunnels: status API lists %d tunnels; gateway RSS %.1f MiB (%.1f KiB per tunnel)",
        tunnels, rss_after / MiB, (rss_after - rss_before) / max(1, tunnels) / KiB)

    cprocs = [psutil.Process(c.pid) for c in clients]
    time.sleep(args.ping_settle)  # past the first ping round
    g0, c0, t0 = cpu_seconds(gproc), cpu_seconds(*cprocs), time.time()
    time.sleep(args.idle_seconds)
    g1, c1, t1 = cpu_seconds(gproc), cpu_seconds(*cprocs), time.time()
    idle_cpu = 100.0 * (g1 - g0) / (t1 - t0)
    client_cpu = 100.0 * (c1 - c0) / (t1 - t0)
    log("many tunnels: idle over %.0f s: gateway %.2f%% of a core, %d clients %.2f%%",
        t1 - t0, idle_cpu, n_clients, client_cpu)

    gateway, back, storm_seconds, listen, trace, user = _storm(env, start_gateway, port, socks_port, count)
    # The handshake rate: from the gateway listening to all back; the peak over any second.
    span = (storm_seconds - listen) if storm_seconds else max(1e-9, trace[-1][0] if trace else 1)
    rate = back / max(span, 1e-9)
    peak = 0.0
    for i, (t, n) in enumerate(trace):
        for t2, n2 in trace[i:]:
            if t2 - t >= 1.0:
                peak = max(peak, (n2 - n) / (t2 - t))
                break
    oks = sorted(s for ok, s in user if ok)
    failures = sum(1 for ok, _ in user if not ok)
    storm_tunnels = _status_tunnels(status_port)
    log("many tunnels: after restart %d/%d back in %s s (listening after %.1f s), %.0f handshakes/s "
        "(peak %.0f/s); user: %d requests, %d failed, slowest %.0f ms", storm_tunnels, count,
        "n/a" if storm_seconds is None else "%.1f" % storm_seconds, listen, rate, peak,
        len(user), failures, 1000 * oks[-1] if oks else float("nan"))
    for name in reversed(names):
        processes.stop(name)
    return ManyTunnelsResult(
        asked=args.tunnels, tunnels=tunnels, client_processes=n_clients, rss_before=rss_before,
        rss_after=rss_after, idle_seconds=t1 - t0, idle_cpu_percent=idle_cpu,
        client_cpu_percent=client_cpu, storm_tunnels=storm_tunnels, storm_seconds=storm_seconds,
        storm_listen_seconds=listen, handshake_rate=rate, peak_rate=peak, user_requests=len(user),
        user_failures=failures, user_slowest_ms=1000 * oks[-1] if oks else 0.0,
        user_median_ms=1000 * oks[len(oks) // 2] if oks else 0.0)


def rows(result):
    r = result
    return [
        Row(LABEL, "tunnels up (of %d, from %d client processes)" % (r.asked, r.client_processes),
            "%d" % r.tunnels, "", "%d" % r.asked, yes_no(r.tunnels >= r.asked)),
        Row(LABEL, "gateway RSS per tunnel, KiB", num(r.kib_per_tunnel, "{:.1f}"), "",
            "≤ %d" % TARGET_KIB_PER_TUNNEL, check(r.kib_per_tunnel, TARGET_KIB_PER_TUNNEL, higher=False)),
        Row(LABEL, "idle gateway CPU over %.0f s, %% of a core" % r.idle_seconds,
            num(r.idle_cpu_percent, "{:.2f}"), "", "< %g" % TARGET_IDLE_CPU,
            check(r.idle_cpu_percent, TARGET_IDLE_CPU, higher=False)),
        Row(LABEL, "gateway restart: all tunnels back, s", num(r.storm_seconds, "{:.1f}"), "",
            "≤ %d" % TARGET_RECONNECT,
            yes_no(r.storm_seconds is not None and r.storm_seconds <= TARGET_RECONNECT)),
        Row(LABEL, "reconnect handshakes/s (overall / busiest second)",
            "%s / %s" % (num(r.handshake_rate), num(r.peak_rate))),
        Row(LABEL, "user during the storm: slowest request, ms (%d requests, %d failed)"
            % (r.user_requests, r.user_failures), num(r.user_slowest_ms), "", "", ""),
    ]


def raw(result):
    r = result
    return ["Many tunnels: gateway RSS %.1f → %.1f MiB for %d tunnels; idle clients together %.2f%% of a core; "
            "after the restart the gateway listened in %.1f s; user median %.0f ms."
            % (r.rss_before / MiB, r.rss_after / MiB, r.tunnels, r.client_cpu_percent,
               r.storm_listen_seconds, r.user_median_ms)]


def settings(args):
    return "many tunnels %d, idle %d s" % (args.tunnels, args.idle_seconds)


EXAMPLE = ManyTunnelsResult(
    asked=2000, tunnels=2000, client_processes=32, rss_before=40 * MiB, rss_after=100 * MiB,
    idle_seconds=60.0, idle_cpu_percent=3.1, client_cpu_percent=6.0, storm_tunnels=2000,
    storm_seconds=9.5, storm_listen_seconds=1.2, handshake_rate=240.0, peak_rate=600.0,
    user_requests=120, user_failures=2, user_slowest_ms=850.0, user_median_ms=4.0)

MEASUREMENT = Measurement(
    name="many_tunnels", number=8, aliases=("tunnels",),
    summary="2,000 client tunnels on one gateway: RSS per tunnel, idle CPU, reconnect storm after a restart",
    result=ManyTunnelsResult, run=run, rows=rows, raw=raw, settings=settings, example=EXAMPLE,
    by_default=False, open_streams=lambda args: args.tunnels,
    options=[Option(flag="--tunnels", help="client tunnels on one gateway", default=2000, quick=256, minimum=1),
             Option(flag="--idle-seconds", help="idle window for the gateway's CPU", default=60, quick=20,
                    minimum=1),
             Option(flag="--ping-settle", help="seconds to wait before the idle window", default=12,
                    quick=12, minimum=0)])
