# -*- test-case-name: tests.test_routes -*-
"""
Tests for routing by destination inside a group (C{client.routes}):
L{anyproxy.gateway.routing} matching, the tunnel pool's choice among a
group's routed tunnels, the retry at another site, the config key, the
fleet pool passing the target through, and end to end on loopback with two
clients that reach two "sites" (127.0.0.2 and 127.0.0.3).
"""

import ipaddress
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.client.app import ROUTES_RELOAD_NOTE, make_client_service
from anyproxy.config.load import load_config
from anyproxy.errors import ConfigError, Reason, StreamOpenError
from anyproxy.fleet.pool import FleetTunnelPool
from anyproxy.gateway.routing import UNROUTED, RouteMatcher, Target
from anyproxy.routes import Routes, route_texts
from anyproxy.gateway.status.api import tunnel_status
from anyproxy.gateway.tunnel_pool import Tunnel, TunnelPool
from anyproxy.tunnel.endpoint import TunnelEndpoint
from tests.ports import free_port
from tests.support import (
    PROXY_PASSWORD, PROXY_USER, Deployment, Echo, StaticResolver, run_curl)
from tests.test_config import CLIENT, ConfigTestMixin
from tests.test_e2e_tcp import socks_echo, socks_error
from tests.test_endpoint import MuxPair, Recorder, RecordingFactory
from tests.test_fleet_relay import FakeLinks, FakeRegistry, node
from tests.test_reload import client_data, write_yaml


# -- helpers --------------------------------------------------------------------


class FakeMux:
    """Stands in for a mux: the pool reads C{stream_count} and C{draining}."""

    def __init__(self, stream_count=0, draining=False):
        self.stream_count = stream_count
        self.draining = draining


def routed(client_id, *routes, group="default", streams=0):
    """A L{Tunnel} of C{client_id} announcing C{routes} (none: it serves anything)."""
    return Tunnel(client_id=client_id, group=group, mux=FakeMux(streams),
                  routes=Routes.of(routes) if routes else None)


def pool_of(*tunnels, balance="least_streams", clock=None):
    pool = TunnelPool(clock if clock is not None else Clock(), balance=balance)
    for each in tunnels:
        pool.add(each)
    return pool


def rank(*routes, host):
    return RouteMatcher(Routes.of(routes)).specificity(Target.of(host))


# -- matching -------------------------------------------------------------------


class RouteMatcherTests(SynchronousTestCase):
    """How specifically one client's routes match a target."""

    def test_longest_prefix(self):
        """An address matches the networks holding it; the longest prefix is its specificity."""
        self.assertEqual(rank("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", host="10.1.2.3"),
                         rank("10.1.2.0/24", host="10.1.2.3"))
        self.assertGreater(rank("10.1.0.0/16", host="10.1.2.3"),
                           rank("10.0.0.0/8", host="10.1.2.3"))
        self.assertIsNone(rank("10.1.0.0/16", host="10.2.0.1"))

    def test_ipv6_and_brackets(self):
        """IPv6 literals, bracketed or not, match IPv6 networks only."""
        self.assertIsNotNone(rank("fd00::/8", host="[fd00::1]"))
        self.assertIsNotNone(rank("fd00::/8", host="FD00::1"))
        self.assertIsNone(rank("0.0.0.0/0", host="::1"))
        self.assertIsNone(rank("::/0", host="127.0.0.1"))

    def test_mapped_ipv4(self):
        """An IPv4-mapped IPv6 literal matches as the IPv4 address it is, as access control reads it."""
        self.assertEqual(rank("10.1.0.0/16", host="::ffff:10.1.4.20"),
                         rank("10.1.0.0/16", host="10.1.4.20"))
        self.assertIsNone(rank("::/0", host="[::ffff:10.1.4.20]"))

    def test_names(self):
        """An exact name beats every pattern; among patterns the longest suffix wins."""
        exact = rank("db.corp.example", host="db.corp.example")
        deep = rank("*.db.corp.example", host="db.corp.example")
        shallow = rank("*.example", host="db.corp.example")
        self.assertGreater(exact, deep)
        self.assertGreater(deep, shallow)
        self.assertGreater(shallow, UNROUTED)
        self.assertGreater(exact, rank("*.a.very.long.suffix.corp.example",
                                       host="x.a.very.long.suffix.corp.example"))

    def test_pattern_covers_its_domain(self):
        """C{*.corp.example} covers corp.example itself (as the PAC file), not badcorp.example."""
        self.assertIsNotNone(rank("*.corp.example", host="corp.example"))
        self.assertIsNotNone(rank("*.corp.example", host="Deep.Host.Corp.Example."))
        self.assertIsNone(rank("*.corp.example", host="badcorp.example"))
        self.assertIsNone(rank("db.corp.example", host="x.db.corp.example"))

    def test_names_and_addresses_apart(self):
        """A name never matches a network, nor an address a name: the gateway never resolves."""
        self.assertIsNone(rank("10.0.0.0/8", host="ten.example"))
        self.assertIsNone(rank("*.example", "localhost", host="127.0.0.1"))

    def test_route_texts(self):
        """The canonical texts read back as the same routes."""
        routes = Routes.of(["*.Corp.Example.", "db.lan", "10.1.2.3/16", "fd00::/8"])
        self.assertEqual(route_texts(routes),
                         ("*.corp.example", "db.lan", "10.1.0.0/16", "fd00::/8"))
        self.assertEqual(Routes.of(route_texts(routes)), routes)

    def test_no_zone(self):
        """An IPv6 zone is refused: it means nothing elsewhere, and its text went into profiles."""
        for text in ("fe80::1%x,DIRECT,x", "fe80::/64%eth0", "fe80::1%eth0"):
            with self.assertRaises(ValueError) as caught:
                Routes.of([text])
            self.assertIn("IPv6 zone", str(caught.exception))


# The universe the properties draw from: nested and disjoint networks and names.
NETWORKS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.2.0.0/16", "10.1.2.3/32",
            "192.168.0.0/16", "fd00::/8", "fd00:1::/32"]
NAMES = ["*.example", "*.corp.example", "*.a.corp.example", "db.corp.example",
         "x.a.corp.example", "*.lan", "db.lan"]
HOSTS = ["10.1.2.3", "10.1.2.9", "10.1.9.9", "10.2.3.4", "10.9.9.9", "192.168.1.1",
         "172.16.0.1", "fd00::1", "fd00:1::1", "::1", "db.corp.example", "x.a.corp.example",
         "y.a.corp.example", "corp.example", "www.example", "db.lan", "other.lan", "elsewhere.org"]


def oracle(routes, host):
    """
    The specificity by the definition, written independently of the matcher:
    C{None} (no match), else C{(kind, length)}.
    """
    if routes is None:
        return UNROUTED
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    best = None
    for route in routes:
        if address is not None:
            if "/" in route:
                network = ipaddress.ip_network(route)
                if network.version == address.version and address in network:
                    candidate = (1, network.prefixlen)
                    best = candidate if best is None else max(best, candidate)
            continue
        if "/" in route:
            continue
        if route.startswith("*."):
            domain = route[2:]
            if host == domain or host.endswith("." + domain):
                candidate = (1, len(domain))
                best = candidate if best is None else max(best, candidate)
        elif host == route:
            best = (2, len(host)) if best is None else max(best, (2, len(host)))
    return best


route_lists = st.one_of(st.none(), st.lists(st.sampled_from(NETWORKS + NAMES), min_size=1,
                                            max_size=4, unique=True))


class MostSpecificWinsTests(SynchronousTestCase):
    """Properties of the pool's choice in a group with routes, against an oracle."""

    @settings(max_examples=300)
    @given(st.lists(route_lists, min_size=1, max_size=5), st.sampled_from(HOSTS),
           st.sampled_from(["least_streams", "round_robin", "random"]),
           st.lists(st.integers(0, 3), min_size=5, max_size=5))
    def test_most_specific_wins(self, announced, host, balance, streams):
        """The pick always matches most specifically; no match at all only when none matches."""
        tunnels = [routed("c%d" % (i,), *(routes or ()), streams=streams[i])
                   for i, routes in enumerate(announced)]
        pool = pool_of(*tunnels, balance=balance)
        ranks = {t.client_id: oracle(routes, host) for t, routes in zip(tunnels, announced)}
        matching = [r for r in ranks.values() if r is not None]
        for _ in range(3):
            chosen = pool.pick("default", host)
            if not matching:
                self.assertIsNone(chosen)
                self.assertEqual(pool.routes_nowhere("default", host),
                                 all(routes is not None for routes in announced))
                continue
            # Never a non-matching tunnel when a matching one exists, and the best.
            self.assertIsNotNone(chosen)
            self.assertEqual(ranks[chosen.client_id], max(matching))
            self.assertFalse(pool.routes_nowhere("default", host))

    @given(st.lists(route_lists, min_size=1, max_size=5), st.sampled_from(HOSTS))
    def test_no_host_ignores_routes(self, announced, host):
        """Without a target (a UDP association) any tunnel of the group may be chosen."""
        pool = pool_of(*[routed("c%d" % (i,), *(r or ())) for i, r in enumerate(announced)])
        self.assertIsNotNone(pool.pick("default"))
        self.assertFalse(pool.routes_nowhere("default", None))


class RoutedPoolTests(SynchronousTestCase):
    """The pool in a group whose clients announced routes."""

    def test_balance_among_equals(self):
        """Equally specific tunnels share the streams by the balance; others get none."""
        a, b = routed("a", "10.1.0.0/16"), routed("b", "10.1.0.0/16")
        wide = routed("wide", "10.0.0.0/8")
        pool = pool_of(a, wide, b, balance="round_robin")
        chosen = [pool.pick("default", "10.1.0.5").client_id for _ in range(4)]
        self.assertEqual(sorted(chosen), ["a", "a", "b", "b"])
        self.assertEqual(pool.pick("default", "10.2.0.5"), wide)

    def test_unrouted_is_least_specific(self):
        """A client without routes gets what no route matches, and loses to any match."""
        anything, site = routed("anything"), routed("site", "*.corp.example")
        pool = pool_of(anything, site)
        self.assertEqual([pool.pick("default", "db.corp.example") for _ in range(3)], [site] * 3)
        self.assertEqual(pool.pick("default", "www.example.org"), anything)

    def test_draining_left_out(self):
        """A draining tunnel is not chosen even when it matches best."""
        best, fallback = routed("best", "db.lan"), routed("fallback", "*.lan")
        pool = pool_of(best, fallback)
        best.mux.draining = True
        self.assertEqual(pool.pick("default", "db.lan"), fallback)

    def test_bookkeeping(self):
        """Removing the last routed tunnel of a group brings back the unrouted choice."""
        site, anything = routed("site", "db.lan"), routed("anything")
        pool = pool_of(site, anything)
        self.assertEqual(pool._routed, {"default": 1})
        pool.remove(site)
        pool.remove(site)  # a second removal changes nothing
        self.assertEqual(pool._routed, {})
        self.assertEqual(pool.pick("default", "elsewhere.org"), anything)

    def test_unroutable_refused_at_once(self):
        """A target no client routes fails at once with HOST_UNREACHABLE; nothing waits."""
        clock = Clock()
        pool = pool_of(routed("a", "10.1.0.0/16"), routed("b", "10.2.0.0/16"), clock=clock)
        failure = self.failureResultOf(pool.wait_for("default", 5, "10.3.0.1"), StreamOpenError)
        self.assertEqual(failure.value.reason, Reason.HOST_UNREACHABLE)
        self.assertIn("no client of group default routes 10.3.0.1", failure.value.detail)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(self.successResultOf(pool.wait_for("default", 5, "10.2.0.1")).client_id,
                         "b")

    def test_waiting_then_unroutable(self):
        """Waiting for a tunnel, one arrives that does not route the target: HOST_UNREACHABLE."""
        clock = Clock()
        pool = pool_of(clock=clock)
        waiting = pool.wait_for("default", 5, "10.3.0.1")
        self.assertNoResult(waiting)
        pool.add(routed("a", "10.1.0.0/16"))
        self.assertEqual(self.failureResultOf(waiting, StreamOpenError).value.reason,
                         Reason.HOST_UNREACHABLE)

    def test_status_shows_routes(self):
        """The status API lists each tunnel's routes; [] for one that serves anything."""
        self.assertEqual(tunnel_status(routed("a", "10.1.0.0/16", "*.a.test"), 0)["routes"],
                         ["*.a.test", "10.1.0.0/16"])
        self.assertEqual(tunnel_status(routed("b"), 0)["routes"], [])


def refused(reason=Reason.CONNECTION_REFUSED):
    return Failure(StreamOpenError(reason, "from the site"))


class RetryChoiceTests(SynchronousTestCase):
    """When a failed OPEN is tried once more, and where."""

    def setUp(self):
        self.first = routed("first", "db.lan")
        self.second = routed("second", "*.lan")
        self.pool = pool_of(self.first, self.second, routed("other", "10.0.0.0/8"))

    def test_another_matching_client(self):
        """Unreachable, refused and timed out go to another client routing the target."""
        for reason in (Reason.NETWORK_UNREACHABLE, Reason.HOST_UNREACHABLE,
                       Reason.CONNECTION_REFUSED, Reason.TIMED_OUT):
            self.assertIs(self.pool.retry_choice("default", "db.lan", self.first, refused(reason)),
                          self.second)

    def test_not_retried(self):
        """Other failures, no other matching client, or no target: no retry."""
        for reason in (Reason.NOT_ALLOWED, Reason.NAME_NOT_RESOLVED, Reason.OVERLOADED,
                       Reason.GENERAL_FAILURE):
            self.assertIsNone(self.pool.retry_choice("default", "db.lan", self.first,
                                                     refused(reason)))
        self.assertIsNone(self.pool.retry_choice("default", "10.1.1.1",
                                                 self.pool.pick("default", "10.1.1.1"), refused()))
        self.assertIsNone(self.pool.retry_choice("default", None, self.first, refused()))
        self.assertIsNone(self.pool.retry_choice("default", "db.lan", self.first,
                                                 Failure(defer.CancelledError())))

    def test_same_client_avoided(self):
        """Another tunnel of the client that failed is not another site."""
        pool = pool_of(self.first, routed("first", "db.lan"))
        self.assertIsNone(pool.retry_choice("default", "db.lan", self.first, refused()))

    def test_groups_without_routes(self):
        """A group without routes keeps today's behaviour: the failure stands."""
        pool = pool_of(routed("a"), routed("b"))
        self.assertIsNone(pool.retry_choice("default", "db.lan", pool.pick("default", "db.lan"),
                                            refused()))

    def test_unrouted_client_failed(self):
        """A client without routes that failed is not a site: no retry, even in a routed group."""
        anything, other = routed("anything"), routed("also-anything")
        pool = pool_of(anything, other, routed("site", "db.lan"))
        self.assertIsNone(pool.retry_choice("default", "x.org", anything, refused()))

    def test_retry_may_go_to_an_unrouted_client(self):
        """After a site failed, a client without routes (the least specific match) may serve."""
        anything = routed("anything")
        pool = pool_of(self.first, anything)
        self.assertIs(pool.retry_choice("default", "db.lan", self.first, refused()), anything)


class EndpointRetryTests(SynchronousTestCase):
    """L{TunnelEndpoint} opens a failed stream once more at another matching client."""

    def setUp(self):
        self.clock = Clock()
        self.exact, self.pattern = MuxPair(), MuxPair()
        self.pool = TunnelPool(self.clock)
        self.pool.add(Tunnel("site-a", "default", self.exact.gateway,
                             routes=Routes.of(["svc.test"])))
        self.pool.add(Tunnel("site-b", "default", self.pattern.gateway,
                             routes=Routes.of(["*.test"])))

    def connect(self, host="svc.test"):
        endpoint = TunnelEndpoint(self.pool, self.clock, "default", host, 443)
        return endpoint.connect(RecordingFactory())

    def test_retried_elsewhere(self):
        """Refused at the most specific site, the stream opens at the next one."""
        d = self.connect()
        self.exact.pump()
        self.assertEqual(len(self.pattern.requests), 0)
        self.exact.requests[0].reject(Reason.CONNECTION_REFUSED, "refused at site a")
        self.exact.pump()
        self.pattern.pump()
        self.assertEqual([(r.host, r.port) for r in self.pattern.requests], [("svc.test", 443)])
        self.pattern.requests[0].accept(Recorder())
        self.pattern.pump()
        self.assertIsInstance(self.successResultOf(d), Recorder)

    def test_retried_once(self):
        """A second failure stands: the user hears it, with no third open."""
        d = self.connect()
        self.exact.pump()
        self.exact.requests[0].reject(Reason.HOST_UNREACHABLE, "a")
        self.exact.pump()
        self.pattern.pump()
        self.pattern.requests[0].reject(Reason.TIMED_OUT, "b")
        self.pattern.pump()
        self.exact.pump()
        self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason, Reason.TIMED_OUT)
        self.assertEqual((len(self.exact.requests), len(self.pattern.requests)), (1, 1))

    def test_not_allowed_not_retried(self):
        """A refusal by the client's ACL is the user's answer at once."""
        d = self.connect()
        self.exact.pump()
        self.exact.requests[0].reject(Reason.NOT_ALLOWED, "forbidden")
        self.exact.pump()
        self.pattern.pump()
        self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason, Reason.NOT_ALLOWED)
        self.assertEqual(self.pattern.requests, [])

    def test_udp_ignores_routes(self):
        """A UDP association has no single target: routes do not refuse it."""
        endpoint = TunnelEndpoint(self.pool, self.clock, "default", "0.0.0.0", 0, kind="udp")
        d = endpoint.connect(RecordingFactory())
        self.exact.pump()
        self.pattern.pump()
        self.assertNoResult(d)
        self.assertEqual(len(self.exact.requests) + len(self.pattern.requests), 1)


class FleetPoolRoutesTests(SynchronousTestCase):
    """The fleet pool passes the target to its local pool."""

    def setUp(self):
        self.clock = Clock()
        self.local = TunnelPool(self.clock)
        self.registry = FakeRegistry()
        self.pool = FleetTunnelPool(self.local, self.registry, FakeLinks(), self.clock)
        self.site_a, self.site_b = routed("a", "10.1.0.0/16", group="g"), \
            routed("b", "10.2.0.0/16", group="g")
        self.pool.add(self.site_a)
        self.pool.add(self.site_b)

    def test_local_routes(self):
        """Local tunnels are chosen by their routes; a retry stays local."""
        self.assertIs(self.successResultOf(self.pool.wait_for("g", 1, "10.2.0.1")), self.site_b)
        self.assertIsNone(self.pool.retry_choice("g", "10.2.0.1", self.site_b, refused()))

    def test_unroutable_without_nodes(self):
        """No local tunnel routes it and no node holds the group: HOST_UNREACHABLE at once."""
        failure = self.failureResultOf(self.pool.wait_for("g", 1, "10.3.0.1"), StreamOpenError)
        self.assertEqual(failure.value.reason, Reason.HOST_UNREACHABLE)

    def test_relayed_when_no_local_route(self):
        """No local tunnel routes it: a node holding the group is asked (its pool routes it)."""
        self.registry.change([node("n1")])
        self.assertEqual(self.successResultOf(self.pool.wait_for("g", 1, "10.3.0.1")).client_id,
                         "relay:n1")


class RoutesConfigTests(ConfigTestMixin, SynchronousTestCase):
    """C{client.routes} in the config file."""

    def test_read(self):
        """Routes are kept as canonical texts, deduplicated; absent means anything."""
        config = self.load(CLIENT + '  routes: ["10.1.2.3/16", "*.Corp.Example.", "db.lan", '
                                    '"10.1.0.0/16"]\n')
        self.assertEqual(config.client.routes, ("*.corp.example", "db.lan", "10.1.0.0/16"))
        self.assertEqual(self.load(CLIENT).client.routes, ())

    def test_bad_entry(self):
        """A bad entry is named with its index."""
        for bad, problem in [('["10.0.0.0/8", "not a route"]', "client.routes[1]: "),
                             ('[5]', "client.routes[0]: expected a string"),
                             ('"10.0.0.0/8"', "client.routes: expected a list")]:
            error = self.assertRaises(ConfigError, self.load, CLIENT + "  routes: %s\n" % (bad,))
            self.assertIn(problem, str(error))

    def test_too_many(self):
        """More routes than a HELLO carries are refused in the config, not by the gateway."""
        many = ", ".join('"10.%d.%d.0/24"' % (i // 256, i % 256) for i in range(300))
        error = self.assertRaises(ConfigError, self.load, CLIENT + "  routes: [%s]\n" % (many,))
        self.assertIn("client.routes: at most 256 entries", str(error))


class ClientReloadTests(unittest.TestCase):
    """A reload of C{client.routes}: the next HELLO carries them, and the reload says when."""

    def test_routes_for_the_next_tunnel(self):
        """New routes go into the next HELLO; the reload notes they wait for a reconnection."""
        path = os.path.abspath(self.mktemp())
        root, factories = make_client_service(load_config(write_yaml(
            path, client_data(routes=["10.1.0.0/16"])), role="client"), MemoryReactor())
        factory = factories[("127.0.0.1", 8443)]
        self.assertEqual(factory.hello_info()["routes"], ["10.1.0.0/16"])
        config = load_config(write_yaml(path, client_data(routes=["10.2.0.0/16", "*.b.test"])),
                             role="client")
        self.assertEqual(self.successResultOf(root.reconfigure(config)), [ROUTES_RELOAD_NOTE])
        self.assertEqual(factory.hello_info()["routes"], ["*.b.test", "10.2.0.0/16"])
        self.assertEqual(self.successResultOf(root.reconfigure(config)), [])
        config = load_config(write_yaml(path, client_data()), role="client")
        self.assertEqual(self.successResultOf(root.reconfigure(config)), [ROUTES_RELOAD_NOTE])
        self.assertNotIn("routes", factory.hello_info())


# -- end to end -----------------------------------------------------------------


class SiteEcho(Factory):
    """An echo server of one site, counting its connections."""

    protocol = Echo

    def __init__(self):
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)


class TwoSitesTests(unittest.TestCase):
    """
    Two clients of one group with disjoint routes: site A reaches 127.0.0.2
    and C{*.a.test}, site B 127.0.0.3 and C{*.b.test}; both route
    C{*.both.test}, site A more specifically (C{svc.both.test}).
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = deployment = Deployment(self)
        yield deployment.start_gateway()
        self.port = free_port(hosts=("127.0.0.2", "127.0.0.3"))
        self.sites = {}
        for site, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            echo = self.sites[site] = SiteEcho()
            listener = reactor.listenTCP(self.port, echo, interface=address)
            self.addCleanup(listener.stopListening)
        # Each site resolves its own names; svc.both.test is a closed port
        # at site A (127.0.0.4: nothing listens there) and the echo at B.
        deployment.resolver = StaticResolver({"svc.a.test": ["127.0.0.2"],
                                              "svc.both.test": ["127.0.0.4"]})
        yield deployment.start_client(wait=False, client={
            "client_id": "site-a",
            "routes": ["127.0.0.2/32", "*.a.test", "svc.both.test"]})
        deployment.resolver = StaticResolver({"svc.b.test": ["127.0.0.3"],
                                              "svc.both.test": ["127.0.0.3"]})
        yield deployment.start_client(wait=False, client={
            "client_id": "site-b", "routes": ["127.0.0.3/32", "*.b.test", "*.both.test"]})
        yield self.until_connected(2)
        self.opens = []  # (client_id, host) of each OPEN the gateway sends
        for tunnel in deployment.gateway.tunnel_pool.tunnels("default"):
            tunnel.mux.open_stream = self.recording(tunnel.client_id, tunnel.mux.open_stream)

    def recording(self, client_id, open_stream):
        def recorded(kind, host, port):
            self.opens.append((client_id, host))
            return open_stream(kind, host, port)
        return recorded

    @defer.inlineCallbacks
    def until_connected(self, count):
        for _ in range(200):
            if len(self.deployment.gateway.tunnel_pool.tunnels("default")) == count:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("the clients did not connect")

    def opened(self):
        """Streams opened (OPEN_OK) on each client's tunnel so far."""
        return {t.client_id: t.mux.streams_opened
                for t in self.deployment.gateway.tunnel_pool.tunnels("default")}

    def socks(self, host, payload=b"site"):
        return deferToThread(socks_echo, self.deployment.socks_port, host, self.port, payload)

    def curl(self, host, connect=False):
        """The HTTP proxy's status for a GET (or, C{connect}, a CONNECT) to C{host}."""
        proxy = "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                               self.deployment.http_port)
        extra = ("-p", "-w", "%{http_connect}") if connect else ("-w", "%{http_code}")
        return run_curl("-x", proxy, "-o", "/dev/null", *extra,
                        "http://%s:%d/" % (host, self.port))

    @defer.inlineCallbacks
    def test_each_stream_to_its_site(self):
        """Addresses and names each go through the client of their site, and reach it."""
        expected = {"127.0.0.2": ("site-a", "a"), "svc.a.test": ("site-a", "a"),
                    "127.0.0.3": ("site-b", "b"), "svc.b.test": ("site-b", "b")}
        for host, (client_id, site) in sorted(expected.items()) * 2:
            before, connections = self.opened(), self.sites[site].connections
            self.assertEqual((yield self.socks(host, host.encode())), host.encode())
            after = self.opened()
            self.assertEqual({k: after[k] - before[k] for k in after},
                             {"site-a": int(client_id == "site-a"),
                              "site-b": int(client_id == "site-b")}, host)
            self.assertEqual(self.sites[site].connections, connections + 1)
            self.assertEqual(self.opens.pop(), (client_id, host))
        self.assertEqual(self.opens, [])
        status = {t["client_id"]: t["routes"] for t in [
            tunnel_status(t, 0) for t in self.deployment.gateway.tunnel_pool.tunnels()]}
        self.assertEqual(status, {"site-a": ["*.a.test", "svc.both.test", "127.0.0.2/32"],
                                  "site-b": ["*.b.test", "*.both.test", "127.0.0.3/32"]})

    @defer.inlineCallbacks
    def test_retry_at_the_other_site(self):
        """Refused at site A (its port is closed there), the stream is served by site B."""
        before = self.opened()
        self.assertEqual((yield self.socks("svc.both.test", b"retried")), b"retried")
        after = self.opened()
        self.assertEqual(self.opens, [("site-a", "svc.both.test"), ("site-b", "svc.both.test")])
        self.assertEqual({k: after[k] - before[k] for k in after}, {"site-a": 0, "site-b": 1})
        self.assertEqual((self.sites["a"].connections, self.sites["b"].connections), (0, 1))

    @defer.inlineCallbacks
    def test_unrouted_target_refused_at_once(self):
        """A target neither client routes: SOCKS 0x04 and HTTP 502, no OPEN sent to either."""
        before = self.opened()
        for host in ("127.0.0.9", "svc.c.test"):
            msg = yield deferToThread(socks_error, self.deployment.socks_port, host, self.port)
            self.assertIn("0x04", msg or "")
            out, _, _ = yield self.curl(host)
            self.assertEqual(out, b"502")
            out, _, _ = yield self.curl(host, connect=True)
            self.assertEqual(out, b"502")
        self.assertEqual(self.opens, [])
        self.assertEqual(self.opened(), before)

