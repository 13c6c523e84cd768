# -*- test-case-name: tests.test_client_status -*-
"""
The client's recent access-control refusals, for its status page: a bounded
ring (the newest L{MAX_REFUSALS}), each with the rule that refused it.

The policy (L{anyproxy.access_policy.AccessPolicy}) answers only allowed or
a reason, which is all the data path needs; which rule refused is worked out
here, after the fact and only for refusals, by L{refusing_rule} against the
same policy and the same addresses the dialer checked (no new lookup).
"""

import collections

from anyproxy.access_policy import is_unspecified, normalise_address, normalise_name

# Refusals kept: enough to see a pattern, bounded whatever the traffic.
MAX_REFUSALS = 100


def _as_address(text):
    try:
        return normalise_address(text)
    except ValueError:
        return None


def refusing_rule(policy, host, port, protocol, addresses=()):
    """
    Which rule of C{policy} refuses C{protocol} to C{host:port}, as a line
    naming the config key and the rule as written, e.g.
    C{"forbidden_hosts: 192.168.1. (matches 192.168.1.5)"}.

    @param addresses: the addresses C{host} resolved to, if it was resolved.
    """
    if protocol == "udp" and not policy.allow_udp:
        return "allow_udp: false"
    literal = _as_address(host)
    name = None if literal is not None else normalise_name(host)
    for address in ([literal] if literal is not None else []) + list(
            filter(None, map(_as_address, addresses))):
        if is_unspecified(address):
            return "unspecified address %s: never a target (it would reach this host)" % (address,)
    for rule in policy.forbidden:
        if (rule.matches_address(literal, port) if literal is not None
                else rule.matches_name(name, port)):
            return "forbidden_hosts: %s" % (rule.text,)
    for address in filter(None, map(_as_address, addresses)):
        for rule in policy.forbidden:
            if rule.matches_address(address, port):
                return "forbidden_hosts: %s (matches %s, which %s resolves to)" % (
                    rule.text, address, host)

    def admits(rules):
        if literal is not None:
            if any(rule.matches_address(literal, port) for rule in rules):
                return True
        elif any(rule.matches_name(name, port) for rule in rules):
            return True
        resolved = list(filter(None, map(_as_address, addresses)))
        return bool(resolved) and all(any(rule.matches_address(address, port) for rule in rules)
                                      for address in resolved)

    if policy.allowed_hosts and not admits(policy.allowed_hosts):
        return "allowed_hosts: no entry admits it"
    if policy.allowed:
        entries = [entry for entry in policy.allowed if entry.admits(protocol)]
        if not admits([entry.rule for entry in entries]):
            others = [entry for entry in policy.allowed if not entry.admits(protocol)]
            matching = [entry for entry in others if admits([entry.rule])]
            if matching:
                entry = matching[0]
                return "limit: %s admits only %s" % (entry.name or entry.rule.text,
                                                     entry.protocol)
            return "limit: no entry admits it"
    return "access control"


class RefusalLog:
    """
    The newest L{MAX_REFUSALS} refusals, oldest first: C{(when, protocol,
    host, port, rule)} dicts for the status page.
    """

    def __init__(self, clock, size=MAX_REFUSALS):
        self._clock = clock
        self._entries = collections.deque(maxlen=size)
        self.total = 0

    def record(self, policy, host, port, protocol, addresses=()):
        """Note one refusal by C{policy} (the one in force when it refused)."""
        self.total += 1
        self._entries.append({
            "when": self._clock.seconds(), "protocol": protocol, "host": host, "port": port,
            "rule": refusing_rule(policy, host, port, protocol, addresses)})

    def entries(self):
        """The kept refusals, oldest first (a copy)."""
        return list(self._entries)
