# -*- test-case-name: tests.test_socks5_udp -*-
"""
SOCKS5 UDP ASSOCIATE (RFC 1928 section 7) on the gateway.

Three layers, smallest first:

 - a sans-I/O codec for the header every relayed datagram carries
   (L{parse_udp_datagram}, L{encode_udp_datagram}); it uses no Twisted;
 - L{UdpRelay}, a C{DatagramProtocol} on the relay port: it checks where a
   datagram came from, unwraps it and hands it to the udp tunnel stream, and
   wraps what the stream brings back for the user;
 - L{Socks5Association}, the protocol of the udp tunnel stream, which owns the
   relay port and ties the three lifetimes together.

Theory of operation
===================

One association is one TCP control connection, one relay port and one udp
tunnel stream, and they live and die together.  RFC 1928 says the association
ends when the control connection does; we also end it when the stream is lost
(the client went away, or refused), closing the control connection so the user
notices, since a UDP user would otherwise send into the void.

The relay port takes datagrams only from the user who asked for it: the
control connection's peer IP, and the port the request named (or, when it
named port 0, the port of the first good datagram).  Anything else is dropped
and counted.  Datagrams are never queued: UDP may lose them, so a congested
tunnel drops them (L{anyproxy.tunnel.stream.Stream.send_datagram} says so)
rather than buffering without bound.  Fragmentation (FRAG != 0) is optional
in the RFC and not implemented: such datagrams are dropped.
"""

import ipaddress
import socket
import struct

import attr
from twisted.internet import error
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger

from anyproxy.datagram_socket import direct_sender, refused_earlier
from anyproxy.frontends.socks5.parser import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    MAX_DOMAIN_LENGTH,
    SocksError,
    _decode_domain,
    _encode_address,
)

# The largest UDP payload: 65,535 less the 8-byte UDP header and, over IPv4,
# the 20-byte IP header (IPv6's 40-byte header is not counted in its length).
MAX_UDP_PAYLOAD_IPV4 = 65507
MAX_UDP_PAYLOAD_IPV6 = 65527
# What the relay socket reads at once: more than any datagram, so none is cut
# short (Twisted's default, 8 KiB, would silently truncate).
RELAY_READ_SIZE = 65535
# Asked for the relay socket's receive buffer.  Bursts from a fast user arrive
# while the reactor is busy elsewhere; the kernel may grant less.
RELAY_RECEIVE_BUFFER = 1024 * 1024

_HEADER = struct.Struct("!HBB")  # RSV, FRAG, ATYP
_PORT = struct.Struct("!H")
# Reply headers remembered per relay (a user talks to few sources at once).
_MAX_CACHED_HEADERS = 256

# Dotted text of 4 address bytes: what ipaddress gives, several times faster.
_ipv4_text = socket.inet_ntoa


# -- the codec (sans-I/O) ---------------------------------------------------


@attr.s(frozen=True, slots=True, kw_only=True)
class UdpDatagram:
    """
    One datagram as the user sends it to the relay.

    @ivar frag: the FRAG byte; 0 for a whole datagram.
    @ivar host: DST.ADDR as text (dotted IPv4, compressed IPv6 or a name).
    @ivar port: DST.PORT.
    @ivar payload: the user data, C{bytes}.
    @ivar address_type: the ATYP byte it came with.
    """

    frag = attr.ib()
    host = attr.ib()
    port = attr.ib()
    payload = attr.ib(repr=lambda payload: "<%d bytes>" % (len(payload),))
    address_type = attr.ib()


def parse_udp_datagram(data):
    """
    Parse the RFC 1928 UDP request header and split off the payload.

    @param data: one whole datagram received on the relay port.
    @return: a L{UdpDatagram}.
    @raise SocksError: truncated header, unknown address type or bad domain.
    """
    if len(data) < _HEADER.size:
        raise SocksError("datagram shorter than the SOCKS5 UDP header")
    # RSV is not checked (as in requests): being lenient costs nothing.
    _reserved, frag, address_type = _HEADER.unpack_from(data)
    offset = _HEADER.size
    if address_type == ATYP_IPV4:
        end = offset + 4
        raw = bytes(data[offset:end])
        host = str(ipaddress.IPv4Address(raw)) if len(raw) == 4 else None
    elif address_type == ATYP_IPV6:
        end = offset + 16
        raw = bytes(data[offset:end])
        host = ipaddress.IPv6Address(raw).compressed if len(raw) == 16 else None
    elif address_type == ATYP_DOMAIN:
        if len(data) < offset + 1:
            raise SocksError("datagram truncated in DST.ADDR")
        end = offset + 1 + data[offset]
        if len(data) < end:
            raise SocksError("datagram truncated in DST.ADDR")
        host = _decode_domain(bytes(data[offset + 1 : end]))
    else:
        raise SocksError("unsupported address type %#04x" % (address_type,))
    if host is None or len(data) < end + _PORT.size:
        raise SocksError("datagram truncated in DST.ADDR or DST.PORT")
    (port,) = _PORT.unpack_from(data, end)
    return UdpDatagram(
        frag=frag,
        host=host,
        port=port,
        payload=bytes(data[end + _PORT.size :]),
        address_type=address_type,
    )


def encode_udp_datagram(host, port, payload):
    """
    Wrap a datagram from C{host:port} for the user (FRAG 0).

    @param host: an IPv4 or IPv6 literal (ATYP 0x01 / 0x04), else a name
        (ATYP 0x03).
    @param port: the source port, 0..65535.
    @return: the bytes to send to the user.
    @raise ValueError: C{host} cannot be encoded or C{port} is out of range.
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError("port %r out of range" % (port,))
    return b"\x00\x00\x00" + _encode_address(host) + _PORT.pack(port) + payload


# -- Twisted adapters ---------------------------------------------------------


def _plain_ip(host):
    """
    C{host} as an C{ipaddress} object without scope id, IPv4-mapped IPv6
    made plain IPv4 (a dual-stack listener shows IPv4 users that way); or
    C{None} if it is not an IP address.
    """
    if not isinstance(host, str):
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class UdpRelay(DatagramProtocol):
    """
    The relay port of one association.

    @ivar stream: the udp tunnel stream datagrams go to (anything with
        C{send_datagram(host, port, payload)}), or C{None} once ended.
    @ivar user_port: the user's source port; 0 until known.
    @ivar forwarded: datagrams sent into the tunnel.
    @ivar returned: datagrams sent back to the user.
    @ivar dropped_source: from an address other than the user's.
    @ivar dropped_malformed: a header that does not parse, or DST.PORT 0.
    @ivar dropped_fragmented: FRAG != 0 (fragmentation is not supported).
    @ivar dropped_tunnel: refused by the stream (congested or closed).
    @ivar dropped_too_large: a reply that would not fit one UDP datagram.
    @ivar dropped_unaddressed: a reply before the user's port was known.
    @ivar dropped_send_error: the relay socket refused to send a reply.
    """

    _log = Logger()

    forwarded = returned = 0
    dropped_source = dropped_malformed = dropped_fragmented = dropped_tunnel = 0
    dropped_too_large = dropped_unaddressed = dropped_send_error = 0

    def __init__(self, user_host, user_port=0, stream=None):
        """
        @param user_host: the IP the user's control connection came from.
        @param user_port: DST.PORT of the request: the port the user will
            send from, or 0 to take it from the first good datagram.
        """
        address = _plain_ip(user_host)
        if address is None:
            raise ValueError("user host %r is not an IP address" % (user_host,))
        self.user_host = str(address)
        self.user_port = user_port
        self._user_address = (self.user_host, user_port)  # where replies go (made again if user_port moves)
        self._sendto = None  # the relay socket's sender (direct_sender), once listening
        self._headers = {}  # (host, port) -> the RFC 1928 header of a reply from there
        self.stream = stream
        if address.version == 4:
            self.max_datagram = MAX_UDP_PAYLOAD_IPV4
        else:
            self.max_datagram = MAX_UDP_PAYLOAD_IPV6

    def counters(self):
        """A dict of every counter, by name (for logs and metrics)."""
        names = (
            "forwarded", "returned", "dropped_source", "dropped_malformed",
            "dropped_fragmented", "dropped_tunnel", "dropped_too_large",
            "dropped_unaddressed", "dropped_send_error",
        )
        return {name: getattr(self, name) for name in names}

    def startProtocol(self):
        self._sendto = direct_sender(self.transport)

    def stopProtocol(self):
        self._sendto = None

    def _from_user(self, host, port):
        if self.user_port and port != self.user_port:
            return False
        if host == self.user_host:
            return True  # the common case, without parsing the address
        address = _plain_ip(host)
        return address is not None and str(address) == self.user_host

    def datagramReceived(self, data, addr):
        host, port = addr[:2]
        if not self._from_user(host, port):
            self.dropped_source += 1
            return
        # The common case, a whole datagram to an IPv4 address, inline: no
        # codec object, no ipaddress object (this runs once per datagram).
        if len(data) >= 10 and data[:4] == b"\x00\x00\x00\x01":
            target_host = _ipv4_text(data[4:8])
            (target_port,) = _PORT.unpack_from(data, 8)
            payload = data[10:]
        else:
            try:
                datagram = parse_udp_datagram(data)
            except SocksError:
                self.dropped_malformed += 1
                return
            if datagram.frag != 0:
                self.dropped_fragmented += 1
                return
            target_host, target_port, payload = datagram.host, datagram.port, datagram.payload
        if target_port == 0:
            self.dropped_malformed += 1  # no target listens on port 0
            return
        if not self.user_port:
            # Locked on the first good datagram, so a stray packet from
            # another program on the user's host cannot claim the relay.
            self.user_port = port
        stream = self.stream
        sent = stream is not None and stream.send_datagram(target_host, target_port, payload)
        if sent:
            self.forwarded += 1
        else:
            self.dropped_tunnel += 1

    def send_to_user(self, host, port, payload):
        """
        Send a datagram that C{host:port} sent through the tunnel to the user.

        @return: C{True} if sent, C{False} if dropped (and counted).
        """
        sendto = self._sendto
        if not self.user_port or sendto is None:
            self.dropped_unaddressed += 1
            return False
        # The header depends only on the source: remember the recent ones.
        headers = self._headers
        header = headers.get((host, port))
        if header is None:
            try:
                header = encode_udp_datagram(host, port, b"")
            except ValueError:
                self.dropped_malformed += 1
                return False
            if len(headers) >= _MAX_CACHED_HEADERS:
                headers.clear()
            headers[(host, port)] = header
        data = header + payload
        if len(data) > self.max_datagram:
            self.dropped_too_large += 1
            return False
        address = self._user_address
        if address[1] != self.user_port:
            address = self._user_address = (self.user_host, self.user_port)
        try:
            sendto(data, address)
        except (OSError, error.MessageLengthError, error.InvalidAddressError) as e:
            if refused_earlier(e):
                self.returned += 1
                return True
            # A full socket buffer (EAGAIN) is congestion: UDP drops, so do we.
            self.dropped_send_error += 1
            self._log.debug("UDP relay: sending to the user failed: {error}", error=str(e))
            return False
        self.returned += 1
        return True


class Socks5Association(Protocol):
    """
    One UDP ASSOCIATE: the protocol of its udp tunnel stream, owner of the
    relay port.

    Connect it to a udp stream (C{connect_protocol(endpoint, association)}),
    then call L{listen}.  L{end} finishes everything; it is called by the
    control connection when it closes, and by this object when the stream is
    lost or on error.

    @ivar relay: the L{UdpRelay}.
    @ivar port: the relay's C{IListeningPort}, once listening.
    @ivar ended: C{True} once L{end} has run.
    """

    _log = Logger()

    def __init__(self, user_host, user_port=0, on_end=None):
        """
        @param user_host: the control connection's peer IP.
        @param user_port: DST.PORT of the UDP ASSOCIATE request.
        @param on_end: called with C{(association, why)} once, when the
            association ends (the control connection closes itself there).
        """
        self.relay = UdpRelay(user_host, user_port)
        self.port = None
        self.ended = False
        self._on_end = on_end
        self._stream_lost = False
        self._released = False
        self._waiters = []

    # the udp stream side

    def connectionMade(self):
        self.relay.stream = self.transport

    def dataReceived(self, data):
        pass  # udp streams carry datagrams only

    def datagram_received(self, host, port, payload):
        """A datagram from the target C{host:port} came through the tunnel."""
        if not self.ended:
            self.relay.send_to_user(host, port, payload)

    def connectionLost(self, reason):
        self._stream_lost = True
        self.end("tunnel stream closed: %s" % (reason.getErrorMessage(),))

    # lifecycle

    def listen(self, reactor, interface):
        """
        Open the relay port on C{interface}, port 0.

        @param reactor: an C{IReactorUDP}.
        @param interface: the local IP the control connection came in on
            (IPv4-mapped IPv6 is listened on as plain IPv4).
        @return: C{(host, port)} of the relay, for BND.ADDR / BND.PORT.
        @raise error.CannotListenError: the port could not be opened.
        """
        address = _plain_ip(interface)
        if address is None or address.is_unspecified:
            raise error.CannotListenError(interface, 0, "not a specific local IP")
        if address.version == 4:
            listen_on = str(address)
        else:
            listen_on = interface  # keeps a link-local scope id
        self.port = reactor.listenUDP(
            0, self.relay, interface=listen_on, maxPacketSize=RELAY_READ_SIZE
        )
        try:
            self.port.getHandle().setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, RELAY_RECEIVE_BUFFER
            )
        except OSError as e:
            self._log.debug("UDP relay: could not grow the receive buffer: {error}", error=str(e))
        return str(address), self.port.getHost().port

    def end(self, why="ended"):
        """
        End the association: release the relay port, close the stream, and
        tell C{on_end}.  Safe to call more than once.
        """
        if self.ended:
            return
        self.ended = True
        self.relay.stream = None
        port, self.port = self.port, None
        stopping = maybeDeferred(port.stopListening) if port is not None else None
        if not self._stream_lost and self.transport is not None:
            self.transport.loseConnection()
        if stopping is None:
            self._port_released(None)
        else:
            stopping.addErrback(self._stop_failed)
            stopping.addCallback(self._port_released)
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self, why)

    def _stop_failed(self, failure):
        self._log.failure("UDP relay: stopListening failed", failure)

    def _port_released(self, _):
        self._released = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_ended(self):
        """A Deferred firing once the association has ended and its port is released."""
        waiter = Deferred()
        if self._released:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter
