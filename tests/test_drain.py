"""
Tests for L{anyproxy.gateway.drain}: the drain's steps in order against
fakes on a L{Clock}, then a real gateway and client on loopback, and a real
C{twistd anyproxy-gateway} process sent SIGTERM during a download.
"""

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher, formatEvent
from twisted.protocols import policies
from twisted.trial import unittest
from twisted.web import server
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from anyproxy.errors import Reason
from anyproxy.gateway import drain
from anyproxy.gateway.tunnel_pool import Tunnel, TunnelPool
from tests.support import (
    PROXY_PASSWORD, PROXY_USER, BlobResource, Deployment, Echo, basic_token, blob, listen_tcp,
    recv_exactly, run_curl)
from tests.test_e2e_tcp import socks_connect
from tests.test_fleet_relay import Fleet
from tests.test_e2e_twistd import TwistdBase, port_open, wait_until

MB = 1024 * 1024


# -- fakes ----------------------------------------------------------------------

class FakeStream:
    """A stream that finishes when told; C{notify_closed} as L{anyproxy.tunnel.stream}'s."""

    def __init__(self):
        self.finished = False
        self._hooks = []

    def notify_closed(self, hook):
        if self.finished:
            hook(self)
        else:
            self._hooks.append(hook)

    def finish(self):
        self.finished = True
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook(self)


class FakeMux:
    """A tunnel's mux: its streams, GOAWAY and C{when_drained}, recorded in C{events}."""

    stream_count = 0
    crossing = False  # the round trip after our GOAWAY is not over (Mux.when_drained)

    def __init__(self, events, name):
        self.events = events
        self.name = name
        self.open = []
        self.go_away_sent = False
        self._drained = []

    @property
    def draining(self):
        return self.go_away_sent

    def streams(self):
        return [each for each in self.open if not each.finished]

    def go_away(self, reason):
        if not self.go_away_sent:  # as the real mux: only the first call sends
            self.events.append(("go_away", self.name, reason))
        self.go_away_sent = True
        self.check()

    def when_drained(self):
        d = defer.Deferred()
        self._drained.append(d)
        self.check()
        return d

    def check(self):
        if self.go_away_sent and not self.streams() and not self.crossing:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)


class FakeMetrics:
    opening = 0  # frontend streams being opened

    def __init__(self):
        self.frontend_streams = []

    def live_streams(self):
        return [each for each in self.frontend_streams if not each.finished]


class FakeGateway:
    """What a L{drain.Drain} uses of a gateway; each step recorded in C{events}."""

    def __init__(self, clock, in_fleet=False):
        self.events = []
        self.clock = clock
        self.tunnel_pool = TunnelPool(clock)
        self.metrics = FakeMetrics()
        self.in_fleet = in_fleet
        self.leaving = defer.Deferred()
        self.upstreams_kept = True

    def stop_keeping_upstreams(self):
        self.upstreams_kept = False

    def leave_fleet(self):
        self.events.append("leave_fleet")
        return self.leaving

    def stop_accepting(self):
        self.events.append("stop_accepting")
        return defer.succeed(None)

    def add_tunnel(self, name, streams=0):
        mux = FakeMux(self.events, name)
        mux.open = [FakeStream() for _ in range(streams)]
        tunnel = Tunnel(client_id=name, group="default", mux=mux,
                        close=lambda: self.events.append(("close", name)))
        self.tunnel_pool.add(tunnel)
        return tunnel


def drain_logs(testcase):
    """The drain's log lines, collected until the test ends."""
    lines = []

    def observe(event):
        if event.get("log_namespace") == drain.log.namespace:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


# -- the steps, on a clock ------------------------------------------------------

class DrainStepsTests(unittest.TestCase):
    """The drain's steps, their order and its three endings, against fakes."""

    def setUp(self):
        self.clock = task.Clock()
        self.logs = drain_logs(self)

    def start(self, gateway, timeout=30, delay=0.0):
        self.drain = drain.Drain(gateway, self.clock, timeout, delay=delay)
        return self.drain.start()

    def test_no_streams_ends_at_once(self):
        """With nothing open, the listeners close, idle tunnels are told and closed, and it ends."""
        gateway = FakeGateway(self.clock)
        gateway.add_tunnel("a")
        ended = self.start(gateway)
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)
        self.assertEqual(gateway.events, ["stop_accepting", ("go_away", "a", Reason.NO_TUNNEL)])
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(gateway.events[-1], ("close", "a"))
        self.assertEqual(self.logs[0], "drain started: 0 streams open on 1 client tunnels; they "
                                       "may finish within 30s (drain_timeout)")
        self.assertEqual(self.logs[1], "drain finished: every stream ended, after 0.0s")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_for_connections_arriving(self):
        """
        Once the listeners close, it waits (looking again every
        ARRIVING_POLL) while users' connections accepted before are in their
        handshake or opening a stream, and only then sends GOAWAY: they get
        their stream on a local tunnel, where the stop would reset them.
        """
        gateway = FakeGateway(self.clock)
        gateway.add_tunnel("a")
        in_handshake = [1]
        gateway.frontends = type("Frontends", (), {
            "connections_in_handshake": lambda _: in_handshake[0]})()
        ended = self.start(gateway)
        self.assertNoResult(ended)
        self.assertEqual(gateway.events, ["stop_accepting"])  # no GOAWAY yet: it needs a tunnel
        in_handshake[0] = 0
        gateway.metrics.opening = 1  # its request is in: the stream is being opened
        self.clock.advance(drain.ARRIVING_POLL)
        self.assertNoResult(ended)
        gateway.metrics.opening = 0
        self.clock.advance(drain.ARRIVING_POLL)
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)
        self.assertEqual(gateway.events[:2], ["stop_accepting", ("go_away", "a", Reason.NO_TUNNEL)])

    def test_connections_arriving_bounded_by_timeout(self):
        """A connection that never finishes its handshake does not hold the drain past
        drain_timeout."""
        gateway = FakeGateway(self.clock)
        gateway.frontends = type("Frontends", (), {"connections_in_handshake": lambda _: 1})()
        ended = self.start(gateway, timeout=3)
        self.clock.pump([drain.ARRIVING_POLL] * int(3 / drain.ARRIVING_POLL + 1))
        self.assertEqual(self.successResultOf(ended), drain.TIMED_OUT)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_for_tunnel_and_frontend_streams(self):
        """It ends only once the streams of local tunnels and those relayed out are done."""
        gateway = FakeGateway(self.clock)
        busy = gateway.add_tunnel("busy", streams=2)
        idle = gateway.add_tunnel("idle")
        relayed_out = FakeStream()
        gateway.metrics.frontend_streams.append(relayed_out)
        ended = self.start(gateway)
        self.assertIn("3 streams open on 2 client tunnels", self.logs[0])
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertIn(("close", "idle"), gateway.events)  # at once: it carried nothing
        self.assertNotIn(("close", "busy"), gateway.events)
        self.assertTrue(busy.draining and idle.draining)

        busy.mux.open[0].finish()
        relayed_out.finish()
        self.clock.advance(10)
        self.assertNoResult(ended)
        busy.mux.open[1].finish()
        busy.mux.check()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertIn(("close", "busy"), gateway.events)
        self.assertEqual(self.logs[-1], "drain finished: every stream ended, after 10.0s")

    def test_waits_for_opens_crossing_go_away(self):
        """
        A tunnel told GOAWAY holds the drain until its when_drained, which
        waits for the round trip behind any OPEN that crossed the GOAWAY: a
        stream that arrives that way is waited for like the others.
        """
        gateway = FakeGateway(self.clock)
        link = gateway.add_tunnel("peer-link")
        link.mux.crossing = True
        ended = self.start(gateway)
        self.clock.advance(1)
        self.assertNoResult(ended)
        crossed = FakeStream()
        link.mux.open.append(crossed)  # the OPEN that crossed arrives
        link.mux.crossing = False  # then the pong
        link.mux.check()
        self.clock.advance(0)
        self.assertNoResult(ended)
        crossed.finish()
        link.mux.check()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)

    def test_tunnel_draining_already_waited_for(self):
        """
        A tunnel sent GOAWAY before the drain began (the management API's
        client drain) is not told again, but its round trip is waited for
        and it is closed once drained, like the others.
        """
        gateway = FakeGateway(self.clock)
        tunnel = gateway.add_tunnel("drained-by-api")
        tunnel.mux.go_away(Reason.NO_TUNNEL)
        tunnel.mux.crossing = True
        ended = self.start(gateway)
        self.assertNoResult(ended)
        tunnel.mux.crossing = False
        tunnel.mux.check()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)
        self.assertEqual([event for event in gateway.events if event[0] == "go_away"],
                         [("go_away", "drained-by-api", Reason.NO_TUNNEL)])
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertIn(("close", "drained-by-api"), gateway.events)

    def test_stream_opened_meanwhile(self):
        """A stream opened while the first ones finished (an accepted connection) is waited for."""
        gateway = FakeGateway(self.clock)
        first = FakeStream()
        gateway.metrics.frontend_streams.append(first)
        ended = self.start(gateway)
        late = FakeStream()
        gateway.metrics.frontend_streams.append(late)
        first.finish()
        self.clock.advance(0)
        self.assertNoResult(ended)
        late.finish()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)

    def test_tunnel_joining_during_drain_is_told(self):
        """A tunnel whose HELLO completes during the drain gets GOAWAY at the next pass."""
        gateway = FakeGateway(self.clock)
        stream = FakeStream()
        gateway.metrics.frontend_streams.append(stream)
        self.start(gateway)
        late = gateway.add_tunnel("late")
        stream.finish()
        self.clock.advance(0)
        self.assertIn(("go_away", "late", Reason.NO_TUNNEL), gateway.events)
        self.assertTrue(late.draining)

    def test_cut_at_timeout(self):
        """Streams still open at drain_timeout are left to the stop, which resets them."""
        gateway = FakeGateway(self.clock)
        gateway.add_tunnel("busy", streams=1)
        ended = self.start(gateway, timeout=5)
        self.clock.advance(4.9)
        self.assertNoResult(ended)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(ended), drain.TIMED_OUT)
        self.assertEqual(self.logs[-1], "drain cut after the 5s drain_timeout (5.0s): 1 streams "
                                        "still open are reset")
        self.assertEqual(self.successResultOf(self.drain.when_ended()), drain.TIMED_OUT)

    def test_cut(self):
        """L{drain.Drain.cut} (a second signal) ends it at once."""
        gateway = FakeGateway(self.clock)
        gateway.add_tunnel("busy", streams=1)
        ended = self.start(gateway)
        self.clock.advance(1)
        self.drain.cut()
        self.assertEqual(self.successResultOf(ended), drain.CUT)
        self.assertIn("drain cut by a second signal (1.0s)", self.logs[-1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fleet_left_first(self):
        """In a fleet: deregister, keep serving FLEET_SETTLE seconds, then stop accepting."""
        gateway = FakeGateway(self.clock, in_fleet=True)
        gateway.add_tunnel("a")
        ended = self.start(gateway)
        self.assertEqual(gateway.events, ["leave_fleet"])
        self.clock.advance(1)  # the registry takes a while
        gateway.leaving.callback(None)
        self.clock.advance(drain.FLEET_SETTLE - 0.01)
        self.assertEqual(gateway.events, ["leave_fleet"])
        self.clock.advance(0.01)
        self.assertEqual(gateway.events[:3], ["leave_fleet", "stop_accepting",
                                              ("go_away", "a", Reason.NO_TUNNEL)])
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)

    def test_stuck_registry_bounded(self):
        """A registry that never answers holds the drain back LEAVE_TIMEOUT seconds at most."""
        gateway = FakeGateway(self.clock, in_fleet=True)
        ended = self.start(gateway)
        self.clock.advance(drain.LEAVE_TIMEOUT)
        self.assertEqual(gateway.events, ["leave_fleet"])
        self.clock.advance(drain.FLEET_SETTLE)
        self.assertEqual(gateway.events, ["leave_fleet", "stop_accepting"])
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)

    def test_cut_while_leaving(self):
        """Cut before the fleet is left: the listeners close, nothing more starts, no timer left."""
        gateway = FakeGateway(self.clock, in_fleet=True)
        ended = self.start(gateway)
        self.drain.cut()
        self.assertEqual(self.successResultOf(ended), drain.CUT)
        gateway.leaving.callback(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(gateway.events, ["leave_fleet", "stop_accepting"])

    def test_delay_keeps_accepting(self):
        """With drain_delay the listeners stay open that long, then the steps go on as before."""
        gateway = FakeGateway(self.clock)
        gateway.add_tunnel("a")
        ended = self.start(gateway, delay=4)
        self.assertEqual(self.logs[1], "drain: /ready answers 503; the proxy and tunnel listeners "
                                       "keep accepting for 4s (drain_delay) while balancers notice")
        self.clock.advance(3.99)
        self.assertEqual(gateway.events, [])
        self.assertNoResult(ended)
        self.clock.advance(0.01)
        self.assertEqual(gateway.events[:2],
                         ["stop_accepting", ("go_away", "a", Reason.NO_TUNNEL)])
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)

    def test_delay_and_fleet_settle_later_wins(self):
        """In a fleet the listeners close at the later of drain_delay and leaving + FLEET_SETTLE."""
        for delay, left_at, closes_at in [(4, 1, 4), (1.5, 1, 1 + drain.FLEET_SETTLE),
                                          (0, 0.5, 0.5 + drain.FLEET_SETTLE)]:
            clock = self.clock = task.Clock()
            gateway = FakeGateway(clock, in_fleet=True)
            self.start(gateway, delay=delay)
            self.assertEqual(gateway.events, ["leave_fleet"])  # at once, delay or not
            clock.advance(left_at)
            gateway.leaving.callback(None)
            clock.advance(closes_at - left_at - 0.01)
            self.assertEqual(gateway.events, ["leave_fleet"], delay)
            clock.advance(0.01)
            self.assertEqual(gateway.events, ["leave_fleet", "stop_accepting"], delay)

    def test_deadline_within_delay_closes_listeners(self):
        """A deadline reached during the delay (the API's shorter timeout) still closes them."""
        gateway = FakeGateway(self.clock)
        gateway.add_tunnel("a")
        ended = self.start(gateway, timeout=2, delay=5)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(ended), drain.TIMED_OUT)
        self.assertEqual(gateway.events, ["stop_accepting"])
        self.assertIsNotNone(self.drain.listeners_closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- a real gateway and client on loopback --------------------------------------

def socks_handshake_on(sock, host, port):
    """A SOCKS5 login (RFC 1929) and CONNECT on the connected C{sock}: (VER, REP) of the reply."""
    import socket
    import struct

    sock.sendall(b"\x05\x01\x02")
    assert recv_exactly(sock, 2) == b"\x05\x02"
    user, password = PROXY_USER.encode(), PROXY_PASSWORD.encode()
    sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
    assert recv_exactly(sock, 2) == b"\x01\x00"
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
    reply = recv_exactly(sock, 10)
    return reply[0], reply[1]


def round_trip(sock, payload):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def read_until_closed(sock):
    """What arrives until the connection ends (EOF or reset), and whether it was reset."""
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks), False
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), True


def refused(port):
    """A Deferred firing with whether a TCP connect to C{port} is refused."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    connecting = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))

    def connected(proto):
        proto.transport.abortConnection()
        return False

    return connecting.addCallbacks(connected,
                                   lambda failure: failure.check(error.ConnectionRefusedError)
                                   is not None)


class LoopbackDrainTests(unittest.TestCase):
    """A gateway in this process drains with a live SOCKS5 stream through a real client."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = drain_logs(self)
        self.deployment = Deployment(self)
        self.gateway = yield self.deployment.start_gateway(gateway={"drain_timeout": 30})
        self.client = yield self.deployment.start_client()
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    @defer.inlineCallbacks
    def open_echo(self):
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port)
        self.addCleanup(sock.close)
        self.assertEqual((yield deferToThread(round_trip, sock, b"before")), b"before")
        return sock

    @defer.inlineCallbacks
    def test_open_stream_completes(self):
        """An open stream goes on through the drain and its end ends the drain; users are refused."""
        sock = yield self.open_echo()
        [tunnel] = self.gateway.tunnel_pool.tunnels()
        ended = self.gateway.drain(30)
        self.assertTrue(tunnel.mux.go_away_sent)
        yield self.gateway.draining.listeners_closed
        deployment = self.deployment
        for port in (deployment.socks_port, deployment.http_port, deployment.gateway_port):
            self.assertTrue((yield refused(port)), port)
        self.assertEqual((yield deferToThread(round_trip, sock, b"during the drain")),
                         b"during the drain")
        self.assertNoResult(ended)
        sock.close()
        self.assertEqual((yield ended), drain.FINISHED)
        self.assertIn("drain started: 1 streams open on 1 client tunnels", self.logs[0])
        self.assertIn("drain finished: every stream ended", self.logs[-1])
        # The drained tunnel is closed, so its client would attach elsewhere.
        factory = list(self.client.factories.values())[0]
        yield wait_until(lambda: not factory.connected, timeout=5)
        yield self.gateway.stopService()

    @defer.inlineCallbacks
    def test_connection_in_handshake_served(self):
        """
        A user connection accepted before the listeners closed, whose SOCKS5
        handshake comes after (a balancer handed it over at the last moment),
        is served: the drain waits for it instead of ending, and the stop
        after it, resetting it.
        """
        import socket
        sock = yield deferToThread(socket.create_connection,
                                   ("127.0.0.1", self.deployment.socks_port), 5)
        self.addCleanup(sock.close)
        frontends = self.gateway.frontends
        yield wait_until(lambda: frontends.connections_in_handshake() == 1, timeout=5)
        ended = self.gateway.drain(30)
        yield self.gateway.draining.listeners_closed
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertNoResult(ended)
        answer = yield deferToThread(socks_handshake_on, sock, "127.0.0.1", self.echo_port)
        self.assertEqual(answer[1], 0)  # succeeded
        self.assertEqual((yield deferToThread(round_trip, sock, b"late")), b"late")
        sock.close()
        self.assertEqual((yield ended), drain.FINISHED)

    @defer.inlineCallbacks
    def test_reload_refused_while_draining(self):
        """
        A reload during the drain (one that would build the HTTP listener
        anew) is refused: nothing listens again on the closed addresses.
        """
        from anyproxy.twistd.reload import Reloader
        import yaml
        sock = yield self.open_echo()
        reloader = Reloader(self.gateway.config.path, "gateway", self.gateway,
                            self.gateway.config, reactor)
        ended = self.gateway.drain(30)
        yield self.gateway.draining.listeners_closed
        data = self.deployment.gateway_config(gateway={"drain_timeout": 30})
        data["proxy"]["http"]["options"] = {"realm": "another realm"}
        with open(self.gateway.config.path, "w") as f:
            yaml.safe_dump(data, f)
        self.assertFalse((yield reloader.reload()))
        for port in (self.deployment.socks_port, self.deployment.http_port):
            self.assertTrue((yield refused(port)), port)
        sock.close()
        self.assertEqual((yield ended), drain.FINISHED)

    @defer.inlineCallbacks
    def test_cut_at_timeout(self):
        """A stream open at drain_timeout is reset by the stop that follows."""
        sock = yield self.open_echo()
        clock = task.Clock()
        ended = self.gateway.drain(5, clock=clock)
        clock.advance(5)
        self.assertEqual(self.successResultOf(ended), drain.TIMED_OUT)
        reading = deferToThread(read_until_closed, sock)
        yield self.gateway.stopService()
        data, _ = yield reading
        self.assertEqual(data, b"")
        self.assertIn("drain cut after the 5s drain_timeout", self.logs[-1])

    @defer.inlineCallbacks
    def test_stop_service_drains(self):
        """stopService drains (drain_timeout > 0): it fires only once the open stream ends."""
        sock = yield self.open_echo()
        stopped = self.gateway.stopService()
        yield self.gateway.draining.listeners_closed
        self.assertNoResult(stopped)
        self.assertEqual((yield deferToThread(round_trip, sock, b"still")), b"still")
        sock.close()
        yield stopped
        self.assertEqual(self.gateway.draining.outcome, drain.FINISHED)
        self.assertFalse(self.gateway.running)

    @defer.inlineCallbacks
    def test_no_drain_when_zero(self):
        """drain_timeout 0 stops at once, resetting open streams, as before."""
        gateway = yield Deployment(self).start_gateway(gateway={"drain_timeout": 0})
        yield gateway.stopService()
        self.assertIsNone(gateway.draining)


class HeldResource(BlobResource):
    """L{BlobResource} whose C{GET /held} is answered only on L{release}."""

    def __init__(self):
        super().__init__()
        self.held = defer.Deferred()
        self._requests = []

    def render_GET(self, request):
        if request.path != b"/held":
            return super().render_GET(request)
        self._requests.append(request)
        if not self.held.called:
            self.held.callback(None)
        return server.NOT_DONE_YET

    def release(self):
        for request in self._requests:
            request.write(b"held answer\n")
            request.finish()


@defer.inlineCallbacks
def settle(clock, predicate, what, timeout=10):
    """
    Poll C{predicate} every 20 ms (real time, loopback I/O going on), running
    what the drain's C{clock} has due now (its next-turn calls) each time.
    """
    for _ in range(int(timeout / 0.02)):
        clock.advance(0)
        if predicate():
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("timed out waiting for " + what)


class KeptUpstreamMixin:
    """A target that knows its open connections, and GETs to it through an HTTP proxy (curl)."""

    def start_target(self):
        self.resource = HeldResource()
        # Its protocols: the target's connections open now.
        self.site = policies.WrappingFactory(server.Site(self.resource))
        self.web_port = listen_tcp(self, self.site).getHost().port

    def target_connections(self):
        """How many connections to the target are open."""
        return len(self.site.protocols)

    @defer.inlineCallbacks
    def get(self, http_port, path="/hello"):
        """One GET through the HTTP proxy on C{http_port}, a new connection: (status, body)."""
        out, err, code = yield run_curl(
            "-x", "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD, http_port),
            "-w", "\n%{http_code}", "http://127.0.0.1:%d%s" % (self.web_port, path))
        self.assertEqual(code, 0, err)
        body, _, status = out.rpartition(b"\n")
        return int(status), body


class KeptUpstreamDrainTests(KeptUpstreamMixin, unittest.TestCase):
    """
    The HTTP proxy's idle kept upstream connections (C{upstream_keepalive})
    do not hold a drain: they close as it starts, and none is kept during
    it; exchanges in flight still finish.  The drain runs on a clock of its
    own, so "promptly" means well before its deadline on that clock.
    """

    timeout = 60
    DELAY = 5  # gateway.drain_delay
    TIMEOUT = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = drain_logs(self)
        self.deployment = Deployment(self)
        # drain_timeout 0: the gateway's stop at cleanup does not drain again.
        self.gateway = yield self.deployment.start_gateway(
            gateway={"drain_timeout": 0, "drain_delay": self.DELAY})
        self.client = yield self.deployment.start_client()
        self.start_target()
        self.pool = self.gateway.frontends.records["http proxy"].factory.upstream_pool
        self.clock = task.Clock()

    def tunnel_streams(self):
        return sum(len(tunnel.mux.streams()) for tunnel in self.gateway.tunnel_pool.tunnels())

    @defer.inlineCallbacks
    def test_idle_closed_at_once_in_flight_completes(self):
        """
        With a request in flight and an idle kept upstream, the drain closes
        the idle one at its start and ends as soon as the one in flight is
        answered, which the user gets whole; its upstream is not kept.
        """
        held = self.get(self.deployment.http_port, "/held")
        yield self.resource.held
        self.assertEqual((yield self.get(self.deployment.http_port)),
                         (200, b"hello from the target\n"))
        self.assertEqual((len(self.pool), self.target_connections(), self.tunnel_streams()),
                         (1, 2, 2))
        ended = self.gateway.drain(self.TIMEOUT, clock=self.clock)
        self.assertEqual(len(self.pool), 0)
        yield settle(self.clock, lambda: self.target_connections() == 1
                     and self.tunnel_streams() == 1, "the idle upstream to close")
        self.clock.advance(self.DELAY)  # the listeners close; the wait for streams begins
        yield self.gateway.draining.listeners_closed
        self.assertNoResult(ended)  # the exchange in flight holds it
        self.resource.release()
        self.assertEqual((yield held), (200, b"held answer\n"))
        yield settle(self.clock, lambda: ended.called, "the drain to end")
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)
        self.assertEqual(self.clock.seconds(), self.DELAY)  # not TIMEOUT
        self.assertEqual((len(self.pool), self.tunnel_streams()), (0, 0))
        # The target hears the client's close a moment later.
        yield settle(self.clock, lambda: self.target_connections() == 0, "the target to see it")
        self.assertIn("drain finished: every stream ended", self.logs[-1])

    @defer.inlineCallbacks
    def test_none_kept_during_delay(self):
        """A request served during drain_delay leaves no kept upstream: the drain ends at once."""
        ended = self.gateway.drain(self.TIMEOUT, clock=self.clock)
        self.assertEqual((yield self.get(self.deployment.http_port)),
                         (200, b"hello from the target\n"))
        self.assertEqual(len(self.pool), 0)
        yield settle(self.clock, lambda: self.target_connections() == 0
                     and self.tunnel_streams() == 0, "the upstream to close")
        self.clock.advance(self.DELAY)
        yield settle(self.clock, lambda: ended.called, "the drain to end")
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)
        self.assertEqual(self.clock.seconds(), self.DELAY)


def client_muxes(service):
    """The muxes of the tunnels a client service holds now."""
    found = []
    endpoint = getattr(service, "ready_endpoint", None)
    tunnel = getattr(endpoint, "tunnel", None)
    if getattr(tunnel, "mux", None) is not None:
        found.append(tunnel.mux)
    for child in getattr(service, "services", ()):
        found.extend(client_muxes(child))
    return found


class ClientGoingAwayTests(KeptUpstreamMixin, unittest.TestCase):
    """A client's GOAWAY on its tunnel: the gateway lets go of the idle upstreams kept there."""

    timeout = 30

    @defer.inlineCallbacks
    def test_idle_kept_upstream_closed(self):
        self.deployment = Deployment(self)
        gateway = yield self.deployment.start_gateway()
        client = yield self.deployment.start_client()
        self.start_target()
        pool = gateway.frontends.records["http proxy"].factory.upstream_pool
        self.assertEqual((yield self.get(self.deployment.http_port)),
                         (200, b"hello from the target\n"))
        self.assertEqual((len(pool), self.target_connections()), (1, 1))
        [mux] = client_muxes(client)
        mux.go_away()  # what a client stopping or moving away sends first
        for _ in range(250):
            if not len(pool) and not self.target_connections():
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual((len(pool), self.target_connections()), (0, 0))


class RelayedKeptUpstreamDrainTests(KeptUpstreamMixin, unittest.TestCase):
    """
    Gateway A's HTTP proxy keeps an idle upstream relayed to gateway B (the
    group's client is on B): whichever of them drains, that stream closes
    on both, and the drain does not wait for it.
    """

    timeout = 60
    TIMEOUT = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.fleet = Fleet(self, "a", "b")
        self.a, self.b = yield self.fleet.start()
        yield self.b.start_client()
        yield self.fleet.listed(self.a, "default", self.b)
        self.start_target()
        self.pool = self.a.gateway.frontends.records["http proxy"].factory.upstream_pool
        self.clock = task.Clock()
        self.assertEqual((yield self.get(self.a.http_port)), (200, b"hello from the target\n"))
        self.assertEqual((len(self.pool), self.relayed_streams()), (1, 1))

    def relayed_streams(self):
        """The streams B relays for A (on the links A dialed to B)."""
        return sum(link.mux.stream_count for link in self.b.node.server.factory.links)

    @defer.inlineCallbacks
    def drained_promptly(self, deployment, first=None):
        """
        Drain C{deployment}'s gateway: it ends as soon as its listeners
        close.  C{first}, a predicate, is waited for before they do.
        """
        ended = deployment.gateway.drain(self.TIMEOUT, clock=self.clock)
        if first is not None:
            yield settle(self.clock, first, "the kept upstream to close")
        self.clock.advance(drain.FLEET_SETTLE)  # it left the fleet at once (in memory)
        yield settle(self.clock, lambda: ended.called, "the drain to end")
        self.assertEqual(self.successResultOf(ended), drain.FINISHED)
        self.assertEqual(self.clock.seconds(), drain.FLEET_SETTLE)  # not TIMEOUT

    @defer.inlineCallbacks
    def test_relaying_gateway_drains(self):
        """B drains: its GOAWAY on A's link makes A close the idle upstream kept there."""
        yield self.drained_promptly(self.b)
        self.assertEqual((len(self.pool), self.relayed_streams()), (0, 0))
        yield settle(self.clock, lambda: self.target_connections() == 0, "the target's close")

    @defer.inlineCallbacks
    def test_keeping_gateway_drains(self):
        """A drains: it closes its idle upstream at once, and so the stream B relays for it."""
        yield self.drained_promptly(self.a, first=lambda: self.relayed_streams() == 0)
        self.assertEqual(len(self.pool), 0)
        yield settle(self.clock, lambda: self.target_connections() == 0, "the target's close")


class ReadinessTests(unittest.TestCase):
    """
    C{GET /ready} on the metrics and status listeners, without their logins:
    200, then 503 from a drain's first moment while the proxy and tunnel
    listeners still accept for C{drain_delay}, then those close.
    """

    timeout = 60
    DELAY = 10

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        self.gateway = yield self.deployment.start_gateway(gateway={
            "drain_timeout": 30, "drain_delay": self.DELAY,
            "metrics_addr": "127.0.0.1:0", "metrics_username": "scraper",
            "metrics_password": "metrics-pw", "status_addr": "127.0.0.1:0",
            "status_username": "ops", "status_password": "status-pw"})
        # Run before the gateway's stop, which would otherwise drain for DELAY seconds.
        self.addCleanup(self.cut_drain)
        yield self.deployment.start_client()
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    def cut_drain(self):
        """A drain (on a clock of its own, if none has begun) cut at once."""
        self.gateway.drain(30, clock=task.Clock())
        self.gateway.cut_drain()

    @defer.inlineCallbacks
    def get(self, listener, path, method=b"GET", login=None):
        """C{(status, body)} of one request to the gateway's listener C{listener}."""
        port = self.gateway.listeners[listener].port.getHost().port
        headers = Headers()
        if login is not None:
            headers.addRawHeader(b"authorization", b"Basic " + basic_token(*login).encode())
        response = yield Agent(reactor).request(
            method, b"http://127.0.0.1:%d%s" % (port, path), headers)
        body = yield readBody(response)
        return response.code, body

    @defer.inlineCallbacks
    def answers(self, path=b"/ready", method=b"GET"):
        """C{{listener: (status, body)}} of both operator listeners, without a login."""
        found = {}
        for listener in ("metrics", "status page"):
            found[listener] = yield self.get(listener, path, method)
        return found

    @defer.inlineCallbacks
    def echo_served(self):
        """A new SOCKS5 connection through the gateway carries an echo."""
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port)
        try:
            return (yield deferToThread(round_trip, sock, b"served")) == b"served"
        finally:
            sock.close()

    @defer.inlineCallbacks
    def test_ready_without_login(self):
        """A running gateway answers 200 "ready" to anyone; the other pages still want the login."""
        self.assertTrue(self.gateway.ready)
        ready = (200, b"ready\n")
        self.assertEqual((yield self.answers()), {"metrics": ready, "status page": ready})
        self.assertEqual((yield self.answers(method=b"HEAD")),
                         {"metrics": (200, b""), "status page": (200, b"")})
        self.assertEqual((yield self.get("metrics", b"/metrics"))[0], 401)
        self.assertEqual((yield self.get("status page", b"/api/status"))[0], 401)
        # Only /ready itself: a path below it goes through the login.
        self.assertEqual((yield self.get("metrics", b"/ready/more"))[0], 401)
        code, body = yield self.get("metrics", b"/metrics", login=("scraper", "metrics-pw"))
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_draining_not_ready_while_accepting(self):
        """
        From the drain's start /ready answers 503 "draining"; new users are
        still served until drain_delay has passed, then the listeners close
        (and /ready stays 503 on the pages that stay up).
        """
        clock = task.Clock()
        self.gateway.drain(30, clock=clock)
        self.assertFalse(self.gateway.ready)
        draining = (503, b"draining\n")
        self.assertEqual((yield self.answers()), {"metrics": draining, "status page": draining})
        self.assertTrue((yield self.echo_served()))
        clock.advance(self.DELAY - 0.1)
        self.assertIsNone(self.gateway.draining.listeners_closed)
        self.assertTrue((yield self.echo_served()))
        for port in (self.deployment.socks_port, self.deployment.http_port,
                     self.deployment.gateway_port):
            self.assertFalse((yield refused(port)), port)
        clock.advance(0.1)
        yield self.gateway.draining.listeners_closed
        for port in (self.deployment.socks_port, self.deployment.http_port,
                     self.deployment.gateway_port):
            self.assertTrue((yield refused(port)), port)
        self.assertEqual((yield self.answers()), {"metrics": draining, "status page": draining})

    @defer.inlineCallbacks
    def test_stopped_not_ready(self):
        """Without a drain (drain_timeout 0) the gateway is not ready once it stops."""
        gateway = yield Deployment(self).start_gateway(gateway={"drain_timeout": 0})
        self.assertTrue(gateway.ready)
        yield gateway.stopService()
        self.assertFalse(gateway.ready)


class FleetHookTests(unittest.TestCase):
    """The gateway leaves its fleet through the registry's stop(); a no-op without one."""

    @defer.inlineCallbacks
    def test_leave_fleet(self):
        """With a fleet node, leave_fleet stops its registry; without one it does nothing."""
        gateway = yield Deployment(self).start_gateway(gateway={"drain_timeout": 0})
        self.assertFalse(gateway.in_fleet)
        self.assertIsNone(self.successResultOf(gateway.leave_fleet()))
        stops = []

        class Registry:
            def stop(self):
                stops.append("stop")
                return defer.succeed(None)

        class Node:
            registry = Registry()

        gateway.fleet = Node()
        self.addCleanup(setattr, gateway, "fleet", None)
        self.assertTrue(gateway.in_fleet)
        self.successResultOf(gateway.leave_fleet())
        self.assertEqual(stops, ["stop"])


# -- a real twistd process --------------------------------------------------------

class NoticedBlob(BlobResource):
    """L{BlobResource} that fires C{requested} at its first blob request."""

    def __init__(self):
        super().__init__()
        self.requested = defer.Deferred()

    def render_GET(self, request):
        if request.path.startswith(b"/blob/") and not self.requested.called:
            self.requested.callback(None)
        return super().render_GET(request)


class TwistdDrainTests(TwistdBase):
    """SIGTERM to a real twistd gateway drains it."""

    timeout = 120

    @defer.inlineCallbacks
    def start(self):
        gateway = self.start_gateway()
        self.start_client()
        yield wait_until(lambda: port_open(self.ports["socks"]))
        # Through SOCKS5: the HTTP proxy would keep an idle upstream stream.
        # Bounded in time (each try may take curl's 5 s).
        deadline = reactor.seconds() + 30
        while not (yield self.served("socks")):
            self.assertLess(reactor.seconds(), deadline, "not served: " + gateway.text())
            yield task.deferLater(reactor, 0.1, lambda: None)
        return gateway

    @defer.inlineCallbacks
    def test_sigterm_during_download(self):
        """A download through SOCKS5 in progress at SIGTERM completes intact; the process exits."""
        site = NoticedBlob()
        target = listen_tcp(self, server.Site(site)).getHost().port
        gateway = yield self.start()
        size = 16 * MB
        # curl reads at 2 MB/s (8 s in all), so SIGTERM lands mid-transfer even
        # on a loaded machine, where the gateway may take seconds to log it.
        download = run_curl("--socks5-hostname", "user:proxy-pw@127.0.0.1:%d" % self.ports["socks"],
                            "--limit-rate", "2M", "http://127.0.0.1:%d/blob/%d" % (target, size))
        yield site.requested.addTimeout(20, reactor)
        gateway.transport.signalProcess("TERM")
        yield wait_until(lambda: "drain started: 1 streams open" in gateway.text(), 10)
        self.assertFalse(download.called)
        yield wait_until(lambda: not port_open(self.ports["socks"]), 5)
        out, err, code = yield download
        self.assertEqual(code, 0, err)
        self.assertTrue(out == blob(size), "the download differs from the original")
        yield gateway.ended
        self.assertIn("drain finished: every stream ended", gateway.text())

    @defer.inlineCallbacks
    def test_second_signal_stops_at_once(self):
        """A second SIGTERM during a drain that would last 30 s stops the process at once."""
        gateway = yield self.start()
        sock = yield deferToThread(socks_connect, self.ports["socks"], "127.0.0.1", self.echo,
                                   username="user", password="proxy-pw")
        self.addCleanup(sock.close)
        self.assertEqual((yield deferToThread(round_trip, sock, b"hold")), b"hold")
        gateway.transport.signalProcess("TERM")
        yield wait_until(lambda: "drain started: 1 streams open" in gateway.text(), 10)
        gateway.transport.signalProcess("TERM")
        yield wait_until(lambda: gateway.ended.called, 10)
        self.assertIn("SIGTERM during the drain: stopping now", gateway.text())
        self.assertIn("drain cut by a second signal", gateway.text())
