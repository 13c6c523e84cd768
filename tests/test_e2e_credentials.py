# -*- test-case-name: tests.test_e2e_credentials -*-
"""
End to end on loopback, with real clients: hashed passwords, rotation and
the brute-force defence (L{anyproxy.passwords}, L{anyproxy.auth.Logins},
L{anyproxy.login_throttle}).

  - curl (HTTP and SOCKS5) and PySocks log in with argon2id and bcrypt
    hashes; a client tunnel logs in with a hashed gateway.auth_password,
    the status page with a hashed status_password;
  - a SOCKS5 client that sends its request before the login is answered
    (a hash being checked) is served, and one that leaves meanwhile costs
    nothing but a log line;
  - a gateway.users entry and a gateway.clients entry with two passwords
    take both, then, reloaded with one, only that one;
  - 1,000 wrong passwords from 127.0.0.2 block that address (its correct
    password is then refused too) while a user at 127.0.0.1 is served at
    its usual speed and never blocked; the tunnel port and the status port
    count and block the same way; no password reaches a log event.

Hashes are made with cheap parameters so the tests stay fast.
"""

import socket
import statistics
import time

import argon2
import bcrypt
import socks
from twisted.internet import defer, endpoints, protocol, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from anyproxy.client.app import make_client_service
from anyproxy.config.load import load_config
from anyproxy.gateway.client_access import SHARED
from anyproxy.tunnel import frames
from tests.support import (
    CLIENT_PASSWORD, CLIENT_USER, PROXY_PASSWORD, Deployment, SecretWatch,
    listen_tcp, run_curl, web_site)

HELLO = b"hello from the target\n"
ARGON_PASSWORD = "argon-user-pw-7Q"
BCRYPT_PASSWORD = "bcrypt-user-pw-9Z"
STATUS_PASSWORD = "status-pw-4K"
WRONG = "wrong-guess-%04d"
ATTACKER = "127.0.0.2"


def argon2id(password):
    """A valid argon2id hash, cheap to check."""
    return argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(password)


def bcrypt_hash(password):
    """A valid bcrypt hash, at the lowest cost."""
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(4)).decode("ascii")


def userpass(username, password):
    """RFC 1929 username/password sub-negotiation, after the greeting offering it."""
    username, password = username.encode("utf-8"), password.encode("utf-8")
    return (b"\x05\x01\x02" + b"\x01" + bytes([len(username)]) + username
            + bytes([len(password)]) + password)


def connect_request(host, port):
    """A SOCKS5 CONNECT to a domain name."""
    host = host.encode("ascii")
    return b"\x05\x01\x00\x03" + bytes([len(host)]) + host + port.to_bytes(2, "big")


class _RawClient(protocol.Protocol):
    """Sends C{data} at once, then collects everything until the gateway closes or C{want} bytes."""

    def __init__(self, data, want=None, leave=False):
        self.data = data
        self.want = want
        self.leave = leave
        self.received = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)
        if self.leave:
            self.transport.abortConnection()

    def dataReceived(self, data):
        self.received += data
        if self.want is not None and len(self.received) >= self.want:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(self.received)


@defer.inlineCallbacks
def raw_socks(port, data, want=None, source="127.0.0.1", leave=False):
    """Send C{data} to the SOCKS5 port from C{source}; the bytes answered."""
    client = _RawClient(data, want, leave)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10,
                                            bindAddress=(source, 0))
    yield endpoints.connectProtocol(endpoint, client)
    received = yield client.done
    return received


class _Base(unittest.TestCase):
    timeout = 120

    users = ()
    gateway_extra = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        SecretWatch(self, secrets=[ARGON_PASSWORD, BCRYPT_PASSWORD, STATUS_PASSWORD,
                                   CLIENT_PASSWORD, PROXY_PASSWORD, WRONG % (1,),
                                   WRONG % (999,), "site-a-old-pw", "site-a-new-pw"])
        self.deployment = Deployment(self)
        self.web_port = listen_tcp(self, web_site()).getHost().port
        gateway = {
            "auth_password": argon2id(CLIENT_PASSWORD),
            "users": [{"username": "argon", "password": argon2id(ARGON_PASSWORD)},
                      {"username": "bcrypt", "password": bcrypt_hash(BCRYPT_PASSWORD)}],
            "status_addr": "127.0.0.1:0", "status_username": "operator",
            "status_password": bcrypt_hash(STATUS_PASSWORD),
            "auth_throttle": {"failures": 5, "window": 60, "block": 300},
        }
        gateway.update(self.gateway_extra)
        self.gateway_data = gateway
        yield self.deployment.start_gateway(gateway=gateway)
        self.addCleanup(self.deployment.gateway.logins.checker.stop)
        yield self.deployment.start_client()
        self.status_port = self.deployment.gateway.listeners["status page"].port.getHost().port

    def url(self):
        return "http://target.test:%d/hello" % (self.web_port,)

    @defer.inlineCallbacks
    def curl(self, proxy, *args):
        """curl through C{proxy}: C{(body, stderr as text, exit code)}."""
        out, err, code = yield run_curl("-x", proxy, *(args + (self.url(),)))
        return out, err.decode("utf-8", "replace"), code

    def proxy(self, scheme, username, password, port=None):
        if port is None:
            port = self.deployment.http_port if scheme == "http" else self.deployment.socks_port
        return "%s://%s:%s@127.0.0.1:%d" % (scheme, username, password, port)

    def status(self, username, password, source="127.0.0.1", path="/api/status"):
        """curl the status port: a Deferred firing with C{(http code, headers)}."""
        return run_curl("--interface", source, "-o", "/dev/null", "-D", "-",
                        "-w", "%{http_code}", "-u", "%s:%s" % (username, password),
                        "http://127.0.0.1:%d%s" % (self.status_port, path))

    def tunnel_handshake(self, username, password, source="127.0.0.1"):
        """curl a WebSocket opening handshake at the tunnel port: a Deferred firing with curl's output."""
        return run_curl(
            "--interface", source, "--cacert", self.deployment.pki.ca_path,
            "-o", "/dev/null", "-w", "%{http_code}", "-u", "%s:%s" % (username, password),
            "-H", "Connection: Upgrade", "-H", "Upgrade: websocket",
            "-H", "Sec-WebSocket-Version: 13", "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "-H", "Sec-WebSocket-Protocol: %s" % (frames.SUBPROTOCOL,),
            "https://127.0.0.1:%d/anyproxy" % (self.deployment.gateway_port,))

    def throttle_events(self):
        """C{{event: count}} of the gateway's Prometheus login-throttle series."""
        counts = {}
        for family in self.deployment.gateway.metrics.registry.collect():
            if family.name == "anyproxy_gateway_login_throttle_events":
                for sample in family.samples:
                    counts[sample.labels["event"]] = sample.value
        return counts


class HashedPasswordTests(_Base):
    """argon2id and bcrypt hashes wherever a password is configured."""

    @defer.inlineCallbacks
    def test_curl_http_and_socks5(self):
        """curl logs in with either hash on both proxies, twice (the second from the cache)."""
        for username, password in (("argon", ARGON_PASSWORD), ("bcrypt", BCRYPT_PASSWORD)):
            for scheme in ("http", "socks5h", "http", "socks5h"):
                out, err, code = yield self.curl(self.proxy(scheme, username, password))
                self.assertEqual((code, out), (0, HELLO), (scheme, username, err))
        self.assertGreaterEqual(self.deployment.gateway.logins.checker.hash_checks, 2)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong password against a hash gets 407 and the SOCKS5 authentication failure."""
        out, err, code = yield self.curl(self.proxy("http", "argon", WRONG % (1,)),
                                         "-o", "/dev/null", "-w", "%{http_code}")
        self.assertEqual(out, b"407")
        out, err, code = yield self.curl(self.proxy("socks5h", "bcrypt", WRONG % (1,)))
        self.assertNotEqual(code, 0)
        self.assertIn("rejected by the socks5 server", err.lower())

    @defer.inlineCallbacks
    def test_pysocks(self):
        """PySocks logs in with a bcrypt hash and fetches through the tunnel."""
        port = self.deployment.socks_port

        def fetch():
            connection = socks.socksocket()
            connection.set_proxy(socks.SOCKS5, "127.0.0.1", port, rdns=True,
                                 username="bcrypt", password=BCRYPT_PASSWORD)
            connection.settimeout(20)
            try:
                connection.connect(("target.test", self.web_port))
                connection.sendall(b"GET /hello HTTP/1.0\r\nHost: target.test\r\n\r\n")
                answer = b""
                while True:
                    data = connection.recv(65536)
                    if not data:
                        return answer
                    answer += data
            finally:
                connection.close()

        answer = yield threads.deferToThread(fetch)
        self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer[:100])
        self.assertTrue(answer.endswith(HELLO))

    @defer.inlineCallbacks
    def test_request_before_the_login_answer(self):
        """
        A client that sends greeting, login, CONNECT and payload at once is
        served, while its argon2id hash is checked in the thread pool.
        """
        self.deployment.gateway.logins.checker._good.clear()
        answer = yield raw_socks(
            self.deployment.socks_port,
            userpass("argon", ARGON_PASSWORD) + connect_request("target.test", self.web_port)
            + b"GET /hello HTTP/1.0\r\nHost: target.test\r\n\r\n")
        self.assertEqual(answer[:4], b"\x05\x02\x01\x00")  # method 0x02, login accepted
        self.assertEqual(answer[4:6], b"\x05\x00")  # CONNECT succeeded
        self.assertTrue(answer.endswith(HELLO), answer[-100:])

    @defer.inlineCallbacks
    def test_user_leaves_during_the_check(self):
        """A client gone while its hash is checked leaves no error behind."""
        checks = self.deployment.gateway.logins.checker.hash_checks
        yield raw_socks(self.deployment.socks_port,
                        userpass("argon", "left-" + ARGON_PASSWORD), leave=True)
        yield raw_socks(self.deployment.socks_port,
                        userpass("argon", ARGON_PASSWORD), leave=True)
        # Let the checks finish and their answers land on closed connections.
        deadline = time.monotonic() + 10
        while self.deployment.gateway.logins.checker.hash_checks < checks + 2 and \
                time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield task.deferLater(reactor, 0.5, lambda: None)
        out, err, code = yield self.curl(self.proxy("socks5h", "argon", ARGON_PASSWORD))
        self.assertEqual((code, out), (0, HELLO), err)

    @defer.inlineCallbacks
    def test_client_and_status_logins(self):
        """
        The client's tunnel came up with the hashed gateway.auth_password
        (setUp); the status page takes its bcrypt-hashed password, and
        refuses a wrong one with 401.
        """
        self.assertEqual(len(self.deployment.gateway.tunnel_pool.tunnels("default")), 1)
        out, _, _ = yield self.status("operator", STATUS_PASSWORD)
        self.assertTrue(out.endswith(b"200"), out)
        out, _, _ = yield self.status("operator", WRONG % (1,))
        self.assertTrue(out.endswith(b"401"), out)

    @defer.inlineCallbacks
    def test_client_leaves_during_the_check(self):
        """
        A client that sends its WebSocket handshake (its right password, a
        hash to check) and leaves at once leaves no error, and no place
        counted among the connections waiting for their HELLO.
        """
        import base64
        import ssl

        port, ca = self.deployment.gateway_port, self.deployment.pki.ca_path
        token = base64.b64encode(("%s:%s" % (CLIENT_USER, CLIENT_PASSWORD)).encode())

        def handshake_and_leave():
            context = ssl.create_default_context(cafile=ca)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as connection:
                    connection.sendall(
                        b"GET /anyproxy HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Protocol: " + frames.SUBPROTOCOL.encode() + b"\r\n"
                        b"Authorization: Basic " + token + b"\r\n\r\n")

        checker = self.deployment.gateway.logins.checker
        checker._good.clear()  # the client's login was remembered: check it again
        checks = checker.hash_checks
        yield threads.deferToThread(handshake_and_leave)
        deadline = time.monotonic() + 10
        while checker.hash_checks == checks and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield task.deferLater(reactor, 1.0, lambda: None)
        factory = self.deployment.gateway.tunnel_server.factory
        self.assertEqual(factory.waiting_for_hello.get(SHARED), 0)
        self.assertEqual(len(self.deployment.gateway.tunnel_pool.tunnels("default")), 1)

    def test_one_plain_text_warning(self):
        """
        One warning at start names the passwords still in plain text (the
        listeners' own), and names no hashed one and no password.
        """
        warnings = [event for event in self.events if event.get("event") == "plain_passwords"]
        self.assertEqual(len(warnings), 1)
        keys = warnings[0]["keys"]
        self.assertIn("proxy.socks5.auth_password", keys)
        self.assertIn("proxy.http.auth_password", keys)
        for hashed in ("gateway.auth_password", "gateway.users", "gateway.status_password"):
            self.assertNotIn(hashed, keys)


class RotationTests(_Base):
    """Two valid passwords at once, then one after a reload."""

    # Off: a client refused after the reload retries, and its failures must
    # not block the loopback address the next client comes from.
    gateway_extra = {
        "auth_throttle": {"failures": 0},
        "users": [{"username": "roller",
                   "passwords": [argon2id("roller-old-pw"), bcrypt_hash("roller-new-pw")]}],
        "clients": [{"username": "site-a", "passwords": ["site-a-old-pw",
                                                         argon2id("site-a-new-pw")]}],
    }

    @defer.inlineCallbacks
    def reload(self, gateway):
        data = self.deployment.gateway_config(gateway=gateway)
        config = load_config(self.deployment.write_config(data))
        notes = yield self.deployment.gateway.reconfigure(config)
        return notes

    @defer.inlineCallbacks
    def client_with(self, password, client_id):
        """Start a client of gateway.clients entry site-a; whether its tunnel registered."""
        deployment = self.deployment
        config = load_config(deployment.write_config(deployment.client_config(client={
            "client_id": client_id, "auth_username": "site-a", "auth_password": password})))
        client, _ = make_client_service(config, reactor, resolver=deployment.resolver)
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            ids = [t.client_id for t in deployment.gateway.tunnel_pool.tunnels("default")]
            if client_id in ids:
                return True
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield client.stopService()  # refused: stop retrying
        return False

    @defer.inlineCallbacks
    def test_users_rotation(self):
        """Both passwords log in; after the old is removed only the new one does."""
        for password in ("roller-old-pw", "roller-new-pw"):
            out, err, code = yield self.curl(self.proxy("socks5h", "roller", password))
            self.assertEqual((code, out), (0, HELLO), (password, err))
        gateway = dict(self.gateway_data, users=[{"username": "roller",
                                                  "password": bcrypt_hash("roller-new-pw")}])
        yield self.reload(gateway)
        out, err, code = yield self.curl(self.proxy("http", "roller", "roller-old-pw"),
                                         "-o", "/dev/null", "-w", "%{http_code}")
        self.assertEqual(out, b"407")
        out, err, code = yield self.curl(self.proxy("http", "roller", "roller-new-pw"))
        self.assertEqual((code, out), (0, HELLO), err)

    @defer.inlineCallbacks
    def test_clients_rotation(self):
        """A client credential takes either password, then after the reload only the new one."""
        self.assertTrue((yield self.client_with("site-a-old-pw", "site-a-1")))
        self.assertTrue((yield self.client_with("site-a-new-pw", "site-a-2")))
        gateway = dict(self.gateway_data, clients=[{"username": "site-a",
                                                    "passwords": [argon2id("site-a-new-pw")]}])
        yield self.reload(gateway)
        self.assertFalse((yield self.client_with("site-a-old-pw", "site-a-3")))
        self.assertTrue((yield self.client_with("site-a-new-pw", "site-a-4")))


class BruteForceTests(_Base):
    """1,000 wrong passwords from one address, while a user elsewhere is served."""

    @defer.inlineCallbacks
    def user_latencies(self, count):
        """C{count} curl fetches by the argon user from 127.0.0.1: their times, in seconds."""
        times = []
        for _ in range(count):
            out, err, code = yield self.curl(
                self.proxy("socks5h", "argon", ARGON_PASSWORD), "-w", "\n%{time_total}")
            body, _, total = out.rpartition(b"\n")
            self.assertEqual((code, body), (0, HELLO), err)
            times.append(float(total))
        return times

    @defer.inlineCallbacks
    def attack(self, attempts, parallel=10):
        """C{attempts} wrong SOCKS5 logins for the argon user from 127.0.0.2; their answers."""
        answers = []
        numbers = iter(range(attempts))

        @defer.inlineCallbacks
        def worker():
            for number in numbers:
                answer = yield raw_socks(self.deployment.socks_port,
                                         userpass("argon", WRONG % (number,)), source=ATTACKER)
                answers.append(answer)

        yield defer.gatherResults([worker() for _ in range(parallel)])
        return answers

    @defer.inlineCallbacks
    def test_attacker_blocked_user_served(self):
        """
        The attacker is blocked after 5 failures, every attempt is refused
        (0x01), its correct password is refused while blocked; the user at
        127.0.0.1 is served throughout, about as fast as before.
        """
        before = yield self.user_latencies(7)
        attack = self.attack(1000)
        during = []
        while not attack.called:
            during.extend((yield self.user_latencies(1)))
        answers = yield attack
        self.assertEqual(len(answers), 1000)
        self.assertEqual(set(answers), {b"\x05\x02\x01\x01"})
        events = self.throttle_events()
        self.assertEqual(events["blocks"], 1)
        # Those in flight as the block began were checked: at most a round of workers.
        self.assertGreaterEqual(events["refused_blocked"], 1000 - 2 * 10)
        self.assertGreaterEqual(events["delayed"], 1)
        # Blocked: the right password from there is refused, unchecked.
        answer = yield raw_socks(self.deployment.socks_port, userpass("argon", ARGON_PASSWORD),
                                 source=ATTACKER)
        self.assertEqual(answer, b"\x05\x02\x01\x01")
        out, _, _ = yield self.curl(self.proxy("http", "argon", ARGON_PASSWORD),
                                    "--interface", ATTACKER, "-o", "/dev/null",
                                    "-w", "%{http_code}")
        self.assertEqual(out, b"429")
        # The user was never refused (user_latencies checks each fetch), nor slowed.
        during.extend((yield self.user_latencies(3)))
        self.assertGreaterEqual(len(during), 3)
        self.assertLess(statistics.median(during), statistics.median(before) * 5 + 0.25,
                        (before, during))
        blocks = [event for event in self.events if event.get("event") == "login_blocked"]
        self.assertEqual([event["source"] for event in blocks], [ATTACKER])

    @defer.inlineCallbacks
    def test_http_proxy_throttles(self):
        """Failures on the HTTP proxy block too: 407 until blocked, then 429 with Retry-After."""
        codes = []
        for number in range(6):
            out, _, _ = yield self.curl(self.proxy("http", "bcrypt", WRONG % (number,)),
                                        "--interface", ATTACKER, "-o", "/dev/null",
                                        "-w", "%{http_code}")
            codes.append(out)
        self.assertEqual(codes, [b"407"] * 5 + [b"429"])
        out, _, _ = yield self.curl(self.proxy("http", "bcrypt", BCRYPT_PASSWORD),
                                    "--interface", ATTACKER, "-D", "-", "-o", "/dev/null")
        self.assertIn(b" 429 ", out)
        self.assertIn(b"Retry-After: ", out)
        out, err, code = yield self.curl(self.proxy("http", "bcrypt", BCRYPT_PASSWORD))
        self.assertEqual((code, out), (0, HELLO), err)

    @defer.inlineCallbacks
    def test_tunnel_port_throttles(self):
        """Wrong client credentials at the tunnel port: 401 until blocked, then 429."""
        codes = []
        for number in range(6):
            out, _, _ = yield self.tunnel_handshake(CLIENT_USER, WRONG % (number,), ATTACKER)
            codes.append(out)
        self.assertEqual(codes, [b"401"] * 5 + [b"429"])
        out, _, _ = yield self.tunnel_handshake(CLIENT_USER, CLIENT_PASSWORD, ATTACKER)
        self.assertEqual(out, b"429")
        # From elsewhere the right credential still opens a tunnel.
        yield self.deployment.start_client(wait=False, client={"client_id": "client-2"})
        deadline = time.monotonic() + 5
        while "client-2" not in [t.client_id for t in
                                 self.deployment.gateway.tunnel_pool.tunnels("default")]:
            self.assertLess(time.monotonic(), deadline, "client-2 never registered")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_status_port_throttles(self):
        """Wrong status logins: 401 until blocked, then 429 (the right one too), JSON under /api/."""
        codes = []
        for number in range(6):
            out, _, _ = yield self.status("operator", WRONG % (number,), ATTACKER)
            codes.append(out[-3:])
        self.assertEqual(codes, [b"401"] * 5 + [b"429"])
        out, _, _ = yield self.status("operator", STATUS_PASSWORD, ATTACKER)
        self.assertTrue(out.endswith(b"429"), out)
        self.assertIn(b"retry-after", out.lower())
        self.assertIn(b"application/json", out)
        out, _, _ = yield self.status("operator", STATUS_PASSWORD)
        self.assertTrue(out.endswith(b"200"), out)

    @defer.inlineCallbacks
    def test_delays_only_failures(self):
        """A repeated failure's answer waits; a correct login right after does not."""
        started = time.monotonic()
        for number in range(3):
            answer = yield raw_socks(self.deployment.socks_port,
                                     userpass("argon", WRONG % (number,)), source=ATTACKER)
            self.assertEqual(answer, b"\x05\x02\x01\x01")
        self.assertGreaterEqual(time.monotonic() - started, 0.3)  # 0.1 + 0.2
        started = time.monotonic()
        answer = yield raw_socks(self.deployment.socks_port, userpass("argon", ARGON_PASSWORD),
                                 want=4, source=ATTACKER)
        self.assertEqual(answer, b"\x05\x02\x01\x00")
        self.assertLess(time.monotonic() - started, 0.3)
