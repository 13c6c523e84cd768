# -*- test-case-name: tests.test_reload -*-
"""
The gateway's user-facing listeners: one per frontend, that is per
C{proxy.socks5}, C{proxy.http} and C{proxy.frontends} entry
(C{docs/FRONTENDS.md}).

L{Frontends} asks each entry's plugin (L{anyproxy.frontends.lookup}) for a
protocol factory, handing it a L{anyproxy.interfaces.FrontendContext}: the
listener's users and an C{endpoint_for} that opens streams through the
tunnels.  That context is all a frontend gets from the gateway; it never
sees the tunnel pool.  L{Frontends} listens with each factory and applies a
reload to them (see L{Frontends.prepare}).
"""

import functools
import weakref

import attr
from twisted.application.service import MultiService
from twisted.internet import defer
from zope.interface import implementer

from anyproxy.auth import UserDatabase
from anyproxy.frontends.lookup import find_frontend
from anyproxy.gateway.reconfigure import relisten
from anyproxy.interfaces import FrontendContext, IReconfigurable
from anyproxy.listeners import Listener, remove_child


@attr.s(eq=False)
class FrontendRecord:
    """
    What the gateway keeps of one frontend listener, to reconfigure it.

    @ivar config: the L{anyproxy.config.model.FrontendConfig} it was last set to.
    @ivar factory: its protocol factory (from the plugin).
    @ivar users: its L{anyproxy.auth.UserDatabase}, refilled on reload.
    @ivar listener: its L{anyproxy.listeners.Listener}, or C{None} when a
        reload could not bind its new address.
    """

    config = attr.ib()
    factory = attr.ib()
    users = attr.ib(repr=False)
    listener = attr.ib(default=None)


def _call_hook(factory, name):
    """Call C{factory.name()} if the frontend's factory has it (an optional hook)."""
    hook = getattr(factory, name, None)
    if hook is not None:
        hook()


def _same_factory(old, new):
    """Whether a frontend's protocol factory can be kept (users are refilled)."""
    return old.type == new.type and dict(old.options) == dict(new.options)


@implementer(IReconfigurable)
@attr.s(eq=False)
class Frontends(MultiService):
    """
    The frontend listeners of a gateway, by listener name.  Build it with
    L{from_config}.

    @ivar records: C{{listener name: FrontendRecord}}.
    """

    _reactor = attr.ib()
    # endpoint_for(user, host, port, kind="tcp", frontend=name): the gateway's
    # (anyproxy.gateway.app.UserEndpoints.endpoint_for).
    _endpoint_for = attr.ib()
    _group_logins = attr.ib()  # anyproxy.auth.GroupLogins, or None
    _metrics = attr.ib()  # anyproxy.metrics.GatewayMetrics: series per frontend
    records = attr.ib(factory=dict)
    # anyproxy.auth.Logins: the gateway's password checks and login throttle.
    logins = attr.ib(default=None)
    # Set once the gateway drains: the factories keep no idle upstream connection.
    draining = attr.ib(default=False, init=False)
    # The users of listeners replaced or removed by a reload -> the frontend
    # config to fill them from: their open connections keep logging in with
    # them, so every later reload refills them too.  Weak: gone with the
    # last such connection.
    _retired = attr.ib(factory=weakref.WeakKeyDictionary, init=False)

    def __attrs_post_init__(self):
        MultiService.__init__(self)

    @classmethod
    def from_config(cls, config, reactor, endpoint_for, group_logins, metrics, logins=None):
        """The listeners of every frontend of the L{anyproxy.config.model.Config}."""
        frontends = cls(reactor, endpoint_for, group_logins, metrics, logins=logins)
        for frontend in config.proxy.all_frontends():
            record = frontends.build(frontend, config)
            frontends._metrics.add_frontend(frontend.name)
            record.listener = frontends._listener(frontend, record.factory)
            record.listener.setServiceParent(frontends)
            frontends.records[frontend.name] = record
        return frontends

    def build(self, frontend, config):
        """
        A new L{FrontendRecord} for C{frontend} (not listening yet); nothing
        running changes.

        @raise Exception: whatever the plugin's C{build} raises.
        """
        users = UserDatabase(config.gateway_users_for(frontend.listener),
                             group_logins=self._group_logins, logins=self.logins,
                             require_login=frontend.listener.require_login)
        context = FrontendContext(
            name=frontend.name, reactor=self._reactor,
            endpoint_for=functools.partial(self._endpoint_for, frontend=frontend.name),
            users=users, handshake_timeout=config.gateway.handshake_timeout)
        factory = find_frontend(frontend.type).build(frontend.options, context)
        if self.draining:  # a reload during the drain
            _call_hook(factory, "stop_keeping_upstreams")
        return FrontendRecord(frontend, factory, users)

    def _listener(self, frontend, factory):
        return Listener(self._reactor, frontend.listener.endpoint, factory, frontend.name)

    def factories(self):
        """C{{listener name: protocol factory}} (metrics report each one's counters)."""
        return {name: record.factory for name, record in self.records.items()}

    def listeners(self):
        """C{{listener name: Listener}} of those listening."""
        return {name: record.listener for name, record in self.records.items()
                if record.listener is not None}

    def stop_accepting(self):
        """
        Close every listener (a draining gateway, L{anyproxy.gateway.drain}):
        new connections are refused, those accepted go on.  The listeners
        stay children, so the service's own stop finds them stopped.  HTTP
        listeners let their idle upstream connections go as they stop.

        @return: a Deferred firing once every listening socket is closed.
        """
        stopping = [defer.maybeDeferred(listener.stopService)
                    for listener in self.listeners().values()]
        return defer.gatherResults(stopping).addCallback(lambda _: None)

    def connections_in_handshake(self):
        """Users' connections accepted and still in their handshake, on every listener."""
        total = 0
        for record in self.records.values():
            cap = getattr(record.factory, "handshakes", None)
            if cap is not None:
                total += cap.count
        return total

    def stop_keeping_upstreams(self):
        """
        The gateway drains: every factory that keeps idle upstream
        connections for reuse (the HTTP proxy's C{upstream_keepalive})
        closes them now and keeps none from now on, so the drain waits only
        for exchanges in flight (a factory's optional
        C{stop_keeping_upstreams()}).
        """
        self.draining = True
        for record in self.records.values():
            _call_hook(record.factory, "stop_keeping_upstreams")

    def tunnel_going_away(self):
        """
        A tunnel's far end sent GOAWAY (a peer gateway draining): every
        factory closes the idle upstream connections it keeps on such
        tunnels (a factory's optional C{tunnel_going_away()}), so that peer
        need not wait for them.
        """
        for record in self.records.values():
            _call_hook(record.factory, "tunnel_going_away")

    def prepare(self, config):
        """
        See L{anyproxy.interfaces.IReconfigurable}.

        First, the factories of frontends that are new or whose type or
        options changed are built.  Then every listener's users are
        refilled (a removed or replaced listener's too, at this reload and
        every later one: its connections stay up and log in again on their
        next request), the kept factories get the new
        C{handshake_timeout}, and listeners are removed, added, re-bound
        (a new address) or replaced (a new factory on the same address: the
        old one is let go first).
        """
        wanted = {frontend.name: frontend for frontend in config.proxy.all_frontends()}
        rebuilt = {}
        for name, frontend in wanted.items():
            current = self.records.get(name)
            if current is None or not _same_factory(current.config, frontend):
                rebuilt[name] = self.build(frontend, config)

        def apply():
            self._refill(config, wanted, rebuilt)
            for name, record in self.records.items():
                if name not in wanted or name in rebuilt:
                    self._retired[record.users] = wanted.get(name, record.config)
            moves = []
            for name in [each for each in self.records if each not in wanted]:
                moves.append(remove_child(self, self.records.pop(name).listener)
                             .addCallback(lambda _: []))
            for name, frontend in wanted.items():
                moves.extend(self._place(frontend, rebuilt.get(name)))
            return defer.gatherResults(moves).addCallback(
                lambda notes: [note for each in notes for note in each])

        return apply

    def _refill(self, config, wanted, rebuilt):
        for name, record in self.records.items():
            frontend = wanted.get(name, record.config)
            # Also for a replaced factory: its keep-alive connections log in again.
            record.users.replace(config.gateway_users_for(frontend.listener),
                                 require_login=frontend.listener.require_login)
            if name in wanted and name not in rebuilt:
                record.config = frontend
                if hasattr(record.factory, "handshake_timeout"):
                    record.factory.handshake_timeout = config.gateway.handshake_timeout
        for users, frontend in list(self._retired.items()):
            frontend = wanted.get(frontend.name, frontend)
            users.replace(config.gateway_users_for(frontend.listener),
                          require_login=frontend.listener.require_login)

    def _place(self, frontend, new_record):
        """Listen for C{frontend} as the reload wants: a list of Deferreds of notes."""
        name, endpoint = frontend.name, frontend.listener.endpoint
        current = self.records.get(name)
        listener = current.listener if current is not None else None
        if new_record is None:
            if listener is not None and listener.description == endpoint:
                return []
            moving = relisten(self._reactor, self, listener, endpoint, current.factory, name)
            return [moving.addCallback(self._moved, current)]
        self._metrics.add_frontend(name)
        self.records[name] = new_record
        if listener is not None and listener.description == endpoint:
            # The same address with another factory: it must be let go first.
            moving = remove_child(self, listener).addCallback(
                lambda _: relisten(self._reactor, self, None, endpoint, new_record.factory, name))
        else:
            moving = relisten(self._reactor, self, listener, endpoint, new_record.factory, name)
        return [moving.addCallback(self._moved, new_record, current)]

    def _moved(self, result, record, previous=None):
        listener, note = result
        if previous is not None and listener is not None and listener is previous.listener:
            # The new address could not be bound, so the old listener, with the
            # old factory, still serves: keep its record, so that later reloads
            # (users, limits) reach the listener that is actually serving.
            self.records[previous.config.name] = previous
            return [note + "; its other changes were not applied either"]
        record.listener = listener
        return [note] if note else []
