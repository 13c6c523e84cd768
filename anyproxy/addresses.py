# -*- test-case-name: tests.test_config -*-
"""
Addresses as the config writes them: listen addresses (C{host:port},
C{:port} or a Twisted endpoint string) and dial addresses, checked and
turned into what Twisted takes.  Pure functions; errors are C{ValueError}.
"""

import ipaddress

# Endpoint string types a listen address may use as it is.
ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")
# Before a listen address: connections start with a PROXY protocol header
# (anyproxy.proxy_header, which cannot be imported here: this module is pure).
PROXY_HEADER_PREFIX = "haproxy:"


def bracketed(host):
    """C{host} as it goes before C{:port}: an IPv6 literal in brackets."""
    host = str(host)
    return "[%s]" % (host,) if ":" in host else host


def host_port(host, port):
    """C{host:port} as text, with brackets around an IPv6 literal."""
    return "%s:%s" % (bracketed(host), port)


def address_text(address):
    """A Twisted address (C{IPv4Address}, C{IPv6Address}...) as C{host:port}, else its text."""
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return host_port(host, getattr(address, "port", "?"))


def split_endpoint(text):
    """Split a Twisted endpoint string on unescaped colons."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _check_port(text, low=0):
    if not (isinstance(text, str) and text.isascii() and text.isdigit()) or not low <= int(text) <= 65535:
        raise ValueError("bad port %r (want %d-65535)" % (text, low))
    return int(text)


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_endpoint(text):
    """Validate a Twisted endpoint string; return whether it is local-only."""
    kind, *args = split_endpoint(text)
    positional = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    if kind == "unix":
        if not ((positional and positional[0]) or options.get("address")):
            raise ValueError("unix endpoint needs a socket path")
        return True
    if kind == "systemd":
        return False
    _check_port(positional[0] if positional else options.get("port", ""))
    if kind == "ssl" and not options.get("privateKey"):
        raise ValueError("ssl endpoint needs privateKey=")
    return _is_loopback(options.get("interface", ""))


def listen_endpoint(text):
    """
    Convert a C{listen_addr} to C{(endpoint string, local-only)}.

    C{host:port} -> C{tcp:port:interface=host}, C{[::1]:port} ->
    C{tcp6:port:interface=\\:\\:1}, C{:port} and C{[::]:port} ->
    C{dualstack:port} (IPv6 and IPv4 on every interface, as Go's C{:port};
    see L{anyproxy.dual_stack}), and a string starting with a known
    endpoint type passes through unchanged (C{tcp:port} is IPv4 only).

    C{haproxy:} before any of these reads a PROXY protocol header first on
    each connection (L{anyproxy.proxy_header}): its users come through a
    balancer, so it is never local-only.

    @raise ValueError: with the reason.
    """
    if text.startswith(PROXY_HEADER_PREFIX):
        inner, _ = listen_endpoint(text[len(PROXY_HEADER_PREFIX):])
        if inner.startswith(PROXY_HEADER_PREFIX):
            raise ValueError("haproxy: given twice")
        if inner.startswith("ssl:"):
            # The header comes before TLS, and this endpoint's TLS would read it.
            raise ValueError("haproxy: cannot go before an ssl: endpoint")
        return PROXY_HEADER_PREFIX + inner, False
    kind = text.split(":", 1)[0]
    if kind in ENDPOINT_TYPES and ":" in text:
        return text, _check_endpoint(text)
    host, port = _split_host_port(
        text, "host:port, :port or an endpoint string such as tcp:1080:interface=127.0.0.1",
        " (IPv6 goes in brackets)")
    port = _check_port(port)
    if not host:
        return "dualstack:%d" % (port,), False
    try:
        address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        raise ValueError("%r is not an IP address or localhost (endpoint types: %s)"
                         % (host, ", ".join(ENDPOINT_TYPES))) from None
    if address.version == 6 and address.is_unspecified:
        return "dualstack:%d" % (port,), False
    if address.version == 6:
        return "tcp6:%d:interface=%s" % (port, str(address).replace(":", "\\:")), address.is_loopback
    return "tcp:%d:interface=%s" % (port, address), address.is_loopback


def _split_host_port(text, expected, hint=""):
    """C{host:port} or C{[v6]:port} -> C{(host, port text)}."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [IPv6]:port, got %r" % (text,))
        return host, port
    if text.count(":") == 1:
        return tuple(text.split(":"))
    raise ValueError("expected %s, got %r%s" % (expected, text, hint))


def dial_address(text):
    """C{host:port} or C{[v6]:port} -> C{(host, port)}; raise ValueError."""
    host, port = _split_host_port(text, "host:port")
    if not host or any(c.isspace() or c in "/@" for c in host):
        raise ValueError("bad host in %r" % (text,))
    return host, _check_port(port, low=1)


def port_range(value):
    """C{9001}, C{"9001"} or C{"9000-9100"} -> C{(low, high)}."""
    text = str(value).strip() if not isinstance(value, bool) else ""
    low, _, high = text.partition("-")
    low = _check_port(low.strip(), low=1)
    high = _check_port(high.strip(), low=1) if high else low
    if high < low:
        raise ValueError("empty port range %r" % (text,))
    return low, high
