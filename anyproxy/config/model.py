# -*- test-case-name: tests.test_config -*-
"""
The configuration: frozen attrs classes, one per section of the YAML file.

Only these objects are passed around, never dicts.  They are also the
schema: each field states its YAML key and the key's default once, with
L{anyproxy.config.schema.setting} (or is L{derived} from other keys), and
L{anyproxy.config.load.load_config} takes the known keys and the defaults
from here when it reads a file.  The rules of what a value may be (ranges,
required keys, how keys combine) live in the loader.
"""

import socket
import types

import attr

from anyproxy.auth import DEFAULT_GROUP
from anyproxy.access_policy import AccessPolicy
from anyproxy.config.schema import derived, inline, setting
from anyproxy.errors import ConfigError

BALANCE_POLICIES = ("least_streams", "round_robin", "random")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
# Defaults for gateway.queue_size / gateway.queue_timeout and the client's
# keys of the same names (anyproxy.limits): enough to ride out a burst, short
# enough that a user waiting in the queue still gets an answer before giving up.
DEFAULT_QUEUE_SIZE = 100
DEFAULT_QUEUE_TIMEOUT = 5.0
# Defaults for client.max_concurrent_conns and gateway.max_conns_per_user,
# sized for a small office.  A stream costs a client about 10 KiB, so 1024 of
# them are cheap; a browser opens up to 6 connections per host, so a few
# people browsing reach the hundreds.  The per-user limit is a quarter of a
# client's capacity: no single user can take all of it, and the others of the
# group keep getting slots (their streams never wait behind that user's).
# Keep DEFAULT_MAX_CONNS_PER_USER below DEFAULT_MAX_CONCURRENT_CONNS
# (tests.test_limits checks it).
DEFAULT_MAX_CONCURRENT_CONNS = 1024
DEFAULT_MAX_CONNS_PER_USER = 256
GATEWAY = "gateway"
CLIENT = "client"


def _no_options():
    return types.MappingProxyType({})


@attr.s(frozen=True, slots=True)
class ListenerConfig:
    """
    A proxy listener (C{proxy.socks5}, C{proxy.http} or a C{proxy.frontends} entry).

    @ivar endpoint: a Twisted server endpoint string.
    @ivar local: C{True} when it listens only on loopback or a UNIX socket.
    """

    endpoint = derived()  # from listen_addr
    auth_username = setting("")
    auth_password = setting("", secret=True)
    allow_anonymous = setting(False)
    listen_addr = setting("")  # empty: the listener is disabled
    local = derived(False)  # from listen_addr
    max_conns = setting(0)  # streams open through this listener; 0 = unlimited
    # The plugin's options.  Kept here for proxy.socks5/proxy.http; a
    # proxy.frontends entry's are in its FrontendConfig.options.
    options = setting(factory=_no_options, repr=False, hash=False)


@attr.s(frozen=True, slots=True)
class ProxyConfig:
    """The proxy listeners; C{None} means that listener is disabled."""

    socks5 = setting(None)
    http = setting(None)
    frontends = setting(())

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
    A C{proxy.frontends} entry holds C{type} and a listener's keys.

    @ivar type: the plugin's name.
    @ivar listener: the L{ListenerConfig} (address and credentials).
    @ivar name: the listener's name in the gateway and its logs.
    @ivar path: the key path in the file, for errors.
    @ivar options: the read-only C{options} mapping the plugin checked.
    @ivar authenticates: whether the plugin checks credentials itself.
    """

    type = setting()
    listener = inline(ListenerConfig)
    name = derived()
    path = derived()
    options = derived(factory=_no_options, repr=False, hash=False)  # the entry's options
    authenticates = derived(True)  # from the plugin


@attr.s(frozen=True, slots=True)
class UserConfig:
    """One entry of C{gateway.users}."""

    username = setting()
    password = setting(secret=True)
    group = setting(DEFAULT_GROUP)


@attr.s(frozen=True, slots=True)
class ClientEntryConfig:
    """
    One entry of C{gateway.clients}: a tunnel credential (a password, or a
    client certificate's C{subject}) and what it may serve
    (L{anyproxy.gateway.client_access}).
    """

    username = setting("")
    password = setting("", secret=True)
    subject = setting("")
    groups = setting((DEFAULT_GROUP,))
    client_ids = setting(())
    max_tunnels = setting(256)

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

    endpoint = derived()  # from listen_addr
    tls_cert = setting()
    tls_key = setting()
    auth_username = setting("")
    auth_password = setting("", secret=True)
    client_ca = setting(None)
    clients = setting(())  # ClientEntryConfig: per-client credentials
    auth_groups = setting((DEFAULT_GROUP,))  # what the shared credential may serve
    auth_max_tunnels = setting(1024)
    users = setting(())
    balance = setting("least_streams")
    ping_interval = setting(10.0)
    no_tunnel_wait = setting(3.0)
    handshake_timeout = setting(10.0)
    open_ports_allowed = setting(())
    # Where forwarded ports (client.open_ports) listen: loopback unless the
    # config opts in, like OpenSSH's GatewayPorts.
    open_ports_interface = setting("127.0.0.1")
    max_conns_per_user = setting(DEFAULT_MAX_CONNS_PER_USER)
    queue_size = setting(DEFAULT_QUEUE_SIZE)  # streams waiting for a max_conns* slot, per user/listener
    queue_timeout = setting(DEFAULT_QUEUE_TIMEOUT)  # seconds one may wait; then OVERLOADED
    metrics_addr = setting("")
    status_addr = setting("")
    status_username = setting("")
    status_password = setting("", secret=True)
    metrics_username = setting("")  # Basic auth for /metrics; empty = none
    metrics_password = setting("", secret=True)
    metrics_allow_anonymous = setting(False)  # a public metrics_addr without a login
    listen_addr = setting("")
    metrics_endpoint = derived(None)  # from metrics_addr
    status_endpoint = derived(None)  # from status_addr

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

    remote_port = setting()
    local_host = setting("localhost", kw_only=True)
    local_port = setting()
    protocol = setting("tcp")


@attr.s(frozen=True, slots=True)
class ClientConfig:
    """
    The client section.  C{gateway_addrs} is a tuple of C{(host, port)};
    file paths are absolute or C{None} (C{gateway_tls_cert} C{None}: trust
    the platform's CA store).
    """

    gateway_addrs = setting(key="gateway_addr")
    gateway_tls_cert = setting(None)
    gateway_server_name = setting(None)
    client_id = setting(factory=socket.gethostname)
    group_id = setting(DEFAULT_GROUP)
    group_password = setting("", secret=True)
    replicas = setting(1)
    max_concurrent_conns = setting(DEFAULT_MAX_CONCURRENT_CONNS)
    queue_size = setting(DEFAULT_QUEUE_SIZE)  # OPENs waiting for a max_concurrent_conns slot
    queue_timeout = setting(DEFAULT_QUEUE_TIMEOUT)  # seconds one may wait; then OVERLOADED
    auth_username = setting("")
    auth_password = setting("", secret=True)
    policy = setting(factory=AccessPolicy, keys=("forbidden_hosts", "limit"))
    tls_cert = setting(None)
    tls_key = setting(None)
    insecure_skip_verify = setting(False)
    allow_udp = setting(True)
    connect_timeout = setting(10.0)
    idle_timeout = setting(300.0)
    ping_interval = setting(10.0)
    open_ports = setting(())
    metrics_addr = setting("")
    metrics_endpoint = derived(None)  # from metrics_addr
    metrics_username = setting("")  # as on the gateway
    metrics_password = setting("", secret=True)
    metrics_allow_anonymous = setting(False)
    reconnect_initial_delay = setting(1.0)
    reconnect_max_delay = setting(60.0)
    weight = setting(1.0)

    def server_name_for(self, host):
        """The TLS server name to verify when dialing gateway C{host}."""
        return self.gateway_server_name or host


@attr.s(frozen=True, slots=True)
class LogConfig:
    """
    Logging: level, C{text}/C{json}, and a file (C{None} = stdout).  A log
    file is rotated when it reaches C{max_size} MB, and C{max_backups}
    rotated files are kept (C{0}: all of them).
    """

    level = setting("info")
    format = setting("text")
    file = setting(None)
    # MB per file before it is rotated, and rotated files kept: together
    # they bound the disk a log can take.
    max_size = setting(100)
    max_backups = setting(10)


@attr.s(frozen=True, slots=True)
class Config:
    """A whole config file.  C{gateway}/C{client} are C{None} when absent."""

    path = derived()  # the file's absolute path
    proxy = setting(factory=ProxyConfig)
    gateway = setting(None)
    client = setting(None)
    log = setting(factory=LogConfig)

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
