"""
Tests for L{anyproxy.metrics}: the collectors' output from known state (muxes
wired back to back, a real L{TunnelPool}, fake client factories), and the
byte counters the tunnel keeps for them.
"""

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from anyproxy.client.dialer import NameLookups
from anyproxy.client.udp import UdpStats
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.gateway.tunnel_pool import Tunnel, TunnelPool
from anyproxy.metrics import (
    OUTCOMES, ClientMetrics, GatewayMetrics, MetricsPage, metrics_site, transport_buffered)
from tests.test_mux import SMALL_WINDOW, MuxPair, Recorder


# -- fakes ----------------------------------------------------------------------

class FakeTcpTransport:
    """The send-buffer attributes of a Twisted TCP transport."""

    def __init__(self, data_buffer=b"", offset=0, temp=0):
        self.dataBuffer = data_buffer
        self.offset = offset
        self._tempDataLen = temp


class FakeRelay:
    """Stands in for a SOCKS5 UdpRelay: only its counters."""

    def __init__(self, **counts):
        self.counts = dict({"forwarded": 0, "returned": 0}, **counts)

    def counters(self):
        return dict(self.counts)


class FakeAssociation(Recorder):
    """A udp stream's protocol with a relay, as the SOCKS5 frontend attaches."""

    def __init__(self, relay):
        super().__init__()
        self.relay = relay


class FakeTunnelProtocol:
    def __init__(self, mux):
        self.mux = mux


class FakeFactory:
    """The parts of a ClientTunnelFactory that metrics read."""

    def __init__(self, muxes=(), established=0, lost=0, sent=0, received=0):
        self.connected = {FakeTunnelProtocol(mux) for mux in muxes}
        self.established = established
        self.lost = lost
        self.retired_bytes_sent = sent
        self.retired_bytes_received = received


class FakeDialer:
    def __init__(self, active=0, acl_refusals=0, udp_stats=None):
        self.active = active
        self.acl_refusals = acl_refusals
        self.udp_stats = udp_stats or UdpStats()
        self.lookups = NameLookups(resolver=None)


def opened(pair, metrics, frontend, kind="tcp", opener_protocol=None):
    """Open a stream from the gateway side of C{pair}, tracked by C{metrics}."""
    d = metrics.track_open(pair.gateway.open_stream(kind, "target.example", 22), frontend)
    pair.pump()
    acceptor = pair.client_requests.pop()
    acceptor_protocol = Recorder()
    acceptor.accept(acceptor_protocol)
    pair.pump()
    results = []
    d.addCallback(results.append)
    stream = results[0]
    stream.attach(opener_protocol or Recorder())
    return stream, acceptor


# -- tests ----------------------------------------------------------------------

class ByteCountTests(SynchronousTestCase):
    """Streams and muxes count DATA payload bytes each way, and report queued bytes."""

    def test_counts_both_ways(self):
        """Bytes written on either end are counted as sent there and received at the peer."""
        pair = MuxPair()
        opener, _, acceptor, _ = pair.open()
        opener.write(b"x" * 1000)
        acceptor.write(b"y" * 300)
        pair.pump()
        self.assertEqual((opener.bytes_sent, opener.bytes_received), (1000, 300))
        self.assertEqual((acceptor.bytes_sent, acceptor.bytes_received), (300, 1000))
        self.assertEqual((pair.gateway.bytes_sent, pair.gateway.bytes_received), (1000, 300))
        self.assertEqual((pair.client.bytes_sent, pair.client.bytes_received), (300, 1000))

    def test_mux_sums_streams(self):
        """A mux's totals are the sum over its streams, closed ones included."""
        pair = MuxPair()
        first, _, _, _ = pair.open()
        second, _, _, _ = pair.open()
        first.write(b"a" * 10)
        second.write(b"b" * 20)
        first.loseConnection()
        pair.pump()
        self.assertEqual(pair.gateway.bytes_sent, 30)
        self.assertEqual(pair.client.bytes_received, 30)

    def test_queued_bytes(self):
        """Bytes beyond the send window are queued, and counted as sent only once sent."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        opener, _, _, acceptor_protocol = pair.open()
        acceptor_protocol.transport.pauseProducing()  # the acceptor stops granting credit
        opener.write(b"z" * (SMALL_WINDOW + 100))
        self.assertEqual(opener.queued_bytes, 100)
        self.assertEqual(opener.bytes_sent, SMALL_WINDOW)

    def test_transport_buffered(self):
        """A TCP transport's unsent bytes are its buffer past the offset plus pending writes."""
        self.assertEqual(transport_buffered(FakeTcpTransport(b"abcdef", 2, 10)), 14)
        self.assertEqual(transport_buffered(None), 0)
        self.assertEqual(transport_buffered(object()), 0)


class GatewayMetricsTests(SynchronousTestCase):
    """The gateway collector reports the registry, stream outcomes and bytes."""

    def setUp(self):
        self.clock = Clock()
        self.tunnels = TunnelPool(self.clock)
        self.metrics = GatewayMetrics(self.tunnels, self.clock)
        self.metrics.add_frontend("socks5 proxy")
        self.pair = MuxPair()
        self.tunnel = Tunnel("client-1", "lab", self.pair.gateway)
        self.tunnels.add(self.tunnel)

    def value(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def test_outcome_series_start_at_zero(self):
        """Every outcome of an added frontend is reported as 0 before any stream."""
        for outcome in OUTCOMES:
            self.assertEqual(self.value("anyproxy_gateway_streams_opened_total",
                                        frontend="socks5 proxy", outcome=outcome), 0)
        self.assertEqual(self.value("anyproxy_gateway_streams_active", frontend="socks5 proxy"),
                         0)

    def test_tunnels_connected(self):
        """Connected tunnels are counted per client id and group."""
        self.tunnels.add(Tunnel("client-1", "lab", MuxPair().gateway))
        self.tunnels.add(Tunnel("client-2", "default", MuxPair().gateway))
        self.assertEqual(self.value("anyproxy_gateway_tunnels_connected",
                                    client_id="client-1", group="lab"), 2)
        self.assertEqual(self.value("anyproxy_gateway_tunnels_connected",
                                    client_id="client-2", group="default"), 1)

    def test_open_ok(self):
        """An opened stream counts as ok, with its latency, and is active."""
        d = self.metrics.track_open(self.pair.gateway.open_stream("tcp", "t", 1), "socks5 proxy")
        self.pair.pump()
        self.clock.advance(0.2)
        self.pair.client_requests.pop().accept(Recorder())
        self.pair.pump()
        self.successResultOf(d)
        self.assertEqual(self.value("anyproxy_gateway_streams_opened_total",
                                    frontend="socks5 proxy", outcome="ok"), 1)
        self.assertEqual(self.value("anyproxy_gateway_stream_open_seconds_count",
                                    frontend="socks5 proxy"), 1)
        self.assertEqual(self.value("anyproxy_gateway_stream_open_seconds_sum",
                                    frontend="socks5 proxy"), 0.2)
        self.assertEqual(self.value("anyproxy_gateway_streams_active", frontend="socks5 proxy"),
                         1)
        self.assertEqual(self.value("anyproxy_gateway_client_streams", client_id="client-1"), 1)

    def test_open_refused(self):
        """A refusal counts under its reason's name, with its latency."""
        d = self.metrics.track_open(
            defer.fail(StreamOpenError(Reason.NOT_ALLOWED, "acl")), "socks5 proxy")
        self.failureResultOf(d, StreamOpenError)
        self.assertEqual(self.value("anyproxy_gateway_streams_opened_total",
                                    frontend="socks5 proxy", outcome="not_allowed"), 1)
        self.assertEqual(self.value("anyproxy_gateway_stream_open_seconds_count",
                                    frontend="socks5 proxy"), 1)

    def test_open_cancelled(self):
        """A user giving up counts as cancelled, without a latency."""
        opening = defer.Deferred()
        d = self.metrics.track_open(opening, "socks5 proxy")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.value("anyproxy_gateway_streams_opened_total",
                                    frontend="socks5 proxy", outcome="cancelled"), 1)
        self.assertEqual(self.value("anyproxy_gateway_stream_open_seconds_count",
                                    frontend="socks5 proxy"), 0)

    def test_frontend_bytes_survive_close(self):
        """A frontend's byte counters include live streams, and keep them once closed."""
        stream, acceptor = opened(self.pair, self.metrics, "socks5 proxy")
        stream.write(b"u" * 5000)
        acceptor.write(b"t" * 700)
        self.pair.pump()
        live = (self.value("anyproxy_gateway_frontend_bytes_total", frontend="socks5 proxy",
                           direction="in"),
                self.value("anyproxy_gateway_frontend_bytes_total", frontend="socks5 proxy",
                           direction="out"))
        self.assertEqual(live, (5000, 700))
        stream.reset()
        self.pair.pump()
        self.assertEqual(self.value("anyproxy_gateway_frontend_bytes_total",
                                    frontend="socks5 proxy", direction="in"), 5000)
        self.assertEqual(self.value("anyproxy_gateway_frontend_bytes_total",
                                    frontend="socks5 proxy", direction="out"), 700)
        self.assertEqual(self.value("anyproxy_gateway_streams_active", frontend="socks5 proxy"),
                         0)

    def test_client_bytes_survive_tunnel(self):
        """
        A client's byte counters keep a removed tunnel's totals while the
        client has another tunnel; with its last tunnel its series end and
        the totals go on in the departed series.
        """
        other = Tunnel("client-1", "lab", MuxPair().gateway)
        self.tunnels.add(other)
        stream, _ = opened(self.pair, self.metrics, "socks5 proxy")
        stream.write(b"u" * 1234)
        self.pair.pump()
        self.assertEqual(self.value("anyproxy_gateway_client_bytes_total",
                                    client_id="client-1", direction="in"), 1234)
        self.pair.gateway.connection_lost()
        self.tunnels.remove(self.tunnel)
        self.assertEqual(self.value("anyproxy_gateway_client_bytes_total",
                                    client_id="client-1", direction="in"), 1234)
        self.assertEqual(self.value("anyproxy_gateway_departed_client_bytes_total",
                                    direction="in"), 0)
        self.tunnels.remove(other)
        self.assertIsNone(self.value("anyproxy_gateway_client_bytes_total",
                                     client_id="client-1", direction="in"))
        self.assertIsNone(self.value("anyproxy_gateway_tunnels_connected",
                                     client_id="client-1", group="lab"))
        self.assertEqual(self.value("anyproxy_gateway_departed_client_bytes_total",
                                    direction="in"), 1234)

    def cycle(self, count, scrape):
        """C{count} clients, each with a new id, connect, carry bytes and go."""
        for n in range(count):
            pair = MuxPair()
            tunnel = Tunnel("gone-%d" % (n,), "lab", pair.gateway)
            self.tunnels.add(tunnel)
            stream, _ = opened(pair, self.metrics, "socks5 proxy")
            stream.write(b"x" * 10)
            pair.pump()
            if scrape:
                generate_latest(self.metrics.registry)
            pair.gateway.connection_lost()
            self.tunnels.remove(tunnel)

    def test_departed_clients_leave_no_series(self):
        """
        Reconnects under new client ids do not grow /metrics: no series names
        a gone client, the page is as long as before, and the bytes are kept
        in the departed total.
        """
        self.cycle(1, scrape=True)
        before = len(generate_latest(self.metrics.registry))
        self.cycle(300, scrape=True)
        page = generate_latest(self.metrics.registry)
        self.assertNotIn(b"gone-", page)
        self.assertLess(len(page), before + 200)  # process gauges' digits may vary
        self.assertEqual(self.value("anyproxy_gateway_departed_client_bytes_total",
                                    direction="in"), 301 * 10)
        self.assertEqual(self.value("anyproxy_gateway_client_bytes_total",
                                    client_id="client-1", direction="in"), 0)

    def test_departed_clients_bounded_without_scrapes(self):
        """Unscraped, the gateway still forgets gone clients (memory stays bounded)."""
        self.cycle(1000, scrape=False)
        self.assertLessEqual(len(self.metrics._client_bytes), 2 * 64 + 1)
        self.assertEqual(self.value("anyproxy_gateway_departed_client_bytes_total",
                                    direction="in"), 1000 * 10)
        self.assertEqual(self.metrics._client_bytes, {})  # the scrape dropped the rest

    def test_udp_relay_counters(self):
        """UDP relay counters are read live and kept when the association ends."""
        relay = FakeRelay(forwarded=5, returned=3, dropped_source=2)
        stream, _ = opened(self.pair, self.metrics, "socks5 proxy", kind="udp",
                           opener_protocol=FakeAssociation(relay))
        relayed = ("anyproxy_gateway_udp_datagrams_relayed_total",)
        self.assertEqual(self.value(*relayed, direction="to_target"), 5)
        self.assertEqual(self.value(*relayed, direction="to_user"), 3)
        self.assertEqual(self.value("anyproxy_gateway_udp_datagrams_dropped_total",
                                    reason="source"), 2)
        relay.counts["forwarded"] = 6
        stream.loseConnection()
        self.pair.pump()
        self.assertEqual(self.value(*relayed, direction="to_target"), 6)

    def test_buffered_bytes(self):
        """Buffered bytes add the streams' queues and the tunnel sockets' buffers."""
        pair = MuxPair(client_window=SMALL_WINDOW)
        pair.gateway.lowest_transport = FakeTcpTransport(b"x" * 50)
        self.tunnels.add(Tunnel("client-2", "lab", pair.gateway))
        stream, _ = opened(pair, self.metrics, "socks5 proxy")
        stream.write(b"q" * (SMALL_WINDOW + 40))  # no credit is delivered: 40 stay queued
        self.assertEqual(self.value("anyproxy_buffered_bytes", buffer="streams"), 40)
        self.assertEqual(self.value("anyproxy_buffered_bytes", buffer="tunnel_sockets"), 50)

    def test_http_upstream_pool(self):
        """The HTTP proxy's idle upstream connections and reuses are reported per frontend."""
        from anyproxy.frontends.http.pool import UpstreamPool

        class Factory:
            upstream_pool = UpstreamPool(self.clock)

        class Entry:
            def close(self):
                pass

        pool = Factory.upstream_pool
        self.metrics.frontend_factories = lambda: {"http proxy": Factory(), "socks5 proxy": object()}
        pool.put("key", Entry())
        pool.put("key", Entry())
        pool.take("key")
        self.assertEqual(self.value("anyproxy_gateway_http_upstream_idle", frontend="http proxy"), 1)
        self.assertEqual(self.value("anyproxy_gateway_http_upstream_reuses_total",
                                    frontend="http proxy"), 1)
        self.assertIsNone(self.value("anyproxy_gateway_http_upstream_idle", frontend="socks5 proxy"))

    def test_process_metrics(self):
        """Process RSS and open file descriptors are exported."""
        self.assertGreater(self.value("process_resident_memory_bytes"), 0)
        self.assertGreater(self.value("process_open_fds"), 0)

    def test_registries_are_separate(self):
        """Two services' metrics never share series."""
        other = GatewayMetrics(TunnelPool(self.clock), self.clock)
        self.assertIsNone(other.registry.get_sample_value(
            "anyproxy_gateway_tunnels_connected", {"client_id": "client-1", "group": "lab"}))


class ClientMetricsTests(SynchronousTestCase):
    """The client collector reports tunnels per gateway, the dialer and UDP counters."""

    def setUp(self):
        self.pair = MuxPair()
        factories = {
            ("gw1.example", 8443): FakeFactory([self.pair.client], established=3, lost=2,
                                               sent=100, received=1000),
            ("::1", 8443): FakeFactory(),
        }
        stats = UdpStats(sent=7, received=6, bytes_sent=70, bytes_received=60, dropped_acl=2,
                         dropped_error=1, associations=4)
        self.dialer = FakeDialer(active=3, acl_refusals=5, udp_stats=stats)
        self.metrics = ClientMetrics(factories, self.dialer)

    def value(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def test_tunnels(self):
        """Tunnels up, established and lost are reported per gateway."""
        gateway = "gw1.example:8443"
        self.assertEqual(self.value("anyproxy_client_tunnels_connected", gateway=gateway), 1)
        self.assertEqual(self.value("anyproxy_client_tunnels_connected", gateway="[::1]:8443"),
                         0)
        self.assertEqual(self.value("anyproxy_client_tunnels_established_total",
                                    gateway=gateway), 3)
        self.assertEqual(self.value("anyproxy_client_tunnels_lost_total", gateway=gateway), 2)

    def test_bytes(self):
        """Bytes per gateway are the lost tunnels' totals plus the live muxes'."""
        opener, _, acceptor, _ = self.pair.open()
        opener.write(b"u" * 10)  # from the gateway: a user's bytes (in)
        acceptor.write(b"t" * 20)  # from the target (out)
        self.pair.pump()
        self.assertEqual(self.value("anyproxy_client_bytes_total", gateway="gw1.example:8443",
                                    direction="in"), 1010)
        self.assertEqual(self.value("anyproxy_client_bytes_total", gateway="gw1.example:8443",
                                    direction="out"), 120)

    def test_dialer_and_udp(self):
        """Active streams, ACL refusals and the UDP counters come from the dialer."""
        self.assertEqual(self.value("anyproxy_client_streams_active"), 3)
        self.assertEqual(self.value("anyproxy_client_acl_refusals_total", kind="stream"), 5)
        self.assertEqual(self.value("anyproxy_client_acl_refusals_total", kind="udp_datagram"), 2)
        self.assertEqual(self.value("anyproxy_client_udp_associations_total"), 4)
        self.assertEqual(self.value("anyproxy_client_udp_datagrams_total",
                                    direction="to_target"), 7)
        self.assertEqual(self.value("anyproxy_client_udp_bytes_total", direction="to_user"), 60)
        self.assertEqual(self.value("anyproxy_client_udp_datagrams_dropped_total",
                                    reason="error"), 1)
        self.dialer.acl_refusals += 1
        self.assertEqual(self.value("anyproxy_client_acl_refusals_total", kind="stream"), 6)

    def test_name_lookups(self):
        """The lookups in the resolver now, and those refused at their bound."""
        self.dialer.lookups.running = 2
        self.dialer.lookups.refused = 9
        self.assertEqual(self.value("anyproxy_client_name_lookups_running"), 2)
        self.assertEqual(self.value("anyproxy_client_name_lookups_refused_total"), 9)


class MetricsPageTests(SynchronousTestCase):
    """The /metrics page renders the registry in the reactor thread."""

    def setUp(self):
        clock = Clock()
        self.metrics = GatewayMetrics(TunnelPool(clock), clock)
        self.metrics.add_frontend("http proxy")

    def test_text_format(self):
        """By default the page is the Prometheus text format."""
        request = DummyRequest([b""])
        body = MetricsPage(self.metrics.registry).render_GET(request)
        self.assertIn(b'anyproxy_gateway_streams_opened_total{frontend="http proxy",'
                      b'outcome="ok"} 0.0', body)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0]
                        .startswith(b"text/plain"))

    def test_openmetrics(self):
        """A scraper asking for OpenMetrics gets it."""
        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text"])
        body = MetricsPage(self.metrics.registry).render_GET(request)
        self.assertTrue(body.endswith(b"# EOF\n"))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type")[0],
                         OPENMETRICS.encode())

    def test_site_serves_metrics_only(self):
        """The site has the page at /metrics and nothing else."""
        site = metrics_site(self.metrics.registry, Clock())
        self.assertIsInstance(site.resource.getStaticEntity(b"metrics"), MetricsPage)
        self.assertIsNone(site.resource.getStaticEntity(b"other"))
