"""
Tests for L{anyproxy.twistd.reload} and the C{reconfigure} methods it drives
(L{anyproxy.gateway.reconfigure}, L{anyproxy.client.app.ClientRoot}),
on fakes: a recording L{MemoryReactor}, no sockets.
"""

import errno
import os
import signal
from types import SimpleNamespace

import yaml
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger, globalLogPublisher
from twisted.trial import unittest

from anyproxy.auth import UserDatabase
from anyproxy.client.app import make_client_service
from anyproxy.config.model import LogConfig
from anyproxy.config.load import load_config
from anyproxy.errors import ConfigError, Reason, StreamOpenError
from anyproxy.gateway.reconfigure import ReloadableServerTLS
from anyproxy.gateway.app import make_gateway_service
from anyproxy.logs import make_observer, set_log_level
from anyproxy.tunnel import frames
from anyproxy.tunnel.mux import Mux
from anyproxy.twistd.reload import Reloader, changed_keys, summarize
from tests.support import TestPKI


# -- fakes ----------------------------------------------------------------------

class _Port:
    def __init__(self, reactor, port, interface):
        self._reactor = reactor
        self._port = port
        self._interface = interface

    def getHost(self):
        return IPv4Address("TCP", self._interface or "0.0.0.0", self._port)

    def stopListening(self):
        self._reactor.events.append(("stop", self._port))


class RecordingReactor(MemoryReactor):
    """A MemoryReactor whose ports record listen/stop in order; C{refuse} ports are in use."""

    def __init__(self, refuse=()):
        super().__init__()
        self.events = []
        self.refuse = set(refuse)
        self.from_thread = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.refuse:
            raise CannotListenError(interface, port,
                                    OSError(errno.EADDRINUSE, "Address already in use"))
        super().listenTCP(port, factory, backlog, interface)
        self.events.append(("listen", port))
        return _Port(self, port, interface)

    def callFromThread(self, f, *args, **kwargs):
        self.from_thread.append((f, args, kwargs))


class FakeTarget:
    """A program to reconfigure: records configs; may fail or wait."""

    def __init__(self):
        self.configs = []
        self.result = []

    def reconfigure(self, config):
        self.configs.append(config)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class LogCapture:
    """Every log event while a test runs."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self, prefix=""):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events if formatEvent(e).startswith(prefix)]


def write_yaml(path, data):
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def client_data(**overrides):
    client = {"gateway_addr": "127.0.0.1:8443", "client_id": "c1",
              "auth_username": "tunnel", "auth_password": "tunnel-pw"}
    client.update(overrides)
    return {"client": client}


# -- change summaries -------------------------------------------------------------

class SummaryTests(unittest.TestCase):
    """What the C{reload applied} line says."""

    def load(self, data):
        return load_config(write_yaml(self.mktemp(), data), check_files=False)

    def test_changed_keys_named_not_shown(self):
        """Changed keys are named by path; a password's value never appears."""
        old = self.load(client_data(forbidden_hosts=["10.0.0.0/8"]))
        new = self.load(client_data(auth_password="other-pw", replicas=2))
        keys = changed_keys(old, new)
        self.assertEqual(sorted(keys), ["client.auth_password", "client.forbidden_hosts/limit/allowed_hosts",
                                        "client.replicas"])
        summary, restart = summarize(old, new, "client")
        self.assertNotIn("other-pw", summary)
        self.assertIn("client.replicas", summary)
        self.assertEqual(restart, [])

    def test_other_role_and_restart_keys(self):
        """The gateway ignores the client section; log.format needs a restart."""
        old = self.load(client_data())
        data = client_data(replicas=3)
        data["log"] = {"format": "json", "level": "debug"}
        summary, restart = summarize(old, self.load(data), "gateway")
        self.assertEqual(summary, "log.level changed; certificates re-read")
        self.assertEqual(restart, ["log.format"])

    def test_log_destination_keys_need_restart(self):
        """log.output, log.max_age and log.compress are set up at start: restart keys."""
        old = self.load(client_data())
        data = client_data()
        data["log"] = {"output": "stderr", "max_age": 7, "compress": True}
        summary, restart = summarize(old, self.load(data), "client")
        self.assertEqual(summary, "no key changed; certificates re-read")
        self.assertEqual(restart, ["log.output", "log.max_age", "log.compress"])

    def test_nothing_changed(self):
        """An unchanged file says so."""
        config = self.load(client_data())
        self.assertEqual(summarize(config, config, "client")[0],
                         "no key changed; certificates re-read")


# -- the Reloader -----------------------------------------------------------------

class ReloaderTests(unittest.TestCase):
    """Load, refuse or apply, one at a time; SIGHUP when asked."""

    def setUp(self):
        self.path = write_yaml(os.path.abspath(self.mktemp()), client_data())
        self.config = load_config(self.path, role="client")
        self.target = FakeTarget()
        self.reactor = RecordingReactor()
        self.reloader = Reloader(self.path, "client", self.target, self.config, self.reactor)
        self.logs = LogCapture(self)

    def test_applies_good_file(self):
        """A good file goes to reconfigure, becomes the config, and is logged in one line."""
        write_yaml(self.path, client_data(replicas=2))
        self.assertTrue(self.successResultOf(self.reloader.reload()))
        self.assertEqual([c.client.replicas for c in self.target.configs], [2])
        self.assertEqual(self.reloader.config.client.replicas, 2)
        self.assertEqual(self.logs.texts("reload applied"),
                         ["reload applied: client.replicas changed; certificates re-read"])

    def test_restart_keys_named(self):
        """A log rotation key is named as needing a restart (the client has no access log)."""
        data = client_data()
        data["log"] = {"max_size": 7}
        write_yaml(self.path, data)
        self.assertTrue(self.successResultOf(self.reloader.reload()))
        self.assertEqual(self.logs.texts("reload: log.max_size"),
                         ["reload: log.max_size changed: takes effect at the next restart"])

    def test_refuses_bad_yaml(self):
        """Bad YAML is refused with one line naming the file; nothing is applied."""
        with open(self.path, "w") as f:
            f.write("client: [unclosed\n")
        self.assertFalse(self.successResultOf(self.reloader.reload()))
        self.assertEqual(self.target.configs, [])
        self.assertIs(self.reloader.config, self.config)
        refused = self.logs.texts("reload refused")
        self.assertEqual(len(refused), 1)
        self.assertIn(self.path + ": ", refused[0])
        self.assertIn("bad YAML", refused[0])

    def test_unexpected_error_refused(self):
        """An error the loader did not expect refuses the reload (False, logged), applying nothing."""
        from anyproxy.twistd import reload as reload_module

        def broken(path, role=None, start_dir=None):
            raise RecursionError("maximum recursion depth exceeded")
        self.patch(reload_module, "load_config", broken)
        self.assertFalse(self.successResultOf(self.reloader.reload()))
        self.assertEqual(self.target.configs, [])
        self.assertIs(self.reloader.config, self.config)
        self.assertEqual(len(self.flushLoggedErrors(RecursionError)), 1)

    def test_refuses_bad_cidr(self):
        """A bad CIDR is refused with the file and the key path."""
        write_yaml(self.path, client_data(forbidden_hosts=["10.0.0.0/33"]))
        self.assertFalse(self.successResultOf(self.reloader.reload()))
        self.assertEqual(self.target.configs, [])
        [line] = self.logs.texts("reload refused")
        self.assertIn("%s: client.forbidden_hosts[0]: " % (self.path,), line)

    def test_refuses_unknown_key_and_missing_cert(self):
        """An unknown key and a missing certificate file are refused too."""
        write_yaml(self.path, client_data(replica=2))
        self.assertFalse(self.successResultOf(self.reloader.reload()))
        write_yaml(self.path, client_data(gateway_tls_cert="missing.crt"))
        self.assertFalse(self.successResultOf(self.reloader.reload()))
        lines = self.logs.texts("reload refused")
        self.assertIn("client.replica", lines[0])
        self.assertIn("client.gateway_tls_cert", lines[1])
        self.assertEqual(self.target.configs, [])

    def test_reconfigure_config_error_refused(self):
        """A ConfigError from reconfigure (e.g. a key not matching its cert) refuses the reload."""
        self.target.result = ConfigError("certs/x.crt: the private key in x.key does not match")
        write_yaml(self.path, client_data(replicas=2))
        self.assertFalse(self.successResultOf(self.reloader.reload()))
        self.assertIs(self.reloader.config, self.config)
        self.assertEqual(len(self.logs.texts("reload refused: certs/x.crt")), 1)

    def test_notes_logged(self):
        """Notes from reconfigure (a listener that could not move) are logged as warnings."""
        self.target.result = defer.succeed(["socks5 proxy: cannot listen on tcp:1"])
        self.assertTrue(self.successResultOf(self.reloader.reload()))
        self.assertEqual(self.logs.texts("reload: "),
                         ["reload: socks5 proxy: cannot listen on tcp:1"])

    def test_one_at_a_time(self):
        """A reload asked for while one is applying waits for it."""
        pending = defer.Deferred()
        self.target.result = pending
        first, second = self.reloader.reload(), self.reloader.reload()
        self.assertEqual(len(self.target.configs), 1)
        self.target.result = []
        pending.callback([])
        self.assertTrue(self.successResultOf(first))
        self.assertTrue(self.successResultOf(second))
        self.assertEqual(len(self.target.configs), 2)

    def test_signal_handler(self):
        """With handle_signal, SIGHUP schedules a reload; stopping restores the old handler."""
        before = signal.getsignal(signal.SIGHUP)
        reloader = Reloader(self.path, "client", self.target, self.config, self.reactor,
                            handle_signal=True)
        reloader.startService()
        self.addCleanup(signal.signal, signal.SIGHUP, before)
        handler = signal.getsignal(signal.SIGHUP)
        handler(signal.SIGHUP, None)
        self.assertEqual([f for f, _, _ in self.reactor.from_thread], [reloader.reload])
        reloader.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    def test_no_signal_handler_by_default(self):
        """In-process use leaves SIGHUP alone."""
        before = signal.getsignal(signal.SIGHUP)
        self.reloader.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
        self.reloader.stopService()

    def test_log_level_applies(self):
        """A new log.level changes the observer's filter at once."""
        path = self.mktemp()
        observer = make_observer(LogConfig(level="warn", file=path))
        reloader = Reloader(self.path, "client", self.target, self.config, self.reactor,
                            observer=observer)
        self.addCleanup(set_log_level, None, "info")
        data = client_data()
        data["log"] = {"level": "debug"}
        write_yaml(self.path, data)
        log = Logger(observer=observer)
        log.info("before reload")
        self.assertTrue(self.successResultOf(reloader.reload()))
        log.debug("after reload")
        with open(path) as f:
            text = f.read()
        self.assertNotIn("before reload", text)
        self.assertIn("after reload", text)


# -- the gateway ------------------------------------------------------------------

class GatewayReconfigureTests(unittest.TestCase):
    """Gateway.reconfigure on a recording reactor."""

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.pki = TestPKI(os.path.join(directory, "pki"))
        self.path = os.path.join(directory, "gateway.yaml")
        self.reactor = RecordingReactor()
        self.service = make_gateway_service(self.load(self.data()), self.reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.reactor.events[:] = []

    def data(self, socks_port=1080, password="proxy-pw", http=True, **gateway):
        data = {"proxy": {"socks5": {"listen_addr": "127.0.0.1:%d" % socks_port,
                                     "auth_username": "user", "auth_password": password}},
                "gateway": {"listen_addr": "127.0.0.1:8443", "tls_cert": self.pki.cert_path,
                            "tls_key": self.pki.key_path, "auth_username": "tunnel",
                            "auth_password": "tunnel-pw",
                            # Stop at once (no clock here); see test_drain.
                            "drain_timeout": 0}}
        if http:
            data["proxy"]["http"] = {"listen_addr": "127.0.0.1:8080"}
        data["gateway"].update(gateway)
        return data

    def load(self, data):
        return load_config(write_yaml(self.path, data), role="gateway")

    def reconfigure(self, data):
        return self.successResultOf(self.service.reconfigure(self.load(data)))

    def test_rotation_keys_and_the_access_log(self):
        """A log rotation key needs a restart for the main log; the note says the access log follows."""
        logs = LogCapture(self)
        reloader = Reloader(self.path, "gateway", self.service, self.service.config, self.reactor)
        data = self.data()
        data["log"] = {"max_size": 7}
        write_yaml(self.path, data)
        self.assertTrue(self.successResultOf(reloader.reload()))
        self.assertEqual(logs.texts("reload: log.max_size"),
                         ["reload: log.max_size changed: takes effect at the next restart (the "
                          "access log's rotation follows the new values at once)"])

    def test_failed_move_keeps_the_serving_record(self):
        """Later reloads still reach the listener that serves (a revoked password is refused)."""
        from twisted.internet.error import CannotListenError

        def data(port, password, realm):
            d = self.data(password=password)
            d["proxy"]["http"] = {"listen_addr": "127.0.0.1:%d" % port, "auth_username": "user",
                                  "auth_password": password, "options": {"realm": realm}}
            return d

        self.reconfigure(data(8080, "pw1", "a"))
        self.reactor.refuse.add(8081)
        notes = self.reconfigure(data(8081, "pw1", "b"))  # options and address change
        self.flushLoggedErrors(CannotListenError)
        self.assertTrue(any("not applied" in note for note in notes), notes)
        self.reconfigure(data(8080, "pw2", "b"))
        running = self.service.listeners["http proxy"].factory
        self.assertIsNone(running.users.authenticate("user", "pw1"))
        self.assertIsNotNone(running.users.authenticate("user", "pw2"))

    def test_users_swapped(self):
        """New proxy and client credentials apply to the next login."""
        socks = self.service.listeners["socks5 proxy"].factory
        self.assertIsNotNone(socks.users.authenticate("user", "proxy-pw"))
        self.assertEqual(self.reconfigure(self.data(password="new-pw", auth_password="t2-pw")), [])
        self.assertIsNone(socks.users.authenticate("user", "proxy-pw"))
        self.assertIsNotNone(socks.users.authenticate("user", "new-pw"))
        tunnels = self.service.tunnel_server.factory
        self.assertIsNone(tunnels.grant_for(None, ("tunnel", "tunnel-pw")))
        self.assertIsNotNone(tunnels.grant_for(None, ("tunnel", "t2-pw")))
        self.assertEqual(self.reactor.events, [])  # nothing re-bound

    def test_settings_applied(self):
        """Balance, no_tunnel_wait, handshake timeout and limits take the new values."""
        self.reconfigure(self.data(balance="random", no_tunnel_wait=7, handshake_timeout=4,
                                   max_conns_per_user=3, queue_timeout=2))
        self.assertEqual(self.service.tunnel_pool.balance, "random")
        self.assertEqual(self.service.config.gateway.no_tunnel_wait, 7)
        self.assertEqual(self.service.user_endpoints.no_tunnel_wait, 7)
        self.assertEqual(self.service.listeners["socks5 proxy"].factory.handshake_timeout, 4)
        self.assertEqual(self.service.limits.per_user.limit, 3)
        self.assertEqual(self.service.limits.per_user.queue_timeout, 2)
        self.assertEqual(self.service.limits.per_listener["socks5 proxy"].queue_timeout, 2)

    def test_listener_moved_new_first(self):
        """A changed address listens anew before the old listener stops."""
        old_factory = self.service.listeners["socks5 proxy"].factory
        self.assertEqual(self.reconfigure(self.data(socks_port=1081)), [])
        self.assertEqual(self.reactor.events, [("listen", 1081), ("stop", 1080)])
        listener = self.service.listeners["socks5 proxy"]
        self.assertEqual(listener.port.getHost().port, 1081)
        self.assertIs(listener.factory, old_factory)
        self.assertIn(listener, list(self.service.frontends))

    def test_listener_move_refused_keeps_old(self):
        """A new address that cannot be bound leaves the old listener, with a note."""
        self.reactor.refuse.add(1081)
        [note] = self.reconfigure(self.data(socks_port=1081, password="new-pw"))
        self.assertIn("socks5 proxy: cannot listen on tcp:1081", note)
        self.assertIn("still on tcp:1080", note)
        self.flushLoggedErrors(CannotListenError)  # the Listener logs why, too
        self.assertEqual(self.reactor.events, [])
        self.assertEqual(self.service.listeners["socks5 proxy"].port.getHost().port, 1080)
        # The rest of the reload applied.
        users = self.service.listeners["socks5 proxy"].factory.users
        self.assertIsNotNone(users.authenticate("user", "new-pw"))

    def test_tunnel_listener_moved(self):
        """The tunnel server is re-bound like a proxy listener."""
        self.reconfigure(self.data(listen_addr="127.0.0.1:8444"))
        self.assertEqual(self.reactor.events, [("listen", 8444), ("stop", 8443)])

    def test_listener_removed_and_added(self):
        """A listener gone from the file stops; one added starts."""
        self.reconfigure(self.data(http=False))
        self.assertEqual(self.reactor.events, [("stop", 8080)])
        self.assertNotIn("http proxy", self.service.listeners)
        self.reconfigure(self.data())
        self.assertEqual(self.reactor.events[1:], [("listen", 8080)])
        self.assertIn("http proxy", self.service.frontends.records)
        self.assertIn("http proxy", self.service.limits.per_listener)

    def test_side_listeners(self):
        """The metrics listener moves; switching the status page on needs a restart."""
        self.assertEqual(len(self.reconfigure(self.data(metrics_addr="127.0.0.1:9100"))), 1)
        service = make_gateway_service(self.load(self.data(metrics_addr="127.0.0.1:9100")),
                                       self.reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.reactor.events[:] = []
        notes = self.successResultOf(service.reconfigure(self.load(self.data(
            metrics_addr="127.0.0.1:9101", status_addr="127.0.0.1:9090",
            status_username="admin", status_password="status-pw"))))
        self.assertEqual(self.reactor.events, [("listen", 9101), ("stop", 9100)])
        self.assertEqual(notes, ["gateway.status_addr: turning the status page on or off "
                                 "takes effect at the next restart"])

    def test_status_login(self):
        """A new status page login replaces the old one at once."""
        data = self.data(status_addr="127.0.0.1:9090", status_username="admin",
                         status_password="status-pw")
        service = make_gateway_service(self.load(data), self.reactor)
        checker = service.listeners["status page"].factory.checker
        self.successResultOf(checker.requestAvatarId(UsernamePassword(b"admin", b"status-pw")))
        data["gateway"]["status_password"] = "new-status-pw"
        self.successResultOf(service.reconfigure(self.load(data)))
        self.failureResultOf(checker.requestAvatarId(UsernamePassword(b"admin", b"status-pw")),
                             UnauthorizedLogin)
        self.successResultOf(checker.requestAvatarId(UsernamePassword(b"admin", b"new-status-pw")))

    def test_metrics_login(self):
        """A new metrics login, or none on loopback, applies at once; so does the deadline."""
        data = self.data(metrics_addr="127.0.0.1:9100", metrics_username="prom",
                         metrics_password="scrape-pw")
        service = make_gateway_service(self.load(data), self.reactor)
        site = service.listeners["metrics"].factory
        self.successResultOf(site.checker.requestAvatarId(UsernamePassword(b"prom", b"scrape-pw")))
        self.assertIsNot(site.resource, site.tree)
        self.assertEqual(site.request_timeout, 10.0)
        data["gateway"].update(metrics_password="new-scrape-pw", handshake_timeout=3)
        self.successResultOf(service.reconfigure(self.load(data)))
        self.failureResultOf(site.checker.requestAvatarId(
            UsernamePassword(b"prom", b"scrape-pw")), UnauthorizedLogin)
        self.successResultOf(site.checker.requestAvatarId(
            UsernamePassword(b"prom", b"new-scrape-pw")))
        self.assertEqual(site.request_timeout, 3)
        del data["gateway"]["metrics_username"], data["gateway"]["metrics_password"]
        self.successResultOf(service.reconfigure(self.load(data)))
        self.assertIs(site.resource, site.tree)

    def test_metrics_login_stays_with_an_address_that_cannot_move(self):
        """
        A public metrics page with a login, reloaded to a loopback address
        without one that cannot be bound: it stays where it is, with its login.
        """
        data = self.data(metrics_addr="0.0.0.0:9100", metrics_username="prom",
                         metrics_password="scrape-pw")
        service = make_gateway_service(self.load(data), self.reactor)
        service.startService()
        self.addCleanup(service.stopService)
        site = service.listeners["metrics"].factory
        self.reactor.refuse.add(9101)
        data["gateway"]["metrics_addr"] = "127.0.0.1:9101"
        del data["gateway"]["metrics_username"], data["gateway"]["metrics_password"]
        [note] = self.successResultOf(service.reconfigure(self.load(data)))
        self.flushLoggedErrors(CannotListenError)
        self.assertIn("still on", note)
        self.assertIsNot(site.resource, site.tree)  # the login still guards it
        self.successResultOf(site.checker.requestAvatarId(UsernamePassword(b"prom", b"scrape-pw")))
        self.reactor.refuse.discard(9101)
        self.successResultOf(service.reconfigure(self.load(data)))
        self.assertEqual(service.listeners["metrics"].port.getHost().port, 9101)
        self.assertIs(site.resource, site.tree)

    def test_max_streams_counts_streams_already_open(self):
        """
        A user given max_streams by a reload, while holding more streams
        than that, is admitted again only under it; lifting it keeps the count.
        """
        users = [{"username": "bob", "password": "bob-pw", "group": "default"}]
        self.reconfigure(self.data(users=users, queue_size=0))
        limits = self.service.limits
        held = [self.successResultOf(limits.admit("bob", "socks5 proxy")) for _ in range(5)]
        users[0]["max_streams"] = 3
        self.reconfigure(self.data(users=users, queue_size=0))
        self.failureResultOf(limits.admit("bob", "socks5 proxy"), StreamOpenError)
        for release in held[:3]:
            release()
        self.successResultOf(limits.admit("bob", "socks5 proxy"))
        self.failureResultOf(limits.admit("bob", "socks5 proxy"), StreamOpenError)
        del users[0]["max_streams"]
        self.reconfigure(self.data(users=users, queue_size=0, max_conns_per_user=4))
        self.successResultOf(limits.admit("bob", "socks5 proxy"))  # 4 of max_conns_per_user
        self.failureResultOf(limits.admit("bob", "socks5 proxy"), StreamOpenError)

    def test_certificate_reread(self):
        """TLS options are rebuilt from the files on every reload."""
        before = self.service.tunnel_server.tls.options
        self.reconfigure(self.data())
        self.assertIsNot(self.service.tunnel_server.tls.options, before)

    def test_bad_key_changes_nothing(self):
        """A key that does not match its certificate raises ConfigError before any change."""
        other = self.pki.ca.issue_cert("other.test")
        key_path = os.path.join(self.pki.directory, "other.key")
        other.private_key_pem.write_to_path(key_path)
        before = self.service.tunnel_server.tls.options
        self.assertRaises(ConfigError, self.service.reconfigure,
                          self.load(self.data(password="new-pw", tls_key=key_path)))
        self.assertIs(self.service.tunnel_server.tls.options, before)
        users = self.service.listeners["socks5 proxy"].factory.users
        self.assertIsNotNone(users.authenticate("user", "proxy-pw"))

    def test_tls_delegates(self):
        """ReloadableServerTLS asks its current options for each connection."""
        class Options:
            def serverConnectionForTLS(self, protocol):
                return ("connection", protocol)
        tls = ReloadableServerTLS(None)
        tls.options = Options()
        self.assertEqual(tls.serverConnectionForTLS("p"), ("connection", "p"))


class UserDatabaseReplaceTests(unittest.TestCase):
    """UserDatabase.replace swaps the users in place."""

    def test_replace(self):
        """Old entries stop working, new ones work, and an emptied database is open."""
        users = UserDatabase([("a", "pw1", "default")])
        users.replace([("a", "pw2", "lab")])
        self.assertIsNone(users.authenticate("a", "pw1"))
        self.assertEqual(users.authenticate("a", "pw2").group, "lab")
        users.replace([])
        self.assertFalse(users.required)


# -- the client -------------------------------------------------------------------

class ClientReconfigureTests(unittest.TestCase):
    """ClientRoot.reconfigure (not started: nothing dials)."""

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.root, self.factories = make_client_service(
            load_config(write_yaml(self.path, client_data()), role="client"), MemoryReactor())

    def reconfigure(self, **overrides):
        config = load_config(write_yaml(self.path, client_data(**overrides)), role="client")
        return self.successResultOf(self.root.reconfigure(config))

    def names(self):
        return sorted(service.name for service in self.root if service.name)

    def test_dialer_settings(self):
        """ACL, limits and timeouts go to the dialer at once."""
        self.reconfigure(forbidden_hosts=["10.0.0.0/8"], max_concurrent_conns=7,
                         connect_timeout=3, idle_timeout=9)
        dialer = self.root.dialer
        self.assertIsNotNone(dialer.policy.check_name("10.1.2.3", 80, "tcp"))
        self.assertEqual((dialer.max_streams, dialer.connect_timeout, dialer.idle_timeout),
                         (7, 3, 9))

    def test_bad_client_key_with_srv_gateways(self):
        """
        With only srv: gateways (TLS options made per target when dialed), a
        client key that does not match its certificate still refuses the
        reload, before any change.
        """
        pki = TestPKI(os.path.join(os.path.abspath(self.mktemp()), "pki"))
        other = pki.ca.issue_cert("other.test")
        bad_key = os.path.join(pki.directory, "other.key")
        other.private_key_pem.write_to_path(bad_key)
        srv = {"gateway_addr": "srv:_anyproxy._tcp.example.test",
               "gateway_tls_cert": pki.ca_path, "tls_cert": pki.cert_path}
        self.root.dns_resolver = object()  # nothing dials here: no real DNS resolver
        self.reconfigure(**dict(srv, tls_key=pki.key_path))
        before = self.root.config
        config = load_config(write_yaml(self.path, client_data(**dict(srv, tls_key=bad_key))),
                             role="client")
        self.assertRaises(ConfigError, self.root.reconfigure, config)
        self.assertIs(self.root.config, before)

    def test_replicas(self):
        """Raising replicas adds tunnels; lowering removes the last ones."""
        self.reconfigure(replicas=3)
        self.assertEqual(self.names(), ["tunnel 127.0.0.1:8443 #1", "tunnel 127.0.0.1:8443 #2",
                                        "tunnel 127.0.0.1:8443 #3"])
        self.reconfigure(replicas=1)
        self.assertEqual(self.names(), ["tunnel 127.0.0.1:8443 #1"])

    def test_dropped_tunnel_goes_away(self):
        """A tunnel a reload drops sends its gateway GOAWAY before it closes; a kept one does not."""
        self.reconfigure(replicas=2)
        sent = {}
        for service in self.root:
            if service.name and service.name.startswith("tunnel "):
                sent[service.name] = []
                mux = Mux(sent[service.name].append, initiator=True, clock=Clock())
                service.ready_endpoint.tunnel = SimpleNamespace(mux=mux)
        self.reconfigure(replicas=1)
        self.assertEqual({name: [frames.decode(m) for m in messages]
                          for name, messages in sent.items()},
                         {"tunnel 127.0.0.1:8443 #1": [],
                          "tunnel 127.0.0.1:8443 #2": [frames.GoAway(Reason.NO_TUNNEL)]})

    def test_gateways(self):
        """A gateway removed loses its tunnels and factory; one added gets them."""
        self.reconfigure(gateway_addr=["127.0.0.1:9443"])
        self.assertEqual(self.names(), ["tunnel 127.0.0.1:9443 #1"])
        self.assertEqual(list(self.factories), [("127.0.0.1", 9443)])
        self.assertIs(self.factories, self.root.factories)

    def test_metrics_listener_moved(self):
        """A changed client.metrics_addr moves the metrics listener."""
        root, _ = make_client_service(load_config(write_yaml(
            self.path, client_data(metrics_addr="127.0.0.1:9200")), role="client"),
            MemoryReactor())
        config = load_config(write_yaml(self.path, client_data(metrics_addr="127.0.0.1:9201")),
                             role="client")
        self.assertEqual(self.successResultOf(root.reconfigure(config)), [])
        self.assertEqual(root.metrics_listener.description, "tcp:9201:interface=127.0.0.1")
        self.assertIn(root.metrics_listener, list(root))

    def test_metrics_login(self):
        """A new metrics login applies at once; with metrics_addr gone it stays until the
        restart that stops the listener."""
        login = dict(metrics_addr="127.0.0.1:9200", metrics_username="prom")
        root, _ = make_client_service(load_config(write_yaml(
            self.path, client_data(metrics_password="scrape-pw", **login)), role="client"),
            MemoryReactor())
        site = root.metrics_listener.factory
        config = load_config(write_yaml(self.path, client_data(metrics_password="new-pw",
                                                               **login)), role="client")
        self.assertEqual(self.successResultOf(root.reconfigure(config)), [])
        self.failureResultOf(site.checker.requestAvatarId(
            UsernamePassword(b"prom", b"scrape-pw")), UnauthorizedLogin)
        self.successResultOf(site.checker.requestAvatarId(UsernamePassword(b"prom", b"new-pw")))
        config = load_config(write_yaml(self.path, client_data()), role="client")
        self.assertEqual(len(self.successResultOf(root.reconfigure(config))), 1)
        self.assertIsNot(site.resource, site.tree)
        self.successResultOf(site.checker.requestAvatarId(UsernamePassword(b"prom", b"new-pw")))

    def test_credentials_and_hello(self):
        """Credentials and HELLO fields are updated for the next connection."""
        factory = self.factories[("127.0.0.1", 8443)]
        before = factory.headers
        self.reconfigure(auth_password="other-pw", group_id="lab", weight=3)
        self.assertNotEqual(factory.headers, before)
        self.assertEqual((factory.hello_info()["group"], factory.hello_info()["weight"]),
                         ("lab", 3))

