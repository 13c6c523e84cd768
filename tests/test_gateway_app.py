"""
Tests for L{anyproxy.gateway.app}: the gateway's parts, their reload
contract, and the GOAWAY sent to tunnels on shutdown and on a reload that
revokes them.  A L{MemoryReactorClock}: no sockets.
"""

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from anyproxy.auth import User
from anyproxy.config.load import load_config
from anyproxy.errors import ConfigError, Reason
from anyproxy.gateway.app import make_gateway_service
from anyproxy.gateway.tunnel_pool import Tunnel
from anyproxy.interfaces import IReconfigurable, ITunnelPool
from tests.support import TestPKI
from tests.test_reload import write_yaml


# -- fakes ----------------------------------------------------------------------

class GoAwayMux:
    """Stands in for a tunnel's mux that can send GOAWAY; records into C{events}."""

    stream_count = 0
    bytes_sent = bytes_received = 0

    def __init__(self, events, name):
        self.events = events
        self.name = name
        self.draining = False

    def go_away(self, reason):
        self.events.append(("go_away", self.name, reason))
        self.draining = True


def tunnel(events, client_id, credential="shared"):
    """A L{Tunnel} over a L{GoAwayMux} whose close is recorded in C{events}."""
    return Tunnel(client_id=client_id, group="default", mux=GoAwayMux(events, client_id),
                  close=lambda: events.append(("close", client_id)), credential=credential)


# -- tests ----------------------------------------------------------------------

class _GatewayBase(unittest.TestCase):

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.pki = TestPKI(os.path.join(directory, "pki"))
        self.path = os.path.join(directory, "gateway.yaml")
        self.reactor = MemoryReactorClock()
        self.gateway = make_gateway_service(self.load(self.data()), self.reactor)
        self.gateway.startService()
        self.events = []

    def data(self, **gateway):
        data = {"proxy": {"socks5": {"listen_addr": "127.0.0.1:1080", "max_conns": 4},
                          "http": {"listen_addr": "127.0.0.1:8080"}},
                "gateway": {"listen_addr": "127.0.0.1:8443", "tls_cert": self.pki.cert_path,
                            "tls_key": self.pki.key_path, "auth_username": "tunnel",
                            "auth_password": "tunnel-pw",
                            # Stop at once; the drain has its own tests (test_drain).
                            "drain_timeout": 0}}
        data["gateway"].update(gateway)
        return data

    def load(self, data):
        return load_config(write_yaml(self.path, data), role="gateway")

    def stop(self):
        """Stop the gateway, letting the tunnels' closing turn pass."""
        stopped = self.gateway.stopService()
        self.reactor.advance(0)
        self.successResultOf(stopped)


class GatewayPartsTests(_GatewayBase):
    """The gateway is made of explicit parts, each with the reload contract."""

    def tearDown(self):
        self.stop()

    def test_parts_provide_interfaces(self):
        """The pool provides ITunnelPool, and every part IReconfigurable."""
        verifyObject(ITunnelPool, self.gateway.tunnel_pool)
        for part in self.gateway.parts():
            verifyObject(IReconfigurable, part)

    def test_listeners_by_part(self):
        """Each listener belongs to its part; listeners gathers them by name."""
        self.assertEqual(sorted(self.gateway.listeners),
                         ["http proxy", "socks5 proxy", "tunnel server"])
        self.assertIs(self.gateway.listeners["tunnel server"],
                      self.gateway.tunnel_server.listener)
        self.assertIs(self.gateway.listeners["socks5 proxy"],
                      self.gateway.frontends.records["socks5 proxy"].listener)
        self.assertIsNone(self.gateway.status_page.listener)
        self.assertTrue(all(each.running for each in self.gateway.listeners.values()))

    def test_failed_prepare_changes_nothing(self):
        """A part failing to prepare leaves every part, and the config, as they were."""
        config = self.gateway.config
        new = self.load(self.data(balance="random", no_tunnel_wait=9, max_conns_per_user=2,
                                  tls_key=self.pki.cert_path))
        self.assertRaises(ConfigError, self.gateway.reconfigure, new)
        self.assertIs(self.gateway.config, config)
        self.assertEqual(self.gateway.tunnel_pool.balance, "least_streams")
        self.assertEqual(self.gateway.user_endpoints.no_tunnel_wait, 3.0)
        self.assertNotEqual(self.gateway.limits.per_user.limit, 2)

    def test_listener_limits_follow_frontends(self):
        """A reload configures each listener's limiter in place, drops removed ones."""
        socks = self.gateway.limits.per_listener["socks5 proxy"]
        data = self.data()
        data["proxy"]["socks5"]["max_conns"] = 9
        del data["proxy"]["http"]
        self.successResultOf(self.gateway.reconfigure(self.load(data)))
        self.assertIs(self.gateway.limits.per_listener["socks5 proxy"], socks)
        self.assertEqual(socks.limit, 9)
        self.assertEqual(list(self.gateway.limits.per_listener), ["socks5 proxy"])

    def test_endpoint_for_uses_parts(self):
        """A frontend's endpoint waits on the pool with no_tunnel_wait and the limits."""
        endpoint = self.gateway.user_endpoints.endpoint_for(
            User(name="alice", group="lab"), "target.test", 80, frontend="socks5 proxy")
        self.assertIs(endpoint._tunnel_pool, self.gateway.tunnel_pool)
        self.assertEqual((endpoint.group, endpoint.frontend, endpoint.user),
                         ("lab", "socks5 proxy", "alice"))
        release = self.successResultOf(endpoint.admit())
        self.assertEqual(self.gateway.limits.per_user.active("alice"), 1)
        self.assertEqual(self.gateway.limits.per_listener["socks5 proxy"].active(), 1)
        release()
        self.assertEqual(self.gateway.limits.per_user.active("alice"), 0)


class GoAwayTests(_GatewayBase):
    """Tunnels are told GOAWAY before they are closed, on shutdown and on revocation."""

    def test_shutdown(self):
        """Stopping the gateway sends GOAWAY on every tunnel, then drops each connection."""
        for client_id in ("a", "b"):
            self.gateway.tunnel_pool.add(tunnel(self.events, client_id))
        stopped = self.gateway.stopService()
        self.assertEqual(sorted(self.events), [("go_away", "a", Reason.NO_TUNNEL),
                                               ("go_away", "b", Reason.NO_TUNNEL)])
        self.assertNoResult(stopped)
        self.reactor.advance(0)
        self.assertEqual(sorted(self.events[2:]), [("close", "a"), ("close", "b")])
        self.successResultOf(stopped)
        self.assertEqual(self.gateway.listeners["tunnel server"].running, 0)

    def test_reload_revokes(self):
        """A tunnel whose credential a reload removes is sent GOAWAY, then closed."""
        self.addCleanup(self.stop)
        credential = self.gateway.tunnel_server.factory.credentials.shared.name
        kept = tunnel(self.events, "kept", credential=credential)
        revoked = tunnel(self.events, "revoked", credential="removed-client")
        self.gateway.tunnel_pool.add(kept)
        self.gateway.tunnel_pool.add(revoked)
        self.assertEqual(self.successResultOf(self.gateway.reconfigure(self.load(self.data()))),
                         [])
        self.assertEqual(self.events, [("go_away", "revoked", Reason.NOT_ALLOWED)])
        self.assertIs(self.gateway.tunnel_pool.pick("default"), kept)
        self.reactor.advance(0)
        self.assertEqual(self.events[1:], [("close", "revoked")])
