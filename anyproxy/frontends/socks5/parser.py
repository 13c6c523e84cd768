# -*- test-case-name: tests.test_socks5_parser -*-
"""
Sans-I/O SOCKS5 server handshake (RFC 1928, RFC 1929 username/password).

No sockets, no clocks, no Twisted: feed bytes with L{Socks5Server.receive_data},
pull events with L{Socks5Server.next_event}, and send the bytes returned by
L{Socks5Server.choose_method}, L{Socks5Server.auth_reply} and
L{Socks5Server.reply}.  The shape follows h11's C{_connection.py}.

Theory of operation
===================

The client speaks first and then waits for an answer at every step, so the
handshake is a strict alternation.  The parser's state says whose turn it is::

    AWAIT_GREETING  --Greeting-->      SEND_METHOD
    AWAIT_GREETING  --Socks4Request--> SEND_SOCKS4_REFUSAL
    SEND_SOCKS4_REFUSAL --refuse-->    CLOSED
    SEND_METHOD     --choose 0x00-->   AWAIT_REQUEST
    SEND_METHOD     --choose 0x02-->   AWAIT_AUTH
    SEND_METHOD     --choose 0xFF-->   CLOSED
    AWAIT_AUTH      --UserPassAuth-->  SEND_AUTH_REPLY
    SEND_AUTH_REPLY --auth ok-->       AWAIT_REQUEST
    SEND_AUTH_REPLY --auth failed-->   CLOSED
    AWAIT_REQUEST   --Request-->       SEND_REPLY
    SEND_REPLY      --reply 0x00-->    DONE
    SEND_REPLY      --reply other-->   CLOSED

In the C{AWAIT_*} states L{Socks5Server.next_event} parses the next message;
in every other state it returns L{PAUSED} (a client that pipelines its
messages keeps them buffered until it is their turn).  After the L{Request}
the parser reads nothing more: what is left in the buffer is payload, found in
L{Socks5Server.trailing_data}.

Malformed input raises L{SocksError} and moves the parser to C{ERROR}, where
every later C{next_event} raises again.  C{SocksError.reply_code} says how to
answer: a REP code for errors inside a request (then L{Socks5Server.reply} may
still be called once, to send that error reply), or C{None} to close the
connection without a word (e.g. a greeting that is not SOCKS at all).

A SOCKS4 or SOCKS4a request in place of the greeting is read whole (its
user id, and the 4a domain name) and becomes a L{Socks4Request};
L{Socks5Server.refuse_socks4} answers it with the SOCKS4 rejection (VN 0,
CD 91), as dante does, so that the client reports a clear error rather
than a connection closed without a word.
Calling a method when it is not our turn is a bug in the caller and raises
L{SocksStateError}, which is deliberately not a L{SocksError}.

Usernames and passwords are kept as C{bytes}: RFC 1929 does not name an
encoding, and L{anyproxy.auth.UserDatabase.authenticate} compares bytes.
"""

import functools
import ipaddress
import struct

import attr

from anyproxy.sentinels import sentinel

SOCKS_VERSION = 0x05
SOCKS4_VERSION = 0x04
SOCKS4_REPLY_VERSION = 0x00  # VN of a SOCKS4 reply
SOCKS4_REJECTED = 91  # CD: request rejected or failed
AUTH_VERSION = 0x01  # RFC 1929 sub-negotiation version

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_HOST_UNREACHABLE = 0x04
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

# Limits.  Every field is length-prefixed by one byte, so each message is
# bounded by construction: a greeting carries at most 255 methods, a username
# and a password at most 255 bytes each, a domain name at most 255 bytes.
MAX_METHODS = 255
MAX_CREDENTIAL_LENGTH = 255
MAX_DOMAIN_LENGTH = 255
# The whole handshake buffer, checked until the request has been parsed: the
# three largest messages (257 + 513 + 262 bytes) plus ample room for payload a
# client pipelines behind its request.  A client past this is not speaking
# SOCKS5 in good faith and is closed.  (After the request the buffer is the
# caller's: it stops feeding the parser and forwards trailing_data.)
MAX_HANDSHAKE_BUFFER = 16 * 1024


NEED_DATA = sentinel("NEED_DATA")
PAUSED = sentinel("PAUSED")

AWAIT_GREETING = sentinel("AWAIT_GREETING")
SEND_METHOD = sentinel("SEND_METHOD")
SEND_SOCKS4_REFUSAL = sentinel("SEND_SOCKS4_REFUSAL")
AWAIT_AUTH = sentinel("AWAIT_AUTH")
SEND_AUTH_REPLY = sentinel("SEND_AUTH_REPLY")
AWAIT_REQUEST = sentinel("AWAIT_REQUEST")
SEND_REPLY = sentinel("SEND_REPLY")
DONE = sentinel("DONE")
CLOSED = sentinel("CLOSED")
ERROR = sentinel("ERROR")

# (state, move) -> next state.  Moves are the events we parse and the
# answers we send.
_TRANSITIONS = {
    (AWAIT_GREETING, "Greeting"): SEND_METHOD,
    (AWAIT_GREETING, "Socks4Request"): SEND_SOCKS4_REFUSAL,
    (SEND_SOCKS4_REFUSAL, "refuse socks4"): CLOSED,
    (SEND_METHOD, "method no-auth"): AWAIT_REQUEST,
    (SEND_METHOD, "method user/pass"): AWAIT_AUTH,
    (SEND_METHOD, "method refused"): CLOSED,
    (AWAIT_AUTH, "UserPassAuth"): SEND_AUTH_REPLY,
    (SEND_AUTH_REPLY, "auth ok"): AWAIT_REQUEST,
    (SEND_AUTH_REPLY, "auth failed"): CLOSED,
    (AWAIT_REQUEST, "Request"): SEND_REPLY,
    (SEND_REPLY, "reply ok"): DONE,
    (SEND_REPLY, "reply error"): CLOSED,
    (ERROR, "reply error"): CLOSED,  # only when the error left a reply owed
}


class SocksError(Exception):
    """
    The client sent something that is not valid SOCKS5.

    @ivar reply_code: the REP byte to answer with, or C{None} when the right
        answer is to close the connection without a reply.
    """

    def __init__(self, message, reply_code=None):
        super().__init__(message)
        self.reply_code = reply_code


class SocksStateError(RuntimeError):
    """A L{Socks5Server} method was called when it was not its turn."""


@attr.s(frozen=True, slots=True, kw_only=True)
class Greeting:
    """The client's opening message: the authentication methods it offers."""

    methods = attr.ib(converter=tuple)


@attr.s(frozen=True, slots=True, kw_only=True)
class Socks4Request:
    """
    A SOCKS4 or SOCKS4a request where the greeting should be: only ever
    refused.  C{host} is the dotted IPv4 address, or the SOCKS4a name as
    sent (undecoded bytes shown with backslashes); the user id is not kept.
    """

    command = attr.ib(validator=attr.validators.instance_of(int))
    host = attr.ib(validator=attr.validators.instance_of(str))
    port = attr.ib(validator=attr.validators.instance_of(int))
    socks4a = attr.ib(validator=attr.validators.instance_of(bool))
    # DSTPORT and DSTIP as sent: the refusal echoes them.
    destination = attr.ib(validator=attr.validators.instance_of(bytes), repr=False)


@attr.s(frozen=True, slots=True, kw_only=True)
class UserPassAuth:
    """
    RFC 1929 credentials, as raw C{bytes}.  The password is left out of
    C{repr} so the event is safe to log.
    """

    username = attr.ib(validator=attr.validators.instance_of(bytes))
    password = attr.ib(validator=attr.validators.instance_of(bytes), repr=False)


@attr.s(frozen=True, slots=True, kw_only=True)
class Request:
    """
    The client's request.  C{host} is text: dotted IPv4, compressed IPv6, or
    the domain name as sent (ASCII, or IDNA when the client sent UTF-8).
    Names are never resolved here.
    """

    command = attr.ib(validator=attr.validators.instance_of(int))
    host = attr.ib(validator=attr.validators.instance_of(str))
    port = attr.ib(validator=attr.validators.instance_of(int))
    address_type = attr.ib(validator=attr.validators.in_((ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6)))


def _read_socks4(buffer):
    """
    VN CD DSTPORT(2) DSTIP(4) USERID NUL, and for SOCKS4a (DSTIP 0.0.0.x,
    x not 0) a domain name NUL after it.  Bounded by MAX_HANDSHAKE_BUFFER.
    """
    if len(buffer) < 8:
        return None
    user_end = buffer.find(b"\0", 8)
    if user_end < 0:
        return None
    address = bytes(buffer[4:8])
    (port,) = struct.unpack("!H", buffer[2:4])
    socks4a = address[:3] == b"\0\0\0" and address[3] != 0
    end = user_end + 1
    if socks4a:
        name_end = buffer.find(b"\0", end)
        if name_end < 0:
            return None
        host = bytes(buffer[end:name_end]).decode("ascii", "backslashreplace")
        end = name_end + 1
    else:
        host = str(ipaddress.IPv4Address(address))
    return Socks4Request(command=buffer[1], host=host, port=port, socks4a=socks4a,
                         destination=bytes(buffer[2:8])), end


def _read_greeting(buffer):
    if buffer[:1] == bytes([SOCKS4_VERSION]):
        return _read_socks4(buffer)
    if len(buffer) < 2:
        return None
    if buffer[0] != SOCKS_VERSION:
        raise SocksError("not a SOCKS5 greeting (version %#04x)" % (buffer[0],))
    count = buffer[1]  # at most MAX_METHODS by construction
    if len(buffer) < 2 + count:
        return None
    return Greeting(methods=tuple(buffer[2 : 2 + count])), 2 + count


def _read_userpass(buffer):
    if len(buffer) < 2:
        return None
    if buffer[0] != AUTH_VERSION:
        raise SocksError("bad username/password sub-negotiation version %#04x" % (buffer[0],))
    name_length = buffer[1]  # at most MAX_CREDENTIAL_LENGTH by construction
    if len(buffer) < 3 + name_length:
        return None
    password_length = buffer[2 + name_length]
    end = 3 + name_length + password_length
    if len(buffer) < end:
        return None
    username = bytes(buffer[2 : 2 + name_length])
    password = bytes(buffer[3 + name_length : end])
    return UserPassAuth(username=username, password=password), end


def _decode_domain(raw):
    """The text form of a domain name from a request; raises L{SocksError}."""
    if not raw:
        raise SocksError("empty domain name", REP_GENERAL_FAILURE)
    if any(byte < 0x21 or byte == 0x7F for byte in raw):
        raise SocksError("control character or space in domain name", REP_HOST_UNREACHABLE)
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        pass
    try:
        name = raw.decode("utf-8").encode("idna").decode("ascii")
    except UnicodeError:
        raise SocksError(
            "domain name is neither ASCII nor valid IDNA", REP_HOST_UNREACHABLE
        ) from None
    # IDNA can lengthen a name; the tunnel carries 255 bytes at most.
    if len(name) > MAX_DOMAIN_LENGTH:
        raise SocksError("domain name longer than %d bytes once IDNA-encoded"
                         % (MAX_DOMAIN_LENGTH,), REP_HOST_UNREACHABLE)
    return name


def _read_request(buffer):
    if len(buffer) < 4:
        return None
    version, command, _reserved, address_type = buffer[:4]
    # RSV is not checked: RFC 1928 says it is 0x00, and being lenient costs nothing.
    if version != SOCKS_VERSION:
        raise SocksError("bad request version %#04x" % (version,), REP_GENERAL_FAILURE)
    if address_type == ATYP_IPV4:
        end = 4 + 4 + 2
        if len(buffer) < end:
            return None
        host = str(ipaddress.IPv4Address(bytes(buffer[4:8])))
    elif address_type == ATYP_IPV6:
        end = 4 + 16 + 2
        if len(buffer) < end:
            return None
        host = ipaddress.IPv6Address(bytes(buffer[4:20])).compressed
    elif address_type == ATYP_DOMAIN:
        if len(buffer) < 5:
            return None
        length = buffer[4]  # at most MAX_DOMAIN_LENGTH by construction
        end = 5 + length + 2
        if len(buffer) < end:
            return None
        host = _decode_domain(bytes(buffer[5 : 5 + length]))
    else:
        raise SocksError(
            "unsupported address type %#04x" % (address_type,), REP_ADDRESS_TYPE_NOT_SUPPORTED
        )
    if command not in (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE):
        raise SocksError("unsupported command %#04x" % (command,), REP_COMMAND_NOT_SUPPORTED)
    (port,) = struct.unpack("!H", buffer[end - 2 : end])
    return Request(command=command, host=host, port=port, address_type=address_type), end


# state -> reader; a reader returns (event, bytes consumed), None for "need
# more data", or raises SocksError.
_READERS = {
    AWAIT_GREETING: _read_greeting,
    AWAIT_AUTH: _read_userpass,
    AWAIT_REQUEST: _read_request,
}


@functools.lru_cache(maxsize=256)  # each UDP datagram to a user carries its source
def _encode_address(host):
    """ATYP + address bytes for a bind address given as text."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("idna")
        if not raw or len(raw) > MAX_DOMAIN_LENGTH:
            raise ValueError("bind host %r cannot be encoded" % (host,))
        return bytes([ATYP_DOMAIN, len(raw)]) + raw
    if address.version == 4:
        return bytes([ATYP_IPV4]) + address.packed
    return bytes([ATYP_IPV6]) + address.packed


class Socks5Server:
    """
    The server side of one SOCKS5 handshake.

    @ivar state: one of the state sentinels (C{AWAIT_GREETING} ... C{ERROR}).
    """

    def __init__(self):
        self.state = AWAIT_GREETING
        self._buffer = bytearray()
        self._eof = False
        self._offered_methods = ()
        self._socks4_destination = b"\0" * 6
        self._error_reply_owed = False

    def _move(self, move):
        try:
            self.state = _TRANSITIONS[(self.state, move)]
        except KeyError:
            raise SocksStateError("cannot %s in state %r" % (move, self.state)) from None

    def receive_data(self, data):
        """
        Buffer bytes from the client.

        @param data: C{bytes}; C{b""} means the client closed its side.
        """
        if data:
            if self._eof:
                raise SocksStateError("data received after end of file")
            self._buffer += data
        else:
            self._eof = True

    def next_event(self):
        """
        Parse the next client message, if it is the client's turn.

        @return: a L{Greeting} (or a L{Socks4Request} in its place),
            L{UserPassAuth} or L{Request}; L{NEED_DATA}
            when the message is incomplete; L{PAUSED} when it is our turn to
            send, or the handshake is over.
        @raise SocksError: the client sent something invalid (or closed its
            side mid-message); the parser is then in C{ERROR}.
        """
        if self.state is ERROR:
            raise SocksError("the handshake already failed")
        reader = _READERS.get(self.state)
        if reader is None:
            return PAUSED
        try:
            if len(self._buffer) > MAX_HANDSHAKE_BUFFER:
                raise SocksError("handshake larger than %d bytes" % (MAX_HANDSHAKE_BUFFER,))
            result = reader(self._buffer)
            if result is None:
                if self._eof:
                    raise SocksError("connection closed in the middle of the handshake")
                return NEED_DATA
        except SocksError as error:
            self._error_reply_owed = self.state is AWAIT_REQUEST and error.reply_code is not None
            self.state = ERROR
            raise
        event, consumed = result
        del self._buffer[:consumed]
        self._move(type(event).__name__)
        if isinstance(event, Greeting):
            self._offered_methods = event.methods
        elif isinstance(event, Socks4Request):
            self._socks4_destination = event.destination
        return event

    @property
    def trailing_data(self):
        """
        C{(bytes, eof)}: what is buffered but not parsed, and whether the
        client has closed its side.  After the L{Request} this is payload
        the client sent early, to be forwarded to the target.
        """
        return bytes(self._buffer), self._eof

    def choose_method(self, method):
        """
        Answer the greeting.

        @param method: C{METHOD_NO_AUTH}, C{METHOD_USERPASS} (both must have
            been offered) or C{METHOD_NONE_ACCEPTABLE}.
        @return: the bytes to send.
        @raise SocksStateError: not our turn, or the method was not offered.
        """
        moves = {
            METHOD_NO_AUTH: "method no-auth",
            METHOD_USERPASS: "method user/pass",
            METHOD_NONE_ACCEPTABLE: "method refused",
        }
        if method not in moves:
            raise SocksStateError("unsupported method %r" % (method,))
        if self.state is SEND_METHOD and method != METHOD_NONE_ACCEPTABLE:
            if method not in self._offered_methods:
                raise SocksStateError("method %#04x was not offered" % (method,))
        self._move(moves[method])
        return bytes([SOCKS_VERSION, method])

    def refuse_socks4(self):
        """
        Answer a L{Socks4Request} with the SOCKS4 rejection: VN 0, CD 91
        ("request rejected or failed"), DSTPORT and DSTIP echoed.  Then
        close the connection.

        @return: the 8 bytes to send.
        """
        self._move("refuse socks4")
        return bytes([SOCKS4_REPLY_VERSION, SOCKS4_REJECTED]) + self._socks4_destination

    def auth_reply(self, ok):
        """
        Answer the username/password sub-negotiation.

        @return: the bytes to send (status 0x00 or 0x01).
        """
        self._move("auth ok" if ok else "auth failed")
        return bytes([AUTH_VERSION, 0x00 if ok else 0x01])

    def reply(self, code, bind_host="0.0.0.0", bind_port=0):
        """
        Answer the request.  Also allowed once after a L{SocksError} whose
        C{reply_code} was set, to send that error.

        @param code: the REP byte; 0x00 means success.
        @param bind_host: BND.ADDR as text (an IP address or a name).
        @param bind_port: BND.PORT.
        @return: the bytes to send.
        """
        if not 0 <= code <= 0xFF:
            raise ValueError("reply code %r out of range" % (code,))
        if not 0 <= bind_port <= 0xFFFF:
            raise ValueError("bind port %r out of range" % (bind_port,))
        if self.state is ERROR and not self._error_reply_owed:
            raise SocksStateError("no reply is owed after this error")
        address = _encode_address(bind_host)
        self._move("reply ok" if code == REP_SUCCEEDED else "reply error")
        self._error_reply_owed = False
        return bytes([SOCKS_VERSION, code, 0x00]) + address + struct.pack("!H", bind_port)
