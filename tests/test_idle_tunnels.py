"""
Idle tunnels cost the gateway little: one end pings a silent tunnel (the
client), a silent peer is still found within a bound (L{Liveness} in
L{anyproxy.tunnel.websocket}), the opening handshake's leftovers are let go,
and TLS releases its idle buffers (L{anyproxy.tls}).
"""

import struct
import sys

from hypothesis import given, strategies as st
from OpenSSL import SSL
from OpenSSL._util import lib as openssl
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import Clock, deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import failure
from twisted.trial import unittest

from anyproxy.tls import client_tls_options, server_tls_options
from anyproxy.tunnel.liveness import (
    DEAD_AFTER, RELEASE_AFTER_SWEEPS, SWEEPS_PER_INTERVAL, Liveness)
from anyproxy.tunnel.websocket import GatewayTunnelProtocol, _TunnelProtocol
from tests.support import Deployment


class FakeTunnel:
    """What L{Liveness} uses of a tunnel protocol; records its pings and its drop."""

    silence_set = None

    def __init__(self, clock, liveness):
        self.clock = clock
        self.liveness = liveness
        self.pings = []
        self.releases = []
        self.drops = []
        self.dropped = None

    def sendPing(self):
        self.pings.append(self.clock.seconds())

    def release_idle_buffers(self):
        self.releases.append(self.clock.seconds())

    def silence_timed_out(self, seconds):
        self.dropped = (self.clock.seconds(), seconds)
        self.drops.append(self.clock.seconds())

    def received(self):
        # What _TunnelProtocol.dataReceived does first.
        if self.silence_set is not None:
            self.liveness.heard(self)


class LivenessTests(unittest.SynchronousTestCase):
    """The sweep on a Clock: when each end pings and when a silent tunnel is dropped."""

    interval = 10.0
    sweep = interval / SWEEPS_PER_INTERVAL

    def watch(self, is_gateway):
        self.clock = Clock()
        self.liveness = Liveness(self.clock, self.interval, is_gateway)
        self.tunnel = FakeTunnel(self.clock, self.liveness)
        self.liveness.add(self.tunnel)

    def advance(self, seconds, sweep=None):
        sweep = sweep or self.sweep
        self.clock.pump([sweep] * round(seconds / sweep))

    def assert_dropped_in_bound(self, interval=None):
        interval = interval or self.interval
        when, seconds = self.tunnel.dropped
        self.assertEqual(seconds, DEAD_AFTER * interval)
        self.assertGreater(when, DEAD_AFTER * interval)
        self.assertLessEqual(when, (DEAD_AFTER + 1 / SWEEPS_PER_INTERVAL) * interval)
        self.assertEqual(self.liveness.watched, frozenset())

    def test_client_pings_a_silent_tunnel_every_interval(self):
        """The client pings once a tunnel is silent for more than one interval, then
        every interval, and drops it after more than three (within interval / 5)."""
        self.watch(is_gateway=False)
        self.advance(40)
        self.assertEqual(self.tunnel.pings, [12.0, 22.0])
        self.assert_dropped_in_bound()

    def test_quiet_tunnel_asked_to_release_buffers(self):
        """Two sweeps into each quiet spell (4 s here), the tunnel is asked to give back
        its TLS buffers: once per spell, again after it hears something."""
        self.watch(is_gateway=True)
        self.advance(8)
        self.assertEqual(self.tunnel.releases, [4.0])
        self.tunnel.received()  # at 8 s
        self.advance(6)
        self.assertEqual(self.tunnel.releases, [4.0, 12.0])

    def test_gateway_does_not_ping_a_client_it_hears(self):
        """Hearing the client (its pings) every interval, the gateway never pings."""
        self.watch(is_gateway=True)
        for _ in range(30):
            self.advance(self.interval + self.sweep)  # the client's ping, a bit late
            self.tunnel.received()
        self.assertEqual(self.tunnel.pings, [])
        self.assertIsNone(self.tunnel.dropped)

    def test_gateway_pings_after_two_intervals_and_drops_after_three(self):
        """A client silent for more than two intervals gets one ping from the gateway;
        more than three, and it is dropped (within interval / 5)."""
        self.watch(is_gateway=True)
        self.advance(40)
        self.assertEqual(self.tunnel.pings, [22.0])
        self.assert_dropped_in_bound()

    def test_anything_received_restarts_the_count(self):
        """A frame received after 2.8 intervals of silence keeps the tunnel."""
        self.watch(is_gateway=True)
        self.advance(28)
        self.tunnel.received()
        self.advance(28)
        self.assertIsNone(self.tunnel.dropped)
        self.assertEqual(self.tunnel.pings, [22.0, 50.0])

    def test_one_timer_only_while_watching(self):
        """One timer for all the tunnels, none once the last is gone."""
        self.watch(is_gateway=True)
        others = [FakeTunnel(self.clock, self.liveness) for _ in range(99)]
        for other in others:
            self.liveness.add(other)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for other in others + [self.tunnel]:
            self.liveness.discard(other)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_drop_that_closes_another_dead_tunnel(self):
        """Two tunnels dropped in one sweep, the first one's drop closing the second at
        once: each is dropped once, and a third, still heard, stays watched."""
        self.watch(is_gateway=True)
        other, alive = FakeTunnel(self.clock, self.liveness), FakeTunnel(self.clock, self.liveness)
        self.liveness.add(other)
        self.liveness.add(alive)
        for tunnel, partner in ((self.tunnel, other), (other, self.tunnel)):
            def dropped(seconds, tunnel=tunnel, partner=partner):
                FakeTunnel.silence_timed_out(tunnel, seconds)
                self.liveness.discard(partner)
            tunnel.silence_timed_out = dropped
        for _ in range(DEAD_AFTER * SWEEPS_PER_INTERVAL + 1):
            self.advance(self.sweep)
            alive.received()
        self.assertEqual(len(self.tunnel.drops) + len(other.drops), 1)
        self.assertEqual(self.liveness.watched, {alive})
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.advance(DEAD_AFTER * self.interval + self.sweep)
        self.assertEqual(len(alive.drops), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sweep_leaves_the_quiet_middle_alone(self):
        """A sweep visits the tunnels heard since the last one and those reaching a
        step, not every tunnel: one silent three sweeps (past the buffer release,
        before any ping) is not looked at."""
        self.watch(is_gateway=True)
        self.advance(3 * self.sweep)
        self.assertEqual(self.liveness.silence(self.tunnel), 3)
        looked_at = []

        class Watched(FakeTunnel):
            def __getattribute__(self, name):
                looked_at.append(name)
                return object.__getattribute__(self, name)

        self.tunnel.__class__ = Watched
        self.advance(self.sweep)
        self.assertEqual(looked_at, [])
        self.assertEqual(self.liveness.silence(self.tunnel), 4)

    @given(st.lists(st.one_of(st.just(("sweep",)),
                              st.tuples(st.sampled_from(["heard", "add", "discard"]),
                                        st.integers(0, 4))),
                    max_size=120),
           st.booleans())
    def test_same_steps_as_counting_each_tunnel(self, operations, is_gateway):
        """The sets give every tunnel the pings, buffer releases and drop that a
        count of sweeps of silence per tunnel gives, sweep by sweep."""
        clock = Clock()
        liveness = Liveness(clock, self.interval, is_gateway)
        tunnels = [FakeTunnel(clock, liveness) for _ in range(5)]
        counts = {}  # the model: tunnel index -> sweeps of silence
        model_events = []
        for operation in operations:
            if operation[0] == "sweep":
                for i in sorted(counts):
                    silent = counts[i] = counts[i] + 1
                    if silent <= liveness.ping_after:
                        if silent == RELEASE_AFTER_SWEEPS:
                            model_events.append(("release", i, clock.seconds() + self.sweep))
                    elif silent > liveness.dead_after:
                        del counts[i]
                        model_events.append(("drop", i, clock.seconds() + self.sweep))
                    elif (silent - liveness.ping_after - 1) % SWEEPS_PER_INTERVAL == 0:
                        model_events.append(("ping", i, clock.seconds() + self.sweep))
                clock.advance(self.sweep)
                continue
            kind, i = operation
            tunnel = tunnels[i]
            if kind == "add":
                liveness.add(tunnel)
                counts[i] = 0
            elif kind == "discard":
                liveness.discard(tunnel)
                counts.pop(i, None)
            elif i in counts:
                tunnel.received()
                counts[i] = 0
            self.assertEqual(liveness.watched, {tunnels[i] for i in counts})
            self.assertEqual(bool(clock.getDelayedCalls()), bool(counts))
        events = sorted([("release", i, when) for i, t in enumerate(tunnels) for when in t.releases]
                        + [("ping", i, when) for i, t in enumerate(tunnels) for when in t.pings]
                        + [("drop", i, when) for i, t in enumerate(tunnels) for when in t.drops])
        self.assertEqual(events, sorted(model_events))
        for i, silent in counts.items():
            self.assertEqual(liveness.silence(tunnels[i]), silent)

    def test_reload_changes_the_interval_of_open_tunnels(self):
        """A new interval applies to the tunnels already watched, counted from then."""
        self.watch(is_gateway=False)
        self.advance(4)
        self.liveness.configure(5.0)
        self.advance(15, sweep=1.0)
        self.assertEqual(self.tunnel.pings, [10.0, 15.0])
        self.assertIsNone(self.tunnel.dropped)
        self.advance(2, sweep=1.0)
        self.assertEqual(self.tunnel.dropped, (20.0, 15.0))


@defer.inlineCallbacks
def wait_until(predicate, timeout=10.0):
    """Poll C{predicate} on the reactor until true; fail after C{timeout} seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached in %g s" % (timeout,))
        yield deferLater(reactor, 0.02, lambda: None)


class IdleTunnelTests(unittest.TestCase):
    """A real gateway and client in this process, on loopback, with a short ping interval."""

    interval = 0.25

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        gateway = yield self.deployment.start_gateway(gateway={"ping_interval": self.interval})
        self.gateway_liveness = gateway.tunnel_server.factory.liveness
        client = yield self.deployment.start_client(client={"ping_interval": self.interval})
        (factory,) = client.factories.values()
        self.client_liveness = factory.liveness
        (self.gateway_end,) = self.gateway_liveness.watched
        (self.client_end,) = self.client_liveness.watched
        self.pings = {"gateway": 0, "client": 0}
        for name, end in (("gateway", self.gateway_end), ("client", self.client_end)):
            end.sendPing = self.counting(name, end.sendPing)

    def counting(self, name, send_ping):
        def counted(*args, **kwargs):
            self.pings[name] += 1
            return send_ping(*args, **kwargs)
        return counted

    @defer.inlineCallbacks
    def test_idle_tunnel_pinged_by_the_client_only(self):
        """Over 8 intervals of an idle tunnel the client pings, the gateway does not,
        and the tunnel stays up."""
        yield deferLater(reactor, 8 * self.interval, lambda: None)
        self.assertGreaterEqual(self.pings["client"], 4)
        self.assertEqual(self.pings["gateway"], 0)
        self.assertEqual(self.gateway_liveness.watched, {self.gateway_end})
        self.assertEqual(len(self.deployment.gateway.tunnel_pool.tunnels()), 1)

    @defer.inlineCallbacks
    def test_silent_client_dropped(self):
        """A client that goes silent (stops pinging and reading) is pinged by the
        gateway, then dropped and unregistered."""
        self.client_liveness.discard(self.client_end)
        self.client_end.transport.pauseProducing()
        self.addCleanup(self.client_end.transport.resumeProducing)
        yield wait_until(lambda: not self.deployment.gateway.tunnel_pool.tunnels())
        self.assertEqual(self.gateway_end.state, self.gateway_end.STATE_CLOSED)
        self.assertGreaterEqual(self.pings["gateway"], 1)
        self.assertEqual(self.gateway_liveness.watched, frozenset())

    def record_sharing(self):
        """A list that gets, for each tunnel opened from now on, its attributes as they were
        before _share_unset_flags."""
        before_sharing = []
        share = _TunnelProtocol._share_unset_flags

        def recording(protocol):
            before_sharing.append(dict(vars(protocol)))
            share(protocol)

        self.patch(_TunnelProtocol, "_share_unset_flags", recording)
        return before_sharing

    def test_handshake_remnants_dropped(self):
        """Once open, neither end keeps the opening handshake's request, headers or
        response; Autobahn still sets them (else there is nothing to drop)."""
        for end in (self.gateway_end, self.client_end):
            for name in _TunnelProtocol._HANDSHAKE_REMNANTS:
                self.assertIsNone(getattr(end, name, None))
                self.assertNotIn(name, vars(end))
        before_sharing = self.record_sharing()
        from tests.test_tunnel_flood import open_gateway_protocol
        open_gateway_protocol(self)
        (opened,) = before_sharing
        for name in ("http_headers", "http_request_data", "http_response_data", "_wskey",
                     "_transport_details"):
            self.assertIn(name, opened)
            self.assertIsNone(opened[name])

    def test_unset_flags_shared(self):
        """
        An open tunnel's flags that are None or False, the values every tunnel
        has alike and its factory's options read the same from its class, and
        its dict holds the rest: 93 entries (3.3 KiB) on a gateway tunnel
        before, fewer than 22 after.  Assigning one is per tunnel.
        """
        from tests.test_tunnel_flood import open_gateway_protocol
        before_sharing = self.record_sharing()
        first, _ = open_gateway_protocol(self)
        second, _ = open_gateway_protocol(self)
        (before, _) = before_sharing
        self.assertGreater(len(before), 85)
        self.assertLess(len(vars(first)), 22)
        self.assertLess(sys.getsizeof(vars(first)), sys.getsizeof(before) / 3)
        for name, value in before.items():
            if value is None or value is False:
                self.assertIs(getattr(first, name), value)
        for name in _TunnelProtocol._OPTIONS & set(before):
            self.assertIs(getattr(first, name), getattr(first.factory, name))
            if name != "perMessageCompressionAccept":  # a function: kept per tunnel
                self.assertNotIn(name, vars(first))
        moved = next(name for name, value in before.items()
                     if value is False and name not in vars(first))
        setattr(first, moved, True)
        self.assertIs(getattr(second, moved), False)
        self.assertIs(getattr(self.gateway_end, moved), False)
        first.state = first.STATE_CLOSING
        self.assertEqual(second.state, second.STATE_OPEN)

    def test_options_of_a_reload_for_new_tunnels(self):
        """
        Options changed after tunnels opened (a reload) reach the tunnels opened
        after, as Autobahn's copy at connect does; open ones keep theirs.
        """
        from tests.test_tunnel_flood import Factory
        factory = Factory()

        def opened():
            from tests.test_tunnel_flood import upgrade_request
            from twisted.internet.testing import StringTransport
            from twisted.python import failure
            from twisted.internet import error
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(upgrade_request())
            self.addCleanup(protocol.connectionLost, failure.Failure(error.ConnectionDone()))
            self.assertEqual(protocol.state, protocol.STATE_OPEN)
            return protocol

        old = [opened(), opened()]
        factory.setProtocolOptions(maxMessagePayloadSize=1234)
        new = opened()
        self.assertEqual(new.maxMessagePayloadSize, 1234)
        self.assertNotIn("maxMessagePayloadSize", vars(new))
        for protocol in old:
            self.assertNotEqual(protocol.maxMessagePayloadSize, 1234)
        self.assertIs(type(new).options_base, type(old[0]).options_base)

    def test_send_queue_shared_until_used(self):
        """An open tunnel's empty send queue is shared; a queued write gets its own."""
        from tests.test_tunnel_flood import open_gateway_protocol
        from anyproxy.tunnel.websocket import _NO_SEND_QUEUE
        first, transport = open_gateway_protocol(self)
        second, _ = open_gateway_protocol(self)
        self.assertIs(first.send_queue, _NO_SEND_QUEUE)
        self.assertIs(second.send_queue, _NO_SEND_QUEUE)
        first.sendData(b"abc", sync=True)
        self.assertIsNot(first.send_queue, _NO_SEND_QUEUE)
        self.assertEqual(len(_NO_SEND_QUEUE), 0)
        self.assertEqual(transport.value(), b"abc")


class ReleaseBuffersTests(unittest.SynchronousTestCase):
    """
    OpenSSL frees an idle connection's read and write buffers
    (SSL_MODE_RELEASE_BUFFERS): measured on the gateway, 34 KiB per idle
    tunnel with it, 66 KiB without.  Twisted's CertificateOptions sets it;
    this checks that the contexts we make have it.
    """

    def setUp(self):
        self.deployment = Deployment(self)

    def mode(self, options, client):
        """The mode of a connection C{options} make (inherited from their context)."""
        factory = TLSMemoryBIOFactory(options, client,
                                      protocol.Factory.forProtocol(protocol.Protocol))
        tls = factory.buildProtocol(None)
        if client:
            connection = options.clientConnectionForTLS(tls)
        else:
            connection = options.serverConnectionForTLS(tls)
        # SSL_set_mode ORs the bits given in and returns the mode: 0 reads it.
        return openssl.SSL_set_mode(connection._ssl, 0)

    def test_gateway_connections(self):
        pki = self.deployment.pki
        options = server_tls_options(pki.cert_path, pki.key_path)
        self.assertTrue(self.mode(options, False) & SSL.MODE_RELEASE_BUFFERS)

    def test_client_connections(self):
        options = client_tls_options("localhost", self.deployment.pki.ca_path)
        self.assertTrue(self.mode(options, True) & SSL.MODE_RELEASE_BUFFERS)


class GatewayProtocolTests(unittest.SynchronousTestCase):
    """The gateway's tunnel protocol does not use Autobahn's per-tunnel ping timers."""

    def test_no_autobahn_auto_ping(self):
        from anyproxy.gateway.tunnel_server import TunnelServerFactory
        factory = TunnelServerFactory.for_credentials(None, "u", "p", Clock())
        self.assertIs(factory.protocol.options_base, GatewayTunnelProtocol)
        self.assertEqual((factory.autoPingInterval, factory.autoPingTimeout), (0, 0))
        self.assertEqual(factory.liveness.ping_after, 2 * SWEEPS_PER_INTERVAL)


class EmptyPingTests(unittest.SynchronousTestCase):
    """The idle tunnel's empty ping, answered without Autobahn's frame parser."""

    def setUp(self):
        from tests.test_tunnel_flood import open_gateway_protocol
        self.protocol, self.transport = open_gateway_protocol(self)
        self.received = []
        self.protocol.mux.message_parts_received = lambda parts: self.received.append(
            b"".join(parts))

    def autobahn_pong(self):
        """What Autobahn's own sendPong writes for an empty pong."""
        self.protocol.sendPong(b"")
        written = self.transport.value()
        self.transport.clear()
        return written

    def test_answered_as_autobahn_would(self):
        """An empty ping gets the empty pong Autobahn would send, at once and without
        Autobahn's frame parser, and the tunnel stays open."""
        parse = self.protocol._dataReceived
        self.protocol._dataReceived = lambda data: self.fail("parsed by Autobahn")
        self.protocol.dataReceived(b"\x89\x00")
        self.protocol._dataReceived = parse
        self.assertEqual(self.transport.value(), b"\x8a\x00")
        self.transport.clear()
        self.assertEqual(self.autobahn_pong(), b"\x8a\x00")
        self.assertEqual(self.protocol.state, self.protocol.STATE_OPEN)

    def test_ping_with_payload_answered_as_autobahn_would(self):
        """The client's pings carry a counter (for its RTT figure): pings of 1 to 125
        bytes get the same pong Autobahn would send, without its parser."""
        parse = self.protocol._dataReceived
        for payload in (b"\x00" * 7 + b"\x01", b"p" * 125):
            self.protocol._dataReceived = lambda data: self.fail("parsed by Autobahn")
            self.protocol.dataReceived(bytes((0x89, len(payload))) + payload)
            self.protocol._dataReceived = parse
            fast = self.transport.value()
            self.transport.clear()
            self.protocol.sendPong(payload)
            self.assertEqual(fast, self.transport.value())
            self.transport.clear()
        self.assertEqual(self.protocol.state, self.protocol.STATE_OPEN)

    def test_ping_among_frames(self):
        """A ping between binary frames of one read is answered the same way, and the
        frames after it are read by our reader, not Autobahn's parser."""
        from tests.support import binary_frame
        parse = self.protocol._dataReceived
        self.protocol._dataReceived = lambda data: self.fail("parsed by Autobahn")
        self.protocol.dataReceived(binary_frame(b"one") + b"\x89\x02hi" + binary_frame(b"two")
                                   + b"\x89\x00")
        self.protocol._dataReceived = parse
        self.assertEqual(self.received, [b"one", b"two"])
        self.assertEqual(self.transport.value(), b"\x8a\x02hi\x8a\x00")
        self.assertEqual(self.protocol.state, self.protocol.STATE_OPEN)

    def test_oversized_ping_left_to_autobahn(self):
        """A ping announcing 126 bytes (more than a control frame may carry) is not
        answered here: Autobahn's parser fails the connection."""
        self.protocol.dataReceived(struct.pack("!BBH", 0x89, 126, 126) + b"p" * 126)
        self.assertNotIn(b"\x8a", self.transport.value()[:1])
        self.assertNotEqual(self.protocol.state, self.protocol.STATE_OPEN)

    def test_inside_a_frame_is_data(self):
        """The ping's two bytes inside a frame's payload are payload, not a ping."""
        self.protocol.dataReceived(b"\x82\x04ab")  # a binary frame, 4 bytes, 2 so far
        self.protocol.dataReceived(b"\x89\x00")
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.received, [b"ab\x89\x00"])

    def test_after_a_partial_header_is_data(self):
        """After half a frame header, the same two bytes continue that frame."""
        self.protocol.dataReceived(b"\x82")
        # Read on: masked, 9 bytes long, the first byte of a zero mask.
        self.protocol.dataReceived(b"\x89\x00")
        self.assertEqual(self.transport.value(), b"")
        self.protocol.dataReceived(b"\x00\x00\x00" + b"123456789")
        self.assertEqual(self.received, [b"123456789"])

    def test_held_while_congested(self):
        """While the mux is paused the empty ping's pong waits, like any pong."""
        self.protocol.mux.pauseProducing()
        self.protocol.dataReceived(b"\x89\x00")
        self.assertEqual(self.transport.value(), b"")
        self.protocol.mux.resumeProducing()
        self.assertEqual(self.transport.value(), b"\x8a\x00")


class ReleaseIdleBuffersTests(unittest.SynchronousTestCase):
    """When a quiet tunnel gives back its TLS buffers (tls_transport.release_buffers)."""

    def setUp(self):
        from anyproxy.tunnel import websocket
        from tests.test_tunnel_flood import open_gateway_protocol
        self.protocol, self.transport = open_gateway_protocol(self)
        self.calls = []
        self.patch(websocket, "release_buffers", self.calls.append)

    def test_only_after_traffic(self):
        """Not for a tunnel that carried only its handshake and pings; once per
        RELEASE_AFTER_BYTES of stream data moved since the last release."""
        from anyproxy.tunnel.websocket import RELEASE_AFTER_BYTES
        self.protocol.release_idle_buffers()
        self.assertEqual(self.calls, [])
        self.protocol.mux.bytes_received += RELEASE_AFTER_BYTES // 2
        self.protocol.mux.bytes_sent += RELEASE_AFTER_BYTES // 2
        self.protocol.release_idle_buffers()
        self.protocol.release_idle_buffers()  # pings and pongs since: nothing grew
        self.assertEqual(self.calls, [self.transport])
        self.protocol.mux.bytes_sent += RELEASE_AFTER_BYTES
        self.protocol.release_idle_buffers()
        self.assertEqual(self.calls, [self.transport, self.transport])

    def test_handshake_buffers_one_turn_after_open(self):
        """What the handshake grew is given back on the reactor turn after the
        tunnel opens, outside its I/O, without waiting for traffic."""
        self.assertEqual(self.calls, [])
        self.protocol.factory.reactor.advance(0)
        self.assertEqual(self.calls, [self.transport])

    def test_handshake_buffers_not_after_close(self):
        """A tunnel lost before that turn leaves its TLS connection alone."""
        self.protocol.connectionLost(failure.Failure(error.ConnectionDone()))
        self.protocol.factory.reactor.advance(0)
        self.assertEqual(self.calls, [])

    def test_out_of_memory_closes(self):
        from anyproxy.tunnel import websocket

        def fail(transport):
            raise MemoryError()
        self.patch(websocket, "release_buffers", fail)
        self.protocol.mux.bytes_sent += websocket.RELEASE_AFTER_BYTES
        self.protocol.release_idle_buffers()
        self.assertNotEqual(self.protocol.state, self.protocol.STATE_OPEN)
        self.flushLoggedErrors()

    def test_freed_memory_counted_for_release(self):
        """A release that replaced the BIOs tells the gateway's ReleaseAfterBursts, which
        gives the freed pages back after a burst of them."""
        from anyproxy.tunnel import websocket
        freed = []
        self.patch(websocket, "release_buffers", lambda transport: True)
        self.protocol.factory.memory = type("Memory", (), {"buffers_freed": lambda _: freed.append(1)})()
        self.protocol.mux.bytes_sent += websocket.RELEASE_AFTER_BYTES
        self.protocol.release_idle_buffers()
        self.assertEqual(freed, [1])
