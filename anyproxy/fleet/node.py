# -*- test-case-name: tests.test_fleet_relay -*-
"""
L{FleetNode}: the fleet's parts of one gateway, as one part of
L{anyproxy.gateway.app.Gateway} (C{gateway.fleet} set).

  - the B{registry} (L{anyproxy.fleet.interfaces.IFleetRegistry}): this
    node's record and the view of the others;
  - the B{peer link listener} (L{anyproxy.fleet.peer_link.PeerLinkServer})
    and the B{relay} behind it (L{anyproxy.fleet.relay.Relay}), serving
    other gateways' users from our tunnels;
  - the B{links} this gateway dials (L{anyproxy.fleet.peer_link.PeerLinks})
    and the B{fleet tunnel pool} (L{anyproxy.fleet.pool.FleetTunnelPool})
    the gateway's other parts use instead of the local one.

It starts after the gateway's other parts, so the node registers once it
can serve, and stops first: it leaves the registry, then closes its links
and its listener, before the tunnels go.
"""

import attr
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.addresses import PROXY_HEADER_PREFIX, host_port, split_endpoint
from anyproxy.fleet.interfaces import NodeRecord
from anyproxy.fleet.peer_link import DEFAULT_LINK_WAIT, PeerLinks, PeerLinkServer
from anyproxy.fleet.pool import FleetTunnelPool
from anyproxy.fleet.relay import Relay
from anyproxy.fleet.relay_metrics import RelayMetrics
from anyproxy.interfaces import IReconfigurable

log = Logger()


@implementer(IReconfigurable)
class FleetNode(MultiService):
    """
    See the module docstring; build it with L{from_config}.

    @ivar registry: the L{anyproxy.fleet.interfaces.IFleetRegistry}.
    @ivar relay: the L{Relay}.
    @ivar server: the L{PeerLinkServer}.
    @ivar links: the L{PeerLinks}.
    @ivar tunnel_pool: the L{FleetTunnelPool}.
    @ivar metrics: the L{RelayMetrics}.
    """

    def __init__(self, reactor, config, local_pool, metrics_registry, make_registry):
        super().__init__()
        gateway = config.gateway
        self.reactor = reactor
        self.config = config
        self.local_pool = local_pool
        self.relay = Relay(local_pool, reactor)
        self.server = PeerLinkServer.from_config(gateway, reactor, self.relay)
        self.server.setServiceParent(self)
        self.links = PeerLinks(reactor, gateway.fleet,
                               link_wait=min(gateway.handshake_timeout, DEFAULT_LINK_WAIT))
        self.metrics_registry = metrics_registry
        self.registry = make_registry(self)
        # The id the registry settled on (gateway.fleet.node_id, or by default
        # the host name and tunnel port): the links announce the same one.
        # The peer uses it to name the link in logs and on the status page;
        # what admits a link is its certificate, checked against peer_ca.
        self.server.factory.node_id = self.links.node_id = self.registry.node_id
        self.metrics = RelayMetrics(metrics_registry, reactor, links=self._link_counts)
        self.relay.metrics = self.metrics
        self.tunnel_pool = FleetTunnelPool(local_pool, self.registry, self.links, reactor,
                                           balance=gateway.balance, metrics=self.metrics)
        self.links.on_link_lost = self.tunnel_pool.link_lost
        self._logins = {}  # holder (a tunnel) -> (group, verifier): published in our record

    def share_group_logins(self, group_logins):
        """
        Make the group logins (C{group_id:group_password}) of clients on
        any gateway of the fleet valid here, and ours valid there: each
        announced password is published as a salted verifier in this node's
        record (never the password), and a login this gateway does not hold
        is checked against the other nodes' verifiers.

        @param group_logins: the gateway's L{anyproxy.auth.GroupLogins}.
        """
        group_logins.observers.append(self._login_changed)
        group_logins.remote = self._check_remote_login

    def share_forwarded_ports(self, port_forwarding):
        """
        Decide forwarded ports (C{client.open_ports}) fleet-wide: the
        gateway's port forwarding opens a port only once this node holds its
        number in the registry for the client (docs/PORT_FORWARDING.md, "In
        a fleet"), and stops forwarding one the registry gave to another node.

        @param port_forwarding: the gateway's
            L{anyproxy.gateway.port_forwarding.forwarder.PortForwarding}.
        """
        from anyproxy.gateway.port_forwarding.fleet_claims import FleetPortClaims
        self.port_claims = FleetPortClaims(self.registry, self.reactor,
                                           retry_interval=self.config.gateway.fleet.heartbeat)
        port_forwarding.use_fleet(self.port_claims)

    port_claims = None  # the FleetPortClaims, once share_forwarded_ports is called

    def port_lost(self, port, owner):
        """A port we claimed was found held by another node (see L{share_forwarded_ports})."""
        if self.port_claims is not None:
            self.port_claims.port_lost(port, owner)

    def _login_changed(self, holder, group, password):
        if group is None:
            if self._logins.pop(holder, None) is None:
                return
        else:
            verifier = getattr(self.registry, "login_verifier", None)
            if verifier is None:
                return
            self._logins[holder] = (group, verifier(password))
        self.registry.local_changed()

    def _check_remote_login(self, group, password):
        return bool(self.registry.check_group_login(group, password))

    def _local_logins(self):
        logins = {}
        for group, verifier in self._logins.values():
            if verifier not in logins.setdefault(group, []):
                logins[group].append(verifier)
        return logins

    @classmethod
    def from_config(cls, config, reactor, local_pool, metrics_registry, make_registry=None):
        """
        @param local_pool: the gateway's L{anyproxy.gateway.tunnel_pool.TunnelPool}.
        @param metrics_registry: the gateway's C{CollectorRegistry}.
        @param make_registry: C{make_registry(node)} -> the
            L{anyproxy.fleet.interfaces.IFleetRegistry} for this node; the
            Redis registry (L{anyproxy.fleet.registry}) by default.
        """
        return cls(reactor, config, local_pool, metrics_registry,
                   make_registry if make_registry is not None else redis_registry)

    def _link_counts(self):
        return len(self.links.links()), len(self.server.factory.links)

    def listeners(self):
        """C{{name: Listener}}: the peer link listener."""
        return self.server.listeners()

    tunnel_listener = None  # the tunnel server's Listener; the gateway sets it
    tunnel_server = None  # the gateway's TunnelServer: its HELLO lists the fleet

    def tunnel_port(self):
        """
        The tunnel listener's port: the one bound, once listening, else the
        configured one (C{gateway.listen_addr}; 0 if it asked for any).
        """
        listening = getattr(self.tunnel_listener, "port", None)
        if listening is not None:
            return listening.getHost().port
        endpoint = self.config.gateway.endpoint
        if endpoint.startswith(PROXY_HEADER_PREFIX):
            endpoint = endpoint[len(PROXY_HEADER_PREFIX):]
        parts = split_endpoint(endpoint)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    def local_record(self):
        """
        This node's L{NodeRecord} as it is now, for the registry to publish:
        where peers and clients reach it, the groups of its usable tunnels
        and its load.
        """
        from anyproxy.fleet.registry import default_advertise_addr, peer_dial_addr
        fleet = self.config.gateway.fleet
        tunnels = self.local_pool.tunnels()
        peer_addr = self.peer_address()
        return NodeRecord(
            node_id=fleet.node_id, peer_addr=peer_dial_addr(peer_addr),
            tunnel_addr=fleet.advertise_addr or default_advertise_addr(peer_addr,
                                                                       self.tunnel_port()),
            groups=set(tunnel.group for tunnel in tunnels if not tunnel.draining),
            streams=sum(tunnel.active_streams for tunnel in tunnels), tunnels=len(tunnels),
            logins=self._local_logins())

    def status(self, draining=False):
        """
        The fleet as this node sees it, for the status page and
        C{/api/status} (L{anyproxy.gateway.status.api}): a JSON-able dict.

          - C{node}: this node's id; C{nodes}: this node's record (C{self}
            true) and every live other one, each with its peer and tunnel
            addresses, the groups it holds, its load (C{streams},
            C{tunnels}) and C{draining};
          - C{registry}: whether the store answers (C{healthy}), seconds
            since it last did (C{view_age}, C{null} if unknown or never) and
            its failed round trips (C{errors});
          - C{relayed}: streams relayed, by side (C{sent}: our users' streams
            opened on a peer; C{served}: peers' streams opened on our
            tunnels): open now, opened, failed, and payload bytes (C{in}
            from users, C{out} back to them); C{links} up now;
          - C{ports}: the forwarded ports this node holds fleet-wide.

        @param draining: whether this gateway is draining (its record is
            gone from the registry by then).
        """
        registry = self.registry
        own = _record_status(self.local_record(), this=True)
        own["draining"] = bool(draining)
        nodes = [own] + [_record_status(record) for record in registry.nodes()]
        view_age = getattr(registry, "view_age", None)
        age = view_age() if view_age is not None else None
        errors = getattr(registry, "redis_errors", None)
        dialed, accepted = self._link_counts()
        claims = self.port_claims.held() if self.port_claims is not None else {}
        return {
            "node": registry.node_id,
            "nodes": nodes,
            "registry": {"healthy": bool(registry.healthy),
                         "view_age": round(age, 3) if age is not None else None,
                         "errors": errors if isinstance(errors, int) else None},
            "relayed": _relayed_status(self.metrics),
            "links": {"dialed": dialed, "accepted": accepted},
            "ports": [{"port": port, "group": owner[0], "client_id": owner[1]}
                      for port, owner in sorted(claims.items())],
        }

    def peer_address(self):
        """
        C{host:port} where peers reach this node: C{fleet.peer_addr}, with
        the port actually bound when it asked for port 0 (tests).
        """
        fleet = self.config.gateway.fleet
        port = self.server.listener.port
        host, _, wanted = fleet.peer_addr.rpartition(":")
        if port is not None and wanted == "0":
            return host_port(host.strip("[]"), port.getHost().port)
        return fleet.peer_addr

    def prepare(self, config):
        """See L{anyproxy.interfaces.IReconfigurable}: the listener, the link wait, TLS files."""
        gateway = config.gateway
        server_apply = self.server.prepare(config)
        # What was built from the fleet section at start stays: leaving the
        # fleet, or another Redis, node id or keep_peers, takes a restart
        # (the reload says so); the node goes on with what it has.
        old = self.config.gateway.fleet
        fleet = old if gateway.fleet is None else attr.evolve(
            gateway.fleet, redis=old.redis, node_id=old.node_id, keep_peers=old.keep_peers)
        kept = attr.evolve(config, gateway=attr.evolve(gateway, fleet=fleet))

        def apply():
            self.config = kept
            if gateway.fleet is not None:
                self.links.configure(gateway.fleet)
                self.links.link_wait = min(gateway.handshake_timeout, DEFAULT_LINK_WAIT)
                if self.port_claims is not None:
                    self.port_claims.retry_interval = gateway.fleet.heartbeat
            return server_apply()

        return apply

    def startService(self):
        super().startService()
        if self.tunnel_server is not None:
            # Clients learn the fleet from our HELLO (anyproxy.client.attachment).
            self.tunnel_server.announce_fleet(self.registry, self.local_record().tunnel_addr)
        # The registry retries by itself; a failure here is only logged.
        self.registry.start().addErrback(
            lambda failure: log.failure("fleet registry did not start", failure))

    @defer.inlineCallbacks
    def stopService(self):
        yield self.registry.stop()
        self.links.close_all()
        yield super().stopService()


def _record_status(record, this=False):
    """One L{NodeRecord} for the status API (no logins: they are verifiers, not for display)."""
    return {"node_id": record.node_id, "self": this, "peer_addr": record.peer_addr,
            "tunnel_addr": record.tunnel_addr, "groups": list(record.groups),
            "streams": record.streams, "tunnels": record.tunnels,
            "draining": bool(record.draining)}


def _relayed_status(metrics):
    """
    C{{side: {active, opened, failed, bytes_in, bytes_out}}} from the relay's
    Prometheus metrics (L{RelayMetrics}), read as a scrape reads them.
    """
    from anyproxy.fleet.relay_metrics import SIDES
    sides = {side: {"active": 0, "opened": 0, "failed": 0, "bytes_in": 0, "bytes_out": 0}
             for side in SIDES}
    for family in metrics.streams.collect():
        for sample in family.samples:
            side = sides.get(sample.labels.get("side"))
            if side is None or not sample.name.endswith("_total"):
                continue
            outcome = sample.labels.get("outcome")
            if outcome == "ok":
                side["opened"] += int(sample.value)
            elif outcome != "cancelled":
                side["failed"] += int(sample.value)
    for family in metrics.collect():
        for sample in family.samples:
            side = sides.get(sample.labels.get("side"))
            if side is None:
                continue
            if family.name == "anyproxy_fleet_relayed_bytes":
                side["bytes_" + sample.labels["direction"]] = int(sample.value)
            elif family.name == "anyproxy_fleet_relayed_streams_active":
                side["active"] = int(sample.value)
    return sides


def redis_registry(node):
    """
    The Redis registry (L{anyproxy.fleet.registry}) of C{node}, a
    L{FleetNode}, its metrics in the gateway's registry.
    """
    from anyproxy.fleet.registry import FleetRegistryCollector, RedisFleetRegistry
    registry = RedisFleetRegistry.from_config(node.config.gateway.fleet, node.tunnel_port(),
                                              node.local_record, reactor=node.reactor,
                                              on_port_lost=node.port_lost)
    node.metrics_registry.register(FleetRegistryCollector(registry))
    return registry
