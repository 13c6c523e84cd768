# -*- test-case-name: tests.test_e2e_pac -*-
"""
C{/proxy.pac} and C{/clash.yaml} on the status listener (behind its login,
like every page there): browser profiles that send the destinations the
connected clients route (C{client.routes}) plus C{gateway.pac_extra_routes}
through the proxy, and the rest DIRECT (L{anyproxy.gateway.pac}).

Which proxy they name: C{gateway.pac_proxy_addr} (C{host:port} as browsers
reach it) and C{gateway.pac_proxy_type} (C{http} or C{socks5}); by default
the HTTP proxy listener (else the SOCKS5 one), its port, and the host name
the browser used to fetch the profile when the listener's own host is a
wildcard (C{0.0.0.0}, C{::}).

A browser fetching a PAC file cannot answer a Basic challenge (Chromium
asks once, then uses the file it got without credentials), so both
profiles are also served to a capability URL: C{/proxy.pac?token=T},
where T is derived from the status login's password with scrypt, so it
changes when that password does.  The URL goes to the proxy users'
browsers, so T must not be a cheap test of password guesses: each guess
costs an scrypt (about 50 ms and 16 MiB), as a password hash does.  The
salt holds the status login's name, so that guesses cannot be computed once
for every install; a hashed C{status_password} (the configured text is what
is derived from) has a random salt of its own, which leaves a token nothing
to guess.  Every node of a fleet with the same login gives the same token.

Those two URLs hold every group's routes: they are the operator's.  Each
group has its own pair, C{/proxy.pac?group=G&token=T_G}, whose token is
derived the same way with the group in its salt and which names only the
routes of that group's clients (and C{gateway.pac_extra_routes}): give a
team its group's URLs, so that it learns nothing of another team's
networks.  With the login, C{?group=G} filters the same way.  C{GET
/api/profiles}, behind the login, gives the URLs, the groups' included.
"""

import hashlib
import hmac
import urllib.parse
from collections import OrderedDict

from twisted.internet import defer, threads

from twisted.web import resource

from anyproxy.addresses import host_port
from anyproxy.gateway.pac import clash_profile, pac_file
from anyproxy.routes import Routes

_HEADERS = {b"cache-control": b"no-store", b"x-content-type-options": b"nosniff"}
_WILDCARDS = ("", "0.0.0.0", "::", "[::]", "*")


def announced_routes(tunnel_pool, group=None):
    """The union of the routes the connected clients (of C{group}, or all) announced."""
    total = Routes()
    for tunnel in tunnel_pool.tunnels(group):
        routes = getattr(tunnel, "routes", None)
        if routes is not None:
            total = total + routes
    return total


def profile_token(username, password, group=None):
    """The capability token (hex) of a status login, for C{group} or all; see the module docstring."""
    name = username.encode("utf-8")
    salt = b"anyproxy profile token v3\0" + len(name).to_bytes(4, "big") + name
    if group is not None:
        encoded = group.encode("utf-8", "surrogatepass")
        salt += b"\0group\0" + len(encoded).to_bytes(4, "big") + encoded
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2 ** 14, r=8, p=1,
                          maxmem=64 * 1024 * 1024, dklen=16).hex()


# Group tokens kept at most (one scrypt each), the least recently used let go
# first (never the operator's): a request for a group's profile pays one
# scrypt only when its token was let go.
MAX_GROUP_TOKENS = 1024


def requested_group(request):
    """The C{group} of a profile request's query, or C{None} (every group)."""
    value = (request.args or {}).get(b"group", [None])[0]
    return None if value is None else value.decode("utf-8", "replace")


def _listen_host_port(listen_addr):
    host, _, port = listen_addr.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


class ProxyProfiles:
    """What both profiles need: the routes and which proxy to name."""

    def __init__(self, tunnel_pool, config, listeners=lambda: {}):
        """
        @param config: a callable returning the gateway's
            L{anyproxy.config.model.Config} in force.
        @param listeners: a callable returning the gateway's listeners by
            name (C{"http proxy"}...), for the port a listener bound when
            its address asked for port 0.
        """
        self._tunnel_pool = tunnel_pool
        self._config = config
        self._listeners = listeners

    _tokens_for = None  # the (name, password) the tokens in _tokens are of
    _tokens = None  # group (None: all) -> token, the least recently used first

    def _login(self):
        gateway = self._config().gateway
        login = (gateway.status_username, gateway.status_password)
        if self._tokens_for != login:
            self._tokens_for, self._tokens = login, OrderedDict()
        return login

    def _remember(self, group, token):
        self._tokens[group] = token
        self._tokens.move_to_end(group)
        while len(self._tokens) > MAX_GROUP_TOKENS:
            oldest = next(iter(self._tokens))
            if oldest is None:  # the operator's token stays
                self._tokens.move_to_end(None)
                oldest = next(iter(self._tokens))
            del self._tokens[oldest]

    def token(self, group=None):
        """The capability token of the status login in force, for C{group} or all."""
        login = self._login()
        token = self._tokens.get(group)
        if token is None:
            token = profile_token(*login, group=group)
        self._remember(group, token)
        return token

    def _tokens_now(self, groups):
        """
        A Deferred firing with C{{group: token}}: those not known yet are
        derived in threads (an scrypt each), never on the reactor's turn.
        """
        login = self._login()
        known = {group: self._tokens[group] for group in groups if group in self._tokens}
        missing = [group for group in groups if group not in known]

        def derived(tokens):
            if self._tokens_for == login:  # no reload changed the login meanwhile
                for group, token in zip(missing, tokens):
                    self._remember(group, token)
            known.update(zip(missing, tokens))
            return known

        return defer.gatherResults(
            [threads.deferToThread(profile_token, *login, group=group) for group in missing],
            consumeErrors=True).addCallback(derived)

    def token_accepted(self, request):
        """Whether C{request} carries the capability token of its C{group} (or of all)."""
        args = request.args or {}
        offered = args.get(b"token", [b""])[0]
        group = requested_group(request)
        if group is not None and group not in self.groups():
            return False  # no token is derived for a group with no client
        return hmac.compare_digest(offered, self.token(group).encode("ascii"))

    def groups(self):
        """The groups whose clients are connected now."""
        return sorted({tunnel.group for tunnel in self._tunnel_pool.tunnels()})

    def urls(self):
        """
        A Deferred firing with the capability URLs' paths and queries: all
        routes, and each connected group's.
        """
        groups = [None] + self.groups()

        def build(tokens):
            query = "?token=" + tokens[None]
            urls = {"pac": "/proxy.pac" + query, "clash": "/clash.yaml" + query, "groups": {}}
            for group in groups[1:]:
                query = "?group=%s&token=%s" % (urllib.parse.quote(group, safe=""),
                                                tokens[group])
                urls["groups"][group] = {"pac": "/proxy.pac" + query,
                                         "clash": "/clash.yaml" + query}
            return urls

        return self._tokens_now(groups).addCallback(build)

    def routes(self, group=None):
        extra = Routes.of(self._config().gateway.pac_extra_routes)
        return announced_routes(self._tunnel_pool, group) + extra

    def proxy(self, request_host):
        """C{(type, host, port)}: the proxy the profiles name, or C{None} when there is none."""
        config = self._config()
        gateway, proxy = config.gateway, config.proxy
        kind = gateway.pac_proxy_type or ("http" if proxy.http is not None else "socks5")
        listener = proxy.http if kind == "http" else proxy.socks5
        if gateway.pac_proxy_addr:
            host, port = _listen_host_port(gateway.pac_proxy_addr)
            return kind, host, port
        if listener is None:
            return None
        host, port = _listen_host_port(listener.listen_addr)
        if host in _WILDCARDS:
            host = request_host
        bound = getattr(self._listeners().get(kind + " proxy"), "port", None)
        if port == 0 and bound is not None:
            port = bound.getHost().port
        return kind, host, port


def _request_host(request):
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    name, _, port = host.rpartition(":")
    name = name if port.isdigit() else host
    return name.strip("[]") or "127.0.0.1"


class _Profile(resource.Resource):
    isLeaf = True

    def __init__(self, profiles):
        super().__init__()
        self._profiles = profiles

    def render_GET(self, request):
        for name, value in _HEADERS.items():
            request.setHeader(name, value)
        proxy = self._profiles.proxy(_request_host(request))
        if proxy is None or proxy[2] is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"no proxy listener to name: set gateway.pac_proxy_addr\n"
        return self.render_profile(request, self._profiles.routes(requested_group(request)),
                                   *proxy)


class PacFile(_Profile):
    """C{GET /proxy.pac}."""

    def render_profile(self, request, routes, kind, host, port):
        request.setHeader(b"content-type", b"application/x-ns-proxy-autoconfig")
        directive = "%s %s" % ("PROXY" if kind == "http" else "SOCKS5", host_port(host, port))
        return pac_file(routes, directive).encode("utf-8")


class ClashProfile(_Profile):
    """C{GET /clash.yaml}."""

    def render_profile(self, request, routes, kind, host, port):
        request.setHeader(b"content-type", b"text/yaml; charset=utf-8")
        return clash_profile(routes, kind, host, port).encode("utf-8")


def add_profiles(root, profiles):
    """Mount C{/proxy.pac} and C{/clash.yaml} under C{root} (behind the login)."""
    root.putChild(b"proxy.pac", PacFile(profiles))
    root.putChild(b"clash.yaml", ClashProfile(profiles))


def add_capabilities(site, profiles):
    """Serve both profiles on C{site} (an OperatorSite) to their capability URLs too."""
    site.add_capability(b"proxy.pac", PacFile(profiles), profiles.token_accepted)
    site.add_capability(b"clash.yaml", ClashProfile(profiles), profiles.token_accepted)
