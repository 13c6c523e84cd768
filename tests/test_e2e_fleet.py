"""
A fleet end to end with real processes on loopback (issue 16, "Proof"):
three twistd gateways sharing one redis-server, HAProxy (Debian's, with
deploy/haproxy/anyproxy.cfg) in front of their tunnel, SOCKS5 and HTTP
ports, and two twistd clients of different groups that know only HAProxy's
tunnel address.

Each test builds the whole fleet afresh (L{Fleet}) and tears it down.
"""

import hashlib
import json
import os
import select
import shutil
import socket
import sys
import threading
import time

import trustme
import yaml
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from tests.ports import free_port
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.support import AnswerAfterEOF, Echo, TestPKI, basic_token, blob, listen_tcp, web_site
from tests.test_deploy import BACKENDS, CSV_STATUS, HAPROXY_CONFIG, haproxy_env
from tests.test_e2e_tcp import recv_all, socks_connect
from tests.test_e2e_twistd import ROOT, TWISTD, ProcessWatcher, port_open, sleep
from tests.test_e2e_udp import UdpEcho, listen_udp

MB = 1024 * 1024
BULK = 20 * MB  # once per group and proxy kind through HAProxy
DIRECT = 2 * MB  # on each gateway's own ports, per group and proxy kind
HEARTBEAT = 1.0  # gateway.fleet.heartbeat: a silent node leaves within 3 s
KEEP_PEERS = 3.0  # gateway.fleet.keep_peers: the view kept while Redis is away
# gateway.drain_delay: twice the 2.5 s deploy/haproxy/anyproxy.cfg takes to
# see /ready fail (inter 2 s + fastinter 0.5 s), so no connection HAProxy
# sends reaches a closing listener; drain_timeout bounds the whole drain.
DRAIN_DELAY = 5.0
DRAIN_TIMEOUT = 10.0
RECONNECT_MAX = 1.0  # client.reconnect_max_delay: the client's backoff bound
DOWNLOAD_RATE = 2 * 1024 * 1024  # bytes/s the download through a draining gateway is read at
GROUPS = ("alpha", "beta")
NODES = ("gw1", "gw2", "gw3")
K = 2
STATUS_LOGIN = ("ops", "status-pw-e2e")


def haproxy_path():
    path = shutil.which("haproxy", path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"]))
    if path is None or not os.path.exists(REDIS_SERVER):
        raise unittest.SkipTest("haproxy and redis-server are needed (Debian packages haproxy "
                                "and redis-server; .ci/run installs them)")
    return path


def user(group):
    return "user-" + group, "pw-" + group


# -- blocking helpers, run in threads ------------------------------------------------

def socks_fetch_hash(proxy_port, group, target_port, size):
    """SHA-256 and length of an HTTP/1.0 download of C{/blob/SIZE} through SOCKS5."""
    name, password = user(group)
    sock = socks_connect(proxy_port, "127.0.0.1", target_port, username=name,
                         password=password, timeout=30)
    try:
        sock.sendall(b"GET /blob/%d HTTP/1.0\r\nHost: target\r\n\r\n" % size)
        return _body_digest(sock)
    finally:
        sock.close()


def http_fetch_hash(proxy_port, group, target_port, size):
    """SHA-256 and length of C{/blob/SIZE} through the HTTP proxy (an absolute-URI GET)."""
    name, password = user(group)
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
    try:
        sock.sendall(b"GET http://127.0.0.1:%d/blob/%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                     b"Proxy-Authorization: Basic %s\r\nConnection: close\r\n\r\n"
                     % (target_port, size, target_port, basic_token(name, password).encode()))
        return _body_digest(sock)
    finally:
        sock.close()


def _body_digest(sock, pace=None):
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed in the response head: %r" % (head,))
        head += chunk
    head, _, body = head.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise AssertionError("not a 200 response: %r" % (head,))
    digest = hashlib.sha256(body)
    count = len(body)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return digest.hexdigest(), count
        digest.update(chunk)
        count += len(chunk)
        if pace is not None:
            pace(count)


def half_close(proxy_port, group, answer_port, payload):
    """Send C{payload} through SOCKS5, half-close, and read the target's answer."""
    name, password = user(group)
    sock = socks_connect(proxy_port, "127.0.0.1", answer_port, username=name,
                         password=password)
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)
    finally:
        sock.close()


def udp_echo(proxy_port, group, echo_port, payload):
    """One datagram through a UDP ASSOCIATE to a UDP echo server, and its answer."""
    import socks
    name, password = user(group)
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, rdns=True, username=name,
                   password=password)
    sock.settimeout(10)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(payload, ("127.0.0.1", echo_port))
        return sock.recvfrom(70000)[0]
    finally:
        sock.close()


def echo_round(sock, payload):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def closing_times(socks, timeout, since):
    """
    For each of C{socks} (which the far end sends nothing on), the seconds
    from C{since} (C{time.monotonic()}) until the far end closed or reset
    it, or C{None} if it was still open after C{timeout} seconds.
    """
    ends = [None] * len(socks)
    deadline = since + timeout
    while None in ends and time.monotonic() < deadline:
        waiting = [sock for index, sock in enumerate(socks) if ends[index] is None]
        readable, _, _ = select.select(waiting, [], [], max(0, deadline - time.monotonic()))
        for sock in readable:
            try:
                sock.recv(65536)
            except ConnectionResetError:
                pass
            ends[socks.index(sock)] = time.monotonic() - since
    return ends


# -- the processes ----------------------------------------------------------------------

class Gateway:
    """One gateway node: its ports, config file and twistd process (or none)."""

    def __init__(self, node_id, config_path, ports):
        self.node_id = node_id
        self.config_path = config_path
        self.ports = ports
        self.process = None


class Fleet:
    """
    Everything of one test: certificates, targets, Redis, three gateways,
    HAProxy and two clients; every process is killed (and awaited) at
    cleanup, and no process output may show a secret.
    """

    def __init__(self, testcase):
        self.testcase = testcase
        self.haproxy = haproxy_path()
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self.watchers = []
        self.tunnel_pki = TestPKI(os.path.join(self.directory, "tunnel-pki"))
        fleet_ca = trustme.CA(organization_unit_name="anyproxy fleet CA")
        self.fleet_ca_path = self._write("fleet-ca.crt", fleet_ca.cert_pem.bytes())
        self.targets()
        self.gateways = {}
        for node_id in NODES:
            cert = fleet_ca.issue_cert("127.0.0.1", common_name=node_id)
            cert_path = self._write(node_id + "-peer.crt",
                                    b"".join(pem.bytes() for pem in cert.cert_chain_pems))
            key_path = self._write(node_id + "-peer.key", cert.private_key_pem.bytes())
            ports = {kind: free_port() for kind in ("tunnel", "socks", "http", "peer", "status",
                                                    "metrics")}
            gateway = Gateway(node_id, os.path.join(self.directory, node_id + ".yaml"), ports)
            gateway.peer_files = (cert_path, key_path)
            self.gateways[node_id] = gateway
        self.front = {kind: free_port() for kind in ("tunnel", "socks", "http", "stats")}
        self.clients = {}

    def _write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def targets(self):
        self.web = listen_tcp(self.testcase, web_site()).getHost().port
        self.echo = listen_tcp(self.testcase,
                               protocol.Factory.forProtocol(Echo)).getHost().port
        self.answer = listen_tcp(self.testcase,
                                 protocol.Factory.forProtocol(AnswerAfterEOF)).getHost().port
        self.udp_echo = listen_udp(self.testcase, UdpEcho())

    # -- configs ---------------------------------------------------------------------

    def gateway_config(self, gateway):
        ports = gateway.ports
        return {
            "proxy": {
                "socks5": {"listen_addr": "127.0.0.1:%d" % ports["socks"], "users": "all"},
                "http": {"listen_addr": "127.0.0.1:%d" % ports["http"], "users": "all"},
            },
            "gateway": {
                "listen_addr": "127.0.0.1:%d" % ports["tunnel"],
                "tls_cert": self.tunnel_pki.cert_path, "tls_key": self.tunnel_pki.key_path,
                "clients": [
                    {"username": "tunnel-" + group, "password": "tunnel-pw-" + group,
                     "groups": [group], "client_ids": ["client-" + group]}
                    for group in GROUPS],
                "users": [{"username": user(group)[0], "password": user(group)[1],
                           "group": group} for group in GROUPS],
                "ping_interval": 1, "no_tunnel_wait": 3, "drain_timeout": DRAIN_TIMEOUT,
                "drain_delay": DRAIN_DELAY,
                # GET /ready, HAProxy's health check of all three backends.
                "metrics_addr": "127.0.0.1:%d" % ports["metrics"],
                "status_addr": "127.0.0.1:%d" % ports["status"],
                "status_username": STATUS_LOGIN[0], "status_password": STATUS_LOGIN[1],
                "fleet": {
                    "redis": self.redis.url, "node_id": gateway.node_id,
                    "peer_addr": "127.0.0.1:%d" % ports["peer"], "peer_ca": self.fleet_ca_path,
                    "peer_cert": gateway.peer_files[0], "peer_key": gateway.peer_files[1],
                    "heartbeat": HEARTBEAT, "keep_peers": KEEP_PEERS,
                },
            },
            "log": {"level": "info"},
        }

    def client_config(self, group):
        return {
            "client": {
                "gateway_addr": "127.0.0.1:%d" % self.front["tunnel"],
                "gateway_tls_cert": self.tunnel_pki.ca_path, "client_id": "client-" + group,
                "group_id": group, "auth_username": "tunnel-" + group,
                "auth_password": "tunnel-pw-" + group, "gateways_per_client": K,
                "ping_interval": 1, "connect_timeout": 2, "reconnect_initial_delay": 0.2,
                "reconnect_max_delay": RECONNECT_MAX,
            },
            "log": {"level": "info"},
        }

    # -- processes -------------------------------------------------------------------

    def spawn(self, executable, args, env=None, path=None, name=None):
        """Start a process, killed and awaited at cleanup; its output is kept in NAME.log."""
        watcher = ProcessWatcher()
        watcher.transport = reactor.spawnProcess(watcher, executable, (executable,) + args,
                                                 env=env or {}, path=path)
        self.watchers.append(watcher)
        number = len(self.watchers)

        def stop():
            if not watcher.ended.called:
                try:
                    watcher.transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass
            return watcher.ended.addCallback(keep_output)

        def keep_output(_):
            with open(os.path.join(self.directory, "%s-%d.log" % (
                    name or os.path.basename(executable), number)), "w") as f:
                f.write(watcher.text())

        self.testcase.addCleanup(stop)
        return watcher

    def twistd(self, plugin, config_path):
        env = {"PYTHONPATH": ROOT, "PATH": os.environ.get("PATH", "")}
        return self.spawn(sys.executable, TWISTD + ("-n", "--pidfile=", plugin,
                                                    "--config=" + config_path), env, ROOT,
                          name=os.path.splitext(os.path.basename(config_path))[0])

    @defer.inlineCallbacks
    def start(self):
        """Redis, the three gateways (registered), HAProxy, then both clients attached."""
        self.redis = yield RedisServer.started(self.testcase)
        for gateway in self.gateways.values():
            with open(gateway.config_path, "w") as f:
                yaml.safe_dump(self.gateway_config(gateway), f)
        yield defer.gatherResults([self.start_gateway(node) for node in NODES])
        env = haproxy_env([dict({kind: g.ports[kind] for kind in ("tunnel", "socks", "http")},
                                ready=g.ports["metrics"])
                           for g in self.gateways.values()],
                          {kind: self.front[kind] for kind in ("tunnel", "socks", "http")},
                          self.front["stats"])
        self.haproxy_process = self.spawn(self.haproxy, ("-db", "-f", HAPROXY_CONFIG), env)
        yield self.wait_until(lambda: all(port_open(self.front[kind])
                                          for kind in ("tunnel", "socks", "http")), 10)
        for group in GROUPS:
            path = os.path.join(self.directory, "client-%s.yaml" % (group,))
            with open(path, "w") as f:
                yaml.safe_dump(self.client_config(group), f)
            self.clients[group] = self.twistd("anyproxy-client", path)
        yield self.wait_attached()

    @defer.inlineCallbacks
    def start_gateway(self, node_id):
        """Start gateway C{node_id} and wait until it is registered in Redis."""
        gateway = self.gateways[node_id]
        gateway.process = self.twistd("anyproxy-gateway", gateway.config_path)
        yield self.wait_until(lambda: self.registered(node_id), 30,
                              why=lambda: "%s registered:\n%s" % (node_id,
                                                                  gateway.process.text()))

    @defer.inlineCallbacks
    def balanced(self, node_id):
        """Whether HAProxy has gateway C{node_id} UP in every backend (its /ready answered)."""
        agent = Agent(reactor, connectTimeout=2)
        response = yield agent.request(b"GET", b"http://127.0.0.1:%d/;csv" % self.front["stats"])
        rows = [row.split(",") for row in (yield readBody(response)).decode().splitlines()]
        found = {row[0]: row[CSV_STATUS] for row in rows if len(row) > CSV_STATUS
                 and row[1] == node_id}
        return all(found.get(backend) == "UP" for backend in BACKENDS)

    @defer.inlineCallbacks
    def registered(self, node_id):
        record = yield self.redis_cli("GET", "anyproxy:node:" + node_id)
        if not record:
            return False
        return not json.loads(record).get("draining")

    @defer.inlineCallbacks
    def redis_cli(self, *args):
        out, err, code = yield getProcessOutputAndValue(
            "/usr/bin/redis-cli", ("-h", "127.0.0.1", "-p", str(self.redis.port)) + args)
        return out.decode().strip() if code == 0 else None

    @defer.inlineCallbacks
    def wait_until(self, check, timeout=20, interval=0.1, why=None):
        deadline = time.monotonic() + timeout
        while True:
            if (yield defer.maybeDeferred(check)):
                return
            if time.monotonic() > deadline:
                raise AssertionError("not met within %gs: %s" % (
                    timeout, why() if why else getattr(check, "__name__", check)))
            yield sleep(interval)

    @defer.inlineCallbacks
    def status(self, node_id):
        """Gateway C{node_id}'s C{/api/status}, or C{None} if it does not answer."""
        agent = Agent(reactor, connectTimeout=2)
        headers = Headers({b"authorization": [b"Basic " + basic_token(*STATUS_LOGIN).encode()]})
        try:
            response = yield agent.request(
                b"GET", b"http://127.0.0.1:%d/api/status" % self.gateways[node_id].ports["status"],
                headers)
            body = yield readBody(response)
        except Exception:
            return None
        return json.loads(body) if response.code == 200 else None

    @defer.inlineCallbacks
    def holders(self):
        """C{{group: set(node ids)}}: where each client has tunnels, from every /api/status."""
        found = {group: set() for group in GROUPS}
        for node_id, gateway in sorted(self.gateways.items()):
            if gateway.process is None or gateway.process.ended.called:
                continue
            snapshot = yield self.status(node_id)
            for entry in (snapshot or {}).get("clients", ()):
                if entry["group"] in found:
                    found[entry["group"]].add(node_id)
        return found

    @defer.inlineCallbacks
    def wait_attached(self, timeout=20):
        """Until each client has tunnels to exactly K distinct live gateways; returns them."""
        last = {}

        @defer.inlineCallbacks
        def check():
            last.update((yield self.holders()))
            return all(len(last[group]) == K for group in GROUPS)

        yield self.wait_until(check, timeout, interval=0.25, why=lambda: "K=%d per client: %r\n%s"
                              % (K, last, self.logs()))
        return last

    def live(self):
        return [node for node, g in sorted(self.gateways.items())
                if g.process is not None and not g.process.ended.called]

    def assert_no_secrets(self):
        for watcher in self.watchers:
            text = watcher.text()
            for secret in ("tunnel-pw-", "pw-alpha", "pw-beta", STATUS_LOGIN[1]):
                self.testcase.assertNotIn(secret, text)

    def logs(self):
        """The end of every gateway's and client's output, for failure messages."""
        processes = [(node, g.process) for node, g in sorted(self.gateways.items())
                     if g.process is not None]
        processes += [("client-" + group, watcher) for group, watcher in
                      sorted(self.clients.items())]
        return "\n".join("== %s\n%s" % (name, watcher.text()[-3000:])
                         for name, watcher in processes)


class FleetTestCase(unittest.TestCase):

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.fleet = Fleet(self)
        yield self.fleet.start()

    def tearDown(self):
        self.fleet.assert_no_secrets()

    def socks_port(self, node_id=None):
        if node_id is None:
            return self.fleet.front["socks"]
        return self.fleet.gateways[node_id].ports["socks"]

    def http_port(self, node_id=None):
        if node_id is None:
            return self.fleet.front["http"]
        return self.fleet.gateways[node_id].ports["http"]

    @defer.inlineCallbacks
    def check_echo(self, port, group, payload=b"ping"):
        name, password = user(group)

        def run():
            sock = socks_connect(port, "127.0.0.1", self.fleet.echo, username=name,
                                 password=password, timeout=10)
            try:
                return echo_round(sock, payload)
            finally:
                sock.close()

        got = yield deferToThread(run)
        self.assertEqual(got, payload)


class ServingTests(FleetTestCase):
    """Every gateway, directly and through HAProxy, serves users of both groups."""

    @defer.inlineCallbacks
    def test_every_gateway_serves_both_groups(self):
        """
        Each client holds tunnels to exactly K gateways; on each gateway's
        own SOCKS5 and HTTP ports (local or relayed) and through HAProxy,
        both groups' users download intact (DIRECT bytes on each gateway's
        ports, BULK through HAProxy), half-close, and echo a datagram.
        """
        fleet = self.fleet
        holders = yield fleet.wait_attached()
        print("\ntunnels: %s" % ({g: sorted(n) for g, n in holders.items()},))
        for group in GROUPS:
            # Each group is held by K of the 3: the third relays it.
            self.assertEqual(len(holders[group]), K)
            keys = yield fleet.redis_cli("ZRANGE", "anyproxy:group:" + group, "0", "-1")
            self.assertEqual(set(keys.split()), holders[group])

        want = {size: (hashlib.sha256(blob(size)).hexdigest(), size) for size in (DIRECT, BULK)}
        for group in GROUPS:
            for node_id in [None] + list(NODES):
                where = "group %s via %s" % (group, node_id or "haproxy")
                size = BULK if node_id is None else DIRECT
                started = time.monotonic()
                got = yield deferToThread(socks_fetch_hash, self.socks_port(node_id), group,
                                          fleet.web, size)
                self.assertEqual(got, want[size], where + " (socks5)")
                got = yield deferToThread(http_fetch_hash, self.http_port(node_id), group,
                                          fleet.web, size)
                self.assertEqual(got, want[size], where + " (http)")
                if node_id is None:
                    print("%d MB through socks5 and %d MB through http, %s: %.2f s" % (
                        size // MB, size // MB, where, time.monotonic() - started))
                payload = os.urandom(300_000)
                answer = yield deferToThread(half_close, self.socks_port(node_id), group,
                                             fleet.answer, payload)
                self.assertEqual(answer, b"%d %s\n" % (
                    len(payload), hashlib.sha256(payload).hexdigest().encode()), where)
                datagram = b"datagram for " + where.encode()
                echoed = yield deferToThread(udp_echo, self.socks_port(node_id), group,
                                             fleet.udp_echo, datagram)
                self.assertEqual(echoed, datagram, where + " (udp)")


class GatewayKilledTests(FleetTestCase):
    """kill -9 of a gateway holding a group's tunnel."""

    @defer.inlineCallbacks
    def test_relayed_streams_reset_and_service_resumes(self):
        """
        The relayed streams of users on the gateway that does not hold the
        group are reset promptly when the holder they go through is killed,
        and new streams succeed on every remaining gateway within three
        heartbeats plus the client's backoff.
        """
        fleet = self.fleet
        holders = yield fleet.wait_attached()
        group = "alpha"
        relaying = (set(NODES) - holders[group]).pop()
        # Live relayed streams from the relaying node; find the holder they cross.
        name, password = user(group)

        def open_streams(count):
            socks = []
            for index in range(count):
                sock = socks_connect(self.socks_port(relaying), "127.0.0.1", fleet.echo,
                                     username=name, password=password, timeout=10)
                socks.append(sock)
                if echo_round(sock, b"live %d" % index) != b"live %d" % index:
                    raise AssertionError("no echo before the kill")
            return socks

        streams = yield deferToThread(open_streams, 4)
        self.addCleanup(lambda: [sock.close() for sock in streams])
        busy = {}
        for node_id in holders[group]:
            snapshot = yield fleet.status(node_id)
            busy[node_id] = sum(entry["active_streams"] for entry in snapshot["clients"]
                                if entry["group"] == group)
        victim = max(busy, key=busy.get)
        self.assertGreater(busy[victim], 0, busy)
        survivor = (holders[group] - {victim}).pop()

        killed_at = time.monotonic()
        fleet.gateways[victim].process.transport.signalProcess("KILL")
        yield fleet.gateways[victim].process.ended

        # The streams crossing the victim end at once (its TCP close); those
        # the balance put on the survivor, if any, go on.  Meanwhile: the
        # failover, until the first good stream from the relaying node.
        closing = deferToThread(closing_times, streams, 3 * HEARTBEAT + 1, killed_at)
        bound = 3 * HEARTBEAT + RECONNECT_MAX + 2  # + slack for a loaded machine
        first = None
        while first is None:
            try:
                yield self.check_echo(self.socks_port(relaying), group)
                first = time.monotonic() - killed_at
            except Exception:
                if time.monotonic() - killed_at > bound:
                    raise
                yield sleep(0.05)
        for node_id in sorted(set(NODES) - {victim}):
            for port in (self.socks_port(node_id), self.socks_port(None)):
                yield self.check_echo(port, group)
        all_served = time.monotonic() - killed_at
        ends = yield closing
        reset = [index for index, seconds in enumerate(ends) if seconds is not None]
        print("\nrelayed streams via the killed %s: %d of %d reset, after %s s"
              % (victim, len(reset), len(streams),
                 ", ".join("%.2f" % ends[index] for index in reset)))
        self.assertEqual(len(reset), busy[victim], (ends, busy))
        for index, sock in enumerate(streams):
            if index not in reset:
                self.assertEqual((yield deferToThread(echo_round, sock, b"still")), b"still")

        print("failover (kill -9 of %s -> first good relayed stream from %s via %s): "
              "%.2f s; every remaining gateway and HAProxy serving after %.2f s"
              % (victim, relaying, survivor, first, all_served))
        self.assertLess(all_served, bound)

        # The client attaches to the next gateway by rank within its backoff,
        # and the dead node leaves the registry within three heartbeats.
        fleet.gateways[victim].process = None
        yield fleet.wait_until(lambda: fleet.redis_cli("GET", "anyproxy:node:" + victim)
                               .addCallback(lambda record: not record), 3 * HEARTBEAT + 2)
        holders = yield fleet.wait_attached(timeout=3 * HEARTBEAT + RECONNECT_MAX + 5)
        self.assertNotIn(victim, holders[group])
        print("after the kill the clients hold: %s" % ({g: sorted(n) for g, n in
                                                        holders.items()},))


class RedisKilledTests(FleetTestCase):
    """Redis killed: local routing goes on; relayed routing returns with Redis."""

    @defer.inlineCallbacks
    def test_local_keeps_working_relay_returns(self):
        """
        With Redis killed, a user on a gateway holding the group's tunnel is
        served throughout; once the kept view has expired (keep_peers) the
        gateway without the group refuses with no tunnel, and when Redis is
        restarted on the same port it relays again by itself.
        """
        fleet = self.fleet
        holders = yield fleet.wait_attached()
        group = "alpha"
        holder = sorted(holders[group])[0]
        relaying = (set(NODES) - holders[group]).pop()
        yield self.check_echo(self.socks_port(relaying), group)

        yield fleet.redis.kill()
        killed_at = time.monotonic()
        # While the view is kept, relaying goes on; local routing always does.
        yield self.check_echo(self.socks_port(holder), group)
        yield self.check_echo(self.socks_port(relaying), group)
        yield sleep(max(0, KEEP_PEERS + 0.5 - (time.monotonic() - killed_at)))
        for _ in range(3):
            yield self.check_echo(self.socks_port(holder), group)
            yield self.check_echo(self.socks_port(holder), "alpha", os.urandom(100_000))
        import socks
        with self.assertRaises(socks.ProxyError):
            yield self.check_echo(self.socks_port(relaying), group)

        yield fleet.redis.start()
        restarted_at = time.monotonic()
        while True:
            try:
                yield self.check_echo(self.socks_port(relaying), group)
                break
            except Exception:
                if time.monotonic() - restarted_at > 15:
                    raise AssertionError("relaying did not come back:\n" + fleet.logs())
                yield sleep(0.1)
        print("\nrelayed routing back %.2f s after Redis restarted"
              % (time.monotonic() - restarted_at,))
        yield self.check_echo(self.socks_port(holder), group)
        for node_id in NODES:
            yield fleet.wait_until(lambda: fleet.registered(node_id), 5)


class RequestLoop:
    """
    Requests through HAProxy, one after another in a thread, alternating
    SOCKS5 (echo with half-close) and HTTP (a small download), both
    groups, until stopped; counts successes and keeps each failure.
    """

    def __init__(self, fleet):
        self.fleet = fleet
        self.ok = 0
        self.failures = []
        self._stop = threading.Event()

    def start(self):
        self.done = deferToThread(self._run)
        return self

    def stop(self):
        self._stop.set()
        return self.done

    def _run(self):
        fleet = self.fleet
        want = hashlib.sha256(blob(20_000)).hexdigest(), 20_000
        turn = 0
        while not self._stop.is_set():
            group = GROUPS[turn % 2]
            try:
                if turn % 4 < 2:
                    payload = b"loop %d " % turn * 100
                    answer = half_close(fleet.front["socks"], group, fleet.answer, payload)
                    if answer != b"%d %s\n" % (len(payload),
                                               hashlib.sha256(payload).hexdigest().encode()):
                        raise AssertionError("bad answer %r" % (answer,))
                else:
                    got = http_fetch_hash(fleet.front["http"], group, fleet.web, 20_000)
                    if got != want:
                        raise AssertionError("bad download %r" % (got,))
                self.ok += 1
            except Exception as e:
                self.failures.append("%s %s %s: %r" % (time.strftime("%H:%M:%S"), group,
                                                         "socks" if turn % 4 < 2 else "http", e))
            turn += 1


class RollingRestartTests(FleetTestCase):
    """Every gateway restarted with SIGTERM, one by one, under a request loop."""

    timeout = 180  # three drains of DRAIN_DELAY and more, each restart's attach

    @defer.inlineCallbacks
    def test_rolling_restart_fails_no_request(self):
        """
        SIGTERM each gateway in turn (drain), wait for its exit, start its
        replacement and wait until it is registered: the loop through
        HAProxy sees no failure, and a slow download through each draining
        gateway completes intact.
        """
        fleet = self.fleet
        loop = RequestLoop(fleet).start()
        stopped = False
        try:
            yield sleep(1)
            size = 4 * MB
            want = hashlib.sha256(blob(size)).hexdigest(), size
            for node_id in NODES:
                gateway = fleet.gateways[node_id]
                # A download that outlasts the SIGTERM: read at DOWNLOAD_RATE,
                # it takes about 2 s, well within the drain.
                started = threading.Event()

                def pace(count, started=started, clock=[]):
                    if not clock:
                        clock.append(time.monotonic())
                        started.set()
                    ahead = count / DOWNLOAD_RATE - (time.monotonic() - clock[0])
                    if ahead > 0:
                        time.sleep(ahead)

                def slow_download(node_id=node_id, pace=pace):
                    name, password = user("beta")
                    sock = socks_connect(self.socks_port(node_id), "127.0.0.1", fleet.web,
                                         username=name, password=password, timeout=30)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                    try:
                        sock.sendall(b"GET /blob/%d HTTP/1.0\r\nHost: t\r\n\r\n" % size)
                        return _body_digest(sock, pace)
                    finally:
                        sock.close()

                download = deferToThread(slow_download)
                yield fleet.wait_until(started.is_set, 10)
                signalled = time.monotonic()
                gateway.process.transport.signalProcess("TERM")
                got = yield download
                self.assertEqual(got, want, "download through draining %s" % (node_id,))
                yield gateway.process.ended
                print("\n%s drained and stopped in %.2f s (download intact)"
                      % (node_id, time.monotonic() - signalled))
                # Read at DOWNLOAD_RATE behind a small receive buffer, a cut
                # stream would have lost its tail: it finished within the drain.
                self.assertIn("drain started", gateway.process.text())
                self.assertIn("keep accepting for %gs (drain_delay)" % (DRAIN_DELAY,),
                              gateway.process.text())
                yield fleet.start_gateway(node_id)
                yield fleet.wait_attached(timeout=20)
                # As docs/FLEET.md says: the next one only once HAProxy sends
                # users to this one again.
                yield fleet.wait_until(lambda: fleet.balanced(node_id), 10)
            yield sleep(1)
            yield loop.stop()
            stopped = True
        finally:
            if not stopped:
                yield loop.stop()
        print("rolling restart: %d requests through HAProxy, %d failed"
              % (loop.ok, len(loop.failures)))
        self.assertEqual(loop.failures, [], "\n".join(loop.failures))
        self.assertGreater(loop.ok, 50)
