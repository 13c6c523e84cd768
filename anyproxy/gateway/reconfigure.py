# -*- test-case-name: tests.test_reload -*-
"""
Applying a reloaded config to a running gateway (L{GatewayService.reconfigure}).

The rule is "new connections get the new config, established ones are left
alone", and a reload that cannot be applied changes nothing.  So the work is
done in two steps.  First everything that can fail is built aside: the TLS
options (certificate files are re-read even when their paths did not change,
so a renewed certificate is picked up) and the protocol factories of
frontends whose type or options changed.  A failure there raises
L{anyproxy.errors.ConfigError} and the running gateway is untouched.  Then
the new values are swapped in, in place, where new connections look for
them:

  - proxy users (listener credentials, C{gateway.users}): each listener's
    L{anyproxy.auth.UserDatabase} is refilled; a connection already let in
    keeps going, its next login (an HTTP keep-alive request) is checked
    against the new users;
  - client credentials (C{auth_*}, C{clients}): the tunnel factory's
    L{anyproxy.gateway.client_access.ClientCredentials} are replaced, and
    tunnels whose credential was removed or no longer allows their group or
    client id are closed;
  - TLS (C{tls_cert}, C{tls_key}, C{client_ca}): the tunnel listener's
    L{ReloadableServerTLS} gets the new options; each new TLS connection
    asks it, an established one keeps its session;
  - C{balance}, C{no_tunnel_wait}, C{handshake_timeout}, C{ping_interval},
    C{open_ports_allowed}, C{open_ports_interface}: read from the service's
    current config or set on the registry, factories and port forwarding,
    for the next stream, handshake, tunnel or forwarded port;
  - limits (C{max_conns_per_user}, each listener's C{max_conns},
    C{queue_size}, C{queue_timeout}): L{anyproxy.limits.Limiter.configure}
    (streams holding a slot keep it);
  - anything else other modules keep: their C{service.reload_hooks}.

Last, listeners whose address changed are re-bound: the tunnel server, the
proxy listeners, and the status page and metrics listeners (switching those
two on or off needs a restart; their logins and request deadline, set by
C{reload_hooks}, are taken at once).  The new one is
started and only once it listens is the old one stopped; C{stopListening}
closes the listening socket, not the connections accepted on it, so nobody
connected through the old address is dropped.  If the new address cannot be
bound (in use, no such interface), the old listener stays and the reload
says so.  Listeners added to the file start, removed ones stop.
"""

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.gateway.client_access import ClientCredentials, log_client_grants
from anyproxy.tls import server_tls_options
from anyproxy.tunnel.websocket import tune_factory

log = Logger()

TUNNEL_SERVER = "tunnel server"
# Listeners other modules add, moved when their address changes.
SIDE_LISTENERS = (("status page", "status_endpoint"), ("metrics", "metrics_endpoint"))


@attr.s
class FrontendRecord:
    """
    What the gateway keeps of one frontend listener, to reconfigure it.

    @ivar config: the L{anyproxy.config.model.FrontendConfig} it was last set to.
    @ivar factory: its protocol factory (from the plugin).
    @ivar users: its L{anyproxy.auth.UserDatabase}, refilled on reload.
    @ivar limits: its L{anyproxy.limits.Limiter} (C{max_conns}).
    """

    config = attr.ib()
    factory = attr.ib()
    users = attr.ib(repr=False)
    limits = attr.ib(default=None)


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


def _same_factory(old, new):
    """Whether a frontend's protocol factory can be kept (users are refilled)."""
    return old.type == new.type and dict(old.options) == dict(new.options)


def reconfigure_gateway(service, config):
    """
    Apply C{config} to the running L{GatewayService} C{service}.

    @return: a Deferred firing, once every re-bound listener listens (or
        failed to), with a list of notes for the log: one per listener
        that could not be re-bound.
    @raise anyproxy.errors.ConfigError: before anything changed, if a
        certificate or key cannot be used.
    """
    gateway = config.require_gateway()
    # 1. Build aside everything that can fail.
    tls = server_tls_options(gateway.tls_cert, gateway.tls_key,
                             client_ca_path=gateway.client_ca or None)
    wanted = {frontend.name: frontend for frontend in config.proxy.all_frontends()}
    rebuilt = {}
    for name, frontend in wanted.items():
        current = service.frontends.get(name)
        if current is None or not _same_factory(current.config, frontend):
            rebuilt[name] = service.build_frontend(frontend, config)

    # 2. Swap the new values in, where new connections read them.
    old_gateway = service.config.gateway
    service.config = config
    service.tunnel_tls.options = tls
    tunnels = service.tunnels
    tunnels.credentials = ClientCredentials.from_config(gateway)
    log_client_grants(tunnels.credentials)
    for tunnel in service.registry.tunnels():
        if not tunnels.still_allowed(tunnel):
            log.warn("closing tunnel of client {client_id} (group {group}): its credential "
                     "{credential} no longer allows it", client_id=tunnel.client_id,
                     group=tunnel.group, credential=tunnel.credential)
            tunnel.close()
    tunnels.handshake_timeout = gateway.handshake_timeout
    tune_factory(tunnels, gateway.ping_interval, gateway.handshake_timeout)
    service.registry.balance = gateway.balance
    queue = dict(queue_size=gateway.queue_size, queue_timeout=gateway.queue_timeout)
    service.user_limits.configure(limit=gateway.max_conns_per_user, **queue)
    if service.forwarding is not None:
        # Ports opened from now on; those open keep their address.
        service.forwarding.interface = gateway.open_ports_interface
    for name, record in service.frontends.items():
        frontend = wanted.get(name, record.config)
        # Also for a replaced factory: its keep-alive connections log in again.
        record.users.replace(config.gateway_users_for(frontend.listener))
        if name in wanted and name not in rebuilt:
            record.config = frontend
            record.limits.configure(limit=frontend.listener.max_conns, **queue)
            if hasattr(record.factory, "handshake_timeout"):
                record.factory.handshake_timeout = gateway.handshake_timeout
    for hook in list(service.reload_hooks):
        hook(config)

    # 3. Re-bind, start and stop listeners.
    moves = []
    if gateway.endpoint != old_gateway.endpoint:
        moves.append(service.move_listener(TUNNEL_SERVER, gateway.endpoint,
                                           service.listeners[TUNNEL_SERVER].factory))
    for name, key in SIDE_LISTENERS:
        old, new = getattr(old_gateway, key), getattr(gateway, key)
        if (old is None) != (new is None):
            moves.append(defer.succeed("gateway.%s: turning the %s on or off takes effect at "
                                       "the next restart" % (key.replace("endpoint", "addr"),
                                                             name)))
        elif old != new and name in service.listeners:
            moves.append(service.move_listener(name, new, service.listeners[name].factory))
    for name in [n for n in service.frontends if n not in wanted]:
        del service.frontends[name]
        service.listener_limits.pop(name, None)
        moves.append(service.remove_listener(name))
    for name, frontend in wanted.items():
        listener = service.listeners.get(name)
        if name in rebuilt:
            record = service.frontends[name] = rebuilt[name]
            service.listener_limits[name] = record.limits
            if listener is not None and listener.description == frontend.listener.endpoint:
                # The same address with another factory: it must be let go first.
                moves.append(service.remove_listener(name).addCallback(
                    lambda _, name=name, frontend=frontend, record=record:
                    service.move_listener(name, frontend.listener.endpoint, record.factory)))
            else:
                moves.append(service.move_listener(name, frontend.listener.endpoint,
                                                   record.factory))
        elif listener is None or listener.description != frontend.listener.endpoint:
            moves.append(service.move_listener(name, frontend.listener.endpoint,
                                               service.frontends[name].factory))
    return defer.gatherResults(moves).addCallback(
        lambda notes: [note for note in notes if note])
