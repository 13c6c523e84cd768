"""
Several gateways as one fleet, sharing a Redis registry (C{gateway.fleet}).

Each gateway registers itself as a node, says which client groups it holds
tunnels of, and relays a user's stream to a node that holds the user's group
when it holds none itself (one hop at most).  docs/FLEET.md has the picture.

  - L{anyproxy.fleet.interfaces}: the registry's interface and its records.
  - L{anyproxy.fleet.registry}: that registry in Redis (txredisapi).
  - L{anyproxy.fleet.peer_link}: the mutually authenticated links between
    gateways, which carry the tunnel protocol.
  - L{anyproxy.fleet.pool}: the fleet's L{anyproxy.interfaces.ITunnelPool}:
    local tunnels first, then a link to a peer that holds the group.
"""
