# -*- test-case-name: tests.test_gateway_hello -*-
"""
Tests for the HELLO keys of L{anyproxy.gateway.tunnel_server.TunnelServerFactory}
that balancing and group logins use: C{weight} and C{group_password}.
"""

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.auth import GroupLogins, User
from anyproxy.errors import HelloRefused
from anyproxy.gateway.client_access import ClientGrant
from anyproxy.gateway.tunnel_pool import TunnelPool
from anyproxy.gateway.tunnel_server import TunnelServerFactory


class FakeMux:
    """Records the HELLO the gateway answers with."""

    name = ""
    stream_count = 0

    def __init__(self):
        self.hellos = []

    def send_hello(self, info):
        self.hellos.append(info)


class FakeProtocol:
    """The parts of a L{GatewayTunnelProtocol} that C{tunnel_connected} reads."""

    peer = "tcp4:127.0.0.1:40000"
    grant = ClientGrant("test", ("*",), (), 1024)

    def __init__(self):
        self.mux = FakeMux()
        self.dropped = False

    def dropConnection(self, abort=False):
        self.dropped = True

    def abort(self):
        self.dropConnection(abort=True)


def hello(**extra):
    info = {"version": 1, "client_id": "c1", "group": "lab", "software": "anyproxy/test"}
    info.update(extra)
    return info


class HelloKeysTests(SynchronousTestCase):
    """C{weight} sets the tunnel's weight; C{group_password} adds a group login while connected."""

    def setUp(self):
        self.registry = TunnelPool(Clock())
        self.logins = GroupLogins()
        self.factory = TunnelServerFactory.for_credentials(self.registry, "test", "pw", Clock(), groups=("*",),
                                           group_logins=self.logins)
        self.logged = []
        observer = lambda event: self.logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def connect(self, **extra):
        """The registered tunnel, or C{None} when the HELLO is refused."""
        try:
            return self.factory.tunnel_connected(FakeProtocol(), hello(**extra))
        except HelloRefused as refused:
            self.logged.append(refused.reason)
            return None

    def test_default_weight(self):
        """A HELLO without weight gives weight 1."""
        self.assertEqual(self.connect().weight, 1.0)

    def test_weight(self):
        """An integer or fractional weight is taken as announced."""
        self.assertEqual(self.connect(weight=3).weight, 3.0)
        self.assertEqual(self.connect(weight=0.25).weight, 0.25)

    def test_bad_weight_refused(self):
        """A weight that is not a number in [0.01, 10000] refuses the tunnel."""
        for bad in (0, -1, 1e-300, 0.009, 10001, "3", True, None, [1]):
            self.assertIsNone(self.connect(weight=bad), bad)
        self.assertEqual(self.registry.tunnels(), [])

    def test_group_password_login_lives_with_tunnel(self):
        """The group login works while the tunnel is registered and ends with it."""
        tunnel = self.connect(group_password="lab-secret-pw")
        self.assertEqual(self.logins.authenticate("lab", "lab-secret-pw"), User("lab", "lab"))
        self.factory.tunnel_disconnected(tunnel)
        self.assertIsNone(self.logins.authenticate("lab", "lab-secret-pw"))
        self.assertEqual(self.registry.tunnels(), [])

    def test_no_group_password(self):
        """Without a group password, or with an empty one, no login is added."""
        self.connect()
        self.connect(group_password="")
        self.assertEqual(self.logins.groups(), [])

    def test_bad_group_password_refused_unshown(self):
        """A group password that is not a string or is too long refuses the tunnel, unlogged."""
        self.assertIsNone(self.connect(group_password=12345678))
        self.assertIsNone(self.connect(group_password="x" * 1025 + "lab-secret-pw"))
        self.assertEqual(self.registry.tunnels(), [])
        self.assertTrue(any("group_password" in line for line in self.logged))
        self.assertEqual([line for line in self.logged
                          if "12345678" in line or "lab-secret-pw" in line], [])

    def test_password_never_logged_or_shown(self):
        """Neither the logs nor the tunnel's repr show the group password."""
        tunnel = self.connect(group_password="lab-secret-pw")
        self.assertNotIn("lab-secret-pw", repr(tunnel))
        self.assertTrue(any("group login" in line for line in self.logged))
        self.assertEqual([line for line in self.logged if "lab-secret-pw" in line], [])

    def test_without_group_logins(self):
        """A factory without group logins ignores group passwords."""
        factory = TunnelServerFactory.for_credentials(self.registry, "test", "pw", Clock(), groups=("*",))
        self.assertIsNotNone(factory.tunnel_connected(FakeProtocol(),
                                                      hello(group_password="lab-secret-pw")))


class ClientHelloTests(SynchronousTestCase):
    """The client announces its weight, and its group password only when set."""

    def factory(self, **kwargs):
        from anyproxy.client.app import ClientTunnelFactory
        return ClientTunnelFactory("wss://127.0.0.1:8443/anyproxy", None, "c1", "lab",
                                   "user", "tunnel-pw", **kwargs)

    def test_defaults(self):
        """By default the HELLO says weight 1 and has no group_password."""
        info = self.factory().hello_info()
        self.assertEqual(info["weight"], 1)
        self.assertNotIn("group_password", info)

    def test_weight_and_group_password(self):
        """A set weight and group password go into the HELLO, never into the repr."""
        factory = self.factory(weight=2.5, group_password="lab-secret-pw")
        info = factory.hello_info()
        self.assertEqual((info["weight"], info["group_password"]), (2.5, "lab-secret-pw"))
        self.assertNotIn("lab-secret-pw", repr(factory))

    def test_hello_accepted_by_gateway(self):
        """The gateway takes the client's HELLO as it is."""
        registry, logins = TunnelPool(Clock()), GroupLogins()
        gateway = TunnelServerFactory.for_credentials(registry, "test", "pw", Clock(), groups=("*",),
                                                      group_logins=logins)
        info = self.factory(weight=3, group_password="lab-secret-pw").hello_info()
        tunnel = gateway.tunnel_connected(FakeProtocol(), info)
        self.assertEqual((tunnel.group, tunnel.weight), ("lab", 3.0))
        self.assertEqual(logins.groups(), ["lab"])


class RefusedHelloTests(SynchronousTestCase):
    """A HELLO after a refused one (in the same read, before the close completes) registers nothing."""

    def test_second_hello_ignored(self):
        from anyproxy.tunnel.websocket import GatewayTunnelProtocol

        class Factory:
            calls = 0

            def tunnel_connected(self, protocol, info):
                self.calls += 1
                if info.get("password") != "right":
                    raise HelloRefused(4003, "bad credentials")
                return "a tunnel"

        protocol = GatewayTunnelProtocol()
        protocol.factory, protocol.peer = Factory(), "203.0.113.9:4000"
        closes = []
        protocol.sendClose = lambda code=None, reason=None: closes.append(code)
        protocol.hello_received({"password": "wrong"})
        protocol.hello_received({"password": "right"})
        self.assertEqual((protocol.factory.calls, protocol.tunnel, closes), (1, None, [4003]))

    def test_blocked_while_checked(self):
        """A login whose source was blocked while its password was checked: 429, not a crash."""
        from autobahn.websocket.types import ConnectionDeny
        from anyproxy.auth import BLOCKED
        from anyproxy.tunnel.websocket import GatewayTunnelProtocol
        protocol = GatewayTunnelProtocol()
        error = self.assertRaises(ConnectionDeny, protocol._granted, BLOCKED, None)
        self.assertEqual(error.code, 429)
