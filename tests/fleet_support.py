"""
Fleet fixtures without Redis: L{MemoryFleet}, one dict shared by the
L{MemoryRegistry} of every node (an honest L{IFleetRegistry}: records made
from each node's real tunnel pool, published at the next reactor turn,
observers told of every change), and L{FleetDeployment}, a gateway of such a
fleet in this process, started from YAML like the others (tests.support).
"""

import attr
from twisted.internet import defer, reactor
from zope.interface import implementer

from anyproxy.config.load import load_config
from anyproxy.fleet.interfaces import IFleetRegistry, NodeRecord
from anyproxy.fleet.registry import LoginChecker, make_login_verifier
from anyproxy.gateway.app import make_gateway_service
from tests.support import Deployment


class MemoryFleet:
    """
    The shared store: node id -> (L{NodeRecord}, its registry).

    @ivar ports: forwarded-port claims, port -> (node id, owner).
    """

    def __init__(self, clock=reactor):
        self.clock = clock
        self.records = {}
        self.registries = []
        self.ports = {}

    def publish(self, record):
        self.records[record.node_id] = record
        self._changed(record.node_id)

    def withdraw(self, node_id):
        if self.records.pop(node_id, None) is not None:
            self._changed(node_id)

    def _changed(self, node_id):
        for registry in list(self.registries):
            if registry.node_id != node_id:
                registry.view_changed()


@implementer(IFleetRegistry)
@attr.s(eq=False)
class MemoryRegistry:
    """
    One node's view of a L{MemoryFleet}.  C{unreachable = True} plays a
    store that stopped answering once the cached view expired: no peers.

    @ivar node: the L{anyproxy.fleet.node.FleetNode} it publishes.
    """

    fleet = attr.ib()
    node = attr.ib()
    healthy = attr.ib(default=True)
    unreachable = attr.ib(default=False)
    _observers = attr.ib(factory=list)
    _publishing = attr.ib(default=None)
    _running = attr.ib(default=False)
    draining = attr.ib(default=False)

    @property
    def node_id(self):
        return self.node.config.gateway.fleet.node_id

    def start(self):
        self._running = True
        self.fleet.registries.append(self)
        self.local_changed()  # next turn: the peer listener's port is known by then
        return defer.succeed(None)

    def stop(self):
        if self._running:
            self._running = False
            self.fleet.registries.remove(self)
            # As Redis's deregistration does: the node's port claims go too.
            for port, (node_id, _) in list(self.fleet.ports.items()):
                if node_id == self.node_id:
                    del self.fleet.ports[port]
            self.fleet.withdraw(self.node_id)
        return defer.succeed(None)

    def record(self):
        tunnels = self.node.local_pool.tunnels()
        return NodeRecord(
            node_id=self.node_id, peer_addr=self.node.peer_address(), tunnel_addr="",
            groups=sorted(set(t.group for t in tunnels if not t.draining)),
            streams=sum(t.active_streams for t in tunnels), tunnels=len(tunnels),
            draining=self.draining)

    def local_changed(self):
        if self._running and self._publishing is None:
            self._publishing = self.fleet.clock.callLater(0, self._publish)

    def _publish(self):
        self._publishing = None
        if self._running:
            self.fleet.publish(self.record())

    def view_changed(self):
        for observer in list(self._observers):
            observer()

    def nodes(self):
        if self.unreachable:
            return []
        return [record for node_id, record in sorted(self.fleet.records.items())
                if node_id != self.node_id]

    def nodes_for_group(self, group):
        return [record for record in self.nodes() if group in record.groups
                and not record.draining]

    def add_observer(self, callback):
        self._observers.append(callback)

    def remove_observer(self, callback):
        if callback in self._observers:
            self._observers.remove(callback)

    def login_verifier(self, password):
        return make_login_verifier(password, b"memory-registry-salt")

    def check_group_login(self, group, password):
        verifiers = [v for record in self.nodes() for v in record.logins.get(group, ())]
        return bool(verifiers) and LoginChecker(reactor).check(verifiers, password)

    def claim_port(self, port, owner):
        holder = self.fleet.ports.setdefault(port, (self.node_id, owner))
        return defer.succeed(holder == (self.node_id, owner))

    def release_port(self, port, owner):
        if self.fleet.ports.get(port) == (self.node_id, owner):
            del self.fleet.ports[port]
        return defer.succeed(None)

    def port_holder(self, port):
        return defer.succeed(self.fleet.ports.get(port))


class FleetDeployment(Deployment):
    """
    A gateway that is node C{node_id} of C{fleet}, its peer link on
    127.0.0.1 port 0 with the test PKI's certificate (as fleet CA and node
    certificate), and clients of it (L{Deployment.start_client}).
    """

    def __init__(self, testcase, fleet, node_id, pki=None, redis_url=None):
        super().__init__(testcase)
        if pki is not None:
            self.pki = pki
        self.fleet = fleet
        self.node_id = node_id
        self.redis_url = redis_url  # set: the real Redis registry instead of the fleet dict

    def gateway_config(self, **overrides):
        data = super().gateway_config(**overrides)
        data["gateway"].setdefault("drain_timeout", 0)
        data["gateway"].setdefault("fleet", {
            # Not used unless redis_url is set: the registry is a MemoryRegistry.
            "redis": self.redis_url or "redis://127.0.0.1:1/0",
            "node_id": self.node_id, "peer_addr": "127.0.0.1:0",
            "peer_ca": self.pki.ca_path, "peer_cert": self.pki.cert_path,
            "peer_key": self.pki.key_path, "heartbeat": 1.0})
        return data

    def client_config(self, **overrides):
        # Clients stay on the gateway they are given (gateways_per_client 0),
        # so a test decides which node holds a group's tunnel.
        data = super().client_config(**overrides)
        data["client"].setdefault("gateways_per_client", 0)
        return data

    @defer.inlineCallbacks
    def start_gateway(self, **overrides):
        config = load_config(self.write_config(self.gateway_config(**overrides)))
        memory = None if self.redis_url else (lambda node: MemoryRegistry(self.fleet, node))
        service = make_gateway_service(config, reactor, make_fleet_registry=memory)
        service.startService()
        self.testcase.addCleanup(service.stopService)
        for listener in service.listeners.values():
            yield listener.when_listening()
        self.gateway = service
        self.gateway_port = self._port("tunnel server")
        self.socks_port = self._port("socks5 proxy")
        self.http_port = self._port("http proxy")
        return service

    @property
    def node(self):
        """The gateway's L{anyproxy.fleet.node.FleetNode}."""
        return self.gateway.fleet
