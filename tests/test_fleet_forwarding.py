# -*- test-case-name: tests.test_fleet_forwarding -*-
"""
Port forwarding in a fleet (anyproxy.gateway.port_forwarding.fleet_claims and
the forwarder's fleet path): a port number belongs to one client across the
fleet, it listens on the gateway that won its claim, the claim goes with the
client's tunnel, another gateway takes the port over, and while the registry
cannot decide nothing is opened until it can.

Gateways run in this process on loopback with the in-memory registry
(tests.fleet_support), and once with the real Redis registry.
"""

import hashlib

from twisted.internet import defer, protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutput
from twisted.trial import unittest

from anyproxy.fleet.registry import RegistryUnavailable
from anyproxy.gateway.port_forwarding.fleet_claims import (
    FleetPortClaims, Granted, Held, Unavailable, owner_from_token, owner_token)
from tests.fleet_support import FleetDeployment, MemoryFleet
from tests.ports import free_ports
from tests.redis_server import RedisServer
from tests.support import AnswerAfterEOF, Echo, listen_tcp
from tests.test_e2e_forwarding import open_port, sleep, tcp_exchange, tcp_refused, \
    wait_until


def digest_answer(payload):
    """What an L{AnswerAfterEOF} target answers to C{payload}."""
    return b"%d %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())


class FakeRegistry:
    """Claims in a dict; C{failing} makes every call fail as an unreachable Redis does."""

    node_id = "node-a"

    def __init__(self):
        self.ports = {}
        self.failing = False
        self.hanging = False
        self.released = []

    def claim_port(self, port, owner):
        if self.failing:
            return defer.fail(RegistryUnavailable("Redis at 127.0.0.1:1 is not connected"))
        if self.hanging:
            return defer.Deferred()
        holder = self.ports.setdefault(port, (self.node_id, owner))
        return defer.succeed(holder == (self.node_id, owner))

    def release_port(self, port, owner):
        self.released.append((port, owner))
        if self.ports.get(port) == (self.node_id, owner):
            del self.ports[port]
        return defer.succeed(None)

    def port_holder(self, port):
        return defer.succeed(self.ports.get(port))


def result_of(deferred):
    """What C{deferred} has fired with so far, or C{None}; its result is left in place."""
    results = []
    deferred.addBoth(lambda result: results.append(result) or result)
    return results[0] if results else None


class FleetPortClaimsTests(unittest.SynchronousTestCase):
    """FleetPortClaims against a fake registry."""

    ONE, TWO = ("default", "one", "site-one"), ("default", "two", "site-two")

    def setUp(self):
        self.registry = FakeRegistry()
        self.clock = Clock()
        self.claims = FleetPortClaims(self.registry, self.clock, retry_interval=2.0, timeout=5.0)

    def test_owner_token_round_trips(self):
        """Any group and client id survive the claim's owner text; other text reads as None."""
        owner = ("g/with:odd", 'c"1/', "cred\u00e9")
        self.assertEqual(owner_from_token(owner_token(owner)), owner)
        self.assertIsNone(owner_from_token("client-1"))
        self.assertIsNone(owner_from_token("[1, 2, 3]"))
        self.assertEqual(owner_from_token('["g", "c"]'), ("g", "c", ""))  # an older node's
        # What no node writes: nested past the recursion limit, too long, not text.
        for token in ("[" * 100000, '["g", "c", "%s"]' % ("x" * 70000,), None, 5):
            self.assertIsNone(owner_from_token(token))

    def test_both_protocols_share_one_claim(self):
        """tcp and udp of one number hold one claim, given back when neither is forwarded."""
        self.assertEqual(result_of(self.claims.acquire(9001, "tcp", self.ONE)), Granted())
        self.assertEqual(result_of(self.claims.acquire(9001, "udp", self.ONE)), Granted())
        self.assertEqual(self.claims.held(), {9001: self.ONE})
        self.claims.release(9001, "tcp", self.ONE)
        self.assertIn(9001, self.registry.ports)
        self.claims.release(9001, "udp", self.ONE)
        self.assertEqual(self.registry.ports, {})
        self.assertEqual(self.claims.held(), {})

    def test_held_names_node_and_client(self):
        """A number held through another node is refused, naming that node and client."""
        self.registry.ports[9001] = ("node-b", owner_token(self.TWO))
        self.assertEqual(result_of(self.claims.acquire(9001, "tcp", self.ONE)),
                         Held("node-b", self.TWO))
        self.assertEqual(self.claims.held(), {})

    def test_held_here_by_another_client(self):
        """Another client here holding the number (other protocol) is answered at once."""
        result_of(self.claims.acquire(9001, "udp", self.TWO))
        self.assertEqual(result_of(self.claims.acquire(9001, "tcp", self.ONE)),
                         Held("node-a", self.TWO))

    def test_unavailable(self):
        """An unreachable registry decides nothing: Unavailable, with its reason."""
        self.registry.failing = True
        outcome = result_of(self.claims.acquire(9001, "tcp", self.ONE))
        self.assertIsInstance(outcome, Unavailable)
        self.assertIn("not connected", outcome.why)
        self.assertEqual(self.claims.held(), {})

    def test_unanswered_claim_times_out_and_is_given_back(self):
        """An unanswered claim is Unavailable after the timeout, and released in case it landed."""
        self.registry.hanging = True
        answer = self.claims.acquire(9001, "tcp", self.ONE)
        joined = self.claims.acquire(9001, "udp", self.ONE)
        other = result_of(self.claims.acquire(9001, "tcp", self.TWO))
        self.assertEqual(other, Held("node-a", self.ONE))  # pending for ONE already
        self.assertIsNone(result_of(answer))
        self.clock.advance(5.0)
        self.assertEqual(result_of(answer), Unavailable("no answer within 5 s"))
        self.assertEqual(result_of(joined), Unavailable("no answer within 5 s"))
        self.assertEqual(self.registry.released, [(9001, owner_token(self.ONE))])

    def test_lost_number_told(self):
        """A number the registry gave to another node is forgotten and reported once."""
        lost = []
        self.claims.on_lost = lambda number, owner: lost.append((number, owner))
        result_of(self.claims.acquire(9001, "tcp", self.ONE))
        self.claims.port_lost(9001, owner_token(self.TWO))  # not ours: ignored
        self.claims.port_lost(9001, owner_token(self.ONE))
        self.assertEqual(lost, [(9001, self.ONE)])
        self.assertEqual(self.claims.held(), {})


class ForwardingFleet:
    """Gateways of one fleet that forward ports from a shared allowed range."""

    def __init__(self, testcase, *names, redis_url=None):
        self.testcase = testcase
        self.store = MemoryFleet()
        self.ports = free_ports(3)
        self.nodes = []
        pki = None
        for name in names:
            node = FleetDeployment(testcase, self.store, "node-" + name, pki=pki,
                                   redis_url=redis_url)
            pki = node.pki
            self.nodes.append(node)

    @defer.inlineCallbacks
    def start(self):
        for node in self.nodes:
            yield node.start_gateway(gateway={
                "open_ports_allowed": ["%d-%d" % (self.ports[0], self.ports[-1])]})
        return self.nodes


@defer.inlineCallbacks
def start_forwarding_client(deployment, client_id, remote, target, **client):
    """A client of C{deployment} asking for C{remote}; returns it and its first factory."""
    service = yield deployment.start_client(wait=False, client=dict(
        client_id=client_id, open_ports=[open_port(remote, target)], **client))
    factories = list(service.factories.values())
    yield wait_until(lambda: all(answer_for(factory, remote) for factory in factories),
                     what="the open_ports answers of %s" % (client_id,))
    return service, factories[0]


def answer_for(factory, remote):
    """The gateway's answer to C{remote}/tcp on C{factory}'s tunnel, or C{None} yet."""
    for answer in factory.open_ports_answer or ():
        if answer["remote_port"] == remote and answer["protocol"] == "tcp":
            return answer
    return None


class FleetForwardingTests(unittest.TestCase):
    """Two gateways of one fleet, in-memory registry."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fleet = ForwardingFleet(self, "a", "b")
        self.a, self.b = yield self.fleet.start()
        self.remote = self.fleet.ports[1]
        self.digest_target = listen_tcp(
            self, protocol.Factory.forProtocol(AnswerAfterEOF)).getHost().port
        self.echo_target = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    @defer.inlineCallbacks
    def test_conflict_decided_fleet_wide(self):
        """A client on another gateway is refused as a local conflict is, naming the holder."""
        first, first_factory = yield start_forwarding_client(
            self.a, "one", self.remote, self.digest_target)
        second, second_factory = yield start_forwarding_client(
            self.b, "two", self.remote, self.echo_target)
        self.assertTrue(answer_for(first_factory, self.remote)["ok"])
        self.assertEqual(answer_for(second_factory, self.remote), {
            "remote_port": self.remote, "protocol": "tcp", "ok": False,
            "error": "port %d/tcp already forwarded for client one (through gateway node-a)"
                     % (self.remote,)})
        self.assertEqual(self.a.gateway.port_forwarding.forwards(),
                         {(self.remote, "tcp"): "one"})
        self.assertEqual(self.b.gateway.port_forwarding.forwards(), {})
        self.assertEqual(self.fleet.store.ports[self.remote][0], "node-a")
        # The port listens on A, the gateway the holder's tunnel is attached to.
        self.assertEqual((yield deferToThread(tcp_exchange, self.remote, b"abc")),
                         digest_answer(b"abc"))

    @defer.inlineCallbacks
    def test_claim_released_and_taken_over_through_another_gateway(self):
        """The holder's tunnel goes: its claim is released and B's waiting client gets the port."""
        first, _ = yield start_forwarding_client(self.a, "one", self.remote, self.digest_target)
        second, second_factory = yield start_forwarding_client(
            self.b, "two", self.remote, self.echo_target)
        established = second_factory.established
        yield first.stopService()
        yield wait_until(lambda: answer_for(second_factory, self.remote)["ok"], timeout=10,
                         what="B to take the port over")
        self.assertEqual(self.fleet.store.ports[self.remote][0], "node-b")
        self.assertEqual(self.a.gateway.port_forwarding.forwards(), {})
        self.assertEqual((yield deferToThread(tcp_exchange, self.remote, b"moved")), b"moved")
        self.assertEqual(second_factory.established, established)  # no reconnect

        yield second.stopService()
        yield wait_until(lambda: self.remote not in self.fleet.store.ports,
                         what="the claim to be released")
        yield sleep(0.05)  # a stopped port closes on the next reactor turn
        self.assertTrue((yield deferToThread(tcp_refused, self.remote)))

    @defer.inlineCallbacks
    def test_leaving_closes_ports_before_the_claims_go(self):
        """
        A gateway leaving the fleet (a drain's first step) stops taking users
        on its forwarded ports before its claims leave the registry, so no
        moment has two gateways forwarding one port; B's waiting client then
        takes the port, and A opens no port again.
        """
        first, _ = yield start_forwarding_client(self.a, "one", self.remote, self.digest_target)
        second, second_factory = yield start_forwarding_client(
            self.b, "two", self.remote, self.echo_target)
        registry_stop = self.a.gateway.fleet.registry.stop
        seen_at_stop = []

        def stop():
            # Still held by "one" here (the claim goes in this call), no longer accepting.
            # (A loopback connect answers at once: no wait in the reactor's thread.)
            seen_at_stop.append((self.a.gateway.port_forwarding.forwards(),
                                 tcp_refused(self.remote)))
            return registry_stop()
        self.a.gateway.fleet.registry.stop = stop
        self.addCleanup(setattr, self.a.gateway.fleet.registry, "stop", registry_stop)
        yield self.a.gateway.leave_fleet()
        self.a.gateway.fleet.registry.stop = registry_stop
        self.assertEqual(seen_at_stop, [({(self.remote, "tcp"): "one"}, True)])
        yield wait_until(lambda: answer_for(second_factory, self.remote)["ok"], timeout=10,
                         what="B to take the port over")
        self.assertEqual((yield deferToThread(tcp_exchange, self.remote, b"moved")), b"moved")

    @defer.inlineCallbacks
    def test_client_on_two_gateways(self):
        """
        A client with tunnels to both gateways asks each: one forwards the
        port, the other says so and takes over when that gateway goes.
        """
        addresses = ["127.0.0.1:%d" % (node.gateway_port,) for node in (self.a, self.b)]
        client, _ = yield start_forwarding_client(self.a, "one", self.remote, self.digest_target,
                                                  gateway_addr=addresses)
        answers = {factory.gateway: answer_for(factory, self.remote)
                   for factory in client.factories.values()}
        self.assertEqual(sorted(answer["ok"] for answer in answers.values()), [False, True],
                         answers)
        holder = self.a if self.a.gateway.port_forwarding.forwards() else self.b
        standby = self.b if holder is self.a else self.a
        (refusal,) = [answer for answer in answers.values() if not answer["ok"]]
        self.assertEqual(refusal["error"],
                         "port %d/tcp already forwarded for this client through gateway %s; it "
                         "moves here if that gateway lets it go" % (self.remote, holder.node_id))
        self.assertEqual((yield deferToThread(tcp_exchange, self.remote, b"x")),
                         digest_answer(b"x"))

        yield holder.gateway.stopService()
        yield wait_until(lambda: standby.gateway.port_forwarding.forwards(), timeout=10,
                         what="the other gateway to take the port over")
        self.assertEqual((yield deferToThread(tcp_exchange, self.remote, b"y")),
                         digest_answer(b"y"))

    @defer.inlineCallbacks
    def test_undecided_while_registry_unreachable(self):
        """Undecidable claim: refused with the reason, then opened once the registry answers."""
        registry = self.a.node.registry
        real_claim = registry.claim_port
        registry.claim_port = lambda port, owner: defer.fail(
            RegistryUnavailable("Redis at 127.0.0.1:1 is not connected"))
        _, factory = yield start_forwarding_client(self.a, "one", self.remote, self.digest_target)
        refusal = answer_for(factory, self.remote)
        self.assertFalse(refusal["ok"])
        self.assertEqual(refusal["error"], (
            "port %d/tcp not opened yet: the fleet registry cannot decide who holds it (Redis "
            "at 127.0.0.1:1 is not connected); asked again when it answers" % (self.remote,)))
        self.assertTrue((yield deferToThread(tcp_refused, self.remote)))
        registry.claim_port = real_claim
        yield wait_until(lambda: answer_for(factory, self.remote)["ok"], timeout=10,
                         what="the port to open once the registry answers")
        self.assertEqual((yield deferToThread(tcp_exchange, self.remote, b"z")),
                         digest_answer(b"z"))


class RedisForwardingTests(unittest.TestCase):
    """The same with the Redis registry: the claim is a key in Redis."""

    timeout = 90

    @defer.inlineCallbacks
    def test_conflict_claim_key_and_redis_outage(self):
        """
        A's client holds the port (a Redis key naming node-a); B's client is
        refused naming it.  With Redis down, a new claim is refused as
        undecided and the port opens once Redis is back.
        """
        server = yield RedisServer.started(self)
        fleet = ForwardingFleet(self, "a", "b", redis_url=server.url)
        a, b = yield fleet.start()
        remote, later = fleet.ports[0], fleet.ports[2]
        target = listen_tcp(self, protocol.Factory.forProtocol(AnswerAfterEOF)).getHost().port
        echo = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield wait_until(lambda: a.node.registry.healthy and b.node.registry.healthy,
                         what="both registries up")

        _, first = yield start_forwarding_client(a, "one", remote, target)
        self.assertTrue(answer_for(first, remote)["ok"])
        _, second = yield start_forwarding_client(b, "two", remote, echo)
        self.assertEqual(answer_for(second, remote)["error"],
                         "port %d/tcp already forwarded for client one (through gateway node-a)"
                         % (remote,))
        value = yield server_get(server, "anyproxy:port:%d" % (remote,))
        self.assertEqual(value, 'node-a/["default","one","gateway.auth_username"]')
        self.assertEqual((yield deferToThread(tcp_exchange, remote, b"r")), digest_answer(b"r"))

        yield server.stop()
        yield wait_until(lambda: not a.node.registry.healthy, what="A to see Redis gone")
        _, third = yield start_forwarding_client(a, "three", later, echo)
        self.assertIn("not opened yet: the fleet registry cannot decide",
                      answer_for(third, later)["error"])
        # What it held before goes on being forwarded meanwhile.
        self.assertEqual((yield deferToThread(tcp_exchange, remote, b"s")), digest_answer(b"s"))
        yield server.start()
        yield wait_until(lambda: answer_for(third, later)["ok"], timeout=20,
                         what="the port to open once Redis is back")
        self.assertEqual((yield deferToThread(tcp_exchange, later, b"back")), b"back")
        value = yield server_get(server, "anyproxy:port:%d" % (later,))
        self.assertEqual(value, 'node-a/["default","three","gateway.auth_username"]')


def server_get(server, key):
    """C{GET key} on the test Redis, through redis-cli (a Deferred of the text, '' if none)."""
    reading = getProcessOutput("/usr/bin/redis-cli",
                               ("-h", "127.0.0.1", "-p", str(server.port), "GET", key))
    return reading.addCallback(lambda out: out.decode().strip())
