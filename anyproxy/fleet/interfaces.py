# -*- test-case-name: tests.test_fleet_registry -*-
"""
What the parts of a fleet know of each other: L{IFleetRegistry} and the
L{NodeRecord} each gateway publishes.
"""

import attr
from zope.interface import Attribute, Interface


@attr.s(frozen=True, slots=True)
class NodeRecord:
    """
    One gateway of the fleet as the registry holds it.

    @ivar node_id: the node's unique name (C{gateway.fleet.node_id}).
    @ivar peer_addr: C{host:port} where other gateways relay streams to it.
    @ivar tunnel_addr: C{host:port} clients are told to dial (the advertised
        tunnel address).
    @ivar groups: the client groups it holds at least one usable (not
        draining) tunnel of, sorted.
    @ivar streams: streams open through it (its load, for balancing).
    @ivar tunnels: client tunnels connected to it.
    @ivar draining: C{True} once it is leaving: it takes no relayed streams
        and clients should not attach to it.
    @ivar logins: C{{group: (verifier, ...)}}: the group logins its tunnels
        announced, as salted verifiers (never the password itself).
    """

    node_id = attr.ib()
    peer_addr = attr.ib()
    tunnel_addr = attr.ib()
    groups = attr.ib(default=(), converter=lambda v: tuple(sorted(v)))
    streams = attr.ib(default=0)
    tunnels = attr.ib(default=0)
    draining = attr.ib(default=False)
    logins = attr.ib(factory=dict, eq=False, repr=False)


class IFleetRegistry(Interface):
    """
    The fleet's shared view: every live node's L{NodeRecord}, kept current
    from the store (heartbeats with an expiry, and change notices).

    Readers (the fleet's tunnel pool, the client attachment list in HELLO,
    the status page) use only the cached view, never a round trip to the
    store, so a slow or absent store never delays a user's stream.
    """

    node_id = Attribute("This node's id.")
    healthy = Attribute(
        "C{True} while the store answers; C{False} while it does not (the "
        "last known view is still used, for C{keep_peers} seconds).")

    def start():
        """Connect, register this node and start the heartbeat; a Deferred."""

    def stop():
        """Deregister this node (its record and group entries deleted, a
        change published) and disconnect; a Deferred that never fails."""

    def local_changed():
        """
        This node's own record changed (a group gained its first tunnel or
        lost its last, draining began): publish it soon, coalescing calls
        made in the same reactor turn.
        """

    def nodes():
        """Every live node other than this one, as L{NodeRecord}s."""

    def nodes_for_group(group):
        """The live, non-draining other nodes holding C{group}, as L{NodeRecord}s."""

    def add_observer(callback):
        """Call C{callback()} whenever the view of other nodes changes."""

    def remove_observer(callback):
        """Stop calling C{callback} (harmless if it is not registered)."""

    def login_verifier(password):
        """The salted verifier of a group password, to publish in this node's record."""

    def check_group_login(group, password):
        """Whether C{password} is a valid group login for C{group} on any
        other node (the local pool checks its own tunnels first)."""

    def claim_port(port, owner):
        """
        Claim forwarded port C{port} for C{owner} (a client id) fleet-wide:
        a Deferred firing with C{True} if this node now holds it, C{False}
        if another node does.  Held while this node is alive; released by
        L{release_port} or by the node's expiry.  Fails (C{RegistryUnavailable})
        while the store cannot be reached: no claim can be decided then.
        """

    def release_port(port, owner):
        """Give back a port claimed by L{claim_port}; a Deferred."""

    def port_holder(port):
        """
        Who holds forwarded port C{port} fleet-wide now: a Deferred firing
        with C{(node_id, owner)}, or C{None} if nobody does (to name the
        holder when L{claim_port} answers C{False}).
        """
