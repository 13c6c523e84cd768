# -*- test-case-name: tests.test_user_policy -*-
"""
Per-user policy at the gateway (C{gateway.users}: groups, allow, deny,
protocols, max_streams, bandwidth; L{anyproxy.auth.UserPolicy}): the config
keys, the refusals real clients (PySocks, curl) see, a reload that revokes,
and a bandwidth cap measured on loopback.
"""

import hashlib
import json
import os
import socket
import subprocess
import time

import socks
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from anyproxy.auth import UserDatabase, UserPolicy
from anyproxy.config.load import load_config
from anyproxy.errors import ConfigError, Reason
from tests.support import Deployment, Echo, blob, listen_tcp, run_curl, web_site
from tests.test_config import GATEWAY, ConfigTestMixin
from tests.test_e2e_reload import roundtrip

# Each user gets its own rules; the names and passwords are the tests'.
BOB = {"username": "bob", "password": "bob-pw"}  # no rules: the control
ALLOWED_ONLY = {"username": "ann", "password": "ann-pw", "allow": ["target.test"]}
DENIED = {"username": "dan", "password": "dan-pw", "deny": ["target.test"]}
NO_LOOPBACK = {"username": "nell", "password": "nell-pw", "deny": ["127.0.0.0/8"]}
LAB_ONLY = {"username": "lee", "password": "lee-pw", "groups": ["default"]}
TCP_ONLY = {"username": "tom", "password": "tom-pw", "protocols": ["tcp"]}
CAPPED = {"username": "cap", "password": "cap-pw", "max_streams": 1}
USERS = [BOB, ALLOWED_ONLY, DENIED, NO_LOOPBACK, LAB_ONLY, TCP_ONLY, CAPPED]


class UdpEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


def udp_echoes(proxy_port, user, destinations):
    """For each destination, whether a datagram sent through SOCKS5 came back."""
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, rdns=True,
                   username=user["username"], password=user["password"])
    sock.settimeout(1)
    sock.bind(("127.0.0.1", 0))
    answers = []
    try:
        for destination in destinations:
            sock.sendto(b"ping", destination)
            try:
                answers.append(sock.recvfrom(100)[0] == b"ping")
            except socket.timeout:
                answers.append(False)
    finally:
        sock.close()
    return answers

# The bandwidth proof: 20 MB at 4 MB/s, of which the first second's worth
# (the burst) goes at once: (20 - 4) / 4 = 4 s expected, within 15%.
RATE = 4000000
SIZE = 20000000
EXPECTED = (SIZE - RATE) / RATE


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def socks_connect(proxy_port, host, port, user):
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, rdns=True,
                   username=user["username"], password=user["password"])
    sock.settimeout(20)
    sock.connect((host, port))
    return sock


def socks_error(proxy_port, host, port, user):
    """The SOCKS5 error PySocks reports for a CONNECT, or C{None} when it opens."""
    try:
        socks_connect(proxy_port, host, port, user).close()
    except socks.ProxyError as e:
        return e.msg
    return None


def udp_error(proxy_port, user):
    """The SOCKS5 error PySocks reports for a UDP ASSOCIATE, or C{None}."""
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, rdns=True,
                   username=user["username"], password=user["password"])
    sock.settimeout(10)
    try:
        sock.bind(("127.0.0.1", 0))
    except socks.ProxyError as e:
        return e.msg
    finally:
        sock.close()
    return None


def closed_by_proxy(sock, timeout=10):
    """Whether the proxy closes C{sock} within C{timeout} seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class ConfigTests(ConfigTestMixin, unittest.SynchronousTestCase):
    """The policy keys of a gateway.users entry, read and checked."""

    def test_every_key(self):
        """Each key lands in the entry and its UserPolicy."""
        config = self.load(GATEWAY + """
  users:
    - {username: bob, password: b, groups: [lab, ops], allow: ["*.example.com",
       {addr: "10.0.0.0/8:22", protocol: tcp}], deny: [secret.example.com],
       protocols: [tcp], max_streams: 3, bandwidth: 1000}
""")
        bob = config.gateway.users[0]
        self.assertEqual((bob.group, bob.groups, bob.reachable_groups, bob.protocols,
                          bob.max_streams, bob.bandwidth),
                         ("lab", ("lab", "ops"), ("lab", "ops"), ("tcp",), 3, 1000))
        policy = bob.policy
        self.assertEqual((policy.groups, policy.protocols, policy.max_streams, policy.bandwidth),
                         (("lab", "ops"), frozenset(["tcp"]), 3, 1000))
        self.assertIsNone(policy.refusal("ops", "www.example.com", 443, "tcp"))
        self.assertIsNone(policy.refusal("lab", "10.1.2.3", 22, "tcp"))
        self.assertEqual(policy.refusal("lab", "secret.example.com", 443, "tcp")[0],
                         Reason.NOT_ALLOWED)
        self.assertEqual(policy.refusal("lab", "example.org", 443, "tcp")[0], Reason.NOT_ALLOWED)
        self.assertEqual(policy.refusal("lab", "10.1.2.3", 80, "tcp")[0], Reason.NOT_ALLOWED)
        self.assertEqual(policy.refusal("dev", "www.example.com", 443, "tcp")[0],
                         Reason.NOT_ALLOWED)
        self.assertEqual(policy.refusal("lab", "0.0.0.0", 0, "udp")[0],
                         Reason.PROTOCOL_NOT_ALLOWED)

    def test_design_example(self):
        """
        DESIGN.md 4.3's users entry loads as written: password with an empty
        passwords list (no rotation); an empty list alone leaves no password.
        """
        config = self.load(GATEWAY + """
  users:
    - username: "bob"
      password: "b-plain"
      passwords: []
      group: "lab"
      allow: []
      deny: []
      protocols: [tcp, udp]
      max_streams: 0
      bandwidth: 0
""")
        bob = config.gateway.users[0]
        self.assertEqual((bob.username, bob.password, bob.passwords, bob.group),
                         ("bob", "b-plain", (), "lab"))
        error = self.assertRaises(ConfigError, self.load, GATEWAY + (
            "  users: [{username: bob, passwords: [], group: lab}]\n"))
        self.assertIn("gateway.users[0].passwords: must not be empty", str(error))

    def test_defaults(self):
        """An entry with no policy keys may do anything in its group, without caps."""
        config = self.load(GATEWAY + "  users: [{username: bob, password: b, group: lab}]\n")
        policy = config.gateway.users[0].policy
        self.assertEqual((policy.groups, policy.access, policy.protocols, policy.max_streams,
                          policy.bandwidth), (("lab",), None, frozenset(["tcp", "udp"]), 0, 0))

    def test_bad_values(self):
        """Each bad value is one line naming the key."""
        for entry, where in [
                ("group: lab, groups: [ops]", "users[0].groups: set group or groups"),
                ("groups: [1]", "users[0].groups[0]"),
                ("protocols: [sctp]", "users[0].protocols[0]"),
                ("protocols: []", "users[0].protocols: must not be empty"),
                ("allow: ['bad host!']", "users[0].allow[0].addr"),
                ("deny: ['(']", "users[0].deny[0]"),
                ("max_streams: -1", "users[0].max_streams"),
                ("bandwidth: 1.5", "users[0].bandwidth"),
        ]:
            error = self.assertRaises(ConfigError, self.load, GATEWAY + (
                "  users: [{username: bob, password: b, %s}]\n" % (entry,)))
            self.assertIn("gateway." + where, str(error))


class UserDatabaseTests(unittest.SynchronousTestCase):
    """The users a database makes carry their entry's policy."""

    def login(self, users, name, password):
        return self.successResultOf(defer.maybeDeferred(users.authenticate, name, password))

    def test_policy_and_groups(self):
        """
        A login by name goes to the first group; user.group to another listed
        one; a right password naming an unlisted group is let in and refused
        by the policy; a wrong password is still refused.
        """
        policy = UserPolicy(groups=("lab", "ops"))
        users = UserDatabase([("bob", "pw", "lab", ("lab", "ops"), policy)])
        bob = self.login(users, "bob", "pw")
        self.assertEqual((bob.name, bob.group), ("bob", "lab"))
        self.assertIs(bob.policy, policy)
        self.assertEqual(self.login(users, "bob.ops", "pw").group, "ops")
        other = self.login(users, "bob.dev", "pw")
        self.assertEqual((other.name, other.group), ("bob", "dev"))
        self.assertEqual(other.policy.refusal(other.group, "x", 1, "tcp")[0], Reason.NOT_ALLOWED)
        self.assertIsNone(self.login(users, "bob.dev", "wrong"))

    def test_no_policy(self):
        """An entry without a policy (a listener's own user) keeps the old rule."""
        users = UserDatabase([("al", "pw", "default", ("default",))])
        self.assertIsNone(self.login(users, "al", "pw").policy)
        self.assertIsNone(self.login(users, "al.dev", "pw"))


class _Deployed(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def start(self, users, **gateway):
        self.deployment = Deployment(self)
        gateway.setdefault("users", users)
        self.gateway = yield self.deployment.start_gateway(gateway=gateway)
        yield self.deployment.start_client()
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.web_port = listen_tcp(self, web_site()).getHost().port

    def socks_error(self, host, user):
        return deferToThread(socks_error, self.deployment.socks_port, host, self.echo_port, user)

    @defer.inlineCallbacks
    def http_status(self, user, url, tunnel=False):
        """The status curl gets through the HTTP proxy (with C{tunnel}: CONNECT's)."""
        out, err, code = yield run_curl(
            "-x", "http://%s:%s@127.0.0.1:%d" % (user["username"], user["password"],
                                                 self.deployment.http_port),
            "-o", "/dev/null", "-w", "%{http_connect}" if tunnel else "%{http_code}",
            *(("-p",) if tunnel else ()), url)
        return out.decode()

    def web(self, host="127.0.0.1", path="/hello"):
        return "http://%s:%d%s" % (host, self.web_port, path)

    def reload(self, users, **gateway):
        """Reload the gateway with C{users} (the rest of the config unchanged)."""
        gateway["users"] = users
        # The same listen addresses (port 0): the listeners stay as they are.
        data = self.deployment.gateway_config(gateway=gateway)
        return self.gateway.reconfigure(load_config(self.deployment.write_config(data)))


class RefusalTests(_Deployed):
    """Each rule refuses with the error table's answer: SOCKS5 0x02, HTTP 403."""

    def setUp(self):
        return self.start(USERS, queue_timeout=0.3)

    @defer.inlineCallbacks
    def test_allow(self):
        """allow: a name outside the list is refused; one inside goes through."""
        self.assertIn("0x02", (yield self.socks_error("127.0.0.1", ALLOWED_ONLY)) or "")
        self.assertIsNone((yield self.socks_error("target.test", ALLOWED_ONLY)))
        self.assertEqual((yield self.http_status(ALLOWED_ONLY, self.web())), "403")
        self.assertEqual((yield self.http_status(ALLOWED_ONLY, self.web("target.test"))), "200")
        # CONNECT is checked the same way.
        self.assertEqual((yield self.http_status(ALLOWED_ONLY, self.web(), tunnel=True)), "403")

    @defer.inlineCallbacks
    def test_deny(self):
        """deny: a listed name is refused; any other goes through."""
        self.assertIn("0x02", (yield self.socks_error("target.test", DENIED)) or "")
        self.assertIn("0x02", (yield self.socks_error("TARGET.test.", DENIED)) or "")
        self.assertIsNone((yield self.socks_error("127.0.0.1", DENIED)))
        self.assertEqual((yield self.http_status(DENIED, self.web("target.test"))), "403")
        self.assertEqual((yield self.http_status(DENIED, self.web())), "200")

    @defer.inlineCallbacks
    def test_deny_addresses_short_forms(self):
        """
        deny 127.0.0.0/8: the address is refused written in full and in the
        short forms the system resolver reads as it ("127.1", "2130706433",
        "0x7f.1"), which reach the gateway as names (0x02).  A user with no
        rules has them refused by the client's access control, which takes
        no name of that shape either (0x02).
        """
        for host in ("127.0.0.1", "127.1", "2130706433", "0x7f.1"):
            self.assertIn("0x02", (yield self.socks_error(host, NO_LOOPBACK)) or "", host)
        for host in ("127.1", "2130706433", "0x7f.1"):
            self.assertIn("0x02", (yield self.socks_error(host, BOB)) or "", host)
        self.assertIsNone((yield self.socks_error("127.0.0.1", BOB)))

    @defer.inlineCallbacks
    def test_group(self):
        """user.group for a group the entry does not list: 0x02 and 403, not a login failure."""
        other_group = dict(LAB_ONLY, username="lee.lab")
        self.assertIn("0x02", (yield self.socks_error("127.0.0.1", other_group)) or "")
        self.assertEqual((yield self.http_status(other_group, self.web())), "403")
        self.assertIsNone((yield self.socks_error("127.0.0.1", LAB_ONLY)))
        self.assertEqual((yield self.http_status(dict(LAB_ONLY, username="lee.default"),
                                                 self.web())), "200")
        wrong = dict(other_group, password="wrong")
        self.assertEqual((yield self.http_status(wrong, self.web())), "407")

    @defer.inlineCallbacks
    def test_udp(self):
        """protocols: [tcp] refuses UDP ASSOCIATE with 0x02; another user's association opens."""
        self.assertIn("0x02", (yield deferToThread(udp_error, self.deployment.socks_port,
                                                   TCP_ONLY)) or "")
        self.assertIsNone((yield deferToThread(udp_error, self.deployment.socks_port, BOB)))
        self.assertIsNone((yield self.socks_error("127.0.0.1", TCP_ONLY)))

    @defer.inlineCallbacks
    def test_udp_rules(self):
        """A user's deny rule drops datagrams to that name; others go through."""
        port = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        echo = port.getHost().port
        answers = yield deferToThread(udp_echoes, self.deployment.socks_port, DENIED,
                                      [("target.test", echo), ("127.0.0.1", echo)])
        self.assertEqual(answers, [False, True])
        answers = yield deferToThread(udp_echoes, self.deployment.socks_port, BOB,
                                      [("target.test", echo)])
        self.assertEqual(answers, [True])

    @defer.inlineCallbacks
    def test_stream_cap(self):
        """
        max_streams: 1 lets one stream open; the next waits in the queue and
        gets OVERLOADED (SOCKS5 0x01, HTTP 503), while bob is not limited;
        once the first closes, the next opens.
        """
        first = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                    self.echo_port, CAPPED)
        self.addCleanup(first.close)
        self.assertEqual((yield deferToThread(roundtrip, first, b"one")), b"one")
        self.assertIn("0x01", (yield self.socks_error("127.0.0.1", CAPPED)) or "")
        self.assertEqual((yield self.http_status(CAPPED, self.web())), "503")
        self.assertIsNone((yield self.socks_error("127.0.0.1", BOB)))
        first.close()
        for _ in range(100):
            if not self.gateway.limits.per_user.active("cap"):
                break
            yield sleep(0.05)
        self.assertEqual((yield self.http_status(CAPPED, self.web())), "200")


class RevocationTests(_Deployed):
    """A reload closes the open streams it no longer allows, and only those."""

    @defer.inlineCallbacks
    def test_udp_rules_of_an_open_association(self):
        """A deny rule a reload adds drops the datagrams of an association already open."""
        yield self.start([BOB])
        port = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        echo = port.getHost().port
        sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.set_proxy(socks.SOCKS5, "127.0.0.1", self.deployment.socks_port, rdns=True,
                       username=BOB["username"], password=BOB["password"])
        sock.settimeout(1)
        self.addCleanup(sock.close)
        yield deferToThread(sock.bind, ("127.0.0.1", 0))  # the SOCKS5 handshake

        def echoed(destination):
            sock.sendto(b"ping", destination)
            try:
                return sock.recvfrom(100)[0] == b"ping"
            except socket.timeout:
                return False

        self.assertTrue((yield deferToThread(echoed, ("target.test", echo))))
        yield self.reload([dict(BOB, deny=["target.test"])])
        self.assertFalse((yield deferToThread(echoed, ("target.test", echo))))
        self.assertTrue((yield deferToThread(echoed, ("127.0.0.1", echo))))

    @defer.inlineCallbacks
    def open_echo(self, user, host="127.0.0.1"):
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, host,
                                   self.echo_port, user)
        self.addCleanup(sock.close)
        self.assertEqual((yield deferToThread(roundtrip, sock, b"hello")), b"hello")
        return sock

    @defer.inlineCallbacks
    def test_user_removed(self):
        """Removing a user closes its stream; another user's stream goes on."""
        yield self.start([BOB, DENIED])
        bobs = yield self.open_echo(BOB)
        dans = yield self.open_echo(DENIED)
        yield self.reload([DENIED])
        self.assertTrue((yield deferToThread(closed_by_proxy, bobs)))
        self.assertEqual((yield deferToThread(roundtrip, dans, b"still")), b"still")
        self.assertEqual(self.gateway.user_endpoints.revoke(), 0)

    @defer.inlineCallbacks
    def test_rule_now_denies(self):
        """A deny rule added by a reload closes the stream to that target, not the others."""
        yield self.start([BOB])
        to_name = yield self.open_echo(BOB, "target.test")
        to_ip = yield self.open_echo(BOB, "127.0.0.1")
        yield self.reload([dict(BOB, deny=["target.test"])])
        self.assertTrue((yield deferToThread(closed_by_proxy, to_name)))
        self.assertEqual((yield deferToThread(roundtrip, to_ip, b"still")), b"still")
        self.assertIn("0x02", (yield self.socks_error("target.test", BOB)) or "")


def curl_timed(proxy_port, user, *args):
    """Run curl through the HTTP proxy in this thread: C{(seconds, stdout)}."""
    started = time.monotonic()
    out = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "60", "-x",
         "http://%s:%s@127.0.0.1:%d" % (user["username"], user["password"], proxy_port)]
        + list(args), check=True, stdout=subprocess.PIPE).stdout
    return time.monotonic() - started, out


class BandwidthTests(_Deployed):
    """A user's bandwidth cap, measured with curl on loopback."""

    SLOW = {"username": "slow", "password": "slow-pw", "bandwidth": RATE}

    def setUp(self):
        return self.start([self.SLOW, BOB])

    def assert_capped(self, seconds):
        self.assertTrue(0.85 * EXPECTED <= seconds <= 1.15 * EXPECTED,
                        "%.2fs for %d bytes at %d B/s (expected %.2fs +-15%%)"
                        % (seconds, SIZE, RATE, EXPECTED))

    @defer.inlineCallbacks
    def test_download(self):
        """
        20 MB at a 4 MB/s cap takes 4 s (the first second's worth at once),
        whole; bob, downloading at the same time, goes much faster.
        """
        url = self.web(path="/blob/%d" % (SIZE,))
        port = self.deployment.http_port
        slow = deferToThread(curl_timed, port, self.SLOW, url)
        yield sleep(0.5)
        fast_seconds, fast_body = yield deferToThread(curl_timed, port, BOB, url)
        slow_seconds, slow_body = yield slow
        self.assertEqual(hashlib.sha256(slow_body).digest(), hashlib.sha256(blob(SIZE)).digest())
        self.assertEqual(len(fast_body), SIZE)
        self.assert_capped(slow_seconds)
        self.assertLess(fast_seconds, SIZE / (2 * RATE),
                        "bob took %.2fs: slowed by another user's cap" % (fast_seconds,))

    @defer.inlineCallbacks
    def test_upload(self):
        """A 20 MB upload at a 4 MB/s cap takes 4 s and arrives whole."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(blob(SIZE))
        seconds, out = yield deferToThread(
            curl_timed, self.deployment.http_port, self.SLOW, "--data-binary", "@" + path,
            "-H", "Content-Type: application/octet-stream", self.web(path="/upload"))
        self.assertEqual(out, b"%d %s" % (SIZE, hashlib.sha256(blob(SIZE)).hexdigest().encode()))
        self.assert_capped(seconds)


class RefusalAccessLogTests(_Deployed):
    """A stream a user's own rules refuse has its access-log line, like any refusal."""

    @defer.inlineCallbacks
    def test_policy_refusal_logged(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "access.jsonl")
        yield self.start(USERS, access_log=path)
        self.assertIn("0x02", (yield self.socks_error("target.test", DENIED)) or "")
        lines = []
        for _ in range(40):  # the access log is flushed once a second
            yield task.deferLater(reactor, 0.1, lambda: None)
            if os.path.exists(path):
                with open(path) as f:
                    lines = [json.loads(line) for line in f]
            if lines:
                break
        [line] = lines
        self.assertEqual((line["user"], line["target"], line["outcome"], line["frontend"],
                          line["dialed"]),
                         (DENIED["username"], "target.test:%d" % (self.echo_port,), "not_allowed",
                          "socks5 proxy", ""))
        self.assertRegex(line["source"], r"^127\.0\.0\.1:\d+$")
