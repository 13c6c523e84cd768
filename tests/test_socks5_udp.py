"""
Tests for L{anyproxy.frontends.socks5.relay} and the UDP ASSOCIATE handshake of
L{anyproxy.frontends.socks5.protocol}: the header codec (examples, then hypothesis),
the relay and association on the real reactor with real UDP sockets on
loopback and a fake udp stream, the handshake on StringTransport, and PySocks
through a real listener.
"""

import ipaddress
import socket
import struct
import time

import socks
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from anyproxy.auth import ANONYMOUS, User, UserDatabase
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.frontends.socks5.protocol import Socks5Factory
from anyproxy.frontends.socks5.parser import SocksError
from anyproxy.frontends.socks5.relay import (
    MAX_UDP_PAYLOAD_IPV4,
    MAX_UDP_PAYLOAD_IPV6,
    RELAY_READ_SIZE,
    RELAY_RECEIVE_BUFFER,
    Socks5Association,
    UdpDatagram,
    encode_udp_datagram,
    parse_udp_datagram,
)

USERS = UserDatabase([("alice", "hunter2", "lab")])
# UDP ASSOCIATE for DST 0.0.0.0:0 ("I do not know my address yet").
ASSOCIATE_ANY = b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"


def udp_header(atyp_and_address, port):
    """RSV, FRAG 0, then ATYP+address and port; built independently of the codec."""
    return b"\x00\x00\x00" + atyp_and_address + struct.pack("!H", port)


# -- fakes ----------------------------------------------------------------------


class FakeUdpStream:
    """A udp tunnel stream that records datagrams and lets the test send some back."""

    def __init__(self, accept=True, echo=False):
        self.accept = accept
        self.echo = echo
        self.sent = []
        self.closed = False
        self.protocol = None

    def attach(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self)

    def send_datagram(self, host, port, payload):
        if self.closed or not self.accept:
            return False
        self.sent.append((host, port, payload))
        if self.echo:
            reactor.callLater(0, self.deliver, host, port, payload)
        return True

    def deliver(self, host, port, payload):
        """A datagram from the target C{host:port} arrives through the tunnel."""
        if not self.closed:
            self.protocol.datagram_received(host, port, payload)

    def loseConnection(self):
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone("stream closed")))

    def lose(self):
        """The tunnel side resets the stream."""
        self.closed = True
        self.protocol.connectionLost(Failure(ConnectionLost("stream reset by peer")))


@implementer(IStreamClientEndpoint)
class FakeUdpEndpoint:
    """An endpoint whose udp opens the test completes by hand (or at once)."""

    def __init__(self, immediate=False, echo=False):
        self.immediate = immediate
        self.echo = echo
        self.attempts = []
        self.cancelled = []
        self.streams = []

    def connect(self, factory):
        opening = Deferred(self.cancelled.append)
        self.attempts.append((factory, opening))
        if self.immediate:
            self.succeed()
        return opening

    def succeed(self, stream=None):
        factory, opening = self.attempts[-1]
        stream = stream or FakeUdpStream(echo=self.echo)
        protocol = factory.buildProtocol(None)
        stream.attach(protocol)
        self.streams.append(stream)
        opening.callback(protocol)
        return stream

    def fail(self, exception):
        self.attempts[-1][1].errback(exception)


class FakeUdpPort:
    """What FakeUdpReactor.listenUDP returns; records socket options and stops."""

    def __init__(self, protocol, interface, port, max_packet_size):
        self.protocol = protocol
        self.interface = interface
        self.port = port
        self.max_packet_size = max_packet_size
        self.options = {}
        self.listening = True

    def getHost(self):
        address_class = IPv6Address if ":" in self.interface else IPv4Address
        return address_class("UDP", self.interface, self.port)

    def getHandle(self):
        return self

    def setsockopt(self, level, option, value):
        self.options[(level, option)] = value

    def write(self, data, addr):
        pass

    def stopListening(self):
        self.listening = False
        return succeed(None)


class FakeUdpReactor(Clock):
    """A Clock that also 'listens' on UDP, handing out ports from 40000."""

    def __init__(self):
        super().__init__()
        self.udp_ports = []
        self.refuse = False

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if self.refuse:
            raise CannotListenError(interface, port, OSError("address not available"))
        udp_port = FakeUdpPort(protocol, interface, 40000 + len(self.udp_ports), maxPacketSize)
        self.udp_ports.append(udp_port)
        protocol.makeConnection(udp_port)
        return udp_port


# -- the codec ------------------------------------------------------------------


class UdpCodecTests(SynchronousTestCase):
    """parse_udp_datagram and encode_udp_datagram on fixed examples."""

    def test_parse_ipv4(self):
        """An IPv4 header gives the dotted address, port and payload."""
        parsed = parse_udp_datagram(udp_header(b"\x01\xcb\x00\x71\x05", 53) + b"query")
        self.assertEqual(
            parsed, UdpDatagram(frag=0, host="203.0.113.5", port=53, payload=b"query", address_type=1)
        )

    def test_parse_ipv6(self):
        """An IPv6 header gives the compressed address."""
        raw = ipaddress.IPv6Address("2001:db8::1").packed
        parsed = parse_udp_datagram(udp_header(b"\x04" + raw, 443) + b"x")
        self.assertEqual(
            (parsed.host, parsed.port, parsed.payload, parsed.address_type), ("2001:db8::1", 443, b"x", 4)
        )

    def test_parse_domain(self):
        """A domain header gives the name as sent; an empty payload is fine."""
        parsed = parse_udp_datagram(udp_header(b"\x03\x0bexample.com", 53))
        self.assertEqual(
            (parsed.host, parsed.port, parsed.payload, parsed.address_type), ("example.com", 53, b"", 3)
        )

    def test_parse_utf8_domain(self):
        """A UTF-8 name becomes its IDNA (punycode) form."""
        name = "bücher.example".encode("utf-8")
        parsed = parse_udp_datagram(udp_header(b"\x03" + bytes([len(name)]) + name, 80))
        self.assertEqual(parsed.host, "xn--bcher-kva.example")

    def test_parse_keeps_frag(self):
        """The FRAG byte is reported, not judged, by the codec."""
        parsed = parse_udp_datagram(b"\x00\x00\x07\x01\x7f\x00\x00\x01\x00\x35")
        self.assertEqual(parsed.frag, 7)

    def test_truncated(self):
        """Every cut-short header raises SocksError."""
        whole = udp_header(b"\x01\x7f\x00\x00\x01", 53)
        for cut in range(len(whole)):
            self.assertRaises(SocksError, parse_udp_datagram, whole[:cut])
        domain = udp_header(b"\x03\x0bexample.com", 53)
        for cut in range(len(domain)):
            self.assertRaises(SocksError, parse_udp_datagram, domain[:cut])
        six = udp_header(b"\x04" + b"\x00" * 16, 53)
        self.assertRaises(SocksError, parse_udp_datagram, six[:-1])

    def test_unknown_address_type(self):
        """ATYP other than 1, 3 and 4 raises SocksError."""
        for atyp in (0x00, 0x02, 0x05, 0xFF):
            data = b"\x00\x00\x00" + bytes([atyp]) + b"\x00" * 20
            self.assertRaises(SocksError, parse_udp_datagram, data)

    def test_bad_domains(self):
        """An empty name, a control character or bad UTF-8 raises SocksError."""
        for name in (b"", b"a\x00b", b"a b", b"\xff\xfe"):
            data = udp_header(b"\x03" + bytes([len(name)]) + name, 53)
            self.assertRaises(SocksError, parse_udp_datagram, data)

    def test_domain_too_long_after_idna(self):
        """A name whose IDNA form exceeds 255 bytes is refused (the tunnel could not carry it)."""
        name = ".".join(["é"] * 85).encode("utf-8")  # 254 bytes; each label becomes 'xn--9ca'
        self.assertLessEqual(len(name), 255)
        data = udp_header(b"\x03" + bytes([len(name)]) + name, 53)
        self.assertRaises(SocksError, parse_udp_datagram, data)

    def test_encode_picks_address_type(self):
        """IPv4 and IPv6 literals get ATYP 1 and 4, anything else a domain."""
        self.assertEqual(
            encode_udp_datagram("203.0.113.5", 53, b"a"), udp_header(b"\x01\xcb\x00\x71\x05", 53) + b"a"
        )
        self.assertEqual(
            encode_udp_datagram("::1", 53, b"b"), udp_header(b"\x04" + b"\x00" * 15 + b"\x01", 53) + b"b"
        )
        self.assertEqual(
            encode_udp_datagram("example.com", 53, b"c"), udp_header(b"\x03\x0bexample.com", 53) + b"c"
        )

    def test_encode_refuses(self):
        """Ports out of range and unencodable names raise ValueError."""
        self.assertRaises(ValueError, encode_udp_datagram, "127.0.0.1", 65536, b"")
        self.assertRaises(ValueError, encode_udp_datagram, "127.0.0.1", -1, b"")
        self.assertRaises(ValueError, encode_udp_datagram, "a" * 256, 53, b"")
        self.assertRaises(ValueError, encode_udp_datagram, "", 53, b"")

    def test_payload_limits(self):
        """The named limits are the largest UDP payloads of IPv4 and IPv6."""
        self.assertEqual(MAX_UDP_PAYLOAD_IPV4, 65535 - 20 - 8)
        self.assertEqual(MAX_UDP_PAYLOAD_IPV6, 65535 - 8)
        self.assertGreaterEqual(RELAY_READ_SIZE, MAX_UDP_PAYLOAD_IPV6)


_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
domains = st.lists(_label, min_size=1, max_size=4).map(".".join)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: address.compressed),
    domains,
)


def expected_address_type(host):
    try:
        return {4: 0x01, 6: 0x04}[ipaddress.ip_address(host).version]
    except ValueError:
        return 0x03


class UdpCodecPropertyTests(SynchronousTestCase):
    """Hypothesis: arbitrary bytes never crash the parser; encode/parse round-trips."""

    @given(st.binary(max_size=400))
    @settings(max_examples=1000)
    def test_random_bytes_only_raise_socks_error(self, data):
        """Any input either parses or raises SocksError."""
        try:
            parsed = parse_udp_datagram(data)
        except SocksError:
            return
        self.assertIsInstance(parsed, UdpDatagram)
        self.assertTrue(data.endswith(parsed.payload))

    @given(st.binary(min_size=4, max_size=300).map(lambda data: b"\x00\x00\x00\x03" + data))
    @settings(max_examples=500)
    def test_random_domains_only_raise_socks_error(self, data):
        """Arbitrary domain bytes either parse to a name of at most 255 bytes or raise SocksError."""
        try:
            parsed = parse_udp_datagram(data)
        except SocksError:
            return
        self.assertLessEqual(len(parsed.host), 255)
        parsed.host.encode("ascii")

    @given(hosts, st.integers(min_value=0, max_value=0xFFFF), st.binary(max_size=MAX_UDP_PAYLOAD_IPV4))
    @example("203.0.113.5", 53, b"\x00" * MAX_UDP_PAYLOAD_IPV4)
    @example("2001:db8::1", 65535, b"\xff" * MAX_UDP_PAYLOAD_IPV4)
    @example("a" * 63 + ".example", 1, b"")
    @settings(max_examples=300)
    def test_round_trip(self, host, port, payload):
        """What encode_udp_datagram writes, parse_udp_datagram reads back the same."""
        parsed = parse_udp_datagram(encode_udp_datagram(host, port, payload))
        self.assertEqual(
            parsed,
            UdpDatagram(
                frag=0, host=host, port=port, payload=payload, address_type=expected_address_type(host)
            ),
        )


# -- the relay and the association on loopback ------------------------------------


@inlineCallbacks
def eventually(predicate, timeout=5.0):
    """Wait (on the reactor) until C{predicate()} is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %s seconds" % (timeout,))
        yield deferLater(reactor, 0.005, lambda: None)


@inlineCallbacks
def receive(sock, timeout=5.0):
    """Wait (on the reactor) for one datagram on the non-blocking C{sock}."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sock.recvfrom(70000)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError("no datagram within %s seconds" % (timeout,))
            yield deferLater(reactor, 0.005, lambda: None)


class UdpRelayTests(TestCase):
    """Socks5Association + UdpRelay on 127.0.0.1 with real sockets and a fake stream."""

    timeout = 20

    def udp_socket(self, host="127.0.0.1"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.setblocking(False)
        return sock

    def start(self, user_port=0, accept=True):
        """Listen a relay for a user on 127.0.0.1; returns the relay's (host, port)."""
        self.ends = []
        self.stream = FakeUdpStream(accept=accept)
        self.association = Socks5Association(
            "127.0.0.1", user_port, on_end=lambda association, why: self.ends.append(why)
        )
        self.stream.attach(self.association)
        self.relay = self.association.relay
        relay_address = self.association.listen(reactor, "127.0.0.1")
        self.addCleanup(self.association.when_ended)
        self.addCleanup(self.association.end)
        return relay_address

    @inlineCallbacks
    def send_and_settle(self, sends, relay_address, expected_forwarded):
        """Send each (socket, data), then wait until C{expected_forwarded} were forwarded."""
        for sock, data in sends:
            sock.sendto(data, relay_address)
        yield eventually(lambda: self.relay.forwarded >= expected_forwarded)
        # Loopback delivers in send order, so everything sent has been read by now.

    @inlineCallbacks
    def test_forward(self):
        """Good datagrams reach the stream with their target host, port and payload."""
        relay_address = self.start()
        self.assertEqual(relay_address[0], "127.0.0.1")
        user = self.udp_socket()
        yield self.send_and_settle(
            [
                (user, encode_udp_datagram("203.0.113.5", 53, b"query")),
                (user, encode_udp_datagram("example.com", 5353, b"")),
                (user, encode_udp_datagram("2001:db8::7", 123, b"ntp")),
            ],
            relay_address,
            3,
        )
        self.assertEqual(
            self.stream.sent,
            [("203.0.113.5", 53, b"query"), ("example.com", 5353, b""), ("2001:db8::7", 123, b"ntp")],
        )
        self.assertEqual(self.relay.user_port, user.getsockname()[1])

    @inlineCallbacks
    def test_reply_reaches_user(self):
        """A datagram from the stream comes back to the user with the target's SOCKS header."""
        relay_address = self.start()
        user = self.udp_socket()
        yield self.send_and_settle([(user, encode_udp_datagram("203.0.113.5", 53, b"q"))], relay_address, 1)
        self.stream.deliver("203.0.113.5", 53, b"answer")
        self.stream.deliver("2001:db8::7", 123, b"six")
        data, source = yield receive(user)
        self.assertEqual(source, relay_address)
        self.assertEqual(data, udp_header(b"\x01\xcb\x00\x71\x05", 53) + b"answer")
        data, _ = yield receive(user)
        self.assertEqual(data, udp_header(b"\x04" + ipaddress.IPv6Address("2001:db8::7").packed, 123) + b"six")
        self.assertEqual(self.relay.returned, 2)

    @inlineCallbacks
    def test_largest_datagrams(self):
        """The largest datagram IPv4 carries goes through both ways intact."""
        relay_address = self.start()
        user = self.udp_socket()
        payload = bytes(range(256)) * 256
        payload = payload[: MAX_UDP_PAYLOAD_IPV4 - 10]
        yield self.send_and_settle([(user, encode_udp_datagram("203.0.113.5", 9, payload))], relay_address, 1)
        self.assertEqual(self.stream.sent, [("203.0.113.5", 9, payload)])
        self.stream.deliver("203.0.113.5", 9, payload)
        data, _ = yield receive(user)
        self.assertEqual(data[10:], payload)

    @inlineCallbacks
    def test_reply_too_large_dropped(self):
        """A reply that cannot fit one IPv4 datagram with its header is dropped and counted."""
        relay_address = self.start()
        user = self.udp_socket()
        yield self.send_and_settle([(user, encode_udp_datagram("203.0.113.5", 9, b"q"))], relay_address, 1)
        self.assertFalse(self.relay.send_to_user("203.0.113.5", 9, b"x" * MAX_UDP_PAYLOAD_IPV4))
        self.assertEqual(self.relay.dropped_too_large, 1)

    @inlineCallbacks
    def test_fragments_dropped(self):
        """FRAG != 0 is dropped and counted."""
        relay_address = self.start()
        user = self.udp_socket()
        fragment = b"\x00\x00\x01" + encode_udp_datagram("203.0.113.5", 53, b"part")[3:]
        yield self.send_and_settle(
            [(user, fragment), (user, encode_udp_datagram("203.0.113.5", 53, b"whole"))], relay_address, 1
        )
        self.assertEqual(self.stream.sent, [("203.0.113.5", 53, b"whole")])
        self.assertEqual(self.relay.dropped_fragmented, 1)

    @inlineCallbacks
    def test_malformed_dropped(self):
        """Truncated headers, unknown ATYP and DST.PORT 0 are dropped and counted."""
        relay_address = self.start()
        user = self.udp_socket()
        bad = [
            b"\x00\x00",
            b"\x00\x00\x00\x01\x7f\x00",
            b"\x00\x00\x00\x02\x7f\x00\x00\x01\x00\x35",
            b"\x00\x00\x00\x03\x00\x00\x35",
            encode_udp_datagram("203.0.113.5", 0, b"nowhere"),
        ]
        yield self.send_and_settle(
            [(user, data) for data in bad] + [(user, encode_udp_datagram("203.0.113.5", 53, b"ok"))],
            relay_address,
            1,
        )
        self.assertEqual(self.stream.sent, [("203.0.113.5", 53, b"ok")])
        self.assertEqual(self.relay.dropped_malformed, len(bad))

    @inlineCallbacks
    def test_other_ip_dropped(self):
        """A datagram from another IP (127.0.0.2) is dropped, and does not claim the relay."""
        relay_address = self.start()
        stranger = self.udp_socket("127.0.0.2")
        user = self.udp_socket()
        yield self.send_and_settle(
            [
                (stranger, encode_udp_datagram("203.0.113.5", 53, b"evil")),
                (user, encode_udp_datagram("203.0.113.5", 53, b"good")),
            ],
            relay_address,
            1,
        )
        self.assertEqual(self.stream.sent, [("203.0.113.5", 53, b"good")])
        self.assertEqual(self.relay.dropped_source, 1)
        self.assertEqual(self.relay.user_port, user.getsockname()[1])

    @inlineCallbacks
    def test_locked_to_first_port(self):
        """With DST.PORT 0 the first good datagram's port is kept; other ports are dropped."""
        relay_address = self.start()
        user, other = self.udp_socket(), self.udp_socket()
        yield self.send_and_settle(
            [
                (user, encode_udp_datagram("203.0.113.5", 53, b"first")),
                (other, encode_udp_datagram("203.0.113.5", 53, b"other port")),
                (user, encode_udp_datagram("203.0.113.5", 53, b"second")),
            ],
            relay_address,
            2,
        )
        self.assertEqual([payload for _, _, payload in self.stream.sent], [b"first", b"second"])
        self.assertEqual(self.relay.dropped_source, 1)
        self.stream.deliver("203.0.113.5", 53, b"back")
        data, _ = yield receive(user)
        self.assertTrue(data.endswith(b"back"))

    @inlineCallbacks
    def test_requested_port(self):
        """A non-zero DST.PORT is the only port taken, even before anything was sent."""
        user, other = self.udp_socket(), self.udp_socket()
        relay_address = self.start(user_port=user.getsockname()[1])
        self.stream.deliver("203.0.113.5", 53, b"early")
        data, _ = yield receive(user)
        self.assertTrue(data.endswith(b"early"))
        yield self.send_and_settle(
            [
                (other, encode_udp_datagram("203.0.113.5", 53, b"other")),
                (user, encode_udp_datagram("203.0.113.5", 53, b"user")),
            ],
            relay_address,
            1,
        )
        self.assertEqual(self.stream.sent, [("203.0.113.5", 53, b"user")])
        self.assertEqual(self.relay.dropped_source, 1)

    def test_reply_before_user_known(self):
        """A reply before the user's port is known has nowhere to go: dropped and counted."""
        self.start()
        self.stream.deliver("203.0.113.5", 53, b"early")
        self.assertEqual(self.relay.dropped_unaddressed, 1)

    @inlineCallbacks
    def test_congested_tunnel(self):
        """A datagram the stream refuses is counted as dropped by the tunnel."""
        relay_address = self.start(accept=False)
        user = self.udp_socket()
        user.sendto(encode_udp_datagram("203.0.113.5", 53, b"q"), relay_address)
        yield eventually(lambda: self.relay.dropped_tunnel == 1)
        self.assertEqual(self.relay.forwarded, 0)

    def test_receive_buffer_and_read_size(self):
        """The relay socket asks for a large receive buffer and reads whole datagrams."""
        self.start()
        port = self.association.port
        self.assertEqual(port.maxPacketSize, RELAY_READ_SIZE)
        granted = port.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.assertGreater(granted, 64 * 1024)  # the kernel may cap (and Linux doubles) the request

    @inlineCallbacks
    def test_end_releases_port_and_closes_stream(self):
        """Ending the association closes the stream and frees the relay port."""
        relay_address = self.start()
        self.association.end("test")
        self.assertTrue(self.stream.closed)
        self.assertEqual(self.ends, ["test"])
        yield self.association.when_ended()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(relay_address)  # fails with EADDRINUSE if still held
        self.association.end("again")
        self.assertEqual(self.ends, ["test"])

    @inlineCallbacks
    def test_stream_loss_ends_association(self):
        """A lost stream ends the association and releases the port."""
        relay_address = self.start()
        self.stream.lose()
        self.assertTrue(self.association.ended)
        self.assertEqual(len(self.ends), 1)
        self.assertIn("stream", self.ends[0])
        yield self.association.when_ended()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(relay_address)


# -- the UDP ASSOCIATE handshake on StringTransport ----------------------------------


class UdpAssociateProtocolTests(SynchronousTestCase):
    """Socks5Protocol's UDP ASSOCIATE on StringTransport, a fake reactor and a fake endpoint."""

    def connect_user(self, users=UserDatabase(), host="192.0.2.1", peer="192.0.2.7"):
        self.reactor = FakeUdpReactor()
        self.endpoint = FakeUdpEndpoint()
        self.asked = []

        def endpoint_for(user, host, port, kind="tcp", source=""):
            self.asked.append((user, host, port, kind))
            return self.endpoint

        factory = Socks5Factory(users, endpoint_for, self.reactor, handshake_timeout=5.0)
        address_class = IPv6Address if ":" in host else IPv4Address
        self.protocol = factory.buildProtocol(address_class("TCP", peer, 5555))
        self.transport = StringTransport(
            hostAddress=address_class("TCP", host, 1080), peerAddress=address_class("TCP", peer, 5555)
        )
        self.protocol.makeConnection(self.transport)

    def send(self, data):
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value()

    def associate(self, request=ASSOCIATE_ANY, **kwargs):
        """Connect, greet without auth and send C{request}; returns the fake stream."""
        self.connect_user(**kwargs)
        self.assertEqual(self.send(b"\x05\x01\x00"), b"\x05\x00")
        self.assertEqual(self.send(request), b"")
        return self.endpoint.succeed()

    def test_reply_carries_relay_address(self):
        """The udp stream is opened first, then the relay listens on our IP and is announced."""
        self.connect_user()
        self.send(b"\x05\x01\x00")
        self.send(ASSOCIATE_ANY)
        self.assertEqual(self.asked, [(ANONYMOUS, "0.0.0.0", 0, "udp")])
        self.assertEqual(self.reactor.udp_ports, [])  # nothing listens before the stream is open
        self.assertEqual(self.transport.producerState, "producing")  # to see the user leave
        self.endpoint.succeed()
        (port,) = self.reactor.udp_ports
        self.assertEqual(port.interface, "192.0.2.1")
        self.assertEqual(
            self.transport.value(), b"\x05\x00\x00\x01\xc0\x00\x02\x01" + struct.pack("!H", 40000)
        )
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(port.max_packet_size, RELAY_READ_SIZE)
        self.assertEqual(port.options, {(socket.SOL_SOCKET, socket.SO_RCVBUF): RELAY_RECEIVE_BUFFER})

    def test_relay_knows_the_user(self):
        """The relay accepts the control connection's peer IP and the request's DST.PORT."""
        self.associate(b"\x05\x03\x00\x01\x0a\x00\x00\x09\x10\xe1")  # 10.0.0.9:4321; the IP is not trusted
        relay = self.reactor.udp_ports[0].protocol
        self.assertEqual((relay.user_host, relay.user_port), ("192.0.2.7", 4321))

    def test_ipv6_control_connection(self):
        """Over IPv6 the relay listens on our IPv6 address and BND.ADDR is IPv6."""
        self.associate(host="2001:db8::1", peer="2001:db8::7")
        self.assertEqual(self.reactor.udp_ports[0].interface, "2001:db8::1")
        self.assertEqual(
            self.transport.value(),
            b"\x05\x00\x00\x04" + ipaddress.IPv6Address("2001:db8::1").packed + struct.pack("!H", 40000),
        )
        self.assertEqual(self.reactor.udp_ports[0].protocol.max_datagram, MAX_UDP_PAYLOAD_IPV6)

    def test_ipv4_mapped_control_connection(self):
        """An IPv4 user on a dual-stack listener gets a plain IPv4 relay."""
        self.associate(host="::ffff:192.0.2.1", peer="::ffff:192.0.2.7")
        port = self.reactor.udp_ports[0]
        self.assertEqual(port.interface, "192.0.2.1")
        self.assertEqual(port.protocol.user_host, "192.0.2.7")
        self.assertEqual(self.transport.value()[:8], b"\x05\x00\x00\x01\xc0\x00\x02\x01")

    def test_each_reason_gives_its_reply_code(self):
        """A refused udp open gives the REP code of DESIGN section 5, and no relay port."""
        expected = {
            Reason.PROTOCOL_NOT_ALLOWED: 0x02,
            Reason.NOT_ALLOWED: 0x02,
            Reason.NO_TUNNEL: 0x01,
            Reason.OVERLOADED: 0x01,
            Reason.TIMED_OUT: 0x06,
            Reason.GENERAL_FAILURE: 0x01,
        }
        for reason, code in expected.items():
            self.connect_user()
            self.send(b"\x05\x01\x00")
            self.send(ASSOCIATE_ANY)
            self.endpoint.fail(StreamOpenError(reason))
            self.assertEqual(self.transport.value()[:2], bytes([5, code]), reason)
            self.assertTrue(self.transport.disconnecting)
            self.assertEqual(self.reactor.udp_ports, [])

    def test_endpoint_for_raises(self):
        """endpoint_for refusing at once gives its REP code."""
        self.connect_user()

        def refuse(user, host, port, kind="tcp", source=""):
            raise StreamOpenError(Reason.PROTOCOL_NOT_ALLOWED, "udp refused")

        self.protocol.factory.endpoint_for = refuse
        self.send(b"\x05\x01\x00")
        self.assertEqual(self.send(ASSOCIATE_ANY)[:2], b"\x05\x02")
        self.assertTrue(self.transport.disconnecting)

    def test_cannot_listen(self):
        """If no relay port can be opened: general failure, and the stream is closed."""
        self.connect_user()
        self.reactor.refuse = True
        self.send(b"\x05\x01\x00")
        self.send(ASSOCIATE_ANY)
        stream = self.endpoint.succeed()
        self.assertEqual(self.transport.value()[:2], b"\x05\x01")
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(stream.closed)

    def test_stream_closed_at_once(self):
        """A stream that is gone before the reply gives general failure and no relay."""
        self.connect_user()
        self.send(b"\x05\x01\x00")
        self.send(ASSOCIATE_ANY)
        stream = FakeUdpStream()
        stream.closed = True
        factory, opening = self.endpoint.attempts[-1]
        association = factory.buildProtocol(None)
        stream.attach(association)
        stream.lose()
        opening.callback(association)
        self.assertEqual(self.transport.value()[:2], b"\x05\x01")
        self.assertEqual(self.reactor.udp_ports, [])

    def test_user_leaves_while_opening(self):
        """A user leaving during the udp open cancels it; no relay is opened."""
        self.connect_user()
        self.send(b"\x05\x01\x00")
        self.send(ASSOCIATE_ANY)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.endpoint.cancelled), 1)
        self.assertEqual(self.reactor.udp_ports, [])

    def test_control_bytes_discarded(self):
        """Bytes on the control connection are ignored; it stays open."""
        self.associate()
        self.assertEqual(self.send(b"anything at all"), b"")
        self.assertFalse(self.transport.disconnecting)
        self.assertTrue(self.reactor.udp_ports[0].listening)

    def test_eof_ends_association(self):
        """The user's EOF on the control connection ends the association."""
        stream = self.associate()
        self.protocol.readConnectionLost()
        self.assertFalse(self.reactor.udp_ports[0].listening)
        self.assertTrue(stream.closed)
        self.assertTrue(self.transport.disconnecting)

    def test_close_ends_association(self):
        """The control connection closing ends the association."""
        stream = self.associate()
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.reactor.udp_ports[0].listening)
        self.assertTrue(stream.closed)

    def test_stream_loss_closes_control(self):
        """A lost stream releases the relay and closes the control connection."""
        stream = self.associate()
        stream.lose()
        self.assertFalse(self.reactor.udp_ports[0].listening)
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def test_userpass_then_associate(self):
        """With users configured, the authenticated user's udp stream is asked for."""
        self.connect_user(users=USERS)
        self.assertEqual(self.send(b"\x05\x01\x02"), b"\x05\x02")
        self.assertEqual(self.send(b"\x01\x05alice\x07hunter2"), b"\x01\x00")
        self.send(ASSOCIATE_ANY)
        self.assertEqual(self.asked, [(User(name="alice", group="lab"), "0.0.0.0", 0, "udp")])
        self.endpoint.succeed()
        self.assertEqual(self.transport.value()[:2], b"\x05\x00")

    def test_wrong_password_no_association(self):
        """A wrong password is refused before any udp stream is asked for."""
        self.connect_user(users=USERS)
        self.send(b"\x05\x01\x02")
        self.assertEqual(self.send(b"\x01\x05alice\x05wrong" + ASSOCIATE_ANY), b"\x01\x01")
        self.assertEqual(self.asked, [])

    def test_bind_still_unsupported(self):
        """BIND still gets REP 0x07."""
        self.connect_user()
        self.send(b"\x05\x01\x00")
        self.assertEqual(self.send(b"\x05\x02" + ASSOCIATE_ANY[2:])[:2], b"\x05\x07")
        self.assertTrue(self.transport.disconnecting)


# -- PySocks through a real listener ---------------------------------------------------


def pysocks_udp_exchange(proxy_port, payloads):
    """In a thread: UDP through the proxy with PySocks; returns what came back."""
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(10)
    try:
        sock.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port)
        received = []
        for payload in payloads:
            sock.sendto(payload, ("203.0.113.5", 7))
            received.append(sock.recvfrom(70000))
        return received
    finally:
        sock.close()


def pysocks_control_eof(proxy_port, on_associated):
    """In a thread: associate, tell the reactor, then wait for EOF on the control connection."""
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(10)
    try:
        sock.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port)
        sock.bind(("127.0.0.1", 0))  # PySocks associates here
        reactor.callFromThread(on_associated)
        return sock._proxyconn.recv(1)
    finally:
        sock.close()


class UdpAssociateLoopbackTests(TestCase):
    """PySocks UDP through a real SOCKS5 listener on 127.0.0.1 to an echoing fake stream."""

    timeout = 30

    def start(self):
        self.endpoint = FakeUdpEndpoint(immediate=True, echo=True)
        factory = Socks5Factory(
            UserDatabase(), lambda user, host, port, kind="tcp", source="": self.endpoint, reactor
        )
        proxy_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(proxy_port.stopListening)
        return proxy_port.getHost().port

    @inlineCallbacks
    def test_pysocks_echo_and_release(self):
        """Datagrams go through and back; closing the control connection frees the relay port."""
        proxy = self.start()
        received = yield deferToThread(pysocks_udp_exchange, proxy, [b"ping", b"", b"x" * 60000])
        self.assertEqual(
            received,
            [(b"ping", ("203.0.113.5", 7)), (b"", ("203.0.113.5", 7)), (b"x" * 60000, ("203.0.113.5", 7))],
        )
        (stream,) = self.endpoint.streams
        association = stream.protocol
        yield eventually(lambda: association.ended)
        yield association.when_ended()
        self.assertTrue(stream.closed)
        self.assertEqual(association.relay.counters()["forwarded"], 3)

    @inlineCallbacks
    def test_stream_loss_closes_control_connection(self):
        """When the udp stream is lost the user sees its control connection close."""
        proxy = self.start()

        def associated():
            self.endpoint.streams[0].lose()

        eof = yield deferToThread(pysocks_control_eof, proxy, associated)
        self.assertEqual(eof, b"")
        yield self.endpoint.streams[0].protocol.when_ended()
