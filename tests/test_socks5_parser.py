"""
Tests for L{anyproxy.frontends.socks5.parser}.
"""

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.frontends.socks5.parser import (
    AWAIT_AUTH,
    AWAIT_GREETING,
    AWAIT_REQUEST,
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    CLOSED,
    CMD_BIND,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    DONE,
    ERROR,
    MAX_HANDSHAKE_BUFFER,
    METHOD_NO_AUTH,
    METHOD_NONE_ACCEPTABLE,
    METHOD_USERPASS,
    NEED_DATA,
    PAUSED,
    SEND_AUTH_REPLY,
    SEND_METHOD,
    SEND_REPLY,
    SEND_SOCKS4_REFUSAL,
    Greeting,
    Request,
    Socks4Request,
    Socks5Server,
    SocksError,
    SocksStateError,
    UserPassAuth,
)


def encode_request(command, host, port, address_type):
    """The bytes a client sends for a request (test helper)."""
    if address_type == ATYP_IPV4:
        address = ipaddress.IPv4Address(host).packed
    elif address_type == ATYP_IPV6:
        address = ipaddress.IPv6Address(host).packed
    else:
        raw = host.encode("ascii")
        address = bytes([len(raw)]) + raw
    return bytes([5, command, 0, address_type]) + address + struct.pack("!H", port)


def events_of(parser):
    """Every event available now, up to the first sentinel."""
    events = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA or event is PAUSED:
            return events, event
        events.append(event)


def at_request(methods=b"\x00"):
    """A parser that has negotiated no-auth and now waits for the request."""
    parser = Socks5Server()
    parser.receive_data(b"\x05" + bytes([len(methods)]) + methods)
    parser.next_event()
    parser.choose_method(METHOD_NO_AUTH)
    return parser


def at_auth():
    """A parser that chose user/pass and now waits for the credentials."""
    parser = Socks5Server()
    parser.receive_data(b"\x05\x01\x02")
    parser.next_event()
    parser.choose_method(METHOD_USERPASS)
    return parser


CONNECT_IPV4 = encode_request(CMD_CONNECT, "127.0.0.1", 80, ATYP_IPV4)


class Socks5ParserTests(SynchronousTestCase):
    """The happy paths of the handshake."""

    def test_greeting(self):
        """A greeting yields its methods and pauses for our choice."""
        parser = Socks5Server()
        parser.receive_data(b"\x05\x02\x00\x02")
        self.assertEqual(parser.next_event(), Greeting(methods=(0, 2)))
        self.assertIs(parser.state, SEND_METHOD)
        self.assertIs(parser.next_event(), PAUSED)

    def test_greeting_without_methods(self):
        """A greeting offering no methods parses; the answer is 0xFF."""
        parser = Socks5Server()
        parser.receive_data(b"\x05\x00")
        self.assertEqual(parser.next_event(), Greeting(methods=()))
        self.assertEqual(parser.choose_method(METHOD_NONE_ACCEPTABLE), b"\x05\xff")
        self.assertIs(parser.state, CLOSED)

    def test_need_data(self):
        """An empty parser needs data."""
        self.assertIs(Socks5Server().next_event(), NEED_DATA)

    def test_choose_no_auth(self):
        """Choosing no-auth sends 05 00 and waits for the request."""
        parser = Socks5Server()
        parser.receive_data(b"\x05\x01\x00")
        parser.next_event()
        self.assertEqual(parser.choose_method(METHOD_NO_AUTH), b"\x05\x00")
        self.assertIs(parser.state, AWAIT_REQUEST)

    def test_userpass(self):
        """RFC 1929 credentials come out as bytes."""
        parser = at_auth()
        self.assertIs(parser.state, AWAIT_AUTH)
        parser.receive_data(b"\x01\x05alice\x06s3cret")
        self.assertEqual(parser.next_event(), UserPassAuth(username=b"alice", password=b"s3cret"))
        self.assertIs(parser.state, SEND_AUTH_REPLY)

    def test_userpass_repr_hides_password(self):
        """The credentials event never shows the password in its repr."""
        event = UserPassAuth(username=b"alice", password=b"hunter2")
        self.assertNotIn("hunter2", repr(event))
        self.assertIn("alice", repr(event))

    def test_userpass_empty_fields(self):
        """Empty username and password are parsed (and left to the user database)."""
        parser = at_auth()
        parser.receive_data(b"\x01\x00\x00")
        self.assertEqual(parser.next_event(), UserPassAuth(username=b"", password=b""))

    def test_auth_reply_ok(self):
        """A good password answers 01 00 and waits for the request."""
        parser = at_auth()
        parser.receive_data(b"\x01\x01a\x01b")
        parser.next_event()
        self.assertEqual(parser.auth_reply(True), b"\x01\x00")
        self.assertIs(parser.state, AWAIT_REQUEST)

    def test_auth_reply_failed(self):
        """A bad password answers 01 01 and the handshake is over."""
        parser = at_auth()
        parser.receive_data(b"\x01\x01a\x01b")
        parser.next_event()
        self.assertEqual(parser.auth_reply(False), b"\x01\x01")
        self.assertIs(parser.state, CLOSED)
        self.assertIs(parser.next_event(), PAUSED)

    def test_request_ipv4(self):
        """An IPv4 request gives dotted text."""
        parser = at_request()
        parser.receive_data(CONNECT_IPV4)
        self.assertEqual(
            parser.next_event(),
            Request(command=CMD_CONNECT, host="127.0.0.1", port=80, address_type=ATYP_IPV4),
        )
        self.assertIs(parser.state, SEND_REPLY)

    def test_request_ipv6(self):
        """An IPv6 request gives compressed text."""
        parser = at_request()
        parser.receive_data(b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x01\xbb")
        self.assertEqual(
            parser.next_event(),
            Request(command=CMD_CONNECT, host="::1", port=443, address_type=ATYP_IPV6),
        )

    def test_request_domain(self):
        """A domain request gives the name, unresolved."""
        parser = at_request()
        parser.receive_data(b"\x05\x01\x00\x03\x0bexample.com\x00\x50")
        self.assertEqual(
            parser.next_event(),
            Request(command=CMD_CONNECT, host="example.com", port=80, address_type=ATYP_DOMAIN),
        )

    def test_request_utf8_domain_becomes_idna(self):
        """A UTF-8 domain is turned into its IDNA (ASCII) form."""
        raw = "bücher.example".encode("utf-8")
        parser = at_request()
        parser.receive_data(b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + b"\x00\x50")
        self.assertEqual(parser.next_event().host, "xn--bcher-kva.example")

    def test_request_domain_too_long_after_idna(self):
        """A name whose IDNA form exceeds 255 bytes gets host unreachable (0x04): no OPEN could carry it."""
        raw = ".".join(["é"] * 85).encode("utf-8")  # 254 bytes; 679 once IDNA-encoded
        parser = at_request()
        parser.receive_data(b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + b"\x00\x50")
        self.assertEqual(self.assertRaises(SocksError, parser.next_event).reply_code, 0x04)

    def test_request_bind_and_udp(self):
        """BIND and UDP ASSOCIATE are parsed; refusing them is the caller's job."""
        for command in (CMD_BIND, CMD_UDP_ASSOCIATE):
            parser = at_request()
            parser.receive_data(encode_request(command, "0.0.0.0", 0, ATYP_IPV4))
            self.assertEqual(parser.next_event().command, command)

    def test_reply_success(self):
        """A success reply carries the bind address and ends the handshake."""
        parser = at_request()
        parser.receive_data(CONNECT_IPV4)
        parser.next_event()
        self.assertEqual(
            parser.reply(0, "10.0.0.1", 1080), b"\x05\x00\x00\x01\x0a\x00\x00\x01\x04\x38"
        )
        self.assertIs(parser.state, DONE)
        self.assertIs(parser.next_event(), PAUSED)

    def test_reply_ipv6_and_domain_bind(self):
        """Bind addresses may be IPv6 or a name."""
        parser = at_request()
        parser.receive_data(CONNECT_IPV4)
        parser.next_event()
        self.assertEqual(
            parser.reply(0, "::1", 1), b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x01"
        )
        parser = at_request()
        parser.receive_data(CONNECT_IPV4)
        parser.next_event()
        self.assertEqual(parser.reply(0, "gw", 2), b"\x05\x00\x00\x03\x02gw\x00\x02")

    def test_reply_error(self):
        """An error reply defaults to 0.0.0.0:0 and closes the handshake."""
        parser = at_request()
        parser.receive_data(CONNECT_IPV4)
        parser.next_event()
        self.assertEqual(parser.reply(0x05), b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
        self.assertIs(parser.state, CLOSED)

    def test_trailing_data(self):
        """Bytes after the request are left as trailing data, not parsed."""
        parser = at_request()
        parser.receive_data(CONNECT_IPV4 + b"GET / HTTP/1.0\r\n")
        parser.next_event()
        self.assertIs(parser.next_event(), PAUSED)
        self.assertEqual(parser.trailing_data, (b"GET / HTTP/1.0\r\n", False))
        parser.receive_data(b"more")
        self.assertEqual(parser.trailing_data, (b"GET / HTTP/1.0\r\nmore", False))

    def test_pipelined_messages(self):
        """Greeting, credentials and request sent at once come out in turn."""
        parser = Socks5Server()
        parser.receive_data(b"\x05\x01\x02" + b"\x01\x01u\x01p" + CONNECT_IPV4 + b"x")
        self.assertIsInstance(parser.next_event(), Greeting)
        self.assertIs(parser.next_event(), PAUSED)
        parser.choose_method(METHOD_USERPASS)
        self.assertIsInstance(parser.next_event(), UserPassAuth)
        parser.auth_reply(True)
        self.assertIsInstance(parser.next_event(), Request)
        self.assertEqual(parser.trailing_data, (b"x", False))

    def test_byte_at_a_time(self):
        """Feeding one byte at a time gives the same events as all at once."""
        stream = b"\x05\x02\x00\x02" + b"\x01\x03bob\x02pw" + b"\x05\x01\x00\x03\x03a.b\x00\x16"

        def run(chunks):
            parser = Socks5Server()
            events = []
            for chunk in chunks:
                parser.receive_data(chunk)
                new, _ = events_of(parser)
                events.extend(new)
                for event in new:
                    if isinstance(event, Greeting):
                        parser.choose_method(METHOD_USERPASS)
                    elif isinstance(event, UserPassAuth):
                        parser.auth_reply(True)
                while True:  # answers may unblock already-buffered messages
                    new, _ = events_of(parser)
                    if not new:
                        break
                    events.extend(new)
                    for event in new:
                        if isinstance(event, UserPassAuth):
                            parser.auth_reply(True)
            return events

        whole = run([stream])
        self.assertEqual(len(whole), 3)
        self.assertEqual(run([stream[i : i + 1] for i in range(len(stream))]), whole)


class Socks4RefusalTests(SynchronousTestCase):
    """A SOCKS4/4a request gets the SOCKS4 rejection, as dante answers it."""

    def test_socks4(self):
        """
        A whole SOCKS4 CONNECT (user id included) is one event; the answer
        is VN 0, CD 91 with DSTPORT/DSTIP echoed, and nothing follows.
        """
        parser = Socks5Server()
        parser.receive_data(b"\x04\x01\x1f\x90\x0a\x00\x00\x07alice\x00")
        event = parser.next_event()
        self.assertEqual(event, Socks4Request(command=1, host="10.0.0.7", port=8080,
                                              socks4a=False, destination=b"\x1f\x90\x0a\x00\x00\x07"))
        self.assertIs(parser.state, SEND_SOCKS4_REFUSAL)
        self.assertIs(parser.next_event(), PAUSED)
        self.assertEqual(parser.refuse_socks4(), b"\x00\x5b\x1f\x90\x0a\x00\x00\x07")
        self.assertIs(parser.state, CLOSED)
        self.assertRaises(SocksStateError, parser.refuse_socks4)
        self.assertRaises(SocksStateError, parser.choose_method, METHOD_NO_AUTH)

    def test_socks4a(self):
        """SOCKS4a (DSTIP 0.0.0.x) is read up to the end of its domain name."""
        parser = Socks5Server()
        wire = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00example.test\x00"
        for byte in wire[:-1]:
            parser.receive_data(bytes([byte]))
            self.assertIs(parser.next_event(), NEED_DATA)
        parser.receive_data(wire[-1:])
        event = parser.next_event()
        self.assertEqual((event.host, event.port, event.socks4a), ("example.test", 80, True))
        self.assertEqual(parser.refuse_socks4(), b"\x00\x5b\x00\x50\x00\x00\x00\x01")

    def test_socks4_bind(self):
        """BIND (CD 2) is refused the same way."""
        parser = Socks5Server()
        parser.receive_data(b"\x04\x02\x00\x15\x7f\x00\x00\x01\x00")
        self.assertEqual(parser.next_event().command, 2)
        self.assertEqual(parser.refuse_socks4()[:2], b"\x00\x5b")

    def test_not_before_the_greeting_only(self):
        """Version 4 after a SOCKS5 greeting is no SOCKS4 request."""
        parser = at_request()
        parser.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")
        self.assertEqual(self.assertRaises(SocksError, parser.next_event).reply_code, 0x01)

    def test_repr_leaves_out_destination_bytes(self):
        """The event's repr names the target, for the log."""
        event = Socks4Request(command=1, host="10.0.0.7", port=80, socks4a=False,
                              destination=b"\x00\x50\x0a\x00\x00\x07")
        self.assertIn("10.0.0.7", repr(event))
        self.assertNotIn("destination", repr(event))


class Socks5ParserErrorTests(SynchronousTestCase):
    """Malformed input and misuse."""

    def assert_socks_error(self, parser, reply_code):
        error = self.assertRaises(SocksError, parser.next_event)
        self.assertEqual(error.reply_code, reply_code)
        self.assertIs(parser.state, ERROR)
        return error

    def test_greeting_wrong_version(self):
        """A greeting that is neither version 5 nor 4 closes without a reply."""
        for version in (0, 3, 6, 0x47):
            parser = Socks5Server()
            parser.receive_data(bytes([version]) + b"\x01\x00\x50")
            self.assert_socks_error(parser, None)

    def test_socks4_eof_mid_request(self):
        """A SOCKS4 request cut short by EOF closes without a reply."""
        parser = Socks5Server()
        parser.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01user")
        self.assertIs(parser.next_event(), NEED_DATA)
        parser.receive_data(b"")
        self.assert_socks_error(parser, None)

    def test_socks4_without_terminator(self):
        """A SOCKS4 user id that never ends is cut off at the handshake limit."""
        parser = Socks5Server()
        parser.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * MAX_HANDSHAKE_BUFFER)
        self.assert_socks_error(parser, None)

    def test_error_is_sticky(self):
        """After an error every next_event raises again."""
        parser = Socks5Server()
        parser.receive_data(b"GET / HTTP/1.1\r\n")
        self.assert_socks_error(parser, None)
        self.assertRaises(SocksError, parser.next_event)

    def test_auth_wrong_version(self):
        """A sub-negotiation that is not version 1 closes without a reply."""
        parser = at_auth()
        parser.receive_data(b"\x05\x01a\x01b")
        self.assert_socks_error(parser, None)

    def test_request_wrong_version(self):
        """A request that is not version 5 gets general failure."""
        parser = at_request()
        parser.receive_data(b"\x04" + CONNECT_IPV4[1:])
        self.assert_socks_error(parser, 0x01)

    def test_unknown_command(self):
        """An unknown command gets 0x07."""
        parser = at_request()
        parser.receive_data(encode_request(0x09, "1.2.3.4", 1, ATYP_IPV4))
        self.assert_socks_error(parser, 0x07)
        self.assertEqual(parser.reply(0x07)[:2], b"\x05\x07")
        self.assertIs(parser.state, CLOSED)

    def test_unknown_address_type(self):
        """An unknown address type gets 0x08 as soon as it is seen."""
        parser = at_request()
        parser.receive_data(b"\x05\x01\x00\x02")
        self.assert_socks_error(parser, 0x08)

    def test_empty_domain(self):
        """A zero-length domain gets general failure."""
        parser = at_request()
        parser.receive_data(b"\x05\x01\x00\x03\x00\x00\x50")
        self.assert_socks_error(parser, 0x01)

    def test_domain_with_control_characters(self):
        """A domain with a NUL or space gets host unreachable."""
        parser = at_request()
        parser.receive_data(b"\x05\x01\x00\x03\x03a\x00b\x00\x50")
        self.assert_socks_error(parser, 0x04)

    def test_domain_not_utf8(self):
        """A domain that is neither ASCII nor UTF-8 gets host unreachable."""
        parser = at_request()
        parser.receive_data(b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50")
        self.assert_socks_error(parser, 0x04)

    def test_eof_mid_message(self):
        """End of file in the middle of a message is an error without reply."""
        parser = Socks5Server()
        parser.receive_data(b"\x05\x02\x00")
        parser.receive_data(b"")
        self.assert_socks_error(parser, None)

    def test_eof_mid_request(self):
        """End of file in the middle of a request is an error without reply."""
        parser = at_request()
        parser.receive_data(CONNECT_IPV4[:5])
        parser.receive_data(b"")
        error = self.assert_socks_error(parser, None)
        self.assertIn("closed", str(error))
        self.assertRaises(SocksStateError, parser.reply, 0x01)

    def test_data_after_eof(self):
        """Data after end of file is a caller bug."""
        parser = Socks5Server()
        parser.receive_data(b"")
        self.assertRaises(SocksStateError, parser.receive_data, b"x")

    def test_buffer_limit(self):
        """A handshake buffer over the limit is an error without reply."""
        parser = Socks5Server()
        parser.receive_data(b"\x05\x01\x02" + b"\x00" * MAX_HANDSHAKE_BUFFER)
        self.assert_socks_error(parser, None)

    def test_buffer_limit_not_after_request(self):
        """Once the request is parsed, any amount of payload may be buffered."""
        parser = at_request()
        parser.receive_data(CONNECT_IPV4 + b"\x00" * 1000)
        self.assertIsInstance(parser.next_event(), Request)
        parser.receive_data(b"\x00" * (2 * MAX_HANDSHAKE_BUFFER))
        parser.reply(0)
        self.assertIs(parser.next_event(), PAUSED)
        self.assertEqual(len(parser.trailing_data[0]), 1000 + 2 * MAX_HANDSHAKE_BUFFER)

    def test_no_error_reply_outside_request(self):
        """After a greeting error no reply may be sent."""
        parser = Socks5Server()
        parser.receive_data(b"\x06\x01")
        self.assert_socks_error(parser, None)
        self.assertRaises(SocksStateError, parser.reply, 0x01)

    def test_error_reply_only_once(self):
        """The reply owed after a request error can be sent only once."""
        parser = at_request()
        parser.receive_data(b"\x05\x01\x00\x02")
        self.assert_socks_error(parser, 0x08)
        self.assertRaises(SocksStateError, parser.reply, 0x00)
        parser.reply(0x08)
        self.assertRaises(SocksStateError, parser.reply, 0x08)

    def test_choose_method_wrong_state(self):
        """Choosing a method before the greeting raises."""
        self.assertRaises(SocksStateError, Socks5Server().choose_method, METHOD_NO_AUTH)

    def test_choose_method_not_offered(self):
        """Choosing a method the client did not offer raises."""
        parser = Socks5Server()
        parser.receive_data(b"\x05\x01\x00")
        parser.next_event()
        self.assertRaises(SocksStateError, parser.choose_method, METHOD_USERPASS)
        self.assertRaises(SocksStateError, parser.choose_method, 0x01)
        self.assertIs(parser.state, SEND_METHOD)

    def test_auth_reply_wrong_state(self):
        """Answering credentials that were never asked for raises."""
        self.assertRaises(SocksStateError, at_request().auth_reply, True)

    def test_reply_wrong_state(self):
        """Replying before the request raises, and so does replying twice."""
        self.assertRaises(SocksStateError, Socks5Server().reply, 0)
        parser = at_request()
        parser.receive_data(CONNECT_IPV4)
        parser.next_event()
        parser.reply(0)
        self.assertRaises(SocksStateError, parser.reply, 0)

    def test_reply_bad_arguments(self):
        """Out-of-range codes or ports are refused before any state change."""
        parser = at_request()
        parser.receive_data(CONNECT_IPV4)
        parser.next_event()
        self.assertRaises(ValueError, parser.reply, 256)
        self.assertRaises(ValueError, parser.reply, 0, "1.2.3.4", 70000)
        self.assertRaises(ValueError, parser.reply, 0, "x" * 300)
        self.assertIs(parser.state, SEND_REPLY)

    def test_state_repr(self):
        """States and sentinels print as their names."""
        self.assertEqual(repr(AWAIT_GREETING), "AWAIT_GREETING")
        self.assertEqual(repr(NEED_DATA), "NEED_DATA")


requests = st.one_of(
    st.builds(
        lambda command, address, port: (command, str(address), port, ATYP_IPV4),
        st.sampled_from([CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE]),
        st.ip_addresses(v=4),
        st.integers(0, 65535),
    ),
    st.builds(
        lambda command, address, port: (command, address.compressed, port, ATYP_IPV6),
        st.sampled_from([CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE]),
        st.ip_addresses(v=6),
        st.integers(0, 65535),
    ),
    st.builds(
        lambda command, name, port: (command, name, port, ATYP_DOMAIN),
        st.sampled_from([CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE]),
        st.text(
            alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
            min_size=1,
            max_size=255,
        ),
        st.integers(0, 65535),
    ),
)


class Socks5ParserPropertyTests(SynchronousTestCase):
    """Properties over generated input."""

    @settings(max_examples=500, deadline=None)
    @given(
        st.sampled_from(["greeting", "auth", "request"]),
        st.binary(max_size=600),
        st.sampled_from([METHOD_NO_AUTH, METHOD_USERPASS]),
    )
    def test_random_bytes_only_raise_socks_error(self, stage, data, method):
        """Arbitrary bytes at any stage give events, sentinels or SocksError, nothing else."""
        parser = {"greeting": Socks5Server, "auth": at_auth, "request": at_request}[stage]()
        parser.receive_data(data)
        try:
            for _ in range(5):
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Greeting):
                    if method in event.methods:
                        parser.choose_method(method)
                    else:
                        parser.choose_method(METHOD_NONE_ACCEPTABLE)
                elif isinstance(event, Socks4Request):
                    self.assertEqual(parser.refuse_socks4()[:2], b"\x00\x5b")
                    break
                elif isinstance(event, UserPassAuth):
                    parser.auth_reply(True)
                elif isinstance(event, Request):
                    self.assertIn(event.address_type, (ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6))
                    break
        except SocksError as error:
            self.assertIn(error.reply_code, (None, 0x01, 0x04, 0x07, 0x08))
            self.assertIs(parser.state, ERROR)

    @settings(max_examples=300, deadline=None)
    @given(requests, st.binary(max_size=20))
    def test_request_round_trip(self, request, trailing):
        """An encoded request parses back to the same fields, byte-at-a-time too."""
        command, host, port, address_type = request
        wire = encode_request(command, host, port, address_type)
        expected = Request(command=command, host=host, port=port, address_type=address_type)
        parser = at_request()
        parser.receive_data(wire + trailing)
        self.assertEqual(parser.next_event(), expected)
        self.assertEqual(parser.trailing_data, (trailing, False))
        parser = at_request()
        for index in range(len(wire)):
            self.assertIs(parser.next_event(), NEED_DATA)
            parser.receive_data(wire[index : index + 1])
        self.assertEqual(parser.next_event(), expected)
