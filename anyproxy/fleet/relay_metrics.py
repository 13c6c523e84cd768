# -*- test-case-name: tests.test_fleet_relay -*-
"""
Prometheus metrics of the relay between gateways (L{anyproxy.fleet.relay},
L{anyproxy.fleet.pool}), in the gateway's own C{CollectorRegistry} (see
L{anyproxy.metrics} for the conventions: counters read from live streams at
scrape time and folded into retired totals when a stream ends).

Each series has a C{side}: C{sent} counts this gateway's users' streams that
went to a peer over a link, C{served} the streams peers relayed here and
this gateway opened on its own tunnels.  Byte directions are the gateway
metrics' ones: C{in} from users towards targets, C{out} back to users.
"""

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from anyproxy.metrics import OPEN_BUCKETS, OUTCOMES, outcome_of

SIDES = ("sent", "served")


class RelayMetrics(Collector):
    """
    Relayed streams (by side and outcome), their open latency and bytes, and
    the links up now.

    @param registry: the gateway's C{CollectorRegistry}
        (L{anyproxy.metrics.GatewayMetrics.registry}).
    @param clock: an C{IReactorTime}, for open latencies.
    @param links: C{links()} -> C{(dialed, accepted)}, the links up now.
    """

    def __init__(self, registry, clock, links=lambda: (0, 0)):
        self._clock = clock
        self._links = links
        self._live = {}  # the link's end of each relayed stream -> its side
        self._retired = {side: [0, 0] for side in SIDES}
        self.streams = Counter(
            "anyproxy_fleet_relayed_streams",
            "Streams relayed between gateways, by side (sent: this gateway's users' streams "
            "opened on a peer; served: peers' streams opened on our tunnels) and outcome.",
            ["side", "outcome"], registry=registry)
        self.open_seconds = Histogram(
            "anyproxy_fleet_relay_open_seconds",
            "Seconds from asking for a relayed stream to its being open or refused (sent: "
            "the link's round trip included; served: our tunnel's open).", ["side"],
            buckets=OPEN_BUCKETS, registry=registry)
        for side in SIDES:
            for outcome in OUTCOMES:
                self.streams.labels(side, outcome)
            self.open_seconds.labels(side)
        registry.register(self)

    def track_open(self, opening, side, link_stream=None):
        """
        Count the outcome and latency of a relayed open, then the bytes of
        its stream on the link.

        @param opening: a Deferred firing with the opened stream.
        @param side: C{"sent"} or C{"served"}.
        @param link_stream: the stream on the link when it is not what
            C{opening} fires with (the served side: the peer's stream).
        @return: C{opening}.
        """
        started = self._clock.seconds()

        def opened(stream):
            self._count(side, "ok", started)
            on_link = link_stream if link_stream is not None else stream
            self._live[on_link] = side
            on_link.notify_closed(self._closed)
            return stream

        def failed(failure):
            self._count(side, outcome_of(failure), started)
            return failure

        return opening.addCallbacks(opened, failed)

    def _count(self, side, outcome, started):
        self.streams.labels(side, outcome).inc()
        if outcome != "cancelled":
            self.open_seconds.labels(side).observe(self._clock.seconds() - started)

    def _closed(self, stream):
        side = self._live.pop(stream, None)
        if side is not None:
            bytes_in, bytes_out = _directions(side, stream)
            totals = self._retired[side]
            totals[0] += bytes_in
            totals[1] += bytes_out

    def collect(self):
        totals = {side: list(pair) for side, pair in self._retired.items()}
        active = dict.fromkeys(SIDES, 0)
        for stream, side in self._live.items():
            bytes_in, bytes_out = _directions(side, stream)
            totals[side][0] += bytes_in
            totals[side][1] += bytes_out
            active[side] += 1
        family = CounterMetricFamily(
            "anyproxy_fleet_relayed_bytes",
            "Payload bytes of relayed streams, by side (in: from users towards targets, out: "
            "back to users).", labels=["side", "direction"])
        for side in SIDES:
            family.add_metric([side, "in"], totals[side][0])
            family.add_metric([side, "out"], totals[side][1])
        yield family
        streams = GaugeMetricFamily("anyproxy_fleet_relayed_streams_active",
                                    "Relayed streams open now, by side.", labels=["side"])
        for side in SIDES:
            streams.add_metric([side], active[side])
        yield streams
        dialed, accepted = self._links()
        links = GaugeMetricFamily("anyproxy_fleet_peer_links",
                                  "Links to other gateways up now (dialed: for our users; "
                                  "accepted: for theirs).", labels=["role"])
        links.add_metric(["dialed"], dialed)
        links.add_metric(["accepted"], accepted)
        yield links


def _directions(side, stream):
    """C{(in, out)} bytes of a link stream: we opened it (sent) or the peer did (served)."""
    if side == "sent":
        return stream.bytes_sent, stream.bytes_received
    return stream.bytes_received, stream.bytes_sent
