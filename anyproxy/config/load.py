# -*- test-case-name: tests.test_config -*-
"""
Reading the YAML file into the L{anyproxy.config.model} classes, and checking it.

L{load_config} reads one file with the sections C{proxy}, C{gateway},
C{client} and C{log}, any of which may be absent.  Each section has its reader here.  Every problem is an
L{anyproxy.errors.ConfigError} with one line, C{<file>: <key.path[0].sub>: <problem>}, and
never shows a password.  Unknown keys are refused, so a typo fails at start
instead of silently falling back to a default.

Which keys a mapping may hold, and each key's default, are the model
classes' (L{anyproxy.config.schema}): a reader here names a key and gets its
value or its default, and says only what the model cannot (ranges, required
keys, how keys combine).
"""

import ipaddress
import json
import os
import types

import attr

from anyproxy.addresses import ENDPOINT_TYPES, PROXY_HEADER_PREFIX, dial_address, port_range
from anyproxy.access_policy import PROTOCOLS, AccessPolicy, HostRule, LimitRule
from anyproxy.auth import UserPolicy
from anyproxy.client.egress import ProxyURL
from anyproxy.client.gateway_endpoints import SRV_PREFIX
from anyproxy.config.redis_url import parse_redis_url
from anyproxy.config.model import (
    BALANCE_POLICIES, CLIENT, GATEWAY, LOG_FORMATS, LOG_LEVELS, LOG_OUTPUTS,
    ClientConfig, ClientEntryConfig, Config, FleetConfig, FrontendConfig, GatewayConfig, ListenerConfig, LogConfig,
    OpenPortConfig, ProxyConfig, SHARED_CERTIFICATE_CREDENTIAL, SHARED_CREDENTIAL, ThrottleConfig,
    UserConfig)
from anyproxy.config import go_format
from anyproxy.config.schema import default
from anyproxy.config.yaml_reader import Node, Reader, plain, read_yaml, type_name
from anyproxy.tls import check_server_name
from anyproxy.tunnel.hello import id_problem
from anyproxy.frontends.lookup import (
    UnknownFrontend, available_frontends, check_frontend_options, find_frontend)
from anyproxy.interfaces import OptionError
from anyproxy.passwords import check_hash_format
from anyproxy.routes import Routes, route_texts
from anyproxy.tls import TLSFileError, load_certificates
from anyproxy.tunnel.hello import (
    MAX_GROUP_PASSWORD, MAX_ROUTES, MAX_ROUTES_BYTES, MAX_WEIGHT, MIN_WEIGHT)


def _checked_secret(node, key, secret):
    """C{secret} (read from C{key}), failing if it looks like a hash but is not a valid one."""
    try:
        check_hash_format(secret)
    except ValueError as e:
        node.fail(key, e)  # the reason only: never the value
    return secret


def _credentials(node, user_key, password_key):
    """C{node.credentials}, with the password checked if it is a hash."""
    username, password = node.credentials(user_key, password_key)
    return username, _checked_secret(node, password_key, password)


def _passwords(entry, required):
    """
    C{(password, passwords)} of a C{gateway.users} or C{gateway.clients}
    entry: one of them (C{passwords}: a list, for rotation), each a valid
    hash or plain text.
    """
    password = _checked_secret(entry, "password", entry.string("password"))
    passwords = []
    for path, item in entry.items("passwords"):
        if not isinstance(item, str) or not item:
            entry.reader.fail(path, "expected a password or a hash, got %s" % (type_name(item),))
        try:
            check_hash_format(item)
        except ValueError as e:
            entry.reader.fail(path, e)
        passwords.append(item)
    if password and passwords:
        entry.fail("passwords", "set password or passwords, not both")
    if "passwords" in entry.data and not passwords and not password:
        # An empty list beside a password is "no rotation" (DESIGN.md 4.3's
        # example writes both); alone it would leave no password at all.
        entry.fail("passwords", "must not be empty")
    if required and not (password or passwords):
        entry.fail("password", "required (or passwords)")
    return password, tuple(passwords)


def _auth_throttle(node):
    """C{auth_throttle} (gateway or client): failures (0 = off), window and block in seconds."""
    throttle = node.child("auth_throttle", ThrottleConfig)
    return ThrottleConfig(failures=throttle.integer("failures"),
                          window=throttle.number("window", positive=True),
                          block=throttle.number("block", positive=True))


def _listener(node):
    raw, endpoint, local = node.listen("listen_addr")
    username, password = _credentials(node, "auth_username", "auth_password")
    allow_anonymous = node.boolean("allow_anonymous")
    max_conns = node.integer("max_conns")
    users = _user_scope(node)
    require_login = node.boolean("require_login")
    if endpoint is None:
        return None
    return ListenerConfig(endpoint=endpoint, auth_username=username, auth_password=password,
                          allow_anonymous=allow_anonymous, listen_addr=raw, local=local,
                          max_conns=max_conns, users=users, require_login=require_login)


def _user_scope(node):
    """
    A listener's C{users}: C{"all"}, C{"none"}, a tuple of C{gateway.users}
    names (checked against them in L{_cross_check}), or the model's default
    (C{None}: L{ListenerConfig.user_scope} decides).
    """
    value = node.get("users", (str, list), "all, none or a list of gateway.users names")
    if isinstance(value, str):
        value = value.strip().lower()
        if value not in ("all", "none"):
            node.fail("users", "%r is not all, none or a list of gateway.users names" % (value,))
        return value
    if value is None or value is attr.NOTHING:
        return None
    names = []
    for path, item in node.items("users"):
        if not isinstance(item, str) or not item.strip():
            node.reader.fail(path, "expected a gateway.users name, got %s" % (type_name(item),))
        if item.strip() in names:
            node.reader.fail(path, "%r is listed twice" % (item.strip(),))
        names.append(item.strip())
    if not names:
        node.fail("users", "must not be empty (use 'none')")
    return tuple(names)


def _builtin_listener(node, kind):
    """C{proxy.socks5} / C{proxy.http}: a listener plus its plugin's C{options}."""
    entry = node.child(kind, ListenerConfig)
    listener = _listener(entry)
    if listener is None:
        return None
    return attr.evolve(listener, options=_options(entry, find_frontend(kind)))


def _options(entry, plugin):
    """An entry's C{options} mapping, checked by its frontend plugin."""
    options = entry.get("options", (dict,), "a mapping")
    try:
        options = types.MappingProxyType(plain(dict(options)))
        check_frontend_options(plugin, options)
    except OptionError as e:
        entry.reader.fail("%s.%s" % (entry.key("options"), e.key), e.problem)
    except ValueError as e:
        entry.fail("options", e)
    except RecursionError:
        entry.fail("options", "nested too deep")
    return options


def _proxy(node):
    return ProxyConfig(socks5=_builtin_listener(node, "socks5"),
                       http=_builtin_listener(node, "http"),
                       frontends=_frontends(node))


def _frontends(node):
    """C{proxy.frontends}: listeners served by frontend plugins, checked by them."""
    frontends = []
    for index, (path, item) in enumerate(node.items("frontends")):
        entry = Node.of(node.reader, path, item, FrontendConfig)
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


def _names(node, key, what):
    """A list of non-empty strings (group names, patterns); absent: the key's default."""
    names = []
    for path, item in node.items(key):
        if not isinstance(item, str) or not item.strip():
            node.reader.fail(path, "expected %s, got %s" % (what, type_name(item)))
        names.append(item.strip())
    if key in node.data and not names:
        node.fail(key, "must not be empty (leave the key out for the default)")
    return tuple(names) or node.default(key)


def _port_ranges(node):
    """C{open_ports_allowed} of C{node}: C{((low, high), ...)} from ports and "low-high" ranges."""
    ranges = []
    for path, item in node.items("open_ports_allowed"):
        try:
            ranges.append(port_range(item))
        except ValueError as e:
            node.reader.fail(path, e)
    return tuple(ranges)


def _client_entries(node, shared_username, client_ca):
    """C{gateway.clients}: per-client tunnel credentials and what each may serve."""
    entries, seen = [], set()
    for path, item in node.items("clients"):
        entry = Node.of(node.reader, path, item, ClientEntryConfig)
        username = entry.string("username")
        password, passwords = _passwords(entry, required=False)
        subject = entry.string("subject")
        if bool(username) == bool(subject):
            entry.fail("username", "set username/password, or subject (a client "
                                   "certificate's common name or DNS name), not both")
        if username and not (password or passwords):
            entry.fail("password", "required with username (or passwords)")
        if subject and (password or passwords):
            entry.fail("passwords" if passwords else "password",
                       "a subject entry is proven by its certificate; remove it")
        if username and username == shared_username:
            entry.fail("username", "%r is also gateway.auth_username" % (username,))
        if username in (SHARED_CREDENTIAL, SHARED_CERTIFICATE_CREDENTIAL) or \
                username.startswith("subject:"):
            # Grants are known by name: these name the shared credential and certificates.
            entry.fail("username", "%r is reserved; choose another name" % (username,))
        name = username or "subject:" + subject
        if name in seen:
            entry.fail("username" if username else "subject", "duplicate entry %r" % (name,))
        seen.add(name)
        groups = _names(entry, "groups", "a group name")
        client_ids = _names(entry, "client_ids", "a client id pattern such as 'site-a*'")
        ports = _port_ranges(entry)
        entries.append(ClientEntryConfig(
            username=username, password=password, passwords=passwords, subject=subject,
            groups=groups,
            client_ids=client_ids, max_tunnels=entry.integer("max_tunnels", low=1),
            # Absent: the gateway's list applies; [] forwards nothing.
            open_ports_allowed=ports if entry.data.get("open_ports_allowed") is not None
            else None))
    if any(e.subject for e in entries) and client_ca is None:
        node.fail("clients", "an entry with subject needs client_ca (mutual TLS)")
    return tuple(entries)


def _metrics(node):
    """
    C{metrics_addr} and its login, for the gateway or the client section: a
    non-loopback address needs credentials or C{metrics_allow_anonymous},
    as a proxy listener does.
    """
    addr, endpoint, local = node.listen("metrics_addr")
    username, password = _credentials(node, "metrics_username", "metrics_password")
    allow_anonymous = node.boolean("metrics_allow_anonymous")
    if endpoint is not None and not (local or username or allow_anonymous):
        node.fail("metrics_addr", "%r is not loopback and has no credentials: set "
                                  "metrics_username/metrics_password, or "
                                  "metrics_allow_anonymous: true" % (addr,))
    return dict(metrics_addr=addr, metrics_endpoint=endpoint, metrics_username=username,
                metrics_password=password, metrics_allow_anonymous=allow_anonymous)


def _users(node):
    users, seen = [], set()
    for path, item in node.items("users"):
        entry = Node.of(node.reader, path, item, UserConfig)
        username = entry.string("username")
        if not username:
            entry.fail("username", "required")
        if username in seen:
            entry.fail("username", "duplicate user %r" % (username,))
        password, passwords = _passwords(entry, required=True)
        seen.add(username)
        users.append(UserConfig(username=username, password=password, passwords=passwords,
                                **_user_policy(entry)))
    return tuple(users)


# The most a bandwidth cap may say: far above any link, and a float's
# arithmetic on token counts stays exact below it.
MAX_BANDWIDTH = 1 << 40


def _user_policy(entry):
    """
    A C{gateway.users} entry's policy keys, with the L{UserPolicy} built
    from them: C{group} or C{groups} (not both), C{allow} (C{limit}
    entries), C{deny} (host rules), C{protocols}, C{max_streams},
    C{bandwidth}.
    """
    group, groups = entry.string("group"), []
    for path, item in entry.items("groups"):
        if not isinstance(item, str) or not item.strip():
            entry.reader.fail(path, "expected a group name, got %r" % (item,))
        if item.strip() not in groups:
            groups.append(item.strip())
    if groups and entry.given("group"):
        entry.fail("groups", "set group or groups, not both")
    if groups:
        group = groups[0] if groups[0] != "*" else group
    protocols = []
    for path, item in entry.items("protocols"):
        if item not in PROTOCOLS:
            entry.reader.fail(path, "expected tcp or udp, got %r" % (item,))
        if item not in protocols:
            protocols.append(item)
    if entry.given("protocols") and not protocols:
        entry.fail("protocols", "must not be empty (remove the user instead)")
    allow, deny = _limit_rules(entry, "allow"), _host_rules(entry, "deny")
    values = dict(
        group=group, groups=tuple(groups), allow=allow, deny=deny,
        protocols=tuple(protocols) or default(UserConfig, "protocols"),
        max_streams=entry.integer("max_streams"),
        bandwidth=entry.integer("bandwidth", high=MAX_BANDWIDTH))
    access = AccessPolicy(forbidden=deny, allowed=allow) if allow or deny else None
    values["policy"] = UserPolicy(groups=values["groups"] or (group,), access=access,
                                  protocols=values["protocols"],
                                  max_streams=values["max_streams"],
                                  bandwidth=values["bandwidth"])
    return values


def _open_ports_interface(node):
    """
    C{gateway.open_ports_interface}: the IP address forwarded ports listen
    on; absent or empty = the default, loopback (like OpenSSH's GatewayPorts
    no), "0.0.0.0" or "::" = every interface.
    """
    value = node.string("open_ports_interface")
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        node.fail("open_ports_interface", "%r is not an IP address (e.g. '127.0.0.1', "
                  "or '0.0.0.0' / '::' for every interface)" % (value,))


def _fleet(node, client_ca=None):
    """
    C{gateway.fleet}: absent = no fleet (None).  C{client_ca} is the
    gateway's C{client_ca}, which must not be the fleet's CA.
    """
    if not node.given("fleet"):
        return None
    fleet = node.child("fleet", FleetConfig)
    redis = fleet.string("redis")
    if not redis:
        fleet.fail("redis", "required, e.g. 'redis://127.0.0.1:6379/0'")
    try:
        target = parse_redis_url(redis)  # its messages never quote the URL: it may hold the password
    except ValueError as e:
        fleet.fail("redis", e)
    if fleet.check_files and fleet.reader.check_files:
        # Read only when the registry connects, where a missing one stopped
        # the gateway with a traceback.
        for option, path in (("ssl_ca_certs", target.ca_certs), ("ssl_certfile", target.certfile),
                             ("ssl_keyfile", target.keyfile)):
            if path and not os.path.isfile(path):
                fleet.fail("redis", "%s file not found: %s" % (option, path))
    peer_addr, peer_endpoint, _ = fleet.listen("peer_addr")
    if peer_endpoint is None:
        fleet.fail("peer_addr", "required: where other gateways relay streams to this "
                                "one, e.g. '10.0.0.5:8444'")
    if peer_addr.split(":", 1)[0] in ENDPOINT_TYPES + (PROXY_HEADER_PREFIX[:-1],):
        # Not an endpoint string: other nodes dial what it names, and the
        # link adds mutual TLS itself.
        fleet.fail("peer_addr", "host:port or :port, not an endpoint string")
    advertise = fleet.string("advertise_addr")
    if advertise:
        try:
            dial_address(advertise)
        except ValueError as e:
            fleet.fail("advertise_addr", e)
    heartbeat = fleet.number("heartbeat", positive=True)
    keep_peers = fleet.number("keep_peers")
    peer_ca = fleet.file("peer_ca", required=True)
    if client_ca is not None and _same_certificates(peer_ca, client_ca):
        # A peer link reaches every group's tunnels without a user's login:
        # a client's certificate must never open one.
        fleet.fail("peer_ca", "is gateway.client_ca, the CA of client certificates; the fleet "
                              "needs a CA of its own, for gateways only")
    node_id = fleet.string("node_id")
    if any(char.isspace() or char == "/" for char in node_id):
        fleet.fail("node_id", "no spaces or '/' (it names the node in Redis keys and logs)")
    return FleetConfig(
        redis=redis, node_id=node_id, peer_addr=peer_addr,
        peer_endpoint=peer_endpoint,
        peer_ca=peer_ca,
        peer_cert=fleet.file("peer_cert", required=True),
        peer_key=fleet.file("peer_key", required=True),
        advertise_addr=advertise, heartbeat=heartbeat, keep_peers=keep_peers)


def _gateway(node):
    raw, endpoint, _ = node.listen("listen_addr")
    if endpoint is None:
        node.fail("listen_addr", "required, e.g. ':8443'")
    if endpoint.startswith("ssl:"):
        node.fail("listen_addr", "the gateway adds TLS itself from tls_cert/tls_key; "
                                 "use host:port or a tcp: endpoint")
    username, password = _credentials(node, "auth_username", "auth_password")
    client_ca = node.file("client_ca")
    clients = _client_entries(node, username, client_ca)
    if not username and client_ca is None and not clients:
        node.fail("auth_username", "required (or clients, or client_ca): otherwise anyone "
                                   "could register as a client and receive user traffic")
    ranges = _port_ranges(node)
    metrics = _metrics(node)
    status_addr, status_endpoint, _ = node.listen("status_addr")
    status_username, status_password = _credentials(node, "status_username", "status_password")
    if status_endpoint and not status_username:
        node.fail("status_username", "required when status_addr is set")
    return GatewayConfig(
        endpoint=endpoint, listen_addr=raw,
        tls_cert=node.file("tls_cert", required=True),
        tls_key=node.file("tls_key", required=True),
        auth_username=username, auth_password=password, client_ca=client_ca,
        clients=clients, auth_groups=_names(node, "auth_groups", "a group name"),
        auth_max_tunnels=node.integer("auth_max_tunnels", low=1),
        users=_users(node), balance=node.choice("balance", BALANCE_POLICIES),
        ping_interval=node.number("ping_interval", positive=True),
        no_tunnel_wait=node.number("no_tunnel_wait"),
        handshake_timeout=node.number("handshake_timeout", positive=True),
        open_ports_allowed=tuple(ranges), open_ports_interface=_open_ports_interface(node),
        max_conns_per_user=node.integer("max_conns_per_user"),
        queue_size=node.integer("queue_size"),
        queue_timeout=node.number("queue_timeout"),
        **metrics,
        status_addr=status_addr, status_endpoint=status_endpoint,
        status_username=status_username, status_password=status_password,
        fleet=_fleet(node, client_ca), **_drain(node),
        access_log=_access_log(node), auth_throttle=_auth_throttle(node), **_pac(node))


def _drain(node):
    """
    C{gateway.drain_timeout} and C{gateway.drain_delay}: the timeout bounds
    the whole drain, so a delay must end before it (anyproxy.gateway.drain).
    """
    timeout = node.number("drain_timeout")
    delay = node.number("drain_delay")
    if timeout > 0 and delay >= timeout:
        node.fail("drain_delay", "must be less than drain_timeout (%g), which bounds the "
                  "whole drain, got %g" % (timeout, delay))
    return {"drain_timeout": timeout, "drain_delay": delay}


def _access_log(node):
    """C{gateway.access_log}: an absolute path (its directory checked), or empty."""
    path = node.string("access_log")
    if not path:
        return ""
    path = os.path.normpath(os.path.join(node.reader.base_dir, os.path.expanduser(path)))
    if node.check_files and node.reader.check_files:
        _check_log_file(node, path, key="access_log")
    return path


def _gateway_addrs(node):
    """
    C{gateway_addr}: C{(addrs, srv_names)}, the C{host:port} entries and the
    names of the C{srv:_service._tcp.example.com} ones.
    """
    value = node.get("gateway_addr", (str, list), "'host:port' or a list of them")
    if isinstance(value, str):
        items = [(node.key("gateway_addr"), value)]
    else:
        items = node.items("gateway_addr")
    if not items or not any(isinstance(v, str) and v.strip() for _, v in items):
        node.fail("gateway_addr", "required, e.g. 'gateway.example.com:8443'")
    addrs, srv_names = [], []
    for path, item in items:
        if not isinstance(item, str):
            node.reader.fail(path, "expected a string 'host:port', got %s" % (type_name(item),))
        if item.strip().lower().startswith(SRV_PREFIX):
            name = item.strip()[len(SRV_PREFIX):].strip().rstrip(".")
            if not name or any(c.isspace() or c in "/@:" for c in name):
                node.reader.fail(path, "bad SRV name in %r (e.g. 'srv:_anyproxy._tcp.example.com')"
                                 % (item,))
            srv_names.append(name)
            continue
        try:
            addrs.append(dial_address(item.strip()))
        except ValueError as e:
            node.reader.fail(path, e)
    return tuple(addrs), tuple(srv_names)


def _egress_proxy(node):
    """C{client.egress_proxy}: a L{ProxyURL}, or C{None} (the environment's applies)."""
    text = node.string("egress_proxy")
    if not text:
        return None
    try:
        return ProxyURL.parse(text)
    except ValueError as e:  # its text never repeats the credentials
        node.fail("egress_proxy", e)


def _client_status(node):
    """C{client.status_addr} and its login, required as the gateway's is."""
    addr, endpoint, _ = node.listen("status_addr")
    username, password = _credentials(node, "status_username", "status_password")
    if endpoint is not None and not username:
        node.fail("status_username", "required when status_addr is set")
    return dict(status_addr=addr, status_endpoint=endpoint, status_username=username,
                status_password=password)


def _host_rules(node, key):
    """A list of host rules (C{forbidden_hosts}, C{allowed_hosts}); absent: none."""
    rules = []
    for path, item in node.items(key):
        try:
            rules.append(HostRule.parse(item))
        except ValueError as e:
            node.reader.fail(path, e)  # "client.allowed_hosts[2]: bad regex '(': ..."
    return tuple(rules)


def _policy(node, allow_udp):
    return AccessPolicy(forbidden=_host_rules(node, "forbidden_hosts"),
                        allowed=_limit_rules(node, "limit"), allow_udp=allow_udp,
                        allowed_hosts=_host_rules(node, "allowed_hosts"))


def _limit_rules(node, key):
    """A list of C{limit} entries (a mapping, or a host rule's text: both protocols)."""
    allowed = []
    for path, item in node.items(key):
        if isinstance(item, str):
            item = {"addr": item}
        entry = Node.of(node.reader, path, item, LimitRule)
        name, addr = entry.string("name"), entry.string("addr")
        if not addr:
            entry.fail("addr", "required, e.g. 'localhost:8080'")
        try:
            rule = HostRule.parse(addr)
        except ValueError as e:
            entry.fail("addr", e)
        protocol = entry.choice("protocol", ("tcp", "udp", "both"))
        allowed.append(LimitRule(name, rule, protocol))
    return tuple(allowed)


def _open_ports(node):
    ports = []
    for path, item in node.items("open_ports"):
        entry = Node.of(node.reader, path, item, OpenPortConfig)
        ports.append(OpenPortConfig(
            remote_port=entry.integer("remote_port", low=1, high=65535),
            local_host=entry.string("local_host"),
            local_port=entry.integer("local_port", low=1, high=65535),
            protocol=entry.choice("protocol", ("tcp", "udp"))))
    return tuple(ports)


def _weight(node):
    weight = node.get("weight", (int, float), "a number > 0")
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        node.fail("weight", "must be at least %g and at most %d, got %r"
                  % (MIN_WEIGHT, MAX_WEIGHT, weight))
    return float(weight)


def _group_password(node):
    password = node.string("group_password")
    if len(password) > MAX_GROUP_PASSWORD:
        node.fail("group_password", "longer than %d characters" % (MAX_GROUP_PASSWORD,))
    return password


def _route_list(node, key):
    """A list of routes (CIDRs, names, C{*.domain}) at C{key}, as canonical texts."""
    texts = []
    for path, item in node.items(key):
        if not isinstance(item, str):
            node.reader.fail(path, "expected a string such as '10.1.0.0/16' or "
                                   "'*.corp.example', got %s" % (type_name(item),))
        try:
            texts.extend(route_texts(Routes.of([item])))
        except ValueError as e:
            node.reader.fail(path, e)
    return route_texts(Routes.of(texts))


def _pac(node):
    """C{pac_proxy_addr}, C{pac_proxy_type}, C{pac_extra_routes} (the status listener's profiles)."""
    addr = node.string("pac_proxy_addr")
    if addr:
        try:
            dial_address(addr)
        except ValueError as e:
            node.fail("pac_proxy_addr", "%s (host:port as browsers reach the proxy)" % (e,))
    kind = node.choice("pac_proxy_type", ("", "http", "socks5")) if \
        node.string("pac_proxy_type") else ""
    return dict(pac_proxy_addr=addr, pac_proxy_type=kind,
                pac_extra_routes=_route_list(node, "pac_extra_routes"))


def _routes(node):
    """
    C{client.routes}: each entry a CIDR, a name or a C{*.domain} pattern
    (as L{Routes.of} reads them), within the HELLO's bounds; the canonical
    texts (L{route_texts}).
    """
    texts = _route_list(node, "routes")
    if len(texts) > MAX_ROUTES or len(json.dumps(list(texts))) > MAX_ROUTES_BYTES:
        node.fail("routes", "at most %d entries and %d bytes of JSON (the HELLO's bounds)"
                  % (MAX_ROUTES, MAX_ROUTES_BYTES))
    return texts


def _same_certificates(first, second):
    """
    Whether two CA files share a certificate (a copy of one, or a bundle
    holding it, is the same CA as far as whom it lets in goes).
    """
    if os.path.realpath(first) == os.path.realpath(second):
        return True

    def certificates(path):
        try:
            return set(load_certificates(path))
        except TLSFileError:
            return set()  # the file checks report it

    return bool(certificates(first) & certificates(second))


def _client(node):
    username, password = node.credentials("auth_username", "auth_password")
    tls_cert, tls_key = node.file("tls_cert"), node.file("tls_key")
    if (tls_cert is None) != (tls_key is None):
        node.fail("tls_key" if tls_cert else "tls_cert", "set both tls_cert and tls_key, or neither")
    allow_udp = node.boolean("allow_udp")
    metrics = _metrics(node)
    gateway_addrs, gateway_srv = _gateway_addrs(node)
    for key in ("client_id", "group_id"):
        value = node.string(key)
        # The gateway would refuse every HELLO carrying it, for ever.
        problem = id_problem(value) if value else None
        if problem is not None:
            node.fail(key, problem)
    server_name = node.string("gateway_server_name")
    if not node.boolean("insecure_skip_verify"):
        # Checked here, not when the first tunnel dials: Twisted's TLS would
        # stop the client then with a traceback.
        named = [("gateway_server_name", server_name)] if server_name else [
            ("gateway_addr", host) for host, _ in gateway_addrs]
        for key, name in named:
            try:
                check_server_name(name)
            except ValueError as e:
                hint = ("" if key == "gateway_server_name" else
                        "; set gateway_server_name to the name in the gateway's certificate")
                node.fail(key, "%s%s" % (e, hint))
    return ClientConfig(
        gateway_addrs=gateway_addrs, gateway_srv=gateway_srv,
        egress_proxy=_egress_proxy(node), **_client_status(node),
        auth_throttle=_auth_throttle(node),
        gateway_tls_cert=node.file("gateway_tls_cert"),
        gateway_server_name=server_name,
        client_id=node.string("client_id"),
        group_id=node.string("group_id"),
        group_password=_group_password(node),
        replicas=node.integer("replicas", low=1, high=64),
        max_concurrent_conns=node.integer("max_concurrent_conns"),
        queue_size=node.integer("queue_size"),
        queue_timeout=node.number("queue_timeout"),
        auth_username=username, auth_password=password,
        policy=_policy(node, allow_udp), tls_cert=tls_cert, tls_key=tls_key,
        insecure_skip_verify=node.boolean("insecure_skip_verify"),
        allow_udp=allow_udp,
        connect_timeout=node.number("connect_timeout", positive=True),
        idle_timeout=node.number("idle_timeout"),
        ping_interval=node.number("ping_interval", positive=True),
        open_ports=_open_ports(node),
        **metrics,
        reconnect_initial_delay=node.number("reconnect_initial_delay", positive=True),
        reconnect_max_delay=node.number("reconnect_max_delay", positive=True),
        weight=_weight(node),
        gateways_per_client=node.integer("gateways_per_client", low=0, high=64),
        routes=_routes(node))


def _log(node):
    file = node.string("file")
    file = os.path.normpath(os.path.join(node.reader.base_dir, file)) if file else None
    # Absent: the model's None, which means "file" when file is set, else
    # "stdout" (LogConfig.effective_output).  As in the Go AnyProxy, file
    # is used only when the output is "file".
    output = node.choice("output", LOG_OUTPUTS) if node.string("output") else None
    log = LogConfig(
        level=node.choice("level", LOG_LEVELS, {"warning": "warn"}),
        format=node.choice("format", LOG_FORMATS),
        file=file, output=output,
        # MB; at most 1 TB.  max_backups 0 keeps every file.
        max_size=node.integer("max_size", low=1, high=1024 * 1024),
        max_backups=node.integer("max_backups"),
        max_age=node.integer("max_age", high=100 * 366),  # days; 0 keeps every file
        compress=node.boolean("compress"))
    if log.effective_output() == "file":
        if file is None:
            node.fail("file", "required when output is file (the log file's path)")
        if node.check_files and node.reader.check_files:
            _check_log_file(node, file)
    return log


def _check_log_file(node, path, key="file"):
    """
    Whether the log file can be written, and rotated beside itself: checked
    at load, so that a missing directory is one line, not a traceback when
    twistd opens the file.
    """
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        node.fail(key, "directory not found: %s (relative paths are relative to %s)"
                  % (directory, node.reader.relative_to))
    if not os.access(directory, os.W_OK | os.X_OK):
        node.fail(key, "directory not writable: %s (the file and its rotated copies "
                          "are created there)" % (directory,))
    if os.path.isdir(path):
        node.fail(key, "%s is a directory" % (path,))
    if os.path.exists(path) and not os.access(path, os.W_OK):
        node.fail(key, "not writable: %s" % (path,))


def _cross_check(node, proxy, gateway):
    """
    Listener users must not clash with gateway.users, a listener's C{users}
    must name entries of gateway.users, and anonymous needs opt-in: a
    listener off loopback needs its own user, gateway.users it takes, or
    C{allow_anonymous}.
    """
    users = gateway.users if gateway is not None else ()
    names = [user.username for user in users]
    for frontend in proxy.all_frontends():
        listener, path = frontend.listener, frontend.path
        if listener.auth_username in names:
            node.reader.fail("%s.auth_username" % (path,), "user %r is also in "
                             "gateway.users" % (listener.auth_username,))
        if isinstance(listener.users, tuple):
            for index, name in enumerate(listener.users):
                if name not in names:
                    node.reader.fail("%s.users[%d]" % (path, index), "no gateway.users entry "
                                     "%r (known: %s)" % (name, ", ".join(names) or "none"))
        if listener.users not in (None, "none") and not frontend.authenticates:
            node.reader.fail("%s.users" % (path,), "the %s frontend does not check "
                             "credentials; remove users" % (frontend.type,))
        if listener.require_login and not frontend.authenticates:
            node.reader.fail("%s.require_login" % (path,), "the %s frontend does not check "
                             "credentials; remove require_login" % (frontend.type,))
        if not (frontend.authenticates or listener.local or listener.allow_anonymous):
            node.reader.fail("%s.listen_addr" % (path,),
                             "%r is not loopback and the %s frontend cannot check credentials:"
                             " use a loopback address, or allow_anonymous: true"
                             % (listener.listen_addr, frontend.type))
        taken = [name for name in names if listener.takes_user(name)]
        if not (listener.local or listener.auth_username or taken or listener.allow_anonymous
                or listener.require_login):
            node.reader.fail("%s.listen_addr" % (path,),
                             "%r is not loopback and has no credentials: set auth_username/"
                             "auth_password (or gateway.users, with users: all or their "
                             "names), or allow_anonymous: true" % (listener.listen_addr,))


def load_config(path, check_files=True, role=None, start_dir=None):
    """
    Load and check one YAML config file.

    @param path: the file.  Relative file paths inside it resolve against
        its directory; the returned paths are absolute.
    @param check_files: C{False} skips checking that cert/key files exist.
    @param role: C{"gateway"} or C{"client"} to check only the files that
        program uses (a shared single file need not hold the other side's
        key); C{None} checks all.  Every section is still validated.
    @param start_dir: the directory the program started in, which relative
        paths of a Go AnyProxy file resolve against (as Go does); C{None}:
        the current one.  A reload passes it, since twistd may have changed
        directory (C{--rundir}) since.
    @return: a L{Config}.
    @raise ConfigError: one line naming the file and key.
    """
    reader = Reader(path, os.path.dirname(os.path.abspath(path)), check_files,
                    start_dir=start_dir)
    # The Go AnyProxy's newest form is rewritten into ours first.
    data, warnings = go_format.translate(reader, read_yaml(reader, path), role)
    root = Node.of(reader, "", data, Config)
    proxy = _proxy(root.child("proxy", ProxyConfig))
    gateway = client = None
    if root.given("gateway"):
        gateway = _gateway(root.child("gateway", GatewayConfig, role in (None, GATEWAY)))
    if root.given("client"):
        client = _client(root.child("client", ClientConfig, role in (None, CLIENT)))
    _cross_check(root, proxy, gateway)
    log = _log(root.child("log", LogConfig))
    return Config(path=os.path.abspath(path), proxy=proxy, gateway=gateway, client=client, log=log,
                  warnings=warnings)
