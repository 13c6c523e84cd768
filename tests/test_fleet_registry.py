"""
The fleet registry (L{anyproxy.fleet.registry}) against a real redis-server
on a free loopback port: several registries in one reactor sharing it.
"""

import os
import sys

import attr
import trustme
import txredisapi
from twisted.internet import defer, error, protocol, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from anyproxy.fleet import registry as registry_module
from anyproxy.fleet.interfaces import IFleetRegistry, NodeRecord
from anyproxy.fleet.registry import (
    FleetRegistryCollector, RedisFleetRegistry, RegistryUnavailable, default_advertise_addr,
    default_node_id, parse_redis_url, peer_dial_addr)
from tests.ports import free_port
from tests.redis_server import RedisServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(check, timeout=5.0, interval=0.01):
    """Poll C{check()} until true; return the seconds it took."""
    started = reactor.seconds()
    while not check():
        if reactor.seconds() - started > timeout:
            raise AssertionError("condition not met in %s seconds" % (timeout,))
        yield sleep(interval)
    return reactor.seconds() - started


@attr.s
class LocalNode:
    """What a gateway would publish about itself, changed by the tests."""

    name = attr.ib()
    groups = attr.ib(factory=list)
    draining = attr.ib(default=False)
    logins = attr.ib(factory=dict)
    streams = attr.ib(default=0)

    def record(self):
        return NodeRecord(node_id="ignored", peer_addr="127.0.0.1:1%s" % (self.name[-1:],),
                          tunnel_addr="tunnel.%s:8443" % (self.name,), groups=self.groups,
                          streams=self.streams, tunnels=len(self.groups),
                          draining=self.draining, logins=dict(self.logins))


class LogCapture:
    """Every log event while a test runs."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def registry_lines(self, node=None):
        lines = [formatEvent(e) for e in self.events
                 if e.get("log_namespace") == registry_module.__name__]
        return [line for line in lines if node is None or ("node %s " % node) in line]

    def everything(self):
        """All text the events carry: formatted, and each field's repr."""
        return "\n".join(formatEvent(e) + repr(sorted(e.items(), key=lambda kv: kv[0]))
                         for e in self.events)


class RegistryTestBase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = yield RedisServer.started(self)

    @defer.inlineCallbacks
    def registry(self, name, heartbeat=0.2, keep_peers=60.0, url=None, node=None, **kwargs):
        node = node or LocalNode(name)
        registry = RedisFleetRegistry(url or self.redis.url, name, node.record,
                                      heartbeat=heartbeat, keep_peers=keep_peers, **kwargs)
        registry.local = node
        self.addCleanup(registry.stop)
        yield registry.start()
        return registry

    @defer.inlineCallbacks
    def raw(self, server=None):
        """A plain txredisapi connection to look at the keys."""
        server = server or self.redis
        connection = yield txredisapi.Connection(
            "127.0.0.1", server.port, password=server.password, reconnect=False,
            convertNumbers=False)
        self.addCleanup(connection.disconnect)
        return connection


class RegistrationTests(RegistryTestBase):

    @defer.inlineCallbacks
    def test_nodes_see_each_other(self):
        """Each node sees the others' records (not its own) with their fields."""
        a = yield self.registry("a", node=LocalNode("a", groups=["g1"], streams=3))
        b = yield self.registry("b", node=LocalNode("b", groups=["g2", "g1"]))
        c = yield self.registry("c")
        self.assertTrue(verifyObject(IFleetRegistry, a))
        yield wait_until(lambda: len(a.nodes()) == 2 and len(c.nodes()) == 2)
        self.assertEqual([n.node_id for n in a.nodes()], ["b", "c"])
        self.assertEqual([n.node_id for n in c.nodes()], ["a", "b"])
        record = b.nodes()[0]
        self.assertEqual(record, NodeRecord(node_id="a", peer_addr="127.0.0.1:1a",
                                            tunnel_addr="tunnel.a:8443", groups=["g1"],
                                            streams=3, tunnels=1))
        self.assertEqual([n.node_id for n in c.nodes_for_group("g1")], ["a", "b"])
        self.assertEqual([n.node_id for n in c.nodes_for_group("g2")], ["b"])
        self.assertTrue(a.healthy and b.healthy and c.healthy)

    @defer.inlineCallbacks
    def test_keys(self):
        """The record, the node set and the group index, all expiring in 3 heartbeats."""
        yield self.registry("a", heartbeat=0.5, node=LocalNode("a", groups=["g1"]))
        raw = yield self.raw()
        record = registry_module.record_from_json((yield raw.get("anyproxy:node:a")))
        self.assertEqual((record.node_id, record.groups), ("a", ("g1",)))
        for key in ("anyproxy:node:a", "anyproxy:nodes", "anyproxy:group:g1"):
            ttl = int((yield raw.execute_command("PTTL", key)))
            self.assertTrue(0 < ttl <= 1500, (key, ttl))
        now_ms = int((yield raw.execute_command("TIME"))[0]) * 1000
        for key in ("anyproxy:nodes", "anyproxy:group:g1"):
            score = float((yield raw.execute_command("ZSCORE", key, "a")))
            self.assertTrue(now_ms < score <= now_ms + 2500, (key, score, now_ms))

    @defer.inlineCallbacks
    def test_heartbeat_refreshes(self):
        """A live node stays well past its records' lifetime of 3 heartbeats."""
        a = yield self.registry("a")
        yield self.registry("b")
        yield wait_until(lambda: a.nodes())
        yield sleep(1.2)  # two lifetimes
        self.assertEqual([n.node_id for n in a.nodes()], ["b"])

    @defer.inlineCallbacks
    def test_change_spreads_by_notice(self):
        """
        A change reaches the other nodes through the channel within a small
        fraction of the heartbeat (5 s here, so no heartbeat carries it).
        """
        a = yield self.registry("a", heartbeat=5.0)
        b = yield self.registry("b", heartbeat=5.0)
        yield wait_until(lambda: a.nodes() and b.nodes())
        seen = []
        b.add_observer(lambda: seen.append(reactor.seconds()))
        times = []
        for round_ in range(3):
            a.local.groups = ["g%d" % round_]
            a.local_changed()
            a.local_changed()  # coalesced into one write
            times.append((yield wait_until(
                lambda: [n.node_id for n in b.nodes_for_group("g%d" % round_)] == ["a"],
                timeout=1.0)))
        self.assertTrue(max(times) < 0.25, times)
        self.assertTrue(seen)

    @defer.inlineCallbacks
    def test_group_membership(self):
        """Joining, leaving and draining show in the view and in the group index."""
        a = yield self.registry("a", heartbeat=5.0)
        b = yield self.registry("b", heartbeat=5.0)
        raw = yield self.raw()
        a.local.groups = ["g1", "g2"]
        a.local_changed()
        yield wait_until(lambda: len(b.nodes_for_group("g2")) == 1)
        self.assertEqual((yield raw.execute_command("ZRANGE", "anyproxy:group:g2", 0, -1)), ["a"])
        a.local.groups = ["g1"]
        a.local_changed()
        yield wait_until(lambda: not b.nodes_for_group("g2"))
        self.assertEqual((yield raw.execute_command("ZRANGE", "anyproxy:group:g2", 0, -1)), [])
        self.assertEqual([n.node_id for n in b.nodes_for_group("g1")], ["a"])
        a.local.draining = True
        a.local_changed()
        yield wait_until(lambda: not b.nodes_for_group("g1"))
        self.assertTrue(b.nodes()[0].draining)  # still a node, taking no streams

    @defer.inlineCallbacks
    def test_stop_deregisters_promptly(self):
        """stop() deletes the record and tells the others at once."""
        a = yield self.registry("a", heartbeat=5.0)
        b = yield self.registry("b", heartbeat=5.0, node=LocalNode("b", groups=["g"]))
        yield wait_until(lambda: a.nodes())
        raw = yield self.raw()
        started = reactor.seconds()
        yield b.stop()
        took = yield wait_until(lambda: not a.nodes(), timeout=1.0)
        self.assertTrue(reactor.seconds() - started < 0.5, took)
        self.assertIsNone((yield raw.get("anyproxy:node:b")))
        self.assertIsNone((yield raw.execute_command("ZSCORE", "anyproxy:group:g", "b")))
        self.assertFalse(b.healthy)

    @defer.inlineCallbacks
    def test_bad_records_ignored(self):
        """A record no node of ours wrote is left out of the view, not fatal."""
        a = yield self.registry("a")
        yield self.registry("b")
        raw = yield self.raw()
        yield raw.execute_command("ZADD", "anyproxy:nodes", "+inf", "x")
        yield raw.set("anyproxy:node:x", '{"node_id": 5}')
        # Nested past Python's recursion limit (json raises RecursionError),
        # and over the size bound.
        yield raw.execute_command("ZADD", "anyproxy:nodes", "+inf", "y", "+inf", "z")
        yield raw.set("anyproxy:node:y", "[" * 100000)
        yield raw.set("anyproxy:node:z", '{"node_id": "z", "pad": "%s"}' % ("x" * (1 << 20),))
        yield sleep(0.5)
        self.assertEqual([n.node_id for n in a.nodes()], ["b"])
        self.assertTrue(a.healthy)
        self.assertEqual(self.flushLoggedErrors(), [])


KILLABLE_NODE = """
import sys
from twisted.internet import reactor
from anyproxy.fleet.interfaces import NodeRecord
from anyproxy.fleet.registry import RedisFleetRegistry
registry = RedisFleetRegistry(sys.argv[1], "victim",
                              lambda: NodeRecord("victim", "127.0.0.1:1", "127.0.0.1:2", ["g"]),
                              heartbeat=float(sys.argv[2]))
reactor.callWhenRunning(registry.start)
reactor.run()
"""


class _Watcher(protocol.ProcessProtocol):
    def __init__(self):
        self.ended = defer.Deferred()

    def processEnded(self, reason):
        self.ended.callback(None)


class ExpiryTests(RegistryTestBase):

    def spawn_node(self, heartbeat):
        watcher = _Watcher()
        transport = reactor.spawnProcess(
            watcher, sys.executable, [sys.executable, "-c", KILLABLE_NODE, self.redis.url,
                                      str(heartbeat)],
            env={"PYTHONPATH": ROOT, "PATH": os.environ.get("PATH", "")}, path=ROOT)

        def kill():
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            return watcher.ended
        self.addCleanup(kill)
        return transport, kill

    @defer.inlineCallbacks
    def test_killed_node_drops_out(self):
        """A node killed -9 leaves the others' view within 3 heartbeats (0.2 s each)."""
        heartbeat = 0.2
        a = yield self.registry("a", heartbeat=heartbeat)
        b = yield self.registry("b", heartbeat=heartbeat)
        _, kill = self.spawn_node(heartbeat)
        yield wait_until(lambda: a.nodes_for_group("g") and b.nodes_for_group("g"), timeout=15)
        changes = []
        a.add_observer(lambda: changes.append(len(a.nodes())))
        yield sleep(0.5)  # a few heartbeats of the victim's
        killed = reactor.seconds()
        yield kill()
        yield wait_until(lambda: not a.nodes_for_group("g") and not b.nodes_for_group("g"),
                         timeout=3)
        gone = reactor.seconds() - killed
        # At most 3 heartbeats after its last refresh, plus scheduling slack.
        self.assertTrue(gone <= 3 * heartbeat + 0.15, gone)
        self.assertEqual([n.node_id for n in a.nodes()], ["b"])
        self.assertIn(1, changes)


    @defer.inlineCallbacks
    def test_killed_node_drops_out_while_redis_flaps(self):
        """
        A connection to Redis that keeps failing and recovering (a reply
        timeout every 0.4 s) does not keep a killed node in the view: the
        grace after an outage carries a missing node once, not again each time.
        """
        heartbeat = 0.2
        a = yield self.registry("a", heartbeat=heartbeat, keep_peers=2.0)
        _, kill = self.spawn_node(heartbeat)
        yield wait_until(lambda: a.nodes_for_group("g"), timeout=15)
        yield kill()
        for _ in range(10):
            if a._command is not None:
                a._command.transport.abortConnection()
            yield sleep(0.4)
        self.assertEqual(a.nodes_for_group("g"), [])


class PortClaimTests(RegistryTestBase):

    @defer.inlineCallbacks
    def test_conflict(self):
        """One port, one holder fleet-wide; released, the other may take it."""
        a = yield self.registry("a")
        b = yield self.registry("b")
        raw = yield self.raw()
        self.assertTrue((yield a.claim_port(9000, "c1")))
        self.assertFalse((yield b.claim_port(9000, "c2")))
        self.assertTrue((yield a.claim_port(9000, "c1")))  # again: still its own
        self.assertFalse((yield a.claim_port(9000, "c3")))  # another client of a's
        self.assertEqual((yield raw.get("anyproxy:port:9000")), "a/c1")
        yield b.release_port(9000, "c2")  # not its claim: nothing happens
        self.assertEqual((yield raw.get("anyproxy:port:9000")), "a/c1")
        yield a.release_port(9000, "c1")
        self.assertIsNone((yield raw.get("anyproxy:port:9000")))
        self.assertTrue((yield b.claim_port(9000, "c2")))
        self.assertEqual(b.claimed_ports(), {9000: "c2"})
        self.assertEqual(a.claimed_ports(), {})

    @defer.inlineCallbacks
    def test_release_of_a_claim_never_answered(self):
        """A claim whose answer we gave up on (it landed) is still given back by release_port."""
        a = yield self.registry("a")
        raw = yield self.raw()
        claiming = a.claim_port(9003, "c1")
        claiming.cancel()  # as the claim's timeout does; the SET is already on its way
        self.failureResultOf(claiming, defer.CancelledError)
        yield a.release_port(9003, "c1")
        self.assertIsNone((yield raw.get("anyproxy:port:9003")))
        self.assertEqual(a.claimed_ports(), {})

    @defer.inlineCallbacks
    def test_refreshed_then_released_on_stop(self):
        """A claim outlives its first expiry while the node beats; stop() gives it back."""
        a = yield self.registry("a")
        b = yield self.registry("b")
        raw = yield self.raw()
        self.assertTrue((yield a.claim_port(9001, "c1")))
        yield sleep(1.0)  # its PX is 0.6 s
        self.assertEqual((yield raw.get("anyproxy:port:9001")), "a/c1")
        self.assertTrue(0 < int((yield raw.execute_command("PTTL", "anyproxy:port:9001"))) <= 600)
        yield a.stop()
        self.assertTrue((yield b.claim_port(9001, "c9")))

    @defer.inlineCallbacks
    def test_retaken_after_redis_lost_data(self):
        """Redis restarted empty: the next heartbeat takes the claims back."""
        a = yield self.registry("a")
        self.assertTrue((yield a.claim_port(9002, "c1")))
        yield self.redis.kill()
        yield self.redis.start()
        raw = yield self.raw()
        yield wait_until(lambda: a.healthy, timeout=10)
        yield sleep(0.5)
        self.assertEqual((yield raw.get("anyproxy:port:9002")), "a/c1")

    @defer.inlineCallbacks
    def test_lost_claim_reported(self):
        """A claim found taken by another node is dropped and reported."""
        lost = []
        a = yield self.registry("a", on_port_lost=lambda port, owner: lost.append((port, owner)))
        raw = yield self.raw()
        self.assertTrue((yield a.claim_port(9003, "c1")))
        yield raw.set("anyproxy:port:9003", "b/c2")
        yield wait_until(lambda: lost)
        self.assertEqual(lost, [(9003, "c1")])
        self.assertEqual(a.claimed_ports(), {})
        self.assertEqual((yield raw.get("anyproxy:port:9003")), "b/c2")

    @defer.inlineCallbacks
    def test_unavailable(self):
        """Without Redis no claim can be decided: the Deferred fails, clearly."""
        a = yield self.registry("a")
        yield self.redis.stop()
        yield wait_until(lambda: not a.healthy)
        yield self.assertFailure(a.claim_port(9004, "c1"), RegistryUnavailable)
        yield a.release_port(9004, "c1")  # never fails


class GroupLoginTests(RegistryTestBase):

    @defer.inlineCallbacks
    def test_check(self):
        """A group password a client announced on one node logs in on another."""
        a = yield self.registry("a", heartbeat=5.0)
        b = yield self.registry("b", heartbeat=5.0)
        verifier = a.login_verifier("grp-s3cret")
        self.assertNotIn("grp-s3cret", verifier)
        self.assertTrue(verifier.startswith("pbkdf2_sha256$"))
        self.assertNotEqual(verifier, b.login_verifier("grp-s3cret"))  # salted per node
        a.local.groups = ["g"]
        a.local.logins = {"g": (verifier, a.login_verifier("rolling-new"))}
        a.local_changed()
        yield wait_until(lambda: b.nodes() and b.nodes()[0].logins)
        self.assertTrue(b.check_group_login("g", "grp-s3cret"))
        self.assertTrue(b.check_group_login("g", "rolling-new"))
        self.assertFalse(b.check_group_login("g", "grp-s3cre"))
        self.assertFalse(b.check_group_login("other", "grp-s3cret"))
        self.assertFalse(a.check_group_login("g", "grp-s3cret"))  # its own: the local pool's job
        # The login leaves with the client.
        a.local.logins = {}
        a.local_changed()
        yield wait_until(lambda: not b.check_group_login("g", "grp-s3cret"), timeout=1)

    @defer.inlineCallbacks
    def test_cache(self):
        """Repeated checks of one password cost one derivation."""
        a = yield self.registry("a", heartbeat=5.0)
        b = yield self.registry("b", heartbeat=5.0)
        a.local.logins = {"g": (a.login_verifier("pw"),)}
        a.local_changed()
        yield wait_until(lambda: b.nodes() and b.nodes()[0].logins)
        derivations = []
        real = registry_module.hashlib.pbkdf2_hmac

        def counting(*args):
            derivations.append(args[2])
            return real(*args)
        self.patch(registry_module.hashlib, "pbkdf2_hmac", counting)
        for _ in range(20):
            self.assertTrue(b.check_group_login("g", "pw"))
            self.assertFalse(b.check_group_login("g", "wrong"))
        self.assertEqual(len(derivations), 2)

    def test_malformed_verifiers(self):
        """Verifiers a node of ours never writes are ignored, not fatal."""
        checker = registry_module.LoginChecker(reactor)
        good = registry_module.make_login_verifier("pw", b"salt", iterations=10)
        self.assertTrue(checker.check(["junk", "pbkdf2_sha256$x$y$z",
                                       "pbkdf2_sha256$99999999$c2FsdA==$AA==", good], "pw"))
        self.assertFalse(checker.check(["junk"], "pw"))


class OutageTests(RegistryTestBase):

    @defer.inlineCallbacks
    def test_redis_stopped_and_restarted(self):
        """
        Redis away: unhealthy at once, the last view kept for keep_peers (not
        expired by the records' own lifetime), then dropped; Redis back: both
        nodes re-register and see each other again by themselves.  One log
        line per change of state.
        """
        logs = LogCapture(self)
        keep = 1.5
        a = yield self.registry("a", keep_peers=keep, node=LocalNode("a", groups=["ga"]))
        b = yield self.registry("b", keep_peers=keep, node=LocalNode("b", groups=["gb"]))
        yield wait_until(lambda: a.nodes() and b.nodes())
        changes = []
        a.add_observer(lambda: changes.append(len(a.nodes())))
        down = reactor.seconds()
        yield self.redis.stop()
        yield wait_until(lambda: not a.healthy and not b.healthy, timeout=1)
        yield sleep(0.9)  # beyond the records' 0.6 s lifetime
        self.assertEqual([n.node_id for n in a.nodes_for_group("gb")], ["b"])
        self.assertFalse(a.healthy)
        yield wait_until(lambda: not a.nodes() and not b.nodes(), timeout=2)
        # Counted from the last answer, at most a heartbeat before Redis went.
        dropped = reactor.seconds() - down
        self.assertTrue(keep - 0.2 - 0.05 <= dropped <= keep + 0.5, dropped)
        self.assertEqual(changes, [0])
        yield self.redis.start()
        took = yield wait_until(lambda: a.healthy and b.healthy and a.nodes() and b.nodes(),
                                timeout=5)
        self.assertTrue(took < 3, took)
        self.assertEqual([n.node_id for n in b.nodes_for_group("ga")], ["a"])
        lines = logs.registry_lines("a")
        self.assertEqual(len(lines), 4, lines)
        self.assertIn("registered at", lines[0])
        self.assertIn("unreachable", lines[1])
        self.assertIn("forgets its 1 peers", lines[2])
        self.assertIn("answers again", lines[3])

    @defer.inlineCallbacks
    def test_killed_and_back_before_keep_peers(self):
        """A short outage (kill -9) keeps the view throughout."""
        a = yield self.registry("a")
        yield self.registry("b")
        yield wait_until(lambda: a.nodes())
        changes = []
        a.add_observer(lambda: changes.append(len(a.nodes())))
        yield self.redis.kill()
        yield wait_until(lambda: not a.healthy, timeout=1)
        yield self.redis.start()
        yield wait_until(lambda: a.healthy, timeout=5)
        yield sleep(0.3)
        self.assertEqual([n.node_id for n in a.nodes()], ["b"])
        self.assertNotIn(0, changes)

    @defer.inlineCallbacks
    def test_failed_connect_older_than_an_answer(self):
        """
        A connect that began before Redis last answered and fails after it
        (HostnameEndpoint reports a refusal at its next attempt tick, 0.3 s
        later) leaves the state alone; a newer failure still counts.
        """
        a = yield self.registry("a")
        yield wait_until(lambda: a.healthy)
        logs = LogCapture(self)
        errors = a.redis_errors
        refused = Failure(error.ConnectionRefusedError())
        a._connect_failed(refused, a._last_ok - 0.2)
        self.assertTrue(a.healthy)
        self.assertEqual(logs.registry_lines("a"), [])
        self.assertEqual(a.redis_errors, errors + 1)
        a._connect_failed(refused, a._last_ok + 0.1)
        self.assertFalse(a.healthy)
        self.assertIn("unreachable", logs.registry_lines("a")[0])

    @defer.inlineCallbacks
    def test_start_without_redis(self):
        """start() does not wait for Redis (nor fail); the node registers once it comes."""
        logs = LogCapture(self)
        yield self.redis.stop()
        a = yield self.registry("a")
        self.assertFalse(a.healthy)
        self.assertEqual(a.nodes(), [])
        yield self.redis.start()
        yield wait_until(lambda: a.healthy, timeout=5)
        lines = logs.registry_lines("a")
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("cannot reach Redis", lines[0])


class SecretTests(unittest.TestCase):
    timeout = 60
    password = "Redis-pw-7f3e9a"

    @defer.inlineCallbacks
    def test_password_never_logged(self):
        """A Redis password in the URL works and shows in no log event, repr or metric."""
        logs = LogCapture(self)
        redis = yield RedisServer.started(self, password=self.password)
        node = LocalNode("a")
        a = RedisFleetRegistry(redis.url, "a", node.record, heartbeat=0.2, keep_peers=0.5)
        self.addCleanup(a.stop)
        yield a.start()
        self.assertTrue(a.healthy)
        yield redis.stop()
        yield wait_until(lambda: not a.healthy)
        yield sleep(0.7)
        yield redis.start()
        yield wait_until(lambda: a.healthy, timeout=5)
        wrong = RedisFleetRegistry(redis.url.replace(self.password, "not-" + self.password),
                                   "w", node.record, heartbeat=0.2)
        self.addCleanup(wrong.stop)
        yield wrong.start()
        self.assertFalse(wrong.healthy)
        lines = logs.registry_lines()
        self.assertTrue(any("WRONGPASS" in line or "auth" in line for line in lines), lines)
        self.assertTrue(len(lines) >= 5, lines)
        for text in [logs.everything(), repr(a), repr(a.target), a.target.display]:
            self.assertNotIn(self.password, text)
        self.assertEqual(a.target.display, "redis://127.0.0.1:%d/0" % (redis.port,))

    @defer.inlineCallbacks
    def test_tls(self):
        """rediss:// with a private CA (ssl_ca_certs) reaches a TLS-only Redis port."""
        directory = self.mktemp()
        os.makedirs(directory)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        paths = {}
        for name, blob in (("ca", ca.cert_pem.bytes()),
                           ("cert", b"".join(p.bytes() for p in cert.cert_chain_pems)),
                           ("key", cert.private_key_pem.bytes())):
            paths[name] = os.path.join(os.path.abspath(directory), name + ".pem")
            with open(paths[name], "wb") as f:
                f.write(blob)
        tls_port = free_port()
        redis = yield RedisServer.started(self, extra_args=[
            "--tls-port", str(tls_port), "--tls-cert-file", paths["cert"],
            "--tls-key-file", paths["key"], "--tls-ca-cert-file", paths["ca"],
            "--tls-auth-clients", "no"])
        plain = RedisFleetRegistry(redis.url, "plain", LocalNode("plain").record, heartbeat=0.2)
        self.addCleanup(plain.stop)
        yield plain.start()
        url = "rediss://127.0.0.1:%d/0?ssl_ca_certs=%s" % (tls_port, paths["ca"])
        secure = RedisFleetRegistry(url, "secure", LocalNode("secure").record, heartbeat=0.2)
        self.addCleanup(secure.stop)
        yield secure.start()
        self.assertTrue(secure.healthy)
        yield wait_until(lambda: plain.nodes() and secure.nodes())
        self.assertEqual([n.node_id for n in plain.nodes()], ["secure"])
        # Not trusted without the CA: the system's roots do not know it.
        untrusted = RedisFleetRegistry("rediss://127.0.0.1:%d/0" % (tls_port,), "u",
                                       LocalNode("u").record, heartbeat=0.2)
        self.addCleanup(untrusted.stop)
        yield untrusted.start()
        self.assertFalse(untrusted.healthy)


class UrlTests(unittest.TestCase):

    def test_parse(self):
        target = parse_redis_url("redis://:p%40ss@10.0.0.1:6380/2")
        self.assertEqual((target.host, target.port, target.db, target.username,
                          target.password, target.tls),
                         ("10.0.0.1", 6380, 2, None, "p@ss", False))
        self.assertEqual(target.display, "redis://10.0.0.1:6380/2")
        self.assertNotIn("p@ss", repr(target))
        target = parse_redis_url("rediss://fleet:pw@redis.internal?db=3")
        self.assertEqual((target.host, target.port, target.db, target.username,
                          target.password, target.tls),
                         ("redis.internal", 6379, 3, "fleet", "pw", True))
        self.assertEqual(parse_redis_url("redis://[::1]").display, "redis://[::1]:6379/0")
        self.assertEqual(parse_redis_url("redis://justpw@h").password, "justpw")

    def test_bad(self):
        for url, message in [
                ("http://:pw-123@h:1/0", "redis:// or rediss://"),
                ("redis://:pw-123@:6379/0", "names no host"),
                ("redis://:pw-123@h:99999/0", "bad Redis URL"),
                ("redis://:pw-123@h:1/x", "must be a number"),
                ("redis://:pw-123@h:1/0?timeout=3", "unknown Redis URL option"),
                ("redis://:pw-123@h:1/0?ssl_ca_certs=/x", "need a rediss:// URL"),
                ("rediss://:pw-123@h:1/0?ssl_certfile=/x", "go together"),
                ("redis://:pw-123@h:0/0", "bad Redis port"),
                # A password with a "/" splits where urllib looks for the port.
                ("redis://:pw-123/x@h:6379/0", "percent-encode"),
                ("redis://:s3cr/pw-123@h:6379/0", "percent-encode"),
                # A "#" starts a fragment: the rest of the password looked like the host.
                ("redis://:S3cret#pw-123@redis.internal:6379/0", "percent-encode"),
                ("redis://:pw-123@redis.internal:6379/0#S3cret", "%23"),
                ("redis://:pw-123@h:6379/0#", "%23")]:
            e = self.assertRaises(ValueError, parse_redis_url, url)
            self.assertIn(message, str(e))
            self.assertNotIn("pw-123", str(e))
        self.assertRaises(ValueError, RedisFleetRegistry, "redis:x", "a", None)
        self.assertRaises(ValueError, RedisFleetRegistry, "redis://h", "a b", None)


class DefaultsTests(unittest.TestCase):

    def test_names(self):
        self.patch(registry_module.socket, "gethostname", lambda: "gw-host")
        self.assertEqual(default_node_id(8443), "gw-host:8443")
        self.assertEqual(peer_dial_addr("10.0.0.5:8444"), "10.0.0.5:8444")
        self.assertEqual(peer_dial_addr("0.0.0.0:8444"), "gw-host:8444")
        self.assertEqual(peer_dial_addr("[::1]:8444"), "[::1]:8444")
        self.assertEqual(default_advertise_addr("10.0.0.5:8444", 8443), "10.0.0.5:8443")
        self.assertEqual(default_advertise_addr("[::]:8444", 8443), "gw-host:8443")
        self.assertEqual(default_advertise_addr("[2001:db8::1]:8444", 443), "[2001:db8::1]:443")


class MetricsTests(RegistryTestBase):

    @defer.inlineCallbacks
    def test_collector(self):
        from prometheus_client import CollectorRegistry
        a = yield self.registry("a")
        yield self.registry("b")
        yield wait_until(lambda: a.nodes())
        yield a.claim_port(9100, "c")
        metrics = CollectorRegistry()
        metrics.register(FleetRegistryCollector(a))
        value = metrics.get_sample_value
        self.assertEqual(value("anyproxy_fleet_registry_up"), 1)
        self.assertEqual(value("anyproxy_fleet_peers_known"), 1)
        self.assertEqual(value("anyproxy_fleet_port_claims"), 1)
        self.assertEqual(value("anyproxy_fleet_redis_errors_total"), 0)
        yield self.redis.stop()
        yield wait_until(lambda: not a.healthy)
        self.assertEqual(value("anyproxy_fleet_registry_up"), 0)
        self.assertTrue(value("anyproxy_fleet_redis_errors_total") >= 1)

