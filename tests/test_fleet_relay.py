# -*- test-case-name: tests.test_fleet_relay -*-
"""
The relay between gateways (anyproxy.fleet.peer_link, relay, pool): a user
on gateway A reaches a group whose only client is on gateway B, errors pass
through unchanged, a lost peer resets what it relayed and new streams go
elsewhere, links need the fleet CA, and a relayed OPEN is never relayed again.

Gateways run in this process on loopback with an in-memory registry
(tests.fleet_support); the registry's Redis side is tested by its own module.
"""

import hashlib
import socket
import time

import attr
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from anyproxy.config.load import load_config
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.fleet.interfaces import NodeRecord
from anyproxy.fleet.peer_link import PeerLinks
from anyproxy.fleet.pool import LACKING_RETRY, NODE_RETRY, FleetTunnelPool
from anyproxy.gateway.tunnel_pool import Tunnel, TunnelPool
from tests.fleet_support import FleetDeployment, MemoryFleet
from tests.redis_server import RedisServer
from tests.support import AnswerAfterEOF, Echo, TestPKI, blob, listen_tcp, run_curl
from tests import test_e2e_errors
from tests.test_e2e_multigateway import read_until_closed
from tests.test_e2e_reload import roundtrip
from tests.test_e2e_tcp import recv_all, socks_connect, socks_echo, socks_error
from tests.test_e2e_udp import UdpEcho, exchange, listen_udp, udp_socket

MB = 1024 * 1024


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(predicate, timeout=10, what="condition"):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        yield sleep(0.02)
    raise AssertionError("timed out waiting for %s" % (what,))


class Fleet:
    """Gateways sharing one L{MemoryFleet} and one test PKI (fleet CA and tunnel CA)."""

    def __init__(self, testcase, *names, redis_url=None):
        self.testcase = testcase
        self.store = MemoryFleet()
        self.nodes = []
        pki = None
        for name in names:
            node = FleetDeployment(testcase, self.store, "node-" + name, pki=pki,
                                   redis_url=redis_url)
            pki = node.pki
            self.nodes.append(node)

    @defer.inlineCallbacks
    def start(self, **overrides):
        for node in self.nodes:
            yield node.start_gateway(**overrides)
        return self.nodes

    def listed(self, viewer, group, holder):
        """Wait until C{viewer}'s registry lists C{holder} for C{group}."""
        return wait_until(lambda: holder.node_id in [
            each.node_id for each in viewer.node.registry.nodes_for_group(group)],
            what="%s to list %s for %s" % (viewer.node_id, holder.node_id, group))


def sample(deployment, name, **labels):
    return deployment.gateway.metrics.registry.get_sample_value(name, labels) or 0


def hash_through(socks_port, target_port, payload):
    """Send C{payload} to an L{AnswerAfterEOF} target, half-close, return its answer."""
    sock = socks_connect(socks_port, "127.0.0.1", target_port)
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)
    finally:
        sock.close()


class RelayedStreamTests(unittest.TestCase):
    """A user on A reaches the group whose only client is on B."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.fleet = Fleet(self, "a", "b")
        self.a, self.b = yield self.fleet.start()
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.hash_port = listen_tcp(
            self, protocol.Factory.forProtocol(AnswerAfterEOF)).getHost().port
        yield self.b.start_client()
        yield self.fleet.listed(self.a, "default", self.b)

    @defer.inlineCallbacks
    def test_bulk_intact_with_half_close(self):
        """16 MB through A reach the target on B's client intact (by hash), after our FIN."""
        payload = blob(16 * MB)
        answer = yield deferToThread(hash_through, self.a.socks_port, self.hash_port, payload)
        expected = b"%d %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())
        self.assertEqual(answer, expected)
        self.assertEqual(self.a.gateway.tunnel_pool.tunnels(), [])
        self.assertEqual([(link.node_id, link.group) for link in self.a.node.links.links()],
                         [("node-b", "default")])
        self.assertEqual(self.b.node.relay.served, 1)

    @defer.inlineCallbacks
    def test_echo_both_ways_and_metrics(self):
        """An echo of 4 MB comes back whole; both sides count the relayed stream and bytes."""
        payload = blob(4 * MB)
        self.assertEqual((yield deferToThread(socks_echo, self.a.socks_port, "127.0.0.1",
                                              self.echo_port, payload)), payload)
        yield wait_until(lambda: not self.b.node.server.factory.links
                         or not any(link.active_streams for link in
                                    self.b.node.server.factory.links), what="stream end")
        streams = "anyproxy_fleet_relayed_streams_total"
        self.assertEqual(sample(self.a, streams, side="sent", outcome="ok"), 1)
        self.assertEqual(sample(self.b, streams, side="served", outcome="ok"), 1)
        self.assertEqual(sample(self.a, streams, side="served", outcome="ok"), 0)
        relayed = "anyproxy_fleet_relayed_bytes_total"
        for deployment, side in ((self.a, "sent"), (self.b, "served")):
            yield wait_until(lambda: sample(deployment, relayed, side=side, direction="out")
                             == len(payload), what="bytes counted")
            self.assertEqual(sample(deployment, relayed, side=side, direction="in"), len(payload))
        self.assertEqual(sample(self.a, "anyproxy_fleet_relay_open_seconds_count", side="sent"), 1)
        self.assertEqual(sample(self.a, "anyproxy_fleet_peer_links", role="dialed"), 1)
        self.assertEqual(sample(self.b, "anyproxy_fleet_peer_links", role="accepted"), 1)

    @defer.inlineCallbacks
    def test_one_link_shared_and_closed_when_idle(self):
        """Ten streams share one link; once they are over an idle sweep closes it."""
        socks = yield deferToThread(lambda: [
            socks_connect(self.a.socks_port, "127.0.0.1", self.echo_port) for _ in range(10)])
        (link,) = self.a.node.links.links()
        self.assertEqual(link.mux.stream_count, 10)
        for each in socks:
            each.close()
        yield wait_until(lambda: link.mux.stream_count == 0, what="streams to end")
        self.a.node.links.idle = 0.01
        yield sleep(0.02)
        self.a.node.links.close_idle()
        self.assertEqual(self.a.node.links.links(), [])
        yield wait_until(lambda: not self.b.node.server.factory.links, what="link to close")
        # And the next stream makes a new one.
        self.assertEqual((yield deferToThread(socks_echo, self.a.socks_port, "127.0.0.1",
                                              self.echo_port, b"again")), b"again")

    @defer.inlineCallbacks
    def test_udp_associate_echo(self):
        """UDP ASSOCIATE on A: datagrams reach B's client's network and come back."""
        udp_echo_port = listen_udp(self, UdpEcho())
        sock = yield deferToThread(udp_socket, self.a.socks_port)
        self.addCleanup(sock.close)

        def run():
            got = []
            for size in (1, 1000, 30000):
                payload = bytes([size % 251]) * size
                data, source = exchange(sock, payload, ("127.0.0.1", udp_echo_port))
                got.append((data == payload, source))
            return got

        self.assertEqual((yield deferToThread(run)),
                         [(True, ("127.0.0.1", udp_echo_port))] * 3)
        self.assertEqual(self.b.node.relay.served, 1)


class ReplacedLinkTests(unittest.TestCase):
    """A link to a draining peer, replaced by a new one, keeps its streams until they end."""

    timeout = 60

    @defer.inlineCallbacks
    def test_streams_in_flight_finish(self):
        fleet = Fleet(self, "a", "b")
        a, b = yield fleet.start()
        echo = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield b.start_client()
        yield fleet.listed(a, "default", b)
        first = yield deferToThread(socks_connect, a.socks_port, "127.0.0.1", echo)
        self.addCleanup(first.close)
        self.assertEqual((yield deferToThread(roundtrip, first, b"one")), b"one")
        (old,) = a.node.links.links()
        # B says GOAWAY on the links peers dialed, as its drain does; A still lists it.
        for link in list(b.node.server.factory.links):
            link.mux.go_away(Reason.NO_TUNNEL)
        yield wait_until(lambda: old.mux.draining, what="the link to go away")
        # A new user of the group: a new link to B replaces the old one.
        self.assertEqual((yield deferToThread(socks_echo, a.socks_port, "127.0.0.1", echo,
                                              b"two")), b"two")
        self.assertEqual(len([link for link in a.node.links.links() if link is not old]), 1)
        self.assertEqual((yield deferToThread(roundtrip, first, b"still open")), b"still open")
        first.close()
        yield wait_until(lambda: old.lost, what="the old link to close once drained")


class FleetReloadTests(unittest.TestCase):
    """A reload cannot take a running node out of its fleet: it says a restart does."""

    timeout = 60

    @defer.inlineCallbacks
    def test_fleet_section_removed(self):
        fleet = Fleet(self, "a", "b")
        a, b = yield fleet.start()
        data = a.gateway_config()
        del data["gateway"]["fleet"]
        notes = yield a.gateway.reconfigure(load_config(a.write_config(data)))
        self.assertIn("gateway.fleet: leaving the fleet takes effect at the next restart", notes)
        record = a.node.local_record()  # the heartbeat's record: still built
        self.assertEqual(record.node_id, "node-a")
        self.assertEqual(a.node.status()["node"], "node-a")
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield b.start_client()
        yield fleet.listed(a, "default", b)
        self.assertEqual((yield deferToThread(socks_echo, a.socks_port, "127.0.0.1", echo_port,
                                              b"still relayed")), b"still relayed")

    def test_restart_keys_named(self):
        """Leaving or joining a fleet, or another redis or node_id, is reported as needing a restart."""
        from anyproxy.twistd.reload import RESTART_KEYS
        for key in ("gateway.fleet", "gateway.fleet.redis", "gateway.fleet.node_id"):
            self.assertIn(key, RESTART_KEYS)


class RedisRegistryTests(unittest.TestCase):
    """The gateway's own composition: the Redis registry routes the relay."""

    timeout = 60

    @defer.inlineCallbacks
    def test_relay_through_redis_view(self):
        """With Redis as the registry, a user on A reaches B's client, and A's metrics show it."""
        server = yield RedisServer.started(self)
        fleet = Fleet(self, "a", "b", redis_url=server.url)
        a, b = yield fleet.start()
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield b.start_client()
        yield fleet.listed(a, "default", b)
        (record,) = a.node.registry.nodes_for_group("default")
        self.assertEqual(record.peer_addr, b.node.peer_address())
        self.assertEqual((yield deferToThread(socks_echo, a.socks_port, "127.0.0.1", echo_port,
                                              b"via redis")), b"via redis")
        self.assertEqual(b.node.relay.served, 1)
        self.assertEqual(sample(a, "anyproxy_fleet_registry_up"), 1)


    @defer.inlineCallbacks
    def test_default_node_ids(self):
        """
        Without gateway.fleet.node_id (the host name and tunnel port, by
        default) links announce the same id the records carry, and relay.
        """
        server = yield RedisServer.started(self)
        fleet = Fleet(self, "a", "b", redis_url=server.url)
        for node in fleet.nodes:
            node.node_id = ""
        a, b = yield fleet.start()
        self.assertNotEqual(a.node.registry.node_id, b.node.registry.node_id)
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield b.start_client()
        yield wait_until(lambda: [each.node_id for each in a.node.registry.nodes_for_group("default")]
                         == [b.node.registry.node_id], what="A to list B for default")
        self.assertEqual((yield deferToThread(socks_echo, a.socks_port, "127.0.0.1", echo_port,
                                              b"default ids")), b"default ids")
        self.assertEqual(b.node.relay.served, 1)


class RelayedErrorTests(test_e2e_errors.ErrorTableTests):
    """
    The error table, with the user on A and the only client on B: every
    reason reaches the user as if the client were on A (the error-table
    tests run again through the relay).
    """

    @defer.inlineCallbacks
    def setUp(self):
        fleet = Fleet(self, "a", "b")
        a, b = yield fleet.start()
        self.deployment = a  # users come to A; ErrorTableTests use self.deployment
        self.echo = test_e2e_errors.CountingEcho()
        self.echo_port = listen_tcp(self, self.echo).getHost().port
        b.resolver.table["forbidden.test"] = ["127.0.0.1"]
        yield b.start_client(client={
            "forbidden_hosts": ["forbidden.test", "127.0.0.1:%d" % (self.echo_port,)],
            "connect_timeout": 1})
        yield fleet.listed(a, "default", b)
        self.client_gateway = b

    @defer.inlineCallbacks
    def test_still_serving_after_errors(self):
        """After errors the relay still serves (no stuck link), through one link."""
        yield super().test_still_serving_after_errors()
        self.assertEqual(len(self.deployment.node.links.links()), 1)


class NoTunnelAnywhereTests(unittest.TestCase):
    """No client of the group on any gateway: 0x01 / 503, after the wait."""

    timeout = 60

    @defer.inlineCallbacks
    def test_no_tunnel(self):
        """SOCKS5 gets REP 0x01 and HTTP 503 on A when no node holds the group."""
        fleet = Fleet(self, "a", "b")
        a, _ = yield fleet.start()
        msg = yield deferToThread(socks_error, a.socks_port, "127.0.0.1", 9)
        self.assertIn("0x01", msg or "")
        out, _, _ = yield run_curl(
            "-x", "http://alice:s3cret-proxy-pw@127.0.0.1:%d" % (a.http_port,),
            "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9/")
        self.assertEqual(out, b"503")


class PeerLossTests(unittest.TestCase):
    """A node holding the group vanishes: what it relayed is reset, new streams go elsewhere."""

    timeout = 90

    @defer.inlineCallbacks
    def test_streams_reset_and_new_ones_elsewhere(self):
        """The relaying node's links drop and its port closes: A's user sees a close, the
        next streams go to the other node."""
        fleet = Fleet(self, "a", "b", "c")
        a, b, c = yield fleet.start()
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield b.start_client(client={"client_id": "client-b"})
        yield c.start_client(client={"client_id": "client-c"})
        yield fleet.listed(a, "default", b)
        yield fleet.listed(a, "default", c)
        user = yield deferToThread(socks_connect, a.socks_port, "127.0.0.1", echo_port)
        self.addCleanup(user.close)
        yield deferToThread(user.sendall, b"before")
        self.assertEqual((yield deferToThread(user.recv, 6)), b"before")
        victim, other = (b, c) if b.node.relay.served else (c, b)
        self.assertEqual((victim.node.relay.served, other.node.relay.served), (1, 0))

        # As a kill -9 looks from A: connections cut, the port closed, and the
        # registry still listing the node (until its record expires).
        cut = time.monotonic()
        yield victim.node.server.listener.stopService()
        for link in list(victim.node.server.factory.links):
            link.close()
        closed = yield deferToThread(read_until_closed, user, 5)
        noticed = time.monotonic() - cut
        self.assertTrue(closed)
        self.assertLess(noticed, 2.0)
        self.assertIn(victim.node_id, [n.node_id for n in a.node.registry.nodes_for_group(
            "default")])

        for attempt in range(3):
            self.assertEqual((yield deferToThread(socks_echo, a.socks_port, "127.0.0.1",
                                                  echo_port, b"after")), b"after")
        self.assertEqual(other.node.relay.served, 3)
        print("\nrelay loss: link cut -> user's relayed stream closed: %.1f ms"
              % (noticed * 1000,))


class SilentLinkTests(unittest.TestCase):
    """A peer cut off without a TCP close is found by the link's pings."""

    timeout = 60

    @defer.inlineCallbacks
    def test_black_holed_link_dropped(self):
        """
        Neither end reads what the other sends (a network split: no FIN, no
        RST): within three heartbeats of silence (1 s here) both ends drop
        the link, a relayed stream on it is reset, and A's pool hands it out
        no more.
        """
        fleet = Fleet(self, "a", "b")
        a, b = yield fleet.start()
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield b.start_client(client={"client_id": "client-b"})
        yield fleet.listed(a, "default", b)
        user = yield deferToThread(socks_connect, a.socks_port, "127.0.0.1", echo_port)
        self.addCleanup(user.close)
        yield deferToThread(user.sendall, b"before")
        self.assertEqual((yield deferToThread(user.recv, 6)), b"before")
        (link,) = list(a.node.links.links())
        (accepted,) = list(b.node.server.factory.links)
        # Quiet for a heartbeat first, so the silence starts now on both ends.
        link.mux.lowest_transport.stopReading()
        accepted.mux.lowest_transport.stopReading()
        cut = time.monotonic()
        closed = yield deferToThread(read_until_closed, user, 8)
        noticed = time.monotonic() - cut
        self.assertTrue(closed)
        yield wait_until(lambda: link.lost and accepted not in b.node.server.factory.links,
                         timeout=8, what="both ends to drop the silent link")
        # 3 silent heartbeats, found within a fifth of one after that.
        self.assertLess(noticed, 3 * 1.0 + 1.5)
        self.assertIsNone(a.node.links.usable_link(link.node_id, "default"))
        print("\nsilent link: cut -> relayed stream reset: %.1f s" % (noticed,))


class LinkSecurityTests(unittest.TestCase):
    """Links take only the fleet CA's node certificates, and never relay twice."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fleet = Fleet(self, "a", "b", "c")
        self.a, self.b, self.c = yield self.fleet.start()

    def dialer(self, pki):
        """A L{PeerLinks} presenting C{pki}'s certificate, trusting the fleet CA."""
        fleet = attr.evolve(self.a.gateway.config.gateway.fleet, node_id="intruder",
                            peer_cert=pki.cert_path, peer_key=pki.key_path)
        links = PeerLinks(reactor, fleet, link_wait=3)
        self.addCleanup(links.close_all)
        return links

    @defer.inlineCallbacks
    def test_foreign_certificate_refused(self):
        """A peer whose certificate is not from the fleet CA gets no link; the fleet's does."""
        target = self.a.node.registry.record()
        foreign = TestPKI(self.mktemp())
        failure = yield self.assertFailure(
            self.dialer(foreign).link_for(target, "default"), StreamOpenError)
        self.assertEqual(failure.reason, Reason.NO_TUNNEL)
        self.assertEqual(self.a.node.server.factory.links, set())
        # The control: the same dial with the fleet's own certificate works.
        link = yield self.dialer(self.a.pki).link_for(target, "default")
        self.assertTrue(link.usable)
        yield wait_until(lambda: len(self.a.node.server.factory.links) == 1, what="link")

    @defer.inlineCallbacks
    def test_no_second_hop(self):
        """An OPEN on a link to B for a group only C holds: NO_TUNNEL, not relayed to C."""
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield self.c.start_client()
        yield self.fleet.listed(self.b, "default", self.c)
        link = yield self.a.node.links.link_for(self.b.node.registry.record(), "default")
        failure = yield self.assertFailure(
            link.mux.open_stream("tcp", "127.0.0.1", echo_port), StreamOpenError)
        self.assertEqual(failure.reason, Reason.NO_TUNNEL)
        self.assertEqual(self.c.node.relay.served, 0)
        # C does serve the same stream when asked directly.
        link = yield self.a.node.links.link_for(self.c.node.registry.record(), "default")
        stream = yield link.mux.open_stream("tcp", "127.0.0.1", echo_port)
        stream.reset()
        self.assertEqual(self.c.node.relay.served, 1)


# -- the pool's choices, on a Clock ---------------------------------------------


@attr.s
class FakeMux:
    stream_count = attr.ib(default=0)
    draining = attr.ib(default=False)

    def streams(self):
        return []


@attr.s
class FakeLink:
    node_id = attr.ib()
    group = attr.ib()
    mux = attr.ib(factory=FakeMux)
    last_used = attr.ib(default=0.0)
    usable = True


class FakeLinks:
    """Records each dial; nodes in C{unreachable} fail."""

    def __init__(self):
        self.dialed = []
        self.unreachable = set()
        self.made = {}

    def links(self):
        return list(self.made.values())

    def usable_link(self, node_id, group):
        return self.made.get((node_id, group))

    def link_for(self, node, group):
        self.dialed.append(node.node_id)
        if node.node_id in self.unreachable:
            return defer.fail(StreamOpenError(Reason.NO_TUNNEL, "unreachable"))
        link = self.made.setdefault((node.node_id, group), FakeLink(node.node_id, group))
        return defer.succeed(link)


class FakeRegistry:
    node_id = "me"

    def __init__(self, records=()):
        self.records = list(records)
        self.observers = []
        self.changes = 0

    def nodes_for_group(self, group):
        return [r for r in self.records if group in r.groups and not r.draining]

    def add_observer(self, callback):
        self.observers.append(callback)

    def local_changed(self):
        self.changes += 1

    def change(self, records):
        self.records = list(records)
        for observer in self.observers:
            observer()


def node(name, streams=0, groups=("g",)):
    return NodeRecord(node_id=name, peer_addr="127.0.0.1:1", tunnel_addr="", groups=groups,
                      streams=streams)


class FleetTunnelPoolTests(unittest.SynchronousTestCase):
    """The fleet pool's choice: local first, then the least loaded node that answers."""

    def setUp(self):
        self.clock = task.Clock()
        self.local = TunnelPool(self.clock)
        self.registry = FakeRegistry()
        self.links = FakeLinks()
        self.pool = FleetTunnelPool(self.local, self.registry, self.links, self.clock)

    def chosen(self, group="g", timeout=1.0):
        return self.successResultOf(self.pool.wait_for(group, timeout))

    def test_local_first(self):
        """A local tunnel of the group is chosen without dialing; adding it tells the registry."""
        self.registry.change([node("n1")])
        local = Tunnel("c1", "g", FakeMux())
        self.pool.add(local)
        self.assertIs(self.chosen(), local)
        self.assertEqual(self.links.dialed, [])
        self.assertEqual(self.registry.changes, 1)
        self.assertEqual(self.pool.tunnels(), [local])

    def test_least_loaded_node(self):
        """Without a local tunnel, the node publishing the fewest streams is linked to."""
        self.registry.change([node("n1", streams=9), node("n2", streams=2),
                              node("n3", streams=5), node("n4", groups=("other",))])
        tunnel = self.chosen()
        self.assertEqual(tunnel.client_id, "relay:n2")
        self.assertEqual(self.links.dialed, ["n2"])

    def test_failed_node_passed_over(self):
        """A node that cannot be reached is skipped at once, and for NODE_RETRY seconds."""
        self.registry.change([node("n1", streams=0), node("n2", streams=5)])
        self.links.unreachable.add("n1")
        self.assertEqual(self.chosen().client_id, "relay:n2")
        self.assertEqual(self.links.dialed, ["n1", "n2"])
        self.links.unreachable.clear()
        self.assertEqual(self.chosen().client_id, "relay:n2")
        self.clock.advance(NODE_RETRY)
        self.assertEqual(self.chosen().client_id, "relay:n1")

    def test_waits_for_the_view(self):
        """No node holds the group: the wait ends when the registry lists one."""
        waiting = self.pool.wait_for("g", 3.0)
        self.assertNoResult(waiting)
        self.clock.advance(1.0)
        self.registry.change([node("n1")])
        self.assertEqual(self.successResultOf(waiting).client_id, "relay:n1")

    def test_times_out_no_tunnel(self):
        """Nothing local and no node: NO_TUNNEL once the wait is over."""
        waiting = self.pool.wait_for("g", 2.0)
        self.clock.advance(2.0)
        self.assertEqual(self.failureResultOf(waiting, StreamOpenError).value.reason,
                         Reason.NO_TUNNEL)

    def test_cancel_stops_the_wait(self):
        """Cancelling the wait leaves no waiter behind."""
        waiting = self.pool.wait_for("g", 3.0)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(self.pool._view_waiters, [])

    def test_round_robin_alternates(self):
        """round_robin takes equal nodes in turn."""
        self.pool.balance = "round_robin"
        self.registry.change([node("n1"), node("n2")])
        picks = {self.chosen().client_id for _ in range(4)}
        self.assertEqual(picks, {"relay:n1", "relay:n2"})


class RelayedAnswerTests(unittest.SynchronousTestCase):
    """A relayed open answered NO_TUNNEL goes to the next choice; other answers stand."""

    def setUp(self):
        self.clock = task.Clock()
        self.registry = FakeRegistry([node("n1", streams=0), node("n2", streams=5)])
        self.links = FakeLinks()
        self.pool = FleetTunnelPool(TunnelPool(self.clock), self.registry, self.links, self.clock)
        self.opened = []
        self.answers = {"n1": Reason.NO_TUNNEL}
        for name in ("n1", "n2"):
            link = self.links.made.setdefault((name, "g"), FakeLink(name, "g"))
            link.mux.open_stream = self.answering(name)

    def answering(self, name):
        def open_stream(kind, host, port):
            reason = self.answers.get(name)
            if reason is not None:
                return defer.fail(StreamOpenError(reason, "answered by " + name))
            self.opened.append((name, host, port))
            return defer.succeed("stream via " + name)
        return open_stream

    def chosen(self, timeout=1.0):
        return self.successResultOf(self.pool.wait_for("g", timeout))

    def test_first_data_after_the_answer(self):
        """
        A relayed open's first bytes are written once it is answered, never as
        early data over the link: a link lost before the answer makes the open
        go elsewhere (NO_TUNNEL), and a target must not get them twice.
        """
        class Recording:
            def __init__(self):
                self.written = []

            def write(self, data):
                self.written.append(data)

        stream = Recording()
        calls = []

        def open_stream(*args, **kwargs):
            calls.append((args, kwargs))
            return defer.succeed(stream)
        self.answers.clear()
        tunnel = self.chosen()
        self.links.made[("n1", "g")].mux.open_stream = open_stream
        self.assertIs(self.successResultOf(tunnel.mux.open_stream("tcp", "t", 80, first_data=b"GET /")),
                      stream)
        self.assertEqual(calls, [(("tcp", "t", 80), {})])
        self.assertEqual(stream.written, [b"GET /"])

    def test_no_tunnel_opens_elsewhere(self):
        """
        The least loaded node no longer holds the group (its record was a
        moment old): the same open goes to the next node, and that node is
        left out for the group for LACKING_RETRY seconds.
        """
        tunnel = self.chosen()
        self.assertEqual(tunnel.client_id, "relay:n1")
        self.assertEqual(self.successResultOf(tunnel.mux.open_stream("tcp", "t", 80)),
                         "stream via n2")
        self.assertEqual(self.opened, [("n2", "t", 80)])
        self.assertEqual(self.chosen().client_id, "relay:n2")
        self.clock.advance(LACKING_RETRY)
        self.assertEqual(self.chosen().client_id, "relay:n1")

    def test_no_tunnel_everywhere_fails_at_the_deadline(self):
        """Every node answers NO_TUNNEL: the open fails NO_TUNNEL when the wait is over."""
        self.answers["n2"] = Reason.NO_TUNNEL
        opening = self.chosen(timeout=3.0).mux.open_stream("tcp", "t", 80)
        self.assertNoResult(opening)
        self.clock.advance(LACKING_RETRY)  # both may be chosen again, and fail again
        self.clock.advance(3.0)
        self.assertEqual(self.failureResultOf(opening, StreamOpenError).value.reason,
                         Reason.NO_TUNNEL)

    def test_target_refusal_stands(self):
        """A refusal from the target's side passes through unchanged, tried nowhere else."""
        self.answers["n1"] = Reason.CONNECTION_REFUSED
        opening = self.chosen().mux.open_stream("tcp", "t", 80)
        self.assertEqual(self.failureResultOf(opening, StreamOpenError).value.reason,
                         Reason.CONNECTION_REFUSED)
        self.assertEqual(self.opened, [])
