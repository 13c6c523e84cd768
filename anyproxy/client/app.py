# -*- test-case-name: tests.test_e2e_tcp -*-
"""
The client program: for each gateway, C{replicas} WebSocket tunnels, each kept
up by its own C{ClientService} (reconnect with exponential backoff and
jitter), all answering OPEN requests through one shared L{Dialer}.

With a fleet (the gateways' HELLOs list the fleet's nodes), the client keeps
tunnels to C{gateways_per_client} of those nodes instead, chosen by
L{anyproxy.client.attachment}: see L{ClientRoot}.
"""

import itertools
import random

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy import __version__
from anyproxy.addresses import host_port
from anyproxy.auth import Logins
from anyproxy.client import attachment
from anyproxy.client.dialer import Dialer
from anyproxy.client.gateway_endpoints import (
    SrvEndpoint, configured_gateways, default_dns_resolver, describe_route, gateway_label,
    gateway_url, srv_name, tcp_endpoint)
from anyproxy.client.status.api import add_status_page
from anyproxy.client.status.tunnels import MeasuredTunnelProtocol
from anyproxy.listeners import Listener, rebind
from anyproxy.metrics import ClientMetrics, metrics_site
from anyproxy.tls import client_tls_options
from anyproxy.tunnel import frames
from anyproxy.tunnel.hello import client_hello, read_gateway_hello
from anyproxy.tunnel.liveness import Liveness
from anyproxy.tunnel.websocket import basic_authorization, tune_factory

log = Logger()

# A reload that changes client.routes: the gateway reads routes from a
# tunnel's first HELLO only (the protocol has no update from the client).
ROUTES_RELOAD_NOTE = ("client.routes: the gateways use the new routes on each tunnel as it "
                      "next connects; the tunnels up now keep the routes they announced")

# The order HELLOs with a fleet list arrived in: the newest says most.
_fleet_hellos = itertools.count()


class ClientTunnelFactory(WebSocketClientFactory):
    """
    Builds the client's tunnel protocols for one gateway.

    @param weight: this client's share of its group's new streams, announced
        in the HELLO.
    @param group_password: announced in the HELLO when set: the gateway then
        accepts the proxy login C{group:group_password} while we are
        connected.  The tunnel is TLS-protected and we have authenticated.
    @param open_ports: L{anyproxy.config.model.OpenPortConfig}s the gateway is
        asked (HELLO C{open_ports}) to listen on and forward to us.
    @param routes: C{client.routes}, announced in the HELLO (HELLO
        C{routes}): what this client can reach; empty: anything.
    @ivar port_answers: the gateway's answers to our C{open_ports}
        (L{anyproxy.tunnel.hello.PortAnswer}s, the latest for each port), or
        C{None} before it answered.
    @ivar established: tunnels that completed the handshake (metrics).
    @ivar lost: established tunnels lost since.
    @ivar retired_bytes_sent: DATA bytes the lost tunnels sent (their muxes'
        totals; the connected ones' are read live).
    @ivar retired_bytes_received: DATA bytes the lost tunnels received.
    """

    protocol = MeasuredTunnelProtocol  # a ClientTunnelProtocol measuring its RTT
    port_answers = None
    established = lost = 0
    retired_bytes_sent = retired_bytes_received = 0
    # Told (factory, protocol) when a tunnel comes up, brings a new fleet
    # list, is lost, or (protocol None) hears the gateway's GOAWAY
    # (ClientRoot's fleet attachment).
    attachment_observer = None

    def __init__(self, url, dialer, client_id, group, username, password,
                 ping_interval=10.0, handshake_timeout=10.0, weight=1.0, group_password="",
                 open_ports=(), routes=()):
        headers = {"Authorization": basic_authorization(username, password)} if username else {}
        super().__init__(url=url, protocols=[frames.SUBPROTOCOL], headers=headers,
                         useragent="AnyProxy/" + __version__)
        self.dialer = dialer
        self.client_id = client_id
        self.group = group
        self.gateway = url
        self.weight = weight
        self._group_password = group_password
        self.open_ports = tuple(open_ports)
        self.routes = tuple(routes)
        self.connected = set()
        # Pings a tunnel silent for one interval (the gateway does not).
        self.liveness = Liveness(self.reactor, ping_interval, is_gateway=False)
        tune_factory(self, ping_interval, handshake_timeout)

    def __repr__(self):
        # The headers hold the client's password: never show them.
        return "<ClientTunnelFactory %s>" % (self.gateway,)

    def configure(self, client):
        """
        Take a reloaded L{anyproxy.config.model.ClientConfig}: credentials and
        HELLO fields, for the tunnels connected from now on; the ping interval,
        for every tunnel at once.
        """
        username, password = client.auth_username, client.auth_password
        self.headers = {"Authorization": basic_authorization(username, password)} if username else {}
        self.client_id = client.client_id
        self.group = client.group_id
        self.weight = client.weight
        self._group_password = client.group_password
        self.open_ports = tuple(client.open_ports)
        # The gateway reads routes from the first HELLO only: new ones reach
        # it when each tunnel next connects (ClientRoot.reconfigure says so).
        self.routes = tuple(client.routes)
        tune_factory(self, client.ping_interval, self.openHandshakeTimeout)

    def open_requested(self, stream):
        self.dialer.handle_open(stream)

    @property
    def open_ports_answer(self):
        """L{port_answers} as the gateway's HELLO carries them (JSON objects), or C{None}."""
        if self.port_answers is None:
            return None
        return [answer.to_json() for answer in self.port_answers]

    def hello_info(self):
        """Our HELLO (L{anyproxy.tunnel.hello.client_hello})."""
        return client_hello(self.client_id, self.group, self.weight, self._group_password,
                            self.open_ports, routes=self.routes)

    def tunnel_ready(self, protocol, info):
        hello = read_gateway_hello(info)
        self.connected.add(protocol)
        self.established += 1
        _note_fleet(protocol, hello)
        log.info("tunnel to {gateway} up (gateway {software}{node})", gateway=self.gateway,
                 software=hello.software or "?",
                 node=", fleet node %s" % (hello.node,) if hello.fleet is not None else "")
        if self.open_ports:
            self.port_answers = hello.open_ports
            _log_open_ports(self.gateway, self.open_ports, hello.open_ports)
        if self.attachment_observer is not None:
            self.attachment_observer(self, protocol)

    def hello_updated(self, protocol, info):
        """
        A further HELLO from the gateway: a new fleet list, or entries of
        C{open_ports} whose answer changed.
        """
        hello = read_gateway_hello(info)
        if hello.fleet is not None:
            _note_fleet(protocol, hello)
            if self.attachment_observer is not None:
                self.attachment_observer(self, protocol)
        update = hello.open_ports
        if not self.open_ports or update is None:
            return
        changed = {answer.key for answer in update}
        kept = [answer for answer in (self.port_answers or ()) if answer.key not in changed]
        self.port_answers = tuple(kept) + update
        _log_open_ports(self.gateway, self.open_ports, update)

    def on_tunnel_going_away(self):
        # A tunnel's gateway sent GOAWAY (it is draining): attach elsewhere
        # now rather than once it closes the tunnel.
        if self.attachment_observer is not None:
            self.attachment_observer(self, None)

    def tunnel_lost(self, protocol, reason):
        if protocol in self.connected:
            self.lost += 1
            self.retired_bytes_sent += protocol.mux.bytes_sent
            self.retired_bytes_received += protocol.mux.bytes_received
        self.connected.discard(protocol)
        log.warn("tunnel to {gateway} lost: {reason}; reconnecting", gateway=self.gateway,
                 reason=reason or "connection closed")
        if self.attachment_observer is not None:
            self.attachment_observer(self, protocol)


def _note_fleet(protocol, hello):
    """
    Keep on C{protocol} what the gateway's HELLO says of its fleet: its node
    id (C{gateway_node}) and the list (C{fleet}, C{None} without a fleet),
    numbered in arrival order (C{fleet_order}).  A later HELLO without a
    list (a port answer) leaves them as they are.
    """
    if hello.fleet is None and getattr(protocol, "fleet", None) is not None:
        return
    protocol.gateway_node = hello.node
    protocol.fleet = hello.fleet
    protocol.fleet_order = next(_fleet_hellos)


def _log_open_ports(gateway, asked, answered):
    """
    Log the gateway's answer to our C{open_ports}: a refusal is a warning.

    @param answered: L{anyproxy.tunnel.hello.PortAnswer}s, or C{None}.
    """
    if answered is None:
        log.warn("gateway {gateway} did not answer open_ports: it does not forward ports",
                 gateway=gateway)
        return
    wanted = {(p.remote_port, p.protocol): p for p in asked}
    for answer in answered:
        port = wanted.get(answer.key)
        target = "%s:%d" % (port.local_host, port.local_port) if port is not None else "?"
        if answer.ok:
            log.info("gateway {gateway} forwards port {port}/{protocol} to {target}",
                     gateway=gateway, port=answer.remote_port, protocol=answer.protocol,
                     target=target)
        else:
            log.warn("gateway {gateway} refused to forward port {port}/{protocol} to {target}: "
                     "{error}", gateway=gateway, port=answer.remote_port,
                     protocol=answer.protocol, target=target,
                     error=answer.error or "no reason given")


def _log_open_ports_wanted(client):
    """
    Say at start-up which ports C{client.open_ports} asks the gateways for,
    and the key each gateway needs: it forwards only ports its
    C{gateway.open_ports_allowed} lists (the Go AnyProxy's gateway opened
    any port asked for).
    """
    if not client.open_ports:
        return
    ports = sorted({port.remote_port for port in client.open_ports})
    log.info("open_ports: asking each gateway to forward {wanted}; a gateway forwards only "
             "ports its gateway.open_ports_allowed lists, so there set at least "
             "gateway.open_ports_allowed: [{ports}]",
             wanted=", ".join("%d/%s to %s" % (port.remote_port, port.protocol,
                                               host_port(port.local_host, port.local_port))
                              for port in client.open_ports),
             ports=", ".join(str(port) for port in ports))


@implementer(IStreamClientEndpoint)
class ReadyTunnelEndpoint:
    """
    Connects one tunnel and succeeds only once the gateway has answered our
    HELLO (TLS verified, WebSocket upgraded, credentials accepted).

    C{ClientService} then counts a refused or failed handshake as a failed
    connection attempt, so its backoff grows, instead of as a connection that
    was made and then lost (which resets the backoff and, on Twisted's
    machine, cannot be signalled before the connection is established).  The
    service's own protocol is a stand-in handle sharing the tunnel's
    transport: closing it closes the tunnel, and it is told when the tunnel
    is lost.

    A connection that cannot be made is logged with its error, which names
    the hop that failed (L{anyproxy.client.egress.EgressProxyError}: the
    egress proxy; anything else: the gateway), and kept as C{last_error}
    for the status page.  A gateway's refusal of the tunnel is logged by the
    tunnel protocol.

    @ivar tunnel: the L{ClientTunnelProtocol} last made ready, or C{None}.
    @ivar last_error: C{(when, text)} of the latest failed attempt, or C{None}.
    """

    tunnel = None
    last_error = None

    def __init__(self, endpoint, tunnel_factory):
        self._endpoint = endpoint
        self._tunnel_factory = tunnel_factory

    def connect(self, protocol_factory):
        d = self._endpoint.connect(self._tunnel_factory)

        def not_connected(failure):
            if not failure.check(defer.CancelledError):
                text = failure.getErrorMessage() or failure.type.__name__
                self.last_error = (self._tunnel_factory.reactor.seconds(), text)
                log.warn("tunnel to {gateway}: cannot connect: {error}",
                         gateway=self._tunnel_factory.gateway, error=text)
            return failure

        def opened(tunnel):
            # A gateway that opens the WebSocket but never answers our HELLO
            # (it pongs our pings) must not hold the attempt forever: the
            # connection is dropped after the handshake timeout, the attempt
            # fails, and the service retries with its backoff.
            factory = self._tunnel_factory
            reactor = factory.reactor

            def no_answer():
                log.warn("tunnel to {gateway}: no answer to our HELLO within {timeout:g} s; "
                         "closing", gateway=factory.gateway, timeout=factory.openHandshakeTimeout)
                tunnel.dropConnection(abort=True)

            timer = reactor.callLater(factory.openHandshakeTimeout, no_answer)

            def answered(result):
                if timer.active():
                    timer.cancel()
                return result

            return tunnel.ready.addBoth(answered)

        def ready(tunnel):
            handle = protocol_factory.buildProtocol(tunnel.transport.getPeer())
            handle.makeConnection(tunnel.transport)
            tunnel.handle = handle
            self.tunnel = tunnel
            return handle

        return d.addErrback(not_connected).addCallback(opened).addCallback(ready)


# A tunnel whose connection failed this many times in a row (its loss
# counting as the first) is lost for good: with a fleet, its node is ranked
# out and the next by rank attached, while it keeps retrying.
GIVE_UP_ATTEMPTS = 3
# A fleet node let go of keeps its tunnel (GOAWAY sent: no new streams)
# until the streams on it finish, at most this many seconds.
DETACH_DRAIN_TIMEOUT = 30.0


class ClientRoot(MultiService):
    """
    The client program's top service: C{replicas} tunnels per gateway (one
    C{ClientService} each) sharing one L{Dialer}; built by
    L{make_client_service}.

    B{Fleet attachment.}  When a connected tunnel's gateway HELLO lists
    its fleet (L{anyproxy.tunnel.hello.FleetNode}s), the client keeps
    C{replicas} tunnels to each of K = C{gateways_per_client} nodes, chosen
    by rendezvous hashing on its client id (L{anyproxy.client.attachment}),
    dialing their advertised addresses (TLS verified against the advertised
    host, or C{gateway_server_name}).  The fleet list is the union of the
    latest lists of the connected, non-draining tunnels.  A tunnel to a
    configured address (the bootstrap, e.g. a load balancer) that landed on
    a chosen node stays and counts for it; the others are let go once each
    chosen node is up, and a configured address is not redialed while
    chosen nodes are reachable (it is again when none is).  A node that
    leaves the list is let go (GOAWAY, then closed when its streams end);
    a node whose tunnels fail L{GIVE_UP_ATTEMPTS} times in a row is ranked
    out until one connects again, and the next by rank is attached.  A
    node whose gateway sends GOAWAY (it is draining) is ranked out at once,
    until a list heard since names it again, so the client attaches to the
    next by rank before the node goes.  When the gateways send no fleet
    list, every configured address has its tunnels as before.  With or
    without a fleet, a tunnel whose gateway sent GOAWAY is let go and a
    fresh one started in its place at once.  Each decision is one log line.

    L{reconfigure} applies a reloaded config (L{anyproxy.twistd.reload}).  The
    dialer's access control, limits and timeouts apply to the next stream.
    Credentials, certificates, HELLO fields (client id, group, weight,
    group password, open ports) and the backoff apply when a tunnel next
    connects: a connected tunnel is not dropped for them, so its streams go
    on.  Tunnels to a gateway no longer listed, and replicas beyond a
    lowered C{replicas}, are closed; new ones are started; a new
    C{gateways_per_client} or client id re-plans the attachment at once.

    @ivar config: the L{anyproxy.config.model.Config} in force.
    @ivar factories: C{(host, port)} -> L{ClientTunnelFactory}, the dict
        L{make_client_service} returns (kept up to date): the configured
        gateways and the fleet nodes attached to.
    @ivar reload_hooks: callables given each applied config (metrics...).
    @ivar attached: C{{node id: FleetNode}}, the fleet nodes attached to
        (empty without a fleet list).
    """

    metrics_listener = None  # the metrics Listener (anyproxy.metrics), if any
    logins = None  # anyproxy.auth.Logins of the status and metrics logins (client.auth_throttle)
    status_listener = None  # the status page's Listener (anyproxy.client.status), if any

    def __init__(self, reactor, config, dialer, factories):
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.dialer = dialer
        self.factories = factories
        self.reload_hooks = []
        self.attached = {}
        self._tunnels = {}  # (host, port) -> [ClientService], in replica order
        self._tls = {}  # (host, port) -> TLS options
        self._configured = set(configured_gateways(config.client))
        self._known = None  # node id -> FleetNode; None: no fleet list (yet)
        self._failing = set()  # (host, port) whose tunnels are lost for good
        self._leaving = {}  # node id -> when its gateway sent GOAWAY (a fleet_order); see _reconcile
        self._adopted = set()  # bootstrap tunnels kept for the chosen node they landed on
        self._fallback = False  # dialing the configured addresses: no node reachable
        self._reconcile_call = None
        # How gateways are reached (anyproxy.client.gateway_endpoints): the
        # resolver of their names, the DNS for SRV records, the environment
        # for HTTPS_PROXY; make_client_service sets them.
        self.gateway_resolver = None
        self.dns_resolver = None
        self.environ = None

    def _retry(self, attempt):
        client = self.config.client
        return backoffPolicy(initialDelay=client.reconnect_initial_delay,
                             maxDelay=client.reconnect_max_delay, factor=2.0,
                             jitter=random.random)(attempt)

    def _retry_for(self, key):
        """The retry policy of a tunnel to C{key}: L{_retry}, noting a gateway lost for good."""

        def retry(attempt):
            factory = self.factories.get(key)
            if attempt >= GIVE_UP_ATTEMPTS and self._known is not None \
                    and key not in self._failing and factory is not None \
                    and not factory.connected:
                self._failing.add(key)
                log.warn("fleet: gateway at {gateway} unreachable ({attempts} failed attempts "
                         "in a row); ranking it out until it connects again",
                         gateway=host_port(*key), attempts=attempt)
                self._schedule_reconcile()
            return self._retry(attempt)

        return retry

    @staticmethod
    def tls_options(client, host):
        """The TLS options for dialing gateway C{host}; reads the files now."""
        return client_tls_options(client.server_name_for(host), client.gateway_tls_cert,
                                  client_cert_path=client.tls_cert or None,
                                  client_key_path=client.tls_key or None,
                                  insecure=client.insecure_skip_verify)

    @classmethod
    def tls_for(cls, client, key):
        """L{tls_options} for a configured gateway; C{None} for an SRV one (per target)."""
        return None if srv_name(key) is not None else cls.tls_options(client, key[0])

    def _endpoint(self, host, port):
        """
        The endpoint of one tunnel attempt to C{host:port} (or an SRV key):
        TLS to the gateway over a direct or egress proxy connection
        (L{anyproxy.client.gateway_endpoints}).  Built again on reload.
        """
        client = self.config.client
        name = srv_name((host, port))
        if name is None:
            return wrapClientTLS(self._tls[(host, port)], self._tcp_endpoint(client, host, port))
        if self.dns_resolver is None:
            self.dns_resolver = default_dns_resolver()
        tls = {}

        def target_endpoint(target_host, target_port):
            if target_host not in tls:
                tls[target_host] = self.tls_options(client, target_host)
            return wrapClientTLS(tls[target_host],
                                 self._tcp_endpoint(client, target_host, target_port))

        return SrvEndpoint(name, self.dns_resolver, target_endpoint)

    def _tcp_endpoint(self, client, host, port):
        return tcp_endpoint(self.reactor, client, host, port, resolver=self.gateway_resolver,
                            environ=self.environ)

    def add_gateway(self, host, port, tls, count=None):
        """
        Start C{count} tunnels (default C{replicas}) to C{host:port}, dialed
        with C{tls}.
        """
        client = self.config.client
        factory = ClientTunnelFactory(
            gateway_url((host, port)), self.dialer, client.client_id,
            client.group_id, client.auth_username, client.auth_password,
            ping_interval=client.ping_interval, weight=client.weight,
            group_password=client.group_password, open_ports=client.open_ports,
            routes=client.routes)
        factory.attachment_observer = self._tunnel_changed
        self.factories[(host, port)] = factory
        self._tls[(host, port)] = tls
        self._tunnels[(host, port)] = []
        self._set_replicas(host, port, client.replicas if count is None else count)

    def _set_replicas(self, host, port, count):
        services, stopped = self._tunnels[(host, port)], []
        while len(services) > count:
            stopped.append(_remove(services.pop()))
        while len(services) < count:
            endpoint = ReadyTunnelEndpoint(self._endpoint(host, port), self.factories[(host, port)])
            service = ClientService(endpoint, Factory.forProtocol(Protocol),
                                    retryPolicy=self._retry_for((host, port)), clock=self.reactor)
            service.ready_endpoint = endpoint
            service.setName(self._free_tunnel_name((host, port)))
            service.setServiceParent(self)
            services.append(service)
        return stopped

    def _free_tunnel_name(self, key):
        """
        C{"tunnel HOST:PORT #N"} with the lowest N no service in the tree
        has: one let go (draining its streams) or left alone by a re-plan
        still holds its name, and a MultiService refuses a name twice.
        """
        label, number = gateway_label(key), 1
        while "tunnel %s #%d" % (label, number) in self.namedServices:
            number += 1
        return "tunnel %s #%d" % (label, number)

    def _drop_gateway(self, key, gently):
        """
        Stop every tunnel to C{key} and forget it: L{_let_go} when
        C{gently}, else L{_remove}.  A list of Deferreds to wait for.
        """
        services = self._tunnels.pop(key)
        del self.factories[key], self._tls[key]
        if gently:
            for service in services:
                self._let_go(service)
            return []
        return [_remove(service) for service in services]

    def _let_go(self, service):
        """
        Let a tunnel's C{ClientService} go without cutting its streams:
        GOAWAY, then out of the tree once its streams are done (or after
        L{DETACH_DRAIN_TIMEOUT}), or at once if it is not connected.
        """
        tunnel = service.ready_endpoint.tunnel
        mux = tunnel.mux if tunnel is not None else None
        if mux is None or tunnel not in service.ready_endpoint._tunnel_factory.connected:
            _remove(service)
            return
        mux.go_away()
        drained = mux.when_drained()
        drained.addTimeout(DETACH_DRAIN_TIMEOUT, self.reactor)
        drained.addErrback(lambda failure: failure.trap(defer.TimeoutError))
        drained.addCallback(lambda _: service.disownServiceParent()
                            if service.parent is not None else None)

    # -- fleet attachment -----------------------------------------------

    def _tunnel_changed(self, factory, protocol):
        # A ClientTunnelFactory's attachment_observer.
        if protocol in factory.connected:
            self._failing.difference_update(
                key for key, each in self.factories.items() if each is factory)
        self._schedule_reconcile()

    def _schedule_reconcile(self):
        # Once per reactor turn, and never inside a protocol's callback.
        if self._reconcile_call is None and self.running:
            self._reconcile_call = self.reactor.callLater(0, self._reconcile_later)

    def _reconcile_later(self):
        self._reconcile_call = None
        self._reconcile()

    def stopService(self):
        if not self.running:
            # Stopped already (a second stop would stop each ClientService again).
            return defer.succeed(None)
        if self._reconcile_call is not None:
            self._reconcile_call.cancel()
            self._reconcile_call = None
        if self.logins is not None:
            self.logins.stop()  # failed logins still being delayed are answered now
        return super().stopService()

    def _connected(self, key):
        """C{[(service, tunnel)]} of the connected tunnels to C{key}, in replica order."""
        factory = self.factories[key]
        found = []
        for service in self._tunnels[key]:
            tunnel = service.ready_endpoint.tunnel
            if tunnel is not None and tunnel in factory.connected:
                found.append((service, tunnel))
        return found

    def _reconcile(self):
        """
        Bring the tunnels in line with the fleet list (see the class
        docstring).  A list of Deferreds to wait for (tunnels closed at once).
        """
        self._retire_going_away()
        with_lists = [tunnel for factory in self.factories.values()
                      for tunnel in factory.connected if getattr(tunnel, "fleet", None) is not None]
        # A gateway that sent GOAWAY is leaving: its list counts only when no
        # other is left, and its node is ranked out (_with_fleet) until a
        # list heard after the GOAWAY names it again: it came back (its
        # tunnel closing is not news).
        lists = [tunnel for tunnel in with_lists if not tunnel.mux.draining] or with_lists
        for tunnel in with_lists:
            if tunnel.mux.go_away_received is not None and tunnel.gateway_node not in self._leaving:
                self._leaving[tunnel.gateway_node] = next(_fleet_hellos)
        for tunnel in lists:
            if not tunnel.mux.draining:
                for entry in tunnel.fleet:
                    if self._leaving.get(entry.node, tunnel.fleet_order) < tunnel.fleet_order:
                        del self._leaving[entry.node]
        if lists:
            known = {}
            for tunnel in sorted(lists, key=lambda tunnel: tunnel.fleet_order):
                known.update((entry.node, entry) for entry in tunnel.fleet)
            self._known = known
            for node in set(self._leaving) - set(known):
                del self._leaving[node]
        elif any(factory.connected for factory in self.factories.values()):
            if self._known is not None:
                log.info("fleet: the gateways send no fleet list now; keeping tunnels to each "
                         "configured gateway")
            self._known = None
        # Else nothing is connected: what we knew stands.
        if self._known is None or self.config.client.gateways_per_client == 0:
            # gateways_per_client 0: stay on the configured addresses.
            return self._without_fleet()
        return self._with_fleet()

    def _retire_going_away(self):
        """
        Let go of each tunnel whose gateway sent GOAWAY (it is draining), so
        that the replica counts below start a fresh one at once: through a
        balancer, or to another node, it lands on a gateway that stays.
        """
        for key, services in self._tunnels.items():
            factory = self.factories[key]
            for service in list(services):
                tunnel = service.ready_endpoint.tunnel
                mux = getattr(tunnel, "mux", None)
                if mux is not None and mux.go_away_received is not None \
                        and tunnel in factory.connected:
                    services.remove(service)
                    self._let_go(service)

    def _without_fleet(self):
        stopped = []
        for node, entry in sorted(self.attached.items()):
            log.info("fleet: detaching from gateway {node} at {addr}: no fleet list",
                     node=node, addr=entry.addr)
        self.attached = {}
        self._adopted.clear()
        self._failing.clear()
        self._fallback = False
        replicas = self.config.client.replicas
        for key in list(self.factories):
            if key in self._configured:
                stopped.extend(self._set_replicas(key[0], key[1], replicas))
            else:
                stopped.extend(self._drop_gateway(key, gently=True))
        return stopped

    def _with_fleet(self):
        client, known = self.config.client, self._known
        self._failing &= {entry.key for entry in known.values()} | self._configured
        unreachable = {node for node, entry in known.items() if entry.key in self._failing}
        attached = dict(self.attached)
        for node, entry in list(attached.items()):
            if node in known and known[node].key != entry.key:
                log.info("fleet: detaching from gateway {node} at {addr}: it now advertises "
                         "{new}", node=node, addr=entry.addr, new=known[node].addr)
                del attached[node]
        # A leaving node is planned as if unlisted: detached, not retried.
        listed = set(known) - set(self._leaving)
        decision = attachment.plan(listed, client.client_id, client.gateways_per_client,
                                   attached, unreachable)
        for node in decision.detach:
            why = ("it is draining (GOAWAY)" if node in self._leaving
                   else "it left the fleet list" if node not in known
                   else "outranked by reachable nodes")
            log.info("fleet: detaching from gateway {node} at {addr}: {why}", node=node,
                     addr=attached[node].addr, why=why)
        for node in decision.attach:
            log.info("fleet: attaching to gateway {node} at {addr} (rank {rank} of {count} "
                     "reachable for client {client_id}; {k} wanted)", node=node,
                     addr=known[node].addr, rank=decision.chosen.index(node) + 1,
                     count=len(listed - unreachable), client_id=client.client_id,
                     k=client.gateways_per_client)
        self.attached = {node: known[node] for node in decision.attached}
        chosen = set(decision.chosen)
        node_keys = {entry.key: node for node, entry in self.attached.items()}
        fallback = not chosen
        if fallback != self._fallback:
            self._fallback = fallback
            if fallback:
                log.warn("fleet: no reachable gateway in the fleet list; dialing the "
                         "configured addresses again")
        stopped = self._bootstrap(chosen, node_keys)
        for key in list(self.factories):
            if key not in node_keys and key not in self._configured:
                stopped.extend(self._drop_gateway(key, gently=True))
        replicas = client.replicas
        for key, node in node_keys.items():
            count = replicas - self._adopted_count(node) if node in chosen else replicas
            if key in self.factories:
                stopped.extend(self._set_replicas(key[0], key[1], max(0, count)))
            elif count > 0:  # else the bootstrap tunnels that landed on it are enough
                self.add_gateway(key[0], key[1], self.tls_options(client, key[0]), count=count)
        return stopped

    def _adopted_count(self, node):
        return sum(1 for tunnel in self._adopted if tunnel.gateway_node == node)

    def _bootstrap(self, chosen, node_keys):
        """
        The tunnels to configured addresses that are no chosen node's own:
        keep those that landed on a chosen node (up to C{replicas} per
        node), let the others go once every chosen node is up, and stop
        redialing (unless no node is reachable: L{_fallback}).
        """
        client, stopped = self.config.client, []
        bootstrap = sorted(key for key in self._configured if key not in node_keys)
        kept = set()
        counts = {}
        for key in bootstrap:
            for service, tunnel in self._connected(key):
                node = tunnel.gateway_node
                if node in chosen and counts.get(node, 0) < client.replicas:
                    counts[node] = counts.get(node, 0) + 1
                    kept.add(tunnel)
                    if tunnel not in self._adopted:
                        log.info("fleet: keeping the tunnel to {gateway}: it landed on chosen "
                                 "gateway {node}", gateway=host_port(*key), node=node)
        self._adopted = kept
        if self._fallback:
            for key in bootstrap:
                stopped.extend(self._set_replicas(key[0], key[1], client.replicas))
            return stopped
        up = {node for key, node in node_keys.items()
              if key in self.factories and self._connected(key)} | set(counts)
        all_up = chosen <= up
        for key in bootstrap:
            connected = dict(self._connected(key))
            for service in list(self._tunnels[key]):
                tunnel = connected.get(service)
                if tunnel in kept:
                    continue
                if tunnel is None:
                    self._tunnels[key].remove(service)
                    stopped.append(_remove(service))
                elif all_up:
                    self._tunnels[key].remove(service)
                    log.info("fleet: letting go of the tunnel to {gateway}: it landed on "
                             "gateway {node}, which is not chosen", gateway=host_port(*key),
                             node=tunnel.gateway_node or "?")
                    self._let_go(service)
        return stopped

    def reconfigure(self, config):
        """
        Apply a reloaded L{anyproxy.config.model.Config}; see the class docstring.

        @return: a Deferred firing with a list of notes (none) once the
            tunnels to drop are closed.
        @raise anyproxy.errors.ConfigError: with nothing changed, if a
            certificate or key cannot be used.
        """
        client = config.require_client()
        routes_note = (ROUTES_RELOAD_NOTE if client.routes != self.config.client.routes
                       else None)
        configured = set(configured_gateways(client))
        nodes = {entry.key for entry in self.attached.values()}
        tls = {(host, port): self.tls_for(client, (host, port))
               for host, port in configured | (nodes & set(self.factories))}
        if any(srv_name(key) is not None for key in configured):
            # SRV targets' options are made per target when dialed: read the
            # certificate and key files now all the same, so that a bad one
            # refuses the reload instead of failing every later dial.
            # (Any host name does: only the files are checked.)
            self.tls_options(client, "localhost")
        self.config = config
        dialer = self.dialer
        dialer.set_policy(client.policy)
        dialer.connect_timeout = client.connect_timeout
        dialer.idle_timeout = client.idle_timeout
        dialer.slots.configure(limit=client.max_concurrent_conns, queue_size=client.queue_size,
                               queue_timeout=client.queue_timeout)
        self._configured = configured
        stopped = []
        for gateway in [key for key in self.factories if key not in tls]:
            stopped.extend(self._drop_gateway(gateway, gently=False))
        for (host, port), options in tls.items():
            if (host, port) not in self.factories:
                self.add_gateway(host, port, options, count=0)
                continue
            self._tls[(host, port)] = options
            self.factories[(host, port)].configure(client)
            for service in self._tunnels[(host, port)]:
                service.ready_endpoint._endpoint = self._endpoint(host, port)
        # Replicas, and the attachment under the new gateways_per_client and client id.
        stopped.extend(self._reconcile())
        for hook in list(self.reload_hooks):
            hook(config)
        moves = [self._move_listener("metrics_listener", client.metrics_endpoint, "metrics_addr"),
                 self._move_listener("status_listener", client.status_endpoint, "status_addr"),
                 defer.succeed(routes_note)]
        return defer.gatherResults(stopped + moves) \
            .addCallback(lambda results: [note for note in results if note])

    def _move_listener(self, attribute, wanted, key):
        """Re-bind the operator listener C{self.<attribute>} to C{wanted} (an endpoint string)."""
        current = getattr(self, attribute)
        if (current is None) != (wanted is None):
            return defer.succeed("client.%s: turning the %s listener on or off takes effect "
                                 "at the next restart" % (key, key.replace("_addr", "")))
        if current is None or wanted == current.description:
            return defer.succeed(None)
        new = Listener(self.reactor, wanted, current.factory, current.what)

        def moved(note):
            if note is None:
                setattr(self, attribute, new)
            return note

        return rebind(self, current, new).addCallback(moved)


def _remove(service):
    """
    Stop a tunnel's C{ClientService} and take it out of the tree.  The
    gateway hears GOAWAY first, so it picks the tunnel for no new stream
    (nothing is sent if the tunnel is already lost).
    """
    tunnel = service.ready_endpoint.tunnel
    if tunnel is not None and tunnel.mux is not None:
        tunnel.mux.go_away()
    return defer.maybeDeferred(service.disownServiceParent)


def make_client_service(config, reactor, resolver=None, gateway_resolver=None,
                        dns_resolver=None, environ=None):
    """
    The client's L{MultiService} for a validated L{anyproxy.config.model.Config}.

    @param resolver: an C{IHostnameResolver} for target names (default: the
        reactor's, i.e. the system's getaddrinfo).
    @param gateway_resolver: an C{IHostnameResolver} for the names of the
        gateways and of the egress proxy (default: the reactor's).
    @param dns_resolver: a C{twisted.names} C{IResolver} for the SRV
        records of C{srv:} gateways (default: the system's DNS, with a
        cache, made when first needed).
    @param environ: the environment C{HTTPS_PROXY}/C{NO_PROXY} are read
        from when C{client.egress_proxy} is absent (default: C{os.environ}).
    @raise anyproxy.errors.ConfigError: the environment's proxy is not a
        proxy URL.

    @return: C{(service, factories)}; C{factories} maps each gateway
        C{(host, port)} to its L{ClientTunnelFactory} (tests watch them).
    """
    client = config.require_client()
    dialer = Dialer(client.policy, reactor, connect_timeout=client.connect_timeout,
                    max_streams=client.max_concurrent_conns, resolver=resolver,
                    idle_timeout=client.idle_timeout, queue_size=client.queue_size,
                    queue_timeout=client.queue_timeout)
    factories = {}
    top = ClientRoot(reactor, config, dialer, factories)
    top.gateway_resolver, top.dns_resolver, top.environ = gateway_resolver, dns_resolver, environ
    _log_open_ports_wanted(client)
    for key in configured_gateways(client):
        log.info("gateway {gateway}: dialed {route}", gateway=gateway_label(key),
                 route=describe_route(client, key, environ))
        top.add_gateway(key[0], key[1], ClientRoot.tls_for(client, key))
    # The password checks and login throttle of the status page and metrics;
    # a reload sets its limits.
    logins = top.logins = Logins.from_config(config, reactor, role="client")
    top.reload_hooks.append(lambda config: logins.prepare(config)())
    # Prometheus metrics (anyproxy.metrics), read at scrape time; served at metrics_addr.
    top.metrics = ClientMetrics(factories, dialer)
    top.metrics_listener = None
    if client.metrics_endpoint is not None:
        # Basic auth when metrics_username is set (required off loopback, unless
        # metrics_allow_anonymous); a reload changes it for the next scrape.
        site = metrics_site(top.metrics.registry, reactor, client.metrics_username,
                            client.metrics_password)
        site.use_logins(logins)
        top.metrics_listener = Listener(reactor, client.metrics_endpoint, site, "metrics")
        top.metrics_listener.setServiceParent(top)

        def new_metrics_login(config, site=site):
            if config.client.metrics_endpoint is not None:  # else it stops at the restart
                site.set_login(config.client.metrics_username, config.client.metrics_password)

        top.reload_hooks.append(new_metrics_login)
    # The client's status page (anyproxy.client.status), on status_addr.
    add_status_page(top, reactor, client, logins)
    return top, factories
