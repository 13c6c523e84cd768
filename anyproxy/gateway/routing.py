# -*- test-case-name: tests.test_routes -*-
"""
Routing by destination inside a group (C{client.routes}, docs/ROUTES.md):
which of a group's clients can reach a stream's target, and how
specifically.

Each client announces its routes in its HELLO: networks (CIDRs), exact
names and C{*.domain} patterns (the domain and every name under it), as
L{anyproxy.routes.Routes} reads them.  For a new stream the gateway's
tunnel pool asks each tunnel's L{RouteMatcher} how specifically it matches
the target (L{RouteMatcher.specificity}) and keeps the most specific:

  - an IP literal is matched against the networks only: the longest prefix
    wins;
  - a name is matched by name only (the gateway never resolves): an exact
    name beats every pattern, and among patterns the longest suffix wins;
  - a client without routes serves anything, as the least specific match
    of all (L{UNROUTED}): it gets the streams no routed client matches, and
    loses to any client whose routes match.

Sans-I/O: plain values in and out, no Twisted.
"""

import ipaddress

import attr


# Specificities compare as tuples, higher first: (kind, length).  A client
# without routes matches anything, below every route (kind 0); a network
# or a name pattern is kind 1 with its prefix length or suffix length; an
# exact name is kind 2, above every pattern.
UNROUTED = (0, 0)
_PATTERN = 1
_EXACT = 2


@attr.s(frozen=True, slots=True)
class Target:
    """
    A stream's target host, read once per choice: a lower-case name without
    a trailing dot, or an IP address (C{name} is then C{None}).
    """

    name = attr.ib()
    address = attr.ib()

    @classmethod
    def of(cls, host):
        """The L{Target} for C{host} (a name, an IPv4 or IPv6 literal, brackets allowed)."""
        text = host.strip().lower()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return cls(text.rstrip("."), None)
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # as the client's access control reads it
        return cls(None, address)


class RouteMatcher:
    """
    The routes of one client, arranged for matching: sets for names and
    suffixes (a name is looked up once per label, whatever the number of
    routes), networks by IP version.
    """

    __slots__ = ("routes", "_names", "_suffixes", "_networks")

    def __init__(self, routes):
        """
        @param routes: a non-empty L{anyproxy.routes.Routes}.
        """
        self.routes = routes
        self._names = frozenset(routes.names)
        self._suffixes = frozenset(routes.suffixes)
        self._networks = {4: [], 6: []}
        for network in routes.networks:
            self._networks[network.version].append(network)

    def specificity(self, target):
        """
        How specifically these routes match C{target} (a L{Target}): a tuple
        that compares higher the more specific the match, or C{None} when no
        route matches.
        """
        if target.address is not None:
            address = target.address
            best = None
            for network in self._networks[address.version]:
                if address in network and (best is None or network.prefixlen > best):
                    best = network.prefixlen
            return None if best is None else (_PATTERN, best)
        name = target.name
        if name in self._names:
            return (_EXACT, len(name))
        if self._suffixes:
            # The longest suffix first: the name itself, then without its
            # first label, and so on ("*.corp.example" covers corp.example).
            suffix = name
            while suffix:
                if suffix in self._suffixes:
                    return (_PATTERN, len(suffix))
                _, _, suffix = suffix.partition(".")
        return None


def matcher_for(routes):
    """A L{RouteMatcher} for C{routes}, or C{None} for none (the client serves anything)."""
    if routes is None or routes.empty():
        return None
    return RouteMatcher(routes)


def most_specific(tunnels, target, avoid=None):
    """
    The tunnels of C{tunnels} (not draining, and not of client C{avoid})
    whose routes match C{target} most specifically, in their order; a
    tunnel without routes matches as L{UNROUTED}.  Empty when none matches.

    @param tunnels: records with C{route_matcher}, C{draining} and C{client_id}.
    @param target: a L{Target}.
    @param avoid: a client id to leave out, or C{None}.
    """
    best, best_rank = [], None
    for each in tunnels:
        if each.draining or (avoid is not None and each.client_id == avoid):
            continue
        matcher = each.route_matcher
        rank = UNROUTED if matcher is None else matcher.specificity(target)
        if rank is None:
            continue
        if best_rank is None or rank > best_rank:
            best, best_rank = [each], rank
        elif rank == best_rank:
            best.append(each)
    return best


__all__ = ["UNROUTED", "RouteMatcher", "Target", "matcher_for", "most_specific"]
