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
from anyproxy.config.schema import default, derived, inline, setting
from anyproxy.errors import ConfigError
from anyproxy.limits import (
    DEFAULT_MAX_CONCURRENT_CONNS, DEFAULT_MAX_CONNS_PER_USER, DEFAULT_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT)

BALANCE_POLICIES = ("least_streams", "round_robin", "random")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
LOG_OUTPUTS = ("stdout", "stderr", "file")
GATEWAY = "gateway"
CLIENT = "client"


def _no_options():
    return types.MappingProxyType({})


# How the shared client credential's grant is named (in logs, counts and
# refusals): no gateway.clients entry may take these names.
SHARED_CREDENTIAL = "gateway.auth_username"
SHARED_CERTIFICATE_CREDENTIAL = "gateway.client_ca"  # a client_ca certificate matching no subject

@attr.s(frozen=True, slots=True)
class ListenerConfig:
    """
    A proxy listener (C{proxy.socks5}, C{proxy.http} or a C{proxy.frontends} entry).

    @ivar endpoint: a Twisted server endpoint string.
    @ivar local: C{True} when it listens only on loopback or a UNIX socket.
    @ivar users: which C{gateway.users} entries log in here: C{"all"},
        C{"none"}, a tuple of their names, or C{None} (the key absent) for
        L{user_scope}'s default.
    """

    endpoint = derived()  # from listen_addr
    auth_username = setting("")
    auth_password = setting("", secret=True)
    allow_anonymous = setting(False)
    listen_addr = setting("")  # empty: the listener is disabled
    local = derived(False)  # from listen_addr
    max_conns = setting(0)  # streams open through this listener; 0 = unlimited
    users = setting(None)  # "all" | "none" | (names,); None: see user_scope
    # A login is required even with no users of this listener's own: the
    # clients' group logins (group_id:group_password) let users in, as on
    # the Go AnyProxy's listeners (anyproxy.config.go_format sets it).
    require_login = setting(False)
    # The plugin's options.  Kept here for proxy.socks5/proxy.http; a
    # proxy.frontends entry's are in its FrontendConfig.options.
    options = setting(factory=_no_options, repr=False, hash=False)

    def user_scope(self):
        """
        C{"all"}, C{"none"} or a tuple of names: the C{gateway.users}
        entries this listener takes.  Without a C{users} key, a listener
        that is open by intent (no C{auth_username}, and loopback or
        C{allow_anonymous}) takes none and stays open; any other takes all,
        as before C{users} existed.
        """
        if self.users is not None:
            return self.users
        if not self.auth_username and (self.local or self.allow_anonymous):
            return "none"
        return "all"

    def takes_user(self, name):
        """Whether the C{gateway.users} entry C{name} logs in on this listener."""
        scope = self.user_scope()
        return scope == "all" or (scope != "none" and name in scope)


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


def _listener_user(listener, groups):
    """C{[entry]} for a listener's own C{auth_username}, or C{[]}."""
    if listener is not None and listener.auth_username:
        return [(listener.auth_username, listener.auth_password, DEFAULT_GROUP, tuple(groups))]
    return []


@attr.s(frozen=True, slots=True)
class UserConfig:
    """One entry of C{gateway.users}."""

    username = setting()
    # A hash (argon2id, bcrypt) or plain text; or, to roll a password,
    # several in passwords (any of them logs in).  One of the two is set.
    password = setting(secret=True)
    passwords = setting((), secret=True)
    group = setting(DEFAULT_GROUP)
    # Per-user policy (anyproxy.auth.UserPolicy, docs/USERS.md).  groups:
    # the groups it may reach, instead of group (the first is where a bare
    # login goes; group then holds it); allow/deny: destination rules as in
    # client.limit / client.forbidden_hosts, on the name at the gateway.
    groups = setting(())
    allow = setting(())  # LimitRule entries; empty: anything not denied
    deny = setting(())  # HostRule entries
    protocols = setting(("tcp", "udp"))
    max_streams = setting(0)  # streams open at once; 0: max_conns_per_user applies
    bandwidth = setting(0)  # bytes per second each way; 0 = unlimited
    policy = derived(None, eq=False, repr=False)  # the UserPolicy the loader builds from the keys above

    @property
    def reachable_groups(self):
        """The groups a C{user.group} login may name: C{groups}, or just C{group}."""
        return self.groups or (self.group,)

    @property
    def secrets(self):
        """Every valid password (hash or plain text) of this entry."""
        return self.passwords or (self.password,)


@attr.s(frozen=True, slots=True)
class ClientEntryConfig:
    """
    One entry of C{gateway.clients}: a tunnel credential (a password, or a
    client certificate's C{subject}) and what it may serve
    (L{anyproxy.gateway.client_access}).
    """

    username = setting("")
    password = setting("", secret=True)  # a hash or plain text
    passwords = setting((), secret=True)  # rotation: several valid at once (instead of password)
    subject = setting("")
    groups = setting((DEFAULT_GROUP,))
    client_ids = setting(())
    max_tunnels = setting(256)
    # ((low, high), ...): the ports this credential's clients may have opened
    # (client.open_ports), within gateway.open_ports_allowed; None: all of those.
    open_ports_allowed = setting(None)

    @property
    def name(self):
        return self.username or "subject:" + self.subject

    @property
    def secrets(self):
        """Every valid password of this entry; () for a subject entry."""
        return self.passwords or ((self.password,) if self.password else ())


@attr.s(frozen=True, slots=True)
class ThrottleConfig:
    """
    C{gateway.auth_throttle}: the brute-force defence of every login the
    gateway checks (L{anyproxy.login_throttle.LoginThrottle});
    C{client.auth_throttle}: that of the client's status and metrics logins.

    @ivar failures: failed logins from one source address within C{window}
        seconds that block it for C{block} seconds; 0 = off.
    """

    failures = setting(5)
    window = setting(60.0)
    block = setting(300.0)


@attr.s(frozen=True, slots=True)
class FleetConfig:
    """
    C{gateway.fleet}: this gateway as one node of a fleet sharing a Redis
    registry (L{anyproxy.fleet}).  Absent: one gateway on its own, with the
    in-memory tunnel pool.

    @ivar redis: a C{redis://} or C{rediss://} URL (password, database and
        TLS as usual in the URL).
    @ivar node_id: this node's name in the registry; empty in the file means
        the host name and the tunnel port.
    @ivar peer_endpoint: the Twisted server endpoint string of C{peer_addr},
        where other gateways relay streams to this one (mutual TLS with
        C{peer_ca}, C{peer_cert}, C{peer_key}).
    @ivar advertise_addr: the tunnel address clients are told to dial
        (C{host:port}); empty means the gateway's C{listen_addr} as seen
        from the peer address's host.
    @ivar heartbeat: seconds between registry refreshes; a node silent for
        three heartbeats leaves routing.
    @ivar keep_peers: seconds the last known peer map is still used while
        Redis cannot be reached (then only local tunnels serve).
    """

    redis = setting(secret=True)  # the URL may hold Redis's password
    node_id = setting("")
    peer_addr = setting("")  # required (the loader says so)
    peer_endpoint = derived(None)  # from peer_addr
    peer_ca = setting(None)  # required, as are peer_cert and peer_key
    peer_cert = setting(None)
    peer_key = setting(None)
    advertise_addr = setting("")
    heartbeat = setting(2.0)
    keep_peers = setting(60.0)


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
    # /proxy.pac and /clash.yaml (anyproxy.gateway.status.profiles): the proxy
    # they name (default: the HTTP listener, else SOCKS5) and routes sent
    # through it beside those the clients announce.
    pac_proxy_addr = setting("")
    pac_proxy_type = setting("")  # "http" | "socks5"; empty: see above
    pac_extra_routes = setting(())
    fleet = setting(None)  # FleetConfig, or None: one gateway on its own
    # Seconds the drain after SIGTERM may take, drain_delay included: open
    # streams finish once the gateway has left the fleet, stopped taking
    # users and told its clients to go (anyproxy.gateway.drain).
    drain_timeout = setting(30.0)
    # Seconds of that drain during which the listeners still accept while
    # GET /ready answers 503: above the balancer's time to notice (HAProxy's
    # inter + (fall - 1) x fastinter), so nothing lands on a closing socket.
    drain_delay = setting(0.0)
    access_log = setting("")  # one JSON line per user stream (anyproxy.gateway.access_log)
    auth_throttle = setting(factory=ThrottleConfig)  # failed logins: delays, then blocks

    def users_for(self, listener):
        """
        The C{(username, password, group, groups)} entries for a proxy
        listener's L{anyproxy.auth.UserDatabase}: its own user (group
        C{default}; as C{user.group}, the groups of C{auth_groups}) and the
        C{gateway.users} entries it takes (L{ListenerConfig.user_scope}; as
        C{user.group}, the entry's groups), these with their
        L{anyproxy.auth.UserPolicy} as a fifth item.
        """
        entries = _listener_user(listener, self.auth_groups)
        entries.extend((u.username, u.secrets, u.group, u.reachable_groups, u.policy)
                       for u in self.users
                       if listener is None or listener.takes_user(u.username))
        return entries

    def port_allowed(self, port):
        """Whether a client may ask this gateway to open C{port}."""
        return any(low <= port <= high for low, high in self.open_ports_allowed)

    def credential_port_allowed(self, credential, port):
        """
        Whether the client credential named C{credential} may have C{port}
        opened: its entry's C{open_ports_allowed}, when it has one.
        """
        for entry in self.clients:
            if entry.name == credential and entry.open_ports_allowed is not None:
                return any(low <= port <= high for low, high in entry.open_ports_allowed)
        return True


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
    The client section.  C{gateway_addrs} is a tuple of C{(host, port)}
    and C{gateway_srv} of SRV names (C{gateway_addr} entries C{srv:NAME});
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
    # forbidden_hosts refuse; limit and allowed_hosts are allow-lists, both applied when set.
    policy = setting(factory=AccessPolicy, keys=("forbidden_hosts", "limit", "allowed_hosts"))
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
    # With a fleet (the gateway's HELLO lists its nodes): keep tunnels to
    # this many distinct gateways, chosen by rendezvous hashing on client_id;
    # 0 = ignore the list and stay on the configured addresses.
    gateways_per_client = setting(2)
    # What this client can reach (HELLO "routes"; docs/ROUTES.md): canonical
    # route texts (CIDRs, names, "*.domain"); () = anything.
    routes = setting(())
    # "srv:NAME" entries of gateway_addr: gateways taken from DNS SRV records
    # (anyproxy.client.gateway_endpoints.SrvEndpoint).
    gateway_srv = derived(())
    # Dial the gateways through this HTTP CONNECT or SOCKS5 proxy (an
    # anyproxy.client.egress.ProxyURL); None: the HTTPS_PROXY / ALL_PROXY /
    # NO_PROXY environment applies.  Secret: the URL may hold a password.
    egress_proxy = setting(None, secret=True)
    # The client's own status page (anyproxy.client.status), with its login.
    status_addr = setting("")
    status_endpoint = derived(None)  # from status_addr
    status_username = setting("")
    status_password = setting("", secret=True)
    # Failed logins to the status page and metrics: delays, then blocks.
    auth_throttle = setting(factory=ThrottleConfig)

    def server_name_for(self, host):
        """The TLS server name to verify when dialing gateway C{host}."""
        return self.gateway_server_name or host


@attr.s(frozen=True, slots=True)
class LogConfig:
    """
    Logging: level, C{text}/C{json}, and where (C{output}: C{stdout},
    C{stderr} or C{file}, the file being C{file}).  A log file is rotated
    when it reaches C{max_size} MB; C{max_backups} rotated files are kept
    (C{0}: all of them), and none older than C{max_age} days (C{0}: any
    age); C{compress} gzips each rotated file (C{name.N.gz}).
    """

    level = setting("info")
    format = setting("text")
    file = setting(None)
    # MB per file before it is rotated, and rotated files kept: together
    # they bound the disk a log can take.
    max_size = setting(100)
    max_backups = setting(10)
    # None (absent): "file" when file is set, else "stdout" (see
    # effective_output).  As in the Go AnyProxy, file is used only when
    # the output is "file".
    output = setting(None)
    max_age = setting(0)  # days a rotated file is kept; 0 = no age limit
    compress = setting(False)  # gzip rotated files

    def effective_output(self):
        """C{output}, or when it is absent C{"file"} if C{file} is set, else C{"stdout"}."""
        return self.output or ("file" if self.file else "stdout")


@attr.s(frozen=True, slots=True)
class Config:
    """A whole config file.  C{gateway}/C{client} are C{None} when absent."""

    path = derived()  # the file's absolute path
    proxy = setting(factory=ProxyConfig)
    gateway = setting(None)
    client = setting(None)
    log = setting(factory=LogConfig)
    # ((key path, problem),): features of another form the file asks for
    # that are not started here (anyproxy.config.go_format), logged at start.
    warnings = derived(())

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
        C{[(username, password, group, groups)]} for a proxy listener's
        user database: the listener's own user plus the C{gateway.users}
        entries it takes (L{GatewayConfig.users_for}).
        """
        if self.gateway is not None:
            return self.gateway.users_for(listener)
        return _listener_user(listener, default(GatewayConfig, "auth_groups"))
