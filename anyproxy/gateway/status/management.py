# -*- test-case-name: tests.test_management_api -*-
"""
The gateway's management API (C{/api/...} on C{gateway.status_addr}, behind
the status login): list tunnels, streams and users, close a stream,
disconnect or drain a client, drain the gateway, reload, show the config.
C{docs/MANAGEMENT_API.md} is the operator's guide and L{openapi} the
machine-readable description (C{GET /api/openapi.json}).

Theory of operation
-------------------
L{Management} does the work against the running gateway;
L{ManagementAPI}, one leaf resource for all of C{/api}, is the HTTP side: a
route table of C{(method, path pattern) -> handler}, JSON in and out, and
the error rules in one place:

  - every error is C{{"error": "..."}} with its status: 400 (bad body),
    403 (CSRF checks), 404 (no such path, stream or client), 405 (a path
    that exists, another method; with C{Allow}), 409 (already draining, a
    reload refused), 413 (a body over L{MAX_BODY}), 415 (a body that is not
    JSON).  401 comes before any of it, from the site's login
    (L{anyproxy.operator_site}), and is JSON under C{/api/} too.
  - B{CSRF}: the login is HTTP Basic, which a browser replays by itself to
    any page of the origin, so a page elsewhere could make an operator's
    browser POST here.  A state-changing call (POST, DELETE) must therefore
    carry the header L{CSRF_HEADER}: a cross-origin page can only add a
    custom header after a CORS preflight, and this API answers no preflight
    (C{OPTIONS} is 405, with no C{Access-Control-Allow-*} headers).  As a
    second wall, a request whose C{Origin} is not this site's own, or whose
    C{Sec-Fetch-Site} says C{cross-site}/C{same-site}, is refused.  GET calls
    change nothing and are served as they are (their answers are not
    readable cross-origin without CORS either).

Nothing here is kept between requests but the L{Management}'s references:
each answer is a fresh snapshot.
"""

import json
import re

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from anyproxy.access_policy import BOTH
from anyproxy.config.load import load_config
from anyproxy.errors import ConfigError, Reason
from anyproxy.gateway.status.config_view import gateway_config_json
from anyproxy.gateway.status.openapi import openapi_document
from anyproxy.operator_site import set_operator_headers

log = Logger()

CSRF_HEADER = b"x-anyproxy-request"
# The largest request body an API call takes (a little JSON).
MAX_BODY = 4096



class APIError(Exception):
    """An answer other than success: C{status} and a message for C{{"error": ...}}."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _user_groups(entry):
    groups = getattr(entry, "groups", None)
    if groups:
        return list(groups)
    return [entry.group]


def _rule_text(rule):
    """
    A C{gateway.users} C{allow} or C{deny} entry as the operator wrote it:
    a L{anyproxy.access_policy.HostRule}'s text, or a
    L{anyproxy.access_policy.LimitRule}'s with its protocol when that is
    not both (C{"10.1.0.0/16:22 (tcp)"}).
    """
    host_rule = getattr(rule, "rule", rule)
    text = host_rule.text or str(host_rule.value)
    protocol = getattr(rule, "protocol", BOTH)
    return text if protocol == BOTH else "%s (%s)" % (text, protocol)


def _policy(entry):
    """What a C{gateway.users} entry allows; keys absent from the model read as unrestricted."""
    return {
        "allow": [_rule_text(rule) for rule in getattr(entry, "allow", ()) or ()],
        "deny": [_rule_text(rule) for rule in getattr(entry, "deny", ()) or ()],
        "protocols": list(getattr(entry, "protocols", ("tcp", "udp")) or ()),
        "max_streams": int(getattr(entry, "max_streams", 0) or 0),
        "bandwidth": int(getattr(entry, "bandwidth", 0) or 0),
    }


class Management:
    """
    The management actions on one running gateway.

    @ivar gateway: the L{anyproxy.gateway.app.Gateway}; set once it is built.
    @ivar reloader: the L{anyproxy.twistd.reload.Reloader} that SIGHUP
        uses, if the program has one (twistd); otherwise one is made on the
        first reload, for the file the config was loaded from.
    """

    def __init__(self, reactor, tunnel_pool, stream_table, gateway=None):
        self._reactor = reactor
        self.tunnel_pool = tunnel_pool
        self.stream_table = stream_table
        self.gateway = gateway
        self.reloader = None
        self.profiles = None  # the status/profiles.ProxyProfiles, once the site is built

    # -- lists -----------------------------------------------------------------

    def streams(self):
        return {"streams": self.stream_table.snapshot()}

    def tunnels(self, tunnel_status):
        now = self._reactor.seconds()
        tunnels = sorted(self.tunnel_pool.tunnels(), key=lambda t: (t.connected_at, t.client_id))
        return {"tunnels": [tunnel_status(tunnel, now) for tunnel in tunnels]}

    def users(self):
        """The configured proxy users (never a password) and their open streams."""
        config = self.gateway.config
        counts = self.stream_table.count_by_user()
        users = {}
        for frontend in config.proxy.all_frontends():
            listener = frontend.listener
            if listener.auth_username:
                row = users.setdefault(listener.auth_username, {
                    "username": listener.auth_username, "source": "listener",
                    "groups": list(config.gateway.auth_groups), "listeners": [],
                    **_policy(None)})
                row["listeners"].append(frontend.name)
        for entry in config.gateway.users:
            row = users.setdefault(entry.username, {
                "username": entry.username, "source": "gateway.users",
                "groups": _user_groups(entry), "listeners": [], **_policy(entry)})
            row["listeners"] = [frontend.name for frontend in config.proxy.all_frontends()
                                if frontend.listener.takes_user(entry.username)]
        rows = sorted(users.values(), key=lambda row: row["username"])
        for row in rows:
            row["active_streams"] = counts.get(row["username"], 0)
        return {"users": rows}

    def config(self):
        return gateway_config_json(self.gateway.config)

    # -- actions ---------------------------------------------------------------

    def kick(self, stream_id):
        if not self.stream_table.kick(stream_id):
            raise APIError(404, "no open stream %r" % (stream_id,))
        log.info("management API: stream {id} closed", id=stream_id)
        return {"id": stream_id, "closed": True}

    def _client_tunnels(self, client_id, group=None):
        """
        The tunnels of C{client_id}; with C{group}, only that group's (two
        tenants' clients may have the same id).
        """
        tunnels = [t for t in self.tunnel_pool.tunnels() if t.client_id == client_id
                   and (group is None or t.group == group)]
        if not tunnels:
            raise APIError(404, "no client %r is connected%s" % (
                client_id, "" if group is None else " in group %r" % (group,)))
        return tunnels

    def disconnect(self, client_id, group=None):
        """
        GOAWAY and close every tunnel of C{client_id} (of C{group} only, if
        given); its open streams are reset.
        """
        tunnels = self._client_tunnels(client_id, group)
        for tunnel in tunnels:
            tunnel.go_away(self._reactor, Reason.NO_TUNNEL)
        log.info("management API: client {client_id} disconnected ({count} tunnels, groups "
                 "{groups})", client_id=client_id, count=len(tunnels),
                 groups=",".join(sorted({t.group for t in tunnels})))
        return {"client_id": client_id, "tunnels": len(tunnels)}

    def drain_client(self, client_id, group=None):
        """
        GOAWAY on every tunnel of C{client_id} (of C{group} only, if given):
        no new streams on them; each is closed once its open streams have
        finished.
        """
        tunnels = self._client_tunnels(client_id, group)
        for tunnel in tunnels:
            if tunnel.draining:
                continue
            tunnel.mux.go_away(Reason.NO_TUNNEL)
            tunnel.mux.when_drained().addCallback(
                lambda _, tunnel=tunnel: tunnel.go_away(self._reactor))
        streams = sum(tunnel.active_streams for tunnel in tunnels)
        log.info("management API: client {client_id} draining ({count} tunnels, groups "
                 "{groups}, {streams} streams open)", client_id=client_id, count=len(tunnels),
                 groups=",".join(sorted({t.group for t in tunnels})), streams=streams)
        return {"client_id": client_id, "tunnels": len(tunnels), "active_streams": streams}

    def drain_gateway(self, timeout=None):
        """Start the gateway's drain (L{anyproxy.gateway.drain}); refused if one has begun."""
        gateway = self.gateway
        if gateway.draining is not None:
            raise APIError(409, "the gateway is already draining (%s)" % (
                gateway.draining.outcome or "in progress",))
        if timeout is None:
            timeout = gateway.config.gateway.drain_timeout
        log.info("management API: gateway drain asked for")
        gateway.drain(timeout)
        streams = len(gateway.draining.open_streams())
        return {"draining": True, "timeout": timeout, "active_streams": streams}

    @defer.inlineCallbacks
    def reload(self):
        """
        Re-read the config file as SIGHUP does (L{anyproxy.twistd.reload}).

        @return: a Deferred firing with the answer, or failing with
            L{APIError} 409 when the file is refused (the running config
            stays).
        """
        from anyproxy.twistd.reload import Reloader, summarize

        reloader = self.reloader
        if reloader is None:
            reloader = self.reloader = Reloader(self.gateway.config.path, "gateway", self.gateway,
                                                self.gateway.config, self._reactor)
        try:
            # Read once more here for the error's text (the reloader logs it).
            load_config(reloader.path, role="gateway").require_gateway()
        except ConfigError as e:
            log.info("management API: reload refused")
            raise APIError(409, "reload refused: %s" % (e,))
        old = reloader.config
        applied = yield reloader.reload()
        if not applied:
            raise APIError(409, "reload refused; the running config stays (see the gateway log)")
        summary, restart = summarize(old, reloader.config, "gateway")
        return {"applied": True, "summary": summary, "restart_needed": restart}


# (method, path pattern, handler name); a pattern's groups are the handler's arguments.
ROUTES = [
    ("GET", r"status", "get_status"),
    ("GET", r"tunnels", "get_tunnels"),
    ("GET", r"streams", "get_streams"),
    ("DELETE", r"streams/([^/]+)", "delete_stream"),
    ("GET", r"users", "get_users"),
    ("DELETE", r"clients/([^/]+)", "delete_client"),
    ("POST", r"clients/([^/]+)/drain", "post_client_drain"),
    ("POST", r"drain", "post_drain"),
    ("POST", r"reload", "post_reload"),
    ("GET", r"config", "get_config"),
    ("GET", r"openapi\.json", "get_openapi"),
    ("GET", r"profiles", "get_profiles"),
]
_COMPILED = [(method, re.compile(pattern + r"\Z"), name) for method, pattern, name in ROUTES]


class ManagementAPI(resource.Resource):
    """
    C{/api/*}: see the module docstring.

    @param management: the L{Management}.
    @param status_snapshot: a callable returning the C{/api/status} answer.
    @param tunnel_status: C{tunnel_status(tunnel, now)}, one tunnel as JSON.
    """

    isLeaf = True

    def __init__(self, management, status_snapshot, tunnel_status):
        super().__init__()
        self._management = management
        self._status_snapshot = status_snapshot
        self._tunnel_status = tunnel_status

    def render(self, request):
        set_operator_headers(request, b"application/json; charset=utf-8")
        try:
            handler, arguments = self._route(request)
            body = None
            if request.method in (b"POST", b"DELETE"):
                self._check_csrf(request)
                # A GET's body means nothing (RFC 9110, 9.3.1): not read at all.
                body = self._read_body(request)
            result = handler(request, body, *arguments)
        except APIError as e:
            return self._error(request, e)
        if isinstance(result, defer.Deferred):
            result.addCallbacks(lambda answer: self._finish(request, answer),
                                lambda failure: self._finish_failure(request, failure))
            request.notifyFinish().addErrback(lambda _: None)
            return server.NOT_DONE_YET
        return self._encode(request, result)

    # -- the rules -------------------------------------------------------------

    def _route(self, request):
        path = request.path.decode("utf-8", "replace")
        if not path.startswith("/api/"):
            raise APIError(404, "no such path")
        tail = path[len("/api/"):]
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        allowed = []
        for route_method, pattern, name in _COMPILED:
            match = pattern.match(tail)
            if match is None:
                continue
            if route_method == method:
                arguments = [_unquote(each) for each in match.groups()]
                return getattr(self, name), arguments
            allowed.append(route_method)
        if allowed:
            allow = ", ".join(sorted(set(allowed + (["HEAD"] if "GET" in allowed else []))))
            raise APIError(405, "%s is not allowed here (allowed: %s)" % (method, allow),
                           {b"allow": allow.encode("ascii")})
        raise APIError(404, "no such path")

    def _check_csrf(self, request):
        if not _header(request, CSRF_HEADER):
            raise APIError(403, "state-changing calls need the header X-AnyProxy-Request "
                                "(CSRF protection)")
        fetch_site = _header(request, b"sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in ("same-origin", "none"):
            raise APIError(403, "cross-site request refused")
        origin = _header(request, b"origin")
        if origin is not None:
            host = _header(request, b"host") or ""
            scheme = "https" if request.isSecure() else "http"
            if origin.lower() != ("%s://%s" % (scheme, host)).lower():
                raise APIError(403, "cross-origin request refused (Origin %s)" % (origin[:100],))

    def _read_body(self, request):
        """The request's JSON body (an object), or C{None} when it has none."""
        content = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(content) > MAX_BODY:
            raise APIError(413, "request body over %d bytes" % (MAX_BODY,))
        if not content:
            return None
        content_type = (_header(request, b"content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise APIError(415, "a request body must be application/json")
        try:
            body = json.loads(content.decode("utf-8"), object_pairs_hook=_object_without_repeats)
        except _RepeatedKey as e:
            # As the config loader: a repeated key is a mistake, not "the last one wins".
            raise APIError(400, "the request body gives %r twice" % (e.key,))
        except (UnicodeDecodeError, ValueError, RecursionError):
            # RecursionError: arrays or objects nested too deep to parse.
            raise APIError(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def _error(self, request, error):
        request.setResponseCode(error.status)
        for name, value in error.headers.items():
            request.setHeader(name, value)
        return self._encode(request, {"error": error.message})

    def _encode(self, request, answer):
        data = json.dumps(answer, sort_keys=True).encode("utf-8")
        request.setHeader(b"content-length", b"%d" % (len(data),))
        return b"" if request.method == b"HEAD" else data

    def _finish(self, request, answer):
        if request.finished or request._disconnected:
            return
        request.write(self._encode(request, answer))
        request.finish()

    def _finish_failure(self, request, failure):
        if failure.check(APIError):
            error = failure.value
        else:
            log.failure("management API: {method} {path} failed", failure,
                        method=request.method, path=request.path)
            error = APIError(500, "internal error (see the gateway log)")
        if request.finished or request._disconnected:
            return
        request.write(self._error(request, error))
        request.finish()

    # -- handlers: (request, body, *path arguments) -> answer ------------------

    def _no_body(self, body):
        if body:
            raise APIError(400, "this call takes no request body")

    def get_status(self, request, body):
        return self._status_snapshot()

    def get_tunnels(self, request, body):
        return self._management.tunnels(self._tunnel_status)

    def get_streams(self, request, body):
        return self._management.streams()

    def delete_stream(self, request, body, stream_id):
        self._no_body(body)
        return self._management.kick(stream_id)

    def get_users(self, request, body):
        return self._management.users()

    def _group(self, request):
        """The C{?group=} a client call is limited to, or C{None}."""
        values = request.args.get(b"group") if request.args else None
        if not values:
            return None
        if len(values) > 1 or not values[0]:
            raise APIError(400, "group must be given once, not empty")
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "group must be UTF-8 text")

    def delete_client(self, request, body, client_id):
        self._no_body(body)
        return self._management.disconnect(client_id, self._group(request))

    def post_client_drain(self, request, body, client_id):
        self._no_body(body)
        group = self._group(request)
        answer = self._management.drain_client(client_id, group)
        request.setResponseCode(202)
        return answer

    def post_drain(self, request, body):
        timeout = None
        if body:
            unknown = set(body) - {"timeout"}
            if unknown:
                raise APIError(400, "unknown field %r" % (sorted(unknown)[0],))
            timeout = body.get("timeout")
            if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                    or not 0 <= timeout <= 86400):
                raise APIError(400, "timeout must be a number of seconds (0-86400)")
        answer = self._management.drain_gateway(timeout)
        request.setResponseCode(202)
        return answer

    def post_reload(self, request, body):
        self._no_body(body)
        return self._management.reload()

    def get_config(self, request, body):
        return self._management.config()

    def get_openapi(self, request, body):
        return openapi_document()

    def get_profiles(self, request, body):
        profiles = self._management.profiles
        if profiles is None:
            raise APIError(404, "no profiles on this listener")
        return profiles.urls()


class _RepeatedKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _object_without_repeats(pairs):
    """A JSON object as a dict, refusing a key given twice (L{_RepeatedKey})."""
    answer = {}
    for key, value in pairs:
        if key in answer:
            raise _RepeatedKey(key[:100])
        answer[key] = value
    return answer


def _header(request, name):
    """A request header as text (latin-1, as HTTP has it), or C{None}."""
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def _unquote(text):
    from urllib.parse import unquote
    return unquote(text)
