# -*- test-case-name: tests.test_fleet_relay -*-
"""
The links between the gateways of a fleet: a WebSocket (subprotocol
L{RELAY_SUBPROTOCOL}) over mutual TLS, carrying the same
L{anyproxy.tunnel.mux.Mux} as a client tunnel.

Theory of operation
-------------------
A link is one gateway asking another to open streams for one client group:
the dialing gateway (a user of the group arrived there, and it holds no
tunnel of the group) plays the client's part of a tunnel, the accepting
gateway the part of the client's dialer, which it serves from its own tunnels
(L{anyproxy.fleet.relay}).  So both ends reuse the tunnel's protocols: the
dialing end is a L{ClientTunnelProtocol} whose factory (L{PeerLinkFactory})
sends the link's HELLO C{{"node", "group"}} and refuses every OPEN the peer
might send; the accepting end is a L{GatewayTunnelProtocol} whose opening
handshake asks for no password (TLS has checked the peer's certificate
against the fleet CA, C{peer_ca}) and whose HELLO registers a link instead
of a tunnel (L{PeerLinkServerFactory}).  An OPEN that arrives before the HELLO
is refused by the mux (no C{on_open_request} yet).

One link per (peer node, group): the group travels once, in the HELLO, and
each link's streams are balanced by the peer over its own tunnels of that
group.  L{PeerLinks} makes links on demand within a bounded wait (concurrent
users of one group share one dial), hands the open ones out, closes those
idle for L{LINK_IDLE} seconds, and forgets a link when it goes.  Links are
pinged every C{fleet.heartbeat} seconds (dead after three silent ones, as
the registry drops a silent node), and a killed peer's TCP close ends the
link at once: either way the mux resets every stream it carries, which
closes the users' connections.

The accepting side's listener (L{PeerLinkServer}) has the tunnel port's
guards: TLS and WebSocket handshake and HELLO within
C{gateway.handshake_timeout}, and at most L{DEFAULT_MAX_HANDSHAKES}
connections before their HELLO.
"""

import attr
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketServerFactory
from autobahn.websocket.types import ConnectionDeny
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from anyproxy import __version__
from anyproxy.addresses import dial_address
from anyproxy.connection_cap import DEFAULT_MAX_HANDSHAKES, ConnectionCap, HandshakeCappedFactory
from anyproxy.errors import HelloRefused, Reason, StreamOpenError
from anyproxy.gateway.reconfigure import ReloadableServerTLS, follow_address
from anyproxy.gateway.tunnel_pool import Tunnel
from anyproxy.interfaces import IReconfigurable
from anyproxy.listeners import Listener
from anyproxy.tls import client_tls_options, server_tls_options
from anyproxy.tunnel import frames
from anyproxy.tunnel.hello import MAX_ID_LENGTH, SOFTWARE
from anyproxy.tunnel.liveness import Liveness
from anyproxy.tunnel.websocket import ClientTunnelProtocol, GatewayTunnelProtocol, tune_factory

log = Logger()

RELAY_SUBPROTOCOL = "anyproxy.relay.v1"
# Seconds a dialed link may carry no stream before it is closed.  Long
# enough that a group's users arriving now and then reuse one link, short
# enough that links to nodes no longer used do not pile up.
LINK_IDLE = 60.0
# Seconds a link may take to be dialed, TLS-verified and answered (HELLO),
# at most; a peer that does not answer in time counts as failed.
DEFAULT_LINK_WAIT = 5.0


def _link_hello_text(info, key):
    value = info.get(key) if isinstance(info, dict) else None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise HelloRefused(frames.CLOSE_BAD_HELLO, "link HELLO needs %r: a string of 1 to "
                                                   "%d characters" % (key, MAX_ID_LENGTH))
    return value


# -- the accepting side ---------------------------------------------------------


class PeerLinkServerProtocol(GatewayTunnelProtocol):
    """
    A gateway's end of a link another gateway dialed: a tunnel whose peer
    proved itself by its certificate, so the opening handshake asks for no
    credential.  The factory is a L{PeerLinkServerFactory}.
    """

    def onConnect(self, request):
        if RELAY_SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST,
                                 "subprotocol %s required" % (RELAY_SUBPROTOCOL,))
        return RELAY_SUBPROTOCOL


@implementer(IProtocolNegotiationFactory)
class PeerLinkServerFactory(HandshakeCappedFactory, WebSocketServerFactory):
    """
    Accepts links from the other gateways of the fleet and hands each OPEN
    they carry to C{relay} (L{anyproxy.fleet.relay.Relay}).

    @ivar links: the accepted links now up, as
        L{anyproxy.gateway.tunnel_pool.Tunnel} records (C{client_id}
        C{relay:NODE}).
    """

    protocol = PeerLinkServerProtocol

    def __init__(self, node_id, relay, reactor, ping_interval=2.0, handshake_timeout=10.0,
                 max_handshakes=DEFAULT_MAX_HANDSHAKES):
        super().__init__(url="wss://localhost/anyproxy-relay", protocols=[RELAY_SUBPROTOCOL],
                         server="AnyProxy")
        self.node_id = node_id
        self.relay = relay
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.handshakes = ConnectionCap(max_handshakes, "peer link listener (connections "
                                        "before their HELLO)", reactor)
        self.links = set()
        # The dialing end pings a silent link first; this end only one
        # silent for two intervals.  Three silent intervals: the link is dead.
        self.liveness = Liveness(reactor, ping_interval, is_gateway=True)
        tune_factory(self, ping_interval, handshake_timeout)

    def acceptableProtocols(self):
        # As the tunnel server's: OpenSSL refuses a handshake offering ALPN
        # when the list is empty.
        return [b"http/1.1"]

    def tunnel_connected(self, protocol, info):
        """
        Register the link behind C{protocol} from its HELLO C{{"node",
        "group"}} and answer with ours; its OPENs are relayed from now on.

        @raise HelloRefused: the HELLO is malformed.
        """
        node = _link_hello_text(info, "node")
        group = _link_hello_text(info, "group")
        link = Tunnel(client_id="relay:%s" % (node,), group=group, mux=protocol.mux,
                      address=protocol.peer, version=str(info.get("software", ""))[:64],
                      close=lambda: protocol.dropConnection(abort=True))
        protocol.mux.name = "relay:%s/%s@%s" % (node, group, protocol.peer)
        protocol.mux.on_open_request = lambda stream: self.relay.open_requested(group, stream)
        protocol.mux.send_hello({"node": self.node_id, "software": SOFTWARE})
        self.links.add(link)
        log.info("peer link up: node {node} for group {group} from {peer}", node=node,
                 group=group, peer=protocol.peer)
        return link

    def tunnel_disconnected(self, link):
        self.links.discard(link)
        log.info("peer link down: {name}", name=link.client_id + "/" + link.group)


@implementer(IReconfigurable)
@attr.s(eq=False)
class PeerLinkServer(MultiService):
    """
    The listener other gateways relay streams to (C{gateway.fleet.peer_addr}):
    mutual TLS with the fleet CA (C{peer_ca}) and this node's C{peer_cert}
    and C{peer_key}.  Build it with L{from_config}.

    A reload re-reads the certificate files, applies the handshake timeout
    and moves the listener to a new address.  Stopping it closes the links
    (GOAWAY first), resetting the streams they relay.

    @ivar factory: the L{PeerLinkServerFactory}.
    @ivar listener: the L{Listener} named L{NAME}.
    """

    NAME = "peer link listener"

    _reactor = attr.ib()
    factory = attr.ib()
    tls = attr.ib()
    listener = attr.ib(default=None)

    def __attrs_post_init__(self):
        MultiService.__init__(self)

    @classmethod
    def from_config(cls, gateway, reactor, relay):
        """The listener of a L{anyproxy.config.model.GatewayConfig} with a C{fleet}."""
        fleet = gateway.fleet
        factory = PeerLinkServerFactory(fleet.node_id, relay, reactor,
                                        ping_interval=fleet.heartbeat,
                                        handshake_timeout=gateway.handshake_timeout)
        server = cls(reactor, factory, ReloadableServerTLS(_server_tls(fleet)))
        server.listener = Listener(reactor, fleet.peer_endpoint,
                                   TLSMemoryBIOFactory(server.tls, False, factory), cls.NAME)
        server.listener.setServiceParent(server)
        return server

    def listeners(self):
        """C{{name: Listener}}: the one listener."""
        return {self.NAME: self.listener}

    def prepare(self, config):
        """See L{anyproxy.interfaces.IReconfigurable} and the class docstring."""
        gateway = config.gateway
        fleet = gateway.fleet
        if fleet is None:
            return lambda: defer.succeed(["gateway.fleet: leaving the fleet takes effect at "
                                          "the next restart"])
        tls = _server_tls(fleet)

        def apply():
            self.tls.options = tls
            self.factory.handshake_timeout = gateway.handshake_timeout
            tune_factory(self.factory, fleet.heartbeat, gateway.handshake_timeout)
            return follow_address(self._reactor, self, fleet.peer_endpoint, self.NAME)

        return apply

    def stopService(self):
        stopped = defer.maybeDeferred(super().stopService)
        closed = [link.go_away(self._reactor) for link in list(self.factory.links)]
        return defer.gatherResults([stopped] + closed).addCallback(lambda _: None)


def _server_tls(fleet):
    return server_tls_options(fleet.peer_cert, fleet.peer_key, client_ca_path=fleet.peer_ca)


# -- the dialing side -----------------------------------------------------------


class PeerLinkFactory(WebSocketClientFactory):
    """
    Builds the dialing end of one link (a L{ClientTunnelProtocol}, which asks
    its factory what to announce and tells it what happens).

    @param node_id: this node's id, announced in the HELLO.
    @param peer: the L{anyproxy.fleet.interfaces.NodeRecord} dialed.
    @param group: the client group the link's streams are for.
    @param on_lost: called with the protocol when an established link is lost.
    """

    protocol = ClientTunnelProtocol

    def __init__(self, node_id, peer, group, on_lost, ping_interval=2.0,
                 handshake_timeout=DEFAULT_LINK_WAIT, reactor=None):
        super().__init__(url="wss://%s/anyproxy-relay" % (peer.peer_addr,),
                         protocols=[RELAY_SUBPROTOCOL],
                         useragent="AnyProxy/" + __version__, reactor=reactor)
        self.node_id = node_id
        self.peer = peer
        self.group = group
        self.gateway = "peer %s (%s)" % (peer.node_id, peer.peer_addr)  # for the protocol's logs
        self._on_lost = on_lost
        # A peer cut off without a TCP close (a network split, a power loss)
        # is found by silence: pinged after one interval, dead after three.
        self.liveness = Liveness(self.reactor, ping_interval, is_gateway=False)
        tune_factory(self, ping_interval, handshake_timeout)

    def hello_info(self):
        return {"node": self.node_id, "group": self.group, "software": SOFTWARE}

    def open_requested(self, stream):
        # Streams go one way on a link: from the dialing gateway's users.
        stream.reject(Reason.NOT_ALLOWED, "a peer link carries streams one way")

    def tunnel_ready(self, protocol, info):
        log.info("peer link to {peer} for group {group} up", peer=self.gateway, group=self.group)

    def hello_updated(self, protocol, info):
        pass

    def tunnel_lost(self, protocol, reason):
        log.info("peer link to {peer} for group {group} lost: {reason}", peer=self.gateway,
                 group=self.group, reason=reason or "connection closed")
        self._on_lost(protocol)


@attr.s(eq=False)
class PeerLink:
    """
    One dialed link, open for new streams while its mux is neither lost nor
    draining.

    @ivar node_id: the peer node.
    @ivar group: the group its streams are for.
    @ivar protocol: its L{ClientTunnelProtocol}.
    @ivar last_used: when it was last handed out, or its last stream ended
        (the reactor's seconds).
    @ivar lost: C{True} once the connection is gone.
    """

    node_id = attr.ib()
    group = attr.ib()
    protocol = attr.ib(repr=False)
    last_used = attr.ib(default=0.0)
    lost = attr.ib(default=False)

    @property
    def mux(self):
        return self.protocol.mux

    @property
    def usable(self):
        """Whether new streams may go on it."""
        return not self.lost and not self.mux.draining

    def close(self):
        """Drop the connection (its streams, if any, are reset)."""
        self.protocol.dropConnection(abort=True)


class PeerLinks:
    """
    The links this gateway dialed, by (peer node, group): made on demand,
    shared, closed when idle.  See the module docstring.

    @param fleet: the L{anyproxy.config.model.FleetConfig} (node id, TLS
        files, heartbeat as the ping interval).
    @param on_link_lost: called with C{(node_id, group)} when an established
        link is lost without our closing it (the pool then avoids the node
        for a while).
    @param endpoint_for: C{endpoint_for(node_record, timeout)} -> the
        C{IStreamClientEndpoint} to dial a node with; tests replace it.
    @ivar on_link_going_away: C{None}, or called with no argument when the
        peer sends GOAWAY on one of our links (it drains): the gateway's
        frontends then close the idle upstream connections they keep on it,
        which the peer's drain would otherwise wait for.
    """

    # This node's id as the registry has it (FleetNode sets it); until then
    # gateway.fleet.node_id.
    node_id = None

    def __init__(self, reactor, fleet, link_wait=DEFAULT_LINK_WAIT, on_link_lost=None,
                 idle=LINK_IDLE, endpoint_for=None):
        self._reactor = reactor
        self.configure(fleet)
        self.link_wait = link_wait
        self.idle = idle
        self.on_link_lost = on_link_lost
        self.on_link_going_away = None
        self._endpoint_for = endpoint_for or self._tls_endpoint
        self._links = {}  # (node_id, group) -> PeerLink
        self._dialing = {}  # (node_id, group) -> Deferred of the dial in progress
        self._closing = set()  # PeerLinks we closed (idle, stop): not a failure
        self._sweeper = None

    def configure(self, fleet):
        """Use C{fleet}'s node id, TLS files and heartbeat for the next links."""
        self._fleet = fleet
        self._tls_cache = {}

    def links(self):
        """The open links (a new list)."""
        return list(self._links.values())

    def usable_link(self, node_id, group):
        """The open link to C{node_id} for C{group}, or C{None}."""
        link = self._links.get((node_id, group))
        return link if link is not None and link.usable else None

    def link_for(self, node, group):
        """
        A Deferred firing with a usable L{PeerLink} to C{node} (a
        L{anyproxy.fleet.interfaces.NodeRecord}) for C{group}: an open one,
        or one dialed now within C{link_wait} seconds.  It fails with
        L{StreamOpenError} NO_TUNNEL if the peer cannot be reached in time;
        cancelling it leaves a shared dial going for the others.
        """
        key = (node.node_id, group)
        link = self.usable_link(*key)
        if link is not None:
            link.last_used = self._reactor.seconds()
            return defer.succeed(link)
        entry = self._dialing.get(key)
        if entry is None:
            waiters = []
            dialing = self._dial(node, group)
            self._dialing[key] = (dialing, waiters)
            dialing.addBoth(self._dialed, key, waiters)
        else:
            dialing, waiters = entry

        def give_up(waiter):
            if waiter in waiters:
                waiters.remove(waiter)

        waiter = defer.Deferred(give_up)
        waiters.append(waiter)
        return waiter

    def _dialed(self, result, key, waiters):
        self._dialing.pop(key, None)
        for waiter in list(waiters):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        del waiters[:]
        return None  # every waiter has the result (a failure is theirs to handle)

    def _tls_endpoint(self, node, timeout):
        host, port = dial_address(node.peer_addr)
        tls = self._tls_cache.get(host)
        if tls is None:
            fleet = self._fleet
            tls = self._tls_cache[host] = client_tls_options(
                host, fleet.peer_ca, client_cert_path=fleet.peer_cert,
                client_key_path=fleet.peer_key)
        return wrapClientTLS(tls, HostnameEndpoint(self._reactor, host, port, timeout=timeout))

    def _dial(self, node, group):
        factory = PeerLinkFactory(self.node_id or self._fleet.node_id, node, group, self._lost,
                                  ping_interval=self._fleet.heartbeat,
                                  handshake_timeout=self.link_wait, reactor=self._reactor)
        started = self._reactor.seconds()
        d = self._endpoint_for(node, self.link_wait).connect(factory)
        d.addCallback(lambda protocol: protocol.ready)
        d.addTimeout(self.link_wait, self._reactor)

        def ready(protocol):
            link = PeerLink(node.node_id, group, protocol, last_used=self._reactor.seconds())
            protocol.peer_link = link
            self._watch_go_away(link)
            old = self._links.get((node.node_id, group))
            if old is not None and old is not link:
                self._retire(old)
            self._links[(node.node_id, group)] = link
            self._watch_idle()
            log.debug("peer link to {node} for {group} made in {ms:.1f} ms", node=node.node_id,
                      group=group, ms=(self._reactor.seconds() - started) * 1000)
            return link

        def failed(failure):
            why = ("no answer within %gs" % (self.link_wait,)
                   if failure.check(defer.TimeoutError, defer.CancelledError)
                   else failure.getErrorMessage())
            log.warn("peer link to {node} ({addr}) for group {group} failed: {why}",
                     node=node.node_id, addr=node.peer_addr, group=group, why=why)
            raise StreamOpenError(Reason.NO_TUNNEL, "peer %s unreachable: %s"
                                  % (node.node_id, why))

        return d.addCallbacks(ready, failed)

    def _watch_go_away(self, link):
        # The mux calls on_go_away once the link is draining (its streams'
        # tunnel_draining true); the protocol's own hook (a log line) first.
        mux = link.mux
        logged = mux.on_go_away

        def going_away(reason):
            if logged is not None:
                logged(reason)
            if self.on_link_going_away is not None:
                self.on_link_going_away()

        mux.on_go_away = going_away

    def _lost(self, protocol):
        link = getattr(protocol, "peer_link", None)
        if link is None:
            return
        link.lost = True
        key = (link.node_id, link.group)
        if self._links.get(key) is link:
            del self._links[key]
        if link in self._closing:
            self._closing.discard(link)
        elif self.on_link_lost is not None:
            self.on_link_lost(link.node_id, link.group)
        if not self._links:
            self._stop_sweep()

    def _retire(self, link):
        # Replaced by a new link (it went away: the peer drains): its streams
        # in flight finish first, as the peer's drain lets them.
        self._closing.add(link)
        if link.mux.stream_count and not link.lost:
            link.mux.when_drained().addBoth(lambda _: link.close())
        else:
            link.close()

    # -- idle links -------------------------------------------------------

    def _watch_idle(self):
        if self.idle > 0 and self._sweeper is None:
            self._sweeper = task.LoopingCall(self.close_idle)
            self._sweeper.clock = self._reactor
            self._sweeper.start(self.idle / 4, now=False)

    def _stop_sweep(self):
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.running:
            sweeper.stop()

    def close_idle(self):
        """Close the links that carried no stream for C{idle} seconds."""
        now = self._reactor.seconds()
        for link in list(self._links.values()):
            if link.mux.stream_count:
                link.last_used = now
            elif now - link.last_used >= self.idle or not link.usable:
                log.info("peer link to {node} for group {group}: idle; closing",
                         node=link.node_id, group=link.group)
                del self._links[(link.node_id, link.group)]
                self._retire(link)
        if not self._links:
            self._stop_sweep()

    def close_all(self):
        """Close every link (the gateway stops); their streams are reset."""
        self._stop_sweep()
        for dialing, _ in list(self._dialing.values()):
            dialing.cancel()
        for link in list(self._links.values()):
            self._closing.add(link)
            link.close()
        self._links.clear()

