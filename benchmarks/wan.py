"""
One bulk stream across a WAN-like delay, and how long a small HTTP request
takes across it: AnyProxy next to OpenSSH `ssh -R`.

    .venv/bin/python benchmarks/wan.py                       # 0, 25, 50 and 100 ms round trip
    .venv/bin/python benchmarks/wan.py --rtt-ms 50 --seconds 10

For each round trip time, a fresh set of processes (harness/services.py):
targets, AnyProxy's gateway and client, and (unless --no-openssh) a throwaway
sshd with `ssh -R PORT` from the "inside".  A delay relay
(benchmarks/delay_relay.py, each direction delayed by half the round trip)
sits on the tunnel connection: between AnyProxy's client and its gateway,
and between ssh and sshd.  The user side and the target side stay on plain
loopback.  One SOCKS5 download from the endless source target, --omit
seconds of warm-up (window growth, TCP slow start on loopback) then
--seconds measured; Mbit/s of payload, per path and round trip.  The
"window / RTT" column is what a fixed 1 MiB window allows (AnyProxy before
auto-tuning); OpenSSH's channel window is 2 MiB.

Then --requests small HTTP requests to the HTTP target per path, each on a
new user connection, timed from the connect to the end of the answer (the
median is reported): through AnyProxy's HTTP proxy with a new stream each
(upstream_keepalive: 0: the request's head goes with the OPEN as early
data, docs/PROTOCOL.md) and with its pooled upstream (after the first
request, no OPEN at all), through AnyProxy's SOCKS5 proxy, and through
`ssh -R`'s SOCKS5 (whose SOCKS5 server is the ssh client, inside: its
handshake crosses the delay too); and straight to a port forwarded to the
HTTP target, by AnyProxy's client (client.open_ports) and by `ssh -R
PORT:HOST:PORT`.

Needs the venv and, for OpenSSH, `openssh-server openssh-client`.
Nothing is written to results/: it prints a Markdown table.
"""

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import HERE, LOOPBACK, log  # noqa: E402
from harness.clients import recv_exact, socks_connect  # noqa: E402
from harness.processes import Processes, free_port, wait_port  # noqa: E402
from harness.services import NO_REUSE, Services, default_window, missing  # noqa: E402

ANYPROXY = "AnyProxy"
OPENSSH = "OpenSSH -R"
# The request paths: (label, proxy kind, the services' key for its port).
REQUEST_PATHS = (("AnyProxy HTTP proxy, a new stream each", "http", NO_REUSE),
                 ("AnyProxy HTTP proxy, pooled upstream", "http", ANYPROXY),
                 ("AnyProxy SOCKS5", "socks", ANYPROXY),
                 ("OpenSSH -R SOCKS5", "socks", OPENSSH),
                 ("AnyProxy forwarded port", "forward", ANYPROXY),
                 ("OpenSSH -R forwarded port", "forward", OPENSSH))


class WanServices(Services):
    """The usual services, with a delay relay in front of the gateway and of sshd."""

    def __init__(self, processes, args, delay_ms, **kw):
        super().__init__(processes, args, **kw)
        self.delay_ms = delay_ms
        self.forwards = {}  # path name -> a port forwarded to the HTTP target

    def relay(self, name, to):
        """A delay relay to port C{to}; the port to dial instead (C{to} itself with no delay)."""
        if not self.delay_ms:
            return to
        port = free_port()
        self.processes.spawn(name, [sys.executable, os.path.join(HERE, "delay_relay.py"),
                                    "--listen", str(port), "--to", str(to),
                                    "--delay-ms", str(self.delay_ms / 2.0)])
        wait_port(port, processes=self.processes, names=(name,))
        return port

    def anyproxy_config(self, certs):
        config = super().anyproxy_config(certs)
        port = self.relay("relay-anyproxy", self.ports["gateway"])
        config["client"]["gateway_addr"] = "%s:%d" % (LOOPBACK, port)
        # A port the client asks the gateway to open, forwarded to the HTTP target.
        forward = self.port("anyproxy_forward")
        config["gateway"]["open_ports_allowed"] = ["%d-%d" % (forward, forward)]
        config["client"]["open_ports"] = [{"remote_port": forward, "local_host": LOOPBACK,
                                           "local_port": self.ports["http_target"]}]
        return config

    def start_anyproxy(self):
        super().start_anyproxy()
        wait_port(self.ports["anyproxy_forward"], processes=self.processes, names=("gateway", "client"))
        self.forwards[ANYPROXY] = self.ports["anyproxy_forward"]

    def ssh_connect_port(self, port):
        if not hasattr(self, "_ssh_relay"):
            self._ssh_relay = self.relay("relay-ssh", port)
        return self._ssh_relay

    def start_ssh(self):
        super().start_ssh()
        self.socks.pop("OpenSSH -R aes128-gcm", None)  # one OpenSSH path is enough here
        forward = self.port("openssh_forward")
        self.ssh_remote("ssh-forward", "%s:%d:%s:%d" % (LOOPBACK, forward, LOOPBACK, self.ports["http_target"]))
        self.forwards[OPENSSH] = forward


def download(proxy_port, source_port, seconds, omit):
    """One SOCKS5 stream from the endless source: payload Mbit/s over C{seconds} after C{omit}."""
    sock = socks_connect(proxy_port, LOOPBACK, source_port, timeout=30)
    buf = bytearray(1024 * 1024)
    start = time.monotonic()
    begin, end = start + omit, start + omit + seconds
    counted = 0
    try:
        while True:
            n = sock.recv_into(buf)
            if not n:
                raise RuntimeError("the source closed")
            now = time.monotonic()
            if now >= end:
                break
            if now >= begin:
                counted += n
    finally:
        sock.close()
    return counted * 8 / seconds / 1e6


def request_ms(kind, proxy_port, target_port):
    """Milliseconds for one GET of the HTTP target through a new connection to the proxy."""
    started = time.monotonic()
    if kind == "socks":
        sock = socks_connect(proxy_port, LOOPBACK, target_port, timeout=30)
        target = b"/"
    elif kind == "forward":  # proxy_port is forwarded to the target
        sock = socket.create_connection((LOOPBACK, proxy_port), timeout=30)
        target = b"/"
    else:
        sock = socket.create_connection((LOOPBACK, proxy_port), timeout=30)
        target = b"http://%s:%d/" % (LOOPBACK.encode(), target_port)
    try:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
                     % (target, LOOPBACK.encode(), target_port))
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                raise RuntimeError("the answer ended early: %r" % (answer,))
            answer += piece
        head, _, body = answer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError("not a 200: %r" % (head,))
        length = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        if length and len(body) < length[0]:
            recv_exact(sock, length[0] - len(body))
    finally:
        sock.close()
    return (time.monotonic() - started) * 1000


def _median(values):
    return sorted(values)[len(values) // 2] if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rtt-ms", default="0,25,50,100", help="round trip times, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--omit", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--requests", type=int, default=10, help="HTTP requests per path and round trip")
    parser.add_argument("--no-openssh", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--anyproxy-log-level", default="warn")
    args = parser.parse_args()
    needs = frozenset() if args.no_openssh else frozenset({"openssh"})
    lacking = missing(needs, ())
    if lacking:
        sys.exit("missing: %s (or --no-openssh)" % ", ".join(lacking))
    window = default_window()
    results = {}
    requests = {}
    for rtt in [float(x) for x in args.rtt_ms.split(",")]:
        processes = Processes(keep=args.keep)
        failed = True
        try:
            services = WanServices(processes, args, rtt, needs=needs)
            services.start()
            paths = [ANYPROXY] + ([] if args.no_openssh else [OPENSSH])
            for r in range(args.rounds):
                for name in paths:
                    mbps = download(services.socks[name], services.ports["source"], args.seconds, args.omit)
                    log("rtt %g ms, round %d: %-12s %.0f Mbit/s", rtt, r + 1, name, mbps)
                    results.setdefault((rtt, name), []).append(mbps)
            for label, kind, key in REQUEST_PATHS:
                ports = {"http": services.http, "socks": services.socks, "forward": services.forwards}[kind]
                if key not in ports:
                    continue
                times = [request_ms(kind, ports[key], services.ports["http_target"])
                         for _ in range(args.requests)]
                log("rtt %g ms: %-40s median %.1f ms per request", rtt, label, _median(times))
                requests[(rtt, label)] = times
            failed = False
        finally:
            processes.close(failed=failed)
    print()
    print("| RTT | AnyProxy Mbit/s | OpenSSH -R Mbit/s | AnyProxy / OpenSSH | 1 MiB window / RTT |")
    print("|---|---|---|---|---|")
    for rtt in sorted({k[0] for k in results}):
        ours = sorted(results[(rtt, ANYPROXY)])[len(results[(rtt, ANYPROXY)]) // 2]
        theirs = results.get((rtt, OPENSSH))
        theirs = sorted(theirs)[len(theirs) // 2] if theirs else None
        cap = "-" if not rtt else "%.0f" % (window * 8 / (rtt / 1000.0) / 1e6)
        print("| %g ms | %.0f | %s | %s | %s |" % (
            rtt, ours, "-" if theirs is None else "%.0f" % theirs,
            "-" if not theirs else "%.2f" % (ours / theirs), cap))
    print()
    labels = [label for label, _, _ in REQUEST_PATHS if any(k[1] == label for k in requests)]
    print("ms per small HTTP request, a new user connection each (median of %d):" % args.requests)
    print()
    print("| RTT | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for rtt in sorted({k[0] for k in requests}):
        print("| %g ms | %s |" % (rtt, " | ".join(
            "%.1f" % _median(requests[(rtt, label)]) if (rtt, label) in requests else "-"
            for label in labels)))


if __name__ == "__main__":
    main()
