# -*- test-case-name: tests.test_go_format -*-
"""
The Go AnyProxy's newest config form, read as ours.

The original project (github.com/buhuipao/anyproxy) first used the format
that is ours (C{proxy}, C{gateway}, C{client}, C{log} at the top).  Its
current form moved the proxy listeners under C{gateway.proxy}, nested the
client's tunnel settings under C{client.gateway}, renamed C{client_id} to
C{client.id}, and added C{transport_type}, C{gateway.credential} and the
web consoles (C{gateway.web}, C{client.web}).  L{translate} recognises that
form by those keys and rewrites it into ours before the strict reader
(L{anyproxy.config.load}) checks it, so every value is still checked by the
one set of rules, and:

  - an error in a moved key names the key as the user wrote it: the
    reader's L{Reader.aliases<anyproxy.config.yaml_reader.Reader>} map our
    paths back (C{client.gateway_addr} is reported as C{client.gateway.addr});
  - a key that neither form knows fails with "did you mean", the hint taken
    from both forms' keys;
  - a feature we do not have is one line: an error when running without it
    would change who gets in or what the tunnel speaks (C{transport_type:
    grpc/quic}, C{credential.type: file/db}, a web console without a
    login), a warning (L{Translation.warnings}, logged at start-up) when it
    only means a service is not started (TUIC, the client's web console) or
    a setting has no use here (C{static_dir}, C{session_key});
  - relative file paths are relative to the working directory, as the Go
    programs read them (in our form they are relative to the file's
    directory).

docs/COMING_FROM_GO.md has the key-by-key table.
"""

import difflib
import os

import attr

from anyproxy.addresses import listen_endpoint
from anyproxy.config import schema
from anyproxy.config.model import ClientConfig, GatewayConfig, ListenerConfig, ProxyConfig
from anyproxy.config.yaml_reader import join_path, type_name

GATEWAY = "gateway"
CLIENT = "client"

# The Go form's keys, mapping by mapping (its pkg/config structs).
GO_GATEWAY_KEYS = ("listen_addr", "transport_type", "tls_cert", "tls_key", "auth_username",
                   "auth_password", "credential", "proxy", "web")
GO_PROXY_KEYS = ("socks5", "http", "tuic")
GO_LISTENER_KEYS = {"socks5": ("listen_addr",), "http": ("listen_addr", "tls_cert", "tls_key"),
                    "tuic": ("listen_addr",)}
GO_CREDENTIAL_KEYS = ("type", "file_path", "db")
GO_CREDENTIAL_DB_KEYS = ("driver", "data_source", "table_name")
GO_WEB_KEYS = ("enabled", "listen_addr", "static_dir", "auth_enabled", "auth_username",
               "auth_password", "session_key")
GO_CLIENT_KEYS = ("id", "group_id", "group_password", "replicas", "gateway", "forbidden_hosts",
                  "allowed_hosts", "open_ports", "web")
GO_CLIENT_GATEWAY_KEYS = ("addr", "transport_type", "tls_cert", "auth_username", "auth_password")

# Keys only the Go form has: any of them means the file is in that form.
_GO_ONLY_GATEWAY = ("transport_type", "proxy", "credential", "web")
_GO_ONLY_CLIENT = ("id", "gateway", "web")

TRANSPORTS = ("websocket", "grpc", "quic")
CREDENTIAL_TYPES = ("memory", "file", "db")
RELATIVE_TO = "the working directory, as the Go AnyProxy reads them"


def is_go_form(data):
    """Whether the parsed file C{data} is in the Go AnyProxy's newest form."""
    if not isinstance(data, dict):
        return False
    gateway, client = data.get(GATEWAY), data.get(CLIENT)
    return ((isinstance(gateway, dict) and any(k in gateway for k in _GO_ONLY_GATEWAY))
            or (isinstance(client, dict) and any(k in client for k in _GO_ONLY_CLIENT)))


@attr.s
class Translation:
    """
    One file being rewritten from the Go form into ours.

    @ivar reader: the L{anyproxy.config.yaml_reader.Reader}; its C{aliases}
        learn our paths of moved keys, and errors go through it.
    @ivar role: C{"gateway"}, C{"client"} or C{None}, as for
        L{anyproxy.config.load.load_config}: which side's files to check.
    @ivar warnings: C{[(key path as written, problem)]} for features that
        are not started or settings that have no use here.
    """

    reader = attr.ib()
    role = attr.ib(default=None)
    warnings = attr.ib(factory=list)

    def fail(self, path, problem):
        self.reader.fail(path, problem)

    def warn(self, path, problem):
        self.warnings.append((path, problem))

    def alias(self, ours, theirs):
        self.reader.aliases[ours] = theirs

    def mapping(self, path, value):
        """A copy of C{value} as a mapping (null: empty)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, "expected a mapping, got %s" % (type_name(value),))
        return dict(value)

    def check_keys(self, path, value, *key_lists):
        """Refuse a key none of C{key_lists} holds, hinting at the nearest."""
        known = []
        for keys in key_lists:
            known.extend(key for key in keys if key not in known)
        for key in value:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                self.fail(join_path(path, key), "unknown key%s" % (
                    " (did you mean %r?)" % (hint[0],) if hint else
                    " (expected one of: %s)" % (", ".join(known),)))

    def string(self, path, value, key):
        """
        C{value[key]} as a stripped string; absent or null: C{""}.  A number
        is the text written, as yaml.v2 reads it into a Go string
        (C{auth_password: 123456}).
        """
        item = value.get(key)
        if item is None:
            return ""
        raw = getattr(item, "raw", None)  # a number as the loader keeps it (yaml_reader)
        if isinstance(raw, str):
            return raw.strip()
        if not isinstance(item, str):
            self.fail(join_path(path, key), "expected a string, got %s" % (type_name(item),))
        return item.strip()

    def boolean(self, path, value, key):
        """C{value[key]} as true/false; absent or null: false (Go's zero value)."""
        item = value.get(key)
        if item is None:
            return False
        if not isinstance(item, bool):
            self.fail(join_path(path, key), "expected true or false, got %s" % (type_name(item),))
        return item

    def move(self, section, section_path, value, path, key, ours):
        """
        Move C{value[key]} (C{value} is at C{path}) to C{section[ours]}
        (C{section} is at C{section_path}); errors in it name C{path.key}.
        """
        if key not in value:
            return
        if ours in section:
            self.fail(join_path(path, key), "set this or %s, not both"
                      % (join_path(section_path, ours),))
        section[ours] = value.pop(key)
        self.alias(join_path(section_path, ours), join_path(path, key))

    def transport(self, path, value, other):
        """C{transport_type}: only WebSocket; C{other} is the other side's key."""
        kind = self.string(path, value, "transport_type").lower()
        value.pop("transport_type", None)
        if kind in ("", "websocket"):
            return
        key = join_path(path, "transport_type")
        if kind in TRANSPORTS:
            self.fail(key, "%r is not supported: AnyProxy's tunnel is WebSocket over TLS only; "
                           "set transport_type: websocket here and in %s" % (kind, other))
        self.fail(key, "%r is not one of: %s (only websocket is supported)"
                  % (kind, ", ".join(TRANSPORTS)))

    def checks_files(self, role):
        return self.reader.check_files and self.role in (None, role)

    def path_of(self, value):
        """A file path as written, made absolute the way the reader does."""
        return os.path.normpath(os.path.join(self.reader.base_dir, os.path.expanduser(value)))

    # The sections.

    def translate(self, data):
        """C{data} (the parsed file) rewritten into our form."""
        data = dict(data)
        if data.get(GATEWAY) is not None:
            self.gateway(data)
        if data.get(CLIENT) is not None:
            self.client(data)
        return data

    def gateway(self, data):
        path = GATEWAY
        gateway = self.mapping(path, data[GATEWAY])
        self.check_keys(path, gateway, GO_GATEWAY_KEYS, schema.yaml_keys(GatewayConfig))
        self.transport(path, gateway, "client.gateway.transport_type")
        if "proxy" in gateway:
            if data.get("proxy") is not None:
                self.fail("gateway.proxy", "set the proxy listeners here or in the top-level "
                                           "proxy section, not both")
            data["proxy"] = self.proxy(gateway.pop("proxy"))
            self.alias("proxy", "gateway.proxy")
        if gateway.get("auth_username") and "auth_groups" not in gateway:
            # Go's shared tunnel credential registers a client of any group;
            # ours serves only "default" unless gateway.auth_groups says more
            # (docs/SECURITY.md).  The one line a Go file may need; a refused
            # client's HELLO names it too.
            self.warn("gateway.auth_username", "the shared tunnel credential serves only the "
                      "group 'default'; list your clients' group_ids in gateway.auth_groups "
                      "(or give each site its own entry in gateway.clients)")
        self.credential(gateway.pop("credential", None))
        self.gateway_web(gateway, gateway.pop("web", None))
        data[GATEWAY] = gateway

    def proxy(self, value):
        path = "gateway.proxy"
        proxy = self.mapping(path, value)
        self.check_keys(path, proxy, GO_PROXY_KEYS, schema.yaml_keys(ProxyConfig))
        for kind in ("socks5", "http"):
            if kind in proxy:
                proxy[kind] = self.listener(join_path(path, kind), kind, proxy[kind])
        tuic = self.mapping(join_path(path, "tuic"), proxy.pop("tuic", None))
        self.check_keys(join_path(path, "tuic"), tuic, GO_LISTENER_KEYS["tuic"])
        listen = tuic.get("listen_addr")
        if listen not in (None, ""):
            self.warn(join_path(path, "tuic"),
                      "TUIC is not supported: nothing listens on %s; users reach the same "
                      "clients through gateway.proxy.socks5 or gateway.proxy.http" % (listen,))
        return proxy

    def listener(self, path, kind, value):
        """
        A Go proxy listener: its users are the clients' group logins
        (C{group_id:group_password}), so it requires a login even though it
        lists no users; HTTP's C{tls_cert}/C{tls_key} make it an HTTPS proxy.
        """
        listener = self.mapping(path, value)
        self.check_keys(path, listener, GO_LISTENER_KEYS[kind], schema.yaml_keys(ListenerConfig))
        if not listener.get("allow_anonymous"):
            listener.setdefault("require_login", True)
        if kind == "http":
            self.https(path, listener)
        return listener

    def https(self, path, listener):
        """C{tls_cert}/C{tls_key} of the HTTP proxy: its listen_addr as an C{ssl:} endpoint."""
        cert = self.string(path, listener, "tls_cert")
        key = self.string(path, listener, "tls_key")
        listener.pop("tls_cert", None)
        listener.pop("tls_key", None)
        if not (cert or key):
            return
        if not (cert and key):
            self.fail(join_path(path, "tls_key" if cert else "tls_cert"),
                      "set both tls_cert and tls_key, or neither")
        listen = listener.get("listen_addr")
        if listen in (None, ""):
            return  # the listener is off
        raw = ":%d" % (listen,) if isinstance(listen, int) and not isinstance(listen, bool) \
            else listen
        try:
            endpoint, _ = listen_endpoint(raw.strip())
        except (ValueError, AttributeError):
            return  # the reader reports the bad address
        kind, _, rest = endpoint.partition(":")
        if kind not in ("tcp", "tcp6", "dualstack"):
            self.fail(join_path(path, "listen_addr"), "with tls_cert/tls_key, use host:port or "
                                                      ":port (not a %s: endpoint)" % (kind,))
        files = {}
        for name, text in (("tls_cert", cert), ("tls_key", key)):
            files[name] = self.path_of(text)
            if self.checks_files(GATEWAY) and not os.path.isfile(files[name]):
                self.fail(join_path(path, name), "file not found: %s (relative paths are "
                                                 "relative to %s)" % (files[name], RELATIVE_TO))
        # ":port" listens on every IPv4 address for TLS (ssl: endpoints are IPv4 or IPv6, not both).
        listener["listen_addr"] = "ssl:%s:privateKey=%s:certKey=%s" % (
            rest, _escape(files["tls_key"]), _escape(files["tls_cert"]))

    def credential(self, value):
        """C{gateway.credential}: where the Go gateway stores group passwords."""
        path = "gateway.credential"
        credential = self.mapping(path, value)
        self.check_keys(path, credential, GO_CREDENTIAL_KEYS)
        self.check_keys(join_path(path, "db"), self.mapping(join_path(path, "db"),
                                                            credential.get("db")),
                        GO_CREDENTIAL_DB_KEYS)
        kind = self.string(path, credential, "type").lower() or "memory"
        if kind in ("file", "db"):
            self.fail(join_path(path, "type"),
                      "%r is not supported: group logins are held in memory, valid while a "
                      "client that sets client.group_password is connected; set group_password "
                      "on every client and remove gateway.credential (or list users in "
                      "gateway.users)" % (kind,))
        if kind not in CREDENTIAL_TYPES:
            self.fail(join_path(path, "type"), "%r is not one of: %s (only memory is supported)"
                      % (kind, ", ".join(CREDENTIAL_TYPES)))
        for key in ("file_path", "db"):
            if credential.get(key) not in (None, "", {}):
                self.warn(join_path(path, key), "not used: credential.type is memory")

    def gateway_web(self, gateway, value):
        """C{gateway.web}, the Go gateway's console: our status page."""
        path = "gateway.web"
        web = self.mapping(path, value)
        self.check_keys(path, web, GO_WEB_KEYS)
        if not self.boolean(path, web, "enabled"):
            return
        for ours in ("status_addr", "status_username", "status_password"):
            if ours in gateway:
                self.fail(join_path(path, "enabled"), "set gateway.web or gateway.%s, not both"
                          % (ours,))
        listen = web.get("listen_addr")
        if listen is None or (isinstance(listen, str) and not listen.strip()):
            self.fail(join_path(path, "listen_addr"), "required when enabled is true, e.g. ':8090'")
        if not self.boolean(path, web, "auth_enabled"):
            self.fail(join_path(path, "auth_enabled"),
                      "false is not supported: the status page always needs a login; set "
                      "auth_enabled: true with auth_username and auth_password")
        for key in ("auth_username", "auth_password"):
            if not self.string(path, web, key):
                self.fail(join_path(path, key), "required when auth_enabled is true")
        for key, ours in (("listen_addr", "status_addr"), ("auth_username", "status_username"),
                          ("auth_password", "status_password")):
            gateway[ours] = web[key]
            self.alias(join_path(GATEWAY, ours), join_path(path, key))
        if self.string(path, web, "static_dir"):
            self.warn(join_path(path, "static_dir"),
                      "not used: the status page's files are built in")
        if self.string(path, web, "session_key"):
            self.warn(join_path(path, "session_key"),
                      "not used: the status page asks for its login on every request "
                      "(no session)")

    def client(self, data):
        path = CLIENT
        client = self.mapping(path, data[CLIENT])
        self.check_keys(path, client, GO_CLIENT_KEYS, schema.yaml_keys(ClientConfig))
        renamed = {"id": client.pop("id")} if "id" in client else {}
        self.move(client, path, renamed, path, "id", "client_id")
        if "gateway" in client:
            tunnel_path = "client.gateway"
            tunnel = self.mapping(tunnel_path, client.pop("gateway"))
            self.check_keys(tunnel_path, tunnel, GO_CLIENT_GATEWAY_KEYS)
            self.transport(tunnel_path, tunnel, "gateway.transport_type")
            for key, ours in (("addr", "gateway_addr"), ("tls_cert", "gateway_tls_cert"),
                              ("auth_username", "auth_username"),
                              ("auth_password", "auth_password")):
                self.move(client, path, tunnel, tunnel_path, key, ours)
        web = self.mapping("client.web", client.pop("web", None))
        self.check_keys("client.web", web, GO_WEB_KEYS)
        if self.boolean("client.web", web, "enabled"):
            self.warn("client.web", "the Go web console is not started: nothing listens on %s "
                                    "(set client.status_addr with status_username/"
                                    "status_password for AnyProxy's status page)"
                      % (web.get("listen_addr") or "its address",))
        data[CLIENT] = client


def _escape(path):
    """A file path as a Twisted endpoint string argument."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def translate(reader, data, role=None):
    """
    C{data} in our form, and the warnings for it.

    A file in our form comes back as it is, with no warnings.  A file in
    the Go form (L{is_go_form}) is rewritten; the reader learns the aliases
    of moved keys and reads relative paths against the working directory.

    @param reader: the L{anyproxy.config.yaml_reader.Reader} of the file.
    @param data: the parsed YAML.
    @param role: as for L{anyproxy.config.load.load_config}.
    @return: C{(data, warnings)}, C{warnings} a tuple of C{(key path, problem)}.
    @raise anyproxy.errors.ConfigError: one line, naming the key as written.
    """
    if not is_go_form(data):
        return data, ()
    reader.base_dir = reader.start_dir or os.getcwd()
    reader.relative_to = RELATIVE_TO
    translation = Translation(reader, role)
    return translation.translate(data), tuple(translation.warnings)


def warnings_for(config, role):
    """
    The warning lines of a loaded L{anyproxy.config.model.Config} that
    concern C{role}'s part of the file (C{"<file>: <key>: <problem>"}).
    """
    sections = {GATEWAY: (GATEWAY, "log"), CLIENT: (CLIENT, "log")}.get(role)
    return ["%s: %s: %s" % (config.path, path, problem) for path, problem in config.warnings
            if sections is None or path.split(".")[0] in sections]
