# -*- test-case-name: tests.test_egress -*-
"""
Dialing the gateway through an egress proxy (C{client.egress_proxy}, or the
standard C{HTTPS_PROXY} / C{NO_PROXY} environment when the key is absent),
for private networks that let traffic out only through one.

  - C{http://[user:password@]host:port}: an HTTP proxy, asked with
    C{CONNECT gateway:port} (Basic credentials in C{Proxy-Authorization}).
  - C{socks5://[user:password@]host:port} (or C{socks5h://}): a SOCKS5
    proxy (RFC 1928, username/password per RFC 1929).  The gateway's name
    is sent as a name either way: the proxy resolves it, since a network
    that forces a proxy often has no outside DNS of its own.

The proxy only carries bytes: TLS to the gateway runs end to end inside the
tunnel it opens and is verified exactly as without a proxy.

The handshakes are sans-I/O (L{HttpConnectHandshake},
L{Socks5Handshake}: bytes in, bytes out, a result or an
L{EgressProxyError}); L{EgressProxyEndpoint} runs one over a TCP
connection and then hands the connection to the protocol it was asked to
connect (in practice Twisted's TLS protocol, from C{wrapClientTLS}).
Errors say which hop failed: the proxy could not be reached, or it refused
(with its status), as opposed to the gateway refusing later.  A proxy's
credentials are never part of a log line or an error: L{ProxyURL} prints
without them.
"""

import base64
import ipaddress
import os
import re
import struct
import urllib.parse

import attr
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from anyproxy.addresses import host_port

MAX_RESPONSE_HEAD = 16 * 1024  # an HTTP proxy's answer to CONNECT, headers included
# An interim answer (1xx but 101, which would end HTTP on the connection).
_INTERIM = re.compile(rb"HTTP/1\.[0-9] 1(?!01)[0-9][0-9](?:[ \r])")
SCHEMES = ("http", "socks5", "socks5h")
DEFAULT_PORTS = {"http": 3128, "socks5": 1080, "socks5h": 1080}


class EgressProxyError(ConnectionError):
    """The egress proxy could not be reached, or refused to open the way to the gateway."""


@attr.s(frozen=True, slots=True)
class ProxyURL:
    """
    A parsed egress proxy address.  C{str()} never shows the credentials.
    """

    scheme = attr.ib()
    host = attr.ib()
    port = attr.ib()
    username = attr.ib(default="", repr=False)
    password = attr.ib(default="", repr=False)

    @classmethod
    def parse(cls, text):
        """
        C{scheme://[user:password@]host[:port]}; raise L{ValueError} with a
        reason that does not repeat the credentials.
        """
        try:
            parts = urllib.parse.urlsplit(text.strip())
            port = parts.port
        except ValueError:
            raise ValueError("not a proxy URL such as 'http://proxy.example:3128'") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError("unsupported scheme %r (use http:// for CONNECT, or socks5://)"
                             % (scheme or "",))
        if not parts.hostname:
            raise ValueError("no host in the proxy URL")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a proxy URL has no path, query or fragment")
        username = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        if scheme.startswith("socks5") and (len(username.encode()) > 255
                                            or len(password.encode()) > 255):
            raise ValueError("SOCKS5 credentials are at most 255 bytes each")
        if port == 0:
            raise ValueError("port 0 in the proxy URL")
        return cls(scheme, parts.hostname, DEFAULT_PORTS[scheme] if port is None else port,
                   username, password)

    def __str__(self):
        return "%s://%s" % (self.scheme, host_port(self.host, self.port))


# Where the environment names the proxy, first found first (curl's order:
# lower case before upper case); an empty value counts as unset, as in Go.
_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
_NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")


def proxy_from_environment(host, environ=None, port=None):
    """
    The L{ProxyURL} the standard environment gives for dialing C{host}
    (port C{port}) over TLS (C{https_proxy}/C{HTTPS_PROXY}, then
    C{all_proxy}/C{ALL_PROXY}; a value without a scheme is C{http://}, as
    curl takes it), or C{None} when there is none or C{NO_PROXY} exempts
    C{host} (L{no_proxy_matches}).

    @raise ValueError: the variable holds something that is not a proxy URL.
    """
    environ = os.environ if environ is None else environ
    text = next((environ[name].strip() for name in _PROXY_VARIABLES
                 if environ.get(name, "").strip()), None)
    if text is None:
        return None
    no_proxy = next((environ[name] for name in _NO_PROXY_VARIABLES
                     if environ.get(name, "").strip()), "")
    if no_proxy and no_proxy_matches(host, port, no_proxy):
        return None
    if "://" not in text:
        text = "http://" + text
    return ProxyURL.parse(text)


def no_proxy_matches(host, port, no_proxy):
    """
    Whether C{NO_PROXY} exempts C{host} (port C{port}, or C{None}): a
    comma- or space-separated list whose entries are C{*} (everything), a
    domain (C{example.com}, C{.example.com} or C{*.example.com}: it and
    its subdomains), an IP address or a CIDR network (C{10.0.0.0/8},
    C{fd00::/8}), each with an optional C{:port} (only that port; IPv6 in
    brackets).  Case and a trailing dot do not matter.  As curl and Go read
    it, but for the port, which curl ignores.
    """
    name = host.strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    for entry in no_proxy.replace(",", " ").split():
        entry = entry.lower()
        if entry == "*":
            return True
        entry_port = None
        if entry.startswith("["):
            entry, _, rest = entry[1:].partition("]")
            if rest.startswith(":") and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:
            entry, _, text = entry.partition(":")
            if not text.isdigit():
                continue
            entry_port = int(text)
        if entry_port is not None and port is not None and entry_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        domain = entry[2:] if entry.startswith("*.") else entry.lstrip(".")
        domain = domain.rstrip(".")
        if domain and (name == domain or name.endswith("." + domain)):
            return True
    return False


class HttpConnectHandshake:
    """
    The client side of C{CONNECT host:port} (RFC 9110 9.3.6), without I/O.

    L{request} is what to send; feed the proxy's answer to L{receive} until
    it returns the bytes that followed the answer's head (the tunnel's
    first bytes, usually none).  A non-2xx status or a malformed answer
    raises L{EgressProxyError}.
    """

    def __init__(self, proxy, host, port):
        self.proxy = proxy
        self.target = host_port(host, port)
        self._buffer = b""
        self._read = 0  # bytes received so far, interim answers included

    def request(self):
        lines = ["CONNECT %s HTTP/1.1" % (self.target,), "Host: %s" % (self.target,),
                 "User-Agent: anyproxy-client"]
        if self.proxy.username or self.proxy.password:
            token = base64.b64encode(("%s:%s" % (self.proxy.username, self.proxy.password))
                                     .encode("utf-8")).decode("ascii")
            lines.append("Proxy-Authorization: Basic " + token)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def receive(self, data):
        """C{None} until the answer's head is complete; then the bytes after it."""
        self._buffer += data
        self._read += len(data)
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                # Interim answers count too: the bound is on all the heads together.
                if self._read > MAX_RESPONSE_HEAD:
                    raise EgressProxyError("egress proxy %s: answer to CONNECT longer than %d "
                                           "bytes" % (self.proxy, MAX_RESPONSE_HEAD))
                return None
            if not _INTERIM.match(self._buffer):
                break
            # "HTTP/1.1 100 Continue" and the like come before the answer
            # (RFC 9110, 15.2): skipped.
            self._buffer = self._buffer[end + 4:]
        if self._read - len(self._buffer) + end > MAX_RESPONSE_HEAD:
            raise EgressProxyError("egress proxy %s: answer to CONNECT longer than %d "
                                   "bytes" % (self.proxy, MAX_RESPONSE_HEAD))
        head, rest = self._buffer[:end], self._buffer[end + 4:]
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, status_reason = status_line.partition(" ")
        status, _, reason = status_reason.partition(" ")
        if not version.startswith("HTTP/1.") or not (len(status) == 3 and status.isdigit()):
            raise EgressProxyError("egress proxy %s: not an HTTP answer to CONNECT: %r"
                                   % (self.proxy, status_line[:80]))
        if not status.startswith("2"):
            hint = ""
            if status == "407":
                hint = (" (check the credentials in client.egress_proxy)"
                        if self.proxy.username else " (it wants credentials: "
                        "http://user:password@host:port)")
            raise EgressProxyError("egress proxy %s refused CONNECT %s: %s %s%s" % (
                self.proxy, self.target, status, reason.strip()[:100], hint))
        return rest


SOCKS5_REPLIES = {
    0x01: "general failure", 0x02: "not allowed by its rules", 0x03: "network unreachable",
    0x04: "host unreachable", 0x05: "connection refused", 0x06: "TTL expired",
    0x07: "command not supported", 0x08: "address type not supported",
}


class Socks5Handshake:
    """
    The client side of a SOCKS5 CONNECT (RFC 1928, RFC 1929), without I/O.

    L{first} is what to send first; L{receive} takes the proxy's bytes and
    returns C{(to_send, done, rest)}: bytes to send next, whether the
    tunnel is open, and the bytes after the proxy's last reply.
    """

    def __init__(self, proxy, host, port):
        self.proxy = proxy
        self.host, self.port = host, port
        self._buffer = b""
        self._state = "method"

    def first(self):
        methods = b"\x00\x02" if (self.proxy.username or self.proxy.password) else b"\x00"
        return b"\x05" + bytes([len(methods)]) + methods

    def _connect_request(self):
        try:
            address = ipaddress.ip_address(self.host.strip("[]"))
            kind = b"\x01" if address.version == 4 else b"\x04"
            packed = kind + address.packed
        except ValueError:
            try:
                name = self.host.encode("idna")
            except UnicodeError:
                raise EgressProxyError("gateway name %r is not a valid DNS name" % (self.host,))
            if len(name) > 255:
                raise EgressProxyError("gateway name too long for SOCKS5")
            packed = b"\x03" + bytes([len(name)]) + name
        return b"\x05\x01\x00" + packed + struct.pack(">H", self.port)

    def _fail(self, what):
        raise EgressProxyError("egress proxy %s (SOCKS5) %s" % (self.proxy, what))

    def receive(self, data):
        self._buffer += data
        out = b""
        while True:
            buffer = self._buffer
            if self._state == "method":
                if len(buffer) < 2:
                    return out, False, b""
                if buffer[0] != 5:
                    self._fail("answered with something that is not SOCKS5")
                method, self._buffer = buffer[1], buffer[2:]
                if method == 0x00:
                    out += self._connect_request()
                    self._state = "reply"
                elif method == 0x02 and (self.proxy.username or self.proxy.password):
                    user = self.proxy.username.encode("utf-8")
                    password = self.proxy.password.encode("utf-8")
                    out += b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password
                    self._state = "auth"
                elif method == 0x02:
                    self._fail("wants a username and password: socks5://user:password@host:port")
                else:
                    self._fail("accepts none of our login methods")
            elif self._state == "auth":
                if len(buffer) < 2:
                    return out, False, b""
                status, self._buffer = buffer[1], buffer[2:]
                if status != 0:
                    self._fail("refused the username and password")
                out += self._connect_request()
                self._state = "reply"
            else:
                if len(buffer) < 5:
                    return out, False, b""
                if buffer[0] != 5:
                    self._fail("answered with something that is not SOCKS5")
                if buffer[1] != 0:
                    self._fail("could not connect to %s: %s" % (
                        host_port(self.host, self.port),
                        SOCKS5_REPLIES.get(buffer[1], "error 0x%02x" % (buffer[1],))))
                kind = buffer[3]
                length = {1: 4, 4: 16, 3: 1 + buffer[4]}.get(kind)
                if length is None:
                    self._fail("answered with an unknown address type")
                end = 4 + length + 2
                if len(buffer) < end:
                    return out, False, b""
                return out, True, buffer[end:]


class _HandshakeProtocol(protocol.Protocol):
    """
    Runs a handshake on the connection to the proxy, then becomes a
    transparent carrier for the protocol the endpoint was asked to connect.
    """

    def __init__(self, handshake, wrapped_factory, connected):
        self._handshake = handshake
        self._wrapped_factory = wrapped_factory
        self._connected = connected
        self.wrapped = None

    def connectionMade(self):
        if isinstance(self._handshake, HttpConnectHandshake):
            self.transport.write(self._handshake.request())
        else:
            self.transport.write(self._handshake.first())

    def dataReceived(self, data):
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        try:
            if isinstance(self._handshake, HttpConnectHandshake):
                rest = self._handshake.receive(data)
                to_send, done = b"", rest is not None
            else:
                to_send, done, rest = self._handshake.receive(data)
        except EgressProxyError as e:
            self._fail(e)
            return
        if to_send:
            self.transport.write(to_send)
        if done:
            self._start_wrapped(rest)

    def _start_wrapped(self, rest):
        wrapped = self._wrapped_factory.buildProtocol(self.transport.getPeer())
        if wrapped is None:
            self._fail(EgressProxyError("no protocol for the tunnel"))
            return
        self.wrapped = wrapped
        wrapped.makeConnection(self.transport)
        connected, self._connected = self._connected, None
        connected.callback(wrapped)
        if rest:
            wrapped.dataReceived(rest)

    def _fail(self, error):
        connected, self._connected = self._connected, None
        self.transport.abortConnection()
        if connected is not None:
            connected.errback(error)

    def cancel(self):
        """The handshake's Deferred was cancelled: drop the connection, answer nothing."""
        if self.wrapped is None:
            self._connected = None
            self.transport.abortConnection()

    def connectionLost(self, reason):
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        elif self._connected is not None:
            connected, self._connected = self._connected, None
            connected.errback(EgressProxyError(
                "egress proxy %s closed the connection during its handshake"
                % (self._handshake.proxy,)))


@implementer(IStreamClientEndpoint)
class EgressProxyEndpoint:
    """
    Connect to C{host:port} through the egress proxy C{proxy} (a
    L{ProxyURL}).  Wrap it with C{wrapClientTLS} for TLS to C{host}.

    @param timeout: seconds for the proxy's TCP connection, and again for
        its handshake.
    """

    def __init__(self, reactor, proxy, host, port, timeout=30.0):
        self._reactor = reactor
        self.proxy = proxy
        self.host, self.port = host, port
        self._timeout = timeout

    def connect(self, protocol_factory):
        if self.proxy.scheme == "http":
            handshake = HttpConnectHandshake(self.proxy, self.host, self.port)
        else:
            handshake = Socks5Handshake(self.proxy, self.host, self.port)
        carriers = []

        def cancel(_):
            # Given up on (a tunnel stopped while it connects): the proxy's
            # connection goes too, and nothing is built on it if the proxy
            # answers later.
            for carrier in carriers:
                carrier.cancel()

        connected = defer.Deferred(cancel)

        def carrier():
            built = _HandshakeProtocol(handshake, protocol_factory, connected)
            carriers.append(built)
            return built

        factory = protocol.Factory.forProtocol(carrier)
        endpoint = HostnameEndpoint(self._reactor, self.proxy.host, self.proxy.port,
                                    timeout=self._timeout)

        def unreachable(failure):
            raise EgressProxyError("could not reach egress proxy %s: %s"
                                   % (self.proxy, failure.getErrorMessage()))

        def handshaking(carrier):
            timer = self._reactor.callLater(self._timeout, carrier._fail, EgressProxyError(
                "egress proxy %s did not open the way to %s within %g s"
                % (self.proxy, host_port(self.host, self.port), self._timeout)))

            def done(result):
                if timer.active():
                    timer.cancel()
                return result

            return connected.addBoth(done)

        return endpoint.connect(factory).addCallbacks(handshaking, unreachable)
