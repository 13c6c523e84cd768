# -*- test-case-name: tests.test_http_proxy -*-
"""
Pure helpers of the HTTP proxy: request targets, credentials and headers.

Nothing here does I/O: each function takes L{anyproxy.frontends.http.connection}
events or bytes and returns
values, so the rules a proxy must get right (RFC 9110 section 7.6.1 on
hop-by-hop headers, RFC 9112 section 3.2 on request targets) can be read and
tested in one place.
"""

import base64
import binascii
import ipaddress
import re
from http import HTTPStatus

import attr

from anyproxy.addresses import bracketed
from anyproxy.frontends.http.connection import InformationalResponse, Request, Response

# The largest request head we accept.  Past it we answer 431, so a slowloris
# user costs at most about this much memory.
MAX_HEAD_SIZE = 16 * 1024

# Origin servers legitimately send larger heads (long Set-Cookie lists).
MAX_RESPONSE_HEAD_SIZE = 64 * 1024

# Headers that describe one connection, not the message (RFC 9110 7.6.1),
# plus the framing headers we recompute ourselves on each side.
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ]
)

_HOST_NAME = re.compile(rb"[A-Za-z0-9._~-]{1,253}")
_PORT = re.compile(rb"[0-9]{1,5}")


class BadTarget(ValueError):
    """A request target the proxy cannot serve; the message is shown to the user."""


@attr.s(frozen=True, slots=True)
class ForwardTarget:
    """
    Where an absolute-URI request goes.

    @ivar host: a host name or IP address, IPv6 without brackets.
    @ivar port: the TCP port.
    @ivar path: the origin-form target (path and query), never empty.
    @ivar path_was_empty: C{True} for C{http://host} with no path at all,
        which an C{OPTIONS} request forwards as C{*} (RFC 9112 3.2.4).
    """

    host = attr.ib(type=str)
    port = attr.ib(type=int)
    path = attr.ib(type=bytes, default=b"/")
    path_was_empty = attr.ib(type=bool, default=False)

    @property
    def authority(self):
        """The C{Host} header value: the URI's authority."""
        return format_authority(self.host, self.port, default_port=80)

    def origin_form(self, method):
        """The request target to send to the origin server."""
        if method == b"OPTIONS" and self.path_was_empty:
            return b"*"
        return self.path

    def for_log(self):
        """The target without its query string, which may carry secrets."""
        path = self.path.partition(b"?")[0].decode("ascii", "replace")
        return "http://%s%s" % (self.authority.decode("ascii"), path)


def format_authority(host, port, default_port=None):
    """
    C{host:port} as bytes, with brackets around IPv6 and without a default port.
    """
    name = bracketed(host)
    if port == default_port:
        return name.encode("ascii")
    return ("%s:%d" % (name, port)).encode("ascii")


def parse_authority(authority, default_port=None):
    """
    Parse C{host:port}, C{[v6]:port} or (with a default port) a bare host.

    @param authority: bytes from a request target.
    @param default_port: the port when none is given; C{None} means a port is
        required (CONNECT).
    @return: C{(host, port)}, host a C{str} (IPv6 without brackets).
    @raise BadTarget: the authority is malformed.
    """
    if b"@" in authority:
        # userinfo in a proxy target is a credential leak waiting to happen.
        raise BadTarget("credentials in the request target are not supported")
    if authority.startswith(b"["):
        literal, bracket, rest = authority[1:].partition(b"]")
        if not bracket:
            raise BadTarget("unterminated IPv6 address")
        try:
            host = str(ipaddress.IPv6Address(literal.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            raise BadTarget("bad IPv6 address") from None
    else:
        name, colon, port_text = authority.partition(b":")
        if not _HOST_NAME.fullmatch(name):
            raise BadTarget("bad host name")
        host = name.decode("ascii")
        rest = colon + port_text
    if rest in (b"", b":"):
        if default_port is None:
            raise BadTarget("a port is required")
        return host, default_port
    if not rest.startswith(b":") or not _PORT.fullmatch(rest[1:]):
        raise BadTarget("bad port")
    port = int(rest[1:])
    if not 1 <= port <= 65535:
        raise BadTarget("bad port")
    return host, port


def parse_absolute_uri(target):
    """
    Parse the absolute-form target of a proxied request.

    @param target: the request target bytes, e.g. C{http://example.com/x?y}.
    @return: a L{ForwardTarget}.
    @raise BadTarget: origin-form, a scheme other than http, or a bad authority.
    """
    scheme, separator, rest = target.partition(b"://")
    if not separator:
        if target.startswith(b"/"):
            raise BadTarget("this is a proxy: send an absolute URI (http://host/path)")
        raise BadTarget("not an absolute URI")
    scheme = scheme.lower()
    if scheme == b"https":
        raise BadTarget("https goes through CONNECT, not an absolute https URI")
    if scheme != b"http":
        raise BadTarget("only http URIs are proxied")
    end = len(rest)
    for delimiter in b"/?#":
        index = rest.find(bytes([delimiter]))
        if index >= 0:
            end = min(end, index)
    authority, path = rest[:end], rest[end:].partition(b"#")[0]
    host, port = parse_authority(authority, default_port=80)
    path_was_empty = not path
    if not path.startswith(b"/"):
        path = b"/" + path
    return ForwardTarget(host=host, port=port, path=path, path_was_empty=path_was_empty)


def parse_basic_credentials(headers):
    """
    The C{(username, password)} bytes of a C{Proxy-Authorization: Basic} header.

    @param headers: C{(lower-case name, value)} pairs.
    @return: the pair, or C{None} when the header is missing, repeated, of
        another scheme or malformed.
    """
    values = [value for name, value in headers if name == b"proxy-authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return username, password


def end_to_end_headers(headers, drop=()):
    """
    The headers a proxy may forward, in their original spelling and order.

    Removes L{HOP_BY_HOP} headers, every header named in C{Connection}, every
    C{Proxy-*} header and the lower-case names in C{drop}.

    @param headers: received L{anyproxy.frontends.http.connection.Headers}.
    @return: a list of C{(name, value)} pairs.
    """
    return _forwardable(headers, drop)[0]


def _forwardable(headers, drop=(), chunked_drops_length=False):
    """
    L{end_to_end_headers}, and the framing the message had.

    @param chunked_drops_length: also drop C{Content-Length} when the
        message is chunked.
    @return: C{(kept headers, chunked, [Content-Length values])}.
    """
    listed = set()
    chunked = False
    lengths = []
    for lower, value in headers:
        if lower == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
        elif lower == b"transfer-encoding":
            chunked = True
        elif lower == b"content-length":
            lengths.append(value)
    if chunked and chunked_drops_length:
        # Transfer-Encoding beats Content-Length; a stale one must not survive.
        drop = tuple(drop) + (b"content-length",)
    kept = []
    for name, (lower, value) in zip(headers.raw_names, headers):
        if lower in HOP_BY_HOP or lower in listed or lower in drop:
            continue
        if lower.startswith(b"proxy-"):
            continue
        kept.append((name, value))
    return kept, chunked, lengths


def binds_connection(headers, name):
    """
    Whether C{headers} (lower-case names) carry NTLM or Negotiate in header C{name}
    (C{authorization} or C{www-authenticate}): schemes that authenticate the
    connection rather than the request (RFC 4559), so it cannot be shared.
    """
    for header, value in headers:
        if header == name:
            scheme = value.split(None, 1)[0].lower() if value.strip() else b""
            if scheme in (b"ntlm", b"negotiate"):
                return True
    return False


def upstream_request(request, target, keep_alive=True):
    """
    The request to send to the origin: origin-form, correct C{Host}, no hop-by-hop
    headers and the user's body framing.

    @param request: the user's L{Request}.
    @param target: its L{ForwardTarget}.
    @param keep_alive: C{False} adds C{Connection: close}, for a connection
        that will not be reused.
    @return: a L{Request}.
    """
    kept, chunked, lengths = _forwardable(request.headers, (b"host", b"content-length"))
    headers = [(b"Host", target.authority)]
    headers += kept
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    else:
        for value in lengths:
            headers.append((b"Content-Length", value))
    if not keep_alive:
        headers.append((b"Connection", b"close"))
    return Request(request.method, target.origin_form(request.method), headers)


def user_response(response):
    """
    The origin's response as relayed to the user, minus hop-by-hop headers.

    Framing is left to the user's connection: a known C{Content-Length} is
    kept, anything else (chunked or close-delimited) is framed anew there.
    """
    kept = _forwardable(response.headers, chunked_drops_length=True)[0]
    if response.status_code == 204:
        # RFC 9110 8.6: no Content-Length on a 204 (it has no body).
        kept = [(name, value) for name, value in kept if name.lower() != b"content-length"]
    return Response(response.status_code, response.reason, kept)


def user_informational(response):
    """A 1xx response from the origin as relayed to the user."""
    return InformationalResponse(
        response.status_code, response.reason, end_to_end_headers(response.headers))


def reason_phrase(status):
    """The standard reason phrase for C{status}, as bytes."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def error_response(status, text, headers=(), close=False):
    """
    A short text/plain answer from the proxy itself.

    @return: C{(Response, body bytes)}.
    """
    body = text.encode("utf-8") + b"\n"
    all_headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % (len(body),)),
    ]
    all_headers.extend(headers)
    if close:
        all_headers.append((b"Connection", b"close"))
    response = Response(status, reason_phrase(status), all_headers)
    return response, body
