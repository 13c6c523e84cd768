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
C{GET /api/profiles}, behind the login, gives the two URLs.
"""

import hashlib
import hmac

from twisted.web import resource

from anyproxy.addresses import host_port
from anyproxy.gateway.pac import clash_profile, pac_file
from anyproxy.routes import Routes

_HEADERS = {b"cache-control": b"no-store", b"x-content-type-options": b"nosniff"}
_WILDCARDS = ("", "0.0.0.0", "::", "[::]", "*")


def announced_routes(tunnel_pool):
    """The union of the routes the connected clients announced."""
    total = Routes()
    for tunnel in tunnel_pool.tunnels():
        routes = getattr(tunnel, "routes", None)
        if routes is not None:
            total = total + routes
    return total


def profile_token(username, password):
    """The capability token (hex) of a status login; see the module docstring."""
    name = username.encode("utf-8")
    salt = b"anyproxy profile token v3\0" + len(name).to_bytes(4, "big") + name
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2 ** 14, r=8, p=1,
                          maxmem=64 * 1024 * 1024, dklen=16).hex()


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

    _token_for = (None, None)  # ((name, password), its token): derived once per login

    def token(self):
        """The capability token of the status login in force (see the module docstring)."""
        gateway = self._config().gateway
        login = (gateway.status_username, gateway.status_password)
        known, token = self._token_for
        if known != login:
            token = profile_token(*login)
            self._token_for = (login, token)
        return token

    def token_accepted(self, request):
        """Whether C{request} carries the capability token in its query."""
        offered = (request.args or {}).get(b"token", [b""])[0]
        return hmac.compare_digest(offered, self.token().encode("ascii"))

    def urls(self):
        """The capability URLs' paths and queries."""
        query = "?token=" + self.token()
        return {"pac": "/proxy.pac" + query, "clash": "/clash.yaml" + query}

    def routes(self):
        extra = Routes.of(self._config().gateway.pac_extra_routes)
        return announced_routes(self._tunnel_pool) + extra

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
        return self.render_profile(request, self._profiles.routes(), *proxy)


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
