# -*- test-case-name: tests.test_reload -*-
"""
Applying a reloaded config to a running gateway
(L{anyproxy.gateway.app.Gateway.reconfigure}).

The rule is "new connections get the new config, established ones are left
alone", and a reload that cannot be applied changes nothing.  Each part of
the gateway applies its own keys, in two steps
(L{anyproxy.interfaces.IReconfigurable}): C{prepare(config)} builds aside
everything that can fail and returns an C{apply} callable that swaps the
new values in, in place, where new connections look for them.
L{reconfigure_all} prepares every part before it applies any, so a failure
(L{anyproxy.errors.ConfigError}) leaves the whole gateway as it was.

Who applies what:

  - the tunnel pool (L{anyproxy.gateway.tunnel_pool}): C{balance}, for the
    next pick;
  - the limits (L{anyproxy.gateway.app.Limits}): C{max_conns_per_user},
    each listener's C{max_conns}, C{queue_size}, C{queue_timeout}, through
    L{anyproxy.limits.Limiter.configure} (streams holding a slot keep it);
  - the user endpoints (L{anyproxy.gateway.app.UserEndpoints}):
    C{no_tunnel_wait}, for the next stream;
  - the tunnel server (L{anyproxy.gateway.tunnel_server.TunnelServer}): TLS
    (C{tls_cert}, C{tls_key}, C{client_ca}; the files are re-read even when
    their paths did not change, so a renewed certificate is picked up, and
    each new TLS connection asks L{ReloadableServerTLS} for them while an
    established one keeps its session), client credentials (C{auth_*},
    C{clients}: tunnels whose credential was removed or no longer allows
    their group or client id are sent GOAWAY and closed),
    C{handshake_timeout}, C{ping_interval} and its address;
  - port forwarding (L{anyproxy.gateway.port_forwarding.forwarder}):
    C{open_ports_allowed} and C{open_ports_interface}, for ports opened from
    now on;
  - the frontends (L{anyproxy.gateway.frontend_listeners}): proxy users
    (listener credentials, C{gateway.users}: each listener's
    L{anyproxy.auth.UserDatabase} is refilled, so a keep-alive connection's
    next login is checked against the new users), C{handshake_timeout},
    frontends whose type or options changed (their factory is rebuilt in
    the first step), listeners added, removed or moved;
  - the status page and the metrics listener
    (L{anyproxy.gateway.app.OperatorPage}): their login and request
    deadline at once, their address (switching either on or off needs a
    restart, and the reload says so).

A listener whose address changed is re-bound by L{relisten}: the new one is
started and only once it listens is the old one stopped; C{stopListening}
closes the listening socket, not the connections accepted on it, so nobody
connected through the old address is dropped.  If the new address cannot be
bound (in use, no such interface), the old listener stays and the reload
says so.
"""

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from anyproxy.listeners import Listener, rebind


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    The tunnel listener's TLS options, replaceable while it listens.

    C{TLSMemoryBIOFactory} turns the options it is given into a private
    callable once, when it is built; handing it this object instead, which
    asks the current L{options} for each new connection, lets a reload
    change the certificate through public API only.

    @ivar options: an C{IOpenSSLServerConnectionCreator}
        (L{anyproxy.tls.server_tls_options}).
    """

    def __init__(self, options):
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol):
        return self.options.serverConnectionForTLS(tlsProtocol)


def reconfigure_all(parts, config):
    """
    Apply C{config} to C{parts}: prepare each, then apply each.

    @param parts: L{anyproxy.interfaces.IReconfigurable} providers, in the
        order their changes are applied.
    @return: a Deferred firing, once every re-bound listener listens (or
        failed to), with the notes of all parts for the log.
    @raise anyproxy.errors.ConfigError: before anything changed.
    """
    applies = [part.prepare(config) for part in parts]
    return defer.gatherResults([apply() for apply in applies]).addCallback(
        lambda notes: [note for each in notes for note in each if note])


def relisten(reactor, parent, old, description, factory, what):
    """
    Listen as C{what} on C{description} with C{factory} under the service
    C{parent}, instead of the listener C{old} (or none): the new listener
    listens first, and only then is C{old} stopped
    (L{anyproxy.listeners.rebind}).

    @return: a Deferred firing with C{(listener, note)}: the listener in
        force, and C{None} or, when the new address could not be bound, a
        note for the log (then C{old} is kept).
    """
    new = Listener(reactor, description, factory, what)

    def moved(note):
        return (old if note is not None else new), note

    return rebind(parent, old, new).addCallback(moved)


def follow_address(reactor, owner, description, what):
    """
    Move C{owner.listener} (a service's L{Listener}) to C{description} when
    a reload changed it (L{relisten}; the old one is kept if the new address
    cannot be bound), updating C{owner.listener}.

    @return: a Deferred firing with the notes for the log (C{[]} or one).
    """
    if description == owner.listener.description:
        return defer.succeed([])

    def moved(result):
        owner.listener, note = result
        return [note] if note else []

    return relisten(reactor, owner, owner.listener, description, owner.listener.factory,
                    what).addCallback(moved)


def restart_note(key, what):
    """The note for a listener switched on or off by a reload."""
    return "gateway.%s: turning the %s on or off takes effect at the next restart" % (key, what)
