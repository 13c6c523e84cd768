#!/usr/bin/env python3
"""
AnyProxy benchmark suite (issue 5): AnyProxy against its peers, in one run.

Run it through ``benchmarks/run`` (which installs what it needs first), or
directly with the venv's Python once the tools are installed:

    benchmarks/run                    # full run: 3 interleaved rounds
    benchmarks/run --quick            # smoke test: 1 round, short runs, fewer streams
    benchmarks/run --only bulk        # one measurement (bulk, http, idle, slow, churn, udp)

Everything listens on loopback with free ports; every file lives in one
temporary directory.  Processes are killed and the directory is removed at the
end, also on Ctrl-C or failure (``--keep`` keeps the directory for debugging).

Measurements (see benchmarks/README.md for how to read them):

1. bulk   iperf3 through proxychains4 (SOCKS5): upload and download, Mbit/s,
          for AnyProxy, OpenSSH reverse dynamic forwarding (default cipher and
          aes128-gcm), pproxy and microsocks, in interleaved rounds.
2. http   hey, one new connection per request, 20 concurrent, through the HTTP
          proxy of AnyProxy and of pproxy: requests/s and share of 200s; also
          AnyProxy with its upstream pool off (upstream_keepalive: 0); and
          CONNECT tunnels per second, a new one each (as browsers open for https).
3. idle   10,000 concurrent idle SOCKS5 streams through one tunnel: RSS of
          gateway + client before/after, KiB per stream, all streams checked.
4. slow   a user stops reading a large download: RSS growth of gateway and
          client, and another stream's download speed meanwhile vs solo.
5. churn  thousands of short streams opened and closed in batches: RSS and
          open file descriptors after each batch.
6. udp    a UDP echo, directly and through AnyProxy's SOCKS5 UDP ASSOCIATE:
          ping-pong round trips/s (100 B), and a burst with a bounded number
          of datagrams in flight (1,200 B): datagrams/s, Mbit/s, loss.
"""

import argparse
import asyncio
import collections
import contextlib
import datetime
import getpass
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
LOOPBACK = "127.0.0.1"
# iperf3 listens on a second loopback address so that the proxychains configs
# can exclude 127.0.0.1 (the proxies themselves, the other local services)
# and send only the iperf3 target through the proxy under test.
IPERF_HOST = "127.0.0.2"
MEASUREMENTS = ("bulk", "http", "idle", "slow", "churn", "udp")
# AnyProxy's HTTP proxy with its upstream pool off (upstream_keepalive: 0).
NO_REUSE = "AnyProxy, upstream_keepalive: 0"
# Run order: the 10,000 idle streams leave the allocator with the most memory,
# so they go last and the slow-reader and churn figures start from a calmer heap.
RUN_ORDER = ("bulk", "http", "udp", "slow", "churn", "idle")
MiB = 1024 * 1024
KiB = 1024

# UDP: datagram sizes (payload, SOCKS5 header not counted), the burst's
# datagrams in flight (--udp-window), and how long an answer may take before
# its datagram counts as lost (answers take a few milliseconds at most here).
UDP_PING_SIZE = 100
UDP_BURST_SIZE = 1200
UDP_WINDOW = 64
UDP_LOSS_TIMEOUT = 0.25
UDP_BUFFER = 4 * MiB  # asked for our UDP socket's buffers; the kernel may grant less
UDP_SEQ = struct.Struct("!Q")  # every datagram starts with its sequence number

# Issue 5's targets, checked in the table's last column.
TARGET_VS_SSH = 1.0
TARGET_VS_MICROSOCKS = 1.5
TARGET_VS_PPROXY = 0.45
STRETCH_VS_SSH_GCM = 0.8
TARGET_HTTP_VS_PPROXY = 1.0
TARGET_KIB_PER_STREAM = 32
TARGET_OTHER_STREAM = 0.9
# "Flat" for churn: what the last batch may add to gateway + client RSS.
CHURN_SLACK = 2 * MiB


def log(msg, *args):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg % args if args else msg), flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# processes and the temporary directory

class Harness:
    """Owns the temporary directory and every long-running child process."""

    def __init__(self, keep=False):
        self.work = tempfile.mkdtemp(prefix="anyproxy-benchsuite-")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        self.keep = keep
        self.procs = {}

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def spawn(self, name, argv, env=None, cwd=None):
        logfile = open(os.path.join(self.logs, name + ".log"), "wb")
        # A session of its own: Ctrl-C in the terminal reaches only us, and we
        # stop the whole group (sshd's per-connection children included).
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfile,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd or self.work,
                                start_new_session=True)
        logfile.close()
        self.procs[name] = proc
        return proc

    def check_alive(self, *names):
        for name in names or list(self.procs):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise BenchError("%s exited with status %s:\n%s" % (name, proc.returncode,
                                                                    self.log_tail(name)))

    def log_tail(self, name, lines=25):
        try:
            with open(os.path.join(self.logs, name + ".log"), "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def stop(self, name, timeout=5.0):
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        self._signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(proc, signal.SIGKILL)
            proc.wait()

    @staticmethod
    def _signal(proc, sig):
        # proc.pid leads its own process group (start_new_session above).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def close(self, failed=False):
        # Newest first: the AnyProxy client goes before its gateway and so on.
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
        deadline = time.time() + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
            # Children that left the group (none expected): make sure.
            self._signal(proc, signal.SIGKILL)
        if failed:
            for name in self.procs:
                tail = self.log_tail(name, 15)
                if tail.strip():
                    print("--- last lines of %s's log:\n%s" % (name, tail), file=sys.stderr)
        self.procs.clear()
        if self.keep:
            print("kept %s" % self.work, file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_port(port, host=LOOPBACK, timeout=20.0, harness=None, names=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            if harness is not None:
                harness.check_alive(*names)
            time.sleep(0.1)
    raise BenchError("nothing listens on %s:%d after %ds" % (host, port, timeout))


def raise_nofile(wanted):
    """Raise RLIMIT_NOFILE (inherited by every child) as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------------------
# SOCKS5 clients (no authentication; every listener here is loopback-only)

def _socks_request(host, port, command=1):
    return b"\x05" + bytes([command]) + b"\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BenchError("SOCKS5 proxy closed the connection")
        data += chunk
    return data


def _reply_rest(atyp, first):
    if atyp == 1:
        return 4 + 2
    if atyp == 4:
        return 16 + 2
    if atyp == 3:
        return first + 1 + 2  # length byte already read as `first`
    raise BenchError("bad SOCKS5 reply address type %d" % atyp)


def socks_connect(proxy_port, host, port, timeout=10.0, rcvbuf=None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    try:
        sock.connect((LOOPBACK, proxy_port))
        sock.sendall(b"\x05\x01\x00")
        if _recv_exact(sock, 2) != b"\x05\x00":
            raise BenchError("SOCKS5 method refused")
        sock.sendall(_socks_request(host, port))
        _socks_reply(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _socks_reply(sock):
    """Read a SOCKS5 reply; return its BND.ADDR and BND.PORT."""
    head = _recv_exact(sock, 5)
    if head[1] != 0:
        raise BenchError("SOCKS5 reply 0x%02x" % head[1])
    rest = _recv_exact(sock, _reply_rest(head[3], head[4]) - 1)
    if head[3] == 1:
        host = socket.inet_ntoa(head[4:5] + rest[:3])
    elif head[3] == 4:
        host = socket.inet_ntop(socket.AF_INET6, head[4:5] + rest[:15])
    else:
        host = rest[:head[4]].decode("ascii", "replace")
    return host, struct.unpack("!H", rest[-2:])[0]


def socks_udp_associate(proxy_port, local, timeout=10.0):
    """
    SOCKS5 UDP ASSOCIATE for the UDP socket bound to C{local}: returns the
    control connection (the association lives as long as it stays open) and
    the relay's address.
    """
    control = socket.socket()
    control.settimeout(timeout)
    try:
        control.connect((LOOPBACK, proxy_port))
        control.sendall(b"\x05\x01\x00")
        if _recv_exact(control, 2) != b"\x05\x00":
            raise BenchError("SOCKS5 method refused")
        control.sendall(_socks_request(local[0], local[1], command=3))
        host, port = _socks_reply(control)
    except BaseException:
        control.close()
        raise
    return control, (LOOPBACK if host in ("0.0.0.0", "::") else host, port)


async def socks_open(proxy_port, host, port):
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy_port)
    try:
        writer.write(b"\x05\x01\x00")
        if await reader.readexactly(2) != b"\x05\x00":
            raise BenchError("SOCKS5 method refused")
        writer.write(_socks_request(host, port))
        head = await reader.readexactly(5)
        if head[1] != 0:
            raise BenchError("SOCKS5 reply 0x%02x" % head[1])
        await reader.readexactly(_reply_rest(head[3], head[4]) - 1)
    except BaseException:
        writer.close()
        raise
    return reader, writer


def echo_check(proxy_port, echo_port):
    with socks_connect(proxy_port, LOOPBACK, echo_port) as sock:
        sock.sendall(b"ping\n")
        if _recv_exact(sock, 5) != b"ping\n":
            raise BenchError("echo answered wrongly")


def http_proxy_check(proxy_port, http_port):
    with socket.create_connection((LOOPBACK, proxy_port), 10) as sock:
        sock.sendall(b"GET http://%s:%d/ HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
                     % (LOOPBACK.encode(), http_port, LOOPBACK.encode(), http_port))
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise BenchError("HTTP proxy answered %r" % answer[:60])


class UdpPath:
    """
    A UDP socket and the way to the UDP echo: straight to it (C{proxy_port}
    None), or through a SOCKS5 UDP association, every datagram then carrying
    the RFC 1928 header (the relay answers with the same header, naming the
    echo as the source).
    """

    def __init__(self, echo_port, proxy_port=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.control = None
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
            self.sock.bind((LOOPBACK, 0))
            if proxy_port is None:
                self.address, self.header = (LOOPBACK, echo_port), b""
            else:
                self.control, self.address = socks_udp_associate(proxy_port, self.sock.getsockname())
                self.header = b"\x00\x00\x00\x01" + socket.inet_aton(LOOPBACK) + struct.pack("!H", echo_port)
        except BaseException:
            self.close()
            raise

    def alive(self):
        """False once the proxy has closed the association's control connection."""
        if self.control is None:
            return True
        if not select.select([self.control], [], [], 0)[0]:
            return True
        try:
            return self.control.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def probe(self, timeout=0.5):
        self.sock.settimeout(timeout)
        self.sock.sendto(self.header + b"probe", self.address)
        data = self.sock.recv(65536)
        if data != self.header + b"probe":
            raise BenchError("UDP echo answered %r" % data[:60])

    def close(self):
        self.sock.close()
        if self.control is not None:
            self.control.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_udp_path(echo_port, proxy_port=None):
    """A L{UdpPath} whose first datagram has come back."""
    path = UdpPath(echo_port, proxy_port)
    try:
        path.probe()
    except BaseException:
        path.close()
        raise
    return path


def retry(what, check, timeout=30.0, harness=None, names=()):
    deadline = time.time() + timeout
    while True:
        try:
            return check()
        except (OSError, BenchError) as e:
            if harness is not None:
                harness.check_alive(*names)
            if time.time() > deadline:
                raise BenchError("%s: %s" % (what, e))
            time.sleep(0.2)


# ---------------------------------------------------------------------------
# memory

class Rss:
    """RSS and open descriptors of the gateway and the client."""

    def __init__(self, pids):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def sample(self):
        out = {}
        for name, proc in self.procs.items():
            out[name] = proc.memory_info().rss
            out[name + "_fds"] = proc.num_fds()
        out["total"] = out["gateway"] + out["client"]
        return out

    def settle(self, quiet=0.2 * MiB, interval=0.5, limit=8.0):
        """Sample until the total stops moving (or C{limit} seconds)."""
        last = self.sample()
        deadline = time.time() + limit
        while time.time() < deadline:
            time.sleep(interval)
            now = self.sample()
            if abs(now["total"] - last["total"]) < quiet:
                return now
            last = now
        return last


class PeakSampler(threading.Thread):
    """Keeps the highest RSS seen per process while a block runs."""

    def __init__(self, rss, interval=0.2):
        super().__init__(daemon=True)
        self.rss, self.interval = rss, interval
        self.peak = rss.sample()
        self._halt = threading.Event()

    def run(self):
        while not self._halt.wait(self.interval):
            with contextlib.suppress(psutil.Error):
                now = self.rss.sample()
                for key in ("gateway", "client", "total"):
                    self.peak[key] = max(self.peak[key], now[key])

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self._halt.set()
        self.join()


# ---------------------------------------------------------------------------
# the setup

def load_generate():
    spec = importlib.util.spec_from_file_location("generate", os.path.join(ROOT, "certs", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_window():
    try:
        with open(os.path.join(ROOT, "anyproxy", "tunnel", "stream.py")) as f:
            text = f.read()
        m = re.search(r"^DEFAULT_WINDOW\s*=\s*([0-9 *]+)$", text, re.M)
        value = 1
        for factor in m.group(1).split("*"):
            value *= int(factor)
        return value
    except (OSError, AttributeError, ValueError):
        return MiB


class Setup:
    """Starts AnyProxy, the peers and the targets that the chosen measurements need."""

    def __init__(self, harness, args, needed):
        self.h = harness
        self.args = args
        self.needed = needed
        self.ports = {}
        self.socks = {}   # path name -> SOCKS5 port, for bulk
        self.http = {}    # path name -> HTTP proxy port

    def port(self, name, kind=socket.SOCK_STREAM):
        self.ports[name] = free_port(kind)
        return self.ports[name]

    def twistd(self, name, *args):
        env = dict(os.environ, PYTHONPATH=ROOT)
        return self.h.spawn(name, [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                                   "-n", "--pidfile="] + list(args), env=env, cwd=ROOT)

    def start(self):
        self.start_targets()
        self.start_anyproxy()
        if "bulk" in self.needed or "slow" in self.needed:
            self.start_iperf()
        if "bulk" in self.needed or "http" in self.needed:
            self.start_pproxy()
        if "bulk" in self.needed:
            self.start_microsocks()
            self.start_ssh()
        self.check_paths()

    def start_targets(self):
        argv = [sys.executable, os.path.join(HERE, "targets.py"), "--host", LOOPBACK,
                "--echo", str(self.port("echo")), "--http", str(self.port("http_target")),
                "--source", str(self.port("source"))]
        if "udp" in self.needed:
            argv += ["--udp-echo", str(self.port("udp_echo", socket.SOCK_DGRAM))]
        self.h.spawn("targets", argv)
        for name in ("echo", "http_target", "source"):
            wait_port(self.ports[name], harness=self.h, names=("targets",))
        if "udp" in self.needed:
            retry("UDP echo", lambda: open_udp_path(self.ports["udp_echo"]).close(),
                  timeout=15, harness=self.h, names=("targets",))

    def start_anyproxy(self):
        certs = self.h.path("certs")
        load_generate().generate(certs, ["localhost", LOOPBACK])
        gw, socks, http = self.port("gateway"), self.port("anyproxy_socks"), self.port("anyproxy_http")
        # The same proxy without upstream reuse (each request its own stream
        # and target connection), measured beside it for comparison.
        no_reuse = self.port("anyproxy_http_no_reuse")
        config = self.h.path("anyproxy.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({
                "log": {"level": self.args.anyproxy_log_level},
                "proxy": {"socks5": {"listen_addr": "%s:%d" % (LOOPBACK, socks)},
                          "http": {"listen_addr": "%s:%d" % (LOOPBACK, http)},
                          "frontends": [{"type": "http",
                                         "listen_addr": "%s:%d" % (LOOPBACK, no_reuse),
                                         "options": {"upstream_keepalive": 0}}]},
                "gateway": {"listen_addr": "%s:%d" % (LOOPBACK, gw),
                            "tls_cert": os.path.join(certs, "server.crt"),
                            "tls_key": os.path.join(certs, "server.key"),
                            "auth_username": "bench", "auth_password": "bench-password",
                            # One user opens every stream here: no per-user share
                            # (anonymous users are not counted anyway).
                            "max_conns_per_user": 0},
                "client": {"gateway_addr": "%s:%d" % (LOOPBACK, gw),
                           "gateway_tls_cert": os.path.join(certs, "ca.crt"),
                           "client_id": "bench", "replicas": 1,
                           "auth_username": "bench", "auth_password": "bench-password",
                           "max_concurrent_conns": self.args.streams + 1000,
                           "reconnect_initial_delay": 0.2},
            }, f)
        self.gateway = self.twistd("gateway", "anyproxy-gateway", "--config=" + config)
        wait_port(gw, harness=self.h, names=("gateway",))
        self.client = self.twistd("client", "anyproxy-client", "--config=" + config)
        for port in (socks, http, no_reuse):
            wait_port(port, harness=self.h, names=("gateway", "client"))
        retry("AnyProxy tunnel", lambda: echo_check(socks, self.ports["echo"]),
              harness=self.h, names=("gateway", "client"))
        self.socks["AnyProxy"] = socks
        self.http["AnyProxy"] = http
        self.http[NO_REUSE] = no_reuse

    def start_iperf(self):
        self.port("iperf")
        self.restart_iperf()

    def restart_iperf(self):
        self.h.stop("iperf3")
        self.h.spawn("iperf3", ["iperf3", "-s", "-B", IPERF_HOST, "-p", str(self.ports["iperf"])])
        wait_port(self.ports["iperf"], host=IPERF_HOST, harness=self.h, names=("iperf3",))
        time.sleep(0.2)

    def start_pproxy(self):
        socks, http = self.port("pproxy_socks"), self.port("pproxy_http")
        self.h.spawn("pproxy", [sys.executable, "-m", "pproxy",
                                "-l", "socks5://%s:%d" % (LOOPBACK, socks),
                                "-l", "http://%s:%d" % (LOOPBACK, http)])
        for port in (socks, http):
            wait_port(port, harness=self.h, names=("pproxy",))
        self.socks["pproxy"] = socks
        self.http["pproxy"] = http

    def start_microsocks(self):
        port = self.port("microsocks")
        self.h.spawn("microsocks", ["microsocks", "-i", LOOPBACK, "-p", str(port)])
        wait_port(port, harness=self.h, names=("microsocks",))
        self.socks["microsocks"] = port

    def start_ssh(self):
        """A throwaway sshd; ssh -R PORT from "inside" offers SOCKS5 on the sshd side."""
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        d = self.h.path("ssh")
        os.makedirs(d, mode=0o700)
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "anyproxy-bench",
                            "-f", os.path.join(d, key)], check=True)
        shutil.copy(os.path.join(d, "user_key.pub"), os.path.join(d, "authorized_keys"))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        port = self.port("sshd")
        config = os.path.join(d, "sshd_config")
        with open(config, "w") as f:
            f.write("\n".join([
                "ListenAddress %s:%d" % (LOOPBACK, port),
                "HostKey %s" % os.path.join(d, "host_key"),
                "AuthorizedKeysFile %s" % os.path.join(d, "authorized_keys"),
                "PidFile none", "UsePAM no", "StrictModes no", "UseDNS no",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
                "AllowTcpForwarding yes", "GatewayPorts no", "PermitTTY no",
                "X11Forwarding no", "PrintMotd no", "LogLevel ERROR", ""]))
        subprocess.run([sshd, "-t", "-f", config], check=True)
        self.h.spawn("sshd", [sshd, "-D", "-e", "-f", config])
        wait_port(port, harness=self.h, names=("sshd",))
        for name, cipher in (("OpenSSH -R", None), ("OpenSSH -R aes128-gcm", "aes128-gcm@openssh.com")):
            socks = self.port(name)
            argv = ["ssh", "-N", "-F", "/dev/null", "-p", str(port), "-i", os.path.join(d, "user_key"),
                    "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
                    "-R", "%s:%d" % (LOOPBACK, socks)]
            if cipher:
                argv += ["-c", cipher]
            argv.append("%s@%s" % (getpass.getuser(), LOOPBACK))
            proc_name = "ssh-gcm" if cipher else "ssh"
            self.h.spawn(proc_name, argv)
            wait_port(socks, harness=self.h, names=(proc_name, "sshd"))
            self.socks[name] = socks

    def check_paths(self):
        for name, port in self.socks.items():
            retry("SOCKS5 via " + name, lambda: echo_check(port, self.ports["echo"]), timeout=15)
        for name, port in self.http.items():
            retry("HTTP proxy via " + name, lambda: http_proxy_check(port, self.ports["http_target"]),
                  timeout=15)
        if "udp" in self.needed:
            retry("SOCKS5 UDP ASSOCIATE via AnyProxy",
                  lambda: open_udp_path(self.ports["udp_echo"], self.socks["AnyProxy"]).close(), timeout=15)
        log("ready: %s", ", ".join("%s :%d" % kv for kv in sorted(self.ports.items())))

    def write_proxychains(self, name, port):
        path = self.h.path("proxychains-%s.conf" % re.sub(r"\W+", "-", name))
        with open(path, "w") as f:
            f.write("\n".join([
                "# generated by benchmarks/bench.py",
                "strict_chain",
                "quiet_mode",
                "# proxy_dns is off: iperf3 is given an address, nothing is resolved",
                "tcp_read_time_out 15000",
                "tcp_connect_time_out 8000",
                "# only the iperf3 target (%s) goes through the proxy" % IPERF_HOST,
                "localnet 127.0.0.1/255.255.255.255",
                "[ProxyList]",
                "socks5 %s %d" % (LOOPBACK, port), ""]))
        return path


# ---------------------------------------------------------------------------
# measurement 1: bulk TCP

def iperf(setup, conf, seconds, reverse, omit):
    argv = ["iperf3", "-c", IPERF_HOST, "-p", str(setup.ports["iperf"]), "-t", str(seconds),
            "-O", str(omit), "-J", "--connect-timeout", "5000"]
    if reverse:
        argv.append("-R")
    if conf:
        argv = ["proxychains4", "-q", "-f", conf] + argv
    for attempt in (1, 2, 3):
        time.sleep(0.5)  # the server finishes the previous test after its client has exited
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + omit + 30)
            result = json.loads(out.stdout)
            if "error" in result:
                raise BenchError(result["error"])
            return result["end"]["sum_received"]["bits_per_second"] / 1e6
        except (subprocess.TimeoutExpired, ValueError, KeyError, BenchError) as e:
            text = str(e).splitlines()[0] if str(e) else repr(e)
            log("  iperf3 failed (attempt %d): %s", attempt, text)
            if "busy" in text:
                time.sleep(2)
            else:
                setup.restart_iperf()  # a half-finished test can leave the server stuck
    return None


def measure_bulk(setup, args):
    paths = {"direct (no proxy)": None}
    for name, port in setup.socks.items():
        paths[name] = setup.write_proxychains(name, port)
    runs = {(name, d): [] for name in paths for d in ("upload", "download")}
    for r in range(args.rounds):
        log("bulk round %d/%d (%ds per run)", r + 1, args.rounds, args.seconds)
        for name, conf in paths.items():
            for direction in ("upload", "download"):
                mbps = iperf(setup, conf, args.seconds, direction == "download", args.omit)
                log("  %-24s %-8s %s", name, direction, "failed" if mbps is None else "%.0f Mbit/s" % mbps)
                runs[(name, direction)].append(mbps)
    return {"runs": runs, "paths": list(paths)}


# ---------------------------------------------------------------------------
# measurement 2: HTTP, a new connection per request

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
    return {"rps": float(m.group(1)), "ok": codes.get(200, 0) / requests, "codes": codes,
            "errors": [(int(n), text[:120]) for n, text in errors]}


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
    async def run():
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
        return {"rate": count / (time.perf_counter() - started), "failed": failed[0]}
    return asyncio.run(run())


def measure_http(setup, args):
    url = "http://%s:%d/" % (LOOPBACK, setup.ports["http_target"])
    runs = {name: [] for name in ("AnyProxy", "pproxy", NO_REUSE)}
    connect = {name: [] for name in ("AnyProxy", "pproxy")}
    for r in range(args.rounds):
        log("http round %d/%d (%d requests, %d concurrent, no keep-alive)", r + 1, args.rounds,
            args.requests, args.concurrency)
        for name in runs:
            result = hey(setup.http[name], url, args.requests, args.concurrency)
            log("  %-10s %8.0f req/s  %.2f%% 200%s", name, result["rps"], 100 * result["ok"],
                "  errors: %s" % result["errors"][:3] if result["errors"] else "")
            runs[name].append(result)
        for name in connect:
            result = connect_rate(setup.http[name], setup.ports["echo"], args.requests // 2,
                                  args.concurrency)
            log("  %-10s %8.0f CONNECT/s  %d failed", name, result["rate"], result["failed"])
            connect[name].append(result)
    return {"runs": runs, "connect": connect}


# ---------------------------------------------------------------------------
# measurement 3: many idle streams

async def _open_many(proxy_port, echo_port, count, parallel=200):
    sem = asyncio.Semaphore(parallel)
    errors = []

    async def one():
        async with sem:
            try:
                return await asyncio.wait_for(socks_open(proxy_port, LOOPBACK, echo_port), 60)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, BenchError) as e:
                errors.append(repr(e))
                return None

    streams = await asyncio.gather(*(one() for _ in range(count)))
    return [s for s in streams if s is not None], errors


async def _check_all(streams, parallel=1000):
    sem = asyncio.Semaphore(parallel)

    async def one(i, stream):
        reader, writer = stream
        message = b"stream %d\n" % i
        async with sem:
            try:
                writer.write(message)
                return await asyncio.wait_for(reader.readexactly(len(message)), 60) == message
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                return False

    return sum(await asyncio.gather(*(one(i, s) for i, s in enumerate(streams))))


async def _close_all(streams):
    for _, writer in streams:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in streams), return_exceptions=True)


def measure_idle(setup, args, rss):
    count = args.streams
    async def run():
        before = rss.settle()
        log("idle: opening %d streams through one tunnel", count)
        t0 = time.time()
        streams, errors = await _open_many(setup.socks["AnyProxy"], setup.ports["echo"], count)
        open_seconds = time.time() - t0
        log("idle: %d open in %.1fs (%d failed%s)", len(streams), open_seconds, len(errors),
            ": " + errors[0] if errors else "")
        await asyncio.sleep(1)
        opened = rss.settle()
        log("idle: checking every stream with an echo")
        usable = await _check_all(streams)
        await asyncio.sleep(1)
        used = rss.settle()
        log("idle: %d/%d usable", usable, count)
        await _close_all(streams)
        await asyncio.sleep(2)
        closed = rss.settle()
        return {"count": count, "opened": len(streams), "usable": usable, "errors": errors[:5],
                "error_count": len(errors), "open_seconds": open_seconds,
                "before": before, "after_open": opened, "after_use": used, "after_close": closed}
    return asyncio.run(run())


# ---------------------------------------------------------------------------
# measurement 4: a slow reader

def _read(sock, count):
    got = 0
    with contextlib.suppress(OSError):
        while got < count:
            chunk = sock.recv(256 * KiB)
            if not chunk:
                break
            got += len(chunk)
    return got


def measure_slow(setup, args, rss, window):
    """
    C{args.slow_readers} users each stall a download at once, so that the
    per-user figure (growth / users) is less at the mercy of the allocator
    reusing memory it already holds.
    """
    socks = setup.socks["AnyProxy"]
    conf = setup.write_proxychains("AnyProxy", socks)
    users = args.slow_readers
    rounds = []
    for r in range(args.rounds):
        log("slow reader round %d/%d (%d users stop reading)", r + 1, args.rounds, users)
        solo = iperf(setup, conf, args.seconds, True, args.omit)
        before = rss.settle()
        readers = []
        try:
            for _ in range(users):
                reader = socks_connect(socks, LOOPBACK, setup.ports["source"], rcvbuf=64 * KiB)
                readers.append(reader)
                if _read(reader, 4 * MiB) < 4 * MiB:  # it flows ...
                    raise BenchError("the slow reader's download did not start")
            # ... and now these users stop reading.
            with PeakSampler(rss) as peak:
                stalled = rss.settle(quiet=64 * KiB, limit=10)
                meanwhile = iperf(setup, conf, args.seconds, True, args.omit)
            after = rss.sample()
            # The stalled streams must still work once they read again.
            for reader in readers:
                reader.settimeout(10)
            resumed = sum(_read(reader, 4 * MiB) >= 4 * MiB for reader in readers)
        finally:
            for reader in readers:
                reader.close()
        row = {"solo": solo, "meanwhile": meanwhile, "before": before, "stalled": stalled,
               "after": after, "peak": dict(peak.peak), "users": users, "resumed": resumed}
        for side in ("gateway", "client"):
            # What a stalled user costs: settled RSS once they are stuck, before
            # the other stream starts (whose own buffers would count otherwise).
            row[side + "_growth"] = (stalled[side] - before[side]) / users
            # Informative: the highest RSS while the other stream ran as well.
            row[side + "_peak_growth"] = (peak.peak[side] - before[side]) / users
        log("  solo %s, meanwhile %s Mbit/s; per stalled user: gateway %.2f MiB, client %.2f MiB "
            "(peak with the other stream %.2f / %.2f); %d/%d read again",
            _fmt(solo), _fmt(meanwhile), row["gateway_growth"] / MiB, row["client_growth"] / MiB,
            row["gateway_peak_growth"] / MiB, row["client_peak_growth"] / MiB, resumed, users)
        rounds.append(row)
        time.sleep(1)
    # One more solo run, so that every stalled run has a solo run on each side.
    extra_solo = iperf(setup, conf, args.seconds, True, args.omit)
    log("  solo %s", _fmt(extra_solo))
    return {"rounds": rounds, "window": window, "extra_solo": extra_solo, "users": users}


def _fmt(value, pattern="%.0f"):
    return "n/a" if value is None else pattern % value


# ---------------------------------------------------------------------------
# measurement 5: churn

async def _churn(proxy_port, echo_port, count, parallel=50):
    sem = asyncio.Semaphore(parallel)
    failures = []

    async def one(i):
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(socks_open(proxy_port, LOOPBACK, echo_port), 30)
                try:
                    message = b"churn %d\n" % i
                    writer.write(message)
                    if await asyncio.wait_for(reader.readexactly(len(message)), 30) != message:
                        failures.append("bad echo")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, BenchError) as e:
                failures.append(repr(e))

    await asyncio.gather(*(one(i) for i in range(count)))
    return failures


def measure_churn(setup, args, rss):
    samples = [rss.settle()]
    failures = 0
    first_errors = []
    rates = []
    for b in range(args.churn_batches):
        t0 = time.time()
        errors = asyncio.run(_churn(setup.socks["AnyProxy"], setup.ports["echo"], args.churn))
        rates.append(args.churn / (time.time() - t0))
        failures += len(errors)
        first_errors += errors[:3]
        time.sleep(1)
        samples.append(rss.settle())
        log("churn batch %d/%d: %d streams, %.0f/s, %d failed; RSS gateway %.1f MiB, client %.1f MiB, "
            "fds %d/%d", b + 1, args.churn_batches, args.churn, rates[-1], len(errors),
            samples[-1]["gateway"] / MiB, samples[-1]["client"] / MiB,
            samples[-1]["gateway_fds"], samples[-1]["client_fds"])
    return {"per_batch": args.churn, "samples": samples, "failures": failures,
            "errors": first_errors[:5], "rates": rates}


# ---------------------------------------------------------------------------
# measurement 6: UDP

def udp_pingpong(path, seconds, size=UDP_PING_SIZE, timeout=UDP_LOSS_TIMEOUT):
    """One datagram at a time: send, wait for its echo (or C{timeout}: lost), repeat."""
    sock, header, address = path.sock, path.header, path.address
    offset, expected = len(header), len(header) + size
    pad = b"\x5a" * (size - UDP_SEQ.size)
    sock.settimeout(timeout)
    seq = done = lost = late = bad = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        sock.sendto(header + UDP_SEQ.pack(seq) + pad, address)
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                lost += 1
                if not path.alive():
                    raise BenchError("the proxy ended the UDP association")
                break
            if len(data) != expected or not data.startswith(header):
                bad += 1
            elif UDP_SEQ.unpack_from(data, offset)[0] == seq:
                done += 1
                break
            else:
                late += 1  # to an earlier datagram; ours may still come
        seq += 1
    elapsed = time.monotonic() - start
    return {"rate": done / elapsed, "sent": seq, "lost": lost, "late": late, "bad": bad, "seconds": elapsed}


def udp_burst(path, seconds, window, size=UDP_BURST_SIZE, timeout=UDP_LOSS_TIMEOUT):
    """
    Keep C{window} datagrams in flight for C{seconds}: a new one goes out for
    every answer, and for every datagram unanswered after C{timeout} (lost;
    an answer after that counts as late).  The rate counts the answers that
    came within C{seconds}; then the last datagrams get C{timeout} to come back.
    """
    sock, header, address = path.sock, path.header, path.address
    offset, expected = len(header), len(header) + size
    pad = b"\xa5" * (size - UDP_SEQ.size)
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if path.control is not None:
        poller.register(path.control, select.POLLIN)  # readable: the proxy closed it
    flying = collections.OrderedDict()  # seq -> when sent, oldest first
    seq = answered = lost = late = bad = 0
    counted = elapsed = None
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now < end:
            while len(flying) < window:
                try:
                    sock.sendto(header + UDP_SEQ.pack(seq) + pad, address)
                except (BlockingIOError, InterruptedError):
                    break  # send buffer full: answers first
                flying[seq] = now
                seq += 1
        elif counted is None:
            counted, elapsed = answered, now - start
        while flying:
            oldest = next(iter(flying.values()))
            if now - oldest < timeout:
                break
            flying.popitem(last=False)
            lost += 1
        if counted is not None and not flying:
            break
        if counted is not None:  # the last ones: until the oldest is due
            wait = next(iter(flying.values())) + timeout - now
        elif len(flying) >= window:  # for an answer, or until the oldest is due or the end
            wait = min(next(iter(flying.values())) + timeout, end) - now
        else:  # the send buffer was full
            wait = 0.001
        for fd, _ in poller.poll(max(0.0, wait) * 1000):
            if fd != sock.fileno():
                if not path.alive():
                    raise BenchError("the proxy ended the UDP association")
                continue
            while True:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                if len(data) != expected or not data.startswith(header):
                    bad += 1
                elif flying.pop(UDP_SEQ.unpack_from(data, offset)[0], None) is None:
                    late += 1
                else:
                    answered += 1
    return {"rate": counted / elapsed, "mbps": counted * size * 8 / elapsed / 1e6, "sent": seq,
            "lost": lost, "late": late, "bad": bad, "seconds": elapsed}


def measure_udp(setup, args):
    paths = {"direct (no proxy)": None, "AnyProxy": setup.socks["AnyProxy"]}
    runs = {(name, kind): [] for name in paths for kind in ("pingpong", "burst")}
    for r in range(args.rounds):
        log("udp round %d/%d (%ds per run; ping-pong %d B; burst %d B, %d in flight)", r + 1, args.rounds,
            args.seconds, UDP_PING_SIZE, UDP_BURST_SIZE, args.udp_window)
        for name, proxy in paths.items():
            # A new association per path and round, used by both runs.
            try:
                path = retry("UDP echo via " + name, lambda: open_udp_path(setup.ports["udp_echo"], proxy),
                             timeout=15)
            except BenchError as e:
                log("  %-24s failed: %s", name, e)
                runs[(name, "pingpong")].append(None)
                runs[(name, "burst")].append(None)
                continue
            with path:
                for kind in ("pingpong", "burst"):
                    try:
                        if kind == "pingpong":
                            result = udp_pingpong(path, args.seconds)
                        else:
                            result = udp_burst(path, args.seconds, args.udp_window)
                    except (OSError, BenchError) as e:
                        log("  %-24s %-9s failed: %s", name, kind, e)
                        result = None
                    else:
                        log("  %-24s %-9s %8.0f %s%s; lost %d of %d%s%s", name, kind, result["rate"],
                            "round trips/s" if kind == "pingpong" else "datagrams/s",
                            " (%.0f Mbit/s)" % result["mbps"] if "mbps" in result else "",
                            result["lost"], result["sent"],
                            ", %d late" % result["late"] if result["late"] else "",
                            ", %d bad" % result["bad"] if result["bad"] else "")
                    runs[(name, kind)].append(result)
    return {"runs": runs, "paths": list(paths), "window": args.udp_window}


def udp_lost(results):
    """(lost, sent) over the runs that finished."""
    done = [x for x in results if x]
    return sum(x["lost"] for x in done), sum(x["sent"] for x in done)


def udp_loss(results):
    """Datagrams lost over every run that finished, as text."""
    done = [x for x in results if x]
    lost, sent = udp_lost(results)
    text = "lost %s%% (%s of %s)" % (_fmt(100 * lost / sent if sent else None, "%.2g"), num(lost), num(sent))
    bad = sum(x["bad"] for x in done)
    if bad:
        text += ", %d malformed" % bad
    if len(done) < len(results):
        text += ", %d of %d runs failed" % (len(results) - len(done), len(results))
    return text


# ---------------------------------------------------------------------------
# the report

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return None if a is None or not b else a / b


def check(value, target, higher=True):
    if value is None:
        return "n/a"
    return "yes" if (value >= target if higher else value <= target) else "**no**"


def num(value, pattern="{:,.0f}"):
    return "n/a" if value is None else pattern.format(value)


def build_rows(results, window):
    """(measurement, path or figure, result, AnyProxy/peer, target, met) rows."""
    rows = []
    bulk = results.get("bulk")
    if bulk:
        for direction in ("upload", "download"):
            ours = median(bulk["runs"][("AnyProxy", direction)])
            for name in bulk["paths"]:
                value = median(bulk["runs"][(name, direction)])
                label = "1 bulk %s, Mbit/s" % direction
                if name == "AnyProxy":
                    rows.append((label, "**AnyProxy** (SOCKS5 → gateway → wss → client)", num(value), "", "", ""))
                    continue
                r = ratio(ours, value)
                target = {"OpenSSH -R": TARGET_VS_SSH, "microsocks": TARGET_VS_MICROSOCKS,
                          "pproxy": TARGET_VS_PPROXY, "OpenSSH -R aes128-gcm": STRETCH_VS_SSH_GCM}.get(name)
                rows.append((label, name, num(value), num(r, "{:.2f}"),
                             "" if target is None else ("≥ %.2g" % target) + (" (stretch)" if "gcm" in name else ""),
                             "" if target is None else check(r, target)))
    http = results.get("http")
    if http:
        ours = median([x["rps"] for x in http["runs"]["AnyProxy"]])
        theirs = median([x["rps"] for x in http["runs"]["pproxy"]])
        for name, value in (("AnyProxy", ours), ("pproxy", theirs)):
            ok = min(x["ok"] for x in http["runs"][name])
            r = ratio(ours, theirs)
            rows.append(("2 HTTP new conn/request, req/s", "%s (lowest share of 200s: %.2f%%)" % (name, 100 * ok),
                         num(value), "" if name == "AnyProxy" else num(r, "{:.2f}"),
                         "≥ 1.0, all 200" if name == "pproxy" else "all 200",
                         (check(r, TARGET_HTTP_VS_PPROXY) if name == "pproxy" else
                          ("yes" if ok == 1.0 else "**no**"))))
        if http["runs"].get(NO_REUSE):
            value = median([x["rps"] for x in http["runs"][NO_REUSE]])
            ok = min(x["ok"] for x in http["runs"][NO_REUSE])
            rows.append(("2 HTTP new conn/request, req/s",
                         "%s, for comparison (lowest share of 200s: %.2f%%); ratio: / pproxy"
                         % (NO_REUSE, 100 * ok), num(value), num(ratio(value, theirs), "{:.2f}"),
                         "", ""))
        connect = http.get("connect")
        if connect:
            ours = median([x["rate"] for x in connect["AnyProxy"]])
            for name in ("AnyProxy", "pproxy"):
                value = median([x["rate"] for x in connect[name]])
                failed = sum(x["failed"] for x in connect[name])
                rows.append(("2 CONNECT, a new tunnel each (as for https), per s",
                             "%s (failed: %d)" % (name, failed), num(value),
                             "" if name == "AnyProxy" else num(ratio(ours, value), "{:.2f}"),
                             "", ""))
    idle = results.get("idle")
    if idle:
        grow = idle["after_use"]["total"] - idle["before"]["total"]
        per = grow / idle["count"] / KiB
        rows.append(("3 idle streams", "%d streams opened / usable" % idle["count"],
                     "%d / %d" % (idle["opened"], idle["usable"]), "", "all usable",
                     "yes" if idle["usable"] == idle["count"] else "**no**"))
        for side in ("gateway", "client"):
            rows.append(("3 idle streams", "%s RSS before → after, MiB" % side,
                         "%.1f → %.1f" % (idle["before"][side] / MiB, idle["after_use"][side] / MiB), "", "", ""))
        rows.append(("3 idle streams", "KiB per stream (gateway + client)", num(per, "{:.1f}"), "",
                     "≤ %d" % TARGET_KIB_PER_STREAM, check(per, TARGET_KIB_PER_STREAM, higher=False)))
    slow = results.get("slow")
    if slow:
        rounds = slow["rounds"]
        limit = 1.5 * window
        for side in ("gateway", "client"):
            g = max(r[side + "_growth"] for r in rounds)
            rows.append(("4 slow reader", "%s RSS growth per stalled user (largest of the rounds), MiB" % side,
                         num(g / MiB, "{:.2f}"),
                         "", "≈ 1 window (%.2g MiB), ≤ %.3g" % (window / MiB, limit / MiB),
                         check(g, limit, higher=False)))
        solo = median([r["solo"] for r in rounds] + [slow.get("extra_solo")])
        meanwhile = median([r["meanwhile"] for r in rounds])
        rows.append(("4 slow reader", "other stream download, solo, Mbit/s", num(solo), "", "", ""))
        r = ratio(meanwhile, solo)
        rows.append(("4 slow reader", "other stream with %d users stalled, Mbit/s (ratio: / solo)" % slow["users"],
                     num(meanwhile),
                     num(r, "{:.2f}"), "≥ %.2g" % TARGET_OTHER_STREAM, check(r, TARGET_OTHER_STREAM)))
        resumed, stalled = sum(r["resumed"] for r in rounds), sum(r["users"] for r in rounds)
        rows.append(("4 slow reader", "stalled streams that read again afterwards",
                     "%d / %d" % (resumed, stalled), "", "all", "yes" if resumed == stalled else "**no**"))
    churn = results.get("churn")
    if churn:
        s = churn["samples"]
        total = churn["per_batch"] * (len(s) - 1)
        rows.append(("5 churn", "%d short streams in %d batches, failed" % (total, len(s) - 1),
                     str(churn["failures"]), "", "0", "yes" if churn["failures"] == 0 else "**no**"))
        for side in ("gateway", "client"):
            rows.append(("5 churn", "%s RSS per batch, MiB" % side,
                         " → ".join("%.1f" % (x[side] / MiB) for x in s), "", "", ""))
            rows.append(("5 churn", "%s open fds per batch" % side,
                         " → ".join(str(x[side + "_fds"]) for x in s), "", "back to start",
                         "yes" if s[-1][side + "_fds"] <= s[0][side + "_fds"] + 2 else "**no**"))
        last = s[-1]["total"] - s[-2]["total"] if len(s) > 2 else s[-1]["total"] - s[0]["total"]
        rows.append(("5 churn", "gateway + client RSS change over the last batch, MiB",
                     num(last / MiB, "{:+.2f}"), "", "flat (≤ %+.0f)" % (CHURN_SLACK / MiB),
                     check(last, CHURN_SLACK, higher=False)))
    udp = results.get("udp")
    if udp:
        for kind, key, label in (
                ("pingpong", "rate", "6 UDP ping-pong %d B, round trips/s" % UDP_PING_SIZE),
                ("burst", "rate", "6 UDP burst %s B, %d in flight, datagrams/s" % (num(UDP_BURST_SIZE),
                                                                                  udp["window"])),
                ("burst", "mbps", "6 UDP burst %s B, %d in flight, Mbit/s" % (num(UDP_BURST_SIZE),
                                                                             udp["window"]))):
            ours = median([x[key] for x in udp["runs"][("AnyProxy", kind)] if x])
            for name in udp["paths"]:
                value = median([x[key] for x in udp["runs"][(name, kind)] if x])
                loss = "" if key == "mbps" else "; " + udp_loss(udp["runs"][(name, kind)])
                if name == "AnyProxy":
                    rows.append((label, "**AnyProxy** (SOCKS5 UDP ASSOCIATE → gateway → wss → client)" + loss,
                                 num(value), "", "", ""))
                else:
                    rows.append((label, name + loss, num(value), num(ratio(ours, value), "{:.2f}"), "", ""))
    return rows


def markdown_table(rows):
    header = ("measurement", "path / figure", "result", "AnyProxy / peer", "target", "met")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def version(dist):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(dist)
    return "?"


def command_output(argv):
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip()
        return text.splitlines()[0] if text else "?"
    return "?"


def machine():
    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else platform.processor() or "?"
    distro = "?"
    with contextlib.suppress(OSError):
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]+)', f.read(), re.M)
            distro = m.group(1) if m else "?"
    try:
        from OpenSSL import SSL
        openssl = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
    except Exception:  # noqa: BLE001 - informative only
        openssl = "?"
    commit = command_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "--no-optional-locks", "-C", ROOT, "status", "--porcelain",
                            "--untracked-files=no", "--", "anyproxy"])
    return [
        ("host", socket.gethostname()),
        ("CPU", "%s, %d cores (%d usable)" % (cpu, psutil.cpu_count(), len(os.sched_getaffinity(0)))),
        ("memory", "%.1f GiB" % (psutil.virtual_memory().total / 2 ** 30)),
        ("OS / kernel", "%s / Linux %s" % (distro, platform.release())),
        ("Python", platform.python_version()),
        ("Twisted / Autobahn / pyOpenSSL", "%s / %s / %s" % (version("twisted"), version("autobahn"),
                                                             version("pyopenssl"))),
        ("OpenSSL (pyOpenSSL)", openssl),
        ("AnyProxy checkout", "%s%s" % (commit, " + local changes in anyproxy/" if dirty not in ("", "?") else "")),
        ("peers", "%s; pproxy %s; microsocks %s; %s; hey %s; proxychains4 %s" % (
            command_output(["ssh", "-V"]), version("pproxy"), deb_version("microsocks"),
            command_output(["iperf3", "--version"]).split(" (")[0], deb_version("hey"),
            deb_version("proxychains4"))),
    ]


def deb_version(package):
    out = command_output(["dpkg-query", "-W", "-f=${Version}", package])
    return out if out and "no packages" not in out else "?"


def write_report(results, args, window, started, out_dir, chart_path):
    rows = build_rows(results, window)
    table = markdown_table(rows)
    info = machine()
    when = started.strftime("%Y-%m-%d %H:%M")
    settings = ("rounds %d; iperf3 %ds per run (+%ds omitted); hey %d requests, %d concurrent, no keep-alive; "
                "%d idle streams; %d slow readers; churn %d × %d streams; UDP %ds per run, %d B ping-pong, "
                "%d B burst with %d in flight, lost after %g s without an answer; AnyProxy log level %s, "
                "replicas 1, DEFAULT_WINDOW %d KiB" % (
                    args.rounds, args.seconds, args.omit, args.requests, args.concurrency, args.streams,
                    args.slow_readers, args.churn_batches, args.churn, args.seconds, UDP_PING_SIZE,
                    UDP_BURST_SIZE, args.udp_window, UDP_LOSS_TIMEOUT, args.anyproxy_log_level, window // KiB))
    md = ["# AnyProxy benchmarks, %s%s" % (when, " (--quick smoke test)" if args.quick else ""),
          "",
          "Produced by `benchmarks/run%s` (see benchmarks/README.md). Medians of the rounds; "
          "ratios are AnyProxy / peer from this one run. All on loopback, one machine: "
          "compare only figures from the same run." % ("".join(" " + a for a in sys.argv[1:])),
          "",
          table,
          "",
          "Settings: " + settings + ".",
          "",
          "## Machine",
          ""]
    md += ["- %s: %s" % kv for kv in info]
    md += ["", "## Raw figures", ""]
    bulk = results.get("bulk")
    if bulk:
        md.append("Bulk, Mbit/s per round:")
        md.append("")
        for (name, direction), values in bulk["runs"].items():
            md.append("- %s %s: %s" % (name, direction, ", ".join(_fmt(v) for v in values)))
        md.append("")
    http = results.get("http")
    if http:
        md.append("HTTP, req/s per round (share of 200s; errors reported by hey):")
        md.append("")
        for name, runs in http["runs"].items():
            md.append("- %s: %s" % (name, ", ".join("%.0f (%.2f%%)" % (x["rps"], 100 * x["ok"]) for x in runs)))
            errors = [e for x in runs for e in x["errors"]]
            if errors:
                md.append("  - errors: %s" % "; ".join("%d× %s" % e for e in errors[:5]))
        for name, runs in (http.get("connect") or {}).items():
            md.append("- CONNECT via %s, per s: %s" % (
                name, ", ".join("%.0f (%d failed)" % (x["rate"], x["failed"]) for x in runs)))
        md.append("")
    idle = results.get("idle")
    if idle:
        md.append("Idle streams: opened in %.1fs; %d open failures%s; RSS after closing them: gateway "
                  "%.1f MiB, client %.1f MiB (fds %d / %d)." % (
                      idle["open_seconds"], idle["error_count"],
                      " (first: %s)" % idle["errors"][0] if idle["errors"] else "",
                      idle["after_close"]["gateway"] / MiB, idle["after_close"]["client"] / MiB,
                      idle["after_close"]["gateway_fds"], idle["after_close"]["client_fds"]))
        md.append("")
    slow = results.get("slow")
    if slow:
        md.append("Slow reader, per round: solo / meanwhile Mbit/s; RSS growth per stalled user, gateway / "
                  "client MiB, once stalled (and at the peak while the other stream also ran):")
        md.append("")
        for r in slow["rounds"]:
            md.append("- %s / %s; %.2f / %.2f (%.2f / %.2f)" % (
                _fmt(r["solo"]), _fmt(r["meanwhile"]), r["gateway_growth"] / MiB, r["client_growth"] / MiB,
                r["gateway_peak_growth"] / MiB, r["client_peak_growth"] / MiB))
        md.append("- closing solo run: %s" % _fmt(slow.get("extra_solo")))
        md.append("")
    churn = results.get("churn")
    if churn:
        md.append("Churn: %s streams/s per batch%s." % (
            ", ".join("%.0f" % x for x in churn["rates"]),
            "; first errors: %s" % "; ".join(churn["errors"]) if churn["errors"] else ""))
        md.append("")
    udp = results.get("udp")
    if udp:
        md.append("UDP, per round: ping-pong round trips/s; burst datagrams/s and Mbit/s (lost / sent; "
                  "lost: no answer within %g s; late: answers after that, if any):" % UDP_LOSS_TIMEOUT)
        md.append("")
        for name in udp["paths"]:
            pingpong = ["failed" if x is None else "%.0f (%d / %d%s)" % (
                x["rate"], x["lost"], x["sent"], ", %d late" % x["late"] if x["late"] else "")
                for x in udp["runs"][(name, "pingpong")]]
            burst = ["failed" if x is None else "%.0f, %.0f Mbit/s (%d / %d%s)" % (
                x["rate"], x["mbps"], x["lost"], x["sent"], ", %d late" % x["late"] if x["late"] else "")
                for x in udp["runs"][(name, "burst")]]
            md.append("- %s: ping-pong %s; burst %s" % (name, ", ".join(pingpong), "; ".join(burst)))
        md.append("")
    if chart_path:
        md += ["![chart](%s)" % os.path.basename(chart_path), ""]
    text = "\n".join(md)

    os.makedirs(out_dir, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname().split(".")[0]).strip("-") or "host"
    dated = os.path.join(out_dir, "%s-%s.md" % (started.strftime("%Y-%m-%d"), host))
    with open(dated, "w") as f:
        f.write(text)
    shutil.copyfile(dated, os.path.join(out_dir, "latest.md"))
    with open(os.path.join(out_dir, "latest.json"), "w") as f:
        json.dump(_jsonable(results), f, indent=1, default=str)
    print()
    print(table)
    print()
    print("\n".join("%s: %s" % kv for kv in info))
    print()
    print("wrote %s, %s" % (os.path.relpath(dated), os.path.relpath(os.path.join(out_dir, "latest.md"))))


def _jsonable(value):
    if isinstance(value, dict):
        return {(" / ".join(k) if isinstance(k, tuple) else k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def chart(results, window, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(14, 13.5))
    fig.suptitle(title)
    ax = axes[0][0]
    bulk = results.get("bulk")
    if bulk:
        # The direct (no proxy) reference would dwarf every bar: it goes in the title.
        names = [n for n in bulk["paths"] if n != "direct (no proxy)"]
        width = 0.38
        for i, direction in enumerate(("upload", "download")):
            values = [median(bulk["runs"][(n, direction)]) or 0 for n in names]
            xs = [x + (i - 0.5) * width for x in range(len(names))]
            bars = ax.bar(xs, values, width, label=direction,
                          color=["#d62728" if n == "AnyProxy" else ("#1f77b4", "#6baed6")[i] for n in names])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace(" (no proxy)", "\n(no proxy)").replace(" aes", "\naes") for n in names],
                           fontsize=8)
        ax.set_ylabel("Mbit/s (median)")
        ax.margins(y=0.12)
        ax.legend(handles=[matplotlib.patches.Patch(color="#1f77b4", label="upload (left)"),
                           matplotlib.patches.Patch(color="#6baed6", label="download (right)"),
                           matplotlib.patches.Patch(color="#d62728", label="AnyProxy")], fontsize=8)
        direct = [median(bulk["runs"].get(("direct (no proxy)", d), [])) for d in ("upload", "download")]
        ax.set_title("1. bulk TCP, iperf3 through proxychains4 (SOCKS5)\n"
                     "direct, no proxy: %s / %s Mbit/s" % (_fmt(direct[0]), _fmt(direct[1])))
    else:
        ax.text(0.5, 0.5, "bulk: not run", ha="center")
    ax = axes[0][1]
    http = results.get("http")
    if http:
        names = list(http["runs"])
        values = [median([x["rps"] for x in http["runs"][n]]) for n in names]
        bars = ax.bar([n.replace(", ", ",\n") for n in names], values,
                      color=["#d62728" if n == "AnyProxy" else "#ff9896" if n == NO_REUSE
                             else "#1f77b4" for n in names])
        ax.bar_label(bars, labels=["%.0f req/s\n%.2f%% 200" % (v, 100 * min(x["ok"] for x in http["runs"][n]))
                                   for n, v in zip(names, values)], fontsize=8)
        ax.set_ylabel("requests/s (median)")
        ax.margins(y=0.15)
        ax.set_title("2. HTTP proxy, new connection per request")
    else:
        ax.text(0.5, 0.5, "http: not run", ha="center")
    ax = axes[1][0]
    idle = results.get("idle")
    if idle:
        labels = ["before", "after open", "after use", "after close"]
        keys = ["before", "after_open", "after_use", "after_close"]
        for i, side in enumerate(("gateway", "client")):
            xs = [x + (i - 0.5) * 0.38 for x in range(len(keys))]
            bars = ax.bar(xs, [idle[k][side] / MiB for k in keys], 0.38, label=side)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels)
        ax.set_ylabel("RSS, MiB")
        per = (idle["after_use"]["total"] - idle["before"]["total"]) / idle["count"] / KiB
        ax.set_title("3. %d idle streams: %.1f KiB/stream (target ≤ %d)" % (idle["count"], per,
                                                                          TARGET_KIB_PER_STREAM))
        ax.legend()
    else:
        ax.text(0.5, 0.5, "idle: not run", ha="center")
    ax = axes[1][1]
    slow, churn = results.get("slow"), results.get("churn")
    labels, gw, cl = [], [], []
    if slow:
        labels.append("slow reader: growth\nper stalled user")
        gw.append(max(r["gateway_growth"] for r in slow["rounds"]) / MiB)
        cl.append(max(r["client_growth"] for r in slow["rounds"]) / MiB)
    if churn:
        s = churn["samples"]
        labels.append("churn: last\nbatch change")
        ref = s[-2] if len(s) > 2 else s[0]
        gw.append((s[-1]["gateway"] - ref["gateway"]) / MiB)
        cl.append((s[-1]["client"] - ref["client"]) / MiB)
    if labels:
        for i, (side, values) in enumerate((("gateway", gw), ("client", cl))):
            xs = [x + (i - 0.5) * 0.38 for x in range(len(labels))]
            bars = ax.bar(xs, values, 0.38, label=side)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(window / MiB, color="grey", linestyle="--", linewidth=1, label="one window")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels)
        ax.set_ylabel("RSS change, MiB")
        title = "4./5. memory under a stalled reader and churn"
        if slow:
            title += "\nother stream meanwhile: %.0f%% of solo" % (
                100 * (ratio(median([r["meanwhile"] for r in slow["rounds"]]),
                             median([r["solo"] for r in slow["rounds"]] + [slow.get("extra_solo")])) or 0))
        ax.set_title(title)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "slow, churn: not run", ha="center")
    udp = results.get("udp")
    for ax, kind, key, unit in ((axes[2][0], "pingpong", "rate", "round trips/s"),
                                (axes[2][1], "burst", "mbps", "Mbit/s")):
        if not udp:
            ax.text(0.5, 0.5, "udp: not run", ha="center")
            continue
        names = udp["paths"]
        values = [median([x[key] for x in udp["runs"][(n, kind)] if x]) for n in names]
        labels = []
        for n, v in zip(names, values):
            lost, sent = udp_lost(udp["runs"][(n, kind)])
            label = "%s %s" % (_fmt(v), unit)
            if kind == "burst":
                label += "\n%s datagrams/s" % _fmt(median([x["rate"] for x in udp["runs"][(n, kind)] if x]))
            labels.append(label + "\nlost %s%%" % _fmt(100 * lost / sent if sent else None, "%.2g"))
        bars = ax.bar(names, [v or 0 for v in values],
                      color=["#d62728" if n == "AnyProxy" else "#1f77b4" for n in names])
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_ylabel("%s (median)" % unit)
        ax.margins(y=0.2)
        r = ratio(values[names.index("AnyProxy")], values[names.index("direct (no proxy)")])
        ax.set_title("6. UDP echo, %s: AnyProxy %s× direct" % (
            "ping-pong %d B" % UDP_PING_SIZE if kind == "pingpong" else
            "burst %s B, %d in flight" % (num(UDP_BURST_SIZE), udp["window"]), _fmt(r, "%.2f")))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description="AnyProxy benchmarks against OpenSSH, pproxy and microsocks.")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, short runs, fewer streams")
    parser.add_argument("--only", default="", help="comma-separated measurements to run: " + ", ".join(MEASUREMENTS))
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick: 1)")
    parser.add_argument("--seconds", type=int, help="iperf3 and UDP run length (default 5; --quick: 2)")
    parser.add_argument("--omit", type=int, help="iperf3 warm-up seconds left out (default 1; --quick: 0)")
    parser.add_argument("--requests", type=int, help="hey requests per run (default 5000; --quick: 1000)")
    parser.add_argument("--concurrency", type=int, default=20, help="hey concurrency (default 20)")
    parser.add_argument("--streams", type=int, help="idle streams (default 10000; --quick: 1000)")
    parser.add_argument("--churn", type=int, help="streams per churn batch (default 3000; --quick: 500)")
    parser.add_argument("--churn-batches", type=int, help="churn batches (default 3; --quick: 2)")
    parser.add_argument("--slow-readers", type=int, default=4,
                        help="users that stall a download at once in the slow measurement (default 4)")
    parser.add_argument("--udp-window", type=int, default=UDP_WINDOW,
                        help="datagrams in flight in the UDP burst (default %d)" % UDP_WINDOW)
    parser.add_argument("--anyproxy-log-level", default="warn", choices=("debug", "info", "warn", "error"),
                        help="log.level for the gateway and client (default warn: no per-stream log lines)")
    parser.add_argument("--out", help="results directory (default benchmarks/results for full runs, "
                                      "benchmarks/results/scratch for --quick and --only)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = parser.parse_args()
    quick = args.quick
    for name, full, short in (("rounds", 3, 1), ("seconds", 5, 2), ("omit", 1, 0), ("requests", 5000, 1000),
                              ("streams", 10000, 1000), ("churn", 3000, 500), ("churn_batches", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.rounds = max(1, args.rounds)
    args.churn_batches = max(1, args.churn_batches)
    args.slow_readers = max(1, args.slow_readers)
    args.udp_window = max(1, args.udp_window)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    for name in only:
        if name not in MEASUREMENTS:
            parser.error("--only: unknown measurement %r (choose from %s)" % (name, ", ".join(MEASUREMENTS)))
    args.selected = [m for m in RUN_ORDER if not only or m in only]
    if args.out is None:
        args.out = RESULTS if not quick and not only else os.path.join(RESULTS, "scratch")
    return args


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main():
    args = parse_args()
    # Explicitly: a shell starts background jobs with SIGINT ignored, and
    # Python would then never raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = datetime.datetime.now()
    window = default_window()
    limit = raise_nofile(args.streams * 2 + 2000)
    if "idle" in args.selected and limit < args.streams + 1000:
        log("RLIMIT_NOFILE is %d: lowering --streams from %d to %d", limit, args.streams, limit - 1000)
        args.streams = limit - 1000
    for tool in ("iperf3", "proxychains4", "microsocks", "hey", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise SystemExit("%s is missing: run benchmarks/run, which installs it" % tool)
    harness = Harness(keep=args.keep)
    failed = True
    try:
        setup = Setup(harness, args, args.selected)
        log("starting AnyProxy and peers in %s", harness.work)
        setup.start()
        rss = Rss({"gateway": setup.gateway.pid, "client": setup.client.pid})
        results = {}
        for name in args.selected:
            harness.check_alive("gateway", "client")
            if name == "bulk":
                results[name] = measure_bulk(setup, args)
            elif name == "http":
                results[name] = measure_http(setup, args)
            elif name == "idle":
                results[name] = measure_idle(setup, args, rss)
            elif name == "slow":
                results[name] = measure_slow(setup, args, rss, window)
            elif name == "churn":
                results[name] = measure_churn(setup, args, rss)
            elif name == "udp":
                results[name] = measure_udp(setup, args)
        harness.check_alive("gateway", "client")
        os.makedirs(args.out, exist_ok=True)
        chart_path = os.path.join(args.out, "latest.png")
        chart(results, window, chart_path, "AnyProxy benchmarks, %s, %s" % (
            started.strftime("%Y-%m-%d %H:%M"), socket.gethostname()))
        write_report(results, args, window, started, args.out, chart_path)
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
        harness.close(failed=failed)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
