# -*- test-case-name: tests.test_config -*-
"""
The configuration: frozen attrs classes, loaded and checked from one YAML file.

Only these objects are passed around, never dicts.  L{load_config} reads the
original single-file format (C{proxy}, C{gateway}, C{client}, C{log}; any may
be absent) plus the additive keys of DESIGN.md section 4.1.  Every problem is
a L{ConfigError} with one line, C{<file>: <key.path[0].sub>: <problem>}, and
never shows a password.  Unknown keys are refused, so a typo fails at start
instead of silently falling back to a default.
"""

import os
import socket
import types

import attr

from anyproxy.addresses import dial_address, port_range
from anyproxy.auth import DEFAULT_GROUP
from anyproxy.config_reader import Node, Reader, read_yaml, type_name
from anyproxy.client.acl import AccessPolicy, HostRule, LimitRule
from anyproxy.errors import ConfigError
from anyproxy.frontends.registry import (
    UnknownFrontend, available_frontends, check_frontend_options, find_frontend)
from anyproxy.interfaces import OptionError

BALANCE_POLICIES = ("least_streams", "round_robin", "random")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
# client.weight and client.group_password travel in the HELLO; the gateway
# refuses a HELLO outside these bounds, so the config refuses them first.
MAX_WEIGHT = 10000
MAX_GROUP_PASSWORD = 1024
GATEWAY = "gateway"
CLIENT = "client"


def _secret():
    """An attribute that is never shown by repr (passwords)."""
    return attr.ib(default="", repr=False)


@attr.s(frozen=True, slots=True)
class ListenerConfig:
    """
    A proxy listener (C{proxy.socks5}, C{proxy.http} or a C{proxy.frontends} entry).

    @ivar endpoint: a Twisted server endpoint string.
    @ivar local: C{True} when it listens only on loopback or a UNIX socket.
    """

    endpoint = attr.ib()
    auth_username = attr.ib(default="")
    auth_password = _secret()
    allow_anonymous = attr.ib(default=False)
    listen_addr = attr.ib(default="")
    local = attr.ib(default=False)
    max_conns = attr.ib(default=0)  # streams open through this listener; 0 = unlimited
    # proxy.socks5/proxy.http only: the built-in plugin's options (FrontendConfig.options).
    options = attr.ib(factory=lambda: types.MappingProxyType({}), repr=False, hash=False)


@attr.s(frozen=True, slots=True)
class ProxyConfig:
    """The proxy listeners; C{None} means that listener is disabled."""

    socks5 = attr.ib(default=None)
    http = attr.ib(default=None)
    frontends = attr.ib(default=())

    def listeners(self):
        """C{[(name, ListenerConfig)]} for the enabled listeners."""
        return [(n, l) for n, l in (("socks5", self.socks5), ("http", self.http)) if l]

    def all_frontends(self):
        """
        Every listener as a L{FrontendConfig}: C{proxy.socks5} and C{proxy.http}
        (served by the built-in plugins of those names), then C{proxy.frontends}.
        """
        builtin = [FrontendConfig(type=n, listener=l, name=n + " proxy", path="proxy." + n,
                                  options=l.options)
                   for n, l in self.listeners()]
        return builtin + list(self.frontends)


@attr.s(frozen=True, slots=True)
class FrontendConfig:
    """
    A listener served by a frontend plugin (L{anyproxy.interfaces.IFrontendFactory}).

    @ivar type: the plugin's name.
    @ivar listener: the L{ListenerConfig} (address and credentials).
    @ivar name: the listener's name in the gateway and its logs.
    @ivar path: the key path in the file, for errors.
    @ivar options: the read-only C{options} mapping the plugin checked.
    @ivar authenticates: whether the plugin checks credentials itself.
    """

    type = attr.ib()
    listener = attr.ib()
    name = attr.ib()
    path = attr.ib()
    options = attr.ib(factory=lambda: types.MappingProxyType({}), repr=False, hash=False)
    authenticates = attr.ib(default=True)


@attr.s(frozen=True, slots=True)
class UserConfig:
    """One entry of C{gateway.users}."""

    username = attr.ib()
    password = attr.ib(repr=False)
    group = attr.ib(default=DEFAULT_GROUP)


@attr.s(frozen=True, slots=True)
class GatewayConfig:
    """
    The gateway section.  File paths are absolute; C{*_endpoint} fields are
    Twisted endpoint strings (or C{None} when the C{*_addr} is empty);
    C{open_ports_allowed} is a tuple of inclusive C{(low, high)} ranges.
    """

    endpoint = attr.ib()
    tls_cert = attr.ib()
    tls_key = attr.ib()
    auth_username = attr.ib(default="")
    auth_password = _secret()
    client_ca = attr.ib(default=None)
    users = attr.ib(default=())
    balance = attr.ib(default="least_streams")
    ping_interval = attr.ib(default=10.0)
    no_tunnel_wait = attr.ib(default=3.0)
    handshake_timeout = attr.ib(default=10.0)
    open_ports_allowed = attr.ib(default=())
    max_conns_per_user = attr.ib(default=0)
    queue_size = attr.ib(default=100)  # streams waiting for a max_conns* slot, per user/listener
    queue_timeout = attr.ib(default=5.0)  # seconds one may wait; then OVERLOADED
    metrics_addr = attr.ib(default="")
    status_addr = attr.ib(default="")
    status_username = attr.ib(default="")
    status_password = _secret()
    listen_addr = attr.ib(default="")
    metrics_endpoint = attr.ib(default=None)
    status_endpoint = attr.ib(default=None)

    def users_for(self, listener):
        """
        The C{(username, password, group)} entries for a proxy listener's
        L{anyproxy.auth.UserDatabase}: its own user (group C{default}) and
        every C{gateway.users} entry.
        """
        entries = []
        if listener is not None and listener.auth_username:
            entries.append((listener.auth_username, listener.auth_password, DEFAULT_GROUP))
        entries.extend((u.username, u.password, u.group) for u in self.users)
        return entries

    def port_allowed(self, port):
        """Whether a client may ask this gateway to open C{port}."""
        return any(low <= port <= high for low, high in self.open_ports_allowed)


@attr.s(frozen=True, slots=True)
class OpenPortConfig:
    """One C{client.open_ports} entry: the gateway listens, we forward."""

    remote_port = attr.ib()
    local_host = attr.ib()
    local_port = attr.ib()
    protocol = attr.ib(default="tcp")


@attr.s(frozen=True, slots=True)
class ClientConfig:
    """
    The client section.  C{gateway_addrs} is a tuple of C{(host, port)};
    file paths are absolute or C{None} (C{gateway_tls_cert} C{None}: trust
    the platform's CA store).
    """

    gateway_addrs = attr.ib()
    gateway_tls_cert = attr.ib(default=None)
    gateway_server_name = attr.ib(default=None)
    client_id = attr.ib(default="")
    group_id = attr.ib(default=DEFAULT_GROUP)
    group_password = _secret()
    replicas = attr.ib(default=1)
    max_concurrent_conns = attr.ib(default=100)
    queue_size = attr.ib(default=100)  # OPENs waiting for a max_concurrent_conns slot
    queue_timeout = attr.ib(default=5.0)  # seconds one may wait; then OVERLOADED
    auth_username = attr.ib(default="")
    auth_password = _secret()
    policy = attr.ib(factory=AccessPolicy)
    tls_cert = attr.ib(default=None)
    tls_key = attr.ib(default=None)
    insecure_skip_verify = attr.ib(default=False)
    allow_udp = attr.ib(default=True)
    connect_timeout = attr.ib(default=10.0)
    idle_timeout = attr.ib(default=300.0)
    ping_interval = attr.ib(default=10.0)
    open_ports = attr.ib(default=())
    metrics_addr = attr.ib(default="")
    metrics_endpoint = attr.ib(default=None)
    reconnect_initial_delay = attr.ib(default=1.0)
    reconnect_max_delay = attr.ib(default=60.0)
    weight = attr.ib(default=1.0)

    def server_name_for(self, host):
        """The TLS server name to verify when dialing gateway C{host}."""
        return self.gateway_server_name or host


@attr.s(frozen=True, slots=True)
class LogConfig:
    """Logging: level, C{text}/C{json}, and a file (C{None} = stdout)."""

    level = attr.ib(default="info")
    format = attr.ib(default="text")
    file = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class Config:
    """A whole config file.  C{gateway}/C{client} are C{None} when absent."""

    path = attr.ib()
    proxy = attr.ib(factory=ProxyConfig)
    gateway = attr.ib(default=None)
    client = attr.ib(default=None)
    log = attr.ib(factory=LogConfig)

    def require_gateway(self):
        """The L{GatewayConfig}, or L{ConfigError} if the section is absent."""
        if self.gateway is None:
            raise ConfigError("%s: gateway: section missing (the gateway needs "
                              "listen_addr, tls_cert and tls_key)" % (self.path,))
        return self.gateway

    def require_client(self):
        """The L{ClientConfig}, or L{ConfigError} if the section is absent."""
        if self.client is None:
            raise ConfigError("%s: client: section missing (the client needs "
                              "gateway_addr)" % (self.path,))
        return self.client

    def gateway_users_for(self, listener):
        """
        C{[(username, password, group)]} for a proxy listener's user
        database: the listener's own user plus C{gateway.users}.
        """
        if self.gateway is not None:
            return self.gateway.users_for(listener)
        if listener is not None and listener.auth_username:
            return [(listener.auth_username, listener.auth_password, DEFAULT_GROUP)]
        return []


# ---------------------------------------------------------------------------
# Sections: each reads one part of the file into the classes above

_LISTENER_KEYS = ("listen_addr", "auth_username", "auth_password", "allow_anonymous",
                  "max_conns")


def _listener(node):
    raw, endpoint, local = node.listen("listen_addr")
    username, password = node.credentials("auth_username", "auth_password")
    allow_anonymous = node.boolean("allow_anonymous", False)
    max_conns = node.integer("max_conns", 0)
    if endpoint is None:
        return None
    return ListenerConfig(endpoint, username, password, allow_anonymous, raw, local,
                          max_conns=max_conns)


def _builtin_listener(node, kind):
    """C{proxy.socks5} / C{proxy.http}: a listener plus its plugin's C{options}."""
    entry = node.child(kind, _LISTENER_KEYS + ("options",))
    listener = _listener(entry)
    if listener is None:
        return None
    return attr.evolve(listener, options=_options(entry, find_frontend(kind)))


def _options(entry, plugin):
    """An entry's C{options} mapping, checked by its frontend plugin."""
    options = entry.get("options", (dict,), {}, "a mapping")
    options = types.MappingProxyType(dict(options))
    try:
        check_frontend_options(plugin, options)
    except OptionError as e:
        entry.reader.fail("%s.%s" % (entry.key("options"), e.key), e.problem)
    except ValueError as e:
        entry.fail("options", e)
    return options


def _proxy(node):
    return ProxyConfig(socks5=_builtin_listener(node, "socks5"),
                       http=_builtin_listener(node, "http"),
                       frontends=_frontends(node))


_FRONTEND_KEYS = ("type",) + _LISTENER_KEYS + ("options",)


def _frontends(node):
    """C{proxy.frontends}: listeners served by frontend plugins, checked by them."""
    frontends = []
    for index, (path, item) in enumerate(node.items("frontends")):
        entry = Node.of(node.reader, path, item, _FRONTEND_KEYS)
        kind = entry.string("type")
        if not kind:
            entry.fail("type", "required (available: %s)" % (", ".join(sorted(available_frontends())),))
        try:
            plugin = find_frontend(kind)
        except UnknownFrontend as e:
            entry.fail("type", e)
        listener = _listener(entry)
        if listener is None:
            entry.fail("listen_addr", "required, e.g. '127.0.0.1:2222'")
        authenticates = bool(getattr(plugin, "authenticates", False))
        if listener.auth_username and not authenticates:
            entry.fail("auth_username", "the %s frontend does not check credentials; remove "
                                        "auth_username/auth_password" % (kind,))
        options = _options(entry, plugin)
        frontends.append(FrontendConfig(
            type=kind, listener=listener, name="%s frontend #%d" % (kind, index + 1),
            path=path, options=options, authenticates=authenticates))
    return tuple(frontends)


_GATEWAY_KEYS = (
    "listen_addr", "tls_cert", "tls_key", "auth_username", "auth_password", "client_ca",
    "users", "balance", "ping_interval", "no_tunnel_wait", "handshake_timeout",
    "open_ports_allowed", "max_conns_per_user", "metrics_addr", "status_addr",
    "status_username", "status_password", "queue_size", "queue_timeout")


def _users(node):
    users, seen = [], set()
    for path, item in node.items("users"):
        entry = Node.of(node.reader, path, item, ("username", "password", "group"))
        username = entry.string("username")
        if not username:
            entry.fail("username", "required")
        if username in seen:
            entry.fail("username", "duplicate user %r" % (username,))
        if not entry.string("password"):
            entry.fail("password", "required")
        seen.add(username)
        users.append(UserConfig(username, entry.string("password"),
                                entry.string("group", DEFAULT_GROUP) or DEFAULT_GROUP))
    return tuple(users)


def _gateway(node):
    raw, endpoint, _ = node.listen("listen_addr")
    if endpoint is None:
        node.fail("listen_addr", "required, e.g. ':8443'")
    if endpoint.startswith("ssl:"):
        node.fail("listen_addr", "the gateway adds TLS itself from tls_cert/tls_key; "
                                 "use host:port or a tcp: endpoint")
    username, password = node.credentials("auth_username", "auth_password")
    client_ca = node.file("client_ca")
    if not username and client_ca is None:
        node.fail("auth_username", "required (or client_ca): otherwise anyone could "
                                   "register as a client and receive user traffic")
    ranges = []
    for path, item in node.items("open_ports_allowed"):
        try:
            ranges.append(port_range(item))
        except ValueError as e:
            node.reader.fail(path, e)
    metrics_addr, metrics_endpoint, _ = node.listen("metrics_addr")
    status_addr, status_endpoint, _ = node.listen("status_addr")
    status_username, status_password = node.credentials("status_username", "status_password")
    if status_endpoint and not status_username:
        node.fail("status_username", "required when status_addr is set")
    return GatewayConfig(
        endpoint=endpoint, listen_addr=raw,
        tls_cert=node.file("tls_cert", required=True),
        tls_key=node.file("tls_key", required=True),
        auth_username=username, auth_password=password, client_ca=client_ca,
        users=_users(node), balance=node.choice("balance", "least_streams", BALANCE_POLICIES),
        ping_interval=node.number("ping_interval", 10.0, positive=True),
        no_tunnel_wait=node.number("no_tunnel_wait", 3.0),
        handshake_timeout=node.number("handshake_timeout", 10.0, positive=True),
        open_ports_allowed=tuple(ranges),
        max_conns_per_user=node.integer("max_conns_per_user", 0),
        queue_size=node.integer("queue_size", 100),
        queue_timeout=node.number("queue_timeout", 5.0),
        metrics_addr=metrics_addr, metrics_endpoint=metrics_endpoint,
        status_addr=status_addr, status_endpoint=status_endpoint,
        status_username=status_username, status_password=status_password)


_CLIENT_KEYS = (
    "gateway_addr", "gateway_tls_cert", "gateway_server_name", "client_id", "group_id",
    "group_password", "replicas", "max_concurrent_conns", "auth_username", "auth_password",
    "forbidden_hosts", "limit", "tls_cert", "tls_key", "insecure_skip_verify", "allow_udp",
    "connect_timeout", "idle_timeout", "ping_interval", "open_ports", "metrics_addr",
    "reconnect_initial_delay", "reconnect_max_delay", "weight", "queue_size", "queue_timeout")
_OPEN_PORT_KEYS = ("remote_port", "local_host", "local_port", "protocol")


def _gateway_addrs(node):
    value = node.data.get("gateway_addr")
    if isinstance(value, str):
        items = [(node.key("gateway_addr"), value)]
    elif value is None or isinstance(value, list):
        items = node.items("gateway_addr")
    else:
        node.fail("gateway_addr", "expected 'host:port' or a list of them, got %s"
                  % (type_name(value),))
    if not items or not any(isinstance(v, str) and v.strip() for _, v in items):
        node.fail("gateway_addr", "required, e.g. 'gateway.example.com:8443'")
    addrs = []
    for path, item in items:
        if not isinstance(item, str):
            node.reader.fail(path, "expected a string 'host:port', got %s" % (type_name(item),))
        try:
            addrs.append(dial_address(item.strip()))
        except ValueError as e:
            node.reader.fail(path, e)
    return tuple(addrs)


def _policy(node, allow_udp):
    forbidden, allowed = [], []
    for path, item in node.items("forbidden_hosts"):
        try:
            forbidden.append(HostRule.parse(item))
        except ValueError as e:
            node.reader.fail(path, e)
    for path, item in node.items("limit"):
        if isinstance(item, str):
            item = {"addr": item}
        entry = Node.of(node.reader, path, item, ("name", "addr", "protocol"))
        name, addr = entry.string("name"), entry.string("addr")
        if not addr:
            entry.fail("addr", "required, e.g. 'localhost:8080'")
        try:
            rule = HostRule.parse(addr)
        except ValueError as e:
            entry.fail("addr", e)
        protocol = entry.choice("protocol", "both", ("tcp", "udp", "both"))
        allowed.append(LimitRule(name, rule, protocol))
    return AccessPolicy(forbidden=tuple(forbidden), allowed=tuple(allowed), allow_udp=allow_udp)


def _open_ports(node):
    ports = []
    for path, item in node.items("open_ports"):
        entry = Node.of(node.reader, path, item, _OPEN_PORT_KEYS)
        for key in ("remote_port", "local_port"):
            if entry.data.get(key) is None:
                entry.fail(key, "required")
        ports.append(OpenPortConfig(
            remote_port=entry.integer("remote_port", 0, 1, 65535),
            local_host=entry.string("local_host", "localhost") or "localhost",
            local_port=entry.integer("local_port", 0, 1, 65535),
            protocol=entry.choice("protocol", "tcp", ("tcp", "udp"))))
    return tuple(ports)


def _weight(node):
    weight = node.get("weight", (int, float), 1, "a number > 0")
    if not 0 < weight <= MAX_WEIGHT:
        node.fail("weight", "must be > 0 and at most %d, got %r" % (MAX_WEIGHT, weight))
    return float(weight)


def _group_password(node):
    password = node.string("group_password")
    if len(password) > MAX_GROUP_PASSWORD:
        node.fail("group_password", "longer than %d characters" % (MAX_GROUP_PASSWORD,))
    return password


def _client(node):
    username, password = node.credentials("auth_username", "auth_password")
    tls_cert, tls_key = node.file("tls_cert"), node.file("tls_key")
    if (tls_cert is None) != (tls_key is None):
        node.fail("tls_key" if tls_cert else "tls_cert", "set both tls_cert and tls_key, or neither")
    allow_udp = node.boolean("allow_udp", True)
    metrics_addr, metrics_endpoint, _ = node.listen("metrics_addr")
    return ClientConfig(
        gateway_addrs=_gateway_addrs(node),
        gateway_tls_cert=node.file("gateway_tls_cert"),
        gateway_server_name=node.string("gateway_server_name") or None,
        client_id=node.string("client_id") or socket.gethostname(),
        group_id=node.string("group_id", DEFAULT_GROUP) or DEFAULT_GROUP,
        group_password=_group_password(node),
        replicas=node.integer("replicas", 1, 1, 64),
        max_concurrent_conns=node.integer("max_concurrent_conns", 100),
        queue_size=node.integer("queue_size", 100),
        queue_timeout=node.number("queue_timeout", 5.0),
        auth_username=username, auth_password=password,
        policy=_policy(node, allow_udp), tls_cert=tls_cert, tls_key=tls_key,
        insecure_skip_verify=node.boolean("insecure_skip_verify", False),
        allow_udp=allow_udp,
        connect_timeout=node.number("connect_timeout", 10.0, positive=True),
        idle_timeout=node.number("idle_timeout", 300.0),
        ping_interval=node.number("ping_interval", 10.0, positive=True),
        open_ports=_open_ports(node),
        metrics_addr=metrics_addr, metrics_endpoint=metrics_endpoint,
        reconnect_initial_delay=node.number("reconnect_initial_delay", 1.0, positive=True),
        reconnect_max_delay=node.number("reconnect_max_delay", 60.0, positive=True),
        weight=_weight(node))


def _log(node):
    file = node.string("file")
    return LogConfig(
        level=node.choice("level", "info", LOG_LEVELS, {"warning": "warn"}),
        format=node.choice("format", "text", LOG_FORMATS),
        file=os.path.normpath(os.path.join(node.reader.base_dir, file)) if file else None)


def _cross_check(node, proxy, gateway):
    """Listener users must not clash with gateway.users; anonymous needs opt-in."""
    users = gateway.users if gateway is not None else ()
    names = set(user.username for user in users)
    for frontend in proxy.all_frontends():
        listener, path = frontend.listener, frontend.path
        if listener.auth_username in names:
            node.reader.fail("%s.auth_username" % (path,), "user %r is also in "
                             "gateway.users" % (listener.auth_username,))
        if not (frontend.authenticates or listener.local or listener.allow_anonymous):
            node.reader.fail("%s.listen_addr" % (path,),
                             "%r is not loopback and the %s frontend cannot check credentials:"
                             " use a loopback address, or allow_anonymous: true"
                             % (listener.listen_addr, frontend.type))
        if not (listener.local or listener.auth_username or users or listener.allow_anonymous):
            node.reader.fail("%s.listen_addr" % (path,),
                             "%r is not loopback and has no credentials: set auth_username/"
                             "auth_password (or gateway.users), or allow_anonymous: true"
                             % (listener.listen_addr,))


def load_config(path, check_files=True, role=None):
    """
    Load and check one YAML config file.

    @param path: the file.  Relative file paths inside it resolve against
        its directory; the returned paths are absolute.
    @param check_files: C{False} skips checking that cert/key files exist.
    @param role: C{"gateway"} or C{"client"} to check only the files that
        program uses (a shared single file need not hold the other side's
        key); C{None} checks all.  Every section is still validated.
    @return: a L{Config}.
    @raise ConfigError: one line naming the file and key.
    """
    reader = Reader(path, os.path.dirname(os.path.abspath(path)), check_files)
    root = Node.of(reader, "", read_yaml(reader, path), ("proxy", "gateway", "client", "log"))
    proxy = _proxy(root.child("proxy", ("socks5", "http", "frontends")))
    gateway = client = None
    if root.data.get("gateway") is not None:
        gateway = _gateway(root.child("gateway", _GATEWAY_KEYS, role in (None, GATEWAY)))
    if root.data.get("client") is not None:
        client = _client(root.child("client", _CLIENT_KEYS, role in (None, CLIENT)))
    _cross_check(root, proxy, gateway)
    log = _log(root.child("log", ("level", "format", "file")))
    return Config(path=os.path.abspath(path), proxy=proxy, gateway=gateway, client=client, log=log)
