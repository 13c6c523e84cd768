# -*- test-case-name: tests.test_config -*-
"""
The configuration: frozen attrs classes, one per section of the YAML file.

Only these objects are passed around, never dicts.
L{anyproxy.config.load.load_config} builds them from a file and checks
every value; the rules of what a section may hold live there.
"""

import types

import attr

from anyproxy.auth import DEFAULT_GROUP
from anyproxy.access_policy import AccessPolicy
from anyproxy.errors import ConfigError
from anyproxy.limits import DEFAULT_MAX_CONCURRENT_CONNS, DEFAULT_MAX_CONNS_PER_USER

BALANCE_POLICIES = ("least_streams", "round_robin", "random")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
# log.max_size (MB per file before it is rotated) and log.max_backups
# (rotated files kept): together they bound the disk a log can take.
LOG_MAX_SIZE = 100
LOG_MAX_BACKUPS = 10
# client.weight and client.group_password travel in the HELLO; the gateway
# refuses a HELLO outside these bounds, so the config refuses them first.
MIN_WEIGHT = 0.01
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
class ClientEntryConfig:
    """
    One entry of C{gateway.clients}: a tunnel credential (a password, or a
    client certificate's C{subject}) and what it may serve
    (L{anyproxy.gateway.client_access}).
    """

    username = attr.ib(default="")
    password = _secret()
    subject = attr.ib(default="")
    groups = attr.ib(default=(DEFAULT_GROUP,))
    client_ids = attr.ib(default=())
    max_tunnels = attr.ib(default=256)

    @property
    def name(self):
        return self.username or "subject:" + self.subject


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
    clients = attr.ib(default=())  # ClientEntryConfig: per-client credentials
    auth_groups = attr.ib(default=(DEFAULT_GROUP,))  # what the shared credential may serve
    auth_max_tunnels = attr.ib(default=1024)
    users = attr.ib(default=())
    balance = attr.ib(default="least_streams")
    ping_interval = attr.ib(default=10.0)
    no_tunnel_wait = attr.ib(default=3.0)
    handshake_timeout = attr.ib(default=10.0)
    open_ports_allowed = attr.ib(default=())
    # Where forwarded ports (client.open_ports) listen: loopback unless the
    # config opts in, like OpenSSH's GatewayPorts.
    open_ports_interface = attr.ib(default="127.0.0.1")
    max_conns_per_user = attr.ib(default=DEFAULT_MAX_CONNS_PER_USER)
    queue_size = attr.ib(default=100)  # streams waiting for a max_conns* slot, per user/listener
    queue_timeout = attr.ib(default=5.0)  # seconds one may wait; then OVERLOADED
    metrics_addr = attr.ib(default="")
    status_addr = attr.ib(default="")
    status_username = attr.ib(default="")
    status_password = _secret()
    metrics_username = attr.ib(default="")  # Basic auth for /metrics; empty = none
    metrics_password = _secret()
    metrics_allow_anonymous = attr.ib(default=False)  # a public metrics_addr without a login
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
    max_concurrent_conns = attr.ib(default=DEFAULT_MAX_CONCURRENT_CONNS)
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
    metrics_username = attr.ib(default="")  # as on the gateway
    metrics_password = _secret()
    metrics_allow_anonymous = attr.ib(default=False)
    reconnect_initial_delay = attr.ib(default=1.0)
    reconnect_max_delay = attr.ib(default=60.0)
    weight = attr.ib(default=1.0)

    def server_name_for(self, host):
        """The TLS server name to verify when dialing gateway C{host}."""
        return self.gateway_server_name or host


@attr.s(frozen=True, slots=True)
class LogConfig:
    """
    Logging: level, C{text}/C{json}, and a file (C{None} = stdout).  A log
    file is rotated when it reaches C{max_size} MB, and C{max_backups}
    rotated files are kept (C{0}: all of them, as the original's keys).
    """

    level = attr.ib(default="info")
    format = attr.ib(default="text")
    file = attr.ib(default=None)
    max_size = attr.ib(default=LOG_MAX_SIZE)
    max_backups = attr.ib(default=LOG_MAX_BACKUPS)


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
