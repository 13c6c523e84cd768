# -*- test-case-name: tests.test_endpoint -*-
"""
Tests for L{anyproxy.tunnel.endpoint}: a L{TunnelEndpoint} over a real gateway
L{Mux} wired back to back with a client L{Mux}, on a L{Clock}.
"""

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from anyproxy.connect_protocol import OneProtocolFactory, connect_protocol
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.tunnel.endpoint import DEFAULT_OPEN_TIMEOUT, TunnelEndpoint
from anyproxy.gateway.tunnel_pool import Tunnel, TunnelPool
from anyproxy.tunnel import frames
from anyproxy.tunnel.mux import Mux, Stream, TunnelAddress


# -- fakes ----------------------------------------------------------------------

class Recorder(Protocol):
    """A protocol that records the bytes it receives and how it was lost."""

    def __init__(self):
        self.chunks = []
        self.lost = []

    @property
    def received(self):
        return b"".join(self.chunks)

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.lost.append(reason)


class RecordingFactory(Factory):
    """Builds L{Recorder}s (or nothing) and records the addresses it was given."""

    def __init__(self, build=True):
        self.build = build
        self.addresses = []
        self.built = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        if not self.build:
            return None
        protocol = Recorder()
        self.built.append(protocol)
        return protocol


class MuxPair:
    """
    A gateway mux and a client mux joined back to back through queues, so a
    test decides when messages move.  Open requests reaching the client are
    kept in C{requests}.
    """

    def __init__(self, clock=None):
        self.to_client = []
        self.to_gateway = []
        self.sent_by_gateway = []
        self.requests = []
        self.gateway = Mux(self._gateway_sends, initiator=False, name="tunnel-1", clock=clock)
        self.client = Mux(self._client_sends, initiator=True,
                          on_open_request=self.requests.append, name="client", clock=clock)

    def _gateway_sends(self, message):
        self.sent_by_gateway.append(frames.decode(message))
        self.to_client.append(message)

    def _client_sends(self, message):
        self.to_gateway.append(message)

    def pump(self):
        """Deliver queued messages both ways until both queues are empty."""
        while self.to_client or self.to_gateway:
            if self.to_client:
                self.client.message_received(self.to_client.pop(0))
            if self.to_gateway:
                self.gateway.message_received(self.to_gateway.pop(0))


def tunnel_for(pair, group="default"):
    """A L{Tunnel} of C{group} over the gateway side of C{pair}."""
    return Tunnel(client_id="client-1", group=group, mux=pair.gateway)


def setup(with_tunnel=True, **kwargs):
    """A clock, a mux pair, a registry (holding a tunnel) and an endpoint to target.example:443."""
    clock = Clock()
    pair = MuxPair()
    registry = TunnelPool(clock)
    if with_tunnel:
        registry.add(tunnel_for(pair))
    endpoint = TunnelEndpoint(registry, clock, "default", "target.example", 443, **kwargs)
    return clock, pair, registry, endpoint


# -- tests ----------------------------------------------------------------------

class ConnectTests(SynchronousTestCase):
    """connect() opens a stream through a tunnel and runs the factory's protocol over it."""

    def test_interface(self):
        """A L{TunnelEndpoint} is an C{IStreamClientEndpoint}."""
        _, _, _, endpoint = setup()
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))

    def test_open_sent(self):
        """connect() sends OPEN for the endpoint's kind, host and port on the tunnel's mux."""
        _, pair, _, endpoint = setup()
        d = endpoint.connect(RecordingFactory())
        self.assertNoResult(d)
        self.assertEqual(len(pair.sent_by_gateway), 1)
        sent = pair.sent_by_gateway[0]
        self.assertIsInstance(sent, frames.Open)
        self.assertEqual((sent.kind, sent.host, sent.port), ("tcp", "target.example", 443))
        pair.pump()
        self.assertEqual([(r.kind, r.host, r.port) for r in pair.requests],
                         [("tcp", "target.example", 443)])

    def test_kind(self):
        """The endpoint's kind is what the OPEN asks for."""
        _, pair, _, endpoint = setup(kind="udp")
        endpoint.connect(RecordingFactory())
        pair.pump()
        self.assertEqual(pair.requests[0].kind, "udp")

    def test_connected(self):
        """On OPEN_OK the factory's protocol is attached to the stream and returned."""
        _, pair, _, endpoint = setup()
        factory = RecordingFactory()
        d = endpoint.connect(factory)
        pair.pump()
        self.assertNoResult(d)
        pair.requests[0].accept(Recorder())
        pair.pump()
        protocol = self.successResultOf(d)
        self.assertEqual(factory.built, [protocol])
        self.assertIsInstance(protocol.transport, Stream)
        self.assertEqual(factory.addresses, [TunnelAddress("target.example", 443, "tunnel-1")])

    def test_bytes_flow(self):
        """Bytes written by the connected protocol reach the client side and back."""
        _, pair, _, endpoint = setup()
        d = endpoint.connect(RecordingFactory())
        pair.pump()
        far = Recorder()
        pair.requests[0].accept(far)
        pair.pump()
        near = self.successResultOf(d)
        near.transport.write(b"hello, target")
        pair.pump()
        far.transport.write(b"hello, user")
        pair.pump()
        self.assertEqual(far.received, b"hello, target")
        self.assertEqual(near.received, b"hello, user")

    def test_early_data(self):
        """Data the client sends right after accepting reaches the protocol once attached."""
        _, pair, _, endpoint = setup()
        d = endpoint.connect(RecordingFactory())
        pair.pump()
        far = Recorder()
        pair.requests[0].accept(far)
        far.transport.write(b"banner\r\n")
        pair.pump()
        self.assertEqual(self.successResultOf(d).received, b"banner\r\n")

    def test_no_timer_left(self):
        """Once connected, no open timer stays scheduled."""
        clock, pair, _, endpoint = setup()
        d = endpoint.connect(RecordingFactory())
        pair.pump()
        pair.requests[0].accept(Recorder())
        pair.pump()
        protocol = self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(DEFAULT_OPEN_TIMEOUT * 2)
        self.assertEqual(protocol.lost, [])

    def test_waits_for_tunnel(self):
        """With no tunnel yet, connect() waits and opens on one added within C{wait}."""
        clock, pair, registry, endpoint = setup(with_tunnel=False, wait=3.0)
        d = endpoint.connect(RecordingFactory())
        clock.advance(2)
        self.assertEqual(pair.sent_by_gateway, [])
        registry.add(tunnel_for(pair))
        self.assertEqual(len(pair.sent_by_gateway), 1)
        pair.pump()
        pair.requests[0].accept(Recorder())
        pair.pump()
        self.assertIsInstance(self.successResultOf(d), Recorder)

    def test_group(self):
        """Only a tunnel of the endpoint's group is used."""
        clock = Clock()
        red, blue = MuxPair(), MuxPair()
        registry = TunnelPool(clock)
        registry.add(tunnel_for(red, group="red"))
        registry.add(tunnel_for(blue, group="blue"))
        endpoint = TunnelEndpoint(registry, clock, "blue", "target.example", 443)
        endpoint.connect(RecordingFactory())
        self.assertEqual(red.sent_by_gateway, [])
        self.assertEqual(len(blue.sent_by_gateway), 1)

    def test_open_stream(self):
        """open_stream() fires with the accepted stream, with no protocol attached."""
        _, pair, _, endpoint = setup()
        d = endpoint.open_stream()
        pair.pump()
        pair.requests[0].accept(Recorder())
        pair.pump()
        stream = self.successResultOf(d)
        self.assertIsInstance(stream, Stream)
        self.assertIsNone(stream.protocol)


class FailureTests(SynchronousTestCase):
    """Every way an open fails ends in a L{StreamOpenError} with the right reason."""

    def test_open_error(self):
        """The reason in OPEN_ERROR is the reason of the failure."""
        for reason in (Reason.CONNECTION_REFUSED, Reason.NOT_ALLOWED, Reason.TIMED_OUT,
                       Reason.NAME_NOT_RESOLVED, Reason.OVERLOADED):
            clock, pair, _, endpoint = setup()
            d = endpoint.connect(RecordingFactory())
            pair.pump()
            pair.requests[0].reject(reason, "no")
            pair.pump()
            self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason, reason)
            self.assertEqual(pair.gateway.stream_count, 0)
            self.assertEqual(clock.getDelayedCalls(), [])

    def test_open_error_builds_nothing(self):
        """A refused open never builds a protocol."""
        _, pair, _, endpoint = setup()
        factory = RecordingFactory()
        d = endpoint.connect(factory)
        pair.pump()
        pair.requests[0].reject(Reason.CONNECTION_REFUSED)
        pair.pump()
        self.failureResultOf(d, StreamOpenError)
        self.assertEqual(factory.addresses, [])

    def test_no_tunnel(self):
        """With no tunnel in the group, connect() fails NO_TUNNEL after C{wait} seconds."""
        clock, pair, _, endpoint = setup(with_tunnel=False, wait=3.0)
        d = endpoint.connect(RecordingFactory())
        clock.advance(2.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason, Reason.NO_TUNNEL)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(pair.sent_by_gateway, [])

    def test_no_wait(self):
        """With C{wait=0} and no tunnel, connect() fails NO_TUNNEL at once."""
        _, _, _, endpoint = setup(with_tunnel=False, wait=0)
        d = endpoint.connect(RecordingFactory())
        self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason, Reason.NO_TUNNEL)

    def test_open_timeout(self):
        """A client that never answers OPEN: TIMED_OUT after open_timeout, and the stream is reset."""
        clock, pair, _, endpoint = setup(open_timeout=20.0)
        d = endpoint.connect(RecordingFactory())
        pair.pump()
        clock.advance(19.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason, Reason.TIMED_OUT)
        self.assertIsInstance(pair.sent_by_gateway[-1], frames.Reset)
        self.assertEqual(pair.gateway.stream_count, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout_reaches_client(self):
        """After an open timeout the client's pending request is closed and its cancel hook runs."""
        clock, pair, _, endpoint = setup(open_timeout=20.0)
        d = endpoint.connect(RecordingFactory())
        pair.pump()
        request = pair.requests[0]
        cancelled = []
        request.set_cancel_hook(lambda: cancelled.append(True))
        clock.advance(20)
        self.failureResultOf(d, StreamOpenError)
        pair.pump()
        self.assertTrue(request.closed)
        self.assertEqual(cancelled, [True])

    def test_late_answer_after_timeout(self):
        """An OPEN_OK arriving after the timeout builds no protocol."""
        clock, pair, _, endpoint = setup(open_timeout=20.0)
        factory = RecordingFactory()
        d = endpoint.connect(factory)
        pair.pump()
        request = pair.requests[0]
        clock.advance(20)
        self.failureResultOf(d, StreamOpenError)
        request.accept(Recorder())
        pair.pump()
        self.assertEqual(factory.addresses, [])

    def test_factory_returns_none(self):
        """A factory that builds no protocol: the stream is reset and connect() fails GENERAL_FAILURE."""
        clock, pair, _, endpoint = setup()
        d = endpoint.connect(RecordingFactory(build=False))
        pair.pump()
        far = Recorder()
        pair.requests[0].accept(far)
        pair.pump()
        exc = self.failureResultOf(d, StreamOpenError).value
        self.assertEqual(exc.reason, Reason.GENERAL_FAILURE)
        reset = pair.sent_by_gateway[-1]
        self.assertIsInstance(reset, frames.Reset)
        self.assertEqual(reset.reason, Reason.GENERAL_FAILURE)
        self.assertEqual(pair.gateway.stream_count, 0)
        self.assertEqual(len(far.lost), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_pending_open(self):
        """Cancelling connect() while OPEN is unanswered resets the stream."""
        clock, pair, _, endpoint = setup()
        factory = RecordingFactory()
        d = endpoint.connect(factory)
        pair.pump()
        request = pair.requests[0]
        cancelled = []
        request.set_cancel_hook(lambda: cancelled.append(True))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertIsInstance(pair.sent_by_gateway[-1], frames.Reset)
        self.assertEqual(pair.gateway.stream_count, 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        pair.pump()
        self.assertTrue(request.closed)
        self.assertEqual(cancelled, [True])
        self.assertEqual(factory.addresses, [])

    def test_cancel_while_waiting_for_tunnel(self):
        """Cancelling connect() while waiting for a tunnel leaves no timer and opens nothing later."""
        clock, pair, registry, endpoint = setup(with_tunnel=False)
        d = endpoint.connect(RecordingFactory())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
        registry.add(tunnel_for(pair))
        self.assertEqual(pair.sent_by_gateway, [])

    def test_tunnel_lost_while_opening(self):
        """A tunnel lost while OPEN is unanswered fails connect() with NO_TUNNEL."""
        clock, pair, _, endpoint = setup()
        d = endpoint.connect(RecordingFactory())
        pair.pump()
        pair.gateway.connection_lost()
        self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason, Reason.NO_TUNNEL)
        self.assertEqual(clock.getDelayedCalls(), [])


class ConnectProtocolTests(SynchronousTestCase):
    """L{connect_protocol} connects one given protocol instance, as connectProtocol does."""

    def test_through_tunnel_endpoint(self):
        """The stream is connected to that very protocol, and the Deferred fires with it."""
        _, pair, _, endpoint = setup()
        protocol = Protocol()
        d = connect_protocol(endpoint, protocol)
        pair.pump()
        pair.requests[0].accept(Protocol())
        pair.pump()
        self.assertIs(self.successResultOf(d), protocol)
        self.assertIsInstance(protocol.transport, Stream)

    def test_one_class(self):
        """Every call uses the same factory class (none is defined per call)."""
        factories = []

        class Recording:
            def connect(self, factory):
                factories.append(factory)
                return defer.succeed(factory.buildProtocol(None))

        first, second = Protocol(), Protocol()
        self.assertIs(self.successResultOf(connect_protocol(Recording(), first)), first)
        self.assertIs(self.successResultOf(connect_protocol(Recording(), second)), second)
        self.assertIs(type(factories[0]), type(factories[1]))
        self.assertIs(type(factories[0]), OneProtocolFactory)
