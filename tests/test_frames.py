"""
Tests for L{anyproxy.tunnel.frames}: the exact bytes of each frame kind, the
refusal of every malformed message, and hypothesis round-trip and fuzz tests.
"""

import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.tunnel import frames
from anyproxy.tunnel.frames import (
    Credit,
    Data,
    Datagram,
    Fin,
    FrameError,
    GoAway,
    Hello,
    Open,
    OpenError,
    OpenOk,
    Reset,
    decode,
    encode,
)


def header(frame_type, stream_id):
    """The 5-byte frame header, built independently of the module under test."""
    return bytes((frame_type,)) + stream_id.to_bytes(4, "big")


# -- strategies ---------------------------------------------------------------

stream_ids = st.integers(min_value=0, max_value=0xFFFFFFFF)
u32s = st.integers(min_value=0, max_value=0xFFFFFFFF)
ports = st.integers(min_value=0, max_value=0xFFFF)
reasons = st.integers(min_value=0, max_value=0xFF)
hosts = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
    min_size=1, max_size=frames.MAX_HOST_LENGTH)
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 53, max_value=2 ** 53)
                | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
hello_infos = st.dictionaries(st.text(max_size=16), json_values, max_size=6)

any_frame = st.one_of(
    st.builds(Open, stream_ids, st.sampled_from(["tcp", "udp"]), hosts, ports, u32s),
    st.builds(OpenOk, stream_ids, u32s),
    st.builds(OpenError, stream_ids, reasons, st.text(max_size=200)),
    st.builds(Data, stream_ids, st.binary(min_size=1, max_size=2048)),
    st.builds(Credit, stream_ids, st.integers(min_value=1, max_value=0xFFFFFFFF)),
    st.builds(Fin, stream_ids),
    st.builds(Reset, stream_ids, reasons),
    st.builds(Datagram, stream_ids, hosts, ports, st.binary(max_size=2048)),
    st.builds(Hello, hello_infos),
    st.builds(GoAway, reasons),
)


class EncodeTests(SynchronousTestCase):
    """
    Each frame kind encodes to the bytes docs/PROTOCOL.md documents.
    """

    def test_header(self):
        """The header is the type byte followed by the stream id as a big-endian u32."""
        self.assertEqual(frames.HEADER_SIZE, 5)
        self.assertEqual(encode(Fin(0x01020304)), b"\x06\x01\x02\x03\x04")

    def test_open(self):
        """OPEN is kind u8, window u32, port u16, host length u8, then the host."""
        self.assertEqual(
            encode(Open(1, "tcp", "example.com", 443, 0x100000)),
            b"\x01\x00\x00\x00\x01" b"\x01" b"\x00\x10\x00\x00" b"\x01\xbb" b"\x0b" b"example.com")

    def test_open_udp(self):
        """A UDP OPEN carries kind 0x02."""
        self.assertEqual(
            encode(Open(3, "udp", "10.0.0.1", 53, 65536)),
            header(0x01, 3) + b"\x02\x00\x01\x00\x00\x00\x35\x08" + b"10.0.0.1")

    def test_open_ok(self):
        """OPEN_OK is the sender's receive window as a u32."""
        self.assertEqual(encode(OpenOk(2, 0x00100000)), b"\x02\x00\x00\x00\x02\x00\x10\x00\x00")

    def test_open_error(self):
        """OPEN_ERROR is the reason byte followed by UTF-8 text."""
        self.assertEqual(encode(OpenError(5, 0x05, "refused")), b"\x03\x00\x00\x00\x05\x05refused")

    def test_open_error_no_text(self):
        """OPEN_ERROR text may be empty."""
        self.assertEqual(encode(OpenError(5, 0x11)), b"\x03\x00\x00\x00\x05\x11")

    def test_open_error_text_truncated(self):
        """OPEN_ERROR text is cut to MAX_ERROR_TEXT bytes."""
        message = encode(OpenError(5, 1, "x" * (frames.MAX_ERROR_TEXT + 100)))
        self.assertEqual(len(message), frames.HEADER_SIZE + 1 + frames.MAX_ERROR_TEXT)

    def test_data(self):
        """DATA's payload is the stream bytes as they are."""
        self.assertEqual(encode(Data(7, b"hello")), b"\x04\x00\x00\x00\x07hello")

    def test_credit(self):
        """CREDIT is the increment as a big-endian u32."""
        self.assertEqual(encode(Credit(1, 65536)), b"\x05\x00\x00\x00\x01\x00\x01\x00\x00")

    def test_fin(self):
        """FIN has no payload."""
        self.assertEqual(encode(Fin(9)), b"\x06\x00\x00\x00\x09")

    def test_reset(self):
        """RESET is one reason byte."""
        self.assertEqual(encode(Reset(0xFFFFFFFF, 0x06)), b"\x07\xff\xff\xff\xff\x06")

    def test_datagram(self):
        """DATAGRAM is port u16, host length u8, host, then the datagram."""
        self.assertEqual(
            encode(Datagram(4, "1.2.3.4", 53, b"\xab\xcd")),
            b"\x08\x00\x00\x00\x04\x00\x35\x07" b"1.2.3.4" b"\xab\xcd")

    def test_hello(self):
        """HELLO is compact-enough sorted JSON on stream 0."""
        message = encode(Hello({"version": 1, "client_id": "c"}))
        self.assertEqual(message[:5], b"\x10\x00\x00\x00\x00")
        self.assertEqual(json.loads(message[5:].decode("utf-8")), {"version": 1, "client_id": "c"})
        self.assertEqual(message[5:], b'{"client_id": "c", "version": 1}')

    def test_goaway(self):
        """GOAWAY is one reason byte on stream 0."""
        self.assertEqual(encode(GoAway(0x11)), b"\x11\x00\x00\x00\x00\x11")

    def test_type_codes(self):
        """The type codes are the documented constants."""
        self.assertEqual(
            [frames.T_OPEN, frames.T_OPEN_OK, frames.T_OPEN_ERROR, frames.T_DATA, frames.T_CREDIT,
             frames.T_FIN, frames.T_RESET, frames.T_DATAGRAM, frames.T_HELLO, frames.T_GOAWAY],
            [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10, 0x11])

    def test_idna_host(self):
        """A non-ASCII host name is sent in its IDNA (punycode) form."""
        frame = decode(encode(Open(1, "tcp", "bücher.example", 80, 1)))
        self.assertEqual(frame.host, "xn--bcher-kva.example")

    def test_host_too_long(self):
        """Encoding a host name over 255 bytes raises FrameError."""
        self.assertRaises(FrameError, encode, Open(1, "tcp", "a" * 256, 80, 1))

    def test_host_empty(self):
        """Encoding an empty host name raises FrameError."""
        self.assertRaises(FrameError, encode, Datagram(1, "", 80, b""))

    def test_port_out_of_range(self):
        """Encoding a port outside 0..65535 raises FrameError."""
        self.assertRaises(FrameError, encode, Open(1, "tcp", "h", 65536, 1))
        self.assertRaises(FrameError, encode, Datagram(1, "h", -1, b""))

    def test_not_a_frame(self):
        """Encoding something that is not a frame raises TypeError."""
        self.assertRaises(TypeError, encode, object())


class FrameTests(SynchronousTestCase):
    """
    Every frame kind survives encode then decode unchanged.
    """

    def assertRoundTrip(self, frame):
        self.assertEqual(decode(encode(frame)), frame)

    def test_open(self):
        """OPEN round-trips, for both kinds."""
        self.assertRoundTrip(Open(1, "tcp", "example.com", 443, 1 << 20))
        self.assertRoundTrip(Open(0xFFFFFFFF, "udp", "::1", 0, 0xFFFFFFFF))

    def test_open_ok(self):
        """OPEN_OK round-trips."""
        self.assertRoundTrip(OpenOk(2, 0))

    def test_open_error(self):
        """OPEN_ERROR round-trips, with and without text."""
        self.assertRoundTrip(OpenError(3, 0x10, "no such host"))
        self.assertRoundTrip(OpenError(3, 0x10, ""))

    def test_data(self):
        """DATA round-trips."""
        self.assertRoundTrip(Data(4, b"\x00" * 1000))

    def test_credit(self):
        """CREDIT round-trips."""
        self.assertRoundTrip(Credit(5, 0xFFFFFFFF))

    def test_fin(self):
        """FIN round-trips."""
        self.assertRoundTrip(Fin(6))

    def test_reset(self):
        """RESET round-trips."""
        self.assertRoundTrip(Reset(7, 0xFF))

    def test_datagram(self):
        """DATAGRAM round-trips, including an empty datagram."""
        self.assertRoundTrip(Datagram(8, "example.org", 123, b"ntp"))
        self.assertRoundTrip(Datagram(8, "example.org", 123, b""))

    def test_hello(self):
        """HELLO round-trips."""
        self.assertRoundTrip(Hello({"version": 1, "client_id": "c1", "group": "lab",
                                    "software": "anyproxy/1.0"}))

    def test_goaway(self):
        """GOAWAY round-trips."""
        self.assertRoundTrip(GoAway(0))

    @given(any_frame)
    @settings(max_examples=500)
    def test_round_trip_generated(self, frame):
        """Generated frames of every kind survive encode then decode."""
        self.assertEqual(decode(encode(frame)), frame)


class DecodeErrorTests(SynchronousTestCase):
    """
    Every malformed message raises L{FrameError}, and nothing else.
    """

    def assertBad(self, message):
        self.assertRaises(FrameError, decode, message)

    def test_empty(self):
        """An empty message is refused."""
        self.assertBad(b"")

    def test_short_header(self):
        """A message shorter than the 5-byte header is refused."""
        for n in range(5):
            self.assertBad(b"\x06\x00\x00\x00\x01"[:n])

    def test_unknown_type(self):
        """Unassigned type codes are refused."""
        for code in (0x00, 0x09, 0x0F, 0x12, 0xFF):
            self.assertBad(header(code, 1))

    def test_empty_data(self):
        """A DATA frame with no payload is refused."""
        self.assertBad(header(0x04, 1))

    def test_zero_credit(self):
        """A CREDIT of zero bytes is refused."""
        self.assertBad(header(0x05, 1) + b"\x00\x00\x00\x00")

    def test_credit_wrong_size(self):
        """A CREDIT payload that is not 4 bytes is refused."""
        self.assertBad(header(0x05, 1) + b"\x00\x01\x00")
        self.assertBad(header(0x05, 1) + b"\x00\x00\x01\x00\x00")

    def test_fin_with_payload(self):
        """A FIN with a payload is refused."""
        self.assertBad(header(0x06, 1) + b"\x00")

    def test_reset_wrong_size(self):
        """A RESET payload that is not exactly one byte is refused."""
        self.assertBad(header(0x07, 1))
        self.assertBad(header(0x07, 1) + b"\x01\x02")

    def test_open_ok_wrong_size(self):
        """An OPEN_OK payload that is not 4 bytes is refused."""
        self.assertBad(header(0x02, 1) + b"\x00\x00\x01")
        self.assertBad(header(0x02, 1) + b"\x00\x00\x00\x01\x00")

    def test_open_error_empty(self):
        """An OPEN_ERROR without its reason byte is refused."""
        self.assertBad(header(0x03, 1))

    def test_goaway_wrong_size(self):
        """A GOAWAY payload that is not exactly one byte is refused."""
        self.assertBad(header(0x11, 0))
        self.assertBad(header(0x11, 0) + b"\x00\x00")

    def test_open_truncated_fixed_part(self):
        """An OPEN shorter than its 8 fixed bytes is refused."""
        self.assertBad(header(0x01, 1) + b"\x01\x00\x00\x10\x00\x00\x50")

    def test_open_bad_kind(self):
        """An OPEN whose kind is neither tcp (1) nor udp (2) is refused."""
        for kind in (0x00, 0x03, 0xFF):
            self.assertBad(header(0x01, 1) + bytes((kind,)) + b"\x00\x00\x10\x00\x00\x50\x01h")

    def test_open_truncated_host(self):
        """An OPEN whose host is shorter than its length byte says is refused."""
        self.assertBad(header(0x01, 1) + b"\x01\x00\x00\x10\x00\x00\x50\x05host")

    def test_open_trailing_bytes(self):
        """An OPEN with bytes after the host is refused."""
        self.assertBad(header(0x01, 1) + b"\x01\x00\x00\x10\x00\x00\x50\x04hostX")

    def test_open_empty_host(self):
        """An OPEN with an empty host is refused."""
        self.assertBad(header(0x01, 1) + b"\x01\x00\x00\x10\x00\x00\x50\x00")

    def test_open_non_ascii_host(self):
        """An OPEN whose host is not ASCII is refused."""
        self.assertBad(header(0x01, 1) + b"\x01\x00\x00\x10\x00\x00\x50\x02\xc3\xbc")

    def test_datagram_truncated_address(self):
        """A DATAGRAM shorter than its port and host length is refused."""
        self.assertBad(header(0x08, 1))
        self.assertBad(header(0x08, 1) + b"\x00\x35")

    def test_datagram_truncated_host(self):
        """A DATAGRAM whose host is shorter than its length byte says is refused."""
        self.assertBad(header(0x08, 1) + b"\x00\x35\x09short")

    def test_datagram_empty_host(self):
        """A DATAGRAM with an empty host is refused."""
        self.assertBad(header(0x08, 1) + b"\x00\x35\x00payload")

    def test_datagram_non_ascii_host(self):
        """A DATAGRAM whose host is not ASCII is refused."""
        self.assertBad(header(0x08, 1) + b"\x00\x35\x01\xff")

    def test_hello_not_json(self):
        """A HELLO that is not JSON (or not UTF-8) is refused."""
        self.assertBad(header(0x10, 0) + b"{not json")
        self.assertBad(header(0x10, 0) + b"\xff\xfe")
        self.assertBad(header(0x10, 0))

    def test_hello_not_object(self):
        """A HELLO whose JSON is not an object is refused."""
        for payload in (b"[]", b"1", b'"x"', b"null", b"true"):
            self.assertBad(header(0x10, 0) + payload)

    def test_hello_deeply_nested(self):
        """A HELLO nested deeper than the JSON parser's recursion limit is refused."""
        self.assertBad(header(0x10, 0) + b"[" * 5000)
        self.assertBad(header(0x10, 0) + b'{"a":' * 3000)
        # Nested just under the parser's limit, which later walks (the
        # HELLO's checks, a repr in a message) would exhaust: refused too.
        for depth in (33, 900):
            self.assertBad(header(0x10, 0) + b'{"routes":' + b"[" * depth + b"]" * depth + b"}")
        within = {"routes": [[["x"]]], "open_ports": [{"remote_port": 1}]}
        self.assertEqual(decode(header(0x10, 0) + json.dumps(within).encode()), Hello(within))

    def test_hello_too_large(self):
        """A HELLO over MAX_HELLO bytes is refused, even if it is valid JSON."""
        body = json.dumps({"pad": "x" * frames.MAX_HELLO}).encode("ascii")
        self.assertBad(header(0x10, 0) + body)

    def test_hello_at_limit(self):
        """A HELLO of exactly MAX_HELLO bytes is accepted."""
        pad = frames.MAX_HELLO - len(b'{"p": ""}')
        body = b'{"p": "' + b"x" * pad + b'"}'
        self.assertEqual(len(body), frames.MAX_HELLO)
        self.assertEqual(decode(header(0x10, 0) + body), Hello({"p": "x" * pad}))

    def test_hello_on_stream(self):
        """A HELLO on a stream other than 0 is refused."""
        self.assertBad(header(0x10, 1) + b"{}")

    def test_goaway_on_stream(self):
        """A GOAWAY on a stream other than 0 is refused."""
        self.assertBad(header(0x11, 2) + b"\x00")

    @given(st.binary(max_size=300))
    @settings(max_examples=1000)
    def test_fuzz_random_bytes(self, message):
        """Decoding arbitrary bytes either returns a frame or raises FrameError."""
        try:
            decode(message)
        except FrameError:
            pass

    @given(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10, 0x11]),
           stream_ids, st.binary(max_size=300))
    @settings(max_examples=1000)
    def test_fuzz_known_types(self, frame_type, stream_id, payload):
        """Arbitrary payloads behind a valid header return a frame or raise FrameError."""
        try:
            frame = decode(struct.pack(">BI", frame_type, stream_id) + payload)
        except FrameError:
            return
        if type(frame) is not Hello:  # JSON NaN would not compare equal
            # Whatever decodes must encode back to a message that decodes the same.
            self.assertEqual(decode(encode(frame)), frame)


class OpenOkDialedTests(SynchronousTestCase):
    """OPEN_OK may carry the address the answering side dialed (HELLO dialed_address)."""

    def test_round_trip(self):
        for dialed in [None, ("10.0.0.7", 5432), ("::1", 443), ("db.internal", 1)]:
            frame = frames.OpenOk(3, 65536, dialed)
            self.assertEqual(frames.decode(frames.encode(frame)), frame)

    def test_without_address_is_the_old_form(self):
        self.assertEqual(frames.encode(frames.OpenOk(3, 7)), b"\x02\x00\x00\x00\x03\x00\x00\x00\x07")

    def test_truncated_address_refused(self):
        whole = frames.encode(frames.OpenOk(3, 7, ("10.0.0.7", 80)))
        for cut in range(len(whole) - 1, len(whole) - 10, -1):
            if cut > 9:
                self.assertRaises(frames.FrameError, frames.decode, whole[:cut])
