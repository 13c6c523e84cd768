"""
A tunnel peer that asks for answers and never reads them cannot grow our
send buffer without bound: WebSocket pings while we are congested get one
pong, for the latest, once the buffer drains; mux requests (OPEN, DATA on
unknown streams) beyond L{MAX_REPLY_BACKLOG} of unread answers close the
tunnel (L{anyproxy.tunnel.mux}, L{anyproxy.tunnel.websocket}).
"""

import base64
import os
import socket
import ssl
import struct

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import defer, error, reactor, task
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python import failure
from twisted.trial import unittest

from anyproxy.metrics import transport_buffered
from anyproxy.tunnel import frames
from anyproxy.tunnel.hello import PROTOCOL_VERSION
from anyproxy.tunnel.mux import MAX_REPLY_BACKLOG
from anyproxy.tunnel.websocket import GatewayTunnelProtocol, tune_factory
from tests.support import CLIENT_PASSWORD, CLIENT_USER, Deployment


def ws_frame(opcode, payload, mask=b"\x00\x00\x00\x00"):
    """One masked client-to-server WebSocket frame (RFC 6455 5.2); a zero mask by default."""
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 0x10000:
        head = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", length)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", length)
    masked = payload if mask == b"\x00" * 4 else bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def server_frames(data):
    """Parse unmasked server-to-client frames: a list of C{(opcode, payload)}."""
    found = []
    while data:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        found.append((opcode, data[offset:offset + length]))
        data = data[offset + length:]
    return found


def upgrade_request(authorization=None):
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /anyproxy HTTP/1.1", "Host: localhost", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Protocol: " + frames.SUBPROTOCOL]
    if authorization:
        lines.append("Authorization: Basic " + authorization)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class AcceptingProtocol(GatewayTunnelProtocol):
    """The gateway's tunnel protocol, with the login check left out (not what is tested)."""

    def onConnect(self, request):
        return frames.SUBPROTOCOL

    def hello_received(self, info):
        pass


class Factory(WebSocketServerFactory):
    protocol = AcceptingProtocol

    def __init__(self):
        super().__init__(url="ws://localhost/anyproxy", protocols=[frames.SUBPROTOCOL])
        self.reactor = Clock()
        self.handshake_timeout = 10.0
        tune_factory(self, 10.0, 10.0)
        # No timers on the global reactor from Autobahn in a unit test.
        self.setProtocolOptions(autoPingInterval=0, autoPingTimeout=0, openHandshakeTimeout=0,
                                closeHandshakeTimeout=0)


def open_gateway_protocol(testcase):
    """
    C{(protocol, transport)}: the gateway's tunnel protocol (login check left
    out) over a L{StringTransport}, past the upgrade, its output cleared; it
    is lost again at C{testcase}'s cleanup.
    """
    protocol = Factory().buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(upgrade_request())
    transport.clear()
    testcase.addCleanup(protocol.connectionLost, failure.Failure(error.ConnectionDone()))
    return protocol, transport


class CongestedGatewayTests(unittest.SynchronousTestCase):
    """The gateway's tunnel protocol over a transport whose send buffer never drains."""

    def setUp(self):
        self.protocol = Factory().buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(upgrade_request())
        self.assertIn(b" 101 ", self.transport.value().split(b"\r\n")[0])
        self.addCleanup(self.close)
        self.transport.clear()
        self.mux = self.protocol.mux
        # The mux is the producer of the lowest transport, which pauses it
        # above its high-water mark: here, as if the peer stopped reading.
        self.assertIs(self.transport.producer, self.mux)
        self.mux.pauseProducing()

    def close(self):
        # The HELLO timer is on the factory's Clock: the protocol cancels it.
        self.protocol.connectionLost(failure.Failure(error.ConnectionDone()))

    def feed(self, data, chunk=64 * 1024):
        for offset in range(0, len(data), chunk):
            self.protocol.dataReceived(data[offset:offset + chunk])

    def test_pings_while_congested(self):
        """10,000 pings while congested write nothing; the buffer draining sends one pong,
        for the latest ping."""
        self.feed(b"".join(ws_frame(9, b"%05d" % (i,) + b"p" * 120) for i in range(10000)))
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.mux.resumeProducing()
        self.assertEqual(server_frames(self.transport.value()), [(10, b"09999" + b"p" * 120)])
        self.transport.clear()
        self.mux.resumeProducing()  # nothing held any more
        self.assertEqual(self.transport.value(), b"")

    def test_pings_answered_when_not_congested(self):
        """Below the high-water mark every ping gets its pong at once, empty ones too."""
        self.mux.resumeProducing()
        self.feed(ws_frame(9, b"one") + ws_frame(9, b"") + ws_frame(9, b"three"))
        self.assertEqual(server_frames(self.transport.value()),
                         [(10, b"one"), (10, b""), (10, b"three")])

    def test_open_flood_while_congested(self):
        """OPENs (each answered OPEN_ERROR by the gateway) while congested: once the unread
        answers pass MAX_REPLY_BACKLOG, the tunnel is dropped instead of buffering more."""
        opens = (frames.encode(frames.Open(sid, "tcp", "h" * 200, 80, 65536))
                 for sid in range(1, 80000, 2))
        self.feed(b"".join(ws_frame(2, message) for message in opens))
        self.assertTrue(self.transport.disconnecting)
        written = len(self.transport.value())
        # MAX_REPLY_BACKLOG counts tunnel messages, without WebSocket framing.
        self.assertGreater(written, MAX_REPLY_BACKLOG)
        self.assertLess(written, MAX_REPLY_BACKLOG * 1.2)

    def test_unknown_stream_data_while_congested(self):
        """DATA for streams we do not have (each answered RESET) is bounded the same way."""
        data = (frames.encode(frames.Data(sid, b"x")) for sid in range(1, 380000, 2))
        self.feed(b"".join(ws_frame(2, message) for message in data))
        self.assertTrue(self.transport.disconnecting)
        self.assertLess(len(self.transport.value()), MAX_REPLY_BACKLOG * 1.5)

    def test_answers_not_counted_once_drained(self):
        """The backlog counts only while congested: a peer whose answers drain is never
        dropped, however many it asks for."""
        opens = [ws_frame(2, frames.encode(frames.Open(sid, "tcp", "h" * 200, 80, 65536)))
                 for sid in range(1, 20000, 2)]
        for i in range(0, len(opens), 1000):
            self.mux.pauseProducing()
            self.feed(b"".join(opens[i:i + 1000]))
            self.assertEqual(self.mux.reply_backlog, 1000 * len(frames.encode(
                frames.OpenError(1, 2, "this side accepts no streams"))))
            self.mux.resumeProducing()  # the buffer drained
            self.assertEqual(self.mux.reply_backlog, 0)
        self.assertFalse(self.transport.disconnecting)


def tunnel_login(port, ca_path):
    """
    Log in as a tunnel client over TLS (a blocking socket, for a thread), send
    HELLO, and return the socket.

    Its receive buffer keeps the kernel's default: with a tiny one, the
    gateway's segments overflow it and are dropped with the ACKs they carry,
    so the flooder's own sends back off (RTO doubling, measured: stalls past
    10 s) for reasons that have nothing to do with the gateway.
    """
    context = ssl.create_default_context(cafile=ca_path)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    token = base64.b64encode(("%s:%s" % (CLIENT_USER, CLIENT_PASSWORD)).encode()).decode()
    sock.sendall(upgrade_request(token))
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(1)  # no further: what follows the head stays unread
        if not chunk:
            raise AssertionError("gateway closed during the upgrade: %r" % (answer,))
        answer += chunk
    assert b" 101 " in answer.split(b"\r\n")[0], answer
    hello = {"version": PROTOCOL_VERSION, "client_id": "flooder", "group": "default"}
    sock.sendall(ws_frame(2, frames.encode(frames.Hello(hello))))
    return sock


class PingFloodLoopbackTests(unittest.TestCase):
    """A real gateway, and a logged-in client on a real TLS socket that pings and never reads."""

    timeout = 60

    @defer.inlineCallbacks
    def test_ping_flood_bounded(self):
        """16 MB of pings leave the gateway's send buffer near its high-water mark, and
        the tunnel stays up (before the fix the buffer grew by the pings' size)."""
        deployment = Deployment(self)
        yield deployment.start_gateway()
        sock = yield deferToThread(tunnel_login, deployment.gateway_port, deployment.pki.ca_path)
        self.addCleanup(sock.close)
        yield deployment.wait_for_tunnel()
        tunnel = deployment.gateway.tunnel_pool.tunnels()[0]
        lowest = tunnel.mux.lowest_transport
        # A small kernel send buffer: what the kernel does not take stays in
        # Twisted's buffer, the one that grew.
        lowest.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        batch = ws_frame(9, b"p" * 125) * 4096
        total = peak = 0
        while total < 16 * 1000 * 1000:
            yield deferToThread(sock.sendall, batch)
            total += len(batch)
            peak = max(peak, transport_buffered(lowest))
        yield task.deferLater(reactor, 0.3, lambda: None)  # the gateway reads the rest
        peak = max(peak, transport_buffered(lowest))
        self.assertTrue(tunnel.mux.paused, "the send buffer never filled: nothing was tested")
        # The high-water mark (384 KiB, anyproxy.tuning.READ_SIZE) plus the
        # pongs of one read before the pause.
        self.assertLess(peak, 1024 * 1024)
        self.assertEqual(deployment.gateway.tunnel_pool.tunnels(), [tunnel])


class HandshakeBoundsTests(unittest.SynchronousTestCase):
    """Before any login: a bounded opening handshake, and one deadline from connect to HELLO."""

    def connect(self):
        protocol = Factory().buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(protocol.connectionLost, failure.Failure(error.ConnectionDone()))
        return protocol, transport

    def test_head_that_never_ends(self):
        """A handshake head past MAX_HANDSHAKE_HEAD (no blank line) closes the connection."""
        from anyproxy.tunnel.websocket import MAX_HANDSHAKE_HEAD
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /anyproxy HTTP/1.1\r\nHost: localhost\r\nX-Long: ")
        for _ in range(MAX_HANDSHAKE_HEAD // 1024 - 1):
            protocol.dataReceived(b"a" * 1024)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"a" * 2048)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.data, b"")  # what it sent is let go at once

    def test_hello_deadline_counts_from_connect(self):
        """An upgrade finished 6 s in leaves 4 s of the 10 s handshake_timeout for the HELLO."""
        protocol, transport = self.connect()
        clock = protocol.factory.reactor
        clock.advance(6)
        protocol.dataReceived(upgrade_request())
        self.assertIn(b" 101 ", transport.value().split(b"\r\n")[0])
        clock.advance(3.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
