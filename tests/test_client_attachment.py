# -*- test-case-name: tests.test_client_attachment -*-
"""
Tests for fleet attachment: the sans-I/O chooser
(L{anyproxy.client.attachment}, with hypothesis), the gateway's fleet list
and its HELLO updates (L{anyproxy.gateway.tunnel_server.FleetAnnouncer}),
and, in one reactor on loopback, three gateways sharing an in-memory
registry and a client given one address (a forwarder standing in for the
load balancer) that ends with tunnels to exactly K of them, and re-attaches
when one leaves or dies.
"""

import string
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from anyproxy.client.attachment import AttachmentPlan, node_score, plan, rank
from anyproxy.config.load import load_config
from anyproxy.fleet.interfaces import IFleetRegistry, NodeRecord
from anyproxy.gateway.tunnel_server import FleetAnnouncer
from tests.support import Deployment, Echo, listen_tcp
from tests.test_e2e_tcp import socks_echo

# -- an in-memory registry ------------------------------------------------------


class MemoryFleet:
    """The shared store of L{MemoryRegistry}s: records, and change notices to every node."""

    def __init__(self):
        self.records = {}
        self.registries = []

    def publish(self, record):
        """Add or replace C{record} and tell every node."""
        self.records[record.node_id] = record
        self.changed()

    def remove(self, node_id):
        """Drop a node's record (deregistered, or expired) and tell every node."""
        self.records.pop(node_id, None)
        self.changed()

    def changed(self):
        for registry in list(self.registries):
            for observer in list(registry.observers):
                observer()


@implementer(IFleetRegistry)
class MemoryRegistry:
    """One node's L{IFleetRegistry} over a L{MemoryFleet}: the view is the store itself."""

    healthy = True

    def __init__(self, fleet, record):
        self.fleet = fleet
        self.node_id = record.node_id
        self.observers = []
        fleet.registries.append(self)
        fleet.publish(record)

    def start(self):
        return defer.succeed(None)

    def stop(self):
        self.fleet.remove(self.node_id)
        return defer.succeed(None)

    def local_changed(self):
        pass

    def nodes(self):
        return [record for node, record in sorted(self.fleet.records.items())
                if node != self.node_id]

    def nodes_for_group(self, group):
        return [record for record in self.nodes() if group in record.groups
                and not record.draining]

    def add_observer(self, callback):
        self.observers.append(callback)

    def remove_observer(self, callback):
        if callback in self.observers:
            self.observers.remove(callback)

    def login_verifier(self, password):
        return "memory-verifier"  # these tests announce no group password

    def check_group_login(self, group, password):
        return False

    def claim_port(self, port, owner):
        return defer.succeed(True)

    def release_port(self, port, owner):
        return defer.succeed(None)

    def port_holder(self, port):
        return defer.succeed(None)


# -- the chooser ------------------------------------------------------------------

node_ids = st.text(string.ascii_lowercase + string.digits + "-.", min_size=1, max_size=12)
client_ids = st.text(min_size=1, max_size=40)
fleets = st.sets(node_ids, min_size=0, max_size=16)
counts = st.integers(min_value=1, max_value=8)


class ChooserTests(SynchronousTestCase):
    """L{plan} picks the top K by rendezvous hash, and moves as little as possible."""

    def test_score_is_stable(self):
        """The hash is pinned: changing it would move every client of every fleet."""
        self.assertEqual(node_score("client-1", "gw-a"), 2097470040695575178)
        self.assertEqual(rank(["gw-a", "gw-b", "gw-c"], "client-1"), ["gw-c", "gw-b", "gw-a"])

    def test_parts_are_delimited(self):
        """(client "ab", node "c") and (client "a", node "bc") score differently."""
        self.assertNotEqual(node_score("ab", "c"), node_score("a", "bc"))

    def test_plan(self):
        """Attach the chosen ones not attached yet, let go of the others."""
        decided = plan(["gw-a", "gw-b", "gw-c"], "client-1", 2, attached=["gw-a", "gw-b"])
        self.assertEqual(decided, AttachmentPlan(chosen=("gw-c", "gw-b"), attach=("gw-c",),
                                                 detach=("gw-a",), retrying=()))
        self.assertEqual(decided.attached, {"gw-b", "gw-c"})

    def test_unreachable_ranked_out_and_retried(self):
        """An unreachable attached node is replaced by the next but keeps retrying while listed."""
        decided = plan(["gw-a", "gw-b", "gw-c"], "client-1", 2, attached=["gw-c", "gw-b"],
                       unreachable=["gw-c"])
        self.assertEqual(decided, AttachmentPlan(chosen=("gw-b", "gw-a"), attach=("gw-a",),
                                                 detach=(), retrying=("gw-c",)))
        gone = plan(["gw-a", "gw-b"], "client-1", 2, attached=decided.attached,
                    unreachable=["gw-c"])
        self.assertEqual(gone.detach, ("gw-c",))

    def test_count_checked(self):
        """K below 1 is a programming error."""
        self.assertRaises(ValueError, plan, ["gw-a"], "client-1", 0)

    @given(fleets, client_ids, counts)
    def test_exactly_min_k_n(self, nodes, client_id, count):
        """Exactly min(K, n) distinct listed nodes are chosen, best first."""
        chosen = plan(nodes, client_id, count).chosen
        self.assertEqual(len(chosen), min(count, len(nodes)))
        self.assertEqual(len(set(chosen)), len(chosen))
        self.assertLessEqual(set(chosen), nodes)
        self.assertEqual(list(chosen), rank(nodes, client_id)[:count])

    @given(fleets, client_ids, counts, st.data())
    def test_stable_when_an_unrelated_node_leaves(self, nodes, client_id, count, data):
        """A node not chosen leaving changes nothing; a chosen one leaving moves one place."""
        chosen = plan(nodes, client_id, count).chosen
        if not nodes:
            return
        leaving = data.draw(st.sampled_from(sorted(nodes)))
        after = plan(nodes - {leaving}, client_id, count, attached=chosen)
        if leaving in chosen:
            self.assertEqual(after.detach, (leaving,))
            self.assertLessEqual(len(after.attach), 1)
            self.assertEqual(set(chosen) - {leaving}, set(after.chosen) - set(after.attach))
        else:
            self.assertEqual(after.chosen, chosen)
            self.assertEqual((after.attach, after.detach), ((), ()))

    @given(fleets, client_ids, counts, node_ids)
    def test_a_joining_node_moves_at_most_one(self, nodes, client_id, count, joining):
        """A node joining displaces at most one chosen node (itself taking the place)."""
        chosen = plan(nodes, client_id, count).chosen
        after = plan(nodes | {joining}, client_id, count, attached=chosen)
        self.assertLessEqual(len(after.attach), 1)
        self.assertLessEqual(set(after.attach), {joining})
        self.assertLessEqual(len(after.detach), 1)

    @settings(max_examples=15)
    @given(st.sets(node_ids, min_size=2, max_size=8), st.integers(1, 3))
    def test_even_spread(self, nodes, count):
        """Over 3,000 client ids each node is chosen within 25% of its fair share."""
        clients = 3000
        chosen_by = dict.fromkeys(nodes, 0)
        for number in range(clients):
            for node in plan(nodes, "client-%d" % (number,), count).chosen:
                chosen_by[node] += 1
        fair = clients * min(count, len(nodes)) / len(nodes)
        for node, times in chosen_by.items():
            self.assertTrue(0.75 * fair <= times <= 1.25 * fair, (node, times, fair))


# -- the gateway's fleet list -----------------------------------------------------


class FakeMux:
    """Records the HELLOs sent on a tunnel."""

    def __init__(self):
        self.hellos = []

    def send_hello(self, info):
        self.hellos.append(info)


class FakeTunnel:
    def __init__(self, draining=False):
        self.mux = FakeMux()
        self.draining = draining


class FleetAnnouncerTests(SynchronousTestCase):
    """The HELLO's fleet list follows the registry's view; clients hear of each change once."""

    def setUp(self):
        self.fleet = MemoryFleet()
        self.registry = MemoryRegistry(self.fleet, NodeRecord("gw-b", "127.0.0.1:7001",
                                                              "10.0.0.2:8443"))
        self.announcer = FleetAnnouncer(self.registry, "10.0.0.2:8443")

    def test_registry_is_one(self):
        """The test registry provides IFleetRegistry."""
        verifyObject(IFleetRegistry, self.registry)

    def test_this_node_first(self):
        """This node first, then the live non-draining others by node id."""
        self.fleet.publish(NodeRecord("gw-c", "p", "10.0.0.3:8443"))
        self.fleet.publish(NodeRecord("gw-a", "p", "10.0.0.1:8443"))
        self.fleet.publish(NodeRecord("gw-d", "p", "10.0.0.4:8443", draining=True))
        self.assertEqual(self.announcer.hello_fields(), {"node": "gw-b", "fleet": [
            {"node": "gw-b", "addr": "10.0.0.2:8443"},
            {"node": "gw-a", "addr": "10.0.0.1:8443"},
            {"node": "gw-c", "addr": "10.0.0.3:8443"}]})

    def test_update_on_change(self):
        """A change sends one HELLO update to each tunnel not draining; no change sends none."""
        tunnel, draining = FakeTunnel(), FakeTunnel(draining=True)
        self.announcer.tunnel_added(tunnel)
        self.announcer.tunnel_added(draining)
        self.fleet.publish(NodeRecord("gw-a", "p", "10.0.0.1:8443"))
        self.fleet.publish(NodeRecord("gw-a", "p", "10.0.0.1:8443", streams=5))
        self.assertEqual(tunnel.mux.hellos, [{"version": 1, "node": "gw-b", "fleet": [
            {"node": "gw-b", "addr": "10.0.0.2:8443"},
            {"node": "gw-a", "addr": "10.0.0.1:8443"}]}])
        self.assertEqual(draining.mux.hellos, [])
        self.announcer.tunnel_removed(tunnel)
        self.fleet.remove("gw-a")
        self.assertEqual(len(tunnel.mux.hellos), 1)

    def test_stop(self):
        """Once stopped, it no longer follows the registry."""
        self.announcer.stop()
        self.assertEqual(self.registry.observers, [])


# -- in one reactor: three gateways, one client -------------------------------------


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class ThreeGateways:
    """
    Three in-process gateways (gw-a, gw-b, gw-c) sharing a test PKI and a
    L{MemoryFleet}, each announcing it in its HELLO, and a TCP forwarder
    (the load balancer) in front of one of them.
    """

    NODES = ("gw-a", "gw-b", "gw-c")

    def __init__(self, testcase):
        self.testcase = testcase
        self.fleet = MemoryFleet()
        self.deployments = {}
        self.registries = {}

    @defer.inlineCallbacks
    def start(self):
        pki = None
        for node in self.NODES:
            deployment = Deployment(self.testcase)
            if pki is not None:
                deployment.pki = pki
            pki = deployment.pki
            yield deployment.start_gateway()
            addr = "127.0.0.1:%d" % (deployment.gateway_port,)
            registry = MemoryRegistry(self.fleet, NodeRecord(node, "127.0.0.1:1", addr))
            deployment.gateway.tunnel_server.announce_fleet(registry, addr)
            self.deployments[node] = deployment
            self.registries[node] = registry

    def balancer_to(self, node):
        """A forwarder to C{node}'s tunnel port; its port."""
        factory = ProxyFactory("127.0.0.1", self.deployments[node].gateway_port)
        return listen_tcp(self.testcase, factory).getHost().port

    def tunnels(self):
        """C{{node: count}} of the client tunnels each gateway holds."""
        return {node: len(deployment.gateway.tunnel_pool.tunnels())
                for node, deployment in self.deployments.items()}

    @defer.inlineCallbacks
    def wait_for(self, wanted, timeout=15, settle=0.5):
        """Wait until L{tunnels} equals C{wanted} and stays so for C{settle} seconds."""
        deadline = time.monotonic() + timeout
        since = None
        while True:
            now = time.monotonic()
            if self.tunnels() == wanted:
                since = now if since is None else since
                if now - since >= settle:
                    return
            else:
                since = None
            if now > deadline:
                raise AssertionError("expected tunnels %r, have %r" % (wanted, self.tunnels()))
            yield sleep(0.02)

    @defer.inlineCallbacks
    def stop(self, node):
        """Stop C{node}'s gateway (GOAWAY on its tunnels, listeners closed)."""
        yield self.deployments[node].gateway.stopService()


class FleetAttachmentTests(TestCase):
    """A client given one address ends with tunnels to exactly K gateways of the fleet."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self, balanced_to, **client):
        self.fleet = ThreeGateways(self)
        yield self.fleet.start()
        port = self.balancer_port = self.fleet.balancer_to(balanced_to)
        settings = {"gateway_addr": "127.0.0.1:%d" % (port,), "gateways_per_client": 2}
        settings.update(client)
        first = self.fleet.deployments["gw-a"]
        self.client = yield first.start_client(wait=False, client=settings)
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    def echo(self, node):
        deployment = self.fleet.deployments[node]
        return deferToThread(socks_echo, deployment.socks_port, "127.0.0.1", self.echo_port,
                             node.encode("ascii"))

    @defer.inlineCallbacks
    def test_bootstrap_on_other_node_let_go(self):
        """Landed on gw-a (ranked last for client-1): tunnels end on gw-c and gw-b only."""
        yield self.start("gw-a")
        yield self.fleet.wait_for({"gw-a": 0, "gw-b": 1, "gw-c": 1})
        self.assertEqual(sorted(self.client.attached), ["gw-b", "gw-c"])
        for node in ("gw-b", "gw-c"):
            self.assertEqual((yield self.echo(node)), node.encode("ascii"))

    @defer.inlineCallbacks
    def test_bootstrap_on_chosen_node_kept(self):
        """Landed on gw-c (chosen): that tunnel counts for it, and gw-b is dialed directly."""
        yield self.start("gw-c")
        yield self.fleet.wait_for({"gw-a": 0, "gw-b": 1, "gw-c": 1})
        gw_b = ("127.0.0.1", self.fleet.deployments["gw-b"].gateway_port)
        self.assertEqual(sorted(self.client.factories),
                         sorted([("127.0.0.1", self.balancer_port), gw_b]))
        (kept,) = self.client.factories[("127.0.0.1", self.balancer_port)].connected
        self.assertEqual(kept.gateway_node, "gw-c")
        self.assertEqual(len(self.client.factories[gw_b].connected), 1)

    @defer.inlineCallbacks
    def test_replicas(self):
        """replicas tunnels go to each of the K chosen gateways."""
        yield self.start("gw-a", replicas=2)
        yield self.fleet.wait_for({"gw-a": 0, "gw-b": 2, "gw-c": 2})

    @defer.inlineCallbacks
    def test_node_leaves(self):
        """gw-c deregisters and stops: the client attaches to gw-a, the next by rank."""
        yield self.start("gw-a")
        yield self.fleet.wait_for({"gw-a": 0, "gw-b": 1, "gw-c": 1})
        yield self.fleet.registries["gw-c"].stop()
        yield self.fleet.stop("gw-c")
        yield self.fleet.wait_for({"gw-a": 1, "gw-b": 1, "gw-c": 0})
        self.assertEqual(sorted(self.client.attached), ["gw-a", "gw-b"])
        self.assertEqual((yield self.echo("gw-a")), b"gw-a")

    @defer.inlineCallbacks
    def test_node_dies_listed(self):
        """gw-c stops but stays listed: after a few failed attempts gw-a takes its place."""
        yield self.start("gw-a")
        yield self.fleet.wait_for({"gw-a": 0, "gw-b": 1, "gw-c": 1})
        yield self.fleet.stop("gw-c")
        yield self.fleet.wait_for({"gw-a": 1, "gw-b": 1, "gw-c": 0})
        self.assertEqual(sorted(self.client.attached), ["gw-a", "gw-b", "gw-c"])
        # Its record expires: it is let go for good.
        self.fleet.fleet.remove("gw-c")
        for _ in range(100):
            if "gw-c" not in self.client.attached:
                break
            yield sleep(0.02)
        self.assertEqual(sorted(self.client.attached), ["gw-a", "gw-b"])

    @defer.inlineCallbacks
    def test_draining_node_replaced_at_once(self):
        """
        K 1: the chosen gw-c sends GOAWAY (a drain) and then leaves the
        fleet, while the client has no tunnel to another node to hear of
        it: the client attaches to gw-b, the next by rank, on the GOAWAY,
        and lets gw-c's tunnel go without waiting for gw-c to close it.
        """
        yield self.start("gw-a", gateways_per_client=1)
        yield self.fleet.wait_for({"gw-a": 0, "gw-b": 0, "gw-c": 1})
        for tunnel in self.fleet.deployments["gw-c"].gateway.tunnel_pool.tunnels():
            tunnel.mux.go_away()
        yield self.fleet.registries["gw-c"].stop()
        yield self.fleet.wait_for({"gw-a": 0, "gw-b": 1, "gw-c": 0})
        self.assertEqual(sorted(self.client.attached), ["gw-b"])
        self.assertEqual((yield self.echo("gw-b")), b"gw-b")

    @defer.inlineCallbacks
    def test_every_node_draining_falls_back(self):
        """
        Every chosen and listed node draining: the client dials its
        configured address (the balancer) again instead of keeping none.
        """
        yield self.start("gw-a", gateways_per_client=3)
        yield self.fleet.wait_for({"gw-a": 1, "gw-b": 1, "gw-c": 1})
        for deployment in self.fleet.deployments.values():
            for tunnel in deployment.gateway.tunnel_pool.tunnels():
                tunnel.mux.go_away()
        # The bootstrap through the balancer lands on gw-a again, a new tunnel.
        for _ in range(250):
            fresh = [tunnel for tunnel in self.fleet.deployments["gw-a"].gateway.tunnel_pool
                     .tunnels() if not tunnel.mux.draining]
            if fresh:
                break
            yield sleep(0.02)
        self.assertEqual(len(fresh), 1)

    @defer.inlineCallbacks
    def test_reload_gateways_per_client(self):
        """A reload with gateways_per_client 3 attaches to gw-a too, and 1 lets two go."""
        yield self.start("gw-a")
        yield self.fleet.wait_for({"gw-a": 0, "gw-b": 1, "gw-c": 1})
        first = self.fleet.deployments["gw-a"]
        for count, wanted in ((3, {"gw-a": 1, "gw-b": 1, "gw-c": 1}),
                              (1, {"gw-a": 0, "gw-b": 0, "gw-c": 1})):
            settings = first.client_config(client={
                "gateway_addr": self.client.config.client.gateway_addrs[0][0] + ":%d"
                % (self.client.config.client.gateway_addrs[0][1],),
                "gateways_per_client": count})
            yield self.client.reconfigure(load_config(first.write_config(settings)))
            yield self.fleet.wait_for(wanted)


class GoAwayTests(TestCase):
    """Without a fleet: a tunnel whose gateway sends GOAWAY is replaced at once."""

    timeout = 30

    @defer.inlineCallbacks
    def test_fresh_tunnel_while_the_old_one_drains(self):
        """
        The gateway sends GOAWAY on the client's tunnel and leaves it open
        (its streams still finishing): the client dials a fresh tunnel at
        once, and closes the old one once it carries no stream.
        """
        deployment = Deployment(self)
        yield deployment.start_gateway()
        yield deployment.start_client()
        pool = deployment.gateway.tunnel_pool
        (old,) = pool.tunnels()
        old.mux.go_away()
        for _ in range(250):
            fresh = [tunnel for tunnel in pool.tunnels() if tunnel is not old]
            if fresh and old not in pool.tunnels():
                break
            yield sleep(0.02)
        self.assertEqual(len(fresh), 1)
        self.assertFalse(fresh[0].mux.draining)
        self.assertNotIn(old, pool.tunnels())
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.assertEqual((yield deferToThread(socks_echo, deployment.socks_port, "127.0.0.1",
                                              echo_port, b"fresh")), b"fresh")


class TunnelNameTests(TestCase):
    """Re-plans and reloads never give two tunnel services one name (MultiService refuses it)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_gateways_per_client_down_then_up(self):
        """K 2 -> 1 -> 2 back to back: the gateway let go still holds its tunnel's name."""
        fleet = ThreeGateways(self)
        yield fleet.start()
        port = fleet.balancer_to("gw-a")
        first = fleet.deployments["gw-a"]
        client = yield first.start_client(wait=False, client={
            "gateway_addr": "127.0.0.1:%d" % port, "gateways_per_client": 2})
        yield fleet.wait_for({"gw-a": 0, "gw-b": 1, "gw-c": 1})

        def config(count):
            return load_config(first.write_config(first.client_config(client={
                "gateway_addr": "127.0.0.1:%d" % port, "gateways_per_client": count})))

        yield client.reconfigure(config(1))
        yield client.reconfigure(config(2))
        names = [service.name for service in client.services if service.name]
        self.assertEqual(len(names), len(set(names)))
        yield fleet.wait_for({"gw-a": 0, "gw-b": 1, "gw-c": 1})


class HelloAnswerTimeoutTests(SynchronousTestCase):
    """A gateway that opens the WebSocket but never answers the HELLO: the attempt fails in time."""

    def test_dropped_after_the_handshake_timeout(self):
        from types import SimpleNamespace
        from twisted.internet.task import Clock
        from anyproxy.client.app import ReadyTunnelEndpoint

        clock = Clock()
        dropped = []
        tunnel = SimpleNamespace(ready=defer.Deferred(),
                                 dropConnection=lambda abort=False: dropped.append(abort))
        factory = SimpleNamespace(reactor=clock, openHandshakeTimeout=10.0, gateway="gw:8443")
        endpoint = SimpleNamespace(connect=lambda factory: defer.succeed(tunnel))
        attempt = ReadyTunnelEndpoint(endpoint, factory).connect(protocol.Factory())
        clock.advance(9.9)
        self.assertEqual(dropped, [])
        clock.advance(0.1)
        self.assertEqual(dropped, [True])
        tunnel.ready.errback(RuntimeError("tunnel closed before the gateway's HELLO"))
        self.failureResultOf(attempt, RuntimeError)
        self.assertEqual(clock.getDelayedCalls(), [])
