# -*- test-case-name: tests.test_routes -*-
"""
Routes: what a client can reach (C{client.routes}, announced in its HELLO)
and what the gateway's browser profiles send through the proxy: networks
(CIDRs), exact names and C{*.domain} patterns (the domain and every name
under it).  L{Routes} reads them; the tunnel's HELLO, the config, the
gateway's routing (L{anyproxy.gateway.routing}) and its profiles
(L{anyproxy.gateway.pac}) all share this one reading.  Plain values, no
Twisted.
"""

import ipaddress

import attr


@attr.s(frozen=True, slots=True)
class Routes:
    """Name patterns and networks, deduplicated and in a stable order."""

    suffixes = attr.ib(default=())  # "corp.example" for "*.corp.example"
    names = attr.ib(default=())  # exact names
    networks = attr.ib(default=())  # ipaddress networks

    @classmethod
    def of(cls, patterns):
        """
        From route texts (C{"*.corp.example"}, C{"db.lan"}, C{"10.1.0.0/16"},
        C{"fd00::/8"}); raise L{ValueError} naming a bad one.
        """
        suffixes, names, networks = set(), set(), set()
        for pattern in patterns:
            text = pattern.strip().lower().rstrip(".")
            if not text:
                raise ValueError("empty route")
            if "%" in text:
                # An IPv6 zone means nothing to another host, and its text
                # (any characters) would go into the PAC and Clash profiles.
                raise ValueError("%r: a route has no IPv6 zone (%%...)" % (pattern,))
            try:
                networks.add(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            if text.startswith("*."):
                text = text[2:]
                target = suffixes
            else:
                target = names
            if not text or not all(label and len(label) < 64 and
                                   all(c.isalnum() or c in "-_" for c in label)
                                   for label in text.split(".")):
                raise ValueError("%r is not a CIDR, a name or a *.domain pattern" % (pattern,))
            target.add(text)
        return cls(tuple(sorted(suffixes)), tuple(sorted(names)),
                   tuple(sorted(networks, key=lambda n: (n.version, n))))

    def __add__(self, other):
        return Routes.of([*("*." + s for s in self.suffixes + other.suffixes),
                          *self.names, *other.names,
                          *(str(n) for n in self.networks + other.networks)])

    def empty(self):
        return not (self.suffixes or self.names or self.networks)


def route_texts(routes):
    """
    The canonical texts of a L{Routes}, as the config keeps them and the
    HELLO and the status page carry them: C{*.domain} patterns, exact names,
    then networks.
    """
    return tuple(["*." + suffix for suffix in routes.suffixes] + list(routes.names)
                 + [str(network) for network in routes.networks])
