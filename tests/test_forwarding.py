# -*- test-case-name: tests.test_forwarding -*-
"""
Tests for L{anyproxy.gateway.port_forwarding.forwarder} and L{anyproxy.gateway.port_forwarding.udp}:
which ports are opened or refused, release when the client goes, and the
TCP and UDP forwarding logic, all against fakes on a L{Clock}.
"""

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.errors import Reason, StreamOpenError
from anyproxy.gateway.port_forwarding import udp as forwarding_udp
from anyproxy.gateway.client_access import ClientGrant
from anyproxy.gateway.port_forwarding.forwarder import EARLY_READ, PortForwarding
from anyproxy.gateway.tunnel_pool import Tunnel
from anyproxy.gateway.tunnel_server import TunnelServerFactory
from anyproxy.tunnel import frames
from anyproxy.tunnel.endpoint import DEFAULT_OPEN_TIMEOUT
from anyproxy.tunnel.stream import DEFAULT_WINDOW
from tests.test_mux import SMALL_WINDOW, HalfCloseRecorder, MuxPair, Recorder
from tests.test_splice import HalfCloseTransport


# -- fakes ----------------------------------------------------------------------

class FakePort:
    """A listening port that records whether it was stopped."""

    def __init__(self, port, owner, interface):
        self.port = port
        self.owner = owner
        self.interface = interface
        self.stopped = False

    def stopListening(self):
        self.stopped = True
        return defer.succeed(None)


class FakeReactor(Clock):
    """A clock whose listenTCP/listenUDP record, and fail for the ports in C{busy}."""

    def __init__(self, busy=()):
        super().__init__()
        self.busy = set(busy)
        self.listening = []

    def _listen(self, kind, port, owner, interface):
        if port in self.busy:
            raise error.CannotListenError(interface, port, OSError(98, "Address already in use"))
        result = FakePort(port, owner, interface)
        self.listening.append((kind, result))
        return result

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._listen("tcp", port, factory, interface)

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        protocol.transport = FakeUdpTransport()
        return self._listen("udp", port, protocol, interface)

    def open_ports(self):
        return sorted((port.port, kind) for kind, port in self.listening if not port.stopped)


class FakeUdpTransport:
    """The forwarded UDP port's socket: records what is sent to users."""

    def __init__(self):
        self.sent = []

    def write(self, payload, address):
        self.sent.append((payload, address))


class FakeStream:
    """A tunnel stream: records datagrams and writes, closes like the real one."""

    def __init__(self, kind, host, port):
        self.kind, self.host, self.port = kind, host, port
        self.protocol = None
        self.datagrams = []
        self.written = []
        self.write_closed = False
        self.closed = False
        self.reset_with = None
        self.opened = defer.Deferred(lambda _: self.reset())

    def attach(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self)

    def getPeer(self):
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 0)

    def send_datagram(self, host, port, payload):
        self.datagrams.append((host, port, payload))
        return True

    def write(self, data):
        self.written.append(data)

    def loseWriteConnection(self):
        self.write_closed = True

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def reset(self, reason=Reason.GENERAL_FAILURE):
        self.reset_with = reason
        self._lose()

    def loseConnection(self):
        self._lose()

    def _lose(self):
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                self.protocol.connectionLost(Failure(error.ConnectionDone()))


class FakeMux:
    """
    A mux whose open_stream returns a Deferred the test fires, and whose
    start_stream a L{FakeStream} whose C{opened} the test fires.
    """

    def __init__(self):
        self.opens = []  # (kind, host, port, deferred)
        self.hellos = []
        self.stream_count = 0

    def send_hello(self, info):
        self.hellos.append(info)

    def open_stream(self, kind, host, port):
        d = defer.Deferred()
        self.opens.append((kind, host, port, d))
        return d

    def start_stream(self, kind, host, port):
        stream = self.stream_started = FakeStream(kind, host, port)
        self.opens.append((kind, host, port, stream.opened))
        return stream


def tunnel(client_id, group="default", credential="site"):
    return Tunnel(client_id=client_id, group=group, mux=FakeMux(), credential=credential)


def wanted(remote_port, local_port=22, protocol="tcp", local_host="localhost"):
    return {"remote_port": remote_port, "local_host": local_host, "local_port": local_port,
            "protocol": protocol}


def ok(remote_port, protocol="tcp"):
    return {"remote_port": remote_port, "protocol": protocol, "ok": True, "error": ""}


def forwarding(busy=(), allowed=range(9000, 9101)):
    reactor = FakeReactor(busy)
    return reactor, PortForwarding(reactor, lambda port: port in allowed,
                                   interface="127.0.0.1", udp_idle_timeout=30)


# -- listening --------------------------------------------------------------------

class InterfaceTests(SynchronousTestCase):
    """Forwarded ports listen on the configured interface."""

    def test_loopback_by_default(self):
        """Without an interface given, forwarded ports (TCP and UDP) listen on 127.0.0.1."""
        reactor = FakeReactor(())
        manager = PortForwarding(reactor, lambda port: True)
        manager.tunnel_connected(tunnel("a"), [wanted(9001), wanted(9001, 53, "udp")])
        self.assertEqual([(port.port, port.interface) for _, port in reactor.listening],
                         [(9001, "127.0.0.1"), (9001, "127.0.0.1")])

    def test_interface_change_applies_to_new_ports(self):
        """A new interface (a reload) applies to ports opened afterwards."""
        reactor, manager = forwarding()
        manager.tunnel_connected(tunnel("a"), [wanted(9001)])
        manager.interface = "0.0.0.0"
        manager.tunnel_connected(tunnel("b"), [wanted(9002)])
        self.assertEqual(sorted((port.port, port.interface) for _, port in reactor.listening),
                         [(9001, "127.0.0.1"), (9002, "0.0.0.0")])


# -- the manager ------------------------------------------------------------------

class PortForwardingTests(SynchronousTestCase):
    """Which ports are opened, refused, shared and released."""

    def test_allowed_ports_open(self):
        """Allowed, free ports are listened on (TCP and UDP) on the configured interface."""
        reactor, manager = forwarding()
        answers = manager.tunnel_connected(tunnel("a"), [wanted(9001), wanted(9001, 53, "udp")])
        self.assertEqual(answers, [ok(9001), ok(9001, "udp")])
        self.assertEqual(reactor.open_ports(), [(9001, "tcp"), (9001, "udp")])
        self.assertEqual({port.interface for _, port in reactor.listening}, {"127.0.0.1"})
        self.assertEqual(manager.forwards(), {(9001, "tcp"): "a", (9001, "udp"): "a"})

    def test_nothing_asked(self):
        """A HELLO without open_ports gets no open_ports answer."""
        _, manager = forwarding()
        self.assertIsNone(manager.tunnel_connected(tunnel("a"), None))
        self.assertEqual(manager.tunnel_connected(tunnel("a"), "9001"), [])

    def test_outside_range_refused(self):
        """A port outside open_ports_allowed is refused and never bound."""
        reactor, manager = forwarding()
        [answer] = manager.tunnel_connected(tunnel("a"), [wanted(22)])
        self.assertFalse(answer["ok"])
        self.assertEqual(answer["error"], "port 22/tcp is not in the gateway's open_ports_allowed"
                         " (add 22 to gateway.open_ports_allowed)")
        self.assertEqual(reactor.listening, [])

    def test_bind_failure_refused(self):
        """A port that fails to bind is refused with the reason; others still open."""
        reactor, manager = forwarding(busy={9002})
        busy, fine = manager.tunnel_connected(tunnel("a"), [wanted(9002), wanted(9003)])
        self.assertFalse(busy["ok"])
        self.assertIn("cannot listen on port 9002/tcp", busy["error"])
        self.assertIn("Address already in use", busy["error"])
        self.assertEqual(fine, ok(9003))
        self.assertEqual(manager.forwards(), {(9003, "tcp"): "a"})

    def test_bad_entry_refused(self):
        """A malformed entry is refused on its own; the rest of the list is served."""
        _, manager = forwarding()
        bad, good = manager.tunnel_connected(tunnel("a"), [{"remote_port": 9001}, wanted(9002)])
        self.assertEqual((bad["remote_port"], bad["ok"]), (9001, False))
        self.assertIn("bad open_ports entry", bad["error"])
        self.assertEqual(good, ok(9002))

    def test_other_client_refused(self):
        """A port taken by one client is refused to another, naming the owner."""
        reactor, manager = forwarding()
        manager.tunnel_connected(tunnel("one"), [wanted(9001)])
        [answer] = manager.tunnel_connected(tunnel("two"), [wanted(9001), ])
        self.assertEqual(answer, {"remote_port": 9001, "protocol": "tcp", "ok": False,
                                  "error": "port 9001/tcp already forwarded for client one"})
        self.assertEqual(len(reactor.listening), 1)

    def test_same_id_other_credential_refused(self):
        """
        Another credential allowed the group, announcing the holder's
        client_id, cannot join its port (and be handed its connections).
        """
        reactor, manager = forwarding()
        holder, impostor = tunnel("site-a1", credential="site-a"), tunnel("site-a1", credential="site-b")
        self.assertTrue(manager.tunnel_connected(holder, [wanted(9001)])[0]["ok"])
        [answer] = manager.tunnel_connected(impostor, [wanted(9001, 8080, local_host="evil")])
        self.assertFalse(answer["ok"])
        # Another tenant's client is not named.
        self.assertIn("already forwarded for another client", answer["error"])
        self.assertEqual([route.tunnel for route in manager.port_for(9001).routes], [holder])

    def test_fleet_refusal_names_no_other_tenant(self):
        """A port held through another gateway by another credential's client is not named."""
        from types import SimpleNamespace
        _, manager = forwarding()
        manager.claims = SimpleNamespace(node_id="node-b")
        held = SimpleNamespace(node_id="node-a", owner=("default", "lab-1", "lab"))
        why, _ = manager._fleet_refusal(held, ("default", "ops-1", "ops"))
        self.assertEqual(why % ("9001/tcp",),
                         "port 9001/tcp already forwarded for another client (through gateway node-a)")
        why, _ = manager._fleet_refusal(held, ("default", "lab-2", "lab"))
        self.assertIn("for client lab-1", why)

    def test_credential_ports(self):
        """
        A gateway.clients entry's own open_ports_allowed: its clients get only
        those ports, even when free (the port of another tenant whose client
        left); an entry without one has the gateway's whole list.
        """
        reactor, manager = forwarding()
        own = {"lab": [(9001, 9001)], "ops": [(9100, 9199)]}
        manager._credential_port_allowed = lambda credential, port: (
            credential not in own or any(low <= port <= high for low, high in own[credential]))
        [taken] = manager.tunnel_connected(tunnel("ops-1", credential="ops"), [wanted(9001)])
        self.assertFalse(taken["ok"])
        self.assertIn("open_ports_allowed of this client's credential", taken["error"])
        [mine] = manager.tunnel_connected(tunnel("lab-1", credential="lab"), [wanted(9001)])
        self.assertTrue(mine["ok"])
        [anyone] = manager.tunnel_connected(tunnel("x-1", credential="x"), [wanted(9050)])
        self.assertTrue(anyone["ok"])

    def test_same_id_other_group_refused(self):
        """The owner is the client id within its group."""
        _, manager = forwarding()
        manager.tunnel_connected(tunnel("one", group="lab"), [wanted(9001)])
        [answer] = manager.tunnel_connected(tunnel("one"), [wanted(9001)])
        self.assertFalse(answer["ok"])

    def test_tcp_and_udp_are_separate(self):
        """9001/tcp and 9001/udp may belong to different clients."""
        _, manager = forwarding()
        manager.tunnel_connected(tunnel("one"), [wanted(9001)])
        self.assertEqual(manager.tunnel_connected(tunnel("two"), [wanted(9001, 53, "udp")]),
                         [ok(9001, "udp")])

    def test_draining_tunnel_not_picked(self):
        """A tunnel going away (GOAWAY) gets no new forwarded connections."""
        _, manager = forwarding()
        first, second = tunnel("a"), tunnel("a")
        manager.tunnel_connected(first, [wanted(9001)])
        manager.tunnel_connected(second, [wanted(9001)])
        second.mux.stream_count = 5
        first.mux.draining = True
        self.assertIs(manager.port_for(9001).pick_route().tunnel, second)
        second.mux.draining = True
        self.assertIsNone(manager.port_for(9001).pick_route())

    def test_replicas_share_the_port(self):
        """A second tunnel of the same client joins the port; it stays until the last goes."""
        reactor, manager = forwarding()
        first, second = tunnel("a"), tunnel("a")
        manager.tunnel_connected(first, [wanted(9001)])
        self.assertEqual(manager.tunnel_connected(second, [wanted(9001)]), [ok(9001)])
        self.assertEqual(len(reactor.listening), 1)
        first.mux.stream_count = 5
        self.assertIs(manager.port_for(9001).pick_route().tunnel, second)
        manager.tunnel_disconnected(second)
        self.assertEqual(reactor.open_ports(), [(9001, "tcp")])
        self.assertIs(manager.port_for(9001).pick_route().tunnel, first)
        manager.tunnel_disconnected(first)
        self.assertEqual(reactor.open_ports(), [])

    def test_asked_twice_refused(self):
        """One tunnel asking for the same port twice gets the second refused."""
        _, manager = forwarding()
        first, second = manager.tunnel_connected(tunnel("a"), [wanted(9001), wanted(9001, 23)])
        self.assertTrue(first["ok"])
        self.assertEqual(second["error"], "port 9001/tcp asked for twice")

    def test_released_on_disconnect_and_reopened(self):
        """The client's ports close when its tunnel goes; a returning client gets them back."""
        reactor, manager = forwarding()
        old = tunnel("a")
        manager.tunnel_connected(old, [wanted(9001), wanted(9002, 53, "udp")])
        released = manager.tunnel_disconnected(old)
        self.assertEqual(self.successResultOf(released), None)
        self.assertEqual((reactor.open_ports(), manager.forwards()), ([], {}))
        self.assertEqual(manager.tunnel_connected(tunnel("a"), [wanted(9001)]), [ok(9001)])
        self.assertEqual(reactor.open_ports(), [(9001, "tcp")])

    def test_released_port_goes_to_another_client(self):
        """Once released, another client may take the port."""
        _, manager = forwarding()
        one = tunnel("one")
        manager.tunnel_connected(one, [wanted(9001)])
        manager.tunnel_disconnected(one)
        self.assertEqual(manager.tunnel_connected(tunnel("two"), [wanted(9001)]), [ok(9001)])

    def test_waiting_client_takes_over(self):
        """A client refused for a taken port gets it once the holder goes, and is told."""
        reactor, manager = forwarding()
        holder, standby, third = tunnel("one"), tunnel("two"), tunnel("three")
        manager.tunnel_connected(holder, [wanted(9001)])
        manager.tunnel_connected(standby, [wanted(9001, 23)])
        manager.tunnel_connected(third, [wanted(9001, 24)])
        self.successResultOf(manager.tunnel_disconnected(holder))
        self.assertEqual(manager.forwards(), {(9001, "tcp"): "two"})
        self.assertEqual(manager.port_for(9001).pick_route().request.local_port, 23)
        self.assertEqual(standby.mux.hellos, [{"version": 1, "open_ports": [ok(9001)]}])
        self.assertEqual(third.mux.hellos, [])
        # The third waits on: it is next once the standby goes.
        self.successResultOf(manager.tunnel_disconnected(standby))
        self.assertEqual(manager.forwards(), {(9001, "tcp"): "three"})
        self.assertEqual(reactor.open_ports(), [(9001, "tcp")])

    def test_waiter_told_of_final_refusal(self):
        """A waiter whose port cannot be bound at hand-over hears so, and waits no more."""
        reactor, manager = forwarding()
        holder, standby = tunnel("one"), tunnel("two")
        manager.tunnel_connected(holder, [wanted(9001)])
        manager.tunnel_connected(standby, [wanted(9001)])
        reactor.busy.add(9001)  # another program took the port meanwhile
        manager.tunnel_disconnected(holder)
        [hello] = standby.mux.hellos
        [entry] = hello["open_ports"]
        self.assertFalse(entry["ok"])
        self.assertIn("cannot listen on port 9001/tcp", entry["error"])
        reactor.busy.clear()
        manager.tunnel_disconnected(tunnel("three"))
        self.assertEqual(manager.forwards(), {})

    def test_gone_waiter_skipped(self):
        """A waiting tunnel that disconnected is not handed the port."""
        _, manager = forwarding()
        holder, gone, standby = tunnel("one"), tunnel("two"), tunnel("three")
        manager.tunnel_connected(holder, [wanted(9001)])
        manager.tunnel_connected(gone, [wanted(9001)])
        manager.tunnel_connected(standby, [wanted(9001)])
        manager.tunnel_disconnected(gone)
        manager.tunnel_disconnected(holder)
        self.assertEqual(manager.forwards(), {(9001, "tcp"): "three"})
        self.assertEqual(gone.mux.hellos, [])

    def test_unknown_tunnel_disconnect(self):
        """A tunnel that forwarded nothing leaves the others alone."""
        reactor, manager = forwarding()
        manager.tunnel_connected(tunnel("a"), [wanted(9001)])
        self.successResultOf(manager.tunnel_disconnected(tunnel("b")))
        self.assertEqual(reactor.open_ports(), [(9001, "tcp")])

    def test_stop(self):
        """Stopping releases every port and refuses new requests."""
        reactor, manager = forwarding()
        manager.tunnel_connected(tunnel("a"), [wanted(9001), wanted(9002, 53, "udp")])
        self.successResultOf(manager.stop())
        self.assertEqual(reactor.open_ports(), [])
        [answer] = manager.tunnel_connected(tunnel("b"), [wanted(9003)])
        self.assertEqual(answer["error"], "the gateway is stopping")


# -- TCP connections ------------------------------------------------------------

class TcpForwardTests(SynchronousTestCase):
    """Each accepted connection becomes a tcp stream through the owner's tunnel."""

    def connect(self, start_fails=False):
        reactor, manager = forwarding()
        owner = tunnel("a")
        if start_fails:
            def start_stream(kind, host, port):
                raise StreamOpenError(Reason.NO_TUNNEL, "tunnel going away")
            owner.mux.start_stream = start_stream
        manager.tunnel_connected(owner, [wanted(9001, 22, local_host="db.internal")])
        [(_, port)] = reactor.listening
        user = port.owner.buildProtocol(IPv4Address("TCP", "203.0.113.9", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.9", 40000))
        user.makeConnection(transport)
        return manager, owner, user, transport

    def test_opens_stream_to_target(self):
        """The stream asks the client for local_host:local_port and is spliced once open."""
        manager, owner, user, transport = self.connect()
        [(kind, host, port, opening)] = owner.mux.opens
        self.assertEqual((kind, host, port), ("tcp", "db.internal", 22))
        self.assertEqual(transport.producerState, "producing")
        stream = owner.mux.stream_started
        opening.callback(stream)
        self.assertEqual(transport.producerState, "producing")
        self.assertIs(user.other, stream.protocol)
        self.assertEqual(manager.port_for(9001).connections, {user})

    def test_first_bytes_go_to_the_opening_stream(self):
        """
        What the user sends before the stream is open is written to it at
        once (early data: it crosses with the OPEN), once, in order; EOF
        waits for the open.
        """
        _, owner, user, transport = self.connect()
        stream = owner.mux.stream_started
        user.dataReceived(b"\x16\x03\x01 client hello")
        user.dataReceived(b" and more")
        user.readConnectionLost()
        self.assertEqual(stream.written, [b"\x16\x03\x01 client hello", b" and more"])
        self.assertFalse(stream.write_closed)
        self.assertEqual(transport.producerState, "producing")
        stream.opened.callback(stream)
        self.assertIs(user.other, stream.protocol)
        self.assertEqual(stream.written, [b"\x16\x03\x01 client hello", b" and more"])
        self.assertTrue(stream.write_closed)

    def test_reading_pauses_past_early_read(self):
        """
        At most EARLY_READ bytes go before the open; past them, bytes are
        held and reading pauses until the stream is open.
        """
        _, owner, user, transport = self.connect()
        stream = owner.mux.stream_started
        user.dataReceived(b"x" * (EARLY_READ - 1))
        self.assertEqual(transport.producerState, "producing")
        user.dataReceived(b"xyz")
        self.assertEqual(transport.producerState, "paused")
        user.dataReceived(b"!")  # a read already under way
        self.assertEqual(b"".join(stream.written), b"x" * EARLY_READ)
        stream.opened.callback(stream)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(b"".join(stream.written), b"x" * EARLY_READ + b"yz!")

    def test_tunnel_gone_before_the_open(self):
        """A tunnel that cannot open streams any more aborts the user's connection."""
        _, owner, user, transport = self.connect(start_fails=True)
        self.assertTrue(transport.disconnecting)

    def test_open_refused_aborts_user(self):
        """A refusal at the client (e.g. access control) aborts the user's connection."""
        _, owner, user, transport = self.connect()
        owner.mux.opens[0][3].errback(StreamOpenError(Reason.NOT_ALLOWED, "forbidden"))
        self.assertTrue(transport.disconnecting)

    def test_user_leaves_while_opening(self):
        """A user who leaves first cancels the open; the connection is forgotten."""
        manager, owner, user, _ = self.connect()
        opening = owner.mux.opens[0][3]
        user.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(opening.called)  # cancelled: a real mux resets the stream
        self.assertEqual(manager.port_for(9001).connections, set())


class TcpForwardEarlyDataTests(SynchronousTestCase):
    """Through a real tunnel mux: the user's first bytes cross with the OPEN."""

    def connect(self, offered=True, client_window=DEFAULT_WINDOW):
        pair = MuxPair(client_window=client_window)
        if offered:
            pair.client.send_hello({"version": 1})  # offers early data
        else:  # a client of an older version
            pair.to_gateway.append(frames.encode(frames.Hello({"version": 1})))
        pair.deliver_to_gateway()
        self.reactor, manager = forwarding()
        owner = Tunnel(client_id="a", group="default", mux=pair.gateway)
        manager.tunnel_connected(owner, [wanted(9001, 5432, local_host="db.internal")])
        [(_, port)] = self.reactor.listening
        self.factory = port.owner
        return (pair,) + self.user_connects()

    def user_connects(self):
        user = self.factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 40000))
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "203.0.113.9", 40000))
        user.makeConnection(transport)
        return user, transport

    @staticmethod
    def sent(pair):
        return [type(f).__name__ for f in pair.sent_by_gateway if not isinstance(f, frames.Hello)]

    def accept(self, pair, protocol=None):
        pair.pump()
        [request] = pair.client_requests
        protocol = protocol if protocol is not None else Recorder()
        request.accept(protocol)
        pair.pump()
        return protocol

    def test_sent_before_the_answer(self):
        pair, user, transport = self.connect()
        user.dataReceived(b"startup message")
        self.assertEqual([type(f).__name__ for f in pair.sent_by_gateway
                          if not isinstance(f, frames.Hello)], ["Open", "Data"])
        pair.pump()
        [request] = pair.client_requests
        self.assertEqual((request.host, request.port), ("db.internal", 5432))
        target = Recorder()
        request.accept(target)
        self.assertEqual(target.received, b"startup message")
        pair.pump()
        user.dataReceived(b", then a query")
        pair.pump()
        self.assertEqual(target.received, b"startup message, then a query")
        target.transport.write(b"answer")
        pair.pump()
        self.assertEqual(transport.value(), b"answer")

    def test_refused_drops_them(self):
        """A refused OPEN: the client held the early bytes and drops them unread; the user is reset."""
        pair, user, transport = self.connect()
        user.dataReceived(b"secret")
        pair.pump()
        [request] = pair.client_requests
        self.assertEqual(b"".join(request._early), b"secret")
        request.reject(Reason.NOT_ALLOWED, "forbidden by access control")
        self.assertEqual(request._early, [])
        pair.pump()
        self.assertTrue(transport.disconnecting)

    def test_eof_after_the_early_bytes(self):
        """A user's EOF before the open: the FIN follows the early bytes once the stream is open."""
        pair, user, transport = self.connect()
        user.dataReceived(b"QUIT\r\n")
        user.readConnectionLost()
        self.assertEqual(self.sent(pair), ["Open", "Data"])
        target = self.accept(pair, HalfCloseRecorder())
        self.assertEqual(target.events, [("made",), ("data", b"QUIT\r\n"), ("read-closed",)])
        self.assertEqual(self.sent(pair), ["Open", "Data", "Fin"])

    def test_user_leaves_while_opening(self):
        """A user who leaves after sending early: the stream is reset, and the client drops them."""
        pair, user, transport = self.connect()
        user.dataReceived(b"half a request")
        user.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.sent(pair), ["Open", "Data", "Reset"])
        pair.pump()
        [request] = pair.client_requests
        self.assertEqual(request._early, [])
        self.assertTrue(request.closed)

    def test_open_times_out(self):
        """No answer in time: the stream is reset and the user's connection aborted."""
        pair, user, transport = self.connect()
        user.dataReceived(b"hello")
        self.reactor.advance(DEFAULT_OPEN_TIMEOUT)
        self.assertEqual(self.sent(pair), ["Open", "Data", "Reset"])
        self.assertTrue(transport.disconnecting)

    def test_client_without_early_data(self):
        """A client that offers none gets the bytes after OPEN_OK, all of them, in order."""
        pair, user, transport = self.connect(offered=False)
        user.dataReceived(b"first, ")
        user.dataReceived(b"second")
        self.assertEqual(self.sent(pair), ["Open"])
        target = self.accept(pair)
        self.assertEqual(target.received, b"first, second")

    def test_more_than_the_client_takes_early(self):
        """Past the client's offer (its window here), the rest goes after OPEN_OK, in order."""
        pair, user, transport = self.connect(client_window=SMALL_WINDOW)
        data = bytes(range(256)) * (3 * SMALL_WINDOW // 256)
        user.dataReceived(data)
        early = sum(len(f.payload) for f in pair.sent_by_gateway if isinstance(f, frames.Data))
        self.assertEqual(early, SMALL_WINDOW)
        target = self.accept(pair)
        self.assertEqual(target.received, data)
        self.assertEqual((pair.client_errors, pair.gateway_errors), ([], []))

    def test_connections_waiting_for_their_stream_are_capped(self):
        """Past the cap, a new connection is closed at once; a place frees when a stream opens."""
        pair, user, transport = self.connect()
        self.factory.handshakes.limit = 1
        _, refused = self.user_connects()
        self.assertTrue(refused.disconnecting)
        self.assertEqual(self.sent(pair), ["Open"])
        self.accept(pair)
        _, admitted = self.user_connects()
        self.assertFalse(admitted.disconnecting)
        self.assertEqual(self.sent(pair), ["Open", "Open"])


# -- UDP --------------------------------------------------------------------------

class UdpForwardTests(SynchronousTestCase):
    """One association per source address, with a bounded queue and an idle timeout."""

    def setUp(self):
        self.reactor, self.manager = forwarding()
        self.owner = tunnel("a")
        self.manager.tunnel_connected(self.owner, [wanted(9053, 53, "udp", "dns.internal")])
        self.forwarder = self.manager.port_for(9053, "udp").udp

    def open(self, index=-1):
        kind, host, port, opening = self.owner.mux.opens[index]
        stream = FakeStream(kind, host, port)
        opening.callback(stream)
        return stream

    def test_association_per_source(self):
        """Each source gets its own udp stream; replies go back to that source only."""
        self.forwarder.datagramReceived(b"q1", ("10.0.0.1", 5000))
        self.forwarder.datagramReceived(b"q2", ("10.0.0.2", 5000))
        self.assertEqual([o[:3] for o in self.owner.mux.opens], [("udp", "0.0.0.0", 0)] * 2)
        first, second = self.open(0), self.open(1)
        self.assertEqual(first.datagrams, [("dns.internal", 53, b"q1")])
        self.assertEqual(second.datagrams, [("dns.internal", 53, b"q2")])
        second.protocol.datagram_received("127.0.0.1", 53, b"a2")
        self.assertEqual(self.forwarder.transport.sent, [(b"a2", ("10.0.0.2", 5000))])
        self.forwarder.datagramReceived(b"q1 again", ("10.0.0.1", 5000))
        self.assertEqual(len(self.owner.mux.opens), 2)
        self.assertEqual(first.datagrams[-1], ("dns.internal", 53, b"q1 again"))

    def test_queue_while_opening_is_bounded(self):
        """Datagrams wait while the stream opens, up to MAX_PENDING; more are dropped."""
        for i in range(forwarding_udp.MAX_PENDING + 3):
            self.forwarder.datagramReceived(b"%d" % i, ("10.0.0.1", 5000))
        stream = self.open()
        self.assertEqual(len(stream.datagrams), forwarding_udp.MAX_PENDING)
        self.assertEqual(self.forwarder.dropped, 3)

    def test_bytes_held_per_port_are_bounded(self):
        """
        Large datagrams from many sources while their streams open: at most
        MAX_PENDING_BYTES are held for the port; what opens gives its share back.
        """
        big = b"x" * 65000
        sources = [("10.0.0.%d" % (i // 200 + 1), 5000 + i % 200) for i in range(40)]
        for source in sources:
            for _ in range(forwarding_udp.MAX_PENDING):
                self.forwarder.datagramReceived(big, source)
        held = self.forwarder.pending_bytes
        self.assertLessEqual(held, forwarding_udp.MAX_PENDING_BYTES)
        self.assertEqual(held % len(big), 0)
        self.assertEqual(self.forwarder.dropped,
                         40 * forwarding_udp.MAX_PENDING - held // len(big))
        stream = self.open(0)
        self.assertEqual(self.forwarder.pending_bytes, held - len(stream.datagrams) * len(big))
        for index in range(1, 40):
            self.open(index)
        self.assertEqual(self.forwarder.pending_bytes, 0)

    def test_idle_timeout(self):
        """A source silent both ways for the idle timeout loses its association."""
        self.forwarder.datagramReceived(b"q", ("10.0.0.1", 5000))
        stream = self.open()
        self.reactor.advance(20)
        stream.protocol.datagram_received("127.0.0.1", 53, b"a")
        self.reactor.advance(20)
        self.assertFalse(stream.closed)
        self.reactor.advance(15)
        self.assertTrue(stream.closed)
        self.assertEqual(self.forwarder.sessions, {})

    def test_stream_lost(self):
        """When the stream goes (tunnel lost, refused) the next datagram opens a new one."""
        self.forwarder.datagramReceived(b"q", ("10.0.0.1", 5000))
        self.open().loseConnection()
        self.assertEqual(self.forwarder.sessions, {})
        self.forwarder.datagramReceived(b"q", ("10.0.0.1", 5000))
        self.assertEqual(len(self.owner.mux.opens), 2)

    def test_open_refused(self):
        """A refused association is forgotten and its waiting datagrams dropped."""
        self.forwarder.datagramReceived(b"q", ("10.0.0.1", 5000))
        self.owner.mux.opens[0][3].errback(StreamOpenError(Reason.PROTOCOL_NOT_ALLOWED, "no udp"))
        self.assertEqual(self.forwarder.sessions, {})
        self.assertEqual(self.forwarder.dropped, 1)  # the datagram that waited is counted

    def test_session_limit(self):
        """Past max_sessions a new source takes the place of the one that sent least recently."""
        self.forwarder.max_sessions = 2
        self.forwarder.datagramReceived(b"q", ("10.0.0.1", 5000))
        self.forwarder.datagramReceived(b"q", ("10.0.0.2", 5000))
        first, second = self.open(0), self.open(1)
        self.forwarder.datagramReceived(b"again", ("10.0.0.1", 5000))  # 10.0.0.2 is now the oldest
        self.forwarder.datagramReceived(b"q", ("10.0.0.3", 5000))
        self.assertEqual(list(self.forwarder.sessions), [("10.0.0.1", 5000), ("10.0.0.3", 5000)])
        self.assertTrue(second.closed)
        self.assertFalse(first.closed)
        self.assertEqual((self.forwarder.evicted, self.forwarder.dropped), (1, 0))

    def test_sessions_per_source_ip(self):
        """One address's many ports hold at most max_sessions_per_ip; other addresses keep theirs."""
        self.forwarder.max_sessions_per_ip = 2
        self.forwarder.datagramReceived(b"q", ("10.0.0.9", 5000))
        for port in (6000, 6001, 6002):
            self.forwarder.datagramReceived(b"q", ("10.0.0.1", port))
        self.assertEqual(list(self.forwarder.sessions),
                         [("10.0.0.9", 5000), ("10.0.0.1", 6001), ("10.0.0.1", 6002)])
        self.assertEqual(self.forwarder.evicted, 1)
        # Opening streams that were evicted were cancelled: nothing is left behind.
        self.assertTrue(self.owner.mux.opens[1][3].called)

    def test_release_ends_associations(self):
        """Releasing the port closes open associations and cancels opening ones."""
        self.forwarder.datagramReceived(b"q", ("10.0.0.1", 5000))
        stream = self.open()
        self.forwarder.datagramReceived(b"q", ("10.0.0.2", 5000))
        opening = self.owner.mux.opens[1][3]
        self.manager.tunnel_disconnected(self.owner)
        self.assertTrue(stream.closed)
        self.assertTrue(opening.called)  # cancelled: a real mux resets the stream
        self.assertEqual(self.forwarder.sessions, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])


# -- the tunnel server ------------------------------------------------------------

class FakeProtocol:
    """What TunnelServerFactory.tunnel_connected reads of a GatewayTunnelProtocol."""

    peer = "tcp:127.0.0.1:5000"
    grant = ClientGrant("u", ("default",), (), 1024)

    def __init__(self):
        self.mux = FakeMux()
        self.mux.name = ""
        self.hellos = []
        self.mux.send_hello = self.hellos.append

    def dropConnection(self, abort=False):
        pass

    def abort(self):
        self.dropConnection(abort=True)


class TunnelServerTests(SynchronousTestCase):
    """The gateway's HELLO answers open_ports and disconnection releases them."""

    def factory(self, manager=None):
        from anyproxy.gateway.tunnel_pool import TunnelPool
        return TunnelServerFactory.for_credentials(
            TunnelPool(Clock()), "u", "p", Clock(), forwarding=manager)

    def test_hello_answer(self):
        """The answer lists each asked port; the tunnel's going releases them."""
        reactor, manager = forwarding()
        factory = self.factory(manager)
        protocol = FakeProtocol()
        tunnel = factory.tunnel_connected(protocol, {
            "version": 1, "client_id": "a", "open_ports": [wanted(9001), wanted(80)]})
        [hello] = protocol.hellos
        self.assertEqual(hello["open_ports"][0], ok(9001))
        self.assertFalse(hello["open_ports"][1]["ok"])
        factory.tunnel_disconnected(tunnel)
        self.assertEqual(reactor.open_ports(), [])

    def test_no_open_ports_key_without_request(self):
        """A client that asked for nothing gets no open_ports key."""
        _, manager = forwarding()
        protocol = FakeProtocol()
        self.factory(manager).tunnel_connected(protocol, {"version": 1, "client_id": "a"})
        self.assertNotIn("open_ports", protocol.hellos[0])

    def test_forwarding_disabled(self):
        """Without a PortForwarding every asked port is refused."""
        protocol = FakeProtocol()
        self.factory().tunnel_connected(protocol, {
            "version": 1, "client_id": "a", "open_ports": [wanted(9001)]})
        [answer] = protocol.hellos[0]["open_ports"]
        self.assertEqual((answer["ok"], answer["error"]),
                         (False, "port forwarding is not enabled"))
