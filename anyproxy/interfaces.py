# -*- test-case-name: tests.test_frontend_plugins -*-
"""
Interfaces that other packages may implement.

L{IFrontendFactory} is what a frontend plugin provides: the gateway finds
plugins with C{twisted.plugin.getPlugins(IFrontendFactory, anyproxy.plugins)}
(see L{anyproxy.frontends.lookup} and C{docs/FRONTENDS.md}), checks each
C{proxy.frontends} entry's options with it when the config is loaded, and
asks it for the C{IProtocolFactory} it then listens with.  A plugin needs
nothing from the gateway beyond the L{FrontendContext} it is given.

L{IReconfigurable} is the reload contract of each part of the gateway
(L{anyproxy.gateway.reconfigure}): build first, then swap.

L{ITunnelPool} is the gateway's set of client tunnels, which streams are
opened through.  L{anyproxy.gateway.tunnel_pool.TunnelPool} keeps this
gateway's tunnels in memory; a fleet registry shared by several gateways
(Redis) is a second implementation of the same interface.  Frontends never
see the pool: they get endpoints (L{anyproxy.tunnel.endpoint.TunnelEndpoint})
that wait on it.
"""

import attr
from zope.interface import Attribute, Interface


class IFrontendFactory(Interface):
    """
    A user-facing protocol on the gateway (SOCKS5, HTTP proxy, a port
    forward, ...), selected by C{name} in the config.
    """

    name = Attribute(
        "The C{type} that selects this frontend in C{proxy.frontends} "
        "(a short lowercase string such as C{'socks5'}); unique among plugins.")

    description = Attribute("One line for operators: what this frontend offers.")

    authenticates = Attribute(
        "C{True} if the protocol checks proxy credentials itself (through "
        "C{context.users}).  C{False} (or absent) means it accepts anyone: the "
        "config then refuses C{auth_username}/C{auth_password} for it and a "
        "listener that is not loopback-only needs C{allow_anonymous: true}, "
        "even when C{gateway.users} is set.")

    def check_options(options):
        """
        Check a C{proxy.frontends[N].options} mapping when the config is
        loaded.  Optional: a plugin without this method accepts any options.

        @param options: a read-only mapping parsed from YAML (C{{}} when the
            entry has none; always C{{}} for C{proxy.socks5}/C{proxy.http}).
        @raise ValueError: with a one-line reason.  Raise L{OptionError} to
            name the offending option so the error shows its key path
            (C{proxy.frontends[0].options.target_port: ...}).
        """

    def build(options, context):
        """
        Make the protocol factory for one listener.

        @param options: the mapping C{check_options} accepted.
        @param context: a L{FrontendContext}.
        @return: an C{IProtocolFactory}; the gateway listens on the
            configured C{listen_addr} with it.
        """


class IAdmittingEndpoint(Interface):
    """
    An endpoint from C{endpoint_for} whose connections count against limits
    (C{gateway.max_conns_per_user}, a listener's C{max_conns}).

    C{connect} takes a slot for the connection's whole life.  A frontend
    that keeps idle connections for reuse (the HTTP proxy's upstream pool)
    takes slots itself instead, so that only connections in use count.
    """

    def admit():
        """
        Take one slot: a Deferred firing with a release callable once one is
        free (calling it again does nothing), or failing with
        L{anyproxy.errors.StreamOpenError} C{OVERLOADED}.
        """

    def connect_admitted(protocol_factory, first_data=b""):
        """
        Connect like C{connect}, but take no slot: the caller holds one from
        L{admit} while it uses the connection and gives it back itself.

        C{first_data} (both methods take it) are the first bytes for the
        target, sent with the open where the tunnel allows (early data,
        docs/PROTOCOL.md); the protocol must not write them again.  If the
        connection fails, no target has read them.
        """


class IEarlyDataEndpoint(Interface):
    """
    An endpoint whose connection exists, and takes bytes, before it is open:
    a tunnel stream whose OPEN waits for its answer (early data,
    docs/PROTOCOL.md).
    """

    def connect_early(protocol_factory, opening):
        """
        Connect like C{connect}, and call C{opening(transport)} as soon as
        the connection exists, before it is open.  Bytes written to
        C{transport} from then on reach the target once it is connected (the
        first of them with the open, as far as the peer takes early data).
        If the target refuses or cannot be reached, no target has read them;
        if the open times out or is cancelled, the target may have them, as
        with any connection that breaks.  Nothing else may be done with
        C{transport} until the connection is made.
        """


class IReconfigurable(Interface):
    """
    A part of a running program that applies a reloaded config itself, in
    two steps, so that a reload either applies whole or changes nothing
    (L{anyproxy.gateway.reconfigure}).
    """

    def prepare(config):
        """
        Build aside everything C{config} needs that can fail (certificates
        re-read, protocol factories), changing nothing that runs.

        @param config: the reloaded L{anyproxy.config.model.Config}.
        @return: a callable taking no arguments that swaps the new values
            in, where new connections read them, and returns a Deferred
            firing with a list of notes for the log (a listener that could
            not be re-bound, a key that needs a restart).  It does not
            raise.
        @raise anyproxy.errors.ConfigError: C{config} cannot be applied;
            nothing has changed.
        """


class ITunnelPool(IReconfigurable):
    """
    The client tunnels a gateway opens streams through, by client group.

    A tunnel here is a record with at least C{client_id}, C{group},
    C{weight}, C{active_streams} and C{mux}, whose
    C{mux.open_stream(kind, host, port)} opens a stream (and with
    C{first_data=...}, given only when there are some, sends them with the
    OPEN where the peer takes early data)
    (L{anyproxy.gateway.tunnel_pool.Tunnel}).  The tunnel server adds and
    removes this gateway's tunnels; endpoints wait for one (L{wait_for});
    metrics and the status page read L{tunnels} and watch removals.  Its
    C{prepare} takes C{gateway.balance}.
    """

    removal_observers = Attribute(
        "A list of callables, each called with every tunnel taken out of the pool "
        "(metrics and the status page keep its traffic totals).")

    def add(tunnel):
        """Make C{tunnel}, connected to this gateway, available for new streams."""

    def remove(tunnel):
        """Take C{tunnel} out (it went away); tell the removal observers."""

    def tunnels(group=None):
        """The tunnels connected to this gateway, of C{group} or of all: a new list."""

    def pick(group, host=None, avoid=None):
        """
        A tunnel of C{group} for a new stream now, or C{None}.  With a
        target C{host}, only tunnels whose client routes it most
        specifically (C{client.routes}, L{anyproxy.gateway.routing}); a
        client id to C{avoid} is not chosen.
        """

    def wait_for(group, timeout, host=None):
        """
        A Deferred firing with a tunnel of C{group} for a new stream (routed
        to C{host}, as L{pick}), waiting up to C{timeout} seconds for one to
        connect; it fails with L{anyproxy.errors.StreamOpenError}
        C{NO_TUNNEL}, or at once with C{HOST_UNREACHABLE} when the group's
        clients all have routes and none routes C{host}.  Cancelling it
        stops the wait.
        """

    def retry_choice(group, host, failed, failure):
        """
        Another tunnel for a stream whose OPEN failed on tunnel C{failed}
        (C{failure}), to be tried once, or C{None}
        (L{anyproxy.gateway.tunnel_pool.TunnelPool.retry_choice}).
        """

    def routed_best(group, host, mux):
        """
        Whether the tunnel of C{mux} is still among those L{pick} chooses
        from for C{host} (a connection kept for reuse on it may be reused;
        L{anyproxy.gateway.tunnel_pool.TunnelPool.routed_best}).
        """


class OptionError(ValueError):
    """
    A bad frontend option, named so the config error can point at it.

    @ivar key: the option's name (or a dotted path inside C{options}).
    @ivar problem: what is wrong with it.
    """

    def __init__(self, key, problem):
        super().__init__("%s: %s" % (key, problem))
        self.key = key
        self.problem = problem


@attr.s(frozen=True, slots=True)
class FrontendContext:
    """
    Everything a frontend gets from the gateway, for one listener.

    @ivar name: the listener's name, for logs (C{"socks5 proxy"},
        C{"fixed-forward frontend #1"}).
    @ivar reactor: the reactor (a C{Clock}/C{MemoryReactor} in unit tests):
        use it for timers and listening, never the global one.
    @ivar users: the listener's L{anyproxy.auth.UserDatabase}: its own
        C{auth_username} plus the C{gateway.users} it takes (its C{users}
        key, L{anyproxy.config.model.ListenerConfig.user_scope}).  When C{users.required} is
        false the listener is open and every user is
        L{anyproxy.auth.ANONYMOUS}.
    @ivar endpoint_for: C{endpoint_for(user, host, port, kind="tcp")} returns
        an C{IStreamClientEndpoint} reaching C{host:port} through a tunnel to
        a client of C{user.group}.  Its C{connect} fails with
        L{anyproxy.errors.StreamOpenError} for the known reasons (access
        denied, no tunnel, refused, ...); map the reason for your users with
        L{anyproxy.errors}.  C{kind="udp"} opens a datagram stream.  The
        optional keyword C{source="host:port"} names the user's address for
        the gateway's stream list and access log.
    @ivar handshake_timeout: seconds a user may take to finish the
        protocol's handshake (C{gateway.handshake_timeout}).
    """

    name = attr.ib()
    reactor = attr.ib()
    users = attr.ib()
    endpoint_for = attr.ib()
    handshake_timeout = attr.ib(default=10.0)


def reject_unknown_options(options, known):
    """
    A C{check_options} helper: raise L{OptionError} for the first key of
    C{options} not in C{known}, so typos fail at start as elsewhere in the
    config.
    """
    for key in options:
        if key not in known:
            raise OptionError(key, "unknown option (expected %s)" % (
                "one of: %s" % (", ".join(known),) if known else "no options",))
