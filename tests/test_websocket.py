"""Tests for L{anyproxy.tunnel.websocket}'s own framing of DATA messages."""

import struct

from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from anyproxy.tunnel.websocket import GatewayTunnelProtocol


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
