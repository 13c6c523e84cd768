# -*- test-case-name: tests.test_access_policy -*-
"""
Access control for the client: which targets a tunnel stream may reach.

Sans-I/O: this module never resolves names or touches the network.  The
client asks twice per stream:

  1. L{AccessPolicy.check_name} before DNS, with the host and port the user
     asked for, so a forbidden name (or a forbidden literal IP) is refused
     without ever being looked up;
  2. L{AccessPolicy.check_resolved} after DNS, with every address the name
     resolved to.  The client must then connect only to one of the addresses
     it passed in, never resolve again (no DNS-rebinding bypass).

Rules are parsed once into L{ipaddress} networks and lower-cased names;
matching is a short loop over the rules with no per-byte work.  IPv4-mapped
IPv6 addresses (C{::ffff:10.0.0.1}) are folded into IPv4 on both sides, so
they cannot slip past an IPv4 rule (a mapped address IS an IPv4 address: an
IPv6 rule such as C{::/0} does not cover it, while C{::ffff:10.0.0.0/104} is
stored as C{10.0.0.0/8}), and a trailing dot in a name
(C{internal.example.com.}) is treated as absent.
"""

import functools
import ipaddress
import re

import attr

from anyproxy.config.schema import setting
from anyproxy.errors import Reason

TCP = "tcp"
UDP = "udp"
BOTH = "both"
PROTOCOLS = (TCP, UDP)

_NAME = "name"
_WILDCARD = "wildcard"
_NETWORK = "network"

# One DNS label, after IDNA encoding; underscores appear in real names.
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_MAX_NAME = 253


def normalise_name(name):
    """
    The canonical form of a host name for matching: lower case, IDNA
    (punycode) for non-ASCII, no trailing dot, no IPv6 brackets.
    """
    name = name.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    name = name.rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return name


def normalise_address(address):
    """
    An L{ipaddress} address for C{address} (a string or an address object),
    with IPv4-mapped IPv6 folded into IPv4 and any IPv6 zone dropped.

    @raise ValueError: C{address} is not an IP address.
    """
    if isinstance(address, str):
        parsed = _parse_literal(address)
        if parsed is None:
            raise ValueError("%r is not an IP address" % (address,))
        return parsed
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        address = ipaddress.IPv6Address(address.packed)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


# Every UDP datagram names its destination as text, and checking it parses
# that text three times: remember recent answers (addresses are immutable).
@functools.lru_cache(maxsize=1024)
def _parse_literal(text):
    """The normalised address C{text} stands for, or C{None} for a name."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    return normalise_address(address)


def _literal_address(host):
    """The normalised address if C{host} is an IP literal, else C{None}."""
    try:
        return normalise_address(host)
    except ValueError:
        return None


def _normalise_network(network):
    if network.version == 6 and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network(
            (network.network_address.ipv4_mapped, network.prefixlen - 96)
        )
    return network


def _is_ascii_digits(text):
    return text.isascii() and text.isdigit()


def _parse_port(text, whole):
    if not _is_ascii_digits(text) or not 1 <= int(text) <= 65535:
        raise ValueError("bad port %r in host rule %r (want 1-65535)" % (text, whole))
    return int(text)


def _split_port(text):
    """Split C{text} into (host part, port or None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' in host rule %r" % (text,))
        host, rest = text[1:end], text[end + 1:]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError("unexpected %r after ']' in host rule %r" % (rest, text))
        return host, _parse_port(rest[1:], text)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, _parse_port(port, text)
    # No colon, or a bare IPv6 address / network (several colons, no port).
    return text, None


def _parse_legacy_prefix(host, whole):
    """C{192.168.1.} -> 192.168.1.0/24; C{10.} -> 10.0.0.0/8."""
    octets = host[:-1].split(".")
    if not 1 <= len(octets) <= 4 or not all(
        _is_ascii_digits(o) and len(o) <= 3 and int(o) <= 255 for o in octets
    ):
        raise ValueError("bad address prefix in host rule %r" % (whole,))
    padded = octets + ["0"] * (4 - len(octets))
    return ipaddress.IPv4Network("%s/%d" % (".".join(padded), 8 * len(octets)))


def _check_name(name, whole):
    if not name or len(name) > _MAX_NAME:
        raise ValueError("bad host name in host rule %r" % (whole,))
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError("bad host name in host rule %r" % (whole,))
    if labels[-1].isdigit():
        raise ValueError(
            "%r is neither an IP address nor a host name (for an address "
            "prefix, end it with a dot: '%s.')" % (whole, name)
        )


@attr.s(frozen=True, slots=True, repr=False)
class HostRule:
    """
    One host rule: a name, a C{*.domain} wildcard or an IP network, with an
    optional port.  Build with L{HostRule.parse}.

    @ivar kind: C{"name"}, C{"wildcard"} or C{"network"}.
    @ivar value: the lower-cased name, the wildcard's domain (without the
        C{*.}), or an L{ipaddress.IPv4Network}/L{ipaddress.IPv6Network}.
    @ivar port: the port this rule is limited to, or C{None} for any port.
    @ivar text: the rule as written, for messages.
    """

    kind = attr.ib()
    value = attr.ib()
    port = attr.ib(default=None)
    text = attr.ib(default="", eq=False)

    @classmethod
    def parse(cls, text):
        """
        Parse a host rule.

        @param text: C{internal.example.com}, C{*.example.com}, C{10.0.0.1},
            C{fd00::/8}, C{169.254.0.0/16}, C{192.168.1.}, each optionally
            followed by C{:port} (IPv6 with a port: C{[::1]:22}).
        @return: a L{HostRule}.
        @raise ValueError: C{text} is not a valid rule; the message says why.
        """
        if not isinstance(text, str):
            raise ValueError("host rule must be a string, not %s" % (type(text).__name__,))
        whole = text.strip()
        if not whole:
            raise ValueError("empty host rule")
        host, port = _split_port(whole)
        if not host:
            raise ValueError("missing host in host rule %r" % (whole,))
        if "/" in host:
            try:
                network = ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError("bad CIDR network in host rule %r" % (whole,)) from None
            return cls(_NETWORK, _normalise_network(network), port, whole)
        address = _literal_address(host)
        if address is not None:
            return cls(_NETWORK, ipaddress.ip_network(address), port, whole)
        if host.endswith(".") and _is_ascii_digits(host[:-1].replace(".", "")):
            return cls(_NETWORK, _parse_legacy_prefix(host, whole), port, whole)
        if host.startswith("*."):
            domain = normalise_name(host[2:])
            _check_name(domain, whole)
            return cls(_WILDCARD, domain, port, whole)
        name = normalise_name(host)
        _check_name(name, whole)
        return cls(_NAME, name, port, whole)

    def matches_name(self, name, port):
        """
        Whether a normalised host name (see L{normalise_name}) and port match
        a name or wildcard rule.  Network rules never match a name.
        """
        if self.port is not None and self.port != port:
            return False
        if self.kind == _NAME:
            return name == self.value
        if self.kind == _WILDCARD:
            return name.endswith(self.value) and name[-len(self.value) - 1 : -len(self.value)] == "."
        return False

    def matches_address(self, address, port):
        """
        Whether a normalised address (see L{normalise_address}) and port
        match a network rule.  Name rules never match an address.
        """
        if self.port is not None and self.port != port:
            return False
        return (
            self.kind == _NETWORK
            and address.version == self.value.version
            and address in self.value
        )

    def __repr__(self):
        return "HostRule.parse(%r)" % (self.text,)


def _check_protocol(protocol):
    if protocol not in PROTOCOLS:
        raise ValueError("protocol must be 'tcp' or 'udp', not %r" % (protocol,))


@attr.s(frozen=True, slots=True)
class LimitRule:
    """
    One allow-list entry: a host rule and the protocols it admits.

    @ivar name: the operator's label for the entry (for logs only).
    @ivar rule: a L{HostRule}.
    @ivar protocol: C{"tcp"}, C{"udp"} or C{"both"}.

    Also the schema of a C{client.limit} entry (L{anyproxy.config.schema}).
    """

    name = setting()
    rule = setting(key="addr")
    protocol = setting(BOTH)

    @classmethod
    def parse(cls, addr, protocol=None, name=""):
        """
        Build an entry from config values.

        @param addr: host rule text, see L{HostRule.parse}.
        @param protocol: C{"tcp"}, C{"udp"}, C{"both"} or C{None}/C{""}
            (both).  Case-insensitive.
        @raise ValueError: bad C{addr} or C{protocol}.
        """
        if protocol is None or protocol == "":
            protocol = BOTH
        if not isinstance(protocol, str) or protocol.lower() not in (TCP, UDP, BOTH):
            raise ValueError("protocol must be 'tcp', 'udp' or 'both', not %r" % (protocol,))
        return cls(name or "", HostRule.parse(addr), protocol.lower())

    def admits(self, protocol):
        """Whether this entry admits C{protocol} (C{"tcp"} or C{"udp"})."""
        return self.protocol == BOTH or self.protocol == protocol


@attr.s(frozen=True, slots=True)
class AccessPolicy:
    """
    The client's access control: forbidden hosts, an optional allow-list,
    and whether UDP is allowed at all.

    @ivar forbidden: tuple of L{HostRule}; a match refuses the request.
    @ivar allowed: tuple of L{LimitRule}; empty means everything not
        forbidden is allowed.
    @ivar allow_udp: C{False} refuses every UDP request.
    """

    forbidden = attr.ib(default=(), converter=tuple)
    allowed = attr.ib(default=(), converter=tuple)
    allow_udp = attr.ib(default=True)

    def check_name(self, host, port, protocol):
        """
        Check a request before DNS.

        @param host: the host name or literal IP the user asked for.
        @param port: the port (int).
        @param protocol: C{"tcp"} or C{"udp"}.
        @return: C{None} when the request may go on to DNS, else
            L{Reason.PROTOCOL_NOT_ALLOWED} (UDP while C{allow_udp} is off) or
            L{Reason.NOT_ALLOWED} (a forbidden rule matches).
        """
        _check_protocol(protocol)
        if protocol == UDP and not self.allow_udp:
            return Reason.PROTOCOL_NOT_ALLOWED
        address = _literal_address(host)
        if address is not None:
            if any(rule.matches_address(address, port) for rule in self.forbidden):
                return Reason.NOT_ALLOWED
            return None
        name = normalise_name(host)
        if any(rule.matches_name(name, port) for rule in self.forbidden):
            return Reason.NOT_ALLOWED
        return None

    def check_resolved(self, host, port, protocol, addresses):
        """
        Check a request after DNS.  Includes every check of L{check_name}.

        The request is refused if the name or ANY address matches a forbidden
        rule.  With a non-empty allow-list, an entry admitting C{protocol}
        and C{port} must match the asked name (or literal IP) itself, or
        every resolved address must match such an entry.

        @param addresses: the addresses C{host} resolved to (strings or
            L{ipaddress} objects).  The caller must connect only to these.
        @return: C{None} when allowed, else a L{Reason}.
        """
        refusal = self.check_name(host, port, protocol)
        if refusal is not None:
            return refusal
        resolved = []
        for address in addresses:
            try:
                resolved.append(normalise_address(address))
            except ValueError:
                return Reason.NOT_ALLOWED
        for address in resolved:
            if any(rule.matches_address(address, port) for rule in self.forbidden):
                return Reason.NOT_ALLOWED
        if not self.allowed:
            return None
        entries = [entry for entry in self.allowed if entry.admits(protocol)]
        if _admitted(entries, host, port, resolved):
            return None
        # Say "protocol not allowed" when only the protocol stood in the way.
        others = [entry for entry in self.allowed if not entry.admits(protocol)]
        if others and _admitted(others, host, port, resolved):
            return Reason.PROTOCOL_NOT_ALLOWED
        return Reason.NOT_ALLOWED


def _admitted(entries, host, port, resolved):
    """Whether C{entries} admit the asked host itself or every address."""
    if not entries:
        return False
    literal = _literal_address(host)
    if literal is not None:
        if any(entry.rule.matches_address(literal, port) for entry in entries):
            return True
    else:
        name = normalise_name(host)
        if any(entry.rule.matches_name(name, port) for entry in entries):
            return True
    return bool(resolved) and all(
        any(entry.rule.matches_address(address, port) for entry in entries)
        for address in resolved
    )
