"""
Tests for L{anyproxy.gateway.status.api}: the snapshot behind C{/api/status}
and the status page's login check.
"""

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.trial import unittest

from anyproxy.gateway.tunnel_pool import Tunnel, TunnelPool
from anyproxy.gateway.status.api import TrafficHistory, status_site, status_snapshot
from anyproxy.operator_site import SingleUserChecker
from anyproxy.gateway.status.page import CONTENT_SECURITY_POLICY, PAGE


class FakeMux:
    """A mux with a stream count and, optionally, traffic counters."""

    def __init__(self, streams=0, **counters):
        self.stream_count = streams
        for name, value in counters.items():
            setattr(self, name, value)


def make_registry(*tunnels):
    registry = TunnelPool(Clock())
    for tunnel in tunnels:
        registry.add(tunnel)
    return registry


class SnapshotTests(unittest.TestCase):
    """L{status_snapshot} reads the registry and whatever counters the muxes have."""

    def test_no_tunnels(self):
        """With nobody connected the totals are zero and unknown counters are null."""
        snapshot = status_snapshot(make_registry(), started_at=100.0, now=130.0)
        self.assertEqual(snapshot["clients"], [])
        self.assertEqual(snapshot["totals"], {
            "tunnels": 0, "clients": 0, "groups": 0, "active_streams": 0,
            "streams_opened": None, "bytes_in": None, "bytes_out": None,
            "since_start": False})
        self.assertEqual(snapshot["gateway"]["uptime"], 30.0)

    def test_counters_and_totals(self):
        """Per-tunnel counters are reported and summed; tunnels are listed oldest first."""
        first = Tunnel("a", "lab", FakeMux(2, bytes_received=10, bytes_sent=20, streams_opened=3),
                       address="tcp4:10.0.0.1:1", connected_at=50.0)
        second = Tunnel("b", "default", FakeMux(1, bytes_in=5, bytes_out=7),
                        address="tcp4:10.0.0.2:2", connected_at=40.0)
        third = Tunnel("a", "lab", FakeMux(0), connected_at=60.0)
        snapshot = status_snapshot(make_registry(first, second, third), 0.0, now=100.0)
        self.assertEqual([c["client_id"] for c in snapshot["clients"]], ["b", "a", "a"])
        self.assertEqual(snapshot["totals"], {
            "tunnels": 3, "clients": 2, "groups": 2, "active_streams": 3,
            "streams_opened": 3, "bytes_in": 15, "bytes_out": 27, "since_start": False})
        b, a, a2 = snapshot["clients"]
        self.assertEqual((b["bytes_in"], b["bytes_out"], b["streams_opened"]), (5, 7, None))
        self.assertEqual((a["bytes_in"], a["connected_for"], a["address"]),
                         (10, 50.0, "tcp4:10.0.0.1:1"))
        self.assertEqual((a2["bytes_in"], a2["active_streams"]), (None, 0))

    def test_counter_on_tunnel(self):
        """A counter on the Tunnel itself is read before the mux's, and a method is called."""
        tunnel = Tunnel("a", "default", FakeMux(0, bytes_received=1), connected_at=0.0)
        tunnel.bytes_in = lambda: 99  # attrs classes without slots take new attributes
        [client] = status_snapshot(make_registry(tunnel), 0.0, 1.0)["clients"]
        self.assertEqual(client["bytes_in"], 99)


class FakeRegistry:
    """A registry that reports removed tunnels, as L{TunnelPool} does for metrics."""

    def __init__(self, *tunnels):
        self._tunnels = list(tunnels)
        self.removal_observers = []

    def tunnels(self):
        return list(self._tunnels)

    def remove(self, tunnel):
        self._tunnels.remove(tunnel)
        for observer in self.removal_observers:
            observer(tunnel)


class HistoryTests(unittest.TestCase):
    """L{TrafficHistory} keeps the traffic of tunnels that have gone in the totals."""

    def test_totals_since_start(self):
        """Bytes of a tunnel that went are still counted; stream and tunnel counts are now."""
        gone = Tunnel("a", "default", FakeMux(1, bytes_received=100, bytes_sent=10),
                      connected_at=0.0)
        here = Tunnel("b", "default", FakeMux(2, bytes_received=1, bytes_sent=2), connected_at=0.0)
        registry = FakeRegistry(gone, here)
        history = TrafficHistory(registry)
        registry.remove(gone)
        totals = status_snapshot(registry, 0.0, 1.0, history)["totals"]
        self.assertEqual((totals["tunnels"], totals["active_streams"]), (1, 2))
        self.assertEqual((totals["bytes_in"], totals["bytes_out"], totals["streams_opened"]),
                         (101, 12, None))
        self.assertTrue(totals["since_start"])

    def test_registry_without_observers(self):
        """A registry that cannot report removals gives totals over connected tunnels."""

        class OldRegistry:
            def tunnels(self):
                return []

        history = TrafficHistory(OldRegistry())
        totals = status_snapshot(OldRegistry(), 0.0, 1.0, history)["totals"]
        self.assertFalse(totals["since_start"])


class CheckerTests(unittest.TestCase):
    """L{SingleUserChecker} accepts one login and nothing else."""

    def setUp(self):
        self.checker = SingleUserChecker("operator", "pässword")

    def test_right_login(self):
        """The configured username and password (UTF-8) are accepted."""
        login = UsernamePassword(b"operator", "pässword".encode("utf-8"))
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(login)), b"operator")

    def test_wrong_logins(self):
        """A wrong password, a wrong username or empty ones are refused."""
        for username, password in [(b"operator", b"wrong"), (b"other", "pässword".encode()),
                                   (b"", b""), (b"operator", b"")]:
            failure = self.failureResultOf(
                self.checker.requestAvatarId(UsernamePassword(username, password)))
            failure.trap(UnauthorizedLogin)

    def test_repr_hides_password(self):
        """The checker's repr never shows the password."""
        self.assertNotIn("pässword", repr(self.checker))

    def test_site_needs_credentials(self):
        """A status site without a username or password cannot be built."""
        self.assertRaises(ValueError, status_site, make_registry(), "", "")
        self.assertRaises(ValueError, status_site, make_registry(), "operator", "")


class PageTests(unittest.TestCase):
    """The page is one self-contained document."""

    def test_csp_pins_inline_code(self):
        """The CSP allows only the page's own script and style (by hash) and same-origin fetch."""
        policy = CONTENT_SECURITY_POLICY.decode()
        self.assertIn("default-src 'none'", policy)
        self.assertIn("connect-src 'self'", policy)
        self.assertEqual(policy.count("'sha256-"), 2)
        self.assertNotIn("unsafe-inline", policy)
        self.assertEqual(PAGE.count(b"<script>"), 1)
        self.assertNotIn(b"innerHTML", PAGE)
