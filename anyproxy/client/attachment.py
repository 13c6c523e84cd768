# -*- test-case-name: tests.test_client_attachment -*-
"""
Which gateways of a fleet a client keeps tunnels to (C{client.gateways_per_client}).

Sans-I/O: node ids in, a L{AttachmentPlan} out; no Twisted and no logging.
L{anyproxy.client.app.ClientRoot} feeds it the fleet list the gateways'
HELLOs carry and carries the plan out.

Why rendezvous hashing (highest random weight): every client ranks every
node by a hash of C{(client_id, node_id)} and takes the top K.  No shared
state is needed, so each client decides alone and the same way every time
(it stays put across restarts); the hash spreads clients evenly over the
nodes; and a node joining or leaving moves only the clients that ranked it
in their top K, each of them by one place (a ring would need virtual nodes
to spread as evenly).  The hash is BLAKE2b, which is stable across
processes and Python versions, unlike C{hash()}.

A node the client cannot reach (its tunnels failed several attempts in a
row) is ranked out, so the next node by rank takes its place; while it is
still listed its tunnels keep retrying (L{AttachmentPlan.retrying}), and once
one connects it ranks in again and the replacement is let go.
"""

import hashlib

import attr

# Domain separation for the hash, so that the scores are ours alone.
_PERSONALISATION = b"anyproxy-attach"


def node_score(client_id, node_id):
    """
    The rendezvous weight of node C{node_id} for client C{client_id}: a
    64-bit integer, the same in every process.
    """
    digest = hashlib.blake2b(digest_size=8, person=_PERSONALISATION)
    for part in (client_id, node_id):
        encoded = part.encode("utf-8", "surrogatepass")
        # Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    return int.from_bytes(digest.digest(), "big")


def rank(node_ids, client_id):
    """C{node_ids} (any iterable, repeats ignored) best first for C{client_id}."""
    return sorted(set(node_ids), key=lambda node: (-node_score(client_id, node), node))


@attr.s(frozen=True, slots=True)
class AttachmentPlan:
    """
    What a client should be attached to (L{plan}).

    @ivar chosen: the nodes to keep tunnels to, best first: the top
        C{min(K, n)} reachable listed nodes.
    @ivar attach: the chosen nodes not attached yet, best first.
    @ivar detach: the attached nodes to let go (no longer listed, or
        outranked), sorted.
    @ivar retrying: attached nodes that are listed but unreachable and not
        chosen: their tunnels keep retrying, and they do not count towards
        K; sorted.
    """

    chosen = attr.ib()
    attach = attr.ib()
    detach = attr.ib()
    retrying = attr.ib()

    @property
    def attached(self):
        """What the client is attached to once the plan is carried out."""
        return frozenset(self.chosen) | frozenset(self.retrying)


def plan(nodes, client_id, count, attached=(), unreachable=()):
    """
    Which nodes to attach to and which to let go.

    @param nodes: the node ids of the fleet list (the gateways' HELLOs).
    @param client_id: this client's id (C{client.client_id}).
    @param count: K, C{client.gateways_per_client} (at least 1).
    @param attached: the nodes the client is attached to now.
    @param unreachable: nodes whose tunnels failed to connect several times
        in a row (ranked out while so).
    @return: an L{AttachmentPlan}.
    """
    if count < 1:
        raise ValueError("count must be at least 1, got %r" % (count,))
    listed, attached, unreachable = set(nodes), set(attached), set(unreachable)
    chosen = tuple(rank(listed - unreachable, client_id)[:count])
    retrying = tuple(sorted(attached & listed & unreachable))
    return AttachmentPlan(
        chosen=chosen,
        attach=tuple(node for node in chosen if node not in attached),
        detach=tuple(sorted(attached - set(chosen) - set(retrying))),
        retrying=retrying)
