"""
The Go AnyProxy's config files (tests/go_configs/, laid out as its
repository ships its examples): the newest form read as ours
(L{anyproxy.config.go_format}), its unsupported keys, typos, and the older
single-file form, which is ours; one real twistd gateway and client started
from a newest-form pair serve a request through curl.
"""

import copy
import os
import re
import shutil
import sys

import yaml
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from anyproxy.auth import GroupLogins, UserDatabase
from anyproxy.config import go_format
from anyproxy.config.load import load_config
from anyproxy.config.model import ClientConfig, OpenPortConfig
from anyproxy.config.schema import yaml_keys
from anyproxy.errors import ConfigError
from tests.ports import free_port
from tests.support import blob, listen_tcp, run_curl, web_site
from tests.test_e2e_twistd import (
    ROOT, TWISTD, ProcessWatcher, load_generator, port_open, wait_until)

GO_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "go_configs")
RELATIVE = "relative paths are relative to the working directory, as the Go AnyProxy reads them"


def go_file(name):
    """A file of tests/go_configs/, parsed."""
    with open(os.path.join(GO_CONFIGS, name)) as f:
        return yaml.safe_load(f)


def websocket(data):
    """C{data} with every C{transport_type} set to websocket (what we speak)."""
    for section in (data.get("gateway"), (data.get("client") or {}).get("gateway")):
        if section and "transport_type" in section:
            section["transport_type"] = "websocket"
    return data


class GoDirectory:
    """
    A working directory laid out as the Go AnyProxy runs: C{certs/},
    C{logs/} and C{configs/}, relative paths resolving against it.
    """

    def __init__(self, testcase):
        self.path = os.path.abspath(testcase.mktemp())
        os.makedirs(os.path.join(self.path, "configs"))
        os.makedirs(os.path.join(self.path, "logs"))
        self.certs = os.path.join(self.path, "certs")
        load_generator().generate(self.certs, ["localhost", "127.0.0.1"])
        cwd = os.getcwd()
        os.chdir(self.path)
        testcase.addCleanup(os.chdir, cwd)

    def write(self, name, data=None, text=None):
        path = os.path.join(self.path, "configs", name)
        with open(path, "w") as f:
            f.write(text if text is not None else yaml.safe_dump(data))
        return path

    def copy(self, name):
        """A file of tests/go_configs/ as it is, in configs/."""
        target = os.path.join(self.path, "configs", os.path.basename(name))
        shutil.copy(os.path.join(GO_CONFIGS, name), target)
        return target


def has_allowed_hosts():
    return "allowed_hosts" in yaml_keys(ClientConfig)


class GoFilesAsShippedTests(unittest.TestCase):
    """The original's example files as its repository ships them."""

    def setUp(self):
        self.dir = GoDirectory(self)

    def assertFails(self, path, line, **kwargs):
        with self.assertRaises(ConfigError) as caught:
            load_config(path, **kwargs)
        self.assertEqual(str(caught.exception), "%s: %s" % (path, line))

    def test_newest_single_file_quic(self):
        """configs/config.yaml ships transport_type: quic: refused in one line, saying so."""
        self.assertFails(self.dir.copy("newest/config.yaml"),
                         "gateway.transport_type: 'quic' is not supported: AnyProxy's tunnel is "
                         "WebSocket over TLS only; set transport_type: websocket here and in "
                         "client.gateway.transport_type")

    def test_newest_complete_example_quic(self):
        """examples/complete-config.yaml (two documents, the second empty) reaches the same line."""
        self.assertFails(self.dir.copy("newest/complete-config.yaml"),
                         "gateway.transport_type: 'quic' is not supported: AnyProxy's tunnel is "
                         "WebSocket over TLS only; set transport_type: websocket here and in "
                         "client.gateway.transport_type")

    def test_newest_demo_pair_grpc(self):
        """demo/configs/ ships transport_type: grpc on both sides."""
        self.assertFails(self.dir.copy("newest/gateway.yaml"),
                         "gateway.transport_type: 'grpc' is not supported: AnyProxy's tunnel is "
                         "WebSocket over TLS only; set transport_type: websocket here and in "
                         "client.gateway.transport_type", role="gateway")
        self.assertFails(self.dir.copy("newest/client.yaml"),
                         "client.gateway.transport_type: 'grpc' is not supported: AnyProxy's "
                         "tunnel is WebSocket over TLS only; set transport_type: websocket here "
                         "and in gateway.transport_type", role="client")

    def test_old_single_file(self):
        """
        The pre-v2 file is our format: every key loads.  Its SOCKS5 listener
        on ':1080' without credentials was an open proxy; that stays refused,
        naming what to set.
        """
        if not has_allowed_hosts():
            raise unittest.SkipTest("client.allowed_hosts is not in the model yet")
        self.assertFails(self.dir.copy("old/config.yaml"),
                         "proxy.socks5.listen_addr: ':1080' is not loopback and has no "
                         "credentials: set auth_username/auth_password (or gateway.users, with "
                         "users: all or their names), or allow_anonymous: true",
                         check_files=False)
        data = go_file("old/config.yaml")
        data["proxy"]["socks5"].update(auth_username="socks-user", auth_password="socks-secret")
        config = load_config(self.dir.write("old.yaml", data), check_files=False)
        self.assertEqual(config.warnings, ())
        # Our format: relative to the file's directory (configs/), not the working one.
        self.assertEqual(config.gateway.tls_cert,
                         os.path.join(self.dir.path, "configs", "certs", "server.crt"))
        self.assertEqual(config.client.client_id, "client")
        self.assertEqual(config.client.gateway_addrs, (("127.0.0.1", 8443),))
        self.assertEqual([p.remote_port for p in config.client.open_ports], [8000, 8022])
        self.assertEqual((config.log.output, config.log.max_age, config.log.compress),
                         ("stdout", 30, True))

    def test_old_group_based(self):
        """The older examples' keys (group_id, max_concurrent_conns, limit) load."""
        path = os.path.join(self.dir.path, "configs", "group-based.yaml")
        os.makedirs(os.path.join(self.dir.path, "configs", "certs"))
        for name in ("server.crt", "server.key"):
            # Our format: relative to the file's directory.
            shutil.copy(os.path.join(self.dir.certs, name),
                        os.path.join(self.dir.path, "configs", "certs", name))
        shutil.copy(os.path.join(GO_CONFIGS, "old", "group-based.yaml"), path)
        config = load_config(path)
        self.assertEqual(config.client.group_id, "group-a")
        self.assertEqual(config.client.max_concurrent_conns, 100)
        self.assertEqual([rule.name for rule in config.client.policy.allowed], ["web"])
        self.assertEqual(config.warnings, ())


class NewestFormTests(unittest.TestCase):
    """The newest form with transport_type: websocket, key by key."""

    def setUp(self):
        self.dir = GoDirectory(self)

    def load(self, data, **kwargs):
        if not has_allowed_hosts():
            for section in (data.get("client") or {},):
                section.pop("allowed_hosts", None)
        return load_config(self.dir.write("config.yaml", data), **kwargs)

    def assert_fails_at(self, base, cases):
        """Each C{(key path, value, expected start)}: C{base} with that value fails so."""
        for keys, value, expected in cases:
            data = yaml.safe_load(yaml.safe_dump(base))
            section = data
            for key in keys[:-1]:
                section = section[key]
            section[keys[-1]] = value
            self.assertTrue(self.fails(data).startswith(expected), (keys, self.fails(data)))

    def fails(self, data, **kwargs):
        with self.assertRaises(ConfigError) as caught:
            self.load(data, **kwargs)
        prefix = os.path.join(self.dir.path, "configs", "config.yaml") + ": "
        message = str(caught.exception)
        self.assertTrue(message.startswith(prefix), message)
        return message[len(prefix):]

    def test_single_file(self):
        """Each newest-form key of configs/config.yaml maps to ours."""
        config = self.load(websocket(go_file("newest/config.yaml")))
        certs = self.dir.certs
        gateway, client, proxy = config.gateway, config.client, config.proxy
        # gateway.*: the same keys; the shared credential serves only "default".
        self.assertEqual((gateway.listen_addr, gateway.tls_cert, gateway.tls_key),
                         (":9091", os.path.join(certs, "server.crt"),
                          os.path.join(certs, "server.key")))
        self.assertEqual((gateway.auth_username, gateway.auth_password, gateway.auth_groups),
                         ("tunnel-user", "tunnel-secret", ("default",)))
        # gateway.proxy.socks5/http -> proxy.socks5/http, group logins required.
        self.assertEqual((proxy.socks5.listen_addr, proxy.http.listen_addr), (":1080", ":8080"))
        self.assertTrue(proxy.socks5.require_login and proxy.http.require_login)
        self.assertEqual((proxy.socks5.auth_username, proxy.http.auth_username), ("", ""))
        # gateway.web -> the status page.
        self.assertEqual((gateway.status_addr, gateway.status_username, gateway.status_password),
                         (":8090", "operator", "operator-secret"))
        # client.*
        self.assertEqual((client.client_id, client.group_id, client.group_password,
                          client.replicas), ("office-client", "office", "office-secret", 2))
        self.assertEqual(client.gateway_addrs, (("127.0.0.1", 9091),))
        self.assertEqual(client.gateway_tls_cert, os.path.join(certs, "server.crt"))
        self.assertEqual((client.auth_username, client.auth_password),
                         ("tunnel-user", "tunnel-secret"))
        self.assertEqual(len(client.policy.forbidden), 3)
        self.assertEqual(client.open_ports, (
            OpenPortConfig(8000, local_host="127.0.0.1", local_port=3000, protocol="tcp"),
            OpenPortConfig(8053, local_host="192.168.1.1", local_port=53, protocol="udp")))
        self.assertEqual((config.log.output, config.log.max_age, config.log.compress),
                         ("stdout", 14, True))
        # One line per feature not started here.
        self.assertEqual([path for path, _ in config.warnings], [
            "gateway.proxy.tuic", "gateway.auth_username", "gateway.web.static_dir",
            "gateway.web.session_key", "client.web"])
        lines = go_format.warnings_for(config, "client")
        self.assertEqual(lines, ["%s: client.web: the Go web console is not started: nothing "
                                 "listens on :8091 (set client.status_addr with "
                                 "status_username/status_password for AnyProxy's status "
                                 "page)" % (config.path,)])
        self.assertEqual(len(go_format.warnings_for(config, "gateway")), 4)

    def test_complete_example(self):
        """examples/complete-config.yaml: the second document is only comments; log to a file."""
        with open(os.path.join(GO_CONFIGS, "newest", "complete-config.yaml")) as f:
            text = f.read().replace('"quic"', '"websocket"')
        if not has_allowed_hosts():
            text = re.sub(r"  allowed_hosts:\n(    - .*\n)+", "", text)
        config = load_config(self.dir.write("complete.yaml", text=text))
        self.assertEqual(config.log.file, os.path.join(self.dir.path, "logs", "anyproxy.log"))
        self.assertEqual(config.log.effective_output(), "file")
        self.assertEqual(config.client.gateway_addrs, (("gateway.example.com", 9091),))
        self.assertIn(("client.web", "the Go web console is not started: nothing listens on "
                                     ":8091 (set client.status_addr with status_username/"
                                     "status_password for AnyProxy's status page)"),
                      config.warnings)

    def test_demo_pair(self):
        """demo/configs/gateway.yaml and client.yaml, each on its own."""
        gateway = self.load(websocket(go_file("newest/gateway.yaml")), role="gateway")
        self.assertIsNone(gateway.client)
        self.assertTrue(gateway.proxy.http.require_login)
        client = self.load(websocket(go_file("newest/client.yaml")), role="client")
        self.assertIsNone(client.gateway)
        self.assertEqual(client.client.open_ports, ())
        self.assertEqual((client.client.client_id, client.client.group_id),
                         ("demo-client", "demo"))

    def test_our_files_untouched(self):
        """A file in our form is not rewritten and has no warnings."""
        config = load_config(os.path.join(ROOT, "etc", "anyproxy.yaml"), check_files=False)
        self.assertEqual(config.warnings, ())
        self.assertFalse(go_format.is_go_form(go_file("old/config.yaml")))
        self.assertTrue(go_format.is_go_form(go_file("newest/client.yaml")))

    # Errors name the key as written.

    def test_moved_key_errors(self):
        """An error in a moved key names the key the user wrote."""
        base = websocket(go_file("newest/config.yaml"))
        cases = [
            (("client", "gateway", "addr"), "no-port",
             "client.gateway.addr: expected host:port, got 'no-port'"),
            (("client", "id"), ["a"], "client.id: expected a string, got a list"),
            (("gateway", "proxy", "http", "listen_addr"), "nowhere:80",
             "gateway.proxy.http.listen_addr: 'nowhere' is not an IP address or localhost"),
            (("gateway", "web", "listen_addr"), "bad",
             "gateway.web.listen_addr: expected host:port, :port or an endpoint string"),
            (("client", "gateway", "tls_cert"), "certs/missing.crt",
             "client.gateway.tls_cert: file not found: %s (%s)"
             % (os.path.join(self.dir.path, "certs", "missing.crt"), RELATIVE)),
        ]
        self.assert_fails_at(base, cases)

    def test_typos(self):
        """A key that neither form knows fails with 'did you mean', from both forms' keys."""
        base = websocket(go_file("newest/config.yaml"))
        cases = [
            (("client", "gateway"), "adr", "client.gateway.adr: unknown key (did you mean 'addr'?)"),
            (("gateway",), "transport_typ",
             "gateway.transport_typ: unknown key (did you mean 'transport_type'?)"),
            (("gateway", "web"), "enabeld", "gateway.web.enabeld: unknown key (did you mean "
                                            "'enabled'?)"),
            (("gateway", "proxy"), "sock5", "gateway.proxy.sock5: unknown key (did you mean "
                                            "'socks5'?)"),
            (("gateway", "credential"), "typ", "gateway.credential.typ: unknown key (did you "
                                               "mean 'type'?)"),
            (("client",), "group_pasword", "client.group_pasword: unknown key (did you mean "
                                           "'group_password'?)"),
            (("client",), "forbiden_hosts", "client.forbiden_hosts: unknown key (did you mean "
                                            "'forbidden_hosts'?)"),
            (("client", "web"), "listen_adr", "client.web.listen_adr: unknown key (did you mean "
                                              "'listen_addr'?)"),
        ]
        for keys, typo, expected in cases:
            data = yaml.safe_load(yaml.safe_dump(base))
            section = data
            for key in keys:
                section = section[key]
            section[typo] = "x"
            self.assertEqual(self.fails(data), expected)

    # Features we do not have.

    def test_unsupported_errors(self):
        """What would change who gets in, or what the tunnel speaks, is an error."""
        base = websocket(go_file("newest/config.yaml"))
        cases = [
            (("gateway", "transport_type"), "kcp",
             "gateway.transport_type: 'kcp' is not one of: websocket, grpc, quic (only "
             "websocket is supported)"),
            (("client", "gateway", "transport_type"), "quic",
             "client.gateway.transport_type: 'quic' is not supported"),
            (("gateway", "credential", "type"), "file",
             "gateway.credential.type: 'file' is not supported: group logins are held in memory"),
            (("gateway", "credential", "type"), "db",
             "gateway.credential.type: 'db' is not supported"),
            (("gateway", "web", "auth_enabled"), False,
             "gateway.web.auth_enabled: false is not supported: the status page always needs a "
             "login"),
            (("gateway", "web", "auth_password"), "",
             "gateway.web.auth_password: required when auth_enabled is true"),
            (("gateway", "proxy", "http", "tls_cert"), "certs/server.crt",
             "gateway.proxy.http.tls_key: set both tls_cert and tls_key, or neither"),
            (("client", "client_id"), "again",
             "client.id: set this or client.client_id, not both"),
            (("client", "gateway_addr"), "gw:1",
             "client.gateway.addr: set this or client.gateway_addr, not both"),
        ]
        self.assert_fails_at(base, cases)
        data = yaml.safe_load(yaml.safe_dump(base))
        data["proxy"] = {"socks5": {"listen_addr": "127.0.0.1:1"}}
        self.assertEqual(self.fails(data), "gateway.proxy: set the proxy listeners here or in "
                                           "the top-level proxy section, not both")

    def test_unsupported_warnings(self):
        """What only means a service is not started, or a setting has no use, is a warning."""
        data = websocket(go_file("newest/gateway.yaml"))
        data["gateway"]["credential"] = {"type": "memory", "file_path": "groups.json"}
        config = self.load(data, role="gateway")
        self.assertEqual(dict(config.warnings)["gateway.credential.file_path"],
                         "not used: credential.type is memory")
        self.assertEqual(dict(config.warnings)["gateway.proxy.tuic"],
                         "TUIC is not supported: nothing listens on :9443; users reach the same "
                         "clients through gateway.proxy.socks5 or gateway.proxy.http")
        # Disabled consoles and an empty TUIC address say nothing.
        data["gateway"]["web"]["enabled"] = False
        data["gateway"]["proxy"]["tuic"]["listen_addr"] = ""
        data["gateway"]["auth_groups"] = ["demo"]
        del data["gateway"]["credential"]
        self.assertEqual(self.load(data, role="gateway").warnings, ())

    def test_https_proxy(self):
        """gateway.proxy.http.tls_cert/tls_key make the HTTP proxy an ssl: listener."""
        data = websocket(go_file("newest/gateway.yaml"))
        data["gateway"]["proxy"]["http"].update(listen_addr="127.0.0.1:8080",
                                                tls_cert="certs/server.crt",
                                                tls_key="certs/server.key")
        config = self.load(data, role="gateway")
        self.assertEqual(config.proxy.http.endpoint, "ssl:8080:interface=127.0.0.1:privateKey=%s:"
                         "certKey=%s" % (os.path.join(self.dir.certs, "server.key"),
                                         os.path.join(self.dir.certs, "server.crt")))
        self.assertTrue(config.proxy.http.local and config.proxy.http.require_login)
        data["gateway"]["proxy"]["http"]["tls_key"] = "certs/nope.key"
        self.assertEqual(self.fails(data, role="gateway"),
                         "gateway.proxy.http.tls_key: file not found: %s (%s)"
                         % (os.path.join(self.dir.certs, "nope.key"), RELATIVE))

    def test_numbers_as_strings(self):
        """A number where Go reads a string (yaml.v2 takes its text): web.auth_password: 123456."""
        text = yaml.safe_dump(websocket(go_file("newest/gateway.yaml")))
        for old, new in (("auth_username: admin", "auth_username: 0123"),
                         ("auth_password: demo-admin-secret", "auth_password: 123456")):
            self.assertIn(old, text)
            text = text.replace(old, new)
        config = load_config(self.dir.write("numeric.yaml", text=text), role="gateway",
                             check_files=False)
        self.assertEqual((config.gateway.status_username, config.gateway.status_password),
                         ("0123", "123456"))

    def test_start_dir(self):
        """Relative paths resolve against the directory the program started in (a reload's start_dir)."""
        data = websocket(go_file("newest/gateway.yaml"))
        data["gateway"]["proxy"]["http"].update(listen_addr="127.0.0.1:8080",
                                                tls_cert="certs/server.crt",
                                                tls_key="certs/server.key")
        path = self.dir.write("start.yaml", data)
        os.chdir(os.path.join(self.dir.path, "logs"))  # as twistd --rundir would
        config = load_config(path, role="gateway", start_dir=self.dir.path)
        self.assertIn("certKey=%s" % (os.path.join(self.dir.certs, "server.crt"),),
                      config.proxy.http.endpoint)

    def test_second_document_refused(self):
        """A second YAML document with content would be ignored: refused."""
        path = self.dir.write("two.yaml", text="log: {level: info}\n---\nlog: {level: debug}\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn("more than one YAML document", str(caught.exception))


class RequireLoginTests(unittest.TestCase):
    """A listener's require_login: group logins are its only users."""

    def test_user_database(self):
        logins = GroupLogins()
        users = UserDatabase((), group_logins=logins, require_login=True)
        self.assertTrue(users.required)
        self.assertIsNone(users.authenticate("office", "secret"))
        logins.add("tunnel", "office", "secret")
        self.assertEqual(users.authenticate("office", "secret").group, "office")
        self.assertIsNone(users.authenticate("", ""))
        users.replace(())  # a reload keeps it
        self.assertTrue(users.required)
        users.replace((), require_login=False)
        self.assertFalse(users.required)

    def test_config(self):
        """In our form too: it counts as credentials off loopback."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "c.yaml")
        with open(path, "w") as f:
            f.write('proxy:\n  socks5: {listen_addr: ":1080", require_login: true}\n'
                    '  frontends:\n    - {type: fixed-forward, listen_addr: "127.0.0.1:2222", '
                    'require_login: true, options: {target_host: db, target_port: 5432}}\n')
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(str(caught.exception), "%s: proxy.frontends[0].require_login: the "
                         "fixed-forward frontend does not check credentials; remove "
                         "require_login" % (path,))
        with open(path, "w") as f:
            f.write('proxy:\n  socks5: {listen_addr: ":1080", require_login: true}\n')
        self.assertTrue(load_config(path).proxy.socks5.require_login)


class OpenPortsStartupTests(unittest.TestCase):
    """The start-up lines name gateway.open_ports_allowed, with the values to add."""

    def setUp(self):
        self.lines = []

        def observer(event):
            self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.dir = GoDirectory(self)

    def test_gateway_with_client_in_file(self):
        from anyproxy.gateway.port_forwarding.forwarder import log_policy
        data = websocket(go_file("newest/config.yaml"))
        data["client"].pop("allowed_hosts", None)
        log_policy(load_config(self.dir.write("config.yaml", data)))
        self.assertEqual(self.lines, [
            "port forwarding: client.open_ports asks for port(s) 8000, 8053, which "
            "gateway.open_ports_allowed does not list, so they will be refused; to forward "
            "them, set gateway.open_ports_allowed: [8000, 8053]"])
        del self.lines[:]
        data["gateway"]["open_ports_allowed"] = ["7000-7999", 8000]
        log_policy(load_config(self.dir.write("config.yaml", data)))
        self.assertIn('set gateway.open_ports_allowed: ["7000-7999", 8000, 8053]', self.lines[0])

    def test_gateway_alone(self):
        from anyproxy.gateway.port_forwarding.forwarder import log_policy
        config = load_config(self.dir.write("gateway.yaml",
                                            websocket(go_file("newest/gateway.yaml"))))
        log_policy(config)
        self.assertEqual(self.lines, [
            "port forwarding is off: clients' open_ports are refused until "
            "gateway.open_ports_allowed lists the ports, e.g. gateway.open_ports_allowed: "
            "[8000, \"9000-9100\"]"])

    def test_client(self):
        from anyproxy.client.app import _log_open_ports_wanted
        data = websocket(go_file("newest/config.yaml"))
        data["client"].pop("allowed_hosts", None)
        _log_open_ports_wanted(load_config(self.dir.write("config.yaml", data)).client)
        self.assertEqual(self.lines, [
            "open_ports: asking each gateway to forward 8000/tcp to 127.0.0.1:3000, 8053/udp to "
            "192.168.1.1:53; a gateway forwards only ports its gateway.open_ports_allowed "
            "lists, so there set at least gateway.open_ports_allowed: [8000, 8053]"])


class GoFormTwistdTests(unittest.TestCase):
    """
    The demo pair of the newest form (transport_type: websocket) started as
    real twistd processes from a Go-style working directory, serving users
    who log in with the client's group_id:group_password.
    """

    timeout = 120

    def setUp(self):
        self.dir = GoDirectory(self)
        self.ports = {name: free_port() for name in ("gateway", "socks", "http", "web")}
        self.target = listen_tcp(self, web_site()).getHost().port
        gateway = websocket(go_file("newest/gateway.yaml"))
        gateway["gateway"]["listen_addr"] = "127.0.0.1:%d" % self.ports["gateway"]
        gateway["gateway"]["proxy"]["socks5"]["listen_addr"] = "127.0.0.1:%d" % self.ports["socks"]
        gateway["gateway"]["proxy"]["http"]["listen_addr"] = "127.0.0.1:%d" % self.ports["http"]
        gateway["gateway"]["web"]["listen_addr"] = "127.0.0.1:%d" % self.ports["web"]
        self.gateway = gateway
        client = websocket(go_file("newest/client.yaml"))
        client["client"]["gateway"]["addr"] = "127.0.0.1:%d" % self.ports["gateway"]
        # The target is on loopback: not in this file's allow-list.
        client["client"].pop("allowed_hosts", None)
        # The one line a Go file whose clients serve another group than
        # "default" needs (docs/COMING_FROM_GO.md).
        self.dir.write("gateway.yaml", self.gateway_config(auth_groups=["demo"]))
        self.dir.write("client.yaml", client)

    def gateway_config(self, auth_groups):
        data = copy.deepcopy(self.gateway)
        if auth_groups is not None:
            data["gateway"]["auth_groups"] = auth_groups
        return data

    def spawn(self, plugin, config):
        """C{twistd -n} in the Go-style directory, as its users run it."""
        watcher = ProcessWatcher()
        transport = reactor.spawnProcess(
            watcher, sys.executable, (sys.executable,) + TWISTD + (
                "-n", "--pidfile=", plugin, "--config=configs/" + config),
            env={"PYTHONPATH": ROOT, "PATH": os.environ.get("PATH", "")}, path=self.dir.path)

        def stop():
            if not watcher.ended.called:
                transport.signalProcess("KILL")
            return watcher.ended

        self.addCleanup(stop)
        return watcher

    @defer.inlineCallbacks
    def test_group_needs_auth_groups(self):
        """
        Unchanged, the Go file's client (group demo, shared credential) is
        refused, and both sides' logs name the one line to add.
        """
        self.dir.write("gateway.yaml", self.gateway_config(auth_groups=None))
        gateway = self.spawn("anyproxy-gateway", "gateway.yaml")
        client = self.spawn("anyproxy-client", "client.yaml")
        yield wait_until(lambda: "add it to gateway.auth_groups" in client.text())
        self.assertIn("may not serve group 'demo'", client.text())
        yield wait_until(lambda: "add it to gateway.auth_groups" in gateway.text())

    @defer.inlineCallbacks
    def test_serves_group_logins(self):
        gateway = self.spawn("anyproxy-gateway", "gateway.yaml")
        client = self.spawn("anyproxy-client", "client.yaml")
        yield wait_until(lambda: port_open(self.ports["http"]))
        url = "http://127.0.0.1:%d/blob/100000" % (self.target,)

        @defer.inlineCallbacks
        def served():
            out, _, _ = yield run_curl("-x", "http://demo:demo-group-secret@127.0.0.1:%d"
                                       % self.ports["http"], "--max-time", "5", url)
            return out == blob(100000)

        # The group login is valid once the client's tunnel is up: polling
        # before would count failed logins, and the login throttle would
        # block loopback after the fifth.
        yield wait_until(lambda: "tunnel up" in gateway.text())
        yield wait_until(served)
        out, err, code = yield run_curl(
            "--socks5-hostname", "demo:demo-group-secret@127.0.0.1:%d" % self.ports["socks"],
            "http://localhost:%d/hello" % self.target)
        self.assertEqual((out, code), (b"hello from the target\n", 0), err)
        # The listeners list no users, yet a login is required.
        out, _, _ = yield run_curl("-x", "http://127.0.0.1:%d" % self.ports["http"],
                                   "-o", "/dev/null", "-w", "%{http_code}", url)
        self.assertEqual(out, b"407")
        out, _, _ = yield run_curl("-x", "http://demo:wrong@127.0.0.1:%d" % self.ports["http"],
                                   "-o", "/dev/null", "-w", "%{http_code}", url)
        self.assertEqual(out, b"407")
        # gateway.web is the status page, behind its login.
        out, _, _ = yield run_curl("-u", "admin:demo-admin-secret", "-o", "/dev/null", "-w",
                                   "%{http_code}", "http://127.0.0.1:%d/" % self.ports["web"])
        self.assertEqual(out, b"200")

        text = gateway.text()
        for path in ("gateway.proxy.tuic", "gateway.web.static_dir", "gateway.web.session_key"):
            self.assertIn("configs/gateway.yaml: %s: " % (path,), text)
        self.assertIn("gateway.open_ports_allowed", text)
        self.assertIn("configs/client.yaml: client.web: the Go web console is not started",
                      client.text())
        for watcher in (gateway, client):
            for secret in ("demo-group-secret", "demo-tunnel-secret", "demo-admin-secret"):
                self.assertNotIn(secret, watcher.text())
