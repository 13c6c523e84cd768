# -*- test-case-name: tests.test_fleet_forwarding -*-
"""
Forwarded ports decided fleet-wide (C{gateway.fleet}): L{FleetPortClaims}
asks the fleet registry (L{anyproxy.fleet.interfaces.IFleetRegistry.claim_port})
before a gateway listens on a port a client asked for, so that one port
number belongs to one client across every gateway of the fleet.

Theory of operation
-------------------
The registry holds one claim per port B{number} (C{anyproxy:port:PORT},
value C{NODE/OWNER}, refreshed by the node's heartbeat and gone with its
expiry).  The owner is the client, the pair C{(group, client_id)}, as a
forwarded port's owner on one gateway is (L{anyproxy.gateway.port_forwarding.forwarder}).
A gateway may forward both C{tcp} and C{udp} of a number it holds for that
client; L{FleetPortClaims} counts them and gives the number back once
neither is forwarded.

At most one claim per number is in flight on a gateway: a second request
for it (the other protocol, another tunnel of the client) waits for the
same answer.  Each answer is one of L{Granted}, L{Held} (another client, or
this client on another gateway, holds it) or L{Unavailable} (the registry
cannot be reached or did not answer within L{CLAIM_TIMEOUT}: no claim can
be decided, so nothing is opened; the forwarder asks again every
L{FleetPortClaims.retry_interval} seconds).
"""

import json

import attr
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

# Seconds a claim may take before it counts as unanswered: Redis answers in
# a millisecond; a hung one must not leave the port undecided for ever.
CLAIM_TIMEOUT = 5.0


@attr.s(frozen=True, slots=True)
class Granted:
    """This gateway holds the port number for the client now."""


@attr.s(frozen=True, slots=True)
class Held:
    """
    Someone else holds the port number.

    @ivar node_id: the gateway that holds it (this one, for a local
        holder), or C{None} if it let go while we asked.
    @ivar owner: C{(group, client_id)} of its client, or C{None}.
    """

    node_id = attr.ib()
    owner = attr.ib()


@attr.s(frozen=True, slots=True)
class Unavailable:
    """No claim could be decided: the registry is unreachable (C{why})."""

    why = attr.ib()


# The longest claim owner text read from Redis: far above three names (group,
# client id, credential), quoted.
MAX_TOKEN = 64 * 1024


def owner_token(owner):
    """
    The claim's owner text for C{(group, client_id, credential)}: JSON, so
    any names round-trip.
    """
    return json.dumps(list(owner), separators=(",", ":"))


def owner_from_token(token):
    """C{(group, client_id, credential)} from L{owner_token}'s text, or C{None} if it is not one."""
    if not isinstance(token, (str, bytes)) or len(token) > MAX_TOKEN:
        return None
    try:
        owner = json.loads(token)
    except (ValueError, RecursionError):
        # RecursionError: "[[[[..." nested past Python's recursion limit.
        return None
    if (not isinstance(owner, list) or len(owner) not in (2, 3)
            or not all(isinstance(name, str) for name in owner)):
        return None
    # A node of an older version names (group, client_id) only.
    return tuple(owner) if len(owner) == 3 else (owner[0], owner[1], "")


class FleetPortClaims:
    """
    The port numbers this gateway holds fleet-wide, through the registry.

    @param registry: the L{anyproxy.fleet.interfaces.IFleetRegistry}.
    @param clock: an C{IReactorTime} (claim deadlines).
    @param retry_interval: seconds between the forwarder's new attempts for
        tunnels refused for a fleet reason (normally the heartbeat: a
        killed holder's claim expires within three).
    @ivar on_lost: C{on_lost(port, owner)}, set by the forwarder: a number we
        held was found claimed by another node (Redis lost its data meanwhile).
    """

    def __init__(self, registry, clock, retry_interval=2.0, timeout=CLAIM_TIMEOUT):
        self.registry = registry
        self._clock = clock
        self.retry_interval = retry_interval
        self._timeout = timeout
        self._held = {}  # number -> (owner, {protocol, ...})
        self._pending = {}  # number -> (owner, [Deferred, ...])
        self.on_lost = None

    @property
    def node_id(self):
        return self.registry.node_id

    def held(self):
        """C{{number: owner}} of the numbers held now (a snapshot)."""
        return {number: owner for number, (owner, _) in self._held.items()}

    def acquire(self, number, protocol, owner):
        """
        Hold C{number} for C{owner} to forward C{protocol} on it.

        @return: a Deferred firing with L{Granted}, L{Held} or L{Unavailable};
            it never fails.  After L{Granted}, L{release} the same
            C{(number, protocol)} when it is no longer forwarded.
        """
        held = self._held.get(number)
        if held is not None:
            if held[0] != owner:
                return defer.succeed(Held(self.node_id, held[0]))
            held[1].add(protocol)
            return defer.succeed(Granted())
        pending = self._pending.get(number)
        if pending is not None:
            if pending[0] != owner:
                return defer.succeed(Held(self.node_id, pending[0]))
            answer = defer.Deferred()
            pending[1].append((protocol, answer))
            return answer
        answer = defer.Deferred()
        self._pending[number] = (owner, [(protocol, answer)])
        token = owner_token(owner)
        claiming = defer.maybeDeferred(self.registry.claim_port, number, token)
        claiming.addTimeout(self._timeout, self._clock)
        claiming.addCallbacks(self._claimed, self._not_claimed,
                              callbackArgs=(number, owner), errbackArgs=(number, owner))
        claiming.addErrback(lambda failure: log.failure(
            "port forwarding: deciding the claim of port {port} failed", failure, port=number))
        return answer

    def _claimed(self, ours, number, owner):
        if not ours:
            return self._holder(number).addCallback(lambda held: self._answer(number, held))
        _, waiters = self._pending.get(number, (owner, []))
        self._held[number] = (owner, {protocol for protocol, _ in waiters})
        self._answer(number, Granted())

    def _holder(self, number):
        """L{Held} naming the holder of C{number}, as the registry says."""
        finding = defer.maybeDeferred(self.registry.port_holder, number)
        finding.addTimeout(self._timeout, self._clock)

        def found(holder):
            if holder is None:
                return Held(None, None)
            node_id, token = holder
            return Held(node_id, owner_from_token(token))

        return finding.addCallbacks(found, lambda _: Held(None, None))

    def _not_claimed(self, failure, number, owner):
        why = failure.getErrorMessage()
        if failure.check(defer.TimeoutError, defer.CancelledError):
            why = "no answer within %g s" % (self._timeout,)
        # A claim that timed out may still land: give it back, unless the
        # number is held (it cannot be: none was while this one was pending).
        self.registry.release_port(number, owner_token(owner))
        self._answer(number, Unavailable(why))

    def _answer(self, number, outcome):
        _, waiters = self._pending.pop(number, (None, []))
        for _, answer in waiters:
            answer.callback(outcome)

    def release(self, number, protocol, owner):
        """
        C{protocol} on C{number} is no longer forwarded for C{owner}: once
        neither protocol is, the registry's claim is deleted.
        """
        held = self._held.get(number)
        if held is None or held[0] != owner:
            return
        held[1].discard(protocol)
        if not held[1]:
            del self._held[number]
            released = defer.maybeDeferred(self.registry.release_port, number,
                                           owner_token(owner))
            released.addErrback(lambda failure: log.info(
                "port forwarding: port {port} not released ({why}); its claim expires",
                port=number, why=failure.getErrorMessage()))

    def release_all(self):
        """Give back every number held (the gateway is stopping)."""
        for number, (owner, protocols) in list(self._held.items()):
            for protocol in list(protocols):
                self.release(number, protocol, owner)

    def port_lost(self, number, token):
        """
        The registry found C{number}, which we held, claimed by another node
        (Redis lost its data and another gateway claimed it meanwhile): forget
        it and tell the forwarder (L{on_lost}), which stops forwarding it.
        """
        owner = owner_from_token(token)
        held = self._held.get(number)
        if held is None or held[0] != owner:
            return
        del self._held[number]
        if self.on_lost is not None:
            self.on_lost(number, owner)
