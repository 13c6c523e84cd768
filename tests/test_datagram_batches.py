"""
DATAGRAMS frames: several datagrams of a udp stream in one WebSocket message,
sent only to a peer whose HELLO says it takes them (anyproxy.tunnel.mux,
anyproxy.tunnel.frames); and anyproxy.datagram_socket.
"""

import errno
import socket

from twisted.trial.unittest import SynchronousTestCase

from anyproxy.datagram_socket import direct_sender, refused_earlier
from anyproxy.tunnel import frames
from anyproxy.tunnel.mux import MAX_DATAGRAMS_FRAME
from tests.test_mux import DatagramRecorder, MuxPair, of_type


def batching_pair(gateway_takes=True, client_takes=True):
    """
    A L{MuxPair} whose muxes have exchanged HELLOs, and a udp stream the
    gateway opened: C{(pair, opener, opener protocol, acceptor, acceptor protocol)}.
    """
    pair = MuxPair()
    if client_takes:
        pair.client.send_hello({"version": 1})
    else:
        pair.to_gateway.append(frames.encode(frames.Hello({"version": 1})))
    if gateway_takes:
        pair.gateway.send_hello({})
    else:
        pair.to_client.append(frames.encode(frames.Hello({})))
    pair.pump()
    opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
        DatagramRecorder(), DatagramRecorder(), kind="udp")
    del pair.sent_by_gateway[:], pair.sent_by_client[:]
    return pair, opener, opener_protocol, acceptor, acceptor_protocol


class DatagramsFrameTests(SynchronousTestCase):
    """The DATAGRAMS frame's bytes (docs/PROTOCOL.md)."""

    def test_bytes(self):
        """Each datagram is its address, a u16 length and the bytes, in order."""
        frame = frames.Datagrams(6, (("10.0.0.1", 53, b"ab"), ("h", 1, b"")))
        encoded = frames.encode(frame)
        self.assertEqual(encoded, b"\x09\x00\x00\x00\x06" + b"\x00\x35\x08" + b"10.0.0.1"
                         + b"\x00\x02ab" + b"\x00\x01\x01h\x00\x00")
        self.assertEqual(frames.decode(encoded), frame)

    def test_invalid(self):
        """No datagram, a truncated record or an empty host is a FrameError."""
        good = frames.encode(frames.Datagrams(6, (("h", 1, b"abc"),)))
        for message in (good[:5], good[:-1], good[:5] + b"\x00\x01", good[:5] + b"\x00\x01\x00\x00\x00",
                        good[:5] + b"\x00\x01\x01h\x00"):
            self.assertRaises(frames.FrameError, frames.decode, message)
        self.assertRaises(frames.FrameError, frames.encode, frames.Datagrams(6, ()))
        self.assertRaises(frames.FrameError, frames.encode,
                          frames.Datagrams(6, (("h", 1, b"x" * 65536),)))


class BatchingTests(SynchronousTestCase):
    """A turn's datagrams after the first travel in one DATAGRAMS frame, if the peer takes them."""

    def test_first_at_once_then_batched(self):
        """The first datagram goes at once; the rest wait for the end of the turn, in one frame."""
        pair, opener, _, _, acceptor_protocol = batching_pair()
        for n in range(3):
            self.assertTrue(opener.send_datagram("10.0.0.1", 53, b"q%d" % n))
        self.assertEqual(pair.sent_by_gateway, [frames.Datagram(opener.stream_id, "10.0.0.1", 53, b"q0")])
        pair.clock.advance(0)
        self.assertEqual(pair.sent_by_gateway[1:], [frames.Datagrams(
            opener.stream_id, (("10.0.0.1", 53, b"q1"), ("10.0.0.1", 53, b"q2")))])
        pair.pump()
        self.assertEqual(acceptor_protocol.datagrams, [("10.0.0.1", 53, b"q%d" % n) for n in range(3)])
        self.assertEqual((opener.bytes_sent, pair.gateway.bytes_sent, pair.client.bytes_received), (6, 6, 6))
        # The next turn starts with a datagram sent at once again.
        opener.send_datagram("10.0.0.1", 53, b"q3")
        self.assertEqual(pair.sent_by_gateway[-1], frames.Datagram(opener.stream_id, "10.0.0.1", 53, b"q3"))

    def test_not_to_a_peer_without_the_key(self):
        """A peer whose HELLO lacks the key (an older one) gets one DATAGRAM per datagram."""
        pair, opener, _, acceptor, _ = batching_pair(client_takes=False)
        for n in range(3):
            opener.send_datagram("h", 1, b"%d" % n)
            acceptor.send_datagram("h", 1, b"%d" % n)
        pair.clock.advance(0)
        self.assertEqual([type(frame) for frame in pair.sent_by_gateway], [frames.Datagram] * 3)
        # The client's peer, the gateway, takes them.
        self.assertEqual([type(frame) for frame in pair.sent_by_client], [frames.Datagram, frames.Datagrams])
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_not_overtaken_by_fin(self):
        """Closing the stream sends the waiting batch before the FIN."""
        pair, opener, _, _, acceptor_protocol = batching_pair()
        opener.send_datagram("h", 1, b"a")
        opener.send_datagram("h", 1, b"b")
        opener.loseConnection()
        self.assertEqual([type(frame) for frame in pair.sent_by_gateway],
                         [frames.Datagram, frames.Datagrams, frames.Fin])
        pair.pump()
        self.assertEqual(acceptor_protocol.datagrams, [("h", 1, b"a"), ("h", 1, b"b")])

    def test_full_batch_goes_at_once(self):
        """A batch of MAX_DATAGRAMS_FRAME bytes is sent without waiting for the turn to end."""
        pair, opener, _, _, acceptor_protocol = batching_pair()
        payload = b"x" * 1200
        count = MAX_DATAGRAMS_FRAME // 1200 + 2
        for _ in range(count):
            opener.send_datagram("h", 1, payload)
        batches = of_type(pair.sent_by_gateway, frames.Datagrams)
        self.assertEqual(len(batches), 1)
        self.assertGreaterEqual(len(frames.encode(batches[0])), MAX_DATAGRAMS_FRAME)
        pair.clock.advance(0)
        pair.pump()
        self.assertEqual(len(acceptor_protocol.datagrams), count)

    def test_each_stream_its_own_batch(self):
        """Datagrams of two streams in one turn go in one batch per stream."""
        pair, first, _, _, first_protocol = batching_pair()
        second, _, _, second_protocol = pair.open(DatagramRecorder(), DatagramRecorder(), kind="udp")
        first.send_datagram("h", 1, b"0")
        for n in range(2):
            first.send_datagram("h", 1, b"a%d" % n)
            second.send_datagram("h", 2, b"b%d" % n)
        pair.clock.advance(0)
        pair.pump()
        self.assertEqual(first_protocol.datagrams, [("h", 1, b"0"), ("h", 1, b"a0"), ("h", 1, b"a1")])
        self.assertEqual(second_protocol.datagrams, [("h", 2, b"b0"), ("h", 2, b"b1")])

    def test_lost_tunnel_drops_the_batch(self):
        """When the tunnel is lost the waiting batch is dropped and its timer cancelled."""
        pair, opener, _, _, _ = batching_pair()
        opener.send_datagram("h", 1, b"a")
        opener.send_datagram("h", 1, b"b")
        pair.gateway.connection_lost()
        self.assertEqual(pair.clock.getDelayedCalls(), [])
        self.assertEqual(of_type(pair.sent_by_gateway, frames.Datagrams), [])


class ReceivingTests(SynchronousTestCase):
    """DATAGRAMS frames as the WebSocket binding hands them over (message_parts_received)."""

    def test_delivered_in_order(self):
        """Each datagram reaches the stream's protocol; bytes are counted."""
        pair, opener, opener_protocol, _, _ = batching_pair()
        message = frames.encode(frames.Datagrams(opener.stream_id, (("h", 1, b"one"), ("::1", 2, b"two"))))
        pair.gateway.message_parts_received([message[:7], message[7:]])
        self.assertEqual(opener_protocol.datagrams, [("h", 1, b"one"), ("::1", 2, b"two")])
        self.assertEqual((opener.bytes_received, pair.gateway.bytes_received), (6, 6))

    def test_unknown_stream_dropped(self):
        """DATAGRAMS for a stream we do not have are dropped and counted, not answered."""
        pair, _, _, _, _ = batching_pair()
        pair.gateway.message_parts_received([frames.encode(frames.Datagrams(99, (("h", 1, b"a"), ("h", 1, b"b"))))])
        self.assertEqual((pair.gateway.datagrams_dropped, pair.sent_by_gateway), (2, []))

    def test_malformed_is_protocol_error(self):
        """A truncated DATAGRAMS frame is a protocol error."""
        pair, opener, _, _, _ = batching_pair()
        message = frames.encode(frames.Datagrams(opener.stream_id, (("h", 1, b"abc"),)))
        pair.gateway.message_parts_received([message[:-1]])
        self.assertEqual(len(pair.gateway_errors), 1)
        self.assertIsInstance(pair.gateway_errors[0], frames.FrameError)

    def test_on_a_tcp_stream_is_protocol_error(self):
        """DATAGRAMS on a tcp stream is a protocol error, as DATAGRAM is."""
        pair = MuxPair()
        opener, _, _, _ = pair.open()
        pair.gateway.message_parts_received([frames.encode(frames.Datagrams(opener.stream_id, (("h", 1, b"a"),)))])
        self.assertEqual(len(pair.gateway_errors), 1)


class DirectSenderTests(SynchronousTestCase):
    """direct_sender and refused_earlier."""

    def test_real_socket(self):
        """A port whose handle is a socket gets that socket's sendto."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)

        class Port:
            def getHandle(self):
                return sock

            def write(self, data, addr):
                raise AssertionError("not used")

        sender = direct_sender(Port())
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(("127.0.0.1", 0))
        sender(b"hello", receiver.getsockname())
        receiver.settimeout(5)
        self.assertEqual(receiver.recv(100), b"hello")

    def test_fake_port(self):
        """A port without a socket handle (a test's fake) is written to as before."""
        written = []

        class Port:
            def write(self, data, addr):
                written.append((data, addr))

        direct_sender(Port())(b"x", ("127.0.0.1", 9))
        self.assertEqual(written, [(b"x", ("127.0.0.1", 9))])

    def test_refused_earlier(self):
        """Only ECONNREFUSED is an earlier datagram's refusal."""
        self.assertTrue(refused_earlier(ConnectionRefusedError(errno.ECONNREFUSED, "refused")))
        self.assertFalse(refused_earlier(BlockingIOError(errno.EAGAIN, "full")))
        self.assertFalse(refused_earlier(ValueError("x")))
