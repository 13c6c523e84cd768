#!/usr/bin/env python3
"""
AnyProxy soak run: long mixed traffic, a reconnecting client, reloads and a
hostile client, while the RSS and open descriptors of the gateway and of a
steady client are sampled.  They must stay flat.

    .venv/bin/python benchmarks/soak.py                # 30 minutes: results/soak-latest.md
    .venv/bin/python benchmarks/soak.py --minutes 2    # quick check
    .venv/bin/python benchmarks/soak.py --help         # every option

Everything runs on 127.0.0.1 with free ports, in one temporary directory
(certificates from certs/generate.py, configs, logs), removed at the end
unless --keep.  Every process is stopped at the end, also on Ctrl-C, kill or
failure.  Needs psutil (benchmarks/run installs it into the venv); without it
RSS and descriptors are read from /proc.

What runs (benchmarks/README.md, "Soak", says how to read the report):

- the targets, in a child process (this file with --serve-targets): a TCP
  data service (download or upload N bytes of a known pattern, or echo), an
  HTTP server (GET /data/N/SEED answers N pattern bytes; keep-alive) and a
  UDP echo;
- the gateway and a steady client (real twistd processes, log.level info to
  files), both with metrics; the gateway with a status page;
- a second client, stopped (SIGTERM and SIGKILL in turn) and started again
  with a new client_id every --restart-every seconds (10);
- traffic, in threads, all verified byte for byte: HTTP proxy requests (a new
  connection each, and keep-alive), CONNECT tunnels through the HTTP proxy,
  SOCKS5 downloads, uploads and echoes (up to 5 MiB), users that hang up
  mid-transfer (half of them with a TCP reset), SOCKS5 UDP datagrams, and
  reads of the status API and both metrics pages;
- a reload every --reload-every seconds (60): the gateway's file gets a new
  password for the user "rotating" and max_conns_per_user toggled, the
  steady client's file a forbidden_hosts entry toggled; both get SIGHUP; the
  logs must say "reload applied", and the new password must work and the old
  one fail;
- a hostile client in a loop: wrong tunnel credentials, bad HELLOs, valid
  HELLOs followed by frames that break the protocol, garbage WebSocket
  frames, a ping flood without reading, malformed SOCKS5 and HTTP, and
  slowloris connections (1 byte per second) to the status page, both proxy
  ports and the tunnel port.  Its tunnels use the shared credential
  (gateway.auth_username) and group "default" (one action asks for another
  group, which must be refused).

RSS, descriptors and CPU time of the gateway and the steady client are
sampled every --sample-every seconds (10).  At the end of the warm-up, in the
middle and at the end the traffic pauses and the figures are taken quiet.
The report goes to benchmarks/results/soak-latest.md and .json (runs shorter
than 30 minutes: benchmarks/results/scratch/).  Exit status: 0 when flat (or
for a run under 10 minutes, too short for a verdict, that did not fail), 1
when not flat or a process died, 2 when the setup failed.
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import datetime
import glob
import hashlib
import http.client
import itertools
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from harness.processes import free_port  # benchmarks/ is sys.path[0] when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
LOOPBACK = "127.0.0.1"
MiB = 1024 * 1024
KiB = 1024

# The pattern every payload is cut from: the same bytes in the targets' process.
BLOCK = random.Random(20261206).randbytes(MiB + 4099)

USER, PASSWORD = "soak", "soak-password"               # both proxy listeners
TUNNEL_USER, TUNNEL_PASSWORD = "soak-tunnel", "soak-tunnel-password"   # gateway <- clients
STATUS_USER, STATUS_PASSWORD = "admin", "soak-status-password"
ROTATING = "rotating"                                   # gateway.users; new password each reload
FORBIDDEN_TOGGLE = "198.51.100.0/24"                    # TEST-NET-2: toggled on the steady client

# Verdict: RSS growth allowed over the last 20 minutes (scaled for shorter
# windows, never below RSS_FLOOR), and descriptors quiet end vs quiet start.
RSS_ALLOWED = 5 * MiB
RSS_WINDOW = 20 * 60
RSS_FLOOR = 1 * MiB
FD_SLACK = 5
CLIENT_STOP = "around a client stop"
HOSTILE_TUNNEL = "around a hostile tunnel"
JUDGED_MINUTES = 10        # a shorter run gets an indicative verdict only (and exits 0 unless it failed)
FULL_MINUTES = 30          # runs at least this long write to results/, shorter ones to scratch/

OP_TIMEOUT = 30.0          # every socket operation of the traffic
HOSTILE_TIMEOUT = 10.0     # how long a hostile action waits for an answer
SLOW_MAX = 45.0            # a slowloris connection gives up after this long


def log(msg, *args):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg % args if args else msg), flush=True)


class SoakError(Exception):
    pass


def pattern(n, seed):
    """C{n} bytes of the pattern, starting at offset C{seed}."""
    off = seed % len(BLOCK)
    out = BLOCK[off:off + n]
    while len(out) < n:
        out += BLOCK[:n - len(out)]
    return out


def pattern_chunks(n, seed, size=256 * KiB):
    data = pattern(n, seed)
    for i in range(0, n, size):
        yield data[i:i + size]


# ---------------------------------------------------------------------------
# the targets (a child process: this file with --serve-targets)

async def _data_connection(reader, writer):
    """TCP data service: "GET n seed", "PUT n" (answers the sha256) or "ECHO"."""
    try:
        line = await asyncio.wait_for(reader.readline(), 120)
        parts = line.split()
        if parts[:1] == [b"GET"]:
            for chunk in pattern_chunks(int(parts[1]), int(parts[2])):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 120)
        elif parts[:1] == [b"PUT"]:
            left, digest = int(parts[1]), hashlib.sha256()
            while left > 0:
                data = await asyncio.wait_for(reader.read(min(left, 256 * KiB)), 120)
                if not data:
                    return
                digest.update(data)
                left -= len(data)
            writer.write(digest.hexdigest().encode() + b"\n")
            await asyncio.wait_for(writer.drain(), 120)
        elif parts[:1] == [b"ECHO"]:
            while True:
                data = await asyncio.wait_for(reader.read(64 * KiB), 120)
                if not data:
                    break
                writer.write(data)
                await asyncio.wait_for(writer.drain(), 120)
    except (OSError, ValueError, IndexError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _http_connection(reader, writer):
    """HTTP/1.1: GET /data/N/SEED answers N pattern bytes, anything else "ok"; keep-alive."""
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
            lines = head.split(b"\r\n")
            method, path, version = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0") or 0)
            if length:
                await asyncio.wait_for(reader.readexactly(length), 120)
            close = headers.get(b"connection", b"").lower() == b"close" or version.strip() == b"HTTP/1.0"
            m = re.match(rb"^(?:http://[^/]+)?/data/(\d+)/(\d+)$", path)
            body = pattern(int(m.group(1)), int(m.group(2))) if m else b"ok"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n%s\r\n" % (len(body), b"Connection: close\r\n" if close else b""))
            if method != b"HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), 120)
            if close:
                break
    except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)

    def error_received(self, exc):
        pass


async def serve_targets(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    await asyncio.start_server(_data_connection, LOOPBACK, args.data, backlog=1024)
    await asyncio.start_server(_http_connection, LOOPBACK, args.http, backlog=1024)
    await loop.create_datagram_endpoint(_UdpEcho, local_addr=(LOOPBACK, args.udp))
    print("ready", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------
# processes

class Harness:
    """The temporary directory and every child process (each in its own session)."""

    def __init__(self, keep=False):
        self.work = tempfile.mkdtemp(prefix="anyproxy-soak-")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        self.keep = keep
        self.procs = {}
        self.lock = threading.Lock()
        self.closed = False

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def spawn(self, name, argv, env=None, cwd=None):
        if self.closed:
            raise SoakError("not starting %s: shutting down" % name)
        with open(os.path.join(self.logs, name + ".out"), "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd or self.work, start_new_session=True)
        with self.lock:
            self.procs[name] = proc
        return proc

    def twistd(self, name, plugin, config):
        env = dict(os.environ, PYTHONPATH=ROOT)
        return self.spawn(name, [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                                 "-n", "--pidfile=", plugin, "--config=" + config], env=env, cwd=ROOT)

    def alive(self, name):
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop(self, name, sig=signal.SIGTERM, timeout=10.0):
        with self.lock:
            proc = self.procs.pop(name, None)
        if proc is None:
            return None
        self._signal(proc, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(proc, signal.SIGKILL)
            proc.wait()
        self._signal(proc, signal.SIGKILL)  # anything left in its group
        return proc.returncode

    @staticmethod
    def _signal(proc, sig):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def tail(self, name, lines=20):
        """The last lines of a process's output and of its AnyProxy log."""
        out = []
        for suffix in (".out", ".log"):
            try:
                with open(os.path.join(self.logs, name + suffix), "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 64 * KiB))
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            out += ["    " + line for line in text.splitlines()[-lines:]]
        return "\n".join(out)

    def close(self):
        if self.closed:
            return
        self.closed = True
        with self.lock:
            procs = list(self.procs.values())
            self.procs.clear()
        for proc in reversed(procs):
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            self._signal(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if self.keep:
            print("kept %s" % self.work, file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def wait_port(port, timeout=30.0, check=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), 0.5).close()
            return
        except OSError:
            if check is not None:
                check()
            time.sleep(0.1)
    raise SoakError("nothing listens on %s:%d after %ds" % (LOOPBACK, port, timeout))


def load_generate():
    import importlib.util
    spec = importlib.util.spec_from_file_location("generate", os.path.join(ROOT, "certs", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LogCounter:
    """
    Counts a few strings in a log and its rotated files (twistd's LogFile renames
    name.log to name.log.1 and so on: a file keeps its inode), reading only what is new.
    """

    NEEDLES = (b"reload applied", b"reload refused")

    def __init__(self, path):
        self.path = path
        self.files = {}  # inode -> [bytes read, Counter]

    def count(self, needle):
        total = 0
        for path in glob.glob(self.path + "*"):
            try:
                with open(path, "rb") as f:
                    entry = self.files.setdefault(os.fstat(f.fileno()).st_ino, [0, collections.Counter()])
                    f.seek(entry[0])
                    data = f.read()
            except OSError:
                continue
            data = data[:data.rfind(b"\n") + 1]  # whole lines only
            entry[0] += len(data)
            for each in self.NEEDLES:
                entry[1][each] += data.count(each)
            total += entry[1][needle]
        return total


class ProcStats:
    """RSS, open descriptors and CPU seconds of one process (psutil, else /proc)."""

    def __init__(self, pid):
        self.pid = pid
        try:
            import psutil
            self.proc = psutil.Process(pid)
        except ImportError:
            self.proc = None

    def sample(self):
        if self.proc is not None:
            with self.proc.oneshot():
                times = self.proc.cpu_times()
                return {"rss": self.proc.memory_info().rss, "fds": self.proc.num_fds(),
                        "cpu": times.user + times.system}
        with open("/proc/%d/status" % self.pid) as f:
            rss = int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * KiB
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return {"rss": rss, "fds": len(os.listdir("/proc/%d/fd" % self.pid)), "cpu": cpu}


# ---------------------------------------------------------------------------
# bookkeeping shared by the threads

class Control:
    """Stop, and pause for quiet checkpoints: C{begin}/C{end} bracket every operation."""

    def __init__(self):
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.running = True
        self.inflight = 0

    def begin(self):
        with self.cond:
            while not self.running and not self.stop.is_set():
                self.cond.wait(0.5)
            if self.stop.is_set():
                return False
            self.inflight += 1
            return True

    def end(self):
        with self.cond:
            self.inflight -= 1
            self.cond.notify_all()

    def pausing(self):
        return not self.running or self.stop.is_set()

    def sleep(self, seconds):
        """False when the run is stopping."""
        return not self.stop.wait(seconds)

    def pause(self, timeout=60.0):
        """Let operations in flight finish; the number still in flight after C{timeout}."""
        deadline = time.time() + timeout
        with self.cond:
            self.running = False
            while self.inflight > 0 and time.time() < deadline:
                self.cond.wait(max(0.05, deadline - time.time()))
            return self.inflight

    def resume(self):
        with self.cond:
            self.running = True
            self.cond.notify_all()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = collections.Counter()
        self.bytes = collections.Counter()
        self.notes = collections.Counter()
        self.failures = []            # (kind, t0, t1, reason)
        # (cause, start, end): the reconnecting client being stopped, or a hostile tunnel
        # registered for group "default" (its HELLO) until the gateway dropped it.
        self.disruptions = []
        self.hostile = collections.defaultdict(collections.Counter)   # action -> outcome -> n
        self.hostile_unexpected = collections.defaultdict(collections.Counter)
        self.hostile_iterations = 0
        self.slowloris = collections.defaultdict(list)  # target -> [seconds until dropped or None]
        self.samples = []
        self.peaks = {}
        self.checkpoints = {}
        self.reloads = []
        self.restarts = []

    def success(self, kind, nbytes=0):
        with self.lock:
            self.ok[kind] += 1
            self.bytes[kind] += nbytes

    def failure(self, kind, t0, reason):
        with self.lock:
            self.failures.append((kind, t0, time.time(), reason))

    def disruption(self, cause, start, end):
        with self.lock:
            self.disruptions.append((cause, start, end))

    def note(self, what, n=1):
        with self.lock:
            self.notes[what] += n

    def hostile_outcome(self, action, outcome, expected):
        with self.lock:
            self.hostile[action][outcome] += 1
            if not expected:
                self.hostile_unexpected[action][outcome] += 1


def reason_of(exc):
    if isinstance(exc, socket.timeout):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "TLS: %s" % (exc.reason or exc.__class__.__name__)
    if isinstance(exc, (SoakError, http.client.HTTPException)):
        return ("%s: %s" % (exc.__class__.__name__, exc) if not isinstance(exc, SoakError) else str(exc))[:100]
    if isinstance(exc, OSError):
        return exc.__class__.__name__ + (" (errno %s)" % exc.errno if exc.errno else "")
    return ("%s: %s" % (exc.__class__.__name__, exc))[:100]


# ---------------------------------------------------------------------------
# clients: SOCKS5, HTTP, WebSocket

def recv_exact(sock, n):
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 256 * KiB))
        if not chunk:
            raise SoakError("closed by the proxy after %d of %d bytes" % (got, n))
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def socks_request(cmd, host, port):
    return b"\x05" + bytes([cmd]) + b"\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def socks_auth(sock, user, password):
    """Greeting and username/password; raises SoakError("auth refused") on a wrong login."""
    sock.sendall(b"\x05\x01\x02")
    answer = recv_exact(sock, 2)
    if answer != b"\x05\x02":
        raise SoakError("SOCKS5 method answer %r" % answer)
    u, p = user.encode(), password.encode()
    sock.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
    if recv_exact(sock, 2)[1] != 0:
        raise SoakError("auth refused")


def socks_reply(sock):
    head = recv_exact(sock, 5)
    if head[1] != 0:
        raise SoakError("SOCKS5 reply 0x%02x" % head[1])
    rest = {1: 4 + 2, 4: 16 + 2, 3: head[4] + 1 + 2}.get(head[3])
    if rest is None:
        raise SoakError("SOCKS5 reply address type %d" % head[3])
    rest = recv_exact(sock, rest - 1)
    if head[3] == 1:
        return socket.inet_ntoa(head[4:5] + rest[:3]), struct.unpack("!H", rest[-2:])[0]
    return None, struct.unpack("!H", rest[-2:])[0]


def socks_connect(port, target, user=USER, password=PASSWORD, timeout=OP_TIMEOUT):
    sock = socket.create_connection((LOOPBACK, port), timeout)
    try:
        socks_auth(sock, user, password)
        sock.sendall(socks_request(1, LOOPBACK, target))
        socks_reply(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def read_verified(sock, n, seed):
    data = recv_exact(sock, n) if n else b""
    if data != pattern(n, seed):
        raise SoakError("payload mismatch (%d bytes)" % n)
    return n


def pick_size():
    r = random.random()
    if r < 0.55:
        return random.randint(1, 256 * KiB)
    if r < 0.85:
        return random.randint(256 * KiB, MiB)
    return random.randint(MiB, 5 * MiB)


def tls_client_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Buffered:
    """A socket with a read buffer, for HTTP heads and WebSocket frames."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def read_until(self, marker, limit=65536):
        while marker not in self.buf:
            if len(self.buf) > limit:
                raise SoakError("no end of head within %d bytes" % limit)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SoakError("closed")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(marker)
        return head

    def read_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise SoakError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def ws_frame(opcode, payload=b"", fin=True, rsv=0, mask=True):
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    if n:
        keys = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")
    return head + key + payload


def ws_read(conn):
    """One WebSocket frame: (opcode, payload)."""
    b0, b1 = conn.read_exact(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", conn.read_exact(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", conn.read_exact(8))[0]
    if b1 & 0x80:
        conn.read_exact(4)
    return b0 & 0x0F, conn.read_exact(n)


def tunnel_message(kind, stream_id, payload=b""):
    return ws_frame(0x2, struct.pack("!BI", kind, stream_id) + payload)


def hello(client_id, group="hostile", version=1, **extra):
    info = dict({"version": version, "client_id": client_id, "group": group, "software": "soak-hostile"}, **extra)
    return tunnel_message(0x10, 0, json.dumps(info).encode())


# ---------------------------------------------------------------------------
# the run

class Soak:
    def __init__(self, args, harness):
        self.args = args
        self.h = harness
        self.ctl = Control()
        self.stats = Stats()
        self.ports = {}
        self.threads = []
        self.reload_n = 0
        self.flapper_n = 0
        self.flapper_id = None
        self.hello_ids = itertools.count(1)
        self.t0 = None
        self.proc_stats = {}
        self.log_counters = {}
        self.died = None

    # -- setup

    def port(self, name, kind=socket.SOCK_STREAM):
        self.ports[name] = free_port(kind)
        return self.ports[name]

    def addr(self, name):
        return "%s:%d" % (LOOPBACK, self.ports[name])

    def write_yaml(self, path, data):
        import yaml
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(tmp, path)

    def gateway_config(self):
        certs = self.h.path("certs")
        listener = {"auth_username": USER, "auth_password": PASSWORD}
        self.write_yaml(self.h.path("gateway.yaml"), {
            "log": {"level": "info", "file": self.h.path("logs", "gateway.log")},
            "proxy": {"socks5": dict(listener, listen_addr=self.addr("socks")),
                      "http": dict(listener, listen_addr=self.addr("http"))},
            "gateway": {
                "listen_addr": self.addr("tunnel"),
                "tls_cert": os.path.join(certs, "server.crt"),
                "tls_key": os.path.join(certs, "server.key"),
                "auth_username": TUNNEL_USER, "auth_password": TUNNEL_PASSWORD,
                "users": [{"username": ROTATING, "password": self.rotating_password(self.reload_n),
                           "group": "default"}],
                "max_conns_per_user": 0 if self.reload_n % 2 == 0 else 10000,
                "metrics_addr": self.addr("gateway_metrics"),
                "status_addr": self.addr("status"),
                "status_username": STATUS_USER, "status_password": STATUS_PASSWORD,
            },
        })

    @staticmethod
    def rotating_password(n):
        return "rotating-password-%d" % n

    def client_config(self, name, client_id, metrics=None, forbidden=()):
        client = {
            "gateway_addr": self.addr("tunnel"),
            "gateway_tls_cert": self.h.path("certs", "ca.crt"),
            "client_id": client_id, "group_id": "default", "replicas": 1,
            "auth_username": TUNNEL_USER, "auth_password": TUNNEL_PASSWORD,
            "max_concurrent_conns": 1000,
            "reconnect_initial_delay": 0.2, "reconnect_max_delay": 2,
            "forbidden_hosts": list(forbidden),
        }
        if metrics:
            client["metrics_addr"] = self.addr(metrics)
        path = self.h.path(name + ".yaml")
        self.write_yaml(path, {"log": {"level": "info", "file": self.h.path("logs", name + ".log")},
                               "client": client})
        return path

    def steady_config(self):
        forbidden = [FORBIDDEN_TOGGLE] if self.reload_n % 2 else []
        return self.client_config("client", "soak-steady", metrics="client_metrics", forbidden=forbidden)

    def check_core(self, names=("gateway", "client", "targets")):
        for name in names:
            if not self.h.alive(name):
                proc = self.h.procs.get(name)
                raise SoakError("%s exited (status %s):\n%s" % (
                    name, proc.returncode if proc else "?", self.h.tail(name)))

    def start(self):
        for name in ("tunnel", "socks", "http", "status", "gateway_metrics", "client_metrics", "data",
                     "http_target"):
            self.port(name)
        self.port("udp_target", socket.SOCK_DGRAM)
        log("generating certificates in %s", self.h.work)
        load_generate().generate(self.h.path("certs"), ["localhost", LOOPBACK])
        self.h.spawn("targets", [sys.executable, os.path.abspath(__file__), "--serve-targets",
                                 "--data", str(self.ports["data"]), "--http", str(self.ports["http_target"]),
                                 "--udp", str(self.ports["udp_target"])])
        for name in ("data", "http_target"):
            wait_port(self.ports[name], check=self.check_targets)
        self.gateway_config()
        gateway = self.h.twistd("gateway", "anyproxy-gateway", self.h.path("gateway.yaml"))
        wait_port(self.ports["tunnel"], check=lambda: self.check_core(("gateway", "targets")))
        client = self.h.twistd("client", "anyproxy-client", self.steady_config())
        for name in ("socks", "http", "status", "gateway_metrics", "client_metrics"):
            wait_port(self.ports[name], check=self.check_core)
        deadline = time.time() + 30
        while True:
            try:
                self.op_socks_download(size=1000)
                break
            except (OSError, SoakError) as e:
                self.check_core()
                if time.time() > deadline:
                    raise SoakError("no tunnel after 30 s: %s" % reason_of(e))
                time.sleep(0.2)
        self.stats.ok.clear()
        self.stats.bytes.clear()
        self.proc_stats = {"gateway": ProcStats(gateway.pid), "client": ProcStats(client.pid)}
        log("ready: %s", ", ".join("%s :%d" % kv for kv in sorted(self.ports.items())))

    def check_targets(self):
        if not self.h.alive("targets"):
            raise SoakError("targets exited:\n%s" % self.h.tail("targets"))

    # -- traffic

    def op_socks_download(self, size=None):
        n, seed = size or pick_size(), random.randrange(1 << 30)
        with socks_connect(self.ports["socks"], self.ports["data"]) as sock:
            sock.sendall(b"GET %d %d\n" % (n, seed))
            read_verified(sock, n, seed)
            if sock.recv(1):
                raise SoakError("bytes after the payload")
        return n

    def op_socks_upload(self):
        n, seed = pick_size(), random.randrange(1 << 30)
        data = pattern(n, seed)
        with socks_connect(self.ports["socks"], self.ports["data"]) as sock:
            sock.sendall(b"PUT %d\n" % n)
            sock.sendall(data)
            answer = Buffered(sock).read_until(b"\n", 100)
        if answer.decode("ascii", "replace") != hashlib.sha256(data).hexdigest():
            raise SoakError("upload digest mismatch (%d bytes)" % n)
        return n

    def op_socks_echo(self):
        total = 0
        with socks_connect(self.ports["socks"], self.ports["data"]) as sock:
            sock.sendall(b"ECHO\n")
            for _ in range(random.randint(1, 20)):
                msg = pattern(random.randint(1, 32 * KiB), random.randrange(1 << 30))
                sock.sendall(msg)
                if recv_exact(sock, len(msg)) != msg:
                    raise SoakError("echo mismatch")
                total += len(msg)
            sock.shutdown(socket.SHUT_WR)
            if sock.recv(1):
                raise SoakError("bytes after the echo")
        return total

    def op_socks_abort(self):
        """A user that hangs up mid-transfer (half of the time with a reset)."""
        which = random.choice(("download", "download", "upload", "handshake"))
        if which == "handshake":
            sock = socket.create_connection((LOOPBACK, self.ports["socks"]), OP_TIMEOUT)
            sock.sendall(b"\x05\x01\x02")
            recv_exact(sock, 2)
            self._hang_up(sock)
            self.stats.note("aborted in the SOCKS5 handshake")
            return 0
        sock = socks_connect(self.ports["socks"], self.ports["data"])
        try:
            n, seed = random.randint(2 * MiB, 5 * MiB), random.randrange(1 << 30)
            if which == "download":
                sock.sendall(b"GET %d %d\n" % (n, seed))
                part = random.randint(0, 2 * MiB)
                if part:
                    got = recv_exact(sock, part)
                    if got != pattern(part, seed):
                        raise SoakError("payload mismatch before the abort")
                self.stats.note("aborted downloads")
            else:
                part = random.randint(0, 2 * MiB)
                sock.sendall(b"PUT %d\n" % n)
                sock.sendall(pattern(part, seed))
                self.stats.note("aborted uploads")
        finally:
            self._hang_up(sock)
        return part

    def _hang_up(self, sock):
        if random.random() < 0.5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.stats.note("hang-ups with a reset")
        sock.close()

    def http_request(self, conn, n, seed, close):
        headers = {"Host": "%s:%d" % (LOOPBACK, self.ports["http_target"]),
                   "Proxy-Authorization": basic(USER, PASSWORD)}
        if close:
            headers["Connection"] = "close"
        conn.request("GET", "http://%s:%d/data/%d/%d" % (LOOPBACK, self.ports["http_target"], n, seed),
                     headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SoakError("HTTP %d" % resp.status)
        if body != pattern(n, seed):
            raise SoakError("HTTP body mismatch (%d of %d bytes)" % (len(body), n))
        return resp

    def op_http_new(self):
        n = random.choice((0, random.randint(1, 4 * KiB), random.randint(1, 256 * KiB)))
        conn = http.client.HTTPConnection(LOOPBACK, self.ports["http"], timeout=OP_TIMEOUT)
        try:
            self.http_request(conn, n, random.randrange(1 << 30), close=True)
        finally:
            conn.close()
        return n

    def run_http_keepalive(self, kind):
        """Several requests on one connection; each request counts as one operation."""
        conn = http.client.HTTPConnection(LOOPBACK, self.ports["http"], timeout=OP_TIMEOUT)
        try:
            for _ in range(random.randint(5, 30)):
                if not self.ctl.begin():
                    return
                t0 = time.time()
                try:
                    n = random.choice((random.randint(0, 4 * KiB), random.randint(1, 512 * KiB)))
                    resp = self.http_request(conn, n, random.randrange(1 << 30), close=False)
                    self.stats.success(kind, n)
                    if resp.will_close:
                        self.stats.note("keep-alive connections closed by the proxy")
                except Exception as e:
                    self.stats.failure(kind, t0, reason_of(e))
                    return
                finally:
                    self.ctl.end()
                if self.ctl.pausing() or not self.ctl.sleep(random.uniform(0, 0.1)):
                    return
        finally:
            conn.close()

    def op_http_connect(self):
        """A CONNECT tunnel through the HTTP proxy (as for https), then a download."""
        sock = socket.create_connection((LOOPBACK, self.ports["http"]), OP_TIMEOUT)
        with sock:
            target = "%s:%d" % (LOOPBACK, self.ports["data"])
            sock.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: %s\r\n\r\n"
                          % (target, target, basic(USER, PASSWORD))).encode())
            conn = Buffered(sock)
            head = conn.read_until(b"\r\n\r\n")
            status = head.split(b" ", 2)[1:2]
            if status != [b"200"]:
                raise SoakError("CONNECT answered %r" % head[:40])
            n, seed = random.randint(1, MiB), random.randrange(1 << 30)
            sock.sendall(b"GET %d %d\n" % (n, seed))
            if conn.read_exact(n) != pattern(n, seed):
                raise SoakError("payload mismatch through CONNECT")
        return n

    def op_udp(self):
        """A SOCKS5 UDP association and up to 20 datagrams, one at a time."""
        control = socket.create_connection((LOOPBACK, self.ports["socks"]), OP_TIMEOUT)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind((LOOPBACK, 0))
            socks_auth(control, USER, PASSWORD)
            local = udp.getsockname()
            control.sendall(socks_request(3, local[0], local[1]))
            host, port = socks_reply(control)
            relay = (LOOPBACK if host in (None, "0.0.0.0") else host, port)
            header = b"\x00\x00\x00\x01" + socket.inet_aton(LOOPBACK) + struct.pack("!H", self.ports["udp_target"])
            udp.settimeout(1.0)
            sent = answered = total = 0
            for _ in range(random.randint(5, 20)):
                payload = pattern(random.randint(1, 1400), random.randrange(1 << 30))
                udp.sendto(header + payload, relay)
                sent += 1
                try:
                    while True:
                        data = udp.recv(65536)
                        if data == header + payload:
                            answered += 1
                            total += len(payload)
                            break
                        self.stats.note("UDP: stray or late datagrams")
                except socket.timeout:
                    pass
            self.stats.note("UDP datagrams sent", sent)
            self.stats.note("UDP datagrams answered", answered)
            if not answered:
                raise SoakError("no UDP datagram answered (%d sent)" % sent)
            return total
        finally:
            udp.close()
            control.close()

    def op_status(self):
        """The status API (checked JSON), and both metrics pages."""
        api = self.status_api()
        if "clients" not in api:
            raise SoakError("status API without clients")
        n = 0
        for name in ("gateway_metrics", "client_metrics"):
            conn = http.client.HTTPConnection(LOOPBACK, self.ports[name], timeout=OP_TIMEOUT)
            try:
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    raise SoakError("%s: HTTP %d" % (name, resp.status))
                n += len(body)
            finally:
                conn.close()
        return n

    def status_api(self, timeout=OP_TIMEOUT):
        conn = http.client.HTTPConnection(LOOPBACK, self.ports["status"], timeout=timeout)
        try:
            conn.request("GET", "/api/status", headers={"Authorization": basic(STATUS_USER, STATUS_PASSWORD)})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise SoakError("status API: HTTP %d" % resp.status)
            return json.loads(body)
        finally:
            conn.close()

    def worker(self, kind, op, pace):
        while not self.ctl.stop.is_set():
            if kind == "http_keepalive":
                try:
                    self.run_http_keepalive(kind)
                except Exception as e:  # the connection itself
                    self.stats.failure(kind, time.time(), reason_of(e))
            else:
                if not self.ctl.begin():
                    return
                t0 = time.time()
                try:
                    self.stats.success(kind, op() or 0)
                except Exception as e:
                    self.stats.failure(kind, t0, reason_of(e))
                finally:
                    self.ctl.end()
            self.ctl.sleep(random.uniform(0, pace))

    def start_traffic(self):
        pace = self.args.pace
        workers = [("http_new", self.op_http_new, 2), ("http_keepalive", None, 2),
                   ("http_connect", self.op_http_connect, 1),
                   ("socks_download", self.op_socks_download, 2), ("socks_upload", self.op_socks_upload, 1),
                   ("socks_echo", self.op_socks_echo, 1), ("socks_abort", self.op_socks_abort, 1),
                   ("udp", self.op_udp, 1), ("status_metrics", self.op_status, 1)]
        for kind, op, count in workers:
            for i in range(count):
                self.thread("%s-%d" % (kind, i), self.worker, kind, op,
                            pace * (10 if kind == "status_metrics" else 1))

    def thread(self, name, target, *args):
        t = threading.Thread(target=self.guarded, args=(name, target) + args, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def guarded(self, name, target, *args):
        """No thread may die silently: a bug in the soak itself is counted and the thread restarts."""
        while not self.ctl.stop.is_set():
            try:
                target(*args)
                return
            except Exception as e:
                self.stats.note("soak script errors (%s: %s)" % (name, reason_of(e)))
                self.ctl.sleep(1)

    # -- the reconnecting client

    def flapper(self):
        every = self.args.restart_every
        self.start_flapper()
        while self.ctl.sleep(every):
            if not self.ctl.begin():
                return
            try:
                sig = signal.SIGTERM if self.flapper_n % 2 else signal.SIGKILL
                t = time.time()
                self.h.stop("flapper", sig)
                stopped = time.time() - t
                self.stats.disruption(CLIENT_STOP, t, t + stopped)
                self.start_flapper(signal.Signals(sig).name, stopped)
            finally:
                self.ctl.end()

    def start_flapper(self, sig=None, stop_seconds=None):
        self.flapper_n += 1
        client_id = "soak-flapper-%d" % self.flapper_n
        self.flapper_id = client_id
        path = self.client_config("flapper", client_id)
        t = time.time()
        self.h.twistd("flapper", "anyproxy-client", path)
        registered = None
        while time.time() - t < 20 and not self.ctl.stop.is_set():
            try:
                if any(c.get("client_id") == client_id for c in self.status_api(5)["clients"]):
                    registered = time.time() - t
                    break
            except (OSError, SoakError, ValueError):
                pass
            time.sleep(0.2)
        record = {"n": self.flapper_n, "client_id": client_id, "signal": sig, "stop_seconds": stop_seconds,
                  "registered_after": registered}
        with self.stats.lock:
            self.stats.restarts.append(record)
        if registered is None and not self.ctl.stop.is_set():
            log("  reconnecting client %s not on the status page after 20 s:\n%s", client_id,
                self.h.tail("flapper", 8))

    # -- reloads

    def reloader(self):
        while self.ctl.sleep(self.args.reload_every):
            if not self.ctl.begin():
                return
            try:
                self.reload()
            finally:
                self.ctl.end()

    def log_count(self, name, needle):
        return self.log_counters.setdefault(name, LogCounter(self.h.path("logs", name + ".log"))).count(needle)

    def reload(self):
        before = {name: (self.log_count(name, b"reload applied"), self.log_count(name, b"reload refused"))
                  for name in ("gateway", "client")}
        self.reload_n += 1
        old, new = self.rotating_password(self.reload_n - 1), self.rotating_password(self.reload_n)
        self.gateway_config()
        self.steady_config()
        t = time.time()
        for name in ("gateway", "client"):
            os.kill(self.h.procs[name].pid, signal.SIGHUP)
        record = {"n": self.reload_n, "at": round(t - self.t0, 1)}
        deadline = t + 15
        for name in ("gateway", "client"):
            record[name] = "no log line after 15 s"
            while time.time() < deadline:
                applied, refused = self.log_count(name, b"reload applied"), self.log_count(name, b"reload refused")
                if applied > before[name][0]:
                    record[name] = "applied"
                    break
                if refused > before[name][1]:
                    record[name] = "refused"
                    break
                time.sleep(0.2)
        record["seconds"] = round(time.time() - t, 2)
        # The new password works, the old one no longer does.
        try:
            with socks_connect(self.ports["socks"], self.ports["data"], ROTATING, new) as sock:
                sock.sendall(b"GET 1000 7\n")
                read_verified(sock, 1000, 7)
            record["new_password"] = "works"
        except Exception as e:
            record["new_password"] = "fails: " + reason_of(e)
        try:
            with socks_connect(self.ports["socks"], self.ports["data"], ROTATING, old):
                record["old_password"] = "STILL WORKS"
        except SoakError as e:
            record["old_password"] = "refused" if str(e) == "auth refused" else "fails: " + reason_of(e)
        except Exception as e:
            record["old_password"] = "fails: " + reason_of(e)
        record["ok"] = (record["gateway"] == "applied" and record["client"] == "applied"
                        and record["new_password"] == "works" and record["old_password"] == "refused")
        with self.stats.lock:
            self.stats.reloads.append(record)
        if not record["ok"]:
            log("  reload %d: %s", self.reload_n, record)

    # -- the hostile client

    def hostile_loop(self):
        actions = Hostile(self).actions()
        while self.ctl.begin():
            try:
                for name, action, expected in actions:
                    if self.ctl.pausing():
                        break
                    try:
                        outcome = action()
                    except Exception as e:
                        outcome = describe_failure(e)
                    ok = outcome in expected or any(outcome.startswith(x + " ") for x in expected) \
                        or "*" in expected
                    self.stats.hostile_outcome(name, outcome, ok)
                else:
                    with self.stats.lock:
                        self.stats.hostile_iterations += 1
            finally:
                self.ctl.end()
            self.ctl.sleep(1.0)

    def slowloris_loop(self, target):
        hostile = Hostile(self)
        while self.ctl.begin():
            try:
                held = hostile.slowloris(target)
                if held != "paused":
                    with self.stats.lock:
                        self.stats.slowloris[target].append(held)
            except Exception as e:
                self.stats.hostile_outcome("slowloris " + target, "soak script error: " + reason_of(e), False)
            finally:
                self.ctl.end()
            self.ctl.sleep(0.5)

    # -- sampling and checkpoints

    def sample(self, quiet=False):
        row = {"t": round(time.time() - self.t0, 1), "quiet": quiet}
        for name, ps in self.proc_stats.items():
            s = ps.sample()
            row[name + "_rss"], row[name + "_fds"], row[name + "_cpu"] = s["rss"], s["fds"], round(s["cpu"], 2)
        return row

    def sampler(self):
        """A sample every --sample-every seconds; the peaks from one every second."""
        next_row = time.time()
        while True:
            try:
                row = self.sample(quiet=self.ctl.pausing())
                with self.stats.lock:
                    for key in ("gateway_rss", "gateway_fds", "client_rss", "client_fds"):
                        self.stats.peaks[key] = max(self.stats.peaks.get(key, 0), row[key])
                    if time.time() >= next_row:
                        self.stats.samples.append(row)
                        next_row += self.args.sample_every
            except Exception as e:  # a process gone: the main loop notices
                self.stats.note("sampling failures (%s)" % reason_of(e))
            if not self.ctl.sleep(1.0):
                return

    def checkpoint(self, name, final=False):
        log("checkpoint %s: pausing the traffic", name)
        left = self.ctl.pause(timeout=60)
        # Let connections that just ended close, and wait for the descriptors to settle.
        last, steady, deadline = None, 0, time.time() + 20
        time.sleep(1)
        while time.time() < deadline and steady < 3:
            now = {k: ps.sample()["fds"] for k, ps in self.proc_stats.items()}
            steady = steady + 1 if now == last else 0
            last = now
            time.sleep(1)
        row = self.sample(quiet=True)
        row["inflight_left"] = left
        try:
            api = self.status_api(10)
            row["tunnels"] = sorted("%s/%s" % (c["client_id"], c["group"]) for c in api["clients"])
            row["active_streams"] = api["totals"].get("active_streams")
        except Exception as e:
            row["tunnels"] = "status API failed: %s" % reason_of(e)
        with self.stats.lock:
            self.stats.checkpoints[name] = row
        log("checkpoint %s: gateway %.1f MiB, %d fds; client %.1f MiB, %d fds; tunnels %s", name,
            row["gateway_rss"] / MiB, row["gateway_fds"], row["client_rss"] / MiB, row["client_fds"],
            row["tunnels"])
        if not final:
            self.ctl.resume()

    def progress(self):
        with self.stats.lock:
            ok = sum(self.stats.ok.values())
            failed = len(self.stats.failures)
            last = self.stats.samples[-1] if self.stats.samples else None
            hostile = self.stats.hostile_iterations
            reloads, restarts = len(self.stats.reloads), len(self.stats.restarts)
        if last:
            log("t=%4.0fs  ops %d ok, %d failed; reloads %d, client starts %d, hostile rounds %d; "
                "gateway %.1f MiB %d fds, client %.1f MiB %d fds", time.time() - self.t0, ok, failed, reloads,
                restarts, hostile, last["gateway_rss"] / MiB, last["gateway_fds"], last["client_rss"] / MiB,
                last["client_fds"])

    def run(self):
        total = self.args.minutes * 60
        warmup = self.args.warmup if self.args.warmup is not None else min(60.0, total / 4)
        self.warmup = warmup
        self.t0 = time.time()
        self.thread("sampler", self.sampler)
        self.thread("flapper", self.flapper)
        self.thread("reloader", self.reloader)
        self.thread("hostile", self.hostile_loop)
        for target in ("status", "http", "socks", "tunnel"):
            self.thread("slowloris-" + target, self.slowloris_loop, target)
        self.start_traffic()
        log("soak: %.1f minutes, warm-up %.0f s; restart every %g s, reload every %g s",
            self.args.minutes, warmup, self.args.restart_every, self.args.reload_every)
        marks = [(warmup, "start"), (warmup + (total - warmup) / 2, "middle"), (total, "end")]
        next_progress = 60
        for at, name in marks:
            while time.time() - self.t0 < at:
                time.sleep(min(1.0, max(0.05, at - (time.time() - self.t0))))
                self.check_core()
                if time.time() - self.t0 >= next_progress:
                    self.progress()
                    next_progress += 60
            self.checkpoint(name, final=name == "end")
        self.ctl.stop.set()
        self.ctl.resume()
        self.duration = time.time() - self.t0
        for t in self.threads:
            t.join(OP_TIMEOUT + 5)
        self.final_status()

    def final_status(self):
        """What the gateway still holds once everything but the two clients is gone."""
        self.final = {}
        try:
            api = self.status_api(10)
            self.final["tunnels"] = sorted("%s/%s" % (c["client_id"], c["group"]) for c in api["clients"])
            self.final["active_streams"] = api["totals"].get("active_streams")
            self.final["streams_opened"] = api["totals"].get("streams_opened")
        except Exception as e:
            self.final["tunnels"] = "status API failed: %s" % reason_of(e)


def describe_failure(exc):
    if isinstance(exc, socket.timeout):
        return "silent %g s" % HOSTILE_TIMEOUT
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
        return "closed"
    if isinstance(exc, ssl.SSLError):
        return "TLS error"
    if isinstance(exc, SoakError) and str(exc) == "closed":
        return "closed"
    if isinstance(exc, (SoakError, OSError)):
        return reason_of(exc)
    return "soak script error: " + reason_of(exc)


# ---------------------------------------------------------------------------
# the hostile client

REFUSED = ("closed", "reset", "TLS error", "TLS alert")


class Hostile:
    """
    Every action returns a short outcome ("401", "closed", ...).  Each comes
    with the outcomes that count as expected; anything else is reported.
    """

    def __init__(self, soak):
        self.soak = soak
        self.ports = soak.ports
        self.ctx = tls_client_context()

    def actions(self):
        refused = REFUSED
        # Refusals of a HELLO (docs/PROTOCOL.md): 4000, a malformed HELLO; 4003, the credential
        # may not serve that group or client id (1008 before those codes existed).
        bad_hello = ("close 4000", "close 4003", "close 1008", "close 1002") + refused
        return [
            ("tunnel: wrong password", lambda: self.upgrade(auth=(TUNNEL_USER, "wrong")), ("401",) + refused),
            ("tunnel: no credentials", lambda: self.upgrade(auth=None), ("401",) + refused),
            ("tunnel: unknown user", lambda: self.upgrade(auth=("nobody", TUNNEL_PASSWORD)), ("401",) + refused),
            ("tunnel: no subprotocol", lambda: self.upgrade(subprotocol=None), ("400", "401") + refused),
            ("tunnel: plain HTTP, no TLS", self.plaintext_on_tls, refused + ("silent 10 s",)),
            ("tunnel: random bytes, no TLS", self.random_on_tls, refused),
            ("tunnel: TLS then hang up", self.tls_then_close, ("done",)),
            ("tunnel: HELLO version 99", lambda: self.after_upgrade(hello("hostile-v99", version=99)),
             bad_hello),
            ("tunnel: HELLO not JSON", lambda: self.after_upgrade(tunnel_message(0x10, 0, b"{not json")),
             bad_hello),
            ("tunnel: HELLO without client_id",
             lambda: self.after_upgrade(tunnel_message(0x10, 0, b'{"version": 1}')), bad_hello),
            ("tunnel: HELLO for a group the credential may not serve", self.hello_wrong_group,
             tuple("HELLO refused: " + x for x in bad_hello) + refused),
            ("tunnel: garbage instead of frames", lambda: self.after_upgrade(os.urandom(4096)),
             ("close 1002",) + refused),
            ("tunnel: frame with reserved bits", lambda: self.after_upgrade(ws_frame(0x2, b"x" * 10, rsv=7)),
             ("close 1002",) + refused),
            ("tunnel: oversized message", lambda: self.after_upgrade(ws_frame(0x2, b"\x04" * (400 * KiB))),
             ("close 1009",) + refused),
            ("tunnel: valid HELLO, then a text message",
             lambda: self.after_hello(ws_frame(0x1, b"hello")), ("close 1002", "close 1003") + refused),
            ("tunnel: valid HELLO, then an unknown frame type",
             lambda: self.after_hello(tunnel_message(0x7F, 1, b"?")), ("close 1002", "close 1008") + refused),
            ("tunnel: valid HELLO, then OPEN with the gateway's parity",
             lambda: self.after_hello(tunnel_message(0x01, 2, struct.pack("!BIHB", 1, 65536, 80, 9)
                                                     + b"127.0.0.1")),
             ("close 1002", "close 1008") + refused),
            ("tunnel: valid HELLO, then CREDIT 0",
             lambda: self.after_hello(tunnel_message(0x05, 1, b"\x00\x00\x00\x00")),
             ("close 1002", "close 1008") + refused),
            ("tunnel: valid HELLO asking for ports not allowed, then CREDIT 0", self.hello_bad_ports,
             ("close 1002", "close 1008") + refused),
            ("tunnel: ping flood before HELLO, never reading", self.ping_flood, ("*",)),
            # The SOCKS4 rejection: VN 0, CD 91, the request's port and address.
            ("socks5: version 4", lambda: self.raw(self.ports["socks"], b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"),
             ("answer 005b00507f000001",) + refused),
            ("socks5: no methods", lambda: self.raw(self.ports["socks"], b"\x05\x00"),
             ("answer 05ff",) + refused),
            ("socks5: no-auth only", lambda: self.raw(self.ports["socks"], b"\x05\x01\x00"),
             ("answer 05ff",) + refused),
            ("socks5: wrong password", lambda: self.socks_login(USER, "wrong"), ("auth refused",) + refused),
            ("socks5: empty user", lambda: self.socks_login("", ""), ("auth refused",) + refused),
            ("socks5: bad address type", lambda: self.socks_request(b"\x05\x01\x00\x09\x00\x00"),
             ("reply 0x08", "reply 0x01", "reply 0x07") + refused),
            ("socks5: BIND", lambda: self.socks_request(socks_request(2, LOOPBACK, 80)), ("reply 0x07",) + refused),
            ("socks5: empty domain name", lambda: self.socks_request(b"\x05\x01\x00\x03\x00\x00\x50"),
             ("reply 0x01", "reply 0x04", "reply 0x08") + refused),
            ("socks5: truncated request, then hang up",
             lambda: self.raw(self.ports["socks"], b"\x05\x01\x02\x01\x04soak", read=False), ("done",)),
            ("http: garbage request line", lambda: self.raw(self.ports["http"], b"\x00\x01\x02garbage\r\n\r\n"),
             ("400",) + refused),
            ("http: no credentials", lambda: self.http_raw("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % self.url(), None),
             ("407",)),
            ("http: wrong password", lambda: self.http_raw(
                "GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % self.url(), basic(USER, "wrong")), ("407",)),
            ("http: bad base64", lambda: self.http_raw(
                "GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % self.url(), "Basic !!!not-base64"), ("407", "400")),
            ("http: 200 KiB header", lambda: self.http_raw(
                "GET %s HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n" % (self.url(), "a" * (200 * KiB))),
             ("431", "400") + refused),
            ("http: bad Content-Length", lambda: self.http_raw(
                "POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n" % self.url()), ("400",) + refused),
            ("http: bad chunk size", lambda: self.http_raw(
                "POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                % self.url()), ("400", "502") + refused),
            ("http: CONNECT without a port", lambda: self.http_raw("CONNECT 127.0.0.1 HTTP/1.1\r\nHost: x\r\n\r\n"),
             ("400",) + refused),
            ("http: absolute URI without a host", lambda: self.http_raw("GET http:/// HTTP/1.1\r\nHost: x\r\n\r\n"),
             ("400",) + refused),
            ("http: 100 pipelined requests, never reading", self.http_pipeline_flood, ("done",)),
            ("status page: wrong password", lambda: self.status_raw(basic(STATUS_USER, "wrong")), ("401",)),
            ("status page: garbage", lambda: self.raw(self.ports["status"], b"\x16\x03\x01garbage\r\n\r\n"),
             ("400",) + refused),
            ("metrics: garbage", lambda: self.raw(self.ports["gateway_metrics"], b"BREW /pot HTCPCP/1.0\r\n\r\n"),
             ("400", "404", "405", "501") + refused),
        ]

    def url(self):
        return "http://%s:%d/data/10/1" % (LOOPBACK, self.ports["http_target"])

    # plain TCP

    def connect(self, port):
        return socket.create_connection((LOOPBACK, port), HOSTILE_TIMEOUT)

    def raw(self, port, data, read=True):
        with self.connect(port) as sock:
            sock.sendall(data)
            if not read:
                return "done"
            answer = sock.recv(65536)
            if not answer:
                return "closed"
            if answer.startswith(b"HTTP/"):
                return answer.split(b" ", 2)[1].decode("ascii", "replace")
            if answer[:2] == b"\x15\x03":
                return "TLS alert"  # an alert record: the TLS port refusing what it got
            return "answer " + answer[:8].hex()

    def socks_login(self, user, password):
        with self.connect(self.ports["socks"]) as sock:
            socks_auth(sock, user, password)
            return "auth ok"

    def socks_request(self, request):
        with self.connect(self.ports["socks"]) as sock:
            socks_auth(sock, USER, PASSWORD)
            sock.sendall(request)
            head = sock.recv(2)
            if len(head) < 2:
                return "closed"
            return "reply 0x%02x" % head[1]

    def http_raw(self, text, auth=basic(USER, PASSWORD)):
        if auth:
            text = text.replace("\r\n", "\r\nProxy-Authorization: %s\r\n" % auth, 1)
        with self.connect(self.ports["http"]) as sock:
            try:
                sock.sendall(text.encode("latin-1"))
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered and closed before the end of a large request: read the answer
            answer = sock.recv(65536)
            if not answer:
                return "closed"
            return answer.split(b" ", 2)[1].decode("ascii", "replace") if answer.startswith(b"HTTP/") else \
                "answer " + answer[:8].hex()

    def http_pipeline_flood(self):
        request = ("GET %s HTTP/1.1\r\nHost: x\r\nProxy-Authorization: %s\r\n\r\n"
                   % (self.url(), basic(USER, PASSWORD))).encode()
        with self.connect(self.ports["http"]) as sock:
            sock.settimeout(2)
            with contextlib.suppress(OSError):
                sock.sendall(request * 100)
            time.sleep(0.5)
            self._reset(sock)
        return "done"

    def status_raw(self, auth):
        with self.connect(self.ports["status"]) as sock:
            sock.sendall(("GET /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
                          % auth).encode())
            answer = sock.recv(65536)
            return answer.split(b" ", 2)[1].decode("ascii", "replace") if answer.startswith(b"HTTP/") else "closed"

    @staticmethod
    def _reset(sock):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    # the tunnel port

    def tls(self):
        raw = self.connect(self.ports["tunnel"])
        try:
            return self.ctx.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise

    def plaintext_on_tls(self):
        return self.raw(self.ports["tunnel"], b"GET /anyproxy HTTP/1.1\r\nHost: x\r\n\r\n")

    def random_on_tls(self):
        return self.raw(self.ports["tunnel"], os.urandom(4096))

    def tls_then_close(self):
        sock = self.tls()
        self._reset(sock)
        sock.close()
        return "done"

    def upgrade(self, auth=(TUNNEL_USER, TUNNEL_PASSWORD), subprotocol="anyproxy.v1", keep=False):
        sock = self.tls()
        try:
            lines = ["GET /anyproxy HTTP/1.1", "Host: %s:%d" % (LOOPBACK, self.ports["tunnel"]),
                     "Upgrade: websocket", "Connection: Upgrade",
                     "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode(),
                     "Sec-WebSocket-Version: 13"]
            if subprotocol:
                lines.append("Sec-WebSocket-Protocol: " + subprotocol)
            if auth:
                lines.append("Authorization: " + basic(*auth))
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            conn = Buffered(sock)
            head = conn.read_until(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode("ascii", "replace")
            if keep and status == "101":
                keep = "handed over"
                return conn
            if status == "101":
                self._reset(sock)
                return "101 (accepted)"
            return status
        finally:
            if keep != "handed over":
                sock.close()

    def _opened(self):
        conn = self.upgrade(keep=True)
        if isinstance(conn, str):
            raise SoakError("upgrade refused: " + conn)
        return conn

    def _close_code(self, conn):
        """Read until the gateway closes: "close CODE", or "closed" (no close frame)."""
        deadline = time.time() + HOSTILE_TIMEOUT
        while time.time() < deadline:
            try:
                opcode, payload = ws_read(conn)
            except SoakError:
                return "closed"
            if opcode == 0x8:
                return "close %d" % struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else "close"
        return "silent %g s" % HOSTILE_TIMEOUT

    def after_upgrade(self, data):
        conn = self._opened()
        with conn.sock:
            with contextlib.suppress(OSError):
                conn.sock.sendall(data)
            return self._close_code(conn)

    def _hello_then(self, conn, data=b"", group="default", **extra):
        """
        Send a HELLO and C{data} in one write, then read the gateway's answer: its HELLO
        (a dict), or raise SoakError("HELLO refused: close CODE").

        A HELLO for group "default" makes the tunnel routable for the soak's users.  The
        frame that breaks the protocol goes in the same write, so that the gateway drops the
        tunnel at once; a user stream it routes to the tunnel meanwhile (it happens) fails,
        and such failures are put down to the hostile tunnel (L{classify}).
        """
        message = hello("soak-hostile-%d" % next(self.soak.hello_ids), group=group, **extra)
        with contextlib.suppress(OSError):
            conn.sock.sendall(message + data)
        opcode, payload = ws_read(conn)
        if opcode == 0x8:
            raise SoakError("HELLO refused: close %s" % (struct.unpack("!H", payload[:2])[0]
                                                          if len(payload) >= 2 else "-"))
        if opcode != 0x2 or payload[:1] != b"\x10":
            raise SoakError("unexpected answer to HELLO: opcode %d" % opcode)
        return json.loads(payload[5:])

    def after_hello(self, data, **extra):
        conn = self._opened()
        t = time.time()
        try:
            with conn.sock:
                self._hello_then(conn, data, **extra)
                return self._close_code(conn)
        finally:
            self.soak.stats.disruption(HOSTILE_TUNNEL, t, time.time())

    def hello_wrong_group(self):
        conn = self._opened()
        with conn.sock:
            self._hello_then(conn, group="soak-not-allowed")
            self._reset(conn.sock)
            return "accepted"

    def hello_bad_ports(self):
        """Ports outside open_ports_allowed and malformed entries (the gateway logs each refusal)."""
        return self.after_hello(tunnel_message(0x05, 1, b"\x00\x00\x00\x00"), open_ports=[
            {"remote_port": self.ports["socks"], "local_host": "127.0.0.1", "local_port": 22, "protocol": "tcp"},
            {"remote_port": 1, "local_host": "x" * 300, "local_port": 0, "protocol": "sctp"},
            "not an object"])

    def ping_flood(self, seconds=1.0):
        """
        Pings as fast as the gateway takes them, never reading its pongs, before the
        HELLO (after it, the tunnel would be routable and the users' streams would stall).
        """
        conn = self._opened()
        sent = 0
        with conn.sock:
            sock = conn.sock
            sock.settimeout(1.0)
            ping = ws_frame(0x9, os.urandom(125))
            deadline = time.time() + seconds
            outcome = "sent for %g s" % seconds
            try:
                while time.time() < deadline:
                    sock.sendall(ping * 64)
                    sent += 64
            except socket.timeout:
                outcome = "pushed back"
            except OSError:
                outcome = "closed by the gateway"
            self._reset(sock)
        self.soak.stats.note("hostile pings sent", sent)
        return outcome

    # slowloris: one byte per second

    def slowloris(self, target):
        """Seconds until the server dropped the connection, or None if it held SLOW_MAX seconds."""
        if target == "tunnel":
            sock = self.tls()
            data = ("GET /anyproxy HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Authorization: %s\r\nX-Slow: %s" % (basic(TUNNEL_USER, TUNNEL_PASSWORD), "a" * 200)).encode()
        elif target == "socks":
            sock = self.connect(self.ports["socks"])
            u = b"s" * 255
            data = b"\x05\x01\x02\x01\xff" + u + b"\xff" + u
        else:
            sock = self.connect(self.ports["status" if target == "status" else "http"])
            path = "/" if target == "status" else self.url()
            data = ("GET %s HTTP/1.1\r\nHost: x\r\nX-Slow: %s" % (path, "a" * 200)).encode()
        t = time.time()
        with sock:
            sock.settimeout(0.05)
            for i in range(len(data)):
                if self.soak.ctl.pausing():
                    return "paused"
                if time.time() - t > SLOW_MAX:
                    return None
                try:
                    sock.sendall(data[i:i + 1])
                except OSError:
                    return round(time.time() - t, 1)
                deadline = time.time() + 1.0
                while time.time() < deadline:
                    try:
                        chunk = sock.recv(4096)
                        if not chunk:
                            return round(time.time() - t, 1)
                    except (socket.timeout, ssl.SSLWantReadError):
                        pass
                    except OSError:
                        return round(time.time() - t, 1)
        return None


# ---------------------------------------------------------------------------
# the report

def slope(points):
    """Least-squares slope of (t, v) points, per second."""
    if len(points) < 2:
        return None
    mt = statistics.fmean(p[0] for p in points)
    mv = statistics.fmean(p[1] for p in points)
    den = sum((p[0] - mt) ** 2 for p in points)
    return sum((p[0] - mt) * (p[1] - mv) for p in points) / den if den else None


def classify(stats, margin_before=0.5, margin_after=2.0):
    """
    Failures split by cause: an operation under way while the reconnecting client was
    being stopped (or that began up to C{margin_after} seconds after: the gateway may
    have routed it to the dying tunnel), or while a hostile tunnel was registered; and
    the rest, unexplained.
    """
    counts = {cause: collections.Counter() for cause in (CLIENT_STOP, HOSTILE_TUNNEL, None)}
    reasons = collections.defaultdict(collections.Counter)
    for kind, t0, t1, reason in stats.failures:
        causes = {cause for cause, start, end in stats.disruptions
                  if t0 <= end + margin_after and t1 >= start - margin_before}
        cause = CLIENT_STOP if CLIENT_STOP in causes else HOSTILE_TUNNEL if causes else None
        counts[cause][kind] += 1
        reasons[kind][("%s: " % cause if cause else "") + reason] += 1
    return counts, reasons


def scan_logs(work, name):
    """Lines, warnings/errors and tracebacks in one program's log files."""
    out = {"lines": 0, "bytes": 0, "errors": 0, "warnings": 0, "tracebacks": 0, "samples": []}
    paths = sorted(glob.glob(os.path.join(work, "logs", name + ".log*"))) + \
        [os.path.join(work, "logs", name + ".out")]
    seen = set()
    for path in paths:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        out["bytes"] += len(text)
        lines = text.splitlines()
        out["lines"] += len(lines)
        for i, line in enumerate(lines):
            if "#error]" in line or "#critical]" in line:
                out["errors"] += 1
            elif "#warn]" in line:
                out["warnings"] += 1
            if "Traceback (most recent call last)" in line:
                out["tracebacks"] += 1
                # the exception line: the first line after the frames
                j = i + 1
                while j < len(lines) and (lines[j].startswith((" ", "\t")) or "File " in lines[j][:40]
                                          or lines[j].strip() == ""):
                    j += 1
                exc = lines[j].strip() if j < len(lines) else "?"
                exc = re.sub(r"^\S+ \S+ \[[^\]]*\] ", "", exc)[:160]
                context = re.sub(r"^\S+ \S+ \[[^\]]*\] ", "", lines[i - 1].strip())[:160] if i else ""
                key = exc
                if key not in seen and len(out["samples"]) < 8:
                    seen.add(key)
                    out["samples"].append({"after": context, "exception": exc})
    return out


def summarize(soak):
    args, st = soak.args, soak.stats
    total = soak.duration
    warmup = soak.warmup
    samples = [s for s in st.samples if not s["quiet"]]
    window = min(RSS_WINDOW, total - warmup)
    allowed = max(RSS_FLOOR, RSS_ALLOWED * window / RSS_WINDOW)
    cps = st.checkpoints
    procs = {}
    for name in ("gateway", "client"):
        measured = [s for s in samples if s["t"] >= warmup]
        in_window = [s for s in measured if s["t"] >= total - window]
        rss_slope = slope([(s["t"], s[name + "_rss"]) for s in measured])
        fds_slope = slope([(s["t"], s[name + "_fds"]) for s in measured])
        window_slope = slope([(s["t"], s[name + "_rss"]) for s in in_window])
        growth = window_slope * window if window_slope is not None else None
        start, end = cps.get("start"), cps.get("end")
        fd_change = end[name + "_fds"] - start[name + "_fds"] if start and end else None
        cpu = None
        if len(st.samples) >= 2:
            a, b = st.samples[0], st.samples[-1]
            cpu = 100 * (b[name + "_cpu"] - a[name + "_cpu"]) / max(1e-9, b["t"] - a["t"])
        procs[name] = {
            "checkpoints": {k: {"rss": cps[k][name + "_rss"], "fds": cps[k][name + "_fds"]}
                            for k in ("start", "middle", "end") if k in cps},
            "peak_rss": st.peaks.get(name + "_rss"), "peak_fds": st.peaks.get(name + "_fds"),
            "rss_mib_per_10min": None if rss_slope is None else rss_slope * 600 / MiB,
            "fds_per_10min": None if fds_slope is None else fds_slope * 600,
            "window_growth": growth, "window_samples": len(in_window),
            "fd_change": fd_change, "cpu_percent": cpu,
            "rss_flat": growth is not None and growth < allowed,
            "fds_flat": fd_change is not None and abs(fd_change) <= FD_SLACK,
        }
    counts, reasons = classify(st)
    kinds = sorted(set(st.ok) | set().union(*counts.values()))
    traffic = {k: {"ok": st.ok[k], "bytes": st.bytes[k], "errors": counts[None][k],
                   "errors_around_client_stops": counts[CLIENT_STOP][k],
                   "errors_around_hostile_tunnels": counts[HOSTILE_TUNNEL][k],
                   "reasons": dict(reasons[k].most_common(6))} for k in kinds}
    reloads_ok = sum(1 for r in st.reloads if r["ok"])
    registered = [r["registered_after"] for r in st.restarts if r["registered_after"] is not None]
    logs = {name: scan_logs(soak.h.work, name) for name in ("gateway", "client", "flapper")}
    flat = all(p["rss_flat"] and p["fds_flat"] for p in procs.values()) and not soak.died
    judged = total >= JUDGED_MINUTES * 60
    return {
        "started": soak.started.isoformat(timespec="seconds"), "host": socket.gethostname(),
        "commit": soak.commit, "python": platform.python_version(), "cpus": os.cpu_count(),
        "planned_minutes": args.minutes, "duration_s": total, "warmup_s": warmup,
        "restart_every_s": args.restart_every, "reload_every_s": args.reload_every,
        "sample_every_s": args.sample_every, "pace_s": args.pace,
        "window_s": window, "rss_allowed": allowed, "fd_slack": FD_SLACK,
        "verdict": "flat" if flat else "NOT flat", "judged": judged, "died": soak.died,
        "processes": procs, "traffic": traffic, "notes": dict(st.notes),
        "reloads": {"sent": len(st.reloads), "ok": reloads_ok, "records": st.reloads},
        "restarts": {"count": max(0, len(st.restarts) - 1), "records": st.restarts,
                     "not_registered": sum(1 for r in st.restarts if r["registered_after"] is None),
                     "registered_median_s": statistics.median(registered) if registered else None,
                     "registered_max_s": max(registered) if registered else None},
        "hostile": {"iterations": st.hostile_iterations,
                    "outcomes": {a: dict(c) for a, c in st.hostile.items()},
                    "unexpected": {a: dict(c) for a, c in st.hostile_unexpected.items()},
                    "slowloris": {t: {"connections": len(v),
                                      "dropped": sorted(x for x in v if x is not None),
                                      "held": sum(1 for x in v if x is None)} for t, v in st.slowloris.items()}},
        "checkpoints": cps, "final": getattr(soak, "final", {}), "logs": logs,
        "samples": st.samples,
    }


def _mib(v):
    return "-" if v is None else "%.1f" % (v / MiB)


def _f(v, fmt="%.2f"):
    return "-" if v is None else fmt % v


def write_report(r, out_dir):
    md = ["# AnyProxy soak run", ""]
    md.append("%s on %s (%d CPUs), commit %s, Python %s. Planned %g min, ran %.1f min; warm-up %.0f s; "
              "a client restart every %g s, a reload every %g s, samples every %g s."
              % (r["started"], r["host"], r["cpus"], r["commit"], r["python"], r["planned_minutes"],
                 r["duration_s"] / 60, r["warmup_s"], r["restart_every_s"], r["reload_every_s"],
                 r["sample_every_s"]))
    md.append("")
    md.append("**Verdict: %s**%s. RSS: growth over the last %.3g min (least-squares fit of the samples "
              "under load) below %.1f MiB; descriptors: quiet end within %d of quiet start."
              % (r["verdict"], "" if r["judged"] else " (a run under %d minutes is too short to judge: "
                 "indicative only)" % JUDGED_MINUTES, r["window_s"] / 60, r["rss_allowed"] / MiB, r["fd_slack"]))
    if r["died"]:
        md.append("")
        md.append("**Stopped early: %s**" % r["died"])
    md.append("")
    md.append("## Memory and descriptors")
    md.append("")
    md.append("Start, middle and end are taken quiet (traffic paused, descriptors settled); start is after "
              "the warm-up. Peak: the highest of the samples taken every second. The slopes are least-squares "
              "fits of the samples under load after the warm-up. CPU: share of one core over the run.")
    md.append("")
    md.append("| process | RSS start / middle / end (MiB) | peak | RSS slope (MiB/10 min) | growth, last %.3g min "
              "| fds start / middle / end | fds slope (/10 min) | CPU | flat |" % (r["window_s"] / 60))
    md.append("|---|---|---|---|---|---|---|---|---|")
    for name, p in r["processes"].items():
        cp = p["checkpoints"]
        rss = " / ".join(_mib(cp[k]["rss"]) if k in cp else "-" for k in ("start", "middle", "end"))
        fds = " / ".join(str(cp[k]["fds"]) if k in cp else "-" for k in ("start", "middle", "end"))
        fds += " (peak %s)" % p["peak_fds"]
        md.append("| %s | %s | %s | %s | %s MiB | %s | %s | %s%% | %s |" % (
            "steady client" if name == "client" else name, rss, _mib(p["peak_rss"]),
            _f(p["rss_mib_per_10min"], "%+.2f"), _f(None if p["window_growth"] is None else p["window_growth"] / MiB,
                                                     "%+.2f"),
            fds, _f(p["fds_per_10min"], "%+.1f"), _f(p["cpu_percent"], "%.0f"),
            "yes" if p["rss_flat"] and p["fds_flat"] else
            "no (%s)" % ", ".join(x for x, ok in (("RSS", p["rss_flat"]), ("fds", p["fds_flat"])) if not ok)))
    md.append("")
    md.append("## Traffic")
    md.append("")
    md.append("Every payload is checked byte for byte (uploads by SHA-256). Failures are put down to a "
              "cause when the operation was under way while it happened (or began up to 2 s after): "
              "\"%s\", the reconnecting client being stopped (its streams are reset, by design); "
              "\"%s\", a hostile client's tunnel, registered in group default by its HELLO, dropped "
              "for its next frame (a stream the gateway gave it in between fails). \"errors\" are the "
              "rest." % (CLIENT_STOP, HOSTILE_TUNNEL))
    md.append("")
    md.append("| kind | ok | MiB verified | errors | %s | %s |" % (CLIENT_STOP, HOSTILE_TUNNEL))
    md.append("|---|---|---|---|---|---|")
    keys = ("ok", "errors", "errors_around_client_stops", "errors_around_hostile_tunnels")
    for kind, t in r["traffic"].items():
        md.append("| %s | %d | %.1f | %d | %d | %d |" % (kind, t["ok"], t["bytes"] / MiB, t["errors"],
                                                       t["errors_around_client_stops"],
                                                       t["errors_around_hostile_tunnels"]))
    tot = {k: sum(t[k] for t in r["traffic"].values()) for k in keys}
    md.append("| **total** | %d | | %d | %d | %d |" % tuple(tot[k] for k in keys))
    md.append("")
    reasons = [(k, t["reasons"]) for k, t in r["traffic"].items() if t["reasons"]]
    if reasons:
        md.append("Failure reasons:")
        md.append("")
        for kind, rs in reasons:
            md.append("- %s: %s" % (kind, "; ".join("%s (%d)" % kv for kv in rs.items())))
        md.append("")
    if r["notes"]:
        md.append("Also: %s." % "; ".join("%s: %d" % kv for kv in sorted(r["notes"].items())))
        md.append("")
    md.append("## Reloads and restarts")
    md.append("")
    rl = r["reloads"]
    bad = [x for x in rl["records"] if not x["ok"]]
    md.append("- reloads: %d sent, %d fully checked (gateway and client logged \"reload applied\", the new "
              "password of `%s` worked and the old one was refused)%s" % (
                  rl["sent"], rl["ok"], ROTATING,
                  "; not ok: " + "; ".join(json.dumps(x) for x in bad[:5]) if bad else ""))
    rs = r["restarts"]
    sigs = collections.Counter(x["signal"] for x in rs["records"] if x["signal"])
    md.append("- reconnecting client: %d restarts (%s), each with a new client_id; on the status page after "
              "%s s (median), %s s (max); never seen: %d" % (
                  rs["count"], ", ".join("%s %d" % kv for kv in sorted(sigs.items())),
                  _f(rs["registered_median_s"]), _f(rs["registered_max_s"]), rs["not_registered"]))
    final = r["final"]
    md.append("- tunnels on the status page at the end: %s (active streams %s)" % (
        final.get("tunnels"), final.get("active_streams")))
    md.append("")
    md.append("## Hostile client")
    md.append("")
    h = r["hostile"]
    md.append("%d complete rounds of every action below; outcomes with their counts (unexpected ones in bold)."
              % h["iterations"])
    md.append("")
    md.append("| action | outcomes |")
    md.append("|---|---|")
    for action, outcomes in h["outcomes"].items():
        unexpected = h["unexpected"].get(action, {})
        md.append("| %s | %s |" % (action, ", ".join(
            ("**%s: %d**" if o in unexpected else "%s: %d") % (o, n) for o, n in outcomes.items())))
    md.append("")
    md.append("Slowloris (1 byte per second, given up after %g s):" % SLOW_MAX)
    md.append("")
    for target, s in h["slowloris"].items():
        dropped = s["dropped"]
        md.append("- %s: %d connections; dropped by the server after %s s (median of %d); held to the end: %d" % (
            target, s["connections"], _f(statistics.median(dropped) if dropped else None, "%.0f"),
            len(dropped), s["held"]))
    md.append("")
    md.append("## Logs (log.level info)")
    md.append("")
    for name, lg in r["logs"].items():
        md.append("- %s: %d lines (%.1f MiB), %d errors, %d warnings, %d tracebacks" % (
            name, lg["lines"], lg["bytes"] / MiB, lg["errors"], lg["warnings"], lg["tracebacks"]))
        for s in lg["samples"]:
            md.append("  - `%s` after `%s`" % (s["exception"], s["after"]))
    md.append("")
    md.append("## Samples")
    md.append("")
    md.append("| t (s) | gateway RSS (MiB) | gateway fds | client RSS (MiB) | client fds | |")
    md.append("|---|---|---|---|---|---|")
    step = max(1, int(round(60 / r["sample_every_s"]))) if r["duration_s"] > 600 else 1
    rows = r["samples"][::step]
    if r["samples"] and rows[-1] is not r["samples"][-1]:
        rows.append(r["samples"][-1])
    for s in rows:
        md.append("| %.0f | %.1f | %d | %.1f | %d | %s |" % (s["t"], s["gateway_rss"] / MiB, s["gateway_fds"],
                                                          s["client_rss"] / MiB, s["client_fds"],
                                                          "quiet" if s["quiet"] else ""))
    md.append("")
    if step > 1:
        md.append("(one sample a minute; every sample is in the JSON file)")
        md.append("")
    text = "\n".join(md)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "soak-latest.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "soak-latest.json"), "w") as f:
        json.dump(r, f, indent=1, default=str)
    return text


def console_summary(r):
    print()
    print("verdict: %s%s (RSS growth allowed over the last %.3g min: %.1f MiB; fds: within %d)" % (
        r["verdict"], "" if r["judged"] else ", indicative only (run under %d minutes)" % JUDGED_MINUTES,
        r["window_s"] / 60, r["rss_allowed"] / MiB, r["fd_slack"]))
    for name, p in r["processes"].items():
        cp = p["checkpoints"]
        print("  %-8s RSS %s MiB (start/middle/end), slope %s MiB/10 min, growth in window %s MiB; "
              "fds %s, slope %s/10 min; CPU %s%%" % (
                  name, "/".join(_mib(cp[k]["rss"]) if k in cp else "-" for k in ("start", "middle", "end")),
                  _f(p["rss_mib_per_10min"], "%+.2f"),
                  _f(None if p["window_growth"] is None else p["window_growth"] / MiB, "%+.2f"),
                  "/".join(str(cp[k]["fds"]) if k in cp else "-" for k in ("start", "middle", "end")),
                  _f(p["fds_per_10min"], "%+.1f"), _f(p["cpu_percent"], "%.0f")))
    for kind, t in r["traffic"].items():
        print("  %-16s ok %6d  errors %d  (+%d around client stops, +%d around hostile tunnels)%s" % (
            kind, t["ok"], t["errors"], t["errors_around_client_stops"], t["errors_around_hostile_tunnels"],
            "  " + "; ".join("%s (%d)" % kv for kv in list(t["reasons"].items())[:3]) if t["reasons"] else ""))
    print("  reloads %d sent, %d ok; client restarts %d (never registered: %d); hostile rounds %d" % (
        r["reloads"]["sent"], r["reloads"]["ok"], r["restarts"]["count"], r["restarts"]["not_registered"],
        r["hostile"]["iterations"]))
    unexpected = r["hostile"]["unexpected"]
    if unexpected:
        print("  hostile, unexpected outcomes: %s" % "; ".join(
            "%s: %s" % (a, ", ".join("%s (%d)" % kv for kv in c.items())) for a, c in unexpected.items()))
    for name, lg in r["logs"].items():
        print("  %s log: %d lines, %d errors, %d tracebacks%s" % (
            name, lg["lines"], lg["errors"], lg["tracebacks"],
            "".join("\n      %s  (after: %s)" % (s["exception"], s["after"]) for s in lg["samples"])))


# ---------------------------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description="AnyProxy soak run: RSS and descriptors under mixed traffic, "
                                                 "restarts, reloads and a hostile client.")
    parser.add_argument("--minutes", type=float, default=30, help="length of the run (default 30)")
    parser.add_argument("--warmup", type=float, help="seconds before the start figures (default: 60, "
                                                     "or a quarter of a shorter run)")
    parser.add_argument("--restart-every", type=float, default=10,
                        help="seconds between restarts of the reconnecting client (default 10)")
    parser.add_argument("--reload-every", type=float, default=60, help="seconds between reloads (default 60)")
    parser.add_argument("--sample-every", type=float, default=10, help="seconds between samples (default 10)")
    parser.add_argument("--pace", type=float, default=0.2,
                        help="each traffic thread waits up to this many seconds between operations (default 0.2)")
    parser.add_argument("--out", help="results directory (default benchmarks/results for runs of %d minutes "
                                      "or more, benchmarks/results/scratch otherwise)" % FULL_MINUTES)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--serve-targets", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--http", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--udp", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS if args.minutes >= FULL_MINUTES else os.path.join(RESULTS, "scratch")
    return args


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def git_commit():
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "anyproxy"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + (" (anyproxy/ modified)" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main():
    args = parse_args()
    if args.serve_targets:
        try:
            asyncio.run(serve_targets(args))
        except KeyboardInterrupt:
            pass
        return 0
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    harness = Harness(keep=args.keep)
    import atexit
    atexit.register(harness.close)
    soak = Soak(args, harness)
    soak.started = datetime.datetime.now()
    soak.commit = git_commit()
    try:
        soak.start()
        try:
            soak.run()
        except SoakError as e:
            soak.died = str(e).splitlines()[0]
            log("soak stopped early: %s", e)
            soak.ctl.stop.set()
            soak.ctl.resume()
            soak.duration = time.time() - soak.t0
            soak.final = {}
        report = summarize(soak)
        soak.ctl.stop.set()
        harness.close()
        write_report(report, args.out)
        console_summary(report)
        print()
        print("wrote %s and soak-latest.json" % os.path.relpath(os.path.join(args.out, "soak-latest.md")))
        if report["died"]:
            return 1
        return 0 if report["verdict"] == "flat" or not report["judged"] else 1
    except SoakError as e:
        print("soak failed: %s" % e, file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        print("interrupted: stopping everything", file=sys.stderr)
        raise
    finally:
        soak.ctl.stop.set()
        harness.close()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
