# -*- test-case-name: tests.test_e2e_tcp -*-
"""
The client program: for each gateway, C{replicas} WebSocket tunnels, each kept
up by its own C{ClientService} (reconnect with exponential backoff and
jitter), all answering OPEN requests through one shared L{Dialer}.
"""

import random

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy import __version__
from anyproxy.addresses import host_port
from anyproxy.client.dialer import Dialer
from anyproxy.listeners import Listener, rebind
from anyproxy.metrics import ClientMetrics, metrics_site
from anyproxy.tls import client_tls_options
from anyproxy.tunnel import frames
from anyproxy.tunnel.hello import client_hello, read_gateway_hello
from anyproxy.tunnel.websocket import ClientTunnelProtocol, basic_authorization, tune_factory

log = Logger()


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
    @ivar port_answers: the gateway's answers to our C{open_ports}
        (L{anyproxy.tunnel.hello.PortAnswer}s, the latest for each port), or
        C{None} before it answered.
    @ivar established: tunnels that completed the handshake (metrics).
    @ivar lost: established tunnels lost since.
    @ivar retired_bytes_sent: DATA bytes the lost tunnels sent (their muxes'
        totals; the connected ones' are read live).
    @ivar retired_bytes_received: DATA bytes the lost tunnels received.
    """

    protocol = ClientTunnelProtocol
    port_answers = None
    established = lost = 0
    retired_bytes_sent = retired_bytes_received = 0

    def __init__(self, url, dialer, client_id, group, username, password,
                 ping_interval=10.0, handshake_timeout=10.0, weight=1.0, group_password="",
                 open_ports=()):
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
        self.connected = set()
        tune_factory(self, ping_interval, handshake_timeout)

    def __repr__(self):
        # The headers hold the client's password: never show them.
        return "<ClientTunnelFactory %s>" % (self.gateway,)

    def configure(self, client):
        """
        Take a reloaded L{anyproxy.config.model.ClientConfig}: credentials, HELLO
        fields and ping interval, for the tunnels connected from now on.
        """
        username, password = client.auth_username, client.auth_password
        self.headers = {"Authorization": basic_authorization(username, password)} if username else {}
        self.client_id = client.client_id
        self.group = client.group_id
        self.weight = client.weight
        self._group_password = client.group_password
        self.open_ports = tuple(client.open_ports)
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
                            self.open_ports)

    def tunnel_ready(self, protocol, info):
        hello = read_gateway_hello(info)
        self.connected.add(protocol)
        self.established += 1
        log.info("tunnel to {gateway} up (gateway {software})", gateway=self.gateway,
                 software=hello.software or "?")
        if self.open_ports:
            self.port_answers = hello.open_ports
            _log_open_ports(self.gateway, self.open_ports, hello.open_ports)

    def hello_updated(self, protocol, info):
        """A further HELLO from the gateway: entries of C{open_ports} whose answer changed."""
        update = read_gateway_hello(info).open_ports
        if not self.open_ports or update is None:
            return
        changed = {answer.key for answer in update}
        kept = [answer for answer in (self.port_answers or ()) if answer.key not in changed]
        self.port_answers = tuple(kept) + update
        _log_open_ports(self.gateway, self.open_ports, update)

    def tunnel_lost(self, protocol, reason):
        if protocol in self.connected:
            self.lost += 1
            self.retired_bytes_sent += protocol.mux.bytes_sent
            self.retired_bytes_received += protocol.mux.bytes_received
        self.connected.discard(protocol)
        log.warn("tunnel to {gateway} lost: {reason}; reconnecting", gateway=self.gateway,
                 reason=reason or "connection closed")


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

    @ivar tunnel: the L{ClientTunnelProtocol} last made ready, or C{None}.
    """

    tunnel = None

    def __init__(self, endpoint, tunnel_factory):
        self._endpoint = endpoint
        self._tunnel_factory = tunnel_factory

    def connect(self, protocol_factory):
        d = self._endpoint.connect(self._tunnel_factory)

        def opened(tunnel):
            return tunnel.ready

        def ready(tunnel):
            handle = protocol_factory.buildProtocol(tunnel.transport.getPeer())
            handle.makeConnection(tunnel.transport)
            tunnel.handle = handle
            self.tunnel = tunnel
            return handle

        return d.addCallback(opened).addCallback(ready)


class ClientRoot(MultiService):
    """
    The client program's top service: C{replicas} tunnels per gateway (one
    C{ClientService} each) sharing one L{Dialer}; built by
    L{make_client_service}.

    L{reconfigure} applies a reloaded config (L{anyproxy.twistd.reload}).  The
    dialer's access control, limits and timeouts apply to the next stream.
    Credentials, certificates, HELLO fields (client id, group, weight,
    group password, open ports) and the backoff apply when a tunnel next
    connects: a connected tunnel is not dropped for them, so its streams go
    on.  Tunnels to a gateway no longer listed, and replicas beyond a
    lowered C{replicas}, are closed; new ones are started.

    @ivar config: the L{anyproxy.config.model.Config} in force.
    @ivar factories: C{(host, port)} -> L{ClientTunnelFactory}, the dict
        L{make_client_service} returns (kept up to date).
    @ivar reload_hooks: callables given each applied config (metrics...).
    """

    metrics_listener = None  # the metrics Listener (anyproxy.metrics), if any

    def __init__(self, reactor, config, dialer, factories):
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.dialer = dialer
        self.factories = factories
        self.reload_hooks = []
        self._tunnels = {}  # (host, port) -> [ClientService], in replica order
        self._tls = {}  # (host, port) -> TLS options

    def _retry(self, attempt):
        client = self.config.client
        return backoffPolicy(initialDelay=client.reconnect_initial_delay,
                             maxDelay=client.reconnect_max_delay, factor=2.0,
                             jitter=random.random)(attempt)

    @staticmethod
    def tls_options(client, host):
        """The TLS options for dialing gateway C{host}; reads the files now."""
        return client_tls_options(client.server_name_for(host), client.gateway_tls_cert,
                                  client_cert_path=client.tls_cert or None,
                                  client_key_path=client.tls_key or None,
                                  insecure=client.insecure_skip_verify)

    def _endpoint(self, host, port):
        return wrapClientTLS(self._tls[(host, port)], HostnameEndpoint(
            self.reactor, host, port, timeout=self.config.client.connect_timeout))

    def add_gateway(self, host, port, tls):
        """Start C{replicas} tunnels to C{host:port}, dialed with C{tls}."""
        client = self.config.client
        factory = ClientTunnelFactory(
            "wss://%s/anyproxy" % (host_port(host, port),), self.dialer, client.client_id,
            client.group_id, client.auth_username, client.auth_password,
            ping_interval=client.ping_interval, weight=client.weight,
            group_password=client.group_password, open_ports=client.open_ports)
        self.factories[(host, port)] = factory
        self._tls[(host, port)] = tls
        self._tunnels[(host, port)] = []
        self._set_replicas(host, port, client.replicas)

    def _set_replicas(self, host, port, count):
        services, stopped = self._tunnels[(host, port)], []
        while len(services) > count:
            stopped.append(_remove(services.pop()))
        while len(services) < count:
            endpoint = ReadyTunnelEndpoint(self._endpoint(host, port), self.factories[(host, port)])
            service = ClientService(endpoint, Factory.forProtocol(Protocol),
                                    retryPolicy=self._retry, clock=self.reactor)
            service.ready_endpoint = endpoint
            service.setName("tunnel %s:%d #%d" % (host, port, len(services) + 1))
            service.setServiceParent(self)
            services.append(service)
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
        tls = {(host, port): self.tls_options(client, host) for host, port in client.gateway_addrs}
        self.config = config
        dialer = self.dialer
        dialer.set_policy(client.policy)
        dialer.connect_timeout = client.connect_timeout
        dialer.idle_timeout = client.idle_timeout
        dialer.slots.configure(limit=client.max_concurrent_conns, queue_size=client.queue_size,
                               queue_timeout=client.queue_timeout)
        stopped = []
        for gateway in [key for key in self.factories if key not in tls]:
            stopped.extend(_remove(service) for service in self._tunnels.pop(gateway))
            del self.factories[gateway], self._tls[gateway]
        for (host, port), options in tls.items():
            if (host, port) not in self.factories:
                self.add_gateway(host, port, options)
                continue
            self._tls[(host, port)] = options
            self.factories[(host, port)].configure(client)
            for service in self._tunnels[(host, port)]:
                service.ready_endpoint._endpoint = self._endpoint(host, port)
            stopped.extend(self._set_replicas(host, port, client.replicas))
        for hook in list(self.reload_hooks):
            hook(config)
        return defer.gatherResults(stopped + [self._move_metrics(client.metrics_endpoint)]) \
            .addCallback(lambda results: [note for note in results if note])

    def _move_metrics(self, wanted):
        current = self.metrics_listener
        if (current is None) != (wanted is None):
            return defer.succeed("client.metrics_addr: turning the metrics listener on or "
                                 "off takes effect at the next restart")
        if current is None or wanted == current.description:
            return defer.succeed(None)
        new = Listener(self.reactor, wanted, current.factory, current.what)

        def moved(note):
            if note is None:
                self.metrics_listener = new
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


def make_client_service(config, reactor, resolver=None):
    """
    The client's L{MultiService} for a validated L{anyproxy.config.model.Config}.

    @param resolver: an C{IHostnameResolver} for target names (default: the
        reactor's, i.e. the system's getaddrinfo).

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
    _log_open_ports_wanted(client)
    for host, port in client.gateway_addrs:
        top.add_gateway(host, port, ClientRoot.tls_options(client, host))
    # Prometheus metrics (anyproxy.metrics), read at scrape time; served at metrics_addr.
    top.metrics = ClientMetrics(factories, dialer)
    top.metrics_listener = None
    if client.metrics_endpoint is not None:
        # Basic auth when metrics_username is set (required off loopback, unless
        # metrics_allow_anonymous); a reload changes it for the next scrape.
        site = metrics_site(top.metrics.registry, reactor, client.metrics_username,
                            client.metrics_password)
        top.metrics_listener = Listener(reactor, client.metrics_endpoint, site, "metrics")
        top.metrics_listener.setServiceParent(top)

        def new_metrics_login(config, site=site):
            if config.client.metrics_endpoint is not None:  # else it stops at the restart
                site.set_login(config.client.metrics_username, config.client.metrics_password)

        top.reload_hooks.append(new_metrics_login)
    return top, factories
