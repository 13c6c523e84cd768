"""
The contract between L{anyproxy.tunnel.websocket} and Autobahn.

That module uses parts of Autobahn beyond its documented interfaces, and its
"Autobahn internals" comment block names each one.  setup.cfg bounds Autobahn
to the release series tested; these tests are what makes a new release safe
to allow: they fail if any listed part moves or changes shape (names,
signatures, the attributes Autobahn sets during a real loopback handshake,
how it treats messages, pings and unmasked frames).

The protocols here are plain Autobahn subclasses that use each internal the
way websocket.py does, with the options websocket.py sets (L{tune_factory}),
so that these tests do not depend on the mux.
"""

import ast
import inspect
import re

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket import interfaces
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.trial import unittest

from anyproxy.tunnel import frames, websocket
from anyproxy.tunnel.websocket import MAX_MESSAGE, tune_factory
from tests.support import binary_frame

AUTHORIZATION = websocket.basic_authorization("contract", "secret")


def listed_internals():
    """The names in websocket.py's "Autobahn internals" comment block."""
    lines = inspect.getsource(websocket).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Autobahn internals."))
    names = set()
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        match = re.match(r"#   (\w+(?:\.\w+)?(?:, \w+)*)\s", line)
        if match:
            names.update(match.group(1).split(", "))
    return names



class _Recording:
    """What both test protocols share: websocket.py's uses of the internals."""

    def connectionMade(self):
        super().connectionMade()
        self.closed = defer.Deferred()
        self.messages = defer.DeferredQueue()
        self.message_ends = 0

    def dataReceived(self, data):
        self._dataReceived(data)

    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessageEnd(self):
        self.message_ends += 1
        if not self.failedByMe:
            pieces = self.message_data
            self.messages.put((self.message_is_binary, list(pieces), type(pieces)))
        self.message_data = None

    def onClose(self, wasClean, code, reason):
        self.closed.callback(wasClean)


class _Server(_Recording, WebSocketServerProtocol):

    held_pings = ()

    def onConnect(self, request):
        self.factory.request = request
        return frames.SUBPROTOCOL

    def onPing(self, payload):
        # Held, as the tunnel does while congested: no pong yet.
        self.held_pings += (payload,)


class _Client(_Recording, WebSocketClientProtocol):

    pongs = ()

    def onPong(self, payload):
        self.pongs += (payload,)


class _OptionsRecorder:
    """A factory mix-in that keeps every option set with setProtocolOptions."""

    def setProtocolOptions(self, **options):
        self.options_set = dict(getattr(self, "options_set", {}), **options)
        super().setProtocolOptions(**options)


class _ServerFactory(_OptionsRecorder, WebSocketServerFactory):
    protocol = _Server


class _ClientFactory(_OptionsRecorder, WebSocketClientFactory):
    protocol = _Client


class AutobahnContractTests(unittest.TestCase):
    """A real loopback WebSocket between two Autobahn protocols tuned as the tunnel is."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.server_factory = _ServerFactory(
            url="ws://127.0.0.1/anyproxy", protocols=[frames.SUBPROTOCOL], reactor=reactor)
        self.server_factory.opened = defer.Deferred()
        tune_factory(self.server_factory, ping_interval=60, handshake_timeout=10)
        port = reactor.listenTCP(0, self.server_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = "ws://127.0.0.1:%d/anyproxy" % (port.getHost().port,)
        self.client_factory = _ClientFactory(url=url, protocols=[frames.SUBPROTOCOL],
                                             reactor=reactor)
        self.client_factory.opened = defer.Deferred()
        # Replaced after construction, as ClientTunnelFactory.configure does.
        self.client_factory.headers = {"Authorization": AUTHORIZATION}
        tune_factory(self.client_factory, ping_interval=60, handshake_timeout=10)
        reactor.connectTCP("127.0.0.1", port.getHost().port, self.client_factory)
        self.server, self.client = yield defer.gatherResults(
            [self.server_factory.opened, self.client_factory.opened])
        self.addCleanup(self._close)

    def _close(self):
        for each in (self.client, self.server):
            if not each.closed.called:
                each.dropConnection(abort=True)
        return defer.gatherResults([self.server.closed, self.client.closed])

    # -- names and signatures -------------------------------------------------

    def assertParameters(self, function, names):
        self.assertEqual(list(inspect.signature(function).parameters)[:len(names)], names)

    def test_signatures(self):
        """The internals that websocket.py calls or overrides keep their parameters."""
        self.assertParameters(WebSocketProtocol._dataReceived, ["self", "data"])
        self.assertParameters(WebSocketProtocol.onMessageEnd, ["self"])
        self.assertParameters(WebSocketProtocol.onMessageBegin, ["self", "isBinary"])
        self.assertParameters(WebSocketProtocol.onPing, ["self", "payload"])
        self.assertParameters(WebSocketProtocol.sendPong, ["self", "payload"])
        self.assertParameters(WebSocketProtocol.dropConnection, ["self", "abort"])
        self.assertParameters(WebSocketProtocol.sendData, ["self", "data", "sync", "chopsize"])
        self.assertIsInstance(WebSocketProtocol.STATE_OPEN, int)
        for side in (WebSocketServerProtocol, WebSocketClientProtocol):
            self.assertIs(side._dataReceived, WebSocketProtocol._dataReceived)

    @defer.inlineCallbacks
    def test_every_internal_used_is_listed(self):
        """
        Each Autobahn attribute that websocket.py uses (on self or a factory)
        beyond Autobahn's documented interfaces is in its internals block, and
        each name in the block is checked here.
        """
        # One message first, so that the per-message attributes exist too.
        self.client.sendMessage(b"one", isBinary=True)
        yield self.server.messages.get()
        tree = ast.parse(inspect.getsource(websocket))
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "factory"):
                    used.add(node.attr)
                elif isinstance(owner, ast.Attribute) and owner.attr == "factory":
                    used.add(node.attr)
            elif isinstance(node, ast.ClassDef):  # overrides and class attributes
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        used.add(item.name)
                    elif isinstance(item, ast.Assign):
                        used.update(t.id for t in item.targets if isinstance(t, ast.Name))
        autobahn_names = set()
        for each in (WebSocketServerProtocol, WebSocketClientProtocol,
                     WebSocketServerFactory, WebSocketClientFactory):
            autobahn_names.update(dir(each))
        for each in (self.server, self.client, self.server_factory, self.client_factory):
            autobahn_names.update(vars(each))
        public = {"factory", "transport"} | set(dir(protocol.Protocol)) | set(dir(protocol.Factory))
        for api in (interfaces.IWebSocketChannel, interfaces.IWebSocketChannelFrameApi,
                    interfaces.IWebSocketChannelStreamingApi,
                    interfaces.IWebSocketServerChannelFactory,
                    interfaces.IWebSocketClientChannelFactory):
            public.update(name for name in vars(api) if not name.startswith("_"))
        mine = {"closed", "messages", "message_ends", "opened", "request", "held_pings",
                "pongs", "options_set"}
        used_internals = (used & autobahn_names) - public - mine
        listed = listed_internals()
        self.assertEqual(used_internals - listed, set(),
                         "Autobahn internals used by websocket.py but not listed there")
        self.assertEqual(listed, set(CHECKED),
                         "every listed internal needs a check in this module (CHECKED)")

    def test_factory_reactor(self):
        """A factory's reactor is the attribute C{reactor}."""
        self.assertIs(self.server_factory.reactor, reactor)
        self.assertIs(self.client_factory.reactor, reactor)

    # -- what Autobahn sets during the handshake ------------------------------

    def test_attributes_after_handshake(self):
        """The attributes websocket.py reads are set as it expects, on both sides."""
        for side in (self.server, self.client):
            self.assertEqual(side.state, side.STATE_OPEN)
            self.assertIs(side.failedByMe, False)
            self.assertIsInstance(side.peer, str)
            self.assertIn("127.0.0.1", side.peer)
            # The class attribute is what Autobahn's methods log through:
            # an instance attribute would bypass the redacting logger.
            self.assertNotIn("log", vars(side))
            self.assertIn("log", dir(type(side)))
        self.assertIs(self.server.factory.isServer, True)
        self.assertIs(self.client.factory.isServer, False)
        self.assertIs(self.client.maskClientFrames, False)
        self.assertIs(self.server.requireMaskedClientFrames, False)

    def test_options_are_attributes(self):
        """Each option tune_factory sets is an attribute of the factory and protocol."""
        for factory, side in ((self.server_factory, self.server),
                              (self.client_factory, self.client)):
            self.assertIn("openHandshakeTimeout", factory.options_set)
            for name, value in factory.options_set.items():
                self.assertEqual((name, getattr(factory, name)), (name, value))
                self.assertEqual((name, getattr(side, name)), (name, value))

    def test_options_copied_only_when_absent(self):
        """A connection copies each of CONFIG_ATTRS from its factory, unless its class has it."""
        for side in (self.server, self.client):
            self.assertIn("openHandshakeTimeout", side.CONFIG_ATTRS)
            self.assertIn("maxMessagePayloadSize", side.CONFIG_ATTRS)

        class Preset(WebSocketServerProtocol):
            maxMessagePayloadSize = 7

        factory = WebSocketServerFactory(url="ws://127.0.0.1/x", reactor=Clock())
        factory.setProtocolOptions(maxMessagePayloadSize=100, openHandshakeTimeout=0)
        factory.protocol = Preset
        preset = factory.buildProtocol(None)
        preset.makeConnection(StringTransport())
        self.addCleanup(preset.connectionLost, failure.Failure(error.ConnectionDone()))
        self.assertEqual(preset.maxMessagePayloadSize, 7)
        self.assertNotIn("maxMessagePayloadSize", vars(preset))
        self.assertEqual(vars(preset)["openHandshakeTimeout"], 0)

    def test_send_queue_only_when_asked(self):
        """sendData writes at once unless asked to queue (sync); only then is send_queue used."""
        from collections import deque
        for side in (self.server, self.client):
            self.assertIsInstance(side.send_queue, deque)
            self.assertEqual(len(side.send_queue), 0)
        writes = []
        self.patch(self.server.transport, "write", writes.append)
        own = self.server.send_queue = deque()
        self.server.sendData(b"at once")
        self.assertEqual((writes, len(own)), ([b"at once"], 0))
        self.server.triggered = True  # hold the queue: what is queued stays to be seen
        self.server.sendData(b"queued", sync=True)
        self.assertEqual(list(own), [(b"queued", True)])
        self.server.triggered = False
        own.clear()

    def test_values_alike_on_every_tunnel(self):
        """The values read from the class until assigned are immutable and alike on each side."""
        self.assertEqual(self.server.websocket_version, 13)  # RFC 6455's
        self.assertEqual(self.client.websocket_version, self.client_factory.version)
        for side in (self.server, self.client):
            self.assertEqual(side.websocket_protocol_in_use, frames.SUBPROTOCOL)
            self.assertEqual(side.send_state, side.SEND_STATE_GROUND)
            self.assertIsInstance(side.autoPingPendingSeq, int)
            self.assertEqual(side.state, side.STATE_OPEN)
            self.assertEqual(side.data, b"")

    def test_handshake_request_and_headers(self):
        """Headers replaced on the client factory after construction are sent."""
        request = self.server_factory.request
        self.assertIn(frames.SUBPROTOCOL, request.protocols)
        self.assertEqual(request.headers.get("authorization"), AUTHORIZATION)
        self.assertIsInstance(request.peer, str)

    # -- messages --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_text_message(self):
        """A text message reaches onMessageEnd as pieces, marked not binary."""
        self.client.sendMessage(b"text", isBinary=False)
        binary, pieces, kind = yield self.server.messages.get()
        self.assertIs(binary, False)
        self.assertTrue(issubclass(kind, list))
        self.assertEqual(b"".join(pieces), b"text")

    @defer.inlineCallbacks
    def test_unmasked_frames_every_length_form(self):
        """
        Whole unmasked binary frames written on the client's transport, of
        each length encoding, arrive intact, one onMessageEnd each, even
        between Autobahn's own frames (a ping).
        """
        sizes = [0, 1, 125, 126, 0xFFFF, 0x10000, 200 * 1024]
        payloads = [bytes([index]) * size for index, size in enumerate(sizes)]
        for index, payload in enumerate(payloads):
            self.client.transport.write(binary_frame(payload))
            if index == 3:
                self.client.sendPing(b"between")
        for payload in payloads:
            binary, pieces, kind = yield self.server.messages.get()
            self.assertIs(binary, True)
            self.assertTrue(issubclass(kind, list))
            self.assertEqual(b"".join(pieces), payload)
        self.assertEqual(self.server.message_ends, len(payloads))
        self.assertEqual(self.server.held_pings, (b"between",))
        self.assertEqual(self.server.state, self.server.STATE_OPEN)

    @defer.inlineCallbacks
    def test_server_frames_unmasked(self):
        """The server's frames written the same way reach the client."""
        self.server.transport.write(binary_frame(b"x" * 70000))
        binary, pieces, _ = yield self.client.messages.get()
        self.assertEqual((binary, b"".join(pieces)), (True, b"x" * 70000))

    @defer.inlineCallbacks
    def test_oversized_frame_fails_connection(self):
        """A frame over the limit sets failedByMe; no message is handed on."""
        self.client.transport.write(binary_frame(b"\0" * (MAX_MESSAGE + 1)))
        yield self.server.closed
        self.assertIs(self.server.failedByMe, True)
        self.assertNotEqual(self.server.state, self.server.STATE_OPEN)
        self.assertEqual(self.server.messages.pending, [])

    # -- pings -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_ping_answered_only_from_on_ping(self):
        """
        Autobahn does not answer a ping itself once onPing is overridden: the
        held ping's pong, sent later, is the only one the client sees.
        """
        self.client.sendPing(b"held")
        self.client.transport.write(binary_frame(b"release"))
        _, pieces, _ = yield self.server.messages.get()
        self.assertEqual(b"".join(pieces), b"release")
        self.assertEqual(self.server.held_pings, (b"held",))
        self.assertEqual(self.client.pongs, ())
        self.server.sendPong(b"held")
        # Frames arrive in order: an automatic pong would be there first.
        self.server.sendMessage(b"marker", isBinary=True)
        _, pieces, _ = yield self.client.messages.get()
        self.assertEqual(b"".join(pieces), b"marker")
        self.assertEqual(self.client.pongs, (b"held",))

    @defer.inlineCallbacks
    def test_between_frames(self):
        """
        Between whole frames Autobahn holds no unparsed bytes (C{data} is
        b"") and no frame (C{current_frame} is None); within a frame's payload
        it holds the frame, with the bytes so far consumed.
        """
        for side in (self.server, self.client):
            self.assertEqual((side.data, side.current_frame), (b"", None))
        frame = binary_frame(b"x" * 1000)
        self.server._dataReceived(frame[:500])
        self.assertIsNotNone(self.server.current_frame)
        self.server._dataReceived(frame[500:])
        _, pieces, _ = yield self.server.messages.get()
        self.assertEqual(b"".join(pieces), b"x" * 1000)
        self.assertEqual((self.server.data, self.server.current_frame), (b"", None))

    def test_handshake_head_held_while_connecting(self):
        """
        Until its head is complete an opening handshake is STATE_CONNECTING,
        and C{data} holds every byte of it so far (what websocket.py bounds).
        """
        server = self.server_factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        self.addCleanup(server.connectionLost, failure.Failure(error.ConnectionDone()))
        head = b"GET /anyproxy HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 3000
        server._dataReceived(head[:100])
        server._dataReceived(head[100:])
        self.assertEqual((server.state, server.data), (server.STATE_CONNECTING, head))

    @defer.inlineCallbacks
    def test_inside_message(self):
        """
        C{inside_message} is true between the frames of a fragmented message
        (our frame reader must leave those bytes to Autobahn) and false again
        once its last frame is in.
        """
        self.assertFalse(self.server.inside_message)
        self.server._dataReceived(b"\x02\x03abc")  # binary, not final
        self.assertEqual((self.server.data, self.server.current_frame), (b"", None))
        self.assertTrue(self.server.inside_message)
        self.server._dataReceived(b"\x80\x03def")  # continuation, final
        _, pieces, _ = yield self.server.messages.get()
        self.assertEqual(b"".join(pieces), b"abcdef")
        self.assertFalse(self.server.inside_message)

    # -- closing -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_drop_connection_abort(self):
        """dropConnection(abort=True) closes both ends without a closing handshake."""
        self.server.dropConnection(abort=True)
        server_clean, client_clean = yield defer.gatherResults(
            [self.server.closed, self.client.closed])
        self.assertEqual((server_clean, client_clean), (False, False))
        self.assertNotEqual(self.client.state, self.client.STATE_OPEN)


# Each name of websocket.py's internals block, and what checks it here.
CHECKED = {
    "_dataReceived": "test_signatures; every test's traffic goes through it",
    "onMessageEnd": "test_signatures, test_unmasked_frames_every_length_form",
    "message_data": "test_text_message, test_unmasked_frames_every_length_form",
    "message_is_binary": "test_text_message, test_unmasked_frames_every_length_form",
    "inside_message": "test_inside_message",
    "failedByMe": "test_attributes_after_handshake, test_oversized_frame_fails_connection",
    "state": "test_attributes_after_handshake, test_oversized_frame_fails_connection",
    "STATE_OPEN": "test_signatures, test_attributes_after_handshake",
    "transport.write": "test_unmasked_frames_every_length_form, test_server_frames_unmasked",
    "maskClientFrames": "test_attributes_after_handshake",
    "isServer": "test_attributes_after_handshake",
    "onPing": "test_signatures, test_ping_answered_only_from_on_ping",
    "log": "test_attributes_after_handshake",
    "peer": "test_attributes_after_handshake",
    "dropConnection": "test_signatures, test_drop_connection_abort",
    "reactor": "test_factory_reactor",
    "headers": "test_handshake_request_and_headers",
    "openHandshakeTimeout": "test_options_are_attributes",
    "data": "test_between_frames, test_handshake_head_held_while_connecting",
    "STATE_CONNECTING": "test_handshake_head_held_while_connecting",
    "current_frame": "test_between_frames",
    "CONFIG_ATTRS": "test_options_copied_only_when_absent",
    "sendData": "test_signatures, test_send_queue_only_when_asked",
    "send_queue": "test_send_queue_only_when_asked",
    "websocket_version": "test_values_alike_on_every_tunnel",
    "websocket_protocol_in_use": "test_values_alike_on_every_tunnel",
    "send_state": "test_values_alike_on_every_tunnel",
    "autoPingPendingSeq": "test_values_alike_on_every_tunnel",
}
