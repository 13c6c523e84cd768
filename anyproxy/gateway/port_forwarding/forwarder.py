# -*- test-case-name: tests.test_forwarding -*-
"""
Port forwarding (C{client.open_ports}): a client asks, in its
HELLO, for gateway ports; the gateway listens on them and carries every
connection or datagram through that client's tunnel to C{local_host:local_port}
as seen from the client, where the client's access control applies as for
proxy traffic.

Theory of operation
-------------------
A forwarded port belongs to one client: the pair C{(group, client_id)}, not
one tunnel.  A client with C{replicas > 1} sends the same request on every
tunnel; the first opens the port and the others join it, and each connection
goes to the member tunnel with the fewest open streams.  The port is released
when the client's last tunnel goes away, and opened again when the client
comes back (its next HELLO asks again).  Keying on the client also means a
client that reconnects before the gateway has noticed its old tunnel is dead
(ping timeout) gets its ports at once instead of being refused by itself.

Another client asking for a port that is taken is refused; so are ports
outside C{gateway.open_ports_allowed} and ports that fail to bind.  Every
refusal is logged here and its reason goes back in the HELLO answer, where
the client logs it too.  A refused client keeps serving.  One refused only
because another client holds the port waits for it: once the holder's last
tunnel is gone and the port closed, the waiting tunnels (oldest first, those
still connected) ask again, and a tunnel granted the port that way is told in
a further HELLO from the gateway (a standby client takes over a port).

Listening is synchronous (C{listenTCP}/C{listenUDP}), so the HELLO answer can
say whether each port is open.  Forwarded ports listen on
C{gateway.open_ports_interface}: 127.0.0.1 unless the config opts in to
another address ("0.0.0.0" or "::" for every interface), as OpenSSH's
C{GatewayPorts} does for C{ssh -R}; the tunnel listener's own address, usually
public, says nothing about who should reach a client's services.

TCP: for each accepted connection a tcp stream is opened to the target
through the chosen tunnel, and the two are spliced
(L{anyproxy.splice.open_and_splice}: backpressure and half-close).  The first
L{EARLY_READ} bytes the user sends while the stream opens go to it at once
(what comes past them is held, and reading pauses, until it is open): they
cross with the OPEN as early data (docs/PROTOCOL.md), so a protocol whose
client speaks first (TLS, HTTP, SSH, most databases) saves a round trip of
the tunnel.  At most L{DEFAULT_MAX_HANDSHAKES} connections of a port wait for
their stream at once (L{ForwardedPortFactory}).  If the open fails (refused
by access control, connection refused at the client, no answer in time) the
user's connection is aborted, so the user sees a reset rather than a clean,
empty close.

UDP: see L{anyproxy.gateway.port_forwarding.udp}; each user source address gets
its own udp stream (association), ended after an idle timeout.
"""

import attr
from twisted.internet import defer, error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.addresses import address_text
from anyproxy.connection_cap import DEFAULT_MAX_HANDSHAKES, ConnectionCap, HandshakeCappedFactory
from anyproxy.dual_stack import listen_tcp, listen_udp
from anyproxy.errors import StreamOpenError
from anyproxy.interfaces import IEarlyDataEndpoint, IReconfigurable
from anyproxy.tunnel.endpoint import DEFAULT_OPEN_TIMEOUT, attach_protocol, bound_open
from anyproxy.gateway.port_forwarding.fleet_claims import Granted, Unavailable
from anyproxy.gateway.port_forwarding.udp import MAX_DATAGRAM, UDP_IDLE_TIMEOUT, UdpForwarder
from anyproxy.splice import SpliceEnd, open_and_splice
from anyproxy.tunnel.hello import (PORT_PROTOCOLS, BadPortRequest, PortRequest, gateway_hello,
                                   port_answer, read_open_ports)

log = Logger()

# What a user's connection to a forwarded port may send before its stream is
# open (then reading pauses): a TLS ClientHello, a request's head, an SSH
# banner and key exchange offer fit.  It bounds what each connection being
# opened holds; the client takes at most its early_data of it before OPEN_OK.
EARLY_READ = 16 * 1024


def _yaml_ports(ranges):
    """C{[(low, high)]} as a YAML list for C{gateway.open_ports_allowed}."""
    return "[%s]" % (", ".join(str(low) if low == high else '"%d-%d"' % (low, high)
                               for low, high in ranges),)


def _held_by(holder, owner):
    """
    How a refusal names the client holding a port: by its id only to a
    client of the same credential; another tenant's client is not named.
    Owners are C{(group, client_id, credential)}.
    """
    if len(holder) > 2 and holder[2] == owner[2]:
        return "client %s" % (holder[1],)
    return "another client"


def log_policy(config):
    """
    Say at start-up which ports clients may have forwarded, naming the key
    to add: nothing is forwarded unless C{gateway.open_ports_allowed} lists
    the port (the Go AnyProxy opened any port a client asked for).  When the
    same file holds the client section, its C{open_ports} are checked now.
    """
    gateway = config.gateway
    asked = config.client.open_ports if config.client is not None else ()
    missing = sorted({port.remote_port for port in asked
                      if not gateway.port_allowed(port.remote_port)})
    if missing:
        log.warn("port forwarding: client.open_ports asks for port(s) {ports}, which "
                 "gateway.open_ports_allowed does not list, so they will be refused; to "
                 "forward them, set gateway.open_ports_allowed: {wanted}",
                 ports=", ".join(str(port) for port in missing),
                 wanted=_yaml_ports(list(gateway.open_ports_allowed)
                                    + [(port, port) for port in missing]))
    elif not gateway.open_ports_allowed:
        log.info("port forwarding is off: clients' open_ports are refused until "
                 "gateway.open_ports_allowed lists the ports, e.g. "
                 "gateway.open_ports_allowed: [8000, \"9000-9100\"]")
    else:
        log.info("port forwarding: clients may open ports {ports} (gateway.open_ports_allowed) "
                 "on {interface}", ports=_yaml_ports(gateway.open_ports_allowed),
                 interface=gateway.open_ports_interface)


# -- streams through one chosen tunnel -----------------------------------------


@implementer(IStreamClientEndpoint, IEarlyDataEndpoint)
class BoundTunnelEndpoint:
    """
    Like L{anyproxy.tunnel.endpoint.TunnelEndpoint}, but through one given
    tunnel (the forwarding client's) rather than any tunnel of a group.
    """

    def __init__(self, tunnel, clock, host, port, kind="tcp", open_timeout=DEFAULT_OPEN_TIMEOUT):
        self.tunnel = tunnel
        self._clock = clock
        self.host = host
        self.port = port
        self.kind = kind
        self._open_timeout = open_timeout

    def connect(self, protocol_factory):
        d = self.tunnel.mux.open_stream(self.kind, self.host, self.port)
        d = bound_open(d, self._open_timeout, self._clock)
        return d.addCallback(attach_protocol, protocol_factory)

    def connect_early(self, protocol_factory, opening):
        """See L{IEarlyDataEndpoint.connect_early}: C{opening} gets the stream."""
        try:
            stream = self.tunnel.mux.start_stream(self.kind, self.host, self.port)
        except StreamOpenError:
            return defer.fail()
        opening(stream)
        d = bound_open(stream.opened, self._open_timeout, self._clock)
        return d.addCallback(attach_protocol, protocol_factory)


@attr.s(eq=False)
class Route:
    """One tunnel of the owning client, and the target it asked for."""

    tunnel = attr.ib()
    request = attr.ib()

    def endpoint(self, clock, open_timeout=DEFAULT_OPEN_TIMEOUT):
        request = self.request
        if request.protocol == "udp":
            # An association's OPEN names no target; each datagram does.
            host, port = "0.0.0.0", 0
        else:
            host, port = request.local_host, request.local_port
        return BoundTunnelEndpoint(self.tunnel, clock, host, port, kind=request.protocol,
                                   open_timeout=open_timeout)


# -- TCP ------------------------------------------------------------------------


class ForwardedConnection(SpliceEnd):
    """A user's connection to a forwarded TCP port, spliced to a tunnel stream."""

    # Whether this connection counts in factory.handshakes (until its stream
    # is open, or it fails or closes).
    holds_handshake_place = False

    def connectionMade(self):
        forward = self.factory.forward
        route = forward.pick_route()
        if route is None:  # the client left while we were accepting
            self.transport.abortConnection()
            return
        forward.connections.add(self)
        self._where = "%s (client %s) %s -> %s" % (
            forward.label, route.tunnel.client_id, address_text(self.transport.getPeer()),
            route.request.target)
        # The user's first bytes go with the OPEN; past EARLY_READ, reading
        # pauses until the stream is open.
        opening = open_and_splice(self, route.endpoint(forward.clock, forward.open_timeout),
                                  read_while_opening=EARLY_READ, early_data=True)
        opening.addCallbacks(self._spliced, self._failed)

    def _spliced(self, target):
        self._opened()
        if target is not None:  # None: the user left first
            log.info("forwarded port {where}: connected", where=self._where)

    def _failed(self, failure):
        self._opened()
        # A reset tells the user more than a clean, empty close.
        log.info("forwarded port {where}: {why}", where=self._where, why=failure.getErrorMessage())
        self.transport.abortConnection()

    def _opened(self):
        if self.holds_handshake_place:
            self.holds_handshake_place = False
            self.factory.handshakes.leave()

    def connectionLost(self, reason):
        self._opened()
        self.factory.forward.connections.discard(self)
        super().connectionLost(reason)  # cancels an open in progress


class ForwardedPortFactory(HandshakeCappedFactory, Factory):
    """
    Builds the L{ForwardedConnection}s of one forwarded TCP port.  At most
    L{DEFAULT_MAX_HANDSHAKES} of them wait for their stream to open at once
    (each holds up to L{EARLY_READ} bytes and one read meanwhile); beyond
    that a new connection is closed at once.
    """

    protocol = ForwardedConnection
    noisy = False

    def __init__(self, forward, clock):
        self.forward = forward
        self.handshakes = ConnectionCap(
            DEFAULT_MAX_HANDSHAKES, "forwarded port %s (connections whose stream is opening)"
            % forward.label, clock)


class ForwardedPort:
    """
    One open forwarded port: its listener, the owning client and its routes.

    @ivar connections: the open L{ForwardedConnection}s (TCP).
    """

    def __init__(self, request, owner, clock, open_timeout=DEFAULT_OPEN_TIMEOUT):
        self.key = request.key
        self.label = request.label
        self.protocol = request.protocol
        self.owner = owner
        self.clock = clock
        self.open_timeout = open_timeout
        self.routes = []
        self.connections = set()
        self.listening = None
        self.udp = None  # the udp.UdpForwarder of a udp port

    @property
    def client_id(self):
        return self.owner[1]

    def pick_route(self):
        """
        The route whose tunnel has the fewest open streams, or C{None}.
        Tunnels going away (GOAWAY sent or received) open no new streams.
        """
        routes = [route for route in self.routes if not route.tunnel.draining]
        if not routes:
            return None
        return min(routes, key=lambda route: route.tunnel.active_streams)

    def route_for(self, tunnel):
        for route in self.routes:
            if route.tunnel is tunnel:
                return route
        return None

    def close(self):
        """Stop listening and end what is in flight; a Deferred firing when released."""
        listening, self.listening = self.listening, None
        if self.udp is not None:
            self.udp.end_all()
        for connection in list(self.connections):
            connection.transport.abortConnection()
        if listening is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listening.stopListening)


# -- the manager ----------------------------------------------------------------

# What an answer means for the tunnel that asked: granted; refused while
# another client (or gateway) holds the port, or while the fleet registry
# cannot decide, both of which wait and are asked again; refused for good.
GRANTED, HELD, UNDECIDED, FINAL = "granted", "held", "undecided", "final"


@attr.s(frozen=True, slots=True)
class _Answer:
    """One entry's answer: its JSON for the HELLO and its kind (see L{GRANTED} etc.)."""

    json = attr.ib()
    kind = attr.ib()


@implementer(IReconfigurable)
class PortForwarding:
    """
    Every forwarded port of one gateway.

    @param reactor: an C{IReactorTCP} + C{IReactorUDP} + C{IReactorTime}.
    @param port_allowed: C{port -> bool}, normally
        L{anyproxy.config.model.GatewayConfig.port_allowed}.
    @param interface: the address forwarded ports listen on
        (C{gateway.open_ports_interface}).  A reload (L{prepare}) changes
        it and C{port_allowed} for ports opened afterwards; open ones keep
        their address.
    @param udp_idle_timeout: seconds without a datagram either way before a
        UDP source's association is ended.
    @param claims: in a fleet, the
        L{anyproxy.gateway.port_forwarding.fleet_claims.FleetPortClaims} a
        port is claimed through before it is opened (see L{use_fleet});
        C{None}: this gateway alone decides.
    """

    def __init__(self, reactor, port_allowed, interface="127.0.0.1",
                 open_timeout=DEFAULT_OPEN_TIMEOUT,
                 udp_idle_timeout=None, claims=None, credential_port_allowed=None):
        self._reactor = reactor
        self._port_allowed = port_allowed
        # (credential name, port) -> bool: a gateway.clients entry's own
        # open_ports_allowed, so that one tenant cannot take a port meant
        # for another's clients once it is free.
        self._credential_port_allowed = credential_port_allowed or (lambda credential, port: True)
        self.interface = interface
        self._open_timeout = open_timeout
        self._udp_idle_timeout = (udp_idle_timeout if udp_idle_timeout is not None
                                  else UDP_IDLE_TIMEOUT)
        self._forwards = {}
        self._by_tunnel = {}
        # key -> [(tunnel, PortRequest)] refused while another client held it
        # (or, in a fleet, while the registry could not decide)
        self._waiting = {}
        self._claiming = {}  # key -> (owner, [(tunnel, PortRequest, Deferred)]): fleet claim asked
        self._tunnels = set()  # connected tunnels that asked for ports
        self._told = {}  # (tunnel, key) -> kind of the last answer it was given
        self._retry_call = None
        self._stopped = False
        self.claims = None
        if claims is not None:
            self.use_fleet(claims)

    def use_fleet(self, claims):
        """
        Decide ports fleet-wide from now on: a port is opened only once
        C{claims} (a L{anyproxy.gateway.port_forwarding.fleet_claims.FleetPortClaims})
        holds its number for the client.
        """
        self.claims = claims
        claims.on_lost = self._port_lost

    def prepare(self, config):
        """
        The reload step (L{anyproxy.interfaces.IReconfigurable}):
        C{gateway.open_ports_allowed} and C{open_ports_interface}.
        """
        gateway = config.gateway

        def apply():
            self._port_allowed = gateway.port_allowed
            self._credential_port_allowed = gateway.credential_port_allowed
            self.interface = gateway.open_ports_interface
            return defer.succeed([])

        return apply

    def forwards(self):
        """C{{(port, protocol): client_id}} of the open ports (a snapshot)."""
        return {key: forward.client_id for key, forward in self._forwards.items()}

    def port_for(self, port, protocol="tcp"):
        """The L{ForwardedPort} of C{port/protocol}, or C{None}."""
        return self._forwards.get((port, protocol))

    def tunnel_connected(self, tunnel, requested):
        """
        Open the ports a new tunnel's HELLO asked for.

        @param requested: the HELLO's C{open_ports}
            (L{anyproxy.tunnel.hello.ClientHello.open_ports}, or as received;
            C{None}: not asked).
        @return: the C{open_ports} list for our HELLO answer, or C{None}.
            In a fleet, an entry whose claim the registry has not decided
            yet is left out; its answer follows in a further HELLO.
        """
        requested = read_open_ports(requested)
        if requested is None:
            return None
        self._tunnels.add(tunnel)
        inline = []
        collecting = [True]  # answers decided before we return go in the first HELLO

        def deliver(answer, request):
            if collecting[0]:
                self._note_told(tunnel, request, answer)
                inline.append(answer.json)
            else:
                self._tell(tunnel, request, answer)

        for request in requested:
            self._open(tunnel, request).addCallback(deliver, request)
        collecting[0] = False
        self._schedule_retry()
        return inline

    def _note_told(self, tunnel, request, answer):
        if isinstance(request, PortRequest):
            self._told[(tunnel, request.key)] = answer.kind

    def _tell(self, tunnel, request, answer):
        """
        Send C{tunnel} a further HELLO with C{answer}, unless it was gone,
        or is still waiting as it was told last time (no news).
        """
        if tunnel not in self._tunnels:
            return
        told = self._told.get((tunnel, request.key))
        self._note_told(tunnel, request, answer)
        if answer.kind in (HELD, UNDECIDED) and told == answer.kind:
            return
        tunnel.mux.send_hello(gateway_hello([answer.json], software=None))

    def _open(self, tunnel, request):
        """A Deferred firing with the L{_Answer} to C{request}, at once unless a claim is asked."""
        if isinstance(request, BadPortRequest):
            return defer.succeed(self._refuse(
                tunnel, request, "bad open_ports entry: %s" % (request.problem,)))
        if self._stopped:
            return defer.succeed(self._refuse(tunnel, request, "the gateway is stopping"))
        if not self._port_allowed(request.remote_port):
            return defer.succeed(self._refuse(
                tunnel, request, "port %s is not in the gateway's open_ports_allowed"
                " (add %d to gateway.open_ports_allowed)" % (request.label, request.remote_port)))
        credential = getattr(tunnel, "credential", None)
        if not self._credential_port_allowed(credential, request.remote_port):
            return defer.succeed(self._refuse(
                tunnel, request, "port %s is not in the open_ports_allowed of this client's "
                "credential (gateway.clients)" % (request.label,)))
        # The credential is part of the owner: another credential allowed the
        # same group may announce the same client_id, and must not join (and
        # take connections of) a port this client holds.
        owner = (tunnel.group, tunnel.client_id, tunnel.credential)
        forward = self._forwards.get(request.key)
        claiming = self._claiming.get(request.key)
        holder = forward.owner if forward is not None else claiming[0] if claiming else None
        if holder is not None and holder != owner:
            self._wait(tunnel, request)
            return defer.succeed(self._refuse(
                tunnel, request, "port %s already forwarded for %s" % (
                    request.label, _held_by(holder, owner)), HELD))
        if (forward is not None and forward.route_for(tunnel) is not None) or (
                claiming is not None and any(t is tunnel for t, _, _ in claiming[1])):
            return defer.succeed(self._refuse(
                tunnel, request, "port %s asked for twice" % (request.label,)))
        if forward is not None:
            return defer.succeed(self._join(forward, tunnel, request))
        if claiming is not None:
            answer = defer.Deferred()
            claiming[1].append((tunnel, request, answer))
            return answer
        if self.claims is None:
            return defer.succeed(self._open_port(owner, [(tunnel, request)])[0])
        answer = defer.Deferred()
        self._claiming[request.key] = (owner, [(tunnel, request, answer)])
        deciding = self.claims.acquire(request.remote_port, request.protocol, owner)
        deciding.addCallback(self._decided, request.key)
        deciding.addErrback(lambda failure: log.failure(
            "port forwarding: a claim's answer could not be applied", failure))
        return answer

    def _open_port(self, owner, members):
        """
        Listen on the port the C{(tunnel, PortRequest)} C{members} of
        C{owner} asked for, and join them to it.

        @return: their L{_Answer}s, in order; refusals if it cannot listen.
        """
        request = members[0][1]
        forward = ForwardedPort(request, owner, self._reactor, self._open_timeout)
        try:
            self._listen(forward, request)
        except error.CannotListenError as e:
            if self.claims is None:
                return [self._refuse(tunnel, each, "cannot listen on port %s: %s"
                                     % (each.label, e.socketError or e))
                        for tunnel, each in members]
            # In a fleet the port may be held by a gateway of this host that
            # has just let its claim go and not yet closed it: ask again.
            self.claims.release(request.remote_port, request.protocol, owner)
            answers = []
            for tunnel, each in members:
                self._wait(tunnel, each)
                answers.append(self._refuse(
                    tunnel, each, "cannot listen on port %s: %s (asked again every %g s)"
                    % (each.label, e.socketError or e, self.claims.retry_interval), UNDECIDED))
            return answers
        self._forwards[request.key] = forward
        return [self._join(forward, tunnel, each) for tunnel, each in members]

    def _join(self, forward, tunnel, request):
        forward.routes.append(Route(tunnel, request))
        self._by_tunnel.setdefault(tunnel, []).append(request.key)
        log.info("forwarding port {port} on {interface} to {target} through client {client_id}",
                 port=request.label, interface=self.interface or "*", target=request.target,
                 client_id=tunnel.client_id)
        return _Answer(port_answer(request, True), GRANTED)

    def _decided(self, outcome, key):
        """The fleet's answer to the claim of C{key}: open it, or refuse and wait."""
        owner, members = self._claiming.pop(key)
        members = [member for member in members if member[0] in self._tunnels]
        number, protocol = key
        if isinstance(outcome, Granted):
            if self._stopped or not members:
                # Nobody wants it any more (the tunnels left while it was asked).
                self.claims.release(number, protocol, owner)
                answers = [self._refuse(tunnel, request, "the gateway is stopping")
                           for tunnel, request, _ in members]
            else:
                answers = self._open_port(owner, [(tunnel, request)
                                                  for tunnel, request, _ in members])
        else:
            why, kind = self._fleet_refusal(outcome, owner)
            answers = []
            for tunnel, request, _ in members:
                self._wait(tunnel, request)
                answers.append(self._refuse(tunnel, request, why % (request.label,), kind))
        for (_, _, answered), answer in zip(members, answers):
            answered.callback(answer)
        self._schedule_retry()

    def _fleet_refusal(self, outcome, owner):
        """C{(why, kind)} for a claim not granted; C{why} has a C{%s} for the port's label."""
        if isinstance(outcome, Unavailable):
            return ("port %%s not opened yet: the fleet registry cannot decide who holds it "
                    "(%s); asked again when it answers" % (outcome.why,), UNDECIDED)
        node_id = outcome.node_id
        if outcome.owner is None:
            return "port %s already forwarded through another gateway of the fleet", HELD
        if outcome.owner == owner:
            return ("port %%s already forwarded for this client through gateway %s; it moves "
                    "here if that gateway lets it go" % (node_id,), HELD)
        where = "" if node_id == self.claims.node_id else " (through gateway %s)" % (node_id,)
        return "port %%s already forwarded for %s%s" % (_held_by(outcome.owner, owner), where), HELD

    def _wait(self, tunnel, request):
        waiting = self._waiting.setdefault(request.key, [])
        if not any(waiter is tunnel for waiter, _ in waiting):
            waiting.append((tunnel, request))

    def _refuse(self, tunnel, request, why, kind=FINAL):
        log.warn("client {client_id}: port forwarding refused: {why}",
                 client_id=tunnel.client_id, why=why)
        return _Answer(port_answer(request, False, why), kind)

    def _listen(self, forward, request):
        if request.protocol == "tcp":
            forward.listening = listen_tcp(  # "::": dual-stack
                self._reactor, request.remote_port, ForwardedPortFactory(forward, self._reactor),
                interface=self.interface)
        else:
            forward.udp = UdpForwarder(forward, self._reactor, self._udp_idle_timeout)
            forward.listening = listen_udp(
                self._reactor, request.remote_port, forward.udp, interface=self.interface,
                maxPacketSize=MAX_DATAGRAM)

    def tunnel_disconnected(self, tunnel):
        """
        Take C{tunnel} out of its ports; release those it was the last route of.

        @return: a Deferred firing once the released ports are closed.
        """
        self._tunnels.discard(tunnel)
        for key in [key for each, key in self._told if each is tunnel]:
            del self._told[(tunnel, key)]
        for key, waiting in list(self._waiting.items()):
            waiting[:] = [(waiter, request) for waiter, request in waiting if waiter is not tunnel]
            if not waiting:
                del self._waiting[key]
        closing = []
        for key in self._by_tunnel.pop(tunnel, ()):
            forward = self._forwards.get(key)
            route = forward.route_for(tunnel) if forward is not None else None
            if route is None:
                continue
            forward.routes.remove(route)
            if not forward.routes:
                del self._forwards[key]
                log.info("released port {port} (client {client_id} gone)",
                         port=forward.label, client_id=forward.client_id)
                closed = forward.close()
                closed.addCallback(lambda _, key=key, owner=forward.owner:
                                   self._released(key, owner))
                closing.append(closed)
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    def _released(self, key, owner):
        """A port is closed: give its fleet claim back, then hand it over here."""
        # Closed first: a gateway of the same host taking the claim can bind.
        if self.claims is not None:
            self.claims.release(key[0], key[1], owner)
        self._hand_over(key)

    def _hand_over(self, key):
        """A released port is closed: the tunnels waiting for it ask again, in order."""
        waiting = self._waiting.pop(key, [])
        if self._stopped or key in self._forwards or key in self._claiming:
            # Stopping, or the owner came back before the port closed.
            if waiting and not self._stopped:
                self._waiting[key] = waiting
            return
        for tunnel, request in waiting:
            # Another client's is refused and waits again (no news: not told
            # again); a grant or a refusal for good is told in a further HELLO.
            self._open(tunnel, request).addCallback(
                lambda answer, tunnel=tunnel, request=request: self._tell(tunnel, request, answer))

    def _schedule_retry(self):
        """
        In a fleet, ask again for ports refused for a fleet reason (held
        through another gateway, or undecided) every C{retry_interval}:
        nothing tells us when another gateway lets one go.
        """
        if self.claims is None or self._stopped:
            return
        if self._retry_call is not None and self._retry_call.active():
            return
        if any(key not in self._forwards and key not in self._claiming for key in self._waiting):
            self._retry_call = self._reactor.callLater(self.claims.retry_interval, self._retry)

    def _retry(self):
        self._retry_call = None
        for key in list(self._waiting):
            if key not in self._forwards and key not in self._claiming:
                self._hand_over(key)
        self._schedule_retry()

    def _port_lost(self, number, owner):
        """
        The fleet gave C{number} to another gateway under us (Redis lost
        its data meanwhile): stop forwarding it; its tunnels wait for it again.
        """
        for protocol in PORT_PROTOCOLS:
            key = (number, protocol)
            forward = self._forwards.get(key)
            if forward is None or forward.owner != owner:
                continue
            del self._forwards[key]
            log.warn("port {port}: now forwarded through another gateway of the fleet; "
                     "closed here", port=forward.label)
            for route in forward.routes:
                keys = self._by_tunnel.get(route.tunnel, [])
                if key in keys:
                    keys.remove(key)
                self._wait(route.tunnel, route.request)
                self._tell(route.tunnel, route.request, self._refuse(
                    route.tunnel, route.request, "port %s is now forwarded through another "
                    "gateway of the fleet" % (forward.label,), HELD))
            forward.close()
        self._schedule_retry()

    def stop_accepting(self):
        """
        Stop taking users on forwarded ports, and open none from now on (a
        drain, before this gateway's claims leave the fleet registry: another
        gateway may then take the ports).  TCP connections already accepted
        go on; a UDP port's associations end with it.  A Deferred.
        """
        self._stopped = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        closing = []
        for forward in self._forwards.values():
            listening, forward.listening = forward.listening, None
            if forward.udp is not None:
                forward.udp.end_all()
            if listening is not None:
                closing.append(defer.maybeDeferred(listening.stopListening))
        if closing:
            log.info("forwarded ports closed to new users (draining): {ports}",
                     ports=", ".join(forward.label for forward in self._forwards.values()))
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    def stop(self):
        """Release every port (the gateway is stopping); a Deferred."""
        self._stopped = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        forwards, self._forwards = list(self._forwards.values()), {}
        self._by_tunnel.clear()
        self._waiting.clear()
        for forward in forwards:
            log.info("released port {port} (gateway stopping)", port=forward.label)
        closing = [forward.close() for forward in forwards]
        released = defer.gatherResults(closing, consumeErrors=True)
        if self.claims is not None:
            released.addCallback(lambda _: self.claims.release_all())
        return released.addCallback(lambda _: None)
