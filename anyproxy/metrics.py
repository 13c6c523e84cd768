# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics for the gateway and the client (prometheus_client), and
the C{/metrics} page that serves them (C{metrics_addr}).

Theory of operation
-------------------
The data path pays almost nothing.  Each DATA or DATAGRAM frame adds its length to two
integers, the stream's and its mux's (L{anyproxy.tunnel.stream}); each
stream open costs one counter increment and one histogram observation.
Everything else is read from live state when Prometheus scrapes: the
gateway's tunnel pool, the streams' byte counts and send queues, the
client's dialer and UDP counters, the tunnel sockets' send buffers.

Counters must never go backwards, so a byte count read from a live object
is folded into a retired total at the moment that object goes: a frontend
stream's when it closes (L{GatewayMetrics.stream_closed}), a gateway
tunnel's when the pool drops it (L{GatewayMetrics.tunnel_removed}), a
client tunnel's when it is lost (the factory keeps the total).  A scrape
reports retired + live.  Per-client series end with the client's last
tunnel, or reconnects under new ids would grow the page without bound; the
totals of such departed clients go on in one series of their own.

Each service has its own C{CollectorRegistry}, never the global default, so
several services in one process (the tests) do not see each other.  The
page is rendered in the reactor thread: prometheus_client's own
C{twisted.MetricsResource} renders in a WSGI thread pool, where reading the
reactor's objects (stream tables, transports) would race with the reactor,
and it uses the global reactor.  L{MetricsPage} calls the same exposition
code (including OpenMetrics negotiation) synchronously instead.

The page is served by an L{anyproxy.operator_site.OperatorSite}, as the
status page is: optional Basic auth (C{metrics_username}/C{metrics_password};
required off loopback unless C{metrics_allow_anonymous}), a deadline for each
request, at most L{MAX_CONNECTIONS} open connections.  The gateway's also
answers C{GET /ready} without the login, for balancers' health checks
(L{anyproxy.gateway.drain.ReadinessPage}, added by
L{anyproxy.gateway.app.make_gateway_service}).
"""

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.web import resource

from anyproxy.addresses import host_port
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.operator_site import DEFAULT_REQUEST_TIMEOUT, OperatorSite, set_operator_headers

REALM = "AnyProxy metrics"
# Open connections at most: Prometheus keeps one per scraper.
MAX_CONNECTIONS = 16

# Stream-open latency: a LAN target answers in milliseconds, a slow one
# within connect_timeout (10 s), a wedged client within the 60 s open timeout.
OPEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0)

# Outcomes of a stream open: "ok", "cancelled" (the user went away first) or
# the lowercase name of the L{Reason} it failed with.
OUTCOMES = ("ok", "cancelled") + tuple(reason.name.lower() for reason in Reason)

# The UdpRelay counters (anyproxy.frontends.socks5.relay) and what they become.
_RELAYED = {"forwarded": "to_target", "returned": "to_user"}
_RELAY_DROPS = ("source", "malformed", "fragmented", "tunnel", "too_large", "unaddressed",
                "send_error")

# GatewayMetrics keeps the retired byte totals of at most this many clients
# (or twice those last found connected) before dropping the departed ones.
_PRUNE_MIN = 64


def transport_buffered(transport):
    """
    Bytes written to a Twisted TCP transport and not yet sent (its send
    buffer, not the kernel's); 0 for a transport that does not say.
    """
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return 0


def outcome_of(failure):
    """The C{outcome} label for a failed stream open."""
    if failure.check(defer.CancelledError):
        return "cancelled"
    if failure.check(StreamOpenError):
        return failure.value.reason.name.lower()
    return "general_failure"


def _bytes_family(name, documentation, label, totals):
    family = CounterMetricFamily(name, documentation, labels=[label, "direction"])
    for key, (bytes_in, bytes_out) in sorted(totals.items()):
        family.add_metric([key, "in"], bytes_in)
        family.add_metric([key, "out"], bytes_out)
    return family


def _add(totals, key, bytes_in, bytes_out):
    pair = totals.get(key)
    if pair is None:
        totals[key] = [bytes_in, bytes_out]
    else:
        pair[0] += bytes_in
        pair[1] += bytes_out


def _buffered_family(streams, transports):
    family = GaugeMetricFamily(
        "anyproxy_buffered_bytes",
        "Bytes held in memory waiting to be sent: stream send queues (waiting for credit) "
        "and tunnel sockets' send buffers.", labels=["buffer"])
    family.add_metric(["streams"], streams)
    family.add_metric(["tunnel_sockets"], transports)
    return family


def _new_registry():
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_open_fds...
    return registry


class GatewayMetrics(Collector):
    """
    The gateway's metrics; L{anyproxy.gateway.app.make_gateway_service}
    builds one per gateway.

    Byte directions: C{in} is what users send towards targets, C{out} what
    comes back to users (as haproxy counts a frontend's bytes).

    @ivar registry: the C{CollectorRegistry} to expose.
    """

    def __init__(self, tunnels, clock):
        """
        @param tunnels: the gateway's L{anyproxy.interfaces.ITunnelPool}.
        @param clock: an C{IReactorTime}, for open latencies.
        """
        self._tunnels = tunnels
        self._clock = clock
        self._live = {}  # frontend stream -> its frontend's name
        self.opening = 0  # frontend streams being opened now (a draining gateway waits for them)
        self._open_series = {}  # (frontend, outcome) -> (counter, histogram or None), see _opened
        self._frontend_bytes = {}  # frontend -> [in, out] of closed streams
        self._client_bytes = {}  # client_id -> [in, out] of removed tunnels
        self._departed_bytes = [0, 0]  # [in, out] of clients with no tunnel left
        self._prune_at = _PRUNE_MIN  # len(_client_bytes) that triggers a prune
        self._relay_retired = dict.fromkeys(("forwarded", "returned") + tuple(
            "dropped_" + each for each in _RELAY_DROPS), 0)
        self.registry = _new_registry()
        self.streams_opened = Counter(
            "anyproxy_gateway_streams_opened",
            "Streams users asked for, by frontend and outcome (ok, cancelled, or the reason "
            "it failed).", ["frontend", "outcome"], registry=self.registry)
        self.open_seconds = Histogram(
            "anyproxy_gateway_stream_open_seconds",
            "Seconds from a user's request to the stream being open or refused (queueing, "
            "waiting for a tunnel, the client's resolve and connect).", ["frontend"],
            buckets=OPEN_BUCKETS, registry=self.registry)
        # () -> {frontend name: its protocol factory}; the gateway sets it to
        # its Frontends.factories, so listeners rebuilt by a reload are what
        # is reported.
        self.frontend_factories = dict
        self.registry.register(self)
        tunnels.removal_observers.append(self.tunnel_removed)

    def add_frontend(self, name):
        """Start every series of frontend C{name} at 0, so rates work from the start."""
        for outcome in OUTCOMES:
            self.streams_opened.labels(name, outcome)
        self.open_seconds.labels(name)
        self._frontend_bytes.setdefault(name, [0, 0])

    # -- events ---------------------------------------------------------

    def track_open(self, opening, frontend):
        """
        Count the outcome and latency of the stream open C{opening} (a
        Deferred firing with a stream) for C{frontend}; an opened stream's
        bytes then count for C{frontend}.

        @return: C{opening}.
        """
        started = self._clock.seconds()
        self.opening += 1

        def opened(stream):
            self.opening -= 1
            self._opened(frontend, "ok", started)
            self._live[stream] = frontend
            stream.notify_closed(self.stream_closed)
            return stream

        def failed(failure):
            self.opening -= 1
            self._opened(frontend, outcome_of(failure), started)
            return failure

        return opening.addCallbacks(opened, failed)

    def _opened(self, frontend, outcome, started):
        # The labelled series, looked up once per (frontend, outcome): labels()
        # takes a lock and checks its arguments on every call.
        series = self._open_series.get((frontend, outcome))
        if series is None:
            series = self._open_series[frontend, outcome] = (
                self.streams_opened.labels(frontend, outcome),
                None if outcome == "cancelled" else self.open_seconds.labels(frontend))
        opened, seconds = series
        opened.inc()
        if seconds is not None:
            seconds.observe(self._clock.seconds() - started)

    def live_streams(self):
        """The frontend streams open now, a new list (a draining gateway waits for them)."""
        return list(self._live)

    def stream_closed(self, stream):
        """A frontend stream finished: keep its counts in the retired totals."""
        frontend = self._live.pop(stream, None)
        if frontend is None:
            return
        _add(self._frontend_bytes, frontend, stream.bytes_sent, stream.bytes_received)
        relay = _udp_relay(stream)
        if relay is not None:
            for name, value in relay.counters().items():
                self._relay_retired[name] = self._relay_retired.get(name, 0) + value

    def tunnel_removed(self, tunnel):
        """
        A tunnel left the registry: keep its byte counts in its client's
        retired totals.  Clients come and go with new ids, so a client's
        series do not outlive its last tunnel: L{_drop_departed} folds them
        into C{anyproxy_gateway_departed_client_bytes} at each scrape, and
        here too when the table has doubled since the last prune (so each
        prune is paid for by the removals before it): memory stays bounded
        by the clients connected, scraped or not.
        """
        mux = tunnel.mux
        _add(self._client_bytes, tunnel.client_id, mux.bytes_sent, mux.bytes_received)
        if len(self._client_bytes) > self._prune_at:
            self._drop_departed(set(t.client_id for t in self._tunnels.tunnels()))
            self._prune_at = max(_PRUNE_MIN, 2 * len(self._client_bytes))

    def _drop_departed(self, live):
        """Fold the retired totals of clients not in C{live} (ids) into the departed total."""
        for client_id in [each for each in self._client_bytes if each not in live]:
            bytes_in, bytes_out = self._client_bytes.pop(client_id)
            self._departed_bytes[0] += bytes_in
            self._departed_bytes[1] += bytes_out

    # -- scraping -------------------------------------------------------

    def collect(self):
        tunnels = self._tunnels.tunnels()
        connected = GaugeMetricFamily(
            "anyproxy_gateway_tunnels_connected", "Client tunnels connected now.",
            labels=["client_id", "group"])
        client_streams = GaugeMetricFamily(
            "anyproxy_gateway_client_streams",
            "Streams open (or opening) now through each client's tunnels, all frontends and "
            "forwarded ports.", labels=["client_id"])
        per_tunnel, per_client, client_bytes = {}, {}, {}
        # A client whose last tunnel went since the last scrape: its series end.
        self._drop_departed(set(tunnel.client_id for tunnel in tunnels))
        for key, pair in self._client_bytes.items():
            client_bytes[key] = list(pair)
        queued = sockets = 0
        for tunnel in tunnels:
            key = (tunnel.client_id, tunnel.group)
            per_tunnel[key] = per_tunnel.get(key, 0) + 1
            mux = tunnel.mux
            per_client[tunnel.client_id] = per_client.get(tunnel.client_id, 0) + mux.stream_count
            _add(client_bytes, tunnel.client_id, mux.bytes_sent, mux.bytes_received)
            queued += sum(stream.queued_bytes for stream in mux.streams())
            sockets += transport_buffered(mux.lowest_transport)
        for (client_id, group), count in sorted(per_tunnel.items()):
            connected.add_metric([client_id, group], count)
        for client_id, count in sorted(per_client.items()):
            client_streams.add_metric([client_id], count)
        yield connected
        yield client_streams
        yield _bytes_family("anyproxy_gateway_client_bytes",
                            "Stream payload bytes through each client's tunnels (in: from "
                            "users towards targets, out: back to users).",
                            "client_id", client_bytes)
        departed = CounterMetricFamily(
            "anyproxy_gateway_departed_client_bytes",
            "Stream payload bytes of clients that have no tunnel any more (each client's "
            "anyproxy_gateway_client_bytes series ends with its last tunnel).",
            labels=["direction"])
        departed.add_metric(["in"], self._departed_bytes[0])
        departed.add_metric(["out"], self._departed_bytes[1])
        yield departed

        active = dict.fromkeys(self._frontend_bytes, 0)
        frontend_bytes = {key: list(pair) for key, pair in self._frontend_bytes.items()}
        relay = dict(self._relay_retired)
        for stream, frontend in self._live.items():
            active[frontend] = active.get(frontend, 0) + 1
            _add(frontend_bytes, frontend, stream.bytes_sent, stream.bytes_received)
            live_relay = _udp_relay(stream)
            if live_relay is not None:
                for name, value in live_relay.counters().items():
                    relay[name] = relay.get(name, 0) + value
        streams = GaugeMetricFamily("anyproxy_gateway_streams_active",
                                    "Streams open now, by frontend.", labels=["frontend"])
        for frontend, count in sorted(active.items()):
            streams.add_metric([frontend], count)
        yield streams
        yield _bytes_family("anyproxy_gateway_frontend_bytes",
                            "Stream payload bytes by frontend (in: from users towards "
                            "targets, out: back to users).", "frontend", frontend_bytes)

        relayed = CounterMetricFamily("anyproxy_gateway_udp_datagrams_relayed",
                                      "SOCKS5 UDP datagrams relayed.", labels=["direction"])
        for name, direction in sorted(_RELAYED.items()):
            relayed.add_metric([direction], relay.get(name, 0))
        dropped = CounterMetricFamily("anyproxy_gateway_udp_datagrams_dropped",
                                      "SOCKS5 UDP datagrams dropped, by reason.",
                                      labels=["reason"])
        for reason in _RELAY_DROPS:
            dropped.add_metric([reason], relay.get("dropped_" + reason, 0))
        yield relayed
        yield dropped
        yield _buffered_family(queued, sockets)
        yield from self._upstream_pools()
        yield from self._login_throttle()

    # The gateway's anyproxy.auth.Logins, once make_gateway_service made it.
    logins = None

    def _login_throttle(self):
        if self.logins is None:
            return
        events = CounterMetricFamily(
            "anyproxy_gateway_login_throttle_events",
            "Brute-force defence: sources blocked, logins refused while blocked, failed "
            "logins whose answer was delayed (every listener).", labels=["event"])
        for event, count in sorted(self.logins.stats().items()):
            events.add_metric([event], count)
        yield events

    def _upstream_pools(self):
        idle = GaugeMetricFamily(
            "anyproxy_gateway_http_upstream_idle",
            "Idle upstream connections the HTTP proxy keeps for reuse, by frontend.",
            labels=["frontend"])
        reuses = CounterMetricFamily(
            "anyproxy_gateway_http_upstream_reuses",
            "Forwarded requests that reused a kept upstream connection, by frontend.",
            labels=["frontend"])
        for name, factory in sorted(self.frontend_factories().items()):
            pool = getattr(factory, "upstream_pool", None)
            if pool is not None:
                idle.add_metric([name], len(pool))
                reuses.add_metric([name], pool.reuses)
        yield idle
        yield reuses


def _udp_relay(stream):
    """The L{UdpRelay} of a gateway udp stream (SOCKS5 UDP ASSOCIATE), or C{None}."""
    if stream.kind != "udp":
        return None
    relay = getattr(stream.protocol, "relay", None)
    return relay if hasattr(relay, "counters") else None


class ClientMetrics(Collector):
    """
    The client's metrics, all read at scrape time; L{make_client_service}
    builds one per service.

    Byte directions: C{in} is what users send towards targets (received from
    the gateway), C{out} what goes back to them, as on the gateway.

    @ivar registry: the C{CollectorRegistry} to expose.
    """

    def __init__(self, factories, dialer):
        """
        @param factories: C{{(host, port): ClientTunnelFactory}}, one per gateway.
        @param dialer: the L{anyproxy.client.dialer.Dialer}.
        """
        self._factories = factories
        self._dialer = dialer
        self.registry = _new_registry()
        self.registry.register(self)

    def collect(self):
        connected = GaugeMetricFamily("anyproxy_client_tunnels_connected",
                                      "Tunnels up now, by gateway.", labels=["gateway"])
        established = CounterMetricFamily(
            "anyproxy_client_tunnels_established",
            "Tunnels that completed the handshake (the first connection and every "
            "reconnect).", labels=["gateway"])
        lost = CounterMetricFamily(
            "anyproxy_client_tunnels_lost",
            "Tunnels lost after the handshake; each is then reconnected with backoff.",
            labels=["gateway"])
        totals = {}
        queued = sockets = 0
        for (host, port), factory in sorted(self._factories.items()):
            gateway = host_port(host, port)
            connected.add_metric([gateway], len(factory.connected))
            established.add_metric([gateway], factory.established)
            lost.add_metric([gateway], factory.lost)
            pair = totals[gateway] = [factory.retired_bytes_received, factory.retired_bytes_sent]
            for protocol in list(factory.connected):
                mux = protocol.mux
                pair[0] += mux.bytes_received
                pair[1] += mux.bytes_sent
                queued += sum(stream.queued_bytes for stream in mux.streams())
                sockets += transport_buffered(mux.lowest_transport)
        yield connected
        yield established
        yield lost
        yield _bytes_family("anyproxy_client_bytes",
                            "Stream payload bytes through the tunnels to each gateway (in: "
                            "from users towards targets, out: back to users).",
                            "gateway", totals)

        dialer = self._dialer
        stats = dialer.udp_stats
        yield GaugeMetricFamily("anyproxy_client_streams_active",
                                "Streams (TCP connections and UDP associations) open now.",
                                value=dialer.active)
        refusals = CounterMetricFamily(
            "anyproxy_client_acl_refusals",
            "Refused by access control: stream opens, and single UDP datagrams.",
            labels=["kind"])
        refusals.add_metric(["stream"], dialer.acl_refusals)
        refusals.add_metric(["udp_datagram"], stats.dropped_acl)
        yield refusals
        yield CounterMetricFamily("anyproxy_client_udp_associations",
                                  "UDP associations opened.", value=stats.associations)
        datagrams = CounterMetricFamily("anyproxy_client_udp_datagrams",
                                        "UDP datagrams relayed.", labels=["direction"])
        datagrams.add_metric(["to_target"], stats.sent)
        datagrams.add_metric(["to_user"], stats.received)
        yield datagrams
        udp_bytes = CounterMetricFamily("anyproxy_client_udp_bytes",
                                        "UDP payload bytes relayed.", labels=["direction"])
        udp_bytes.add_metric(["to_target"], stats.bytes_sent)
        udp_bytes.add_metric(["to_user"], stats.bytes_received)
        yield udp_bytes
        dropped = CounterMetricFamily("anyproxy_client_udp_datagrams_dropped",
                                      "UDP datagrams dropped, by reason.", labels=["reason"])
        dropped.add_metric(["acl"], stats.dropped_acl)
        dropped.add_metric(["error"], stats.dropped_error)
        dropped.add_metric(["unsolicited"], stats.dropped_unsolicited)
        yield dropped
        lookups = dialer.lookups
        yield GaugeMetricFamily("anyproxy_client_name_lookups_running",
                                "Name lookups in the resolver now (until it ends them, "
                                "past a stream's connect timeout).", value=lookups.running)
        yield CounterMetricFamily("anyproxy_client_name_lookups_refused",
                                  "Name lookups refused at once at their bound (the stream "
                                  "or datagram gets OVERLOADED).", value=lookups.refused)
        yield _buffered_family(queued, sockets)


class MetricsPage(resource.Resource):
    """C{GET /metrics}: the registry in the Prometheus text (or OpenMetrics) format."""

    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self._registry = registry

    def render_GET(self, request):
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        set_operator_headers(request, content_type.encode("ascii"))
        return encoder(self._registry)


def metrics_site(registry, reactor, username="", password="",
                 request_timeout=DEFAULT_REQUEST_TIMEOUT, max_connections=MAX_CONNECTIONS):
    """
    The C{IProtocolFactory} serving C{registry} at C{/metrics} (404
    elsewhere, but for the gateway's C{/ready}): an L{OperatorSite}, so with
    a deadline for each request, a cap on connections and no access log (a
    scrape every few seconds is not worth a line).

    @param username: the Basic login scrapers must give (C{metrics_username});
        empty = none.  C{site.set_login} changes it on reload.
    @param password: its password (C{metrics_password}).
    @param request_timeout: seconds a request head may take.
    @param max_connections: open connections at most; more get 503.
    """
    root = resource.Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    return OperatorSite(root, reactor, "metrics", REALM, request_timeout=request_timeout,
                        max_connections=max_connections, username=username, password=password)
