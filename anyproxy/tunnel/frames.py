# -*- test-case-name: tests.test_frames -*-
"""
The tunnel's wire format: one frame per WebSocket binary message.

Pure encode/decode, no Twisted.  Every frame starts with a 5-byte header,
C{type (u8) | stream id (u32, big-endian)}, and the rest of the WebSocket
message is the payload, whose layout depends on the type.  The exact bytes are
specified in docs/PROTOCOL.md; keep the two in step.
"""

import json
import struct

import attr

SUBPROTOCOL = "anyproxy.v1"

# WebSocket close codes (RFC 6455 7.4.2: 4000-4999 are the application's) with
# which the gateway refuses a tunnel after the upgrade; the close reason says why.
CLOSE_BAD_HELLO = 4000  # malformed HELLO, or a version the gateway does not speak
CLOSE_NOT_ALLOWED = 4003  # the credential may not serve this group or client id
CLOSE_TOO_MANY_TUNNELS = 4029  # the credential holds its max_tunnels already

HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size  # 5

# Names in OPEN/DATAGRAM frames are DNS names or IP literals: 255 bytes at most.
MAX_HOST_LENGTH = 255
# OPEN_ERROR texts are for logs; keep them short.
MAX_ERROR_TEXT = 1024
# HELLO carries a small JSON object; anything bigger is an attack or a bug.
MAX_HELLO = 16 * 1024
# How deep a HELLO may nest lists and objects (its fields need 3).
MAX_HELLO_DEPTH = 32

T_OPEN = 0x01
T_OPEN_OK = 0x02
T_OPEN_ERROR = 0x03
T_DATA = 0x04
T_CREDIT = 0x05
T_FIN = 0x06
T_RESET = 0x07
T_DATAGRAM = 0x08
T_DATAGRAMS = 0x09
T_HELLO = 0x10
T_GOAWAY = 0x11

KIND_TCP = 0x01
KIND_UDP = 0x02
_KIND_NAMES = {KIND_TCP: "tcp", KIND_UDP: "udp"}
_KIND_CODES = {name: code for code, name in _KIND_NAMES.items()}

_OPEN = struct.Struct(">BIHB")  # kind, window, port, host length
_U32 = struct.Struct(">I")
_ADDR = struct.Struct(">HB")  # port, host length
_DATAGRAM_LENGTH = struct.Struct(">H")  # one datagram's length in a DATAGRAMS frame
_ADDR_SIZE, _LENGTH_SIZE = _ADDR.size, _DATAGRAM_LENGTH.size  # 3, 2

# The HELLO key by which a side says it takes DATAGRAMS frames (docs/PROTOCOL.md);
# a side sends them only to a peer whose HELLO had it.
HELLO_DATAGRAMS = "batched_datagrams"
# The HELLO key saying that this side reads OPEN_OK with the dialed address.
HELLO_DIALED = "dialed_address"
# The HELLO key giving how many bytes of DATA this side takes on a stream the
# peer opened before it has answered the OPEN (docs/PROTOCOL.md, early data).
HELLO_EARLY_DATA = "early_data"
# The largest datagram a DATAGRAMS frame carries (its length is a u16).
MAX_BATCHED_DATAGRAM = 0xFFFF


class FrameError(Exception):
    """A message is not a valid frame.  The tunnel is closed on this error."""


@attr.s(frozen=True, slots=True)
class Open:
    """Ask the peer to connect to C{host:port} over C{kind} ('tcp' or 'udp')."""

    stream_id = attr.ib()
    kind = attr.ib()
    host = attr.ib()
    port = attr.ib()
    window = attr.ib()


@attr.s(frozen=True, slots=True)
class OpenOk:
    """
    The stream is connected; the sender accepts C{window} bytes of DATA.
    C{dialed}: C{(host, port)} the answering side connected to, sent only
    to a peer whose HELLO has L{HELLO_DIALED}; else C{None}.
    """

    stream_id = attr.ib()
    window = attr.ib()
    dialed = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class OpenError:
    """The stream could not be opened; C{reason} is an L{anyproxy.errors.Reason} code."""

    stream_id = attr.ib()
    reason = attr.ib()
    text = attr.ib(default="")


@attr.s(frozen=True, slots=True)
class Data:
    """Stream bytes; never empty."""

    stream_id = attr.ib()
    payload = attr.ib()


@attr.s(frozen=True, slots=True)
class Credit:
    """The sender may send C{increment} more DATA bytes on this stream."""

    stream_id = attr.ib()
    increment = attr.ib()


@attr.s(frozen=True, slots=True)
class Fin:
    """Half-close: the sender will send no more DATA on this stream."""

    stream_id = attr.ib()


@attr.s(frozen=True, slots=True)
class Reset:
    """Abort the stream at once; C{reason} is an L{anyproxy.errors.Reason} code."""

    stream_id = attr.ib()
    reason = attr.ib()


@attr.s(frozen=True, slots=True)
class Datagram:
    """One UDP datagram to (or from) C{host:port} within a UDP stream."""

    stream_id = attr.ib()
    host = attr.ib()
    port = attr.ib()
    payload = attr.ib()


@attr.s(frozen=True, slots=True)
class Datagrams:
    """
    Several UDP datagrams of one UDP stream in one frame, in order:
    C{datagrams} is a tuple of C{(host, port, payload)}, never empty.
    """

    stream_id = attr.ib()
    datagrams = attr.ib()


@attr.s(frozen=True, slots=True)
class Hello:
    """Session announcement (stream 0): a JSON object, see docs/PROTOCOL.md."""

    info = attr.ib()
    stream_id = attr.ib(default=0)


@attr.s(frozen=True, slots=True)
class GoAway:
    """Session ending (stream 0): open no new streams on this tunnel."""

    reason = attr.ib()
    stream_id = attr.ib(default=0)


def _encode_host(host):
    raw = host.encode("idna") if not host.isascii() else host.encode("ascii")
    if not 0 < len(raw) <= MAX_HOST_LENGTH:
        raise FrameError("host name must be 1..255 bytes")
    return raw


def _check_port(port):
    if not 0 <= port <= 0xFFFF:
        raise FrameError("port out of range: %r" % (port,))


def encode(frame):
    """Serialise a frame object to the bytes of one WebSocket message."""
    kind = type(frame)
    sid = getattr(frame, "stream_id", None)  # a non-frame reaches the TypeError below
    if kind is Data:
        return HEADER.pack(T_DATA, sid) + frame.payload
    if kind is Credit:
        return HEADER.pack(T_CREDIT, sid) + _U32.pack(frame.increment)
    if kind is Fin:
        return HEADER.pack(T_FIN, sid)
    if kind is Reset:
        return HEADER.pack(T_RESET, sid) + bytes((frame.reason,))
    if kind is Open:
        _check_port(frame.port)
        host = _encode_host(frame.host)
        return (HEADER.pack(T_OPEN, sid)
                + _OPEN.pack(_KIND_CODES[frame.kind], frame.window, frame.port, len(host))
                + host)
    if kind is OpenOk:
        dialed = encode_address(*frame.dialed) if frame.dialed is not None else b""
        return HEADER.pack(T_OPEN_OK, sid) + _U32.pack(frame.window) + dialed
    if kind is OpenError:
        text = frame.text.encode("utf-8")[:MAX_ERROR_TEXT]
        return HEADER.pack(T_OPEN_ERROR, sid) + bytes((frame.reason,)) + text
    if kind is Datagram:
        return HEADER.pack(T_DATAGRAM, sid) + encode_address(frame.host, frame.port) + frame.payload
    if kind is Datagrams:
        if not frame.datagrams:
            raise FrameError("DATAGRAMS frame without a datagram")
        return HEADER.pack(T_DATAGRAMS, sid) + b"".join(
            [encode_datagram_record(host, port, payload) for host, port, payload in frame.datagrams])
    if kind is Hello:
        return HEADER.pack(T_HELLO, 0) + json.dumps(frame.info, sort_keys=True).encode("utf-8")
    if kind is GoAway:
        return HEADER.pack(T_GOAWAY, 0) + bytes((frame.reason,))
    raise TypeError("not a frame: %r" % (frame,))


def encode_address(host, port):
    """The address part of DATAGRAM and DATAGRAMS: port u16, host length u8, host."""
    _check_port(port)
    host = _encode_host(host)
    return _ADDR.pack(port, len(host)) + host


def encode_datagram_record(host, port, payload):
    """One datagram of a DATAGRAMS frame: address, length u16, payload."""
    if len(payload) > MAX_BATCHED_DATAGRAM:
        raise FrameError("datagram of %d bytes is too long for DATAGRAMS" % (len(payload),))
    return encode_address(host, port) + _DATAGRAM_LENGTH.pack(len(payload)) + payload


def decode_datagram_records(payload):
    """
    The C{(host, port, datagram)} tuples of a DATAGRAMS payload, in order.

    @raise FrameError: no record, or a record truncated or with an empty or
        non-ASCII host.
    """
    records = []
    hosts = {}  # raw host -> text: a batch names few hosts, often one
    read_address, read_length = _ADDR.unpack_from, _DATAGRAM_LENGTH.unpack_from
    offset, size = 0, len(payload)
    while offset < size:
        if size - offset < _ADDR_SIZE:
            raise FrameError("truncated DATAGRAMS record")
        port, host_len = read_address(payload, offset)
        start = offset + _ADDR_SIZE
        end = start + host_len
        if size < end + _LENGTH_SIZE:
            raise FrameError("truncated DATAGRAMS address")
        raw = payload[start:end]
        host = hosts.get(raw)
        if host is None:
            host = hosts[raw] = _decode_host(raw)
        start = end + _LENGTH_SIZE
        offset = start + read_length(payload, end)[0]
        if offset > size:
            raise FrameError("truncated DATAGRAMS datagram")
        records.append((host, port, payload[start:offset]))
    if not records:
        raise FrameError("DATAGRAMS frame without a datagram")
    return records


def _decode_host(raw):
    try:
        host = raw.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("host name is not ASCII") from None
    if not host:
        raise FrameError("empty host name")
    return host


def _need(payload, size, what):
    if len(payload) != size:
        raise FrameError("%s payload must be %d bytes, got %d" % (what, size, len(payload)))


def _deeper_than(value, depth):
    """Whether the JSON C{value} nests lists and objects more than C{depth} deep (no recursion)."""
    level = [value]
    for _ in range(depth + 1):
        level = [child for each in level
                 for child in (each.values() if isinstance(each, dict) else
                               each if isinstance(each, list) else ())
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


def decode(message):
    """
    Parse one WebSocket message into a frame object.

    @raise FrameError: the message is not a valid frame.
    """
    if len(message) < HEADER_SIZE:
        raise FrameError("message shorter than the frame header")
    ftype, sid = HEADER.unpack_from(message)
    payload = message[HEADER_SIZE:]
    if ftype == T_DATA:
        if not payload:
            raise FrameError("empty DATA frame")
        return Data(sid, payload)
    if ftype == T_CREDIT:
        _need(payload, 4, "CREDIT")
        (increment,) = _U32.unpack(payload)
        if increment == 0:
            raise FrameError("CREDIT of zero bytes")
        return Credit(sid, increment)
    if ftype == T_FIN:
        _need(payload, 0, "FIN")
        return Fin(sid)
    if ftype == T_RESET:
        _need(payload, 1, "RESET")
        return Reset(sid, payload[0])
    if ftype == T_OPEN:
        if len(payload) < _OPEN.size:
            raise FrameError("truncated OPEN frame")
        kind, window, port, host_len = _OPEN.unpack_from(payload)
        if kind not in _KIND_NAMES:
            raise FrameError("unknown stream kind 0x%02x" % (kind,))
        _need(payload, _OPEN.size + host_len, "OPEN")
        host = _decode_host(payload[_OPEN.size:])
        return Open(sid, _KIND_NAMES[kind], host, port, window)
    if ftype == T_OPEN_OK:
        if len(payload) < 4:
            raise FrameError("truncated OPEN_OK frame")
        window = _U32.unpack_from(payload)[0]
        if len(payload) == 4:
            return OpenOk(sid, window)
        if len(payload) < 4 + _ADDR.size:
            raise FrameError("truncated OPEN_OK address")
        port, host_len = _ADDR.unpack_from(payload, 4)
        _need(payload, 4 + _ADDR.size + host_len, "OPEN_OK")
        return OpenOk(sid, window, (_decode_host(payload[4 + _ADDR.size:]), port))
    if ftype == T_OPEN_ERROR:
        if not payload:
            raise FrameError("truncated OPEN_ERROR frame")
        text = payload[1:1 + MAX_ERROR_TEXT].decode("utf-8", "replace")
        return OpenError(sid, payload[0], text)
    if ftype == T_DATAGRAM:
        if len(payload) < _ADDR.size:
            raise FrameError("truncated DATAGRAM frame")
        port, host_len = _ADDR.unpack_from(payload)
        end = _ADDR.size + host_len
        if len(payload) < end:
            raise FrameError("truncated DATAGRAM address")
        return Datagram(sid, _decode_host(payload[_ADDR.size:end]), port, payload[end:])
    if ftype == T_DATAGRAMS:
        return Datagrams(sid, tuple(decode_datagram_records(payload)))
    if ftype in (T_HELLO, T_GOAWAY) and sid != 0:
        raise FrameError("session frame on stream %d" % (sid,))
    if ftype == T_HELLO:
        if len(payload) > MAX_HELLO:
            raise FrameError("HELLO too large")
        try:
            info = json.loads(payload.decode("utf-8"))
        except (ValueError, RecursionError):  # deep nesting exhausts the JSON parser's stack
            raise FrameError("HELLO is not a JSON object") from None
        if not isinstance(info, dict):
            raise FrameError("HELLO is not a JSON object")
        if _deeper_than(info, MAX_HELLO_DEPTH):
            # Nesting just under the parser's limit would make every later
            # walk of it (its checks, repr in a message) exhaust the stack.
            raise FrameError("HELLO nested deeper than %d levels" % (MAX_HELLO_DEPTH,))
        return Hello(info)
    if ftype == T_GOAWAY:
        _need(payload, 1, "GOAWAY")
        return GoAway(payload[0])
    raise FrameError("unknown frame type 0x%02x" % (ftype,))
