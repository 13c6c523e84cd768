"""
Tests for frontend plugins: L{anyproxy.interfaces}, L{anyproxy.frontends.lookup},
the built-in and example plugins in L{anyproxy.plugins}, C{proxy.frontends}
in the config, and the example C{fixed-forward} plugin end to end.
"""

import os
import socket
import sys
import textwrap

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.plugin import IPlugin, pluginPackagePaths
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

import anyproxy.plugins
from anyproxy.auth import ANONYMOUS, UserDatabase
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.frontends.http.proxy import HttpProxyFactory
from anyproxy.frontends.lookup import UnknownFrontend, available_frontends, find_frontend
from anyproxy.frontends.socks5.protocol import Socks5Factory
from anyproxy.interfaces import FrontendContext, IFrontendFactory
from anyproxy.plugins.example_fixed_forward import FixedForwardFactory
from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment, Echo, blob, listen_tcp
from tests.test_config import GATEWAY, ConfigTestMixin
from tests.test_e2e_tcp import socks_echo

THIRD_PARTY = '''
from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import IPlugin
from zope.interface import implementer

from anyproxy.interfaces import IFrontendFactory


@implementer(IPlugin, IFrontendFactory)
class Discard:
    name = %(name)r
    description = "a test plugin from another distribution"
    authenticates = True

    def check_options(self, options):
        if "bad" in options:
            raise ValueError("bad is not allowed here")

    def build(self, options, context):
        return Factory.forProtocol(Protocol)


discard = Discard()
'''


class ThirdPartyMixin:
    """Install a plugin module the way another distribution would."""

    _modules = 0

    def add_third_party_plugin(self, name):
        """
        Write C{<tmp>/anyproxy/plugins/<module>.py} (no C{__init__.py}), put
        C{<tmp>} on C{sys.path} and extend C{anyproxy.plugins.__path__} as its
        C{pluginPackagePaths} line would have at import time.
        """
        ThirdPartyMixin._modules += 1
        module = "third_party_test_%d" % (ThirdPartyMixin._modules,)
        root = os.path.abspath(self.mktemp())
        directory = os.path.join(root, "anyproxy", "plugins")
        os.makedirs(directory)
        with open(os.path.join(directory, module + ".py"), "w") as f:
            f.write(textwrap.dedent(THIRD_PARTY % {"name": name}))
        self.patch(sys, "path", [root] + sys.path)
        extra = [p for p in pluginPackagePaths("anyproxy.plugins") if p.startswith(root)]
        self.assertEqual(extra, [directory])
        self.patch(anyproxy.plugins, "__path__", list(anyproxy.plugins.__path__) + extra)
        self.addCleanup(sys.modules.pop, "anyproxy.plugins." + module, None)
        return module


class DiscoveryTests(ThirdPartyMixin, unittest.SynchronousTestCase):
    """Plugins are found by name through twisted.plugin."""

    def test_builtin_and_example(self):
        """socks5, http and fixed-forward are found and provide both interfaces."""
        found = available_frontends()
        for name in ("socks5", "http", "fixed-forward"):
            plugin = find_frontend(name)
            self.assertIs(found[name], plugin)
            self.assertEqual(plugin.name, name)
            self.assertTrue(verifyObject(IFrontendFactory, plugin))
            self.assertTrue(IPlugin.providedBy(plugin))
        self.assertTrue(find_frontend("socks5").authenticates)
        self.assertFalse(find_frontend("fixed-forward").authenticates)

    def test_unknown(self):
        """An unknown name is an error listing the names there are."""
        error = self.assertRaises(UnknownFrontend, find_frontend, "gopher")
        self.assertTrue(str(error).startswith("unknown frontend 'gopher' (available: "), str(error))
        for name in ("fixed-forward", "http", "socks5"):
            self.assertIn(name, str(error))

    def test_third_party_directory(self):
        """A module in another sys.path entry's anyproxy/plugins/ is found."""
        module = self.add_third_party_plugin("discard")
        plugin = find_frontend("discard")
        self.assertEqual(type(plugin).__module__, "anyproxy.plugins." + module)
        self.assertIn("discard", available_frontends())

    def test_duplicate_name(self):
        """Two plugins with one name: the name is refused, naming both."""
        module = self.add_third_party_plugin("socks5")
        error = str(self.assertRaises(UnknownFrontend, find_frontend, "socks5"))
        self.assertIn("several plugins", error)
        self.assertIn(module, error)
        self.assertIn("builtin_frontends", error)
        self.assertNotIn("socks5", available_frontends())


class BuiltinPluginTests(unittest.SynchronousTestCase):
    """The built-in plugins wrap the existing factories."""

    def context(self):
        return FrontendContext(name="test", reactor=Clock(), users=UserDatabase(),
                               endpoint_for=lambda *a, **k: None, handshake_timeout=7.0)

    def test_socks5(self):
        """socks5 builds a Socks5Factory from the context."""
        context = self.context()
        factory = find_frontend("socks5").build({}, context)
        self.assertIsInstance(factory, Socks5Factory)
        self.assertIs(factory.users, context.users)
        self.assertIs(factory.endpoint_for, context.endpoint_for)
        self.assertIs(factory.reactor, context.reactor)
        self.assertEqual(factory.handshake_timeout, 7.0)

    def test_http_realm(self):
        """http builds an HttpProxyFactory; its one option is the realm."""
        factory = find_frontend("http").build({"realm": "lab"}, self.context())
        self.assertIsInstance(factory, HttpProxyFactory)
        self.assertEqual((factory.realm, factory.handshake_timeout), ("lab", 7.0))
        self.assertEqual(find_frontend("http").build({}, self.context()).realm, "anyproxy")

    def test_fixed_forward(self):
        """fixed-forward builds a factory that knows its target."""
        factory = find_frontend("fixed-forward").build(
            {"target_host": " db.lan ", "target_port": 5432}, self.context())
        self.assertIsInstance(factory, FixedForwardFactory)
        self.assertEqual(factory.target, "db.lan:5432")


FORWARD = GATEWAY + """
proxy:
  frontends:
    - type: fixed-forward
      listen_addr: "127.0.0.1:2222"
      options: {target_host: "db.lan", target_port: 5432}
"""


class ConfigTests(ThirdPartyMixin, ConfigTestMixin, unittest.SynchronousTestCase):
    """proxy.frontends is checked at load time, errors naming the key path."""

    def frontends(self, *entries, gateway=GATEWAY):
        return gateway + "proxy:\n  frontends:\n" + "".join(
            "    - %s\n" % (entry,) for entry in entries)

    def test_loaded(self):
        """Entries become FrontendConfigs after the built-in listeners."""
        config = self.load(FORWARD + '  socks5: {listen_addr: "127.0.0.1:1080"}\n')
        socks5, forward = config.proxy.all_frontends()
        self.assertEqual((socks5.type, socks5.name, socks5.path),
                         ("socks5", "socks5 proxy", "proxy.socks5"))
        self.assertEqual(dict(socks5.options), {})
        self.assertEqual((forward.type, forward.name, forward.path, forward.authenticates),
                         ("fixed-forward", "fixed-forward frontend #1", "proxy.frontends[0]", False))
        self.assertEqual(dict(forward.options), {"target_host": "db.lan", "target_port": 5432})
        self.assertEqual(forward.listener.endpoint, "tcp:2222:interface=127.0.0.1")
        self.assertTrue(forward.listener.local)
        with self.assertRaises(TypeError):
            forward.options["target_port"] = 1  # read-only

    def test_no_frontends(self):
        """Without proxy.frontends only the built-in keys make listeners."""
        self.assertEqual(self.load(GATEWAY).proxy.frontends, ())

    def test_unknown_type(self):
        """An unknown type names the key and the types there are."""
        message = self.error(self.frontends(
            '{type: socks5, listen_addr: "127.0.0.1:1080"}',
            '{type: x, listen_addr: "127.0.0.1:1081"}'))
        self.assertTrue(message.startswith(
            "proxy.frontends[1].type: unknown frontend 'x' (available: "), message)
        self.assertIn("fixed-forward, http, socks5", message)

    def test_required_keys(self):
        """type and listen_addr are required; unknown keys are refused."""
        self.assertTrue(self.error(self.frontends('{listen_addr: "127.0.0.1:1"}')).startswith(
            "proxy.frontends[0].type: required (available: "))
        self.assertEqual(self.error(self.frontends("{type: socks5}")),
                         "proxy.frontends[0].listen_addr: required, e.g. '127.0.0.1:2222'")
        self.assertTrue(self.error(self.frontends(
            '{type: socks5, listen_addr: "127.0.0.1:1", colour: red}')).startswith(
            "proxy.frontends[0].colour: unknown key"))
        self.assertTrue(self.error(self.frontends(
            '{type: socks5, listen_addr: "nowhere"}')).startswith(
            "proxy.frontends[0].listen_addr: "))
        self.assertEqual(self.error(GATEWAY + "proxy:\n  frontends: {type: socks5}\n"),
                         "proxy.frontends: expected a list, got a mapping")

    def test_option_errors(self):
        """The plugin's check_options errors carry the key path."""
        entry = '{type: fixed-forward, listen_addr: "127.0.0.1:2222", options: %s}'
        self.assertEqual(
            self.error(self.frontends(entry % "{target_host: db}")),
            "proxy.frontends[0].options.target_port: required, a port number 1-65535 (got None)")
        self.assertEqual(
            self.error(self.frontends(entry % "{target_host: db, target_port: 1, colour: red}")),
            "proxy.frontends[0].options.colour: unknown option (expected one of: "
            "target_host, target_port)")
        self.assertEqual(self.error(self.frontends(entry % "[1]")),
                         "proxy.frontends[0].options: expected a mapping, got a list")
        self.assertEqual(
            self.error(self.frontends('{type: socks5, listen_addr: ":1", options: {a: 1}}')),
            "proxy.frontends[0].options.a: unknown option (expected no options)")
        self.assertEqual(
            self.error(self.frontends('{type: http, listen_addr: ":1", options: {realm: 7}}')),
            "proxy.frontends[0].options.realm: expected a non-empty printable ASCII string")

    def test_builtin_listener_options(self):
        """proxy.http and proxy.socks5 take their plugin's options, checked the same way."""
        config = self.load(GATEWAY + 'proxy:\n  http: {listen_addr: "127.0.0.1:8080", '
                                     'options: {upstream_keepalive: 0, upstream_idle_timeout: 2.5}}\n')
        [http] = config.proxy.all_frontends()
        self.assertEqual(dict(http.options), {"upstream_keepalive": 0, "upstream_idle_timeout": 2.5})
        context = FrontendContext(name="test", reactor=Clock(), users=UserDatabase(),
                                  endpoint_for=lambda *a, **k: None)
        factory = find_frontend("http").build(http.options, context)
        self.assertEqual((factory.upstream_pool.max_idle, factory.upstream_pool.idle_timeout),
                         (0, 2.5))
        for options, error in [
                ("{upstream_keepalive: -1}",
                 "proxy.http.options.upstream_keepalive: expected a whole number >= 0 (0 = off)"),
                ("{upstream_keepalive: 1.5}",
                 "proxy.http.options.upstream_keepalive: expected a whole number >= 0 (0 = off)"),
                ("{upstream_idle_timeout: 0}",
                 "proxy.http.options.upstream_idle_timeout: expected a number of seconds > 0")]:
            self.assertEqual(self.error(GATEWAY + 'proxy:\n  http: {listen_addr: ":1", options: %s}\n'
                                        % (options,)), error)
        self.assertEqual(
            self.error(GATEWAY + 'proxy:\n  socks5: {listen_addr: ":1", options: {a: 1}}\n'),
            "proxy.socks5.options.a: unknown option (expected no options)")

    def test_plain_value_error(self):
        """A plugin's plain ValueError is reported at the options key."""
        self.add_third_party_plugin("discard")
        self.assertEqual(
            self.error(self.frontends('{type: discard, listen_addr: ":1", options: {bad: 1}}')),
            "proxy.frontends[0].options: bad is not allowed here")

    def test_credentials_rules(self):
        """List entries follow the built-in listeners' credentials rules."""
        self.assertTrue(self.error(self.frontends('{type: socks5, listen_addr: ":1080"}')).startswith(
            "proxy.frontends[0].listen_addr: ':1080' is not loopback and has no credentials"))
        self.assertEqual(len(self.load(self.frontends(
            '{type: socks5, listen_addr: ":1080", allow_anonymous: true}')).proxy.frontends), 1)
        self.assertEqual(
            self.error(self.frontends(
                '{type: http, listen_addr: ":1", auth_username: u}')),
            "proxy.frontends[0].auth_password: set both auth_username and auth_password, "
            "or neither")
        users = GATEWAY + "  users: [{username: bob, password: pw}]\n"
        self.assertEqual(
            self.error(self.frontends(
                '{type: http, listen_addr: ":1", auth_username: bob, auth_password: x}',
                gateway=users)),
            "proxy.frontends[0].auth_username: user 'bob' is also in gateway.users")

    def test_unauthenticated_frontend(self):
        """A frontend that cannot check credentials is loopback-only unless anonymous is allowed."""
        forward = '{type: fixed-forward, listen_addr: "%s", options: {target_host: db, ' \
                  'target_port: 22}%s}'
        users = GATEWAY + "  users: [{username: bob, password: pw}]\n"
        # gateway.users do not make it safe: nobody would be asked for them.
        self.assertEqual(
            self.error(self.frontends(forward % (":2222", ""), gateway=users)),
            "proxy.frontends[0].listen_addr: ':2222' is not loopback and the fixed-forward "
            "frontend cannot check credentials: use a loopback address, or allow_anonymous: true")
        self.load(self.frontends(forward % (":2222", ", allow_anonymous: true"), gateway=users))
        self.load(self.frontends(forward % ("[::1]:2222", "")))
        self.assertEqual(
            self.error(self.frontends(forward % ("127.0.0.1:2222",
                                                 ", auth_username: u, auth_password: p"))),
            "proxy.frontends[0].auth_username: the fixed-forward frontend does not check "
            "credentials; remove auth_username/auth_password")


def forward_echo(port, payload, timeout=20):
    """Connect to C{port}, send C{payload}, half-close, read to EOF."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    chunks = []
    try:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except socket.timeout:
            raise  # a hang is a failure, not an empty answer
        except OSError:
            pass  # reset, or already gone at our shutdown: the caller sees what arrived
    finally:
        sock.close()
    return b"".join(chunks)


class EndToEndTests(unittest.TestCase):
    """proxy.frontends entries loaded from YAML carry traffic through the tunnel."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self, frontends, with_client=True, **client_overrides):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway(proxy={"frontends": frontends})
        if with_client:
            yield self.deployment.start_client(**client_overrides)

    def port(self, name):
        return self.deployment.gateway.listeners[name].port.getHost().port

    def forward_to(self, port):
        return {"type": "fixed-forward", "listen_addr": "127.0.0.1:0",
                "options": {"target_host": "127.0.0.1", "target_port": port}}

    def echo_port(self):
        return listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    @defer.inlineCallbacks
    def test_fixed_forward_echo(self):
        """Two megabytes sent to a fixed-forward listener come back from the echo target."""
        yield self.start([self.forward_to(self.echo_port())])
        self.assertEqual(sorted(self.deployment.gateway.listeners),
                         ["fixed-forward frontend #1", "http proxy", "socks5 proxy",
                          "tunnel server"])
        payload = blob(2 * 1024 * 1024)
        got = yield deferToThread(forward_echo, self.port("fixed-forward frontend #1"), payload)
        self.assertEqual(len(got), len(payload))
        self.assertEqual(got, payload)
        # The built-in listeners still work beside it.
        got = yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1",
                                  self.echo_port(), b"still here")
        self.assertEqual(got, b"still here")

    @defer.inlineCallbacks
    def test_several_entries(self):
        """Several entries, including a built-in type, each get a listener of their own."""
        echo = self.echo_port()
        yield self.start([self.forward_to(echo), self.forward_to(echo),
                          {"type": "socks5", "listen_addr": "127.0.0.1:0",
                           "auth_username": PROXY_USER, "auth_password": PROXY_PASSWORD}])
        first, second = self.port("fixed-forward frontend #1"), self.port("fixed-forward frontend #2")
        self.assertNotEqual(first, second)
        results = yield defer.gatherResults([deferToThread(forward_echo, first, b"one"),
                                             deferToThread(forward_echo, second, b"two")])
        self.assertEqual(results, [b"one", b"two"])
        socks_port = self.port("socks5 frontend #3")
        got = yield deferToThread(socks_echo, socks_port, "127.0.0.1", echo, b"three")
        self.assertEqual(got, b"three")

    @defer.inlineCallbacks
    def test_no_tunnel_closes(self):
        """With no client connected the user's connection is closed, not left hanging."""
        yield self.start([self.forward_to(self.echo_port())], with_client=False)
        got = yield deferToThread(forward_echo, self.port("fixed-forward frontend #1"), b"hello")
        self.assertEqual(got, b"")

    @defer.inlineCallbacks
    def test_access_control(self):
        """The client's forbidden_hosts apply to the fixed target."""
        yield self.start([self.forward_to(self.echo_port())],
                         client={"forbidden_hosts": ["127.0.0.1"]})
        got = yield deferToThread(forward_echo, self.port("fixed-forward frontend #1"), b"hello")
        self.assertEqual(got, b"")


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """An endpoint whose connect returns a Deferred the test fires."""

    def __init__(self):
        self.cancelled = False
        self.factory = None

    def connect(self, factory):
        self.factory = factory
        self.connecting = defer.Deferred(lambda d: setattr(self, "cancelled", True))
        return self.connecting


class FixedForwardProtocolTests(unittest.SynchronousTestCase):
    """The fixed-forward protocol against a fake tunnel endpoint."""

    def setUp(self):
        self.endpoint = FakeEndpoint()
        self.asked = []

        def endpoint_for(user, host, port, kind="tcp"):
            self.asked.append((user, host, port, kind))
            if isinstance(self.endpoint, Exception):
                raise self.endpoint
            return self.endpoint

        context = FrontendContext(name="ff", reactor=Clock(), users=UserDatabase(),
                                  endpoint_for=endpoint_for)
        self.factory = find_frontend("fixed-forward").build(
            {"target_host": "db.lan", "target_port": 5432}, context)
        self.user = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        self.user_transport = StringTransportWithDisconnection()
        self.user_transport.protocol = self.user

    def target_connects(self):
        target = self.endpoint.factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = target
        target.makeConnection(transport)
        self.endpoint.connecting.callback(target)
        return transport

    def test_opens_anonymous_stream(self):
        """Each connection opens a stream to the fixed target, reading paused meanwhile."""
        self.user.makeConnection(self.user_transport)
        self.assertEqual(self.asked, [(ANONYMOUS, "db.lan", 5432, "tcp")])
        self.assertEqual(self.user_transport.producerState, "paused")

    def test_splice(self):
        """Early bytes are kept, then bytes flow both ways once the stream is open."""
        self.user.makeConnection(self.user_transport)
        self.user.dataReceived(b"early ")
        target_transport = self.target_connects()
        self.assertEqual(self.user_transport.producerState, "producing")
        self.user.dataReceived(b"late")
        self.assertEqual(target_transport.value(), b"early late")
        target_transport.protocol.dataReceived(b"answer")
        self.assertEqual(self.user_transport.value(), b"answer")

    def test_user_leaves_while_opening(self):
        """A user who leaves before the stream opens cancels the open."""
        self.user.makeConnection(self.user_transport)
        self.user_transport.loseConnection()
        self.assertTrue(self.endpoint.cancelled)

    def test_open_fails(self):
        """A refused stream closes the user's connection."""
        self.user.makeConnection(self.user_transport)
        self.endpoint.connecting.errback(StreamOpenError(Reason.NOT_ALLOWED))
        self.assertFalse(self.user_transport.connected)

    def test_endpoint_for_raises(self):
        """endpoint_for raising closes the user's connection too."""
        self.endpoint = StreamOpenError(Reason.NO_TUNNEL)
        self.user.makeConnection(self.user_transport)
        self.assertFalse(self.user_transport.connected)
