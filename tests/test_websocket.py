"""Tests for L{anyproxy.tunnel.websocket}'s own framing of DATA messages."""

import struct

from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from anyproxy.tunnel.websocket import MAX_MESSAGE, GatewayTunnelProtocol
from tests.support import binary_frame


def sent_frame(payload_length):
    protocol = GatewayTunnelProtocol()
    protocol.state = protocol.STATE_OPEN
    protocol.transport = StringTransport()
    protocol._send_tunnel_parts(b"HEAD!", b"x" * payload_length)
    return protocol.transport.value()


class DataFramingTests(unittest.TestCase):
    """DATA messages go out as single unmasked binary frames (RFC 6455 section 5.2)."""

    def test_short(self):
        """Under 126 bytes the length is in the second byte."""
        frame = sent_frame(20)
        self.assertEqual(frame[:2], bytes((0x82, 25)))
        self.assertEqual(frame[2:], b"HEAD!" + b"x" * 20)

    def test_medium(self):
        """From 126 bytes to 64 KiB the length is a 16-bit field."""
        frame = sent_frame(1000)
        self.assertEqual(frame[:4], struct.pack("!BBH", 0x82, 126, 1005))
        self.assertEqual(len(frame), 4 + 1005)

    def test_large(self):
        """From 64 KiB the length is a 64-bit field."""
        frame = sent_frame(256 * 1024)
        self.assertEqual(frame[:10], struct.pack("!BBQ", 0x82, 127, 5 + 256 * 1024))
        self.assertEqual(frame[10:15], b"HEAD!")

    def test_small_frames(self):
        """Other tunnel frames (CREDIT, FIN, DATAGRAM...) are framed the same way."""
        protocol = GatewayTunnelProtocol()
        protocol.state = protocol.STATE_OPEN
        protocol.transport = StringTransport()
        protocol._send_tunnel_frame(b"\x04\x00\x00\x00\x07credit")
        self.assertEqual(protocol.transport.value(), bytes((0x82, 11)) + b"\x04\x00\x00\x00\x07credit")

    def test_not_open(self):
        """Nothing is written once the WebSocket is no longer open."""
        protocol = GatewayTunnelProtocol()
        protocol.state = protocol.STATE_CLOSING
        protocol.transport = StringTransport()
        protocol._send_tunnel_parts(b"HEAD!", b"x")
        self.assertEqual(protocol.transport.value(), b"")


class ReceiveTests(unittest.TestCase):
    """Bytes from the network reach Autobahn's frame parser without its per-read debug line."""

    def test_no_debug_formatting_per_read(self):
        """Autobahn's debug-argument helpers are not called for each read."""
        import autobahn.twisted.websocket as autobahn_twisted

        calls = []
        self.patch(autobahn_twisted, "hltype", lambda *a: calls.append(a))
        self.patch(autobahn_twisted, "hlval", lambda *a: calls.append(a))
        protocol = GatewayTunnelProtocol()
        received = []
        protocol._dataReceived = received.append
        protocol.dataReceived(b"some bytes")
        self.assertEqual((received, calls), ([b"some bytes"], []))


class FrameReaderBindingTests(unittest.SynchronousTestCase):
    """
    An open tunnel reads our unmasked binary frames itself (frame_reader.py)
    and leaves every other frame to Autobahn, however the reads cut them.
    """

    def setUp(self):
        from tests.test_tunnel_flood import open_gateway_protocol

        self.protocol, self.transport = open_gateway_protocol(self)
        self.messages = []
        self.protocol.mux.message_parts_received = (
            lambda parts: self.messages.append(b"".join(parts)))

    def test_cut_anywhere_with_pings_and_masked_frames(self):
        """Fed one byte at a time: every message in order, the masked one (a masking
        client's) through Autobahn, and each ping answered."""
        from tests.test_tunnel_flood import server_frames, ws_frame

        stream = b"".join([
            binary_frame(b"one"), binary_frame(b"x" * 300), ws_frame(9, b"ping-1"),
            binary_frame(b"y" * 70000), ws_frame(2, b"masked", mask=b"abcd"), binary_frame(b""),
            ws_frame(9, b"ping-2"), binary_frame(b"last")])
        for chunk_size in (1, 7, 16384, len(stream)):
            del self.messages[:]
            self.transport.clear()
            for offset in range(0, len(stream), chunk_size):
                self.protocol.dataReceived(stream[offset:offset + chunk_size])
            self.assertEqual(self.messages, [b"one", b"x" * 300, b"y" * 70000, b"masked", b"",
                                             b"last"])
            self.assertEqual(server_frames(self.transport.value()),
                             [(10, b"ping-1"), (10, b"ping-2")])

    def test_frame_too_large(self):
        """A frame announcing more than a message may hold closes the tunnel, unread."""
        self.protocol.dataReceived(struct.pack("!BBQ", 0x82, 127, MAX_MESSAGE + 1) + b"z" * 100)
        self.assertEqual(self.messages, [])
        self.assertNotEqual(self.protocol.state, self.protocol.STATE_OPEN)

    def test_nothing_read_after_the_connection_closes(self):
        """Once a message makes the tunnel close, the frames after it in the same read are
        not delivered."""
        def close_on_bad(parts):
            self.messages.append(b"".join(parts))
            if parts[0] == b"bad":
                self.protocol.dropConnection(abort=True)
        self.protocol.mux.message_parts_received = close_on_bad
        self.protocol.dataReceived(binary_frame(b"good") + binary_frame(b"bad") + binary_frame(b"after"))
        self.assertEqual(self.messages, [b"good", b"bad"])



class GoAwayRoundTripTests(unittest.SynchronousTestCase):
    """
    After our GOAWAY the mux waits for a ping's pong (Mux.when_drained):
    an OPEN the peer sent before it read the GOAWAY comes before that pong.
    """

    def setUp(self):
        from tests.test_tunnel_flood import open_gateway_protocol
        self.protocol, self.transport = open_gateway_protocol(self)
        self.mux = self.protocol.mux

    def sent(self):
        from tests.test_tunnel_flood import server_frames
        found = server_frames(self.transport.value())
        self.transport.clear()
        return found

    def pong(self, payload):
        from tests.test_tunnel_flood import ws_frame
        self.protocol.dataReceived(ws_frame(0xA, payload, mask=b"\x01\x02\x03\x04"))

    def test_ping_after_go_away(self):
        """GOAWAY is followed by a ping; its pong (and not another) ends the wait."""
        self.mux.go_away()
        drained = self.mux.when_drained()
        (goaway, ping) = self.sent()
        self.assertEqual(goaway[0], 0x2)
        self.assertEqual(ping, (0x9, b"goaway"))
        self.assertNoResult(drained)
        self.pong(b"\x00" * 8)  # a pong to some earlier ping
        self.assertNoResult(drained)
        self.pong(b"goaway")
        self.successResultOf(drained)

    def test_later_pings_carry_it(self):
        """
        A congested peer answers only its latest ping: until the round trip
        is over, a liveness ping carries the same payload, so it cannot
        take the place of the one we wait for.
        """
        self.mux.go_away()
        drained = self.mux.when_drained()
        self.sent()
        self.protocol.sendPing()
        self.assertEqual(self.sent(), [(0x9, b"goaway")])
        self.pong(b"goaway")
        self.successResultOf(drained)
        self.protocol.sendPing(b"after")
        self.assertEqual(self.sent(), [(0x9, b"after")])

    def test_connection_lost_ends_the_wait(self):
        from twisted.internet import error
        from twisted.python import failure
        self.mux.go_away()
        drained = self.mux.when_drained()
        self.protocol.connectionLost(failure.Failure(error.ConnectionDone()))
        self.successResultOf(drained)
