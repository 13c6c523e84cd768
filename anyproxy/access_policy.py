# -*- test-case-name: tests.test_access_policy -*-
r"""
Access control for the client: which targets a tunnel stream may reach.

Sans-I/O: this module never resolves names or touches the network.  The
client asks twice per stream:

  1. L{AccessPolicy.check_name} before DNS, with the host and port the user
     asked for, so a forbidden name (or a forbidden literal IP) is refused
     without ever being looked up;
  2. L{AccessPolicy.check_resolved} after DNS, with every address the name
     resolved to.  The client must then connect only to one of the addresses
     it passed in, never resolve again (no DNS-rebinding bypass).

Rules are parsed once into L{ipaddress} networks, lower-cased names and
compiled patterns; matching is a short loop over the rules.  IPv4-mapped
IPv6 addresses (C{::ffff:10.0.0.1}) are folded into IPv4 on both sides, so
they cannot slip past an IPv4 rule (a mapped address IS an IPv4 address: an
IPv6 rule such as C{::/0} does not cover it, while C{::ffff:10.0.0.0/104} is
stored as C{10.0.0.0/8}), and a trailing dot in a name
(C{internal.example.com.}) is treated as absent.

The rule forms (L{HostRule.parse}), used by C{forbidden_hosts},
C{allowed_hosts} and C{limit}, are the Go AnyProxy's:

  - C{name}, C{*.domain} (subdomains only), an IP, a CIDR, a prefix such as
    C{192.168.1.}, each with an optional C{:port} or C{:*} (any port; IPv6
    in brackets: C{[::1]:22});
  - C{*} as the host: any host (C{*:25}, C{*:*}, C{*});
  - a glob: C{*} anywhere else in a host name (C{api-*.example.com}), any
    run of characters, dots included.  A glob of digits, dots and C{*} only
    (C{10.0.*}) is an address pattern: it matches addresses, never a name
    (else the name C{10.0.1.evil.example} would pass it);
  - a regular expression: a rule holding any of C{\ ^ $ ( ) { } + ? | [ ]}
    (brackets other than around an IPv6 address), or starting with C{.} and
    holding a C{*} (C{.*\.example\.com}).  None of those characters can be
    in a host name, IP or CIDR, so a name is never read as a regex.  It is
    anchored: it must match the whole host, or the whole C{host:port}
    (C{[v6]:port}).  It is compiled once, case-insensitive; patterns whose
    backtracking could take long are refused (L{_check_backtracking}), and
    names longer than 253 characters are refused before any rule sees them,
    so every match runs on at most 260 characters.

Every form is checked on the asked name (or literal IP) and on every
address the name resolves to (a glob or regex sees an address as its text).
So a regex in an allow-list that admits a name admits whatever that name
resolves to: write one meant for addresses to match digits only
(C{10\.0\.\d+\.\d+}).

An unspecified address (C{0.0.0.0/8}, C{::}, also as C{::ffff:0.0.0.0}) is
never a target, whatever the rules: it is no host's address, and Linux
connects it to the client's own host, past rules that forbid loopback.

An IP literal is a whole IPv4 or IPv6 address (in brackets or not; an IPv6
zone such as C{%eth0} allowed), and nothing else: a host with spaces, or a
zone on IPv4, is a name, and the client refuses to resolve it (it is not a
valid host name), so what is checked is exactly what is dialed.
"""

import functools
import ipaddress
import re
import warnings
from re import _parser as _sre  # the regex parser, to bound backtracking

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
_ANY = "any"  # "*" as the host
_GLOB = "glob"  # "*" inside a host name
_ADDRESS_GLOB = "address glob"  # "*" in digits and dots only: addresses, never names
_REGEX = "regex"

# "This network" (RFC 1122 3.2.1.3): no destination; Linux dials this host.
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
# One DNS label, after IDNA encoding; underscores appear in real names.
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_MAX_NAME = 253
# Characters that mark a regular expression: none can be in a host rule.
_REGEX_MARKS = frozenset("\\^$(){}+?|[]")
# "[fd00::1]", "[::1]:22", "[fd00::/8]:*", "[fe80::1%eth0]" (or a typo of
# them): brackets around something with a colon, not a character class.
_BRACKETED = re.compile(r"\[[0-9A-Za-z.%/*]*:[0-9A-Za-z:.%/*]*(\][^][\\^$(){}+?|]*)?")
_MAX_GLOB_STARS = 3
_ADDRESS_GLOB_CHARACTERS = frozenset("0123456789.*")
# The longest text a glob or regex is matched against: a name of 253
# characters and ":65535".
_MAX_SUBJECT = _MAX_NAME + 6


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


def ends_in_number(name):
    """
    Whether host name C{name} ends in a number: its last label (a final dot
    aside) is all ASCII digits or C{0x} and hex digits, as the WHATWG URL
    standard tells IPv4 hosts from names.  C{inet_aton}, and so the system
    resolver, reads such a name as an IPv4 address in a short form
    (C{127.1}, C{2130706433}, C{0x7f.1} are 127.0.0.1) without asking DNS:
    no host name has that shape, and rules written for addresses would
    not see the address it stands for.
    """
    last = name[:-1] if name.endswith(".") else name
    last = last.rpartition(".")[2]
    if not last.isascii():
        return False
    if last.isdigit():
        return True
    return last[:2].lower() == "0x" and all(c in "0123456789abcdefABCDEF" for c in last[2:])


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
    address = parse_ip_literal(text)
    return None if address is None else normalise_address(address)


def parse_ip_literal(text):
    """
    The L{ipaddress} address of an IP literal as a target names it (see the
    module docstring: brackets optional, an IPv6 zone kept), else C{None}.
    The one parser of literals, for the check and for the dial.
    """
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_unspecified(address):
    """Whether a normalised address is an unspecified one (never a target)."""
    return address.is_unspecified if address.version == 6 else address in _THIS_NETWORK


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
    """The port, or C{None} for C{*} (any port)."""
    if text == "*":
        return None
    if not _is_ascii_digits(text) or not 1 <= int(text) <= 65535:
        raise ValueError("bad port %r in host rule %r (want 1-65535 or *)" % (text, whole))
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


def _looks_like_regex(text):
    """
    Whether rule C{text} is a regular expression: it holds a character no
    host rule can hold, or starts with C{.} and holds a C{*} (C{.*}).
    """
    if text.startswith(".") and "*" in text:
        return True
    if _BRACKETED.fullmatch(text):
        return False  # "[::1]:22": an IPv6 address in brackets (checked as one)
    return any(c in _REGEX_MARKS for c in text)


class _Backtracking(ValueError):
    pass


# Repeats: x*, x+, x{m,n} (and possessive ones, which 3.11 parses apart).
_REPEATS = tuple(getattr(_sre, name) for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
                 if hasattr(_sre, name))
# The number of ways to match one subject a pattern may have: about three
# unbounded repeats ('.*') over _MAX_SUBJECT characters, milliseconds at worst.
_MAX_WAYS = _MAX_SUBJECT ** 3


def _ways(items):
    """
    An upper bound of the ways a backtracking matcher may try to match
    C{items} (a parsed pattern) against one subject: a repeat of up to n
    characters counts n, alternatives add up, a sequence multiplies.
    Capped just above L{_MAX_WAYS}.

    @raise _Backtracking: a construct whose ways grow exponentially (a
        repeat of something that itself can match in several ways), or one
        the Go original's RE2 syntax has not (lookaround, backreference).
    """
    total = 1
    for op, av in items:
        total = min(total * _item_ways(op, av), _MAX_WAYS + 1)
    return total


def _item_ways(op, av):
    if op in _REPEATS:
        low, high, body = av
        inner = _ways(body)
        if high <= 1:  # x?
            return 1 + inner
        if high == low:  # x{3}: a sequence of three
            return min(inner ** min(high, 64), _MAX_WAYS + 1)
        if inner > 1:
            raise _Backtracking(
                "a repeat of something that itself repeats or has alternatives, like "
                "'(a+)+' or '(a|b.)*', can take exponential time; rewrite it without the "
                "nesting, e.g. '.*\\.example\\.com' instead of '([a-z]+\\.)+example\\.com'")
        return min(high - low + 1, _MAX_SUBJECT)
    if op == _sre.BRANCH:
        return min(sum(_ways(branch) for branch in av[1]), _MAX_WAYS + 1)
    if op == _sre.SUBPATTERN:
        return _ways(av[-1])
    if op == getattr(_sre, "ATOMIC_GROUP", None):
        return _ways(av)
    if op in (_sre.ASSERT, _sre.ASSERT_NOT):
        raise _Backtracking("lookahead and lookbehind are not supported")
    if op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
        raise _Backtracking("backreferences are not supported")
    return 1


def _check_backtracking(text):
    """
    Refuse a regex that Python's backtracking matcher could take long on.

    Go's RE2 matches in linear time; Python's C{re} backtracks, and a
    proxy user chooses the names matched.  So besides matching at most
    L{_MAX_SUBJECT} characters, a pattern must have at most L{_MAX_WAYS}
    ways to match (about three '.*'), and no repeat of a repeat.
    """
    try:
        ways = _ways(_sre.parse(text, re.ASCII | re.IGNORECASE))
    except _Backtracking as e:
        raise ValueError("bad regex %r: %s" % (text, e)) from None
    if ways > _MAX_WAYS:
        raise ValueError(
            "bad regex %r: too many ways to match (at most three unbounded repeats such as "
            "'.*' or '[a-z]+' in a row, fewer with alternatives); simplify it" % (text,))


def _compile_regex(text):
    """The anchored regex of rule C{text}. @raise ValueError: bad or too costly."""
    try:
        with warnings.catch_warnings():
            # "[[" and the like: Python warns their meaning may change.
            warnings.simplefilter("error", FutureWarning)
            pattern = re.compile(text, re.ASCII | re.IGNORECASE)
    except (re.error, FutureWarning) as e:
        raise ValueError("bad regex %r: %s" % (text, e)) from None
    except (OverflowError, RecursionError):
        raise ValueError("bad regex %r: too large" % (text,)) from None
    _check_backtracking(text)
    return pattern


def _compile_glob(host, whole):
    """The pattern of a host glob such as C{api-*.example.com}."""
    if ":" in host:
        raise ValueError("'*' cannot stand in an IPv6 address in host rule %r; use a CIDR "
                         "network such as 'fd00::/16'" % (whole,))
    name = normalise_name(host)
    while "**" in name:
        name = name.replace("**", "*")
    if name.count("*") > _MAX_GLOB_STARS:
        raise ValueError("at most %d '*' in host rule %r" % (_MAX_GLOB_STARS, whole))
    # Each "*" stands for at least one name character.
    _check_name(name.replace("*", "x"), whole)
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in name),
                      re.ASCII | re.IGNORECASE)


def _pattern_matches(pattern, host, port, bracket=False):
    """Whether C{pattern} matches the whole C{host}, or the whole C{host:port}."""
    if len(host) > _MAX_SUBJECT:
        return False  # never reached: check_name refuses longer names
    if pattern.fullmatch(host):
        return True
    return pattern.fullmatch(("[%s]:%d" if bracket else "%s:%d") % (host, port)) is not None


@attr.s(frozen=True, slots=True, repr=False)
class HostRule:
    """
    One host rule: a name, a C{*.domain} wildcard, an IP network, any host,
    a host glob, with an optional port; or a regular expression.  Build with
    L{HostRule.parse}.

    @ivar kind: C{"name"}, C{"wildcard"}, C{"network"}, C{"any"},
        C{"glob"} or C{"regex"}.
    @ivar value: the lower-cased name, the wildcard's domain (without the
        C{*.}), an L{ipaddress.IPv4Network}/L{ipaddress.IPv6Network},
        C{None} (any), or the compiled pattern (glob, regex).
    @ivar port: the port this rule is limited to, or C{None} for any port
        (a regex says its port itself).
    @ivar text: the rule as written, for messages.
    """

    kind = attr.ib()
    value = attr.ib()
    port = attr.ib(default=None)
    text = attr.ib(default="", eq=False)

    @classmethod
    def parse(cls, text):
        r"""
        Parse a host rule.

        @param text: C{internal.example.com}, C{*.example.com}, C{10.0.0.1},
            C{fd00::/8}, C{169.254.0.0/16}, C{192.168.1.}, C{*} (any host),
            C{api-*.example.com} (a glob), each optionally followed by
            C{:port} or C{:*} (IPv6 with a port: C{[::1]:22}); or a regular
            expression (see the module's docstring), such as
            C{.*\.example\.com:(80|443)}.
        @return: a L{HostRule}.
        @raise ValueError: C{text} is not a valid rule; the message says why.
        """
        if not isinstance(text, str):
            raise ValueError("host rule must be a string, not %s" % (type(text).__name__,))
        whole = text.strip()
        if not whole:
            raise ValueError("empty host rule")
        if _looks_like_regex(whole):
            return cls(_REGEX, _compile_regex(whole), None, whole)
        host, port = _split_port(whole)
        if not host:
            raise ValueError("missing host in host rule %r" % (whole,))
        if host == "*":
            return cls(_ANY, None, port, whole)
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
        if host.startswith("*.") and "*" not in host[2:]:
            domain = normalise_name(host[2:])
            _check_name(domain, whole)
            return cls(_WILDCARD, domain, port, whole)
        if "*" in host:
            kind = _ADDRESS_GLOB if set(host) <= _ADDRESS_GLOB_CHARACTERS else _GLOB
            return cls(kind, _compile_glob(host, whole), port, whole)
        name = normalise_name(host)
        if name.startswith("."):
            raise ValueError("bad host name in host rule %r (for its subdomains write '*%s')"
                             % (whole, name))
        _check_name(name, whole)
        return cls(_NAME, name, port, whole)

    def matches_name(self, name, port):
        """
        Whether a normalised host name (see L{normalise_name}) and port match
        a name, wildcard, C{*}, glob or regex rule.  Network rules and
        address globs never match a name.
        """
        if self.port is not None and self.port != port:
            return False
        if self.kind == _NAME:
            return name == self.value
        if self.kind == _WILDCARD:
            return name.endswith(self.value) and name[-len(self.value) - 1 : -len(self.value)] == "."
        if self.kind == _ANY:
            return True
        if self.kind == _GLOB:
            return len(name) <= _MAX_SUBJECT and self.value.fullmatch(name) is not None
        if self.kind == _REGEX:
            return _pattern_matches(self.value, name, port)
        return False

    def matches_address(self, address, port):
        """
        Whether a normalised address (see L{normalise_address}) and port
        match a network rule, C{*}, or a glob or regex (on the address as
        text; a glob on IPv4 only).  Name rules never match an address.
        """
        if self.port is not None and self.port != port:
            return False
        if self.kind == _NETWORK:
            return address.version == self.value.version and address in self.value
        if self.kind == _ANY:
            return True
        if self.kind in (_GLOB, _ADDRESS_GLOB):
            return address.version == 4 and self.value.fullmatch(str(address)) is not None
        if self.kind == _REGEX:
            return _pattern_matches(self.value, str(address), port, bracket=address.version == 6)
        return False

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
    The client's access control: forbidden hosts, two optional allow-lists,
    and whether UDP is allowed at all.

    A request is refused when the asked name or any address it resolves to
    matches a forbidden rule.  Otherwise each allow-list that is not empty
    must admit it (both, when both are set): C{allowed_hosts} (the Go
    AnyProxy's newer key, for TCP and UDP alike) and C{limit} (its older
    one, whose entries name protocols).

    @ivar forbidden: tuple of L{HostRule}; a match refuses the request.
    @ivar allowed: tuple of L{LimitRule} (C{limit}); empty means no limit.
    @ivar allow_udp: C{False} refuses every UDP request.
    @ivar allowed_hosts: tuple of L{HostRule} (C{allowed_hosts}); empty
        means no limit.
    """

    forbidden = attr.ib(default=(), converter=tuple)
    allowed = attr.ib(default=(), converter=tuple)
    allow_udp = attr.ib(default=True)
    allowed_hosts = attr.ib(default=(), converter=tuple)

    def check_name(self, host, port, protocol):
        """
        Check a request before DNS.

        @param host: the host name or literal IP the user asked for.
        @param port: the port (int).
        @param protocol: C{"tcp"} or C{"udp"}.
        @return: C{None} when the request may go on to DNS, else
            L{Reason.PROTOCOL_NOT_ALLOWED} (UDP while C{allow_udp} is off) or
            L{Reason.NOT_ALLOWED} (a forbidden rule matches, the name is
            longer than a DNS name can be or ends in a number (L{ends_in_number}:
            an IPv4 address in a short form), or C{allowed_hosts} has only
            name rules and none matches: no address could be admitted).
        """
        _check_protocol(protocol)
        if protocol == UDP and not self.allow_udp:
            return Reason.PROTOCOL_NOT_ALLOWED
        address = _literal_address(host)
        if address is not None:
            if is_unspecified(address) or any(rule.matches_address(address, port)
                                              for rule in self.forbidden):
                return Reason.NOT_ALLOWED
            return None
        name = normalise_name(host)
        if len(name) > _MAX_NAME:
            return Reason.NOT_ALLOWED  # no DNS name is longer; bounds pattern matching
        if ends_in_number(name):
            # An IPv4 address in a short form ("127.1"): the resolver would
            # connect to it, and the address rules could not judge it.
            return Reason.NOT_ALLOWED
        if any(rule.matches_name(name, port) for rule in self.forbidden):
            return Reason.NOT_ALLOWED
        if (self.allowed_hosts
                and all(rule.kind in (_NAME, _WILDCARD) for rule in self.allowed_hosts)
                and not any(rule.matches_name(name, port) for rule in self.allowed_hosts)):
            return Reason.NOT_ALLOWED  # refused without a DNS query
        return None

    def check_resolved(self, host, port, protocol, addresses):
        """
        Check a request after DNS.  Includes every check of L{check_name}.

        The request is refused if the name or ANY address matches a forbidden
        rule.  With a non-empty C{allowed_hosts}, a rule of it must match the
        asked name (or literal IP) itself, or every resolved address must
        match one.  With a non-empty C{limit}, in the same way, an entry
        admitting C{protocol} and C{port} must.

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
            if is_unspecified(address) or any(rule.matches_address(address, port)
                                              for rule in self.forbidden):
                return Reason.NOT_ALLOWED
        if self.allowed_hosts and not _rules_admit(self.allowed_hosts, host, port, resolved):
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
    """Whether C{entries} (L{LimitRule}s) admit the asked host itself or every address."""
    return _rules_admit([entry.rule for entry in entries], host, port, resolved)


def _rules_admit(rules, host, port, resolved):
    """Whether C{rules} (L{HostRule}s) admit the asked host itself or every address."""
    if not rules:
        return False
    literal = _literal_address(host)
    if literal is not None:
        if any(rule.matches_address(literal, port) for rule in rules):
            return True
    else:
        name = normalise_name(host)
        if any(rule.matches_name(name, port) for rule in rules):
            return True
    return bool(resolved) and all(
        any(rule.matches_address(address, port) for rule in rules)
        for address in resolved
    )
