# -*- test-case-name: tests.test_operator_site -*-
"""
The web listeners for operators and their tools: the gateway's status page
(L{anyproxy.gateway.status.api}) and the C{/metrics} pages of both programs
(L{anyproxy.metrics}).  Both build an L{OperatorSite}.

Theory of operation
-------------------
These listeners run in the proxy's process, share its file descriptors, and
may face the internet (an operator's choice), so every connection is bounded
in time and every listener in connections:

  - B{a deadline per request}, not an idle timeout.  Twisted's own
    C{HTTPChannel} timeout is reset by every byte, so a client sending one
    byte a second kept a connection forever.  Here (L{DeadlineChannel}) a
    request's head must be complete within C{request_timeout} seconds of the
    connection being made, or of the previous answer being handed to the
    transport (a keep-alive connection waiting for its next request), however
    the bytes trickle in: nginx's C{client_header_timeout}, haproxy's
    C{timeout http-request}.  A body, if any, gets C{request_timeout} more
    and at most L{MAX_BODY} bytes (these pages take none).  When the
    deadline passes, a request partly received gets 408, an idle keep-alive
    connection is just closed; either way a client that does not read is cut
    off L{ABORT_GRACE} seconds later.  The same deadline bounds a TLS
    handshake (an C{ssl:} endpoint) and a client that does not read its
    answer: the next wait starts when the answer is written.
  - B{a cap on open connections} (L{anyproxy.connection_cap.ConnectionCap}):
    beyond it a new connection gets 503 and is closed; refusals are logged
    once per burst.
  - B{one login}, HTTP Basic, through the stock C{twisted.web.guard} and
    C{twisted.cred} pairing: a L{Portal} whose one checker
    (L{SingleUserChecker}) compares the username in constant time and the
    password as L{anyproxy.passwords} does (an argon2id or bcrypt hash, or
    plain text in constant time).
    A wrong or missing login gets 401 with C{WWW-Authenticate: Basic} (a
    JSON body under C{/api/}).  Failed logins count in the gateway's login
    throttle (L{anyproxy.auth.Logins}, L{OperatorSite.use_logins}): a
    repeated failure's 401 is delayed, and a blocked address gets 429 with
    C{Retry-After}, its password unchecked.
    L{OperatorSite.set_login} changes it for the next request (a reload); an
    empty login serves the pages without one (C{/metrics} on loopback, or
    with C{metrics_allow_anonymous}).  Passwords are kept only as bytes on the
    checker and never reach a log event.
  - B{no page without a login under a borrowed name}: a site serving its
    pages without a login answers only requests whose C{Host} is an IP
    address or C{localhost} (or that have none, as health checks may send);
    others get 421.  Otherwise a web page the operator visits could point a
    name of its own at 127.0.0.1 (DNS rebinding) and read the metrics as
    same-origin.  Scrapers dial addresses, or send their own C{Host}.
  - B{headers that keep answers private}: no caching, no content sniffing,
    and no C{Server} header naming the software's version.
  - B{no access log}: the status page polls once a second and Prometheus
    scrapes every few seconds.

Every timer runs on the site's reactor (a C{Clock} in tests).
"""

import base64
import hashlib
import hmac
import ipaddress
import json
from importlib import resources

from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import guard, http, resource, server
from twisted.web._auth.wrapper import UnauthorizedResource
from zope.interface import implementer

from anyproxy.auth import BLOCKED, PENDING, Logins
from anyproxy.connection_cap import ConnectionCap
from anyproxy.login_throttle import source_key

log = Logger()

# Seconds a request head (and then its body) may take; the gateway passes its
# handshake_timeout instead.
DEFAULT_REQUEST_TIMEOUT = 10.0
# The largest request body accepted: these pages take none, an API call
# takes a little JSON.
MAX_BODY = 64 * 1024
# Seconds a connection we closed may take to read what we last wrote.
ABORT_GRACE = 5.0
# 401s on one connection, the last of them closing it (as the HTTP proxy
# closes after its fourth 407): a browser asks once or twice.
MAX_UNAUTHORIZED = 3


def _plain_response(status, reason, text):
    body = text.encode("utf-8") + b"\n"
    return (b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (status, reason, len(body), body))


def local_host_header(value):
    """
    Whether a request's C{Host} header (bytes, or C{None} when absent) names
    an IP address or C{localhost}: a name no other site's page can own.
    """
    if value is None:
        return True
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        host, bracket, _ = host[1:].partition("]")
        if not bracket:
            return False
    else:
        name, colon, port = host.rpartition(":")
        if colon and port.isdigit():
            host = name
    host = host.rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Misdirected(resource.Resource):
    """421: a page served without a login, asked for under a host name (see the module docstring)."""

    isLeaf = True

    def render(self, request):
        request.setResponseCode(421)
        set_operator_headers(request, b"text/plain; charset=utf-8")
        body = (b"this listener has no login, so it answers only to an IP address or localhost "
                b"in the Host header\n")
        return b"" if request.method == b"HEAD" else body


class _OperatorRequest(server.Request):
    """
    A request whose answer names no server software (its version helps only
    attackers) and carries L{OPERATOR_HEADERS}, also when no resource set
    them (Twisted's own 404, 405 and 501 pages, the readiness check).
    """

    def write(self, data):
        if not self.startedWriting:
            self.responseHeaders.removeHeader(b"server")
            for name, value in OPERATOR_HEADERS.items():
                if not self.responseHeaders.hasHeader(name):
                    self.responseHeaders.setRawHeaders(name, [value])
        super().write(data)


def _peer(transport):
    peer = transport.getPeer()
    return "%s:%s" % (getattr(peer, "host", "?"), getattr(peer, "port", "?"))


@implementer(ICredentialsChecker)
class SingleUserChecker:
    """
    Accepts exactly one username/password: the username compared in
    constant time, the password checked against its configured form (a hash
    or plain text) every time, so timing tells nothing about which one was
    wrong.  Logins go through C{logins} (L{anyproxy.auth.Logins}): the
    password checker and the throttle, counted under the credentials'
    C{source} (the address L{_SourcedBasicCredentials} notes).
    """

    credentialInterfaces = (cred_credentials.IUsernamePassword,)

    def __init__(self, username, password, logins=None):
        self.logins = logins if logins is not None else Logins()
        self.set_credentials(username, password)

    def set_credentials(self, username, password):
        """Accept these from now on (a reload); sessions are per request, so at once."""
        self._username = username.encode("utf-8")
        self._secrets = (password,)

    def __repr__(self):
        return "<SingleUserChecker>"  # never show the password

    def requestAvatarId(self, credentials):
        username = credentials.username
        password = credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        configured, secrets, checker = self._username, self._secrets, self.logins.checker
        user_ok = hmac.compare_digest(username, configured) and bool(configured)

        def now():
            ok = checker.check_now(configured, password, secrets)
            return PENDING if ok is None else (ok and user_ok)

        def later():
            return checker.check(configured, password, secrets).addCallback(
                lambda ok: ok and user_ok)

        answer = self.logins.attempt(getattr(credentials, "source", ""), username, now, later,
                                     guess=password)
        return defer.maybeDeferred(lambda: answer).addCallback(self._answered, configured)

    def _answered(self, answer, username):
        if answer is BLOCKED or not answer:
            raise UnauthorizedLogin()
        return username


class _SourcedBasicCredentials(guard.BasicCredentialFactory):
    """Basic credentials that note the client's IP address (the login throttle's source)."""

    def decode(self, response, request):
        credentials = super().decode(response, request)
        credentials.source = source_key(getattr(request.getClientAddress(), "host", "") or "")
        return credentials


class _Blocked(resource.Resource):
    """429 with C{Retry-After}: the client's address is blocked after repeated failed logins."""

    isLeaf = True

    def __init__(self, retry_after):
        super().__init__()
        self._retry_after = max(1, round(retry_after))

    def render(self, request):
        request.setResponseCode(429)
        request.setHeader(b"retry-after", b"%d" % (self._retry_after,))
        request.setHeader(b"cache-control", b"no-store")
        text = "too many failed logins; try again later"
        if request.path.startswith(b"/api/"):
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
            body = json.dumps({"error": text}).encode("utf-8")
        else:
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            body = text.encode("utf-8") + b"\n"
        return b"" if request.method == b"HEAD" else body


@implementer(IRealm)
class _TreeRealm:
    """Hands every logged-in user the same resource tree."""

    def __init__(self, tree):
        self._tree = tree

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if resource.IResource not in interfaces:
            raise NotImplementedError("only web resources are served here")
        return resource.IResource, self._tree, lambda: None


class _Unauthorized(UnauthorizedResource):
    """
    The stock 401 with its Basic challenge; under C{/api/} its body is
    JSON, as every other answer of the management API is.
    """

    def render(self, request):
        body = super().render(request)
        for name, value in OPERATOR_HEADERS.items():
            request.setHeader(name, value)
        channel = request.channel  # None once the peer left (a delayed answer)
        if channel is not None:
            channel.unauthorized = getattr(channel, "unauthorized", 0) + 1
        if channel is not None and channel.unauthorized >= MAX_UNAUTHORIZED:
            # Each answer starts a new deadline: a connection that never
            # logs in must not keep its place by asking again and again.
            channel.persistent = False
            request.setHeader(b"connection", b"close")
        if request.path.startswith(b"/api/"):
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
            return b"" if request.method == b"HEAD" else b'{"error": "authentication required"}'
        return body


class _Guard(guard.HTTPAuthSessionWrapper):
    """
    C{HTTPAuthSessionWrapper} answering 401 with L{_Unauthorized}, and 429
    (L{_Blocked}) to a login from an address the throttle blocks, before
    its password is checked.
    """

    def __init__(self, portal, credential_factories, checker):
        super().__init__(portal, credential_factories)
        self._checker = checker

    def _authorizedResource(self, request):
        if request.getHeader(b"authorization"):
            source = source_key(getattr(request.getClientAddress(), "host", "") or "")
            verdict = self._checker.logins.throttle.check(source)
            if verdict.blocked:
                return _Blocked(verdict.retry_after)
        found = super()._authorizedResource(request)
        return self._json_aware(found)

    def _loginFailed(self, result):
        return self._json_aware(super()._loginFailed(result))

    def _json_aware(self, found):
        if type(found) is UnauthorizedResource:
            return _Unauthorized(self._credentialFactories)
        return found


class DeadlineChannel(http.HTTPChannel):
    """
    An C{HTTPChannel} whose requests have a deadline (see the module
    docstring).  It reads C{site.request_timeout} each time a wait starts, so
    a reload changes it for the next one; its timers use C{self.callLater},
    which the site points at its reactor.

    @ivar request_bytes: bytes received so far of the request being waited
        for; 0 while a keep-alive connection is idle.
    """

    request_bytes = 0
    _holds_place = False  # counted by the site's ConnectionCap
    _deadline = None
    _abort_call = None
    _chunked_bytes = None  # bytes of a chunked body so far, while it arrives
    _closed_by_us = False

    def connectionMade(self):
        super().connectionMade()
        self._start_deadline()

    def dataReceived(self, data):
        if self._closed_by_us:
            return  # e.g. the rest of a request we refused
        if self._deadline is not None:
            self.request_bytes += len(data)
        super().dataReceived(data)

    def allHeadersReceived(self):
        if self.length is not None and self.length > MAX_BODY:
            self._refuse(413, b"Content Too Large", "request body too large")
            return
        super().allHeadersReceived()
        if self.length != 0:
            # The body gets a deadline of its own; a chunked one is counted.
            self._chunked_bytes = 0 if self.length is None else None
            self._start_deadline(new_request=False)

    def rawDataReceived(self, data):
        if self._closed_by_us:
            return
        if self._chunked_bytes is not None and not self._handlingRequest:
            self._chunked_bytes += len(data)
            if self._chunked_bytes > MAX_BODY:
                self._refuse(413, b"Content Too Large", "request body too large")
                return
        super().rawDataReceived(data)

    def allContentReceived(self):
        self._cancel_deadline()
        self._chunked_bytes = None
        super().allContentReceived()

    def requestDone(self, request):
        # Before the base class, which may go straight on with a pipelined
        # request (or close, after a last answer that must still be read).
        self._start_deadline()
        super().requestDone(request)

    def connectionLost(self, reason):
        self._cancel_deadline()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        if self._holds_place:
            self._holds_place = False
            self.site.connections.leave()
        super().connectionLost(reason)

    # -- the deadline ----------------------------------------------------------

    def _start_deadline(self, new_request=True):
        self._cancel_deadline()
        if new_request:
            self.request_bytes = 0
        self._deadline = self.callLater(self.site.request_timeout, self._deadline_passed)

    def _cancel_deadline(self):
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _deadline_passed(self):
        self._deadline = None
        if self.request_bytes and self.persistent:
            self._refuse(408, b"Request Timeout", "request not received in time")
        else:
            log.debug("{what} {peer}: idle for {timeout}s, closing", what=self.site.what,
                      peer=_peer(self.transport), timeout=self.site.request_timeout)
            self._close()

    def _refuse(self, status, reason, text):
        log.info("{what} {peer}: {text}, answering {status} and closing", what=self.site.what,
                 peer=_peer(self.transport), text=text, status=status)
        self.transport.write(_plain_response(status, reason, text))
        self._close()

    def _close(self):
        self._closed_by_us = True
        self._cancel_deadline()
        self.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.callLater(ABORT_GRACE, self.transport.abortConnection)


class _Busy(Protocol):
    """A connection beyond the site's cap: 503, closed."""

    _RESPONSE = _plain_response(503, b"Service Unavailable", "too many connections")

    def __init__(self, clock):
        self._clock = clock
        self._abort_call = None

    def connectionMade(self):
        self.transport.write(self._RESPONSE)
        self.transport.loseConnection()
        self._abort_call = self._clock.callLater(ABORT_GRACE, self.transport.abortConnection)

    def connectionLost(self, reason):
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()


class OperatorSite(server.Site):
    """
    A C{Site} for operators: request deadlines, a connection cap, an
    optional Basic login and no access log (see the module docstring).

    @ivar tree: the pages, without the login.
    @ivar what: the listener's name in logs (C{"status page"}, C{"metrics"}).
    @ivar request_timeout: seconds a request head (then its body) may take;
        may be changed while running.
    @ivar connections: the L{ConnectionCap} on open connections; its
        C{limit} may be changed while running.
    @ivar checker: the L{SingleUserChecker} of the login.
    """

    protocol = DeadlineChannel
    requestFactory = _OperatorRequest
    noisy = False

    def __init__(self, tree, reactor, what, realm, request_timeout=DEFAULT_REQUEST_TIMEOUT,
                 max_connections=0, username="", password=""):
        """
        @param tree: the resource tree to serve.
        @param reactor: for every timer (a C{Clock} in tests).
        @param realm: the realm of the Basic challenge.
        @param max_connections: the cap on open connections; 0 = none.
        @param username: the login; empty = none (see L{set_login}).
        @param password: its password.
        """
        super().__init__(tree, reactor=reactor)
        self.tree = tree
        self.what = what
        self.request_timeout = request_timeout
        self.connections = ConnectionCap(max_connections, "%s (open connections)" % (what,),
                                         self.reactor)
        self.checker = SingleUserChecker(username, password)
        portal = Portal(_TreeRealm(tree), [self.checker])
        self._guarded = _Guard(portal, [_SourcedBasicCredentials(realm)], self.checker)
        self.set_login(username, password)

    def use_logins(self, logins):
        """
        Check logins with the gateway's L{anyproxy.auth.Logins} (its
        password checker and login throttle) from now on.
        """
        self.checker.logins = logins

    def set_login(self, username, password):
        """
        Ask for this login from the next request on; an empty username serves
        the pages to anybody.
        """
        self.checker.set_credentials(username, password)
        self.resource = self._guarded if username else self.tree

    # Pages a capability URL opens without the login: name -> (resource,
    # check(request) -> bool).  A browser cannot answer a Basic challenge
    # for a proxy auto-config file, so /proxy.pac takes a token instead.
    capabilities = None

    def add_capability(self, name, page, check):
        """
        Serve C{page} at C{/name} to a request that C{check(request)}
        accepts (a token in its query), without the login; any other
        request for it goes through the login as usual.
        """
        if self.capabilities is None:
            self.capabilities = {}
        self.capabilities[name] = (page, check)

    def getResourceFor(self, request):
        if self.capabilities and len(request.postpath) == 1:
            entry = self.capabilities.get(request.postpath[0])
            if entry is not None and entry[1](request):
                request.site = self
                request.sitepath = request.prepath[:]
                request.prepath.append(request.postpath.pop(0))
                return entry[0]
        if self.resource is self.tree and not local_host_header(request.getHeader(b"host")):
            request.site = self
            return _Misdirected()
        return super().getResourceFor(request)

    def buildProtocol(self, addr):
        if not self.connections.enter():
            return _Busy(self.reactor)
        channel = super().buildProtocol(addr)
        channel._holds_place = True
        return channel

    def log(self, request):
        pass


def self_contained_page(package):
    """
    An operator page of C{package}'s data files: C{page.html} with
    C{page.css} and C{page.js} (after the shared
    C{anyproxy/operator_page/common.js}) put inline, one document with no external
    script, style, font or image, and the Content-Security-Policy that
    allows exactly that script and that style (by hash) and fetches to the
    same origin.

    @return: C{(page bytes, Content-Security-Policy header value)}.
    """
    here = resources.files(package)
    style = here.joinpath("page.css").read_text(encoding="utf-8")
    # The helpers every page uses (strict mode for the whole script), then its own.
    script = (resources.files("anyproxy.operator_page").joinpath("common.js")
              .read_text(encoding="utf-8") + here.joinpath("page.js").read_text(encoding="utf-8"))
    page = (here.joinpath("page.html").read_text(encoding="utf-8")
            .replace("/* page.css */", style).replace("/* page.js */", script).encode("utf-8"))
    policy = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
              "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
              % (_source_hash(script), _source_hash(style))).encode("ascii")
    return page, policy


def _source_hash(text):
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-%s'" % (base64.b64encode(digest).decode("ascii"),)


# Every answer of an operator page: never cached, never sniffed, never framed.
OPERATOR_HEADERS = {
    b"cache-control": b"no-store",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
}


def set_operator_headers(request, content_type):
    """Set C{content_type} and L{OPERATOR_HEADERS} on C{request}."""
    request.setHeader(b"content-type", content_type)
    for name, value in OPERATOR_HEADERS.items():
        request.setHeader(name, value)


class PageResource(resource.Resource):
    """C{GET}: a L{self_contained_page}, with its Content-Security-Policy."""

    isLeaf = True

    def __init__(self, page, policy):
        super().__init__()
        self._page = page
        self._policy = policy

    def render_GET(self, request):
        set_operator_headers(request, b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", self._policy)
        return self._page


class JSONSnapshot(resource.Resource):
    """C{GET}: what C{snapshot()} returns, as JSON."""

    isLeaf = True

    def __init__(self, snapshot):
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request):
        set_operator_headers(request, b"application/json; charset=utf-8")
        return json.dumps(self.snapshot(), sort_keys=True).encode("utf-8")
