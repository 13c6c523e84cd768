# -*- test-case-name: tests.test_examples -*-
"""
The example files in C{etc/} against the config schema
(L{anyproxy.config.schema}), so that the examples cannot drift from the
code: every file loads, the split files mention every key their sections
take, and every key they show in a comment is a real one.
"""

import glob
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from anyproxy.access_policy import LimitRule
from anyproxy.config import schema
from anyproxy.config.load import load_config
from anyproxy.config.model import (
    ClientConfig, ClientEntryConfig, Config, FleetConfig, FrontendConfig, GatewayConfig,
    ListenerConfig, LogConfig, OpenPortConfig, ProxyConfig, ThrottleConfig, UserConfig)

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")

# The config classes whose keys each split file must show (set or commented).
DOCUMENTED = {
    "gateway.yaml": (LogConfig, ProxyConfig, ListenerConfig, FrontendConfig, GatewayConfig,
                     FleetConfig, UserConfig, ClientEntryConfig, ThrottleConfig),
    "client.yaml": (LogConfig, ClientConfig, OpenPortConfig, LimitRule),
}

ALL_CLASSES = (Config, LogConfig, ProxyConfig, ListenerConfig, FrontendConfig, GatewayConfig,
               FleetConfig, UserConfig, ClientEntryConfig, ThrottleConfig, ClientConfig,
               OpenPortConfig, LimitRule)

# A commented-out setting: "# key: value" or "#   - key: value" (a list
# entry).  Prose in these files starts with a capital letter or does not put
# a lower-case word right before a colon, so it does not match.
COMMENTED_KEY = re.compile(r"^\s*#\s*(?:-\s+)?([a-z][a-z0-9_]*):(?:\s|$)")

# Keys of a frontend plugin's own options (docs/FRONTENDS.md), not of the
# config schema: the plugins check them.
PLUGIN_OPTION_KEYS = {"upstream_keepalive", "upstream_idle_timeout", "realm", "target_host",
                      "target_port"}


def example_files():
    """Every C{etc/*.yaml}, sorted."""
    return sorted(glob.glob(os.path.join(ETC, "*.yaml")))


def read(name):
    with open(os.path.join(ETC, name), encoding="utf-8") as f:
        return f.read()


def uncomment(text, starts):
    """
    C{text} with the commented settings that begin with each of C{starts}
    (C{"# fleet:"}, after the indent) made live, together with the commented
    lines indented deeper below each (a block's keys and list entries).

    @raise ValueError: a start matches no line, or more than one.
    """
    lines = text.split("\n")
    for start in starts:
        found = [i for i, line in enumerate(lines) if line.lstrip().startswith(start)]
        if len(found) != 1:
            raise ValueError("%r is on %d lines" % (start, len(found)))
        first = found[0]
        indent = lines[first][:len(lines[first]) - len(lines[first].lstrip())]
        end = first + 1
        while end < len(lines) and lines[end].startswith(indent + "#  "):
            end += 1
        for i in range(first, end):
            lines[i] = indent + lines[i][len(indent) + 2:]
    return "\n".join(lines)


class ExampleFilesLoadTests(SynchronousTestCase):
    """Every file in etc/ loads as it is."""

    def test_found(self):
        """The glob finds the three files the README names (a broken path would pass vacuously)."""
        names = [os.path.basename(path) for path in example_files()]
        for name in ("anyproxy.yaml", "gateway.yaml", "client.yaml"):
            self.assertIn(name, names)

    def test_every_file_loads(self):
        """Each etc/*.yaml loads, for each program, with a section for it."""
        for path in example_files():
            config = load_config(path, check_files=False)
            self.assertEqual(config.path, path)
            self.assertTrue(config.gateway is not None or config.client is not None, path)
            for role in ("gateway", "client"):
                load_config(path, check_files=False, role=role)


class ExampleKeysTests(SynchronousTestCase):
    """The split files show every key, and only real ones."""

    def test_every_key_shown(self):
        """
        Each key of each section a split file holds appears in it, set or in
        a comment, so a new key cannot be added without an example.
        """
        for name, classes in DOCUMENTED.items():
            text = read(name)
            missing = [(cls.__name__, key) for cls in classes for key in schema.yaml_keys(cls)
                       if not re.search(r"(?<![a-z0-9_])%s\s*:" % re.escape(key), text)]
            self.assertEqual(missing, [], "%s does not show these keys" % (name,))

    def test_commented_keys_exist(self):
        """Every key a comment shows as a setting is a key of the schema (or a plugin option)."""
        known = {key for cls in ALL_CLASSES for key in schema.yaml_keys(cls)} | PLUGIN_OPTION_KEYS
        for path in example_files():
            with open(path, encoding="utf-8") as f:
                unknown = [(number, match.group(1))
                           for number, line in enumerate(f, 1)
                           for match in [COMMENTED_KEY.match(line)]
                           if match and match.group(1) not in known]
            self.assertEqual(unknown, [], "%s: commented keys the schema lacks" % (path,))

    def test_commented_key_pattern(self):
        """The pattern finds commented settings and list entries, not prose."""
        self.assertEqual(COMMENTED_KEY.match("  # drain_timeout: 30   # seconds").group(1),
                         "drain_timeout")
        self.assertEqual(COMMENTED_KEY.match("  #   - username: \"site-a\"").group(1), "username")
        self.assertEqual(COMMENTED_KEY.match("  #   redis:").group(1), "redis")
        for prose in ["  # Each weighted by the clients' client.weight (default 1):",
                      "  # (Not a key: each listener keeps at most 1024 connections",
                      "  # e.g. \"127.0.0.1:9090\": status page at /"]:
            self.assertIsNone(COMMENTED_KEY.match(prose), prose)


class CommentedSettingsTests(SynchronousTestCase):
    """The settings the split files show commented out load once made live."""

    def load_uncommented(self, name, starts):
        directory = self.mktemp()
        os.makedirs(directory)
        # Certificates are not read (check_files=False): only the keys and values count.
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(uncomment(read(name), starts))
        return load_config(path, check_files=False)

    def test_gateway(self):
        """etc/gateway.yaml's commented listeners, credentials, profiles and fleet load."""
        config = self.load_uncommented("gateway.yaml", [
            "# frontends:", "# users: all", "# allow_anonymous: true", "# require_login:",
            "# max_conns:", "# options:", "# auth_groups:", "# auth_max_tunnels:",
            "# client_ca:", "# clients:", "# auth_throttle:", "# metrics_username:",
            "# metrics_password:", "# metrics_allow_anonymous: false", "# pac_proxy_addr:",
            "# pac_proxy_type:", "# pac_extra_routes:", "# fleet:"])
        gateway = config.require_gateway()
        self.assertEqual([f.type for f in config.proxy.frontends], ["fixed-forward", "http"])
        self.assertEqual([c.name for c in gateway.clients],
                         ["site-a", "subject:site-b.clients.example.com"])
        self.assertEqual((gateway.auth_throttle.failures, gateway.auth_throttle.window,
                          gateway.auth_throttle.block), (5, 60, 300))
        self.assertEqual((gateway.pac_proxy_addr, gateway.pac_proxy_type),
                         ("proxy.example.com:8080", "http"))
        self.assertEqual(len(gateway.pac_extra_routes), 2)
        self.assertEqual(gateway.drain_timeout, 30)
        fleet = gateway.fleet
        self.assertEqual((fleet.peer_addr, fleet.advertise_addr, fleet.heartbeat, fleet.keep_peers),
                         ("10.0.0.11:8444", "gw1.example.com:8443", 2, 60))
        self.assertTrue(fleet.redis.startswith("redis://"))
        self.assertEqual(os.path.basename(fleet.peer_ca), "fleet-ca.crt")

    def test_client(self):
        """etc/client.yaml's commented settings load."""
        config = self.load_uncommented("client.yaml", [
            "# gateway_server_name:", "# metrics_username:", "# metrics_password:",
            "# metrics_allow_anonymous: false", "# status_username:", "# status_password:"])
        client = config.require_client()
        self.assertEqual(client.gateway_server_name, "gateway.example.com")
        self.assertEqual(client.status_username, "operator")
        self.assertEqual(client.gateways_per_client, 2)

    def test_uncomment(self):
        """L{uncomment} makes a block live, its deeper lines too, and nothing after it."""
        text = "a:\n  # b:\n  #   c: 1\n  #   # note\n  # d: 2\n"
        self.assertEqual(uncomment(text, ["# b:"]),
                         "a:\n  b:\n    c: 1\n    # note\n  # d: 2\n")
        self.assertRaises(ValueError, uncomment, text, ["# e:"])
