# -*- test-case-name: tests.test_config -*-
"""
Tests for L{anyproxy.config.model} and L{anyproxy.config.load}.
"""

import json
import os
import socket

import attr
import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from anyproxy.access_policy import AccessPolicy, LimitRule
from anyproxy.addresses import dial_address, listen_endpoint, port_range
from anyproxy.config import load as load_module, schema
from anyproxy.config.load import load_config
from anyproxy.config.model import (
    ClientConfig, ClientEntryConfig, Config, FleetConfig, FrontendConfig, GatewayConfig, ListenerConfig,
    LogConfig, OpenPortConfig, ProxyConfig, ThrottleConfig, UserConfig)
from anyproxy.config.yaml_reader import Node, Reader
from anyproxy.errors import ConfigError, Reason

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")

GATEWAY = """
gateway:
  listen_addr: "127.0.0.1:8443"
  tls_cert: "server.crt"
  tls_key: "server.key"
  auth_username: "user"
  auth_password: "pw"
"""

CLIENT = """
client:
  gateway_addr: "gw.example.com:8443"
"""


class ConfigTestMixin:
    """Write YAML into a temporary directory and load it."""

    def write(self, text, name="anyproxy.yaml"):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def load(self, text, **kwargs):
        kwargs.setdefault("check_files", False)
        return load_config(self.write(text), **kwargs)

    def error(self, text, **kwargs):
        """Load C{text}, expecting a L{ConfigError}; return its message."""
        kwargs.setdefault("check_files", False)
        path = self.write(text)
        message = str(self.assertRaises(ConfigError, load_config, path, **kwargs))
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(path + ": "), message)
        return message[len(path) + 2:]


class ExampleFilesTests(SynchronousTestCase):
    """The files in etc/ load."""

    def test_single_file(self):
        """etc/anyproxy.yaml holds proxy, gateway and client sections."""
        config = load_config(os.path.join(ETC, "anyproxy.yaml"), check_files=False)
        self.assertEqual(config.proxy.socks5.endpoint, "tcp:1080:interface=127.0.0.1")
        self.assertEqual(config.require_gateway().tls_cert,
                         os.path.normpath(os.path.join(ETC, "..", "certs", "server.crt")))
        self.assertEqual(config.require_client().gateway_addrs, (("127.0.0.1", 8443),))
        # The last is 127.0.0.1:8443, the demo's loopback example of a 403.
        self.assertEqual(len(config.client.policy.forbidden), 4)

    def test_gateway_file(self):
        """etc/gateway.yaml has a gateway and no client."""
        config = load_config(os.path.join(ETC, "gateway.yaml"), check_files=False)
        self.assertEqual(config.require_gateway().balance, "least_streams")
        self.assertRaises(ConfigError, config.require_client)

    def test_client_file(self):
        """etc/client.yaml has a client and no gateway."""
        config = load_config(os.path.join(ETC, "client.yaml"), check_files=False)
        self.assertEqual(config.require_client().group_id, "default")
        self.assertRaises(ConfigError, config.require_gateway)


class ListenAddrTests(SynchronousTestCase):
    """L{listen_endpoint} conversions."""

    def test_conversions(self):
        """host:port, [v6]:port, :port and localhost become endpoint strings.

        C{:port} and C{[::]:port} are dual-stack (IPv6 and IPv4, as Go's
        C{:port}); C{0.0.0.0:port} stays IPv4 and C{[::1]:port} IPv6 loopback.
        """
        for text, endpoint, local in [
            ("127.0.0.1:1080", "tcp:1080:interface=127.0.0.1", True),
            ("0.0.0.0:1080", "tcp:1080:interface=0.0.0.0", False),
            ("[::1]:1080", "tcp6:1080:interface=\\:\\:1", True),
            ("[::]:1080", "dualstack:1080", False),
            (":1080", "dualstack:1080", False),
            (":0", "dualstack:0", False),
            ("[0:0::0]:1080", "dualstack:1080", False),
            ("localhost:1080", "tcp:1080:interface=127.0.0.1", True),
        ]:
            self.assertEqual(listen_endpoint(text), (endpoint, local), text)

    def test_pass_through(self):
        """Strings starting with a known endpoint type pass unchanged."""
        for text, local in [("tcp:1080:interface=127.0.0.1", True), ("tcp:1080", False),
                            ("tcp6:1080:interface=\\:\\:1", True), ("unix:/tmp/p.sock", True),
                            ("tcp6:1080:interface=\\:\\:", False),
                            ("ssl:8443:privateKey=k.pem", False),
                            ("systemd:domain=INET:index=0", False)]:
            self.assertEqual(listen_endpoint(text), (text, local), text)

    def test_bad(self):
        """Malformed addresses raise ValueError."""
        for text in ["1080", "gw.example.com:1080", "::1:1080", "[::1]", ":70000", ":x",
                     "tcp:abc", "ssl:8443", "unix:", "dualstack:1080", "[::1:1080",
                     "[::1]1080", "::1080"]:
            self.assertRaises(ValueError, listen_endpoint, text)

    def test_dial_address(self):
        """Gateway addresses split into host and port."""
        self.assertEqual(dial_address("gw:8443"), ("gw", 8443))
        self.assertEqual(dial_address("[::1]:8443"), ("::1", 8443))
        for text in ["gw", "gw:0", ":8443", "::1:8443"]:
            self.assertRaises(ValueError, dial_address, text)

    def test_port_range(self):
        """Port ranges accept one port or low-high."""
        self.assertEqual(port_range(9001), (9001, 9001))
        self.assertEqual(port_range("9000-9100"), (9000, 9100))
        for value in ["9100-9000", "x", True, "0-10"]:
            self.assertRaises(ValueError, port_range, value)


class LoadTests(ConfigTestMixin, SynchronousTestCase):
    """L{load_config} builds the objects."""

    def test_empty_file(self):
        """An empty file loads with every section absent."""
        config = self.load("")
        self.assertEqual((config.proxy.socks5, config.gateway, config.client), (None, None, None))
        self.assertIn("gateway: section missing", str(self.assertRaises(ConfigError, config.require_gateway)))
        self.assertIn("client: section missing", str(self.assertRaises(ConfigError, config.require_client)))

    def test_listener_disabled(self):
        """An empty or absent listen_addr disables the listener."""
        config = self.load("proxy: {socks5: {listen_addr: ''}, http: {}}")
        self.assertEqual((config.proxy.socks5, config.proxy.http), (None, None))

    def test_integer_listen_addr(self):
        """A bare port number means all interfaces."""
        config = self.load("proxy: {http: {listen_addr: 8080, allow_anonymous: true}}")
        self.assertEqual(config.proxy.http.endpoint, "dualstack:8080")

    def test_gateway_addr_string_or_list(self):
        """gateway_addr is a string or a list."""
        self.assertEqual(self.load(CLIENT).client.gateway_addrs, (("gw.example.com", 8443),))
        config = self.load("client: {gateway_addr: ['a:1', '[::1]:2']}")
        self.assertEqual(config.client.gateway_addrs, (("a", 1), ("::1", 2)))
        self.assertEqual(config.client.server_name_for("a"), "a")

    def test_server_name(self):
        """gateway_server_name overrides the dialed host."""
        config = self.load("client: {gateway_addr: '10.0.0.1:1', gateway_server_name: gw}")
        self.assertEqual(config.client.server_name_for("10.0.0.1"), "gw")

    def test_client_defaults(self):
        """Absent client keys take documented defaults."""
        client = self.load(CLIENT).client
        self.assertEqual((client.group_id, client.replicas, client.max_concurrent_conns,
                          client.allow_udp, client.connect_timeout, client.idle_timeout),
                         ("default", 1, 1024, True, 10.0, 300.0))
        self.assertEqual((client.reconnect_initial_delay, client.reconnect_max_delay), (1.0, 60.0))
        self.assertEqual(client.policy, AccessPolicy())
        self.assertTrue(client.client_id)

    def test_policy(self):
        """forbidden_hosts, limit and allow_udp build the AccessPolicy."""
        client = self.load(CLIENT + """
  forbidden_hosts: ["10.", "*.corp"]
  limit:
    - {name: web, addr: "localhost:8080", protocol: tcp}
    - "192.168.0.0/16"
  allow_udp: false
""").client
        self.assertEqual([e.protocol for e in client.policy.allowed], ["tcp", "both"])
        self.assertEqual(client.policy.check_name("10.1.1.1", 1, "tcp"), Reason.NOT_ALLOWED)
        self.assertEqual(client.policy.check_name("x", 1, "udp"), Reason.PROTOCOL_NOT_ALLOWED)

    def test_allowed_hosts(self):
        """
        client.allowed_hosts takes the Go forms, next to limit; the gateway
        reads a file holding it too (it was an unknown key).
        """
        text = GATEWAY + CLIENT + r"""
  forbidden_hosts: ["*:25", '^metadata\..*$']
  allowed_hosts:
    - "api.example.com:443"
    - "*.example.org:*"
    - "10.0.0.0/8:22"
    - '.*\.trusted\.com:(80|443)'  # single quotes: no YAML escapes
  limit: ["*:*"]
"""
        policy = self.load(text, role="gateway").client.policy
        self.assertEqual([rule.kind for rule in policy.allowed_hosts],
                         ["name", "wildcard", "network", "regex"])
        self.assertEqual([rule.kind for rule in policy.forbidden], ["any", "regex"])
        self.assertIsNone(policy.check_resolved("x.trusted.com", 443, "tcp", ["192.0.2.1"]))
        self.assertEqual(policy.check_resolved("x.trusted.com", 22, "tcp", ["192.0.2.1"]),
                         Reason.NOT_ALLOWED)
        self.assertEqual(policy.check_name("metadata.internal", 80, "tcp"), Reason.NOT_ALLOWED)
        self.assertEqual(self.load(CLIENT + "  allowed_hosts: []\n").client.policy, AccessPolicy())

    def test_gateway_fields(self):
        """Gateway extension keys are read and converted."""
        gateway = self.load(GATEWAY + """
  users: [{username: bob, password: secret, group: lab}, {username: eve, password: x}]
  balance: random
  open_ports_allowed: ["9000-9100", 9200]
  status_addr: "127.0.0.1:9090"
  status_username: admin
  status_password: pw
""").gateway
        self.assertEqual([(u.username, u.group) for u in gateway.users], [("bob", "lab"), ("eve", "default")])
        self.assertEqual(gateway.open_ports_allowed, ((9000, 9100), (9200, 9200)))
        self.assertTrue(gateway.port_allowed(9050))
        self.assertFalse(gateway.port_allowed(9150))
        self.assertEqual(gateway.status_endpoint, "tcp:9090:interface=127.0.0.1")
        self.assertEqual(gateway.endpoint, "tcp:8443:interface=127.0.0.1")

    def test_gateway_users_for(self):
        """
        A listener's users are its own user in group default (user.group: the
        auth_groups) plus the gateway.users it takes (user.group: the entry's
        group); a loopback listener without auth_username takes none by
        default and stays open.
        """
        config = self.load(GATEWAY + """
  auth_groups: [default, lab]
  users: [{username: bob, password: b, group: lab}]
proxy:
  socks5: {listen_addr: "127.0.0.1:1080", auth_username: al, auth_password: a}
  http: {listen_addr: "127.0.0.1:8080"}
""")
        bob = config.gateway.users[0]
        self.assertEqual(config.gateway_users_for(config.proxy.socks5),
                         [("al", "a", "default", ("default", "lab")),
                          ("bob", ("b",), "lab", ("lab",), bob.policy)])
        self.assertEqual(bob.policy.groups, ("lab",))
        self.assertEqual(config.proxy.http.user_scope(), "none")
        self.assertEqual(config.gateway_users_for(config.proxy.http), [])

    def test_listener_users_scope(self):
        """users: all, none or names picks the gateway.users a listener takes."""
        config = self.load(GATEWAY + """
  users: [{username: bob, password: b, group: lab}, {username: eve, password: e}]
proxy:
  socks5: {listen_addr: "127.0.0.1:1080", users: all}
  http: {listen_addr: ":8080", users: [eve]}
  frontends:
    - {type: socks5, listen_addr: ":1081", auth_username: al, auth_password: a, users: none}
    - {type: socks5, listen_addr: ":1082", allow_anonymous: true}
    - {type: socks5, listen_addr: ":1083"}
""")
        names = lambda listener: [e[0] for e in config.gateway_users_for(listener)]
        self.assertEqual(names(config.proxy.socks5), ["bob", "eve"])
        self.assertEqual(names(config.proxy.http), ["eve"])
        first, anonymous, public = [f.listener for f in config.proxy.frontends]
        self.assertEqual(names(first), ["al"])
        self.assertEqual(names(anonymous), [])  # allow_anonymous: open beside gateway.users
        self.assertEqual(names(public), ["bob", "eve"])  # public, no opt-in: as before

    def test_gateway_users_for_without_gateway(self):
        """Without a gateway section the listener's user may name the default auth_groups."""
        config = self.load("proxy: {socks5: {listen_addr: ':1', auth_username: a, "
                           "auth_password: b}}")
        self.assertEqual(config.gateway_users_for(config.proxy.socks5),
                         [("a", "b", "default", ("default",))])

    def test_passwords_not_in_repr(self):
        """repr of a config never shows a password."""
        config = self.load(GATEWAY.replace('"pw"', '"hunter2"') + CLIENT +
                           "  auth_username: u\n  auth_password: hunter2\n")
        self.assertNotIn("hunter2", repr(config))

    def test_log(self):
        """The log section accepts warning as warn and resolves the file."""
        config = self.load("log: {level: WARNING, format: json, file: x.log}")
        self.assertEqual((config.log.level, config.log.format), ("warn", "json"))
        self.assertEqual(config.log.file, os.path.join(os.path.dirname(config.path), "x.log"))

    def test_log_rotation(self):
        """log.max_size (MB) and log.max_backups: bounded by default, as configured."""
        config = self.load("log: {file: x.log}")
        self.assertEqual((config.log.max_size, config.log.max_backups), (100, 10))
        config = self.load("log: {file: x.log, max_size: 5, max_backups: 3}")
        self.assertEqual((config.log.max_size, config.log.max_backups), (5, 3))
        self.assertEqual(self.load("log: {max_backups: 0}").log.max_backups, 0)
        for text, prefix in [("log: {max_size: 0}", "log.max_size: 0 is out of range"),
                             ("log: {max_size: '10MB'}", "log.max_size: expected an integer"),
                             ("log: {max_backups: -1}", "log.max_backups: -1 is out of range")]:
            self.assertTrue(self.error(text).startswith(prefix), self.error(text))

    def test_log_output(self):
        """
        log.output: stdout, stderr or file; absent, file when log.file is
        set, else stdout; log.file is used only when the output is file.
        """
        config = self.load("log: {}")
        self.assertEqual((config.log.output, config.log.effective_output()), (None, "stdout"))
        config = self.load("log: {file: x.log}")
        self.assertEqual((config.log.output, config.log.effective_output()), (None, "file"))
        config = self.load("log: {file: x.log, output: stdout}")
        self.assertEqual(config.log.effective_output(), "stdout")
        self.assertEqual(self.load("log: {output: ' STDERR '}").log.output, "stderr")
        self.assertEqual(self.load("log: {output: ''}").log.output, None)
        self.assertEqual(self.load("log: {output: file, file: x.log}").log.output, "file")
        for text, prefix in [
                ("log: {output: syslog}", "log.output: 'syslog' is not one of: stdout, stderr, file"),
                ("log: {output: 1}", "log.output: expected one of: stdout, stderr, file"),
                ("log: {output: file}", "log.file: required when output is file")]:
            self.assertTrue(self.error(text).startswith(prefix), self.error(text))

    def test_log_max_age_compress(self):
        """log.max_age (days, 0 = any age) and log.compress (off by default)."""
        config = self.load("log: {file: x.log}")
        self.assertEqual((config.log.max_age, config.log.compress), (0, False))
        config = self.load("log: {file: x.log, max_age: 28, compress: true}")
        self.assertEqual((config.log.max_age, config.log.compress), (28, True))
        for text, prefix in [("log: {max_age: -1}", "log.max_age: -1 is out of range"),
                             ("log: {max_age: 7d}", "log.max_age: expected an integer"),
                             ("log: {compress: 'yes'}", "log.compress: expected true or false")]:
            self.assertTrue(self.error(text).startswith(prefix), self.error(text))

    def test_log_file_directory_checked(self):
        """
        A log file that would be written must be in an existing, writable
        directory: one line at load, not a traceback when twistd opens it.
        An unused file (output stdout) and check_files=False are not checked.
        """
        message = self.error("log: {file: missing/x.log}", check_files=True)
        self.assertTrue(message.startswith("log.file: directory not found: /"), message)
        self.assertTrue(message.endswith("/missing (relative paths are relative to the config "
                                         "file's directory)"), message)
        self.assertTrue(self.error("log: {file: missing/x.log, output: file}", check_files=True)
                        .startswith("log.file: directory not found: "))
        self.assertTrue(self.error("log: {file: .}", check_files=True).endswith(" is a directory"))
        self.assertIsNotNone(self.load("log: {file: x.log}", check_files=True).log.file)
        self.assertEqual(self.load("log: {file: missing/x.log, output: stdout}",
                                   check_files=True).log.effective_output(), "stdout")
        self.load("log: {file: missing/x.log}", check_files=False)

    def test_log_directory_not_writable(self):
        """A directory the program cannot write to is refused at load."""
        if os.geteuid() == 0:
            raise SkipTest("root writes anywhere")
        directory = self.mktemp()
        os.makedirs(directory)
        os.chmod(directory, 0o555)
        self.addCleanup(os.chmod, directory, 0o755)
        message = self.error("log: {file: %s}" % (os.path.abspath(directory) + "/x.log",),
                             check_files=True)
        self.assertTrue(message.startswith("log.file: directory not writable: "), message)


class FileCheckTests(ConfigTestMixin, SynchronousTestCase):
    """Certificate and key files are resolved and checked."""

    def test_relative_paths_resolved(self):
        """Relative paths resolve against the config file's directory."""
        path = self.write(GATEWAY)
        directory = os.path.dirname(path)
        for name in ("server.crt", "server.key"):
            open(os.path.join(directory, name), "w").close()
        gateway = load_config(path).gateway
        self.assertEqual(gateway.tls_cert, os.path.join(os.path.abspath(directory), "server.crt"))

    def test_missing_file(self):
        """A missing cert file names the key."""
        message = self.error(GATEWAY, check_files=True)
        self.assertTrue(message.startswith("gateway.tls_cert: file not found: "), message)

    def test_role_skips_other_side(self):
        """Loading for the client does not check the gateway's files."""
        config = self.load(GATEWAY + CLIENT, check_files=True, role="client")
        self.assertIsNotNone(config.gateway)


class ErrorTests(ConfigTestMixin, SynchronousTestCase):
    """Every error is one line naming the file and the key."""

    def assert_error(self, text, prefix):
        message = self.error(text)
        self.assertTrue(message.startswith(prefix), "%r does not start with %r" % (message, prefix))
        return message

    def test_fleet_redis_not_a_redis_url(self):
        """A fleet's redis that is not a redis:// URL is refused without echoing it (its password)."""
        message = self.assert_error(
            GATEWAY + '  fleet: {redis: "http://:pw-secret@r:6379/0", peer_addr: "10.0.0.5:8444", '
            'peer_ca: ca.pem, peer_cert: gw.crt, peer_key: gw.key}\n', "gateway.fleet.redis: ")
        self.assertNotIn("pw-secret", message)

    def test_fleet_redis_checked_at_load(self):
        """A Redis URL the registry could not use is refused at load, never quoting the URL."""
        for url in ("redis://[::1", "redis://:pw-secret/x@r:6379/0", "redis://:pw-secret?x@r/0",
                    "redis://:pw-secret@r/zero"):
            message = self.assert_error(
                GATEWAY + '  fleet: {redis: "%s", peer_addr: "10.0.0.5:8444", '
                'peer_ca: ca.pem, peer_cert: gw.crt, peer_key: gw.key}\n' % (url,),
                "gateway.fleet.redis: ")
            self.assertNotIn("pw-secret", message)
            self.assertNotIn("secret", message)

    def test_files_in_urls_and_endpoints(self):
        """Files an ssl: listen address or a rediss:// URL names are checked at load."""
        message = self.error(
            "proxy:\n  http:\n    listen_addr: 'ssl:8443:privateKey=/nonexistent.key:"
            "certKey=/nonexistent.crt'\n    auth_username: u\n    auth_password: p\n",
            check_files=True)
        self.assertIn("proxy.http.listen_addr: privateKey file not found: /nonexistent.key", message)
        path = self.write(
            GATEWAY + '  fleet: {redis: "rediss://:pw-secret@r:6380/0?ssl_ca_certs=/nonexistent.pem", '
            'peer_addr: "10.0.0.5:8444", peer_ca: ca.pem, peer_cert: gw.crt, peer_key: gw.key}\n')
        for name in ("server.crt", "server.key", "ca.pem", "gw.crt", "gw.key"):
            open(os.path.join(os.path.dirname(path), name), "w").close()
        message = str(self.assertRaises(ConfigError, load_config, path, role="gateway"))
        self.assertIn("gateway.fleet.redis: ssl_ca_certs file not found: /nonexistent.pem", message)
        self.assertNotIn("pw-secret", message)

    def test_fleet_peer_addr_forms(self):
        """peer_addr takes host:port and :port (as every *_addr), never an endpoint string."""
        fleet = ('  fleet: {redis: "redis://r:6379/0", peer_addr: "%s", '
                 'peer_ca: ca.pem, peer_cert: gw.crt, peer_key: gw.key}\n')
        for good in ("10.0.0.5:8444", ":8444", "[::]:8444"):
            self.assertEqual(self.load(GATEWAY + fleet % (good,), check_files=False)
                             .gateway.fleet.peer_addr, good)
        for bad in ("tcp:8444", "tcp:8444:interface=10.0.0.5", "haproxy:10.0.0.5:8444"):
            self.assertIn("gateway.fleet.peer_addr: host:port or :port", self.error(
                GATEWAY + fleet % (bad,)))

    def test_fleet_node_id_checked_at_load(self):
        self.assert_error(
            GATEWAY + '  fleet: {redis: "redis://r:6379/0", node_id: "gw 1", '
            'peer_addr: "10.0.0.5:8444", peer_ca: ca.pem, peer_cert: gw.crt, peer_key: gw.key}\n',
            "gateway.fleet.node_id: no spaces")

    def test_fleet_ca_is_not_the_client_ca(self):
        """The fleet's CA must not be the CA of client certificates: a client could open a peer link."""
        self.assert_error(
            GATEWAY + '  client_ca: ca.pem\n  fleet: {redis: "redis://r:6379/0", '
            'peer_addr: "10.0.0.5:8444", peer_ca: ca.pem, peer_cert: gw.crt, peer_key: gw.key}\n',
            "gateway.fleet.peer_ca: is gateway.client_ca")

    def test_credential_ports(self):
        """A gateway.clients entry's open_ports_allowed narrows the gateway's; absent, it does not."""
        config = self.load(
            GATEWAY + '  open_ports_allowed: ["9000-9500"]\n  clients:\n'
            '    - {username: lab, password: pw1, open_ports_allowed: [9001, "9100-9199"]}\n'
            '    - {username: ops, password: pw2}\n'
            '    - {username: none, password: pw3, open_ports_allowed: []}\n')
        gateway = config.gateway
        allowed = gateway.credential_port_allowed
        self.assertEqual([allowed("lab", port) for port in (9001, 9150, 9002)], [True, True, False])
        self.assertEqual([allowed("ops", port) for port in (9001, 9400)], [True, True])
        self.assertFalse(allowed("none", 9001))
        message = self.error(GATEWAY + '  clients:\n    - {username: lab, password: pw1, '
                             'open_ports_allowed: ["x"]}\n')
        self.assertIn("gateway.clients[0].open_ports_allowed[0]", message)

    def test_fleet_ca_copy_is_the_client_ca(self):
        """A copy of the client CA, or a bundle holding it, is refused as peer_ca too; another CA is not."""
        import trustme
        text = (GATEWAY + '  client_ca: ca.pem\n  fleet: {redis: "redis://r:6379/0", '
                'peer_addr: "10.0.0.5:8444", peer_ca: peers.pem, peer_cert: gw.crt, '
                'peer_key: gw.key}\n')
        path = self.write(text)
        directory = os.path.dirname(path)
        client_ca, other = trustme.CA().cert_pem.bytes(), trustme.CA().cert_pem.bytes()
        for peers, refused in ((client_ca, True), (other + client_ca, True), (other, False)):
            for name, data in (("ca.pem", client_ca), ("peers.pem", peers)):
                with open(os.path.join(directory, name), "wb") as f:
                    f.write(data)
            if refused:
                message = str(self.assertRaises(ConfigError, load_config, path, check_files=False))
                self.assertIn("gateway.fleet.peer_ca: is gateway.client_ca", message)
            else:
                self.assertIsNotNone(load_config(path, check_files=False).gateway.fleet)

    def test_bad_yaml(self):
        """A YAML syntax error names the line."""
        self.assert_error("proxy:\n  socks5: {listen_addr: ':1'\n  x: [\n", "line ")

    def test_alias_bombs_and_deep_nesting(self):
        """
        Nested YAML aliases under a frontend's options load in time (shared,
        not copied out); an alias of its own anchor and nesting past the
        parser's limit are one-line errors, not a crash.
        """
        import time
        bomb = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
        for level in range(1, 9):
            bomb.append("a%d: &a%d [%s]" % (level, level, ", ".join(["*a%d" % (level - 1)] * 10)))
        text = ("proxy:\n  http:\n    listen_addr: '127.0.0.1:0'\n    auth_username: u\n"
                "    auth_password: p\n    options:\n      x:\n%s\n"
                % "\n".join("        " + line for line in bomb))
        started = time.monotonic()
        message = self.error(text)
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("proxy.http.options: more than 10000 values once YAML aliases are expanded",
                      message)
        self.assertIn("proxy.http.options: holds itself", self.error(
            "proxy:\n  http:\n    listen_addr: '127.0.0.1:0'\n    auth_username: u\n"
            "    auth_password: p\n    options: {realm: &r [*r]}\n"))
        self.assertIn("nested too deep", self.error(
            "proxy:\n  http:\n    listen_addr: '127.0.0.1:0'\n    options: {x: %s}\n"
            % ("[" * 5000 + "]" * 5000,)))

    def test_ids_the_gateway_takes(self):
        """A client_id or group_id every gateway would refuse in the HELLO is refused at load."""
        for key, value, problem in (("client_id", "x" * 129, "1..128 characters"),
                                    ("client_id", "site\x07", "printable"),
                                    ("group_id", "..", "must not be '..'")):
            message = self.error(CLIENT + "  %s: %s\n" % (key, json.dumps(value)))
            self.assertIn("client.%s: " % (key,), message)
            self.assertIn(problem, message)
        self.load(CLIENT + "  client_id: %s\n  group_id: lab\n" % ("x" * 128,),
                  check_files=False)

    def test_gateway_names_tls_can_check(self):
        """
        A gateway name no certificate can be checked against (an underscore,
        an empty label) is refused at load, naming gateway_server_name as the
        way out, instead of stopping the client with a traceback at its first
        dial; an IP address, a set gateway_server_name or insecure_skip_verify
        are fine.
        """
        for addr in ("gw_1.internal:8443", "a..example:8443"):
            message = self.error("client:\n  gateway_addr: %r\n" % (addr,))
            self.assertIn("client.gateway_addr: ", message)
            self.assertIn("set gateway_server_name", message)
            self.load("client:\n  gateway_addr: %r\n  gateway_server_name: gw.example.com\n"
                      % (addr,), check_files=False)
            self.load("client:\n  gateway_addr: %r\n  insecure_skip_verify: true\n" % (addr,),
                      check_files=False)
        self.assertIn("client.gateway_server_name: 'a b' is not a DNS name", self.error(
            CLIENT + "  gateway_server_name: 'a b'\n"))
        for addr in ("10.0.0.5:8443", "[::1]:8443", "gw.example.com:8443", "bücher.example:8443"):
            self.load("client:\n  gateway_addr: %r\n" % (addr,), check_files=False)

    def test_duplicate_key(self):
        """A key given twice is refused."""
        self.assertIn("duplicate key 'gateway'", self.error(GATEWAY + GATEWAY))
        self.assertIn("duplicate key 'username'", self.error(
            GATEWAY + "  users: [{username: a, password: p, username: b}]\n"))

    def test_merge_keys_override(self):
        """A key written beside a merge key (<<: *base) overrides the merged one; not a duplicate."""
        config = self.load(GATEWAY + """
  users:
    - &bob {username: bob, password: bob-pw, group: lab}
    - <<: *bob
      username: carol
""", check_files=False)
        self.assertEqual([(u.username, u.password, u.group) for u in config.gateway.users],
                         [("bob", "bob-pw", "lab"), ("carol", "bob-pw", "lab")])

    def test_not_a_mapping(self):
        """The top level must be a mapping."""
        self.assert_error("- a\n- b\n", "expected a mapping")

    def test_unreadable(self):
        """A missing config file is a ConfigError."""
        error = self.assertRaises(ConfigError, load_config, "/nonexistent/x.yaml")
        self.assertIn("/nonexistent/x.yaml: cannot read", str(error))

    def test_unknown_keys(self):
        """Typos are refused with a suggestion."""
        self.assert_error("proxi: {}", "proxi: unknown key (did you mean 'proxy'?)")
        self.assert_error("proxy: {socks5: {listen_adr: ':1'}}", "proxy.socks5.listen_adr: unknown key")
        self.assert_error(GATEWAY + "  balanse: random\n", "gateway.balanse: unknown key")
        self.assert_error(CLIENT + "  limit: [{adr: x}]\n", "client.limit[0].adr: unknown key")

    def test_key_paths(self):
        """Each bad value is reported at its key path."""
        for extra, prefix in [
            ("  balance: fastest\n", "gateway.balance: 'fastest' is not one of"),
            ("  ping_interval: ten\n", "gateway.ping_interval: expected a number"),
            ("  ping_interval: 0\n", "gateway.ping_interval: must be > 0"),
            ("  max_conns_per_user: -1\n", "gateway.max_conns_per_user: -1 is out of range"),
            ("  max_conns_per_user: true\n", "gateway.max_conns_per_user: expected an integer"),
            ("  open_ports_allowed: [9000, '9100-9000']\n", "gateway.open_ports_allowed[1]: empty"),
            ("  users: [{username: a}]\n", "gateway.users[0].password: required"),
            ("  users: [{username: a, password: b}, {username: a, password: c}]\n",
             "gateway.users[1].username: duplicate user"),
            ("  status_addr: '127.0.0.1:9090'\n", "gateway.status_username: required"),
        ]:
            self.assert_error(GATEWAY + extra, prefix)
        self.assert_error(GATEWAY.replace('"127.0.0.1:8443"', "'ssl:8443:privateKey=k'"),
                          "gateway.listen_addr: the gateway adds TLS")
        self.assert_error(GATEWAY.replace('  tls_cert: "server.crt"\n', ""), "gateway.tls_cert: required")
        self.assert_error("gateway: {listen_addr: ':1', tls_cert: a, tls_key: b}",
                          "gateway.auth_username: required (or clients, or client_ca)")

    def test_client_key_paths(self):
        """Client values are reported at their key paths."""
        for extra, prefix in [
            ("  gateway_addr: ['a:1', 'b:x']\n", "client.gateway_addr[1]: bad port"),
            ("  gateway_addr: 5\n", "client.gateway_addr: expected 'host:port' or a list"),
            ("  forbidden_hosts: ['10.', 'a', '10.0.0.0/40']\n", "client.forbidden_hosts[2]: bad CIDR"),
            ("  allowed_hosts: ['a', '*:*', '(evil|bad']\n",
             "client.allowed_hosts[2]: bad regex '(evil|bad': missing ), unterminated subpattern"),
            ("  allowed_hosts: ['(a+)+']\n", "client.allowed_hosts[0]: bad regex '(a+)+': a repeat"),
            ("  forbidden_hosts: ['.*a.*a.*a.*a']\n",
             "client.forbidden_hosts[0]: bad regex '.*a.*a.*a.*a': too many ways"),
            ("  allowed_hosts: [22]\n", "client.allowed_hosts[0]: host rule must be a string"),
            ("  allowed_hosts: 'a.example'\n", "client.allowed_hosts: expected a list"),
            ("  limit: [{addr: 'a:99999'}]\n", "client.limit[0].addr: bad port"),
            ("  limit: [{name: x}]\n", "client.limit[0].addr: required"),
            ("  limit: [{addr: a, protocol: icmp}]\n", "client.limit[0].protocol: 'icmp' is not one of"),
            ("  replicas: 0\n", "client.replicas: 0 is out of range"),
            ("  open_ports: [{local_port: 22}]\n", "client.open_ports[0].remote_port: required"),
            ("  tls_cert: c.pem\n", "client.tls_key: set both"),
            ("  auth_username: u\n", "client.auth_password: set both"),
            ("  allow_udp: 'no'\n", "client.allow_udp: expected true or false"),
        ]:
            text = (CLIENT.replace('  gateway_addr: "gw.example.com:8443"\n', "") + extra
                    if extra.startswith("  gateway_addr") else CLIENT + extra)
            self.assert_error(text, prefix)
        self.assert_error("client: {client_id: c}", "client.gateway_addr: required")
        self.assert_error("log: {level: loud}", "log.level: 'loud' is not one of")

    def test_password_never_shown(self):
        """A wrong-typed password is reported without its value."""
        message = self.error(GATEWAY.replace('"pw"', "[123456789]"))
        self.assertIn("gateway.auth_password: expected a string", message)
        self.assertNotIn("123456789", message)
        message = self.error(GATEWAY + "  users: [{username: a, password: [987654321], group: 1}]\n")
        self.assertNotIn("987654321", message)

    def test_plugin_options_get_plain_numbers(self):
        """A frontend's options reach its plugin as plain YAML data (int, not a subclass)."""
        config = self.load(GATEWAY + "proxy:\n  frontends:\n    - {type: http, listen_addr: "
                           "'127.0.0.1:8080', options: {upstream_keepalive: 4}}\n")
        [frontend] = config.proxy.frontends
        self.assertIs(type(frontend.options["upstream_keepalive"]), int)

    def test_unquoted_numbers_are_their_text(self):
        """
        As the Go AnyProxy reads them, an unquoted number in a text key is
        the text written: a password 0123 is "0123", not YAML 1.1's octal 83.
        """
        config = self.load(GATEWAY.replace('"pw"', "0123").replace('"user"', "1e3"))
        self.assertEqual((config.gateway.auth_password, config.gateway.auth_username),
                         ("0123", "1e3"))


class AnonymousTests(ConfigTestMixin, SynchronousTestCase):
    """A non-loopback listener needs credentials or an explicit opt-in."""

    def test_refused(self):
        """All interfaces without credentials is refused at listen_addr."""
        message = self.error("proxy: {socks5: {listen_addr: ':1080'}}")
        self.assertTrue(message.startswith("proxy.socks5.listen_addr: ':1080' is not loopback"))
        self.error("proxy: {http: {listen_addr: 'tcp:8080'}}")
        self.error("proxy: {http: {listen_addr: '[::]:8080'}}")

    def test_allowed(self):
        """Loopback, credentials, gateway users or allow_anonymous each suffice."""
        self.load("proxy: {socks5: {listen_addr: '127.0.0.1:1080'}, http: {listen_addr: '[::1]:1'}}")
        self.load("proxy: {socks5: {listen_addr: ':1080', auth_username: a, auth_password: b}}")
        self.load("proxy: {socks5: {listen_addr: ':1080', allow_anonymous: true}}")
        self.load(GATEWAY + "  users: [{username: a, password: b}]\n"
                  "proxy: {socks5: {listen_addr: ':1080'}}")

    def test_users_none_needs_opt_in(self):
        """A public listener taking none of gateway.users, without a login, is refused."""
        message = self.error(GATEWAY + "  users: [{username: a, password: b}]\n"
                             "proxy: {socks5: {listen_addr: ':1080', users: none}}")
        self.assertTrue(message.startswith("proxy.socks5.listen_addr: ':1080' is not loopback"),
                        message)
        self.load(GATEWAY + "  users: [{username: a, password: b}]\n"
                  "proxy: {socks5: {listen_addr: ':1080', users: [a]}}")
        self.load(GATEWAY + "  users: [{username: a, password: b}]\n"
                  "proxy: {socks5: {listen_addr: ':1080', users: none, allow_anonymous: true}}")

    def test_users_bad_values(self):
        """users must be all, none or known gateway.users names."""
        users = GATEWAY + "  users: [{username: a, password: b}]\n"
        for listener, expected in [
                ("users: some", "proxy.socks5.users: 'some' is not all, none"),
                ("users: 3", "proxy.socks5.users: expected all, none"),
                ("users: []", "proxy.socks5.users: must not be empty"),
                ("users: [a, a]", "proxy.socks5.users[1]: 'a' is listed twice"),
                ("users: [a, zed]", "proxy.socks5.users[1]: no gateway.users entry 'zed'"),
                ("users: [{}]", "proxy.socks5.users[0]: expected a gateway.users name")]:
            message = self.error(users + "proxy: {socks5: {listen_addr: '127.0.0.1:1', %s}}"
                                 % (listener,))
            self.assertTrue(message.startswith(expected), message)
        message = self.error(users + "proxy: {frontends: [{type: fixed-forward, listen_addr: "
                             "'127.0.0.1:1', users: all, options: {target_host: h, "
                             "target_port: 1}}]}")
        self.assertTrue(message.startswith("proxy.frontends[0].users: the fixed-forward "
                                           "frontend does not check credentials"), message)

    def test_half_credentials(self):
        """A username without a password is refused."""
        self.assertTrue(self.error("proxy: {socks5: {listen_addr: ':1', auth_username: a}}")
                        .startswith("proxy.socks5.auth_password: set both"))

    def test_user_clash(self):
        """A listener user that is also in gateway.users is refused."""
        message = self.error(GATEWAY + "  users: [{username: a, password: b}]\n"
                             "proxy: {socks5: {listen_addr: ':1', auth_username: a, auth_password: c}}")
        self.assertTrue(message.startswith("proxy.socks5.auth_username: user 'a'"))


class MetricsLoginTests(ConfigTestMixin, SynchronousTestCase):
    """A non-loopback metrics_addr needs metrics credentials or an explicit opt-in."""

    def test_refused(self):
        """All interfaces, or a public address, with no login fail at metrics_addr."""
        for section, addr in [(GATEWAY, "0.0.0.0:9100"), (GATEWAY, ":9100"),
                              (CLIENT, "tcp:9101"), (CLIENT, "[::]:9101")]:
            message = self.error(section + "  metrics_addr: '%s'\n" % (addr,))
            name = section.split(":")[0].strip()
            self.assertTrue(message.startswith(
                "%s.metrics_addr: %r is not loopback and has no credentials: set "
                "metrics_username/metrics_password, or metrics_allow_anonymous: true"
                % (name, addr)), message)

    def test_allowed(self):
        """Loopback, a login or metrics_allow_anonymous each suffice, on both sides."""
        for section in (GATEWAY, CLIENT):
            name = section.split(":")[0].strip()
            config = getattr(self.load(section + "  metrics_addr: '127.0.0.1:9100'\n"), name)
            self.assertEqual((config.metrics_username, config.metrics_allow_anonymous),
                             ("", False))
            config = getattr(self.load(
                section + "  metrics_addr: '0.0.0.0:9100'\n  metrics_username: prom\n"
                          "  metrics_password: scrape-pw\n"), name)
            self.assertEqual((config.metrics_username, config.metrics_password),
                             ("prom", "scrape-pw"))
            self.assertNotIn("scrape-pw", repr(config))
            config = getattr(self.load(section + "  metrics_addr: ':9100'\n"
                                                 "  metrics_allow_anonymous: true\n"), name)
            self.assertTrue(config.metrics_allow_anonymous)

    def test_half_credentials(self):
        """A metrics username without its password is refused."""
        message = self.error(GATEWAY + "  metrics_addr: '127.0.0.1:9100'\n"
                                       "  metrics_username: prom\n")
        self.assertTrue(message.startswith("gateway.metrics_password: set both"), message)


class WeightTests(ConfigTestMixin, SynchronousTestCase):
    """client.weight: a positive number, default 1; group_password is bounded."""

    def test_default(self):
        """Without weight the client's weight is 1."""
        self.assertEqual(self.load(CLIENT).client.weight, 1.0)

    def test_values(self):
        """Integers and fractions are accepted, as floats."""
        self.assertEqual(self.load(CLIENT + "  weight: 3\n").client.weight, 3.0)
        self.assertEqual(self.load(CLIENT + "  weight: 0.5\n").client.weight, 0.5)

    def test_bad(self):
        """Zero, negative, too large, non-numeric and boolean weights are refused at client.weight."""
        for value in ("0", "-1", "10001", ".inf", ".nan", "heavy", "true"):
            message = self.error(CLIENT + "  weight: %s\n" % (value,))
            self.assertTrue(message.startswith("client.weight: "), message)

    def test_group_password_too_long(self):
        """A group_password over 1024 characters is refused without being shown."""
        secret = "p" * 1025
        message = self.error(CLIENT + "  group_password: %s\n" % (secret,))
        self.assertTrue(message.startswith("client.group_password: "), message)
        self.assertNotIn(secret, message)

    def test_group_password_not_in_repr(self):
        """The group password is never in the config's repr."""
        config = self.load(CLIENT + "  group_password: lab-secret-pw\n")
        self.assertEqual(config.client.group_password, "lab-secret-pw")
        self.assertNotIn("lab-secret-pw", repr(config))


class OpenPortsInterfaceTests(ConfigTestMixin, SynchronousTestCase):
    """gateway.open_ports_interface: forwarded ports listen on loopback unless it opts in."""

    def test_default_loopback(self):
        """Absent or empty: 127.0.0.1, whatever the tunnel listener's address."""
        for extra in ["", '  open_ports_interface: ""\n']:
            gateway = self.load(GATEWAY.replace("127.0.0.1:8443", ":8443") + extra).gateway
            self.assertEqual(gateway.open_ports_interface, "127.0.0.1")

    def test_opt_in(self):
        """An IPv4 or IPv6 address, the wildcard ones included, is taken as given."""
        for value, expected in [("0.0.0.0", "0.0.0.0"), ("::", "::"), ("[::1]", "::1"),
                                ("127.0.0.2", "127.0.0.2")]:
            gateway = self.load(GATEWAY + '  open_ports_interface: "%s"\n' % (value,)).gateway
            self.assertEqual(gateway.open_ports_interface, expected)

    def test_bad(self):
        """A name or a port is refused at its key path."""
        for value in ["localhost", "0.0.0.0:9000", "eth0"]:
            message = self.error(GATEWAY + '  open_ports_interface: "%s"\n' % (value,))
            self.assertTrue(message.startswith("gateway.open_ports_interface: "), message)
            self.assertIn("not an IP address", message)


class DrainDelayTests(ConfigTestMixin, SynchronousTestCase):
    """gateway.drain_delay: seconds >= 0, default 0, and less than drain_timeout."""

    def test_default(self):
        """Absent: 0, the listeners close as the drain begins."""
        gateway = self.load(GATEWAY).gateway
        self.assertEqual((gateway.drain_delay, gateway.drain_timeout), (0.0, 30.0))

    def test_value(self):
        """A number of seconds below drain_timeout is taken; any, with no drain on SIGTERM."""
        self.assertEqual(self.load(GATEWAY + "  drain_delay: 5\n").gateway.drain_delay, 5.0)
        gateway = self.load(GATEWAY + "  drain_delay: 5\n  drain_timeout: 0\n").gateway
        self.assertEqual((gateway.drain_delay, gateway.drain_timeout), (5.0, 0.0))

    def test_bad(self):
        """A negative delay, or one reaching drain_timeout, is refused at gateway.drain_delay."""
        message = self.error(GATEWAY + "  drain_delay: -1\n")
        self.assertTrue(message.startswith("gateway.drain_delay: must be >= 0"), message)
        message = self.error(GATEWAY + "  drain_delay: 10\n  drain_timeout: 10\n")
        self.assertEqual(message, "gateway.drain_delay: must be less than drain_timeout (10), "
                                  "which bounds the whole drain, got 10")


# The YAML keys of each config class: a contract with users' files (add keys,
# never rename them).  A field's name is its key, so this catches a
# renamed field as well as a renamed key.
CONTRACT = {
    Config: {"proxy", "gateway", "client", "log"},
    ProxyConfig: {"socks5", "http", "frontends"},
    ListenerConfig: {"listen_addr", "auth_username", "auth_password", "allow_anonymous",
                     "max_conns", "users", "require_login", "options"},
    FrontendConfig: {"type", "listen_addr", "auth_username", "auth_password",
                     "allow_anonymous", "max_conns", "users", "require_login", "options"},
    GatewayConfig: {
        "listen_addr", "tls_cert", "tls_key", "auth_username", "auth_password", "client_ca",
        "users", "balance", "ping_interval", "no_tunnel_wait", "handshake_timeout",
        "open_ports_allowed", "open_ports_interface", "max_conns_per_user", "metrics_addr",
        "metrics_username", "metrics_password", "metrics_allow_anonymous", "status_addr",
        "status_username", "status_password", "queue_size", "queue_timeout", "clients",
        "auth_groups", "auth_max_tunnels", "fleet", "drain_timeout", "access_log",
        "auth_throttle", "pac_proxy_addr", "pac_proxy_type", "pac_extra_routes", "drain_delay"},
    ThrottleConfig: {"failures", "window", "block"},
    FleetConfig: {"redis", "node_id", "peer_addr", "peer_ca", "peer_cert", "peer_key",
                  "advertise_addr", "heartbeat", "keep_peers"},
    UserConfig: {"username", "password", "passwords", "group", "groups", "allow", "deny",
                 "protocols", "max_streams", "bandwidth"},
    ClientEntryConfig: {"username", "password", "passwords", "subject", "groups", "client_ids",
                        "max_tunnels", "open_ports_allowed"},
    ClientConfig: {
        "gateway_addr", "gateway_tls_cert", "gateway_server_name", "client_id", "group_id",
        "group_password", "replicas", "max_concurrent_conns", "auth_username", "auth_password",
        "forbidden_hosts", "limit", "allowed_hosts", "tls_cert", "tls_key", "insecure_skip_verify", "allow_udp",
        "connect_timeout", "idle_timeout", "ping_interval", "open_ports", "metrics_addr",
        "metrics_username", "metrics_password", "metrics_allow_anonymous",
        "reconnect_initial_delay", "reconnect_max_delay", "weight", "queue_size",
        "queue_timeout", "gateways_per_client", "egress_proxy", "status_addr",
        "status_username", "status_password", "routes", "auth_throttle"},
    OpenPortConfig: {"remote_port", "local_host", "local_port", "protocol"},
    LimitRule: {"name", "addr", "protocol"},
    LogConfig: {"level", "format", "file", "max_size", "max_backups", "output", "max_age",
                "compress"},
}

# Every kind of mapping the file has, each with only what it requires.
EVERY_SECTION = """
proxy:
  socks5: {listen_addr: "127.0.0.1:1080"}
  http: {listen_addr: "127.0.0.1:8080"}
  frontends:
    - {type: fixed-forward, listen_addr: "127.0.0.1:2222",
       options: {target_host: db, target_port: 5432}}
gateway:
  listen_addr: ":8443"
  tls_cert: c.pem
  tls_key: k.pem
  auth_username: u
  auth_password: p
  users: [{username: bob, password: b}]
  clients: [{username: site-a, password: a}]
  auth_throttle: {}
  fleet: {redis: "redis://r:6379/0", peer_addr: "10.0.0.5:8444", peer_ca: ca.pem,
          peer_cert: gw.pem, peer_key: gw.key}
client:
  gateway_addr: "gw:8443"
  open_ports: [{remote_port: 9001, local_port: 22}]
  limit: [{addr: "db:5432"}]
log: {}
"""


def model_default(field):
    """A field's default as the model states it."""
    if isinstance(field.default, attr.Factory):
        return field.default.factory()
    return field.default


class SchemaTests(ConfigTestMixin, SynchronousTestCase):
    """Each key and its default are stated once, in the model, and the reader follows it."""

    def load_nodes(self, text):
        """Load C{text}; return the config and every L{Node} the loader read."""
        readers = []

        class RecordingReader(Reader):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                readers.append(self)

        self.patch(load_module, "Reader", RecordingReader)
        config = self.load(text)
        return config, [node for reader in readers for node in reader.nodes]

    def test_contract(self):
        """Each config class's YAML keys are the documented ones."""
        for config_class, keys in CONTRACT.items():
            self.assertEqual(set(schema.yaml_keys(config_class)), keys, config_class.__name__)

    def test_reader_reads_every_key(self):
        """For every mapping, the known keys are the model's and the reader asks for each one."""
        config, nodes = self.load_nodes(EVERY_SECTION)
        self.assertEqual(set(node.model for node in nodes), set(CONTRACT))
        for node in nodes:
            self.assertEqual(node.consulted, set(schema.yaml_keys(node.model)),
                             node.path or "(top level)")

    def test_reader_cannot_read_an_undeclared_key(self):
        """A reader asking for a key its model does not state fails at once."""
        node = Node.of(Reader("x.yaml", ".", False), "log", {}, LogConfig)
        self.assertRaises(KeyError, node.integer, "max_sise")

    def test_every_field_declared(self):
        """A field declared neither as a setting nor as derived is refused."""
        @attr.s
        class Forgotten:
            listen_addr = schema.setting("")
            extra = attr.ib(default=0)

        error = self.assertRaises(TypeError, schema.yaml_keys, Forgotten)
        self.assertIn("Forgotten.extra", str(error))

    def assert_defaults(self, pairs, checked):
        """Each field of each loaded value whose keys were left out has the model's default."""
        for value, given in pairs:
            for field in attr.fields(type(value)):
                key = schema.key_name(field)
                if key is None or field.default is attr.NOTHING or set(key.split("/")) & set(given):
                    continue
                self.assertEqual(getattr(value, field.name), model_default(field),
                                 "%s.%s" % (type(value).__name__, key))
                checked.add((type(value), key))

    def test_defaults_stated_once(self):
        """Every key left out reads as the default the model states for it."""
        checked = set()
        config = self.load(EVERY_SECTION)
        data = yaml.safe_load(EVERY_SECTION)
        frontend = data["proxy"]["frontends"][0]
        self.assert_defaults([
            (config.proxy.socks5, data["proxy"]["socks5"]),
            (config.proxy.http, data["proxy"]["http"]),
            (config.proxy.frontends[0], frontend), (config.proxy.frontends[0].listener, frontend),
            (config.gateway, data["gateway"]), (config.gateway.users[0], data["gateway"]["users"][0]),
            (config.gateway.clients[0], data["gateway"]["clients"][0]),
            (config.gateway.fleet, data["gateway"]["fleet"]),
            (config.gateway.auth_throttle, data["gateway"]["auth_throttle"]),
            (config.client, data["client"]),
            (config.client.open_ports[0], data["client"]["open_ports"][0]),
            (config.client.policy.allowed[0], data["client"]["limit"][0]), (config.log, {}),
        ], checked)
        empty = self.load("")
        self.assert_defaults([(empty, {}), (empty.proxy, {})], checked)
        for text in [GATEWAY + CLIENT,
                     "gateway: {listen_addr: ':8443', tls_cert: c.pem, tls_key: k.pem, "
                     "client_ca: ca.pem, clients: [{subject: site-b}]}\n"]:
            other, data = self.load(text), yaml.safe_load(text)
            pairs = [(other.gateway, data["gateway"])] + [
                (entry, given) for entry, given in zip(other.gateway.clients,
                                                       data["gateway"].get("clients", []))]
            if other.client is not None:
                pairs.append((other.client, data["client"]))
            self.assert_defaults(pairs, checked)
        self.assertEqual(config.client.client_id, socket.gethostname())
        # Every key with a default was left out above, but a listen_addr: a
        # listener is built only when it has one, and the gateway requires it;
        # a fleet requires its peer address and certificates.
        unchecked = set()
        for config_class in CONTRACT:
            for field in attr.fields(config_class):
                key = schema.key_name(field)
                if key is not None and field.default is not attr.NOTHING:
                    unchecked.add((config_class, key))
        self.assertEqual(unchecked - checked, {
            (ListenerConfig, "listen_addr"), (GatewayConfig, "listen_addr"),
            (FleetConfig, "peer_addr"), (FleetConfig, "peer_ca"), (FleetConfig, "peer_cert"),
            (FleetConfig, "peer_key")})

    def test_empty_string_is_the_default(self):
        """An empty string reads as the key's default, as an absent key does."""
        config = self.load(CLIENT + '  group_id: ""\n  client_id: " "\n'
                                    '  gateway_server_name: ""\n'
                                    '  open_ports: [{remote_port: 1, local_port: 2, local_host: ""}]\n')
        self.assertEqual((config.client.group_id, config.client.client_id,
                          config.client.gateway_server_name, config.client.open_ports[0].local_host),
                         ("default", socket.gethostname(), None, "localhost"))
